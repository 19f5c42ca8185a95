"""HaloNet (arXiv:2103.12731): ResNet-like networks whose spatial convolutions are halo attention.

Two groups of variants, one model class:

* timm's trained hybrids ``visionzoo_halonet26t``, ``visionzoo_sehalonet33ts``, ``visionzoo_halonet50ts``
  (bottleneck ResNets with halo attention in the late stages) and ``visionzoo_halonet_h1``: timm's
  architectures and state-dict layout (``timm/models/byoanet.py``), so timm's weights load unchanged
  and the logits equal timm's;
* the paper's ``visionzoo_halonet_h{0..7}`` (halo attention in every block; table of the paper): block
  ``b``, halo ``h``, values ``rv`` times wider than queries / keys, stage outputs ``(64, 128, 256, 512)
  * rb``, ``l3`` blocks in stage 3, a final ``df``-wide 1x1 conv, input size.

The network is timm's ``ByobNet`` (stem, stages of bottleneck / self-attention blocks, final conv,
head; timm's module names, ``features_only``, ``forward_intermediates``, gradient checkpointing,
``reset_classifier``) with :class:`visionzoo.layers.HaloAttention` as its self-attention layer.
:class:`HaloNet` adds the input-size rule of halo attention (every attention map a multiple of its
block, a ValueError naming the input otherwise), builds blocks that fit a small ``img_size``, and
runs in channels-last memory, where the attention's 1x1 projections and the convolutions need no
layout copies.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import fields, replace
from functools import partial
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import make_divisible, register_notrace_function, to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models.byobnet import (
    BottleneckBlock, ByoBlockCfg, ByobNet, ByoModelCfg, SelfAttnBlock, expand_blocks_cfg, interleave_blocks,
)

from visionzoo.layers import (
    HaloAttention, check_image, conv_norm_add_act, fold_conv_norm_act, swap_classes, use_fused_batch_norm,
)

from .build import build_model
from .dense import DenseArch, DenseFamily, register_dense_family

__all__ = ["Bottleneck", "HaloBlock", "HaloNet", "checkpoint_filter_fn", "fit_blocks", "input_multiple"]

# every HaloNet stem (7x7 conv + max pool, or three 3x3 convs + max pool / a strided last conv)
STEM_REDUCTION = 4


class Bottleneck(BottleneckBlock):
    """timm's ``BottleneckBlock`` whose end (last 1x1 conv + BatchNorm, shortcut added, ReLU) runs
    through :func:`visionzoo.layers.conv_norm_add_act` (one kernel for norm, addition and ReLU in
    training) when nothing sits between the norm and the addition."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None or type(self.attn_last) is not nn.Identity or type(self.drop_path) is not nn.Identity:
            return super().forward(x)
        shortcut = self.shortcut(x)
        x = self.attn(self.conv2b_kxk(self.conv2_kxk(self.conv1_1x1(x))))
        return conv_norm_add_act(self.conv3_1x1, x, shortcut, self.act)


