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

:func:`apply_merge2d` is the dense-prediction variant (Segformer++): inside each block's attention,
queries and/or keys/values of the patch grid are merged (one destination per 2D cell, cosine
similarity, mean) or queries pooled, and the attention output is unmerged to every token, so the
MLP and the features keep the full map. :func:`remove_merge2d` undoes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, register_notrace_module
from timm.models.vision_transformer import Block

__all__ = [
    "Merge2dBlock",
    "Merge2dConfig",
    "ToMeBlock",
    "apply_merge2d",
    "apply_tome",
    "bipartite_soft_matching",
    "bipartite_soft_matching_2d",
    "merge2d_preset",
    "merge_source",
    "merge_wavg",
    "parse_r",
    "patch_token_ids",
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


def merge2d_preset(name: str, num_blocks: int) -> List[Merge2dConfig]:
    """Segformer++'s presets on ``num_blocks`` blocks of one isotropic model.

    ``hq``: keys/values merged 60% in 2x2 cells in the first half of the blocks (MiT's stages 1-2,
    at high resolution), queries 80% in 4x4 cells in the second half; ``fast``: queries and
    keys/values 90% in 4x4 cells everywhere; ``2x2``: queries average-pooled in 2x2 cells everywhere.
    """
    if name == "hq":
        first = Merge2dConfig(kv_ratio=0.6, kv_cell=(2, 2))
        second = Merge2dConfig(q_ratio=0.8, q_cell=(4, 4))
        return [first if i < num_blocks // 2 else second for i in range(num_blocks)]
    if name == "fast":
        return [Merge2dConfig(q_ratio=0.9, q_cell=(4, 4), kv_ratio=0.9, kv_cell=(4, 4))] * num_blocks
    if name == "2x2":
        return [Merge2dConfig(q_pool=True, q_cell=(2, 2))] * num_blocks
    raise ValueError(f"merge2d preset must be 'hq', 'fast' or '2x2', got {name!r}")


Unmerge = Callable[[torch.Tensor], torch.Tensor]


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


def bipartite_soft_matching_2d(
    metric: torch.Tensor, grid: Tuple[int, int], cell: Tuple[int, int], ratio: float
) -> Tuple[Callable[[torch.Tensor], torch.Tensor], Unmerge]:
    """(merge, unmerge) of ``metric`` ``[B, H*W, C]`` tokens on ``grid``: mean merge into one token per cell.

    ``r = int(H*W * ratio)`` source tokens (those not at a cell's top-left), capped at their
    number, are averaged into their most cosine-similar destination. ``merge`` maps
    ``[B, H*W, C'] -> [B, H*W - r, C']``; ``unmerge`` maps back, each merged token's value
    copied to all the positions it holds.
    """
    batch, tokens, _ = metric.shape
    dst_pos, src_pos = _cell_split(grid, cell, metric.device)
    r = min(int(tokens * ratio), src_pos.numel())
    if r <= 0:
        return _identity, _identity
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, src_pos] @ metric[:, dst_pos].transpose(-1, -2)
        best_score, best_match = scores.max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True)[..., None]
        kept, merged = order[:, r:], order[:, :r]
        target = best_match[..., None].gather(dim=1, index=merged)

    def merge(x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-1]
        src, dst = x[:, src_pos], x[:, dst_pos]
        unmerged = src.gather(dim=1, index=kept.expand(batch, tokens - dst_pos.numel() - r, channels))
        sources = src.gather(dim=1, index=merged.expand(batch, r, channels))
        dst = dst.scatter_reduce(1, target.expand(batch, r, channels), sources, reduce="mean")
        return torch.cat([unmerged, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-1]
        unmerged, dst = x[:, : kept.shape[1]], x[:, kept.shape[1]:]
        out = x.new_empty(batch, tokens, channels)
        out[:, dst_pos] = dst
        src_positions = src_pos[None, :, None].expand(batch, -1, 1)
        out.scatter_(1, src_positions.gather(1, kept).expand(-1, -1, channels), unmerged)
        merged_values = dst.gather(1, target.expand(-1, -1, channels))
        out.scatter_(1, src_positions.gather(1, merged).expand(-1, -1, channels), merged_values)
        return out

    return merge, unmerge


def _pool_2d(grid: Tuple[int, int], cell: Tuple[int, int]) -> Tuple[Callable[[torch.Tensor], torch.Tensor], Unmerge]:
    """(average pool over ``cell``, nearest upsample back to ``grid``) on ``[B, H*W, C]`` tokens."""
    height, width = grid

    def pool(x: torch.Tensor) -> torch.Tensor:
        image = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
        return F.avg_pool2d(image, cell, ceil_mode=True).flatten(2).transpose(1, 2)

    def upsample(x: torch.Tensor) -> torch.Tensor:
        pooled = (-(-height // cell[0]), -(-width // cell[1]))
        image = x.transpose(1, 2).reshape(x.shape[0], -1, *pooled)
        image = image.repeat_interleave(cell[0], dim=2).repeat_interleave(cell[1], dim=3)[:, :, :height, :width]
        return image.flatten(2).transpose(1, 2)

    return pool, upsample


def _attention(attn: Attention, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` with queries from ``queries`` ``[B, Nq, C]``, keys/values from ``context`` ``[B, Nk, C]``."""
    batch, num_queries, _ = queries.shape
    weight_q, weight_kv = attn.qkv.weight.split([attn.attn_dim, 2 * attn.attn_dim])
    bias = attn.qkv.bias
    bias_q, bias_kv = bias.split([attn.attn_dim, 2 * attn.attn_dim]) if bias is not None else (None, None)
    q = F.linear(queries, weight_q, bias_q).reshape(batch, num_queries, attn.num_heads, attn.head_dim).transpose(1, 2)
    kv = F.linear(context, weight_kv, bias_kv).reshape(batch, -1, 2, attn.num_heads, attn.head_dim)
    k, v = kv.permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(batch, num_queries, attn.attn_dim))
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
        state, config = self._merge2d_state, self._merge2d
        normed = self.norm1(x)
        prefix, patches = normed[:, :state.num_prefix_tokens], normed[:, state.num_prefix_tokens:]
        if patches.shape[1] != state.grid[0] * state.grid[1]:
            raise ValueError(
                f"2D token merging: {patches.shape[1]} patch tokens do not fill the {state.grid} patch grid"
            )
        if config.q_pool:
            merge_q, unmerge_q = _pool_2d(state.grid, config.q_cell)
        else:
            merge_q, unmerge_q = bipartite_soft_matching_2d(patches, state.grid, config.q_cell, config.q_ratio)
        merge_kv, _ = bipartite_soft_matching_2d(patches, state.grid, config.kv_cell, config.kv_ratio)
        if merge_q is _identity and merge_kv is _identity:
            attended = self.attn(normed)
        else:
            queries = torch.cat([prefix, merge_q(patches)], dim=1)
            context = torch.cat([prefix, merge_kv(patches)], dim=1)
            attended = _attention(self.attn, queries, context)
            count = state.num_prefix_tokens
            attended = torch.cat([attended[:, :count], unmerge_q(attended[:, count:])], dim=1)
        x = x + self.drop_path1(self.ls1(attended))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


register_notrace_module(Merge2dBlock)


def apply_merge2d(model: nn.Module, merging: Union[str, Merge2dConfig, List[Merge2dConfig]]) -> nn.Module:
    """Patch ``model``'s timm ``Block`` s in place with Segformer++'s 2D merging; returns ``model``.

    ``merging``: a preset name (:func:`merge2d_preset`: ``hq``, ``fast``, ``2x2``), one
    :class:`Merge2dConfig` for every block, or one per block. The token count of every block's
    output is unchanged (the MLP runs at full resolution), so features stay maps. No parameters
    are added; :func:`remove_merge2d` undoes it. Prefix (class) tokens take part in the attention
    unmerged.
    """
    blocks = _global_attention_blocks(model, "apply_merge2d", Merge2dBlock)
    if isinstance(merging, str):
        configs = merge2d_preset(merging, len(blocks))
    elif isinstance(merging, Merge2dConfig):
        configs = [merging] * len(blocks)
    else:
        configs = list(merging)
        if len(configs) != len(blocks) or not all(isinstance(c, Merge2dConfig) for c in configs):
            raise ValueError(f"apply_merge2d: give one Merge2dConfig per block ({len(blocks)}), got {merging!r}")
    owner = next((module for module in model.modules() if hasattr(module, "patch_embed")), None)
    if owner is None:
        raise TypeError(f"apply_merge2d: {type(model).__name__} has no patch_embed to take the patch grid from")
    remove_merge2d(model)
    state = Merge2dState(
        num_prefix_tokens=getattr(owner, "num_prefix_tokens", 0), grid=tuple(owner.patch_embed.grid_size)
    )
    owner.patch_embed.register_forward_hook(state.record_grid)
    for block, config in zip(blocks, configs):
        block.__class__ = Merge2dBlock
        block._merge2d_state, block._merge2d = state, config
    return model


def remove_merge2d(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_merge2d` in place (a no-op on an unpatched model); returns ``model``."""
    for module in model.modules():
        if isinstance(module, Merge2dBlock):
            module.__class__ = Block
            del module._merge2d_state, module._merge2d
        hooks = module._forward_hooks
        for key in [key for key, hook in hooks.items() if getattr(hook, "__func__", None) is Merge2dState.record_grid]:
            del hooks[key]
    return model
