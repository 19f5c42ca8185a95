"""Shifted blocked windows (Swin's shifted window attention) and the relative position bias of
blocked windows: the reference against Swin's roll + mask formulation and an independent cell
enumeration, every implementation against the reference (forward, backward, fp64 gradcheck), bad input.
"""
import importlib.util
import os

import pytest
import torch

from tests.kernels.tester import check_against_reference
from visionzoo.kernels import make_params, neighborhood_attention, resolve_backend

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON = importlib.util.find_spec("triton") is not None and (INTERPRETING or torch.cuda.is_available())
PATHS = ["cpu:window", "torch:tiles", "cpu", "torch"] + (["triton"] if TRITON else [])

# (spatial, kernel_size (= stride), shift, heads, head_dim)
CASES = [
    ((13,), 4, 1, 2, 4),  # 1D, size not divisible by the window
    ((12,), 4, 2, 1, 8),  # 1D, window // 2
    ((14, 14), 7, 3, 2, 8),  # Swin: window 7, shift 3, divisible
    ((9, 11), (3, 4), (1, 2), 2, 4),  # odd sizes, not divisible, shift window // 2 on one axis
    ((8, 10), (4, 5), (2, 0), 1, 4),  # shifted along one axis only
    ((7, 9), 3, 0, 2, 4),  # shift 0: blocked windows, the last one moved inward (GNA)
    ((12, 8), 4, 0, 2, 4),  # shift 0, divisible: disjoint blocks
    ((4, 6, 5), (2, 3, 5), (1, 1, 2), 1, 4),  # 3D
]


def _ids(case):
    spatial, kernel, shift, *_ = case
    return f"{'x'.join(map(str, spatial))}-k{kernel}-sh{shift}".replace(" ", "")


def _cases_with_rpb():
    return [pytest.param(case, rpb, id=_ids(case) + ("-rpb" if rpb else "")) for case in CASES for rpb in (False, True)]


def _tuple(value, num_dims):
    return (value,) * num_dims if isinstance(value, int) else tuple(value)


def _inputs(spatial, heads, head_dim, dtype, kernel=None, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, *spatial, heads, head_dim)
    tensors = [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for _ in range(3)]
    if kernel is not None:
        rpb_shape = (heads, *(2 * k - 1 for k in kernel))
        tensors.append(torch.randn(rpb_shape, generator=generator, dtype=dtype).requires_grad_())
    return tensors


def _cells(length, kernel, shift):
    """Cell of every position: the grid has boundaries at 0, shift, shift + kernel, ... and length."""
    bounds = sorted({0, length} | set(range(shift, length, kernel)))
    cell = torch.empty(length, dtype=torch.long)
    for index, (first, last) in enumerate(zip(bounds, bounds[1:])):
        cell[first:last] = index
    return cell


