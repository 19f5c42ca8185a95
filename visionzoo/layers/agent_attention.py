"""Agent attention (Agent-Swin, Agent-PVT, Agent-DeiT): softmax attention through a few pooled agent tokens.

Agent Attention: On the Integration of Softmax and Linear Attention (ECCV 2024),
https://arxiv.org/abs/2312.08874. With ``A`` the agent tokens, average-pooled from the queries to a
``sqrt(n) x sqrt(n)`` grid, and ``d`` the head width::

    V_A = softmax(A K^T / sqrt(d) + B1) V          (agents attend the keys)
    O   = softmax(Q A^T / sqrt(d) + B2) V_A + dwc(V)   (queries attend the agents)

Each softmax step is one fused ``F.scaled_dot_product_attention`` call with its position bias as
an additive float mask, so the ``N x n`` probabilities are never materialised. The cost is linear
in the number of tokens ``N``.

The agents can be pooled to another grid than the trained ``sqrt(n) x sqrt(n)`` (``agent_shape``):
the official detection / segmentation backbones use more agents on their larger maps, with the
agent axis of the biases resized bilinearly from the trained grid.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function, to_2tuple, trunc_normal_

__all__ = ["AgentAttention", "agent_position_biases", "resize_agent_biases"]


def _resize_axis(bias: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``bias`` resized bilinearly (align_corners=False) along ``dim`` to ``size``; itself if already that size."""
    if bias.shape[dim] == size:
        return bias
    moved = bias.movedim(dim, -1)
    lead = moved.shape[:-1]
    resized = F.interpolate(moved.reshape(1, -1, 1, moved.shape[-1]), size=(1, size), mode="bilinear")
    return resized.reshape(*lead, size).movedim(-1, dim)


