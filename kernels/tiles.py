"""Tile shapes of the tiled kernels, chosen from one work model, and the Triton tiling analysis.

Every tiled kernel cuts the queries of one dilation group into tiles of consecutive tokens per
dimension; a query tile computes against the union of its queries' windows, its *key halo*. Per
dimension that union is the interval ``[start(first query), end(last query))`` (window starts and
ends never decrease along a dimension): :func:`halo_spans`. Because the mask is an AND over
dimensions, the work of an n-D tile shape is a product of per-dimension sums, cheap enough to
choose tile shapes at run time. One chooser per kernel:

* :func:`cpu_window_tile`: the C++ window kernel (:mod:`.native`): at most one vector of queries,
  least ``sum over tiles of halo length`` (multiply-adds of its GEMMs);
* :func:`torch_query_tile`: the portable path (:mod:`.portable`): a fixed rule, tiles large enough
  that batched matmuls are not dominated by per-tile overhead;
* :func:`triton_tiles`: the Triton kernels (:mod:`.triton_na`): query and key/value tiles of fixed
  volume that minimise the tile pairs computed. The Triton kernels walk the halo in steps of the
  KV tile starting at its first key (tiles are not aligned to a global grid), and the backward
  key/value-stationary kernel does the converse: a KV tile visits the query tiles of its *inverse
  neighborhood* (:func:`inverse_window`). :func:`tiling_analysis` reports how well they fit a shape.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Dict, List, Sequence, Tuple

from .checks import NeighborhoodParams
from .indexing import attention_density, pad_to_3d, window_bounds

#: Tokens per query tile and per key/value tile of the Triton kernels (both powers of two).
Q_TILE_VOLUME = 64
KV_TILE_VOLUME = 64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def inverse_window(
    first: int, last: int, group_length: int, kernel_size: int, stride: int, is_causal: bool, shift: int = 0
) -> Tuple[int, int]:
    """Queries (inclusive range, group coordinates) whose windows contain a key in ``[first, last]``.

    Closed form of the inverse neighborhood along one dimension; the Triton backward kernel uses
    the same expressions. ``0 <= first <= last < group_length`` and ``kernel_size <= group_length``.
    """
    if shift:
        # shifted blocked windows are cells: the queries of the cells of first and last
        lo = max(0, (first + kernel_size - shift) // kernel_size * kernel_size - kernel_size + shift)
        hi = min(group_length, (last + kernel_size - shift) // kernel_size * kernel_size + shift) - 1
        return lo, hi
    if is_causal:
        # query i sees keys [max(leader - w + 1, 0), i]: i >= first, and the leader of i's stride
        # group must satisfy leader - w + 1 <= last.
        lo = first
        if last + kernel_size - 1 >= group_length - 1:
            hi = group_length - 1
        else:
            hi = min((last + kernel_size - stride) // stride * stride + stride - 1, group_length - 1)
        return lo, hi
    left = kernel_size // 2
    right = kernel_size // 2 + kernel_size % 2 - 1
    # window start of stride group q: clamp(leader_q - left, 0, L - w), leader_q = q*s + s//2 (clamped)
    if first - kernel_size + 1 <= 0:
        lo = 0
    else:
        lo = _cdiv(first - right - stride // 2, stride) * stride
    if last >= group_length - kernel_size:
        hi = group_length - 1
    else:
        hi = min((last + left - stride // 2) // stride * stride + stride - 1, group_length - 1)
    return lo, hi


@functools.lru_cache(maxsize=1024)
def _group_windows(
    length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool, shift: int = 0
) -> List[Tuple[List[int], List[int]]]:
    """Per dilation group: (window starts, window ends) per query, in group coordinates."""
    _, _, start, end = window_bounds(length, kernel_size, stride, dilation, is_causal, shift)
    return [(start[group::dilation].tolist(), end[group::dilation].tolist()) for group in range(dilation)]


@functools.lru_cache(maxsize=4096)
def halo_spans(length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool,
               q_tile: int, shift: int = 0) -> Tuple[int, ...]:
    """Along one dimension: the keys spanned by the windows of each query tile (``q_tile``
    consecutive queries of a dilation group, the last tile of a group possibly shorter), over all
    dilation groups in order."""
    spans = []
    for starts, ends in _group_windows(length, kernel_size, stride, dilation, is_causal, shift):
        for first in range(0, len(starts), q_tile):
            last = min(first + q_tile, len(starts)) - 1
            spans.append(ends[last] - starts[first])
    return tuple(spans)


@functools.lru_cache(maxsize=4096)
def _dim_visits(
    length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool, q_tile: int, kv_tile: int,
    shift: int = 0,
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Along one dimension: KV tiles visited by each (non-empty) query tile, and query tiles
    visited by each key/value tile in the backward pass, over all dilation groups."""
    spans = halo_spans(length, kernel_size, stride, dilation, is_causal, q_tile, shift)
    kv_per_q = [_cdiv(span, kv_tile) for span in spans]
    q_per_kv = []
    for starts, _ in _group_windows(length, kernel_size, stride, dilation, is_causal, shift):
        group_length = len(starts)
        for first in range(0, group_length, kv_tile):
            last = min(first + kv_tile, group_length) - 1
            lo, hi = inverse_window(first, last, group_length, kernel_size, stride, is_causal, shift)
            q_per_kv.append(_cdiv(hi - lo + 1, q_tile))
    return tuple(kv_per_q), tuple(q_per_kv)


