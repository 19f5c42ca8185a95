"""Public functional surface: ``na1d``, ``na2d``, ``na3d`` and ``block_sparse_attention``.

All take heads-last tensors (``[B, *spatial, heads, head_dim]``), accept an int/bool or a
per-dimension tuple for ``kernel_size``, ``stride``, ``dilation``, ``is_causal`` and ``shift``, and pick a
backend through :mod:`visionzoo.kernels.dispatch` unless ``backend=`` forces one.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ops
from .checks import (
    BoolOrTuple,
    IntOrTuple,
    check_block_sparse_inputs,
    check_neighborhood_inputs,
    make_params,
)
from .dispatch import resolve_backend
from .reference import block_sparse_attention_reference, neighborhood_attention_reference


def neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: Optional[float] = None,
    rpb: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    shift: IntOrTuple = 0,
) -> torch.Tensor:
    """Generalized neighborhood attention over ``query.dim() - 3`` spatial dimensions.

    Args:
        query, key, value: ``[B, *spatial, heads, head_dim]``.
        kernel_size: window size per dimension; ``kernel_size * dilation`` must fit the input.
        stride: queries in a stride group share the window of their leader (``stride == kernel_size``
            is blocked / window attention). ``1 <= stride <= kernel_size``.
        dilation: dilation per dimension (DiNA).
        is_causal: causal masking per dimension.
        scale: logit scale, default ``head_dim ** -0.5``.
        rpb: optional relative position bias ``[heads, 2*k0-1, 2*k1-1, ...]``, indexed by key minus
            query (``k - 1`` for offset 0); stride 1 or ``stride == kernel_size`` in each dimension.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"torch"`` or ``"triton"`` (the old names
            ``"native"``, ``"blocked"``, ``"tiled"`` still work; see :mod:`visionzoo.kernels.dispatch`);
            ``None`` uses the thread default set by :func:`visionzoo.kernels.use_backend`.
        shift: offset of the window grid of blocked attention, ``0 <= shift < kernel_size`` per
            dimension, nonzero only where ``stride == kernel_size``, dilation 1, not causal: the
            windows are the cells ``[0, shift)``, ``[shift, shift + k)``, ..., partial at both borders
            (Swin's shifted windows, see :mod:`visionzoo.kernels.indexing`).

    Returns:
        ``[B, *spatial, heads, head_dim]``, same dtype as ``query``.
    """
    num_dims = query.dim() - 3 if isinstance(query, torch.Tensor) else 0
    if num_dims not in (1, 2, 3):
        shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
        raise ValueError(
            f"neighborhood_attention: query must have 1-3 spatial dims ([B, *spatial, heads, head_dim]), got {shape}"
        )
    return _neighborhood(f"na{num_dims}d", num_dims, query, key, value, kernel_size, stride, dilation, is_causal,
                         scale, rpb, backend, shift)


def _neighborhood(op_name, num_dims, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, backend,
                  shift):
    params = make_params(num_dims, kernel_size, stride, dilation, is_causal, shift)
    check_neighborhood_inputs(op_name, query, key, value, params, rpb)
    scale = float(query.shape[-1] ** -0.5 if scale is None else scale)
    name = resolve_backend(backend, query.device, tuple(query.shape[1:-2]), params)
    if name == "reference":
        return neighborhood_attention_reference(query, key, value, params, scale, rpb)
    if rpb is not None and rpb.dtype != query.dtype:
        rpb = rpb.to(query.dtype)
    return ops.neighborhood(
        query.contiguous(),
        key.contiguous(),
        value.contiguous(),
        None if rpb is None else rpb.contiguous(),
        list(params.kernel_size),
        list(params.stride),
        list(params.dilation),
        list(params.is_causal),
        scale,
        name,
        list(params.shift),
    )


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None, backend=None,
         shift=0):
    """1D neighborhood attention on ``[B, L, heads, head_dim]``; see :func:`neighborhood_attention`."""
    return _neighborhood("na1d", 1, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, backend,
                         shift)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None, backend=None,
         shift=0):
    """2D neighborhood attention on ``[B, H, W, heads, head_dim]``; see :func:`neighborhood_attention`."""
    return _neighborhood("na2d", 2, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, backend,
                         shift)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, rpb=None, backend=None,
         shift=0):
    """3D neighborhood attention on ``[B, T, H, W, heads, head_dim]``; see :func:`neighborhood_attention`."""
    return _neighborhood("na3d", 3, query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb, backend,
                         shift)


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: IntOrTuple,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention where ``block_mask`` says which (query tile, key tile) pairs interact.

    Args:
        query: ``[B, Nq, heads, head_dim]``; key, value: ``[B, Nk, heads, head_dim]``.
        block_mask: bool ``[num_q_blocks, num_kv_blocks]`` (shared by heads) or
            ``[heads, num_q_blocks, num_kv_blocks]``; the last block of each axis may be partial.
        block_size: ``int`` or ``(q_block, kv_block)`` tokens per tile.
        scale: logit scale, default ``head_dim ** -0.5``.
        backend: as for :func:`neighborhood_attention`; ``"cpu"`` runs on the ``"torch"`` path (there is
            no C++ block-sparse kernel).

    Query rows whose tiles attend nothing get a zero output (and zero gradient).
    """
    block_mask, q_block, kv_block = check_block_sparse_inputs(query, key, value, block_mask, block_size)
    scale = float(query.shape[-1] ** -0.5 if scale is None else scale)
    name = resolve_backend(backend, query.device, block_sparse=True)
    block_mask = block_mask.to(query.device)
    if name == "reference":
        return block_sparse_attention_reference(query, key, value, block_mask, (q_block, kv_block), scale)
    out, _ = ops.block_sparse_forward(
        query.contiguous(), key.contiguous(), value.contiguous(), block_mask.contiguous(), q_block, kv_block, scale, name
    )
    return out
