"""The block implementations: windows that are disjoint blocks run as dense attention per block,
through the C++ block kernel ("cpu:blocks") or batched torch matmuls ("torch:blocks")."""
import itertools

import pytest
import torch

from tests.kernels.brute_force import window_1d
from tests.kernels.test_na import _inputs as random_inputs
from tests.kernels.tester import check_against_reference
from visionzoo.kernels import blocked, make_params, native, neighborhood_attention, ops, resolve_backend
from visionzoo.kernels.indexing import disjoint_blocks
from visionzoo.kernels.reference import neighborhood_attention_reference

CPU = torch.device("cpu")
# the two block implementations: the C++ kernel (CPU) and batched torch matmuls (any device)
IMPLEMENTATIONS = ["cpu:blocks", "torch:blocks"]

# (spatial, kernel_size, stride, dilation, heads, head_dim); all are disjoint blocks
CASES = [
    ((14, 14), 7, 1, 2, 2, 32),  # DiNAT: the window spans the whole dilation group
    ((7, 7), 7, 1, 1, 3, 16),  # NAT's last stage: one window covers the input
    ((12, 8), 4, 4, (1, 2), 2, 24),  # blocked (Swin window) attention, dilated on one axis
    ((21, 10), (7, 5), (7, 1), (1, 2), 1, 3),  # blocked on one axis, whole groups on the other
    ((21,), 7, 1, 3, 2, 64),  # 1D
    ((4, 6, 9), (2, 3, 3), (2, 3, 1), (1, 1, 3), 2, 8),  # 3D, mixed
    ((3, 10, 10), (3, 5, 5), (1, 5, 5), 1, 1, 32),  # 75 keys per block: more than one vector of keys
]


def _ids(case):
    spatial, kernel, stride, dilation, *_ = case
    return f"{'x'.join(map(str, spatial))}-k{kernel}-s{stride}-d{dilation}".replace(" ", "")


def _inputs(spatial, heads, head_dim, dtype, batch=2):
    return random_inputs(spatial, heads, head_dim, dtype, batch=batch, requires_grad=True)


def _rpb(params, heads, dtype):
    generator = torch.Generator().manual_seed(1)
    shape = (heads, *(2 * k - 1 for k in params.kernel_size))
    return torch.randn(shape, generator=generator, dtype=dtype).requires_grad_()


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
    if request.param.startswith("cpu"):
        request.getfixturevalue("native_kernel")
    return request.param


def test_disjoint_blocks_against_brute_force_windows():
    """Wherever disjoint_blocks says yes, the windows (enumerated independently) of the tokens of one
    block are all that block; wherever it says no, some two windows overlap without being equal."""
    for length, kernel, stride, dilation, causal in itertools.product(
        range(4, 17), range(2, 6), range(1, 6), range(1, 4), (False, True)
    ):
        if stride > kernel or kernel * dilation > length:
            continue
        params = make_params(1, kernel, stride, dilation, causal)
        windows = {frozenset(key for key, _ in window_1d(x, length, kernel, stride, dilation, causal))
                   for x in range(length)}
        partition = all(a == b or not (a & b) for a in windows for b in windows)
        expected = (len(windows) * kernel, len(windows)) if partition else None
        blocks = disjoint_blocks((length,), params)
        got = None if blocks is None else (length, blocks[0] * dilation)
        assert got == expected, (length, kernel, stride, dilation, causal)


def test_disjoint_blocks_needs_every_dimension():
    assert disjoint_blocks((14, 14), make_params(2, 7, 1, 2)) == (1, 1)
    assert disjoint_blocks((56, 56), make_params(2, 7, 7, 1)) == (8, 8)
    assert disjoint_blocks((14, 15), make_params(2, 7, 1, 2)) is None
    assert disjoint_blocks((14, 14), make_params(2, 7, 1, (2, 1))) is None
    assert disjoint_blocks((14, 14), make_params(2, 7, 1, 2, (False, True))) is None


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_blocked_matches_reference_fp32(case, implementation):
    spatial, kernel, stride, dilation, heads, head_dim = case
    params = make_params(len(spatial), kernel, stride, dilation)
    q, k, v = _inputs(spatial, heads, head_dim, torch.float32)
    rpb = _rpb(params, heads, torch.float32) if all(s == 1 for s in params.stride) else None
    check_against_reference(implementation, q, k, v, kernel, stride, dilation, rpb=rpb, tolerance=2e-5,
                            grad_tolerance=1e-4)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=_ids)
