"""visionzoo.mm backbones: registration of what the families declare, outputs, frozen stages,
checkpointing, pretrained loading, the official dense dilation schedules, and the import errors
without the mm extra.

Official checkpoints are generated from the spec's key layout (tests/models/test_nat.py), not
from the model code.
"""
import argparse
import logging
import math
import re
import subprocess
import sys

import pytest

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mmdet.registry import MODELS as DET_MODELS  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmseg.registry import MODELS as SEG_MODELS  # noqa: E402

import visionzoo.mm  # noqa: E402
from tests.mm.conftest import ROOT, SMALLEST, subprocess_env  # noqa: E402
from tests.models.test_nat import ARCHS, official_forward, official_state_dict  # noqa: E402
from visionzoo.checkpoint import save_weights  # noqa: E402
from visionzoo.mm import BACKBONES, VisionZooBackbone  # noqa: E402
from visionzoo.models.dense import DENSE_FAMILIES, dense_family_of, dense_kwargs  # noqa: E402
from visionzoo.models.nat import checkpoint_filter_fn, dinat_dilations  # noqa: E402

# /work/shared/specs/neighborhood.md (DiNAT) and the official DiNAT_s configs, for the T variants
SPEC_DILATIONS = {
    ("visionzoo_dinat_t", "det"): [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7] * 3, [1, 3, 1, 3, 1]],
    ("visionzoo_dinat_t", "seg"): [[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4] * 3, [1, 2, 1, 2, 1]],
    ("visionzoo_dinat_m", "det"): [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7], [1, 3, 1, 3, 1]],
    ("visionzoo_dinat_m", "seg"): [[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4], [1, 2, 1, 2, 1]],
    ("visionzoo_dinats_t", "det"): [[1, 28], [1, 14], [1, 3, 1, 5, 1, 7], [1, 3]],
    ("visionzoo_dinats_t", "seg"): [[1, 16], [1, 8], [1, 2, 1, 3, 1, 4], [1, 2]],
    ("visionzoo_dinats_s", "seg"): [[1, 16], [1, 8], [1, 2, 1, 3, 1, 4] * 3, [1, 2]],
}


def block_dilations(backbone):
    return [[block.attn.dilation[0] for block in stage.blocks] for stage in backbone.model.stages]


class Records(logging.Handler):
    """Collects the messages of the current mmengine logger."""

    def __enter__(self):
        self.messages = []
        MMLogger.get_current_instance().addHandler(self)
        return self

    def __exit__(self, *exc):
        MMLogger.get_current_instance().removeHandler(self)

    def emit(self, record):
        self.messages.append(record.getMessage())

    @property
    def text(self):
        return "\n".join(self.messages)


# ----------------------------------------------------------------------------------------------
# registration and dilation schedules
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("registry, task", [(DET_MODELS, "det"), (SEG_MODELS, "seg")])
def test_registered_in_mmdet_and_mmseg(registry, task):
    assert registry.get("VisionZooBackbone") is VisionZooBackbone
    # the type names of today's configs, each from its family's declaration
    for name, family in (("NAT", "nat"), ("DiNAT", "dinat"), ("DiNAT_s", "dinats"), ("DiNATs", "dinats"),
                         ("MaxViT", "maxvit"), ("CoAtNet", "coatnet"), ("HaloNet", "halonet")):
        registered = registry.get(name)
        assert issubclass(registered, BACKBONES[name]) and registered.task == task
        assert registered.family is DENSE_FAMILIES[family] and getattr(visionzoo.mm, name) is BACKBONES[name]
    assert registry.get("DiNATs") is registry.get("DiNAT_s") and BACKBONES["DiNAT_s"].__name__ == "DiNAT_s"
    assert set(visionzoo.mm.SCOPES) == {"mmdet", "mmseg"}


# hierarchical families whose dense-prediction support (the official dense behaviour and configs) is
# not built yet: each is declared in its model file once it is
WITHOUT_DENSE_SUPPORT = ()


