#!/usr/bin/env python
"""Small detection / segmentation datasets in the real ADE20K and COCO formats, from real pixels.

Fashion-MNIST garments (the offline Debian package ``dataset-fashion-mnist``, see
:mod:`visionzoo.data`) are scaled, tinted and pasted without overlap onto larger canvases whose
background is another garment, blurred and dimmed. The class of an object is its garment label; its
mask is the thresholded garment with holes filled (the outer contours, so that COCO's polygons and
the ADE20K label map describe the same pixels). Train scenes use the Fashion-MNIST train split, val
scenes the test split. The same ``seed`` gives the same files.

    python tools/make_dense_data.py data/dense --train 200 --val 50 --size 128

writes::

    data/dense/ade20k/images/{training,validation}/*.jpg
    data/dense/ade20k/annotations/{training,validation}/*.png   uint8: 0 background (ignored with
                                                                reduce_zero_label), 1 + garment label
    data/dense/coco/{train2017,val2017}/*.jpg
    data/dense/coco/annotations/instances_{train,val}2017.json  bbox [x, y, w, h], area, iscrowd 0,
                                                                polygon segmentation, category 1 + label

mmseg reads the first with ``BaseSegDataset`` (ADE20K's ``img_suffix='.jpg'``,
``seg_map_suffix='.png'``, ``reduce_zero_label=True``) and ``metainfo=dict(classes=CLASSES)``;
mmdet reads the second with ``CocoDataset`` and the same ``metainfo``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

from visionzoo.data import FashionMNIST

CLASSES: Tuple[str, ...] = FashionMNIST.classes
ADE20K_SPLITS = {"train": "training", "val": "validation"}
COCO_SPLITS = {"train": "train2017", "val": "val2017"}
MASK_THRESHOLD = 48  # garment pixels are bright on black; below this is background

Instance = Tuple[int, np.ndarray]  # (label, bool mask [H, W])
Scene = Tuple[np.ndarray, List[Instance]]  # (RGB uint8 [H, W, 3], instances)


def load_garments(split: str, root: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``(images uint8 [N, 28, 28], labels int64 [N])`` of ``'train'`` or ``'val'`` (its test split)."""
    dataset = FashionMNIST(root=root, split="train" if split == "train" else "test")
    return dataset.images, dataset.targets


