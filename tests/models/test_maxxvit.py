"""CoAtNet / MaxViT: logits equal timm's ``coatnet_*_224`` / ``maxvit_*_tf_224`` given the same weights,
parameter counts of the spec, attention on every kernel backend.

Full size at 224 for the smallest variant of each family; the larger variants by parameter count and
one reduced-depth model built from the same config on both sides (timm's ``depths=`` overlay and
``dataclasses.replace`` here), at a non-square size so that windows, grid dilation and the bias
orientation differ per axis.
"""
import pytest
import torch
import timm

import visionzoo  # noqa: F401  (registers the models)
from visionzoo.kernels import use_backend
from visionzoo.models.maxxvit import MaxxVit, PartitionAttention, checkpoint_filter_fn, model_cfgs

TOLERANCE = 1e-4  # max |a - b| / max |a|

# ours -> (timm's model, parameters in millions per the spec)
VARIANTS = {
    "visionzoo_coatnet_0": ("coatnet_0_224", 25.04),
    "visionzoo_coatnet_1": ("coatnet_1_224", 42.23),
    "visionzoo_coatnet_2": ("coatnet_2_224", 74.68),
    "visionzoo_coatnet_3": ("coatnet_3_224", 166.97),
    "visionzoo_maxvit_t": ("maxvit_tiny_tf_224", 30.92),
    "visionzoo_maxvit_s": ("maxvit_small_tf_224", 68.93),
    "visionzoo_maxvit_b": ("maxvit_base_tf_224", 119.47),
    "visionzoo_maxvit_l": ("maxvit_large_tf_224", 211.79),
}


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _relative_error(expected, actual):
    return ((expected - actual).abs().max() / expected.abs().max()).item()


def _image(height, width=None, batch=1):
    return torch.randn(batch, 3, height, width or height, generator=torch.Generator().manual_seed(1))


def _assert_same_logits(reference, model, image):
    """``model`` loaded with ``reference``'s (random) weights gives its logits."""
    reference.eval()
    model.load_state_dict(checkpoint_filter_fn(reference.state_dict(), model), strict=True)
    model.eval()
    with torch.no_grad():
        error = _relative_error(reference(image), model(image))
    assert error < TOLERANCE, error


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_count_equals_timm(name):
    timm_name, mparams = VARIANTS[name]
    with torch.device("meta"):
        ours, theirs = _params(timm.create_model(name)), _params(timm.create_model(timm_name))
    assert ours == theirs
    assert round(ours / 1e6, 2) == mparams


@pytest.mark.parametrize("name", ["visionzoo_coatnet_0", "visionzoo_maxvit_t"])
def test_logits_equal_timm_at_224(name):
    torch.manual_seed(0)
    reference = timm.create_model(VARIANTS[name][0])
    _assert_same_logits(reference, timm.create_model(name), _image(224))


@pytest.mark.parametrize("name", ["visionzoo_coatnet_3", "visionzoo_maxvit_l"])
def test_reduced_depth_logits_equal_timm_non_square(name):
    # (64, 96): windows and grid 2x3 (MaxViT), bias tables of 2x3 / 4x6 maps (CoAtNet)
    img_size, depths = (64, 96), (1, 1, 2, 1)
    torch.manual_seed(0)
    reference = timm.create_model(VARIANTS[name][0], img_size=img_size, depths=depths)
    model = timm.create_model(name, img_size=img_size, depths=depths)
    _assert_same_logits(reference, model, _image(*img_size, batch=2))


def test_config_overrides_are_checked():
    model = MaxxVit(model_cfgs["maxvit_t"], img_size=64, depths=(1, 1, 1, 1), transformer_dim_head=16)
    assert [len(stage.blocks) for stage in model.stages] == [1, 1, 1, 1]
    assert model.stages[0].blocks[0].attn_block.attn.num_heads == 64 // 16
    with pytest.raises(TypeError, match="depth"):
        MaxxVit(model_cfgs["maxvit_t"], depth=(1, 1, 1, 1))


