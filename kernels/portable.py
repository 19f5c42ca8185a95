"""The portable path (``backend="torch"``, implementation ``"torch:tiles"``): neighborhood and
block-sparse attention as tiles through ATen's fused attention, on any device.

Queries are cut into n-D tiles that stay inside one dilation group; each query tile gathers the
union of its queries' windows (its "key halo"), so attention runs as one batched
``[tiles, q_tile, kv_tile]`` problem with a small per-tile mask. Compute scales with the window
(``kv_tile / prod(kernel_size)`` over the exact amount), not the image. The backward runs from the
saved log-sum-exp, so the op needs no autograd graph of its own and the same functions serve the
``torch.library`` custom op.

CPU tensors go through ATen's fused CPU flash-attention kernels; other devices (CUDA without triton,
MPS, meta) through the same computation written with matmuls (:func:`_attend`). A tile's halo holds
keys that some of its queries do not attend, masked by a -inf bias: a NaN or inf there would still
reach them, so a call whose output or lse is not finite is redone by the reference
(:mod:`.reference`), which touches attended pairs only.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import tiles as tile_shapes
from .checks import NeighborhoodParams
from .indexing import relative_offset, window_bounds
from .reference import (
    compute_dtype,
    neighborhood_attention_reference,
    neighborhood_attention_reference_backward,
)


@dataclass
class TilePlan:
    """Gather indices and masks of one tiling, shared by every batch element and head.

    ``T`` tiles of ``TQ`` query slots and ``TK`` key slots; positions are row-major flat indices.
    """

    q_index: torch.Tensor  # [T, TQ] flat query positions (invalid slots point at position 0)
    k_index: torch.Tensor  # [T, TK] flat key positions
    inverse: torch.Tensor  # [N] slot (t * TQ + i) that holds each query position
    q_valid: torch.Tensor  # [T, TQ] bool
    mask_bias: torch.Tensor  # [T, 1, TQ, TK] float32: 0 where attended, -inf elsewhere (padded rows too)
    rel_index: Optional[torch.Tensor]  # [T, TQ, TK] flat index into rpb.reshape(H, -1)
    keys_per_query: float  # exact attended keys per query (mean), for efficiency reports

    @property
    def num_tiles(self) -> int:
        return self.q_index.shape[0]

    @property
    def q_slots(self) -> int:
        return self.q_index.shape[1]

    @property
    def kv_slots(self) -> int:
        return self.k_index.shape[1]


def _plan_1d(length: int, kernel: int, stride: int, dilation: int, causal: bool, shift: int, q_tile: int):
    """Per-dimension tiling: ``(q_pos [T, tq], q_ok, k_pos [T, tk], k_ok, allowed [T, tq, tk], rel)``."""
    group, coord, start, end = window_bounds(length, kernel, stride, dilation, causal, shift)
    tiles = []
    for g in range(dilation):
        members = torch.nonzero(group == g).flatten()  # positions of group g, ordered by coord
        group_length = members.numel()
        for first in range(0, group_length, q_tile):
            tiles.append((g, members, first, min(first + q_tile, group_length)))
    kv_tile = max(tile_shapes.halo_spans(length, kernel, stride, dilation, causal, q_tile, shift))
    q_pos, q_ok, k_pos, k_ok, allowed, rel = [], [], [], [], [], []
    for g, members, first, last in tiles:
        group_length = members.numel()
        slots = torch.arange(q_tile)
        q_coord = first + slots
        q_valid = q_coord < last
        q_coord = q_coord.clamp(max=last - 1)
        k_first = max(0, min(int(start[members[first]]), group_length - kv_tile))
        k_coord = k_first + torch.arange(kv_tile)
        k_valid = k_coord < group_length
        k_coord = k_coord.clamp(max=group_length - 1)
        q_start = start[members[q_coord]]
        q_end = end[members[q_coord]]
        ok = k_valid[None, :] & (k_coord[None, :] >= q_start[:, None]) & (k_coord[None, :] < q_end[:, None])
        ok &= q_valid[:, None]
        q_pos.append(members[q_coord])
        q_ok.append(q_valid)
        k_pos.append(members[k_coord])
        k_ok.append(k_valid)
        allowed.append(ok)
        rel.append(relative_offset(q_coord[:, None], k_coord[None, :], kernel).clamp(0, 2 * kernel - 2))
    return (torch.stack(q_pos), torch.stack(q_ok), torch.stack(k_pos), torch.stack(k_ok), torch.stack(allowed),
            torch.stack(rel))


def _outer(a: torch.Tensor, b: torch.Tensor, combine) -> torch.Tensor:
    """Combine per-dimension tile tensors ``a [Ta, *A]`` and ``b [Tb, *B]`` into ``[Ta*Tb, ...]``
    with slots in row-major order (``a``'s slot is the slower one)."""
    if a.dim() == 2:  # [T, slots]
        out = combine(a[:, None, :, None], b[None, :, None, :])
        return out.reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])
    # [T, q_slots, k_slots]
    out = combine(a[:, None, :, None, :, None], b[None, :, None, :, None, :])
    return out.reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], a.shape[2] * b.shape[2])


