# MambaVision small (visionzoo_mambavision_s.in1k): UperNet, ADE20K 512x512 crops, 160k iterations.
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/upernet_visionzoo_512x512_160k_ade20k.py'
model = dict(
    backbone=dict(
        type='MambaVision',
        arch='small',
        dense_schedule='seg',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/nvidia/MambaVision-S-1K/resolve/main/mambavision_small_1k.pth.tar')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
