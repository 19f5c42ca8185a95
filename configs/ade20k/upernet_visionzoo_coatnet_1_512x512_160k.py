# CoAtNet small (visionzoo_coatnet_1, no released weights: set init_cfg to your ImageNet checkpoint): UperNet, ADE20K 512x512 crops, 160k iterations.
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/upernet_visionzoo_512x512_160k_ade20k.py'
model = dict(
    backbone=dict(
        type='CoAtNet',
        arch='small',
        dense_schedule='seg',
        drop_path_rate=0.3,
        init_cfg=None),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
