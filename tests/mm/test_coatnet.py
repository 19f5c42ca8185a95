"""CoAtNet as an mmdet / mmseg backbone: global attention of stages 3-4 in zero-padded windows of the
stage maps of its 224 training size (14x14, 7x7) at every input size, the classification model's
features at 224, and a few training steps of Mask R-CNN and UperNet through the generated configs."""
import math

import numpy as np
import pytest

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

import timm  # noqa: E402
import torch  # noqa: E402
from mmdet.registry import MODELS as DET_MODELS  # noqa: E402
from mmseg.registry import MODELS as SEG_MODELS  # noqa: E402

import visionzoo.mm  # noqa: E402, F401
from tests.mm.conftest import det_config, narrow_backbone_config, seg_config, train_losses  # noqa: E402
from visionzoo.mm import runner  # noqa: E402

# a reduced CoAtNet-0 (the registered variant's block types, bias layout and windows)
SMALL = dict(depths=(1, 1, 1, 1), embed_dim=(32, 32, 64, 64), stem_width=16)
CHANNELS = [32, 32, 64, 64]


@pytest.mark.parametrize("registry", [DET_MODELS, SEG_MODELS])
def test_backbone_keeps_the_224_windows_and_takes_any_size(registry):
    torch.manual_seed(0)
    backbone = registry.build(dict(type="CoAtNet", arch="tiny", drop_path_rate=0.0, **SMALL)).eval()
    assert backbone.model_name == "visionzoo_coatnet_0"
    assert [block.attn.window_size for stage in backbone.model.stages[2:] for block in stage.blocks] == [(14, 14), (7, 7)]
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 100, 140))
    assert [tuple(o.shape) for o in outputs] == [
        (1, c, math.ceil(100 / s), math.ceil(140 / s)) for c, s in zip(CHANNELS, (4, 8, 16, 32))]
    # at 224 every window is the whole stage map: the classification model's features
    model = timm.create_model("visionzoo_coatnet_0", num_classes=0, **SMALL).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in backbone.state_dict().items() if k.startswith("model.")},
                          strict=False)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model.forward_intermediates(image, intermediates_only=True)
        got = backbone(image)
    for i, (feature, output) in enumerate(zip(expected, got)):
        torch.testing.assert_close(output, getattr(backbone, f"norm{i}")(feature))


@pytest.mark.parametrize("task", ["det", "seg"])
def test_a_few_training_steps_through_the_generated_config(task, dense_data, tmp_path):
    """Reduced CoAtNet-0 in the shipped Mask R-CNN 1x / UperNet 160k configs on 64x64 images: the 4x4
    and 2x2 maps of stages 3-4 are padded to one 14x14 / 7x7 window; training then evaluation; the
    training loss stays finite and falls."""
    if task == "det":
        config = det_config(tmp_path / "mask_rcnn.py", dense_data, "visionzoo_coatnet_0", max_epochs=3, train_images=2)
        key = "loss_rpn_cls"
    else:
        config = seg_config(tmp_path / "upernet.py", dense_data, "visionzoo_coatnet_0", max_iters=3, train_images=2)
        key = "loss"
    trained = runner.train(task, [str(narrow_backbone_config(config, task, SMALL, CHANNELS)), "--work-dir", str(tmp_path / "work")])
    assert trained.iter == 3 and type(trained.model.backbone).__name__ == "CoAtNet"
    assert trained.model.backbone.num_features == CHANNELS
    losses = train_losses(trained, key)
    assert len(losses) == 3 and np.isfinite(train_losses(trained)).all()
    assert losses[-1] < losses[0], losses
    metric = "val/coco/bbox_mAP" if task == "det" else "val/mIoU"
    assert np.isfinite(float(trained.message_hub.get_scalar(metric).current()))
