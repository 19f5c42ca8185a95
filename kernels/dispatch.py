"""Backend names, and the one place that decides which implementation runs a call.

Backends (the ``backend=`` argument of every op, or the thread default of :func:`use_backend`):

* ``"auto"`` (default): ``"cpu"`` for CPU tensors, ``"triton"`` for CUDA tensors when triton
  imports, ``"torch"`` otherwise and wherever the preferred backend is refused
  (:func:`can_run` says why);
* ``"reference"``: the exact dense oracle (:mod:`.reference`), slow, any device;
* ``"cpu"``: the fused C++ kernels (:mod:`.native`, built on first use), CPU tensors only: the
  block kernel where the windows cut the input into disjoint blocks (:mod:`.blocked`), else the
  window kernel;
* ``"torch"``: portable torch ops, any device: dense attention per block where the windows are
  disjoint blocks (:mod:`.blocked`), else query tiles with their key halo through ATen's fused
  attention (:mod:`.portable`);
* ``"triton"``: the fused Triton kernels (:mod:`.triton_na`), CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``.

What runs is an *implementation*, the string the custom ops of :mod:`.ops` receive:
``"cpu:window"``, ``"cpu:blocks"``, ``"torch:tiles"``, ``"torch:blocks"``, ``"triton"`` or
``"reference"``. Tests and benchmarks may pass one of them as ``backend=`` to force it; a forced
implementation that cannot run the call raises with the reason.

The old names stay accepted as aliases of what they ran: ``"native"`` is ``"cpu:window"`` (the C++
window kernel), ``"tiled"`` is ``"torch:tiles"``, and ``"blocked"`` is ``"cpu:blocks"``, or
``"torch:blocks"`` where the C++ kernels cannot run. Block-sparse attention has no C++ kernel:
``"cpu"`` (and the old names) run it as ``"torch:tiles"``.

The selective scan takes the same names (:func:`resolve_scan_backend`): it has one implementation
per backend, ``"reference"``, ``"cpu"``, ``"torch"`` or ``"triton"``.

``VISIONZOO_ATTN_BACKEND`` sets the process-wide default (of both).
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

BACKENDS = ("auto", "reference", "cpu", "torch", "triton")
ALIASES = {"native": "cpu:window", "blocked": "cpu:blocks", "tiled": "torch:tiles"}
IMPLEMENTATIONS = ("reference", "cpu:window", "cpu:blocks", "torch:tiles", "torch:blocks", "triton")

_state = threading.local()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not (name in BACKENDS or name in ALIASES or name in IMPLEMENTATIONS):
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)} "
            f"(old names: {', '.join(f'{old} = {new}' for old, new in ALIASES.items())})"
        )
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
def _disjoint_blocks(spatial, kernel_size, stride, dilation, is_causal, shift) -> Optional[Tuple[int, ...]]:
    return disjoint_blocks(spatial, NeighborhoodParams(kernel_size, stride, dilation, is_causal, shift))


def _blocks(spatial, params) -> bool:
    return params is not None and spatial is not None and _disjoint_blocks(
        tuple(spatial), params.kernel_size, params.stride, params.dilation, params.is_causal, params.shift
    ) is not None


def can_run(backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` (a name, alias or implementation) can run on tensors of ``device``, else the
    reason it cannot, e.g. ``"cpu: the native kernel could not be built: no C++ compiler found"``."""
    backend = ALIASES.get(backend, backend)
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if backend.startswith("cpu"):
        if device.type != "cpu":
            return f"cpu: the C++ kernels run on CPU tensors, got a tensor on {device}"
        if not native.available():
            return f"cpu: the native kernel could not be built: {native.unavailable_reason()}"
    if backend == "triton":
        if not triton_available():
            return "triton: not installed (pip install visionzoo[triton])"
        if device.type == "cpu" and not triton_interpreting():
            return ("triton on CPU tensors needs TRITON_INTERPRET=1 in the environment before triton is "
                    "imported")
        if device.type not in ("cuda", "cpu"):
            return f"triton: runs on CUDA tensors, got a tensor on {device}"
    return None


