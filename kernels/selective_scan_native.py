"""The fused C++ selective scan on CPU (``csrc/scan_kernels.cpp``, built with the attention kernels by
:mod:`.build`): forward, and a backward that runs the scan again and then in reverse.

Inputs are contiguous float32 or float64 CPU tensors of one dtype (the custom op of
:mod:`.selective_scan_ops` casts them), ``B`` and ``C`` grouped ``[batch, groups, d_state, L]``. The
kernel's per-block partial sums of the B / C gradients and per-batch sums of the A / D / delta_bias
gradients are added up here.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .build import library, vector_bytes
from .native import _ptr, _suffix


def _geometry(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, delta_softplus: bool) -> torch.Tensor:
    batch, dim, length = u.shape
    return torch.tensor([batch, dim, length, A.shape[1], B.shape[1], int(delta_softplus)], dtype=torch.long)


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [batch, dim, L], last_state [batch, dim, d_state])``."""
    out = torch.empty_like(u)
    last_state = u.new_empty(u.shape[0], u.shape[1], A.shape[1])
    geom = _geometry(u, A, B, delta_softplus)  # held until the call returns
    getattr(library(), f"vz_scan_forward_{_suffix(u.dtype)}")(
        _ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(z), _ptr(delta_bias), _ptr(out),
        _ptr(last_state), _ptr(geom), torch.get_num_threads(),
    )
    return out, last_state


def scan_backward(grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool):
    """``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)``, the last three None where the input is."""
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    blocks = -(-(dim // groups) // (vector_bytes() // u.dtype.itemsize))
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dz = None if z is None else torch.empty_like(z)
    dA = u.new_empty(batch, dim, d_state)
    dB, dC = (u.new_empty(batch, groups, blocks, length, d_state) for _ in range(2))
    dD = None if D is None else u.new_empty(batch, dim)
    dbias = None if delta_bias is None else u.new_empty(batch, dim)
    geom = _geometry(u, A, B, delta_softplus)
    getattr(library(), f"vz_scan_backward_{_suffix(u.dtype)}")(
        _ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(z), _ptr(delta_bias), _ptr(grad_out),
        _ptr(grad_last_state), _ptr(du), _ptr(ddelta), _ptr(dA), _ptr(dB), _ptr(dC), _ptr(dD), _ptr(dz), _ptr(dbias),
        _ptr(geom), torch.get_num_threads(),
    )
    return (du, ddelta, dA.sum(0), dB.sum(2).transpose(-1, -2), dC.sum(2).transpose(-1, -2),
            None if dD is None else dD.sum(0), dz, None if dbias is None else dbias.sum(0))
