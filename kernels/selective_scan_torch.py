"""The ``torch`` selective scan: a chunked scan in plain torch ops, for any device, differentiable
through autograd.

The sequence is cut into ``chunks`` of ``T`` steps (``T ~ sqrt(L)``; the tail padded with ``dt = 0``,
which leaves the state unchanged). The recurrence ``x_l = a_l x_{l-1} + b_l`` (``a = exp(dt A)``,
``b = dt u B``) then runs as two short loops instead of one of ``L`` steps:

1. inside every chunk at once, from a zero state: ``T`` steps on ``[..., chunks]`` tensors, giving the
   local states ``h``;
2. across chunks: ``chunks`` steps carrying the state that enters each chunk,
   ``X_c = P_c X_{c-1} + h_c[T - 1]`` with ``P`` the chunk's decay ``exp(cumsum(dt A))``;

and ``x = h + P_t X_{c-1}`` for every step in one go. Channels stay grouped as ``[batch, groups,
dim // groups, ...]`` so that ``B`` and ``C`` broadcast instead of being copied per channel.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .reference import compute_dtype
from .selective_scan_reference import discretized_step


def chunk_length(length: int) -> int:
    """Steps per chunk: about ``sqrt(L)``, which minimises the two loops' ``T + L / T`` steps."""
    return max(1, math.isqrt(max(length - 1, 0)) + 1)


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Arguments and results of :func:`~visionzoo.kernels.selective_scan_reference.selective_scan_reference`."""
    dtype = compute_dtype(u.dtype)
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    per_group = dim // groups
    u_ = u.to(dtype)
    dt = discretized_step(delta.to(dtype), None if delta_bias is None else delta_bias.to(dtype), delta_softplus)
    if length == 0:
        state = u_.new_zeros(batch, dim, d_state)
        return u.new_zeros(u.shape), state
    step = chunk_length(length)
    chunks = -(-length // step)
    pad = chunks * step - length

    def split(x: torch.Tensor) -> torch.Tensor:  # [..., L] -> [..., chunks, T], the tail zero
        return F.pad(x, (0, pad)).unflatten(-1, (chunks, step))

    # [batch, groups, per_group, d_state, chunks, T]
    dt_g = split(dt).view(batch, groups, per_group, 1, chunks, step)
    log_decay = dt_g * A.to(dtype).view(1, groups, per_group, d_state, 1, 1)
    inputs = (dt_g * split(u_).view(batch, groups, per_group, 1, chunks, step)) * split(B.to(dtype))[:, :, None]
    # steps and chunks are sliced by unbind, whose backward stacks the slices' gradients once (indexing
    # would build a gradient of the whole tensor for every slice)
    # decays below the smallest normal float are floored at it: exp would spend 6x as long producing
    # subnormals, whose share in a sum with any normal term is below its rounding
    floor = math.log(torch.finfo(dtype).tiny)
    local, h = [], None
    for decay_t, input_t in zip(torch.exp(log_decay.clamp_min(floor)).unbind(-1), inputs.unbind(-1)):
        h = input_t if h is None else decay_t * h + input_t
        local.append(h)
    local = torch.stack(local, dim=-1)
    cumulative = torch.exp(torch.cumsum(log_decay, dim=-1).clamp_min(floor))  # from a chunk's start to each step
    carried, state = [], local.new_zeros(local.shape[:-2])
    for decay_c, last_c in zip(cumulative[..., -1].unbind(-1), local[..., -1].unbind(-1)):
        carried.append(state)
        state = decay_c * state + last_c
    states = local + cumulative * torch.stack(carried, dim=-1)[..., None]
    y = (states * split(C.to(dtype))[:, :, None]).sum(3).reshape(batch, dim, chunks * step)[..., :length]
    if D is not None:
        y = y + D.to(dtype)[:, None] * u_
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype), state.reshape(batch, dim, d_state)