class HaloBlock(SelfAttnBlock):
    """timm's self-attention bottleneck (1x1 -> halo attention -> BN-act -> 1x1, plus shortcut) whose
    attention returns ``value_ratio`` times the bottleneck width (the paper's ``rv``; queries and keys
    keep the bottleneck width). With ``value_ratio = 1`` it is timm's ``SelfAttnBlock``. Its end runs
    through :func:`visionzoo.layers.conv_norm_add_act` as :class:`Bottleneck`'s."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, value_ratio: float = 1.0, layers=None, **kwargs):
        super().__init__(in_chs, out_chs, stride=stride, layers=layers, **kwargs)
        if value_ratio != 1:
            mid_chs = self.conv1_1x1.conv.out_channels
            value_chs = make_divisible(mid_chs * value_ratio)
            self.self_attn = layers.self_attn(mid_chs, dim_out=value_chs, qk_ratio=mid_chs / value_chs, stride=stride)
            self.post_attn = layers.norm_act(value_chs)
            self.conv3_1x1 = layers.conv_norm_act(value_chs, out_chs, 1, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None or type(self.drop_path) is not nn.Identity:
            return super().forward(x)
        shortcut = self.shortcut(x)
        x = self.post_attn(self.self_attn(self.conv2_kxk(self.conv1_1x1(x))))
        return conv_norm_add_act(self.conv3_1x1, x, shortcut, self.act)


def _is_attention(block_cfg: ByoBlockCfg) -> bool:
    return block_cfg.type == "self_attn" or (isinstance(block_cfg.type, partial) and block_cfg.type.func is HaloBlock)


def _attention_groups(cfg: ByoModelCfg) -> Iterator[Tuple[int, int, int, ByoBlockCfg]]:
    """``(stage, index, output reduction, block cfg)`` of every group of attention blocks."""
    reduction = STEM_REDUCTION
    for stage, stage_cfg in enumerate(cfg.blocks):
        block_cfgs = expand_blocks_cfg(stage_cfg)
        reduction *= block_cfgs[0].s
        for index, block_cfg in enumerate(block_cfgs):
            if _is_attention(block_cfg):
                yield stage, index, reduction, block_cfg


_DEFAULT_BLOCK = inspect.signature(HaloAttention).parameters["block_size"].default


def _block_size(cfg: ByoModelCfg, block_cfg: ByoBlockCfg) -> int:
    kwargs = {**cfg.self_attn_kwargs, **(block_cfg.self_attn_kwargs or {})}
    return kwargs.get("block_size", _DEFAULT_BLOCK)


def fit_blocks(cfg: ByoModelCfg, img_size: Tuple[int, int]) -> ByoModelCfg:
    """``cfg`` with every attention block no larger than its output map at ``img_size`` (smaller blocks
    mean smaller relative tables: a model built for a small input, as Swin's window at a small map)."""
    stages = [list(expand_blocks_cfg(stage_cfg)) for stage_cfg in cfg.blocks]
    for stage, index, reduction, block_cfg in _attention_groups(cfg):
        block = _block_size(cfg, block_cfg)
        fitted = min(block, *(max(1, s // reduction) for s in img_size))
        if fitted != block:
            kwargs = {**(block_cfg.self_attn_kwargs or {}), "block_size": fitted}
            stages[stage][index] = replace(block_cfg, self_attn_kwargs=kwargs)
    return replace(cfg, blocks=tuple(tuple(stage) for stage in stages))


def input_multiple(cfg: ByoModelCfg) -> int:
    """The input sides ``cfg`` takes: multiples of this (each attention block's block size times the
    reduction of its output map, which covers a strided block's input too)."""
    multiple = STEM_REDUCTION
    for _, _, reduction, block_cfg in _attention_groups(cfg):
        multiple = math.lcm(multiple, _block_size(cfg, block_cfg) * reduction)
    return multiple


@register_notrace_function  # raises on the input's shape: a leaf for torch.fx
def check_input(x: torch.Tensor, in_chans: int, multiple: int) -> torch.Tensor:
    """``x`` if it is an image batch whose sides are multiples of ``multiple``, else a ValueError."""
    check_image(x, in_chans)
    height, width = x.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(
            f"HaloNet: a {height}x{width} input gives attention maps that are not multiples of their block; "
            f"height and width must be multiples of {multiple} (or build the model with img_size=... for a "
            "smaller input)"
        )
    return x


_CFG_FIELDS = frozenset(f.name for f in fields(ByoModelCfg))


class HaloNet(ByobNet):
    """timm's ``ByobNet`` with halo attention; ``[B, in_chans, H, W] -> [B, num_classes]``.

    Args:
        cfg: the variant (timm's ``ByoModelCfg``; attention blocks take
            :class:`visionzoo.layers.HaloAttention` as ``self_attn_layer``).
        img_size: if given, blocks larger than their stage's map at this size shrink to it (the
            relative tables with them), so that small inputs run; the default keeps the variant's blocks.
        pad_to_block: every halo attention zero pads its map at the bottom / right to a multiple of
            its block and crops its output (``HaloAttention(pad_to_block=True)``), so that any input
            size runs; where the maps are multiples of the blocks nothing changes.
        stem_feature: ``feature_info`` / ``forward_intermediates`` / ``prune_intermediate_layers``
            index timm's taps: the stem's stride-2 map, stages 1-3, and stage 4 through the final 1x1
            conv. ``False``: the four stages at strides 4-32, the last before the final conv (the
            layout of dense-prediction backbones).
        Other arguments: timm's ``ByobNet``'s; fields of ``cfg`` given as keywords replace its values.

    Inputs: height and width multiples of :attr:`input_multiple` (256 for the timm variants at their
    blocks, 1 with ``pad_to_block``); others raise a ValueError naming the size.
    """

    def __init__(self, cfg: ByoModelCfg, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                 pad_to_block: bool = False, stem_feature: bool = True, **kwargs: Any):
        # timm's overlay of cfg fields (timm.create_model(name, self_attn_kwargs=...)), applied here so
        # that the block fitting and input rule see it
        cfg = replace(cfg, **{name: kwargs.pop(name) for name in list(kwargs) if name in _CFG_FIELDS})
        if img_size is not None:
            cfg = fit_blocks(cfg, to_2tuple(img_size))
        super().__init__(cfg, img_size=img_size, **kwargs)
        self.pad_to_block = pad_to_block
        if pad_to_block:
            # on the modules: timm's block-level self_attn_kwargs replace the model-level ones
            for module in self.modules():
                if isinstance(module, HaloAttention):
                    module.pad_to_block = True
        self.input_multiple = 1 if pad_to_block else input_multiple(cfg)
        self.stem_feature = stem_feature
        if not stem_feature:
            last = self.feature_info[-1]
            last_chs = last["num_chs"] if isinstance(self.final_conv, nn.Identity) else self.final_conv.conv.in_channels
            self.feature_info = self.feature_info[1:-1] + [
                dict(last, num_chs=last_chs, module=f"stages.{len(self.stages) - 1}")]
        fold_conv_norm_act(self)  # inference runs conv + BatchNorm as one conv (keys unchanged)
        use_fused_batch_norm(self)  # training runs BatchNorm + ReLU as one kernel (keys unchanged)
        swap_classes(self, BottleneckBlock, Bottleneck)  # block ends as one kernel in training
        swap_classes(self, SelfAttnBlock, HaloBlock)
        self.to(memory_format=torch.channels_last)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The relative position embeddings, as timm's position tables elsewhere."""
        return {name for name, _ in self.named_parameters() if name.endswith(("height_rel", "width_rel"))}

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return check_input(x, self.in_chans, self.input_multiple).contiguous(memory_format=torch.channels_last)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, num_features, H / 32, W / 32]`` (channels-last memory)."""
        return super().forward_features(self._prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ByobNet's, defined here so that torch.fx sees check_input as a leaf (it wraps the functions
        # of the traced forward's module)
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        **kwargs: Any,
    ):
        """timm's ``ByobNet.forward_intermediates`` after the input check; without ``stem_feature``
        the ``[B, C, H, W]`` outputs of the stages ``indices`` index (timm's conventions for them)."""
        x = self._prepare(x)
        if self.stem_feature:
            return super().forward_intermediates(x, indices, norm, stop_early, output_fmt, intermediates_only,
                                                 **kwargs)
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        x = self.stem(x)
        intermediates = []
        for i, stage in enumerate(stages):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return self.final_conv(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """timm's; without ``stem_feature``, ``indices`` index the stages, and the final conv goes
        with the head (the stage outputs do not pass through it)."""
        if self.stem_feature:
            return super().prune_intermediate_layers(indices, prune_norm, prune_head)
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.stages = self.stages[: max_index + 1]
        self.final_conv = nn.Identity()
        self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        self.reset_classifier(0, "", reset_other=True)
        return take_indices


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: HaloNet) -> Dict[str, torch.Tensor]:
    """timm's HaloNet state dicts are this model's layout: passed through (a ``state_dict`` wrapper removed)."""
    return state_dict.get("state_dict", state_dict)


def _create_halonet(variant: str, cfg: ByoModelCfg, pretrained: bool = False, **kwargs) -> HaloNet:
    feature_cfg = dict(flatten_sequential=True)
    if kwargs.get("stem_feature") is False:  # four taps instead of timm's default five
        feature_cfg["out_indices"] = (0, 1, 2, 3)
    return build_model(
        HaloNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        cfg=cfg,
        **kwargs,
    )


def _cfg(input_size: int = 256, **kwargs) -> Dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, input_size, input_size),
        "pool_size": (input_size // 32, input_size // 32),
        "crop_pct": 0.95,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1.conv",
        "classifier": "head.fc",
        # sides must be multiples of the blocks times the stage reductions (see HaloNet)
        "fixed_input_size": True,
        "min_input_size": (3, input_size, input_size),
        "license": "apache-2.0",
        "paper_ids": "arXiv:2103.12731",
        "paper_name": "Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
        **kwargs,
    }


def _timm_cfg(timm_tag: str, **kwargs) -> Dict[str, Any]:
    # timm's trained weights load unchanged
    return _cfg(
        hf_hub_id=f"timm/{timm_tag}", origin_url="https://github.com/huggingface/pytorch-image-models", **kwargs
    )


default_cfgs = generate_default_cfgs({
    "visionzoo_halonet26t.a1h_in1k": _timm_cfg("halonet26t.a1h_in1k"),
    "visionzoo_sehalonet33ts.ra2_in1k": _timm_cfg("sehalonet33ts.ra2_in1k", crop_pct=0.94),
    "visionzoo_halonet50ts.a1h_in1k": _timm_cfg("halonet50ts.a1h_in1k", crop_pct=0.94),
    # the paper's variants: no released weights
    "visionzoo_halonet_h0": _cfg(256),
    "visionzoo_halonet_h1": _cfg(256),
    "visionzoo_halonet_h2": _cfg(256),
    "visionzoo_halonet_h3": _cfg(320),
    "visionzoo_halonet_h4": _cfg(384),
    "visionzoo_halonet_h5": _cfg(448),
    "visionzoo_halonet_h6": _cfg(512),
    # the paper trains at 600, which needs maps padded to the block; 640 is the nearest multiple of 320
    "visionzoo_halonet_h7": _cfg(640),
})


def _paper_variant(block: int, halo: int, value_ratio: float, output_ratio: float, depth3: int,
                   final_width: int = 0) -> ByoModelCfg:
    """The paper's table: halo attention in every block (``b``, ``h``, ``rv``, ``rb``, ``l3``, ``df``);
    bottleneck widths 64-128-256-512, stage outputs ``rb`` times that, 7x7 stem and max pool."""
    block_type = partial(HaloBlock)
    blocks = tuple(
        ByoBlockCfg(type=block_type, d=depth, c=int(width * output_ratio), s=1 if i == 0 else 2, gs=0,
                    br=1 / output_ratio)
        for i, (depth, width) in enumerate(zip((3, 3, depth3, 3), (64, 128, 256, 512)))
    )
    return ByoModelCfg(
        blocks=blocks,
        stem_chs=64,
        stem_type="7x7",
        stem_pool="maxpool",
        num_features=final_width,
        self_attn_layer=HaloAttention,
        self_attn_kwargs=dict(block_size=block, halo_size=halo),
        block_kwargs=dict(value_ratio=value_ratio),
    )


model_cfgs = dict(
    # timm's architectures (timm/models/byoanet.py)
    halonet26t=ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="bottle", d=2, c=256, s=1, gs=0, br=0.25),
            ByoBlockCfg(type="bottle", d=2, c=512, s=2, gs=0, br=0.25),
            interleave_blocks(types=("bottle", "self_attn"), d=2, c=1024, s=2, gs=0, br=0.25),
            ByoBlockCfg(type="self_attn", d=2, c=2048, s=2, gs=0, br=0.25),
        ),
        stem_chs=64,
        stem_type="tiered",
        stem_pool="maxpool",
        self_attn_layer=HaloAttention,
        self_attn_kwargs=dict(block_size=8, halo_size=2),
    ),
    sehalonet33ts=ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="bottle", d=2, c=256, s=1, gs=0, br=0.25),
            interleave_blocks(types=("bottle", "self_attn"), every=[2], d=3, c=512, s=2, gs=0, br=0.25),
            interleave_blocks(types=("bottle", "self_attn"), every=[2], d=3, c=1024, s=2, gs=0, br=0.25),
            ByoBlockCfg("self_attn", d=2, c=1536, s=2, gs=0, br=0.333),
        ),
        stem_chs=64,
        stem_type="tiered",
        stem_pool="",
        act_layer="silu",
        num_features=1280,
        attn_layer="se",
        self_attn_layer=HaloAttention,
        self_attn_kwargs=dict(block_size=8, halo_size=3),
    ),
    halonet50ts=ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="bottle", d=3, c=256, s=1, gs=0, br=0.25),
            interleave_blocks(
                types=("bottle", "self_attn"), every=4, d=4, c=512, s=2, gs=0, br=0.25,
                self_attn_kwargs=dict(block_size=8, halo_size=3, num_heads=4),
            ),
            interleave_blocks(types=("bottle", "self_attn"), d=6, c=1024, s=2, gs=0, br=0.25),
            interleave_blocks(types=("bottle", "self_attn"), d=3, c=2048, s=2, gs=0, br=0.25),
        ),
        stem_chs=64,
        stem_type="tiered",
        stem_pool="maxpool",
        act_layer="silu",
        self_attn_layer=HaloAttention,
        self_attn_kwargs=dict(block_size=8, halo_size=3),
    ),
    # the paper's table: b, h, rv, rb, l3, df
    halonet_h0=_paper_variant(8, 3, 1.0, 0.5, 7),
    halonet_h1=_paper_variant(8, 3, 1.0, 1.0, 10),
    halonet_h2=_paper_variant(8, 3, 1.0, 1.25, 11),
    halonet_h3=_paper_variant(10, 3, 1.0, 1.5, 12, 1024),
    halonet_h4=_paper_variant(12, 2, 1.0, 3.0, 12, 1280),
    halonet_h5=_paper_variant(14, 2, 2.5, 2.0, 23, 1536),
    halonet_h6=_paper_variant(8, 4, 3.0, 2.75, 24, 1536),
    halonet_h7=_paper_variant(10, 3, 4.0, 3.5, 26, 2048),
)


