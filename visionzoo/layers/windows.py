"""Cutting a channels-last map into windows once, and putting it back (MambaVision's stages, 2D merging)."""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function, to_2tuple

__all__ = ["window_partition", "window_reverse"]

_size_2_t = Union[int, Tuple[int, int]]


@register_notrace_function  # pads to the input's shape: a leaf for torch.fx
def window_partition(x: torch.Tensor, window: _size_2_t) -> torch.Tensor:
    """``[B, H, W, C]`` zero padded at the bottom / right to multiples of ``window`` (``h`` or ``(h, w)``)
    -> ``[B * rows * cols, h * w, C]``, windows row-major, tokens row-major inside each."""
    window_h, window_w = to_2tuple(window)
    batch, height, width, channels = x.shape
    pad_h, pad_w = -height % window_h, -width % window_w
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    rows, cols = (height + pad_h) // window_h, (width + pad_w) // window_w
    x = x.reshape(batch, rows, window_h, cols, window_w, channels).transpose(2, 3)
    return x.reshape(batch * rows * cols, window_h * window_w, channels)


@register_notrace_function  # reads the windows' shape: a leaf for torch.fx
def window_reverse(windows: torch.Tensor, window: _size_2_t, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B * rows * cols, h * w, C]`` -> ``[B, H, W, C]`` without
    the padding."""
    window_h, window_w = to_2tuple(window)
    rows, cols = -(-height // window_h), -(-width // window_w)
    channels = windows.shape[-1]
    x = windows.reshape(-1, rows, cols, window_h, window_w, channels).transpose(2, 3)
    return x.reshape(-1, rows * window_h, cols * window_w, channels)[:, :height, :width]
