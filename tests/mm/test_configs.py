"""Every config under configs/ade20k and configs/coco parses on mmdet's / mmseg's own base configs,
carries the papers' recipe, and builds its model (on the meta device: no memory, no init)."""
import pytest

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

import timm  # noqa: E402
import torch  # noqa: E402
from mmdet.registry import MODELS as DET_MODELS  # noqa: E402
from mmdet.registry import TRANSFORMS as DET_TRANSFORMS  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import MODELS as SEG_MODELS  # noqa: E402
from mmseg.registry import TRANSFORMS as SEG_TRANSFORMS  # noqa: E402

import visionzoo.mm  # noqa: E402, F401
from tests.mm.conftest import CONFIGS, load_tool  # noqa: E402
from visionzoo.models.dense import dense_kwargs  # noqa: E402
from visionzoo.mm import runner  # noqa: E402
from visionzoo.mm.runner import adapt_to_device  # noqa: E402

SEG_CONFIGS = sorted((CONFIGS / "ade20k").glob("*.py"))
DET_CONFIGS = sorted((CONFIGS / "coco").glob("mask_rcnn_*.py"))
CASCADE_CONFIGS = sorted((CONFIGS / "coco").glob("cascade_mask_rcnn_*.py"))
GENERATOR = load_tool("make_mm_configs")


DECLARED = {spec.model_name: (family, arch, spec) for family, arch, spec in GENERATOR.declared_models()}


def test_configs_are_those_of_the_declarations():
    assert GENERATOR.main(["--check"]) == 0
    assert set(SEG_CONFIGS) | set(DET_CONFIGS) | set(CASCADE_CONFIGS) == set(GENERATOR.expected_configs())
    # every hierarchical model of the families, mini variants included
    # every size with an official dense config: NAT, DiNAT, DiNAT_s (mini variants included, 13),
    # Swin (UperNet 6, Mask R-CNN 2), Agent-Swin (UperNet 3, Mask R-CNN 2), Agent-PVT (Mask R-CNN 4),
    # MambaVision T / S / B (3 of each, Cascade Mask R-CNN too), MaxViT T / S / B (the paper's COCO
    # sizes) in both recipes; Swin-Free has neither; Swin-VSA (T, S) on Swin's recipes without weights;
    # CoAtNet 0-3 without weights and timm's trained HaloNet-26T, SE-HaloNet-33TS, HaloNet-50TS in both
    seg = {spec.model_name for _, _, spec in DECLARED.values() if "seg" in spec.drop_path_rate}
    det = {spec.model_name for _, _, spec in DECLARED.values() if "det" in spec.drop_path_rate}
    cascade = {spec.model_name for _, _, spec in DECLARED.values() if "det_cascade" in spec.drop_path_rate}
    assert len(SEG_CONFIGS) == len(seg) == 13 + 6 + 3 + 2 + 3 + 3 + 4 + 3
    assert len(DET_CONFIGS) == 2 * len(det) == 2 * (13 + 2 + 2 + 4 + 2 + 3 + 3 + 4 + 3)
    assert len(CASCADE_CONFIGS) == len(cascade) == 3


def model_name(path, task):
    stem = path.stem.removeprefix("upernet_" if task == "seg" else "cascade_").removeprefix("mask_rcnn_")
    return stem.rsplit("_512x512", 1)[0] if task == "seg" else stem.rsplit("_", 1)[0]


def built_backbone(cfg):
    init_default_scope(cfg.default_scope)
    registry = {"mmdet": DET_MODELS, "mmseg": SEG_MODELS}[cfg.default_scope]
    with torch.device("meta"):
        model = registry.build(cfg.model)
    return model, model.backbone


def build_pipelines(cfg, registry):
    for loader in (cfg.train_dataloader, cfg.test_dataloader):
        for transform in loader.dataset.pipeline:
            registry.build(transform)


def block_dilations(backbone):
    return [[block.attn.dilation[0] for block in stage.blocks] for stage in backbone.model.stages]


