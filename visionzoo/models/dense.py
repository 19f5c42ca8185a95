"""What a model family declares for dense prediction (detection / segmentation backbones).

A family file in ``visionzoo/models/`` ends with one :class:`DenseFamily` passed to
:func:`register_dense_family`; :mod:`visionzoo.mm` turns every declaration into mmdet / mmseg
backbones (``dict(type='DiNAT', arch='tiny')``) and ``tools/make_mm_configs.py`` writes its configs.
Nothing here imports mmdet, mmseg or mmengine::

    register_dense_family(DenseFamily(
        name="nat",
        type_names=("NAT",),
        archs={"mini": DenseArch("visionzoo_nat_m", pretrained_tag="in1k", drop_path_rate=dict(det=0.2, seg=0.2))},
        checkpoint_filter=checkpoint_filter_fn,
    ))

The backbone wrapper relies on timm's model API (``forward_intermediates``,
``prune_intermediate_layers``, ``feature_info``, ``group_matcher``, ``set_grad_checkpointing``); a
family whose layout differs from timm's conventions says so with ``stem`` / ``stage`` /
``out_norm``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

__all__ = [
    "DENSE_FAMILIES",
    "DENSE_TASKS",
    "DenseArch",
    "DenseFamily",
    "dense_family_of",
    "dense_kwargs",
    "register_dense_family",
    "watch_dense_families",
]

DENSE_TASKS = ("det", "seg")
"""``'det'``: detection / instance segmentation (mmdet, ~800x1333 inputs); ``'seg'``: semantic
segmentation (mmseg, 512x512 crops)."""

StateDict = Dict[str, Any]


def layer_norm_2d(channels: int) -> nn.Module:
    """The official dense NAT / DiNAT / Swin output norm: LayerNorm over channels of ``[B, C, H, W]``
    (``nn.LayerNorm``'s eps)."""
    return LayerNorm2d(channels, eps=1e-5)


@dataclass(frozen=True)
class DenseArch:
    """One size of a family as a dense backbone.

    Args:
        model_name: the registered timm name, e.g. ``'visionzoo_dinat_t'``.
        pretrained_tag: the weights the dense configs start from (``'in1k'``, ``'in22k'``).
        drop_path_rate: per task (:data:`DENSE_TASKS`), the stochastic depth of the official dense
            configs; a task without one gets no generated config. ``'det'`` gives the Mask R-CNN
            configs, ``'det_cascade'`` the Cascade Mask R-CNN one.
    """

    model_name: str
    pretrained_tag: str = ""
    drop_path_rate: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DenseFamily:
    """A model family's dense-prediction declaration (see the module docstring).

    Args:
        name: the family in registered names (``'dinat'`` for ``visionzoo_dinat_<size>``).
        type_names: mm registry names; the first also names the backbone class, the rest are
            aliases (``('DiNAT_s', 'DiNATs')``).
        archs: ``arch`` argument -> size, e.g. ``{'tiny': DenseArch('visionzoo_dinat_t', ...)}``;
            the size letter of the registered name (``'t'``) is accepted too.
        task_kwargs: ``(model, task) -> create_model keyword arguments`` for a dense task (``model``:
            the variant as registered, on the meta device), e.g. DiNAT's official detection /
            segmentation dilations; ``None``: the family has none.
        checkpoint_filter: ``(state_dict, model) -> state_dict`` mapping the family's official
            checkpoints (classification, and the backbone part of dense ones) to the timm layout;
            keys already in it pass unchanged. The output norms ``norm{i}`` of official dense
            checkpoints are the wrapper's and never reach it.
        stem: ``model -> modules`` frozen by ``frozen_stages >= 0``; ``None``: the model's
            ``group_matcher(coarse=True)['stem']``.
        stage: ``(model, i) -> module`` of stage ``i`` (with the downsampler that feeds it), frozen
            by ``frozen_stages > i``; ``None``: ``model.feature_info[i]['module']``.
        out_norm: ``channels -> module`` applied to each output ``[B, C, H, W]`` as ``norm{i}``.
        norm_eval: the rows of :data:`DENSE_TASKS` (``'det'``, ...) whose generated configs freeze
            the BatchNorm statistics (the wrapper's ``norm_eval``, as mmdet's ResNet recipes).
    """

    name: str
    type_names: Tuple[str, ...]
    archs: Mapping[str, DenseArch]
    task_kwargs: Optional[Callable[[str, str], Dict[str, Any]]] = None
    checkpoint_filter: Optional[Callable[[StateDict, nn.Module], StateDict]] = None
    stem: Optional[Callable[[nn.Module], List[nn.Module]]] = None
    stage: Optional[Callable[[nn.Module, int], nn.Module]] = None
    out_norm: Callable[[int], nn.Module] = layer_norm_2d
    norm_eval: Tuple[str, ...] = ()

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"name must be the lower-case family of the registered names, got {self.name!r}")
        if isinstance(self.type_names, str) or not self.type_names or not all(
                isinstance(t, str) and t.isidentifier() for t in self.type_names):
            raise ValueError(f"{self.name}: type_names must be a tuple of identifiers, got {self.type_names!r}")

    def model_name(self, arch: str) -> str:
        """``'tiny'`` or ``'t'`` -> ``'visionzoo_<family>_t'``."""
        if arch in self.archs:
            return self.archs[arch].model_name
        by_size = {spec.model_name.rsplit("_", 1)[-1]: spec.model_name for spec in self.archs.values()}
        if arch in by_size:
            return by_size[arch]
        raise ValueError(f"{self.type_names[0]}: arch must be one of {', '.join(self.archs)} "
                         f"(or {', '.join(by_size)}), got {arch!r}")

    def dense_kwargs(self, model_name: str, task: str) -> Dict[str, Any]:
        """The model keyword arguments of ``task`` for ``model_name``, e.g. ``{'dilations': [...]}``."""
        if self.task_kwargs is None:
            with_options = [f.name for f in DENSE_FAMILIES.values() if f.task_kwargs is not None]
            raise ValueError(f"{model_name}: the {self.name} family declares no dense-task options "
                             f"(families with some: {', '.join(with_options) or 'none'})")
        if task not in DENSE_TASKS:
            raise ValueError(f"task must be one of {DENSE_TASKS}, got {task!r}")
        # the registered variant knows its layout; built on the meta device (no memory, no init)
        with torch.device("meta"):
            model = timm.create_model(model_name, pretrained=False, num_classes=0)
        return dict(self.task_kwargs(model, task))

    def stem_modules(self, model: nn.Module) -> List[nn.Module]:
        if self.stem is not None:
            return list(self.stem(model))
        return timm_stem(model)

    def stage_module(self, model: nn.Module, index: int) -> nn.Module:
        if self.stage is not None:
            return self.stage(model, index)
        return timm_stage(model, index)

    def convert(self, state_dict: StateDict, model: nn.Module) -> StateDict:
        return state_dict if self.checkpoint_filter is None else self.checkpoint_filter(state_dict, model)


