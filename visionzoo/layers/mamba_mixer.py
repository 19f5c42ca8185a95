"""MambaVision's token mixer, built on :func:`visionzoo.kernels.selective_scan`.

Unlike Mamba's block, the mixer splits its input projection into two halves that are both mixed by
a depthwise convolution: one half goes through the selective scan (no gate), the other skips it,
and the two are concatenated before the output projection. The convolutions are symmetric
(``padding='same'``): the tokens of a window are not a causal sequence.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from visionzoo.kernels import selective_scan

__all__ = ["MambaVisionMixer"]


@register_notrace_module  # the scan checks its inputs' shapes: a leaf for torch.fx
class MambaVisionMixer(nn.Module):
    """``[B, L, dim] -> [B, L, dim]``.

    ``in_proj`` (no bias) gives ``x`` and ``z`` of ``dim / 2`` channels each; each goes through
    its own depthwise ``Conv1d`` (``conv1d_x`` / ``conv1d_z``, ``d_conv`` taps, 'same' padding, no
    bias) and SiLU. ``x`` is projected (``x_proj``) to a low-rank step ``dt`` and the state
    projections ``B``, ``C`` (``d_state`` each, shared by all channels), ``dt_proj`` maps ``dt`` to
    one step per channel, and the selective scan runs with ``A = -exp(A_log)``, the skip ``D``,
    softplus on the step and ``dt_proj.bias`` as ``delta_bias``. ``dt_proj`` adds its bias too, so the
    step is ``softplus(W dt + 2 b)``: the official weights were trained so. ``out_proj`` (no bias)
    maps ``cat[y, z]`` back to ``dim``.

    Args:
        dim: channels; even.
        d_state: state size per channel.
        d_conv: taps of the depthwise convolutions.
        dt_rank: rank of the step projection; ``None``: ``ceil(dim / 16)``.

    Parameter names are those of the official MambaVision mixer (``in_proj``, ``x_proj``,
    ``dt_proj``, ``A_log``, ``D``, ``conv1d_x``, ``conv1d_z``, ``out_proj``).
    """

    def __init__(self, dim: int, d_state: int = 8, d_conv: int = 3, dt_rank: Optional[int] = None):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim must be even (half goes through the scan, half skips it), got {dim}")
        inner = dim // 2
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank is None else dt_rank
        self.in_proj = nn.Linear(dim, dim, bias=False)
        self.conv1d_x = nn.Conv1d(inner, inner, d_conv, groups=inner, bias=False)
        self.conv1d_z = nn.Conv1d(inner, inner, d_conv, groups=inner, bias=False)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner)
        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def extra_repr(self) -> str:
        return f"d_state={self.d_state}, dt_rank={self.dt_rank}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, L, dim]`` -> ``[B, L, dim]``."""
        inner = self.D.shape[0]
        xz = self.in_proj(x).transpose(1, 2)  # [B, dim, L]
        # both depthwise convolutions in one call: their channels are the two halves of xz
        weight = torch.cat([self.conv1d_x.weight, self.conv1d_z.weight])
        xz = F.silu(F.conv1d(xz, weight, padding="same", groups=2 * inner))
        x, z = xz.chunk(2, dim=1)
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # contiguous [B, dim / 2, L], as the scan copies it anyway: left a transposed view, its
        # softplus gradient gets other strides in torch.compile's backward graph than at run time
        delta = self.dt_proj(dt).transpose(1, 2).contiguous()
        y = selective_scan(
            x,
            delta,
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2),
            C.transpose(1, 2),
            self.D.float(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return self.out_proj(torch.cat([y, z], dim=1).transpose(1, 2))
