"""Agent-DeiT: DeiT with agent attention (and its class token) in the first blocks.

Paper: Agent Attention: On the Integration of Softmax and Linear Attention (ECCV 2024),
https://arxiv.org/abs/2312.08874. Official code and weights:
https://github.com/LeapLabTHU/Agent-Attention (``agent_transformer/models/agent_deit.py``; the
repository carries no licence file).

The architecture and parameter count are the official ones: timm's DeiT (16x16 patches, class
token, one position embedding, LayerNorm eps 1e-6, final norm, class-token classifier) with agent
attention in every block (T, S: 49 agents) or in the first 4 blocks (B: 81 agents, softmax
attention after). Parameter names are timm's VisionTransformer's, as in the official code; the
only key ``checkpoint_filter_fn`` renames is ``head`` -> ``head.fc``.

Any input size runs: inputs are padded to a multiple of 16, and the position embedding and the
agent biases are resized bilinearly to the actual grid (the official code runs only at the
resolution it was built for).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import (
    Attention,
    ClassifierHead,
    DropPath,
    Mlp,
    PatchEmbed,
    calculate_drop_path_rates,
    get_device_dtype,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from visionzoo.layers import AgentAttention, ChannelsLastModel, check_image, resize_agent_biases
from visionzoo.layers.model_base import feature_take_indices

from .agent_common import agent_cfg, create_agent_model

__all__ = ["AgentDeiT"]


class AgentDeiTBlock(nn.Module):
    """Pre-norm ViT block over a patch map and a class token: ``([B, H, W, C], [B, 1, C])`` in and out.

    ``attn`` is :class:`visionzoo.layers.AgentAttention` (with ``class_token=True``) or timm's
    softmax ``Attention`` over the ``1 + H*W`` tokens. ``spatial_out`` hands the block's patch map
    out as a module output, the feature that FX feature extraction names.
    """

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        mlp_ratio: float = 4.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.spatial_out = nn.Identity()

    def forward(self, x: torch.Tensor, cls_token: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        batch, height, width, dim = x.shape
        tokens = torch.cat([cls_token, x.reshape(batch, height * width, dim)], dim=1)
        normed = self.norm1(tokens)
        if isinstance(self.attn, AgentAttention):
            out_map, out_cls = self.attn(normed[:, 1:].reshape(batch, height, width, dim), normed[:, :1])
            attended = torch.cat([out_cls, out_map.reshape(batch, height * width, dim)], dim=1)
        else:
            attended = self.attn(normed)
        tokens = tokens + self.drop_path1(attended)
        tokens = tokens + self.drop_path2(self.mlp(self.norm2(tokens)))
        return self.spatial_out(tokens[:, 1:].reshape(batch, height, width, dim)), tokens[:, :1]


class AgentDeiT(ChannelsLastModel):
    """Agent-DeiT: ``depth`` blocks at stride ``patch_size``, agent attention in the first ``agent_layers``.

    Every block is a feature level (``blocks.{i}``, its patch map). ``forward_features`` returns
    the normalized tokens ``[B, 1 + H*W, C]``, class token first, as timm's ViT does.

    Args:
        img_size: resolution the position embedding and agent biases are sized for (window
            ``img_size // patch_size``); inputs of any size are accepted.
        patch_size: patch embedding size and stride.
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        global_pool: ``'token'`` (the class token), ``'avg'`` (mean of the patch tokens) or ``''``
            (no pooling: ``forward_head`` returns the tokens).
        embed_dim, depth, num_heads, mlp_ratio: width, blocks, heads, MLP ratio.
        agent_num: agent tokens (a square).
        agent_layers: the first ``agent_layers`` blocks use agent attention, the rest softmax
            attention; ``None``: all.
        qkv_bias: bias in the qkv projections.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention projection and in the MLP.
        attn_drop_rate: dropout on the attention probabilities.
        drop_path_rate: stochastic depth, increasing linearly over blocks up to this value.
        norm_layer: normalization.
        act_layer: MLP activation.
    """

    isotropic = True
    no_weight_decay_patterns = ("pos_embed", "cls_token")

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        agent_num: int = 49,
        agent_layers: Optional[int] = None,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        act_layer: Type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self._check_pool(global_pool)
        agent_layers = depth if agent_layers is None else agent_layers
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
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        blocks = []
        for i in range(depth):
            if i < agent_layers:
                attn = AgentAttention(
                    embed_dim,
                    num_heads,
                    agent_num,
                    self.grid_size,
                    qkv_bias=qkv_bias,
                    class_token=True,
                    attn_drop=attn_drop_rate,
                    proj_drop=proj_drop_rate,
                )
            else:
                attn = Attention(
                    embed_dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate
                )
            blocks.append(
                AgentDeiTBlock(
                    embed_dim,
                    attn,
                    mlp_ratio=mlp_ratio,
                    proj_drop=proj_drop_rate,
                    drop_path=dpr[i],
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                )
            )
        self.blocks = nn.Sequential(*blocks)
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}.spatial_out") for i in range(depth)
        ]
        self.norm = norm_layer(embed_dim)
        # the head takes the pooled [B, C] vector; pooling of the tokens is forward_head's
        self.head = ClassifierHead(embed_dim, num_classes, pool_type="", drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _check_pool(global_pool: str) -> None:
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` (0: none); ``global_pool`` ``'token'``, ``'avg'`` or ``''``."""
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head.reset(num_classes, in_features=self.num_features, **get_device_dtype(self))

    def _embed_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed(check_image(x, self.in_chans))
        height, width = x.shape[1:3]
        grid = resample_abs_pos_embed(
            self.pos_embed[:, 1:], [height, width], self.grid_size, num_prefix_tokens=0,
            interpolation="bilinear", antialias=False,
        )
        cls_token = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return x + grid.reshape(1, height, width, -1), cls_token

    @staticmethod
    def _tokens(x: torch.Tensor, cls_token: torch.Tensor) -> torch.Tensor:
        return torch.cat([cls_token, x.flatten(1, 2)], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> normalized tokens ``[B, 1 + H'*W', C]``, class token first."""
        x, cls_token = self._embed_tokens(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, cls_token = checkpoint(block, x, cls_token, use_reentrant=False)
            else:
                x, cls_token = block(x, cls_token)
        return self.norm(self._tokens(x, cls_token))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> ``[B, num_classes]``."""
        # defined here, not inherited: torch.fx treats the helpers named in this file (check_image,
        # resample_abs_pos_embed) as leaves only when the traced forward is in this file
        return self.forward_head(self.forward_features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``[B, 1 + N, C]`` -> ``[B, num_classes]`` logits (``[B, C]`` with ``pre_logits``)."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, 1:].mean(dim=1)
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The blocks' patch maps ``[B, C, H', W']`` (``'NHWC'``: ``[B, H', W', C]``); see the base class.

        The final features are the normalized tokens, as :meth:`forward_features` returns them.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        blocks = self.blocks[: max_index + 1] if stop_early and not torch.jit.is_scripting() else self.blocks
        intermediates = []
        x, cls_token = self._embed_tokens(x)
        for i, block in enumerate(blocks):
            x, cls_token = block(x, cls_token)
            if i in take_indices:
                x_inter = self.norm(x) if norm else x
                intermediates.append(x_inter.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else x_inter)
        if intermediates_only:
            return intermediates
        return self.norm(self._tokens(x, cls_token)), intermediates


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert an official Agent-DeiT checkpoint (``{'model': state_dict}`` or plain) to this layout.

    The position embedding and per-row / per-column agent biases of another (square) resolution
    are resized to the model's.
    """
    state_dict = state_dict.get("model", state_dict)
    out = {}
    for key, value in state_dict.items():
        if key in ("head.weight", "head.bias"):
            key = "head.fc." + key.split(".")[1]
        elif key == "pos_embed" and value.shape != model.pos_embed.shape:
            value = resample_abs_pos_embed(
                value, list(model.grid_size), num_prefix_tokens=1, interpolation="bilinear", antialias=False
            )
        out[key] = value
    return resize_agent_biases(out, model)


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs) -> AgentDeiT:
    return create_agent_model(AgentDeiT, variant, pretrained, checkpoint_filter_fn, 3, **kwargs)


default_cfgs = generate_default_cfgs({
    "visionzoo_agent_deit_t.in1k": agent_cfg("57e0904221824ee7b7af", pool_size=(14, 14)),
    "visionzoo_agent_deit_s.in1k": agent_cfg("fdd43304372541db8ea7", pool_size=(14, 14)),
    "visionzoo_agent_deit_s.in1k_448": agent_cfg(
        "a228f86241c445f1969b", input_size=(3, 448, 448), pool_size=(28, 28)
    ),
    "visionzoo_agent_deit_b.in1k": agent_cfg("5115f15fdd7e4ab58fbc", pool_size=(14, 14)),
})


@register_model
def visionzoo_agent_deit_t(pretrained: bool = False, **kwargs) -> AgentDeiT:
    model_args = dict(embed_dim=192, depth=12, num_heads=3, agent_num=49, drop_path_rate=0.0)
    return _create_agent_deit("visionzoo_agent_deit_t", pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_agent_deit_s(pretrained: bool = False, **kwargs) -> AgentDeiT:
    model_args = dict(embed_dim=384, depth=12, num_heads=6, agent_num=49, drop_path_rate=0.1)
    return _create_agent_deit("visionzoo_agent_deit_s", pretrained, **dict(model_args, **kwargs))


@register_model
def visionzoo_agent_deit_b(pretrained: bool = False, **kwargs) -> AgentDeiT:
    model_args = dict(embed_dim=768, depth=12, num_heads=12, agent_num=81, agent_layers=4, drop_path_rate=0.3)
    return _create_agent_deit("visionzoo_agent_deit_b", pretrained, **dict(model_args, **kwargs))
