"""NAT / DiNAT / DiNAT_s / isotropic: official checkpoint layout, exact parameter counts, dilation
schedules, and outputs equal to an independent functional forward over an official state dict.

The official key layout and shapes are generated here from the architecture spec
(/work/shared/specs/neighborhood.md and SHI-Labs' classification/*.py), independently of the model code.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import timm

import visionzoo  # noqa: F401  (registers the models)
from visionzoo.kernels import na2d
from visionzoo.layers import NeighborhoodAttention2d
from visionzoo.models.nat import checkpoint_filter_fn, dinat_dilations

# official architectures: layout 'nat' (nat.py / dinat.py), 'dinats' (dinats.py), 'iso' (isotropic.py)
_NAT_SIZES = {
    "m": dict(embed_dim=64, depths=(3, 4, 6, 5), heads=(2, 4, 8, 16), mlp_ratio=3),
    "t": dict(embed_dim=64, depths=(3, 4, 18, 5), heads=(2, 4, 8, 16), mlp_ratio=3),
    "s": dict(embed_dim=96, depths=(3, 4, 18, 5), heads=(3, 6, 12, 24), mlp_ratio=2),
    "b": dict(embed_dim=128, depths=(3, 4, 18, 5), heads=(4, 8, 16, 32), mlp_ratio=2),
    "l": dict(embed_dim=192, depths=(3, 4, 18, 5), heads=(6, 12, 24, 48), mlp_ratio=2),
}
_DINATS_SIZES = {
    "t": dict(embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24)),
    "s": dict(embed_dim=96, depths=(2, 2, 18, 2), heads=(3, 6, 12, 24)),
    "b": dict(embed_dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32)),
    "l": dict(embed_dim=192, depths=(2, 2, 18, 2), heads=(6, 12, 24, 48)),
}
ARCHS = {}
for _size in "mtsb":
    ARCHS[f"visionzoo_nat_{_size}"] = dict(layout="nat", dilated=False, layer_scale=_size in "sb", **_NAT_SIZES[_size])
for _size in "mtsbl":
    # DiNAT-S has no layer scale (NAT-S has), DiNAT-B has it
    ARCHS[f"visionzoo_dinat_{_size}"] = dict(layout="nat", dilated=True, layer_scale=_size == "b", **_NAT_SIZES[_size])
for _size in "tsbl":
    ARCHS[f"visionzoo_dinats_{_size}"] = dict(
        layout="dinats", dilated=True, layer_scale=False, mlp_ratio=4, **_DINATS_SIZES[_size]
    )
for _name, _dim, _heads in (("s", 384, 12), ("b", 768, 24)):
    ARCHS[f"visionzoo_nat_iso_{_name}"] = dict(layout="iso", embed_dim=_dim, depth=12, heads=_heads, dilation=1)
    ARCHS[f"visionzoo_dinat_iso_{_name}"] = dict(layout="iso", embed_dim=_dim, depth=12, heads=_heads, dilation=2)

KERNEL = 7
# spec: "Computed param counts of the official code" (millions, 1000 classes)
OFFICIAL_MPARAMS = {
    "visionzoo_nat_m": 19.98,
    "visionzoo_nat_t": 27.90,
    "visionzoo_nat_s": 50.74,
    "visionzoo_nat_b": 89.77,
    "visionzoo_dinat_m": 19.98,
    "visionzoo_dinat_t": 27.90,
    "visionzoo_dinat_b": 89.77,
    "visionzoo_dinat_l": 200.94,
}
# spec tables (reported, rounded to 1M) for the others
REPORTED_MPARAMS = {
    "visionzoo_dinat_s": 51,
    "visionzoo_dinats_t": 28,
    "visionzoo_dinats_s": 50,
    "visionzoo_dinats_b": 88,
    "visionzoo_dinats_l": 197,
    "visionzoo_nat_iso_s": 22,
    "visionzoo_dinat_iso_s": 22,
    "visionzoo_nat_iso_b": 86,
    "visionzoo_dinat_iso_b": 86,
}
# spec: DiNAT classification dilations at 224 and 384 (the 4 stages of depths 3-4-18-5)
DILATIONS_224 = [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
DILATIONS_384 = [[1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5]


def _spec_dilations(table, depths):
    """Official per-block dilations of a model with ``depths`` (the tables alternate NA / DiNA)."""
    return [row[:depth] for row, depth in zip(table, depths)]


def _block_shapes(prefix, dim, heads, mlp_ratio, layer_scale):
    hidden = int(dim * mlp_ratio)
    shapes = {
        "norm1.weight": (dim,),
        "norm1.bias": (dim,),
        "attn.qkv.weight": (3 * dim, dim),
        "attn.qkv.bias": (3 * dim,),
        "attn.rpb": (heads, 2 * KERNEL - 1, 2 * KERNEL - 1),
        "attn.proj.weight": (dim, dim),
        "attn.proj.bias": (dim,),
        "norm2.weight": (dim,),
        "norm2.bias": (dim,),
        "mlp.fc1.weight": (hidden, dim),
        "mlp.fc1.bias": (hidden,),
        "mlp.fc2.weight": (dim, hidden),
        "mlp.fc2.bias": (dim,),
    }
    if layer_scale:
        shapes.update({"gamma1": (dim,), "gamma2": (dim,)})
    return {prefix + key: shape for key, shape in shapes.items()}


def official_shapes(arch, num_classes=1000, in_chans=3):
    """Key -> shape of the official classification checkpoint of ``arch``."""
    dim = arch["embed_dim"]
    shapes = {}
    if arch["layout"] == "nat":
        shapes.update({
            "patch_embed.proj.0.weight": (dim // 2, in_chans, 3, 3),
            "patch_embed.proj.0.bias": (dim // 2,),
            "patch_embed.proj.1.weight": (dim, dim // 2, 3, 3),
            "patch_embed.proj.1.bias": (dim,),
        })
    else:
        patch = 16 if arch["layout"] == "iso" else 4
        shapes.update({"patch_embed.proj.weight": (dim, in_chans, patch, patch), "patch_embed.proj.bias": (dim,)})
    shapes.update({"patch_embed.norm.weight": (dim,), "patch_embed.norm.bias": (dim,)})
    if arch["layout"] == "iso":
        for j in range(arch["depth"]):
            shapes.update(_block_shapes(f"layers.{j}.", dim, arch["heads"], 4, False))
        final = dim
    else:
        stage_key = "levels" if arch["layout"] == "nat" else "layers"
        num_stages = len(arch["depths"])
        for i, (depth, heads) in enumerate(zip(arch["depths"], arch["heads"])):
            width = dim * 2**i
            for j in range(depth):
                shapes.update(
                    _block_shapes(f"{stage_key}.{i}.blocks.{j}.", width, heads, arch["mlp_ratio"], arch["layer_scale"])
                )
            if i < num_stages - 1:
                prefix = f"{stage_key}.{i}.downsample."
                if arch["layout"] == "nat":  # ConvDownsample
                    shapes.update({
                        prefix + "reduction.weight": (2 * width, width, 3, 3),
                        prefix + "norm.weight": (2 * width,),
                        prefix + "norm.bias": (2 * width,),
                    })
                else:  # Swin PatchMerging
                    shapes.update({
                        prefix + "norm.weight": (4 * width,),
                        prefix + "norm.bias": (4 * width,),
                        prefix + "reduction.weight": (2 * width, 4 * width),
                    })
        final = dim * 2 ** (num_stages - 1)
    shapes.update({
        "norm.weight": (final,),
        "norm.bias": (final,),
        "head.weight": (num_classes, final),
        "head.bias": (num_classes,),
    })
    return shapes


def official_state_dict(arch, seed=0):
    """Random official-layout weights, scaled so every part visibly changes the output."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes(arch).items():
        noise = torch.randn(shape, generator=generator)
        if key.endswith("rpb"):
            value = noise * 0.5
        elif "gamma" in key:
            value = 0.5 + noise.abs() * 0.5
        elif "norm" in key and key.endswith("weight"):
            value = 1.0 + 0.1 * noise
        elif key.endswith("bias"):
            value = 0.1 * noise
        else:  # linear / conv weights: unit gain
            value = noise / math.sqrt(math.prod(shape[1:]))
        state[key] = value
    return state