def _cell_attention(query, key, value, kernel, shift, rpb=None):
    """Dense attention where a query sees the keys of its cell in every dimension (float64)."""
    batch, *spatial, heads, head_dim = query.shape
    grids = torch.meshgrid(*(torch.arange(n) for n in spatial), indexing="ij")
    coords = torch.stack([g.flatten() for g in grids], -1)  # [N, dims]
    same = torch.ones(coords.shape[0], coords.shape[0], dtype=torch.bool)
    for dim, length in enumerate(spatial):
        cell = _cells(length, kernel[dim], shift[dim])[coords[:, dim]]
        same &= cell[:, None] == cell[None, :]
    q, k, v = (t.reshape(batch, -1, heads, head_dim).double() for t in (query, key, value))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
    if rpb is not None:
        offsets = coords[None, :, :] - coords[:, None, :] + torch.tensor(kernel) - 1  # key - query
        offsets = offsets.clamp(min=0)
        for dim in range(len(spatial)):
            offsets[..., dim] = offsets[..., dim].clamp(max=2 * kernel[dim] - 2)
        logits = logits + rpb.double()[(slice(None), *offsets.unbind(-1))][None]
    attn = logits.masked_fill(~same, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(query.shape)


@pytest.mark.parametrize("case, with_rpb", _cases_with_rpb())
def test_reference_matches_cell_enumeration(case, with_rpb):
    spatial, kernel, shift, heads, head_dim = case
    kernel, shift = _tuple(kernel, len(spatial)), _tuple(shift, len(spatial))
    if any(length % k for length, k in zip(spatial, kernel)) and not any(shift):
        pytest.skip("shift 0 on sizes not divisible by the window: GNA's windows, tested in test_na.py")
    q, k, v, *rest = _inputs(spatial, heads, head_dim, torch.float64, kernel if with_rpb else None, batch=1)
    rpb = rest[0] if with_rpb else None
    out = neighborhood_attention(q, k, v, kernel, kernel, rpb=rpb, shift=shift, backend="reference")
    torch.testing.assert_close(out, _cell_attention(q, k, v, kernel, shift, rpb), rtol=1e-10, atol=1e-10)


def _swin_window_attention(x_q, x_k, x_v, window, shift, table):
    """Swin's formulation (as timm and the official code compute it), ``[B, H, W, heads, D]``:
    roll by -shift, cut windows, add the bias of the query-minus-key ``table [(2h-1)(2w-1), heads]``
    and -100 between tokens from different regions of the rolled map, softmax, undo."""
    batch, height, width, heads, head_dim = x_q.shape
    (wh, ww), (sh, sw) = window, shift
    region = torch.zeros(height, width)
    count = 0
    for rows in (slice(0, -wh), slice(-wh, -sh if sh else None), slice(-sh if sh else height, None)):
        for cols in (slice(0, -ww), slice(-ww, -sw if sw else None), slice(-sw if sw else width, None)):
            region[rows, cols] = count
            count += 1

    def windows(t):  # [b, H, W, ...] -> [b * nW, wh * ww, ...]
        t = t.reshape(t.shape[0], height // wh, wh, width // ww, ww, *t.shape[3:]).transpose(2, 3)
        return t.reshape(-1, wh * ww, *t.shape[5:])

    q, k, v = (windows(torch.roll(t, (-sh, -sw), (1, 2))).transpose(1, 2) for t in (x_q, x_k, x_v))
    ids = windows(region[None])  # [nW, N]
    mask = torch.where(ids[:, :, None] == ids[:, None, :], 0.0, -100.0).repeat(batch, 1, 1)
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    relative = coords[:, :, None] - coords[:, None, :]  # query minus key
    index = (relative[0] + wh - 1) * (2 * ww - 1) + relative[1] + ww - 1
    bias = table[index.flatten()].reshape(wh * ww, wh * ww, heads).permute(2, 0, 1)
    logits = q @ k.transpose(-1, -2) * head_dim**-0.5 + bias + mask[:, None].double()
    out = (logits.softmax(-1) @ v).transpose(1, 2)  # [B * nW, N, heads, D]
    out = out.reshape(batch, height // wh, width // ww, wh, ww, heads, head_dim).transpose(2, 3)
    return torch.roll(out.reshape(batch, height, width, heads, head_dim), (sh, sw), (1, 2))


@pytest.mark.parametrize("spatial, window, shift", [((14, 14), (7, 7), (3, 3)), ((12, 8), (4, 4), (2, 1)),
                                                    ((9, 8), (3, 4), (1, 0)), ((8, 8), (4, 4), (0, 0))])
def test_reference_is_swin_roll_and_mask(spatial, window, shift):
    heads = 2
    q, k, v = _inputs(spatial, heads, 8, torch.float64, batch=2)
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads, dtype=torch.float64)
    # the op's bias is indexed by key minus query: Swin's table mirrored
    rpb = table.t().reshape(heads, 2 * window[0] - 1, 2 * window[1] - 1).flip(1, 2)
    expected = _swin_window_attention(q, k, v, window, shift, table)
    out = neighborhood_attention(q, k, v, window, window, rpb=rpb, shift=shift, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case, with_rpb", _cases_with_rpb())
def test_paths_match_reference_fp32(case, with_rpb, path):
    spatial, kernel, shift, heads, head_dim = case
    if path == "triton" and INTERPRETING and len(spatial) == 2 and spatial[0] * spatial[1] > 100:
        pytest.skip("the Triton interpreter is slow: small shapes only")
    kernel = _tuple(kernel, len(spatial))
    tensors = _inputs(spatial, heads, head_dim, torch.float32, kernel if with_rpb else None)
    if path == "triton" and not INTERPRETING:  # compiled kernels: CUDA tensors
        tensors = [t.detach().cuda().requires_grad_() for t in tensors]
    q, k, v, *rest = tensors
    check_against_reference(path, q, k, v, kernel, kernel, rpb=rest[0] if with_rpb else None, shift=shift,
                            tolerance=1e-4)


# small: gradcheck perturbs every input element; the Triton kernels take no float64 (fp32 above)
GRADCHECK_CASES = [((7,), 3, 1), ((5, 7), (3, 4), (1, 2)), ((2, 3, 4), (2, 3, 4), (1, 1, 2))]


@pytest.mark.parametrize("path", ["cpu:window", "torch:tiles"])
@pytest.mark.parametrize("spatial, kernel, shift", GRADCHECK_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_paths_gradcheck_fp64(spatial, kernel, shift, path):
    kernel = _tuple(kernel, len(spatial))
    inputs = _inputs(spatial, 1, 2, torch.float64, kernel, batch=1)

    def fn(q, k, v, rpb):
        return neighborhood_attention(q, k, v, kernel, kernel, rpb=rpb, shift=shift, backend=path)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_shifted_windows_run_the_window_kernels_not_the_block_ones():
    shifted = make_params(2, 7, 7, shift=3)
    assert resolve_backend("cpu", torch.device("cpu"), (14, 14), shifted) == "cpu:window"
    assert resolve_backend("torch", torch.device("cpu"), (14, 14), shifted) == "torch:tiles"
    assert resolve_backend("torch", torch.device("cpu"), (14, 14), make_params(2, 7, 7)) == "torch:blocks"
    with pytest.raises(ValueError, match="disjoint blocks"):
        resolve_backend("torch:blocks", torch.device("cpu"), (14, 14), shifted)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel_size=4, stride=4, shift=4), r"0 <= shift < kernel_size.*shift \(4, 4\), kernel_size \(4, 4\)"),
    (dict(kernel_size=4, stride=4, shift=(0, -1)), r"0 <= shift < kernel_size"),
    (dict(kernel_size=4, stride=1, shift=2), r"stride == kernel_size.*shift \(2, 2\), kernel_size \(4, 4\), "
                                             r"stride \(1, 1\)"),
    (dict(kernel_size=4, stride=4, dilation=2, shift=2), r"dilation 1"),
    (dict(kernel_size=4, stride=4, is_causal=True, shift=2), r"causal"),
    (dict(kernel_size=(4, 10), stride=(4, 10), shift=(2, 5)), r"dimension 1 has size 8 but kernel_size 10"),
])
def test_bad_shift_is_a_value_error_naming_the_sizes(kwargs, message):
    q = torch.randn(1, 8, 8, 1, 4)
    with pytest.raises(ValueError, match=message):
        neighborhood_attention(q, q, q, **kwargs)


def test_rpb_with_stride_between_one_and_the_window_is_refused():
    q = torch.randn(1, 8, 8, 1, 4)
    with pytest.raises(ValueError, match=r"stride 1 .* or stride == kernel_size"):
        neighborhood_attention(q, q, q, 4, 2, rpb=torch.zeros(1, 7, 7))

