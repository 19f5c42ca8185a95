"""What every channels-last backbone repeats: features, intermediates, pruning, classifier head.

:class:`ChannelsLastModel` is the base of models that embed an image into a ``[B, H, W, C]`` map
and run it through a sequence of *levels*: the stages of a hierarchical model (``self.stages``,
:class:`visionzoo.layers.Stage`, one feature level per stage) or the blocks of an isotropic one
(``self.blocks``, ``isotropic = True``, one feature level per block). A subclass builds, in its
``__init__``:

* ``patch_embed``: the stem, ``[B, in_chans, H, W] -> [B, H', W', C]``;
* ``stages`` (or ``blocks``): an ``nn.Sequential`` of levels;
* ``norm``: the final norm, sized for the last level;
* ``head``: a :class:`timm.layers.ClassifierHead` with ``input_fmt='NHWC'``;
* the attributes ``in_chans``, ``num_classes``, ``global_pool``, ``num_features``,
  ``head_hidden_size`` and ``feature_info`` (one dict per level, ``module='stages.{i}'``),

and sets the class attribute ``no_weight_decay_patterns`` (``fnmatch`` patterns of parameter
names, e.g. ``('*.attn.rpb',)``). The base gives timm's model API on top: ``forward_features``,
``forward_head``, ``forward``, ``forward_intermediates``, ``prune_intermediate_layers``,
``group_matcher``, ``set_grad_checkpointing``, ``get_classifier``, ``reset_classifier``,
``no_weight_decay``, and a clear error for an input that is not ``[B, in_chans, H, W]``.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, get_device_dtype, register_notrace_function, trunc_normal_
from timm.models import checkpoint_seq

# the one timm helper used here without a public export (timm 1.0: timm.models._features)
from timm.models._features import feature_take_indices

__all__ = ["ChannelsLastModel", "check_image", "feature_take_indices"]


@register_notrace_function  # reads the shape: a leaf for torch.fx
def check_image(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """``x`` itself if it is an image batch ``[B, in_chans, H, W]``, else a ValueError saying so."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        hint = " (a single image: add the batch dimension, x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(
            f"expected an image batch [B, C, H, W] with C = in_chans = {in_chans}, got shape {tuple(x.shape)}{hint}"
        )
    return x


class ChannelsLastModel(nn.Module):
    """Base class giving timm's model API to channels-last backbones; see the module docstring."""

    isotropic: bool = False
    no_weight_decay_patterns: Tuple[str, ...] = ()

    in_chans: int
    num_classes: int
    global_pool: str
    num_features: int
    head_hidden_size: int
    feature_info: List[Dict[str, Any]]
    patch_embed: nn.Module
    norm: nn.Module
    head: ClassifierHead

    @property
    def _levels_name(self) -> str:
        return "blocks" if self.isotropic else "stages"

    def _levels(self) -> nn.Sequential:
        return getattr(self, self._levels_name)

    def _init_weights(self, module: nn.Module) -> None:
        # truncated-normal linears with zero bias (ViT, Swin, NAT); convs, norms, position biases
        # and layer scales keep the initialisation of their own modules
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Parameters matching ``no_weight_decay_patterns`` (1D ones, norms and biases, timm excludes itself)."""
        return {
            name
            for name, _ in self.named_parameters()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.no_weight_decay_patterns)
        }

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay: stem, then one group per block (or stage)."""
        if self.isotropic:
            return dict(stem=r"^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (per block: within each stage, or over the blocks)."""
        if self.isotropic:
            self.grad_checkpointing = enable
        else:
            for stage in self.stages:
                stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` (0: none) on the model's device and dtype; ``global_pool`` as timm."""
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features, **get_device_dtype(self))
        self.head_hidden_size = self.head.num_features
        if global_pool is not None:
            self.global_pool = global_pool

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(check_image(x, self.in_chans))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> normalized features of the last level, ``[B, H', W', num_features]``."""
        x = self._embed(x)
        if self.isotropic and self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self._levels()(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, H, W, C]`` features -> ``[B, num_classes]`` logits (``[B, C]`` with ``pre_logits``)."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of the levels (a stage's before the next stage's downsampler), ``[B, C_i, H_i, W_i]``.

        Args:
            x: ``[B, in_chans, H, W]``.
            indices: last ``n`` levels if int, all if None, else the listed level indices.
            norm: apply the final norm to the intermediates it is sized for (the last stage's; every
                block's of an isotropic model).
            stop_early: stop after the last requested level.
            output_fmt: ``'NCHW'`` or ``'NHWC'``.
            intermediates_only: return only the intermediates.

        Returns:
            ``intermediates`` or ``(final features [B, H', W', C], intermediates)``; the final
            features equal ``forward_features(x)`` unless ``stop_early`` ends before the last level.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        levels = self._levels()
        num_levels = len(levels)
        take_indices, max_index = feature_take_indices(num_levels, indices)
        if stop_early and not torch.jit.is_scripting():
            levels = levels[: max_index + 1]

        intermediates = []
        x = self._embed(x)
        last = 0
        for last, level in enumerate(levels):
            x = level(x)
            if last in take_indices:
                x_inter = self.norm(x) if norm and (self.isotropic or last == num_levels - 1) else x
                intermediates.append(x_inter.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else x_inter)
        if intermediates_only:
            return intermediates
        if self.isotropic or last == num_levels - 1:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drop the levels after the last of ``indices`` (and the norm / head); returns the kept indices.

        A hierarchical model pruned before its last stage also loses the norm and the classifier
        (sized for the last stage) and its ``num_features`` becomes the last kept stage's width.
        """
        levels = self._levels()
        take_indices, max_index = feature_take_indices(len(levels), indices)
        narrower = not self.isotropic and max_index < len(levels) - 1
        setattr(self, self._levels_name, levels[: max_index + 1])
        if prune_norm or narrower:
            self.norm = nn.Identity()
        if narrower:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or narrower:
            self.reset_classifier(0, "")
        return take_indices
