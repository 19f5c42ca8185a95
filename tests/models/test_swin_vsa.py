"""Swin-VSA: the parameters of the official architecture (timm's Swin plus, per block, the two
regressors of the official VSA layer), a new model is Swin without the shift (timm's Swin-T with
every shift 0, same weights), and a checkpoint in Swin's official layout with the official VSA
attention keys (1x1-conv qkv / proj, index buffers), built here independently of the model
code, loads strictly with the same logits."""
import re

import pytest
import timm
import torch

import visionzoo  # noqa: F401  (registers the models)
from visionzoo.models.swin_vsa import checkpoint_filter_fn

# variant -> (timm's Swin of the same widths / depths / heads, parameters in millions)
MPARAMS = {
    "visionzoo_swin_vsa_t": ("swin_tiny_patch4_window7_224", 28.56),
    "visionzoo_swin_vsa_s": ("swin_small_patch4_window7_224", 50.10),
}
SMALL = dict(embed_dim=48, depths=(2, 2, 2, 2))  # Swin-T's heads; fewer blocks and channels keep it fast


def _count(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters()), model


def _relative_error(expected, actual):
    return ((expected - actual).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", sorted(MPARAMS))
def test_parameter_count(name):
    swin_name, millions = MPARAMS[name]
    swin_params, swin_model = _count(swin_name)
    # official vsa.py: sampling_offsets and sampling_scales end in Conv2d(dim, 2 * heads, 1) with bias
    regressors = sum(
        2 * (block.attn.qkv.in_features * 2 * block.attn.num_heads + 2 * block.attn.num_heads)
        for stage in swin_model.layers for block in stage.blocks
    )
    params, _ = _count(name)
    assert params == swin_params + regressors
    assert round(params / 1e6, 2) == millions


def test_new_model_is_swin_without_shift():
    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", **SMALL).eval()
    for stage in reference.layers:
        for block in stage.blocks:
            block.shift_size = (0, 0)
            block.attn_mask = None
    model = timm.create_model("visionzoo_swin_vsa_t", **SMALL).eval()
    regressors = {k: v for k, v in model.state_dict().items() if ".attn.sampling_" in k}
    assert len(regressors) == 4 * 8 and all(not v.any() for v in regressors.values())
    # the Swin weights carry no regressors: they keep the zero initialisation
    model.load_state_dict(checkpoint_filter_fn(reference.state_dict(), model), strict=True)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = _relative_error(reference(image), model(image))
    assert error < 1e-4, error


def _official_layout(state_dict):
    """Swin's official layout with the official VSA attention: downsamplers end stage i, plain
    `head`, 1x1-conv qkv / proj, index buffers."""
    official = {}
    for key, value in state_dict.items():
        key = re.sub(r"^stages\.", "layers.", key)
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if match:
            key = f"layers.{int(match[1]) - 1}.downsample.{match[2]}"
        key = key.replace("head.fc.", "head.")
        if re.search(r"\.attn\.(qkv|proj)\.weight$", key):
            value = value[:, :, None, None]
        official[key] = value
        if key.endswith("attn.relative_position_bias_table"):
            official[key.replace("bias_table", "index")] = torch.zeros(49, 49, dtype=torch.long)
    return {"model": official}


def test_official_checkpoint_loads_strictly_with_same_logits(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("visionzoo_swin_vsa_t", img_size=112, **SMALL).eval()
    with torch.no_grad():
        for name, param in source.named_parameters():
            if ".attn.sampling_" in name:
                param.normal_(0, 0.05)  # windows that move: the regressors enter the logits
    official = _official_layout(source.state_dict())
    assert official["model"]["layers.0.blocks.0.attn.qkv.weight"].shape == (144, 48, 1, 1)
    assert "layers.0.downsample.reduction.weight" in official["model"]
    torch.save(official, tmp_path / "swin_vsa_official.pth")
    model = timm.create_model(
        "visionzoo_swin_vsa_t", img_size=112, **SMALL, pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "swin_vsa_official.pth")),
    ).eval()
    unmoved = timm.create_model("visionzoo_swin_vsa_t", img_size=112, **SMALL).eval()
    unmoved.load_state_dict({k: v for k, v in source.state_dict().items() if ".attn.sampling_" not in k}, strict=False)
    image = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = source(image)
        assert _relative_error(expected, model(image)) < 1e-6
        assert _relative_error(expected, unmoved(image)) > 1e-3


def test_shifted_windows_are_refused():
    with pytest.raises(ValueError, match="no shifted windows"):
        timm.create_model("visionzoo_swin_vsa_t", shifted=True)
    with torch.device("meta"):
        model = timm.create_model("visionzoo_swin_vsa_t")
    assert all(not hasattr(block.attn, "shift_size") for stage in model.stages for block in stage.blocks)
