"""visionzoo models as mmdetection / mmsegmentation backbones, from the families' declarations.

:class:`VisionZooBackbone` wraps any hierarchical visionzoo (timm) model: it builds the model with
``timm.create_model``, drops what dense tasks do not use (classifier, final norm, stages after the
last output) with the model's own ``prune_intermediate_layers``, and returns the stage outputs of
``forward_intermediates``, each through its own output norm ``norm{i}``. What differs between
families (their mm type names and sizes, dense-task options, stem / stage lookup, output norm,
checkpoint conversion) comes from their :class:`~visionzoo.models.dense.DenseFamily`.

:func:`family_backbone` makes the class of one declared family, which takes a size (``arch='tiny'``)
and by default the dense-task options of the task of the registry it is built from (detection in
mmdet, segmentation in mmseg). Nothing here imports mmdet or mmseg, and nothing names a family:
``visionzoo/mm/__init__.py`` registers what is declared.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.runner.checkpoint import load_state_dict
from timm.models import load_state_dict_from_hf

from visionzoo.checkpoint import load_weights
from visionzoo.models.dense import DenseFamily, dense_family_of

__all__ = [
    "FamilyBackbone",
    "VisionZooBackbone",
    "family_backbone",
    "read_checkpoint",
]

# a model no family declares: timm's conventions throughout, no task options, keys unconverted
_UNDECLARED = DenseFamily(name="undeclared", type_names=("VisionZooBackbone",), archs={})


def read_checkpoint(checkpoint: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """State dict of a URL, ``hf-hub:<repo>`` (timm's weights on the Hugging Face Hub), ``.pth`` / ``.pt``
    file, ``.safetensors`` file or visionzoo checkpoint dir.

    Pickled files are read with ``torch.load(weights_only=True)``; the state dict is unwrapped from
    ``'state_dict'`` (mmengine / mmcv) or ``'model'`` (official classification checkpoints).
    """
    checkpoint = str(checkpoint)
    if checkpoint.startswith("hf-hub:"):  # safetensors when the repository has them, else weights_only
        state = load_state_dict_from_hf(checkpoint[len("hf-hub:"):], weights_only=True)
    elif checkpoint.startswith(("http://", "https://")):
        # a URL whose path ends in '/' (``https://host/f/<id>/?dl=1``) names no file: torch.hub would
        # cache it under an empty name, so it is cached under the path's last part
        path = urlparse(checkpoint).path
        file_name = None if os.path.basename(path) else f"{os.path.basename(path.rstrip('/'))}.pth"
        state = torch.hub.load_state_dict_from_url(checkpoint, map_location="cpu", weights_only=True,
                                                   file_name=file_name)
    elif checkpoint.endswith(".safetensors") or Path(checkpoint).is_dir():
        state, _ = load_weights(checkpoint)
    else:
        # training scripts (timm's among them) store their argparse.Namespace beside the weights: the
        # one non-tensor class allowed, as timm's own loader does
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return state


class VisionZooBackbone(BaseModule):
    """A hierarchical visionzoo model as a dense-prediction backbone.

    ``[B, 3, H, W]`` -> tuple of ``[B, C_i, H_i, W_i]`` for ``i`` in ``out_indices``: the channels
    and strides of the model's ``feature_info`` (e.g. ``embed_dim * 2**i`` at stride ``4 * 2**i``).

    Args:
        model_name: timm name, ``'visionzoo_<family>_<size>'`` or any hierarchical timm model.
        out_indices: stages to return; the stages after the last one are dropped.
        frozen_stages: ``-1`` trains everything; ``0`` freezes the stem; ``k > 0`` freezes the stem
            and stages ``0 .. k-1`` (each with the downsampler that feeds it) and their output norms.
            Frozen modules stay in eval mode through ``train()``.
        out_norms: one output norm ``norm{i}`` per output (the family's ``out_norm``, by default a
            LayerNorm over channels, the official dense layout).
        norm_eval: keep every BatchNorm of the model in eval mode through ``train()``: its statistics
            stay those it was loaded with (its affine parameters still train), as mmdet's ResNet
            backbones with ``norm_eval=True`` (few images per GPU give noisy batch statistics).
        with_cp: gradient checkpointing of the blocks (the model's ``set_grad_checkpointing``).
        drop_path_rate: stochastic depth of the model (``None``: the variant's default).
        dense_schedule: ``'det'`` / ``'seg'``: the model keyword arguments the family declares for
            that task (e.g. a dilation schedule, see ``visionzoo.models.dense.dense_kwargs``);
            ``None``: none.
        img_size: resolution the model is built for (``None``: the variant's).
        init_cfg: mmengine init config; ``dict(type='Pretrained', checkpoint=path_or_url)`` loads a
            visionzoo (timm layout), official classification or official / mm dense checkpoint
            (``backbone.``-prefixed, with ``norm{i}``), see :meth:`init_weights`.
        **model_kwargs: passed on to ``timm.create_model``.
    """

    family: Optional[DenseFamily] = None  # set on the classes of :func:`family_backbone`

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        out_norms: bool = True,
        norm_eval: bool = False,
        with_cp: bool = False,
        drop_path_rate: Optional[float] = None,
        dense_schedule: Optional[str] = None,
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
        init_cfg: Optional[dict] = None,
        **model_kwargs,
    ):
        super().__init__(init_cfg=init_cfg)
        self.family = self.family or dense_family_of(model_name) or _UNDECLARED
        if dense_schedule is not None:
            task_kwargs = self.family.dense_kwargs(model_name, dense_schedule)
            given = sorted(key for key in task_kwargs if model_kwargs.get(key) is not None)
            if given:
                raise ValueError(f"give {', '.join(given)} or dense_schedule, not both")
            model_kwargs.update(task_kwargs)
        for key, value in (("drop_path_rate", drop_path_rate), ("img_size", img_size)):
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
        self.norm_eval = norm_eval
        if out_norms:
            for i, channels in zip(self.out_indices, self.num_features):
                self.add_module(f"norm{i}", self.family.out_norm(channels))
        if with_cp:
            self.model.set_grad_checkpointing(True)
        self._freeze_stages()

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules = self.family.stem_modules(self.model)
        for i in range(self.frozen_stages):
            modules.append(self.family.stage_module(self.model, i))
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
        if mode and self.norm_eval:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
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
        through the family's ``checkpoint_filter`` (official -> timm layout; timm keys and this
        wrapper's ``model.`` keys pass unchanged).
        """
        if prefix is None and any(key.startswith("backbone.") for key in state_dict):
            prefix = "backbone."
        if prefix:
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        # output norms: ``norm{i}`` (some official dense checkpoints call them ``outnorm{i}``)
        state_dict = {re.sub(r"^outnorm(\d+\.)", r"norm\1", key): value for key, value in state_dict.items()}
        out_norms = {key: value for key, value in state_dict.items() if re.match(r"norm\d+\.", key)}
        model_state = {re.sub(r"^model\.", "", key): value for key, value in state_dict.items() if key not in out_norms}
        model_state = self.family.convert(model_state, self.model)
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


class FamilyBackbone(VisionZooBackbone):
    """The backbone of one declared family: takes a size instead of a model name.

    Args:
        arch: a size the family declares (``'tiny'``) or its letter in the registered names (``'t'``).
        dense_schedule: ``'task'`` (default): the family's options for the task of the registry the
            class was built from (detection in mmdet, segmentation in mmseg; none outside a
            registry), where the family declares some; model keyword arguments given explicitly
            win over them. ``'det'``, ``'seg'`` or ``None`` as
            :class:`VisionZooBackbone`.
        **kwargs: as :class:`VisionZooBackbone`.
    """

    family: DenseFamily
    task: Optional[str] = None  # 'det' / 'seg': set on the subclass registered in mmdet / mmseg

    def __init__(self, arch: str = "tiny", dense_schedule: Optional[str] = "task", **kwargs):
        model_name = self.family.model_name(arch)
        if dense_schedule == "task":
            dense_schedule = None
            if self.task is not None and self.family.task_kwargs is not None:
                kwargs = {**self.family.dense_kwargs(model_name, self.task), **kwargs}
        super().__init__(model_name, dense_schedule=dense_schedule, **kwargs)


def family_backbone(family: DenseFamily) -> type:
    """The :class:`FamilyBackbone` subclass of ``family``, named after its first type name."""
    name = family.type_names[0]
    sizes = ", ".join(f"``{arch}`` ({spec.model_name})" for arch, spec in family.archs.items())
    aliases = f" (also registered as {', '.join(family.type_names[1:])})" if len(family.type_names) > 1 else ""
    doc = (f"{name} backbone{aliases}, ``dict(type={name!r}, arch=...)``: {sizes}.\n\n"
           f"    Arguments as :class:`FamilyBackbone`.\n    ")
    return type(name, (FamilyBackbone,), {"family": family, "__doc__": doc, "__module__": __name__})