def _takes_any_size(name):
    """Not ``fixed_input_size`` (Swin-Free-BR's norms fix it), or of any size with its family's dense
    options (MaxViT and CoAtNet pad their maps to the windows, HaloNet to the blocks), run on the
    meta device at an odd size: every tap at ``ceil(side / reduction)``."""
    if not timm.models.get_pretrained_cfg(name).fixed_input_size:
        return True
    family = dense_family_of(name)
    if family is None or family.task_kwargs is None:
        return False
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=0, **dense_kwargs(name, "det"))
    # outside the device context: the op's geometry tables stay on the CPU
    features = model.forward_intermediates(torch.empty(1, 3, 100, 140, device="meta"), intermediates_only=True)
    return [f.shape[-2:] for f in features] == [
        (math.ceil(100 / info["reduction"]), math.ceil(140 / info["reduction"])) for info in model.feature_info]


def test_every_hierarchical_model_is_declared_for_dense_prediction():
    hierarchical = set()
    for name in timm.list_models("visionzoo_*"):
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=0)
        # stages at several strides, and any input size
        if len({info["reduction"] for info in model.feature_info}) > 1 and _takes_any_size(name):
            hierarchical.add(name)
    declared = {arch.model_name for family in DENSE_FAMILIES.values() for arch in family.archs.values()}
    assert declared <= hierarchical
    assert {name for name in hierarchical - declared if not name.startswith(WITHOUT_DENSE_SUPPORT)} == set()
    assert all(any(name.startswith(prefix) for name in hierarchical - declared) for prefix in WITHOUT_DENSE_SUPPORT)


def test_the_mm_package_names_no_family():
    """Adding a family touches no file of visionzoo/mm: nothing there names one."""
    names = {name for family in DENSE_FAMILIES.values() for name in family.type_names}
    names |= {f"visionzoo_{family}_" for family in DENSE_FAMILIES}
    for path in (ROOT / "visionzoo" / "mm").glob("*.py"):
        text = path.read_text()
        found = [name for name in names if re.search(rf"\b{re.escape(name)}", text)]
        assert not found, f"{path.relative_to(ROOT)} names {found}"


