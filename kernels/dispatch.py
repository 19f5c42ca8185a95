"""Backend selection for the attention ops.

Backends:

* ``"reference"``: the exact dense oracle;
* ``"blocked"``: dense attention per block (:mod:`.blocked`; the native block kernel on CPU tensors,
  batched matmuls elsewhere), for windows that cut the input into disjoint blocks (blocked / window
  attention, windows spanning whole dilation groups); any device;
* ``"native"``: fused C++ kernels for CPU tensors (:mod:`.native`, built on first use);
* ``"tiled"``: query tiles and their key halo through ATen's fused attention (runs on any device);
* ``"triton"``: the fused GPU kernels (on CPU tensors only under ``TRITON_INTERPRET=1``);
* ``"cpu"``: ``"blocked"`` where the windows are disjoint blocks, else ``"native"`` on CPU tensors
  (2-4x faster than ``"tiled"`` on the undilated benchmark shapes of ``tools/bench_kernels.py``),
  else ``"tiled"`` (the native kernel cannot be built, or other devices);
* ``"auto"``: ``"triton"`` for CUDA tensors when triton imports, ``"cpu"`` otherwise.

The process-wide default can be set with the environment variable ``VISIONZOO_ATTN_BACKEND``.
Block-sparse attention has no native or blocked kernel: those names run it tiled.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Iterator, Optional, Tuple

import torch

from . import native
from .checks import NeighborhoodParams
from .indexing import disjoint_blocks

BACKENDS = ("auto", "reference", "cpu", "blocked", "native", "tiled", "triton")

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


@torch.compiler.assume_constant_result  # torch.compile calls it on the (static) geometry instead of tracing it
def _disjoint_blocks(spatial, kernel_size, stride, dilation, is_causal) -> Optional[Tuple[int, ...]]:
    return disjoint_blocks(spatial, NeighborhoodParams(kernel_size, stride, dilation, is_causal))


def resolve_backend(
    requested: Optional[str],
    device: torch.device,
    spatial: Optional[Tuple[int, ...]] = None,
    params: Optional[NeighborhoodParams] = None,
) -> str:
    """Turn ``requested`` (or the thread default) into a concrete backend for ``device``: one of
    ``"reference"``, ``"blocked"``, ``"native"``, ``"tiled"``, ``"triton"``. With the call's
    ``spatial`` size and ``params``, ``"cpu"`` can pick ``"blocked"``; without them it never does."""
    name = _check_name(requested if requested is not None else get_backend())
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "cpu"
    blocks = None
    if params is not None and name in ("cpu", "blocked"):  # only these two look at the geometry
        blocks = _disjoint_blocks(tuple(spatial), params.kernel_size, params.stride, params.dilation, params.is_causal)
    if name == "cpu":
        if blocks is not None:
            return "blocked"
        return "native" if device.type == "cpu" and native.available() else "tiled"
    if name == "blocked" and params is not None and blocks is None:
        raise ValueError(
            "backend='blocked' needs windows that cut the input into disjoint blocks (non-causal; stride == "
            "kernel_size with sizes divisible by kernel_size * dilation, or kernel_size * dilation == size); got "
            f"spatial {list(spatial)}, kernel_size {list(params.kernel_size)}, stride {list(params.stride)}, "
            f"dilation {list(params.dilation)}, is_causal {list(params.is_causal)}"
        )
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
