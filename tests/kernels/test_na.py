"""Neighborhood attention: reference vs brute force, the CPU implementations vs the reference, checks,
dispatch, compile."""
import pytest
import torch

from tests.kernels.brute_force import brute_force_na
from tests.kernels.tester import check_against_reference
from visionzoo.kernels import (
    attention_density,
    get_backend,
    make_params,
    na1d,
    na2d,
    na3d,
    neighborhood_attention,
    neighborhood_mask,
    use_backend,
)

OPS = {1: na1d, 2: na2d, 3: na3d}
# the implementations that run any neighborhood on CPU tensors (the block ones: test_blocked.py)
CPU_PATHS = ["cpu:window", "torch:tiles"]

# (spatial, kernel_size, stride, dilation, is_causal, heads, head_dim)
CASES = [
    ((11,), 3, 1, 1, False, 2, 4),
    ((13,), 4, 1, 3, False, 1, 3),  # even kernel, dilation that does not divide
    ((12,), 5, 2, 2, False, 2, 4),  # stride inside dilation groups
    ((10,), 4, 1, 1, True, 2, 4),  # causal, even kernel
    ((14,), 5, 3, 1, True, 1, 4),  # causal with stride
    ((9, 11), 3, 1, 1, False, 2, 4),
    ((7, 10), (3, 5), 1, (2, 1), False, 1, 4),  # non-square kernel, dilation on one axis
    ((8, 9), (4, 3), (2, 3), 1, False, 2, 3),  # even kernel, stride per dimension
    ((9, 9), 3, 3, 1, False, 1, 4),  # blocked (window) attention
    ((10, 7), (4, 3), 1, (1, 2), (True, False), 1, 4),  # causal on one dimension
    ((4, 5, 6), (3, 3, 5), 1, 1, False, 1, 4),
    ((5, 6, 4), (2, 3, 3), (1, 2, 1), (2, 1, 1), (True, False, False), 1, 3),
]


def _with_rpb_variants(cases):
    """Each case without rpb, and with rpb where it is defined (stride 1)."""
    return [pytest.param(case, False, id=_ids(case)) for case in cases] + [
        pytest.param(case, True, id=_ids(case) + "-rpb") for case in cases if case[2] == 1
    ]


def _ids(case):
    spatial, kernel, stride, dilation, causal, *_ = case
    return f"{'x'.join(map(str, spatial))}-k{kernel}-s{stride}-d{dilation}-c{causal}".replace(" ", "")


def _inputs(spatial, heads, head_dim, dtype, batch=2, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, *spatial, heads, head_dim)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def _rpb(kernel, num_dims, heads, dtype, seed=1):
    kernel = (kernel,) * num_dims if isinstance(kernel, int) else kernel
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((heads, *(2 * k - 1 for k in kernel)), generator=generator, dtype=dtype)


@pytest.mark.parametrize("case, with_rpb", _with_rpb_variants(CASES))
def test_reference_matches_brute_force(case, with_rpb):
    spatial, kernel, stride, dilation, causal, heads, head_dim = case
    q, k, v = _inputs(spatial, heads, head_dim, torch.float64, batch=1)
    rpb = _rpb(kernel, len(spatial), heads, torch.float64) if with_rpb else None
    params = make_params(len(spatial), kernel, stride, dilation, causal)
    expected = brute_force_na(q, k, v, params.kernel_size, params.stride, params.dilation, params.is_causal, rpb=rpb)
    out = OPS[len(spatial)](q, k, v, kernel, stride, dilation, causal, rpb=rpb, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_every_query_attends_kernel_size_keys(case):
    spatial, kernel, stride, dilation, causal, *_ = case
    params = make_params(len(spatial), kernel, stride, dilation, causal)
    counts = neighborhood_mask(spatial, params).sum(-1)
    if not any(params.is_causal):
        assert torch.all(counts == torch.tensor(params.kernel_size).prod())
    else:
        assert counts.min() >= 1 and counts.max() <= torch.tensor(params.kernel_size).prod()


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("case, with_rpb", _with_rpb_variants(CASES))
def test_cpu_matches_reference_fp32(case, with_rpb, path):
    spatial, kernel, stride, dilation, causal, heads, head_dim = case
    q, k, v = _inputs(spatial, heads, head_dim, torch.float32, requires_grad=True)
    rpb = _rpb(kernel, len(spatial), heads, torch.float32).requires_grad_() if with_rpb else None
    check_against_reference(path, q, k, v, kernel, stride, dilation, causal, rpb=rpb, tolerance=1e-4)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6], CASES[7], CASES[11]], ids=_ids)
