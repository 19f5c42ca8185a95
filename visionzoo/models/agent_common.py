"""What the Agent-Attention families (Agent-Swin, Agent-PVT, Agent-DeiT) share: the pretrained cfg of
the official checkpoints and the builder that sizes a model for the weights' resolution."""
from __future__ import annotations

from typing import Any, Callable, Dict, Type

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .build import build_model, getter_feature_cfg, resolve_cfg

__all__ = ["agent_cfg", "create_agent_model"]

# the official weights on Tsinghua cloud, by file id (a URL that names no file: see build.py)
_URL = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"


def agent_cfg(file_id: str, **kwargs: Any) -> Dict[str, Any]:
    """timm pretrained cfg of an official Agent-Attention checkpoint; ``kwargs`` override the defaults."""
    return {
        "url": _URL.format(file_id),
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
        "license": "unknown",
        "paper_ids": "arXiv:2312.08874",
        "paper_name": "Agent Attention: On the Integration of Softmax and Linear Attention",
        "origin_url": "https://github.com/LeapLabTHU/Agent-Attention",
        **kwargs,
    }


def create_agent_model(
    model_cls: Type[nn.Module],
    variant: str,
    pretrained: bool,
    checkpoint_filter_fn: Callable[..., Dict[str, Any]],
    default_out_indices: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``variant`` with its position embeddings, agent biases and windows sized for the
    weights' resolution unless ``img_size`` is given; features by ``forward_intermediates`` of
    ``out_indices`` (default ``default_out_indices``, or every stage when None: :func:`getter_feature_cfg`)."""
    kwargs.setdefault("img_size", tuple(resolve_cfg(variant, pretrained, kwargs).input_size[-2:]))
    feature_cfg = getter_feature_cfg(kwargs, default_out_indices)
    return build_model(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )
