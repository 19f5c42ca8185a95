"""``torch.library`` custom ops behind the public functions.

``visionzoo::na_forward`` / ``visionzoo::na_backward`` and ``visionzoo::block_sparse_forward`` /
``visionzoo::block_sparse_backward`` carry fake (meta) implementations, so ``torch.compile`` and
``torch.export`` trace through models that use them without graph breaks. The ``backend`` argument
selects the implementation (``"blocked"``: dense attention per disjoint block, ``"native"``: fused
C++ CPU kernels, ``"tiled"``: tiles through ATen's fused attention, ``"triton"``: fused GPU kernels);
:func:`~visionzoo.kernels.dispatch.resolve_backend` picks it.
"""
from __future__ import annotations

import functools
import importlib
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

from .checks import NeighborhoodParams
from .reference import compute_dtype

# backend -> (neighborhood module, block-sparse module)
_IMPLEMENTATIONS = {
    "blocked": (".blocked", None),
    "native": (".native", None),
    "tiled": (".cpu", ".cpu"),
    "triton": (".triton_na", ".triton_block_sparse"),
}


@functools.lru_cache(maxsize=None)
def _module(backend: str, which: int):
    """The implementing module of ``backend`` (``which``: 0 neighborhood, 1 block-sparse), imported once."""
    name = _IMPLEMENTATIONS.get(backend, (None, None))[which]
    if name is None:
        kind = ("neighborhood", "block-sparse")[which]
        raise ValueError(f"no {kind} custom-op implementation for backend {backend!r}")
    return importlib.import_module(name, __package__)


def _params(kernel_size, stride, dilation, is_causal) -> NeighborhoodParams:
    return NeighborhoodParams(tuple(kernel_size), tuple(stride), tuple(dilation), tuple(is_causal))


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
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(out [B, *spatial, H, D], lse [B, *spatial, H], saved)``; lse dtype per
    :func:`~visionzoo.kernels.reference.compute_dtype`. ``saved`` is what a backend keeps for its
    backward besides the lse when ``save_probabilities`` (the blocked and native paths: the attention
    probabilities, see :mod:`.blocked`), else empty."""
    return _na_forward_impl(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale, backend,
                            save_probabilities)


def _na_forward_impl(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale, backend,
                     save_probabilities):
    params = _params(kernel_size, stride, dilation, is_causal)
    module = _module(backend, 0)
    if getattr(module, "SAVES_PROBABILITIES", False):
        return module.na_forward(query, key, value, rpb, params, scale, save_probabilities)
    out, lse = module.na_forward(query, key, value, rpb, params, scale)
    return out, lse, query.new_empty(0, dtype=compute_dtype(query.dtype))


def _saved_numel(query, kernel_size, stride, dilation, is_causal, backend, save_probabilities):
    if not save_probabilities:
        return 0
    module = _module(backend, 0)
    if not getattr(module, "SAVES_PROBABILITIES", False):
        return 0
    return module.probabilities_numel(query.shape, _params(kernel_size, stride, dilation, is_causal))


@na_forward.register_fake
def _na_forward_fake(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale, backend,
                     save_probabilities=False):
    dtype = compute_dtype(query.dtype)
    saved = _saved_numel(query, kernel_size, stride, dilation, is_causal, backend, save_probabilities)
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
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(d_query, d_key, d_value, d_rpb)``; ``d_rpb`` is empty when ``rpb`` is None. ``saved``
    is the forward's third output."""
    d_query, d_key, d_value, d_rpb = _na_backward_impl(grad_out, query, key, value, out, lse, saved, rpb, kernel_size,
                                                       stride, dilation, is_causal, scale, backend)
    if d_rpb is None:
        d_rpb = query.new_empty(0)
    return d_query, d_key, d_value, d_rpb


def _na_backward_impl(grad_out, query, key, value, out, lse, saved, rpb, kernel_size, stride, dilation, is_causal,
                      scale, backend):
    """``(d_query, d_key, d_value, d_rpb or None)``."""
    params = _params(kernel_size, stride, dilation, is_causal)
    module = _module(backend, 0)
    if getattr(module, "SAVES_PROBABILITIES", False):
        d_query, d_key, d_value, d_rpb = module.na_backward(grad_out, query, key, value, out, lse, saved, rpb, params,
                                                            scale)
    else:
        d_query, d_key, d_value, d_rpb = module.na_backward(grad_out, query, key, value, out, lse, rpb, params, scale)
    return d_query, d_key, d_value, d_rpb