def resize_agent_biases(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``state_dict`` with the per-row / per-column agent biases (``ah/aw/ha/wa_bias``) of another
    resolution resized bilinearly to the shapes of ``model``'s parameters of the same name."""
    params = dict(model.named_parameters())
    out = dict(state_dict)
    for key, value in state_dict.items():
        target = params.get(key)
        if key.rsplit(".", 1)[-1] in _ROW_COLUMN_BIASES and target is not None and value.shape != target.shape:
            for dim in range(value.dim()):
                value = _resize_axis(value, target.shape[dim], dim)
            out[key] = value
    return out


_ROW_COLUMN_BIASES = ("ah_bias", "aw_bias", "ha_bias", "wa_bias")


def _resize_agents(bias: torch.Tensor, agent_shape: Tuple[int, int], dim: int) -> torch.Tensor:
    """``bias`` whose axis ``dim`` is a square grid of agents (row-major) resized bilinearly
    (align_corners=False) to an ``agent_shape`` grid; itself if already that grid."""
    side = math.isqrt(bias.shape[dim])
    if (side, side) == tuple(agent_shape):
        return bias
    moved = bias.movedim(dim, -1)
    lead = moved.shape[:-1]
    grid = moved.reshape(1, -1, side, side)
    resized = F.interpolate(grid, size=tuple(agent_shape), mode="bilinear")
    return resized.reshape(*lead, agent_shape[0] * agent_shape[1]).movedim(-1, dim)


@register_notrace_function  # reads the feature size: a leaf for torch.fx
def agent_position_biases(
    an_bias: torch.Tensor,
    na_bias: torch.Tensor,
    ah_bias: torch.Tensor,
    aw_bias: torch.Tensor,
    ha_bias: torch.Tensor,
    wa_bias: torch.Tensor,
    height: int,
    width: int,
    ac_bias: Optional[torch.Tensor] = None,
    ca_bias: Optional[torch.Tensor] = None,
    agent_shape: Optional[Tuple[int, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two additive biases for a ``height x width`` feature map, in the official parameter shapes.

    Args:
        an_bias, na_bias: ``[heads, n, 7, 7]``, resized bilinearly to ``height x width``.
        ah_bias, aw_bias: ``[1, heads, n, Wh, 1]`` / ``[1, heads, n, 1, Ww]`` (agent -> token rows /
            columns), resized along their spatial axis when ``(height, width) != (Wh, Ww)``.
        ha_bias, wa_bias: ``[1, heads, Wh, 1, n]`` / ``[1, heads, 1, Ww, n]`` (token -> agent).
        ac_bias, ca_bias: ``[1, heads, n, 1]`` / ``[1, heads, 1, n]``: agent <-> class token, prepended.
        agent_shape: the ``(rows, cols)`` grid the agents are pooled to, when not the trained
            ``sqrt(n) x sqrt(n)``: the agent axis of every bias is resized bilinearly to it.

    Returns:
        ``(agent_bias [1, heads, m, P + H*W], query_bias [1, heads, P + H*W, m])``, ``m`` the agents
        (``n``, or ``rows * cols`` of ``agent_shape``), ``P`` = 1 with a class token, else 0.
    """
    heads, agents = an_bias.shape[:2]
    size = (height, width)
    agent_bias = (
        F.interpolate(an_bias, size=size, mode="bilinear")
        + _resize_axis(ah_bias, height, 3)[0]
        + _resize_axis(aw_bias, width, 4)[0]
    ).reshape(1, heads, agents, height * width)
    query_bias = (
        F.interpolate(na_bias, size=size, mode="bilinear").reshape(1, heads, agents, height * width).transpose(-1, -2)
        + (_resize_axis(ha_bias, height, 2) + _resize_axis(wa_bias, width, 3)).reshape(1, heads, height * width, agents)
    )
    if ac_bias is not None and ca_bias is not None:
        agent_bias = torch.cat([ac_bias, agent_bias], dim=-1)
        query_bias = torch.cat([ca_bias, query_bias], dim=-2)
    if agent_shape is not None:
        agent_bias = _resize_agents(agent_bias, agent_shape, 2)
        query_bias = _resize_agents(query_bias, agent_shape, 3)
    return agent_bias, query_bias


class AgentAttention(nn.Module):
    """Agent attention over a ``[B, H, W, C]`` map, optionally with a class token (DeiT).

    Args:
        dim: channels ``C``.
        num_heads: attention heads; ``dim`` must be divisible by it.
        agent_num: number of agent tokens ``n``, a square (pooled to a ``sqrt(n) x sqrt(n)`` grid).
        window_size: feature size ``(Wh, Ww)`` the per-row / per-column biases are sized for (the
            training resolution's); other feature sizes use them resized bilinearly.
        qkv_bias: bias in the q/k/v projections.
        split_qkv: separate ``q`` and ``kv`` projections (Agent-PVT's layout) instead of one ``qkv``.
        class_token: a class token takes part in both softmax steps (with ``ac_bias`` / ``ca_bias``)
            but not in the agent pooling or the depthwise conv (Agent-DeiT).
        agent_shape: the ``(rows, cols)`` grid the agents are pooled to at run time; ``None``: the
            trained ``sqrt(agent_num)`` square. Another grid (the official dense backbones, e.g.
            9x9 for 9 trained agents) resizes the agent axis of the biases bilinearly; the
            parameters keep the trained ``agent_num``.
        attn_drop: dropout on both attention probabilities.
        proj_drop: dropout after the output projection.

    Parameter names are the official ones (``qkv`` or ``q``/``kv``, ``proj``, ``dwc``, ``an_bias``,
    ``na_bias``, ``ah_bias``, ``aw_bias``, ``ha_bias``, ``wa_bias``, ``ac_bias``, ``ca_bias``), so
    official attention weights load unchanged.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        agent_num: int,
        window_size: Union[int, Tuple[int, int]],
        qkv_bias: bool = True,
        split_qkv: bool = False,
        class_token: bool = False,
        agent_shape: Optional[Union[int, Tuple[int, int]]] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        pool_size = math.isqrt(agent_num)
        if agent_num < 1 or pool_size * pool_size != agent_num:
            raise ValueError(f"agent_num must be a positive square (agents pooled to a grid), got {agent_num}")
        window_size = to_2tuple(window_size)
        agent_shape = (pool_size, pool_size) if agent_shape is None else tuple(to_2tuple(agent_shape))
        if min(agent_shape) < 1:
            raise ValueError(f"agent_shape must be a grid of at least 1x1 agents, got {agent_shape}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.agent_num = agent_num
        self.agent_shape = agent_shape
        self.window_size = window_size
        self.class_token = class_token
        self.attn_drop = attn_drop

        if split_qkv:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.split_qkv = split_qkv
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.pool = nn.AdaptiveAvgPool2d(agent_shape)

        wh, ww = window_size
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, wh, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1, ww))
        self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, wh, 1, agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, ww, agent_num))
        if class_token:
            self.ac_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1))
            self.ca_bias = nn.Parameter(torch.zeros(1, num_heads, 1, agent_num))
        for param in self.parameters(recurse=False):
            trunc_normal_(param, std=0.02)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, "
            f"window_size={self.window_size}, agent_shape={self.agent_shape}, class_token={self.class_token}"
        )

    def _project(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.split_qkv:
            k, v = self.kv(tokens).chunk(2, dim=-1)
            return self.q(tokens), k, v
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        return q, k, v

    def _heads(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, cls_token: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``x [B, H, W, C]`` -> ``[B, H, W, C]``; with ``class_token``, also ``cls_token [B, 1, C]`` in and out."""
        return self.attend(x, cls_token)

    def attend(
        self,
        x: torch.Tensor,
        cls_token: Optional[torch.Tensor] = None,
        queries: Optional[Any] = None,
        context: Optional[Any] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward`, with the map's queries and/or keys/values merged (2D token merging).

        ``queries`` / ``context``: ``(merge, unmerge, positions)`` of the ``H*W`` map tokens
        (:class:`visionzoo.layers.token_merging.TokenMerge2d`), or None (unmerged). The agents
        attend the merged keys/values and the merged queries attend the agents, each bias read at
        the positions the merged tokens stand at; the queries' output is unmerged before the
        depthwise conv is added. The agents are pooled from every query and the depthwise conv
        reads every value, as without merging.
        """
        if self.class_token != (cls_token is not None):
            raise ValueError(f"cls_token must be given exactly when the module has class_token={self.class_token}")
        batch, height, width, channels = x.shape
        tokens = x.reshape(batch, height * width, channels)
        prefix = 0
        if cls_token is not None:
            tokens = torch.cat([cls_token, tokens], dim=1)
            prefix = 1
        q, k, v = self._project(tokens)
        grid_q = q[:, prefix:].transpose(1, 2).reshape(batch, channels, height, width)
        agents = self.pool(grid_q).flatten(2).transpose(1, 2)  # [B, n, C]
        # merged after the projections (which are linear: the same as projecting merged tokens), as
        # the agent pooling and the depthwise conv need every query and value
        q_attend = _merged(queries, q, prefix)
        k_attend, v_attend = _merged(context, k, prefix), _merged(context, v, prefix)
        q_attend, k_attend, v_attend, v, agents = (self._heads(t) for t in (q_attend, k_attend, v_attend, v, agents))

        agent_bias, query_bias = agent_position_biases(
            self.an_bias,
            self.na_bias,
            self.ah_bias,
            self.aw_bias,
            self.ha_bias,
            self.wa_bias,
            height,
            width,
            self.ac_bias if self.class_token else None,
            self.ca_bias if self.class_token else None,
            self.agent_shape,
        )
        if context is not None:
            agent_bias = _at_positions(agent_bias, context.positions, prefix, dim=3)
        if queries is not None:
            query_bias = _at_positions(query_bias, queries.positions, prefix, dim=2)
        dropout = self.attn_drop if self.training else 0.0
        agent_v = F.scaled_dot_product_attention(
            agents, k_attend, v_attend, attn_mask=agent_bias.to(q.dtype), dropout_p=dropout, scale=self.scale
        )
        out = F.scaled_dot_product_attention(
            q_attend, agents, agent_v, attn_mask=query_bias.to(q.dtype), dropout_p=dropout, scale=self.scale
        )
        out = out.transpose(1, 2).reshape(batch, q_attend.shape[2], channels)
        if queries is not None:
            out = torch.cat([out[:, :prefix], queries.unmerge(out[:, prefix:])], dim=1)

        grid_v = v[:, :, prefix:].transpose(1, 2).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        spatial = out[:, prefix:] + self.dwc(grid_v).flatten(2).transpose(1, 2)
        out = torch.cat([out[:, :prefix], spatial], dim=1) if prefix else spatial
        out = self.proj_drop(self.proj(out))
        out_map = out[:, prefix:].reshape(batch, height, width, channels)
        if cls_token is None:
            return out_map
        return out_map, out[:, :prefix]


def _merged(merge: Optional[Any], tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """``tokens`` ``[B, P + H*W, C]`` with the map tokens merged by ``merge`` (None: unchanged)."""
    if merge is None:
        return tokens
    return torch.cat([tokens[:, :prefix], merge.merge(tokens[:, prefix:])], dim=1)


def _at_positions(bias: torch.Tensor, positions: torch.Tensor, prefix: int, dim: int) -> torch.Tensor:
    """``bias`` ``[1, heads, ., .]`` whose axis ``dim`` (2 or 3) holds ``prefix`` tokens and then the map
    tokens, read at the prefix and at the map ``positions`` ``[B or 1, N']``: ``[B or 1, heads, ., .]``."""
    index = torch.cat([torch.arange(prefix, device=positions.device).expand(positions.shape[0], -1),
                       positions + prefix], dim=1)
    bias = bias[0].movedim(dim - 1, 0)[index]  # [B or 1, N'', heads, other]
    return bias.permute(0, 2, 1, 3) if dim == 2 else bias.permute(0, 2, 3, 1)
