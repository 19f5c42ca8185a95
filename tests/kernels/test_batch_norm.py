"""Training-mode BatchNorm + residual + activation on the C++ kernel: against ATen's F.batch_norm (+ add,
+ ReLU), forward and backward, every channel count's period (vector multiples, odd counts, counts whose
period falls back to rows with a scalar tail), [N, C] batches, no affine parameters, a residual, several
threads, gradients of another layout, non-finite values, fp64 gradcheck, the custom op's checks, the
ATen fallback and its errors."""
import pytest
import torch
import torch.nn.functional as F

from visionzoo.kernels import batch_norm_act, batch_norm_act_supported, native

needs_native = pytest.mark.skipif(not native.available(), reason="C++ kernels not built")
CL = torch.channels_last


def _reference(x, weight, bias, eps, act, residual=None):
    y = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if residual is not None:
        y = y + residual
    return F.relu(y) if act == "relu" else y


def _case(shape, affine=True, residual=False, dtype=torch.float32, seed=0, offset=2.0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=dtype) * 3 + offset
    if x.dim() == 4:
        x = x.contiguous(memory_format=CL)
    channels = shape[1]
    weight = torch.randn(channels, generator=generator, dtype=dtype) if affine else None
    bias = torch.randn(channels, generator=generator, dtype=dtype) if affine else None
    res = torch.randn(shape, generator=generator, dtype=dtype).contiguous(memory_format=x_format(x)) if residual else None
    return x, weight, bias, res


def x_format(x):
    return CL if x.dim() == 4 else torch.contiguous_format


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _check(shape, act, affine=True, residual=False, rtol=2e-5, atol=2e-5, grad_layout=None):
    x, weight, bias, res = _case(shape, affine, residual)
    ours, theirs = _leaves(x, weight, bias, res), _leaves(x, weight, bias, res)
    assert batch_norm_act_supported(ours[0], ours[1], ours[2])
    out, mean, var = batch_norm_act(ours[0], ours[1], ours[2], 1e-5, act, residual=ours[3])
    expected = _reference(theirs[0], theirs[1], theirs[2], 1e-5, act, theirs[3])
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(mean, x.mean(dims), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, x.var(dims, correction=0), rtol=1e-5, atol=1e-5)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    if grad_layout is not None:
        grad = grad.contiguous(memory_format=grad_layout)
    if act == "relu":
        # the ReLU mask of our output on ATen's pre-activation: values within float rounding of 0 may
        # fall on either side (a handful in millions), and their gradient is all or nothing
        expected = _reference(theirs[0], theirs[1], theirs[2], 1e-5, "identity", theirs[3]) * (out > 0)
    inputs = [t for t in ours if t is not None]
    wanted = [t for t in theirs if t is not None]
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, wanted, grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return out


@needs_native
@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("channels", [1, 5, 16, 24, 37, 64, 1001])  # 1001: a period of one row + scalar tail
def test_matches_aten_every_channel_period(channels, act):
    _check((3, channels, 5, 7), act)


@needs_native
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_residual_no_affine_and_batches(act):
    _check((2, 24, 9, 11), act, residual=True)
    _check((4, 37, 3, 3), act, affine=False, residual=True)
    _check((9, 40), act)  # [N, C]: BatchNorm1d's layout
    _check((2, 48, 6, 5), act, grad_layout=torch.contiguous_format)  # gradient in NCHW memory


@needs_native
def test_several_threads_and_many_rows_equal_one_thread():
    shape = (4, 40, 40, 40)  # several row blocks per thread
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _check(shape, "relu", residual=True)
        torch.set_num_threads(3)
        three = _check(shape, "relu", residual=True)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, three, rtol=1e-6, atol=1e-6)


@needs_native
def test_large_output_on_huge_pages_is_correct():
    # 32 MiB outputs: the kernel advises huge pages before writing them
    _check((8, 64, 128, 128), "relu", residual=True, rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_gradcheck_float64(act):
    x, weight, bias, res = _case((3, 5, 4, 3), residual=True, dtype=torch.float64, offset=0.0)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias, res))
    assert torch.autograd.gradcheck(lambda *a: batch_norm_act(a[0], a[1], a[2], 1e-5, act, residual=a[3])[0], inputs)


@needs_native
def test_non_finite_values_propagate_as_in_aten():
    x, weight, bias, _ = _case((2, 16, 3, 3))
    x = x.clone()
    x[0, 3, 1, 1] = float("nan")
    x[1, 5, 0, 2] = float("inf")
    out = batch_norm_act(x, weight, bias, 1e-5, "relu")[0]
    torch.testing.assert_close(out, _reference(x, weight, bias, 1e-5, "relu"), equal_nan=True)


@needs_native
def test_custom_op_passes_opcheck():
    x, weight, bias, res = _case((2, 24, 4, 3), residual=True)
    args = (x.requires_grad_(), weight.requires_grad_(), bias, res, 1e-5, 1)
    torch.library.opcheck(torch.ops.visionzoo.batch_norm_act.default, args)


def test_other_layouts_and_dtypes_fall_back_to_aten():
    for x in (torch.randn(2, 6, 5, 4),  # NCHW memory
              torch.randn(2, 6, 5, 4, dtype=torch.bfloat16).contiguous(memory_format=CL)):
        assert not batch_norm_act_supported(x)
        out, mean, var = batch_norm_act(x, None, None, 1e-5, "relu")
        torch.testing.assert_close(out, _reference(x, None, None, 1e-5, "relu"))
        torch.testing.assert_close(mean, x.mean((0, 2, 3)))


def test_clear_errors():
    x = torch.randn(1, 4, 1, 1).contiguous(memory_format=CL)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_act(x, None, None)
    with pytest.raises(ValueError, match="act must be one of"):
        batch_norm_act(torch.randn(2, 4), None, None, act="gelu")
    with pytest.raises(ValueError, match="residual"):
        batch_norm_act(torch.randn(2, 4), None, None, residual=torch.randn(2, 5))
