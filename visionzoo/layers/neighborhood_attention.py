"""Neighborhood attention modules built on :func:`visionzoo.kernels.na2d`.

:class:`NeighborhoodAttention2d` is the attention layer of NAT / DiNAT (SHI-Labs). Its submodules
carry the names of NATTEN's legacy ``NeighborhoodAttention2D`` (``qkv``, ``rpb``, ``proj``), so the
official checkpoints load without renaming anything inside the attention.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn as nn
from timm.layers import register_notrace_module, to_2tuple, trunc_normal_

from visionzoo.kernels import na2d

from .fast_linear import linear, split_linear
from .relative_position import crop_rel_pos_table

__all__ = ["NeighborhoodAttention2d", "fit_window"]


def fit_window(
    size: Tuple[int, int], kernel_size: Tuple[int, int], dilation: Tuple[int, int]
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Shrink ``kernel_size`` and ``dilation`` so that ``kernel * dilation`` fits ``size`` per dimension.

    A kernel larger than the feature map becomes the feature map (attention over the whole axis,
    like timm's Swin clamps its window); a dilation that would not fit becomes
    ``max(1, size // kernel)``. Returns ``(kernel_size, dilation)``, each ``(h, w)``.
    """
    kernel = tuple(min(k, s) for k, s in zip(kernel_size, size))
    dilation = tuple(max(1, min(d, s // k)) for d, s, k in zip(dilation, size, kernel))
    return kernel, dilation


@register_notrace_module  # fits its window to the input's shape: a leaf for torch.fx
class NeighborhoodAttention2d(nn.Module):
    """2D (dilated) neighborhood attention with relative position bias, channels-last.

    ``x [B, H, W, C] -> qkv -> na2d(kernel_size, dilation, rpb) -> proj -> [B, H, W, C]``.
    Each query attends the ``kernel_size`` window of its dilation group, shifted inwards at borders
    (never zero padded), and the bias ``rpb [num_heads, 2*kh-1, 2*kw-1]`` is indexed by the
    key-minus-query offset, exactly as NATTEN's legacy rpb (see
    :func:`visionzoo.layers.relative_position_index_key_minus_query`).

    Feature maps smaller than ``kernel_size * dilation``: NATTEN zero-pads them up to the window
    (so padded tokens take part in attention); here the window is fitted to the input instead (see
    :func:`fit_window`): the kernel shrinks to the feature size and the centre crop of ``rpb`` is
    used, the dilation shrinks to ``size // kernel``. Outputs match NATTEN whenever no padding
    would happen, i.e. whenever ``kernel_size * dilation <= (H, W)``.

    Args:
        dim: channels ``C``; must be divisible by ``num_heads``.
        num_heads: attention heads.
        kernel_size: window size, int or ``(h, w)``.
        dilation: dilation, int or ``(h, w)``.
        qkv_bias: bias in the qkv projection.
        attn_drop: dropout on attention probabilities; only 0 is supported, the softmax happens
            inside the fused ``na2d`` op.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: Union[int, Tuple[int, int]] = 7,
        dilation: Union[int, Tuple[int, int]] = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if attn_drop:
            raise ValueError(
                f"attn_drop={attn_drop} is not supported: na2d computes the softmax inside the op, "
                "there is no attention matrix to drop out of"
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kernel_size = to_2tuple(kernel_size)
        self.dilation = to_2tuple(dilation)
        if min(self.kernel_size) < 1 or min(self.dilation) < 1:
            raise ValueError(f"kernel_size {self.kernel_size} and dilation {self.dilation} must be >= 1")

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * self.kernel_size[0] - 1, 2 * self.kernel_size[1] - 1))
        trunc_normal_(self.rpb, std=0.02)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, H, W, C]`` -> ``[B, H, W, C]``."""
        if x.dim() != 4:
            raise ValueError(f"NeighborhoodAttention2d expects [B, H, W, C], got shape {tuple(x.shape)}")
        batch, height, width, channels = x.shape
        kernel_size, dilation = fit_window((height, width), self.kernel_size, self.dilation)
        rpb = self.rpb if kernel_size == self.kernel_size else crop_rel_pos_table(self.rpb, kernel_size)
        q, k, v = (t.view(batch, height, width, self.num_heads, self.head_dim) for t in split_linear(x, self.qkv, 3))
        x = na2d(q, k, v, kernel_size, dilation=dilation, scale=self.scale, rpb=rpb)
        x = linear(x.reshape(batch, height, width, channels), self.proj)
        return self.proj_drop(x)