def test_a_family_declared_after_import_is_registered():
    """A family declared outside visionzoo/mm, after it was imported, with its own stem / stage
    lookup, output norm and task options: built from mmdet's registry by its type names."""
    script = """
import timm
import torch.nn as nn
from timm.models import register_model

import visionzoo.mm
from mmdet.registry import MODELS
from visionzoo.models.dense import DenseArch, DenseFamily, register_dense_family


@register_model
def toy_net_m(pretrained=False, **kwargs):
    return timm.create_model('visionzoo_nat_m', pretrained=pretrained, **kwargs)


calls = []
register_dense_family(DenseFamily(
    name='toy', type_names=('ToyNet', 'Toy'), archs={'mini': DenseArch('toy_net_m')},
    task_kwargs=lambda model, task: calls.append(('task', task)) or {'layer_scale': 1e-3},
    stem=lambda model: calls.append('stem') or [model.patch_embed],
    stage=lambda model, i: calls.append(('stage', i)) or model.stages[i],
    out_norm=lambda channels: nn.GroupNorm(1, channels)))
backbone = MODELS.build(dict(type='Toy', arch='m', frozen_stages=2))
frozen = sorted({'.'.join(name.split('.')[:3 if name.startswith('model.stages') else 2])
                 for name, p in backbone.named_parameters() if not p.requires_grad})
print(type(backbone).__name__, backbone.task, type(backbone.norm3).__name__, visionzoo.mm.ToyNet is visionzoo.mm.Toy)
print(calls[:4])
print(frozen)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                            env=subprocess_env(), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "ToyNet det GroupNorm True"
    assert lines[1] == "[('task', 'det'), 'stem', ('stage', 0), ('stage', 1)]"
    assert lines[2] == str(["model.patch_embed", "model.stages.0", "model.stages.1", "norm0.bias", "norm0.weight",
                            "norm1.bias", "norm1.weight"])


@pytest.mark.parametrize("model_name, task", sorted(SPEC_DILATIONS))
def test_dense_dilations_equal_the_official_schedules(model_name, task):
    expected = SPEC_DILATIONS[model_name, task]
    assert dense_kwargs(model_name, task) == {"dilations": expected}
    with torch.device("meta"):
        backbone = VisionZooBackbone(model_name, dense_schedule=task)
    assert block_dilations(backbone) == expected


@pytest.mark.parametrize("registry, task", [(DET_MODELS, "det"), (SEG_MODELS, "seg")])
def test_family_backbones_default_to_their_registry_task(registry, task):
    with torch.device("meta"):
        built = registry.build(dict(type="DiNAT", arch="mini"))
        other = registry.build(dict(type="DiNAT_s", arch="t", dense_schedule="seg" if task == "det" else "det"))
        explicit = registry.build(dict(type="DiNAT", arch="m", dilations=[[1, 2, 1], [1] * 4, [1] * 6, [1] * 5]))
        classification = registry.build(dict(type="DiNAT", arch="m", dense_schedule=None, img_size=224))
        nat = registry.build(dict(type="NAT", arch="mini"))
    assert block_dilations(built) == SPEC_DILATIONS["visionzoo_dinat_m", task]
    assert block_dilations(other) == SPEC_DILATIONS["visionzoo_dinats_t", "seg" if task == "det" else "det"]
    assert block_dilations(explicit) == [[1, 2, 1], [1] * 4, [1] * 6, [1] * 5]
    assert block_dilations(classification) == [[d for d, _ in stage] for stage in dinat_dilations((3, 4, 6, 5), 224)]
    assert block_dilations(nat) == [[1] * depth for depth in (3, 4, 6, 5)]


def test_dense_schedule_and_arch_errors():
    with pytest.raises(ValueError, match="the nat family declares no dense-task options"):
        VisionZooBackbone("visionzoo_nat_m", dense_schedule="det")
    with pytest.raises(ValueError, match="task must be"):
        dense_kwargs("visionzoo_dinat_m", "cls")
    with pytest.raises(ValueError, match="belongs to no declared dense family"):
        dense_kwargs("visionzoo_nat_iso_s", "det")
    with pytest.raises(ValueError, match="give dilations or dense_schedule, not both"):
        VisionZooBackbone("visionzoo_dinat_m", dense_schedule="det", dilations=[[1] * 3, [1] * 4, [1] * 6, [1] * 5])
    with pytest.raises(ValueError, match="DiNAT_s: arch must be one of tiny, small, base, large"):
        BACKBONES["DiNAT_s"](arch="mini")


# ----------------------------------------------------------------------------------------------
# outputs, frozen stages, gradient checkpointing
# ----------------------------------------------------------------------------------------------
# MambaVision is not in SMALLEST (the training tests' families): its CPU training is too slow for them
@pytest.mark.parametrize("model_name", sorted(SMALLEST.values()) + ["visionzoo_mambavision_t"])
@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3), (2,)])
def test_outputs_are_nchw_at_strides_4_to_32(model_name, out_indices):
    backbone = VisionZooBackbone(model_name, out_indices=out_indices, dense_schedule=None).eval()
    embed_dim = backbone.model.feature_info[0]["num_chs"]
    with torch.no_grad():
        outputs = backbone(torch.randn(2, 3, 64, 96))
    assert isinstance(outputs, tuple) and len(outputs) == len(out_indices)
    for i, output in zip(out_indices, outputs):
        stride = 4 * 2**i
        assert output.shape == (2, embed_dim * 2**i, math.ceil(64 / stride), math.ceil(96 / stride))
    assert backbone.strides == [4 * 2**i for i in out_indices]
    assert backbone.num_features == [embed_dim * 2**i for i in out_indices]
    # the stages after the last output, the final norm and the head are gone
    assert len(backbone.model.stages) == max(out_indices) + 1
    assert {f"norm{i}" for i in out_indices} == {name for name, _ in backbone.named_children() if name.startswith("norm")}
    assert not any(key.startswith(("model.norm.", "model.head.")) for key in backbone.state_dict())


@pytest.mark.parametrize("frozen_stages, with_cp, frozen_prefixes", [
    (-1, False, ()),
    (0, False, ("model.patch_embed.",)),
    (0, True, ("model.patch_embed.",)),  # checkpointed blocks after a frozen stem still get gradients
    (2, False, ("model.patch_embed.", "model.stages.0.", "model.stages.1.", "norm0.", "norm1.")),
])
def test_frozen_stages_freeze_exactly_the_stem_and_first_stages(frozen_stages, with_cp, frozen_prefixes):
    backbone = VisionZooBackbone("visionzoo_nat_m", frozen_stages=frozen_stages, with_cp=with_cp)
    backbone.train()
    for name, param in backbone.named_parameters():
        assert param.requires_grad == (not name.startswith(frozen_prefixes)), name
    for name, module in backbone.named_modules():
        if name:
            assert module.training == (not (name + ".").startswith(frozen_prefixes)), name
    # frozen parameters get no gradient; the rest do
    sum(output.sum() for output in backbone(torch.randn(1, 3, 64, 64))).backward()
    for name, param in backbone.named_parameters():
        assert (param.grad is None) == name.startswith(frozen_prefixes), name


def test_frozen_stages_beyond_the_model_are_rejected():
    with pytest.raises(ValueError, match="frozen_stages"):
        VisionZooBackbone("visionzoo_nat_m", out_indices=(0, 1), frozen_stages=3)
    frozen = VisionZooBackbone("visionzoo_nat_m", out_indices=(0, 1), frozen_stages=2)
    assert not any(param.requires_grad for param in frozen.parameters())


@pytest.mark.parametrize("model_name", ["visionzoo_nat_m", "visionzoo_dinats_t"])
def test_with_cp_gives_the_same_outputs_and_gradients(model_name):
    plain = VisionZooBackbone(model_name, drop_path_rate=0.0)
    checkpointed = VisionZooBackbone(model_name, drop_path_rate=0.0, with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert all(stage.grad_checkpointing for stage in checkpointed.model.stages)
    image = torch.randn(1, 3, 64, 64)
    results = []
    for backbone in (plain, checkpointed):
        x = image.clone().requires_grad_()
        outputs = backbone.train()(x)
        sum((output**2).mean() for output in outputs).backward()
        results.append((outputs, x.grad, backbone.model.patch_embed.norm.weight.grad))
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("registry, task, arch, windows", [
    (DET_MODELS, "det", "tiny", [112, 56]), (SEG_MODELS, "seg", "tiny", [64, 32]),
    (DET_MODELS, "det", "small", [112, 56]), (SEG_MODELS, "seg", "small", [160, 56]),
    (SEG_MODELS, "seg", "base", [64, 32]),
])
def test_mambavision_dense_windows_are_the_official_ones(registry, task, arch, windows):
    """Official object_detection / semantic_segmentation configs: windows of stages 3-4 enlarged,
    MambaVision-S's UperNet with its own; a LayerNorm over channels per output."""
    with torch.device("meta"):
        backbone = registry.build(dict(type="MambaVision", arch=arch))
    assert [stage.window_size for stage in backbone.model.stages] == [None, None] + windows
    assert all(block.attn.window_size == windows[i - 2] for i, stage in enumerate(backbone.model.stages)
               for block in stage.blocks if i >= 2 and hasattr(block.attn, "window_size"))
    assert [type(getattr(backbone, f"norm{i}")).__name__ for i in range(4)] == ["LayerNorm2d"] * 4