@na_backward.register_fake
def _na_backward_fake(grad_out, query, key, value, out, lse, saved, rpb, kernel_size, stride, dilation, is_causal, scale,
                      backend):
    d_rpb = torch.empty_like(rpb) if rpb is not None else query.new_empty(0)
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), d_rpb


def _na_setup_context(ctx, inputs, output):
    query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale, backend, *_ = inputs
    out, lse, saved = output
    ctx.save_for_backward(query, key, value, out, lse, saved, rpb)
    ctx.config = (kernel_size, stride, dilation, is_causal, scale, backend)
    # lse and saved carry no gradient: never fill zeros of their size for the backward
    ctx.mark_non_differentiable(lse, saved)
    ctx.set_materialize_grads(False)


def _na_autograd(ctx, grad_out, grad_lse, grad_saved):
    if grad_out is None:  # the output took no part in the loss
        return (None,) * 11
    query, key, value, out, lse, saved, rpb = ctx.saved_tensors
    d_query, d_key, d_value, d_rpb = na_backward(
        grad_out.contiguous(), query, key, value, out, lse, saved, rpb, *ctx.config
    )
    return d_query, d_key, d_value, (d_rpb if rpb is not None else None), None, None, None, None, None, None, None


na_forward.register_autograd(_na_autograd, setup_context=_na_setup_context)


class _EagerNeighborhood(torch.autograd.Function):
    """The custom op's autograd in plain eager mode: the same implementations called directly, without
    the custom-op dispatch (0.17 ms less per forward + backward of [8, 14x14, 8 heads, 32], about 4%).
    :func:`neighborhood` uses it only where nothing could need the registered op."""

    @staticmethod
    def forward(ctx, query, key, value, rpb, config, save_probabilities):
        out, lse, saved = _na_forward_impl(query, key, value, rpb, *config, save_probabilities)
        ctx.save_for_backward(query, key, value, out, lse, saved, rpb)
        ctx.config = config
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 6
        grads = _na_backward_impl(grad_out.contiguous(), *ctx.saved_tensors, *ctx.config)
        return (*grads, None, None)


def _plain_eager(*tensors) -> bool:
    """Whether a call may skip the registered op: not compiling, tracing or exporting, no dispatch mode
    (FlopCounterMode, fake tensors), no functorch transform, and plain tensors."""
    return not (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or any(t is not None and type(t) is not Tensor for t in tensors)
    )


def neighborhood(query, key, value, rpb, kernel_size, stride, dilation, is_causal, scale: float,
                 backend: str) -> Tensor:
    """The attention output of the ``visionzoo::na_forward`` op, with its autograd; backends that can
    keep the attention probabilities when a backward may follow. In plain eager mode the same
    implementations run without the custom-op dispatch."""
    config = (kernel_size, stride, dilation, is_causal, scale, backend)
    backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, rpb))
    if not _plain_eager(query, key, value, rpb):
        return na_forward(query, key, value, rpb, *config, backward)[0]
    if backward:
        return _EagerNeighborhood.apply(query, key, value, rpb, config, True)
    return _na_forward_impl(query, key, value, rpb, *config, False)[0]


# ----------------------------------------------------------------------------------------------
# block-sparse attention
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("visionzoo::block_sparse_forward", mutates_args=())
def block_sparse_forward(
    query: Tensor, key: Tensor, value: Tensor, block_mask: Tensor, q_block: int, kv_block: int, scale: float, backend: str
) -> Tuple[Tensor, Tensor]:
    """Returns ``(out [B, Nq, H, D], lse [B, Nq, H])``; lse dtype per :func:`~visionzoo.kernels.reference.compute_dtype`."""
    return _module(backend, 1).block_sparse_forward(query, key, value, block_mask, q_block, kv_block, scale)


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
    return _module(backend, 1).block_sparse_backward(
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
