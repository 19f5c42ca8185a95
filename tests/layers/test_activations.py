"""GELUTanh on the C++ kernel: a drop-in for timm's, swapped in place."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GELUTanh as TimmGELUTanh

from visionzoo.layers import GELUTanh, use_fast_gelu_tanh


def test_swap_keeps_the_function():
    model = nn.Sequential(nn.Linear(6, 6), TimmGELUTanh(), nn.Linear(6, 6), nn.GELU(), TimmGELUTanh())
    x = torch.randn(4, 6)
    expected = model(x)
    assert use_fast_gelu_tanh(model) == 2
    assert type(model[1]) is GELUTanh and type(model[3]) is nn.GELU and isinstance(model[4], TimmGELUTanh)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=2e-6)
    assert use_fast_gelu_tanh(model) == 0  # already swapped


def test_module_equals_f_gelu_tanh():
    x = torch.randn(3, 40, requires_grad=True)
    torch.testing.assert_close(GELUTanh()(x), F.gelu(x, approximate="tanh"), rtol=1e-5, atol=2e-6)
