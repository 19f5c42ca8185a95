"""tools/make_dense_data.py: deterministic, and the ADE20K label maps and COCO annotations describe
the same garments (needs only the Fashion-MNIST package, not the mm extra)."""
import json

import cv2
import numpy as np
from PIL import Image

from tests.mm.conftest import load_tool

make_dense_data = load_tool("make_dense_data")


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    kwargs = dict(num_train=3, num_val=2, size=64, max_objects=2, scale=(1.0, 1.8))
    first = files(make_dense_data.make_dense_data(tmp_path / "a", seed=3, **kwargs))
    assert first == files(make_dense_data.make_dense_data(tmp_path / "b", seed=3, **kwargs))
    assert first != files(make_dense_data.make_dense_data(tmp_path / "c", seed=4, **kwargs))


def test_ade20k_and_coco_agree(dense_data):
    for split, ade_split, coco_split in (("train", "training", "train2017"), ("val", "validation", "val2017")):
        coco = json.loads((dense_data / "coco" / "annotations" / f"instances_{coco_split}.json").read_text())
        assert [c["name"] for c in coco["categories"]] == list(make_dense_data.CLASSES)
        annotations = {}
        for ann in coco["annotations"]:
            annotations.setdefault(ann["image_id"], []).append(ann)
        ade_images = sorted((dense_data / "ade20k" / "images" / ade_split).glob("*.jpg"))
        assert len(ade_images) == len(coco["images"]) == (8 if split == "train" else 4)
        for ade_image, image in zip(ade_images, coco["images"]):
            # the same pixels in both layouts
            pixels = np.asarray(Image.open(ade_image), dtype=np.int16)
            assert np.abs(pixels - np.asarray(Image.open(dense_data / "coco" / coco_split / image["file_name"]),
                                              dtype=np.int16)).max() == 0
            label_map = np.asarray(Image.open(dense_data / "ade20k" / "annotations" / ade_split / f"{ade_image.stem}.png"))
            assert label_map.dtype == np.uint8 and label_map.shape == (image["height"], image["width"])
            assert set(np.unique(label_map)) <= set(range(len(make_dense_data.CLASSES) + 1))
            foreground = np.zeros_like(label_map, dtype=bool)
            for ann in annotations[image["id"]]:
                assert ann["iscrowd"] == 0 and ann["segmentation"] and all(len(p) >= 6 for p in ann["segmentation"])
                mask = np.zeros_like(label_map)
                for polygon in ann["segmentation"]:
                    cv2.fillPoly(mask, [np.asarray(polygon, dtype=np.int32).reshape(-1, 2)], 1)
                mask = mask.astype(bool)
                x, y, w, h = ann["bbox"]
                ys, xs = np.nonzero(mask)
                assert (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (x, y, w, h)
                # the polygon is the label map's region of this class (outer contours: identical up to edges)
                same_class = label_map == ann["category_id"]
                assert (mask & same_class).sum() / (mask | same_class)[y:y + h, x:x + w].sum() > 0.9
                assert abs(int(mask.sum()) - ann["area"]) <= 0.1 * ann["area"]
                foreground |= mask
            assert np.array_equal(foreground, label_map > 0)
