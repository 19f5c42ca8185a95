"""oneDNN linear / MLP for CPU inference: equal to ``F.linear`` / timm's ``Mlp``, used only where it may run."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GELUTanh
from timm.layers import Mlp as TimmMlp

from visionzoo.layers import Mlp, fused_linear_available, linear, split_linear
from visionzoo.layers.fast_linear import _fast_path

needs_onednn = pytest.mark.skipif(not fused_linear_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("gelu", [None, "none", "tanh"])
@pytest.mark.parametrize("shape", [(37, 24), (2, 5, 7, 24), (0, 24)])
def test_linear_equals_f_linear(shape, gelu):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    x = torch.randn(shape)
    expected = F.linear(x, layer.weight, layer.bias)
    if gelu is not None:
        expected = F.gelu(expected, approximate=gelu)
    with torch.no_grad():
        assert _fast_path(x, layer) == (x.numel() > 0)
        out = linear(x, layer, gelu)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_linear_without_bias():
    layer = nn.Linear(16, 8, bias=False)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, layer), x @ layer.weight.t(), rtol=1e-5, atol=1e-5)


def test_fast_path_only_without_gradients_on_cpu_float32():
    layer = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    assert not _fast_path(x, layer)  # the weights need gradients
    with torch.no_grad():
        assert _fast_path(x, layer) == fused_linear_available()
        assert not _fast_path(x.double(), nn.Linear(8, 8).double())
    layer.requires_grad_(False)
    assert _fast_path(x, layer) == fused_linear_available()  # frozen layer, input without grad
    assert not _fast_path(x.requires_grad_(), layer)


def test_gradients_flow_through_the_fallback():
    torch.manual_seed(0)
    layer = nn.Linear(12, 6)
    x = torch.randn(3, 12, requires_grad=True)
    linear(x, layer, "tanh").sum().backward()
    grad_x, grad_w = x.grad.clone(), layer.weight.grad.clone()
    x.grad = layer.weight.grad = None
    F.gelu(layer(x), approximate="tanh").sum().backward()
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_w, layer.weight.grad)


@pytest.mark.parametrize("act_layer", [nn.GELU, GELUTanh, nn.ReLU])
def test_mlp_equals_timm_mlp(act_layer):
    torch.manual_seed(0)
    ours, timm_mlp = Mlp(24, 64, act_layer=act_layer), TimmMlp(24, 64, act_layer=act_layer)
    timm_mlp.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_mlp(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x), timm_mlp(x))  # with gradients: timm's path


def test_mlp_keeps_dropout_in_training():
    mlp = Mlp(16, 32, drop=0.5).train()
    x = torch.randn(64, 16)
    with torch.no_grad():
        assert not torch.equal(mlp(x), mlp(x))  # dropout drew different masks: not the fused path
        mlp.eval()
        assert torch.equal(mlp(x), mlp(x))


def test_mlp_traces_with_fx():
    mlp = Mlp(8, 16).eval()
    traced = torch.fx.symbolic_trace(mlp)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), mlp(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_split_linear_equals_chunks(grad):
    torch.manual_seed(0)
    layer = nn.Linear(20, 36)
    x = torch.randn(2, 3, 5, 20)
    with torch.set_grad_enabled(grad):
        chunks = split_linear(x, layer, 3)
    expected = layer(x).chunk(3, dim=-1)
    assert len(chunks) == 3
    for got, want in zip(chunks, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.is_contiguous() == (not grad and fused_linear_available())


def test_flop_counting_sees_every_linear():
    """FlopCounterMode counts ATen's ops: under it the linear layers must not move to oneDNN."""
    from torch.utils.flop_counter import FlopCounterMode

    mlp = Mlp(32, 64).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        mlp(torch.randn(10, 32))
    assert counter.get_total_flops() == 2 * 10 * 32 * 64 * 2
