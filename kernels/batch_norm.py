"""Training-mode BatchNorm fused with its activation (identity or ReLU) on the C++ kernels
(``csrc/norm_kernels.cpp``).

In training, ATen's CPU BatchNorm and the ReLU after it take a pass each over the map, and the
backward one more (``threshold_backward``) with a full-size gradient between ReLU and BatchNorm. On
channels-last maps the kernel computes the statistics, normalises and rectifies in three passes and
the whole backward in three, with one full-size output each way. Fresh full-size tensors are not
free on CPU: glibc maps allocations of 32 MiB and more anew each time (ResNet-style stage-1 maps at
batch 8 and 256 px are exactly that), so every one costs its page faults. Measured one thread on a
Zen 4 core, a ``[8, 256, 64, 64]`` channels-last map: forward and backward 87 ms with ATen, see
``docs/kernels.md`` for the kernel's.

:func:`batch_norm_act` returns the output and the batch statistics (mean, biased variance); the
caller updates running statistics. It runs the kernel on float32 / float64 CPU tensors laid out as
``[rows, channels]`` (channels-last 4D maps, ``[N, C]`` batches) when the kernels are built, through
the ``visionzoo::batch_norm_act`` custom op and its backward, and ATen everywhere else.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .build import library
from .native import _ptr, _suffix

__all__ = ["ACTIVATIONS", "batch_norm_act", "batch_norm_act_supported"]

ACTIVATIONS = {"identity": 0, "relu": 1}


def _rows_layout(x: Tensor) -> bool:
    if x.dim() == 2:
        return x.is_contiguous()
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[1]


def batch_norm_act_supported(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> bool:
    """Whether :func:`batch_norm_act` runs ``x`` on the kernel (else on ATen)."""
    if not isinstance(x, Tensor) or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False  # a torch.fx Proxy is no Tensor
    if any(p is not None and (p.dtype != x.dtype or p.device != x.device) for p in (weight, bias)):
        return False
    return x.numel() > 0 and _rows_layout(x) and native.available()


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` with ``x``'s strides (the kernel walks both as one flat array)."""
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


@torch.library.custom_op("visionzoo::batch_norm_act", mutates_args=())
def _batch_norm_act(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor], eps: float, act: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    channels = x.shape[1]
    if residual is not None:
        residual = _like(residual, x)
    y = torch.empty_like(x)
    mean, var, invstd = (x.new_empty(channels) for _ in range(3))
    getattr(library(), f"vz_batch_norm_act_forward_{_suffix(x.dtype)}")(
        _ptr(x), _ptr(weight), _ptr(bias), _ptr(residual), _ptr(y), _ptr(mean), _ptr(var), _ptr(invstd),
        _rows(x), channels, eps, act, torch.get_num_threads(),
    )
    return y, mean, var, invstd


@_batch_norm_act.register_fake
def _batch_norm_act_fake(x, weight, bias, residual, eps, act):
    channels = x.shape[1]
    return torch.empty_like(x), x.new_empty(channels), x.new_empty(channels), x.new_empty(channels)


@torch.library.custom_op("visionzoo::batch_norm_act_backward", mutates_args=())
def _batch_norm_act_backward(
    grad: Tensor, x: Tensor, y: Optional[Tensor], weight: Optional[Tensor], mean: Tensor, invstd: Tensor, act: int,
    with_residual: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    grad = _like(grad, x)
    channels = x.shape[1]
    grad_x = torch.empty_like(x)
    grad_residual = torch.empty_like(x) if with_residual else x.new_empty(0)
    grad_weight, grad_bias = x.new_empty(channels), x.new_empty(channels)
    getattr(library(), f"vz_batch_norm_act_backward_{_suffix(x.dtype)}")(
        _ptr(grad), _ptr(x), _ptr(y), _ptr(weight), _ptr(mean), _ptr(invstd), _ptr(grad_x),
        _ptr(grad_weight), _ptr(grad_bias), _ptr(grad_residual if with_residual else None), _rows(x), channels, act,
        torch.get_num_threads(),
    )
    return grad_x, grad_weight, grad_bias, grad_residual


@_batch_norm_act_backward.register_fake
def _batch_norm_act_backward_fake(grad, x, y, weight, mean, invstd, act, with_residual):
    channels = x.shape[1]
    return (torch.empty_like(x), x.new_empty(channels), x.new_empty(channels),
            torch.empty_like(x) if with_residual else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, _, act = inputs
    y, mean, _, invstd = output
    ctx.act = act
    ctx.has_weight, ctx.has_bias, ctx.has_residual = weight is not None, bias is not None, residual is not None
    # the ReLU mask is read from the output, as ATen's threshold_backward does
    ctx.save_for_backward(x, y if act == ACTIVATIONS["relu"] else None, weight, mean, invstd)


def _backward(ctx, grad, _grad_mean, _grad_var, _grad_invstd):
    x, y, weight, mean, invstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias, grad_residual = _batch_norm_act_backward(
        grad, x, y, weight, mean, invstd, ctx.act, ctx.has_residual)
    return (grad_x, grad_weight if ctx.has_weight else None, grad_bias if ctx.has_bias else None,
            grad_residual if ctx.has_residual else None, None, None)


_batch_norm_act.register_autograd(_backward, setup_context=_setup_context)


def batch_norm_act(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5, act: str = "identity",
    residual: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``act(F.batch_norm(x, None, None, weight, bias, training=True, eps=eps) + residual)`` (no residual
    when None) and the batch's per-channel mean and biased variance (for the running statistics; no
    gradient flows into them).

    ``x`` is ``[N, C, ...]``, ``residual`` of its shape; ``act`` is ``"identity"`` or ``"relu"``. A
    ValueError when a channel has a single value (as ``F.batch_norm``'s in training).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"batch_norm_act: act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if x.dim() < 2:
        raise ValueError(f"batch_norm_act: x must be [N, C, ...], got shape {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"batch_norm_act: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    if x.numel() // x.shape[1] <= 1:
        raise ValueError(f"batch_norm_act: expected more than 1 value per channel when training, got input "
                         f"of shape {tuple(x.shape)}")
    if batch_norm_act_supported(x, weight, bias) and (
            residual is None or (residual.dtype == x.dtype and residual.device == x.device)):
        y, mean, var, _ = _batch_norm_act(x, weight, bias, residual, float(eps), ACTIVATIONS[act])
        return y, mean.detach(), var.detach()
    dims = [0] + list(range(2, x.dim()))
    with torch.no_grad():
        var, mean = torch.var_mean(x, dim=dims, correction=0)
    y = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if residual is not None:
        y = y + residual
    return (F.relu(y) if act == "relu" else y), mean, var