def test_blocked_gradcheck_fp64(case, implementation):
    spatial, kernel, stride, dilation, heads, _ = case
    params = make_params(len(spatial), kernel, stride, dilation)
    q, k, v = _inputs(spatial, heads, 3, torch.float64, batch=1)
    with_rpb = all(s == 1 for s in params.stride)
    inputs = [q, k, v] + ([_rpb(params, heads, torch.float64)] if with_rpb else [])

    def fn(*args):
        return neighborhood_attention(args[0], args[1], args[2], kernel, stride, dilation,
                                      rpb=args[3] if with_rpb else None, backend=implementation)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_blocked_gradcheck_fp64_with_kept_probabilities(implementation):
    """Blocks of 4 tokens at head dim 4: the forward keeps the probabilities and the backward uses them."""
    params = make_params(2, 2, 2)
    q, k, v = _inputs((8, 6), 2, 4, torch.float64, batch=1)
    assert blocked.probabilities_numel(q.shape, params) > 0

    def fn(*args):
        return neighborhood_attention(*args, 2, 2, backend=implementation)

    assert torch.autograd.gradcheck(fn, [q, k, v], eps=1e-6, atol=1e-6)


def test_blocked_bf16_close_to_reference(implementation):
    q, k, v = _inputs((14, 14), 2, 16, torch.float32)
    params = make_params(2, 7, 1, 2)
    expected = neighborhood_attention_reference(q, k, v, params, 0.25)
    inputs = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out = neighborhood_attention(*inputs, 7, dilation=2, backend=implementation)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)
    out.float().sum().backward()
    expected.sum().backward()
    for got, want in zip(inputs, (q, k, v)):
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=5e-2, atol=5e-2)


def test_cpu_picks_blocked_only_for_disjoint_blocks(native_kernel):
    assert resolve_backend("cpu", CPU, (14, 14), make_params(2, 7, 1, 2)) == "cpu:blocks"
    assert resolve_backend("cpu", CPU, (56, 56), make_params(2, 7, 7)) == "cpu:blocks"
    assert resolve_backend("cpu", CPU, (56, 56), make_params(2, 7)) == "cpu:window"
    assert resolve_backend("reference", CPU, (14, 14), make_params(2, 7, 1, 2)) == "reference"


def test_blocked_refuses_windows_that_overlap(implementation):
    q = torch.randn(1, 9, 9, 1, 4)
    with pytest.raises(ValueError, match="disjoint blocks.*spatial \\[9, 9\\]"):
        neighborhood_attention(q, q, q, 3, backend=implementation)
    with pytest.raises(ValueError, match="disjoint blocks"):
        neighborhood_attention(q[:, :7, :7], q[:, :7, :7], q[:, :7, :7], 7, is_causal=True, backend=implementation)


def test_custom_op_passes_opcheck_on_blocked(implementation):
    q, k, v = _inputs((14, 7), 2, 4, torch.float32)
    rpb = torch.randn(2, 13, 13, requires_grad=True)
    torch.library.opcheck(
        torch.ops.visionzoo.na_forward.default,
        (q, k, v, rpb, [7, 7], [1, 1], [2, 1], [False, False], 0.5, implementation),
    )


@pytest.mark.parametrize("save", [False, True])
def test_custom_op_passes_opcheck_on_blocked_saving_probabilities(implementation, save):
    q, k, v = _inputs((6, 8), 2, 4, torch.float32)  # 2x2 blocks: 4 tokens, kept at head dim 4
    rpb = torch.randn(2, 3, 3, requires_grad=True)
    args = (q, k, v, rpb, [2, 2], [1, 1], [3, 4], [False, False], 0.5, implementation, save)
    assert ops.na_forward(*args)[2].numel() == (blocked.probabilities_numel(q.shape, make_params(2, 2)) if save else 0)
    torch.library.opcheck(torch.ops.visionzoo.na_forward.default, args)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]], ids=_ids)
