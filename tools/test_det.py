#!/usr/bin/env python
"""Evaluate an mmdet checkpoint (the config's test set and evaluator, e.g. COCO bbox / segm mAP).

    python tools/test_det.py configs/coco/mask_rcnn_visionzoo_dinat_t_1x.py work_dirs/run/epoch_12.pth
    torchrun --nproc_per_node 8 tools/test_det.py CONFIG CHECKPOINT --launcher pytorch

Shared with the other mm tools: :mod:`visionzoo.mm.runner`.
"""
from visionzoo.mm.runner import test

if __name__ == "__main__":
    test("det")
