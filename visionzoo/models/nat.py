"""NAT, DiNAT, DiNAT_s and isotropic NAT / DiNAT, built on :func:`visionzoo.kernels.na2d`.

Papers:
    * Neighborhood Attention Transformer (CVPR 2023) - https://arxiv.org/abs/2204.07143
    * Dilated Neighborhood Attention Transformer - https://arxiv.org/abs/2209.15001

Official code and weights (MIT): https://github.com/SHI-Labs/Neighborhood-Attention-Transformer
(``classification/nat.py``, ``dinat.py``, ``dinats.py``, ``isotropic.py``). The architecture and
parameter count are identical; the module layout follows timm and ``checkpoint_filter_fn`` maps the
official keys:

    * downsamplers sit at the start of stages 1-3 (``stages.{i+1}.downsample`` <- the official
      ``levels.{i}.downsample`` / ``layers.{i}.downsample`` at the end of stage ``i``), so every
      stage outputs the pre-downsample feature map that the official dense backbones return;
    * layer scale is timm's ``LayerScale`` (``ls1.gamma`` <- ``gamma1``, ``ls2.gamma`` <- ``gamma2``);
    * the classifier is timm's ``ClassifierHead`` (``head.fc`` <- ``head``);
    * isotropic blocks are ``blocks.{i}`` (<- ``layers.{i}``).

Dilations (DiNAT): even blocks use NA (dilation 1), odd blocks of stage ``i`` use
``max(1, stage_size // kernel_size)`` per dimension, ``stage_size = ceil(img_size / 2**(i+2))``,
computed for the ``img_size`` the model is built for (the weights' resolution by default). This
reproduces the official 224 (``[1,8,1] [1,4,1,4] [1,2]*9 [1]*5``) and 384 (``13, 6, 3, 1``) schedules.
Any input size runs: per block and per dimension the window is fitted to the feature map at run
time (kernel clamped to the feature size, dilation to ``size // kernel``, see
:func:`visionzoo.layers.fit_window`), where NATTEN would zero-pad; results equal the official
model whenever no padding happens, e.g. at the training resolution.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, PatchEmbed, calculate_drop_path_rates, to_2tuple
from timm.models import generate_default_cfgs, register_model

from visionzoo.layers import (
    ChannelsLastModel,
    NeighborhoodAttention2d,
    Stage,
    TransformerBlock,
    create_downsample,
)

from .build import build_model, getter_feature_cfg, resolve_cfg
from .dense import DenseArch, DenseFamily, register_dense_family

__all__ = ["NAT", "NATIsotropic", "dinat_dilations"]

_int_or_tuple_2_t = Union[int, Tuple[int, int]]


def dinat_dilations(
    depths: Sequence[int], img_size: _int_or_tuple_2_t, kernel_size: int = 7
) -> List[List[Tuple[int, int]]]:
    """DiNAT's dilation schedule at ``img_size`` for stages at strides 4, 8, 16, 32, ...

    Returns one ``(h, w)`` dilation per block: 1 on even blocks, and on odd blocks of stage ``i``
    the largest dilation whose dilated window fits the stage, ``max(1, ceil(size / 2**(i+2)) // kernel_size)``.
    E.g. depths ``(3, 4, 6, 5)`` at 224 -> ``[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1] * 5``.
    """
    img_size = to_2tuple(img_size)
    schedule = []
    for stage, depth in enumerate(depths):
        stride = 2 ** (stage + 2)
        odd = tuple(max(1, math.ceil(size / stride) // kernel_size) for size in img_size)
        schedule.append([odd if block % 2 else (1, 1) for block in range(depth)])
    return schedule


class ConvTokenizer(nn.Module):
    """NAT stem: two 3x3 stride-2 convs (no activation between), then a norm.

    ``[B, in_chans, H, W] -> [B, ceil(H/4), ceil(W/4), embed_dim]``.
    """

    def __init__(self, in_chans: int, embed_dim: int, norm_layer: Type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def _nat_block(
    dim: int,
    num_heads: int,
    kernel_size: _int_or_tuple_2_t,
    dilation: _int_or_tuple_2_t,
    qkv_bias: bool,
    attn_drop: float,
    proj_drop: float,
    **block_kwargs: Any,
) -> TransformerBlock:
    """Pre-norm block around (dilated) neighborhood attention, ``[B, H, W, dim]`` in and out.

    ``block_kwargs``: ``mlp_ratio``, ``layer_scale`` (NAT-S/B, DiNAT-B), ``drop_path``, ``act_layer``,
    ``norm_layer`` of :class:`visionzoo.layers.TransformerBlock`.
    """
    attn = NeighborhoodAttention2d(
        dim,
        num_heads,
        kernel_size=kernel_size,
        dilation=dilation,
        qkv_bias=qkv_bias,
        attn_drop=attn_drop,
        proj_drop=proj_drop,
    )
    return TransformerBlock(dim, attn, proj_drop=proj_drop, **block_kwargs)


class NAT(ChannelsLastModel):
    """Hierarchical NAT / DiNAT / DiNAT_s: 4 stages at strides 4, 8, 16, 32.

    NAT and DiNAT use the convolutional tokenizer and downsamplers (``stem_type='conv'``,
    ``downsample_type='conv'``); DiNAT_s uses Swin's 4x4 patch embedding and patch merging
    (``'patch'``, ``'merge'``). Any input size works: odd sizes are handled by the stride-2 convs
    (padding 1) or by padding (patch embedding, patch merging), and windows larger than a stage
    are fitted to it at run time (see the module docstring).

    Args:
        img_size: resolution the DiNAT dilations are computed for (``dilated=True``); inputs of
            any size are accepted.
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: pooling of the head (timm ``ClassifierHead`` types, ``''`` for none).
        embed_dim: width of stage 0; stage ``i`` has ``embed_dim * 2**i`` channels.
        depths: blocks per stage.
        num_heads: heads per stage.
        kernel_size: neighborhood size.
        dilated: DiNAT: odd blocks use :func:`dinat_dilations` for ``img_size``.
        dilations: explicit per-stage, per-block dilations (ints or ``(h, w)``), e.g. the
            official detection / segmentation schedules; overrides ``dilated``.
        mlp_ratio: MLP hidden width over block width.
        layer_scale: initial value of the layer scales, ``None`` for none.
        qkv_bias: bias in the qkv projections.
        stem_type: ``'conv'`` (two 3x3 stride-2 convs) or ``'patch'`` (4x4 patch embedding).
        downsample_type: ``'conv'`` (3x3 stride-2 conv) or ``'merge'`` (patch merging).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention projection and in the MLP.
        attn_drop_rate: attention dropout, must be 0 (see :class:`NeighborhoodAttention2d`).
        drop_path_rate: stochastic depth, increasing linearly over blocks up to this value.
        norm_layer: normalization layer (channels last).
        act_layer: MLP activation.
    """

    no_weight_decay_patterns = ("*.attn.rpb",)

    def __init__(
        self,
        img_size: _int_or_tuple_2_t = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depths: Sequence[int] = (3, 4, 6, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        kernel_size: int = 7,
        dilated: bool = False,
        dilations: Optional[Sequence[Sequence[_int_or_tuple_2_t]]] = None,
        mlp_ratio: float = 3.0,
        layer_scale: Optional[float] = None,
        qkv_bias: bool = True,
        stem_type: str = "conv",
        downsample_type: str = "conv",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage")
        if dilations is None:
            dilations = dinat_dilations(depths, img_size, kernel_size) if dilated else [[1] * d for d in depths]
        if [len(stage) for stage in dilations] != list(depths):
            raise ValueError(f"dilations must give one dilation per block, depths {tuple(depths)}, got {dilations}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.output_fmt = "NHWC"
        dims = [int(embed_dim * 2**i) for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        if stem_type == "conv":
            self.patch_embed = ConvTokenizer(in_chans, embed_dim, norm_layer=norm_layer)
        elif stem_type == "patch":
            self.patch_embed = PatchEmbed(
                img_size=img_size,
                patch_size=4,
                in_chans=in_chans,
                embed_dim=embed_dim,
                norm_layer=norm_layer,
                output_fmt="NHWC",
                strict_img_size=False,
                dynamic_img_pad=True,
            )
        else:
            raise ValueError(f"stem_type must be 'conv' or 'patch', got {stem_type!r}")

        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        self.feature_info = []
        for i in range(num_stages):
            blocks = [
                _nat_block(
                    dims[i],
                    num_heads[i],
                    kernel_size=kernel_size,
                    dilation=dilations[i][j],
                    qkv_bias=qkv_bias,
                    attn_drop=attn_drop_rate,
                    proj_drop=proj_drop_rate,
                    mlp_ratio=mlp_ratio,
                    layer_scale=layer_scale,
                    drop_path=dpr[i][j],
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                )
                for j in range(depths[i])
            ]
            downsample = create_downsample(downsample_type, dims[i - 1], dims[i], norm_layer) if i > 0 else None
            stages.append(Stage(blocks, downsample=downsample))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC"
        )
        self.apply(self._init_weights)


class NATIsotropic(ChannelsLastModel):
    """Isotropic NAT / DiNAT: 16x16 patch embedding and ``depth`` blocks at stride 16.

    Odd blocks use ``dilation`` (1: NAT-iso, 2: DiNAT-iso), even blocks NA; windows are fitted to
    the feature map at run time. Inputs of any size are padded to a multiple of ``patch_size``.
    Every block is a feature level (``blocks.{i}``).

    Args:
        img_size: nominal input size (recorded only; any size runs).
        patch_size: patch embedding size and stride.
        in_chans, num_classes, global_pool: as :class:`NAT`.
        embed_dim, depth, num_heads: width, blocks and heads.
        kernel_size, dilation: neighborhood size; dilation of the odd blocks.
        mlp_ratio, qkv_bias, drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate,
        norm_layer, act_layer: as :class:`NAT`.
    """

    isotropic = True
    no_weight_decay_patterns = ("*.attn.rpb",)

    def __init__(
        self,
        img_size: _int_or_tuple_2_t = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        kernel_size: int = 7,
        dilation: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.output_fmt = "NHWC"
        self.num_features = self.head_hidden_size = embed_dim
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            _nat_block(
                embed_dim,
                num_heads,
                kernel_size=kernel_size,
                dilation=dilation if i % 2 else 1,
                qkv_bias=qkv_bias,
                attn_drop=attn_drop_rate,
                proj_drop=proj_drop_rate,
                mlp_ratio=mlp_ratio,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
            )
            for i in range(depth)
        ])
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head = ClassifierHead(embed_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC")
        self.apply(self._init_weights)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert an official NAT / DiNAT / DiNAT_s / isotropic checkpoint to this module layout.

    Accepts plain state dicts or ones nested under ``'model'`` / ``'state_dict'``; keys already in
    this layout pass through unchanged.
    """
    state_dict = state_dict.get("model", state_dict)
    state_dict = state_dict.get("state_dict", state_dict)
    out = {}
    for key, value in state_dict.items():
        # official downsamplers end stage i, ours start stage i + 1
        key = re.sub(r"^(?:levels|layers)\.(\d+)\.downsample\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.", key)
        key = re.sub(r"^(?:levels|layers)\.(\d+)\.blocks\.", r"stages.\1.blocks.", key)
        key = re.sub(r"^layers\.(\d+)\.", r"blocks.\1.", key)  # isotropic: no stages
        key = re.sub(r"\.gamma([12])$", r".ls\1.gamma", key)
        key = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)
        out[key] = value
    return out


