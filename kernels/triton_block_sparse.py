"""Fused Triton kernels for block-sparse attention, forward and backward (flash-style).

Tensors are heads-last: query ``[B, Nq, heads, D]``, key/value ``[B, Nk, heads, D]``. The block
mask (``[nqb, nkb]`` or ``[heads, nqb, nkb]``) is compressed on the device into per-row lists of
active blocks (like FlexAttention's ``kv_num_blocks`` / ``kv_indices``), so a query tile only
loops over the key tiles it attends: work scales with the number of active blocks.

* forward: one program per query tile, online softmax in fp32, writes ``out`` and the
  log-sum-exp ``lse`` (natural log; ``-inf`` and a zero output for rows that attend nothing);
* backward: ``delta = rowsum(dO * O)`` (:func:`attention_delta`), a query-stationary kernel for
  dQ and a key/value-stationary kernel for dK and dV that walks the transposed block lists.

Logical blocks of any size are split into power-of-two kernel tiles of at most 64 tokens, so
``q_block`` / ``kv_block`` need not be powers of two (e.g. 49 for 7x7 windows). The helpers at the
top (dtype flags, the matmul wrapper, the delta kernel) are shared with :mod:`.triton_na`.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_TILE = 64
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# helpers shared with triton_na
# ----------------------------------------------------------------------------------------------
def check_supported(op_name: str, query: torch.Tensor) -> None:
    """Raise ``NotImplementedError`` for what the Triton kernels do not handle."""
    if query.dtype not in SUPPORTED_DTYPES:
        raise NotImplementedError(f"{op_name} (triton backend): dtype {query.dtype} is not supported; "
                                  "use float16, bfloat16 or float32 (or backend='cpu')")
    if query.shape[-1] > 256:
        raise NotImplementedError(f"{op_name} (triton backend): head_dim {query.shape[-1]} > 256 is not supported")
    if query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(f"{op_name} (triton backend): CPU tensors need TRITON_INTERPRET=1")


def dtype_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags of the matmul wrapper :func:`_mma` for inputs of ``dtype``.

    fp32 inputs use IEEE fp32 products (TF32 would miss the 1e-4 tolerance of fp32 callers).
    The Triton interpreter has no bf16 matmul (it returns garbage), so there bf16 operands are
    upcast to fp32 first; on a GPU this flag is never set.
    """
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return {"IEEE": dtype == torch.float32, "UPCAST": interpreting and dtype == torch.bfloat16}


def head_block(head_dim: int) -> int:
    """Head dimension padded to a power of two (masked in the kernels); tl.dot needs >= 16."""
    return max(16, triton.next_power_of_2(head_dim))


def num_warps(head_dim: int) -> int:
    """Warps per program: the backward keeps four fp32 [64, D] tiles live, too many registers
    for 4 warps once D > 64."""
    return 4 if head_dim <= 64 else 8


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (see :func:`dtype_flags`)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One KV tile of a flash forward, in base 2: logits ``s [M, N]`` (already masked to -inf) and
    values ``v [N, D]`` update the running max ``m_i``, sum ``l_i`` and output ``acc``. Rows that
    have seen no key yet keep ``m = -inf`` without producing NaNs."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], IEEE, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _delta_kernel(OUT, GRAD_OUT, DELTA, rows, head_dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.arange(0, BLOCK_D)
    mask = (row < rows)[:, None] & (col < head_dim)[None, :]
    offset = row.to(tl.int64)[:, None] * head_dim + col[None, :]
    out = tl.load(OUT + offset, mask=mask, other=0.0).to(tl.float32)
    grad_out = tl.load(GRAD_OUT + offset, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + row, tl.sum(out * grad_out, axis=1), mask=row < rows)


