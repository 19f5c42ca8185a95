# HaloNet halonet50ts (visionzoo_halonet50ts.a1h_in1k): UperNet, ADE20K 512x512 crops, 160k iterations.
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/upernet_visionzoo_512x512_160k_ade20k.py'
model = dict(
    backbone=dict(
        type='HaloNet',
        arch='halonet50ts',
        dense_schedule='seg',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='hf-hub:timm/halonet50ts.a1h_in1k')),
    decode_head=dict(in_channels=[256, 512, 1024, 2048]),
    auxiliary_head=dict(in_channels=1024))