def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    # DiNAT's dilations follow the resolution of the weights (e.g. 384 for `.in22k_ft_in1k_384`)
    # unless img_size is given
    kwargs.setdefault("img_size", tuple(resolve_cfg(variant, pretrained, kwargs).input_size[-2:]))
    feature_cfg = getter_feature_cfg(kwargs)
    return build_model(
        NAT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )


def _create_nat_isotropic(variant: str, pretrained: bool = False, **kwargs) -> NATIsotropic:
    feature_cfg = getter_feature_cfg(kwargs, 3)
    return build_model(
        NATIsotropic,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )


_NAT_URL = "https://shi-labs.com/projects/nat/checkpoints/CLS/"
_DINAT_URL = "https://shi-labs.com/projects/dinat/checkpoints/"


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0",
        "classifier": "head.fc",
        "license": "mit",
        "paper_ids": "arXiv:2209.15001",
        "paper_name": "Dilated Neighborhood Attention Transformer",
        "origin_url": "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
        **kwargs,
    }


def _nat_cfg(url: str, **kwargs) -> Dict[str, Any]:
    return _cfg(url, paper_ids="arXiv:2204.07143", paper_name="Neighborhood Attention Transformer", **kwargs)


_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
_IN22K = dict(num_classes=21841)
_PATCH = dict(first_conv="patch_embed.proj")  # DiNAT_s and isotropic: one patch-embedding conv
_ISO = dict(_PATCH, pool_size=(14, 14))

