"""Triton kernels against the reference oracle, forward and backward.

On CPU these run under the Triton interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py),
which is 50-200x slower than eager torch: every shape here is small. Tests marked ``gpu`` need
CUDA and compiled kernels (``TRITON_INTERPRET=0``).
"""
import functools
import itertools
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from visionzoo.kernels import (  # noqa: E402
    block_sparse_attention,
    make_params,
    na1d,
    na2d,
    na3d,
    neighborhood_attention,
    ops,
    tiles,
    window_bounds,
)
from visionzoo.kernels import triton_na  # noqa: E402
from visionzoo.kernels.reference import neighborhood_attention_reference  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRETING and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cpu" if INTERPRETING else "cuda"
# NATTEN's tolerances against an fp32 reference (the spec's table), per output
TOLERANCES = {
    torch.float32: dict(out=1e-4, grad=1e-4),
    torch.float16: dict(out=1e-2, grad=1e-2),
    torch.bfloat16: dict(out=5e-2, grad=2e-2),  # 1e-2 in the table; bf16-rounded P and dS reach ~1.2e-2
}
gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU and TRITON_INTERPRET=0"
)


def _inputs(shape, dtype, rpb_kernel=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=generator) for _ in range(4)]
    q, k, v, grad = (t.to(DEVICE, dtype) for t in tensors)
    rpb = None
    if rpb_kernel is not None:
        rpb_shape = (shape[-2],) + tuple(2 * kernel - 1 for kernel in rpb_kernel)
        rpb = torch.randn(rpb_shape, generator=generator).to(DEVICE, dtype)
    return q, k, v, grad, rpb


def _run(fn, inputs, grad, backward):
    leaves = [t.detach().clone().requires_grad_(backward) if t is not None else None for t in inputs]
    out = fn(*leaves)
    if not backward:
        return out.detach(), []
    wrt = [t for t in leaves if t is not None]
    return out.detach(), list(torch.autograd.grad(out, wrt, grad))


def _assert_close(actual, expected, tol, what):
    # rpb gradients sum over every query: compare relative to their magnitude
    scale = max(1.0, expected.abs().max().item()) if what == "d_rpb" else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol * scale, rtol=tol,
                               msg=lambda message: f"{what}: {message}")


def check_na(fn, shape, dtype=torch.float32, backward=True, rpb=False, seed=0, **kwargs):
    """Compare ``fn(..., backend="triton")`` with ``backend="reference"``: output and gradients."""
    num_dims = len(shape) - 3
    kernel = kwargs["kernel_size"]
    kernel = (kernel,) * num_dims if isinstance(kernel, int) else kernel
    q, k, v, grad, bias = _inputs(shape, dtype, kernel if rpb else None, seed)
    results = {}
    for backend in ("reference", "triton"):
        call = functools.partial(fn, backend=backend, **kwargs)
        results[backend] = _run(lambda q, k, v, b: call(q, k, v, rpb=b), (q, k, v, bias), grad, backward)
    tol = TOLERANCES[dtype]
    (out_ref, grads_ref), (out, grads) = results["reference"], results["triton"]
    assert out.dtype == dtype and out.shape == q.shape
    _assert_close(out, out_ref, tol["out"], "out")
    for name, actual, expected in zip(("d_query", "d_key", "d_value", "d_rpb"), grads, grads_ref):
        assert actual.dtype == dtype
        _assert_close(actual, expected, tol["grad"], name)


@pytest.fixture
def small_tiles(monkeypatch):
    """16-token tiles, so that small problems still span several query and KV tiles."""
    monkeypatch.setattr(triton_na, "triton_tiles", functools.partial(tiles.triton_tiles, q_volume=16, kv_volume=16))


# ----------------------------------------------------------------------------------------------
# neighborhood attention
# ----------------------------------------------------------------------------------------------
def test_na1d_odd_kernel_rpb():
    check_na(na1d, (2, 19, 2, 16), kernel_size=5, rpb=True)


def test_na1d_many_tiles_dilation():
    # 150 tokens, dilation 2 (groups of 75): several 64-token tiles per group
    check_na(na1d, (1, 150, 1, 32), kernel_size=7, dilation=2)


def test_na1d_even_kernel_stride_causal():
    check_na(na1d, (1, 23, 2, 16), kernel_size=4, stride=2, is_causal=True)


