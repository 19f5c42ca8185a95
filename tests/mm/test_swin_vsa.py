"""Swin-VSA as an mmdet / mmseg backbone: registered in both, and a checkpoint in Swin's official
layout with the official VSA attention keys loads through ``init_cfg`` and gives the
classification model's features on a map that is padded and smaller than the window."""
import pytest

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

import timm  # noqa: E402
import torch  # noqa: E402
from mmdet.registry import MODELS as DET_MODELS  # noqa: E402
from mmseg.registry import MODELS as SEG_MODELS  # noqa: E402

from tests.models.test_swin_vsa import _official_layout  # noqa: E402
from visionzoo.mm import BACKBONES  # noqa: E402

TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))


@pytest.mark.parametrize("registry, task", [(DET_MODELS, "det"), (SEG_MODELS, "seg")])
def test_registered_in_mmdet_and_mmseg(registry, task):
    registered = registry.get("SwinVSA")
    assert issubclass(registered, BACKBONES["SwinVSA"]) and registered.task == task


def test_official_layout_checkpoint_gives_the_classification_features(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("visionzoo_swin_vsa_t", **TINY).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".attn.sampling_" in name:
                param.normal_(0, 0.05)  # moved windows: a regressor left at its zero init would show
    torch.save(_official_layout(model.state_dict()), tmp_path / "swin_vsa.pth")
    init_cfg = dict(type="Pretrained", checkpoint=str(tmp_path / "swin_vsa.pth"))
    backbone = BACKBONES["SwinVSA"](arch="tiny", out_norms=False, init_cfg=init_cfg, **TINY)
    backbone.init_weights()
    x = torch.randn(1, 3, 100, 76)  # stage maps 25x19, 13x10, 7x5, 4x3
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        features = backbone.eval()(x)
    assert [tuple(f.shape) for f in features] == [(1, 16, 25, 19), (1, 32, 13, 10), (1, 64, 7, 5), (1, 128, 4, 3)]
    for want, got in zip(expected, features):
        torch.testing.assert_close(got, want)
