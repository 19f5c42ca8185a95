"""The selective scan: every path against the sequential reference, forward and backward, and the
reference against an independent per-element loop written here.

Paths: ``reference``, ``torch`` (chunked scan), ``cpu`` (C++ kernels, skipped when they cannot be
built) and ``triton`` (under ``TRITON_INTERPRET=1`` on CPU, set by tests/conftest.py; tiny shapes).
"""
import math
import os

import pytest
import torch

from visionzoo.kernels import build, selective_scan, use_backend
from visionzoo.kernels.dispatch import resolve_scan_backend

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
FAST_PATHS = ["torch", "cpu"]
PATHS = ["reference"] + FAST_PATHS
try:
    import triton  # noqa: F401

    TRITON = INTERPRETING or torch.cuda.is_available()
except ImportError:
    TRITON = False
needs_triton = pytest.mark.skipif(not TRITON, reason="needs triton with CUDA or TRITON_INTERPRET=1")
# the interpreter runs every program step by step in Python: tiny shapes for the triton path
TRITON_DEVICE = "cpu" if INTERPRETING else "cuda"


def _loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm's definition element by element in float64 Python scalars (no tensor ops):
    ``(out, last_state)`` as nested lists. B / C: ``[batch, d_state, L]``, ``[batch, groups, d_state, L]``
    or ``[dim, d_state]``."""
    batch, dim, length = u.shape
    d_state = A.shape[1]
    u, delta, A, B, C = (x.double().tolist() for x in (u, delta, A, B, C))

    def coefficient(M, b, d, n, l):
        if isinstance(M[0][0], float):  # [dim, d_state]
            return M[d][n]
        if isinstance(M[0][0][0], float):  # [batch, d_state, L]
            return M[b][n][l]
        groups = len(M[0])
        return M[b][d // (dim // groups)][n][l]

    out = [[[0.0] * length for _ in range(dim)] for _ in range(batch)]
    last = [[[0.0] * d_state for _ in range(dim)] for _ in range(batch)]
    for b in range(batch):
        for d in range(dim):
            x = [0.0] * d_state
            for l in range(length):
                dt = delta[b][d][l] + (float(delta_bias[d]) if delta_bias is not None else 0.0)
                if delta_softplus and dt <= 20:
                    dt = math.log1p(math.exp(dt))
                y = 0.0
                for n in range(d_state):
                    x[n] = math.exp(dt * A[d][n]) * x[n] + dt * u[b][d][l] * coefficient(B, b, d, n, l)
                    y += x[n] * coefficient(C, b, d, n, l)
                if D is not None:
                    y += float(D[d]) * u[b][d][l]
                if z is not None:
                    zz = float(z[b, d, l])
                    y *= zz / (1 + math.exp(-zz))
                out[b][d][l] = y
            last[b][d] = x
    return torch.tensor(out, dtype=torch.float64), torch.tensor(last, dtype=torch.float64)


def _inputs(batch, dim, length, d_state, groups=None, shared="grouped", D=True, z=True, delta_bias=True,
            dtype=torch.float32, seed=0, positive_delta=False):
    """Arguments as a dict; ``groups`` None means B / C ``[batch, d_state, L]``, ``shared="constant"``
    ``[dim, d_state]``. Values like MambaVision's: A = -exp(A_log) with A_log ~ log(1..d_state)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    if shared == "constant":
        bc_shape = (dim, d_state)
    elif groups is None:
        bc_shape = (batch, d_state, length)
    else:
        bc_shape = (batch, groups, d_state, length)
    delta = rand(batch, dim, length, scale=0.5)
    if positive_delta:
        delta = delta.abs()
    A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float64)).repeat(dim, 1)
    A_log = A_log + 0.1 * torch.randn(dim, d_state, generator=g, dtype=torch.float64)
    return dict(
        u=rand(batch, dim, length), delta=delta, A=(-torch.exp(A_log)).to(dtype), B=rand(*bc_shape),
        C=rand(*bc_shape), D=rand(dim) if D else None, z=rand(batch, dim, length) if z else None,
        delta_bias=rand(dim, scale=0.5) if delta_bias else None,
    )