@functools.lru_cache(maxsize=64)
def tile_plan(spatial: Tuple[int, ...], params: NeighborhoodParams, q_tile: Tuple[int, ...], with_rpb: bool) -> TilePlan:
    """Build (and cache) the tiling of ``spatial`` for ``params`` with query tiles ``q_tile``."""
    q_index = k_index = q_valid = allowed = rel = None
    keys_per_query = 1.0
    for dim, length in enumerate(spatial):
        kernel = params.kernel_size[dim]
        q_pos, q_ok, k_pos, k_ok, ok, rel_dim = _plan_1d(
            length, kernel, params.stride[dim], params.dilation[dim], params.is_causal[dim], params.shift[dim],
            min(q_tile[dim], length),
        )
        valid_rows = ok.sum(-1)[q_ok]
        keys_per_query *= valid_rows.float().mean().item()
        if q_index is None:
            q_index, k_index, q_valid, allowed, rel = q_pos, k_pos, q_ok, ok, rel_dim
            continue
        q_index = _outer(q_index, q_pos, lambda x, y: x * length + y)
        k_index = _outer(k_index, k_pos, lambda x, y: x * length + y)
        q_valid = _outer(q_valid, q_ok, torch.logical_and)
        allowed = _outer(allowed, ok, torch.logical_and)
        rel = _outer(rel, rel_dim, lambda x, y: x * (2 * kernel - 1) + y)
    num_tokens = math.prod(spatial)
    slots = torch.arange(q_index.numel())
    inverse = torch.empty(num_tokens, dtype=torch.long)
    inverse[q_index.flatten()[q_valid.flatten()]] = slots[q_valid.flatten()]
    # padded query slots attend nothing: the fused kernel gives them a zero output and zero gradient
    mask_bias = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, float("-inf")).unsqueeze(1)
    return TilePlan(
        q_index=q_index,
        k_index=k_index,
        inverse=inverse,
        q_valid=q_valid,
        mask_bias=mask_bias,
        rel_index=rel if with_rpb else None,
        keys_per_query=keys_per_query,
    )


# ----------------------------------------------------------------------------------------------
# Tiles run through fused attention. Tensors are kept token-major ([N, B*H, D]) so that a gathered
# tile is a strided [T, B*H, slots, D] view and the per-tile mask [T, 1, TQ, TK] broadcasts over
# batch and heads without a copy.
# ----------------------------------------------------------------------------------------------
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _fused_cpu(tensor: torch.Tensor) -> bool:
    """Whether ATen's fused CPU kernels run the tiles: for CPU tensors, and only for them."""
    return tensor.device.type == "cpu"


def _attend(q, k, v, bias, scale: float):
    """Attention of tiles ``q [T, BH, TQ, D]`` over ``k, v [T, BH, TK, D]`` with the logit ``bias``
    (-inf where a pair is masked); returns ``(out, lse [T, BH, TQ])``. Rows that attend nothing give
    a zero output."""
    if _fused_cpu(q):
        return _flash(q, k, v, attn_mask=bias, scale=scale)
    logits = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(bias)
    lse = torch.logsumexp(logits, -1)
    probs = logits.sub_(lse.masked_fill(lse == float("-inf"), float("inf")).unsqueeze(-1)).exp_()
    return torch.matmul(probs, v), lse


