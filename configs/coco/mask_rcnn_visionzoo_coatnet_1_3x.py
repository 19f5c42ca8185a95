# CoAtNet small (visionzoo_coatnet_1, no released weights: set init_cfg to your ImageNet checkpoint): Mask R-CNN + FPN, COCO, 3x (36 epochs), multi-scale resize and crop.
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/mask_rcnn_visionzoo_fpn_ms-crop-3x_coco.py'
model = dict(
    backbone=dict(
        type='CoAtNet',
        arch='small',
        dense_schedule='det',
        drop_path_rate=0.2,
        init_cfg=None),
    neck=dict(in_channels=[96, 192, 384, 768]))
