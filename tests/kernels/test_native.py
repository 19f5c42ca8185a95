"""The native C++ CPU kernel: vector head dims, tile shapes, threading, build cache, and how "cpu"
dispatches."""
import math

import pytest
import torch

from tests.kernels.test_blocked import check_saved_probabilities
from tests.kernels.tester import check_against_reference
from visionzoo.kernels import (
    block_sparse_attention,
    build,
    make_params,
    na2d,
    native,
    neighborhood_mask,
    ops,
    resolve_backend,
)
from visionzoo.kernels.dispatch import can_run

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("native_kernel")


def _inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("head_dim", [16, 24, 32, 64, 128])
def test_head_dims_against_reference(head_dim, dtype):
    """Head dims that fill whole vectors, and ones padded to them (24), with an odd size,
    non-dividing dilation, a causal axis and rpb, forward and backward."""
    q, k, v = _inputs((2, 11, 9, 2, head_dim), dtype)
    rpb = torch.randn(2, 5, 7, dtype=dtype, requires_grad=True)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    check_against_reference("cpu:window", q, k, v, (3, 4), dilation=(3, 2), is_causal=(False, True), rpb=rpb,
                            tolerance=tolerance, grad_tolerance=tolerance * 10)


def test_more_keys_than_one_vector_and_3d_stride():
    """A 3D window of 75 keys (several vector groups of scores, a partial last one) with stride."""
    q, k, v = _inputs((1, 6, 9, 10, 2, 32), torch.float32)
    check_against_reference("cpu:window", q, k, v, (3, 5, 5), stride=(1, 2, 3), scale=0.2, tolerance=2e-5,
                            grad_tolerance=1e-4)


@pytest.mark.parametrize("spatial, tile", [
    ((13, 11), (1, 4, 4)), ((13, 11), (1, 1, 16)), ((13, 11), (1, 16, 1)), ((13, 11), (1, 2, 8)),
    ((13, 11), (1, 1, 1)), ((13, 11), (1, 3, 5)),
    ((5, 6, 7), (2, 2, 4)), ((5, 6, 7), (4, 4, 1)), ((5, 6, 7), (1, 1, 3)), ((5, 6, 7), (8, 1, 2)),
])
def test_window_kernel_is_exact_for_any_tile_shape(spatial, tile, monkeypatch):
    """The window kernel's result does not depend on the tile shape it runs: full and partial tiles,
    tiles longer than a dilation group, one query per tile, tiles that leave lanes idle; over dilation
    groups of unequal lengths, with a causal axis, and rpb (2D) or stride (3D), forward and
    backward."""
    monkeypatch.setattr(native, "_tile_shape", lambda *args: torch.tensor(tile))
    if len(spatial) == 2:
        kernel, stride, dilation, causal = (5, 3), (2, 1), (2, 3), (False, True)
    else:
        kernel, stride, dilation, causal = (3, 3, 5), (1, 2, 1), (1, 2, 1), (True, False, False)
    # float64 (8 lanes) where the tile fits its vectors, so that any pair masked wrongly shows
    dtype = torch.float64 if math.prod(tile) <= 8 else torch.float32
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    q, k, v = _inputs((2, *spatial, 2, 8), dtype)
    rpb = None  # rpb is defined for stride 1 only: the 2D case drops the stride instead
    if len(spatial) == 2:
        stride = 1
        rpb = torch.randn(2, *(2 * n - 1 for n in kernel), dtype=dtype, requires_grad=True)
    check_against_reference("cpu:window", q, k, v, kernel, stride, dilation, causal, scale=0.3, rpb=rpb,
                            tolerance=tolerance, grad_tolerance=tolerance * 10)