def check_backbone(cfg, backbone, name, task, rate_key=None):
    family, arch, spec = DECLARED[name]
    assert cfg.custom_imports == dict(imports=["visionzoo.mm"], allow_failed_imports=False)
    assert (cfg.model.backbone.type, cfg.model.backbone.arch) == (family.type_names[0], arch)
    assert backbone.model_name == name and backbone.out_indices == (0, 1, 2, 3)
    assert cfg.model.backbone.drop_path_rate == spec.drop_path_rate[rate_key or task]
    if not spec.pretrained_tag:  # no released weights: no pretrained start is invented
        assert cfg.model.backbone.init_cfg is None and timm.models.get_pretrained_cfg(name).url == ""
    else:
        assert cfg.model.backbone.init_cfg.type == "Pretrained"
        pretrained = timm.models.get_pretrained_cfg(f"{name}.{spec.pretrained_tag}")
        assert cfg.model.backbone.init_cfg.checkpoint == (pretrained.url or f"hf-hub:{pretrained.hf_hub_id}")
        assert cfg.model.backbone.init_cfg.checkpoint.startswith(
            ("https://shi-labs.com/projects/", "https://github.com/SwinTransformer/storage/releases/",
             "https://cloud.tsinghua.edu.cn/f/", "https://huggingface.co/nvidia/", "hf-hub:timm/"))
    if family.task_kwargs is not None:
        expected = dense_kwargs(name, task)
        if "dilations" in expected:
            assert block_dilations(backbone) == expected["dilations"]
        if expected.get("pad_before_shift"):  # Swin, Agent-Swin: the official dense window layout
            attns = [block.attn for stage in backbone.model.stages for block in stage.blocks]
            assert all(attn.pad_before_shift for attn in attns if not hasattr(attn, "agent_shape"))
        if "agent_shapes" in expected:  # Agent-Swin, Agent-PVT: agents pooled to the official dense grids
            agent_shapes = [{block.attn.agent_shape for block in stage.blocks if hasattr(block.attn, "agent_shape")}
                            for stage in backbone.model.stages]
            assert all(shapes <= {tuple(grid)} for shapes, grid in zip(agent_shapes, expected["agent_shapes"]))
            assert any(agent_shapes)
        if "window_size" in expected:  # MambaVision: the official dense windows of the windowed stages
            assert [stage.window_size for stage in backbone.model.stages[2:]] == list(expected["window_size"][2:])
        if "transformer_window_size" in expected:  # MaxViT: the 7x7 windows and grid of its weights, maps padded
            assert expected == {"pad_to_window": True, "transformer_window_size": (7, 7)}
            assert backbone.model.stem.stage_rules == ()
            windows = {block.attn_block.attn.window_size for stage in backbone.model.stages for block in stage.blocks}
            assert windows == {(7, 7)}
        elif "pad_to_window" in expected:  # CoAtNet: windows of the 224 stage maps (14x14, 7x7), maps padded
            assert expected == {"pad_to_window": True} and backbone.model.stem.stage_rules == ()
            windows = [{block.attn.window_size for block in stage.blocks} for stage in backbone.model.stages[2:]]
            assert windows == [{(14, 14)}, {(7, 7)}]
        if "pad_to_block" in expected:  # HaloNet: maps padded to the blocks, the four stages as outputs
            assert expected == {"pad_to_block": True, "stem_feature": False}
            halo = [m for m in backbone.model.modules() if type(m).__name__ == "HaloAttention"]
            assert halo and all(m.pad_to_block for m in halo) and backbone.strides == [4, 8, 16, 32]
        assert set(expected) in ({"dilations"}, {"pad_before_shift"}, {"agent_shapes"},
                                 {"agent_shapes", "pad_before_shift"}, {"window_size"},
                                 {"pad_to_window", "transformer_window_size"}, {"pad_to_window"},
                                 {"pad_to_block", "stem_feature"})
    agent_biases = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias")
    assert dict(cfg.optim_wrapper.paramwise_cfg.custom_keys) == {
        "rpb": dict(decay_mult=0.0), "relative_position_bias_table": dict(decay_mult=0.0),
        "norm": dict(decay_mult=0.0), **{name: dict(decay_mult=0.0) for name in agent_biases}}
    assert dict(type="WeightsOnlyCheckpointHook") in cfg.custom_hooks


