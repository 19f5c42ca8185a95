#!/usr/bin/env python
"""Write the per-model mmdet / mmseg configs from the families' dense declarations.

    python tools/make_mm_configs.py           # (re)write configs/ade20k/*.py and configs/coco/*.py
    python tools/make_mm_configs.py --check   # exit 1 when a written config differs from the declarations

Every size of every family that declares dense support (``visionzoo.models.dense.DenseFamily``, at
the end of its model file) gets a config per task it has a drop path rate for. Each config only
names its backbone (type, size, dense-task options, drop path, pretrained weights) and the channels
the heads read; the recipes live in configs/_base_/ (on mmdet's / mmseg's own base configs):

    configs/ade20k/upernet_<model>_512x512_160k.py   UperNet, ADE20K 512x512, 160k iterations
    configs/coco/mask_rcnn_<model>_1x.py              Mask R-CNN + FPN, COCO, 12 epochs
    configs/coco/mask_rcnn_<model>_3x.py              Mask R-CNN + FPN, COCO, 36 epochs, multi-scale + crop
    configs/coco/cascade_mask_rcnn_<model>_3x.py      Cascade Mask R-CNN + FPN, COCO, 36 epochs, multi-scale + crop

A recipe is written for the sizes that declare a drop path rate under its key: ``'seg'`` (UperNet),
``'det'`` (both Mask R-CNN schedules), ``'det_cascade'`` (Cascade Mask R-CNN).
"""
from __future__ import annotations

import argparse
import sys
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import timm
import torch

import visionzoo  # noqa: F401  (registers the models and their dense declarations)
from visionzoo.models.dense import DENSE_FAMILIES, DenseArch, DenseFamily

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# (folder, file name, base config, task, drop path key, title)
RECIPES = [
    ("ade20k", "upernet_{model}_512x512_160k.py", "upernet_visionzoo_512x512_160k_ade20k.py", "seg", "seg",
     "UperNet, ADE20K 512x512 crops, 160k iterations"),
    ("coco", "mask_rcnn_{model}_1x.py", "mask_rcnn_visionzoo_fpn_1x_coco.py", "det", "det",
     "Mask R-CNN + FPN, COCO, 1x (12 epochs)"),
    ("coco", "mask_rcnn_{model}_3x.py", "mask_rcnn_visionzoo_fpn_ms-crop-3x_coco.py", "det", "det",
     "Mask R-CNN + FPN, COCO, 3x (36 epochs), multi-scale resize and crop"),
    ("coco", "cascade_mask_rcnn_{model}_3x.py", "cascade_mask_rcnn_visionzoo_fpn_giou_4conv1f_ms-crop-3x_coco.py", "det",
     "det_cascade", "Cascade Mask R-CNN + FPN (4conv1fc GIoU heads), COCO, 3x (36 epochs), multi-scale resize and crop"),
]


@lru_cache(maxsize=None)
def stage_channels(family_name: str, model_name: str, task: str) -> List[int]:
    """The output channels of the backbone, built with the family's options for ``task`` (which may
    change its taps: HaloNet's dense layout drops timm's stem tap)."""
    family = DENSE_FAMILIES[family_name]
    kwargs = family.dense_kwargs(model_name, task) if family.task_kwargs is not None else {}
    with torch.device("meta"):  # only the feature_info is needed
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    return [info["num_chs"] for info in model.feature_info]


def checkpoint_url(name: str) -> str:
    """The pretrained weights of ``name`` (``model.tag``) as ``init_cfg`` reads them: their URL, or
    ``hf-hub:<repo>`` for weights only on the Hugging Face Hub."""
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.url or f"hf-hub:{cfg.hf_hub_id}"


def render(family: DenseFamily, arch: str, spec: DenseArch, base: str, task: str, rate_key: str, title: str) -> str:
    model_name = spec.model_name
    channels = stage_channels(family.name, model_name, task)
    type_name = family.type_names[0]
    backbone = [f"type='{type_name}'", f"arch='{arch}'"]
    if family.task_kwargs is not None:
        backbone.append(f"dense_schedule='{task}'")  # the family's declared options for the task
    backbone.append(f"drop_path_rate={spec.drop_path_rate[rate_key]}")
    if rate_key in family.norm_eval:  # BatchNorm statistics frozen at their ImageNet values
        backbone.append("norm_eval=True")
    if spec.pretrained_tag:
        url = checkpoint_url(f"{model_name}.{spec.pretrained_tag}")
        backbone.append(f"init_cfg=dict(type='Pretrained', checkpoint='{url}')")
        weights = f"{model_name}.{spec.pretrained_tag}"
    else:  # no released weights: the config names none rather than a wrong start
        backbone.append("init_cfg=None")
        weights = f"{model_name}, no released weights: set init_cfg to your ImageNet checkpoint"
    backbone_text = ",\n        ".join(backbone)
    if task == "seg":
        heads = f"decode_head=dict(in_channels={channels}),\n    auxiliary_head=dict(in_channels={channels[2]})"
    else:
        heads = f"neck=dict(in_channels={channels})"
    return (
        f"# {type_name} {arch} ({weights}): {title}.\n"
        f"# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.\n"
        f"_base_ = '../_base_/{base}'\n"
        f"model = dict(\n"
        f"    backbone=dict(\n"
        f"        {backbone_text}),\n"
        f"    {heads})\n"
    )


def declared_models() -> Iterator[Tuple[DenseFamily, str, DenseArch]]:
    """``(family, arch, spec)`` of every declared size."""
    for family in DENSE_FAMILIES.values():
        for arch, spec in family.archs.items():
            yield family, arch, spec


def expected_configs() -> Dict[Path, str]:
    """Path -> content of every generated config."""
    out = {}
    for family, arch, spec in declared_models():
        for folder, pattern, base, task, rate_key, title in RECIPES:
            if rate_key in spec.drop_path_rate:
                path = CONFIGS / folder / pattern.format(model=spec.model_name)
                out[path] = render(family, arch, spec, base, task, rate_key, title)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a config is stale")
    args = parser.parse_args(argv)
    stale = []
    expected = expected_configs()
    for path, text in expected.items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print("stale (run tools/make_mm_configs.py): " + ", ".join(str(p.relative_to(ROOT)) for p in stale))
        return 1
    print(f"{len(stale)} config(s) {'stale' if args.check else 'written'}, {len(expected)} in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
