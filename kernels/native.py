"""Fused C++ kernels for neighborhood attention on CPU (forward and backward): a tiled window kernel
for any neighborhood (``na_forward`` / ``na_backward``) and one for windows that are disjoint blocks
(``block_forward`` / ``block_backward``, used by :mod:`.blocked`).

The kernels (``csrc/``) are plain C++ with OpenMP and no torch headers, built with the system
compiler on first use for this CPU's instruction set and cached (:mod:`.build`). The window kernel
takes tiles of up to one vector of queries (:func:`_tile_shape`: 4x4 for 7x7 windows in float32 on
AVX-512, 2x4 on AVX2) and runs register-blocked GEMMs over the halo of keys
their windows span, masking each query to its own window; the block kernel runs dense attention per
block. If no compiler is found or the build fails, :func:`available` returns False with the reason
in :func:`unavailable_reason`; ``backend="auto"`` then runs the ``torch`` path and ``backend="cpu"`` raises with the reason;
``VISIONZOO_NATIVE=0`` turns the kernels off.

The index math stays in :mod:`.indexing`: per dimension, this module turns
:func:`~visionzoo.kernels.indexing.window_bounds` into the tables the kernels walk (first key, key
count and first rpb index of every position; the tokens of every block).
"""
from __future__ import annotations

import ctypes
import functools
import math
from typing import Optional, Tuple

import torch

from . import tiles
from .build import cache_dir, isa, library, unavailable_reason, vector_bytes  # noqa: F401 (the build's API)
from .build import available as _available
from .checks import NeighborhoodParams
from .indexing import disjoint_blocks, pad_to_3d, relative_offset, window_bounds
from .reference import compute_dtype


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the native kernel can be used (builds it on first call). A constant to
    ``torch.compile``, which runs it eagerly instead of tracing the build and its lock."""
    return _available()


# ----------------------------------------------------------------------------------------------
# geometry tables
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=128)
def _tables(spatial: Tuple[int, ...], params: NeighborhoodParams) -> Tuple[torch.Tensor, Tuple[int, ...], int]:
    """``(tables [3 * (L0 + L1 + L2)] int64, per-dim (length, dilation, rpb stride), max keys)`` with
    1D/2D problems padded to 3D by leading dimensions of length 1."""
    max_keys, pad = math.prod(params.kernel_size), 3 - len(spatial)
    spatial, params = pad_to_3d(spatial, params)
    first, count, rfirst, dims = [], [], [], []
    rpb_extent = [2 * k - 1 for k in params.kernel_size]
    for i in range(3):
        kernel, dilation = params.kernel_size[i], params.dilation[i]
        group, coord, start, end = window_bounds(spatial[i], kernel, params.stride[i], dilation, params.is_causal[i],
                                                 params.shift[i])
        first.append(group + dilation * start)
        count.append(end - start)
        rfirst.append(relative_offset(coord, start, kernel))
        dims.append((spatial[i], dilation, math.prod(rpb_extent[i + 1:]) if i >= pad else 0))
    tables = torch.cat(first + count + rfirst).contiguous()
    return tables, tuple(dims), max_keys


def _geometry(query: torch.Tensor, params: NeighborhoodParams, rpb: Optional[torch.Tensor]):
    spatial = tuple(query.shape[1:-2])
    tables, dims, max_keys = _tables(spatial, params)
    rpb_size = rpb[0].numel() if rpb is not None else 0
    geom = torch.tensor(
        [query.shape[0], *(d[0] for d in dims), query.shape[-2], query.shape[-1], *(d[1] for d in dims),
         *(d[2] for d in dims), rpb_size, int(rpb is not None), max_keys],
        dtype=torch.long,
    )
    return geom, tables


def _ptr(x: Optional[torch.Tensor]):
    return None if x is None else ctypes.c_void_p(x.data_ptr())


def _prepare(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a contiguous tensor of ``dtype`` (itself when it is one already: these wrappers run
    right after kernels that leave the caches cold, where every torch call costs several us)."""
    return x if x.dtype == dtype and x.is_contiguous() else x.to(dtype).contiguous()