def _tensors(args):
    return {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------------------------
# the reference against the independent loop
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups, shared", [(None, "grouped"), (2, "grouped"), (6, "grouped"), (None, "constant")])
@pytest.mark.parametrize("extras", [(False, False, False, False), (True, True, True, True), (True, False, True, False)])
def test_reference_matches_the_element_loop(groups, shared, extras):
    D, z, delta_bias, softplus = extras
    args = _inputs(2, 6, 7, 3, groups=groups, shared=shared, D=D, z=z, delta_bias=delta_bias, dtype=torch.float64)
    out, last = selective_scan(**args, delta_softplus=softplus, return_last_state=True, backend="reference")
    expected_out, expected_last = _loop_scan(**args, delta_softplus=softplus)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, expected_last, rtol=1e-12, atol=1e-12)


def test_softplus_is_linear_above_20_as_in_mamba_ssm():
    args = _inputs(1, 2, 3, 2, D=False, z=False, delta_bias=False, dtype=torch.float64)
    args["delta"] = torch.full_like(args["delta"], 25.0)
    args["A"] = torch.full_like(args["A"], -0.01)
    out = selective_scan(**args, delta_softplus=True, backend="reference")
    torch.testing.assert_close(out, _loop_scan(**args, delta_softplus=True)[0], rtol=1e-12, atol=1e-12)
    assert not torch.equal(out, selective_scan(**{**args, "delta": args["delta"] + 1e-3}, delta_softplus=True,
                                               backend="reference"))


def test_dtypes_follow_mamba_ssm():
    args = _inputs(1, 4, 5, 2, dtype=torch.bfloat16)
    out, last = selective_scan(**args, delta_softplus=True, return_last_state=True, backend="reference")
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32 and last.shape == (1, 4, 2)
    args64 = {k: v.double() if v is not None else None for k, v in args.items()}
    out64, last64 = selective_scan(**args64, delta_softplus=True, return_last_state=True, backend="reference")
    assert out64.dtype == last64.dtype == torch.float64
    torch.testing.assert_close(out.float(), out64.float(), rtol=2e-2, atol=2e-2)  # bf16 output rounding only


# ----------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------
def _bad(**changes):
    args = _inputs(2, 4, 5, 3, groups=2)
    args.update(changes)
    return args


@pytest.mark.parametrize("args, message", [
    (_bad(u=torch.randn(2, 4)), "u must have 3 dimensions"),
    (_bad(delta=torch.randn(2, 4, 6)), r"delta must have u's shape .*\(mismatched length"),
    (_bad(A=torch.randn(4, 3, dtype=torch.complex64)), "complex A"),
    (_bad(A=torch.randn(5, 3)), "A must be \\(dim, d_state\\) with dim 4"),
    (_bad(A=torch.randn(4, 3, 1)), "A must have 2 dimensions"),
    (_bad(B=torch.randn(2, 2, 3, 6)), "B has length 6, u has length 5"),
    (_bad(C=torch.randn(2, 3, 3, 5)), "groups of C \\(3\\) must divide dim \\(4\\)"),
    (_bad(B=torch.randn(2, 4, 5)), "B must be \\(batch, d_state, L\\)"),
    (_bad(C=torch.randn(2, 2, 2, 3, 5)), "C must have 2 or 3 or 4 dimensions"),
    (_bad(B=torch.randn(4, 4)), "2-D B is \\(dim, d_state\\)"),
    (_bad(D=torch.randn(5)), "D must be \\(dim,\\) = \\(4,\\)"),
    (_bad(D=torch.randn(4, 1)), "D must have 1 dimensions"),
    (_bad(delta_bias=torch.randn(3)), "delta_bias must be \\(dim,\\)"),
    (_bad(z=torch.randn(2, 4, 4)), "z must have u's shape"),
    (_bad(u=torch.ones(2, 4, 5, dtype=torch.long)), "u must be a floating-point tensor"),
    (_bad(B=torch.randn(2, 2, 3, 5, dtype=torch.complex64)), "complex B"),
])
def test_bad_input_names_the_problem(args, message):
    with pytest.raises(ValueError, match=message):
        selective_scan(**args)


def test_backend_names():
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        selective_scan(**_inputs(1, 2, 3, 2), backend="fast")
    meta = torch.device("meta")
    with pytest.raises(RuntimeError, match="backend='cpu' cannot run: cpu: the C\\+\\+ kernels run on CPU tensors"):
        resolve_scan_backend("cpu", meta)
    assert resolve_scan_backend("auto", meta) == "torch"
    assert resolve_scan_backend("tiled", meta) == "torch"
    assert resolve_scan_backend("reference", meta) == "reference"
    with use_backend("reference"):
        assert resolve_scan_backend(None, meta) == "reference"