def test_na2d_non_square_rpb():
    check_na(na2d, (1, 9, 11, 2, 16), kernel_size=(3, 5), rpb=True)


def test_na2d_even_kernel_dilation_stride_causal():
    # dilations 2 and 3 divide neither 9 nor 11
    check_na(na2d, (2, 9, 11, 1, 24), kernel_size=(4, 3), dilation=(2, 3), stride=(2, 1), is_causal=(False, True))


def test_na2d_blocked_window_attention():
    # stride == kernel: non-overlapping (Swin) windows, with a partial window at the border
    check_na(na2d, (1, 10, 8, 2, 16), kernel_size=(4, 4), stride=(4, 4))


def test_na2d_small_tiles(small_tiles):
    check_na(na2d, (1, 13, 14, 1, 16), kernel_size=(5, 3), dilation=(1, 2), rpb=True)


def test_na2d_small_tiles_stride_causal(small_tiles):
    check_na(na2d, (1, 12, 15, 1, 16), kernel_size=(5, 6), stride=(3, 2), is_causal=(True, False))


def test_na3d_stride_dilation_causal():
    check_na(na3d, (1, 5, 6, 7, 1, 16), kernel_size=(3, 2, 3), dilation=(1, 2, 2), stride=(1, 2, 3),
             is_causal=(True, False, False))


def test_na3d_rpb():
    check_na(na3d, (1, 4, 5, 6, 2, 16), kernel_size=(3, 3, 5), rpb=True)


def test_neighborhood_attention_fp16_rpb():
    check_na(neighborhood_attention, (1, 10, 12, 2, 32), dtype=torch.float16, kernel_size=(5, 7), dilation=(2, 1),
             rpb=True)


def test_na_bf16_forward():
    check_na(na2d, (1, 8, 9, 2, 32), dtype=torch.bfloat16, backward=False, kernel_size=3)


def test_na_head_dim_padding():
    # head_dim 40 runs in a 64-wide block with masked columns
    check_na(na1d, (1, 17, 1, 40), kernel_size=3)


def test_na_lse_matches_reference():
    q, k, v, _, rpb = _inputs((1, 7, 9, 2, 16), torch.float32, rpb_kernel=(3, 3))
    params = make_params(2, 3, dilation=(2, 1), is_causal=(False, True))
    out_ref, lse_ref = neighborhood_attention_reference(q, k, v, params, 0.3, rpb, return_lse=True)
    out, lse, _ = ops.na_forward(q, k, v, rpb, [3, 3], [1, 1], [2, 1], [False, True], 0.3, "triton")
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, lse_ref, atol=1e-4, rtol=1e-4)