def test_mambavision_official_classification_checkpoint(tmp_path):
    """An official MambaVision checkpoint through init_cfg: every backbone key loads (tiny widths)."""
    from tests.models.test_mambavision import OFFICIAL, TINY, official_state_dict

    arch = dict(OFFICIAL["visionzoo_mambavision_t"], dim=TINY["dim"], in_dim=TINY["in_dim"], depths=TINY["depths"])
    official = official_state_dict(arch)
    torch.save({"state_dict": official}, tmp_path / "official.pth.tar")
    backbone, log = load_pretrained("visionzoo_mambavision_t", tmp_path / "official.pth.tar", **TINY)
    state = backbone.state_dict()
    assert torch.equal(state["model.stages.3.downsample.reduction.weight"], official["levels.2.downsample.reduction.0.weight"])
    assert torch.equal(state["model.stages.2.blocks.0.attn.A_log"], official["levels.2.blocks.0.mixer.A_log"])
    assert "unexpected key in source state_dict: model.norm.weight, model.norm.bias" in log
    missing = re.search(r"missing keys in source state_dict: (.*)", log)[1]
    assert {key.strip() for key in missing.split(",")} == {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}


def test_mambavision_official_dense_checkpoint(tmp_path):
    """An official MambaVision dense checkpoint: output norms named ``outnorm{i}``, and the training
    script's argparse.Namespace stored beside the weights (read with weights_only=True)."""
    from tests.models.test_mambavision import OFFICIAL, TINY, official_state_dict

    arch = dict(OFFICIAL["visionzoo_mambavision_t"], dim=TINY["dim"], in_dim=TINY["in_dim"], depths=TINY["depths"])
    official = official_state_dict(arch, seed=1)
    dense = {f"backbone.{key}": value for key, value in official.items() if not key.startswith(("norm.", "head."))}
    widths = [TINY["dim"] * 2 ** i for i in range(4)]
    for i, width in enumerate(widths):
        dense[f"backbone.outnorm{i}.weight"] = torch.rand(width) + 0.5
        dense[f"backbone.outnorm{i}.bias"] = torch.randn(width)
    dense["neck.lateral_convs.0.conv.weight"] = torch.randn(4, widths[0], 1, 1)
    torch.save({"state_dict": dense, "args": argparse.Namespace(model="mamba_vision_T", lr=1e-4)},
               tmp_path / "dense.pth")
    backbone, log = load_pretrained("visionzoo_mambavision_t", tmp_path / "dense.pth", **TINY)
    state = backbone.state_dict()
    for i in range(4):
        assert torch.equal(state[f"norm{i}.weight"], dense[f"backbone.outnorm{i}.weight"])
        assert torch.equal(state[f"norm{i}.bias"], dense[f"backbone.outnorm{i}.bias"])
    assert torch.equal(state["model.stages.2.blocks.0.attn.A_log"], official["levels.2.blocks.0.mixer.A_log"])
    assert "missing keys" not in log and "unexpected key" not in log


