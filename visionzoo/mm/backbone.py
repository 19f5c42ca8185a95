"""visionzoo models as mmdetection / mmsegmentation backbones.

:class:`VisionZooBackbone` wraps any hierarchical visionzoo (timm) model: it builds the model with
``timm.create_model``, drops what dense tasks do not use (classifier, final norm, stages after the
last output) with the model's own ``prune_intermediate_layers``, and returns the stage outputs of
``forward_intermediates`` (taken before the next stage's downsampler), each through its own
LayerNorm ``norm{i}`` as the official dense NAT / DiNAT / Swin backbones do.

:class:`NAT`, :class:`DiNAT` and :class:`DiNATs` name a family and take a size (``arch='tiny'``);
DiNAT and DiNAT_s default to the official dilation schedule of the task of the registry they were
built from (detection in mmdet, segmentation in mmseg, see :func:`visionzoo.mm.register`).

Nothing here imports mmdet or mmseg: the classes are registered by ``visionzoo/mm/__init__.py``.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.runner.checkpoint import load_state_dict
from timm.layers import LayerNorm2d

from visionzoo.checkpoint import load_weights

__all__ = [
    "DENSE_DILATIONS",
    "DiNAT",
    "DiNATs",
    "NAT",
    "VisionZooBackbone",
    "dense_dilations",
    "read_checkpoint",
]

# Official dense dilation schedules (SHI-Labs/Neighborhood-Attention-Transformer, detection/ and
# segmentation/ configs): per stage, a cycle repeated to the stage's depth, e.g. DiNAT-T detection
# [1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7] * 3, [1, 3, 1, 3, 1]. Detection is for ~800x1333
# inputs, segmentation for 512x512 crops; DiNAT_s (2 blocks in stages 0, 1, 3) keeps the large one.
DENSE_DILATIONS: Dict[str, Dict[str, Tuple[Tuple[int, ...], ...]]] = {
    "dinat": {
        "det": ((1, 28, 1), (1, 7, 1, 14), (1, 3, 1, 5, 1, 7), (1, 3, 1, 3, 1)),
        "seg": ((1, 16, 1), (1, 4, 1, 8), (1, 2, 1, 3, 1, 4), (1, 2, 1, 2, 1)),
    },
    "dinats": {
        "det": ((1, 28), (1, 14), (1, 3, 1, 5, 1, 7), (1, 3)),
        "seg": ((1, 16), (1, 8), (1, 2, 1, 3, 1, 4), (1, 2)),
    },
}

# mmdet / mmpretrain spell sizes out; timm names use one letter
_ARCHS = {"mini": "m", "tiny": "t", "small": "s", "base": "b", "large": "l"}


def _family(model_name: str) -> str:
    """``'visionzoo_dinat_t.in1k'`` -> ``'dinat'``."""
    match = re.fullmatch(r"visionzoo_(\w+)_[a-z0-9]+", model_name.split(".")[0])
    if match is None:
        raise ValueError(f"{model_name!r} is not a visionzoo model name (visionzoo_<family>_<size>)")
    return match[1]


def _stage_depths(model_name: str) -> List[int]:
    # the registered variant knows its depths; build it on the meta device (no memory, no init cost)
    with torch.device("meta"):
        probe = timm.create_model(model_name, pretrained=False, num_classes=0)
    return [len(stage.blocks) for stage in probe.stages]


def dense_dilations(model_name: str, task: str) -> List[List[int]]:
    """The official per-block dilations of ``model_name`` for ``task`` (``'det'`` or ``'seg'``).

    E.g. ``dense_dilations('visionzoo_dinat_t', 'seg')`` -> ``[[1, 16, 1], [1, 4, 1, 8],
    [1, 2, 1, 3, 1, 4] * 3, [1, 2, 1, 2, 1]]``.
    """
    family = _family(model_name)
    if family not in DENSE_DILATIONS:
        raise ValueError(f"{model_name}: family {family!r} has no dense dilation schedule "
                         f"(families with one: {', '.join(DENSE_DILATIONS)})")
    if task not in DENSE_DILATIONS[family]:
        raise ValueError(f"task must be one of {tuple(DENSE_DILATIONS[family])}, got {task!r}")
    cycles = DENSE_DILATIONS[family][task]
    return [[cycle[j % len(cycle)] for j in range(depth)] for cycle, depth in zip(cycles, _stage_depths(model_name))]


def read_checkpoint(checkpoint: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """State dict of a URL, ``.pth`` / ``.pt`` file, ``.safetensors`` file or visionzoo checkpoint dir.

    Pickled files are read with ``torch.load(weights_only=True)``; the state dict is unwrapped from
    ``'state_dict'`` (mmengine / mmcv) or ``'model'`` (official classification checkpoints).
    """
    checkpoint = str(checkpoint)
    if checkpoint.startswith(("http://", "https://")):
        state = torch.hub.load_state_dict_from_url(checkpoint, map_location="cpu", weights_only=True)
    elif checkpoint.endswith(".safetensors") or Path(checkpoint).is_dir():
        state, _ = load_weights(checkpoint)
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return state


class VisionZooBackbone(BaseModule):
    """A hierarchical visionzoo model as a dense-prediction backbone.

    ``[B, 3, H, W]`` -> tuple of ``[B, C_i, H / 2**(i+2), W / 2**(i+2)]`` for ``i`` in ``out_indices``
    (NAT / DiNAT / DiNAT_s: ``C_i = embed_dim * 2**i``, strides 4, 8, 16, 32).

    Args:
        model_name: timm name, e.g. ``'visionzoo_dinat_t'``.
        out_indices: stages to return; the stages after the last one are dropped.
        frozen_stages: ``-1`` trains everything; ``0`` freezes the stem; ``k > 0`` freezes the stem
            and stages ``0 .. k-1`` (each with the downsampler that feeds it) and their output norms.
            Frozen modules stay in eval mode through ``train()``.
        out_norms: one LayerNorm ``norm{i}`` per output (the official dense layout).
        with_cp: gradient checkpointing of the blocks (the model's ``set_grad_checkpointing``).
        drop_path_rate: stochastic depth of the model (``None``: the variant's default).
        dilations: explicit per-stage, per-block dilations (DiNAT families).
        dense_schedule: ``'det'`` / ``'seg'``: the official dense dilations (see :data:`DENSE_DILATIONS`);
            ``None``: the model's own, computed for ``img_size``.
        img_size: resolution the model's default dilations are computed for (``None``: the variant's).
        init_cfg: mmengine init config; ``dict(type='Pretrained', checkpoint=path_or_url)`` loads a
            visionzoo (timm layout), official classification or official / mm dense checkpoint
            (``backbone.``-prefixed, ``levels.{i}`` / ``layers.{i}`` / ``norm{i}``), see :meth:`init_weights`.
        **model_kwargs: passed on to ``timm.create_model`` (e.g. ``layer_scale``, ``kernel_size``).
    """

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        out_norms: bool = True,
        with_cp: bool = False,
        drop_path_rate: Optional[float] = None,
        dilations: Optional[Sequence[Sequence[int]]] = None,
        dense_schedule: Optional[str] = None,
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
        init_cfg: Optional[dict] = None,
        **model_kwargs,
    ):
        super().__init__(init_cfg=init_cfg)
        if dense_schedule is not None:
            if dilations is not None:
                raise ValueError("give dilations or dense_schedule, not both")
            dilations = dense_dilations(model_name, dense_schedule)
        for key, value in (("drop_path_rate", drop_path_rate), ("dilations", dilations), ("img_size", img_size)):
            if value is not None:
                model_kwargs[key] = value
        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
        # drops the final norm and head, and the stages after the last output
        self.out_indices = tuple(self.model.prune_intermediate_layers(list(out_indices), prune_norm=True))
        num_stages = max(self.out_indices) + 1  # kept by the pruning
        if frozen_stages > num_stages:
            raise ValueError(f"frozen_stages {frozen_stages} > the {num_stages} stages up to out_indices {self.out_indices}")
        self.frozen_stages = frozen_stages
        self.num_features = [self.model.feature_info[i]["num_chs"] for i in self.out_indices]
        self.strides = [self.model.feature_info[i]["reduction"] for i in self.out_indices]
        self.out_norms = out_norms
        if out_norms:
            for i, channels in zip(self.out_indices, self.num_features):
                # eps of nn.LayerNorm, as the official dense backbones
                self.add_module(f"norm{i}", LayerNorm2d(channels, eps=1e-5))
        if with_cp:
            self.model.set_grad_checkpointing(True)
        self._freeze_stages()

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        stem = self.model.group_matcher(coarse=True)["stem"]
        stem = [stem] if isinstance(stem, str) else list(stem)
        modules = [m for name, m in self.model.named_children() if any(re.match(p, name) for p in stem)]
        for i in range(self.frozen_stages):
            modules.append(self.model.get_submodule(self.model.feature_info[i]["module"]))
            if hasattr(self, f"norm{i}"):
                modules.append(getattr(self, f"norm{i}"))
        return modules

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> "VisionZooBackbone":
        super().train(mode)
        self._freeze_stages()
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``[B, 3, H, W]`` -> one ``[B, C_i, H_i, W_i]`` per output index."""
        features = self.model.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
        if self.out_norms:
            features = [getattr(self, f"norm{i}")(f) for i, f in zip(self.out_indices, features)]
        return tuple(features)

    def convert_state_dict(self, state_dict: Dict[str, torch.Tensor], prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """Map a checkpoint's keys onto this module.

        Keeps the keys under ``prefix`` (default: ``'backbone.'`` when the checkpoint has any, as
        mmdet / mmseg checkpoints) and strips it; ``norm{i}`` are the output norms; the rest goes
        through the model family's ``checkpoint_filter_fn`` (official -> timm layout; timm keys and
        this wrapper's ``model.`` keys pass unchanged).
        """
        if prefix is None and any(key.startswith("backbone.") for key in state_dict):
            prefix = "backbone."
        if prefix:
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        out_norms = {key: value for key, value in state_dict.items() if re.match(r"norm\d+\.", key)}
        model_state = {re.sub(r"^model\.", "", key): value for key, value in state_dict.items() if key not in out_norms}
        # timm's convention: a model file's `checkpoint_filter_fn` maps its official checkpoints
        filter_fn = getattr(sys.modules[type(self.model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            model_state = filter_fn(model_state, self.model)
        return {**out_norms, **{f"model.{key}": value for key, value in model_state.items()}}

    def init_weights(self) -> None:
        """``init_cfg=dict(type='Pretrained', checkpoint=..., prefix=None)`` loads through
        :meth:`convert_state_dict` and logs missing / unexpected keys; other init configs go to mmengine."""
        if not (isinstance(self.init_cfg, dict) and self.init_cfg.get("type") == "Pretrained"):
            super().init_weights()
            return
        checkpoint = self.init_cfg["checkpoint"]
        print_log(f"{type(self).__name__} ({self.model_name}): loading {checkpoint}", logger="current")
        state_dict = self.convert_state_dict(read_checkpoint(checkpoint), prefix=self.init_cfg.get("prefix"))
        # mmengine's loader: strict=False, logs missing / unexpected keys and shape mismatches
        load_state_dict(self, state_dict, strict=False, logger="current")
        self._is_init = True


class _FamilyBackbone(VisionZooBackbone):
    """A backbone for ``visionzoo_<family>_<size>`` that takes ``arch`` (``'tiny'`` or ``'t'``)."""

    family: str
    # default dense dilation schedule; visionzoo.mm.register sets it per registry ('det' / 'seg')
    task: Optional[str] = None

    def __init__(self, arch: str = "tiny", dense_schedule: Optional[str] = "task", **kwargs):
        if dense_schedule == "task":
            has_schedule = self.family in DENSE_DILATIONS and kwargs.get("dilations") is None
            dense_schedule = self.task if has_schedule else None
        super().__init__(f"visionzoo_{self.family}_{_ARCHS.get(arch, arch)}", dense_schedule=dense_schedule, **kwargs)


class NAT(_FamilyBackbone):
    """NAT backbone, ``dict(type='NAT', arch='tiny')``: ``visionzoo_nat_{m,t,s,b}``.

    Args:
        arch: ``'mini'``, ``'tiny'``, ``'small'``, ``'base'`` (or ``'m'``, ``'t'``, ``'s'``, ``'b'``).
        **kwargs: as :class:`VisionZooBackbone`.
    """

    family = "nat"


class DiNAT(_FamilyBackbone):
    """DiNAT backbone, ``dict(type='DiNAT', arch='tiny')``: ``visionzoo_dinat_{m,t,s,b,l}``.

    Args:
        arch: ``'mini'`` .. ``'large'`` (or ``'m'`` .. ``'l'``).
        dense_schedule: ``'task'`` (default): the official schedule of the registry's task,
            detection in mmdet and segmentation in mmseg (the model's classification schedule when
            the class is used outside a registry); ``'det'``, ``'seg'``, or ``None`` for the
            classification schedule at ``img_size``. Explicit ``dilations`` win over ``'task'``.
        **kwargs: as :class:`VisionZooBackbone`.
    """

    family = "dinat"


class DiNATs(_FamilyBackbone):
    """DiNAT_s backbone, ``dict(type='DiNAT_s', arch='tiny')``: ``visionzoo_dinats_{t,s,b,l}``.

    Arguments as :class:`DiNAT`.
    """

    family = "dinats"
