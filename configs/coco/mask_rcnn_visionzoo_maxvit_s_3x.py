# MaxViT small (visionzoo_maxvit_s.in1k): Mask R-CNN + FPN, COCO, 3x (36 epochs), multi-scale resize and crop.
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/mask_rcnn_visionzoo_fpn_ms-crop-3x_coco.py'
model = dict(
    backbone=dict(
        type='MaxViT',
        arch='small',
        dense_schedule='det',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='hf-hub:timm/maxvit_small_tf_224.in1k')),
    neck=dict(in_channels=[96, 192, 384, 768]))
