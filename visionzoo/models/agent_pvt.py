"""Agent-PVT: the Pyramid Vision Transformer (v1) with agent attention in every block.

Paper: Agent Attention: On the Integration of Softmax and Linear Attention (ECCV 2024),
https://arxiv.org/abs/2312.08874. Official code and weights:
https://github.com/LeapLabTHU/Agent-Attention (``agent_transformer/models/agent_pvt.py``; the
repository carries no licence file).

The architecture and parameter count are the official ones (PVTv1 layout: per stage a patch
embedding with LayerNorm and its own learned position embedding, then blocks of agent attention
with separate ``q`` / ``kv`` projections and no spatial reduction; no class token, no final norm,
mean pooling; LayerNorm eps 1e-6 in the blocks). The module layout follows timm and
``checkpoint_filter_fn`` maps the official keys:

    * ``patch_embed1`` / ``pos_embed1`` -> ``patch_embed.{proj,norm}`` / ``patch_embed.pos_embed``;
    * ``patch_embed{i+1}`` / ``pos_embed{i+1}`` -> ``stages.{i}.downsample.*`` (i = 1, 2, 3);
    * ``block{i+1}.{j}`` -> ``stages.{i}.blocks.{j}`` (attention keys unchanged);
    * ``head`` -> ``head.fc``.

Any input size runs: inputs are padded to a multiple of each patch size, and the position
embeddings and agent biases are resized bilinearly to the actual feature size (the official code
runs only at the resolution it was built for).

Dense prediction (the declaration at the end, mm type ``AgentPVT``) is the official detection /
segmentation backbone: agents pooled to 12x12, 16x16, 28x28, 28x28 grids with the agent axis of
their biases resized, and the stage outputs without output norms.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, calculate_drop_path_rates, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from visionzoo.layers import AgentAttention, ChannelsLastModel, Stage, TransformerBlock, resize_agent_biases

from .agent_common import agent_cfg, create_agent_model
from .dense import DenseArch, DenseFamily, register_dense_family

__all__ = ["AgentPVT"]


class PositionalPatchEmbed(nn.Module):
    """PVTv1 patch embedding: ``patch_size`` conv, LayerNorm, plus a learned position embedding.

    ``[B, H, W, C_in]`` (or ``[B, C_in, H, W]`` with ``channels_last=False``, the stem) ->
    ``[B, ceil(H/p), ceil(W/p), embed_dim]``; inputs are zero-padded to a multiple of ``patch_size``.
    The position embedding ``[1, gh*gw, embed_dim]`` is sized for ``grid_size`` and resized to
    other feature sizes.
    """

    def __init__(
        self, in_chans: int, embed_dim: int, patch_size: int, grid_size: Tuple[int, int], channels_last: bool = True
    ):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = grid_size
        self.channels_last = channels_last
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)  # the official embedding keeps LayerNorm's default eps
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        pad_h, pad_w = (-x.shape[2]) % self.patch_size, (-x.shape[3]) % self.patch_size
        x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.norm(self.proj(x).permute(0, 2, 3, 1))
        height, width = x.shape[1:3]
        pos_embed = resample_abs_pos_embed(
            self.pos_embed, [height, width], self.grid_size,
            num_prefix_tokens=0, interpolation="bilinear", antialias=False,
        )
        return x + pos_embed.reshape(1, height, width, -1)


class AgentPVT(ChannelsLastModel):
    """Agent-PVT: 4 stages at strides 4, 8, 16, 32, agent attention in every block.

    Args:
        img_size: resolution the position embeddings and agent biases are sized for; inputs of
            any size are accepted.
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: pooling of the head (timm ``ClassifierHead`` types).
        embed_dims: channels per stage.
        depths: blocks per stage.
        num_heads: heads per stage.
        mlp_ratios: MLP hidden width over block width, per stage.
        agent_nums: agent tokens per stage (squares).
        agent_shapes: per stage, the grid the agents are pooled to at run time (``None``: the
            trained ``sqrt(n)`` square); the dense declaration sets the official dense grids.
        qkv_bias: bias in the q / kv projections.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention projection and in the MLP.
        attn_drop_rate: dropout on the attention probabilities.
        drop_path_rate: stochastic depth, increasing linearly over blocks up to this value.
        norm_layer: the blocks' normalization.
        act_layer: MLP activation.
    """

    no_weight_decay_patterns = ("*pos_embed",)

    def __init__(
        self,
        img_size: int | Tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (3, 4, 6, 3),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        agent_nums: Sequence[int] = (9, 16, 49, 49),
        agent_shapes: Optional[Sequence[Union[int, Tuple[int, int]]]] = None,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        act_layer: Type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        num_stages = len(depths)
        agent_shapes = [None] * num_stages if agent_shapes is None else list(agent_shapes)
        for name, values in (("embed_dims", embed_dims), ("num_heads", num_heads), ("mlp_ratios", mlp_ratios),
                             ("agent_nums", agent_nums), ("agent_shapes", agent_shapes)):
            if len(values) != num_stages:
                raise ValueError(f"{name} {tuple(values)} must have one entry per stage, depths {tuple(depths)}")
        img_size = to_2tuple(img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.output_fmt = "NHWC"
        self.num_features = self.head_hidden_size = embed_dims[-1]

        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        self.feature_info = []
        for i in range(num_stages):
            stride = 4 * 2**i
            # the official grids: img // 4, then halved (floored) per stage
            grid = tuple(size // stride for size in img_size)
            embed = PositionalPatchEmbed(
                in_chans if i == 0 else embed_dims[i - 1],
                embed_dims[i],
                patch_size=4 if i == 0 else 2,
                grid_size=grid,
                channels_last=i > 0,
            )
            if i == 0:
                self.patch_embed = embed
            blocks = [
                TransformerBlock(
                    embed_dims[i],
                    AgentAttention(
                        embed_dims[i],
                        num_heads[i],
                        agent_nums[i],
                        grid,
                        qkv_bias=qkv_bias,
                        split_qkv=True,
                        agent_shape=agent_shapes[i],
                        attn_drop=attn_drop_rate,
                        proj_drop=proj_drop_rate,
                    ),
                    mlp_ratio=mlp_ratios[i],
                    proj_drop=proj_drop_rate,
                    drop_path=dpr[i][j],
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                )
                for j in range(depths[i])
            ]
            stages.append(Stage(blocks, downsample=embed if i > 0 else None))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        self.norm = nn.Identity()  # Agent-PVT pools the last stage without a final norm
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC"
        )
        self.apply(self._init_weights)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert an official Agent-PVT checkpoint (``{'model': state_dict}`` or plain) to this layout.

    Position embeddings and per-row / per-column agent biases of another (square) resolution are
    resized to the model's; keys already in this layout pass through unchanged.
    """
    state_dict = state_dict.get("model", state_dict)
    out = {}
    for key, value in state_dict.items():
        match = re.match(r"^(patch_embed|pos_embed)(\d)(.*)$", key)
        if match:
            stage = int(match[2]) - 1
            prefix = "patch_embed" if stage == 0 else f"stages.{stage}.downsample"
            key = prefix + match[3] if match[1] == "patch_embed" else f"{prefix}.pos_embed"
        key = re.sub(r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.", key)
        key = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)
        out[key] = value
    for name, module in model.named_modules():
        key = f"{name}.pos_embed"
        if isinstance(module, PositionalPatchEmbed) and key in out and out[key].shape != module.pos_embed.shape:
            out[key] = resample_abs_pos_embed(
                out[key], list(module.grid_size), num_prefix_tokens=0, interpolation="bilinear", antialias=False
            )
    return resize_agent_biases(out, model)


