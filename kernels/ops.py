"""``torch.library`` custom ops behind the public functions.

``visionzoo::na_forward`` / ``visionzoo::na_backward`` and ``visionzoo::block_sparse_forward`` /
``visionzoo::block_sparse_backward`` carry fake (meta) implementations, so ``torch.compile`` and
``torch.export`` trace through models that use them without graph breaks. Their ``backend``
argument names the implementation that :func:`~visionzoo.kernels.dispatch.resolve_backend` picked
(:data:`~visionzoo.kernels.dispatch.IMPLEMENTATIONS`). Inputs with no elements (batch or heads 0)
give empty results here, for every implementation.
"""
from __future__ import annotations

import functools
import importlib
import math
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .checks import NeighborhoodParams
from .reference import compute_dtype


class _Implementation(NamedTuple):
    module: str
    forward: str
    backward: str
    saves_probabilities: bool  # forward takes save_probabilities and returns them, backward reads them


# implementation -> its neighborhood-attention functions
_NEIGHBORHOOD = {
    "cpu:window": _Implementation(".native", "na_forward", "na_backward", True),
    "cpu:blocks": _Implementation(".blocked", "cpu_forward", "cpu_backward", True),
    "torch:blocks": _Implementation(".blocked", "torch_forward", "torch_backward", True),
    "torch:tiles": _Implementation(".portable", "na_forward", "na_backward", False),
    "triton": _Implementation(".triton_na", "na_forward", "na_backward", False),
}
# implementation -> the module of its block-sparse functions
_BLOCK_SPARSE = {"torch:tiles": ".portable", "triton": ".triton_block_sparse"}


@functools.lru_cache(maxsize=None)
def _import(module: str):
    return importlib.import_module(module, __package__)


def _neighborhood_functions(backend: str):
    """``(forward, backward, saves_probabilities, module)`` of an implementation (its module imported once)."""
    spec = _NEIGHBORHOOD.get(backend)
    if spec is None:
        raise ValueError(f"no neighborhood custom-op implementation {backend!r}; one of {', '.join(_NEIGHBORHOOD)}")
    module = _import(spec.module)
    return getattr(module, spec.forward), getattr(module, spec.backward), spec.saves_probabilities, module


def _block_sparse_module(backend: str):
    if backend not in _BLOCK_SPARSE:
        raise ValueError(f"no block-sparse custom-op implementation {backend!r}; one of {', '.join(_BLOCK_SPARSE)}")
    return _import(_BLOCK_SPARSE[backend])


def _params(kernel_size, stride, dilation, is_causal, shift=None) -> NeighborhoodParams:
    return NeighborhoodParams(tuple(kernel_size), tuple(stride), tuple(dilation), tuple(is_causal), tuple(shift or ()))


