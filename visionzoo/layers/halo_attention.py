"""Halo attention (HaloNet, arXiv:2103.12731) as one fused attention call over blocks.

The map is cut into ``b x b`` query blocks; each block attends to the ``(b + 2h) x (b + 2h)`` window
around it (``h`` = halo) on the key / value map zero-padded by ``h`` (border queries put weight on the
zero keys, as timm's ``HaloAttn``). The logits get query-dependent relative terms
``q . rel_height[ky - qy + win - 1] + q . rel_width[kx - qx + win - 1]`` (``win = b + 2h``, positions
within the query block and its window), the factorized relative embedding of timm's ``PosEmbedRel``.

How it runs:

* the windows are gathered with one pad and one strided unfold of the channels-last key / value
  maps, copied once into the ``[blocks, heads, win^2, dim]`` layout attention reads (timm unfolds,
  reshapes, permutes and splits K / V, and broadcasts the relative logits through several
  full-size temporaries);
* the relative terms are computed per query and axis (``[.., b^2, win]`` each) and added as one float
  mask into :func:`torch.nn.functional.scaled_dot_product_attention`, which fuses scale, mask,
  softmax and the value product (no softmax is materialised in the forward pass);
* PyTorch's fused CPU kernel takes no gradient for a mask, so when gradients are needed the call
  goes through :class:`_MaskedAttention`, whose backward recomputes the probabilities once and
  returns the gradients of q, k, v and of both relative terms (the mask is never stored).

:func:`halo_attention` is the functional form on heads-last tensors (``[B, H, W, heads, dim]``);
:class:`HaloAttention` is timm's ``HaloAttn`` module (same arguments, parameter names ``q``, ``kv``,
``pos_embed.height_rel`` / ``pos_embed.width_rel``, so timm's state dicts load) on NCHW maps.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import make_divisible, register_notrace_module, trunc_normal_

__all__ = ["HaloAttention", "PosEmbedRel", "check_halo_map", "halo_attention"]


def check_halo_map(height: int, width: int, block_size: int, name: str = "halo attention") -> None:
    """A ValueError naming the map unless both sides are multiples of ``block_size``."""
    if height % block_size or width % block_size:
        raise ValueError(
            f"{name}: the {height}x{width} map must be a multiple of block_size {block_size} in both dimensions"
        )


def _relative_index(block: int, window: int, device: torch.device) -> torch.Tensor:
    """``[block, window]`` rows of the ``2 * window - 1`` relative table: ``key - query + window - 1``."""
    query = torch.arange(block, device=device)
    key = torch.arange(window, device=device)
    return key[None, :] - query[:, None] + window - 1


def _relative_logits(
    query: torch.Tensor, rel_height: torch.Tensor, rel_width: torch.Tensor, window: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``query [N, heads, b, b, d]`` (rows, columns of a block) -> the height and width terms
    ``[N, heads, b * b, window]`` (per query, per key row / key column of its window)."""
    block = query.shape[-2]
    index = _relative_index(block, window, query.device)
    heights = rel_height[index]  # [b (query row), window (key row), d]
    widths = rel_width[index]  # [b (query column), window (key column), d]
    by_height = torch.einsum("nhyxd,ykd->nhyxk", query, heights)
    by_width = torch.einsum("nhyxd,xkd->nhyxk", query, widths)
    return by_height.flatten(2, 3), by_width.flatten(2, 3)


def _mask(by_height: torch.Tensor, by_width: torch.Tensor) -> torch.Tensor:
    """``[N, heads, L, window]`` twice -> the additive mask ``[N, heads, L, window^2]`` (key rows major)."""
    return (by_height.unsqueeze(-1) + by_width.unsqueeze(-2)).flatten(-2)


def _attend(query, key, value, mask, scale):
    # the fused CPU kernel needs one head dim for q, k and v; zero columns leave q . k unchanged
    extra = value.shape[-1] - query.shape[-1]
    if extra > 0:
        query, key = F.pad(query, (0, extra)), F.pad(key, (0, extra))
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


