"""``torch.library`` custom ops of the fused selective-scan kernels.

``visionzoo::selective_scan_forward`` / ``visionzoo::selective_scan_backward`` carry fake (meta)
implementations, so ``torch.compile`` and ``torch.export`` trace models that use them without graph
breaks. Their ``backend`` argument names the implementation: ``"cpu"`` (:mod:`.selective_scan_native`)
or ``"triton"`` (:mod:`.selective_scan_triton`). They take tensors of one compute dtype
(:func:`selective_scan_fused` casts), ``B`` / ``C`` grouped ``[batch, groups, d_state, L]``.
"""
from __future__ import annotations

import functools
import importlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .reference import compute_dtype

_MODULES = {"cpu": ".selective_scan_native", "triton": ".selective_scan_triton"}


@functools.lru_cache(maxsize=None)
def _module(backend: str):
    if backend not in _MODULES:
        raise ValueError(f"no selective-scan custom-op implementation {backend!r}; one of {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[backend], __package__)


@torch.library.custom_op("visionzoo::selective_scan_forward", mutates_args=())
def selective_scan_forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """``(out [batch, dim, L], last_state [batch, dim, d_state])`` in the inputs' dtype."""
    if u.numel() == 0:
        return torch.zeros_like(u), u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    return _module(backend).scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@selective_scan_forward.register_fake
def _forward_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    return torch.empty_like(u), u.new_empty(u.shape[0], u.shape[1], A.shape[1])


@torch.library.custom_op("visionzoo::selective_scan_backward", mutates_args=())
def selective_scan_backward(
    grad_out: Tensor,
    grad_last_state: Optional[Tensor],
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    backend: str,
) -> List[Tensor]:
    """``[du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]``; the last three are empty where the input is None."""
    if u.numel() == 0:
        grads = [torch.zeros_like(x) if x is not None else None for x in (u, delta, A, B, C, D, z, delta_bias)]
    else:
        grads = list(_module(backend).scan_backward(grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias,
                                                    delta_softplus))
    return [g if g is not None else u.new_empty(0) for g in grads]


@selective_scan_backward.register_fake
def _backward_fake(grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    return [torch.empty_like(x) if x is not None else u.new_empty(0) for x in (u, delta, A, B, C, D, z, delta_bias)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.config = (delta_softplus, backend)
    ctx.set_materialize_grads(False)


def _autograd(ctx, grad_out, grad_last_state):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    if grad_out is None and grad_last_state is None:
        return (None,) * 10
    if grad_out is None:
        grad_out = torch.zeros_like(u)
    grads = selective_scan_backward(grad_out.contiguous(), None if grad_last_state is None else
                                    grad_last_state.contiguous(), u, delta, A, B, C, D, z, delta_bias, *ctx.config)
    present = (u, delta, A, B, C, D, z, delta_bias)
    return tuple(g if x is not None else None for g, x in zip(grads, present)) + (None, None)


selective_scan_forward.register_autograd(_autograd, setup_context=_setup_context)


def selective_scan_fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, backend: str):
    """The custom op on the arguments of
    :func:`~visionzoo.kernels.selective_scan_reference.selective_scan_reference`: ``(out in u's dtype,
    last_state)``."""
    dtype = compute_dtype(u.dtype)

    def prepare(x):
        return None if x is None else x.to(dtype).contiguous()

    out, last_state = selective_scan_forward(*(prepare(x) for x in (u, delta, A, B, C, D, z, delta_bias)),
                                             delta_softplus, backend)
    return out.to(u.dtype), last_state
