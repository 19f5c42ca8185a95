"""Exact reference implementations, differentiable through plain autograd; every other backend is
tested against these functions.

Neighborhood attention gathers each query's window (:func:`~visionzoo.kernels.indexing.window_keys`)
and computes on the attended (query, key) pairs only, so that a NaN or inf in an input reaches
exactly the outputs and gradients that depend on it. Memory grows with ``N * prod(kernel_size)``.
:func:`neighborhood_attention_reference_backward` writes its gradients out: the torch path falls
back on this pair for inputs that are not finite.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .checks import NeighborhoodParams
from .indexing import window_keys


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax / accumulation dtype of every backend (and the dtype of the lse they return):
    float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Windows:
    """One call's windows on the inputs' device: ``[B, N, H, D]`` views and the gathered keys."""

    def __init__(self, query: torch.Tensor, params: NeighborhoodParams):
        batch, *spatial, heads, head_dim = query.shape
        keys, valid, rel = window_keys(tuple(spatial), params)
        self.keys, self.rel = keys.to(query.device), rel.to(query.device)
        self.valid = valid.to(query.device)[None, :, :, None]  # [1, N, K, 1]
        self.flat = (batch, math.prod(spatial), heads, head_dim)
        self.dtype = compute_dtype(query.dtype)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.flat).to(self.dtype)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *spatial, H, D]`` -> ``[B, N, K, H, D]``, slots outside the window zero (so that a NaN
        there reaches nothing)."""
        return torch.where(self.valid[..., None], self.rows(x)[:, self.keys], 0)

    def scatter(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Sum ``[B, N, K, H, D]`` per-pair contributions back onto the keys: ``like``'s shape and dtype."""
        x = torch.where(self.valid[..., None], x, 0)
        total = x.new_zeros(self.flat).index_add_(1, self.keys.flatten(), x.flatten(1, 2))
        return total.reshape(like.shape).to(like.dtype)

    def logits(self, q, k, scale, rpb):
        """Masked logits ``[B, N, H, K]``."""
        logits = torch.einsum("bnhd,bnkhd->bnhk", q, k) * scale
        if rpb is not None:
            table = rpb.to(self.dtype).reshape(rpb.shape[0], math.prod(rpb.shape[1:]))
            logits = logits + table[:, self.rel].transpose(0, 1)
        return logits.masked_fill(~self.valid.transpose(2, 3), float("-inf"))


def neighborhood_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    params: NeighborhoodParams,
    scale: float,
    rpb: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Neighborhood attention on ``[B, *spatial, heads, head_dim]`` tensors.

    Returns the output (same shape and dtype as ``query``) and, with ``return_lse``, the
    log-sum-exp of the scaled logits ``[B, *spatial, heads]`` (float32; float64 for float64 inputs).
    """
    windows = _Windows(query, params)
    logits = windows.logits(windows.rows(query), windows.gather(key), scale, rpb)
    lse = torch.logsumexp(logits, dim=-1)
    attn = torch.exp(logits - lse.unsqueeze(-1))
    out = torch.einsum("bnhk,bnkhd->bnhd", attn, windows.gather(value)).to(query.dtype).reshape(query.shape)
    if return_lse:
        return out, lse.reshape(query.shape[:-1])
    return out


def neighborhood_attention_reference_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lse: torch.Tensor,
    params: NeighborhoodParams,
    scale: float,
    rpb: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The gradients ``(d_query, d_key, d_value, d_rpb or None)`` that autograd gives through
    :func:`neighborhood_attention_reference`, written out from its saved ``lse`` (the same operations
    in the same order, so a NaN lands in the same places)."""
    windows = _Windows(query, params)
    q, k, v, grad = windows.rows(query), windows.gather(key), windows.gather(value), windows.rows(grad_out)
    logits = windows.logits(q, k, scale, rpb)
    attn = torch.exp(logits - lse.reshape(windows.flat[:3]).to(windows.dtype).unsqueeze(-1))
    d_attn = torch.einsum("bnhd,bnkhd->bnhk", grad, v)
    d_value = torch.einsum("bnhk,bnhd->bnkhd", attn, grad)
    d_logits = attn * d_attn - attn * (attn * d_attn).sum(-1, keepdim=True)
    d_logits = d_logits.masked_fill(~windows.valid.transpose(2, 3), 0)
    d_rpb = None
    if rpb is not None:
        heads = windows.flat[2]
        per_pair = d_logits.sum(0).transpose(0, 1).reshape(heads, -1)  # [H, N * K]
        d_rpb = per_pair.new_zeros(heads, math.prod(rpb.shape[1:])).index_add_(1, windows.rel.flatten(), per_pair)
        d_rpb = d_rpb.reshape(rpb.shape).to(rpb.dtype)
    d_query = (torch.einsum("bnhk,bnkhd->bnhd", d_logits, k) * scale).reshape(query.shape).to(query.dtype)
    d_key = windows.scatter(torch.einsum("bnhk,bnhd->bnkhd", d_logits, q) * scale, key)
    return d_query, d_key, windows.scatter(d_value, value), d_rpb


def block_sparse_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: torch.Tensor,
    block_sizes: Tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """Dense attention restricted to the tiles that ``block_mask`` keeps.

    ``query`` ``[B, Nq, heads, D]``, ``key``/``value`` ``[B, Nk, heads, D]``; ``block_mask``
    ``[num_q_blocks, num_kv_blocks]`` or ``[heads, num_q_blocks, num_kv_blocks]``. Query rows whose
    blocks attend nothing get a zero output.
    """
    q_block, kv_block = block_sizes
    num_q, num_k = query.shape[1], key.shape[1]
    dtype = compute_dtype(query.dtype)
    token_mask = block_mask.repeat_interleave(q_block, dim=-2)[..., :num_q, :]
    token_mask = token_mask.repeat_interleave(kv_block, dim=-1)[..., :num_k]
    if token_mask.dim() == 2:
        token_mask = token_mask.unsqueeze(0)
    logits = torch.einsum("bqhd,bkhd->bhqk", query.to(dtype), key.to(dtype)) * scale
    logits = logits.masked_fill(~token_mask, float("-inf"))
    empty = ~token_mask.any(dim=-1, keepdim=True)
    attn = torch.softmax(logits.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", attn, value.to(dtype)).to(query.dtype)