def garment_mask(glyph: np.ndarray) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Filled mask ``bool [h, w]`` of a garment and its outer contours (``[n, 1, 2]`` int, x-y order)."""
    binary = (glyph >= MASK_THRESHOLD).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contours = [c for c in contours if len(c) >= 3 and cv2.contourArea(c) >= 4.0]
    filled = np.zeros_like(binary)
    cv2.drawContours(filled, contours, -1, color=1, thickness=cv2.FILLED)
    return filled.astype(bool), contours


def make_scene(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    size: int = 128,
    max_objects: int = 3,
    scale: Tuple[float, float] = (1.0, 2.5),
    attempts: int = 20,
) -> Scene:
    """One canvas ``size x size`` with 1 to ``max_objects`` non-overlapping garments."""
    # background: a garment blown up to the canvas, blurred and dimmed, in a random tint
    background = cv2.resize(images[rng.integers(len(images))], (size, size), interpolation=cv2.INTER_CUBIC)
    background = cv2.GaussianBlur(background.astype(np.float32), (0, 0), sigmaX=size / 16)
    canvas = (0.15 + 0.25 * background[..., None] / 255.0) * rng.uniform(0.3, 1.0, size=3) * 255.0
    taken = np.zeros((size, size), dtype=bool)
    instances: List[Instance] = []
    for _ in range(rng.integers(1, max_objects + 1)):
        index = rng.integers(len(images))
        side = int(round(28 * rng.uniform(*scale)))
        side = min(side, size)
        glyph = cv2.resize(images[index], (side, side), interpolation=cv2.INTER_LINEAR)
        mask, _ = garment_mask(glyph)
        if not mask.any():
            continue
        for _ in range(attempts):
            top, left = rng.integers(0, size - side + 1, size=2)
            window = (slice(top, top + side), slice(left, left + side))
            if not taken[window][mask].any():
                break
        else:
            continue  # no free place for it
        full = np.zeros((size, size), dtype=bool)
        full[window] = mask
        # grow the taken region by 2 pixels so objects never touch (their masks stay separable)
        taken |= cv2.dilate(full.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        tint = rng.uniform(0.5, 1.0, size=3) * 255.0
        texture = 0.35 + 0.65 * glyph.astype(np.float32)[..., None] / 255.0
        canvas[window][mask] = (texture * tint)[mask]
        instances.append((int(labels[index]), full))
    return np.clip(canvas, 0, 255).round().astype(np.uint8), instances


def make_scenes(num: int, split: str, size: int = 128, seed: int = 0, max_objects: int = 3,
                scale: Tuple[float, float] = (1.0, 2.5), root: Optional[str] = None) -> List[Scene]:
    """``num`` scenes of ``split`` (``'train'`` / ``'val'``), deterministic in ``seed``."""
    images, labels = load_garments(split, root)
    rng = np.random.default_rng([seed, list(ADE20K_SPLITS).index(split)])
    scenes = []
    while len(scenes) < num:
        image, instances = make_scene(rng, images, labels, size, max_objects, scale)
        if instances:
            scenes.append((image, instances))
    return scenes


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def write_ade20k(root: Path, scenes: Dict[str, Sequence[Scene]]) -> None:
    """ADE20K layout: ``images/<split>/*.jpg`` and ``annotations/<split>/*.png`` (0 = background)."""
    for split, split_scenes in scenes.items():
        folder = ADE20K_SPLITS[split]
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for i, (image, instances) in enumerate(split_scenes):
            name = f"dense_{folder}_{i:08d}"
            _save_jpeg(root / "images" / folder / f"{name}.jpg", image)
            label_map = np.zeros(image.shape[:2], dtype=np.uint8)
            for label, mask in instances:
                label_map[mask] = label + 1
            Image.fromarray(label_map).save(root / "annotations" / folder / f"{name}.png")


def polygons(mask: np.ndarray) -> List[List[float]]:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` of the outer contours of ``mask``."""
    _, contours = garment_mask(mask.astype(np.uint8) * 255)
    return [c.reshape(-1).astype(float).tolist() for c in contours]


def coco_dict(split_scenes: Iterable[Scene], folder: str) -> dict:
    """The ``instances_*.json`` content of ``split_scenes`` whose images are ``<folder>/*.jpg``."""
    images, annotations = [], []
    for image_id, (image, instances) in enumerate(split_scenes, start=1):
        height, width = image.shape[:2]
        images.append(dict(id=image_id, file_name=f"{image_id:012d}.jpg", width=width, height=height))
        for label, mask in instances:
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            annotations.append(dict(
                id=len(annotations) + 1,
                image_id=image_id,
                category_id=label + 1,
                bbox=[x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                area=int(mask.sum()),
                iscrowd=0,
                segmentation=polygons(mask),
            ))
    return dict(
        info=dict(description=f"visionzoo dense data ({folder}): Fashion-MNIST garments on canvases"),
        licenses=[dict(id=1, name="MIT (Fashion-MNIST)")],
        images=images,
        annotations=annotations,
        categories=[dict(id=k + 1, name=name, supercategory="garment") for k, name in enumerate(CLASSES)],
    )


def write_coco(root: Path, scenes: Dict[str, Sequence[Scene]]) -> None:
    """COCO layout: ``<split>2017/*.jpg`` and ``annotations/instances_<split>2017.json``."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, split_scenes in scenes.items():
        folder = COCO_SPLITS[split]
        content = coco_dict(split_scenes, folder)
        for entry, (image, _) in zip(content["images"], split_scenes):
            _save_jpeg(root / folder / entry["file_name"], image)
        (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(content))


def make_dense_data(out: str, num_train: int = 200, num_val: int = 50, size: int = 128, seed: int = 0,
                    max_objects: int = 3, scale: Tuple[float, float] = (1.0, 2.5),
                    formats: Sequence[str] = ("ade20k", "coco"), fashion_root: Optional[str] = None) -> Path:
    """Write ``<out>/ade20k`` and / or ``<out>/coco`` from the same scenes; returns ``Path(out)``."""
    scenes = {split: make_scenes(num, split, size, seed, max_objects, scale, fashion_root)
              for split, num in (("train", num_train), ("val", num_val))}
    out = Path(out)
    writers = {"ade20k": write_ade20k, "coco": write_coco}
    for fmt in formats:
        writers[fmt](out / fmt, scenes)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (gets ade20k/ and coco/)")
    parser.add_argument("--train", type=int, default=200, help="train images")
    parser.add_argument("--val", type=int, default=50, help="validation images")
    parser.add_argument("--size", type=int, default=128, help="canvas side in pixels")
    parser.add_argument("--max-objects", type=int, default=3, help="garments per image, at most")
    parser.add_argument("--scale", type=float, nargs=2, default=(1.0, 2.5), help="garment scale range (x 28 px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", nargs="+", choices=["ade20k", "coco"], default=["ade20k", "coco"])
    parser.add_argument("--fashion-root", help="folder of the Fashion-MNIST idx files (default: the Debian package's)")
    args = parser.parse_args(argv)
    out = make_dense_data(args.out, args.train, args.val, args.size, args.seed, args.max_objects,
                          tuple(args.scale), args.formats, args.fashion_root)
    print(f"wrote {', '.join(str(out / fmt) for fmt in args.formats)}")


if __name__ == "__main__":
    main()
