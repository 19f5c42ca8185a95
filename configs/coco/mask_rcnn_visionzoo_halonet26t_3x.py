# HaloNet halonet26t (visionzoo_halonet26t.a1h_in1k): Mask R-CNN + FPN, COCO, 3x (36 epochs), multi-scale resize and crop.
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/mask_rcnn_visionzoo_fpn_ms-crop-3x_coco.py'
model = dict(
    backbone=dict(
        type='HaloNet',
        arch='halonet26t',
        dense_schedule='det',
        drop_path_rate=0.1,
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='hf-hub:timm/halonet26t.a1h_in1k')),
    neck=dict(in_channels=[256, 512, 1024, 2048]))
