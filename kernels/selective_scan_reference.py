"""The exact selective scan: a sequential loop over the sequence, differentiable through plain
autograd. Every other implementation is tested against it.

Arguments are those of :func:`~visionzoo.kernels.selective_scan_functional.selective_scan` after its
checks, with ``B`` and ``C`` in their grouped form ``[batch, groups, d_state, L]``. It computes in
:func:`~visionzoo.kernels.reference.compute_dtype` (float64 for float64 ``u``, else float32)::

    dt[b, d, l] = softplus?(delta[b, d, l] + delta_bias[d])
    x[b, d, :] = exp(dt * A[d, :]) * x[b, d, :] + dt * u[b, d, l] * B[b, g(d), :, l]   (x = 0 before l = 0)
    y[b, d, l] = sum_n x[b, d, n] * C[b, g(d), n, l] + D[d] * u[b, d, l]
    out = y * silu(z)   (when z is given)

with ``g(d) = d // (dim // groups)``; ``last_state`` is ``x`` after the last step.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .reference import compute_dtype


def discretized_step(delta: torch.Tensor, delta_bias: Optional[torch.Tensor], delta_softplus: bool) -> torch.Tensor:
    """``dt``: ``delta`` plus its bias, through softplus when asked (torch's, linear above 20 as
    mamba_ssm's kernels are)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if delta_softplus else delta


def per_channel(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``[batch, groups, d_state, L]`` -> ``[batch, dim, d_state, L]``: each group's rows for its channels."""
    return x.repeat_interleave(dim // x.shape[1], dim=1)


def selective_scan_reference(
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
    """``(out [batch, dim, L] in u's dtype, last_state [batch, dim, d_state] in the compute dtype)``."""
    dtype = compute_dtype(u.dtype)
    batch, dim, length = u.shape
    u_, delta, A = u.to(dtype), delta.to(dtype), A.to(dtype)
    dt = discretized_step(delta, None if delta_bias is None else delta_bias.to(dtype), delta_softplus)
    B, C = per_channel(B.to(dtype), dim), per_channel(C.to(dtype), dim)
    state = u_.new_zeros(batch, dim, A.shape[1])
    ys = []
    # one slice per step by unbind, whose backward stacks the step gradients once (indexing a step
    # would build a gradient of the whole sequence at every step)
    for dt_l, u_l, B_l, C_l in zip(dt.unbind(-1), u_.unbind(-1), B.unbind(-1), C.unbind(-1)):
        dt_l = dt_l[..., None]
        state = torch.exp(dt_l * A) * state + (dt_l * u_l[..., None]) * B_l
        ys.append((state * C_l).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u_.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u_
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype), state