# ----------------------------------------------------------------------------------------------
# neighborhood attention
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("visionzoo::na_forward", mutates_args=())
def na_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    rpb: Optional[Tensor],
    kernel_size: List[int],
    stride: List[int],
    dilation: List[int],
    is_causal: List[bool],
    scale: float,
    backend: str,
    save_probabilities: bool = False,
    shift: Optional[List[int]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(out [B, *spatial, H, D], lse [B, *spatial, H], saved)``; lse dtype per
    :func:`~visionzoo.kernels.reference.compute_dtype`. ``saved`` is what a backend keeps for its
    backward besides the lse when ``save_probabilities`` (the blocked and native paths: the attention
    probabilities, see :mod:`.blocked`), else empty. ``shift``: the window grid's offset per dimension
    (None: zeros), see :func:`~visionzoo.kernels.indexing.window_bounds`."""
    return _na_forward_impl(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale, backend,
                            save_probabilities, shift)


def _na_forward_impl(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale, backend,
                     save_probabilities, shift):
    params = _params(kernel_size, stride, dilation, is_causal, shift)
    forward, _, saves, _ = _neighborhood_functions(backend)
    if query.numel() == 0:
        dtype = compute_dtype(query.dtype)
        return torch.empty_like(query), query.new_empty(query.shape[:-1], dtype=dtype), query.new_empty(0, dtype=dtype)
    if saves:
        return forward(query, key, value, rpb, params, scale, save_probabilities)
    out, lse = forward(query, key, value, rpb, params, scale)
    return out, lse, query.new_empty(0, dtype=compute_dtype(query.dtype))


def _saved_numel(query, kernel_size, stride, dilation, is_causal, backend, save_probabilities, shift):
    _, _, saves, module = _neighborhood_functions(backend)
    if not (save_probabilities and saves):
        return 0
    return module.probabilities_numel(query.shape, _params(kernel_size, stride, dilation, is_causal, shift))


@na_forward.register_fake
def _na_forward_fake(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale, backend,
                     save_probabilities=False, shift=None):
    dtype = compute_dtype(query.dtype)
    saved = _saved_numel(query, kernel_size, stride, dilation, is_causal, backend, save_probabilities, shift)
    return torch.empty_like(query), query.new_empty(query.shape[:-1], dtype=dtype), query.new_empty(saved, dtype=dtype)


@torch.library.custom_op("visionzoo::na_backward", mutates_args=())
def na_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    saved: Tensor,
    rpb: Optional[Tensor],
    kernel_size: List[int],
    stride: List[int],
    dilation: List[int],
    is_causal: List[bool],
    scale: float,
    backend: str,
    shift: Optional[List[int]] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(d_query, d_key, d_value, d_rpb)``; ``d_rpb`` is empty when ``rpb`` is None. ``saved``
    is the forward's third output."""
    d_query, d_key, d_value, d_rpb = _na_backward_impl(grad_out, query, key, value, out, lse, saved, rpb, kernel_size,
                                                       stride, dilation, is_causal, scale, backend, shift)
    if d_rpb is None:
        d_rpb = query.new_empty(0)
    return d_query, d_key, d_value, d_rpb


def _na_backward_impl(grad_out, query, key, value, out, lse, saved, rpb, kernel_size, stride, dilation, is_causal,
                      scale, backend, shift):
    """``(d_query, d_key, d_value, d_rpb or None)``."""
    params = _params(kernel_size, stride, dilation, is_causal, shift)
    _, backward, saves, _ = _neighborhood_functions(backend)
    if query.numel() == 0:
        return (torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value),
                None if rpb is None else torch.zeros_like(rpb))
    if saves:
        return backward(grad_out, query, key, value, out, lse, saved, rpb, params, scale)
    return backward(grad_out, query, key, value, out, lse, rpb, params, scale)


@na_backward.register_fake
def _na_backward_fake(grad_out, query, key, value, out, lse, saved, rpb, kernel_size, stride, dilation, is_causal, scale,
                      backend, shift=None):
    d_rpb = torch.empty_like(rpb) if rpb is not None else query.new_empty(0)
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), d_rpb


def _na_setup_context(ctx, inputs, output):
    query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale, backend, _, shift = inputs
    out, lse, saved = output
    ctx.save_for_backward(query, key, value, out, lse, saved, rpb)
    ctx.config = (kernel_size, stride, dilation, is_causal, scale, backend, shift)
    # lse and saved carry no gradient: never fill zeros of their size for the backward
    ctx.mark_non_differentiable(lse, saved)
    ctx.set_materialize_grads(False)


def _na_autograd(ctx, grad_out, grad_lse, grad_saved):
    if grad_out is None:  # the output took no part in the loss
        return (None,) * 12
    query, key, value, out, lse, saved, rpb = ctx.saved_tensors
    d_query, d_key, d_value, d_rpb = na_backward(
        grad_out.contiguous(), query, key, value, out, lse, saved, rpb, *ctx.config
    )
    return (d_query, d_key, d_value, (d_rpb if rpb is not None else None)) + (None,) * 8


na_forward.register_autograd(_na_autograd, setup_context=_na_setup_context)


def neighborhood(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale: float,
                 backend: str, shift: Optional[List[int]] = None) -> Tensor:
    """The attention output of the ``visionzoo::na_forward`` op, with its autograd; implementations
    that can keep the attention probabilities do when a backward may follow."""
    backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, rpb))
    return na_forward(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale, backend, backward,
                      shift)[0]


# ----------------------------------------------------------------------------------------------
# block-sparse attention
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("visionzoo::block_sparse_forward", mutates_args=())
def block_sparse_forward(
    query: Tensor, key: Tensor, value: Tensor, block_mask: Tensor, q_block: int, kv_block: int, scale: float, backend: str
) -> Tuple[Tensor, Tensor]:
    """Returns ``(out [B, Nq, H, D], lse [B, Nq, H])``; lse dtype per
    :func:`~visionzoo.kernels.reference.compute_dtype`. Without queries or keys: zero output (rows that
    attend nothing) and lse -inf."""
    if query.numel() == 0 or key.shape[1] == 0:
        lse = query.new_full(query.shape[:-1], float("-inf"), dtype=compute_dtype(query.dtype))
        return torch.zeros_like(query), lse
    return _block_sparse_module(backend).block_sparse_forward(query, key, value, block_mask, q_block, kv_block, scale)


