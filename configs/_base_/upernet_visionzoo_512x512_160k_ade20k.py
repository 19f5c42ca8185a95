# UperNet on a visionzoo backbone, ADE20K 512x512 crops, 160k iterations: mmseg's own model, data,
# runtime and schedule, with the recipe of the Swin / NAT / DiNAT / Agent-Swin papers (AdamW 6e-5,
# wd 0.01, no decay on position biases and norms, 1500 linear warm-up iterations then poly decay,
# 8 GPUs x 2 images).
# A model's config (configs/ade20k/, written by tools/make_mm_configs.py) sets the backbone and the
# heads' in_channels. SyncBN in the heads as the papers; the visionzoo tools swap it for BN on CPU.
_base_ = [
    'mmseg::_base_/models/upernet_swin.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['visionzoo.mm'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    # replaces mmseg's Swin; type / arch / drop_path_rate / init_cfg come from the model's config
    backbone=dict(_delete_=True, out_indices=(0, 1, 2, 3)),
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        'rpb': dict(decay_mult=0.),
        'relative_position_bias_table': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
        # agent attention's position biases (Agent-Swin's official dense recipe)
        'an_bias': dict(decay_mult=0.),
        'na_bias': dict(decay_mult=0.),
        'ah_bias': dict(decay_mult=0.),
        'aw_bias': dict(decay_mult=0.),
        'ha_bias': dict(decay_mult=0.),
        'wa_bias': dict(decay_mult=0.),
    }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]

# 8 GPUs x 2 images = 16 images per step
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader

# checkpoints that torch.load(weights_only=True) reads back (resume, testing)
custom_hooks = [dict(type='WeightsOnlyCheckpointHook')]
