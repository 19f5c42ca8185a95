"""Backend selection for the attention ops.

Backends:

* ``"reference"``: the exact dense oracle;
* ``"native"``: fused C++ kernels for CPU tensors (:mod:`.native`, built on first use);
* ``"tiled"``: query tiles and their key halo through ATen's fused attention (runs on any device);
* ``"triton"``: the fused GPU kernels (on CPU tensors only under ``TRITON_INTERPRET=1``);
* ``"cpu"``: ``"native"`` on CPU tensors (2-4x faster than ``"tiled"`` on the undilated benchmark
  shapes of ``tools/bench_kernels.py``, about even on the dilated ones); ``"tiled"`` if the native
  kernel cannot be built, or on other devices;
* ``"auto"``: ``"triton"`` for CUDA tensors when triton imports, ``"cpu"`` otherwise.

The process-wide default can be set with the environment variable ``VISIONZOO_ATTN_BACKEND``.
Block-sparse attention has no native kernel: ``"cpu"`` and ``"native"`` run it tiled.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Iterator, Optional

import torch

from . import native

BACKENDS = ("auto", "reference", "cpu", "native", "tiled", "triton")

_state = threading.local()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Set the backend used when an op is called with ``backend=None`` (this thread)."""
    _state.backend = _check_name(name)


def get_backend() -> str:
    backend = getattr(_state, "backend", None)
    if backend is None:
        backend = _check_name(os.environ.get("VISIONZOO_ATTN_BACKEND", "auto"))
    return backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: ``with use_backend("reference"): model(x)``."""
    previous = getattr(_state, "backend", None)
    set_backend(name)
    try:
        yield
    finally:
        _state.backend = previous


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(requested: Optional[str], device: torch.device) -> str:
    """Turn ``requested`` (or the thread default) into a concrete backend for ``device``: one of
    ``"reference"``, ``"native"``, ``"tiled"``, ``"triton"``."""
    name = _check_name(requested if requested is not None else get_backend())
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "cpu"
    if name == "cpu":
        return "native" if device.type == "cpu" and native.available() else "tiled"
    if name == "native":
        if device.type != "cpu":
            raise RuntimeError(f"backend='native' runs on CPU tensors, got a tensor on {device}")
        native.library()  # raises with the reason when the kernel cannot be built
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not installed (pip install visionzoo[triton])")
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "in the environment before triton is imported"
            )
    return name
