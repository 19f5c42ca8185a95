# MambaVision base (visionzoo_mambavision_b.in1k): UperNet, ADE20K 512x512 crops, 160k iterations.
# Written by tools/make_mm_configs.py from the family's dense declaration: edit that, not this file.
_base_ = '../_base_/upernet_visionzoo_512x512_160k_ade20k.py'
model = dict(
    backbone=dict(
        type='MambaVision',
        arch='base',
        dense_schedule='seg',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/nvidia/MambaVision-B-1K/resolve/main/mambavision_base_1k.pth.tar')),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