def test_cpu_gradcheck_fp64(case, path):
    spatial, kernel, stride, dilation, causal, heads, head_dim = case
    op = OPS[len(spatial)]
    q, k, v = _inputs(spatial, heads, head_dim, torch.float64, batch=1, requires_grad=True)
    inputs = [q, k, v]
    rpb = None
    if all(s == 1 for s in make_params(len(spatial), kernel, stride, dilation, causal).stride):
        rpb = _rpb(kernel, len(spatial), heads, torch.float64).requires_grad_()
        inputs.append(rpb)

    def fn(*args):
        return op(args[0], args[1], args[2], kernel, stride, dilation, causal, rpb=args[3] if rpb is not None else None,
                  backend=path)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("case", [CASES[2], CASES[6], CASES[10]], ids=_ids)
def test_cpu_bf16_close_to_reference(case, path):
    spatial, kernel, stride, dilation, causal, heads, head_dim = case
    op = OPS[len(spatial)]
    q, k, v = _inputs(spatial, heads, 16, torch.float32)
    expected = op(q, k, v, kernel, stride, dilation, causal, backend="reference")
    inputs = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = op(*inputs, kernel, stride, dilation, causal, backend=path)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)
    out.float().sum().backward()
    reference_inputs = [t.detach().float().requires_grad_() for t in inputs]
    op(*reference_inputs, kernel, stride, dilation, causal, backend="reference").sum().backward()
    for got, want in zip(inputs, reference_inputs):
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_larger_nat_shape_fp32(path):
    """A NAT-like stage (odd size, dilation, rpb) at fp32 tolerance, forward and backward."""
    q, k, v = _inputs((23, 19), 3, 32, torch.float32, requires_grad=True)
    rpb = _rpb(7, 2, 3, torch.float32).requires_grad_()
    check_against_reference(path, q, k, v, 7, dilation=(3, 2), rpb=rpb, tolerance=1e-4, grad_tolerance=1e-3)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_blocked_attention_equals_window_attention(path):
    """stride == kernel == window: the op is Swin's (unshifted) window attention."""
    q, k, v = _inputs((8, 12), 2, 8, torch.float64)
    out = na2d(q, k, v, 4, stride=4, backend=path)
    windows = [t.reshape(2, 2, 4, 3, 4, 2, 8).permute(0, 1, 3, 5, 2, 4, 6).reshape(2, 6, 2, 16, 8) for t in (q, k, v)]
    expected = torch.softmax(windows[0] @ windows[1].transpose(-1, -2) * 8 ** -0.5, -1) @ windows[2]
    expected = expected.reshape(2, 2, 3, 2, 4, 4, 8).permute(0, 1, 4, 2, 5, 3, 6).reshape(out.shape)
    torch.testing.assert_close(out, expected)


def test_density():
    params = make_params(2, 7)
    assert attention_density((56, 56), params) == pytest.approx(49 / 56 ** 2)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda q: na2d(q, q, q, 9), "kernel_size \\* dilation"),
        (lambda q: na2d(q, q, q, 3, dilation=4), "dimension 0 has size 8"),
        (lambda q: na2d(q, q, q, 3, stride=4), "stride must not exceed kernel_size"),
        (lambda q: na2d(q, q, q, (3, 3, 3)), "kernel_size must have 2 entries"),
        (lambda q: na2d(q, q, q, 0), "kernel_size must be >= 1"),
        (lambda q: na2d(q, q[:, :4], q, 3), "same shape"),
        (lambda q: na2d(q, q.double(), q.double(), 3), "same dtype"),
        (lambda q: na1d(q, q, q, 3), "\\[B, L, heads, head_dim\\]"),
        (lambda q: na3d(q, q, q, 3), "6 dims"),
        (lambda q: na2d(q, q, q, 3, rpb=torch.zeros(2, 3, 3)), "rpb must have shape"),
        (lambda q: na2d(q, q, q, 3, stride=2, rpb=torch.zeros(2, 5, 5)),
         "defined for stride 1 \\(neighborhoods\\) or stride == kernel_size"),
        (lambda q: na2d(q.long(), q.long(), q.long(), 3), "floating point"),
        (lambda q: na2d(q, q, q, 3, backend="cuda-magic"), "unknown attention backend"),
        (lambda q: neighborhood_attention(q[0, 0, 0], q[0, 0, 0], q[0, 0, 0], 3), "1-3 spatial dims"),
    ],
)
def test_bad_input_raises_clear_error(call, message):
    q = torch.randn(1, 8, 8, 2, 4)
    with pytest.raises(ValueError, match=message):
        call(q)


