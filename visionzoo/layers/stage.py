"""One stage of a hierarchical model: a downsampler, then a sequence of blocks."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
from timm.models import checkpoint_seq

__all__ = ["Stage"]


class Stage(nn.Module):
    """``downsample`` then ``blocks``: ``[B, H, W, C_in] -> [B, H', W', C_out]`` (channels-last).

    The downsampler starts the stage (timm's layout), so a stage's output is the feature map at its
    own stride, before the next stage's downsampler: what dense-prediction heads take.

    Args:
        blocks: the stage's blocks, run in order (e.g. :class:`visionzoo.layers.TransformerBlock`).
        downsample: module run first (e.g. from :func:`visionzoo.layers.create_downsample`); ``None``
            for none.

    ``grad_checkpointing`` (set by the model's ``set_grad_checkpointing``) recomputes each block's
    activations in the backward pass instead of storing them.
    """

    def __init__(self, blocks: Iterable[nn.Module], downsample: Optional[nn.Module] = None):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)
