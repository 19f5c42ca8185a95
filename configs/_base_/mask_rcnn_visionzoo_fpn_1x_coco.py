# Mask R-CNN + FPN on a visionzoo backbone, COCO, 1x schedule: mmdet's own model, data, runtime and
# schedule, with the recipe of the Swin / NAT / DiNAT / Agent-Swin papers (AdamW 1e-4, wd 0.05, no
# decay on position biases and norms, 1000 linear warm-up iterations, steps at epochs 8 and 11 of 12,
# 8 GPUs x 2 images).
# A model's config (configs/coco/, written by tools/make_mm_configs.py) sets the backbone and the
# neck's in_channels.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['visionzoo.mm'], allow_failed_imports=False)

model = dict(
    # replaces mmdet's ResNet-50; type / arch / drop_path_rate / init_cfg come from the model's config
    backbone=dict(_delete_=True, out_indices=(0, 1, 2, 3)))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
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
    }),
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))

# checkpoints that torch.load(weights_only=True) reads back (resume, testing)
custom_hooks = [dict(type='WeightsOnlyCheckpointHook')]
