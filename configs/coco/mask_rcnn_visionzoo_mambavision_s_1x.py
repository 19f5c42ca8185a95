# MambaVision small (visionzoo_mambavision_s.in1k): Mask R-CNN + FPN, COCO, 1x (12 epochs).
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/mask_rcnn_visionzoo_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        type='MambaVision',
        arch='small',
        dense_schedule='det',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/nvidia/MambaVision-S-1K/resolve/main/mambavision_small_1k.pth.tar')),
    neck=dict(in_channels=[96, 192, 384, 768]))
