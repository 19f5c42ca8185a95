"""Giving timm's modules the class of a visionzoo subclass in place (same parameters and keys)."""
from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn

__all__ = ["swap_classes"]


def swap_classes(model: nn.Module, old: type, new: type, where: Optional[Callable[[nn.Module], bool]] = None) -> int:
    """Make every module of ``model`` whose class is exactly ``old`` (and for which ``where`` holds) a
    ``new``, a subclass of ``old`` that adds no state; returns how many."""
    if not issubclass(new, old):
        raise TypeError(f"{new.__name__} must be a subclass of {old.__name__}")
    count = 0
    for module in model.modules():
        if type(module) is old and (where is None or where(module)):
            module.__class__ = new
            count += 1
    return count
