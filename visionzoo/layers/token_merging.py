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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import Attention, register_notrace_module
from timm.models.vision_transformer import Block

__all__ = [
    "ToMeBlock",
    "apply_tome",
    "bipartite_soft_matching",
    "merge_source",
    "merge_wavg",
    "parse_r",
    "patch_token_ids",
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
            raise ValueError("token merging changes the token count inside the block: attn_mask and is_causal are not supported")
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


def _tome_blocks(model: nn.Module) -> List[Block]:
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    if not blocks:
        others = getattr(model, "blocks", None)
        found = f"; its blocks are {type(others[0]).__name__}" if isinstance(others, nn.Sequential) and len(others) else ""
        raise TypeError(
            f"apply_tome: {type(model).__name__} has no global-attention transformer block "
            f"(timm.models.vision_transformer.Block){found}; token merging needs one"
        )
    for name, module in model.named_modules():
        if isinstance(module, Block):
            if type(module) not in (Block, ToMeBlock):
                raise TypeError(f"apply_tome: block {name!r} is a {type(module).__name__}; only timm's Block is supported")
            if type(module.attn) is not Attention:
                raise TypeError(
                    f"apply_tome: {name}.attn is a {type(module.attn).__name__}; only timm's global Attention is supported"
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
    blocks = _tome_blocks(model)
    schedule = parse_r(len(blocks), r)
    # the module embedding the tokens: the model itself, or the ViT inside a features_only wrapper
    owner = next((module for module in model.modules() if hasattr(module, "cls_token")), model)
    if getattr(owner, "reg_token", None) is not None:
        raise TypeError("apply_tome: models with register tokens are not supported (only class / distillation tokens are protected)")
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
            for key in [key for key, hook in hooks.items() if getattr(hook, "__func__", None) is ToMeBlock._tome_keep_keys]:
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
