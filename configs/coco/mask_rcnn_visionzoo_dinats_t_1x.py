# DiNAT_s tiny (visionzoo_dinats_t.in1k): Mask R-CNN + FPN, COCO, 1x (12 epochs).
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/mask_rcnn_visionzoo_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        type='DiNAT_s',
        arch='tiny',
        dense_schedule='det',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/dinat_s_tiny_in1k_224.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
