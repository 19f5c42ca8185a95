#!/usr/bin/env python
"""Evaluate an mmseg checkpoint (the config's test set and evaluator, e.g. ADE20K mIoU).

    python tools/test_seg.py configs/ade20k/upernet_visionzoo_dinat_t_512x512_160k.py work_dirs/run/iter_160000.pth
    torchrun --nproc_per_node 8 tools/test_seg.py CONFIG CHECKPOINT --launcher pytorch

Shared with the other mm tools: :mod:`visionzoo.mm.runner`.
"""
from visionzoo.mm.runner import test

if __name__ == "__main__":
    test("seg")