def test_backend_selection():
    q = torch.randn(1, 9, 9, 1, 4)
    assert get_backend() == "auto"
    with use_backend("reference"):
        assert get_backend() == "reference"
        out_reference = na2d(q, q, q, 3)
    assert get_backend() == "auto"
    torch.testing.assert_close(na2d(q, q, q, 3), out_reference)


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("VISIONZOO_ATTN_BACKEND", "reference")
    assert get_backend() == "reference"
    monkeypatch.setenv("VISIONZOO_ATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_backend()


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    from visionzoo.kernels import dispatch

    if not dispatch.triton_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve_backend("triton", torch.device("cpu"))


def test_custom_op_compiles_without_graph_break():
    torch._dynamo.reset()
    rpb = torch.randn(2, 5, 5, requires_grad=True)

    def attention(q, k, v):
        return na2d(q, k, v, 3, dilation=2, rpb=rpb).square().sum()

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    q, k, v = _inputs((7, 9), 2, 8, torch.float32, requires_grad=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, [q, k, v, rpb])
    expected = torch.autograd.grad(attention(q, k, v), [q, k, v, rpb])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_custom_op_passes_opcheck(path):
    q, k, v = _inputs((6, 7), 2, 4, torch.float32, requires_grad=True)
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    torch.library.opcheck(
        torch.ops.visionzoo.na_forward.default,
        (q, k, v, rpb, [3, 3], [1, 1], [2, 1], [False, True], 0.5, path),
    )


def test_flop_counter_counts_the_custom_ops(native_kernel):
    from torch.utils.flop_counter import FlopCounterMode

    from visionzoo.kernels import block_sparse_attention

    for head_dim, backward_matmuls in ((4, 5), (8, 4)):  # native: 15 keys > 2 x 4, Q K^T recomputed; <= 2 x 8, kept
        q, k, v = _inputs((9, 10), 2, head_dim, torch.float32, requires_grad=True)
        window_matmul = 2 * 2 * 90 * 2 * head_dim * 15  # 2 FLOPs x B x tokens x heads x head_dim x window (3x5)
        with FlopCounterMode(display=False) as counter:
            na2d(q, k, v, (3, 5), backend="cpu").sum().backward()
        flops = counter.get_flop_counts()["Global"]
        assert flops[torch.ops.visionzoo.na_forward] == 2 * window_matmul
        assert flops[torch.ops.visionzoo.na_backward] == backward_matmuls * window_matmul

    q, k, v = _inputs((14, 14), 2, 32, torch.float32, requires_grad=True)
    window_matmul = 2 * 2 * 196 * 2 * 32 * 49
    with FlopCounterMode(display=False) as counter:  # blocked, 49 <= 2 x 32 tokens: the probabilities are kept
        na2d(q, k, v, 7, dilation=2, backend="cpu").sum().backward()
    flops = counter.get_flop_counts()["Global"]
    assert flops[torch.ops.visionzoo.na_forward] == 2 * window_matmul
    assert flops[torch.ops.visionzoo.na_backward] == 4 * window_matmul

    q = torch.randn(1, 32, 2, 8)
    mask = torch.tensor([[True, False], [True, True]])
    with FlopCounterMode(display=False) as counter:
        block_sparse_attention(q, q, q, mask, 16, backend="cpu")
    assert counter.get_total_flops() == 2 * (2 * 1 * 8 * 3 * 2 * 16 * 16)  # 3 kept tiles per head, 2 heads


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_window_keys_list_the_mask_with_the_dense_relative_index(case):
    """The reference's gathered windows: each query's valid slots are exactly its keys in the mask,
    each with the rpb index of the dense formulation."""
    from visionzoo.kernels.indexing import relative_index, window_keys

    spatial, kernel, stride, dilation, causal, *_ = case
    params = make_params(len(spatial), kernel, stride, dilation, causal)
    keys, valid, rel = window_keys(tuple(spatial), params)
    mask, dense_rel = neighborhood_mask(spatial, params), relative_index(spatial, params)
    for query in range(keys.shape[0]):
        attended = keys[query][valid[query]]
        assert sorted(attended.tolist()) == mask[query].nonzero().flatten().tolist()
        assert torch.equal(rel[query][valid[query]], dense_rel[query, attended])
