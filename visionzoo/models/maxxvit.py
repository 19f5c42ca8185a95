"""CoAtNet and MaxViT: MBConv stages followed by attention, one model class configured by dataclasses.

Both families stack MBConv blocks (inverted bottleneck, depthwise 3x3, squeeze-excitation) and
relative-position attention; they differ in where attention starts and what it covers:

* CoAtNet (arXiv:2106.04803): C-C-T-T, global attention over the whole map of stages 3-4 with a
  bias per relative offset (Swin's query-minus-key table, timm's ``RelPosBias``);
* MaxViT (arXiv:2204.01697): every block is MBConv + block attention (7x7 windows) + grid
  attention (a 7x7 grid spread over the whole map), bias tables in the TensorFlow layout (timm's
  ``RelPosBiasTf``, already indexed by key minus query).

Every attention runs on the shared op :func:`visionzoo.kernels.na2d` with its ``rpb``:

* block attention: ``kernel_size = stride = window`` (disjoint windows);
* grid attention: ``kernel_size = stride = grid``, ``dilation = map / grid``: the tokens of a grid
  window are ``map / grid`` apart, i.e. one block of the dilated sub-map;
* global attention: ``kernel_size = stride = map`` (one block covering the map); in the dense
  layout (``pad_to_window``) the window stays the map size the bias tables were trained at, and a
  larger map is zero padded to whole windows and cut into them (see the declaration at the end).

The module and parameter names are timm's (``timm/models/maxxvit.py``), so the state dicts of timm's
``maxvit_*_tf_224`` and ``coatnet_{0..3}_224`` load through :func:`checkpoint_filter_fn` (which only
reshapes CoAtNet's 1x1 convolutions of the attention and MLP into the linear layers used here), and
the logits equal timm's. The model is channels-last (``[B, H, W, C]`` between blocks, as the other
visionzoo backbones); MBConv blocks run their convolutions on an NCHW view.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    LayerNorm2d,
    NormMlpClassifierHead,
    calculate_drop_path_rates,
    create_attn,
    create_conv2d,
    create_pool2d,
    get_act_layer,
    get_device_dtype,
    get_norm_act_layer,
    make_divisible,
    register_notrace_module,
    to_2tuple,
    trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model

from visionzoo.kernels import na2d
from visionzoo.layers import ChannelsLastModel, Mlp, Stage, linear, split_linear, use_fast_gelu_tanh
from visionzoo.layers.token_merging import register_merge2d_attention

from .build import build_model, getter_feature_cfg
from .dense import DenseArch, DenseFamily, register_dense_family

__all__ = ["MaxxVit", "MaxxVitCfg", "MaxxVitConvCfg", "MaxxVitTransformerCfg", "checkpoint_filter_fn"]


@dataclass(frozen=True)
class MaxxVitConvCfg:
    """MBConv blocks: expansion of the output width, depthwise ``kernel_size``, SE on ``attn_ratio`` of the output."""

    expand_ratio: float = 4.0
    kernel_size: int = 3
    attn_ratio: float = 0.25
    act_layer: str = "gelu"
    norm_eps: float = 1e-5
    padding: str = ""  # "same": TensorFlow's asymmetric padding of strided convs and pools (MaxViT's TF weights)


@dataclass(frozen=True)
class MaxxVitTransformerCfg:
    """Attention blocks.

    Args:
        dim_head: channels per head.
        head_first: qkv channels ordered ``[heads, (q, k, v), dim_head]`` (CoAtNet) instead of
            ``[(q, k, v), heads, dim_head]`` (MaxViT's TF weights).
        bias_layout: ``"query_minus_key"`` (flat ``[(2h-1)*(2w-1), heads]`` table, CoAtNet) or
            ``"key_minus_query"`` (``[heads, 2h-1, 2w-1]``, MaxViT's TF weights).
        partition_ratio: window and grid size = image size // ``partition_ratio`` when ``window_size`` is None.
    """

    dim_head: int = 32
    head_first: bool = True
    expand_ratio: float = 4.0
    bias_layout: str = "query_minus_key"
    partition_ratio: int = 32
    window_size: Optional[Tuple[int, int]] = None
    act_layer: str = "gelu"
    norm_eps: float = 1e-6


@dataclass(frozen=True)
class MaxxVitCfg:
    """A variant: widths and depths of the four stages, block type per stage (``C``: MBConv,
    ``T``: CoAtNet transformer, ``M``: MaxViT block), stem and head."""

    embed_dim: Tuple[int, ...] = (96, 192, 384, 768)
    depths: Tuple[int, ...] = (2, 3, 5, 2)
    block_type: Tuple[str, ...] = ("C", "C", "T", "T")
    stem_width: int = 64
    stem_bias: bool = False
    head_hidden_size: int = 768
    conv_cfg: MaxxVitConvCfg = field(default_factory=MaxxVitConvCfg)
    transformer_cfg: MaxxVitTransformerCfg = field(default_factory=MaxxVitTransformerCfg)


class RelPosBias(nn.Module):
    """A learned bias per relative offset of a ``(h, w)`` window, read by the op as ``[heads, 2h-1, 2w-1]``.

    ``relative_position_bias_table`` keeps the checkpoint's layout: the flat query-minus-key table
    ``[(2h-1)*(2w-1), heads]`` of Swin / CoAtNet, or the TF table ``[heads, 2h-1, 2w-1]`` indexed by key
    minus query, which is the op's own layout.
    """

    def __init__(self, window_size: Tuple[int, int], num_heads: int, layout: str = "query_minus_key"):
        super().__init__()
        if layout not in ("query_minus_key", "key_minus_query"):
            raise ValueError(f"layout must be 'query_minus_key' or 'key_minus_query', got {layout!r}")
        self.window_size = tuple(window_size)
        self.num_heads = num_heads
        self.layout = layout
        height, width = 2 * self.window_size[0] - 1, 2 * self.window_size[1] - 1
        shape = (height * width, num_heads) if layout == "query_minus_key" else (num_heads, height, width)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(shape))
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, layout={self.layout}"

    def rpb(self) -> torch.Tensor:
        """``[heads, 2h-1, 2w-1]`` indexed by key minus query."""
        if self.layout == "key_minus_query":
            return self.relative_position_bias_table
        height, width = 2 * self.window_size[0] - 1, 2 * self.window_size[1] - 1
        # a query-minus-key table read at key minus query is the same table mirrored
        return self.relative_position_bias_table.t().reshape(self.num_heads, height, width).flip(1, 2)


def _unmerged_partitions(module: "PartitionAttention") -> Optional[str]:
    if module.partition == "global":
        return None
    return ("MaxViT's block / grid attention is not merged: a window holds a few tokens (7x7), where the "
            "attention costs little next to the projections and MLP, and a grid window's tokens lie a whole "
            "window apart, so a 2D cell of them is no spatial neighbourhood")


@register_merge2d_attention(unsupported=_unmerged_partitions)  # CoAtNet's global attention
@register_notrace_module  # derives the grid's dilation from the input's shape: a leaf for torch.fx
class PartitionAttention(nn.Module):
    """Multi-head attention with a relative position bias inside windows of a ``[B, H, W, C]`` map.

    ``partition`` says which windows: ``"block"`` (disjoint ``window_size`` blocks), ``"grid"``
    (``window_size`` tokens spread evenly over the map, ``map / window`` apart) or ``"global"`` (the
    map is one window of ``window_size``; CoAtNet's dense layout gives it other maps, which are then
    padded and cut into ``window_size`` blocks as ``"block"``). All three are one :func:`na2d` call.

    Args:
        dim: input channels. dim_out: output channels (CoAtNet widens in the first block of a stage).
        window_size: ``(h, w)`` of a window; the bias table covers its offsets.
        cfg: heads of ``cfg.dim_head`` channels (``dim_out // dim_head`` of them), qkv channel order
            and bias layout.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        partition: str,
        window_size: Tuple[int, int],
        cfg: MaxxVitTransformerCfg,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if partition not in ("block", "grid", "global"):
            raise ValueError(f"partition must be 'block', 'grid' or 'global', got {partition!r}")
        if dim_out % cfg.dim_head:
            raise ValueError(f"dim_out ({dim_out}) must be divisible by dim_head ({cfg.dim_head})")
        self.partition = partition
        self.window_size = to_2tuple(window_size)
        self.num_heads = dim_out // cfg.dim_head
        self.dim_head = cfg.dim_head
        self.head_first = cfg.head_first
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.rel_pos = RelPosBias(self.window_size, self.num_heads, cfg.bias_layout)
        self.proj = nn.Linear(dim_out, dim_out)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"partition={self.partition}, window_size={self.window_size}, num_heads={self.num_heads}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, H, W, dim]`` -> ``[B, H, W, dim_out]``.

        A map that is not a multiple of the window (block, global) or grid (grid) is zero padded at
        the bottom / right first (the dense layout, ``MaxxVit(pad_to_window=True)``; the classification
        model refuses such inputs): padded tokens take part as keys, as in Swin's detection backbone.
        """
        batch, height, width, _ = x.shape
        pad_height, pad_width = -height % self.window_size[0], -width % self.window_size[1]
        if pad_height or pad_width:
            x = F.pad(x, (0, 0, 0, pad_width, 0, pad_height))
        padded_height, padded_width = height + pad_height, width + pad_width
        if self.head_first:
            qkv = linear(x, self.qkv).view(batch, padded_height, padded_width, self.num_heads, 3, self.dim_head)
            q, k, v = qkv.unbind(4)
        else:
            q, k, v = (t.view(batch, padded_height, padded_width, self.num_heads, self.dim_head)
                       for t in split_linear(x, self.qkv, 3))
        dilation = (1, 1)
        if self.partition == "grid":
            dilation = (padded_height // self.window_size[0], padded_width // self.window_size[1])
        x = na2d(
            q, k, v,
            kernel_size=self.window_size,
            stride=self.window_size,
            dilation=dilation,
            rpb=self.rel_pos.rpb(),
        )
        if pad_height or pad_width:
            x = x[:, :height, :width]
        return self.proj_drop(linear(x.reshape(batch, height, width, -1), self.proj))


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class Downsample(nn.Module):
    """Stride-2 average pool, then a 1x1 conv if the width changes; NCHW."""

    def __init__(self, dim: int, dim_out: int, padding: str = ""):
        super().__init__()
        # ceil_mode: an odd map keeps its last row / column (averaged alone), as the stride-2
        # convolution beside it does; even maps pool as timm's
        self.pool = create_pool2d("avg", 2, padding=padding) if padding else nn.AvgPool2d(2, ceil_mode=True)
        self.expand = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.pool(x))


def _pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution of ``x [B, H, W, C]`` as one matrix product over the channels: ``[B, H, W, out]``.

    On a channels-last map the product is one GEMM, where ATen's 1x1 convolution of the NCHW view
    ran up to 1.6x slower (batch 8, 64 -> 256 channels at 56x56, one thread)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class MbConvBlock(nn.Module):
    """Pre-norm MBConv: BN -> 1x1 expand -> BN-act -> depthwise kxk (stride) -> BN-act -> SE -> 1x1, plus shortcut.

    ``[B, H, W, C_in] -> [B, H', W', C_out]``; the 1x1 convolutions are matrix products over the
    channels of the ``[B, H, W, C]`` map, the norms, depthwise convolution and SE run on its NCHW
    view (channels-last memory, where the depthwise convolution is fastest).
    """

    def __init__(self, dim: int, dim_out: int, stride: int, cfg: MaxxVitConvCfg, drop_path: float = 0.0):
        super().__init__()
        norm_act_layer = get_norm_act_layer("batchnorm2d", cfg.act_layer)
        mid = make_divisible(dim_out * cfg.expand_ratio)
        self.shortcut = Downsample(dim, dim_out, cfg.padding) if stride == 2 else nn.Identity()
        self.pre_norm = norm_act_layer(dim, apply_act=False, eps=cfg.norm_eps)
        self.conv1_1x1 = create_conv2d(dim, mid, 1)
        self.norm1 = norm_act_layer(mid, eps=cfg.norm_eps)
        self.conv2_kxk = create_conv2d(mid, mid, cfg.kernel_size, stride=stride, groups=mid, padding=cfg.padding)
        self.norm2 = norm_act_layer(mid, eps=cfg.norm_eps)
        self.se = create_attn("se", mid, act_layer="silu", rd_channels=int(cfg.attn_ratio * dim_out))
        self.conv3_1x1 = create_conv2d(mid, dim_out, 1, bias=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if isinstance(self.shortcut, nn.Identity) else _nhwc(self.shortcut(_nchw(x)))
        x = _pointwise(self.conv1_1x1, _nhwc(self.pre_norm(_nchw(x))))
        x = self.se(self.norm2(self.conv2_kxk(self.norm1(_nchw(x)))))
        return self.drop_path(_pointwise(self.conv3_1x1, _nhwc(x))) + shortcut


class NormDownsample(nn.Module):
    """LayerNorm, then (NCHW) stride-2 pooling: the attention input of CoAtNet's first block of a stage."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.down = Downsample(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _nhwc(self.down(_nchw(self.norm(x))))


class TransformerBlock(nn.Module):
    """CoAtNet's transformer block: global attention with relative bias, MLP; the first block of a
    stage pools by 2 (attention input and shortcut) and widens to ``dim_out``. ``[B, H, W, C]``."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        stride: int,
        map_size: Tuple[int, int],
        cfg: MaxxVitTransformerCfg,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if stride == 2:
            self.shortcut = Downsample(dim, dim_out)
            self.norm1 = NormDownsample(dim, cfg.norm_eps)
        else:
            self.shortcut = nn.Identity()
            self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = PartitionAttention(dim, dim_out, "global", map_size, cfg)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim_out, eps=cfg.norm_eps)
        self.mlp = Mlp(dim_out, int(dim_out * cfg.expand_ratio), act_layer=get_act_layer(cfg.act_layer))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if isinstance(self.shortcut, nn.Identity) else _nhwc(self.shortcut(_nchw(x)))
        x = shortcut + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PartitionBlock(nn.Module):
    """Pre-norm attention over block or grid windows, then an MLP: half of a MaxViT block. ``[B, H, W, C]``."""

    def __init__(self, dim: int, partition: str, window_size: Tuple[int, int], cfg: MaxxVitTransformerCfg,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = PartitionAttention(dim, dim, partition, window_size, cfg)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.expand_ratio), act_layer=get_act_layer(cfg.act_layer))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MaxxVitBlock(nn.Module):
    """MaxViT block: MBConv, block attention, grid attention. ``[B, H, W, C]``."""

    def __init__(self, dim: int, dim_out: int, stride: int, window_size: Tuple[int, int], cfg: MaxxVitCfg,
                 drop_path: float = 0.0):
        super().__init__()
        self.conv = MbConvBlock(dim, dim_out, stride, cfg.conv_cfg, drop_path)
        self.attn_block = PartitionBlock(dim_out, "block", window_size, cfg.transformer_cfg, drop_path)
        self.attn_grid = PartitionBlock(dim_out, "grid", window_size, cfg.transformer_cfg, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn_grid(self.attn_block(self.conv(x)))


def _halve(size: Tuple[int, int]) -> Tuple[int, int]:
    return tuple((s + 1) // 2 for s in size)



def _check_input_size(height: int, width: int, stage_rules: Tuple[Tuple[str, Tuple[int, int]], ...]) -> None:
    """A ValueError naming the input size unless every attention stage's map fits its windows."""
    size = _halve((height, width))
    for i, (block_type, window) in enumerate(stage_rules):
        size = _halve(size)
        if block_type == "M" and (size[0] % window[0] or size[1] % window[1]):
            raise ValueError(
                f"input {height}x{width} gives a {size[0]}x{size[1]} map in stage {i}, not divisible by the "
                f"{window[0]}x{window[1]} windows and grid of block / grid attention (timm's constraint); use a "
                f"multiple of {32 * window[0]}x{32 * window[1]} or build the model with img_size=..."
            )
        if block_type == "T" and size != tuple(window):
            raise ValueError(
                f"input {height}x{width} gives a {size[0]}x{size[1]} map in stage {i}, but its relative "
                f"position bias covers the {window[0]}x{window[1]} map of the img_size the model was built for; "
                "build the model with img_size=... for this input"
            )




@register_notrace_module  # checks the input's size: a leaf for torch.fx
class Stem(nn.Module):
    """3x3 conv stride 2, BN-act, 3x3 conv: ``[B, C, H, W] -> [B, H/2, W/2, stem_width]``.

    ``stage_rules`` (``(block_type, window)`` per stage) let it refuse, with the input's size in the
    message, an image whose stage maps do not fit the windows (see :func:`_check_input_size`).
    """

    def __init__(self, in_chans: int, width: int, bias: bool, cfg: MaxxVitConvCfg,
                 stage_rules: Tuple[Tuple[str, Tuple[int, int]], ...] = ()):
        super().__init__()
        self.stage_rules = stage_rules
        self.conv1 = create_conv2d(in_chans, width, 3, stride=2, padding=cfg.padding, bias=bias)
        self.norm1 = get_norm_act_layer("batchnorm2d", cfg.act_layer)(width, eps=cfg.norm_eps)
        self.conv2 = create_conv2d(width, width, 3, stride=1, padding=cfg.padding, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input_size(x.shape[-2], x.shape[-1], self.stage_rules)
        return _nhwc(self.conv2(self.norm1(self.conv1(x))))


def _override(cfg: MaxxVitCfg, overrides: Dict[str, Any]) -> MaxxVitCfg:
    """``cfg`` with ``overrides`` replaced; ``transformer_*`` / ``conv_*`` keys go to the sub-configs."""
    groups: Dict[str, Dict[str, Any]] = {"transformer_cfg": {}, "conv_cfg": {}, "": {}}
    for key, value in overrides.items():
        prefix = next((p for p in ("transformer_", "conv_") if key.startswith(p)), "")
        groups[prefix + "cfg" if prefix else ""][key[len(prefix):]] = value
    top = groups.pop("")
    unknown = set(top) - {f.name for f in dataclasses.fields(cfg)}
    if unknown:
        raise TypeError(f"MaxxVit got unexpected keyword arguments {sorted(unknown)}")
    sub = {name: replace(getattr(cfg, name), **values) for name, values in groups.items() if values}
    return replace(cfg, **top, **sub)


class MaxxVit(ChannelsLastModel):
    """CoAtNet / MaxViT; ``[B, in_chans, H, W] -> [B, num_classes]``.

    Args:
        cfg: the variant (:class:`MaxxVitCfg`).
        img_size: the input size the windows are derived from (MaxViT: window = grid =
            ``img_size // 32`` unless ``cfg.transformer_cfg.window_size`` is set; CoAtNet: the bias
            tables cover the stage maps at this size).
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate: as in timm.
        pad_to_window: zero pad each attention's map at the bottom / right to a multiple of its
            window (block attention; CoAtNet's global attention, whose window is its stage map at
            ``img_size``) or grid (grid attention) instead of refusing the input (the dense-prediction
            layout, see the declarations at the end of this file).
        cfg_overrides: fields of ``cfg`` to replace, ``transformer_<field>`` / ``conv_<field>`` for
            its sub-configs (timm's overlay: ``timm.create_model(name, depths=(1, 1, 1, 1))``).

    Inputs: MaxViT takes any size whose stage maps are multiples of the window (224, 448, ... at
    window 7); CoAtNet the size it was built for; both any size with ``pad_to_window``. Others raise a
    ValueError naming the size.
    """

    no_weight_decay_patterns = ("*.relative_position_bias_table",)

    def __init__(
        self,
        cfg: MaxxVitCfg,
        img_size: Union[int, Tuple[int, int]] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pad_to_window: bool = False,
        **cfg_overrides: Any,
    ):
        super().__init__()
        cfg = _override(cfg, cfg_overrides)
        num_stages = len(cfg.embed_dim)
        if not len(cfg.depths) == len(cfg.block_type) == num_stages:
            raise ValueError(
                f"embed_dim {cfg.embed_dim}, depths {cfg.depths} and block_type {cfg.block_type} need one entry per stage"
            )
        if any(t not in ("C", "T", "M") for t in cfg.block_type):
            raise ValueError(f"block_type entries must be 'C', 'T' or 'M', got {cfg.block_type}")
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        self.num_features = cfg.embed_dim[-1]
        tcfg = cfg.transformer_cfg
        window = tcfg.window_size or tuple(s // tcfg.partition_ratio for s in self.img_size)
        if min(window) < 1:
            raise ValueError(f"img_size {self.img_size} gives windows {window}: it must be at least {tcfg.partition_ratio}")
        self.window_size = tuple(window)

        sizes, size = [], _halve(self.img_size)
        for _ in cfg.embed_dim:
            size = _halve(size)
            sizes.append(size)
        stage_rules = tuple((t, size if t == "T" else window) for t, size in zip(cfg.block_type, sizes))

        # with pad_to_window no stage constrains the input
        self.stem = Stem(in_chans, cfg.stem_width, cfg.stem_bias, cfg.conv_cfg, () if pad_to_window else stage_rules)
        dpr = calculate_drop_path_rates(drop_path_rate, list(cfg.depths), stagewise=True)
        stages, self.feature_info = [], []
        dim = cfg.stem_width
        for i, (dim_out, depth, block_type) in enumerate(zip(cfg.embed_dim, cfg.depths, cfg.block_type)):
            blocks = []
            for j in range(depth):
                stride = 2 if j == 0 else 1
                if block_type == "C":
                    blocks.append(MbConvBlock(dim, dim_out, stride, cfg.conv_cfg, dpr[i][j]))
                elif block_type == "T":
                    blocks.append(TransformerBlock(dim, dim_out, stride, sizes[i], tcfg, dpr[i][j]))
                else:
                    blocks.append(MaxxVitBlock(dim, dim_out, stride, window, cfg, dpr[i][j]))
                dim = dim_out
            stages.append(Stage(blocks))
            self.feature_info.append(dict(num_chs=dim_out, reduction=2 ** (i + 2), module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        # the final norm sits in the head (pool -> LayerNorm -> Linear-tanh -> classifier), as timm's
        self.norm = nn.Identity()
        self.head = NormMlpClassifierHead(
            self.num_features,
            num_classes,
            hidden_size=cfg.head_hidden_size,
            pool_type=global_pool,
            drop_rate=drop_rate,
            norm_layer=functools.partial(LayerNorm2d, eps=tcfg.norm_eps),
        )
        self.head_hidden_size = self.head.num_features
        self.apply(self._init_weights)
        use_fast_gelu_tanh(self)  # the C++ tanh-GELU (modules and keys unchanged)

    @property
    def patch_embed(self) -> nn.Module:
        """The stem, under the name :class:`ChannelsLastModel` embeds with (``stem`` in the state dict, as timm's)."""
        return self.stem

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^head\.norm", (99999,))],
        )

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """A new classifier; ``reset_other`` (implied when the features narrow) also drops the head's norm and pre-logits."""
        reset_other = reset_other or self.num_features != self.head.in_features
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features,
                        **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features
        if global_pool is not None:
            self.global_pool = global_pool

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """As :class:`ChannelsLastModel`'s; a pruned head also loses its norm and pre-logits, as timm's."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if prune_head:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, H, W, C]`` features -> ``[B, num_classes]`` logits (``[B, head_hidden_size]`` with ``pre_logits``;
        ``[B, H, W, num_classes]`` without pooling, ``global_pool=''``)."""
        x = self.head(_nchw(x), pre_logits=pre_logits)
        return _nhwc(x) if self.head.global_pool.is_identity() else x


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: MaxxVit) -> Dict[str, torch.Tensor]:
    """A timm ``MaxxVit`` state dict (``maxvit_*_tf``, ``coatnet_*``) in this layout.

    The names are the same; CoAtNet's attention and MLP are 1x1 convolutions in timm and linear
    layers here (``[out, in, 1, 1]`` -> ``[out, in]``). timm's non-persistent index / lookup buffers
    are not in its state dicts. A state dict of this model passes through unchanged.
    """
    state_dict = state_dict.get("state_dict", state_dict)
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key in own and value.ndim == 4 and own[key].ndim == 2:
            value = value.reshape(own[key].shape)
        out[key] = value
    return out


def _create_maxxvit(variant: str, cfg: MaxxVitCfg, pretrained: bool = False, **kwargs) -> MaxxVit:
    feature_cfg = getter_feature_cfg(kwargs, tuple(range(len(cfg.depths))))
    return build_model(
        MaxxVit,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        cfg=cfg,
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.95,
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        # the windows (MaxViT) or bias tables (CoAtNet) are sized for the input; see MaxxVit
        "fixed_input_size": True,
        "license": "apache-2.0",
        **kwargs,
    }


def _coatnet_cfg(**kwargs) -> Dict[str, Any]:
    # no released weights (timm's coatnet_{0..3}_224 are untrained too)
    return _cfg(
        paper_ids="arXiv:2106.04803",
        paper_name="CoAtNet: Marrying Convolution and Attention for All Data Sizes",
        origin_url="https://github.com/huggingface/pytorch-image-models",
        **kwargs,
    )


def _maxvit_cfg(timm_tag: str, **kwargs) -> Dict[str, Any]:
    # timm's conversions of the official TensorFlow weights load unchanged
    return _cfg(
        hf_hub_id=f"timm/{timm_tag}",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        paper_ids="arXiv:2204.01697",
        paper_name="MaxViT: Multi-Axis Vision Transformer",
        origin_url="https://github.com/google-research/maxvit",
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    "visionzoo_coatnet_0": _coatnet_cfg(),
    "visionzoo_coatnet_1": _coatnet_cfg(),
    "visionzoo_coatnet_2": _coatnet_cfg(),
    "visionzoo_coatnet_3": _coatnet_cfg(),
    "visionzoo_maxvit_t.in1k": _maxvit_cfg("maxvit_tiny_tf_224.in1k"),
    "visionzoo_maxvit_s.in1k": _maxvit_cfg("maxvit_small_tf_224.in1k"),
    "visionzoo_maxvit_b.in1k": _maxvit_cfg("maxvit_base_tf_224.in1k"),
    "visionzoo_maxvit_l.in1k": _maxvit_cfg("maxvit_large_tf_224.in1k"),
})

# MaxViT's TensorFlow weights: BN eps 1e-3, tanh GELU, TF "same" padding, qkv [(q, k, v), heads, dim]
_MAXVIT_CONV = MaxxVitConvCfg(act_layer="gelu_tanh", norm_eps=1e-3, padding="same")
_MAXVIT_TRANSFORMER = MaxxVitTransformerCfg(
    head_first=False, bias_layout="key_minus_query", act_layer="gelu_tanh", norm_eps=1e-5
)


def _coatnet(embed_dim: Tuple[int, ...], depths: Tuple[int, ...], stem_width: int) -> MaxxVitCfg:
    return MaxxVitCfg(embed_dim=embed_dim, depths=depths, stem_width=stem_width, head_hidden_size=embed_dim[-1])


def _maxvit(embed_dim: Tuple[int, ...], depths: Tuple[int, ...], stem_width: int) -> MaxxVitCfg:
    return MaxxVitCfg(
        embed_dim=embed_dim,
        depths=depths,
        block_type=("M",) * 4,
        stem_width=stem_width,
        stem_bias=True,
        head_hidden_size=embed_dim[-1],
        conv_cfg=_MAXVIT_CONV,
        transformer_cfg=_MAXVIT_TRANSFORMER,
    )


model_cfgs = dict(
    coatnet_0=_coatnet((96, 192, 384, 768), (2, 3, 5, 2), 64),
    coatnet_1=_coatnet((96, 192, 384, 768), (2, 6, 14, 2), 64),
    coatnet_2=_coatnet((128, 256, 512, 1024), (2, 6, 14, 2), 128),
    coatnet_3=_coatnet((192, 384, 768, 1536), (2, 6, 14, 2), 192),
    maxvit_t=_maxvit((64, 128, 256, 512), (2, 2, 5, 2), 64),
    maxvit_s=_maxvit((96, 192, 384, 768), (2, 2, 5, 2), 64),
    maxvit_b=_maxvit((96, 192, 384, 768), (2, 6, 14, 2), 64),
    maxvit_l=_maxvit((128, 256, 512, 1024), (2, 6, 14, 2), 128),
)


@register_model
def visionzoo_coatnet_0(pretrained: bool = False, **kwargs) -> MaxxVit:
    """CoAtNet-0: C-C-T-T, depths 2-3-5-2, widths 96-192-384-768, stem 64."""
    return _create_maxxvit("visionzoo_coatnet_0", model_cfgs["coatnet_0"], pretrained, **kwargs)


@register_model
def visionzoo_coatnet_1(pretrained: bool = False, **kwargs) -> MaxxVit:
    """CoAtNet-1: C-C-T-T, depths 2-6-14-2, widths 96-192-384-768, stem 64."""
    return _create_maxxvit("visionzoo_coatnet_1", model_cfgs["coatnet_1"], pretrained, **kwargs)


@register_model
def visionzoo_coatnet_2(pretrained: bool = False, **kwargs) -> MaxxVit:
    """CoAtNet-2: C-C-T-T, depths 2-6-14-2, widths 128-256-512-1024, stem 128."""
    return _create_maxxvit("visionzoo_coatnet_2", model_cfgs["coatnet_2"], pretrained, **kwargs)


@register_model
def visionzoo_coatnet_3(pretrained: bool = False, **kwargs) -> MaxxVit:
    """CoAtNet-3: C-C-T-T, depths 2-6-14-2, widths 192-384-768-1536, stem 192."""
    return _create_maxxvit("visionzoo_coatnet_3", model_cfgs["coatnet_3"], pretrained, **kwargs)


@register_model
def visionzoo_maxvit_t(pretrained: bool = False, **kwargs) -> MaxxVit:
    """MaxViT-T: depths 2-2-5-2, widths 64-128-256-512, window and grid 7 at 224."""
    return _create_maxxvit("visionzoo_maxvit_t", model_cfgs["maxvit_t"], pretrained, **kwargs)


@register_model
def visionzoo_maxvit_s(pretrained: bool = False, **kwargs) -> MaxxVit:
    """MaxViT-S: depths 2-2-5-2, widths 96-192-384-768, window and grid 7 at 224."""
    return _create_maxxvit("visionzoo_maxvit_s", model_cfgs["maxvit_s"], pretrained, **kwargs)


@register_model
def visionzoo_maxvit_b(pretrained: bool = False, **kwargs) -> MaxxVit:
    """MaxViT-B: depths 2-6-14-2, widths 96-192-384-768, window and grid 7 at 224."""
    return _create_maxxvit("visionzoo_maxvit_b", model_cfgs["maxvit_b"], pretrained, **kwargs)


@register_model
def visionzoo_maxvit_l(pretrained: bool = False, **kwargs) -> MaxxVit:
    """MaxViT-L: depths 2-6-14-2, widths 128-256-512-1024, stem 128, window and grid 7 at 224."""
    return _create_maxxvit("visionzoo_maxvit_l", model_cfgs["maxvit_l"], pretrained, **kwargs)


# ----------------------------------------------------------------------------------------------
# dense prediction: what visionzoo.mm registers (mmdet / mmseg backbones) and configs/ are written from
# ----------------------------------------------------------------------------------------------
def _dense_windows(model: MaxxVit, task: str) -> Dict[str, Any]:
    """MaxViT's ``task_kwargs``: the windows and grid of the 224 weights (7x7) kept at every input size
    and maps zero padded to a multiple of them. The paper's COCO runs (896x896 inputs) keep window and
    grid at 7 too; there every stage map is a multiple of 7, and padding only changes other sizes."""
    return {"pad_to_window": True, "transformer_window_size": model.window_size}


def _dense_global_windows(model: MaxxVit, task: str) -> Dict[str, Any]:
    """CoAtNet's ``task_kwargs``: global attention becomes window attention whose window is the
    stage map of the training size (14x14 in stage 3, 7x7 in stage 4 at 224), maps zero padded to
    whole windows (as MaxViT's). The bias tables are used as trained (no resizing), the cost stays
    linear in the image area, and the classification weights load unchanged; a 224 input is one
    window per stage, the classification model's attention exactly. (The alternative, global
    attention over the whole map with bicubically resized tables as timm does for other sizes, costs
    quadratically in the area: stage 3 of an 800x1333 image has 4200 tokens, 19x the logits of its 24
    padded 14x14 windows; and it applies the tables to offsets they were never trained at.)"""
    return {"pad_to_window": True}


# MaxViT's published dense setting is COCO detection (Cascade Mask R-CNN at 896x896, T / S / B from
# the ImageNet-1K weights; no configs or code released) and has no semantic segmentation. The
# configs written from this declaration put T / S / B into the project's Mask R-CNN and UperNet
# recipes (the Swin papers'), at the stochastic depth of the official ImageNet-1K training configs
# (1 - survival_prob of google-research/maxvit maxvit/models/hp/vision_i1k.py: 0.2, 0.3, 0.4). L is a
# backbone without configs (not in the paper's COCO table).
register_dense_family(DenseFamily(
    name="maxvit",
    type_names=("MaxViT",),
    archs={
        "tiny": DenseArch("visionzoo_maxvit_t", "in1k", dict(det=0.2, seg=0.2)),
        "small": DenseArch("visionzoo_maxvit_s", "in1k", dict(det=0.3, seg=0.3)),
        "base": DenseArch("visionzoo_maxvit_b", "in1k", dict(det=0.4, seg=0.4)),
        "large": DenseArch("visionzoo_maxvit_l", "in1k"),
    },
    task_kwargs=_dense_windows,
    checkpoint_filter=checkpoint_filter_fn,
))

# CoAtNet's paper has no dense-prediction setting and no weights were released (timm's coatnet_*_224
# are untrained too): the configs name no pretrained start (init_cfg=None; point it at your ImageNet
# checkpoint, timm's or this model's layout). Sizes by parameters next to Swin's (0 ~ T, 1 ~ S, 2 ~ B,
# 3 ~ L; arch '0'..'3' works too), at Swin's official dense stochastic depth: UperNet 0.3 for every
# size, Mask R-CNN 0.2 for 0 and 1 (Swin-T / S); Swin-B / L have no Mask R-CNN config, and 2 and 3
# take 0.3 (their ImageNet-1K rates, 0.5 and 0.7, are well above 0 / 1's 0.2 / 0.3).
register_dense_family(DenseFamily(
    name="coatnet",
    type_names=("CoAtNet",),
    archs={
        "tiny": DenseArch("visionzoo_coatnet_0", "", dict(det=0.2, seg=0.3)),
        "small": DenseArch("visionzoo_coatnet_1", "", dict(det=0.2, seg=0.3)),
        "base": DenseArch("visionzoo_coatnet_2", "", dict(det=0.3, seg=0.3)),
        "large": DenseArch("visionzoo_coatnet_3", "", dict(det=0.3, seg=0.3)),
    },
    task_kwargs=_dense_global_windows,
    checkpoint_filter=checkpoint_filter_fn,
))