def _attend_backward(grad, q, k, v, out, lse, bias, scale: float, logit_gradient: bool = False):
    """Gradients ``(d_q, d_k, d_v, d_logits or None)`` of :func:`_attend` from its saved ``lse`` (finite
    in every row); ``d_logits [T, BH, TQ, TK]`` (the gradient of the bias) with ``logit_gradient``."""
    if _fused_cpu(q) and not logit_gradient:
        return (*_flash_backward(grad, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale), None)
    # written out: P from the saved lse, dS = P * (dP - delta); the fused CPU kernel does not return dS
    logits = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(bias)
    probs = logits.sub_(lse.unsqueeze(-1)).exp_()
    delta = (grad * out).sum(-1, keepdim=True)
    d_value = torch.matmul(probs.transpose(-1, -2), grad)
    d_logits = torch.matmul(grad, v.transpose(-1, -2)).sub_(delta).mul_(probs)
    d_query = torch.matmul(d_logits, k).mul_(scale)
    d_key = torch.matmul(d_logits.transpose(-1, -2), q).mul_(scale)
    return d_query, d_key, d_value, (d_logits if logit_gradient else None)


def _finite(*tensors: torch.Tensor) -> bool:
    """Whether every element is finite (one sum per tensor: a NaN or inf survives it). Meta tensors
    hold no values, and a CUDA graph being captured cannot wait for them: both count as finite."""
    if tensors[0].device.type == "meta" or (tensors[0].is_cuda and torch.cuda.is_current_stream_capturing()):
        return True
    return all(bool(torch.isfinite(t.sum())) for t in tensors)


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """``[B, *spatial, H, D]`` -> contiguous ``[N, B*H, D]``."""
    batch, heads, head_dim = x.shape[0], x.shape[-2], x.shape[-1]
    tokens = math.prod(x.shape[1:-2])
    x = x.reshape(batch, tokens, heads * head_dim).transpose(0, 1)
    return x.reshape(tokens, batch * heads, head_dim).contiguous()


