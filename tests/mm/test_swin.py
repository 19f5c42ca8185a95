"""Swin and Swin-Free as mmdet / mmseg backbones: mmdet's own ``SwinTransformer`` state dict (the
layout of the official dense checkpoints) loads strictly and gives its features at sizes that are
not multiples of the window; Swin-Free keeps its windows at every input size."""
import pytest

pytest.importorskip("mmdet")

import torch  # noqa: E402
from mmdet.models.backbones.swin import SwinTransformer as MMDetSwin  # noqa: E402

from visionzoo.mm import BACKBONES  # noqa: E402

TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
# stage maps of 25x19, 13x10, 7x5, 4x3 / 16x16 .. 2x2 / 58x48 .. 8x6: padded, and smaller than the window
SIZES = [(1, 3, 100, 76), (2, 3, 64, 64), (1, 3, 230, 190)]


@pytest.fixture(scope="module")
def mmdet_swin():
    torch.manual_seed(0)
    model = MMDetSwin(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7)
    with torch.no_grad():
        for param in model.parameters():  # random everything: biases, norms and bias tables included
            param.normal_(0, 0.2)
    model.eval()  # mmdet's train() returns None
    return model


def features(model, x):
    with torch.no_grad():
        return model(x)


def relative_errors(expected, got):
    assert [e.shape for e in expected] == [g.shape for g in got]
    return [((e - g).abs().max() / e.abs().max()).item() for e, g in zip(expected, got)]


@pytest.mark.parametrize("task", ["det", "seg"])
def test_mmdet_swin_checkpoint_loads_strictly_and_gives_its_features(mmdet_swin, task):
    checkpoint = {f"backbone.{key}": value for key, value in mmdet_swin.state_dict().items()}
    assert any(".attn.w_msa." in key for key in checkpoint) and "backbone.norm3.weight" in checkpoint
    backbone = BACKBONES["Swin"](arch="tiny", dense_schedule=task, **TINY).eval()
    backbone.load_state_dict(backbone.convert_state_dict(checkpoint), strict=True)
    for size in SIZES:
        x = torch.randn(size)
        assert max(relative_errors(features(mmdet_swin, x), features(backbone, x))) < 1e-5, size


def test_the_classification_layout_is_not_the_dense_one(mmdet_swin):
    """timm's layout (windows fitted to small maps, padding after the shift) with the same weights
    gives other features on maps that are not multiples of the window: the dense layout matters."""
    checkpoint = {f"backbone.{key}": value for key, value in mmdet_swin.state_dict().items()}
    backbone = BACKBONES["Swin"](arch="tiny", dense_schedule=None, **TINY).eval()
    backbone.load_state_dict(backbone.convert_state_dict(checkpoint), strict=True)
    x = torch.randn(SIZES[0])
    assert min(relative_errors(features(mmdet_swin, x), features(backbone, x))) > 1e-3


def test_swin_free_keeps_its_windows_at_every_size():
    backbone = BACKBONES["SwinFree"](arch="tiny", dense_schedule="det").eval()
    windows = [{block.attn.window_size for block in stage.blocks} for stage in backbone.model.stages]
    assert windows == [{(7, 7)}, {(14, 14)}, {(14, 14)}, {(7, 7)}]
    assert all(block.attn.shift_size == (0, 0) for stage in backbone.model.stages for block in stage.blocks)
    outputs = features(backbone, torch.randn(1, 3, 100, 76))
    assert [tuple(o.shape) for o in outputs] == [(1, 96, 25, 19), (1, 192, 13, 10), (1, 384, 7, 5), (1, 768, 4, 3)]
