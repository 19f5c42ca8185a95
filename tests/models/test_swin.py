"""Swin / Swin-Free / Swin-Free-BR: logits equal timm's Swin given the same weights, official
Microsoft key layout, parameter counts of the spec, the token-axis BatchNorm of the BR variants.

The official layout is produced here from timm's state dict by the inverse of the documented
mapping (/work/shared/specs/window.md), independently of the model code.
"""
import re

import pytest
import torch
import timm

import visionzoo  # noqa: F401  (registers the models)
from visionzoo.kernels import use_backend
from visionzoo.layers import WindowAttention
from visionzoo.models.swin import TokenBatchNorm, checkpoint_filter_fn, stage_window_sizes

TOLERANCE = 1e-4  # max |a - b| / max |a|

# spec: timm / official code parameter counts (millions, 1000 classes)
MPARAMS = {
    "visionzoo_swin_t": 28.29,
    "visionzoo_swin_s": 49.61,
    "visionzoo_swin_b": 87.77,
    "visionzoo_swin_l": 196.53,
    "visionzoo_swin_b_384": 87.90,
    "visionzoo_swin_l_384": 196.74,
    "visionzoo_swin_free_t": 28.34,
    "visionzoo_swin_free_s": 49.73,
    "visionzoo_swin_free_b": 87.94,
    "visionzoo_swin_free_b_dr12": 68.95,
}
# the official Swin-Free-BR counts include patch merging modules its forward never applies: per
# merging layer of input width d, an `expansion` Linear(d, 2d) with bias and a norm over 4d
BR_MPARAMS = {
    "visionzoo_swin_free_br_t": (28.75, (96, 192, 384)),
    "visionzoo_swin_free_br_s": (50.14, (96, 192, 384)),
    "visionzoo_swin_free_br_b": (88.63, (128, 256, 512)),
    "visionzoo_swin_free_br_b_dr12": (69.65, (128, 256, 512)),
}


def _params(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters())


def _relative_error(expected, actual):
    return ((expected - actual).abs().max() / expected.abs().max()).item()


