"""mmdetection / mmsegmentation backbones (needs the ``mm`` extra).

Importing this module registers ``VisionZooBackbone`` and the family backbones ``NAT``, ``DiNAT``
and ``DiNAT_s`` (alias ``DiNATs``) in the ``MODELS`` registry of mmdet and of mmseg, whichever are
installed, and ``WeightsOnlyCheckpointHook`` in mmengine's ``HOOKS``. In a config::

    custom_imports = dict(imports=['visionzoo.mm'], allow_failed_imports=False)
    model = dict(backbone=dict(type='DiNAT', arch='tiny', drop_path_rate=0.2))
"""
import importlib

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

from .backbone import (  # noqa: E402
    DENSE_DILATIONS,
    DiNAT,
    DiNATs,
    NAT,
    VisionZooBackbone,
    dense_dilations,
    read_checkpoint,
)
from .hooks import WeightsOnlyCheckpointHook  # noqa: E402

__all__ = [
    "DENSE_DILATIONS",
    "DiNAT",
    "DiNATs",
    "NAT",
    "SCOPES",
    "VisionZooBackbone",
    "WeightsOnlyCheckpointHook",
    "dense_dilations",
    "read_checkpoint",
]

# registry scope -> the task whose dilation schedule the family backbones use by default
_TASKS = {"mmdet": "det", "mmseg": "seg"}
_NAMES = {NAT: "NAT", DiNAT: "DiNAT", DiNATs: ["DiNAT_s", "DiNATs"]}


def _register(scope: str) -> bool:
    try:
        registry = importlib.import_module(f"{scope}.registry").MODELS
    except ModuleNotFoundError as e:
        if e.name == scope:  # not installed: register in the others
            return False
        raise ImportError(f"{scope} is installed but does not import ({e}). {_INSTALL}") from e
    registry.register_module(name="VisionZooBackbone", module=VisionZooBackbone)
    for cls, names in _NAMES.items():
        # a subclass per registry, so that e.g. mmseg's DiNAT defaults to the segmentation dilations
        task_cls = type(cls.__name__, (cls,), {"task": _TASKS[scope], "__module__": cls.__module__, "__doc__": cls.__doc__})
        registry.register_module(name=names, module=task_cls)
    return True


SCOPES = tuple(scope for scope in _TASKS if _register(scope))
"""The registries (``'mmdet'``, ``'mmseg'``) the backbones were registered in."""
if not SCOPES:
    raise ImportError(f"neither mmdet nor mmseg can be imported. {_INSTALL}")
HOOKS.register_module(module=WeightsOnlyCheckpointHook)
