# DiNAT_s small (visionzoo_dinats_s.in1k): Mask R-CNN + FPN, COCO, 3x (36 epochs), multi-scale resize and crop.
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/mask_rcnn_visionzoo_fpn_ms-crop-3x_coco.py'
model = dict(
    backbone=dict(
        type='DiNAT_s',
        arch='small',
        dense_schedule='det',
        drop_path_rate=0.35,
        init_cfg=dict(type='Pretrained', checkpoint='https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_s_small_in1k_224.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
