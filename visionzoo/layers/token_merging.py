"""Token merging (ToMe, Bolya et al. 2023) for ViTs built from timm's global-attention ``Block``.

:func:`apply_tome` patches a model in place: every ``timm.models.vision_transformer.Block`` becomes a
:class:`ToMeBlock`, which merges ``r`` tokens between its attention and its MLP by bipartite soft
matching on the attention keys (averaged over heads). Merged tokens are size-weighted means and
proportional attention adds ``log(size)`` to the attention logits through the attention's own
additive mask, so timm's ``Attention`` runs unchanged (fused SDPA, q/k norms, dropout) and the block
keeps its LayerScale and DropPath: with ``r = 0`` the patched model computes exactly what it did
before. No parameters are added: plain ViT / DeiT checkpoints load unchanged.
:func:`remove_tome` undoes the patch.

Per-forward state (token sizes, source map) is kept in one slot per block, written by the block
before it and read by the block itself, so a block recomputed under gradient checkpointing sees
the same input sizes as in the forward.

:func:`apply_merge2d` is the dense-prediction variant (Segformer++): inside each attention,
queries and/or keys/values of a 2D token grid are merged (one destination per 2D cell, cosine
similarity, mean) or queries pooled, and the attention output is unmerged to every token, so the
MLP and the features keep the full map. It runs on timm's ViT blocks and on the zoo's global
attention: MambaVision's window attention, CoAtNet's global attention (relative position bias
gathered at the merged tokens' positions) and agent attention (Agent-PVT / -Swin / -DeiT); one
routine, :func:`_merged_attention`, serves every softmax attention with a fused qkv projection.
:func:`remove_merge2d` undoes it.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, register_notrace_module
from timm.models.vision_transformer import Block

from .agent_attention import AgentAttention
from .windows import window_partition, window_reverse

__all__ = [
    "Merge2dBlock",
    "Merge2dConfig",
    "ToMeBlock",
    "TokenMerge2d",
    "apply_merge2d",
    "apply_tome",
    "bipartite_soft_matching",
    "bipartite_soft_matching_2d",
    "gathered_rpb",
    "merge2d_preset",
    "merge_source",
    "merge_wavg",
    "parse_r",
    "patch_token_ids",
    "register_merge2d_attention",
    "remove_merge2d",
    "remove_tome",
]

Merge = Callable[..., torch.Tensor]
Schedule = Union[int, Tuple[int, float], List[int]]


def parse_r(num_layers: int, r: Schedule) -> List[int]:
    """The number of tokens each of ``num_layers`` blocks merges.

    ``r`` is a constant int, a per-layer list (padded with zeros when shorter than the model), or
    ``(r, inflection)`` with inflection in [-1, 1]: a linear schedule whose mean is ``r``, rising
    from ``r * (1 - inflection)`` when inflection > 0 (merging more late), falling when < 0.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    if isinstance(r, list):
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in r):
            raise TypeError(f"r: a per-layer list must hold ints, got {r!r}")
        schedule = list(r)
        if len(schedule) > num_layers:
            raise ValueError(f"r: a per-layer list of {len(schedule)} values for a model of {num_layers} blocks")
        if any(value < 0 for value in schedule):
            raise ValueError(f"r: per-layer values must be >= 0, got {schedule}")
        return schedule + [0] * (num_layers - len(schedule))
    inflection = 0.0
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r: a schedule tuple is (r, inflection), got {r!r}")
        r, inflection = r
        if not -1.0 <= float(inflection) <= 1.0:
            raise ValueError(f"r: inflection must lie in [-1, 1], got {inflection}")
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"r must be an int, a list of ints or an (r, inflection) tuple, got {r!r}")
    if r < 0:
        raise ValueError(f"r must be >= 0 (tokens merged per block), got {r}")
    low = int(r * (1.0 - inflection))
    high = 2 * r - low
    step = (high - low) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(low + step * i) for i in range(num_layers)]


def _identity(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    return x


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    class_token: bool = False,
    distill_token: bool = False,
) -> Merge:
    """The merge that joins the ``r`` most similar token pairs of ``metric`` ``[B, N, C]``.

    Tokens alternate between sets A (even positions) and B (odd); each A token picks its most
    cosine-similar B token and the ``r`` A tokens with the highest such similarity are merged into
    their picks. ``r`` is clamped to half the unprotected tokens. The class token (first) is never
    merged, nor is anything merged into the distillation token (second). The returned function
    maps ``[B, N, C']`` to ``[B, N - r, C']`` (``mode`` a ``scatter_reduce`` reduction): protected
    tokens first, then the unmerged A tokens (in spatial order when there is a class token, by
    descending similarity otherwise), then the B tokens.
    """
    protected = int(class_token) + int(distill_token)
    tokens = metric.shape[1]
    r = min(r, (tokens - protected) // 2)
    if r <= 0:
        return _identity

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        if class_token:
            scores[:, 0, :] = -math.inf
        if distill_token:
            scores[:, :, 0] = -math.inf
        best_score, best_match = scores.max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True)[..., None]
        kept = order[:, r:]
        merged = order[:, :r]
        target = best_match[..., None].gather(dim=1, index=merged)
        if class_token:
            kept = kept.sort(dim=1).values

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        a, b = x[:, ::2], x[:, 1::2]
        batch, count_a, channels = a.shape
        unmerged = a.gather(dim=1, index=kept.expand(batch, count_a - r, channels))
        sources = a.gather(dim=1, index=merged.expand(batch, r, channels))
        b = b.scatter_reduce(1, target.expand(batch, r, channels), sources, reduce=mode)
        if distill_token:
            return torch.cat([unmerged[:, :1], b[:, :1], unmerged[:, 1:], b[:, 1:]], dim=1)
        return torch.cat([unmerged, b], dim=1)

    return merge


