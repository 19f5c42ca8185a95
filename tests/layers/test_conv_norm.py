"""Convolution + BatchNorm folded at inference: equal to timm's ConvNormAct, and timm's in training."""
import pytest
import torch
import torch.nn as nn
from timm.layers import ConvNormAct

from visionzoo.layers import FoldedConvNormAct, fold_conv_norm_act


def _pair(**kwargs):
    torch.manual_seed(0)
    theirs = ConvNormAct(6, 10, **kwargs)
    with torch.no_grad():  # statistics and affine parameters away from their initial 0 / 1
        theirs.bn.running_mean.uniform_(-1, 1)
        theirs.bn.running_var.uniform_(0.5, 2)
        if theirs.bn.weight is not None:
            theirs.bn.weight.uniform_(0.5, 1.5)
            theirs.bn.bias.uniform_(-1, 1)
    ours = ConvNormAct(6, 10, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    assert fold_conv_norm_act(ours) == 1 and isinstance(ours, FoldedConvNormAct)
    return ours, theirs


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, stride=2, act_layer=nn.SiLU),
    dict(kernel_size=1, bias=True, act_layer=nn.ReLU),
    dict(kernel_size=3, apply_act=False, norm_kwargs=dict(affine=False)),
    dict(kernel_size=3, groups=2, act_layer=nn.GELU),
])
def test_folded_equals_timm(kwargs):
    ours, theirs = _pair(**kwargs)
    x = torch.randn(2, 6, 9, 11)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # gradients reach the conv and the norm's affine parameters as without folding
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    for (name, mine), theirs_param in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(mine.grad, theirs_param.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_training_mode_uses_batch_statistics():
    ours, theirs = _pair(kernel_size=3)
    x = torch.randn(4, 6, 8, 8) * 3 + 1
    torch.testing.assert_close(ours.train()(x), theirs.train()(x))
    torch.testing.assert_close(ours.bn.running_mean, theirs.bn.running_mean)


def test_only_plain_conv_and_batch_norm_are_swapped():
    model = nn.Sequential(
        ConvNormAct(3, 4, 3),
        ConvNormAct(4, 4, 3, norm_layer=nn.GroupNorm, norm_kwargs=dict(num_groups=2)),
    )
    assert fold_conv_norm_act(model) == 1
    assert type(model[0]) is FoldedConvNormAct and type(model[1]) is ConvNormAct
