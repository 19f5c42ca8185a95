"""HaloNet as an mmdet / mmseg backbone: the four stages (not timm's stem tap, nor the final 1x1 conv)
at any input size, halo attention maps zero padded to whole blocks; a timm HaloNet state dict (timm's
own model) loads through ``init_cfg`` and gives timm's stage outputs; a few training steps of Mask
R-CNN and UperNet through the generated configs."""
import math

import numpy as np
import pytest

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

import timm  # noqa: E402
import torch  # noqa: E402
from mmdet.registry import MODELS as DET_MODELS  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmseg.registry import MODELS as SEG_MODELS  # noqa: E402

import visionzoo.mm  # noqa: E402, F401
from tests.mm.conftest import ROOT, det_config, narrow_backbone_config, seg_config, train_losses  # noqa: E402
from visionzoo.layers import HaloAttention  # noqa: E402
from visionzoo.mm import runner  # noqa: E402

# a quarter of the widths (timm's width_factor), the registered blocks (8, halo 2 / 3)
SMALL = dict(width_factor=0.25)


@pytest.mark.parametrize("registry, arch, channels", [
    (DET_MODELS, "halonet26t", [64, 128, 256, 512]),
    (SEG_MODELS, "sehalonet33ts", [64, 128, 256, 384]),  # stage 4 before the final conv (-> 320)
    (DET_MODELS, "h1", [16, 32, 64, 128]),  # the paper's H1: stage outputs (64, 128, 256, 512) * rb 1
])
def test_backbone_returns_the_four_stages_at_any_size(registry, arch, channels):
    torch.manual_seed(0)
    backbone = registry.build(dict(type="HaloNet", arch=arch, drop_path_rate=0.0, **SMALL)).eval()
    assert backbone.num_features == channels and backbone.strides == [4, 8, 16, 32]
    assert all(m.pad_to_block for m in backbone.modules() if isinstance(m, HaloAttention))
    assert not any(key.startswith(("model.final_conv.", "model.head.")) for key in backbone.state_dict())
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 100, 140))
    assert [tuple(o.shape) for o in outputs] == [
        (1, c, math.ceil(100 / s), math.ceil(140 / s)) for c, s in zip(channels, (4, 8, 16, 32))]


def test_frozen_stages_are_the_stem_and_the_first_stages():
    """The dense taps' stages (``stages.{i}``, not timm's stem tap) are what ``frozen_stages`` counts."""
    backbone = DET_MODELS.build(dict(type="HaloNet", arch="halonet26t", frozen_stages=2, **SMALL)).train()
    frozen = {".".join(name.split(".")[:3 if name.startswith("model.stages") else 2])
              for name, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen == {"model.stem", "model.stages.0", "model.stages.1"}
    assert not backbone.model.stages[1].training and backbone.model.stages[2].training


def test_norm_eval_keeps_the_batchnorm_statistics():
    """``norm_eval=True`` (the detection configs): every BatchNorm stays in eval mode through
    ``train()``, its statistics unchanged by a training forward while its affine parameters get
    gradients; without it the statistics move."""
    for norm_eval in (True, False):
        torch.manual_seed(0)
        backbone = DET_MODELS.build(dict(type="HaloNet", arch="halonet26t", norm_eval=norm_eval, **SMALL)).train()
        norms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        before = [m.running_mean.clone() for m in norms]
        sum(o.sum() for o in backbone(torch.randn(2, 3, 64, 64))).backward()
        moved = [not torch.equal(m.running_mean, b) for m, b in zip(norms, before)]
        assert all(m.training is not norm_eval for m in norms)
        assert (not any(moved)) if norm_eval else all(moved)
        assert all(m.weight.grad is not None for m in norms)
    config = Config.fromfile(str(ROOT / "configs/coco/mask_rcnn_visionzoo_halonet26t_1x.py"))
    assert config.model.backbone.norm_eval is True


def test_timm_state_dict_gives_timm_stage_outputs(tmp_path):
    """timm's own SE-HaloNet-33TS (random weights) saved as a checkpoint: every backbone key loads
    (its final conv and classifier are reported unused), no output norm, and on a 256 input (whole
    blocks) the outputs are timm's stages; at 200x264 every attention map is padded."""
    torch.manual_seed(0)
    reference = timm.create_model("sehalonet33ts", **SMALL).eval()
    torch.save(reference.state_dict(), tmp_path / "sehalonet33ts.pth")
    backbone = SEG_MODELS.build(dict(type="HaloNet", arch="sehalonet33ts", **SMALL,
                                     init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "sehalonet33ts.pth"))))
    backbone.init_weights()
    state = backbone.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith(("final_conv.", "head.")):
            assert torch.equal(state[f"model.{key}"], value), key
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = reference.forward_intermediates(image, intermediates_only=True, exclude_final_conv=True)[1:]
        for got, want in zip(backbone.eval()(image), expected):
            torch.testing.assert_close(got, want)
        assert [tuple(o.shape[-2:]) for o in backbone(torch.randn(1, 3, 200, 264))] == [(50, 66), (25, 33), (13, 17), (7, 9)]


@pytest.mark.parametrize("task", ["det", "seg"])
def test_a_few_training_steps_through_the_generated_config(task, dense_data, tmp_path):
    """HaloNet-26T at a quarter width in the shipped Mask R-CNN 1x / UperNet 160k configs on 64x64
    images: the 4x4 and 2x2 maps of stages 3-4 are padded to one 8x8 block; training then
    evaluation; the training loss stays finite and falls."""
    if task == "det":
        config = det_config(tmp_path / "mask_rcnn.py", dense_data, "visionzoo_halonet26t", max_epochs=3, train_images=2)
        key = "loss_rpn_cls"
    else:
        config = seg_config(tmp_path / "upernet.py", dense_data, "visionzoo_halonet26t", max_iters=3, train_images=2)
        key = "loss"
    trained = runner.train(task, [str(narrow_backbone_config(config, task, SMALL, (64, 128, 256, 512))), "--work-dir", str(tmp_path / "work")])
    assert trained.iter == 3 and type(trained.model.backbone).__name__ == "HaloNet"
    losses = train_losses(trained, key)
    assert len(losses) == 3 and np.isfinite(train_losses(trained)).all()
    assert losses[-1] < losses[0], losses
    metric = "val/coco/bbox_mAP" if task == "det" else "val/mIoU"
    assert np.isfinite(float(trained.message_hub.get_scalar(metric).current()))
