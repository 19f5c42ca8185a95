# HaloNet sehalonet33ts (visionzoo_sehalonet33ts.ra2_in1k): Mask R-CNN + FPN, COCO, 1x (12 epochs).
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/mask_rcnn_visionzoo_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        type='HaloNet',
        arch='sehalonet33ts',
        dense_schedule='det',
        drop_path_rate=0.1,
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='hf-hub:timm/sehalonet33ts.ra2_in1k')),
    neck=dict(in_channels=[256, 512, 1024, 1536]))
