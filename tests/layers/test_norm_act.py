"""FusedBatchNormAct2d and conv_norm_add_act: equal to timm's BatchNormAct2d / the plain expression in
training (outputs, gradients, running statistics with momentum and the cumulative average) and
unchanged elsewhere (eval, NCHW maps, other activations); HaloNet's training step equals timm's."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, ConvNormAct

import visionzoo  # noqa: F401  (registers the models)
from visionzoo.kernels import native
from visionzoo.layers import FusedBatchNormAct2d, conv_norm_add_act, swap_classes, use_fused_batch_norm
from visionzoo.models.halonet import checkpoint_filter_fn

needs_native = pytest.mark.skipif(not native.available(), reason="C++ kernels not built")
CL = torch.channels_last


def _pair(channels, **kwargs):
    torch.manual_seed(0)
    reference = BatchNormAct2d(channels, **kwargs)
    nn.init.normal_(reference.weight)
    nn.init.normal_(reference.bias)
    fused = copy.deepcopy(reference)
    assert use_fused_batch_norm(fused) == 1 and type(fused) is FusedBatchNormAct2d
    return reference, fused


def _map(shape, memory_format=CL, seed=1):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 1
    return x.contiguous(memory_format=memory_format)


@needs_native
@pytest.mark.parametrize("kwargs", [dict(), dict(apply_act=False), dict(momentum=None), dict(track_running_stats=False)],
                         ids=["relu", "identity", "cumulative", "untracked"])
def test_training_equals_timm(kwargs):
    reference, fused = _pair(24, **kwargs)
    for step in range(3):  # running statistics over several batches
        x = _map((3, 24, 6, 5), seed=step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        out, expected = fused(x), reference(x_ref)
        mask = (out > 0) | (type(fused.act) is nn.Identity)  # values within rounding of 0: either side of the ReLU
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(out)
        out.backward(grad)
        (expected * mask).backward(grad) if type(fused.act) is not nn.Identity else expected.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    for (name, got), want in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, got), want in zip(fused.named_buffers(), reference.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_eval_nchw_and_other_activations_are_timms():
    reference, fused = _pair(8)
    x = _map((2, 8, 4, 4), memory_format=torch.contiguous_format)
    torch.testing.assert_close(fused(x), reference(x))  # NCHW memory: ATen's path
    reference.eval(), fused.eval()
    x = _map((2, 8, 4, 4))
    torch.testing.assert_close(fused(x), reference(x))
    silu_reference, silu = _pair(8, act_layer=nn.SiLU)
    torch.testing.assert_close(silu(x), silu_reference(x))
    with pytest.raises(AssertionError, match="4D"):  # timm's check
        fused.train()(torch.randn(4, 8, 3))


@needs_native
def test_conv_norm_add_act_equals_the_expression():
    torch.manual_seed(0)
    reference = ConvNormAct(16, 24, 1, apply_act=False)
    nn.init.normal_(reference.bn.weight)
    fused = copy.deepcopy(reference)
    use_fused_batch_norm(fused)
    x = _map((2, 16, 5, 7)).requires_grad_()
    residual = _map((2, 24, 5, 7), seed=3).requires_grad_()
    out = conv_norm_add_act(fused, x, residual, nn.ReLU())
    pre = reference(x) + residual
    torch.testing.assert_close(out, pre.relu(), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, residual, *fused.parameters()], grad)
    theirs = torch.autograd.grad(pre * (out > 0), [x, residual, *reference.parameters()], grad)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # not fusable (SiLU; eval): the expression itself
    torch.testing.assert_close(conv_norm_add_act(fused, x, residual, nn.SiLU()), nn.SiLU()(reference(x) + residual))
    fused.eval(), reference.eval()
    torch.testing.assert_close(conv_norm_add_act(fused, x, residual, nn.ReLU()), (reference(x) + residual).relu())


@needs_native
def test_halonet26t_training_step_equals_timm():
    torch.manual_seed(0)
    reference = timm.create_model("halonet26t").train()
    model = timm.create_model("visionzoo_halonet26t").train()
    model.load_state_dict(checkpoint_filter_fn(reference.state_dict(), model))
    image = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    out, expected = model(image), reference(image)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    out.square().sum().backward()
    expected.square().sum().backward()
    wanted = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        want = wanted[name].grad
        error = ((param.grad - want).norm() / want.norm().clamp_min(1e-12)).item()
        assert error < 1e-3, (name, error)
    for (name, got), want in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def test_swap_classes_only_swaps_exact_classes_into_subclasses():
    model = nn.Sequential(BatchNormAct2d(4), FusedBatchNormAct2d(4), nn.BatchNorm2d(4))
    assert swap_classes(model, BatchNormAct2d, FusedBatchNormAct2d) == 1
    assert [type(m) for m in model] == [FusedBatchNormAct2d, FusedBatchNormAct2d, nn.BatchNorm2d]
    with pytest.raises(TypeError, match="subclass"):
        swap_classes(model, nn.ReLU, FusedBatchNormAct2d)