def _image(size, batch=1, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _pair(timm_name, name, img_size, timm_kwargs=None, **kwargs):
    """timm's model (random init) and ours loaded with its state dict, both in eval mode."""
    torch.manual_seed(0)
    reference = timm.create_model(timm_name, img_size=img_size, **(timm_kwargs or kwargs)).eval()
    model = timm.create_model(name, img_size=img_size, **kwargs).eval()
    model.load_state_dict(checkpoint_filter_fn(reference.state_dict(), model), strict=True)
    return reference, model


def _assert_same_logits(reference, model, img_size):
    image = _image(img_size)
    with torch.no_grad():
        expected, actual = reference(image), model(image)
    error = _relative_error(expected, actual)
    assert error < TOLERANCE, error


@pytest.mark.parametrize("name", sorted(MPARAMS))
def test_parameter_count(name):
    assert round(_params(name) / 1e6, 2) == MPARAMS[name]


@pytest.mark.parametrize("name", sorted(BR_MPARAMS))
def test_br_parameter_count_without_the_unused_official_modules(name):
    official, widths = BR_MPARAMS[name]
    unused = sum(d * 2 * d + 2 * d + 2 * 4 * d for d in widths)
    assert round((_params(name) + unused) / 1e6, 2) == official


@pytest.mark.parametrize("img_size", [224, 256])  # 256: maps 64/32/16/8 are padded to the window
def test_swin_t_logits_equal_timm(img_size):
    reference, model = _pair("swin_tiny_patch4_window7_224", "visionzoo_swin_t", img_size)
    _assert_same_logits(reference, model, img_size)


def test_swin_b_384_layout_logits_equal_timm_reduced_depth():
    # window 12 with shift 6, Swin-B's heads; fewer blocks and channels keep it fast
    small = dict(embed_dim=32, depths=(2, 2, 2, 2))
    reference, model = _pair("swin_base_patch4_window12_384", "visionzoo_swin_b_384", 384, **small)
    assert model.stages[3].blocks[1].attn.shift_size == (0, 0)  # 12x12 map = window: no shift
    assert model.stages[2].blocks[1].attn.shift_size == (6, 6)
    _assert_same_logits(reference, model, 384)


def test_swin_free_t_equals_timm_swin_t_with_free_windows_and_no_shift():
    small = dict(embed_dim=48, depths=(2, 2, 2, 2))  # Swin-T's heads; fewer blocks and channels keep it fast
    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", window_size=(7, 14, 14, 7), **small).eval()
    for stage in reference.layers:
        for block in stage.blocks:
            block.shift_size = (0, 0)
            block.attn_mask = None
    model = timm.create_model("visionzoo_swin_free_t", **small).eval()
    model.load_state_dict(checkpoint_filter_fn(reference.state_dict(), model), strict=True)
    assert model.stages[2].blocks[0].attn.relative_position_bias_table.shape == (27 * 27, 12)
    _assert_same_logits(reference, model, 224)


def _official_layout(timm_state_dict, window_size=7):
    """Microsoft's layout: downsamplers end stage i, plain `head`, index / mask buffers present."""
    official = {}
    for key, value in timm_state_dict.items():
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if match:
            key = f"layers.{int(match[1]) - 1}.downsample.{match[2]}"
        key = key.replace("head.fc.", "head.")
        official[key] = value
        if key.endswith("attn.relative_position_bias_table"):
            prefix = key[: -len("relative_position_bias_table")]
            official[prefix + "relative_position_index"] = torch.zeros(window_size**2, window_size**2, dtype=torch.long)
    official["layers.0.blocks.1.attn_mask"] = torch.zeros(64, window_size**2, window_size**2)
    return {"model": official}


def test_official_checkpoint_loads_strictly_with_same_logits(tmp_path):
    small = dict(embed_dim=48, depths=(2, 2, 2, 2))
    reference = timm.create_model("swin_tiny_patch4_window7_224", **small).eval()
    official = _official_layout(reference.state_dict())
    assert "layers.0.downsample.reduction.weight" in official["model"] and "head.weight" in official["model"]
    path = tmp_path / "swin_tiny_official.pth"
    torch.save(official, path)
    model = timm.create_model(
        "visionzoo_swin_t", **small, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    _assert_same_logits(reference, model, 224)


def test_bias_tables_resized_for_another_window():
    # timm resizes the 13x13 tables bicubically for window 8 the same way
    small = dict(embed_dim=48, depths=(2, 2, 2, 2))
    source = timm.create_model("swin_tiny_patch4_window7_224", **small).state_dict()
    reference = timm.create_model("swin_tiny_patch4_window7_224", img_size=256, window_size=8, **small).eval()
    reference.load_state_dict(timm.models.swin_transformer.checkpoint_filter_fn(source, reference))
    model = timm.create_model("visionzoo_swin_t", img_size=256, window_size=8, **small).eval()
    model.load_state_dict(checkpoint_filter_fn(source, model), strict=True)
    assert model.stages[0].blocks[0].attn.relative_position_bias_table.shape == (15 * 15, 3)
    _assert_same_logits(reference, model, 256)


def test_swin_free_windows_scale_with_resolution():
    free = ((7, 7), (14, 14), (14, 14), (7, 7))
    assert stage_window_sizes(free, 4, 224, window_img_size=224) == free
    assert stage_window_sizes(free, 4, 384, window_img_size=224) == ((12, 12), (24, 24), (24, 24), (12, 12))
    assert stage_window_sizes(7, 4, 384) == ((7, 7),) * 4  # Swin keeps its window
    model = timm.create_model("visionzoo_swin_free_t", img_size=384)
    assert [stage.blocks[0].attn.window_size for stage in model.stages] == [(12, 12), (24, 24), (24, 24), (12, 12)]


def test_br_takes_only_its_input_size():
    model = timm.create_model("visionzoo_swin_free_br_t", num_classes=10).eval()
    with pytest.raises(ValueError, match="224x224 inputs.*got 256x256"):
        model(_image(256))


def test_token_batch_norm_normalises_each_token_over_batch_and_channels():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 8) * torch.linspace(0.5, 3, 15).view(1, 3, 5, 1) + 2
    norm = TokenBatchNorm(8, num_tokens=15)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    tokens = x.reshape(4, 15, 8)
    mean = tokens.mean((0, 2), keepdim=True)
    var = tokens.var((0, 2), unbiased=False, keepdim=True)
    expected = (tokens - mean) / torch.sqrt(var + 1e-5) * norm.weight.view(1, 15, 1) + norm.bias.view(1, 15, 1)
    torch.testing.assert_close(norm.train()(x), expected.reshape(x.shape))
    with pytest.raises(ValueError, match="15 token positions, got a 4x4 map"):
        norm(torch.randn(2, 4, 4, 8))


def test_br_block_is_token_batch_norm_attention_and_relu_mlp():
    model = timm.create_model("visionzoo_swin_free_br_t").eval()
    block = model.stages[3].blocks[0]
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
        x = torch.randn(2, 7, 7, 768)

        def token_norm(norm, t):
            scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).view(1, 7, 7, 1)
            return (t - norm.running_mean.view(1, 7, 7, 1)) * scale + norm.bias.view(1, 7, 7, 1)

        y = x + block.attn(token_norm(block.norm1, x))
        hidden = torch.relu(token_norm(block.norm2, y) @ block.mlp.fc1.weight.t() + block.mlp.fc1.bias)
        expected = y + hidden @ block.mlp.fc2.weight.t() + block.mlp.fc2.bias
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-4)
    assert isinstance(model.stages[1].downsample.norm, torch.nn.Identity)


