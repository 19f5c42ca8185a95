#!/usr/bin/env python
"""Train an mmseg segmentor (e.g. UperNet on a visionzoo backbone) with mmengine's Runner.

    python tools/train_seg.py configs/ade20k/upernet_visionzoo_dinat_t_512x512_160k.py
    torchrun --nproc_per_node 8 tools/train_seg.py CONFIG --launcher pytorch
    python tools/train_seg.py CONFIG --work-dir work_dirs/run --resume            # latest in the work dir
    python tools/train_seg.py CONFIG --amp --cfg-options train_dataloader.batch_size=4

Shared with the other mm tools: :mod:`visionzoo.mm.runner` (CPU runs swap SyncBN for BN, use gloo).
"""
from visionzoo.mm.runner import train

if __name__ == "__main__":
    train("seg")