# ----------------------------------------------------------------------------------------------
# independent functional forward over the official state dict
# ----------------------------------------------------------------------------------------------
def _layer_norm(x, state, prefix):
    return F.layer_norm(x, x.shape[-1:], state[prefix + "weight"], state[prefix + "bias"], eps=1e-5)


def _official_block(x, state, prefix, heads, dilation):
    batch, height, width, dim = x.shape
    shortcut = x
    x = _layer_norm(x, state, prefix + "norm1.")
    qkv = F.linear(x, state[prefix + "attn.qkv.weight"], state[prefix + "attn.qkv.bias"])
    q, k, v = qkv.reshape(batch, height, width, 3, heads, dim // heads).unbind(3)
    x = na2d(q, k, v, KERNEL, dilation=dilation, rpb=state[prefix + "attn.rpb"], backend="reference")
    x = x.reshape(batch, height, width, dim)
    x = F.linear(x, state[prefix + "attn.proj.weight"], state[prefix + "attn.proj.bias"])
    if prefix + "gamma1" in state:
        x = state[prefix + "gamma1"] * x
    x = shortcut + x
    y = _layer_norm(x, state, prefix + "norm2.")
    y = F.linear(F.gelu(F.linear(y, state[prefix + "mlp.fc1.weight"], state[prefix + "mlp.fc1.bias"])),
                 state[prefix + "mlp.fc2.weight"], state[prefix + "mlp.fc2.bias"])
    if prefix + "gamma2" in state:
        y = state[prefix + "gamma2"] * y
    return x + y


def _official_patch_merging(x, state, prefix):
    if x.shape[1] % 2 or x.shape[2] % 2:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
    # Swin's order: (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    return F.linear(_layer_norm(x, state, prefix + "norm."), state[prefix + "reduction.weight"])


def official_forward(state, arch, image, dilations=None):
    """Logits of the official model for ``image [B, 3, H, W]`` (windows must fit every stage)."""
    layout = arch["layout"]
    if layout == "nat":
        x = F.conv2d(image, state["patch_embed.proj.0.weight"], state["patch_embed.proj.0.bias"], stride=2, padding=1)
        x = F.conv2d(x, state["patch_embed.proj.1.weight"], state["patch_embed.proj.1.bias"], stride=2, padding=1)
    else:
        patch = state["patch_embed.proj.weight"].shape[-1]
        x = F.pad(image, (0, -image.shape[-1] % patch, 0, -image.shape[-2] % patch))
        x = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    x = _layer_norm(x.permute(0, 2, 3, 1), state, "patch_embed.norm.")
    if layout == "iso":
        for j in range(arch["depth"]):
            x = _official_block(x, state, f"layers.{j}.", arch["heads"], arch["dilation"] if j % 2 else 1)
    else:
        stage_key = "levels" if layout == "nat" else "layers"
        for i, (depth, heads) in enumerate(zip(arch["depths"], arch["heads"])):
            for j in range(depth):
                x = _official_block(x, state, f"{stage_key}.{i}.blocks.{j}.", heads, dilations[i][j])
            prefix = f"{stage_key}.{i}.downsample."
            if i == len(arch["depths"]) - 1:
                break
            if layout == "nat":
                x = F.conv2d(x.permute(0, 3, 1, 2), state[prefix + "reduction.weight"], stride=2, padding=1)
                x = _layer_norm(x.permute(0, 2, 3, 1), state, prefix + "norm.")
            else:
                x = _official_patch_merging(x, state, prefix)
    x = _layer_norm(x, state, "norm.").mean(dim=(1, 2))
    return F.linear(x, state["head.weight"], state["head.bias"])


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _meta_model(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
def test_every_registered_model_has_an_official_architecture():
    assert sorted(timm.list_models(module="nat")) == sorted(ARCHS)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_param_count_equals_official(name):
    model = _meta_model(name)
    official = sum(math.prod(shape) for shape in official_shapes(ARCHS[name]).values())
    assert _count(model) == official
    if name in OFFICIAL_MPARAMS:
        assert round(official / 1e6, 2) == OFFICIAL_MPARAMS[name]
    else:
        assert round(official / 1e6) == REPORTED_MPARAMS[name]


def test_layer_scale_only_where_official_has_it():
    # NAT-S has layer scale, DiNAT-S does not: 2 * (3 * 96 + 4 * 192 + 18 * 384 + 5 * 768) = 23616 params
    assert _count(_meta_model("visionzoo_nat_s")) - _count(_meta_model("visionzoo_dinat_s")) == 23616


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_checkpoint_filter_maps_every_official_key(name):
    model = _meta_model(name)
    official = {key: torch.empty(shape, device="meta") for key, shape in official_shapes(ARCHS[name]).items()}
    converted = checkpoint_filter_fn({"model": official}, model)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in converted.items()} == expected
    # our own layout passes through unchanged
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


@pytest.mark.parametrize(
    "name, nested",
    [
        ("visionzoo_nat_m", False),
        ("visionzoo_dinat_m", True),
        ("visionzoo_dinats_t", False),
        ("visionzoo_dinat_iso_s", False),
    ],
)
def test_official_checkpoint_loads_and_matches_official_forward(name, nested, tmp_path):
    arch = ARCHS[name]
    state = official_state_dict(arch)
    path = tmp_path / f"{name}.pth"
    torch.save({"model": state} if nested else state, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()

    # strict: no missing or unexpected keys
    result = model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    # 224: the resolution the official schedule is for, where every window fits every stage
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    dilations = None
    if arch.get("dilated"):
        dilations = _spec_dilations(DILATIONS_224, arch["depths"])
    elif "depths" in arch:
        dilations = [[1] * depth for depth in arch["depths"]]
    with torch.no_grad():
        expected = official_forward(state, arch, image, dilations)
        logits = model(image)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("depths", [(3, 4, 18, 5), (3, 4, 6, 5), (2, 2, 18, 2)])
def test_dinat_dilations_reproduce_official_tables(depths):
    for img_size, table in ((224, DILATIONS_224), (384, DILATIONS_384)):
        schedule = dinat_dilations(depths, img_size, KERNEL)
        assert schedule == [[(d, d) for d in row] for row in _spec_dilations(table, depths)]


def test_dinat_dilations_other_resolutions():
    # 512: stages 128, 64, 32, 16 -> 18, 9, 4, 2 on odd blocks; non-square per dimension
    assert [row[1] for row in dinat_dilations((3, 4, 6, 5), 512)] == [(18, 18), (9, 9), (4, 4), (2, 2)]
    assert [row[1] for row in dinat_dilations((3, 4, 6, 5), (480, 640))] == [(17, 22), (8, 11), (4, 5), (2, 2)]
    # odd sizes: stage sizes are ceil(size / stride)
    assert [row[1] for row in dinat_dilations((2, 2, 2, 2), 225)] == [(8, 8), (4, 4), (2, 2), (1, 1)]


@pytest.mark.parametrize(
    "name, table",
    [
        ("visionzoo_dinat_m", DILATIONS_224),
        ("visionzoo_dinats_t", DILATIONS_224),
        ("visionzoo_dinat_l.in22k_ft_in1k", DILATIONS_224),
        ("visionzoo_dinat_l.in22k_ft_in1k_384", DILATIONS_384),  # the weights' resolution picks the schedule
        ("visionzoo_dinats_l.in22k_ft_in1k_384", DILATIONS_384),
    ],
)
def test_model_dilations_follow_pretrained_resolution(name, table):
    model = _meta_model(name)
    depths = [len(stage.blocks) for stage in model.stages]
    expected = [[(d, d) for d in row] for row in _spec_dilations(table, depths)]
    assert [[block.attn.dilation for block in stage.blocks] for stage in model.stages] == expected


def test_nat_has_no_dilation_and_explicit_dilations_override():
    model = _meta_model("visionzoo_nat_m")
    assert all(block.attn.dilation == (1, 1) for stage in model.stages for block in stage.blocks)
    # e.g. the official segmentation schedule
    seg = [[1, 16, 1], [1, 4, 1, 8], [1, 2, 1, 3, 1, 4], [1, 2, 1, 2, 1]]
    model = _meta_model("visionzoo_dinat_m", dilations=seg)
    assert [[block.attn.dilation[0] for block in stage.blocks] for stage in model.stages] == seg
    with pytest.raises(ValueError, match="one dilation per block"):
        _meta_model("visionzoo_dinat_m", dilations=[[1, 2], [1], [1], [1]])


def test_large_inputs_other_than_the_build_resolution():
    # shapes only (meta tensors): a 512-built DiNAT on a 640x480 image, windows fitted per stage
    with torch.device("meta"):
        model = timm.create_model("visionzoo_dinat_m", img_size=512)
        logits = model(torch.empty(1, 3, 480, 640))
        features = model.forward_intermediates(torch.empty(1, 3, 480, 640), intermediates_only=True)
    assert logits.shape == (1, 1000)
    assert [tuple(f.shape[-2:]) for f in features] == [(120, 160), (60, 80), (30, 40), (15, 20)]


def test_attention_smaller_than_kernel_is_full_attention_with_offset_bias():
    torch.manual_seed(0)
    attn = NeighborhoodAttention2d(16, num_heads=2, kernel_size=7).eval()
    x = torch.randn(2, 5, 6, 16)
    with torch.no_grad():
        out = attn(x)
        q, k, v = attn.qkv(x).reshape(2, 30, 3, 2, 8).permute(2, 0, 3, 1, 4)  # [B, heads, N, D]
        rows, cols = torch.meshgrid(torch.arange(5), torch.arange(6), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        bias = attn.rpb[:, rows[None, :] - rows[:, None] + 6, cols[None, :] - cols[:, None] + 6]
        weights = torch.softmax(q @ k.transpose(-1, -2) * attn.scale + bias, dim=-1)
        expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 6, 16))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_attention_dilation_is_fitted_per_dimension():
    torch.manual_seed(0)
    attn = NeighborhoodAttention2d(16, num_heads=2, kernel_size=7, dilation=4).eval()
    x = torch.randn(1, 14, 30, 16)
    with torch.no_grad():
        out = attn(x)
        q, k, v = attn.qkv(x).reshape(1, 14, 30, 3, 2, 8).unbind(3)
        # 14 // 7 = 2 rows, 30 // 7 = 4 columns
        expected = na2d(q, k, v, 7, dilation=(2, 4), rpb=attn.rpb, backend="reference")
        expected = attn.proj(expected.reshape(1, 14, 30, 16))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_attention_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        NeighborhoodAttention2d(10, num_heads=3)
    with pytest.raises(ValueError, match="attn_drop"):
        NeighborhoodAttention2d(16, num_heads=2, attn_drop=0.1)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        NeighborhoodAttention2d(16, num_heads=2)(torch.randn(2, 16, 8))
    with pytest.raises(ValueError, match="stem_type"):
        _meta_model("visionzoo_nat_m", stem_type="pixel")


def test_no_weight_decay_lists_every_rpb():
    model = _meta_model("visionzoo_dinat_m")
    rpb = {name for name, _ in model.named_parameters() if name.endswith(".rpb")}
    assert len(rpb) == 18 and model.no_weight_decay() == rpb


def test_pretrained_cfgs():
    names = [name for name in timm.list_pretrained("visionzoo_*") if name.split(".")[0] in ARCHS]
    assert len(names) == 21
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url.startswith("https://shi-labs.com/projects/") and cfg.url.endswith(".pth")
        assert cfg.license == "mit" and cfg.classifier == "head.fc" and cfg.paper_ids
        assert cfg.pool_size == tuple(s // (16 if "_iso_" in name else 32) for s in cfg.input_size[1:])
        assert cfg.crop_pct == (1.0 if cfg.input_size[-1] == 384 else 0.875)