def test_na_rejects_float64():
    q = torch.randn(1, 8, 1, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(NotImplementedError, match="float64"):
        na1d(q, q, q, kernel_size=3, backend="triton")


# ----------------------------------------------------------------------------------------------
# tiling analysis (pure Python)
# ----------------------------------------------------------------------------------------------
def test_inverse_window_matches_brute_force():
    for length, dilation in ((9, 1), (11, 2), (13, 3)):
        for kernel in range(1, length // dilation + 1):
            for stride, causal in itertools.product(range(1, kernel + 1), (False, True)):
                _, _, start, end = window_bounds(length, kernel, stride, dilation, causal)
                for group in range(dilation):
                    starts, ends = start[group::dilation].tolist(), end[group::dilation].tolist()
                    group_length = len(starts)
                    for first, last in itertools.combinations_with_replacement(range(group_length), 2):
                        queries = [i for i in range(group_length) if starts[i] <= last and ends[i] > first]
                        lo, hi = tiles.inverse_window(first, last, group_length, kernel, stride, causal)
                        assert queries == list(range(lo, hi + 1)), (length, dilation, kernel, stride, causal,
                                                                    first, last)


def test_tiling_analysis_counts():
    params = make_params(2, 7)
    result = tiles.tiling_analysis((56, 56), params, q_tile=(8, 8), kv_tile=(8, 8))
    # the windows of an 8x8 tile span 14 keys per dimension: 2 x 2 unaligned 8x8 KV tiles
    assert result["kv_tiles_visited_max"] == 4
    assert result["kv_tiles_min"] == 1
    assert result["dense_kv_tiles"] == 49
    assert result["speed_of_light"] == pytest.approx(49 / 4)
    assert result["mask_bound"] == pytest.approx(1 / result["density"])
    assert 0 < result["tile_efficiency"] <= 1
    # dense attention: every query tile visits every KV tile, no speedup possible
    dense = tiles.tiling_analysis((16, 16), make_params(2, 16), q_tile=(8, 8), kv_tile=(8, 8))
    assert dense["kv_tiles_visited_max"] == dense["dense_kv_tiles"] == 4
    assert dense["speed_of_light"] == 1.0


def test_triton_tiles_volumes():
    for spatial, params in (((300,), make_params(1, 9)), ((20, 30), make_params(2, 7, dilation=2)),
                            ((8, 16, 16), make_params(3, (3, 7, 7)))):
        q_tile, kv_tile = tiles.triton_tiles(spatial, params)
        assert len(q_tile) == len(spatial)
        assert torch.tensor(q_tile).prod() == tiles.Q_TILE_VOLUME
        assert torch.tensor(kv_tile).prod() == tiles.KV_TILE_VOLUME


# ----------------------------------------------------------------------------------------------
# block-sparse attention
# ----------------------------------------------------------------------------------------------
def check_block_sparse(shape_q, num_kv, block_size, per_head, dtype=torch.float32, seed=0):
    batch, num_q, heads, head_dim = shape_q
    generator = torch.Generator().manual_seed(seed)
    q_block, kv_block = block_size
    num_q_blocks, num_kv_blocks = -(-num_q // q_block), -(-num_kv // kv_block)
    mask_shape = (heads, num_q_blocks, num_kv_blocks) if per_head else (num_q_blocks, num_kv_blocks)
    block_mask = torch.rand(mask_shape, generator=generator) < 0.5
    block_mask[..., 0, :] = False  # a query block that attends nothing
    block_mask[..., -1, -1] = True  # the partial corner block
    q = torch.randn(shape_q, generator=generator).to(DEVICE, dtype)
    k, v = (torch.randn(batch, num_kv, heads, head_dim, generator=generator).to(DEVICE, dtype) for _ in range(2))
    grad = torch.randn(shape_q, generator=generator).to(DEVICE, dtype)
    results = {}
    for backend in ("reference", "triton"):
        call = functools.partial(block_sparse_attention, block_mask=block_mask.to(DEVICE), block_size=block_size,
                                 backend=backend)
        results[backend] = _run(lambda q, k, v: call(q, k, v), (q, k, v), grad, True)
    tol = TOLERANCES[dtype]
    (out_ref, grads_ref), (out, grads) = results["reference"], results["triton"]
    _assert_close(out, out_ref, tol["out"], "out")
    for name, actual, expected in zip(("d_query", "d_key", "d_value"), grads, grads_ref):
        _assert_close(actual, expected, tol["grad"], name)
    # rows of the empty query block: zero output and lse = -inf
    lse = ops.block_sparse_forward(q, k, v, block_mask.to(DEVICE), q_block, kv_block, 0.25, "triton")[1]
    assert torch.isneginf(lse[:, :q_block]).all()
    assert torch.isfinite(lse[:, q_block:]).sum() > 0
    assert (out[:, :q_block] == 0).all()


def test_block_sparse_per_head_partial_blocks():
    check_block_sparse((2, 37, 2, 24), 45, (16, 8), per_head=True)


def test_block_sparse_shared_mask_large_blocks_fp16():
    # blocks of 70 and 49 tokens: several (or padded) kernel tiles per logical block
    check_block_sparse((1, 150, 2, 32), 110, (70, 49), per_head=False, dtype=torch.float16)


# ----------------------------------------------------------------------------------------------
# real GPU
# ----------------------------------------------------------------------------------------------
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_na2d_dinat_stage(dtype):
    check_na(na2d, (2, 28, 28, 4, 32), dtype=dtype, kernel_size=7, dilation=4, rpb=True)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_gpu_na3d_video(head_dim):
    check_na(na3d, (1, 8, 16, 16, 2, head_dim), dtype=torch.float16, kernel_size=(3, 7, 7),
             is_causal=(True, False, False))


@gpu
@pytest.mark.gpu
def test_gpu_block_sparse_bf16():
    check_block_sparse((2, 1000, 4, 64), 900, (128, 64), per_head=True, dtype=torch.bfloat16)