@register_model
def visionzoo_halonet26t(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-26T (timm's): ResNet-26-T, halo attention (b 8, h 2) in stages 3-4."""
    return _create_halonet("visionzoo_halonet26t", model_cfgs["halonet26t"], pretrained, **kwargs)


@register_model
def visionzoo_sehalonet33ts(pretrained: bool = False, **kwargs) -> HaloNet:
    """SE-HaloNet-33-TS (timm's): ResNet-33-T with SE and SiLU, halo attention (b 8, h 3) in stages 2-4."""
    return _create_halonet("visionzoo_sehalonet33ts", model_cfgs["sehalonet33ts"], pretrained, **kwargs)


@register_model
def visionzoo_halonet50ts(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-50-TS (timm's): ResNet-50-T with SiLU, halo attention (b 8, h 3) in stages 2-4."""
    return _create_halonet("visionzoo_halonet50ts", model_cfgs["halonet50ts"], pretrained, **kwargs)


@register_model
def visionzoo_halonet_h0(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H0: b 8, h 3, rv 1, rb 0.5, l3 7, 256 px."""
    return _create_halonet("visionzoo_halonet_h0", model_cfgs["halonet_h0"], pretrained, **kwargs)


@register_model
def visionzoo_halonet_h1(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H1 (timm's ``halonet_h1``): b 8, h 3, rv 1, rb 1, l3 10, 256 px."""
    return _create_halonet("visionzoo_halonet_h1", model_cfgs["halonet_h1"], pretrained, **kwargs)


@register_model
def visionzoo_halonet_h2(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H2: b 8, h 3, rv 1, rb 1.25, l3 11, 256 px."""
    return _create_halonet("visionzoo_halonet_h2", model_cfgs["halonet_h2"], pretrained, **kwargs)


@register_model
def visionzoo_halonet_h3(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H3: b 10, h 3, rv 1, rb 1.5, l3 12, df 1024, 320 px."""
    return _create_halonet("visionzoo_halonet_h3", model_cfgs["halonet_h3"], pretrained, **kwargs)


@register_model
def visionzoo_halonet_h4(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H4: b 12, h 2, rv 1, rb 3, l3 12, df 1280, 384 px."""
    return _create_halonet("visionzoo_halonet_h4", model_cfgs["halonet_h4"], pretrained, **kwargs)


@register_model
def visionzoo_halonet_h5(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H5: b 14, h 2, rv 2.5, rb 2, l3 23, df 1536, 448 px."""
    return _create_halonet("visionzoo_halonet_h5", model_cfgs["halonet_h5"], pretrained, **kwargs)


@register_model
def visionzoo_halonet_h6(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H6: b 8, h 4, rv 3, rb 2.75, l3 24, df 1536, 512 px."""
    return _create_halonet("visionzoo_halonet_h6", model_cfgs["halonet_h6"], pretrained, **kwargs)


@register_model
def visionzoo_halonet_h7(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H7: b 10, h 3, rv 4, rb 3.5, l3 26, df 2048 (the paper's 600 px as 640: a multiple of 320)."""
    return _create_halonet("visionzoo_halonet_h7", model_cfgs["halonet_h7"], pretrained, **kwargs)


# ----------------------------------------------------------------------------------------------
# dense prediction: what visionzoo.mm registers (mmdet / mmseg backbones) and configs/ are written from
# ----------------------------------------------------------------------------------------------
def _dense_layout(model: HaloNet, task: str) -> Dict[str, Any]:
    """``task_kwargs``: the four stages at strides 4-32 as outputs (timm's ``ByobNet`` lists the stem
    first and passes stage 4 through the final 1x1 conv), and every attention map zero padded at the
    bottom / right to a multiple of its block, so that any input size runs. Zero padding is what halo
    attention already does at the map borders (its halo windows reach past them into zero keys and
    values), so the padded layer sees the same kind of border, a block further out; where the maps are
    multiples of the blocks (256 x n for the timm variants) nothing changes."""
    return {"pad_to_block": True, "stem_feature": False}


def _no_out_norm(channels: int) -> nn.Module:
    # a ResNet-like network with BatchNorm in every block: dense ResNet backbones add no output norm
    return nn.Identity()


# The paper reports COCO Mask R-CNN with hybrid backbones (no code or configs released). The configs
# written from this declaration put timm's trained hybrids into the project's Mask R-CNN and UperNet
# recipes (the Swin papers') from timm's ImageNet weights (``hf-hub:timm/...``). Stochastic depth, for
# want of a published dense value: 0.1 for the 12-14M HaloNet-26T / SE-HaloNet-33TS and 0.2 for the 23M
# HaloNet-50TS in both tasks (mmdet's ResNet configs use none, Swin-T's 28M 0.2 / 0.3). The paper's
# H0-H7 (no released weights) are backbones without configs. The detection configs freeze the
# BatchNorm statistics (norm_eval), as mmdet's ResNet recipes do at 2 images per GPU; the segmentation
# configs train them on each process's batch (mmseg's ResNet recipes synchronise them across GPUs).
register_dense_family(DenseFamily(
    name="halonet",
    type_names=("HaloNet",),
    archs={
        "halonet26t": DenseArch("visionzoo_halonet26t", "a1h_in1k", dict(det=0.1, seg=0.1)),
        "sehalonet33ts": DenseArch("visionzoo_sehalonet33ts", "ra2_in1k", dict(det=0.1, seg=0.1)),
        "halonet50ts": DenseArch("visionzoo_halonet50ts", "a1h_in1k", dict(det=0.2, seg=0.2)),
        **{f"h{i}": DenseArch(f"visionzoo_halonet_h{i}") for i in range(8)},
    },
    task_kwargs=_dense_layout,
    checkpoint_filter=checkpoint_filter_fn,
    out_norm=_no_out_norm,
    norm_eval=("det", "det_cascade"),
))