def _tile_shapes(spatial: Sequence[int], volume: int) -> List[Tuple[int, ...]]:
    """Power-of-two tile shapes with ``volume`` tokens; size-1 dimensions keep a tile of 1."""
    exponent = int(math.log2(volume))
    free = [dim for dim, length in enumerate(spatial) if length > 1] or [len(spatial) - 1]
    shapes = []
    for split in itertools.product(range(exponent + 1), repeat=len(free)):
        if sum(split) == exponent:
            shape = [1] * len(spatial)
            for dim, power in zip(free, split):
                shape[dim] = 2**power
            shapes.append(tuple(shape))
    return shapes


def _work(spatial, params, q_tile, kv_tile, backward: bool) -> int:
    """Tile pairs computed by one (batch, head): forward = sum over query tiles of KV tiles
    visited; backward (KV-stationary) = sum over KV tiles of query tiles visited."""
    total = 1
    for dim, length in enumerate(spatial):
        visits = _dim_visits(length, params.kernel_size[dim], params.stride[dim], params.dilation[dim],
                             params.is_causal[dim], q_tile[dim], kv_tile[dim], params.shift[dim])
        total *= sum(visits[1] if backward else visits[0])
    return total


@functools.lru_cache(maxsize=128)
def cpu_window_tile(spatial: Tuple[int, ...], params: NeighborhoodParams, lanes: int) -> Tuple[int, int, int]:
    """Queries per tile along each (3D-padded) dimension for the C++ window kernel: the shape of at
    most ``lanes`` queries whose tiles, with their halos of keys, add up to the least GEMM work
    (``prod over dims of sum over tiles of halo length``; fewer tiles on ties). Sizes are powers of
    two, never more than twice a dimension's group length."""
    spatial, params = pad_to_3d(spatial, params)
    options = []
    for length, kernel, stride, dilation, causal, shift in zip(spatial, params.kernel_size, params.stride,
                                                               params.dilation, params.is_causal, params.shift):
        sizes = [1 << i for i in range(lanes.bit_length()) if (1 << i) <= lanes]
        spans = {t: halo_spans(length, kernel, stride, dilation, causal, t, shift)
                 for t in sizes if t == 1 or t // 2 < _cdiv(length, dilation)}
        options.append({t: (sum(s), len(s)) for t, s in spans.items()})
    best = None
    for (t0, w0), (t1, w1), (t2, w2) in itertools.product(*(o.items() for o in options)):
        if t0 * t1 * t2 > lanes:
            continue
        key = (w0[0] * w1[0] * w2[0], w0[1] * w1[1] * w2[1])
        if best is None or key < best[0]:
            best = (key, (t0, t1, t2))
    return best[1]


def torch_query_tile(spatial: Sequence[int], params: NeighborhoodParams) -> Tuple[int, ...]:
    """Query tile per dimension of the portable path: small enough that the halo overhead stays low,
    large enough that the batched matmuls are not dominated by per-tile overhead."""
    tiles = []
    for length, kernel, stride in zip(spatial, params.kernel_size, params.stride):
        tile = max(stride, min(kernel, 8)) if len(spatial) > 1 else max(stride, 4 * kernel, 32)
        tiles.append(min(tile, length))
    return tuple(tiles)


@functools.lru_cache(maxsize=256)
def triton_tiles(
    spatial: Tuple[int, ...],
    params: NeighborhoodParams,
    backward: bool = False,
    q_volume: int = Q_TILE_VOLUME,
    kv_volume: int = KV_TILE_VOLUME,
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Query and KV tile shapes (``q_volume`` / ``kv_volume`` tokens, powers of two >= 16 for
    the kernels) that minimise the number of tile pairs computed: by the Q-stationary forward (and
    dQ) pass, or with ``backward=True`` by the KV-stationary dK/dV pass. Ties go to the first
    candidate (the one with the larger tiles in the last dimensions)."""
    spatial = tuple(spatial)
    best = None
    for q_tile in _tile_shapes(spatial, q_volume):
        for kv_tile in _tile_shapes(spatial, kv_volume):
            work = _work(spatial, params, q_tile, kv_tile, backward)
            if best is None or work < best[0]:
                best = (work, q_tile, kv_tile)
    return best[1], best[2]


def tiling_analysis(
    spatial: Sequence[int],
    params: NeighborhoodParams,
    q_tile: Sequence[int] = None,
    kv_tile: Sequence[int] = None,
) -> Dict[str, object]:
    """How well the GNA tiling of the Triton kernels fits one problem (per batch and head).

    Args:
        spatial: token grid, e.g. ``(56, 56)``.
        params: a :class:`NeighborhoodParams` (see :func:`visionzoo.kernels.make_params`).
        q_tile, kv_tile: tile shapes; default: what the kernels pick (:func:`triton_tiles`).

    Returns a dict with ``q_tile``, ``kv_tile``, ``q_tiles`` (non-empty query tiles),
    ``kv_tiles_visited_max`` / ``kv_tiles_visited_mean`` (per query tile), ``kv_tiles_min``
    (fewest KV tiles that can cover one query's window), ``dense_kv_tiles`` (KV tiles a dense
    kernel visits per query tile), ``speed_of_light`` (= dense / max visited: the best speedup over
    a dense kernel with the same tiles), ``tile_efficiency`` (useful / computed logits),
    ``density`` and ``mask_bound`` (= 1 / density, the bound without tiles), and the same visit
    counts for the KV-stationary backward pass (``q_tiles_visited_max`` / ``_mean``).
    """
    spatial = tuple(int(length) for length in spatial)
    if len(spatial) != params.num_dims:
        raise ValueError(f"tiling_analysis: spatial {spatial} does not match {params.num_dims}-D params")
    if q_tile is None or kv_tile is None:
        chosen_q, chosen_kv = triton_tiles(spatial, params)
        q_tile = tuple(q_tile) if q_tile is not None else chosen_q
        kv_tile = tuple(kv_tile) if kv_tile is not None else chosen_kv
    q_tile, kv_tile = tuple(q_tile), tuple(kv_tile)
    kv_max = kv_sum = q_max = q_sum = 1
    num_q_tiles = num_kv_tiles = 1
    for dim, length in enumerate(spatial):
        kv_per_q, q_per_kv = _dim_visits(length, params.kernel_size[dim], params.stride[dim], params.dilation[dim],
                                         params.is_causal[dim], q_tile[dim], kv_tile[dim], params.shift[dim])
        kv_max, kv_sum, num_q_tiles = kv_max * max(kv_per_q), kv_sum * sum(kv_per_q), num_q_tiles * len(kv_per_q)
        q_max, q_sum, num_kv_tiles = q_max * max(q_per_kv), q_sum * sum(q_per_kv), num_kv_tiles * len(q_per_kv)
    tokens = math.prod(spatial)
    kv_volume, q_volume = math.prod(kv_tile), math.prod(q_tile)
    dense_kv_tiles = _cdiv(tokens, kv_volume)
    density = attention_density(spatial, params)
    return {
        "spatial": spatial,
        "q_tile": q_tile,
        "kv_tile": kv_tile,
        "q_tiles": num_q_tiles,
        "kv_tiles_visited_max": kv_max,
        "kv_tiles_visited_mean": kv_sum / num_q_tiles,
        "kv_tiles_min": math.prod(_cdiv(k, t) for k, t in zip(params.kernel_size, kv_tile)),
        "dense_kv_tiles": dense_kv_tiles,
        "speed_of_light": dense_kv_tiles / kv_max,
        "tile_efficiency": density * tokens * tokens / (kv_sum * q_volume * kv_volume),
        "density": density,
        "mask_bound": 1.0 / density,
        "kv_tiles": num_kv_tiles,
        "q_tiles_visited_max": q_max,
        "q_tiles_visited_mean": q_sum / num_kv_tiles,
    }