# ----------------------------------------------------------------------------------------------
# init_cfg=dict(type='Pretrained'): official classification / dense checkpoints, our own layouts
# ----------------------------------------------------------------------------------------------
def official_dense_state_dict(model_name, seed=0):
    """An official dense backbone's keys (classification keys without norm / head, plus norm{i})
    under ``backbone.``, next to a neck's, as an mmdet / mmseg checkpoint."""
    arch = ARCHS[model_name]
    state = {f"backbone.{k}": v for k, v in official_state_dict(arch, seed).items() if not k.startswith(("norm.", "head."))}
    generator = torch.Generator().manual_seed(seed + 1)
    for i in range(4):
        channels = arch["embed_dim"] * 2**i
        state[f"backbone.norm{i}.weight"] = 1 + 0.1 * torch.randn(channels, generator=generator)
        state[f"backbone.norm{i}.bias"] = 0.1 * torch.randn(channels, generator=generator)
    state["neck.lateral_convs.0.conv.weight"] = torch.randn(8, arch["embed_dim"], 1, 1)
    return state


def load_pretrained(model_name, checkpoint, **kwargs):
    backbone = VisionZooBackbone(model_name, init_cfg=dict(type="Pretrained", checkpoint=str(checkpoint)), **kwargs)
    with Records() as records:
        backbone.init_weights()
    return backbone, records.text


def assert_loaded(backbone, expected):
    state = backbone.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("model_name", ["visionzoo_nat_m", "visionzoo_dinats_t"])
def test_pretrained_official_classification_checkpoint(model_name, tmp_path):
    official = official_state_dict(ARCHS[model_name])
    torch.save({"model": official}, tmp_path / "official.pth")
    backbone, log = load_pretrained(model_name, tmp_path / "official.pth")
    converted = checkpoint_filter_fn(official, backbone.model)
    assert_loaded(backbone, {f"model.{k}": v for k, v in converted.items() if not k.startswith(("norm.", "head."))})
    # reported through the mmengine logger: the classifier and final norm are not used, norm{i} are new
    assert "unexpected key in source state_dict: model.norm.weight, model.norm.bias, model.head.fc.weight" in log
    assert "missing keys in source state_dict: norm0.weight, norm0.bias" in log


