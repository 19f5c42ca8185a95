# AgentPVT medium (visionzoo_agent_pvt_m.in1k): Mask R-CNN + FPN, COCO, 1x (12 epochs).
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/mask_rcnn_visionzoo_fpn_1x_coco.py'
model = dict(
    backbone=dict(
        type='AgentPVT',
        arch='medium',
        dense_schedule='det',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='https://cloud.tsinghua.edu.cn/f/4d00ecacf18b45f9b88c/?dl=1')),
    neck=dict(in_channels=[64, 128, 320, 512]))
