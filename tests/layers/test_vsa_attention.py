"""Varied-size window attention: an independent reference of the official classification layer
(ViTAE-VSA ``vitaev2_vsa/vsa.py``, the sampling math of /work/shared/specs/window.md) written here
on NCHW tensors, with the official key layout (1x1-conv qkv / proj, the bias index buffer), its
window centres from ``linspace`` + average pooling, an explicit bilinear sampler and explicit
window attention; against it the layer's forward and backward on every op backend, an fp64
gradcheck, and the start as plain window attention."""
import pytest
import torch
import torch.nn.functional as F

from visionzoo.kernels import na2d, use_backend
from visionzoo.layers import VSAWindowAttention, WindowAttention, vsa_sampling_grid

BACKENDS = ["reference", "cpu", "torch"]


def official_state_dict(dim, num_heads, window, seed=0, regression_std=0.5, out_dim=None):
    """The official layer's parameters: random everything, the regressors included (so windows move)."""
    out_dim = out_dim or dim
    generator = torch.Generator().manual_seed(seed)
    wh, ww = window

    def randn(*shape, std=0.3):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * std)

    index_h, index_w = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    coords = torch.stack([index_h.flatten(), index_w.flatten()])
    relative = coords[:, :, None] - coords[:, None, :]  # query minus key
    index = (relative[0] + wh - 1) * (2 * ww - 1) + relative[1] + ww - 1
    return {
        "sampling_offsets.2.weight": randn(2 * num_heads, dim, 1, 1, std=regression_std),
        "sampling_offsets.2.bias": randn(2 * num_heads, std=regression_std),
        "sampling_scales.2.weight": randn(2 * num_heads, dim, 1, 1, std=regression_std),
        "sampling_scales.2.bias": randn(2 * num_heads, std=regression_std),
        "qkv.weight": randn(3 * out_dim, dim, 1, 1),
        "qkv.bias": randn(3 * out_dim),
        "proj.weight": randn(out_dim, out_dim, 1, 1),
        "proj.bias": randn(out_dim),
        "relative_position_bias_table": randn((2 * wh - 1) * (2 * ww - 1), num_heads),
        "relative_position_index": index,
    }


def bilinear(image, x, y):
    """``grid_sample(image, (x, y), bilinear, zeros, align_corners=True)`` written out: image
    ``[N, D, H, W]``, x / y ``[N, Ho, Wo]`` in [-1, 1] -> ``[N, D, Ho, Wo]``."""
    n, d, height, width = image.shape
    px, py = (x + 1) / 2 * (width - 1), (y + 1) / 2 * (height - 1)
    x0, y0 = px.floor(), py.floor()
    out = image.new_zeros(n, d, *x.shape[1:])
    batch = torch.arange(n)[:, None, None].expand_as(x)
    for corner_x, weight_x in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        for corner_y, weight_y in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            inside = (corner_x >= 0) & (corner_x < width) & (corner_y >= 0) & (corner_y < height)
            cx, cy = corner_x.clamp(0, width - 1).long(), corner_y.clamp(0, height - 1).long()
            values = image.permute(0, 2, 3, 1)[batch, cy, cx]  # [N, Ho, Wo, D]
            out = out + (values * (weight_x * weight_y * inside)[..., None]).permute(0, 3, 1, 2)
    return out


