"""BatchNorm + activation on the fused training kernel of :mod:`visionzoo.kernels`.

:class:`FusedBatchNormAct2d` is timm's ``BatchNormAct2d`` (same parameters, buffers and keys) whose
training-mode forward on a channels-last float CPU map runs :func:`visionzoo.kernels.batch_norm_act`:
statistics, normalisation and ReLU in one kernel, and its backward in one more, with one full-size
tensor each way instead of ATen's two (BatchNorm, then ReLU and its ``threshold_backward``). Running
statistics are updated as ``F.batch_norm`` does (momentum or the cumulative average, unbiased
variance). Everywhere else (eval mode, NCHW maps, other activations, dropout, CUDA) it is timm's.

:func:`conv_norm_add_act` runs the end of a residual block (conv, BatchNorm, shortcut added, ReLU)
with the norm, the addition and the ReLU in the same kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, register_notrace_module

from visionzoo.kernels import batch_norm_act, batch_norm_act_supported

from .swap import swap_classes

__all__ = ["FusedBatchNormAct2d", "conv_norm_add_act", "use_fused_batch_norm"]


def _activation(module: nn.Module):
    """The kernel's name of ``module`` as an activation, or None when the kernel has none for it."""
    if type(module) is nn.Identity:
        return "identity"
    if type(module) is nn.ReLU:
        return "relu"
    return None


@register_notrace_module  # a leaf for torch.fx: the traced graph runs the kernel as eager does
class FusedBatchNormAct2d(BatchNormAct2d):
    """timm's ``BatchNormAct2d`` on the fused kernel in training mode (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _activation(self.act)
        if act is None or not self.fuses(x):
            return super().forward(x)
        return self.fused(x, act)

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether :meth:`fused` runs ``x`` on the kernel (training mode, channels-last float CPU map,
        no dropout)."""
        return (self.training and type(self.drop) is nn.Identity
                and batch_norm_act_supported(x, self.weight, self.bias) and x.dim() == 4)

    def fused(self, x: torch.Tensor, act: str, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``act(norm(x) + residual)`` with the batch's statistics on the kernel, updating the running
        statistics as ``F.batch_norm`` does; ``self.act`` is not applied (``act`` replaces it)."""
        y, mean, var = batch_norm_act(x, self.weight, self.bias, self.eps, act, residual=residual)
        if self.track_running_stats and self.running_mean is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            count = x.numel() // x.shape[1]
            with torch.no_grad():
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * (count / (count - 1)), factor)
        return y


def conv_norm_add_act(conv_norm: nn.Module, x: torch.Tensor, residual: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """``act(conv_norm(x) + residual)``: the end of a residual block, whose last conv + BatchNorm has no
    activation of its own. In training, when the norm is a :class:`FusedBatchNormAct2d` and ``act`` a
    ReLU, the norm, the addition and the ReLU run as one kernel (one full-size output instead of
    two); otherwise it is the expression itself."""
    norm = getattr(conv_norm, "bn", None)
    if (isinstance(norm, FusedBatchNormAct2d) and type(norm.act) is nn.Identity and type(act) is nn.ReLU
            and getattr(conv_norm, "aa", None) is None and conv_norm.training):
        y = conv_norm.conv(x)
        if norm.fuses(y) and residual.shape == y.shape:
            return norm.fused(y, "relu", residual=residual)
        return act(norm(y) + residual)
    return act(conv_norm(x) + residual)


def use_fused_batch_norm(model: nn.Module) -> int:
    """Make every timm ``BatchNormAct2d`` of ``model`` (exactly that class) a :class:`FusedBatchNormAct2d`
    (in place; parameters untouched); returns how many."""
    return swap_classes(model, BatchNormAct2d, FusedBatchNormAct2d)
