"""Inputs at the edges, on every implementation: empty batches, zero queries or keys, head_dim 0,
argument types; and NaN / inf, which must reach exactly the outputs and gradients the reference
gives them."""
import pytest
import torch

from tests.kernels.test_na import _inputs
from visionzoo.kernels import block_sparse_attention, na1d, na2d, na3d

# every implementation of neighborhood attention on CPU tensors, and the public names
NEIGHBORHOOD = ["reference", "cpu", "torch", "cpu:window", "cpu:blocks", "torch:tiles", "torch:blocks"]
BLOCK_SPARSE = ["reference", "cpu", "torch"]


def _geometry(backend):
    """A window-kernel geometry, or for the block implementations one of disjoint blocks."""
    return ((14, 14), 7, 2) if backend.endswith("blocks") else ((9, 10), 3, 1)


@pytest.mark.parametrize("backend", NEIGHBORHOOD)
@pytest.mark.parametrize("empty", ["batch", "heads"])
def test_neighborhood_with_no_elements_gives_an_empty_result(backend, empty):
    spatial, kernel, dilation = _geometry(backend)
    shape = (0, *spatial, 2, 8) if empty == "batch" else (2, *spatial, 0, 8)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    rpb = torch.randn(shape[-2], 2 * kernel - 1, 2 * kernel - 1, requires_grad=True)
    out = na2d(q, k, v, kernel, dilation=dilation, rpb=rpb, backend=backend)
    assert out.shape == shape
    grads = torch.autograd.grad(out.sum(), [q, k, v, rpb])
    assert [g.shape for g in grads] == [q.shape] * 3 + [rpb.shape]
    assert all(not g.any() for g in grads)


