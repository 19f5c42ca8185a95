"""HaloNet: logits equal timm's given the same weights, the paper's parameter counts, input sizes.

HaloNet-26T at its native 256 px with timm's architecture; SE-HaloNet-33TS, HaloNet-50TS and
HaloNet-H1 at 64 px with smaller blocks and a quarter of the widths on both sides (timm's
``self_attn_kwargs`` / ``width_factor`` overlays), so that every stage's attention runs within the CI budget.
"""
import pytest
import torch
import timm

import visionzoo  # noqa: F401  (registers the models)
from visionzoo.layers import HaloAttention
from visionzoo.models.halonet import HaloNet, _paper_variant, checkpoint_filter_fn

TOLERANCE = 1e-4  # max |a - b| / max |a|

# ours -> timm's model, parameters in millions (timm's count, specs/window.md)
TIMM_VARIANTS = {
    "visionzoo_halonet26t": ("halonet26t", 12.48),
    "visionzoo_sehalonet33ts": ("sehalonet33ts", 13.69),
    "visionzoo_halonet50ts": ("halonet50ts", 22.73),
    "visionzoo_halonet_h1": ("halonet_h1", 8.10),
}
# the paper's table (millions)
PAPER_PARAMS = {0: 5.5, 1: 8.1, 2: 9.4, 3: 11.8, 4: 19.1, 5: 30.7, 6: 43.4, 7: 67.4}


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _image(size, batch=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _assert_same_logits(reference, model, image):
    reference.eval()
    model.load_state_dict(checkpoint_filter_fn(reference.state_dict(), model), strict=True)
    model.eval()
    with torch.no_grad():
        expected, out = reference(image), model(image)
    error = ((expected - out).abs().max() / expected.abs().max()).item()
    assert error < TOLERANCE, error


def test_halonet26t_logits_equal_timm_at_256():
    torch.manual_seed(0)
    reference = timm.create_model("halonet26t")
    _assert_same_logits(reference, timm.create_model("visionzoo_halonet26t"), _image(256))


@pytest.mark.parametrize("name", ["visionzoo_sehalonet33ts", "visionzoo_halonet50ts", "visionzoo_halonet_h1"])
def test_logits_equal_timm_small_blocks(name):
    # 64 px: stage maps 16, 8, 4, 2; blocks of 2 fit every stage (HaloNet-50TS's stage 2 keeps its 8);
    # a quarter of the widths (timm's width_factor) on both sides
    overlay = dict(self_attn_kwargs=dict(block_size=2, halo_size=1), width_factor=0.25)
    torch.manual_seed(0)
    reference = timm.create_model(TIMM_VARIANTS[name][0], **overlay)
    _assert_same_logits(reference, timm.create_model(name, **overlay), _image(64, batch=2))


@pytest.mark.parametrize("name", sorted(TIMM_VARIANTS))
def test_parameter_count_and_keys_equal_timm(name):
    timm_name, mparams = TIMM_VARIANTS[name]
    with torch.device("meta"):
        ours, theirs = timm.create_model(name), timm.create_model(timm_name)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert round(_params(ours) / 1e6, 2) == mparams


@pytest.mark.parametrize("index", sorted(PAPER_PARAMS))
def test_paper_variant_parameter_count(index):
    with torch.device("meta"):
        model = timm.create_model(f"visionzoo_halonet_h{index}")
    assert abs(_params(model) / 1e6 - PAPER_PARAMS[index]) / PAPER_PARAMS[index] < 0.02


def test_value_ratio_widens_values_only():
    # H5's rv = 2.5: values 2.5x the bottleneck width, queries and keys the bottleneck width
    with torch.device("meta"):
        model = timm.create_model("visionzoo_halonet_h5")
    attn = model.stages[2][0].self_attn
    assert isinstance(attn, HaloAttention)
    assert attn.num_heads * attn.dim_head_qk == 256
    assert attn.num_heads * attn.dim_head_v == 640
    assert model.stages[2][0].conv3_1x1.conv.in_channels == 640


def test_tiny_value_ratio_variant_trains():
    torch.manual_seed(0)
    model = HaloNet(_paper_variant(4, 1, 2.5, 1.0, 1), img_size=64, num_classes=5, width_factor=0.25)
    out = model(_image(64, batch=2))
    out.square().mean().backward()
    assert out.shape == (2, 5)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_input_size_rule():
    with torch.device("meta"):
        model = timm.create_model("visionzoo_halonet26t")
        small = timm.create_model("visionzoo_halonet26t", img_size=64)
    assert model.input_multiple == 256  # blocks of 8 on the 1/32 map
    with pytest.raises(ValueError, match=r"224x224 input .* multiples of 256"):
        model(torch.zeros(1, 3, 224, 224, device="meta"))
    with pytest.raises(ValueError, match=r"256x320 input"):
        model.forward_intermediates(torch.zeros(1, 3, 256, 320, device="meta"))
    # built for 64 px: stage 3 blocks of 4 (4x4 map), stage 4 blocks of 2
    blocks = [m.block_size for m in small.modules() if isinstance(m, HaloAttention)]
    assert blocks == [4, 2, 2] and small.input_multiple == 64


@pytest.mark.parametrize("name", ["visionzoo_halonet26t", "visionzoo_sehalonet33ts"])
def test_dense_layout_takes_any_size_and_returns_the_four_stages(name):
    """``pad_to_block`` + ``stem_feature=False``: on whole blocks the classification model's stage
    outputs (the last before the final conv: SE-HaloNet-33TS widens it 1536 -> 1280); any other
    size runs, at ceil(side / stride); features_only and pruning take the same four taps."""
    overlay = dict(self_attn_kwargs=dict(block_size=2, halo_size=1), width_factor=0.25)
    torch.manual_seed(0)
    strict = timm.create_model(name, **overlay).eval()
    dense = timm.create_model(name, pad_to_block=True, stem_feature=False, **overlay).eval()
    dense.load_state_dict(strict.state_dict())
    channels = [64, 128, 256, 512 if name == "visionzoo_halonet26t" else 384]
    assert [(f["module"], f["reduction"], f["num_chs"]) for f in dense.feature_info] == [
        (f"stages.{i}", 4 * 2**i, c) for i, c in enumerate(channels)]
    image = _image(64)
    with torch.no_grad():
        torch.testing.assert_close(dense(image), strict(image))
        expected = strict.forward_intermediates(image, intermediates_only=True, exclude_final_conv=True)[1:]
        for got, want in zip(dense.forward_intermediates(image, intermediates_only=True), expected):
            torch.testing.assert_close(got, want)
        with pytest.raises(ValueError, match="50x70 input"):
            strict(torch.randn(1, 3, 50, 70))
        features = dense.forward_intermediates(torch.randn(1, 3, 50, 70), indices=[1, 3], intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in features] == [(channels[1], 7, 9), (channels[3], 2, 3)]
    extractor = timm.create_model(name, features_only=True, pad_to_block=True, stem_feature=False, **overlay)
    assert [tuple(f.shape[1:]) for f in extractor(torch.randn(1, 3, 50, 70))] == [
        (c, -(-50 // s), -(-70 // s)) for c, s in zip(channels, (4, 8, 16, 32))]
    assert dense.prune_intermediate_layers([0, 1, 2]) == [0, 1, 2]
    assert len(dense.stages) == 3 and isinstance(dense.final_conv, torch.nn.Identity) and dense.num_features == 256