default_cfgs = generate_default_cfgs({
    "visionzoo_nat_m.in1k": _nat_cfg(_NAT_URL + "nat_mini.pth"),
    "visionzoo_nat_t.in1k": _nat_cfg(_NAT_URL + "nat_tiny.pth"),
    "visionzoo_nat_s.in1k": _nat_cfg(_NAT_URL + "nat_small.pth"),
    "visionzoo_nat_b.in1k": _nat_cfg(_NAT_URL + "nat_base.pth"),
    "visionzoo_dinat_m.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_mini_in1k_224.pth"),
    "visionzoo_dinat_t.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_tiny_in1k_224.pth"),
    "visionzoo_dinat_s.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_small_in1k_224.pth"),
    "visionzoo_dinat_b.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_base_in1k_224.pth"),
    "visionzoo_dinat_l.in22k_ft_in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_224.pth"),
    "visionzoo_dinat_l.in22k_ft_in1k_384": _cfg(_DINAT_URL + "imagenet1k/dinat_large_in22k_in1k_384.pth", **_384),
    "visionzoo_dinat_l.in22k": _cfg(_DINAT_URL + "imagenet22k/dinat_large_in22k_224.pth", **_IN22K),
    "visionzoo_dinats_t.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_s_tiny_in1k_224.pth", **_PATCH),
    "visionzoo_dinats_s.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_s_small_in1k_224.pth", **_PATCH),
    "visionzoo_dinats_b.in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_s_base_in1k_224.pth", **_PATCH),
    "visionzoo_dinats_l.in22k_ft_in1k": _cfg(_DINAT_URL + "imagenet1k/dinat_s_large_in1k_224.pth", **_PATCH),
    "visionzoo_dinats_l.in22k_ft_in1k_384": _cfg(
        _DINAT_URL + "imagenet1k/dinat_s_large_in1k_384.pth", **_PATCH, **_384
    ),
    "visionzoo_dinats_l.in22k": _cfg(_DINAT_URL + "imagenet22k/dinat_s_large_in22k_224.pth", **_PATCH, **_IN22K),
    "visionzoo_nat_iso_s.in1k": _cfg(_DINAT_URL + "isotropic/nat_isotropic_small_in1k_224.pth", **_ISO),
    "visionzoo_nat_iso_b.in1k": _cfg(_DINAT_URL + "isotropic/nat_isotropic_base_in1k_224.pth", **_ISO),
    "visionzoo_dinat_iso_s.in1k": _cfg(_DINAT_URL + "isotropic/dinat_isotropic_small_in1k_224.pth", **_ISO),
    "visionzoo_dinat_iso_b.in1k": _cfg(_DINAT_URL + "isotropic/dinat_isotropic_base_in1k_224.pth", **_ISO),
})