def timm_stem(model: nn.Module) -> List[nn.Module]:
    """The children of ``model`` that its ``group_matcher(coarse=True)`` calls the stem."""
    stem = model.group_matcher(coarse=True)["stem"]
    patterns = [stem] if isinstance(stem, str) else list(stem)
    return [module for name, module in model.named_children() if any(re.match(p, name) for p in patterns)]


def timm_stage(model: nn.Module, index: int) -> nn.Module:
    """Stage ``index`` of ``model``, as its ``feature_info`` names it."""
    return model.get_submodule(model.feature_info[index]["module"])


DENSE_FAMILIES: Dict[str, DenseFamily] = {}
"""Family name -> declaration, in registration order."""

_WATCHERS: List[Callable[[DenseFamily], None]] = []


def register_dense_family(family: DenseFamily) -> DenseFamily:
    """Declare ``family`` (once per name; a type name or model belongs to one family only)."""
    if not family.archs:
        raise ValueError(f"dense family {family.name!r}: archs is empty")
    if family.name in DENSE_FAMILIES:
        raise ValueError(f"dense family {family.name!r} is already declared")
    for other in DENSE_FAMILIES.values():
        shared = set(family.type_names) & set(other.type_names)
        models = {a.model_name for a in family.archs.values()} & {a.model_name for a in other.archs.values()}
        if shared or models:
            raise ValueError(f"dense family {family.name!r} shares {sorted(shared | models)} with {other.name!r}")
    DENSE_FAMILIES[family.name] = family
    for callback in _WATCHERS:
        callback(family)
    return family


def watch_dense_families(callback: Callable[[DenseFamily], None]) -> None:
    """Call ``callback`` with every declared family, now and whenever one is declared later
    (how :mod:`visionzoo.mm` registers families imported after it)."""
    _WATCHERS.append(callback)
    for family in list(DENSE_FAMILIES.values()):
        callback(family)


def dense_family_of(model_name: str) -> Optional[DenseFamily]:
    """The declaration whose archs hold ``model_name`` (a pretrained tag is ignored), or ``None``."""
    model_name = model_name.split(".")[0]
    for family in DENSE_FAMILIES.values():
        if any(arch.model_name == model_name for arch in family.archs.values()):
            return family
    return None


def dense_kwargs(model_name: str, task: str) -> Dict[str, Any]:
    """The model keyword arguments a declared family gives ``model_name`` for ``task``, e.g.
    ``dense_kwargs('visionzoo_dinat_t', 'seg')`` -> ``{'dilations': [[1, 16, 1], ...]}``."""
    family = dense_family_of(model_name)
    if family is None:
        raise ValueError(f"{model_name!r} belongs to no declared dense family "
                         f"(declared: {', '.join(DENSE_FAMILIES) or 'none'})")
    return family.dense_kwargs(model_name.split(".")[0], task)
