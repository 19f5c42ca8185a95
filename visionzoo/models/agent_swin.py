"""Agent-Swin: the Swin Transformer with agent attention in some of its blocks.

Paper: Agent Attention: On the Integration of Softmax and Linear Attention (ECCV 2024),
https://arxiv.org/abs/2312.08874. Official code and weights:
https://github.com/LeapLabTHU/Agent-Attention (``agent_transformer/models/agent_swin.py``,
``agent_transformer/cfgs/agent_swin_*.yaml``; the repository carries no licence file).

The architecture and parameter count are the official ones. Each stage is of one attention type:

* ``'A'``: agent attention (:class:`visionzoo.layers.AgentAttention`) over the whole stage map,
  never shifted; its per-row / per-column biases are sized for the stage map at ``img_size``
  (56, 28, 14, 7 at 224; 72, 36, 18, 9 at 288), so they depend on the resolution;
* ``'B'``: Swin's shifted window attention (:class:`visionzoo.layers.WindowAttention`) with window
  ``max(7, (img_size / 4) // 8)`` (7 at 224, 9 at 288, 12 at 384), shifted by half a window on the
  stage's odd blocks; a stage map not larger than the window is the window, unshifted (stage 4 at 224);
* ``'M<k>'``: the first ``k`` blocks agent attention, the rest window attention, whose shift
  follows the block's index in the stage (in ``M2`` the first window block, index 2, is unshifted).

Agent-Swin-T / S / B are ``A A A B`` / ``A A B B`` / ``A A M2 B`` with 9, 16, 49, 49 agents.
Swin's 4x4 patch embedding (with LayerNorm), patch merging, final LayerNorm and mean pooling.

Layout: timm's (``stages.{i}.downsample`` starts stage ``i``, ``head.fc``); ``checkpoint_filter_fn``
loads official checkpoints (Swin's layout, converted as Swin's, with agent biases of another
resolution resized). Any input size runs: the agent biases are resized bilinearly to the actual
stage maps and the window blocks pad their maps as Swin does.

Dense prediction (the declaration at the end, mm type ``AgentSwin``) is the official
detection / segmentation backbone: the agents pooled to larger grids (9x9, 12x12, 14x14, 7x7) with
the agent axis of their biases resized, and the window blocks keeping window and shift at every map
size with the padding before the shift.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, PatchEmbed, calculate_drop_path_rates, to_2tuple
from timm.models import generate_default_cfgs, register_model

from visionzoo.layers import (
    AgentAttention,
    ChannelsLastModel,
    PatchMerging,
    Stage,
    TransformerBlock,
    WindowAttention,
    fit_window_shift,
    resize_agent_biases,
)

from .agent_common import agent_cfg, create_agent_model
from .dense import DenseArch, DenseFamily, register_dense_family
from .swin import checkpoint_filter_fn as swin_checkpoint_filter_fn

__all__ = ["AgentSwinTransformer", "block_attention_types"]

_int_or_tuple_2_t = Union[int, Tuple[int, int]]
_PATCH_SIZE = 4


def block_attention_types(stage_type: str, depth: int) -> List[str]:
    """The attention of each block of a stage: ``'A'`` -> all agent, ``'B'`` -> all window,
    ``'M<k>'`` -> the first ``k`` agent, the rest window (the official ``attn_type`` letters)."""
    match = re.fullmatch(r"A|B|M(\d+)", stage_type)
    if match is None:
        raise ValueError(f"attn_types entries must be 'A', 'B' or 'M<k>' (e.g. 'M2'), got {stage_type!r}")
    if match[1] is None:
        return [stage_type] * depth
    return ["A" if j < int(match[1]) else "B" for j in range(depth)]


class AgentSwinTransformer(ChannelsLastModel):
    """Agent-Swin: 4x4 patch embedding, 4 stages of agent or window attention blocks at strides 4, 8,
    16, 32, patch merging between them.

    Args:
        img_size: input size the agent biases and the windows are sized for; any input size runs.
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: pooling of the head (timm ``ClassifierHead`` types).
        embed_dim: width of stage 0; stage ``i`` has ``embed_dim * 2**i`` channels.
        depths: blocks per stage.
        num_heads: heads per stage.
        attn_types: per stage ``'A'`` (agent attention), ``'B'`` (window attention) or ``'M<k>'``
            (``k`` agent blocks, then window blocks); see :func:`block_attention_types`.
        agent_nums: agent tokens per stage (squares).
        agent_shapes: per stage, the grid the agents are pooled to at run time (``None``: the
            trained ``sqrt(n)`` square); the dense declaration sets the official dense grids.
        window_size: window of the ``'B'`` blocks; ``None``: the official ``max(7, (img_size / 4) // 8)``.
        mlp_ratio: MLP hidden width over block width.
        qkv_bias: bias in the qkv projections.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention projection and in the MLP.
        attn_drop_rate: dropout on the agent attention probabilities (the window blocks take none).
        drop_path_rate: stochastic depth, increasing linearly over blocks up to this value.
        act_layer: MLP activation.
        pad_before_shift: the official dense layout of the window blocks (window and shift kept at
            every map size, maps padded before the shift; see :class:`visionzoo.layers.WindowAttention`).
    """

    no_weight_decay_patterns = ("*.relative_position_bias_table",)

    def __init__(
        self,
        img_size: _int_or_tuple_2_t = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        attn_types: Sequence[str] = ("A", "A", "A", "B"),
        agent_nums: Sequence[int] = (9, 16, 49, 49),
        agent_shapes: Optional[Sequence[_int_or_tuple_2_t]] = None,
        window_size: Optional[_int_or_tuple_2_t] = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        act_layer: type = nn.GELU,
        pad_before_shift: bool = False,
    ):
        super().__init__()
        num_stages = len(depths)
        agent_shapes = [None] * num_stages if agent_shapes is None else list(agent_shapes)
        for name, values in (("num_heads", num_heads), ("attn_types", attn_types),
                             ("agent_nums", agent_nums), ("agent_shapes", agent_shapes)):
            if len(values) != num_stages:
                raise ValueError(f"{name} {tuple(values)} must have one entry per stage, depths {tuple(depths)}")
        self.img_size = to_2tuple(img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.output_fmt = "NHWC"
        dims = [int(embed_dim * 2**i) for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        grid = [s // _PATCH_SIZE for s in self.img_size]
        sizes = [tuple(-(-g // 2**i) for g in grid) for i in range(num_stages)]
        # the official window of the softmax blocks: WINDOW_SIZE // 8, WINDOW_SIZE = img_size / 4
        window_size = to_2tuple(window_size) if window_size is not None else tuple(max(7, g // 8) for g in grid)

        self.patch_embed = PatchEmbed(
            img_size=self.img_size,
            patch_size=_PATCH_SIZE,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=nn.LayerNorm,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        self.feature_info = []
        for i in range(num_stages):
            half = tuple(w // 2 for w in window_size)
            if pad_before_shift:
                window, shift = window_size, half
            else:  # Swin's rule: a map not larger than the window is the window, unshifted
                window, shift = fit_window_shift(sizes[i], window_size, half)
            blocks = []
            for j, attn_type in enumerate(block_attention_types(attn_types[i], depths[i])):
                if attn_type == "A":
                    attn = AgentAttention(
                        dims[i],
                        num_heads[i],
                        int(agent_nums[i]),
                        sizes[i],
                        qkv_bias=qkv_bias,
                        agent_shape=agent_shapes[i],
                        attn_drop=attn_drop_rate,
                        proj_drop=proj_drop_rate,
                    )
                else:
                    attn = WindowAttention(
                        dims[i],
                        num_heads[i],
                        window_size=window,
                        shift_size=shift if j % 2 else 0,
                        qkv_bias=qkv_bias,
                        proj_drop=proj_drop_rate,
                        pad_before_shift=pad_before_shift,
                    )
                blocks.append(TransformerBlock(
                    dims[i],
                    attn,
                    mlp_ratio=mlp_ratio,
                    proj_drop=proj_drop_rate,
                    drop_path=dpr[i][j],
                    act_layer=act_layer,
                ))
            downsample = PatchMerging(dims[i - 1], dims[i]) if i > 0 else None
            stages.append(Stage(blocks, downsample=downsample))
            self.feature_info.append(dict(num_chs=dims[i], reduction=_PATCH_SIZE * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC"
        )
        self.apply(self._init_weights)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: AgentSwinTransformer) -> Dict[str, torch.Tensor]:
    """Convert an official Agent-Swin checkpoint (``{'model': state_dict}`` or plain) to this layout.

    The official layout is Swin's, converted as :func:`visionzoo.models.swin.checkpoint_filter_fn`
    does (``layers.{i}.downsample`` -> ``stages.{i+1}.downsample``, ``layers`` -> ``stages``,
    ``head`` -> ``head.fc``, the ``relative_position_index`` / ``attn_mask`` buffers dropped, bias
    tables of another window resized); the per-row / per-column agent biases of another resolution
    are resized to the model's. Keys already in this layout pass through.
    """
    return resize_agent_biases(swin_checkpoint_filter_fn(state_dict, model), model)


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    return create_agent_model(AgentSwinTransformer, variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    "visionzoo_agent_swin_t.in1k": agent_cfg("a2ddc1190c224f768a41"),
    "visionzoo_agent_swin_s.in1k": agent_cfg("f607172c9fea4d6e99bb"),
    # fine-tuned at 288 / 384 and evaluated without a centre crop
    "visionzoo_agent_swin_s.in1k_288": agent_cfg(
        "09760394e93b4046a25e", input_size=(3, 288, 288), pool_size=(9, 9), crop_pct=1.0
    ),
    "visionzoo_agent_swin_b.in1k": agent_cfg("4fcd2d0114bb490483c3"),
    "visionzoo_agent_swin_b.in1k_384": agent_cfg(
        "bb84ee9058954706a557", input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0
    ),
})

_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), attn_types=("A", "A", "A", "B"))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), attn_types=("A", "A", "B", "B"))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), attn_types=("A", "A", "M2", "B"))


@register_model
def visionzoo_agent_swin_t(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-T: 2-2-6-2 blocks, 96 channels, stages A-A-A-B, agents 9-16-49-49."""
    model_args = dict(_T, drop_path_rate=0.2)
    return _create_agent_swin("visionzoo_agent_swin_t", pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_agent_swin_s(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-S: 2-2-18-2 blocks, 96 channels, stages A-A-B-B, agents 9-16-49-49."""
    model_args = dict(_S, drop_path_rate=0.3)
    return _create_agent_swin("visionzoo_agent_swin_s", pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_agent_swin_b(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-B: 2-2-18-2 blocks, 128 channels, stages A-A-M2-B, agents 9-16-49-49."""
    model_args = dict(_B, drop_path_rate=0.5)
    return _create_agent_swin("visionzoo_agent_swin_b", pretrained, **dict(model_args, **kwargs))


# ----------------------------------------------------------------------------------------------
# dense prediction: what visionzoo.mm registers (mmdet / mmseg backbones) and configs/ are written from
# ----------------------------------------------------------------------------------------------
# The official dense backbones (downstream/{detection,segmentation}, configs *_9-12-14-7.py): agents
# pooled to these grids (the trained 3x3, 4x4, 7x7, 7x7 biases resized along the agent axis). The
# grids of stages without agent blocks (3 of Agent-Swin-S, 4 of every size) are unused.
_DENSE_AGENT_SHAPES = ((9, 9), (12, 12), (14, 14), (7, 7))


def _dense_options(model: AgentSwinTransformer, task: str) -> Dict[str, Any]:
    """``task_kwargs``: the official dense agent grids, and the window blocks' dense layout (the
    window of 224 and its shift kept at every map size, padding before the shift)."""
    return {"agent_shapes": _DENSE_AGENT_SHAPES, "pad_before_shift": True}


# Drop path rates of the official dense configs: Mask R-CNN 1x COCO 0.1 (T, S; B has none), UperNet
# 160k ADE20K 0.3 / 0.3 / 0.5 (T / S / B).
register_dense_family(DenseFamily(
    name="agent_swin",
    type_names=("AgentSwin",),
    archs={
        "tiny": DenseArch("visionzoo_agent_swin_t", "in1k", dict(det=0.1, seg=0.3)),
        "small": DenseArch("visionzoo_agent_swin_s", "in1k", dict(det=0.1, seg=0.3)),
        "base": DenseArch("visionzoo_agent_swin_b", "in1k", dict(seg=0.5)),
    },
    task_kwargs=_dense_options,
    checkpoint_filter=checkpoint_filter_fn,
))
