"""Building a registered variant: timm's ``build_model_with_cfg`` with checked pretrained sources."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Optional, Type
from urllib.parse import urlparse

import torch
import torch.nn as nn
from timm.models import PretrainedCfg, build_model_with_cfg, resolve_pretrained_cfg

__all__ = ["build_model", "getter_feature_cfg", "resolve_cfg"]


def resolve_cfg(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> PretrainedCfg:
    """The pretrained cfg ``variant`` is built with, from the ``pretrained_cfg`` / ``pretrained_cfg_overlay`` in ``kwargs``.

    With ``pretrained=True`` a local weights file named by either argument must exist: timm would
    fail later with an empty ``FileNotFoundError``.
    """
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )
    if pretrained and cfg.file and not os.path.isfile(cfg.file):
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        argument = "pretrained_cfg_overlay['file']" if overlay.get("file") else "pretrained_cfg['file']"
        raise FileNotFoundError(f"{argument}: no weights file at {cfg.file!r}")
    return cfg


def getter_feature_cfg(kwargs: Dict[str, Any], default_out_indices: Any = None, **extra: Any) -> Dict[str, Any]:
    """timm's ``feature_cfg`` for ``features_only`` through the model's ``forward_intermediates``.

    ``out_indices`` is popped from the model keyword arguments ``kwargs`` (the model itself does not
    take it); without it, ``default_out_indices``, or when that is None every stage: one per entry of
    ``kwargs['depths']`` (four when the variant gives none). ``extra`` entries are added.
    """
    if default_out_indices is None:
        default_out_indices = tuple(range(len(kwargs.get("depths", (1, 1, 1, 1)))))
    return dict(out_indices=kwargs.pop("out_indices", default_out_indices), feature_cls="getter", **extra)


def _download_unnamed(cfg: PretrainedCfg, kwargs: Dict[str, Any]) -> None:
    """Download weights whose URL names no file (``https://host/f/<id>/?dl=1``) to
    ``<torch hub>/checkpoints/<model>.<tag>.pth`` once and point ``pretrained_cfg_overlay['file']`` at it.

    torch.hub caches a download under the URL path's last component, which is empty for such URLs:
    it would try to load the cache directory itself.
    """
    if cfg.file or cfg.hf_hub_id or not cfg.url or os.path.basename(urlparse(cfg.url).path):
        return
    name = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    path = os.path.join(torch.hub.get_dir(), "checkpoints", f"{name}.pth")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(cfg.url, path, progress=True)
    kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}), "file": path}


def build_model(
    model_cls: Type[nn.Module],
    variant: str,
    pretrained: bool,
    pretrained_filter_fn: Optional[Callable[..., Dict[str, Any]]] = None,
    feature_cfg: Optional[Dict[str, Any]] = None,
    **kwargs: Any,
) -> nn.Module:
    """``build_model_with_cfg`` after :func:`resolve_cfg` checked the pretrained source.

    timm's factory arguments ``device`` and ``dtype`` (``timm.create_model(name, device='meta')``)
    apply to every parameter and buffer the model creates, so model classes need not pass them
    down to each layer.
    """
    cfg = resolve_cfg(variant, pretrained, kwargs)
    if pretrained:
        _download_unnamed(cfg, kwargs)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_model_with_cfg(
            model_cls,
            variant,
            pretrained,
            pretrained_filter_fn=pretrained_filter_fn,
            feature_cfg=feature_cfg,
            **kwargs,
        )
    if dtype is not None:
        model.to(dtype=dtype)
    return model