def _not_blocks(spatial, params) -> str:
    return (
        "the windows do not cut the input into disjoint blocks (non-causal; stride == kernel_size with sizes "
        "divisible by kernel_size * dilation, or kernel_size * dilation == size); got spatial "
        f"{list(spatial)}, kernel_size {list(params.kernel_size)}, stride {list(params.stride)}, dilation "
        f"{list(params.dilation)}, is_causal {list(params.is_causal)}"
    )


def resolve_backend(
    requested: Optional[str],
    device: torch.device,
    spatial: Optional[Tuple[int, ...]] = None,
    params: Optional[NeighborhoodParams] = None,
    block_sparse: bool = False,
) -> str:
    """Turn ``requested`` (or the thread default) into the implementation that runs on ``device``:
    one of :data:`IMPLEMENTATIONS`. ``spatial`` and ``params`` describe a neighborhood call: with
    them, ``cpu`` and ``torch`` pick their block implementation where the windows are disjoint
    blocks; without them they never do. ``block_sparse``: a block-sparse call, which ``cpu`` and
    ``torch`` run as ``"torch:tiles"``. Raises RuntimeError with the reason when a backend that was
    asked for by name cannot run, ValueError for a forced block implementation on windows that are
    not disjoint blocks."""
    name = _check_name(requested if requested is not None else get_backend())
    if name == "blocked" and can_run("cpu", device) is not None:
        name = "torch:blocks"
    name = ALIASES.get(name, name)
    if block_sparse and (name.endswith("blocks") or (device.type == "cpu" and name.startswith("cpu"))):
        return "torch:tiles"  # no C++ block-sparse kernel: its tiles are dense blocks, which ATen runs well
    if name == "auto":
        preferred = "triton" if device.type == "cuda" else "cpu"
        name = preferred if can_run(preferred, device) is None else "torch"
    elif name != "reference":
        reason = can_run(name, device)
        if reason is not None:
            raise RuntimeError(f"backend={requested or get_backend()!r} cannot run: {reason}")
    if name in ("reference", "triton", "cpu:window", "torch:tiles"):
        return name
    if block_sparse:
        return "torch:tiles"
    blocks = _blocks(spatial, params)
    if name in ("cpu:blocks", "torch:blocks"):
        if params is not None and not blocks:
            raise ValueError(f"backend={requested or get_backend()!r} needs disjoint blocks: "
                             f"{_not_blocks(spatial, params)}")
        return name
    if name == "cpu":
        return "cpu:blocks" if blocks else "cpu:window"
    return "torch:blocks" if blocks else "torch:tiles"


SCAN_IMPLEMENTATIONS = ("reference", "cpu", "torch", "triton")


def resolve_scan_backend(requested: Optional[str], device: torch.device) -> str:
    """The implementation of the selective scan that runs on ``device`` for ``requested`` (or the thread
    default): one of :data:`SCAN_IMPLEMENTATIONS`. The scan has one implementation per backend, so an
    attention implementation or old name runs its backend (``"cpu:blocks"`` and ``"native"`` run
    ``"cpu"``, ``"tiled"`` runs ``"torch"``). ``"auto"``: ``"cpu"`` for CPU tensors, ``"triton"`` for
    CUDA tensors, ``"torch"`` where neither can run; a backend named explicitly that cannot run raises
    RuntimeError with :func:`can_run`'s reason."""
    name = _check_name(requested if requested is not None else get_backend())
    if name == "blocked" and can_run("cpu", device) is not None:
        name = "torch"  # the old name ran batched matmuls where the C++ kernels could not run
    name = ALIASES.get(name, name).split(":")[0]
    if name == "auto":
        preferred = "triton" if device.type == "cuda" else "cpu"
        return preferred if can_run(preferred, device) is None else "torch"
    if name != "reference":
        reason = can_run(name, device)
        if reason is not None:
            raise RuntimeError(f"backend={requested or get_backend()!r} cannot run: {reason}")
    return name
