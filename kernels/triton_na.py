"""Fused Triton kernels for generalized neighborhood attention (GNA) in 1D, 2D and 3D.

Tensors are heads-last, ``[B, *spatial, heads, D]``; 1D and 2D problems are run as 3D ones with
leading dimensions of size 1 (kernel 1, tile 1: those dimensions cost nothing, see ``_in_window``).

Tiling (the GNA scheme, see :mod:`visionzoo.kernels.tiles`): every program owns one
multi-dimensional query tile (e.g. 8x8 tokens) inside one dilation group. Tile coordinates are in
group coordinates and map to memory as ``x = group + dilation * coord`` per dimension, so dilated
problems need no copies. Per dimension, window starts and ends never decrease, so the keys the
tile needs form the box ``[start(first query), end(last query))``; the program walks that box in
KV tiles and masks each logit with the per-query window. Compute scales with the window, not
with the image.

* forward: online softmax in base 2 with fp32 accumulation; writes ``out`` and ``lse`` (natural log);
* backward: ``delta = rowsum(dO * O)``; a query-stationary kernel for dQ (which also accumulates
  d(rpb) with fp32 atomic adds, since it visits every (query, key) pair exactly once), and a
  key/value-stationary kernel for dK and dV that visits the query tiles of the KV tile's inverse
  neighborhood (closed form in ``_inverse_window``, mirrored by :func:`tiles.inverse_window`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import NeighborhoodParams
from .indexing import pad_to_3d
from .tiles import triton_tiles
from .triton_block_sparse import (
    LN2,
    LOG2E,
    _mma,
    _online_softmax_step,
    attention_delta,
    check_supported,
    dtype_flags,
    head_block,
    num_warps,
)


# ----------------------------------------------------------------------------------------------
# index math (per dimension, in group coordinates; see kernels/indexing.py)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _window(i, group_length, KS: tl.constexpr, ST: tl.constexpr, CAUSAL: tl.constexpr, SH: tl.constexpr):
    """Keys ``[start, end)`` attended by query coordinate ``i`` (scalar or tensor)."""
    if SH > 0:
        # shifted blocked windows: the cell of i in the grid that starts SH tokens in
        cell = (i + KS - SH) // KS
        start = tl.maximum(cell * KS - KS + SH, 0)
        end = tl.minimum(cell * KS + SH, group_length)
    elif CAUSAL:
        leader = tl.minimum(i // ST * ST + ST - 1, group_length - 1)
        start = tl.maximum(leader - KS + 1, 0)
        end = i + 1
    else:
        # the window of the stride group's leader, its centre clamped to the group
        leader = tl.minimum(i // ST * ST + ST // 2, group_length - 1)
        start = tl.minimum(tl.maximum(leader - KS // 2, 0), group_length - KS)
        end = start + KS
    return start, end


@triton.jit
def _inverse_window(first, last, group_length, KS: tl.constexpr, ST: tl.constexpr, CAUSAL: tl.constexpr,
                    SH: tl.constexpr):
    """Queries ``[lo, hi]`` (inclusive) whose windows contain a key in ``[first, last]``."""
    if SH > 0:
        # cells: the queries of the cells of first and last
        lo = tl.maximum((first + KS - SH) // KS * KS - KS + SH, 0)
        hi = tl.minimum((last + KS - SH) // KS * KS + SH, group_length) - 1
    elif CAUSAL:
        lo = first
        hi = tl.minimum((last + KS - ST) // ST * ST + ST - 1, group_length - 1)
        hi = tl.where(last + KS - 1 >= group_length - 1, group_length - 1, hi)
    else:
        # stride group q starts its window at clamp(q*ST + ST//2 - left, 0, L - KS)
        right = KS // 2 + KS % 2 - 1
        lo = tl.where(first - KS + 1 <= 0, 0, tl.cdiv(first - right - ST // 2, ST) * ST)
        hi = tl.minimum((last + KS // 2 - ST // 2) // ST * ST + ST - 1, group_length - 1)
        hi = tl.where(last >= group_length - KS, group_length - 1, hi)
    return lo, hi


@triton.jit
def _kv_span(first, group_length, QT: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr, CAUSAL: tl.constexpr,
             KT: tl.constexpr, SH: tl.constexpr):
    """First key and number of KV tiles covering the windows of queries ``[first, first + QT)``."""
    last = tl.minimum(first + QT, group_length) - 1
    lo, _ = _window(first, group_length, KS, ST, CAUSAL, SH)
    _, hi = _window(last, group_length, KS, ST, CAUSAL, SH)
    return lo, tl.cdiv(hi - lo, KT)


@triton.jit
def _q_span(first, group_length, KT: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr, CAUSAL: tl.constexpr,
            QT: tl.constexpr, SH: tl.constexpr):
    """First query and number of query tiles whose windows meet keys ``[first, first + KT)``."""
    last = tl.minimum(first + KT, group_length) - 1
    lo, hi = _inverse_window(first, last, group_length, KS, ST, CAUSAL, SH)
    return lo, tl.cdiv(hi - lo + 1, QT)


@triton.jit
def _locate(pid_tile, pid_group, L0, L1, L2, DIL0: tl.constexpr, DIL1: tl.constexpr, DIL2: tl.constexpr,
            T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Program ids -> dilation group, group lengths and the tile's first coordinate per dimension."""
    g2 = pid_group % DIL2
    g1 = (pid_group // DIL2) % DIL1
    g0 = pid_group // (DIL2 * DIL1)
    n0 = L0 // DIL0 + (g0 < L0 % DIL0).to(tl.int32)
    n1 = L1 // DIL1 + (g1 < L1 % DIL1).to(tl.int32)
    n2 = L2 // DIL2 + (g2 < L2 % DIL2).to(tl.int32)
    # the grid holds the tiles of the longest group; shorter groups leave some tiles empty
    tiles2 = tl.cdiv(tl.cdiv(L2, DIL2), T2)
    tiles1 = tl.cdiv(tl.cdiv(L1, DIL1), T1)
    a2 = (pid_tile % tiles2) * T2
    a1 = (pid_tile // tiles2 % tiles1) * T1
    a0 = (pid_tile // (tiles2 * tiles1)) * T0
    return g0, g1, g2, n0, n1, n2, a0, a1, a2


@triton.jit
def _tile_coords(a0, a1, a2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Row-major coordinates of the ``T0*T1*T2`` tokens of the tile starting at ``(a0, a1, a2)``."""
    r = tl.arange(0, T0 * T1 * T2)
    return a0 + r // (T1 * T2), a1 + r // T2 % T1, a2 + r % T2


@triton.jit
def _token(b, x0, x1, x2, h, L0, L1, L2, heads):
    """Index of token ``(b, x0, x1, x2)``, head ``h`` in ``[B, L0, L1, L2, heads]`` (int64)."""
    return (((b.to(tl.int64) * L0 + x0) * L1 + x1) * L2 + x2) * heads + h


@triton.jit
def _in_window(mask, j, start, end, TRIVIAL: tl.constexpr):
    # kernel 1 with tiles of 1 (the padding dimensions of 1D/2D problems): the key is the query
    if not TRIVIAL:
        mask = mask & (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return mask


@triton.jit
def _rpb_index(i0, i1, i2, j0, j1, j2, h, KS0: tl.constexpr, KS1: tl.constexpr, KS2: tl.constexpr):
    """Flat index into ``rpb [heads, 2*KS0-1, 2*KS1-1, 2*KS2-1]`` of every (query, key) pair."""
    r0 = j0[None, :] - i0[:, None] + (KS0 - 1)
    r1 = j1[None, :] - i1[:, None] + (KS1 - 1)
    r2 = j2[None, :] - i2[:, None] + (KS2 - 1)
    return ((h * (2 * KS0 - 1) + r0) * (2 * KS1 - 1) + r1) * (2 * KS2 - 1) + r2


@triton.jit
def _logits(q, k, RPB, h, qk_scale, row_valid, i0, i1, i2, s0, e0, s1, e1, s2, e2, j0, j1, j2,
            KS0: tl.constexpr, KS1: tl.constexpr, KS2: tl.constexpr,
            QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr,
            KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr,
            HAS_RPB: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
            IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Masked logits in base 2 (``(q.k * scale + rpb) * log2(e)``, ``-inf`` outside the
    neighborhood) of a query tile against a KV tile, and the mask."""
    s = _mma(q, tl.trans(k), tl.zeros([BLOCK_Q, BLOCK_KV], tl.float32), IEEE, UPCAST) * qk_scale
    mask = tl.broadcast_to(row_valid[:, None], (BLOCK_Q, BLOCK_KV))
    mask = _in_window(mask, j0, s0, e0, KS0 * QT0 * KT0 == 1)
    mask = _in_window(mask, j1, s1, e1, KS1 * QT1 * KT1 == 1)
    mask = _in_window(mask, j2, s2, e2, KS2 * QT2 * KT2 == 1)
    if HAS_RPB:
        bias = tl.load(RPB + _rpb_index(i0, i1, i2, j0, j1, j2, h, KS0, KS1, KS2), mask=mask, other=0.0)
        s += bias.to(tl.float32) * LOG2E
    return tl.where(mask, s, float("-inf")), mask


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _na_fwd_kernel(
    Q, K, V, RPB, OUT, LSE,
    L0, L1, L2, heads, head_dim, qk_scale,
    KS0: tl.constexpr, KS1: tl.constexpr, KS2: tl.constexpr, ST0: tl.constexpr, ST1: tl.constexpr,
    ST2: tl.constexpr, DIL0: tl.constexpr, DIL1: tl.constexpr, DIL2: tl.constexpr, CAUSAL0: tl.constexpr,
    CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, SH0: tl.constexpr, SH1: tl.constexpr, SH2: tl.constexpr,
    QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr,
    KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_RPB: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(2) // heads
    h = tl.program_id(2) % heads
    g0, g1, g2, n0, n1, n2, a0, a1, a2 = _locate(tl.program_id(0), tl.program_id(1), L0, L1, L2,
                                                 DIL0, DIL1, DIL2, QT0, QT1, QT2)
    i0, i1, i2 = _tile_coords(a0, a1, a2, QT0, QT1, QT2)
    row_valid = (i0 < n0) & (i1 < n1) & (i2 < n2)
    s0, e0 = _window(i0, n0, KS0, ST0, CAUSAL0, SH0)
    s1, e1 = _window(i1, n1, KS1, ST1, CAUSAL1, SH1)
    s2, e2 = _window(i2, n2, KS2, ST2, CAUSAL2, SH2)
    dim = tl.arange(0, BLOCK_D)
    dim_valid = dim < head_dim
    q_tok = _token(b, g0 + DIL0 * i0, g1 + DIL1 * i1, g2 + DIL2 * i2, h, L0, L1, L2, heads)
    q_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(Q + q_tok[:, None] * head_dim + dim[None, :], mask=q_mask, other=0.0)

    lo0, nk0 = _kv_span(a0, n0, QT0, KS0, ST0, CAUSAL0, KT0, SH0)
    lo1, nk1 = _kv_span(a1, n1, QT1, KS1, ST1, CAUSAL1, KT1, SH1)
    lo2, nk2 = _kv_span(a2, n2, QT2, KS2, ST2, CAUSAL2, KT2, SH2)
    num_kv = tl.where((a0 < n0) & (a1 < n1) & (a2 < n2), nk0 * nk1 * nk2, 0)

    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for step in range(0, num_kv):
        j0, j1, j2 = _tile_coords(lo0 + step // (nk2 * nk1) * KT0, lo1 + step // nk2 % nk1 * KT1,
                                  lo2 + step % nk2 * KT2, KT0, KT1, KT2)
        kv_tok = _token(b, g0 + DIL0 * j0, g1 + DIL1 * j1, g2 + DIL2 * j2, h, L0, L1, L2, heads)
        kv_offset = kv_tok[:, None] * head_dim + dim[None, :]
        kv_mask = ((j0 < n0) & (j1 < n1) & (j2 < n2))[:, None] & dim_valid[None, :]
        k = tl.load(K + kv_offset, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offset, mask=kv_mask, other=0.0)
        s, _ = _logits(q, k, RPB, h, qk_scale, row_valid, i0, i1, i2, s0, e0, s1, e1, s2, e2, j0, j1, j2,
                       KS0, KS1, KS2, QT0, QT1, QT2, KT0, KT1, KT2, HAS_RPB, BLOCK_Q, BLOCK_KV, IEEE, UPCAST)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, IEEE, UPCAST)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows of the tile see no key
    tl.store(OUT + q_tok[:, None] * head_dim + dim[None, :], (acc / l_safe[:, None]).to(OUT.dtype.element_ty),
             mask=q_mask)
    tl.store(LSE + q_tok, (m_i + tl.log2(l_safe)) * LN2, mask=row_valid)


@triton.jit
def _na_dq_kernel(
    Q, K, V, RPB, GRAD_OUT, LSE, DELTA, DQ, DRPB,
    L0, L1, L2, heads, head_dim, scale, qk_scale,
    KS0: tl.constexpr, KS1: tl.constexpr, KS2: tl.constexpr, ST0: tl.constexpr, ST1: tl.constexpr,
    ST2: tl.constexpr, DIL0: tl.constexpr, DIL1: tl.constexpr, DIL2: tl.constexpr, CAUSAL0: tl.constexpr,
    CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, SH0: tl.constexpr, SH1: tl.constexpr, SH2: tl.constexpr,
    QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr,
    KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_RPB: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(2) // heads
    h = tl.program_id(2) % heads
    g0, g1, g2, n0, n1, n2, a0, a1, a2 = _locate(tl.program_id(0), tl.program_id(1), L0, L1, L2,
                                                 DIL0, DIL1, DIL2, QT0, QT1, QT2)
    i0, i1, i2 = _tile_coords(a0, a1, a2, QT0, QT1, QT2)
    row_valid = (i0 < n0) & (i1 < n1) & (i2 < n2)
    s0, e0 = _window(i0, n0, KS0, ST0, CAUSAL0, SH0)
    s1, e1 = _window(i1, n1, KS1, ST1, CAUSAL1, SH1)
    s2, e2 = _window(i2, n2, KS2, ST2, CAUSAL2, SH2)
    dim = tl.arange(0, BLOCK_D)
    dim_valid = dim < head_dim
    q_tok = _token(b, g0 + DIL0 * i0, g1 + DIL1 * i1, g2 + DIL2 * i2, h, L0, L1, L2, heads)
    q_offset = q_tok[:, None] * head_dim + dim[None, :]
    q_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(Q + q_offset, mask=q_mask, other=0.0)
    grad_out = tl.load(GRAD_OUT + q_offset, mask=q_mask, other=0.0)
    lse = tl.load(LSE + q_tok, mask=row_valid, other=0.0) * LOG2E
    delta = tl.load(DELTA + q_tok, mask=row_valid, other=0.0)

    lo0, nk0 = _kv_span(a0, n0, QT0, KS0, ST0, CAUSAL0, KT0, SH0)
    lo1, nk1 = _kv_span(a1, n1, QT1, KS1, ST1, CAUSAL1, KT1, SH1)
    lo2, nk2 = _kv_span(a2, n2, QT2, KS2, ST2, CAUSAL2, KT2, SH2)
    num_kv = tl.where((a0 < n0) & (a1 < n1) & (a2 < n2), nk0 * nk1 * nk2, 0)

    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for step in range(0, num_kv):
        j0, j1, j2 = _tile_coords(lo0 + step // (nk2 * nk1) * KT0, lo1 + step // nk2 % nk1 * KT1,
                                  lo2 + step % nk2 * KT2, KT0, KT1, KT2)
        kv_tok = _token(b, g0 + DIL0 * j0, g1 + DIL1 * j1, g2 + DIL2 * j2, h, L0, L1, L2, heads)
        kv_offset = kv_tok[:, None] * head_dim + dim[None, :]
        kv_mask = ((j0 < n0) & (j1 < n1) & (j2 < n2))[:, None] & dim_valid[None, :]
        k = tl.load(K + kv_offset, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offset, mask=kv_mask, other=0.0)
        s, mask = _logits(q, k, RPB, h, qk_scale, row_valid, i0, i1, i2, s0, e0, s1, e1, s2, e2, j0, j1, j2,
                          KS0, KS1, KS2, QT0, QT1, QT2, KT0, KT1, KT2, HAS_RPB, BLOCK_Q, BLOCK_KV, IEEE, UPCAST)
        p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
        dp = _mma(grad_out, tl.trans(v), tl.zeros([BLOCK_Q, BLOCK_KV], tl.float32), IEEE, UPCAST)
        ds = p * (dp - delta[:, None])  # d(loss)/d(logit), logit = q.k * scale + rpb
        dq = _mma(ds.to(k.dtype), k, dq, IEEE, UPCAST)
        if HAS_RPB:
            tl.atomic_add(DRPB + _rpb_index(i0, i1, i2, j0, j1, j2, h, KS0, KS1, KS2), ds, mask=mask, sem="relaxed")
    tl.store(DQ + q_offset, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _na_dkdv_kernel(
    Q, K, V, RPB, GRAD_OUT, LSE, DELTA, DK, DV,
    L0, L1, L2, heads, head_dim, scale, qk_scale,
    KS0: tl.constexpr, KS1: tl.constexpr, KS2: tl.constexpr, ST0: tl.constexpr, ST1: tl.constexpr,
    ST2: tl.constexpr, DIL0: tl.constexpr, DIL1: tl.constexpr, DIL2: tl.constexpr, CAUSAL0: tl.constexpr,
    CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, SH0: tl.constexpr, SH1: tl.constexpr, SH2: tl.constexpr,
    QT0: tl.constexpr, QT1: tl.constexpr, QT2: tl.constexpr,
    KT0: tl.constexpr, KT1: tl.constexpr, KT2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_RPB: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(2) // heads
    h = tl.program_id(2) % heads
    g0, g1, g2, n0, n1, n2, a0, a1, a2 = _locate(tl.program_id(0), tl.program_id(1), L0, L1, L2,
                                                 DIL0, DIL1, DIL2, KT0, KT1, KT2)
    j0, j1, j2 = _tile_coords(a0, a1, a2, KT0, KT1, KT2)
    dim = tl.arange(0, BLOCK_D)
    dim_valid = dim < head_dim
    kv_tok = _token(b, g0 + DIL0 * j0, g1 + DIL1 * j1, g2 + DIL2 * j2, h, L0, L1, L2, heads)
    kv_offset = kv_tok[:, None] * head_dim + dim[None, :]
    kv_mask = ((j0 < n0) & (j1 < n1) & (j2 < n2))[:, None] & dim_valid[None, :]
    k = tl.load(K + kv_offset, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_offset, mask=kv_mask, other=0.0)

    lo0, nq0 = _q_span(a0, n0, KT0, KS0, ST0, CAUSAL0, QT0, SH0)
    lo1, nq1 = _q_span(a1, n1, KT1, KS1, ST1, CAUSAL1, QT1, SH1)
    lo2, nq2 = _q_span(a2, n2, KT2, KS2, ST2, CAUSAL2, QT2, SH2)
    num_q = tl.where((a0 < n0) & (a1 < n1) & (a2 < n2), nq0 * nq1 * nq2, 0)

    dk = tl.zeros([BLOCK_KV, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_KV, BLOCK_D], tl.float32)
    for step in range(0, num_q):
        i0, i1, i2 = _tile_coords(lo0 + step // (nq2 * nq1) * QT0, lo1 + step // nq2 % nq1 * QT1,
                                  lo2 + step % nq2 * QT2, QT0, QT1, QT2)
        row_valid = (i0 < n0) & (i1 < n1) & (i2 < n2)
        s0, e0 = _window(i0, n0, KS0, ST0, CAUSAL0, SH0)
        s1, e1 = _window(i1, n1, KS1, ST1, CAUSAL1, SH1)
        s2, e2 = _window(i2, n2, KS2, ST2, CAUSAL2, SH2)
        q_tok = _token(b, g0 + DIL0 * i0, g1 + DIL1 * i1, g2 + DIL2 * i2, h, L0, L1, L2, heads)
        q_offset = q_tok[:, None] * head_dim + dim[None, :]
        q_mask = row_valid[:, None] & dim_valid[None, :]
        q = tl.load(Q + q_offset, mask=q_mask, other=0.0)
        grad_out = tl.load(GRAD_OUT + q_offset, mask=q_mask, other=0.0)
        lse = tl.load(LSE + q_tok, mask=row_valid, other=0.0) * LOG2E
        delta = tl.load(DELTA + q_tok, mask=row_valid, other=0.0)
        s, mask = _logits(q, k, RPB, h, qk_scale, row_valid, i0, i1, i2, s0, e0, s1, e1, s2, e2, j0, j1, j2,
                          KS0, KS1, KS2, QT0, QT1, QT2, KT0, KT1, KT2, HAS_RPB, BLOCK_Q, BLOCK_KV, IEEE, UPCAST)
        p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
        dv = _mma(tl.trans(p.to(grad_out.dtype)), grad_out, dv, IEEE, UPCAST)
        dp = _mma(grad_out, tl.trans(v), tl.zeros([BLOCK_Q, BLOCK_KV], tl.float32), IEEE, UPCAST)
        ds = p * (dp - delta[:, None])
        dk = _mma(tl.trans(ds.to(q.dtype)), q, dk, IEEE, UPCAST)
    tl.store(DK + kv_offset, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offset, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------
# host functions (called by kernels/ops.py)
# ----------------------------------------------------------------------------------------------
def _launch(query: torch.Tensor, params: NeighborhoodParams, rpb, backward: bool):
    """Runtime sizes, constexpr meta-parameters and grid for ``query [B, *spatial, H, D]``.

    1D/2D problems are padded to 3D with leading size-1 dimensions (kernel 1, tile 1). The
    key/value-stationary backward kernel (``backward=True``) gets its own tile shapes.
    """
    batch, *spatial, heads, head_dim = query.shape
    if batch * heads > 65535:
        raise NotImplementedError(f"na (triton backend): batch * heads = {batch * heads} exceeds the grid limit 65535")
    q_tile, kv_tile = triton_tiles(tuple(spatial), params, backward)
    pad = 3 - len(spatial)
    q_tile, kv_tile = (1,) * pad + tuple(q_tile), (1,) * pad + tuple(kv_tile)
    spatial3, padded = pad_to_3d(spatial, params)
    kernel, stride, dilation, causal, shift = (padded.kernel_size, padded.stride, padded.dilation, padded.is_causal,
                                               padded.shift)
    meta = dict(BLOCK_Q=q_tile[0] * q_tile[1] * q_tile[2], BLOCK_KV=kv_tile[0] * kv_tile[1] * kv_tile[2],
                BLOCK_D=head_block(head_dim), HAS_RPB=rpb is not None, num_warps=num_warps(head_dim), num_stages=2,
                **dtype_flags(query.dtype))
    for dim in range(3):
        meta.update({f"KS{dim}": kernel[dim], f"ST{dim}": stride[dim], f"DIL{dim}": dilation[dim],
                     f"CAUSAL{dim}": causal[dim], f"SH{dim}": shift[dim], f"QT{dim}": q_tile[dim],
                     f"KT{dim}": kv_tile[dim]})
    program_tile = kv_tile if backward else q_tile
    tiles = 1
    for length, dil, tile in zip(spatial3, dilation, program_tile):
        tiles *= triton.cdiv(triton.cdiv(length, dil), tile)
    grid = (tiles, dilation[0] * dilation[1] * dilation[2], batch * heads)
    return (*spatial3, heads, head_dim), meta, grid


def na_forward(query, key, value, rpb, params: NeighborhoodParams, scale: float):
    """``query``/``key``/``value`` ``[B, *spatial, H, D]`` (contiguous), ``rpb`` None or
    ``[H, 2k0-1, ...]`` -> ``(out [B, *spatial, H, D], lse [B, *spatial, H] float32)``."""
    check_supported("neighborhood attention", query)
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    sizes, meta, grid = _launch(query, params, rpb, backward=False)
    out = torch.empty_like(query)
    lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
    rpb_arg = rpb.contiguous() if rpb is not None else query  # never read without HAS_RPB
    _na_fwd_kernel[grid](query, key, value, rpb_arg, out, lse, *sizes, scale * LOG2E, **meta)
    return out, lse


def na_backward(grad_out, query, key, value, out, lse, rpb, params: NeighborhoodParams, scale: float):
    """Gradients ``(d_query, d_key, d_value, d_rpb or None)`` of :func:`na_forward`."""
    check_supported("neighborhood attention", query)
    grad_out, query, key, value, out, lse = (t.contiguous() for t in (grad_out, query, key, value, out, lse))
    delta = attention_delta(out, grad_out)
    d_query, d_key, d_value = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    if rpb is not None:
        rpb_arg = rpb.contiguous()
        d_rpb = torch.zeros(rpb.shape, dtype=torch.float32, device=rpb.device)  # atomics accumulate in fp32
    else:
        rpb_arg = d_rpb = query  # placeholders, never touched without HAS_RPB

    sizes, meta, grid = _launch(query, params, rpb, backward=False)
    _na_dq_kernel[grid](query, key, value, rpb_arg, grad_out, lse, delta, d_query, d_rpb, *sizes, scale,
                        scale * LOG2E, **meta)
    sizes, meta, grid = _launch(query, params, rpb, backward=True)
    _na_dkdv_kernel[grid](query, key, value, rpb_arg, grad_out, lse, delta, d_key, d_value, *sizes, scale,
                          scale * LOG2E, **meta)
    return d_query, d_key, d_value, (d_rpb.to(rpb.dtype) if rpb is not None else None)