def _restore(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _kept(name: str, probs: Optional[torch.Tensor], numel: int, query: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a backward got the probabilities its forward kept (not None, not empty); ValueError if
    they are not the ``numel`` elements of ``dtype`` that the forward keeps for ``query``."""
    if probs is None or probs.numel() == 0:
        return False
    if probs.dtype != dtype or probs.numel() != numel:
        raise ValueError(f"{name}: probs of {probs.numel()} {probs.dtype} elements do not belong to query "
                         f"{list(query.shape)} {dtype}")
    return True


def _suffix(dtype: torch.dtype) -> str:
    return "f64" if dtype == torch.float64 else "f32"


@functools.lru_cache(maxsize=128)
def _tile_shape(spatial: Tuple[int, ...], params: NeighborhoodParams, lanes: int) -> torch.Tensor:
    """The window kernel's queries per tile along each (3D-padded) dimension
    (:func:`~visionzoo.kernels.tiles.cpu_window_tile`), as the tensor the kernel reads."""
    return torch.tensor(tiles.cpu_window_tile(spatial, params, lanes), dtype=torch.long)


SAVES_PROBABILITIES = True  # na_forward / na_backward take and give the saved probabilities


def keeps_probabilities(query_shape, params: NeighborhoodParams) -> bool:
    """Whether a training forward keeps the attention probabilities (then the backward recomputes
    neither ``Q K^T`` nor the softmax), for the window kernel and both block implementations
    (:mod:`.blocked`): when a window has at most twice as many keys as the head dim, so that they
    take at most twice the memory of the query (7x7 windows at head dim 32, as in NAT/DiNAT). Larger
    windows (wide window attention) recompute them, as flash attention does, rather than keep
    ``K / head_dim`` query-sized tensors per layer."""
    return math.prod(params.kernel_size) <= 2 * query_shape[-1]


def probabilities_numel(query_shape, params: NeighborhoodParams) -> int:
    """Elements of the probabilities a training forward of the window kernel keeps, 0 when it keeps
    none (:func:`keeps_probabilities`): room for ``prod(kernel_size)`` keys per query (a polynomial in
    the shape, so the fake implementation sizes it under dynamic shapes too). The kernel packs the
    attended pairs of every (batch, head) one after the other; only causal windows near the start
    hold fewer keys, and leave the end unused."""
    if not keeps_probabilities(query_shape, params):
        return 0
    return query_shape[0] * query_shape[-2] * math.prod(query_shape[1:-2]) * math.prod(params.kernel_size)


def na_forward(query, key, value, rpb, params: NeighborhoodParams, scale: float, save_probabilities: bool = False):
    """Fused forward on CPU tensors ``[B, *spatial, H, D]``; returns ``(out, lse [B, *spatial, H],
    probabilities)``: with ``save_probabilities`` (and :func:`keeps_probabilities`) the softmax of
    every attended pair for :func:`na_backward` (:func:`probabilities_numel` elements), else empty."""
    lib = library()
    dtype = compute_dtype(query.dtype)
    q, k, v = (_prepare(x, dtype) for x in (query, key, value))
    bias = None if rpb is None else _prepare(rpb, dtype)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=dtype)
    probs = torch.empty(probabilities_numel(q.shape, params) if save_probabilities else 0, dtype=dtype)
    geom, tables = _geometry(q, params, bias)
    tile = _tile_shape(tuple(q.shape[1:-2]), params, _lanes(dtype))
    getattr(lib, f"vz_na_forward_{_suffix(dtype)}")(
        _ptr(q), _ptr(k), _ptr(v), _ptr(bias), _ptr(out), _ptr(lse), _ptr(probs) if probs.numel() else None,
        _ptr(geom), _ptr(tables), _ptr(tile), scale, torch.get_num_threads(),
    )
    return _restore(out, query.dtype), lse, probs


def na_backward(grad_out, query, key, value, out, lse, probs, rpb, params: NeighborhoodParams, scale: float):
    """Fused backward from the probabilities saved by :func:`na_forward`, or (when empty) from the
    saved ``lse``; returns ``(d_query, d_key, d_value, d_rpb or None)``."""
    lib = library()
    dtype = compute_dtype(query.dtype)
    q, k, v, do = (_prepare(x, dtype) for x in (query, key, value, grad_out))
    row_lse = _prepare(lse, dtype)
    bias = None if rpb is None else _prepare(rpb, dtype)
    saved = _kept("na_backward", probs, probabilities_numel(q.shape, params), q, dtype)
    d_query, d_key, d_value = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d_bias = None if rpb is None else torch.zeros(q.shape[0] * q.shape[-2], rpb[0].numel(), dtype=dtype)
    geom, tables = _geometry(q, params, bias)
    tile = _tile_shape(tuple(q.shape[1:-2]), params, _lanes(dtype))
    getattr(lib, f"vz_na_backward_{_suffix(dtype)}")(
        _ptr(q), _ptr(k), _ptr(v), _ptr(do), _ptr(row_lse), _ptr(bias), _ptr(probs) if saved else None,
        _ptr(d_query), _ptr(d_key), _ptr(d_value), _ptr(d_bias), _ptr(geom), _ptr(tables), _ptr(tile), scale,
        torch.get_num_threads(),
    )
    d_rpb = None if rpb is None else d_bias.view(q.shape[0], -1, d_bias.shape[-1]).sum(0).reshape(rpb.shape).to(rpb.dtype)
    return _restore(d_query, query.dtype), _restore(d_key, key.dtype), _restore(d_value, value.dtype), d_rpb


# ----------------------------------------------------------------------------------------------
# blocked attention: windows that are disjoint blocks (see blocked.py)
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _block_tables(spatial: Tuple[int, ...], params: NeighborhoodParams) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """``(tables, (blocks per dim..., kernel per dim...))`` padded to 3D: per dimension the positions of
    every block's tokens, one row per distinct window of :func:`window_bounds`."""
    if disjoint_blocks(spatial, params) is None:
        raise ValueError(f"the windows of spatial {list(spatial)} with {params} are not disjoint blocks")
    spatial, params = pad_to_3d(spatial, params)
    tables, blocks = [], []
    for i in range(3):
        kernel, dilation = params.kernel_size[i], params.dilation[i]
        group, _, start, _ = window_bounds(spatial[i], kernel, params.stride[i], dilation, False)
        first = torch.unique(group + dilation * start)  # first token of every block
        tables.append((first[:, None] + dilation * torch.arange(kernel)).flatten())
        blocks.append(first.numel())
    return torch.cat(tables).contiguous(), tuple(blocks) + params.kernel_size


def _block_call(query: torch.Tensor, params: NeighborhoodParams, bias: Optional[torch.Tensor], dtype: torch.dtype):
    """Geometry, tables and the logit bias of one blocked call. ``bias`` is ``[H, K, K]`` (query, key)
    or None; the kernel takes it transposed like its logits, ``[H, K (keys), Kp (queries)]`` with the
    queries padded to whole vectors."""
    kernel_bias = None
    if bias is not None:
        tokens = bias.shape[-1]
        kernel_bias = torch.zeros(bias.shape[0], tokens, -(-tokens // _lanes(dtype)) * _lanes(dtype), dtype=dtype)
        kernel_bias[..., :tokens] = bias.transpose(1, 2)
    geom, tables = _block_geometry(tuple(query.shape), params, 0 if bias is None else bias.shape[0])
    return geom, tables, kernel_bias


@functools.lru_cache(maxsize=128)
def _block_geometry(shape: Tuple[int, ...], params: NeighborhoodParams, bias_heads: int):
    """``(geom, tables)`` of the block kernels for a query of ``shape`` (see ``csrc/block_kernels.cpp``)."""
    spatial = shape[1:-2]
    tables, dims = _block_tables(spatial, params)
    padded, _ = pad_to_3d(spatial, params)
    geom = torch.tensor([shape[0], *padded, shape[-2], shape[-1], *dims, max(bias_heads, 1)], dtype=torch.long)
    return geom, tables


def _lanes(dtype: torch.dtype) -> int:
    """Elements per vector of the kernel's instruction set."""
    return vector_bytes() // dtype.itemsize


PROBABILITIES_SLACK = 16  # the lanes of a float32 vector: >= those of any dtype; zeroed by the kernel


def block_probabilities_numel(query_shape, params: NeighborhoodParams) -> int:
    """Elements of the attention probabilities that :func:`block_forward` saves for ``query_shape``:
    per block ``K * K`` rounded up to whole vectors, plus one vector of slack (see ``csrc/block_kernels.cpp``)."""
    tokens = math.prod(params.kernel_size)
    blocks = query_shape[0] * query_shape[-2] * math.prod(query_shape[1:-2]) // tokens
    return blocks * -(-tokens * tokens // PROBABILITIES_SLACK) * PROBABILITIES_SLACK + PROBABILITIES_SLACK


def block_forward(query, key, value, bias, params: NeighborhoodParams, scale: float, save_probabilities: bool = False):
    """Blocked forward on CPU tensors ``[B, *spatial, H, D]`` with an optional logit bias ``[H, K, K]``
    (``K = prod(kernel_size)``); returns ``(out, lse [B, *spatial, H], probabilities)``. With
    ``save_probabilities`` the last is the softmax of every block (flat, ``block_probabilities_numel``
    elements, for :func:`block_backward`), else it is empty."""
    lib = library()
    dtype = compute_dtype(query.dtype)
    q, k, v = (_prepare(x, dtype) for x in (query, key, value))
    geom, tables, kernel_bias = _block_call(q, params, bias, dtype)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=dtype)
    probs = torch.empty(block_probabilities_numel(q.shape, params) if save_probabilities else 0, dtype=dtype)
    getattr(lib, f"vz_block_forward_{_suffix(dtype)}")(
        _ptr(q), _ptr(k), _ptr(v), _ptr(kernel_bias), _ptr(out), _ptr(lse), _ptr(probs if save_probabilities else None),
        _ptr(geom), _ptr(tables), scale, torch.get_num_threads(),
    )
    return _restore(out, query.dtype), lse, probs


def block_backward(grad_out, query, key, value, lse, probs, bias, params: NeighborhoodParams, scale: float):
    """Blocked backward; returns ``(d_query, d_key, d_value, d_bias [H, K, K] or None)``. Uses the
    probabilities saved by :func:`block_forward` when ``probs`` has them, else recomputes them from
    the saved ``lse``."""
    lib = library()
    dtype = compute_dtype(query.dtype)
    q, k, v, do = (_prepare(x, dtype) for x in (query, key, value, grad_out))
    geom, tables, kernel_bias = _block_call(q, params, bias, dtype)
    saved = _kept("block_backward", probs, block_probabilities_numel(q.shape, params), q, dtype)
    d_query, d_key, d_value = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # one partial bias gradient per fixed chunk of blocks, summed here in a fixed order
    d_bias = None if bias is None else torch.zeros(lib.vz_block_bias_chunks(), *kernel_bias.shape, dtype=dtype)
    getattr(lib, f"vz_block_backward_{_suffix(dtype)}")(
        _ptr(q), _ptr(k), _ptr(v), _ptr(do), _ptr(_prepare(lse, dtype)), _ptr(kernel_bias),
        _ptr(probs if saved else None), _ptr(d_query), _ptr(d_key), _ptr(d_value), _ptr(d_bias), _ptr(geom),
        _ptr(tables), scale, torch.get_num_threads(),
    )
    return (
        _restore(d_query, query.dtype),
        _restore(d_key, key.dtype),
        _restore(d_value, value.dtype),
        None if d_bias is None else d_bias.sum(0)[..., : d_bias.shape[2]].transpose(1, 2),
    )
