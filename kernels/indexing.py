"""Index math of generalized neighborhood attention (GNA), one spatial dimension at a time.

Per dimension, with window (kernel) ``w``, dilation ``d``, stride ``s`` and a causal flag:

* token ``x`` belongs to dilation group ``g = x % d`` at group coordinate ``i = x // d``; a group
  has ``L_g = L // d + (g < L % d)`` tokens, and queries only see keys of their own group;
* non-causal: the window of the stride-group leader ``l = min(i // s * s + s // 2, L_g - 1)``
  is ``[start, start + w)`` with its centre clamped to ``[left, L_g - 1 - right]`` (windows shift
  at borders, they are never zero padded);
* causal: ``l = min(i // s * s + s - 1, L_g - 1)``, ``start = max(l - w + 1, 0)``, ``end = i + 1``;
* shifted blocked windows (``shift = o > 0``, only with ``s == w``, ``d == 1``, non-causal): the
  window grid starts ``o`` tokens in, so the windows are the cells ``[0, o)``, ``[o, o + w)``, ...,
  the last one ending at ``L``: cells at the borders are partial. Query ``i`` is in cell
  ``c = (i + w - o) // w`` and attends ``[max(0, (c - 1) * w + o), min(L, c * w + o))``. This is
  Swin's shifted window attention without the cyclic roll (its -100 mask keeps tokens of different
  cells apart).

The n-D mask is the AND of the per-dimension masks. Every backend builds on these functions.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch

from .checks import NeighborhoodParams


def window_bounds(
    length: int, kernel_size: int, stride: int = 1, dilation: int = 1, is_causal: bool = False, shift: int = 0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position ``(group, coord, start, end)`` for one dimension of length ``length``.

    ``start``/``end`` are in group coordinates: position ``x`` attends the keys
    ``group[x] + dilation * j`` for ``j`` in ``[start[x], end[x])``. All are int64 ``[length]``.
    ``shift > 0``: the shifted blocked windows of the module docstring.
    """
    position = torch.arange(length)
    group = position % dilation
    coord = position // dilation
    group_length = length // dilation + (group < length % dilation).long()
    if shift:
        cell = (coord + kernel_size - shift) // kernel_size
        start = ((cell - 1) * kernel_size + shift).clamp(min=0)
        end = (cell * kernel_size + shift).clamp(max=length)
    elif is_causal:
        leader = torch.minimum(coord // stride * stride + stride - 1, group_length - 1)
        start = (leader - kernel_size + 1).clamp(min=0)
        end = coord + 1
    else:
        left = kernel_size // 2
        right = kernel_size // 2 + kernel_size % 2 - 1
        leader = torch.minimum(coord // stride * stride + stride // 2, group_length - 1)
        start = (leader - left).clamp(min=0) + (leader + right >= group_length).long() * (
            group_length - right - leader - 1
        )
        end = start + kernel_size
    return group, coord, start, end


def mask_1d(length: int, kernel_size: int, stride: int = 1, dilation: int = 1, is_causal: bool = False,
            shift: int = 0) -> torch.Tensor:
    """Boolean ``[length (query), length (key)]`` neighborhood mask of one dimension."""
    group, coord, start, end = window_bounds(length, kernel_size, stride, dilation, is_causal, shift)
    same_group = group[:, None] == group[None, :]
    key_coord = coord[None, :]
    return same_group & (key_coord >= start[:, None]) & (key_coord < end[:, None])


def relative_offset(query_coord, key_coord, kernel_size: int):
    """Index into an rpb axis of size ``2k-1`` of a (query, key) pair along one dimension: key minus
    query in group coordinates, plus ``k - 1``. Every backend indexes its bias through this."""
    return key_coord - query_coord + kernel_size - 1


def pad_to_3d(spatial: Sequence[int], params: NeighborhoodParams) -> Tuple[Tuple[int, ...], NeighborhoodParams]:
    """``(spatial, params)`` of a 1D/2D problem as a 3D one, with leading dimensions of length 1 and
    kernel 1 (the C++ and Triton kernels are written for 3D)."""
    pad = 3 - len(spatial)
    return (1,) * pad + tuple(spatial), NeighborhoodParams(
        (1,) * pad + tuple(params.kernel_size),
        (1,) * pad + tuple(params.stride),
        (1,) * pad + tuple(params.dilation),
        (False,) * pad + tuple(params.is_causal),
        (0,) * pad + tuple(params.shift),
    )


@functools.lru_cache(maxsize=128)
def disjoint_blocks(spatial: Tuple[int, ...], params: NeighborhoodParams) -> Optional[Tuple[int, ...]]:
    """Blocks per dilation group in each dimension when the windows cut every group into disjoint
    blocks of exactly ``kernel_size`` tokens (non-causal only), else None.

    Then every query of a block attends to every key of its block and to nothing else: the op is
    block-diagonal dense attention. Two geometries do this: blocked / window attention
    (``stride == kernel_size`` and group lengths divisible by it), and windows that span their whole
    dilation group (``kernel_size * dilation == length``, any stride), which is every dilated DiNAT
    layer at its training resolution. Decided from :func:`window_bounds`: position
    ``(b * kernel_size + c) * dilation + g`` must attend block ``b`` of group ``g``.
    """
    blocks = []
    for dim, length in enumerate(spatial):
        kernel, dilation = params.kernel_size[dim], params.dilation[dim]
        if params.is_causal[dim] or params.shift[dim] or length % (kernel * dilation):
            return None  # shifted windows: partial cells at the borders
        _, coord, start, _ = window_bounds(length, kernel, params.stride[dim], dilation, False)
        if not torch.equal(start, coord // kernel * kernel):
            return None
        blocks.append(length // (kernel * dilation))
    return tuple(blocks)


def neighborhood_mask(spatial: Sequence[int], params: NeighborhoodParams) -> torch.Tensor:
    """Boolean ``[N, N]`` mask over row-major flattened positions (``N = prod(spatial)``)."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    for dim, length in enumerate(spatial):
        mask_dim = mask_1d(
            length, params.kernel_size[dim], params.stride[dim], params.dilation[dim], params.is_causal[dim],
            params.shift[dim],
        )
        mask = (mask[:, None, :, None] & mask_dim[None, :, None, :]).reshape(mask.shape[0] * length, -1)
    return mask


@functools.lru_cache(maxsize=64)
def window_keys(spatial: Tuple[int, ...], params: NeighborhoodParams
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The keys of every query's window: ``(keys, valid, rel)``, each ``[N, K]`` over row-major flat
    positions (``N = prod(spatial)``, ``K = prod(kernel_size)``): the flat key positions, whether
    the slot is part of the window (causal windows near the start and shifted cells at the borders
    hold fewer keys; their other slots repeat the last key), and the flat index into
    ``rpb.reshape(heads, -1)``."""
    keys = valid = rel = None
    for dim, length in enumerate(spatial):
        kernel = params.kernel_size[dim]
        group, coord, start, end = window_bounds(length, kernel, params.stride[dim], params.dilation[dim],
                                                 params.is_causal[dim], params.shift[dim])
        key_coord = start[:, None] + torch.arange(kernel)
        valid_dim = key_coord < end[:, None]
        key_coord = torch.minimum(key_coord, end[:, None] - 1)
        keys_dim = group[:, None] + params.dilation[dim] * key_coord
        rel_dim = relative_offset(coord[:, None], key_coord, kernel)
        if keys is None:
            keys, valid, rel = keys_dim, valid_dim, rel_dim
            continue
        rows, slots = keys.shape[0] * length, keys.shape[1] * kernel
        keys = (keys[:, None, :, None] * length + keys_dim[None, :, None, :]).reshape(rows, slots)
        valid = (valid[:, None, :, None] & valid_dim[None, :, None, :]).reshape(rows, slots)
        rel = (rel[:, None, :, None] * (2 * kernel - 1) + rel_dim[None, :, None, :]).reshape(rows, slots)
    return keys, valid, rel


def relative_index(spatial: Sequence[int], params: NeighborhoodParams) -> torch.Tensor:
    """``[N, N]`` flat index into ``rpb.reshape(heads, -1)`` for every (query, key) pair of a dense
    formulation; only meaningful where :func:`neighborhood_mask` is true (clamped elsewhere)."""
    index = torch.zeros(1, 1, dtype=torch.long)
    for dim, length in enumerate(spatial):
        kernel = params.kernel_size[dim]
        coord = torch.arange(length) // params.dilation[dim]
        index_dim = relative_offset(coord[:, None], coord[None, :], kernel).clamp(0, 2 * kernel - 2)
        index = (index[:, None, :, None] * (2 * kernel - 1) + index_dim[None, :, None, :]).reshape(
            index.shape[0] * length, -1
        )
    return index


def attention_density(spatial: Sequence[int], params: NeighborhoodParams) -> float:
    """Fraction of the dense ``N x N`` attention matrix that the neighborhood mask keeps."""
    density = 1.0
    for dim, length in enumerate(spatial):
        mask_dim = mask_1d(
            length, params.kernel_size[dim], params.stride[dim], params.dilation[dim], params.is_causal[dim],
            params.shift[dim],
        )
        density *= mask_dim.float().mean().item()
    return density