def test_window_kernel_on_an_input_too_large_for_whole_group_panels():
    """Past 4 MiB of panel arrays per thread the backward takes panels of one row of tiles, whose key
    halos overlap, and adds their gradients up: 130x130 in float64 (two groups of 130x65 keys, 4.3 MB),
    against the tiled path."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 130, 130, 1, 16, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    rpb = torch.randn(1, 5, 5, dtype=torch.float64, requires_grad=True)
    results = []
    for backend in ("cpu:window", "torch:tiles"):
        out = na2d(q, k, v, 3, dilation=(1, 2), rpb=rpb, backend=backend)
        results.append([out, *torch.autograd.grad(out, [q, k, v, rpb], out.detach() + 0.1)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spatial, kernel, stride, dilation, causal, rpb", [
    ((9, 11), (3, 5), (1, 1), (2, 1), (False, True), True),
    ((5, 6, 7), (3, 3, 3), (1, 2, 1), (1, 2, 1), (True, False, False), False),
    ((23,), (7,), (1,), (3,), (False,), True),
])
def test_window_backward_from_saved_probabilities_matches_recomputed(spatial, kernel, stride, dilation, causal, rpb):
    """A training forward of the window kernel keeps the probabilities of every attended pair (packed,
    B x heads x pairs); the backward reads them, or recomputes them from the lse when the forward kept
    none: the same gradients either way."""
    params = make_params(len(spatial), kernel, stride, dilation, causal)
    q, k, v = (t.detach() for t in _inputs((2, *spatial, 2, 16), torch.float32))
    bias = torch.randn(2, *(2 * n - 1 for n in kernel)) if rpb else None
    config = (list(kernel), list(stride), list(dilation), list(causal), 0.3, "cpu:window")
    saved = check_saved_probabilities(q, k, v, bias, config, native.probabilities_numel(q.shape, params))
    pairs = 2 * 2 * int(neighborhood_mask(spatial, params).sum())  # B x heads x attended pairs
    assert saved.numel() == 2 * 2 * math.prod(spatial) * math.prod(kernel) >= pairs
    # packed at the front, every (b, h) after the one before: each query's probabilities sum to 1
    assert bool((saved[:pairs] > 0).all())
    torch.testing.assert_close(saved[:pairs].sum(), torch.tensor(2.0 * 2 * math.prod(spatial)), rtol=1e-4, atol=0)


def test_window_gradcheck_fp64_with_kept_probabilities():
    """3x2 windows at head dim 4 (6 keys <= 2 x 4): the forward keeps the probabilities, the backward
    reads them; with rpb, dilation and a causal axis."""
    params = make_params(2, (3, 2), 1, (1, 2), (True, False))
    q, k, v = _inputs((1, 5, 6, 2, 4), torch.float64)
    rpb = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert native.probabilities_numel(q.shape, params) > 0

    def fn(*args):
        return na2d(args[0], args[1], args[2], (3, 2), dilation=(1, 2), is_causal=(True, False), rpb=args[3],
                    backend="cpu:window")

    assert torch.autograd.gradcheck(fn, [q, k, v, rpb], eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("save", [False, True])
def test_custom_op_passes_opcheck_on_native(save):
    q, k, v = _inputs((2, 6, 7, 2, 8), torch.float32)
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    args = (q, k, v, rpb, [3, 3], [1, 1], [2, 1], [False, True], 0.5, "cpu:window", save)
    params = make_params(2, 3, 1, (2, 1), (False, True))
    assert ops.na_forward(*args)[2].numel() == (native.probabilities_numel(q.shape, params) if save else 0)
    torch.library.opcheck(torch.ops.visionzoo.na_forward.default, args)


def test_window_kernel_keeps_probabilities_only_for_small_windows():
    """Up to 2 x head_dim keys per window the probabilities take at most twice the query's memory and
    are kept (NAT / DiNAT: 7x7 at head dim 32); larger windows recompute them."""
    assert native.keeps_probabilities((2, 56, 56, 2, 32), make_params(2, 7))  # 49 <= 64
    assert not native.keeps_probabilities((2, 56, 56, 2, 16), make_params(2, 7))  # 49 > 32
    q, k, v = (t.detach() for t in _inputs((1, 9, 9, 1, 16), torch.float32))
    out, lse, saved = ops.na_forward(q, k, v, None, [7, 7], [1, 1], [1, 1], [False, False], 0.25, "cpu:window", True)
    assert saved.numel() == 0


def test_tile_shape_choice():
    """The window kernel's tiles: the shape of at most one vector of queries with the least GEMM work
    over tile x halo (4x4 queries and 10x10 keys for 7x7 windows); never taller than a dimension
    needs."""
    assert native._tile_shape((56, 56), make_params(2, 7, 1, 1, False), 16).tolist() == [1, 4, 4]
    assert native._tile_shape((100,), make_params(1, 7, 1, 1, False), 16).tolist() == [1, 1, 16]
    assert native._tile_shape((56, 56), make_params(2, 7, 1, 1, False), 8).tolist() == [1, 2, 4]
    for spatial, kernel in (((3, 40), 3), ((8, 16, 16), (3, 5, 5)), ((1, 9), (1, 3))):
        tile = native._tile_shape(spatial, make_params(len(spatial), kernel, 1, 1, False), 16).tolist()
        assert math.prod(tile) <= 16
        padded = [1] * (3 - len(spatial)) + list(spatial)
        assert all(t == 1 or t // 2 < n for t, n in zip(tile, padded))


@pytest.mark.parametrize("backend, batch, spatial", [("cpu:window", 3, (15, 17)), ("cpu:blocks", 1, (14, 14)),
                                                    ("cpu:blocks", 8, (14, 14))])
def test_results_do_not_depend_on_the_thread_count(backend, batch, spatial):
    """Both native kernels: the window kernel splits work by (batch, head); the block kernel sums the
    rpb gradient in fixed chunks of tasks whose heads per task do not depend on the thread count
    (batch 1: one head per task; batch 8: all three). Any thread count gives the same bits."""
    q, k, v = _inputs((batch, *spatial, 3, 32), torch.float32)
    rpb = torch.randn(3, 13, 13, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            out = na2d(q, k, v, 7, dilation=2, rpb=rpb, backend=backend)
            results.append([out, *torch.autograd.grad(out.square().sum(), [q, k, v, rpb])])
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)


def test_disabled_native_kernel_auto_falls_back_to_torch_and_cpu_says_why(monkeypatch):
    monkeypatch.setattr(build, "_libraries", {})
    monkeypatch.setattr(build, "_reasons", {})
    monkeypatch.setattr(build, "_selected", None)
    monkeypatch.setenv("VISIONZOO_NATIVE", "0")
    assert not native.available()
    assert "VISIONZOO_NATIVE=0" in native.unavailable_reason()
    assert resolve_backend("auto", CPU) == "torch:tiles"
    assert resolve_backend("auto", CPU, (14, 14), make_params(2, 7, 1, 2)) == "torch:blocks"
    assert can_run("cpu", CPU) == "cpu: the native kernel could not be built: disabled by VISIONZOO_NATIVE=0"
    for name in ("cpu", "native", "cpu:window", "cpu:blocks"):
        with pytest.raises(RuntimeError, match="cpu: the native kernel could not be built: .*VISIONZOO_NATIVE=0"):
            resolve_backend(name, CPU)
    assert resolve_backend("blocked", CPU, (14, 14), make_params(2, 7, 1, 2)) == "torch:blocks"  # as it always ran


def test_cpu_dispatch():
    assert resolve_backend("cpu", CPU) == "cpu:window"
    assert resolve_backend("auto", CPU) == "cpu:window"
    assert resolve_backend("tiled", CPU) == "torch:tiles"
    # the old names run what they ran: the window kernel, and the block kernel where windows are blocks
    assert resolve_backend("native", CPU, (14, 14), make_params(2, 7, 1, 2)) == "cpu:window"
    assert resolve_backend("blocked", CPU, (14, 14), make_params(2, 7, 1, 2)) == "cpu:blocks"
    assert resolve_backend("auto", torch.device("meta")) == "torch:tiles"
    with pytest.raises(RuntimeError, match="cpu: the C\\+\\+ kernels run on CPU tensors, got a tensor on meta"):
        resolve_backend("cpu", torch.device("meta"))


@pytest.mark.parametrize("backend", ["cpu", "native", "blocked"])
def test_block_sparse_on_cpu_backends_runs_tiled(backend):
    """No native or blocked block-sparse kernel: those names run it tiled."""
    q = torch.randn(1, 32, 2, 8, dtype=torch.float64)
    mask = torch.tensor([[True, False], [True, True]])
    torch.testing.assert_close(
        block_sparse_attention(q, q, q, mask, 16, backend=backend),
        block_sparse_attention(q, q, q, mask, 16, backend="reference"),
    )


def test_native_refuses_other_devices():
    with pytest.raises(RuntimeError, match="CPU tensors"):
        resolve_backend("native", torch.device("meta"))