def merge_wavg(merge: Merge, x: torch.Tensor, size: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of ``x`` ``[B, N, C]``; ``size`` ``[B, N, 1]`` (None: all ones). Returns (x, size)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: Merge, x: torch.Tensor, source: Optional[torch.Tensor]) -> torch.Tensor:
    """The source map ``[B, N_merged, N_input]`` after ``merge``: which input tokens each token holds."""
    if source is None:
        batch, tokens, _ = x.shape
        source = torch.eye(tokens, device=x.device, dtype=x.dtype)[None].expand(batch, tokens, tokens)
    return merge(source, mode="amax")


@dataclass(eq=False)
class ToMeState:
    """What the patched blocks of one model share.

    ``size[i]`` / ``source[i]`` hold the token sizes ``[B, N, 1]`` / source map entering block
    ``i`` (None before any merge); the last entry is what leaves the last block run.
    """

    r: List[int]
    class_token: bool
    distill_token: bool
    prop_attn: bool
    trace_source: bool
    num_prefix_tokens: int
    size: List[Optional[torch.Tensor]] = field(default_factory=list)
    source: List[Optional[torch.Tensor]] = field(default_factory=list)
    last: int = 0


class ToMeBlock(Block):
    """timm's ``Block`` merging ``_tome_r`` tokens between attention and MLP (see :func:`apply_tome`).

    ``forward(x [B, N, C]) -> [B, N - r, C]``. The keys of the attention are taken from its
    ``k_norm`` output by a forward hook, so the attention module itself is timm's, untouched.
    """

    _tome_state: ToMeState
    _tome_index: int
    _tome_r: int
    _tome_keys: Optional[torch.Tensor]

    def _tome_keep_keys(self, module: nn.Module, args, keys: torch.Tensor) -> None:
        self._tome_keys = keys

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(
                "token merging changes the token count inside the block: attn_mask and is_causal are not supported"
            )
        state, index = self._tome_state, self._tome_index
        size, source = state.size[index], state.source[index]
        if state.prop_attn and size is not None:
            # proportional attention: a merged token of size s counts as s keys in every softmax
            bias = size.log()[:, None, None, :, 0]
            attended = self.attn(self.norm1(x), attn_mask=bias)
        else:
            attended = self.attn(self.norm1(x))
        keys, self._tome_keys = self._tome_keys, None
        x = x + self.drop_path1(self.ls1(attended))
        if self._tome_r > 0:
            merge = bipartite_soft_matching(keys.mean(dim=1), self._tome_r, state.class_token, state.distill_token)
            if merge is not _identity:
                if state.trace_source:
                    source = merge_source(merge, x, source)
                x, size = merge_wavg(merge, x, size)
        state.size[index + 1], state.source[index + 1] = size, source
        state.last = index + 1
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


# FX (timm's feature extraction, torchvision's create_feature_extractor) calls the block as a leaf:
# the merge's token counts depend on the data and the keys arrive through a module hook
register_notrace_module(ToMeBlock)


class _ToMeModel:
    """Mixed into the class of a patched ViT: intermediates of merged tokens are not maps."""

    _tome_state: ToMeState

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        output_fmt = args[4] if len(args) > 4 else kwargs.get("output_fmt", "NCHW")
        if output_fmt == "NCHW" and any(self._tome_state.r):
            raise ValueError(
                "forward_intermediates: with token merging the tokens no longer form an H x W grid; "
                "use output_fmt='NLC' ([B, N, C] with N the tokens left after each block)"
            )
        return super().forward_intermediates(x, *args, **kwargs)


_TOME_MODEL_CLASSES: dict = {}


def _tome_model_class(cls: type) -> type:
    if issubclass(cls, _ToMeModel):
        return cls
    if cls not in _TOME_MODEL_CLASSES:
        _TOME_MODEL_CLASSES[cls] = type(f"ToMe{cls.__name__}", (_ToMeModel, cls), {"__module__": __name__})
    return _TOME_MODEL_CLASSES[cls]


def _global_attention_blocks(model: nn.Module, caller: str, own: type) -> List[Block]:
    """The timm ``Block`` s of ``model`` (plain, or already patched by ``caller`` as ``own``)."""
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    if not blocks:
        others = getattr(model, "blocks", None)
        has_blocks = isinstance(others, nn.Sequential) and len(others) > 0
        found = f"; its blocks are {type(others[0]).__name__}" if has_blocks else ""
        raise TypeError(
            f"{caller}: {type(model).__name__} has no global-attention transformer block "
            f"(timm.models.vision_transformer.Block){found}; token merging needs one"
        )
    for name, module in model.named_modules():
        if isinstance(module, Block):
            if type(module) not in (Block, own):
                patched = {ToMeBlock: "remove_tome", Merge2dBlock: "remove_merge2d"}.get(type(module))
                hint = f" (undo the other merging first: {patched}(model))" if patched else "; only timm's Block works"
                raise TypeError(f"{caller}: block {name!r} is a {type(module).__name__}{hint}")
            if type(module.attn) is not Attention:
                raise TypeError(
                    f"{caller}: {name}.attn is a {type(module.attn).__name__}; only timm's global Attention works"
                )
    return blocks


