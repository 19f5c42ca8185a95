"""Mask R-CNN (mmdet) through tools/train_det.py's and tools/test_det.py's code on the generated
COCO-format data: each family's smallest model lowers its loss on a fixed batch; the evaluation
scores a perfect prediction (read from the annotation file, independently of mmdet) bbox and segm
mAP 1; a checkpoint is tested with the test tool; data whose class names are not the config's is
a clear error."""
import json

import numpy as np
import pytest

pytest.importorskip("mmdet")

import torch  # noqa: E402
from mmdet.models.detectors import MaskRCNN  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from tests.mm.conftest import CONFIGS, SMALLEST, _classes, det_config, train_losses  # noqa: E402
from visionzoo.mm import runner  # noqa: E402


@pytest.mark.parametrize("family", sorted(SMALLEST))
def test_mask_rcnn_lowers_its_loss_on_a_fixed_batch(family, dense_data, tmp_path):
    config = det_config(tmp_path / f"mask_rcnn_{family}.py", dense_data, SMALLEST[family], max_epochs=6,
                        train_images=2)
    work_dir = tmp_path / "work"
    trained = runner.train("det", [str(config), "--work-dir", str(work_dir)])
    assert trained.iter == 6 and type(trained.model.backbone).__name__ == trained.cfg.model.backbone.type
    losses = train_losses(trained)
    assert len(losses) == 6 and np.isfinite(losses).all()
    # the classification losses of the RPN and of the RoI head fall within a few steps (from ln 2 for
    # the RPN's sigmoid); single steps bounce back as the sampled anchors change, so the best of the
    # last three is compared; the box and mask losses are averaged over the positive proposals, which
    # change as the RPN learns
    for key in ("loss_rpn_cls", "loss_cls"):
        values = train_losses(trained, key)
        assert min(values[-3:]) < 0.85 * np.mean(values[:2]), (key, values)
    if family != "dinats":
        return
    # the test tool reads the checkpoint (weights-only) and evaluates it as the training run did
    metrics = runner.test("det", [str(config), str(work_dir / "epoch_6.pth"), "--work-dir", str(tmp_path / "test")])
    for key in ("bbox_mAP", "segm_mAP"):
        assert metrics[f"coco/{key}"] == pytest.approx(trained.message_hub.get_scalar(f"val/coco/{key}").current())


def test_a_perfect_prediction_scores_map_1(dense_data, tmp_path, monkeypatch):
    """Boxes, labels and masks read from instances_val2017.json (pycocotools rasterizes the
    polygons, as for the ground truth) through tools/test_det.py's evaluation: mAP 1."""
    coco = json.loads((dense_data / "coco" / "annotations" / "instances_val2017.json").read_text())
    images = {image["id"]: image for image in coco["images"]}
    names = {category["id"]: category["name"] for category in coco["categories"]}

    def predict(self, inputs, data_samples, rescale=True):
        classes = list(_classes())  # the config's metainfo
        for sample in data_samples:
            image = images[sample.img_id]
            annotations = [a for a in coco["annotations"] if a["image_id"] == sample.img_id]
            masks = [mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], image["height"],
                                                                               image["width"])))
                     for a in annotations]
            instances = InstanceData()
            instances.bboxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)],
                                            dtype=torch.float32)
            instances.scores = torch.ones(len(annotations))
            instances.labels = torch.tensor([classes.index(names[a["category_id"]]) for a in annotations])
            instances.masks = torch.from_numpy(np.stack(masks).astype(bool))
            sample.pred_instances = instances
        return data_samples

    monkeypatch.setattr(MaskRCNN, "predict", predict)
    config = det_config(tmp_path / "mask_rcnn.py", dense_data, SMALLEST["nat"])
    checkpoint = tmp_path / "empty.pth"
    torch.save({"state_dict": {}}, checkpoint)
    metrics = runner.test("det", [str(config), str(checkpoint), "--work-dir", str(tmp_path / "test")])
    assert metrics["coco/bbox_mAP"] == 1.0 and metrics["coco/segm_mAP"] == 1.0


def test_class_names_not_in_the_data_are_a_clear_error(dense_data, tmp_path):
    """The shipped COCO config (COCO's 80 classes) on the garment data."""
    config = CONFIGS / "coco" / "mask_rcnn_visionzoo_nat_m_1x.py"
    coco = f"{dense_data / 'coco'}/"
    with pytest.raises(SystemExit) as error:
        runner.train("det", [str(config), "--work-dir", str(tmp_path / "work"), "--cfg-options",
                             f"train_dataloader.dataset.data_root={coco}", "model.backbone.init_cfg=None"])
    message = str(error.value)
    assert message.startswith("train_dataloader.dataset: the classes of the config are not those of")
    assert "instances_train2017.json" in message and "expected 80 ('person', 'bicycle'" in message
    assert "the file has 10 ('T-shirt/top', 'Trouser'" in message and "metainfo=dict(classes=" in message
