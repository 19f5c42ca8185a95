# MambaVision small (visionzoo_mambavision_s.in1k): Cascade Mask R-CNN + FPN (4conv1fc GIoU heads), COCO, 3x (36 epochs), multi-scale resize and crop.
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/cascade_mask_rcnn_visionzoo_fpn_giou_4conv1f_ms-crop-3x_coco.py'
model = dict(
    backbone=dict(
        type='MambaVision',
        arch='small',
        dense_schedule='det',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/nvidia/MambaVision-S-1K/resolve/main/mambavision_small_1k.pth.tar')),
    neck=dict(in_channels=[96, 192, 384, 768]))
