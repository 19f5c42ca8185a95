"""Exact reference implementations: dense attention with masks built from the index math.

Slow (quadratic in the number of tokens) and differentiable through plain autograd; every other
backend is tested against these functions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .checks import NeighborhoodParams
from .indexing import neighborhood_mask, relative_index


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax / accumulation dtype of every backend (and the dtype of the lse they return):
    float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    batch, *spatial, heads, head_dim = query.shape
    tokens = 1
    for length in spatial:
        tokens *= length
    dtype = compute_dtype(query.dtype)
    q = query.reshape(batch, tokens, heads, head_dim).to(dtype)
    k = key.reshape(batch, tokens, heads, head_dim).to(dtype)
    v = value.reshape(batch, tokens, heads, head_dim).to(dtype)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if rpb is not None:
        index = relative_index(spatial, params).to(query.device)
        logits = logits + rpb.to(dtype).reshape(heads, -1)[:, index].unsqueeze(0)
    mask = neighborhood_mask(spatial, params).to(query.device)
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    attn = torch.exp(logits - lse.unsqueeze(-1))
    out = torch.einsum("bhqk,bkhd->bqhd", attn, v).to(query.dtype).reshape(query.shape)
    if return_lse:
        return out, lse.transpose(1, 2).reshape(batch, *spatial, heads)
    return out


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
