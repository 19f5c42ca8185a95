"""Pre-norm transformer block around any channels-last attention module."""
from __future__ import annotations

from typing import Optional, Type

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale

from .fast_linear import Mlp

__all__ = ["TransformerBlock"]


class TransformerBlock(nn.Module):
    """``x + drop_path(ls1(attn(norm1(x))))``, then ``x + drop_path(ls2(mlp(norm2(x))))``.

    Tokens are channels-last, ``[B, ..., dim]`` in and out (``[B, H, W, C]`` for 2D attention,
    ``[B, N, C]`` for sequences): the block is agnostic of the layout as long as ``attn`` keeps it.

    Args:
        dim: channels ``C``.
        attn: the attention module, ``[B, ..., C] -> [B, ..., C]`` (built by the family, e.g.
            :class:`visionzoo.layers.NeighborhoodAttention2d`).
        mlp_ratio: hidden width of the MLP over ``dim``.
        layer_scale: initial value of the per-channel layer scales ``ls1.gamma`` / ``ls2.gamma``;
            ``None``: no layer scale (identity, no parameters).
        proj_drop: dropout in the MLP.
        drop_path: stochastic depth rate of both residual branches.
        act_layer: MLP activation.
        norm_layer: normalization over the last dimension.

    Submodules are ``norm1, attn, ls1, drop_path1, norm2, mlp (fc1, fc2), ls2, drop_path2``, as
    timm's ViT / Swin blocks name them. The MLP runs CPU inference on oneDNN (:mod:`.fast_linear`).
    """

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        mlp_ratio: float = 4.0,
        layer_scale: Optional[float] = None,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
