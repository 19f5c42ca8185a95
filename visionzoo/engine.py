"""Pieces the tools share: build a classifier for an input size, and evaluate top-1 / top-5.

Everything else (data, optimizer, scheduler, losses, EMA) comes from timm directly.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Dict, Optional

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F


def create_classifier(name: str, img_size: Optional[int] = None, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` that builds models taking ``img_size`` (ViT position embeddings, DiNAT
    dilation schedules) for that size; models without the argument just get inputs of that size.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if img_size is not None and "img_size" not in kwargs:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(name, **kwargs)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    num_samples: Optional[int] = None,
    progress=None,
) -> Dict[str, float]:
    """Cross-entropy, top-1 and top-5 (percent) of ``model`` over ``loader``.

    Under ``torch.distributed`` each rank sees a shard from timm's ``OrderedDistributedSampler``,
    which pads the last shards with repeated samples; ``num_samples`` (the dataset length) lets the
    padding be left out so the numbers equal a single-process run.
    """
    model.eval()
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    valid_left = math.ceil(max(num_samples - rank, 0) / world) if num_samples is not None else None
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(images)
        logits = logits.float()
        if valid_left is not None:
            keep = min(valid_left, len(target))
            logits, target = logits[:keep], target[:keep]
            valid_left -= keep
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top.eq(target[:, None])
        totals += torch.stack([
            F.cross_entropy(logits, target, reduction="sum").double(),
            hits[:, :1].sum().double(),
            hits.sum().double(),
            torch.tensor(float(len(target)), dtype=torch.float64, device=device),
        ])
        if progress is not None:
            progress.update(1)
    if distributed:
        dist.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "samples": int(count)}