def attention_delta(out: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``rowsum(dO * O)`` in fp32: ``[..., D]`` -> ``[...]`` (the softmax backward term)."""
    head_dim = out.shape[-1]
    rows = out.numel() // head_dim
    delta = torch.empty(out.shape[:-1], dtype=torch.float32, device=out.device)
    block_rows = 64
    _delta_kernel[(triton.cdiv(rows, block_rows),)](
        out, grad_out, delta, rows, head_dim, BLOCK_R=block_rows, BLOCK_D=head_block(head_dim)
    )
    return delta


# ----------------------------------------------------------------------------------------------
# block lists and tile sizes
# ----------------------------------------------------------------------------------------------
def _block_lists(block_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """``[H?, rows, cols]`` bool -> (active count per row ``[Hm, rows]`` int32, active column
    indices first ``[Hm, rows, cols]`` int32, head stride of counts, head stride of indices);
    the head strides are 0 for a mask shared by all heads."""
    per_head = block_mask.dim() == 3
    mask = block_mask if per_head else block_mask.unsqueeze(0)
    counts = mask.sum(-1, dtype=torch.int32).contiguous()
    # a stable sort of "inactive" flags lists the active columns first, in increasing order
    index = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32).contiguous()
    rows, cols = mask.shape[1], mask.shape[2]
    return counts, index, (rows if per_head else 0), (rows * cols if per_head else 0)


def _tile(block: int) -> Tuple[int, int]:
    """(kernel tile, tiles per logical block) for a logical block of ``block`` tokens."""
    tile = min(MAX_TILE, max(16, triton.next_power_of_2(block)))
    return tile, triton.cdiv(block, tile)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rows(block, sub, block_size, length, TILE: tl.constexpr):
    """Token indices of kernel tile ``sub`` of logical block ``block``, and their validity."""
    local = sub * TILE + tl.arange(0, TILE)
    index = block * block_size + local
    return index, (local < block_size) & (index < length)


@triton.jit
def _bs_fwd_kernel(
    Q, K, V, OUT, LSE, KV_COUNT, KV_INDEX,
    num_q, num_kv, heads, head_dim, q_block, kv_block, num_kv_blocks, count_stride, index_stride, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_SUB: tl.constexpr, Q_SUB: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    q_blk = tl.program_id(0) // Q_SUB
    b = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    rows, row_valid = _rows(q_blk, tl.program_id(0) % Q_SUB, q_block, num_q, BLOCK_M)
    dim = tl.arange(0, BLOCK_D)
    dim_valid = dim < head_dim
    q_tok = (b.to(tl.int64) * num_q + rows) * heads + h
    q = tl.load(Q + q_tok[:, None] * head_dim + dim[None, :], mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    count = tl.load(KV_COUNT + h * count_stride + q_blk)
    index_base = h * index_stride + q_blk * num_kv_blocks
    for step in range(0, count * KV_SUB):
        kv_blk = tl.load(KV_INDEX + index_base + step // KV_SUB)
        cols, col_valid = _rows(kv_blk, step % KV_SUB, kv_block, num_kv, BLOCK_N)
        kv_tok = (b.to(tl.int64) * num_kv + cols) * heads + h
        kv_offset = kv_tok[:, None] * head_dim + dim[None, :]
        kv_mask = col_valid[:, None] & dim_valid[None, :]
        k = tl.load(K + kv_offset, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offset, mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE, UPCAST) * qk_scale
        s = tl.where(row_valid[:, None] & col_valid[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, IEEE, UPCAST)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(OUT + q_tok[:, None] * head_dim + dim[None, :], out.to(OUT.dtype.element_ty),
             mask=row_valid[:, None] & dim_valid[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(LSE + q_tok, lse, mask=row_valid)


@triton.jit
def _bs_dq_kernel(
    Q, K, V, GRAD_OUT, LSE, DELTA, DQ, KV_COUNT, KV_INDEX,
    num_q, num_kv, heads, head_dim, q_block, kv_block, num_kv_blocks, count_stride, index_stride, scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_SUB: tl.constexpr, Q_SUB: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    q_blk = tl.program_id(0) // Q_SUB
    b = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    rows, row_valid = _rows(q_blk, tl.program_id(0) % Q_SUB, q_block, num_q, BLOCK_M)
    dim = tl.arange(0, BLOCK_D)
    dim_valid = dim < head_dim
    q_tok = (b.to(tl.int64) * num_q + rows) * heads + h
    q_offset = q_tok[:, None] * head_dim + dim[None, :]
    q_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(Q + q_offset, mask=q_mask, other=0.0)
    grad_out = tl.load(GRAD_OUT + q_offset, mask=q_mask, other=0.0)
    lse = tl.load(LSE + q_tok, mask=row_valid, other=0.0) * LOG2E
    delta = tl.load(DELTA + q_tok, mask=row_valid, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    count = tl.load(KV_COUNT + h * count_stride + q_blk)
    index_base = h * index_stride + q_blk * num_kv_blocks
    for step in range(0, count * KV_SUB):
        kv_blk = tl.load(KV_INDEX + index_base + step // KV_SUB)
        cols, col_valid = _rows(kv_blk, step % KV_SUB, kv_block, num_kv, BLOCK_N)
        kv_tok = (b.to(tl.int64) * num_kv + cols) * heads + h
        kv_offset = kv_tok[:, None] * head_dim + dim[None, :]
        kv_mask = col_valid[:, None] & dim_valid[None, :]
        k = tl.load(K + kv_offset, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offset, mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE, UPCAST) * qk_scale
        p = tl.where(row_valid[:, None] & col_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _mma(grad_out, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, IEEE, UPCAST)
    tl.store(DQ + q_offset, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _bs_dkdv_kernel(
    Q, K, V, GRAD_OUT, LSE, DELTA, DK, DV, Q_COUNT, Q_INDEX,
    num_q, num_kv, heads, head_dim, q_block, kv_block, num_q_blocks, count_stride, index_stride, scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_SUB: tl.constexpr, Q_SUB: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    kv_blk = tl.program_id(0) // KV_SUB
    b = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    cols, col_valid = _rows(kv_blk, tl.program_id(0) % KV_SUB, kv_block, num_kv, BLOCK_N)
    dim = tl.arange(0, BLOCK_D)
    dim_valid = dim < head_dim
    kv_tok = (b.to(tl.int64) * num_kv + cols) * heads + h
    kv_offset = kv_tok[:, None] * head_dim + dim[None, :]
    kv_mask = col_valid[:, None] & dim_valid[None, :]
    k = tl.load(K + kv_offset, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_offset, mask=kv_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    count = tl.load(Q_COUNT + h * count_stride + kv_blk)
    index_base = h * index_stride + kv_blk * num_q_blocks
    for step in range(0, count * Q_SUB):
        q_blk = tl.load(Q_INDEX + index_base + step // Q_SUB)
        rows, row_valid = _rows(q_blk, step % Q_SUB, q_block, num_q, BLOCK_M)
        q_tok = (b.to(tl.int64) * num_q + rows) * heads + h
        q_offset = q_tok[:, None] * head_dim + dim[None, :]
        q_mask = row_valid[:, None] & dim_valid[None, :]
        q = tl.load(Q + q_offset, mask=q_mask, other=0.0)
        grad_out = tl.load(GRAD_OUT + q_offset, mask=q_mask, other=0.0)
        lse = tl.load(LSE + q_tok, mask=row_valid, other=0.0) * LOG2E
        delta = tl.load(DELTA + q_tok, mask=row_valid, other=0.0)
        s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE, UPCAST) * qk_scale
        p = tl.where(row_valid[:, None] & col_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dv = _mma(tl.trans(p.to(grad_out.dtype)), grad_out, dv, IEEE, UPCAST)
        dp = _mma(grad_out, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE, UPCAST)
        ds = p * (dp - delta[:, None])
        dk = _mma(tl.trans(ds.to(q.dtype)), q, dk, IEEE, UPCAST)
    tl.store(DK + kv_offset, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offset, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------
# host functions (called by kernels/ops.py)
# ----------------------------------------------------------------------------------------------
def _common(query, key, q_block, kv_block):
    batch, num_q, heads, head_dim = query.shape
    block_m, q_sub = _tile(q_block)
    block_n, kv_sub = _tile(kv_block)
    shapes = (num_q, key.shape[1], heads, head_dim, q_block, kv_block)
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, KV_SUB=kv_sub, Q_SUB=q_sub, BLOCK_D=head_block(head_dim),
                num_warps=num_warps(head_dim), num_stages=2, **dtype_flags(query.dtype))
    return batch * heads, shapes, meta


def block_sparse_forward(query, key, value, block_mask, q_block: int, kv_block: int, scale: float):
    """``query [B, Nq, H, D]``, ``key``/``value [B, Nk, H, D]``, ``block_mask`` bool
    ``[nqb, nkb]`` or ``[H, nqb, nkb]`` -> ``(out [B, Nq, H, D], lse [B, Nq, H] float32)``."""
    check_supported("block_sparse_attention", query)
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    batch_heads, shapes, meta = _common(query, key, q_block, kv_block)
    counts, index, count_stride, index_stride = _block_lists(block_mask)
    num_q_blocks, num_kv_blocks = block_mask.shape[-2:]
    out = torch.empty_like(query)
    lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
    grid = (num_q_blocks * meta["Q_SUB"], batch_heads)
    _bs_fwd_kernel[grid](query, key, value, out, lse, counts, index, *shapes, num_kv_blocks, count_stride,
                         index_stride, scale * LOG2E, **meta)
    return out, lse


def block_sparse_backward(grad_out, query, key, value, out, lse, block_mask, q_block: int, kv_block: int, scale: float):
    """Gradients ``(dq, dk, dv)`` of :func:`block_sparse_forward` (same shapes as the inputs)."""
    check_supported("block_sparse_attention", query)
    grad_out, query, key, value, out, lse = (t.contiguous() for t in (grad_out, query, key, value, out, lse))
    batch_heads, shapes, meta = _common(query, key, q_block, kv_block)
    delta = attention_delta(out, grad_out)
    num_q_blocks, num_kv_blocks = block_mask.shape[-2:]
    d_query, d_key, d_value = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

    counts, index, count_stride, index_stride = _block_lists(block_mask)
    _bs_dq_kernel[(num_q_blocks * meta["Q_SUB"], batch_heads)](
        query, key, value, grad_out, lse, delta, d_query, counts, index, *shapes, num_kv_blocks, count_stride,
        index_stride, scale, scale * LOG2E, **meta)

    counts, index, count_stride, index_stride = _block_lists(block_mask.transpose(-1, -2))
    _bs_dkdv_kernel[(num_kv_blocks * meta["KV_SUB"], batch_heads)](
        query, key, value, grad_out, lse, delta, d_key, d_value, counts, index, *shapes, num_q_blocks,
        count_stride, index_stride, scale, scale * LOG2E, **meta)
    return d_query, d_key, d_value
