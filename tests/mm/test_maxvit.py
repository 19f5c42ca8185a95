"""MaxViT as an mmdet / mmseg backbone: the windows and grid of its 224 weights at every input size
(maps padded), the classification model's features where no padding is needed, and a few training
steps of Mask R-CNN and UperNet through the generated configs."""
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
from tests.mm.conftest import det_config, seg_config, train_losses  # noqa: E402
from visionzoo.mm import runner  # noqa: E402

# a reduced MaxViT-T (the registered variant's windows, bias layout and block structure)
SMALL = dict(depths=(1, 1, 1, 1), embed_dim=(32, 32, 64, 64), stem_width=16)


@pytest.mark.parametrize("registry", [DET_MODELS, SEG_MODELS])
def test_backbone_keeps_7x7_windows_and_takes_any_size(registry):
    torch.manual_seed(0)
    backbone = registry.build(dict(type="MaxViT", arch="tiny", drop_path_rate=0.0, **SMALL)).eval()
    attentions = [module for name, module in backbone.named_modules() if name.endswith((".attn_block.attn", ".attn_grid.attn"))]
    assert len(attentions) == 8 and {attn.window_size for attn in attentions} == {(7, 7)}
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 100, 140))
    assert [tuple(o.shape) for o in outputs] == [
        (1, c, math.ceil(100 / s), math.ceil(140 / s)) for c, s in zip((32, 32, 64, 64), (4, 8, 16, 32))]
    # where every map is a multiple of 7 nothing is padded: the classification model's features
    model = timm.create_model("visionzoo_maxvit_t", num_classes=0, **SMALL).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in backbone.state_dict().items() if k.startswith("model.")},
                          strict=False)
    image = torch.randn(1, 3, 224, 448)
    with torch.no_grad():
        expected = model.forward_intermediates(image, intermediates_only=True)
        got = backbone(image)
    for norm, feature, output in zip((backbone.norm0, backbone.norm1, backbone.norm2, backbone.norm3), expected, got):
        torch.testing.assert_close(output, norm(feature))


@pytest.mark.parametrize("task", ["det", "seg"])
def test_a_few_training_steps_through_the_generated_config(task, dense_data, tmp_path):
    """MaxViT-T (full size) in the shipped Mask R-CNN 1x / UperNet 160k configs on 64x64 images:
    every stage map is padded (16x16 -> 21x21, ..., 2x2 -> 7x7); the training loss stays finite and falls."""
    if task == "det":
        config = det_config(tmp_path / "mask_rcnn.py", dense_data, "visionzoo_maxvit_t", max_epochs=3, train_images=2)
        key = "loss_rpn_cls"
    else:
        config = seg_config(tmp_path / "upernet.py", dense_data, "visionzoo_maxvit_t", max_iters=3, train_images=2)
        key = "loss"
    trained = runner.train(task, [str(config), "--work-dir", str(tmp_path / "work")])
    assert trained.iter == 3 and type(trained.model.backbone).__name__ == "MaxViT"
    losses = train_losses(trained, key)
    assert len(losses) == 3 and np.isfinite(train_losses(trained)).all()
    assert losses[-1] < losses[0], losses