def test_blocked_backward_from_saved_probabilities_matches_recomputed(case, implementation):
    """The backward reads the probabilities a training forward saved, or recomputes them from the lse
    when the forward saved none: both give the same gradients."""
    spatial, kernel, stride, dilation, heads, head_dim = case
    params = make_params(len(spatial), kernel, stride, dilation)
    q, k, v = (t.detach() for t in _inputs(spatial, heads, head_dim, torch.float32))
    rpb = _rpb(params, heads, torch.float32).detach() if all(s == 1 for s in params.stride) else None
    config = ([*params.kernel_size], [*params.stride], [*params.dilation], [*params.is_causal], 0.3, implementation)
    check_saved_probabilities(q, k, v, rpb, config, blocked.probabilities_numel(q.shape, params))


def check_saved_probabilities(q, k, v, rpb, config, numel):
    """The custom ops with and without kept probabilities (``numel`` of them, > 0): the same output,
    and the same gradients from the backward that reads them as from the one that recomputes them.
    Returns the kept probabilities."""
    out, lse, saved = ops.na_forward(q, k, v, rpb, *config, True)
    out_plain, _, nothing = ops.na_forward(q, k, v, rpb, *config, False)
    assert saved.numel() == numel > 0
    assert nothing.numel() == 0
    torch.testing.assert_close(out, out_plain, rtol=0, atol=0)
    grad = torch.randn_like(out)
    from_saved = ops.na_backward(grad, q, k, v, out, lse, saved, rpb, *config)
    recomputed = ops.na_backward(grad, q, k, v, out, lse, nothing, rpb, *config)
    for name, got, want in zip(["dq", "dk", "dv", "drpb"], from_saved, recomputed):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    return saved


def test_blocked_saves_probabilities_only_for_a_backward(implementation, monkeypatch):
    calls = []
    name = "cpu_forward" if implementation == "cpu:blocks" else "torch_forward"
    forward = getattr(blocked, name)

    def spy(*args):
        calls.append(args[-1])
        return forward(*args)

    monkeypatch.setattr(blocked, name, spy)
    q, k, v = _inputs((14, 14), 2, 8, torch.float32)
    neighborhood_attention(q, k, v, 7, dilation=2, backend=implementation).sum().backward()
    with torch.no_grad():
        neighborhood_attention(q, k, v, 7, dilation=2, backend=implementation)
    neighborhood_attention(q.detach(), k.detach(), v.detach(), 7, dilation=2, backend=implementation)
    assert calls == [True, False, False]
    assert q.grad is not None


@pytest.mark.parametrize("head_dim", [16, 24])
def test_blocked_kernel_rows_of_one_head_among_several(head_dim, native_kernel):
    """A task of the native kernel gathers one head's rows out of tokens that hold several heads, into
    scratch rows padded to whole vectors when head_dim is not a whole number of them (24)."""
    params = make_params(2, 7, 1, 2)
    q, k, v = _inputs((14, 14), 3, head_dim, torch.float32, batch=8)
    rpb = _rpb(params, 3, torch.float32)
    check_against_reference("cpu:blocks", q, k, v, 7, dilation=2, scale=0.3, rpb=rpb, tolerance=2e-5,
                            grad_tolerance=1e-4)


def test_blocked_keeps_probabilities_only_for_small_blocks(implementation):
    """Up to 2 x head_dim tokens per block the probabilities take at most twice the query's memory and
    are kept; larger blocks recompute them."""
    assert native.keeps_probabilities((2, 14, 14, 2, 32), make_params(2, 7, 1, 2))  # 49 <= 64
    assert not native.keeps_probabilities((2, 14, 14, 2, 16), make_params(2, 7, 1, 2))  # 49 > 32
    q, k, v = (t.detach() for t in _inputs((3, 10, 10), 1, 32, torch.float32))  # 75-token blocks
    config = ([3, 5, 5], [1, 5, 5], [1, 1, 1], [False] * 3, 0.3, implementation)
    out, lse, saved = ops.na_forward(q, k, v, None, *config, True)
    assert saved.numel() == 0
    grad = torch.randn_like(out)
    d_query, d_key, d_value, _ = ops.na_backward(grad, q, k, v, out, lse, saved, None, *config)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    expected = neighborhood_attention_reference(qr, kr, vr, make_params(3, (3, 5, 5), (1, 5, 5)), 0.3)
    for got, want in zip((d_query, d_key, d_value), torch.autograd.grad(expected, [qr, kr, vr], grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
