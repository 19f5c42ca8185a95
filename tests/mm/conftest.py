"""Shared fixtures for the mm tests: a generated ADE20K / COCO dataset and tiny configs on the real ones.

The tiny configs inherit the real files under configs/ (so the recipes, the registered backbones and
the tools are what runs) and only shrink data, heads and schedules: 64x64 images, 32-channel
necks and heads, a few iterations, no pretrained download.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TOOLS = ROOT / "tools"
# the smallest variant of each hierarchical family
SMALLEST = {"nat": "visionzoo_nat_m", "dinat": "visionzoo_dinat_m", "dinats": "visionzoo_dinats_t",
            "swin": "visionzoo_swin_t"}
IMAGE_SIZE = 64


def narrow_backbone_config(config: Path, task: str, backbone: dict, channels) -> Path:
    """A config next to ``config`` whose backbone takes ``backbone``'s keyword overrides (a reduced
    model) and whose neck / heads read its ``channels``."""
    channels = list(channels)
    heads = (f"neck=dict(in_channels={channels})" if task == "det" else
             f"decode_head=dict(in_channels={channels}), auxiliary_head=dict(in_channels={channels[2]})")
    path = config.with_name(f"{config.stem}_tiny.py")
    path.write_text(f"_base_ = {str(config)!r}\nmodel = dict(backbone=dict(**{backbone!r}), {heads})\n")
    return path


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (tools/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"visionzoo_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """One intra-op thread: the shapes here are tiny, and with two threads on a shared 2-core machine
    OpenMP's oversubscription made the training tests up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def dense_data(tmp_path_factory) -> Path:
    """``<root>/ade20k`` and ``<root>/coco``: 8 train and 4 val images of 64x64, up to 2 garments each."""
    make_dense_data = load_tool("make_dense_data")
    root = tmp_path_factory.mktemp("dense_data")
    return make_dense_data.make_dense_data(root, num_train=8, num_val=4, size=IMAGE_SIZE, seed=0,
                                           max_objects=2, scale=(1.0, 1.8))


def _classes() -> tuple:
    return load_tool("make_dense_data").CLASSES


def seg_config(path: Path, data_root: Path, model_name: str, max_iters: int = 2, train_images: Optional[int] = None,
               background: bool = False, evaluate_train_images: bool = False) -> Path:
    """A tiny UperNet config on ``configs/ade20k/upernet_<model>_512x512_160k.py`` at ``path``.

    ``train_images``: train on the first few images only (as many as the batch: a fixed batch).
    ``background``: label 0 is a class (11 classes) instead of ignored (ADE20K's ``reduce_zero_label``).
    ``evaluate_train_images``: validate and test on the training images instead of the validation split.
    """
    base = CONFIGS / "ade20k" / f"upernet_{model_name}_512x512_160k.py"
    classes = (("background",) if background else ()) + _classes()
    batch_size = min(train_images or 2, 2) if train_images else 4
    split = "training" if evaluate_train_images else "validation"
    path.write_text(f"""
_base_ = {str(base)!r}
crop_size = ({IMAGE_SIZE}, {IMAGE_SIZE})
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(init_cfg=None, drop_path_rate=0.0),
    decode_head=dict(channels=32, pool_scales=(1, 2), num_classes={len(classes)}, dropout_ratio=0.0),
    auxiliary_head=dict(channels=16, num_classes={len(classes)}, dropout_ratio=0.0))
dataset = dict(
    type='BaseSegDataset', data_root={str(data_root / 'ade20k')!r}, metainfo=dict(classes={classes!r}),
    img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label={not background})
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),  # reduce_zero_label: the dataset's
    dict(type='RandomFlip', prob={0.0 if train_images else 0.5}),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size={batch_size}, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, **dataset, pipeline=train_pipeline, indices={train_images!r},
                 data_prefix=dict(img_path='images/training', seg_map_path='annotations/training')))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, **dataset, pipeline=test_pipeline, indices={train_images if evaluate_train_images else None!r},
                 data_prefix=dict(img_path='images/{split}', seg_map_path='annotations/{split}')))
test_dataloader = val_dataloader
val_evaluator = dict(iou_metrics=['mIoU'])
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(lr=1e-3))
train_cfg = dict(max_iters={max_iters}, val_interval={max_iters})
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)]
default_hooks = dict(
    logger=dict(interval=1), checkpoint=dict(interval={max_iters}), visualization=dict(draw=False))
randomness = dict(seed=0)  # the initialisation and the sampling: a run is reproducible on one machine
""")
    return path


def det_config(path: Path, data_root: Path, model_name: str, schedule: str = "1x", max_epochs: int = 1,
               train_images: Optional[int] = None) -> Path:
    """A tiny Mask R-CNN config on ``configs/coco/mask_rcnn_<model>_<schedule>.py``: ``max_epochs``
    of 4 steps, or of 1 step on the first ``train_images`` (a fixed batch)."""
    base = CONFIGS / "coco" / f"mask_rcnn_{model_name}_{schedule}.py"
    coco = f"{data_root / 'coco'}/"
    path.write_text(f"""
_base_ = {str(base)!r}
data_root = {coco!r}
metainfo = dict(classes={_classes()!r})
model = dict(
    backbone=dict(init_cfg=None, drop_path_rate=0.0),
    neck=dict(out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=10),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(num_convs=1, in_channels=32, conv_out_channels=32, num_classes=10)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=200, max_per_img=100), rcnn=dict(sampler=dict(num=64))),
    # score_thr 0: an untrained model still predicts boxes, so that the metric has something to score
    test_cfg=dict(rpn=dict(nms_pre=100, max_per_img=50), rcnn=dict(score_thr=0.0, max_per_img=20)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=({IMAGE_SIZE}, {IMAGE_SIZE}), keep_ratio=True),
    dict(type='RandomFlip', prob={0.0 if train_images else 0.5}),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=({IMAGE_SIZE}, {IMAGE_SIZE}), keep_ratio=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline, indices={train_images!r}))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(lr=1e-3))
train_cfg = dict(max_epochs={max_epochs}, val_interval={max_epochs})
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval={max_epochs}), visualization=dict(draw=False))
randomness = dict(seed=0)  # the initialisation and the sampling: a run is reproducible on one machine
""")
    return path


def train_losses(runner, key: str = "loss") -> list:
    """A training loss (default: the total) of every iteration of ``runner`` (mmengine's message hub)."""
    log_history, _ = runner.message_hub.get_scalar(f"train/{key}").data
    return [float(loss) for loss in log_history]


def subprocess_env() -> dict:
    """The environment for tool subprocesses: one thread each (2 cores shared)."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