# ----------------------------------------------------------------------------------------------
# every path against the reference
# ----------------------------------------------------------------------------------------------
TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 2e-2}


def _compare(path, args, delta_softplus=True, dtype_tolerance=None, last_state_grad=True):
    """Forward (out, last_state) and the gradients of every tensor input, ``path`` against the reference."""
    tolerance = dtype_tolerance or TOLERANCES[args["u"].dtype]
    results = []
    for backend in ("reference", path):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in _tensors(args).items()}
        out, last = selective_scan(**{**args, **leaves}, delta_softplus=delta_softplus, return_last_state=True,
                                   backend=backend)
        g = torch.Generator().manual_seed(1)
        loss = (out.float() * torch.randn(out.shape, generator=g).to(out.device)).sum()
        if last_state_grad:
            loss = loss + (last.float() * torch.randn(last.shape, generator=g).to(last.device)).sum()
        loss.backward()
        results.append((out, last, {k: v.grad for k, v in leaves.items()}))
    (out_ref, last_ref, grads_ref), (out, last, grads) = results
    assert out.dtype == out_ref.dtype and last.dtype == last_ref.dtype

    def close(name, actual, expected):
        scale = max(float(expected.detach().float().abs().max()), 1.0)
        torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance, atol=tolerance * scale,
                                   msg=lambda m: f"{path} {name}: {m}")

    close("out", out, out_ref)
    close("last_state", last, last_ref)
    for name in grads_ref:
        assert grads[name] is not None and grads[name].dtype == grads_ref[name].dtype, name
        close(f"grad {name}", grads[name], grads_ref[name])


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("length", [1, 7, 49, 196])
def test_paths_match_the_reference_at_odd_lengths(path, length):
    _compare(path, _inputs(2, 8, length, 4, groups=2, dtype=torch.float64))


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("groups, shared", [(None, "grouped"), (4, "grouped"), (None, "constant")])
@pytest.mark.parametrize("extras", [(False, False, False, False), (True, True, True, True), (True, False, False, True),
                                    (False, True, True, False)])
def test_paths_match_the_reference_with_and_without_options(path, groups, shared, extras):
    D, z, delta_bias, softplus = extras
    args = _inputs(2, 8, 13, 3, groups=groups, shared=shared, D=D, z=z, delta_bias=delta_bias, dtype=torch.float64,
                   positive_delta=not softplus)
    _compare(path, args, delta_softplus=softplus, last_state_grad=softplus)


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("dim, length", [(80, 196), (160, 49)])
def test_paths_match_the_reference_at_mambavision_shapes_fp32(path, dim, length):
    # MambaVision-T's stage 3 and 4 mixers (d_state 8, dt through softplus with its bias, D, no z)
    _compare(path, _inputs(2, dim, length, 8, z=False), last_state_grad=False)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_paths_take_bf16_inputs(path):
    _compare(path, _inputs(2, 16, 49, 8, dtype=torch.bfloat16), last_state_grad=False)


