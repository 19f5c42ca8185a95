"""mmdetection / mmsegmentation backbones (needs the ``mm`` extra).

Importing this module registers ``VisionZooBackbone`` and, for every model family that declares
dense support (:class:`visionzoo.models.dense.DenseFamily`, at the end of its model file), a
backbone under each of its type names, in the ``MODELS`` registry of mmdet and of mmseg, whichever
are installed; families declared later are registered when declared. It also registers
``WeightsOnlyCheckpointHook`` in mmengine's ``HOOKS``. In a config::

    custom_imports = dict(imports=['visionzoo.mm'], allow_failed_imports=False)
    model = dict(backbone=dict(type='<a declared type name>', arch='tiny', drop_path_rate=0.2))

The backbone classes are attributes of this module by type name (``visionzoo.mm.BACKBONES``).
"""
import importlib
from typing import Dict

_INSTALL = (
    "visionzoo.mm needs mmengine and mmdet and/or mmsegmentation: `pip install visionzoo[mm]`, with "
    "mmcv 2.1.0 built against your torch: on CPU `pip install \"setuptools>=77.0.3,<81\" wheel ninja "
    "numpy mmengine==0.10.7` then `MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=2 pip install "
    "--no-build-isolation mmcv==2.1.0` (torch >= 2.10 needs a C++20 compiler wrapper; in a checkout "
    "`make mm` does it all); on GPU, OpenMMLab's prebuilt mmcv wheel for your torch / CUDA (see docs/mm.md)"
)

try:
    import mmengine  # noqa: F401
except ImportError as e:
    raise ImportError(f"{e}. {_INSTALL}") from e

from mmengine.registry import HOOKS  # noqa: E402

from visionzoo.models.dense import DenseFamily, watch_dense_families  # noqa: E402

from .backbone import FamilyBackbone, VisionZooBackbone, family_backbone, read_checkpoint  # noqa: E402
from .hooks import WeightsOnlyCheckpointHook  # noqa: E402

__all__ = [
    "BACKBONES",
    "FamilyBackbone",
    "SCOPES",
    "VisionZooBackbone",
    "WeightsOnlyCheckpointHook",
    "family_backbone",
    "read_checkpoint",
]

# registry scope -> the dense task its family backbones default to
_TASKS = {"mmdet": "det", "mmseg": "seg"}


def _registry(scope: str):
    try:
        return importlib.import_module(f"{scope}.registry").MODELS
    except ModuleNotFoundError as e:
        if e.name == scope:  # not installed: register in the others
            return None
        raise ImportError(f"{scope} is installed but does not import ({e}). {_INSTALL}") from e


_REGISTRIES = {scope: registry for scope in _TASKS if (registry := _registry(scope)) is not None}
SCOPES = tuple(_REGISTRIES)
"""The registries (``'mmdet'``, ``'mmseg'``) the backbones are registered in."""
if not SCOPES:
    raise ImportError(f"neither mmdet nor mmseg can be imported. {_INSTALL}")

BACKBONES: Dict[str, type] = {}
"""Type name -> the family's backbone class outside any registry (``dense_schedule='task'``: none);
each registry holds a subclass whose default task is the registry's."""


def _register(family: DenseFamily) -> None:
    cls = family_backbone(family)
    for name in family.type_names:
        BACKBONES[name] = cls
    for scope, registry in _REGISTRIES.items():
        # a subclass per registry, so that e.g. mmseg's backbones default to the segmentation options
        task_cls = type(cls.__name__, (cls,), {"task": _TASKS[scope], "__doc__": cls.__doc__, "__module__": cls.__module__})
        registry.register_module(name=list(family.type_names), module=task_cls)


def __getattr__(name: str) -> type:
    """``visionzoo.mm.<type name>``: the declared backbones (see :data:`BACKBONES`)."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


for _registry_ in _REGISTRIES.values():
    _registry_.register_module(name="VisionZooBackbone", module=VisionZooBackbone)
watch_dense_families(_register)
HOOKS.register_module(module=WeightsOnlyCheckpointHook)
