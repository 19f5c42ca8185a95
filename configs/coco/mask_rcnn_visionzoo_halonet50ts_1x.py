# HaloNet halonet50ts (visionzoo_halonet50ts.a1h_in1k): Mask R-CNN + FPN, COCO, 1x (12 epochs).
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/mask_rcnn_visionzoo_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        type='HaloNet',
        arch='halonet50ts',
        dense_schedule='det',
        drop_path_rate=0.2,
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='hf-hub:timm/halonet50ts.a1h_in1k')),
    neck=dict(in_channels=[256, 512, 1024, 2048]))
