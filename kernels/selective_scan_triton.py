"""The fused Triton selective scan (forward and backward), for CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``.

A program owns one (batch, group) and a block of that group's channels, its state ``[channels,
d_state]`` in registers, and walks the sequence. The backward runs the forward kernel again keeping
every step's state (``[batch, dim, L, d_state]`` in global memory), then walks the sequence in reverse;
the B / C gradients are summed over the block's channels in the program and over the blocks by the
caller, the A / D / delta_bias gradients over the batch by the caller. Inputs as in
:mod:`.selective_scan_native`: one float dtype, contiguous, ``B`` / ``C`` grouped.
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch


@triton.jit
def _softplus(x):
    # torch's: linear above 20; log(1 + exp(x)) = max(x, 0) + log(1 + exp(-|x|)) without overflow
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x < 0.0, e, 1.0) / (1.0 + e)


@triton.jit
def _program(pid_bg, pid_d, dim, L, N, groups, per_group, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows of the block's channels in [batch * dim], offset of its B / C, channel mask, state offsets, state mask)."""
    b = pid_bg // groups
    g = pid_bg % groups
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs < per_group
    rows = b * dim + g * per_group + offs
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    return rows, (b * groups + g) * N * L, mask_d, offs_n, mask_n


@triton.jit
def _scan_forward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, history_ptr,
                         dim, L, N, groups, per_group, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                         HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, KEEP_HISTORY: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, bc, mask_d, offs_n, mask_n = _program(tl.program_id(0), tl.program_id(1), dim, L, N, groups, per_group,
                                                BLOCK_D, BLOCK_N)
    channels = rows % dim
    mask = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + channels[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    bias = tl.load(bias_ptr + channels, mask=mask_d, other=0.0) if HAS_BIAS else 0.0
    Dv = tl.load(D_ptr + channels, mask=mask_d, other=0.0) if HAS_D else 0.0
    x = tl.zeros([BLOCK_D, BLOCK_N], dtype=A.dtype)
    for l in range(L):
        u = tl.load(u_ptr + rows * L + l, mask=mask_d, other=0.0)
        dt = tl.load(delta_ptr + rows * L + l, mask=mask_d, other=0.0) + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        Bl = tl.load(B_ptr + bc + offs_n * L + l, mask=mask_n, other=0.0)
        Cl = tl.load(C_ptr + bc + offs_n * L + l, mask=mask_n, other=0.0)
        x = tl.exp(dt[:, None] * A) * x + (dt * u)[:, None] * Bl[None, :]
        if KEEP_HISTORY:
            tl.store(history_ptr + (rows[:, None] * L + l) * N + offs_n[None, :], x, mask=mask)
        y = tl.sum(x * Cl[None, :], axis=1) + Dv * u
        if HAS_Z:
            z = tl.load(z_ptr + rows * L + l, mask=mask_d, other=0.0)
            y = y * z * _sigmoid(z)
        tl.store(out_ptr + rows * L + l, y, mask=mask_d)
    tl.store(last_ptr + rows[:, None] * N + offs_n[None, :], x, mask=mask)


@triton.jit
def _scan_backward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr,
                          history_ptr, du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
                          dim, L, N, groups, per_group, blocks, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                          HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bg, pid_d = tl.program_id(0), tl.program_id(1)
    rows, bc, mask_d, offs_n, mask_n = _program(pid_bg, pid_d, dim, L, N, groups, per_group, BLOCK_D, BLOCK_N)
    channels = rows % dim
    mask = mask_d[:, None] & mask_n[None, :]
    partial = (pid_bg * blocks + pid_d) * L * N  # this block's rows of the [batch, groups, blocks, L, N] sums
    A = tl.load(A_ptr + channels[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    bias = tl.load(bias_ptr + channels, mask=mask_d, other=0.0) if HAS_BIAS else 0.0
    Dv = tl.load(D_ptr + channels, mask=mask_d, other=0.0) if HAS_D else 0.0
    if HAS_DLAST:
        dx = tl.load(dlast_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    else:
        dx = tl.zeros([BLOCK_D, BLOCK_N], dtype=A.dtype)
    dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=A.dtype)
    dD = tl.sum(dA, axis=1)
    dbias = tl.sum(dA, axis=1)
    for i in range(L):
        l = L - 1 - i
        u = tl.load(u_ptr + rows * L + l, mask=mask_d, other=0.0)
        raw = tl.load(delta_ptr + rows * L + l, mask=mask_d, other=0.0) + bias
        if SOFTPLUS:
            dt = _softplus(raw)
            dsp = tl.where(raw > 20.0, 1.0, _sigmoid(raw))
        else:
            dt = raw
            dsp = 1.0
        Bl = tl.load(B_ptr + bc + offs_n * L + l, mask=mask_n, other=0.0)
        Cl = tl.load(C_ptr + bc + offs_n * L + l, mask=mask_n, other=0.0)
        x = tl.load(history_ptr + (rows[:, None] * L + l) * N + offs_n[None, :], mask=mask, other=0.0)
        previous = tl.load(history_ptr + (rows[:, None] * L + tl.maximum(l - 1, 0)) * N + offs_n[None, :],
                           mask=mask & (l > 0), other=0.0)
        gy = tl.load(dout_ptr + rows * L + l, mask=mask_d, other=0.0)
        if HAS_Z:
            z = tl.load(z_ptr + rows * L + l, mask=mask_d, other=0.0)
            s = _sigmoid(z)
            pre = tl.sum(x * Cl[None, :], axis=1) + Dv * u
            tl.store(dz_ptr + rows * L + l, gy * pre * s * (1.0 + z * (1.0 - s)), mask=mask_d)
            gy = gy * z * s
        dD += gy * u
        d = dx + gy[:, None] * Cl[None, :]  # the gradient of this step's state
        a = tl.exp(dt[:, None] * A)
        tl.store(dC_ptr + partial + l * N + offs_n, tl.sum(gy[:, None] * x, axis=0), mask=mask_n)
        tl.store(dB_ptr + partial + l * N + offs_n, tl.sum(d * (dt * u)[:, None], axis=0), mask=mask_n)
        dB_weighted = tl.sum(d * Bl[None, :], axis=1)
        dlog = d * previous * a  # of dt * A
        ddelta = (dB_weighted * u + tl.sum(dlog * A, axis=1)) * dsp
        dA += dlog * dt[:, None]
        dx = d * a
        dbias += ddelta
        tl.store(du_ptr + rows * L + l, gy * Dv + dB_weighted * dt, mask=mask_d)
        tl.store(ddelta_ptr + rows * L + l, ddelta, mask=mask_d)
    tl.store(dA_ptr + rows[:, None] * N + offs_n[None, :], dA, mask=mask)
    if HAS_D:
        tl.store(dD_ptr + rows, dD, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + rows, dbias, mask=mask_d)


def _blocks(dim: int, groups: int, d_state: int):
    per_group = dim // groups
    block_d = min(triton.next_power_of_2(per_group), 32)
    return per_group, block_d, triton.next_power_of_2(d_state), triton.cdiv(per_group, block_d)


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, history=None):
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    per_group, block_d, block_n, blocks = _blocks(dim, groups, d_state)
    out = torch.empty_like(u)
    last_state = u.new_empty(batch, dim, d_state)
    _scan_forward_kernel[(batch * groups, blocks)](
        u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, out, last_state, history if history is not None else u,
        dim, length, d_state, groups, per_group, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, KEEP_HISTORY=history is not None,
        BLOCK_D=block_d, BLOCK_N=block_n,
    )
    return out, last_state


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool):
    """``(out [batch, dim, L], last_state [batch, dim, d_state])``."""
    return _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def scan_backward(grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool):
    """``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)``, the last three None where the input is."""
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    per_group, block_d, block_n, blocks = _blocks(dim, groups, d_state)
    history = u.new_empty(batch, dim, length, d_state)
    _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, history)
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dz = None if z is None else torch.empty_like(z)
    dA = u.new_empty(batch, dim, d_state)
    dB, dC = (u.new_zeros(batch, groups, blocks, length, d_state) for _ in range(2))
    dD = None if D is None else u.new_empty(batch, dim)
    dbias = None if delta_bias is None else u.new_empty(batch, dim)
    _scan_backward_kernel[(batch * groups, blocks)](
        u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, grad_out,
        grad_last_state if grad_last_state is not None else u, history, du, ddelta, dA, dB, dC,
        dD if dD is not None else u, dz if dz is not None else u, dbias if dbias is not None else u,
        dim, length, d_state, groups, per_group, blocks, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, HAS_DLAST=grad_last_state is not None,
        BLOCK_D=block_d, BLOCK_N=block_n,
    )
    return (du, ddelta, dA.sum(0), dB.sum(2).transpose(-1, -2), dC.sum(2).transpose(-1, -2),
            None if dD is None else dD.sum(0), dz, None if dbias is None else dbias.sum(0))