class _MaskedAttention(torch.autograd.Function):
    """``softmax(scale * q k^T + by_height (+) by_width) v`` with gradients for every input.

    ``query [N, heads, L, d]``, ``key [N, heads, S, d]``, ``value [N, heads, S, dv]``, ``by_height`` and
    ``by_width [N, heads, L, window]`` with ``S = window^2``.
    """

    @staticmethod
    def forward(ctx, query, key, value, by_height, by_width, scale):
        out = _attend(query, key, value, _mask(by_height, by_width), scale)
        ctx.save_for_backward(query, key, value, by_height, by_width, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, by_height, by_width, out = ctx.saved_tensors
        scale = ctx.scale
        n, heads, length, window = by_height.shape
        q, k, v = query.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1)
        # the gradient arrives in the permuted layout of the block folding: batched matmuls need it
        # contiguous (or they copy matrix by matrix)
        g, o = grad_out.contiguous().flatten(0, 1), out.flatten(0, 1)
        logits = torch.baddbmm(_mask(by_height, by_width).flatten(0, 1), q, k.transpose(1, 2), alpha=scale)
        prob = torch.softmax(logits, dim=-1)
        del logits
        grad_value = torch.bmm(prob.transpose(1, 2), g)
        # d logits = P * (dP - rowsum(dO * O))
        grad_logits = torch.bmm(g, v.transpose(1, 2))
        grad_logits.sub_((g * o).sum(-1, keepdim=True)).mul_(prob)
        del prob
        grad_query = torch.bmm(grad_logits, k).mul_(scale)
        grad_key = torch.bmm(grad_logits.transpose(1, 2), q).mul_(scale)
        grad_logits = grad_logits.view(n, heads, length, window, window)
        return (
            grad_query.view_as(query),
            grad_key.view_as(key),
            grad_value.view_as(value),
            grad_logits.sum(-1),
            grad_logits.sum(-2),
            None,
        )


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, H, W, heads, d]`` -> ``[B * blocks, heads, block^2, d]`` (blocks row-major)."""
    batch, height, width, heads, dim = x.shape
    x = x.view(batch, height // block, block, width // block, block, heads, dim)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, heads, block * block, dim)


def _unblocks(x: torch.Tensor, batch: int, height: int, width: int, block: int) -> torch.Tensor:
    """Inverse of :func:`_blocks`: ``[B * blocks, heads, block^2, d]`` -> ``[B, H, W, heads, d]``."""
    _, heads, _, dim = x.shape
    x = x.view(batch, height // block, width // block, heads, block, block, dim)
    return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, height, width, heads, dim)


def _gather_windows(x: torch.Tensor, block: int, halo: int) -> torch.Tensor:
    window = block + 2 * halo
    heads, dim = x.shape[-2:]
    x = F.pad(x, (0, 0, 0, 0, halo, halo, halo, halo))
    # unfold is a strided view [B, nH, nW, heads, d, win, win]; the reshape is the one copy
    x = x.unfold(1, window, block).unfold(2, window, block)
    return x.permute(0, 1, 2, 3, 5, 6, 4).reshape(-1, heads, window * window, dim)


class _Windows(torch.autograd.Function):
    """:func:`_gather_windows` whose backward adds each window's gradient back onto the map as nine
    strided slices (its centre block, the halo strips and corners on the neighbouring blocks: a
    halo no wider than a block reaches only those) instead of ATen's general ``unfold_backward``,
    which zero-fills the padded map and accumulates window by window (2% of a HaloNet-26T training
    step)."""

    @staticmethod
    def forward(ctx, x, block, halo):
        ctx.shape, ctx.block, ctx.halo = x.shape, block, halo
        return _gather_windows(x, block, halo)

    @staticmethod
    def backward(ctx, grad):
        batch, height, width, heads, dim = ctx.shape
        block, halo = ctx.block, ctx.halo
        window, rows, cols = block + 2 * halo, height // block, width // block
        grad = grad.reshape(batch, rows, cols, heads, window, window, dim)
        grad_x = grad.new_empty(ctx.shape)
        # [B, nH, nW, heads, b (row in block), b (column in block), d]
        blocks = grad_x.view(batch, rows, block, cols, block, heads, dim).permute(0, 1, 3, 5, 2, 4, 6)
        blocks.copy_(grad[..., halo:halo + block, halo:halo + block, :])
        if halo:
            # (window slice, block offset, slice within the target block) per axis: the halo above /
            # left of a window lies on the previous block's last rows, the one below / right on the
            # next block's first
            parts = ((slice(halo, halo + block), 0, slice(0, block)),
                     (slice(0, halo), -1, slice(block - halo, block)),
                     (slice(halo + block, window), 1, slice(0, halo)))

            def blocks_at(offset, count):  # (target, source) block ranges for a block offset
                return (slice(max(offset, 0), count + min(offset, 0)), slice(max(-offset, 0), count - max(offset, 0)))

            for row_source, row_offset, row_target in parts:
                for col_source, col_offset, col_target in parts:
                    if row_offset == col_offset == 0:
                        continue
                    (row_to, row_from), (col_to, col_from) = blocks_at(row_offset, rows), blocks_at(col_offset, cols)
                    blocks[:, row_to, col_to, :, row_target, col_target].add_(
                        grad[:, row_from, col_from, :, row_source, col_source])
        return grad_x, None, None


def _windows(x: torch.Tensor, block: int, halo: int) -> torch.Tensor:
    """``[B, H, W, heads, d]`` -> ``[B * blocks, heads, win^2, d]``: the zero-padded ``win x win`` window
    around each block (``win = block + 2 * halo``), key rows major."""
    if halo <= block and torch.is_grad_enabled() and x.requires_grad:
        return _Windows.apply(x, block, halo)
    return _gather_windows(x, block, halo)


def halo_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_size: int,
    halo_size: int,
    rel_height: torch.Tensor,
    rel_width: torch.Tensor,
    scale: Optional[float] = None,
    scale_pos_embed: bool = False,
) -> torch.Tensor:
    """Halo attention on heads-last maps.

    Args:
        query: ``[B, H / s, W / s, heads, d]``; ``s`` (query stride) divides ``block_size`` and is read
            from the shapes: each ``block_size / s`` query block attends the window of its
            ``block_size`` key block (timm's strided ``HaloAttn``; the relative terms then index query
            positions within the ``block_size / s`` block against key positions in the window).
        key: ``[B, H, W, heads, d]``; value: ``[B, H, W, heads, dv]``. ``H`` and ``W`` must be multiples
            of ``block_size``.
        block_size, halo_size: ``b`` and ``h``; the window is ``(b + 2h)^2`` with zero padding.
        rel_height, rel_width: ``[2 * (b + 2h) - 1, d]`` relative embeddings (timm's ``PosEmbedRel``).
        scale: logit scale, default ``d ** -0.5``.
        scale_pos_embed: scale the relative terms too (timm's ``scale_pos_embed``).

    Returns:
        ``[B, H / s, W / s, heads, dv]``.
    """
    if query.dim() != 5 or key.dim() != 5 or value.dim() != 5:
        raise ValueError(
            "halo_attention: query, key and value must be [B, H, W, heads, dim], got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if key.shape != value.shape[:-1] + key.shape[-1:] or query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"halo_attention: key {tuple(key.shape)} and value {tuple(value.shape)} must share [B, H, W, heads], "
            f"query {tuple(query.shape)} the key's head dim"
        )
    if block_size < 1 or halo_size < 0:
        raise ValueError(f"halo_attention: block_size must be >= 1 and halo_size >= 0, got {block_size}, {halo_size}")
    batch, height, width, heads, dim = key.shape
    check_halo_map(height, width, block_size, "halo_attention: key")
    stride = height // query.shape[1]
    if (
        query.shape[0] != batch
        or query.shape[3] != heads
        or block_size % stride
        or tuple(query.shape[1:3]) != (height // stride, width // stride)
    ):
        raise ValueError(
            f"halo_attention: query {tuple(query.shape)} must be the key map {height}x{width} divided by a "
            f"stride that divides block_size {block_size}, with the key's batch and heads"
        )
    window = block_size + 2 * halo_size
    if rel_height.shape != (2 * window - 1, dim) or rel_width.shape != (2 * window - 1, dim):
        raise ValueError(
            f"halo_attention: rel_height and rel_width must be [{2 * window - 1}, {dim}], "
            f"got {tuple(rel_height.shape)} and {tuple(rel_width.shape)}"
        )
    scale = float(dim ** -0.5 if scale is None else scale)
    block_q = block_size // stride

    q = _blocks(query, block_q)
    k = _windows(key, block_size, halo_size)
    v = _windows(value, block_size, halo_size)
    by_height, by_width = _relative_logits(
        q.view(q.shape[0], heads, block_q, block_q, dim), rel_height, rel_width, window
    )
    if scale_pos_embed:
        by_height, by_width = by_height * scale, by_width * scale
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, by_height, by_width)):
        out = _MaskedAttention.apply(q, k, v, by_height, by_width, scale)
    else:
        out = _attend(q, k, v, _mask(by_height, by_width), scale)
    return _unblocks(out, batch, height // stride, width // stride, block_q)


class PosEmbedRel(nn.Module):
    """The factorized relative embeddings ``height_rel`` / ``width_rel`` ``[2 * win - 1, dim_head]``
    (timm's names and init)."""

    def __init__(self, window: int, dim_head: int, scale: float, device=None, dtype=None):
        super().__init__()
        self.scale = scale
        self.height_rel = nn.Parameter(torch.empty(window * 2 - 1, dim_head, device=device, dtype=dtype))
        self.width_rel = nn.Parameter(torch.empty(window * 2 - 1, dim_head, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.height_rel, std=self.scale)
        trunc_normal_(self.width_rel, std=self.scale)


@register_notrace_module  # checks the map against the block: a leaf for torch.fx
class HaloAttention(nn.Module):
    """timm's ``HaloAttn`` on :func:`halo_attention`: ``[B, dim, H, W] -> [B, dim_out, H / stride, W / stride]``.

    Args (timm's):
        dim: input channels; dim_out: output (value) channels, ``dim`` if None.
        feat_size: unused (timm's self-attention factories pass it).
        stride: 1 or 2; 2 subsamples the queries (``block_size / 2`` query blocks), or average-pools the
            output when ``avg_down`` or ``block_size`` is odd.
        num_heads; dim_head: q / k channels per head, ``make_divisible(dim_out * qk_ratio, 8) // num_heads``
            if None. Values have ``dim_out // num_heads`` per head.
        block_size, halo_size: ``b`` and ``h``; H and W must be multiples of ``b`` unless
            ``pad_to_block``.
        qkv_bias; scale_pos_embed: scale the relative logits with q . k.
        pad_to_block: zero pad a map at the bottom / right to a multiple of ``b`` and crop the output
            to ``ceil(H / stride) x ceil(W / stride)`` (the dense-prediction layout; not timm's). The
            padded positions are zero inputs: without ``qkv_bias`` (timm's default) their keys and
            values are zero, as those of the halo's own zero padding at the map borders.
        device, dtype: of the parameters (timm's factory arguments).

    The output is NCHW in channels-last memory (the attention is computed heads-last); values are
    those of timm's ``HaloAttn`` with the same weights.
    """

    def __init__(
        self,
        dim: int,
        dim_out: Optional[int] = None,
        feat_size: Optional[Tuple[int, int]] = None,
        stride: int = 1,
        num_heads: int = 8,
        dim_head: Optional[int] = None,
        block_size: int = 8,
        halo_size: int = 3,
        qk_ratio: float = 1.0,
        qkv_bias: bool = False,
        avg_down: bool = False,
        scale_pos_embed: bool = False,
        pad_to_block: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        dim_out = dim_out or dim
        if dim_out % num_heads:
            raise ValueError(f"dim_out ({dim_out}) must be divisible by num_heads ({num_heads})")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if block_size < 1 or halo_size < 0:
            raise ValueError(f"block_size must be >= 1 and halo_size >= 0, got {block_size} and {halo_size}")
        self.num_heads = num_heads
        self.dim_head_qk = dim_head or make_divisible(dim_out * qk_ratio, divisor=8) // num_heads
        self.dim_head_v = dim_out // num_heads
        self.scale = self.dim_head_qk ** -0.5
        self.scale_pos_embed = scale_pos_embed
        self.block_size = block_size
        self.halo_size = halo_size
        self.window = block_size + 2 * halo_size
        self.stride = stride
        self.pad_to_block = pad_to_block
        use_avg_pool = stride > 1 and (avg_down or block_size % stride != 0)
        self.block_stride = stride if stride > 1 and not use_avg_pool else 1
        self.q = nn.Conv2d(dim, num_heads * self.dim_head_qk, 1, stride=self.block_stride, bias=qkv_bias, **dd)
        self.kv = nn.Conv2d(dim, num_heads * (self.dim_head_qk + self.dim_head_v), 1, bias=qkv_bias, **dd)
        self.pos_embed = PosEmbedRel(self.window, self.dim_head_qk, self.scale, **dd)
        self.pool = nn.AvgPool2d(2, 2) if use_avg_pool else nn.Identity()
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, block_size={self.block_size}, halo_size={self.halo_size}"
                + (", pad_to_block=True" if self.pad_to_block else ""))

    def reset_parameters(self) -> None:
        std = self.q.weight.shape[1] ** -0.5  # fan-in
        trunc_normal_(self.q.weight, std=std)
        trunc_normal_(self.kv.weight, std=std)
        self.pos_embed.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_height, pad_width = -height % self.block_size, -width % self.block_size
        if not self.pad_to_block or not (pad_height or pad_width):
            return self._forward_blocks(x)
        out = self._forward_blocks(F.pad(x, (0, pad_width, 0, pad_height)))
        return out[..., : -(-height // self.stride), : -(-width // self.stride)]

    def _forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        check_halo_map(height, width, self.block_size)
        # 1x1 convolutions as matmuls on the channels-last view (no copy when x is channels-last)
        x = x.permute(0, 2, 3, 1)
        heads, dim_qk = self.num_heads, self.dim_head_qk
        query = x[:, :: self.block_stride, :: self.block_stride] if self.block_stride > 1 else x
        query = F.linear(query, self.q.weight.flatten(1), self.q.bias)
        kv = F.linear(x, self.kv.weight.flatten(1), self.kv.bias)
        query = query.view(batch, height // self.block_stride, width // self.block_stride, heads, dim_qk)
        key, value = kv.view(batch, height, width, heads, -1).split([dim_qk, self.dim_head_v], dim=-1)
        out = halo_attention(
            query, key, value,
            self.block_size,
            self.halo_size,
            self.pos_embed.height_rel,
            self.pos_embed.width_rel,
            scale=self.scale,
            scale_pos_embed=self.scale_pos_embed,
        )
        return self.pool(out.flatten(3).permute(0, 3, 1, 2))
