"""The selective scan of Mamba (S6), with the signature and semantics of mamba_ssm's
``selective_scan_fn``, on every device.

:func:`selective_scan` checks its arguments here (a ``ValueError`` naming the argument), brings ``B``
and ``C`` to their grouped form ``[batch, groups, d_state, L]``, and runs the implementation that
:func:`~visionzoo.kernels.dispatch.resolve_scan_backend` picks: the sequential ``reference``
(:mod:`.selective_scan_reference`), the chunked ``torch`` scan (:mod:`.selective_scan_torch`), the
fused C++ kernels (``cpu``) or Triton kernels (``triton``) through the custom ops of
:mod:`.selective_scan_ops`.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .dispatch import resolve_scan_backend
from .selective_scan_ops import selective_scan_fused
from .selective_scan_reference import selective_scan_reference
from .selective_scan_torch import selective_scan_chunked


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_tensor(name: str, x, ndims: Tuple[int, ...], device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"selective_scan: {name} must be a tensor, got {type(x).__name__}")
    if x.dim() not in ndims:
        ranks = " or ".join(str(n) for n in ndims)
        raise ValueError(f"selective_scan: {name} must have {ranks} dimensions, got shape {_shape(x)}")
    if x.is_complex():
        raise ValueError(f"selective_scan: complex {name} is not supported (real inputs only), got {x.dtype}")
    if not x.is_floating_point():
        raise ValueError(f"selective_scan: {name} must be a floating-point tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"selective_scan: {name} is on {x.device}, u on {device}")


def _grouped(name: str, x: torch.Tensor, batch: int, dim: int, d_state: int, length: int) -> torch.Tensor:
    """``B`` or ``C`` as ``[batch, groups, d_state, L]`` (a view): ``[dim, d_state]`` (the same for every
    step: one group per channel), ``[batch, d_state, L]`` (one group) or already grouped."""
    if x.dim() == 2:
        if tuple(x.shape) != (dim, d_state):
            raise ValueError(f"selective_scan: a 2-D {name} is (dim, d_state) = {(dim, d_state)}, got {_shape(x)}")
        return x[None, :, :, None].expand(batch, dim, d_state, length)
    if x.dim() == 3:
        x = x[:, None]
    if x.shape[0] != batch or x.shape[2] != d_state:
        raise ValueError(f"selective_scan: {name} must be (batch, d_state, L) or (batch, groups, d_state, L) with "
                         f"batch {batch} and d_state {d_state} (A's second size), got {_shape(x)}")
    if x.shape[3] != length:
        raise ValueError(f"selective_scan: {name} has length {x.shape[3]}, u has length {length}")
    if x.shape[1] == 0 or dim % x.shape[1]:
        raise ValueError(f"selective_scan: the groups of {name} ({x.shape[1]}) must divide dim ({dim})")
    return x


def check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validates the arguments of :func:`selective_scan` and returns ``(B, C)`` grouped,
    ``[batch, groups, d_state, L]``."""
    if not isinstance(u, torch.Tensor):
        raise ValueError(f"selective_scan: u must be a tensor, got {type(u).__name__}")
    device = u.device
    _check_tensor("u", u, (3,), device)
    batch, dim, length = u.shape
    _check_tensor("delta", delta, (3,), device)
    if delta.shape != u.shape:
        what = "length" if delta.shape[:2] == u.shape[:2] else "shape"
        raise ValueError(f"selective_scan: delta must have u's shape (batch, dim, L) = {_shape(u)}, got "
                         f"{_shape(delta)} (mismatched {what})")
    _check_tensor("A", A, (2,), device)
    if A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim, d_state) with dim {dim} (u's second size), got {_shape(A)}")
    d_state = A.shape[1]
    _check_tensor("B", B, (2, 3, 4), device)
    _check_tensor("C", C, (2, 3, 4), device)
    B, C = (_grouped(name, x, batch, dim, d_state, length) for name, x in (("B", B), ("C", C)))
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None:
            _check_tensor(name, x, (1,), device)
            if x.shape[0] != dim:
                raise ValueError(f"selective_scan: {name} must be (dim,) = ({dim},), got {_shape(x)}")
    if z is not None:
        _check_tensor("z", z, (3,), device)
        if z.shape != u.shape:
            raise ValueError(f"selective_scan: z must have u's shape {_shape(u)}, got {_shape(z)}")
    return B, C


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Mamba's selective scan (mamba_ssm's ``selective_scan_fn``), differentiable in every tensor.

    For every batch ``b`` and channel ``d``, with ``dt = softplus?(delta + delta_bias)`` and a state
    ``x [d_state]`` starting at zero::

        x = exp(dt[l] * A[d]) * x + dt[l] * u[l] * B[:, l]
        out[l] = (sum(x * C[:, l]) + D[d] * u[l]) * silu(z[l])

    Args:
        u, delta: ``[batch, dim, L]``.
        A: ``[dim, d_state]``, real.
        B, C: ``[batch, d_state, L]`` (shared by all channels), ``[batch, groups, d_state, L]`` (channel
            ``d`` reads group ``d // (dim // groups)``), or ``[dim, d_state]`` (the same at every step).
        D: ``[dim]`` skip connection, or None.
        z: ``[batch, dim, L]`` gate (the output is multiplied by ``silu(z)``), or None.
        delta_bias: ``[dim]`` added to ``delta``, or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the state after the last step.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"torch"`` or ``"triton"`` (see
            :mod:`visionzoo.kernels.dispatch`); ``None`` uses the thread default.

    Returns:
        ``out [batch, dim, L]`` in ``u``'s dtype, and with ``return_last_state`` also
        ``last_state [batch, dim, d_state]`` in float32 (float64 for float64 ``u``). Computation is in
        float32 for half-precision inputs, as mamba_ssm's.
    """
    B, C = check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_scan_backend(backend, u.device)
    args = (u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    if name == "reference":
        out, last_state = selective_scan_reference(*args)
    elif name == "torch":
        out, last_state = selective_scan_chunked(*args)
    else:
        out, last_state = selective_scan_fused(*args, backend=name)
    return (out, last_state) if return_last_state else out