@pytest.mark.parametrize("path", SEG_CONFIGS, ids=lambda p: p.stem)
def test_upernet_160k_configs(path):
    cfg = Config.fromfile(path)
    assert cfg.default_scope == "mmseg"
    model, backbone = built_backbone(cfg)
    check_backbone(cfg, backbone, model_name(path, "seg"), "seg")
    assert type(model).__name__ == "EncoderDecoder" and type(model.decode_head).__name__ == "UPerHead"
    assert cfg.model.decode_head.in_channels == backbone.num_features
    assert cfg.model.auxiliary_head.in_channels == backbone.num_features[2]
    assert cfg.model.decode_head.num_classes == 150 and cfg.model.decode_head.norm_cfg.type == "SyncBN"
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ("AdamW", 6e-5, 0.01)
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.end, warmup.by_epoch) == ("LinearLR", 1500, False)
    assert (poly.type, poly.power, poly.begin, poly.end, poly.eta_min) == ("PolyLR", 1.0, 1500, 160000, 0.0)
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size == 2
    assert cfg.crop_size == (512, 512) and cfg.train_dataloader.dataset.type == "ADE20KDataset"
    build_pipelines(cfg, SEG_TRANSFORMS)


@pytest.mark.parametrize("path", DET_CONFIGS, ids=lambda p: p.stem)
def test_mask_rcnn_configs(path):
    cfg = Config.fromfile(path)
    assert cfg.default_scope == "mmdet"
    model, backbone = built_backbone(cfg)
    check_backbone(cfg, backbone, model_name(path, "det"), "det")
    assert type(model).__name__ == "MaskRCNN"
    assert cfg.model.neck.in_channels == backbone.num_features
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ("AdamW", 1e-4, 0.05)
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.end, warmup.by_epoch) == ("LinearLR", 0.001, 1000, False)
    three_x = path.stem.endswith("_3x")
    assert steps.type == "MultiStepLR" and steps.milestones == ([27, 33] if three_x else [8, 11])
    assert cfg.train_cfg.max_epochs == steps.end == (36 if three_x else 12)
    transforms = [t.type for t in cfg.train_dataloader.dataset.pipeline]
    assert ("RandomChoice" in transforms) == three_x  # multi-scale resize + crop
    assert cfg.val_evaluator.metric == ["bbox", "segm"] and cfg.train_dataloader.dataset.type == "CocoDataset"
    build_pipelines(cfg, DET_TRANSFORMS)


@pytest.mark.parametrize("path", CASCADE_CONFIGS, ids=lambda p: p.stem)
def test_cascade_mask_rcnn_configs(path):
    cfg = Config.fromfile(path)
    assert cfg.default_scope == "mmdet"
    model, backbone = built_backbone(cfg)
    check_backbone(cfg, backbone, model_name(path, "det"), "det", "det_cascade")
    assert type(model).__name__ == "CascadeRCNN" and model.roi_head.num_stages == 3
    assert cfg.model.neck.in_channels == backbone.num_features
    for head in cfg.model.roi_head.bbox_head:  # the papers' 4conv1fc heads with GIoU
        assert (head.num_shared_convs, head.num_shared_fcs, head.loss_bbox.type) == (4, 1, "GIoULoss")
    optimizer = cfg.optim_wrapper.optimizer
    assert cfg.optim_wrapper.type == "OptimWrapper" and "constructor" not in cfg.optim_wrapper
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ("AdamW", 1e-4, 0.05)
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.end, steps.milestones, cfg.train_cfg.max_epochs) == ("LinearLR", 1000, [27, 33], 36)
    assert "RandomChoice" in [t.type for t in cfg.train_dataloader.dataset.pipeline]
    assert cfg.custom_imports == dict(imports=["visionzoo.mm"], allow_failed_imports=False)
    build_pipelines(cfg, DET_TRANSFORMS)


def test_cpu_runs_swap_sync_bn_for_bn(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = Config.fromfile(SEG_CONFIGS[0])
    cfg.launcher = "pytorch"
    assert "SyncBN" in repr(cfg.to_dict())
    adapt_to_device(cfg)
    assert "SyncBN" not in repr(cfg.to_dict()) and cfg.model.decode_head.norm_cfg.type == "BN"
    assert cfg.env_cfg.dist_cfg.backend == "gloo" and cfg.model_wrapper_cfg.device_ids is None


def test_amp_needs_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--amp needs a GPU"):
        runner.train("det", [str(DET_CONFIGS[0]), "--amp", "--work-dir", str(tmp_path)])


def test_tools_refuse_a_config_of_the_other_task(tmp_path):
    with pytest.raises(SystemExit, match="use the seg tool"):
        runner.train("det", [str(SEG_CONFIGS[0]), "--work-dir", str(tmp_path)])