def _from_token_major(x: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Token-major ``[N, B*H, ...]`` -> ``shape`` = ``[B, *spatial, H, ...]`` in ``dtype``."""
    return x.reshape(x.shape[0], shape[0], -1).transpose(0, 1).reshape(shape).to(dtype).contiguous()


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Token-major ``[N, BH, D]`` -> tile view ``[T, BH, slots, D]``."""
    tiles = x.index_select(0, index.flatten())
    return tiles.view(index.shape[0], index.shape[1], x.shape[1], x.shape[2]).transpose(1, 2)


def _ungather(tiles: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Tile-major ``[T, BH, TQ, *rest]`` -> token-major ``[N, BH, *rest]``."""
    tiles = tiles.transpose(1, 2)
    return tiles.reshape(-1, *tiles.shape[2:]).index_select(0, inverse)


def _scatter_add(tiles: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sum tile-major ``[T, BH, TK, D]`` contributions into token-major ``[N, BH, D]``."""
    tiles = tiles.transpose(1, 2).reshape(-1, tiles.shape[1], tiles.shape[3])
    total = torch.zeros(num_tokens, tiles.shape[1], tiles.shape[2], dtype=tiles.dtype, device=tiles.device)
    return total.index_add_(0, index.flatten(), tiles)


class _Tiles:
    """One call's tiling moved to the inputs' device, with the logit bias in the compute dtype."""

    def __init__(self, query: torch.Tensor, params: NeighborhoodParams, rpb: Optional[torch.Tensor]):
        spatial = tuple(query.shape[1:-2])
        plan = tile_plan(spatial, params, tile_shapes.torch_query_tile(spatial, params), rpb is not None)
        device = query.device
        self.dtype = compute_dtype(query.dtype)
        self.batch, self.heads = query.shape[0], query.shape[-2]
        self.num_tokens = math.prod(spatial)
        self.q_index = plan.q_index.to(device)
        self.k_index = plan.k_index.to(device)
        self.inverse = plan.inverse.to(device)
        bias = plan.mask_bias.to(device=device, dtype=self.dtype)  # [T, 1, TQ, TK]
        self.rel_index = None
        if rpb is not None:
            self.rel_index = plan.rel_index.to(device)
            heads = self.heads
            rpb_bias = rpb.to(self.dtype).reshape(heads, -1)[:, self.rel_index].transpose(0, 1)  # [T, H, TQ, TK]
            bias = (bias + rpb_bias).unsqueeze(1).expand(-1, self.batch, -1, -1, -1)
            bias = bias.reshape(bias.shape[0], self.batch * heads, *bias.shape[3:])
        self.bias = bias

    def gather_q(self, x):
        return _gather(_token_major(x).to(self.dtype), self.q_index)

    def gather_kv(self, x):
        return _gather(_token_major(x).to(self.dtype), self.k_index)


def na_forward(query, key, value, rpb, params: NeighborhoodParams, scale: float):
    """Tiled forward. Inputs ``[B, *spatial, H, D]``; returns ``(out, lse [B, *spatial, H])``, lse in
    float32 (float64 for float64 inputs)."""
    tiles = _Tiles(query, params, rpb)
    out_t, lse_t = _attend(tiles.gather_q(query), tiles.gather_kv(key), tiles.gather_kv(value), tiles.bias, scale)
    out = _from_token_major(_ungather(out_t, tiles.inverse), query.shape, query.dtype)
    lse = _from_token_major(_ungather(lse_t, tiles.inverse), query.shape[:-1], lse_t.dtype)
    if not _finite(out, lse):
        return neighborhood_attention_reference(query, key, value, params, scale, rpb, return_lse=True)
    return out, lse


def na_backward(grad_out, query, key, value, out, lse, rpb, params: NeighborhoodParams, scale: float):
    """Tiled backward from the saved ``lse``; returns ``(d_query, d_key, d_value, d_rpb or None)``."""
    if not _finite(out, lse):
        return neighborhood_attention_reference_backward(grad_out, query, key, value, lse, params, scale, rpb)
    tiles = _Tiles(query, params, rpb)
    lse_t = _gather(_token_major(lse.unsqueeze(-1)).to(tiles.dtype), tiles.q_index).squeeze(-1)
    d_query_t, d_key_t, d_value_t, d_logits = _attend_backward(
        tiles.gather_q(grad_out), tiles.gather_q(query), tiles.gather_kv(key), tiles.gather_kv(value),
        tiles.gather_q(out), lse_t, tiles.bias, scale, logit_gradient=rpb is not None,
    )
    d_rpb = None
    if rpb is not None:  # the bias gradient, summed over batch and over the pairs of each offset
        heads = tiles.heads
        d_bias = d_logits.view(d_logits.shape[0], tiles.batch, heads, *d_logits.shape[2:]).sum(1)  # [T, H, TQ, TK]
        d_rpb = torch.zeros(heads, rpb[0].numel(), dtype=tiles.dtype, device=query.device)
        d_rpb.index_add_(1, tiles.rel_index.flatten(), d_bias.transpose(0, 1).reshape(heads, -1))
        d_rpb = d_rpb.to(rpb.dtype).reshape(rpb.shape)
    d_query = _from_token_major(_ungather(d_query_t, tiles.inverse), query.shape, query.dtype)
    d_key = _from_token_major(_scatter_add(d_key_t, tiles.k_index, tiles.num_tokens), key.shape, key.dtype)
    d_value = _from_token_major(_scatter_add(d_value_t, tiles.k_index, tiles.num_tokens), value.shape, value.dtype)
    return d_query, d_key, d_value, d_rpb


# ----------------------------------------------------------------------------------------------
# block-sparse attention: every (head, query block) is a tile whose keys are its active KV blocks
# (padded to the longest row with masked slots). Tensors are head-major [H*N, B, D] so that tiles
# of different heads can gather different keys with one index_select.
# ----------------------------------------------------------------------------------------------
def _head_major(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, N, H, D]`` -> contiguous ``[H*N, B, D]``."""
    batch, tokens, heads, head_dim = x.shape
    return x.to(dtype).permute(2, 1, 0, 3).reshape(heads * tokens, batch, head_dim)


def _from_head_major(x: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``[H*N, B, ...]`` -> ``shape`` = ``[B, N, H, ...]``."""
    batch, tokens, heads = shape[0], shape[1], shape[2]
    x = x.reshape(heads, tokens, batch, -1).permute(2, 1, 0, 3)
    return x.reshape(shape).to(dtype).contiguous()


@functools.lru_cache(maxsize=32)
def _block_sparse_plan(mask_bytes: bytes, mask_shape, heads: int, num_q: int, num_k: int, q_block: int, kv_block: int):
    block_mask = torch.frombuffer(bytearray(mask_bytes), dtype=torch.bool).reshape(mask_shape)
    block_mask = block_mask.expand(heads, *mask_shape[-2:])
    num_q_blocks, num_kv_blocks = block_mask.shape[-2:]
    active = block_mask.sum(-1)  # [H, nqb]
    width = max(int(active.max()), 1)
    # active KV blocks first (stable order), padding slots point at block 0 and are masked
    order = torch.argsort((~block_mask).to(torch.int8), dim=-1, stable=True)[..., :width]
    slot_used = torch.arange(width) < active[..., None]  # [H, nqb, width]
    kv_token = order[..., :, None] * kv_block + torch.arange(kv_block)  # [H, nqb, width, kv_block]
    kv_ok = slot_used[..., None] & (kv_token < num_k)
    head_offset = torch.arange(heads)[:, None, None]
    k_index = (head_offset[..., None] * num_k + kv_token.clamp(max=num_k - 1)).reshape(heads * num_q_blocks, -1)
    q_token = torch.arange(num_q_blocks)[:, None] * q_block + torch.arange(q_block)  # [nqb, q_block]
    q_ok = (q_token < num_q).expand(heads, -1, -1)
    q_index = (head_offset * num_q + q_token.clamp(max=num_q - 1)).reshape(heads * num_q_blocks, q_block)
    allowed = q_ok.reshape(-1, q_block, 1) & kv_ok.reshape(heads * num_q_blocks, 1, -1)
    mask_bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).unsqueeze(1)
    inverse = torch.empty(heads * num_q, dtype=torch.long)
    inverse[q_index.flatten()[q_ok.flatten()]] = torch.arange(q_index.numel())[q_ok.flatten()]
    row_empty = (active == 0).repeat_interleave(q_block, dim=-1)[:, :num_q]  # [H, Nq]
    return q_index, k_index, inverse, mask_bias, row_empty


def _block_sparse_tiles(query, key, block_mask, q_block, kv_block):
    mask = block_mask.detach().to("cpu", torch.bool).contiguous()
    plan = _block_sparse_plan(
        mask.numpy().tobytes(), tuple(mask.shape), query.shape[2], query.shape[1], key.shape[1], q_block, kv_block
    )
    device = query.device
    q_index, k_index, inverse, mask_bias, row_empty = (t.to(device) for t in plan)
    return q_index, k_index, inverse, mask_bias.to(compute_dtype(query.dtype)), row_empty


def block_sparse_forward(query, key, value, block_mask, q_block: int, kv_block: int, scale: float):
    """Returns ``(out [B, Nq, H, D], lse [B, Nq, H])``; empty rows give 0 and ``lse = -inf``."""
    dtype = compute_dtype(query.dtype)
    q_index, k_index, inverse, bias, row_empty = _block_sparse_tiles(query, key, block_mask, q_block, kv_block)
    out_t, lse_t = _attend(
        _gather(_head_major(query, dtype), q_index),
        _gather(_head_major(key, dtype), k_index),
        _gather(_head_major(value, dtype), k_index),
        bias,
        scale,
    )
    out = _from_head_major(_ungather(out_t, inverse), query.shape, query.dtype)
    lse = _ungather(lse_t, inverse)  # [H*Nq, B]
    lse = lse.masked_fill(row_empty.reshape(-1, 1), float("-inf"))
    return out, _from_head_major(lse, query.shape[:-1], lse.dtype)


def block_sparse_backward(grad_out, query, key, value, out, lse, block_mask, q_block: int, kv_block: int, scale: float):
    """Returns ``(d_query, d_key, d_value)``."""
    dtype = compute_dtype(query.dtype)
    q_index, k_index, inverse, bias, _ = _block_sparse_tiles(query, key, block_mask, q_block, kv_block)
    # empty rows have lse = -inf; any finite value gives them zero probabilities under the -inf mask
    lse = torch.nan_to_num(lse.to(dtype), neginf=0.0)
    lse_t = _gather(_head_major(lse.unsqueeze(-1), dtype), q_index).squeeze(-1)
    d_query_t, d_key_t, d_value_t, _ = _attend_backward(
        _gather(_head_major(grad_out, dtype), q_index),
        _gather(_head_major(query, dtype), q_index),
        _gather(_head_major(key, dtype), k_index),
        _gather(_head_major(value, dtype), k_index),
        _gather(_head_major(out, dtype), q_index),
        lse_t,
        bias,
        scale,
    )
    num_kv_rows = key.shape[1] * key.shape[2]
    d_query = _from_head_major(_ungather(d_query_t, inverse), query.shape, query.dtype)
    d_key = _from_head_major(_scatter_add(d_key_t, k_index, num_kv_rows), key.shape, key.dtype)
    d_value = _from_head_major(_scatter_add(d_value_t, k_index, num_kv_rows), value.shape, value.dtype)
    return d_query, d_key, d_value
