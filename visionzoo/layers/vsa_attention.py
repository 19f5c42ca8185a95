"""Varied-size window attention (VSA), with the attention itself on :func:`visionzoo.kernels.na2d`.

Paper: VSA: Learning Varied-Size Window Attention in Vision Transformers (ECCV 2022) -
https://arxiv.org/abs/2204.08446; official code: ViTAE-Transformer/ViTAE-VSA
(``Image-Classification/vitaev2_vsa/vsa.py``).

Queries stay on the default ``window`` grid. Per window and per head, two regressors (average pool
over the window -> LeakyReLU -> 1x1 conv) predict a scale and an offset of the key / value window;
keys and values are resampled bilinearly on that scaled, shifted grid (``grid_sample``,
``align_corners=True``, zeros outside) and each query window attends its sampled window with
Swin's relative position bias.

The sampling follows the official classification layer exactly (``/work/shared/specs/window.md``):
on the map zero-padded right / bottom to ``(Hp, Wp)``, a multiple of the window, the grid of the
token at row ``i * wh + r``, column ``j * ww + c`` is, in ``grid_sample``'s normalised coordinates,

    x = centre_x(j) + (c - (ww - 1) / 2) * 2 / (Wp - 1) * (1 + scale_x) + offset_x / (W // ww)
    y = centre_y(i) + (r - (wh - 1) / 2) * 2 / (Hp - 1) * (1 + scale_y) + offset_y / (H // wh)

with ``centre(j)`` the window's mean of ``linspace(-1, 1, Wp)`` and ``H, W`` the unpadded sizes.
At ``scale = offset = 0`` this is exactly the token's own position, so with the regressors
initialised to zero (as here) a new layer is plain window attention; the official code defines
that initialisation but never calls it. Keys and values are zero where the map is padded (qkv runs
on the unpadded map, as in the official layer).

The attention runs on the shared op's blocked path (``kernel_size = stride = window``):
``grid_sample`` returns the sampled keys / values in the map layout, each window's samples where
its default window lies, which is the layout the blocked op reads, with the bias table, on every
backend. Fused SDPA over windows would need window-partition copies of q, k and v and the bias
expanded to ``[heads, N, N]``; the op needs neither.

:class:`VSAWindowAttention` keeps the official submodule names (``qkv``, ``proj``,
``relative_position_bias_table``, ``sampling_offsets.2``, ``sampling_scales.2``), so the released
ViTAEv2-VSA attention weights load into it (their 1x1-conv ``qkv`` / ``proj`` weights and the
``relative_position_index`` buffer are accepted as they are).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module, to_2tuple, trunc_normal_

from visionzoo.kernels import na2d

from .relative_position import crop_rel_pos_table, rpb_from_query_minus_key_table
from .window_attention import fit_window_shift

__all__ = ["VSAWindowAttention", "vsa_sampling_grid"]

_size_2_t = Union[int, Tuple[int, int]]


def vsa_sampling_grid(
    offsets: torch.Tensor,
    scales: torch.Tensor,
    window_size: Tuple[int, int],
    padded_size: Tuple[int, int],
) -> torch.Tensor:
    """The ``grid_sample`` grid of VSA (formula in the module docstring).

    Args:
        offsets: ``[N, 2, nH, nW]`` per-window offsets (channel 0: x, 1: y), already divided by
            the window counts of the unpadded map.
        scales: ``[N, 2, nH, nW]`` per-window scales (channel 0: x, 1: y).
        window_size: ``(wh, ww)``.
        padded_size: ``(Hp, Wp)``, multiples of the window.

    Returns:
        ``[N, Hp, Wp, 2]`` (x, y) in ``[-1, 1]`` coordinates with ``align_corners=True``.
    """
    (window_h, window_w), (padded_h, padded_w) = window_size, padded_size
    num_h, num_w = padded_h // window_h, padded_w // window_w

    def axis(length: int, window: int, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        # a map of one token has the single coordinate -1 (linspace(-1, 1, 1)); any step serves
        step = 2.0 / max(length - 1, 1)
        kwargs = dict(dtype=offsets.dtype, device=offsets.device)
        centre = (torch.arange(count, **kwargs) * window + (window - 1) / 2) * step - 1
        relative = (torch.arange(window, **kwargs) - (window - 1) / 2) * step
        return centre, relative

    centre_x, relative_x = axis(padded_w, window_w, num_w)
    centre_y, relative_y = axis(padded_h, window_h, num_h)
    # [N, nH, wh, nW, ww] once broadcast: rows (i, r), columns (j, c)
    per_window = lambda t: t[:, :, None, :, None]  # noqa: E731  [N, nH, nW] -> [N, nH, 1, nW, 1]
    grid_x = centre_x[:, None] + relative_x * (1 + per_window(scales[:, 0])) + per_window(offsets[:, 0])
    grid_y = (centre_y[:, None, None, None] + relative_y[:, None, None] * (1 + per_window(scales[:, 1]))
              + per_window(offsets[:, 1]))
    grid = torch.stack(torch.broadcast_tensors(grid_x, grid_y), dim=-1)
    return grid.reshape(offsets.shape[0], padded_h, padded_w, 2)


def _window_regressor(dim: int, num_heads: int) -> nn.Sequential:
    # position 0 holds the official AvgPool2d(window) (no parameters): the layer pools once for both
    # regressors, over the window fitted to the map, so the keys stay ``sampling_*.2.{weight,bias}``
    return nn.Sequential(nn.Identity(), nn.LeakyReLU(), nn.Conv2d(dim, 2 * num_heads, kernel_size=1))


@register_notrace_module  # fits its window to the input's shape: a leaf for torch.fx
class VSAWindowAttention(nn.Module):
    """Varied-size window multi-head self-attention, channels-last ``[B, H, W, C]`` in,
    ``[B, H, W, out_dim]`` out.

    Any input size: per dimension a map not larger than the window takes the map as its window
    (Swin's rule, :func:`visionzoo.layers.fit_window_shift`; the centre of the bias table is used),
    otherwise it is zero padded right / bottom to a multiple of the window and cropped back.

    Args:
        dim: input channels ``C``; must be divisible by ``num_heads``.
        num_heads: attention heads, each with its own sampled windows.
        out_dim: channels of q, k, v and the output (default ``dim``; ViTAEv2's reduction cells
            widen the tokens here). As in the official layer, the logits are scaled by
            ``(dim // num_heads) ** -0.5``, the input's width per head.
        window_size: default window, int or ``(h, w)``.
        qkv_bias: bias in the qkv projection.
        attn_drop: must be 0: the softmax happens inside the op.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: _size_2_t = 7,
        out_dim: Optional[int] = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        out_dim = out_dim or dim
        if dim % num_heads or out_dim % num_heads:
            raise ValueError(f"dim ({dim}) and out_dim ({out_dim}) must be divisible by num_heads ({num_heads})")
        if attn_drop:
            raise ValueError(
                f"attn_drop={attn_drop} is not supported: the window op computes the softmax inside, "
                "there is no attention matrix to drop out of"
            )
        self.num_heads = num_heads
        self.out_dim = out_dim
        self.head_dim = out_dim // num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.window_size = to_2tuple(window_size)
        if min(self.window_size) < 1:
            raise ValueError(f"window_size must be >= 1, got {self.window_size}")

        self.sampling_offsets = _window_regressor(dim, num_heads)
        self.sampling_scales = _window_regressor(dim, num_heads)
        self.qkv = nn.Linear(dim, out_dim * 3, bias=qkv_bias)
        height, width = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * height - 1) * (2 * width - 1), num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_window_regression()

    def reset_window_regression(self) -> None:
        """Zero scales and offsets: the sampled windows are the default ones (plain window attention)."""
        for regressor in (self.sampling_offsets, self.sampling_scales):
            nn.init.zeros_(regressor[-1].weight)
            nn.init.zeros_(regressor[-1].bias)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, window_size={self.window_size}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the official layer's qkv / proj are 1x1 convs ([out, in, 1, 1]) and it stores its bias
        # index as a buffer (recomputed by the op here)
        for name in ("qkv.weight", "proj.weight"):
            weight = state_dict.get(prefix + name)
            if weight is not None and weight.dim() == 4 and weight.shape[2:] == (1, 1):
                state_dict[prefix + name] = weight.flatten(1)
        state_dict.pop(prefix + "relative_position_index", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _query_key_value(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``qkv`` on ``x [B, H, W, C]``: queries heads-last ``[B, H, W, heads, head_dim]`` (the op's
        layout) and keys / values channel-first ``[B, heads * 2 * head_dim, H, W]``, (heads, (k, v))
        major (``grid_sample``'s layout), each straight from its GEMM."""
        batch, height, width, dim = x.shape
        weight, bias = self.qkv.weight, self.qkv.bias
        query_weight, key_value_weight = weight.split([self.out_dim, 2 * self.out_dim])
        query_bias, key_value_bias = (None, None) if bias is None else bias.split([self.out_dim, 2 * self.out_dim])
        query = F.linear(x, query_weight, query_bias).reshape(batch, height, width, self.num_heads, self.head_dim)
        # rows (k, v, heads, head_dim) -> (heads, k / v, head_dim)
        key_value_weight = key_value_weight.reshape(2, self.num_heads, self.head_dim, dim).transpose(0, 1)
        key_value_weight = key_value_weight.reshape(2 * self.out_dim, dim)
        tokens = x.reshape(batch, height * width, dim).transpose(1, 2)  # [B, C, H * W], a view
        if key_value_bias is None:
            key_value = torch.matmul(key_value_weight, tokens)
        else:
            key_value_bias = key_value_bias.reshape(2, self.num_heads, self.head_dim).transpose(0, 1).reshape(-1, 1)
            key_value = torch.baddbmm(key_value_bias, key_value_weight.expand(batch, -1, -1), tokens)
        return query, key_value.reshape(batch, 2 * self.out_dim, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, H, W, C]`` -> ``[B, H, W, out_dim]``."""
        if x.dim() != 4:
            raise ValueError(f"VSAWindowAttention expects [B, H, W, C], got shape {tuple(x.shape)}")
        batch, height, width, _ = x.shape
        window, _ = fit_window_shift((height, width), self.window_size, (0, 0))
        pad_h, pad_w = -height % window[0], -width % window[1]
        padded_h, padded_w = height + pad_h, width + pad_w
        query, key_value = self._query_key_value(x)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
            query = F.pad(query, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
            key_value = F.pad(key_value, (0, pad_w, 0, pad_h))

        pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), window)  # [B, C, nH, nW]
        num_h, num_w = pooled.shape[-2:]
        groups = batch * self.num_heads
        # [B, heads * 2, nH, nW] -> [B * heads, (x, y), nH, nW]; sampled in float32 at least:
        # half-precision coordinates would miss the tokens by a fraction of a pixel
        dtype = torch.promote_types(query.dtype, torch.float32)
        offsets = self.sampling_offsets(pooled).reshape(groups, 2, num_h, num_w).to(dtype)
        scales = self.sampling_scales(pooled).reshape(groups, 2, num_h, num_w).to(dtype)
        divisors = torch.tensor([width // window[1], height // window[0]], dtype=dtype, device=offsets.device)
        grid = vsa_sampling_grid(offsets / divisors[:, None, None], scales, window, (padded_h, padded_w))

        key_value = key_value.reshape(groups, 2 * self.head_dim, padded_h, padded_w)
        key_value = F.grid_sample(key_value.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        key_value = key_value.to(query.dtype).reshape(batch, self.num_heads, 2, self.head_dim, padded_h, padded_w)
        key, value = key_value.permute(2, 0, 4, 5, 1, 3).unbind(0)  # each [B, Hp, Wp, heads, head_dim]

        rpb = rpb_from_query_minus_key_table(self.relative_position_bias_table, self.window_size)
        if window != self.window_size:
            rpb = crop_rel_pos_table(rpb, window)
        x = na2d(query, key, value, kernel_size=window, stride=window, scale=self.scale, rpb=rpb)
        x = self.proj(x[:, :height, :width].reshape(batch, height, width, self.out_dim))
        return self.proj_drop(x)
