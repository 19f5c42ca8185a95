"""Channels-last downsamplers between the stages of hierarchical models, ``[B, H, W, C]`` in and out.

* :class:`ConvDownsample` (NAT / DiNAT): 3x3 stride-2 convolution without bias, then a norm;
* :class:`PatchMerging` (Swin, DiNAT_s): each 2x2 patch concatenated to ``4C`` channels, a norm,
  then a linear ``4C -> out_dim`` without bias. Parameter names (``norm``, ``reduction``) and the
  concatenation order follow Swin, so its checkpoints load unchanged.

Both halve odd sizes upwards: ``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_dim]``.
"""
from __future__ import annotations

from typing import Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvDownsample", "PatchMerging", "create_downsample"]


class ConvDownsample(nn.Module):
    """3x3 stride-2 conv (padding 1, no bias) then ``norm_layer``: ``[B, H, W, dim] -> [B, ceil(H/2), ceil(W/2), out_dim]``."""

    def __init__(self, dim: int, out_dim: Optional[int] = None, norm_layer: Type[nn.Module] = nn.LayerNorm):
        super().__init__()
        out_dim = out_dim or 2 * dim
        self.reduction = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin's patch merging: ``[B, H, W, dim] -> [B, ceil(H/2), ceil(W/2), out_dim]``.

    Odd sizes are zero padded at the bottom / right. The 2x2 patch is concatenated as
    (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1), then normed over ``4 * dim``
    and projected to ``out_dim`` (default ``2 * dim``) without bias.
    """

    def __init__(self, dim: int, out_dim: Optional[int] = None, norm_layer: Type[nn.Module] = nn.LayerNorm):
        super().__init__()
        out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # [B, H/2, 2 (row), W/2, 2 (col), C] -> [B, H/2, W/2, col, row, C]: row varies fastest
        x = x.reshape(batch, (height + 1) // 2, 2, (width + 1) // 2, 2, channels).permute(0, 1, 3, 4, 2, 5)
        return self.reduction(self.norm(x.flatten(3)))


_DOWNSAMPLERS = {"conv": ConvDownsample, "merge": PatchMerging}


def create_downsample(
    downsample_type: Optional[str], dim: int, out_dim: int, norm_layer: Type[nn.Module] = nn.LayerNorm
) -> nn.Module:
    """``'conv'`` -> :class:`ConvDownsample`, ``'merge'`` -> :class:`PatchMerging`, ``None`` -> identity.

    ``None`` keeps the map as it is and so requires ``dim == out_dim``.
    """
    if downsample_type is None:
        if dim != out_dim:
            raise ValueError(f"downsample_type=None keeps the width, got dim {dim} -> out_dim {out_dim}")
        return nn.Identity()
    if downsample_type not in _DOWNSAMPLERS:
        raise ValueError(f"downsample_type must be None, {' or '.join(map(repr, _DOWNSAMPLERS))}, got {downsample_type!r}")
    return _DOWNSAMPLERS[downsample_type](dim, out_dim, norm_layer=norm_layer)