@pytest.mark.parametrize("backend", BLOCK_SPARSE)
@pytest.mark.parametrize("batch, num_q, num_k", [(0, 32, 32), (2, 0, 32), (2, 32, 0), (2, 0, 0)])
def test_block_sparse_with_no_queries_keys_or_batch(backend, batch, num_q, num_k):
    """Batch 0 once killed the process in the fused CPU kernel (SIGFPE); zero queries or keys give an
    empty or zero output (rows that attend nothing) and zero gradients."""
    q = torch.randn(batch, num_q, 2, 8, requires_grad=True)
    k, v = (torch.randn(batch, num_k, 2, 8, requires_grad=True) for _ in range(2))
    mask = torch.ones(-(-num_q // 16), -(-num_k // 16), dtype=torch.bool)
    out = block_sparse_attention(q, k, v, mask, 16, backend=backend)
    assert out.shape == q.shape and not out.any()
    grads = torch.autograd.grad(out.sum(), [q, k, v], allow_unused=True)
    for grad, tensor in zip(grads, (q, k, v)):
        assert grad is None or (grad.shape == tensor.shape and not grad.any())


def test_head_dim_zero_is_refused():
    q = torch.randn(1, 8, 8, 2, 0)
    with pytest.raises(ValueError, match="head_dim .* must be >= 1, got 0"):
        na2d(q, q, q, 3)
    q = torch.randn(1, 32, 2, 0)
    with pytest.raises(ValueError, match="head_dim .* must be >= 1, got 0"):
        block_sparse_attention(q, q, q, torch.ones(2, 2, dtype=torch.bool), 16)


def test_block_mask_as_a_list():
    q = torch.randn(1, 32, 2, 8, dtype=torch.float64)
    layout = [[True, False], [True, True]]
    torch.testing.assert_close(block_sparse_attention(q, q, q, layout, 16),
                               block_sparse_attention(q, q, q, torch.tensor(layout), 16))
    with pytest.raises(TypeError, match="block_mask must be a bool tensor or a nested list of bools"):
        block_sparse_attention(q, q, q, [[True, False], [True]], 16)
    with pytest.raises(TypeError, match="block_mask must be a bool tensor, got str"):
        block_sparse_attention(q, q, q, "all", 16)


@pytest.mark.parametrize("argument, call", [
    ("is_causal", lambda q: na2d(q, q, q, 3, is_causal="yes")),
    ("kernel_size", lambda q: na2d(q, q, q, "33")),
    ("stride", lambda q: na2d(q, q, q, 3, stride="11")),
    ("dilation", lambda q: na2d(q, q, q, 3, dilation="12")),
    ("block_size", lambda q: block_sparse_attention(q[:, 0], q[:, 0], q[:, 0], torch.ones(1, 1, dtype=torch.bool),
                                                    "16")),
])
def test_a_string_for_a_tuple_argument_is_a_type_error(argument, call):
    with pytest.raises(TypeError, match=f"{argument} must be .* got the string"):
        call(torch.randn(1, 8, 8, 2, 4))


# ----------------------------------------------------------------------------------------------
# NaN and inf
# ----------------------------------------------------------------------------------------------
def _nan_masks(op, backend, inputs, where, value, scale, kernel, dilation, rpb):
    q, k, v = (t.detach().clone() for t in inputs)
    if where is not None:
        {"q": q, "k": k, "v": v}[where][(0, *(3,) * (q.dim() - 3), 1, 0)] = value
    leaves = [t.requires_grad_() for t in (q, k, v)]
    if rpb is not None:
        leaves.append(rpb.detach().clone().requires_grad_())
    out = op(*leaves[:3], kernel, dilation=dilation, scale=scale, rpb=leaves[3] if rpb is not None else None,
             backend=backend)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return [out.isnan()] + [g.isnan() for g in grads]


NAN_CASES = [("q", float("nan"), None), ("k", float("nan"), None), ("v", float("nan"), None),
             ("q", float("inf"), None), ("k", float("-inf"), None), (None, None, float("nan"))]


@pytest.mark.parametrize("backend", ["torch:tiles", "torch:blocks"])
@pytest.mark.parametrize("where, value, scale", NAN_CASES)
@pytest.mark.parametrize("num_dims", [1, 2, 3])
def test_nan_and_inf_reach_what_the_reference_says(backend, where, value, scale, num_dims):
    """A NaN or inf in q, k or v, or a NaN scale: NaN in exactly the outputs and gradients where the
    reference has them (the reference touches attended pairs only), never spread over a tile."""
    op, spatial = {1: (na1d, (21,)), 2: (na2d, (14, 14)), 3: (na3d, (6, 6, 6))}[num_dims]
    if backend == "torch:tiles":  # windows that overlap: tiles whose halos hold keys some queries do not attend
        kernel, dilation = (3, 2) if num_dims == 1 else (3, 1)
    else:  # disjoint blocks
        kernel, dilation = {1: (7, 3), 2: (7, 2), 3: (3, 2)}[num_dims]
    inputs = _inputs(spatial, 2, 8, torch.float64, batch=2)
    rpb = torch.randn(2, *(2 * kernel - 1,) * num_dims, dtype=torch.float64)
    expected = _nan_masks(op, "reference", inputs, where, value, scale, kernel, dilation, rpb)
    got = _nan_masks(op, backend, inputs, where, value, scale, kernel, dilation, rpb)
    assert expected[0].any()
    for name, mask, want in zip(["out", "dq", "dk", "dv", "drpb"], got, expected):
        assert torch.equal(mask, want), f"{name}: {int(mask.sum())} NaN, the reference has {int(want.sum())}"


def test_reference_nan_stays_in_the_windows_that_hold_it():
    """One NaN key reaches the outputs of the queries whose windows hold it and nothing else."""
    q, k, v = _inputs((16, 16), 2, 8, torch.float64)
    k[0, 5, 5, 0, 0] = float("nan")
    out = na2d(q, k, v, 3, backend="reference")
    assert int(out.isnan().any(-1).sum()) == 9  # the 3x3 queries around (5, 5), head 0, batch 0
    assert bool(out[0, 4:7, 4:7, 0].isnan().all())
