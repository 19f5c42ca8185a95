"""(Shifted) window attention of Swin, built on :func:`visionzoo.kernels.na2d`.

Window attention is neighborhood attention whose windows are disjoint blocks (``stride ==
kernel_size``); Swin's shifted windows are blocks whose grid starts ``shift`` tokens in, so the
windows at the top / left and bottom / right borders are partial. That is what Swin's cyclic roll
plus -100 mask computes, without the roll, the window partition copies or the mask.

:class:`WindowAttention` keeps the submodule names of Swin's ``WindowAttention`` (``qkv``,
``relative_position_bias_table [(2h-1)*(2w-1), num_heads]``, ``proj``), so official and timm
checkpoints load without renaming anything inside the attention.
"""
from __future__ import annotations

import functools
from typing import Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module, to_2tuple, trunc_normal_

from visionzoo.kernels import na2d

from .fast_linear import linear, split_linear
from .relative_position import crop_rel_pos_table, rpb_from_query_minus_key_table

__all__ = ["WindowAttention", "fit_window_shift"]

_size_2_t = Union[int, Tuple[int, int]]


def fit_window_shift(
    size: Tuple[int, int], window_size: Tuple[int, int], shift_size: Tuple[int, int]
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Swin's rule for maps not larger than the window: per dimension, a size ``<= window`` becomes
    the window and is not shifted (so the last stage of Swin at 224 never shifts). Returns
    ``(window_size, shift_size)``."""
    window = tuple(min(w, s) for w, s in zip(window_size, size))
    shift = tuple(0 if s <= w else sh for s, w, sh in zip(size, window_size, shift_size))
    return window, shift


@functools.lru_cache(maxsize=256)
def _padded_layout(length: int, window: int, shift: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token order of one dimension padded to a multiple of ``window``, as Swin in timm lays it out.

    timm rolls the map by ``-shift``, zero pads the end to a multiple of the window and masks on the
    padded grid. Rolled back by ``shift`` over the padded length, that is shifted-window attention
    on a sequence whose first ``shift`` tokens moved behind the last one (into the last window,
    beside the padding): ``(source, inverse)`` gives, for every padded position, the token it holds
    (``length`` for a zero), and for every token its padded position. Without shift this is plain
    zero padding at the end.
    """
    padded = -(-length // window) * window
    rolled = (torch.arange(padded) - shift) % padded
    source = torch.where(rolled < length, (rolled + shift) % length, length)
    inverse = ((torch.arange(length) - shift) % length + shift) % padded
    return source, inverse


def _pad(x: torch.Tensor, dim: int, layout: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    pad = [0, 0] * (x.dim() - dim - 1) + [0, 1]  # one zero token at the end of ``dim``
    return F.pad(x, pad).index_select(dim, layout[0].to(x.device))


@register_notrace_module  # fits its window to the input's shape: a leaf for torch.fx
class WindowAttention(nn.Module):
    """Swin's (shifted) window multi-head self-attention, channels-last ``[B, H, W, C]`` in and out.

    ``x -> qkv -> na2d(kernel_size=window, stride=window, shift, rpb) -> proj``. The bias table is
    Swin's, indexed by query minus key; the op reads the mirrored table (key minus query).

    Any input size: per dimension a map not larger than the window becomes the window with no shift
    (:func:`fit_window_shift`, the centre crop of the table is used); otherwise the map is zero padded
    at the end to a multiple of the window, laid out as timm's Swin does (see :func:`_padded_layout`),
    so outputs equal timm's at every size its Swin is built for. Padded tokens take part as keys, as
    in timm and the official detection backbone.

    ``pad_before_shift=True`` is the official detection / segmentation layout (Swin's detection
    code, mmdet's and mmseg's ``SwinTransformer``): the window and shift are kept at every map size,
    the map is zero padded at the end to a multiple of the window and the grid is shifted on the
    padded map (their roll after padding: partial windows ``[0, shift)`` and the last
    ``window - shift`` padded positions).

    Args:
        dim: channels ``C``; must be divisible by ``num_heads``.
        num_heads: attention heads.
        window_size: window, int or ``(h, w)``.
        shift_size: offset of the window grid, int or ``(h, w)``, ``0 <= shift < window``
            (Swin: ``window // 2`` on odd blocks).
        qkv_bias: bias in the qkv projection.
        attn_drop: must be 0: the softmax happens inside the op.
        proj_drop: dropout after the output projection.
        pad_before_shift: the official dense layout above instead of timm's.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: _size_2_t = 7,
        shift_size: _size_2_t = 0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pad_before_shift: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if attn_drop:
            raise ValueError(
                f"attn_drop={attn_drop} is not supported: the window op computes the softmax inside, "
                "there is no attention matrix to drop out of"
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = to_2tuple(window_size)
        self.shift_size = to_2tuple(shift_size)
        self.pad_before_shift = pad_before_shift
        if min(self.window_size) < 1:
            raise ValueError(f"window_size must be >= 1, got {self.window_size}")
        if not all(0 <= s < w for s, w in zip(self.shift_size, self.window_size)):
            raise ValueError(f"shift_size {self.shift_size} must be in [0, window_size) = [0, {self.window_size})")

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        height, width = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * height - 1) * (2 * width - 1), num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        text = f"num_heads={self.num_heads}, window_size={self.window_size}, shift_size={self.shift_size}"
        return text + (", pad_before_shift=True" if self.pad_before_shift else "")

    def rpb(self) -> torch.Tensor:
        """The bias table in the op's layout, ``[num_heads, 2h-1, 2w-1]`` indexed by key minus query:
        Swin's query-minus-key table, mirrored."""
        return rpb_from_query_minus_key_table(self.relative_position_bias_table, self.window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, H, W, C]`` -> ``[B, H, W, C]``."""
        if x.dim() != 4:
            raise ValueError(f"WindowAttention expects [B, H, W, C], got shape {tuple(x.shape)}")
        batch, height, width, channels = x.shape
        if self.pad_before_shift:
            window, shift = self.window_size, self.shift_size
        else:
            window, shift = fit_window_shift((height, width), self.window_size, self.shift_size)
        rpb = self.rpb()
        if window != self.window_size:
            rpb = crop_rel_pos_table(rpb, window)
        # padding before the shift is plain zero padding at the end (the layout of no shift)
        layout_shift = (0, 0) if self.pad_before_shift else shift
        layouts = [
            _padded_layout(size, w, s) if size % w else None
            for size, w, s in zip((height, width), window, layout_shift)
        ]
        for dim, layout in enumerate(layouts, start=1):
            if layout is not None:
                x = _pad(x, dim, layout)
        padded_height, padded_width = x.shape[1:3]
        q, k, v = (t.view(batch, padded_height, padded_width, self.num_heads, self.head_dim)
                   for t in split_linear(x, self.qkv, 3))
        x = na2d(q, k, v, kernel_size=window, stride=window, scale=self.scale, rpb=rpb, shift=shift)
        for dim, layout in enumerate(layouts, start=1):
            if layout is not None:
                x = x.index_select(dim, layout[1].to(x.device))
        x = linear(x.reshape(batch, height, width, channels), self.proj)
        return self.proj_drop(x)
