#!/usr/bin/env python
"""Write the per-model mmdet / mmseg configs from one table, so they cannot drift apart.

    python tools/make_mm_configs.py           # (re)write configs/ade20k/*.py and configs/coco/*.py
    python tools/make_mm_configs.py --check   # exit 1 when a written config differs from the table

Each config only names its backbone (type, size, drop path, pretrained weights) and the channels
the heads read; the recipes live in configs/_base_/ (on mmdet's / mmseg's own base configs):

    configs/ade20k/upernet_<model>_512x512_160k.py   UperNet, ADE20K 512x512, 160k iterations
    configs/coco/mask_rcnn_<model>_1x.py              Mask R-CNN + FPN, COCO, 12 epochs
    configs/coco/mask_rcnn_<model>_3x.py              Mask R-CNN + FPN, COCO, 36 epochs, multi-scale + crop
"""
from __future__ import annotations

import argparse
import sys
from functools import lru_cache
from pathlib import Path
from typing import Dict, List

import timm
import torch

import visionzoo  # noqa: F401  (registers the models)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Drop path rates of the official configs (SHI-Labs/Neighborhood-Attention-Transformer detection/
# and segmentation/). `det` marked "cascade": no official Mask R-CNN config, the Cascade Mask R-CNN
# one's; DiNAT-L / DiNAT_s-L UperNet: the official 640x640 config's (here at 512x512). Large
# models start from the ImageNet-22K weights, as officially.
MODELS: Dict[str, dict] = {
    "visionzoo_nat_m": dict(type="NAT", arch="mini", weights="in1k", det=0.2, seg=0.2),
    "visionzoo_nat_t": dict(type="NAT", arch="tiny", weights="in1k", det=0.2, seg=0.3),
    "visionzoo_nat_s": dict(type="NAT", arch="small", weights="in1k", det=0.35, seg=0.5),
    "visionzoo_nat_b": dict(type="NAT", arch="base", weights="in1k", det=0.5, seg=0.5),  # det: cascade
    "visionzoo_dinat_m": dict(type="DiNAT", arch="mini", weights="in1k", det=0.2, seg=0.2),
    "visionzoo_dinat_t": dict(type="DiNAT", arch="tiny", weights="in1k", det=0.2, seg=0.3),
    "visionzoo_dinat_s": dict(type="DiNAT", arch="small", weights="in1k", det=0.35, seg=0.5),
    "visionzoo_dinat_b": dict(type="DiNAT", arch="base", weights="in1k", det=0.6, seg=0.5),  # det: cascade
    "visionzoo_dinat_l": dict(type="DiNAT", arch="large", weights="in22k", det=0.6, seg=0.3),  # det: cascade
    "visionzoo_dinats_t": dict(type="DiNAT_s", arch="tiny", weights="in1k", det=0.2, seg=0.3),
    "visionzoo_dinats_s": dict(type="DiNAT_s", arch="small", weights="in1k", det=0.35, seg=0.3),
    "visionzoo_dinats_b": dict(type="DiNAT_s", arch="base", weights="in1k", det=0.6, seg=0.3),  # det: cascade
    "visionzoo_dinats_l": dict(type="DiNAT_s", arch="large", weights="in22k", det=0.6, seg=0.3),  # det: cascade
}
DILATED = ("DiNAT", "DiNAT_s")

# (folder, file name, base config, task, title)
RECIPES = [
    ("ade20k", "upernet_{model}_512x512_160k.py", "upernet_visionzoo_512x512_160k_ade20k.py", "seg",
     "UperNet, ADE20K 512x512 crops, 160k iterations"),
    ("coco", "mask_rcnn_{model}_1x.py", "mask_rcnn_visionzoo_fpn_1x_coco.py", "det",
     "Mask R-CNN + FPN, COCO, 1x (12 epochs)"),
    ("coco", "mask_rcnn_{model}_3x.py", "mask_rcnn_visionzoo_fpn_ms-crop-3x_coco.py", "det",
     "Mask R-CNN + FPN, COCO, 3x (36 epochs), multi-scale resize and crop"),
]


@lru_cache(maxsize=None)
def stage_channels(model_name: str) -> List[int]:
    with torch.device("meta"):  # only the feature_info is needed
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    return [info["num_chs"] for info in model.feature_info]


def render(model_name: str, spec: dict, base: str, task: str, title: str) -> str:
    channels = stage_channels(model_name)
    url = timm.models.get_pretrained_cfg(f"{model_name}.{spec['weights']}").url
    backbone = [f"type='{spec['type']}'", f"arch='{spec['arch']}'"]
    if spec["type"] in DILATED:
        backbone.append(f"dense_schedule='{task}'")  # the official dense dilations (visionzoo.mm.DENSE_DILATIONS)
    backbone += [
        f"drop_path_rate={spec[task]}",
        f"init_cfg=dict(type='Pretrained', checkpoint='{url}')",
    ]
    backbone_text = ",\n        ".join(backbone)
    if task == "seg":
        heads = f"decode_head=dict(in_channels={channels}),\n    auxiliary_head=dict(in_channels={channels[2]})"
    else:
        heads = f"neck=dict(in_channels={channels})"
    return (
        f"# {spec['type']} {spec['arch']} ({model_name}.{spec['weights']}): {title}.\n"
        f"# Written by tools/make_mm_configs.py from its MODELS table: edit the table, not this file.\n"
        f"_base_ = '../_base_/{base}'\n"
        f"model = dict(\n"
        f"    backbone=dict(\n"
        f"        {backbone_text}),\n"
        f"    {heads})\n"
    )


def expected_configs() -> Dict[Path, str]:
    """Path -> content of every generated config."""
    out = {}
    for model_name, spec in MODELS.items():
        for folder, pattern, base, task, title in RECIPES:
            out[CONFIGS / folder / pattern.format(model=model_name)] = render(model_name, spec, base, task, title)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a config is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_configs().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print("stale (run tools/make_mm_configs.py): " + ", ".join(str(p.relative_to(ROOT)) for p in stale))
        return 1
    print(f"{len(stale)} config(s) {'stale' if args.check else 'written'}, {len(MODELS) * len(RECIPES)} in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