def apply_tome(model: nn.Module, r: Schedule, *, trace_source: bool = False, prop_attn: bool = True) -> nn.Module:
    """Patch ``model`` in place to merge tokens in each of its timm ``Block`` s; returns ``model``.

    Args:
        model: a timm ``VisionTransformer`` (DeiT, distilled DeiT, DeiT-III, ...) or any model made
            of timm ``Block`` s with timm ``Attention``. Its class token (``model.cls_token``) and
            distillation token (``model.dist_token``) are never merged.
        r: tokens merged per block: an int, a per-block list, or ``(r, inflection)`` (:func:`parse_r`).
            Larger values than a block's tokens allow are clamped.
        trace_source: keep the source map (which patches each token holds), for
            :func:`patch_token_ids` and visualisation.
        prop_attn: proportional attention (``log(size)`` added to the attention logits).

    Applying again replaces the previous settings; :func:`remove_tome` restores the model. The
    shared state (schedule, token sizes, source map) is ``model._tome_state`` (on the ViT inside a
    ``features_only`` wrapper).
    """
    blocks = _global_attention_blocks(model, "apply_tome", ToMeBlock)
    schedule = parse_r(len(blocks), r)
    # the module embedding the tokens: the model itself, or the ViT inside a features_only wrapper
    owner = next((module for module in model.modules() if hasattr(module, "cls_token")), model)
    if getattr(owner, "reg_token", None) is not None:
        raise TypeError(
            "apply_tome: models with register tokens are not supported (only class / distillation tokens are protected)"
        )
    class_token = getattr(owner, "cls_token", None) is not None
    distill_token = getattr(owner, "dist_token", None) is not None
    if distill_token and not class_token:
        raise TypeError("apply_tome: a distillation token needs a class token before it")
    remove_tome(model)
    state = ToMeState(
        r=schedule,
        class_token=class_token,
        distill_token=distill_token,
        prop_attn=prop_attn,
        trace_source=trace_source,
        num_prefix_tokens=int(class_token) + int(distill_token),
        size=[None] * (len(blocks) + 1),
        source=[None] * (len(blocks) + 1),
    )
    for index, (block, block_r) in enumerate(zip(blocks, schedule)):
        block.__class__ = ToMeBlock
        block._tome_state, block._tome_index, block._tome_r, block._tome_keys = state, index, block_r, None
        block.attn.k_norm.register_forward_hook(block._tome_keep_keys)
    owner._tome_state = state
    if hasattr(owner, "forward_intermediates"):
        owner.__class__ = _tome_model_class(type(owner))
    return model


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tome` in place (a no-op on an unpatched model); returns ``model``."""
    for module in model.modules():
        if isinstance(module, ToMeBlock):
            hooks = module.attn.k_norm._forward_hooks
            for key, hook in list(hooks.items()):
                if getattr(hook, "__func__", None) is ToMeBlock._tome_keep_keys:
                    del hooks[key]
            for attribute in ("_tome_state", "_tome_index", "_tome_r", "_tome_keys"):
                delattr(module, attribute)
            module.__class__ = Block
    for module in model.modules():
        if hasattr(module, "_tome_state"):
            del module._tome_state
        if isinstance(module, _ToMeModel):
            module.__class__ = type(module).__bases__[1]
    return model


def patch_token_ids(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """For each patch of ``image`` ``[B, 3, H, W]``, the id of the merged token holding it at the end.

    Runs ``model.forward_features`` (the model must have been patched with ``trace_source=True``)
    and returns ``[B, H / patch, W / patch]`` integer ids into the final tokens (prefix tokens
    included in the numbering).
    """
    state = getattr(model, "_tome_state", None)
    if state is None or not state.trace_source:
        raise ValueError("patch_token_ids: patch the model with apply_tome(model, r, trace_source=True) first")
    if image.ndim != 4:
        raise ValueError(f"patch_token_ids: image must be [B, C, H, W], got shape {tuple(image.shape)}")
    with torch.no_grad():
        model.forward_features(image)
    source = state.source[state.last]
    grid = model.patch_embed.dynamic_feat_size(image.shape[-2:])
    if source is None:  # nothing merged: every patch is its own token
        ids = torch.arange(state.num_prefix_tokens, state.num_prefix_tokens + grid[0] * grid[1], device=image.device)
        return ids.reshape(1, *grid).expand(image.shape[0], *grid).clone()
    ids = source[:, :, state.num_prefix_tokens:].argmax(dim=1)
    return ids.reshape(image.shape[0], *grid)


# ---------------------------------------------------------------------------------------------
# 2D merging for dense prediction (Segformer++): queries and/or keys/values merged inside the
# attention of a block, one destination token per 2D cell, the output unmerged to the full map.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Merge2dConfig:
    """What one block merges; ratios are the fraction of the patch tokens removed (0: none).

    ``q_ratio`` / ``q_cell``: queries merged (cells ``(sy, sx)``), the attention output unmerged
    back to every token. ``kv_ratio`` / ``kv_cell``: keys and values merged. ``q_pool``: queries
    average-pooled over ``q_cell`` instead (every cell one query), the output upsampled by nearest.
    """

    q_ratio: float = 0.0
    q_cell: Tuple[int, int] = (4, 4)
    kv_ratio: float = 0.0
    kv_cell: Tuple[int, int] = (2, 2)
    q_pool: bool = False

    def __post_init__(self):
        for name in ("q_ratio", "kv_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"Merge2dConfig.{name} must lie in [0, 1), got {getattr(self, name)}")
        for name in ("q_cell", "kv_cell"):
            cell = getattr(self, name)
            if len(cell) != 2 or min(cell) < 1:
                raise ValueError(f"Merge2dConfig.{name} must be two cell sizes >= 1, got {cell}")


def merge2d_preset(name: str, num_blocks: int, early: Optional[Sequence[bool]] = None) -> List[Merge2dConfig]:
    """Segformer++'s presets on ``num_blocks`` blocks.

    ``early[i]``: block ``i`` runs at high resolution, as MiT's stages 1-2 (strides 4-8); default:
    the first ``num_blocks // 2`` blocks, the split of an isotropic ViT. :func:`apply_merge2d` gives
    the stage-based split of hierarchical models.

    ``hq``: keys/values merged 60% in 2x2 cells in the early blocks, queries 80% in 4x4 cells in the
    others; ``fast``: queries and keys/values 90% in 4x4 cells everywhere; ``2x2``: queries
    average-pooled in 2x2 cells everywhere.
    """
    if early is None:
        early = [i < num_blocks // 2 for i in range(num_blocks)]
    elif len(early) != num_blocks:
        raise ValueError(f"merge2d_preset: early must hold one flag per block ({num_blocks}), got {len(early)}")
    if name == "hq":
        first = Merge2dConfig(kv_ratio=0.6, kv_cell=(2, 2))
        second = Merge2dConfig(q_ratio=0.8, q_cell=(4, 4))
        return [first if is_early else second for is_early in early]
    if name == "fast":
        return [Merge2dConfig(q_ratio=0.9, q_cell=(4, 4), kv_ratio=0.9, kv_cell=(4, 4))] * num_blocks
    if name == "2x2":
        return [Merge2dConfig(q_pool=True, q_cell=(2, 2))] * num_blocks
    raise ValueError(f"merge2d preset must be 'hq', 'fast' or '2x2', got {name!r}")


Unmerge = Callable[[torch.Tensor], torch.Tensor]


class TokenMerge2d(NamedTuple):
    """One side's merge (queries' or keys/values') on a grid of ``N = H*W`` tokens.

    ``merge`` maps ``[B, N, C] -> [B, N', C]``, ``unmerge`` maps back (each merged token copied to
    every position it holds); ``positions`` ``[B or 1, N']`` is the raster position each merged
    token stands at: a merged group's at its destination, the cell's top-left.
    """

    merge: Callable[[torch.Tensor], torch.Tensor]
    unmerge: Unmerge
    positions: torch.Tensor


def _unmerged(tokens: int, device: torch.device) -> TokenMerge2d:
    return TokenMerge2d(_identity, _identity, torch.arange(tokens, device=device)[None])


def _cell_split(
    grid: Tuple[int, int], cell: Tuple[int, int], device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions (raster order in ``grid``) of the destinations (top-left of each whole cell) and of the rest."""
    height, width = grid
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    cell_h, cell_w = cell
    in_whole_cell = (rows < height // cell_h * cell_h) & (cols < width // cell_w * cell_w)
    is_dst = (rows % cell_h == 0) & (cols % cell_w == 0) & in_whole_cell
    positions = torch.arange(height * width, device=device)
    return positions[is_dst.flatten()], positions[~is_dst.flatten()]


def _match_2d(metric: torch.Tensor, grid: Tuple[int, int], cell: Tuple[int, int], ratio: float) -> TokenMerge2d:
    """The merge of :func:`bipartite_soft_matching_2d`, with the merged tokens' positions."""
    batch, tokens, _ = metric.shape
    dst_pos, src_pos = _cell_split(grid, cell, metric.device)
    r = min(int(tokens * ratio), src_pos.numel())
    if r <= 0 or dst_pos.numel() == 0:  # nothing to merge, or a grid smaller than one cell
        return _unmerged(tokens, metric.device)
    with torch.no_grad():
        # normalize's eps: the zero tokens of a padded window have no direction
        metric = F.normalize(metric, dim=-1)
        scores = metric[:, src_pos] @ metric[:, dst_pos].transpose(-1, -2)
        best_score, best_match = scores.max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True)
        kept_pos, merged_pos = src_pos[order[:, r:]], src_pos[order[:, :r]]  # [B, N - D - r], [B, r]
        target = best_match.gather(dim=1, index=order[:, :r])  # [B, r]: into the destinations
        count_kept = kept_pos.shape[1]
        # for every grid position, the merged token holding it: unmerge is one gather
        holder = torch.empty(batch, tokens, dtype=torch.long, device=metric.device)
        holder.scatter_(1, kept_pos, torch.arange(count_kept, device=metric.device).expand(batch, -1))
        holder[:, dst_pos] = count_kept + torch.arange(dst_pos.numel(), device=metric.device)
        holder.scatter_(1, merged_pos, count_kept + target)
        group_size = torch.ones(batch, dst_pos.numel(), 1, device=metric.device, dtype=metric.dtype)
        group_size.scatter_add_(1, target[..., None], torch.ones_like(target[..., None], dtype=metric.dtype))

    def merge(x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-1]
        unmerged = x.gather(dim=1, index=kept_pos[..., None].expand(-1, -1, channels))
        sources = x.gather(dim=1, index=merged_pos[..., None].expand(-1, -1, channels))
        dst = x[:, dst_pos].scatter_add(1, target[..., None].expand(-1, -1, channels), sources)
        return torch.cat([unmerged, dst / group_size.to(dst.dtype)], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        return x.gather(dim=1, index=holder[..., None].expand(-1, -1, x.shape[-1]))

    positions = torch.cat([kept_pos, dst_pos[None].expand(batch, -1)], dim=1)
    return TokenMerge2d(merge, unmerge, positions)


def bipartite_soft_matching_2d(
    metric: torch.Tensor, grid: Tuple[int, int], cell: Tuple[int, int], ratio: float
) -> Tuple[Callable[[torch.Tensor], torch.Tensor], Unmerge]:
    """(merge, unmerge) of ``metric`` ``[B, H*W, C]`` tokens on ``grid``: mean merge into one token per cell.

    ``r = int(H*W * ratio)`` source tokens (those not at a cell's top-left), capped at their
    number, are averaged into their most cosine-similar destination. ``merge`` maps
    ``[B, H*W, C'] -> [B, H*W - r, C']`` (the unmerged sources, then the destinations);
    ``unmerge`` maps back, each merged token's value copied to all the positions it holds.
    """
    merge, unmerge, _ = _match_2d(metric, grid, cell, ratio)
    return merge, unmerge


def _pool_2d(grid: Tuple[int, int], cell: Tuple[int, int], device: Optional[torch.device] = None) -> TokenMerge2d:
    """Average pool over ``cell`` / nearest upsample back to ``grid`` on ``[B, H*W, C]`` tokens; a
    pooled token stands at its cell's top-left."""
    height, width = grid
    pooled = (-(-height // cell[0]), -(-width // cell[1]))

    def pool(x: torch.Tensor) -> torch.Tensor:
        image = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
        return F.avg_pool2d(image, cell, ceil_mode=True).flatten(2).transpose(1, 2)

    def upsample(x: torch.Tensor) -> torch.Tensor:
        image = x.transpose(1, 2).reshape(x.shape[0], -1, *pooled)
        image = image.repeat_interleave(cell[0], dim=2).repeat_interleave(cell[1], dim=3)[:, :, :height, :width]
        return image.flatten(2).transpose(1, 2)

    rows = torch.arange(0, height, cell[0], device=device)[:, None]
    cols = torch.arange(0, width, cell[1], device=device)[None, :]
    return TokenMerge2d(pool, upsample, (rows * width + cols).flatten()[None])


def _plan(patches: torch.Tensor, grid: Tuple[int, int], config: Merge2dConfig) -> Tuple[TokenMerge2d, TokenMerge2d]:
    """The queries' and the keys/values' merges of ``patches`` ``[B, H*W, C]`` (also the metric)."""
    context = _match_2d(patches, grid, config.kv_cell, config.kv_ratio)
    if config.q_pool:
        return _pool_2d(grid, config.q_cell, patches.device), context
    if (config.q_cell, config.q_ratio) == (config.kv_cell, config.kv_ratio):  # the same matching (fast)
        return context, context
    return _match_2d(patches, grid, config.q_cell, config.q_ratio), context


def gathered_rpb(
    rpb: torch.Tensor, grid: Tuple[int, int], q_positions: torch.Tensor, kv_positions: torch.Tensor
) -> torch.Tensor:
    """The relative position bias between merged queries and keys: ``[B or 1, heads, Nq, Nk]``.

    ``rpb`` ``[heads, 2H-1, 2W-1]`` is indexed by key minus query (the convention of
    :func:`visionzoo.kernels.na2d`); ``q_positions`` ``[B or 1, Nq]`` / ``kv_positions``
    ``[B or 1, Nk]`` are raster positions on the ``grid`` ``(H, W)`` (:class:`TokenMerge2d`).
    """
    height, width = grid
    if tuple(rpb.shape[-2:]) != (2 * height - 1, 2 * width - 1):
        raise ValueError(
            f"2D token merging: the relative position bias covers offsets {tuple(rpb.shape[-2:])}, "
            f"not those of the {height}x{width} grid ({2 * height - 1}, {2 * width - 1})"
        )
    q_positions, kv_positions = q_positions[:, :, None], kv_positions[:, None, :]
    rows = kv_positions // width - q_positions // width + height - 1
    cols = kv_positions % width - q_positions % width + width - 1
    return rpb.flatten(1)[:, rows * (2 * width - 1) + cols].transpose(0, 1)


def _merged_attention(
    tokens: torch.Tensor,
    grid: Tuple[int, int],
    queries_merge: TokenMerge2d,
    context_merge: TokenMerge2d,
    qkv: nn.Linear,
    num_heads: int,
    finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    head_first: bool = False,
    prefix: int = 0,
    rpb: Optional[torch.Tensor] = None,
    q_norm: Callable[[torch.Tensor], torch.Tensor] = _identity,
    k_norm: Callable[[torch.Tensor], torch.Tensor] = _identity,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Self-attention of ``tokens`` ``[B, P + H*W, C]`` (``P = prefix`` tokens, then the ``grid``
    row-major) with merged queries and keys/values; ``[B, P + H*W, C']``.

    The fused ``qkv`` projection (output channels ``[(q, k, v), heads, d]``, or
    ``[heads, (q, k, v), d]`` with ``head_first``) is split so that only the merged tokens are
    projected; prefix tokens take part unmerged. ``rpb`` ``[heads, 2H-1, 2W-1]`` (key minus query,
    no prefix tokens): the bias between the positions the merged tokens stand at
    (:func:`gathered_rpb`), an additive mask of the fused attention (no materialised softmax).
    ``finish(out [B, Nq, heads * d], queries [B, Nq, C])`` maps the merged queries' output (the
    module's output projection; per token, so it commutes with the unmerge) before it is unmerged
    to every token.
    """
    batch = tokens.shape[0]
    if rpb is not None and prefix:
        raise ValueError("2D token merging: a relative position bias with prefix tokens is not supported")
    head, patches = tokens[:, :prefix], tokens[:, prefix:]
    queries = torch.cat([head, queries_merge.merge(patches)], dim=1)
    context = torch.cat([head, context_merge.merge(patches)], dim=1)
    channels = qkv.in_features
    head_dim = qkv.out_features // (3 * num_heads)
    weight = qkv.weight.view(num_heads, 3, head_dim, channels).transpose(0, 1) if head_first else \
        qkv.weight.view(3, num_heads, head_dim, channels)
    bias_q = bias_kv = None
    if qkv.bias is not None:
        bias = qkv.bias.view(num_heads, 3, head_dim).transpose(0, 1) if head_first else \
            qkv.bias.view(3, num_heads, head_dim)
        bias_q, bias_kv = bias[0].reshape(-1), bias[1:].reshape(-1)
    q = F.linear(queries, weight[0].reshape(-1, channels), bias_q)
    q = q.view(batch, queries.shape[1], num_heads, head_dim).transpose(1, 2)
    kv = F.linear(context, weight[1:].reshape(-1, channels), bias_kv)
    k, v = kv.view(batch, context.shape[1], 2, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = q_norm(q), k_norm(k)
    mask = None
    if rpb is not None:
        mask = gathered_rpb(rpb, grid, queries_merge.positions, context_merge.positions).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    out = finish(out.transpose(1, 2).reshape(batch, queries.shape[1], num_heads * head_dim), queries)
    return torch.cat([out[:, :prefix], queries_merge.unmerge(out[:, prefix:])], dim=1)


def _is_unmerged(queries: TokenMerge2d, context: TokenMerge2d) -> bool:
    return queries.merge is _identity and context.merge is _identity


def _timm_attention_output(attn: Attention, out: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """What timm's ``Attention`` does after its softmax: norm, gate, projection."""
    out = attn.norm(out)
    if attn.gate is not None:
        out = out * attn.gate(queries).sigmoid()
    return attn.proj_drop(attn.proj(out))


@dataclass(eq=False)
class Merge2dState:
    """The patch grid of the current forward, recorded from the patch embedding's output."""

    num_prefix_tokens: int
    grid: Tuple[int, int]

    def record_grid(self, module: nn.Module, args, out: torch.Tensor) -> None:
        if out.ndim == 4:  # dynamic_img_size: [B, H, W, C]
            self.grid = (out.shape[1], out.shape[2])


class Merge2dBlock(Block):
    """timm's ``Block`` with 2D merging inside its attention (:class:`Merge2dConfig`); ``[B, N, C] -> [B, N, C]``."""

    _merge2d_state: Merge2dState
    _merge2d: Merge2dConfig

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("2D token merging: attn_mask and is_causal are not supported")
        state, attn = self._merge2d_state, self.attn
        normed = self.norm1(x)
        patches = normed[:, state.num_prefix_tokens:]
        if patches.shape[1] != state.grid[0] * state.grid[1]:
            raise ValueError(
                f"2D token merging: {patches.shape[1]} patch tokens do not fill the {state.grid} patch grid"
            )
        queries, context = _plan(patches, state.grid, self._merge2d)
        if _is_unmerged(queries, context):
            attended = attn(normed)
        else:
            attended = _merged_attention(
                normed, state.grid, queries, context, attn.qkv, attn.num_heads,
                functools.partial(_timm_attention_output, attn),
                prefix=state.num_prefix_tokens, q_norm=attn.q_norm, k_norm=attn.k_norm,
                dropout_p=attn.attn_drop.p if attn.training else 0.0,
            )
        x = x + self.drop_path1(self.ls1(attended))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


register_notrace_module(Merge2dBlock)


# The zoo's attention modules that 2D merging runs, registered by their model files with
# :func:`register_merge2d_attention` (layers never import models).
_MERGE2D_ATTENTIONS: Dict[type, Callable[[nn.Module], Optional[str]]] = {}


def register_merge2d_attention(
    cls: Optional[type] = None, *, unsupported: Optional[Callable[[nn.Module], Optional[str]]] = None
):
    """Class decorator: :func:`apply_merge2d` merges the tokens of this attention module.

    The module is softmax attention over one 2D grid: ``[B', h * w, C]`` tokens of one ``window_size``
    window (row-major), or a ``[B, H, W, C]`` map padded and cut into ``window_size`` windows; a fused
    ``qkv`` linear (``[(q, k, v), heads, d]`` channels, or ``[heads, (q, k, v), d]`` with ``head_first``),
    ``num_heads``, ``proj`` / ``proj_drop`` and optionally ``rel_pos.rpb()`` (``[heads, 2h-1, 2w-1]``,
    key minus query). ``unsupported(module)`` says why an instance is left alone (None: it is merged).
    """
    def register(cls: type) -> type:
        _MERGE2D_ATTENTIONS[cls] = unsupported or (lambda module: None)
        return cls

    return register(cls) if cls is not None else register


def _zoo_attention(module: nn.Module) -> Optional[type]:
    """The registered class ``module`` is (or derives from), else None."""
    return next((cls for cls in type(module).__mro__ if cls in _MERGE2D_ATTENTIONS), None)


class _Merge2dPatched:
    """What :func:`apply_merge2d` mixes into the class of a module it patches (undone by :func:`remove_merge2d`)."""

    _merge2d: Merge2dConfig


class _Merge2dAttention(_Merge2dPatched):
    """For a zoo attention module of :func:`register_merge2d_attention`: ``forward`` merges the tokens of each
    window's grid (:func:`_merged_attention`); shapes as the module's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            # [B, H, W, C], CoAtNet: a map of one window, or (the dense layout) padded and cut into windows
            window = tuple(self.window_size)
            height, width = x.shape[1:3]
            tokens = window_partition(x, window)
            restore = functools.partial(window_reverse, window=window, height=height, width=width)
        else:  # [B', window**2, C], MambaVision: the tokens of one window each
            window = (self.window_size, self.window_size)
            if x.shape[1] != self.window_size**2:
                raise ValueError(f"2D token merging: {x.shape[1]} tokens do not fill a {window} window")
            tokens, restore = x, None
        queries, context = _plan(tokens, window, self._merge2d)
        if _is_unmerged(queries, context):
            return super().forward(x)
        rel_pos = getattr(self, "rel_pos", None)
        out = _merged_attention(
            tokens, window, queries, context, self.qkv, self.num_heads,
            lambda out, merged: self.proj_drop(self.proj(out)),
            head_first=getattr(self, "head_first", False),
            rpb=None if rel_pos is None else rel_pos.rpb(),
        )
        return out if restore is None else restore(out)


class _Merge2dAgentAttention(_Merge2dPatched):
    """For :class:`AgentAttention`: its map's queries and/or keys/values merged in the two softmax
    steps (:meth:`AgentAttention.attend`), the agents pooled from every query as without merging."""

    def forward(self, x: torch.Tensor, cls_token: Optional[torch.Tensor] = None):
        grid = (x.shape[1], x.shape[2])
        queries, context = _plan(x.reshape(x.shape[0], grid[0] * grid[1], x.shape[-1]), grid, self._merge2d)
        if _is_unmerged(queries, context):
            return super().forward(x, cls_token)
        return self.attend(
            x,
            cls_token,
            queries=None if queries.merge is _identity else queries,
            context=None if context.merge is _identity else context,
        )


_MERGE2D_CLASSES: dict = {}


def _merge2d_class(cls: type) -> type:
    if issubclass(cls, _Merge2dPatched):
        return cls
    if cls not in _MERGE2D_CLASSES:
        mixin = _Merge2dAgentAttention if issubclass(cls, AgentAttention) else _Merge2dAttention
        patched = type(f"Merge2d{cls.__name__}", (mixin, cls), {"__module__": __name__})
        # the merge's token counts depend on the data: a leaf for torch.fx, like the modules patched
        _MERGE2D_CLASSES[cls] = register_notrace_module(patched)
    return _MERGE2D_CLASSES[cls]


def _unsupported_attention(module: nn.Module) -> Optional[str]:
    """Why 2D merging leaves a registered ``module`` alone (None for one it merges or one not registered)."""
    cls = _zoo_attention(module)
    return None if cls is None else _MERGE2D_ATTENTIONS[cls](module)


def _merge2d_targets(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of what :func:`apply_merge2d` patches: timm ``Block`` s and the zoo's attentions."""
    targets = []
    if any(isinstance(module, Block) for module in model.modules()):
        _global_attention_blocks(model, "apply_merge2d", Merge2dBlock)  # refuses foreign blocks / attentions
    for name, module in model.named_modules():
        zoo = _zoo_attention(module)
        if isinstance(module, (Block, AgentAttention)) or (zoo and _unsupported_attention(module) is None):
            targets.append((name, module))
    if not targets:
        reasons = dict.fromkeys(filter(None, map(_unsupported_attention, model.modules())))
        raise TypeError(
            f"apply_merge2d: {type(model).__name__} has no attention that 2D merging runs (timm's ViT Block, "
            "MambaVision's window attention, CoAtNet's global attention, agent attention)"
            + "".join(f"; {reason}" for reason in reasons)
        )
    return targets


_STAGE = re.compile(r"(?:^|\.)stages[._](\d+)(?:\.|$)")


def _early_blocks(model: nn.Module, names: Sequence[str]) -> Optional[List[bool]]:
    """Segformer++'s HQ split for a hierarchical model (timm's ``stages.{i}``): a block is early in
    the first half of the model's stages (MiT's stages 1-2 of 4); None for a model without stages."""
    stages = [_STAGE.search(name) for name in names]
    if not all(stages):
        return None
    num_stages = sum(1 for name, _ in model.named_modules() if re.fullmatch(r"(?:.*\.)?stages[._]\d+", name))
    return [int(stage[1]) < num_stages // 2 for stage in stages]


def apply_merge2d(model: nn.Module, merging: Union[str, Merge2dConfig, List[Merge2dConfig]]) -> nn.Module:
    """Patch ``model`` in place with Segformer++'s 2D merging; returns ``model``.

    What merges (other attention modules of the model are left as they are):

    * timm's ViT ``Block`` s: the patch grid; prefix tokens take part unmerged;
    * MambaVision's window attention: inside each window's ``window x window`` grid (the dense
      backbone's larger, zero-padded windows too);
    * CoAtNet's global attention: its map (in the dense layout, each window of the trained map
      size), with the relative position bias gathered at the positions the merged tokens stand at
      (a merged group at its destination, the cell's top-left) as an additive mask of the fused
      attention;
    * agent attention (Agent-PVT / -Swin / -DeiT, :meth:`AgentAttention.attend`): the agents, still
      pooled from every query, attend the merged keys/values and the merged queries attend the
      agents, each bias read at the merged positions; the depthwise conv reads every value. The
      saving is in the two softmax steps only (q, k and v are projected for every token, as the
      pooling and the conv need them): worth it where the agents are many (the dense backbones'
      12x12 to 28x28 grids), little with the 49 agents of classification.

    Not merged: MaxViT's block / grid attention (7x7 windows: the attention costs little next to
    the projections and MLP, and a grid window's tokens lie a whole window apart, so a 2D cell of
    them is no neighbourhood); a model with nothing else is refused with that reason.

    The merge metric is the attention's input (the block's normed tokens); queries and/or
    keys/values are merged (before the projections where one fused qkv serves a softmax attention,
    :func:`_merged_attention`) and the attention output is unmerged to every token, so the MLP runs
    at full resolution and features stay maps.

    ``merging``: a preset name (:func:`merge2d_preset`: ``hq``, ``fast``, ``2x2``), one
    :class:`Merge2dConfig` for every merging module, or one per module (in ``model.modules()``
    order). The ``hq`` split by resolution: in a hierarchical model (modules in timm's
    ``stages.{i}``) those in the first half of the stages (MiT's stages 1-2, strides 4-8) merge
    keys/values, the others queries (MambaVision's and CoAtNet's attention is in stages 3-4 of 4:
    queries; Agent-PVT: stages 1-2 keys/values, 3-4 queries); in an isotropic model (ViT,
    Agent-DeiT) the first half of the blocks. No parameters are added; a ratio of 0 runs the
    module's own forward, and :func:`remove_merge2d` undoes the patch.
    """
    targets = _merge2d_targets(model)
    if isinstance(merging, str):
        configs = merge2d_preset(merging, len(targets), _early_blocks(model, [name for name, _ in targets]))
    elif isinstance(merging, Merge2dConfig):
        configs = [merging] * len(targets)
    else:
        configs = list(merging)
        if len(configs) != len(targets) or not all(isinstance(c, Merge2dConfig) for c in configs):
            raise ValueError(
                f"apply_merge2d: give one Merge2dConfig per block ({len(targets)} merge), got {merging!r}"
            )
    state = None
    if any(isinstance(module, Block) for _, module in targets):
        owner = next((module for module in model.modules() if hasattr(module, "patch_embed")), None)
        if owner is None:
            raise TypeError(f"apply_merge2d: {type(model).__name__} has no patch_embed to take the patch grid from")
        state = Merge2dState(
            num_prefix_tokens=getattr(owner, "num_prefix_tokens", 0), grid=tuple(owner.patch_embed.grid_size)
        )
    remove_merge2d(model)
    if state is not None:
        owner.patch_embed.register_forward_hook(state.record_grid)
    for (_, module), config in zip(targets, configs):
        if isinstance(module, Block):
            module.__class__ = Merge2dBlock
            module._merge2d_state = state
        else:
            module.__class__ = _merge2d_class(type(module))
        module._merge2d = config
    return model


def remove_merge2d(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_merge2d` in place (a no-op on an unpatched model); returns ``model``."""
    for module in model.modules():
        if isinstance(module, Merge2dBlock):
            module.__class__ = Block
            del module._merge2d_state, module._merge2d
        elif isinstance(module, _Merge2dPatched):
            module.__class__ = type(module).__bases__[1]
            del module._merge2d
        hooks = module._forward_hooks
        for key in [key for key, hook in hooks.items() if getattr(hook, "__func__", None) is Merge2dState.record_grid]:
            del hooks[key]
    return model
