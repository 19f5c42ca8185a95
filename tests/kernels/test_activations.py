"""tanh-GELU on the C++ kernels: against ATen's F.gelu(approximate="tanh") and a float64 evaluation,
forward and backward, every tail length, channels-last and strided inputs, non-finite values."""
import pytest
import torch
import torch.nn.functional as F

from visionzoo.kernels import gelu_tanh, native

needs_native = pytest.mark.skipif(not native.available(), reason="C++ kernels not built")


@needs_native
@pytest.mark.parametrize("numel", [1, 7, 16, 33, 16384, 16384 * 3 + 5])  # tails, one and several chunks
def test_forward_backward_match_aten(numel):
    generator = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=generator) * 4).requires_grad_()
    grad = torch.randn(numel, generator=generator)
    out = gelu_tanh(x)
    (dx,) = torch.autograd.grad(out, x, grad)
    x64 = x.detach().double().requires_grad_()
    expected = F.gelu(x64, approximate="tanh")
    (expected_dx,) = torch.autograd.grad(expected, x64, grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(dx.double(), expected_dx, rtol=0, atol=2e-6)
    torch.testing.assert_close(out, F.gelu(x, approximate="tanh"), rtol=1e-5, atol=2e-6)


@needs_native
def test_gradcheck_float64():
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.autograd.gradcheck(gelu_tanh, (x.requires_grad_(),))


@needs_native
def test_channels_last_and_strided_inputs():
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = gelu_tanh(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, F.gelu(x, approximate="tanh"), rtol=1e-5, atol=2e-6)
    grad = torch.randn(2, 6, 5, 7)  # contiguous: strides unlike the channels-last input's
    (dx,) = torch.autograd.grad(out, x, grad)
    (expected,) = torch.autograd.grad(F.gelu(x, approximate="tanh"), x, grad)
    torch.testing.assert_close(dx, expected, rtol=1e-5, atol=1e-5)
    strided = torch.randn(8, 9)[:, ::2]  # not dense: ATen's path
    torch.testing.assert_close(gelu_tanh(strided), F.gelu(strided, approximate="tanh"))


@needs_native
def test_non_finite_values():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30] + [0.5] * 9)
    out = gelu_tanh(x)
    assert torch.isnan(out[0])
    torch.testing.assert_close(out[1:], F.gelu(x[1:], approximate="tanh"), equal_nan=True)  # ATen: -inf -> NaN too


def test_other_dtypes_fall_back_to_aten():
    x = torch.randn(40, dtype=torch.bfloat16)
    torch.testing.assert_close(gelu_tanh(x), F.gelu(x, approximate="tanh"))


def test_traces_with_fx():
    def fn(x):
        return gelu_tanh(x) * 2

    traced = torch.fx.symbolic_trace(fn)
    x = torch.randn(5, 7)
    torch.testing.assert_close(traced(x), fn(x))