def reference_vsa(x, params, num_heads, window):
    """The official forward on ``x [B, H, W, C]`` (returns ``[B, H, W, out_dim]``), ``window`` the
    one in use."""
    batch, height, width, dim = x.shape
    out_dim = params["proj.bias"].shape[0]
    head_dim = out_dim // num_heads
    wh, ww = window
    pad_h, pad_w = (wh - height % wh) % wh, (ww - width % ww) % ww
    padded_h, padded_w = height + pad_h, width + pad_w
    num_h, num_w = padded_h // wh, padded_w // ww
    image = x.permute(0, 3, 1, 2)
    padded = F.pad(image, (0, pad_w, 0, pad_h))

    def regress(name):
        pooled = F.leaky_relu(F.avg_pool2d(padded, (wh, ww)), 0.01)
        out = torch.einsum("bchw,oc->bohw", pooled, params[f"{name}.2.weight"][:, :, 0, 0])
        return (out + params[f"{name}.2.bias"][:, None, None]).reshape(batch * num_heads, 2, num_h, num_w)

    offsets, scales = regress("sampling_offsets"), regress("sampling_scales")
    offsets = torch.stack([offsets[:, 0] / (width // ww), offsets[:, 1] / (height // wh)], 1)
    # window centres: average of linspace(-1, 1) over each window; per-token steps 2 / (size - 1)
    centre_x = torch.linspace(-1, 1, padded_w, dtype=x.dtype).reshape(num_w, ww).mean(1)
    centre_y = torch.linspace(-1, 1, padded_h, dtype=x.dtype).reshape(num_h, wh).mean(1)
    relative_x = torch.arange(ww, dtype=x.dtype) * 2 / (padded_w - 1)
    relative_y = torch.arange(wh, dtype=x.dtype) * 2 / (padded_h - 1)
    relative_x, relative_y = relative_x - relative_x.mean(), relative_y - relative_y.mean()
    cols, rows = torch.arange(padded_w), torch.arange(padded_h)
    i, r = (rows // wh)[:, None], (rows % wh)[:, None]  # [Hp, 1]
    j, c = (cols // ww)[None, :], (cols % ww)[None, :]  # [1, Wp]
    grid_x = centre_x[j] + relative_x[c] * (1 + scales[:, 0][:, i, j]) + offsets[:, 0][:, i, j]
    grid_y = centre_y[i] + relative_y[r] * (1 + scales[:, 1][:, i, j]) + offsets[:, 1][:, i, j]

    qkv = torch.einsum("bchw,oc->bohw", image, params["qkv.weight"][:, :, 0, 0]) + params["qkv.bias"][:, None, None]
    qkv = F.pad(qkv, (0, pad_w, 0, pad_h)).reshape(batch, 3, num_heads, head_dim, padded_h, padded_w)
    q, k, v = qkv.unbind(1)  # [B, heads, D, Hp, Wp]
    k = bilinear(k.reshape(batch * num_heads, head_dim, padded_h, padded_w), grid_x, grid_y)
    v = bilinear(v.reshape(batch * num_heads, head_dim, padded_h, padded_w), grid_x, grid_y)

    def windows(t):  # -> [B, nH, nW, heads, wh * ww, D]
        t = t.reshape(batch, num_heads, head_dim, num_h, wh, num_w, ww)
        return t.permute(0, 3, 5, 1, 4, 6, 2).reshape(batch, num_h, num_w, num_heads, wh * ww, head_dim)

    q, k, v = windows(q), windows(k), windows(v)
    bias = params["relative_position_bias_table"][params["relative_position_index"].reshape(-1)]
    bias = bias.reshape(wh * ww, wh * ww, num_heads).permute(2, 0, 1)
    attn = (q @ k.transpose(-1, -2) * (dim // num_heads) ** -0.5 + bias).softmax(-1)  # the input's width
    out = (attn @ v).reshape(batch, num_h, num_w, num_heads, wh, ww, head_dim)
    out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, padded_h, padded_w, out_dim)[:, :height, :width]
    return out @ params["proj.weight"][:, :, 0, 0].t() + params["proj.bias"]


def _layer(dim, num_heads, window_size, params=None, out_dim=None):
    layer = VSAWindowAttention(dim, num_heads, window_size=window_size, out_dim=out_dim).double()
    if params is not None:
        layer.load_state_dict(params, strict=True)
    return layer


def _input(batch, height, width, dim, seed=1):
    return torch.randn(batch, height, width, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def to_pair(window_size):
    return (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)


def window_index(full, window):
    """The official query-minus-key index of a ``window`` into the ``full`` window's table (its
    centre offsets when the window is fitted to a smaller map)."""
    (full_h, full_w), (wh, ww) = full, window
    index_h, index_w = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    coords = torch.stack([index_h.flatten(), index_w.flatten()])
    relative = coords[:, :, None] - coords[:, None, :]
    return (relative[0] + full_h - 1) * (2 * full_w - 1) + relative[1] + full_w - 1


# (map, window of the layer, window in use, out_dim): divisible, padded, non-square, smaller than
# the window, widening (ViTAEv2's reduction cells)
CASES = [((14, 14), 7, (7, 7), None), ((10, 13), 4, (4, 4), None), ((9, 8), (3, 5), (3, 5), None),
         ((5, 3), 7, (5, 3), None), ((8, 8), 4, (4, 4), 24)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size, window_size, window, out_dim", CASES, ids=lambda c: str(c))
def test_forward_and_backward_equal_the_official_reference(size, window_size, window, out_dim, backend):
    dim, num_heads = 16, 2
    params = official_state_dict(dim, num_heads, to_pair(window_size), out_dim=out_dim)
    layer = _layer(dim, num_heads, window_size, params, out_dim=out_dim)
    reference_params = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in params.items()}
    reference_params["relative_position_index"] = window_index(to_pair(window_size), window)
    x = _input(2, *size, dim).requires_grad_(True)
    x_reference = x.detach().clone().requires_grad_(True)
    with use_backend(backend):
        out = layer(x)
    expected = reference_vsa(x_reference, reference_params, num_heads, window)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

    grad = torch.randn_like(out)
    with use_backend(backend):
        out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_reference.grad, rtol=1e-9, atol=1e-10)
    for name, param in layer.named_parameters():
        expected_grad = reference_params[name].grad.reshape(param.shape)
        torch.testing.assert_close(param.grad, expected_grad, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_without_qkv_bias():
    params = official_state_dict(16, 2, (4, 4))
    layer = VSAWindowAttention(16, 2, window_size=4, qkv_bias=False).double()
    layer.load_state_dict({k: v for k, v in params.items() if k != "qkv.bias"}, strict=True)
    x = _input(2, 10, 13, 16)
    reference_params = dict(params, **{"qkv.bias": torch.zeros_like(params["qkv.bias"])})
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_vsa(x, reference_params, 2, (4, 4)), rtol=1e-10, atol=1e-10)


def test_gradcheck_fp64():
    dim, num_heads = 4, 2
    layer = _layer(dim, num_heads, 3, official_state_dict(dim, num_heads, (3, 3), seed=3, regression_std=0.3))
    x = _input(1, 5, 4, dim, seed=2).requires_grad_(True)  # padded to 6x6, 2x2 windows
    names = ["sampling_offsets.2.weight", "sampling_scales.2.bias", "relative_position_bias_table"]
    params = {name: layer.get_parameter(name).detach().clone().requires_grad_(True) for name in names}

    def forward(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    with use_backend("cpu"):
        assert torch.autograd.gradcheck(forward, (x, *params.values()), eps=1e-6, atol=1e-6)


def _window_attention_like(layer):
    reference = WindowAttention(layer.qkv.in_features, layer.num_heads, window_size=layer.window_size).double()
    for name in ("qkv", "proj"):
        getattr(reference, name).load_state_dict(getattr(layer, name).state_dict())
    with torch.no_grad():
        reference.relative_position_bias_table.copy_(layer.relative_position_bias_table)
    return reference


@pytest.mark.parametrize("size", [(14, 21), (7, 7), (5, 3)])  # divisible; one window; smaller than it
def test_new_layer_is_window_attention(size):
    torch.manual_seed(0)
    layer = VSAWindowAttention(16, 4, window_size=7).double()
    x = _input(2, *size, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _window_attention_like(layer)(x), rtol=1e-12, atol=1e-12)


def test_new_layer_on_a_padded_map_is_window_attention_on_the_same_qkv():
    # padded keys / values are zeros (qkv on the unpadded map), as in the official layer
    torch.manual_seed(0)
    layer = VSAWindowAttention(16, 4, window_size=4).double()
    x = _input(2, 10, 13, 16)
    with torch.no_grad():
        qkv = F.pad(layer.qkv(x), (0, 0, 0, 3, 0, 2)).reshape(2, 12, 16, 3, 4, 4)
        rpb = _window_attention_like(layer).rpb()
        expected = na2d(*qkv.unbind(3), kernel_size=4, stride=4, rpb=rpb, backend="reference")
        expected = layer.proj(expected[:, :10, :13].reshape(2, 10, 13, 16))
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_zero_regression_grid_is_the_token_grid():
    # at zero scale and offset every token samples itself: align_corners=True pixel coordinates
    zeros = torch.zeros(3, 2, 2, 4, dtype=torch.float64)
    grid = vsa_sampling_grid(zeros, zeros, (5, 3), (10, 12))
    expected_x = torch.arange(12, dtype=torch.float64) * 2 / 11 - 1
    expected_y = torch.arange(10, dtype=torch.float64) * 2 / 9 - 1
    torch.testing.assert_close(grid[..., 0], expected_x.expand(3, 10, 12), rtol=0, atol=1e-15)
    torch.testing.assert_close(grid[..., 1], expected_y[:, None].expand(3, 10, 12), rtol=0, atol=1e-15)


def test_half_precision_layer_still_samples_the_tokens():
    # a bfloat16 grid misses the tokens of a 56-wide map by up to a tenth of a pixel: the layer
    # samples in float32, so at init it stays window attention up to bfloat16 rounding
    torch.manual_seed(0)
    layer = VSAWindowAttention(8, 2, window_size=7)
    reference = _window_attention_like(layer.double()).float()
    layer.float()
    x = torch.randn(1, 56, 56, 8)
    with torch.no_grad():
        expected = reference(x)
        out = layer.bfloat16()(x.bfloat16()).float()
    error = ((out - expected).abs().max() / expected.abs().max()).item()
    assert error < 2e-2, error


def test_official_attention_weights_load_strictly():
    params = official_state_dict(16, 2, (7, 7))
    layer = VSAWindowAttention(16, 2, window_size=7)
    result = layer.load_state_dict({k: v.float() for k, v in params.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.qkv.weight, params["qkv.weight"][:, :, 0, 0].float())
    assert torch.equal(layer.sampling_scales[2].bias, params["sampling_scales.2.bias"].float())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VSAWindowAttention(10, 3)
    with pytest.raises(ValueError, match=r"out_dim \(20\)"):
        VSAWindowAttention(12, 3, out_dim=20)
    with pytest.raises(ValueError, match="attn_drop"):
        VSAWindowAttention(8, 2, attn_drop=0.1)
    with pytest.raises(ValueError, match="window_size"):
        VSAWindowAttention(8, 2, window_size=0)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        VSAWindowAttention(8, 2)(torch.randn(2, 49, 8))
