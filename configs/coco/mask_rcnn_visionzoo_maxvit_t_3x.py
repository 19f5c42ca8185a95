# MaxViT tiny (visionzoo_maxvit_t.in1k): Mask R-CNN + FPN, COCO, 3x (36 epochs), multi-scale resize and crop.
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/mask_rcnn_visionzoo_fpn_ms-crop-3x_coco.py'
model = dict(
    backbone=dict(
        type='MaxViT',
        arch='tiny',
        dense_schedule='det',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='hf-hub:timm/maxvit_tiny_tf_224.in1k')),
    neck=dict(in_channels=[64, 128, 256, 512]))
