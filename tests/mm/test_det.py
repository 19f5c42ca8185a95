"""Mask R-CNN (mmdet) on each family's smallest model: one short epoch on the generated COCO-format
data with tools/train_det.py's code, then bbox and segm mAP from mmdet's CocoMetric, and a
checkpoint evaluated with tools/test_det.py's code."""
import math

import pytest

pytest.importorskip("mmdet")

from tests.mm.conftest import SMALLEST, det_config  # noqa: E402
from visionzoo.mm import runner  # noqa: E402


def assert_map(value):
    value = float(value)  # numpy or Python scalars
    assert math.isfinite(value) and 0.0 <= value <= 1.0


@pytest.mark.parametrize("family", sorted(SMALLEST))
def test_mask_rcnn_trains_and_evaluates_coco_map(family, dense_data, tmp_path):
    config = det_config(tmp_path / f"mask_rcnn_{family}.py", dense_data, SMALLEST[family])
    work_dir = tmp_path / "work"
    trained = runner.train("det", [str(config), "--work-dir", str(work_dir)])
    assert trained.iter == 4 and trained.epoch == 1
    assert type(trained.model.backbone).__name__ in ("NAT", "DiNAT", "DiNATs")
    for metric in ("bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50"):
        assert_map(trained.message_hub.get_scalar(f"val/coco/{metric}").current())
    if family != "dinats":
        return
    metrics = runner.test("det", [str(config), str(work_dir / "epoch_1.pth"), "--work-dir", str(tmp_path / "test")])
    assert_map(metrics["coco/bbox_mAP"])
    assert_map(metrics["coco/segm_mAP"])