def test_pretrained_classification_checkpoint_gives_the_official_logits(tmp_path):
    """All four stages loaded from an official NAT-M checkpoint: its final norm, pooling and head on
    our last stage's output reproduce the official model's logits (independent reference)."""
    arch = ARCHS["visionzoo_nat_m"]
    official = official_state_dict(arch)
    torch.save(official, tmp_path / "official.pth")
    backbone, _ = load_pretrained("visionzoo_nat_m", tmp_path / "official.pth", out_indices=(3,), out_norms=False)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features, = backbone.eval()(image)
        x = F.layer_norm(features.permute(0, 2, 3, 1), features.shape[1:2], official["norm.weight"], official["norm.bias"])
        logits = F.linear(x.mean(dim=(1, 2)), official["head.weight"], official["head.bias"])
        expected = official_forward(official, arch, image, [[1] * depth for depth in arch["depths"]])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("model_name", ["visionzoo_dinat_m", "visionzoo_dinats_t"])
def test_pretrained_official_dense_checkpoint(model_name, tmp_path):
    dense = official_dense_state_dict(model_name)
    torch.save({"state_dict": dense, "meta": {"epoch": 36, "CLASSES": ("a", "b")}}, tmp_path / "dense.pth")
    backbone, log = load_pretrained(model_name, tmp_path / "dense.pth")
    backbone_keys = {k.removeprefix("backbone."): v for k, v in dense.items() if k.startswith("backbone.")}
    converted = backbone.convert_state_dict(backbone_keys, prefix="")
    assert converted.keys() == backbone.state_dict().keys()  # every key maps, nothing missing
    assert_loaded(backbone, converted)
    assert_loaded(backbone, {f"norm{i}.weight": dense[f"backbone.norm{i}.weight"] for i in range(4)})
    assert "missing keys" not in log and "unexpected key" not in log


def test_pretrained_own_layouts(tmp_path):
    # a detector checkpoint of this wrapper (backbone.model.*, backbone.norm{i}.*)
    source = VisionZooBackbone("visionzoo_dinats_t")
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "det.pth")
    backbone, log = load_pretrained("visionzoo_dinats_t", tmp_path / "det.pth")
    assert_loaded(backbone, source.state_dict())
    assert "missing keys" not in log and "unexpected key" not in log
    # a timm-layout classification model saved as safetensors (visionzoo's training tools)
    model = timm.create_model("visionzoo_nat_m")
    save_weights(tmp_path / "model.safetensors", model.state_dict())
    backbone, _ = load_pretrained("visionzoo_nat_m", tmp_path / "model.safetensors")
    assert_loaded(backbone, {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith(("norm.", "head."))})


def test_checkpoint_urls_that_name_no_file_are_cached_under_their_last_part(tmp_path, monkeypatch):
    """Agent-Swin's / Agent-PVT's official weights are at ``.../f/<id>/?dl=1``."""
    from visionzoo.mm.backbone import read_checkpoint

    calls = []

    def load(url, map_location=None, weights_only=False, file_name=None):
        calls.append((url, weights_only, file_name))
        return {"model": {"x": torch.ones(1)}}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", load)
    assert read_checkpoint("https://cloud.tsinghua.edu.cn/f/abc123/?dl=1") == {"x": torch.ones(1)}
    read_checkpoint("https://host/weights/model.pth")
    assert calls == [("https://cloud.tsinghua.edu.cn/f/abc123/?dl=1", True, "abc123.pth"),
                     ("https://host/weights/model.pth", True, None)]


class NotWeights:
    """Pickled as a class reference: torch.load(weights_only=True) must refuse it."""


def test_pretrained_refuses_pickled_code(tmp_path):
    torch.save({"state_dict": {}, "meta": NotWeights()}, tmp_path / "unsafe.pth")
    backbone = VisionZooBackbone("visionzoo_nat_m", init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "unsafe.pth")))
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        backbone.init_weights()


# ----------------------------------------------------------------------------------------------
# without the mm extra
# ----------------------------------------------------------------------------------------------
def test_import_errors_without_the_mm_extra():
    script = """
import sys

class NotInstalled:  # a meta path finder that makes packages look absent
    blocked = {'mmdet', 'mmseg'}

    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())
import timm, visionzoo
timm.create_model('visionzoo_nat_m', num_classes=0)
for blocked in ('mmdet', 'mmengine'):
    NotInstalled.blocked.add(blocked)
    try:
        import visionzoo.mm
    except ImportError as e:
        print('ERROR', e)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                            env=subprocess_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2 and "neither mmdet nor mmseg" in errors[0] and "mmengine" in errors[1]
    for error in errors:
        assert "pip install visionzoo[mm]" in error and "mmcv" in error
