#!/usr/bin/env python
"""Train an mmdet detector (e.g. Mask R-CNN on a visionzoo backbone) with mmengine's Runner.

    python tools/train_det.py configs/coco/mask_rcnn_visionzoo_dinat_t_1x.py
    torchrun --nproc_per_node 8 tools/train_det.py configs/coco/mask_rcnn_visionzoo_dinat_t_3x.py --launcher pytorch
    python tools/train_det.py CONFIG --work-dir work_dirs/run --resume            # latest in the work dir
    python tools/train_det.py CONFIG --amp --cfg-options train_dataloader.batch_size=4

Shared with the other mm tools: :mod:`visionzoo.mm.runner` (CPU runs swap SyncBN for BN, use gloo).
"""
from visionzoo.mm.runner import train

if __name__ == "__main__":
    train("det")