@pytest.mark.parametrize("path", PATHS + [pytest.param("triton", marks=needs_triton)])
def test_gradcheck_fp64(path):
    # the interpreter runs a kernel in ~0.1 s: a smaller problem and gradcheck's fast mode for triton
    triton_path = path == "triton"
    args = _inputs(1, 2 if triton_path else 4, 4 if triton_path else 6, 2, groups=2, dtype=torch.float64)
    names = list(_tensors(args))

    def run(*tensors):
        out, last = selective_scan(**{**args, **dict(zip(names, tensors))}, delta_softplus=True,
                                   return_last_state=True, backend=path)
        return out, last

    device = TRITON_DEVICE if triton_path else "cpu"
    args = {k: v.to(device) if v is not None else None for k, v in args.items()}
    inputs = tuple(args[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=triton_path)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_a_nan_reaches_what_depends_on_it(path):
    args = _inputs(2, 8, 13, 3, groups=2, dtype=torch.float64)
    args["u"][1, 5, 4] = float("nan")
    out, last = selective_scan(**args, delta_softplus=True, return_last_state=True, backend=path)
    expected_out, expected_last = selective_scan(**args, delta_softplus=True, return_last_state=True,
                                                 backend="reference")
    assert out.isnan().sum() == 9 and out[1, 5, 4:].isnan().all()  # that channel from that step on
    torch.testing.assert_close(out, expected_out, equal_nan=True)
    torch.testing.assert_close(last, expected_last, equal_nan=True)


@pytest.mark.parametrize("isa", build.executable_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_for_every_instruction_set(isa, dtype, native_kernel, monkeypatch):
    monkeypatch.setenv("VISIONZOO_NATIVE_ISA", isa)
    monkeypatch.setattr(build, "_selected", None)  # chosen again from the variable
    # 10 channels a group: a partial vector at every width (4, 8 or 16 float32 lanes; 2, 4 or 8 float64)
    _compare("cpu", _inputs(2, 20, 13, 5, groups=2, dtype=dtype))
    assert build.isa() == isa


def test_cpu_results_do_not_depend_on_the_thread_count(native_kernel):
    args = _inputs(3, 40, 21, 8, groups=2)
    leaves = {k: v.requires_grad_() for k, v in _tensors(args).items()}
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            out = selective_scan(**leaves, delta_softplus=True, backend="cpu")
            results.append((out, *torch.autograd.grad(out.square().sum(), list(leaves.values()))))
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)


@pytest.mark.parametrize("path", PATHS + [pytest.param("triton", marks=needs_triton)])
def test_empty_inputs(path):
    for batch, length in ((0, 5), (2, 0)):
        args = _inputs(batch, 4, length, 3)
        args = {k: v.to(TRITON_DEVICE if path == "triton" else "cpu") for k, v in args.items()}
        out, last = selective_scan(**args, return_last_state=True, backend=path)
        assert out.shape == (batch, 4, length) and last.shape == (batch, 4, 3)
        assert torch.count_nonzero(last) == 0


def _on(device, args):
    return {k: v.to(device) if v is not None else None for k, v in args.items()}


@needs_triton
@pytest.mark.parametrize("length, groups, shared, extras", [
    (1, 2, "grouped", (True, True, True, True)),
    (5, 2, "grouped", (True, True, True, True)),
    (5, None, "constant", (True, False, True, True)),
    (5, 8, "grouped", (False, True, False, False)),
])
def test_triton_matches_the_reference(length, groups, shared, extras):
    D, z, delta_bias, softplus = extras
    args = _inputs(2, 8, length, 3, groups=groups, shared=shared, D=D, z=z, delta_bias=delta_bias,
                   dtype=torch.float64, positive_delta=not softplus)
    _compare("triton", _on(TRITON_DEVICE, args), delta_softplus=softplus, last_state_grad=softplus)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fp32_and_bf16_at_a_mambavision_like_width(dtype):
    # more channels than one program's block (32): two blocks per group, the B / C sums across them
    _compare("triton", _on(TRITON_DEVICE, _inputs(1, 40, 9, 8, z=False, dtype=dtype)), last_state_grad=False)


def test_mamba_ssm_agrees_when_installed():
    interface = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    args = _inputs(2, 8, 17, 4, groups=2)
    expected = interface.selective_scan_ref(**args, delta_softplus=True, return_last_state=True)
    out, last = selective_scan(**args, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, expected[1], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# the custom ops
# ----------------------------------------------------------------------------------------------
def test_auto_runs_the_cpu_kernel_on_cpu(native_kernel):
    assert resolve_scan_backend("auto", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("path", ["cpu", pytest.param("triton", marks=needs_triton)])
def test_custom_op_compiles_without_graph_break(path):
    torch._dynamo.reset()
    args = _on(TRITON_DEVICE if path == "triton" else "cpu", _inputs(2, 8, 9, 4, z=False))
    leaves = {k: v.requires_grad_() for k, v in _tensors(args).items()}

    def mixer(u, delta, A, B, C, D, delta_bias):
        out, last = selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True,
                                   return_last_state=True, backend=path)
        return out.square().sum() + last.sum()

    compiled = torch.compile(mixer, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(**leaves), list(leaves.values()))
    expected = torch.autograd.grad(mixer(**leaves), list(leaves.values()))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("path", ["cpu", pytest.param("triton", marks=needs_triton)])
def test_custom_op_passes_opcheck(path):
    args = _on(TRITON_DEVICE if path == "triton" else "cpu", _inputs(2, 4, 5, 3, groups=2))
    tensors = [args[k].requires_grad_() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    torch.library.opcheck(torch.ops.visionzoo.selective_scan_forward.default, (*tensors, True, path))
