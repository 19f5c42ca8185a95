# MambaVision base (visionzoo_mambavision_b.in1k): Mask R-CNN + FPN, COCO, 3x (36 epochs), multi-scale resize and crop.
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/mask_rcnn_visionzoo_fpn_ms-crop-3x_coco.py'
model = dict(
    backbone=dict(
        type='MambaVision',
        arch='base',
        dense_schedule='det',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/nvidia/MambaVision-B-1K/resolve/main/mambavision_base_1k.pth.tar')),
    neck=dict(in_channels=[128, 256, 512, 1024]))