@block_sparse_forward.register_fake
def _block_sparse_forward_fake(query, key, value, block_mask, q_block, kv_block, scale, backend):
    return torch.empty_like(query), query.new_empty(query.shape[:-1], dtype=compute_dtype(query.dtype))


@torch.library.custom_op("visionzoo::block_sparse_backward", mutates_args=())
def block_sparse_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    block_mask: Tensor,
    q_block: int,
    kv_block: int,
    scale: float,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    if query.numel() == 0 or key.shape[1] == 0:
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
    return _block_sparse_module(backend).block_sparse_backward(
        grad_out, query, key, value, out, lse, block_mask, q_block, kv_block, scale
    )


@block_sparse_backward.register_fake
def _block_sparse_backward_fake(grad_out, query, key, value, out, lse, block_mask, q_block, kv_block, scale, backend):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _bs_setup_context(ctx, inputs, output):
    query, key, value, block_mask, q_block, kv_block, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, block_mask)
    ctx.config = (q_block, kv_block, scale, backend)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _bs_autograd(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * 8
    query, key, value, out, lse, block_mask = ctx.saved_tensors
    q_block, kv_block, scale, backend = ctx.config
    d_query, d_key, d_value = block_sparse_backward(
        grad_out.contiguous(), query, key, value, out, lse, block_mask, q_block, kv_block, scale, backend
    )
    return d_query, d_key, d_value, None, None, None, None, None


block_sparse_forward.register_autograd(_bs_autograd, setup_context=_bs_setup_context)


# ----------------------------------------------------------------------------------------------
# FLOP formulas, so that torch.utils.flop_counter.FlopCounterMode counts the custom ops (2 FLOPs per
# multiply-add). Each counts the attended (query, key) pairs, not the extra work of a backend's tiles.
# ----------------------------------------------------------------------------------------------
def _na_matmul_flops(query_shape, kernel_size) -> int:
    """One ``[query x window] @ [window x head_dim]``-sized product for every query and head; an
    upper bound where causal windows are cut short at the start."""
    batch, *spatial, heads, head_dim = query_shape
    return 2 * batch * math.prod(spatial) * heads * head_dim * math.prod(kernel_size)


@register_flop_formula(torch.ops.visionzoo.na_forward)
def _na_forward_flops(query, key, value, rpb, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return 2 * _na_matmul_flops(query, kernel_size)  # Q K^T and P V


@register_flop_formula(torch.ops.visionzoo.na_backward)
def _na_backward_flops(grad_out, query, key, value, out, lse, saved, rpb, kernel_size, *args, out_shape=None,
                       **kwargs) -> int:
    # dV, dP, dQ, dK, and Q K^T again unless the forward saved the probabilities
    return (4 if math.prod(saved) else 5) * _na_matmul_flops(query, kernel_size)


def _block_pair_flops(query: Tensor, block_mask: Tensor, q_block: int, kv_block: int) -> int:
    if block_mask.device.type == "meta":
        raise RuntimeError("block_sparse_attention FLOPs depend on the values of block_mask; count on a real device")
    batch, _, heads, head_dim = query.shape
    pairs = int(block_mask.sum()) * (1 if block_mask.dim() == 3 else heads)
    return 2 * batch * head_dim * pairs * q_block * kv_block  # partial edge blocks counted whole


@register_flop_formula(torch.ops.visionzoo.block_sparse_forward, get_raw=True)
def _block_sparse_forward_flops(query, key, value, block_mask, q_block, kv_block, *args, out_val=None, **kwargs) -> int:
    return 2 * _block_pair_flops(query, block_mask, q_block, kv_block)


@register_flop_formula(torch.ops.visionzoo.block_sparse_backward, get_raw=True)
def _block_sparse_backward_flops(grad_out, query, key, value, out, lse, block_mask, q_block, kv_block, *args,
                                 out_val=None, **kwargs) -> int:
    return 5 * _block_pair_flops(query, block_mask, q_block, kv_block)
