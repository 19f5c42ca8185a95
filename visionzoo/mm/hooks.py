"""Keep mmengine checkpoints readable by ``torch.load(weights_only=True)``.

mmengine 0.10 pickles its ``MessageHub`` into every checkpoint: ``HistoryBuffer`` objects (whose
state holds bound methods) and numpy scalars. torch >= 2.6 loads with ``weights_only=True`` by
default and refuses them, so ``--resume``, ``load_from`` and testing a trained checkpoint fail.
:class:`WeightsOnlyCheckpointHook` stores them as tensors and plain containers before saving and
rebuilds the ``HistoryBuffer`` objects after loading, so nothing needs unsafe unpickling.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer

# marks a HistoryBuffer stored as a plain dict
_BUFFER = "__history_buffer__"


def to_plain(value: Any) -> Any:
    """``value`` with HistoryBuffers as marked dicts, numpy arrays as tensors, numpy scalars as Python numbers."""
    if isinstance(value, HistoryBuffer):
        log_history, count_history = value.data
        return {
            _BUFFER: True,
            "log_history": torch.from_numpy(np.asarray(log_history, dtype=np.float64)),
            "count_history": torch.from_numpy(np.asarray(count_history, dtype=np.float64)),
            "max_length": int(value.max_length),
        }
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return type(value)((key, to_plain(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(item) for item in value)
    return value


def from_plain(value: Any) -> Any:
    """Inverse of :func:`to_plain` for HistoryBuffers (the rest stays as stored)."""
    if isinstance(value, dict):
        if value.get(_BUFFER):
            return HistoryBuffer(
                value["log_history"].tolist(), value["count_history"].tolist(), value["max_length"]
            )
        return type(value)((key, from_plain(item)) for key, item in value.items())
    return value


class WeightsOnlyCheckpointHook(Hook):
    """Make saved checkpoints loadable with ``torch.load(weights_only=True)`` (see the module docstring).

    Add it with ``custom_hooks = [dict(type='WeightsOnlyCheckpointHook')]`` (the visionzoo configs
    and tools do).
    """

    priority = "VERY_LOW"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        for key in ("meta", "message_hub"):
            if key in checkpoint:
                checkpoint[key] = to_plain(checkpoint[key])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if "message_hub" in checkpoint:
            checkpoint["message_hub"] = from_plain(checkpoint["message_hub"])
