"""Neighborhood attention whose windows are disjoint blocks: dense attention per block.

When :func:`~visionzoo.kernels.indexing.disjoint_blocks` holds, every dilation group is cut into
blocks of exactly ``kernel_size`` tokens per dimension, and each query attends to all keys of its
own block and nothing else: blocked / window attention (``stride == kernel_size``), and windows that
span their whole dilation group (``kernel_size * dilation == length``, e.g. every dilated DiNAT
layer at its training resolution). The op is then block-diagonal dense attention with no mask and
no wasted pairs.

Two implementations, picked by :mod:`.dispatch`:

* ``"cpu:blocks"`` (:func:`cpu_forward`): the C++ per-block kernels
  (:func:`~visionzoo.kernels.native.block_forward`), which gather each block into cache, run its
  GEMMs with register-blocked micro-kernels and write the results straight back;
* ``"torch:blocks"`` (:func:`torch_forward`), any device: one permuting copy puts each block's
  tokens together (``[B*H*blocks, K, D]``, ``K = prod(kernel_size)``) and batched torch matmuls do
  the work; the backward is written out.

When the forward runs for training it keeps the attention probabilities of every block
(``B * H * tokens * K`` elements, the size of the attention matrix of the attended pairs, as the
unfused NAT kernels and windowed-attention layers keep it) and the backward reads them instead of
recomputing ``Q K^T`` and the softmax: a fifth less GEMM work and no exponentials. It does so under
:func:`~visionzoo.kernels.native.keeps_probabilities` (blocks of at most ``2 * head_dim`` tokens);
without them (larger blocks, an inference forward) the backward recomputes them from the saved
log-sum-exp.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch

from . import native
from .checks import NeighborhoodParams
from .indexing import disjoint_blocks, window_keys
from .reference import compute_dtype


@functools.lru_cache(maxsize=64)
def _plan(spatial: Tuple[int, ...], params: NeighborhoodParams) -> Tuple[List[int], List[int], List[int]]:
    """``(split, to_blocks, from_blocks)``: the ``[B, *spatial, H, D]`` view with every length split
    into ``(blocks, kernel_size, dilation)``, and the permutations into and out of
    ``[B, H, (blocks, dilation) per dim, kernel_size per dim, D]``."""
    blocks = disjoint_blocks(spatial, params)
    if blocks is None:
        raise ValueError(
            f"the windows of spatial {list(spatial)} with {params} are not disjoint blocks"
        )
    num_dims = len(spatial)
    split = [n for dim in range(num_dims) for n in (blocks[dim], params.kernel_size[dim], params.dilation[dim])]
    heads_axis = 1 + 3 * num_dims
    order = [0, heads_axis]
    order += [1 + 3 * dim + offset for dim in range(num_dims) for offset in (0, 2)]  # block, dilation group
    order += [2 + 3 * dim for dim in range(num_dims)]  # position inside the block
    order.append(heads_axis + 1)
    inverse = [order.index(axis) for axis in range(len(order))]
    return split, order, inverse


@functools.lru_cache(maxsize=64)
def _relative_index(kernel_size: Tuple[int, ...]) -> torch.Tensor:
    """``[K * K]`` index into ``rpb.reshape(H, -1)`` for (query, key) pairs of one block: a block is
    an undilated window of exactly ``kernel_size``, so the offsets are those of that window."""
    num_dims = len(kernel_size)
    unit = NeighborhoodParams(kernel_size, (1,) * num_dims, (1,) * num_dims, (False,) * num_dims)
    return window_keys(kernel_size, unit)[2].flatten()  # each window is the whole block, keys in order


class _Blocks:
    """One call's block layout: moves ``[B, *spatial, H, D]`` tensors to ``[B*H*blocks, K, D]`` in the
    compute dtype and back."""

    def __init__(self, query: torch.Tensor, params: NeighborhoodParams, rpb: Optional[torch.Tensor]):
        spatial = tuple(query.shape[1:-2])
        self.split, self.order, self.inverse = _plan(spatial, params)
        self.dtype = compute_dtype(query.dtype)
        self.batch, self.heads = query.shape[0], query.shape[-2]
        self.block_tokens = math.prod(params.kernel_size)
        self.num_blocks = math.prod(spatial) // self.block_tokens
        self.kernel_size = params.kernel_size
        self.bias = None
        if rpb is not None:
            index = _relative_index(params.kernel_size).to(rpb.device)
            bias = rpb.to(self.dtype).reshape(self.heads, -1)[:, index]
            self.bias = bias.view(self.heads, self.block_tokens, self.block_tokens).contiguous()

    def rpb_gradient(self, d_bias: Optional[torch.Tensor], rpb: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Gradient of ``rpb`` from that of the block bias ``[H, K, K]`` (pairs with one offset add up)."""
        if rpb is None:
            return None
        d_rpb = torch.zeros(self.heads, rpb[0].numel(), dtype=self.dtype, device=rpb.device)
        d_rpb.index_add_(1, _relative_index(self.kernel_size).to(rpb.device), d_bias.reshape(self.heads, -1))
        return d_rpb.reshape(rpb.shape).to(rpb.dtype)

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *spatial, H, D]`` -> ``[B*H*blocks, K, D]`` (one copy, converting the dtype on the way)."""
        view = x.reshape(x.shape[0], *self.split, *x.shape[-2:]).permute(self.order)
        out = torch.empty(view.shape, dtype=self.dtype, device=x.device).copy_(view)
        return out.view(-1, self.block_tokens, x.shape[-1])

    def from_blocks(self, x: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """``[B*H*blocks, K, D]`` -> ``shape`` = ``[B, *spatial, H, D]`` in ``dtype``."""
        blocked_shape = [self.split[axis - 1] for axis in self.order[2:-1]]
        view = x.view(self.batch, self.heads, *blocked_shape, x.shape[-1]).permute(self.inverse)
        return torch.empty(view.shape, dtype=dtype, device=x.device).copy_(view).view(shape)

    def probabilities(self, query: torch.Tensor, key: torch.Tensor, lse: Optional[torch.Tensor] = None):
        """Softmax of the block logits ``[G, K, K]`` from pre-scaled queries, and its lse ``[G, K, 1]``
        (computed here, or the saved one in the backward)."""
        logits = torch.bmm(query, key.transpose(1, 2))
        if self.bias is not None:
            logits.view(self.batch, self.heads, self.num_blocks, *self.bias.shape[1:]).add_(self.bias.unsqueeze(1))
        if lse is None:
            lse = torch.logsumexp(logits, -1, keepdim=True)
        return logits.sub_(lse).exp_(), lse


def probabilities_numel(query_shape, params: NeighborhoodParams) -> int:
    """Elements of the probabilities a training forward keeps (either implementation; see
    :func:`~visionzoo.kernels.native.block_probabilities_numel`), 0 when it keeps none."""
    keeps = native.keeps_probabilities(query_shape, params)
    return native.block_probabilities_numel(query_shape, params) if keeps else 0


def cpu_forward(query, key, value, rpb, params: NeighborhoodParams, scale: float, save_probabilities: bool = False):
    """Blocked forward on CPU tensors through the C++ block kernel; see :func:`torch_forward`."""
    save_probabilities = save_probabilities and native.keeps_probabilities(query.shape, params)
    bias = None if rpb is None else _Blocks(query, params, rpb).bias
    return native.block_forward(query, key, value, bias, params, scale, save_probabilities)


def cpu_backward(grad_out, query, key, value, out, lse, probabilities, rpb, params: NeighborhoodParams, scale: float):
    """Blocked backward on CPU tensors through the C++ block kernel; see :func:`torch_backward`."""
    blocks = None if rpb is None else _Blocks(query, params, rpb)
    d_query, d_key, d_value, d_bias = native.block_backward(grad_out, query, key, value, lse, probabilities,
                                                            None if blocks is None else blocks.bias, params, scale)
    return d_query, d_key, d_value, None if blocks is None else blocks.rpb_gradient(d_bias, rpb)


def torch_forward(query, key, value, rpb, params: NeighborhoodParams, scale: float, save_probabilities: bool = False):
    """Blocked forward. Inputs ``[B, *spatial, H, D]``; returns ``(out, lse [B, *spatial, H], probabilities)``,
    lse in float32 (float64 for float64 inputs); the probabilities (for the backward) are empty
    unless ``save_probabilities`` and :func:`~visionzoo.kernels.native.keeps_probabilities`."""
    save_probabilities = save_probabilities and native.keeps_probabilities(query.shape, params)
    blocks = _Blocks(query, params, rpb)
    q = blocks.to_blocks(query).mul_(scale)
    probs, lse = blocks.probabilities(q, blocks.to_blocks(key))
    out = torch.bmm(probs, blocks.to_blocks(value))
    lse = blocks.from_blocks(lse, query.shape[:-1] + (1,), blocks.dtype).squeeze(-1)
    saved = q.new_empty(probabilities_numel(query.shape, params) if save_probabilities else 0)
    if save_probabilities:  # same size as the native kernel's, whose layout differs
        saved[: probs.numel()] = probs.flatten()
        saved[probs.numel():] = 0
    return blocks.from_blocks(out, query.shape, query.dtype), lse, saved


def torch_backward(grad_out, query, key, value, out, lse, probabilities, rpb, params: NeighborhoodParams,
                   scale: float):
    """Blocked backward from the saved ``probabilities`` of :func:`torch_forward`, or (when empty) from
    the saved ``lse``; returns ``(d_query, d_key, d_value, d_rpb or None)``."""
    blocks = _Blocks(query, params, rpb)
    dtype = blocks.dtype
    delta = (grad_out.to(dtype) * out.to(dtype)).sum(-1, keepdim=True)  # [B, *spatial, H, 1]
    q = blocks.to_blocks(query).mul_(scale)
    k, v, grad = blocks.to_blocks(key), blocks.to_blocks(value), blocks.to_blocks(grad_out)
    if probabilities.numel():
        probs = probabilities[: q.shape[0] * q.shape[1] ** 2].view(q.shape[0], q.shape[1], q.shape[1])
    else:
        probs, _ = blocks.probabilities(q, k, blocks.to_blocks(lse.unsqueeze(-1)))
    d_value = torch.bmm(probs.transpose(1, 2), grad)
    d_logits = torch.bmm(grad, v.transpose(1, 2)).sub_(blocks.to_blocks(delta)).mul_(probs)
    d_query = torch.bmm(d_logits, k).mul_(scale)
    d_key = torch.bmm(d_logits.transpose(1, 2), q)  # q carries the scale
    d_bias = None
    if rpb is not None:
        d_bias = d_logits.view(blocks.batch, blocks.heads, blocks.num_blocks, -1).sum((0, 2))
    d_rpb = blocks.rpb_gradient(d_bias, rpb)
    return (
        blocks.from_blocks(d_query, query.shape, query.dtype),
        blocks.from_blocks(d_key, key.shape, key.dtype),
        blocks.from_blocks(d_value, value.shape, value.dtype),
        d_rpb,
    )