def test_br_official_checkpoint_drops_unused_modules():
    model = timm.create_model("visionzoo_swin_free_br_t", depths=(1, 1, 1, 1))
    official = {}
    for key, value in model.state_dict().items():
        match = re.match(r"stages\.(\d+)\.(.*)", key)
        if match:
            stage, rest = int(match[1]), match[2]
            if rest.startswith("downsample."):
                stage -= 1
            key = f"layers.{stage}.{rest}"
        official[key.replace("head.fc.", "head.")] = value
    for i, width in enumerate((96, 192, 384)):
        official[f"layers.{i}.downsample.expansion.weight"] = torch.zeros(2 * width, width)
        official[f"layers.{i}.downsample.expansion.bias"] = torch.zeros(2 * width)
        official[f"layers.{i}.downsample.norm.weight"] = torch.ones(4 * width)
        official[f"layers.{i}.downsample.norm.bias"] = torch.zeros(4 * width)
    model.load_state_dict(checkpoint_filter_fn({"model": official}, model), strict=True)


@pytest.mark.parametrize("backend", ["reference", "cpu", "torch"])
@pytest.mark.parametrize("size, shift", [((14, 14), 3), ((10, 13), 3), ((9, 16), 0)])  # 10x13, 9x16: padded
def test_window_attention_equals_timm_block_attention(size, shift, backend):
    torch.manual_seed(0)
    block = timm.models.swin_transformer.SwinTransformerBlock(
        32, input_resolution=size, num_heads=2, window_size=7, shift_size=shift
    ).eval()
    attn = WindowAttention(32, 2, window_size=7, shift_size=shift).eval()
    state = {k: v for k, v in block.attn.state_dict().items() if k != "relative_position_index"}
    attn.load_state_dict(state, strict=True)
    x = torch.randn(2, *size, 32)
    with torch.no_grad(), use_backend(backend):
        expected, actual = block._attn(x), attn(x)
    assert _relative_error(expected, actual) < TOLERANCE


def test_window_attention_rejects_bad_shift():
    with pytest.raises(ValueError, match=r"shift_size \(7, 7\) must be in \[0, window_size\)"):
        WindowAttention(96, 3, window_size=7, shift_size=7)