def _create_agent_pvt(variant: str, pretrained: bool = False, **kwargs) -> AgentPVT:
    return create_agent_model(AgentPVT, variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    "visionzoo_agent_pvt_t.in1k": agent_cfg("13fdf0e0a7c5498c934f"),
    "visionzoo_agent_pvt_s.in1k": agent_cfg("36b8be9a8863456685a3"),
    "visionzoo_agent_pvt_m.in1k": agent_cfg("4d00ecacf18b45f9b88c"),
    "visionzoo_agent_pvt_m.in1k_256": agent_cfg(
        "654df734121643b19c52", input_size=(3, 256, 256), pool_size=(8, 8), crop_pct=0.875
    ),
    "visionzoo_agent_pvt_l.in1k": agent_cfg("040cfe0cfbbe4762ad09"),
})


@register_model
def visionzoo_agent_pvt_t(pretrained: bool = False, **kwargs) -> AgentPVT:
    model_args = dict(depths=(2, 2, 2, 2), drop_path_rate=0.1)
    return _create_agent_pvt("visionzoo_agent_pvt_t", pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_agent_pvt_s(pretrained: bool = False, **kwargs) -> AgentPVT:
    model_args = dict(depths=(3, 4, 6, 3), drop_path_rate=0.1)
    return _create_agent_pvt("visionzoo_agent_pvt_s", pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_agent_pvt_m(pretrained: bool = False, **kwargs) -> AgentPVT:
    model_args = dict(depths=(3, 4, 18, 3), drop_path_rate=0.3)
    return _create_agent_pvt("visionzoo_agent_pvt_m", pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_agent_pvt_l(pretrained: bool = False, **kwargs) -> AgentPVT:
    model_args = dict(depths=(3, 8, 27, 3), drop_path_rate=0.3)
    return _create_agent_pvt("visionzoo_agent_pvt_l", pretrained, **dict(model_args, **kwargs))


# ----------------------------------------------------------------------------------------------
# dense prediction: what visionzoo.mm registers (mmdet / mmseg backbones) and configs/ are written from
# ----------------------------------------------------------------------------------------------
# The official dense backbones (downstream/{detection,segmentation}, configs *_12-16-28-28.py) pool
# the agents to these grids, the trained 3x3, 4x4, 7x7, 7x7 biases resized along the agent axis.
_DENSE_AGENT_SHAPES = ((12, 12), (16, 16), (28, 28), (28, 28))


def _dense_options(model: AgentPVT, task: str) -> Dict[str, Any]:
    """``task_kwargs``: the official dense agent grids (detection and segmentation alike)."""
    return {"agent_shapes": _DENSE_AGENT_SHAPES}


def _no_out_norm(channels: int) -> nn.Module:
    """The official dense Agent-PVT returns its stage outputs as they are (no per-output norm)."""
    return nn.Identity()


# Drop path rates of the official Mask R-CNN 1x COCO configs. The official segmentation results are
# Semantic FPN 40k (not a generated recipe): no seg rate, so no generated ADE20K config.
register_dense_family(DenseFamily(
    name="agent_pvt",
    type_names=("AgentPVT",),
    archs={
        "tiny": DenseArch("visionzoo_agent_pvt_t", "in1k", dict(det=0.1)),
        "small": DenseArch("visionzoo_agent_pvt_s", "in1k", dict(det=0.2)),
        "medium": DenseArch("visionzoo_agent_pvt_m", "in1k", dict(det=0.1)),
        "large": DenseArch("visionzoo_agent_pvt_l", "in1k", dict(det=0.2)),
    },
    task_kwargs=_dense_options,
    checkpoint_filter=checkpoint_filter_fn,
    out_norm=_no_out_norm,
))
