# Cascade Mask R-CNN + FPN on a visionzoo backbone, COCO, 3x schedule with multi-scale resize and
# crop: mmdet's recipe of the Swin / ConvNeXt / MambaVision papers (three cascade stages of 4conv1fc
# box heads with GIoU loss and SyncBN, the DETR / Sparse R-CNN augmentation, 36 epochs, steps at 27
# and 33, 1000 linear warm-up iterations) with the AdamW of the other visionzoo COCO recipes (1e-4,
# wd 0.05, no decay on position biases and norms). A model's config (configs/coco/, written by
# tools/make_mm_configs.py) sets the backbone and the neck's in_channels.
_base_ = 'mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'
custom_imports = dict(imports=['visionzoo.mm'], allow_failed_imports=False)

model = dict(
    # replaces mmdet's ConvNeXt; type / arch / drop_path_rate / init_cfg come from the model's config
    backbone=dict(_delete_=True, out_indices=(0, 1, 2, 3)))

# fp32 as the other recipes (tools/train_det.py --amp for mixed precision)
optim_wrapper = dict(
    _delete_=True,
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
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))

# checkpoints that torch.load(weights_only=True) reads back (resume, testing)
custom_hooks = [dict(type='WeightsOnlyCheckpointHook')]