def test_timm_state_dict_loads_through_pretrained_file(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("coatnet_0_224", img_size=64, depths=(1, 1, 1, 1)).eval()
    path = tmp_path / "coatnet.pth"
    torch.save(reference.state_dict(), path)
    model = timm.create_model(
        "visionzoo_coatnet_0", img_size=64, depths=(1, 1, 1, 1), pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
    ).eval()
    image = _image(64)
    with torch.no_grad():
        assert _relative_error(reference(image), model(image)) < TOLERANCE


@pytest.mark.parametrize("partition", ["block", "grid", "global"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_attention_backends_match_reference_forward_and_backward(partition, backend):
    cfg = model_cfgs["maxvit_t"].transformer_cfg
    height, width = 6, 9
    window = (height, width) if partition == "global" else (2, 3)
    torch.manual_seed(0)
    attn = PartitionAttention(64, 64, partition, window, cfg)
    x = torch.randn(2, height, width, 64, requires_grad=True)
    outputs, grads = [], []
    for name in ("reference", backend):
        with use_backend(name):
            out = attn(x)
        grad = torch.autograd.grad(out.square().sum(), [x, attn.rel_pos.relative_position_bias_table])
        outputs.append(out)
        grads.append(grad)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for actual, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def _partitioned_attention_reference(attn, x, partition):
    """Independent of the op: zero pad ``x [B, H, W, C]`` to whole windows, cut it into windows as
    timm's ``window_partition`` / ``grid_partition`` do, dense softmax attention with the key-minus-query
    bias table inside each window, put the windows back and crop."""
    batch, height, width, _ = x.shape
    win_h, win_w = attn.window_size
    padded = torch.nn.functional.pad(x, (0, 0, 0, -width % win_w, 0, -height % win_h))
    size_h, size_w = padded.shape[1:3]
    heads, dim_head = attn.num_heads, attn.dim_head
    qkv = attn.qkv(padded).view(batch, size_h, size_w, 3, heads, dim_head)
    if partition == "block":  # [B, H/wh, wh, W/ww, ww, ...]: tokens of a window are neighbours
        cut, order = (size_h // win_h, win_h, size_w // win_w, win_w), (0, 1, 3, 2, 4)
    else:  # [B, wh, H/wh, ww, W/ww, ...]: tokens of a window are H/wh apart
        cut, order = (win_h, size_h // win_h, win_w, size_w // win_w), (0, 2, 4, 1, 3)
    windows = qkv.view(batch, *cut, 3 * heads * dim_head).permute(*order, 5)
    windows = windows.reshape(-1, win_h * win_w, 3, heads, dim_head).permute(2, 0, 3, 1, 4)
    q, k, v = windows.unbind(0)  # [windows, heads, tokens, dim_head]
    rows, cols = torch.meshgrid(torch.arange(win_h), torch.arange(win_w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    table = attn.rel_pos.relative_position_bias_table  # [heads, 2h-1, 2w-1], key minus query
    bias = table[:, rows[None, :] - rows[:, None] + win_h - 1, cols[None, :] - cols[:, None] + win_w - 1]
    logits = q @ k.transpose(-1, -2) * dim_head ** -0.5 + bias
    out = (logits.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(batch, *[cut[i - 1] for i in order[1:]], -1)
    inverse = [order.index(i) for i in range(5)]
    out = out.permute(*inverse, 5).reshape(batch, size_h, size_w, -1)[:, :height, :width]
    return attn.proj(out)


@pytest.mark.parametrize("partition", ["block", "grid"])
@pytest.mark.parametrize("size", [(14, 21), (9, 17), (3, 5)])
def test_partition_attention_pads_maps_to_whole_windows(partition, size):
    """Maps not divisible by the 7x7 windows / grid (the dense layout) equal attention on the zero
    padded map, cropped; (14, 21) needs no padding, (3, 5) is smaller than one window."""
    cfg = model_cfgs["maxvit_t"].transformer_cfg
    torch.manual_seed(0)
    attn = PartitionAttention(64, 64, partition, (7, 7), cfg)
    x = torch.randn(2, *size, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _partitioned_attention_reference(attn, x, partition), rtol=1e-5, atol=1e-5)


def test_pad_to_window_takes_any_input_size_and_changes_nothing_where_maps_fit():
    torch.manual_seed(0)
    kwargs = dict(depths=(1, 1, 1, 1), embed_dim=(32, 32, 64, 64), stem_width=16, img_size=224)
    strict = timm.create_model("visionzoo_maxvit_t", **kwargs).eval()
    padded = timm.create_model("visionzoo_maxvit_t", pad_to_window=True, **kwargs).eval()
    padded.load_state_dict(strict.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(padded(_image(224, 448)), strict(_image(224, 448)))
        with pytest.raises(ValueError, match="input 100x140"):
            strict(_image(100, 140))
        features = padded.forward_intermediates(_image(100, 140), intermediates_only=True)
    assert [f.shape[-2:] for f in features] == [(25, 35), (13, 18), (7, 9), (4, 5)]


# a reduced CoAtNet-0 (the registered variant's block types, head-first qkv and query-minus-key tables)
COATNET_SMALL = dict(depths=(1, 1, 2, 1), embed_dim=(32, 32, 64, 64), stem_width=16)


def _coatnet_window_reference(attn, x):
    """Independent of the op and of ``RelPosBias``: zero pad ``x [B, H, W, C]`` to whole windows of
    ``attn.window_size``, dense softmax attention inside each window with Swin's bias lookup
    ``table[(qy - ky + h - 1) * (2w - 1) + qx - kx + w - 1]`` (CoAtNet's flat query-minus-key table),
    qkv channels ``[heads, (q, k, v), dim_head]``; windows put back, cropped, projected."""
    batch, height, width, _ = x.shape
    win_h, win_w = attn.window_size
    padded = torch.nn.functional.pad(x, (0, 0, 0, -width % win_w, 0, -height % win_h))
    size_h, size_w = padded.shape[1:3]
    heads, dim_head = attn.num_heads, attn.dim_head
    qkv = attn.qkv(padded).view(batch, size_h // win_h, win_h, size_w // win_w, win_w, heads, 3, dim_head)
    qkv = qkv.permute(6, 0, 1, 3, 5, 2, 4, 7).reshape(3, -1, heads, win_h * win_w, dim_head)
    q, k, v = qkv.unbind(0)  # [windows, heads, tokens, dim_head]
    rows, cols = torch.meshgrid(torch.arange(win_h), torch.arange(win_w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    index = (rows[:, None] - rows[None, :] + win_h - 1) * (2 * win_w - 1) + cols[:, None] - cols[None, :] + win_w - 1
    bias = attn.rel_pos.relative_position_bias_table[index].permute(2, 0, 1)  # [heads, query, key]
    out = ((q @ k.transpose(-1, -2)) * dim_head ** -0.5 + bias).softmax(-1) @ v
    out = out.view(batch, size_h // win_h, size_w // win_w, heads, win_h, win_w, dim_head)
    out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, size_h, size_w, -1)[:, :height, :width]
    return attn.proj(out)


@pytest.mark.parametrize("size", [(4, 4), (9, 6), (3, 13)])
def test_coatnet_dense_layout_runs_global_attention_in_padded_windows_of_the_trained_map(size):
    """Stage 3 of a CoAtNet built for 64 px has a 4x4 bias table: in the dense layout a 9x6 map is
    padded to 12x8 and cut into six 4x4 windows, each attending within itself with the table as
    trained; (4, 4) is the trained map (one window, the classification attention)."""
    torch.manual_seed(0)
    model = timm.create_model("visionzoo_coatnet_0", img_size=64, pad_to_window=True, **COATNET_SMALL)
    attn = model.stages[2].blocks[1].attn
    assert (attn.partition, attn.window_size, attn.rel_pos.layout) == ("global", (4, 4), "query_minus_key")
    with torch.no_grad():
        attn.rel_pos.relative_position_bias_table.normal_()  # a bias that shows a wrong offset
        x = torch.randn(2, *size, 64)
        torch.testing.assert_close(attn(x), _coatnet_window_reference(attn, x), rtol=1e-5, atol=1e-5)


def test_coatnet_dense_layout_takes_any_size_and_keeps_the_classification_model():
    torch.manual_seed(0)
    strict = timm.create_model("visionzoo_coatnet_0", **COATNET_SMALL).eval()
    padded = timm.create_model("visionzoo_coatnet_0", pad_to_window=True, **COATNET_SMALL).eval()
    padded.load_state_dict(strict.state_dict())  # classification weights load unchanged
    windows = [block.attn.window_size for stage in padded.stages[2:] for block in stage.blocks]
    assert windows == [(14, 14), (14, 14), (7, 7)]  # the stage maps at 224
    with torch.no_grad():
        torch.testing.assert_close(padded(_image(224)), strict(_image(224)))
        with pytest.raises(ValueError, match="input 100x140"):
            strict(_image(100, 140))
        # odd sizes: the stride-2 pools keep the last row / column as the convolutions do
        for (height, width), maps in (((100, 140), [(25, 35), (13, 18), (7, 9), (4, 5)]),
                                      ((97, 131), [(25, 33), (13, 17), (7, 9), (4, 5)]),
                                      ((480, 352), [(120, 88), (60, 44), (30, 22), (15, 11)])):
            features = padded.forward_intermediates(_image(height, width), intermediates_only=True)
            assert [tuple(f.shape[-2:]) for f in features] == maps
    extractor = timm.create_model("visionzoo_coatnet_0", features_only=True, pad_to_window=True, **COATNET_SMALL)
    extractor.model.load_state_dict(strict.state_dict(), strict=False)  # its pruned head has no weights
    with torch.no_grad():
        features = extractor.eval()(_image(97, 131))
        expected = padded.forward_intermediates(_image(97, 131), intermediates_only=True)
    assert [f.shape[1] for f in features] == [32, 32, 64, 64]
    for got, want in zip(features, expected):
        torch.testing.assert_close(got, want)
