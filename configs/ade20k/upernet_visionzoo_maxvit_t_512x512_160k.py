# MaxViT tiny (visionzoo_maxvit_t.in1k): UperNet, ADE20K 512x512 crops, 160k iterations.
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/upernet_visionzoo_512x512_160k_ade20k.py'
model = dict(
    backbone=dict(
        type='MaxViT',
        arch='tiny',
        dense_schedule='seg',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='hf-hub:timm/maxvit_tiny_tf_224.in1k')),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