_MINI = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0)
_TINY = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0)
_SMALL = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.0)
_BASE = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.0)
_LARGE = dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2.0)
_DINATS = dict(stem_type="patch", downsample_type="merge", mlp_ratio=4.0, dilated=True)


@register_model
def visionzoo_nat_m(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Mini: 3-4-6-5 blocks, 64 channels, mlp 3."""
    model_args = dict(_MINI, drop_path_rate=0.2)
    return _create_nat("visionzoo_nat_m", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_nat_t(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Tiny: 3-4-18-5 blocks, 64 channels, mlp 3."""
    model_args = dict(_TINY, drop_path_rate=0.2)
    return _create_nat("visionzoo_nat_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_nat_s(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Small: 3-4-18-5 blocks, 96 channels, mlp 2, layer scale 1e-5."""
    model_args = dict(_SMALL, layer_scale=1e-5, drop_path_rate=0.3)
    return _create_nat("visionzoo_nat_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_nat_b(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Base: 3-4-18-5 blocks, 128 channels, mlp 2, layer scale 1e-5."""
    model_args = dict(_BASE, layer_scale=1e-5, drop_path_rate=0.5)
    return _create_nat("visionzoo_nat_b", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_dinat_m(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Mini: NAT-Mini with dilated NA on odd blocks."""
    model_args = dict(_MINI, dilated=True, drop_path_rate=0.2)
    return _create_nat("visionzoo_dinat_m", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_dinat_t(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Tiny: NAT-Tiny with dilated NA on odd blocks."""
    model_args = dict(_TINY, dilated=True, drop_path_rate=0.2)
    return _create_nat("visionzoo_dinat_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_dinat_s(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Small: NAT-Small with dilated NA on odd blocks and, unlike NAT-Small, no layer scale."""
    model_args = dict(_SMALL, dilated=True, drop_path_rate=0.3)
    return _create_nat("visionzoo_dinat_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_dinat_b(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Base: NAT-Base (layer scale 1e-5) with dilated NA on odd blocks."""
    model_args = dict(_BASE, layer_scale=1e-5, dilated=True, drop_path_rate=0.5)
    return _create_nat("visionzoo_dinat_b", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_dinat_l(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Large: 3-4-18-5 blocks, 192 channels, mlp 2, no layer scale (ImageNet-22K pre-trained)."""
    model_args = dict(_LARGE, dilated=True, drop_path_rate=0.35)
    return _create_nat("visionzoo_dinat_l", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_dinats_t(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Tiny: Swin-T layout (2-2-6-2, 96 channels) with NA / dilated NA blocks."""
    model_args = dict(_DINATS, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)
    return _create_nat("visionzoo_dinats_t", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_dinats_s(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Small: Swin-S layout (2-2-18-2, 96 channels) with NA / dilated NA blocks."""
    model_args = dict(_DINATS, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3)
    return _create_nat("visionzoo_dinats_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_dinats_b(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Base: Swin-B layout (2-2-18-2, 128 channels) with NA / dilated NA blocks."""
    model_args = dict(_DINATS, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5)
    return _create_nat("visionzoo_dinats_b", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_dinats_l(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT_s-Large: Swin-L layout (2-2-18-2, 192 channels) with NA / dilated NA blocks."""
    model_args = dict(_DINATS, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.35)
    return _create_nat("visionzoo_dinats_l", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_nat_iso_s(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """NAT-iso-Small: 12 blocks, 384 channels, 12 heads, NA everywhere."""
    model_args = dict(embed_dim=384, depth=12, num_heads=12, dilation=1, drop_path_rate=0.1)
    return _create_nat_isotropic("visionzoo_nat_iso_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_nat_iso_b(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """NAT-iso-Base: 12 blocks, 768 channels, 24 heads, NA everywhere."""
    model_args = dict(embed_dim=768, depth=12, num_heads=24, dilation=1, drop_path_rate=0.4)
    return _create_nat_isotropic("visionzoo_nat_iso_b", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_dinat_iso_s(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """DiNAT-iso-Small: NAT-iso-Small with dilation 2 on odd blocks."""
    model_args = dict(embed_dim=384, depth=12, num_heads=12, dilation=2, drop_path_rate=0.1)
    return _create_nat_isotropic("visionzoo_dinat_iso_s", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_dinat_iso_b(pretrained: bool = False, **kwargs) -> NATIsotropic:
    """DiNAT-iso-Base: NAT-iso-Base with dilation 2 on odd blocks."""
    model_args = dict(embed_dim=768, depth=12, num_heads=24, dilation=2, drop_path_rate=0.4)
    return _create_nat_isotropic("visionzoo_dinat_iso_b", pretrained=pretrained, **dict(model_args, **kwargs))


# ----------------------------------------------------------------------------------------------
# dense prediction: what visionzoo.mm registers (mmdet / mmseg backbones) and configs/ are written from
# ----------------------------------------------------------------------------------------------

# Official dense dilation schedules (SHI-Labs/Neighborhood-Attention-Transformer, detection/ and
# segmentation/ configs): per stage, a cycle repeated to the stage's depth, e.g. DiNAT-T detection
# [1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7] * 3, [1, 3, 1, 3, 1]. Detection is for ~800x1333
# inputs, segmentation for 512x512 crops; DiNAT_s (2 blocks in stages 0, 1, 3) keeps the large one.
DINAT_DENSE_DILATIONS: Dict[str, Dict[str, Tuple[Tuple[int, ...], ...]]] = {
    "dinat": {
        "det": ((1, 28, 1), (1, 7, 1, 14), (1, 3, 1, 5, 1, 7), (1, 3, 1, 3, 1)),
        "seg": ((1, 16, 1), (1, 4, 1, 8), (1, 2, 1, 3, 1, 4), (1, 2, 1, 2, 1)),
    },
    "dinats": {
        "det": ((1, 28), (1, 14), (1, 3, 1, 5, 1, 7), (1, 3)),
        "seg": ((1, 16), (1, 8), (1, 2, 1, 3, 1, 4), (1, 2)),
    },
}


def _dense_dilations(family: str):
    """``task_kwargs`` of a DiNAT family: its official dense dilations, cycles cut to each stage's depth."""

    def task_kwargs(model: NAT, task: str) -> Dict[str, Any]:
        cycles = DINAT_DENSE_DILATIONS[family][task]
        depths = [len(stage.blocks) for stage in model.stages]
        return {"dilations": [[cycle[j % len(cycle)] for j in range(depth)] for cycle, depth in zip(cycles, depths)]}

    return task_kwargs


def _dense_archs(family: str, rows: Dict[str, Tuple[str, float, float]]) -> Dict[str, DenseArch]:
    """``{arch: (pretrained tag, det drop path, seg drop path)}`` -> ``{arch: DenseArch}``."""
    sizes = {"mini": "m", "tiny": "t", "small": "s", "base": "b", "large": "l"}
    return {arch: DenseArch(f"visionzoo_{family}_{sizes[arch]}", tag, dict(det=det, seg=seg))
            for arch, (tag, det, seg) in rows.items()}


# Drop path rates of the official dense configs: detection Mask R-CNN's (base and large models have
# none: their Cascade Mask R-CNN config's), UperNet's (DiNAT-L / DiNAT_s-L: the 640x640 config's).
# Large models start from the ImageNet-22K weights, as officially.
register_dense_family(DenseFamily(
    name="nat",
    type_names=("NAT",),
    archs=_dense_archs("nat", {
        "mini": ("in1k", 0.2, 0.2), "tiny": ("in1k", 0.2, 0.3), "small": ("in1k", 0.35, 0.5),
        "base": ("in1k", 0.5, 0.5),
    }),
    checkpoint_filter=checkpoint_filter_fn,
))
register_dense_family(DenseFamily(
    name="dinat",
    type_names=("DiNAT",),
    archs=_dense_archs("dinat", {
        "mini": ("in1k", 0.2, 0.2), "tiny": ("in1k", 0.2, 0.3), "small": ("in1k", 0.35, 0.5),
        "base": ("in1k", 0.6, 0.5), "large": ("in22k", 0.6, 0.3),
    }),
    task_kwargs=_dense_dilations("dinat"),
    checkpoint_filter=checkpoint_filter_fn,
))
register_dense_family(DenseFamily(
    name="dinats",
    type_names=("DiNAT_s", "DiNATs"),
    archs=_dense_archs("dinats", {
        "tiny": ("in1k", 0.2, 0.3), "small": ("in1k", 0.35, 0.3), "base": ("in1k", 0.6, 0.3),
        "large": ("in22k", 0.6, 0.3),
    }),
    task_kwargs=_dense_dilations("dinats"),
    checkpoint_filter=checkpoint_filter_fn,
))
