"""Relative position bias tables: index conventions, cropping to a smaller window, resizing.

A window of ``(h, w)`` tokens has ``(2h-1) * (2w-1)`` relative offsets. Two conventions index the
table with them:

* Swin (timm ``WindowAttention.relative_position_index``): **query minus key**, table
  ``relative_position_bias_table [(2h-1)*(2w-1), num_heads]``, see
  :func:`relative_position_index_query_minus_key`;
* NAT / DiNAT (NATTEN's ``rpb``): **key minus query**, table ``rpb [num_heads, 2h-1, 2w-1]``,
  see :func:`relative_position_index_key_minus_query`.

Both return a flat index ``[h*w, h*w]`` (query, key) into the table's ``(2h-1)*(2w-1)`` offsets, row
major (``(dy + h - 1) * (2w - 1) + (dx + w - 1)``). The two are transposes of each other, so one
table read with the other convention is the same bias mirrored.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from timm.layers import resize_rel_pos_bias_table, to_2tuple

__all__ = [
    "crop_rel_pos_table",
    "rpb_from_query_minus_key_table",
    "relative_position_index_key_minus_query",
    "relative_position_index_query_minus_key",
    "resize_rel_pos_table",
]

_size_2_t = Union[int, Tuple[int, int]]


def _offsets(window_size: Tuple[int, int]) -> torch.Tensor:
    """``[h*w, h*w, 2]`` query-minus-key offsets ``(dy, dx)`` of a window, row-major tokens."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size[0]), torch.arange(window_size[1]), indexing="ij"))
    coords = coords.flatten(1)  # [2, N]
    return (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)


def _flat_index(offsets: torch.Tensor, window_size: Tuple[int, int]) -> torch.Tensor:
    height, width = window_size
    return (offsets[..., 0] + height - 1) * (2 * width - 1) + offsets[..., 1] + width - 1


def relative_position_index_query_minus_key(window_size: _size_2_t) -> torch.Tensor:
    """Swin's index: ``[h*w, h*w]`` (query, key) -> offset ``query - key`` in a ``(2h-1)*(2w-1)`` table.

    Gather a bias with ``table[index.view(-1)].view(N, N, num_heads).permute(2, 0, 1)`` for a
    ``[(2h-1)*(2w-1), num_heads]`` table, giving ``[num_heads, N, N]``.
    """
    window_size = to_2tuple(window_size)
    return _flat_index(_offsets(window_size), window_size)


def relative_position_index_key_minus_query(window_size: _size_2_t) -> torch.Tensor:
    """NAT's index: ``[h*w, h*w]`` (query, key) -> offset ``key - query`` in a ``(2h-1)*(2w-1)`` table.

    For an ``rpb [num_heads, 2h-1, 2w-1]`` table, ``rpb.flatten(1)[:, index]`` is the
    ``[num_heads, N, N]`` bias that neighborhood attention adds when its window covers the whole
    ``(h, w)`` feature map.
    """
    window_size = to_2tuple(window_size)
    return _flat_index(-_offsets(window_size), window_size)


def rpb_from_query_minus_key_table(table: torch.Tensor, window_size: _size_2_t) -> torch.Tensor:
    """Swin's ``[(2h-1)*(2w-1), num_heads]`` query-minus-key table as the ops' ``rpb``
    ``[num_heads, 2h-1, 2w-1]`` indexed by key minus query: the same biases, mirrored."""
    height, width = to_2tuple(window_size)
    return table.t().reshape(table.shape[1], 2 * height - 1, 2 * width - 1).flip(1, 2)


def crop_rel_pos_table(table: torch.Tensor, window_size: _size_2_t) -> torch.Tensor:
    """The offsets of a smaller window: centre crop of ``[..., 2H-1, 2W-1]`` to ``[..., 2h-1, 2w-1]``.

    Exact (no interpolation): offset ``-(h-1)..(h-1)`` sits at ``H-h .. H+h-2`` of the full table. Used
    when a window is clamped to a feature map smaller than it.
    """
    height, width = to_2tuple(window_size)
    full_height, full_width = (table.shape[-2] + 1) // 2, (table.shape[-1] + 1) // 2
    if not (1 <= height <= full_height and 1 <= width <= full_width):
        raise ValueError(
            f"window_size {(height, width)} must be between 1 and the table's window {(full_height, full_width)}"
        )
    return table[..., full_height - height : full_height + height - 1, full_width - width : full_width + width - 1]


def resize_rel_pos_table(
    table: torch.Tensor,
    window_size: _size_2_t,
    old_window_size: Optional[_size_2_t] = None,
) -> torch.Tensor:
    """A table of a checkpoint trained at another window, interpolated to ``window_size``.

    Accepts NAT's ``[num_heads, 2h-1, 2w-1]`` or Swin's flat ``[(2h-1)*(2w-1), num_heads]`` layout
    (``old_window_size`` is needed for a flat non-square source) and returns the same layout for
    ``window_size``. The offsets are resampled on a geometric grid (timm's
    ``resize_rel_pos_bias_table``, as BEiT / Swin checkpoints are fine-tuned at a new window), so
    nearby offsets keep their values most closely. A table already for ``window_size`` is returned as is.
    """
    height, width = to_2tuple(window_size)
    if table.ndim == 3:
        new_shape: Tuple[int, ...] = (table.shape[0], 2 * height - 1, 2 * width - 1)
    elif table.ndim == 2:
        new_shape = ((2 * height - 1) * (2 * width - 1), table.shape[1])
    else:
        raise ValueError(f"table must be [num_heads, 2h-1, 2w-1] or [(2h-1)*(2w-1), num_heads], got {tuple(table.shape)}")
    if tuple(table.shape) == new_shape:
        return table
    old = None if old_window_size is None else to_2tuple(old_window_size)
    return resize_rel_pos_bias_table(table, new_window_size=(height, width), new_bias_shape=new_shape, old_window_size=old)
