"""visionzoo.kernels: generalized neighborhood attention (1D/2D/3D), block-sparse attention and
Mamba's selective scan.

The ops (:func:`na1d`, :func:`na2d`, :func:`na3d`, :func:`block_sparse_attention`) take heads-last
tensors ``[B, *spatial, heads, head_dim]`` and a ``backend``: ``"auto"`` (default), ``"reference"``,
``"cpu"`` (fused C++ kernels), ``"torch"`` (portable torch ops, any device) or ``"triton"`` (GPU);
the old names ``"native"``, ``"blocked"`` and ``"tiled"`` still work (aliases of the implementations
they ran).
:mod:`.dispatch` says how a backend is chosen and why one was refused (:func:`can_run`).

Layout, top down:

* ``functional.py``: the public ops; ``checks.py``: argument validation; ``dispatch.py``: backend
  names and the one place that picks an implementation; ``ops.py``: the ``torch.library`` custom
  ops (fake kernels for ``torch.compile``, autograd, FLOP counts) that call it;
* implementations: ``reference.py`` (exact oracle), ``native.py`` (C++ window kernel, and the
  build of ``csrc/``), ``blocked.py`` (windows that are disjoint blocks: C++ block kernel or batched
  matmuls), ``portable.py`` (tiles through ATen's fused attention), ``triton_na.py`` /
  ``triton_block_sparse.py`` (Triton);
* shared: ``indexing.py`` (window index math), ``tiles.py`` (tile shapes of every tiled kernel
  from one work model, and the Triton tiling analysis);
* the selective scan (:func:`selective_scan`, mamba_ssm's ``selective_scan_fn``), the same backends:
  ``selective_scan_functional.py`` (the op and its checks), ``selective_scan_reference.py`` (the
  sequential oracle), ``selective_scan_torch.py`` (chunked scan in torch ops), ``selective_scan_ops.py``
  (custom ops), ``selective_scan_native.py`` + ``csrc/scan_kernels.cpp`` (C++),
  ``selective_scan_triton.py`` (Triton).
"""
from .activations import gelu_tanh
from .batch_norm import batch_norm_act, batch_norm_act_supported
from .checks import NeighborhoodParams, make_params
from .dispatch import ALIASES, BACKENDS, can_run, get_backend, resolve_backend, set_backend, use_backend
from .functional import block_sparse_attention, na1d, na2d, na3d, neighborhood_attention
from .indexing import attention_density, neighborhood_mask, window_bounds
from .selective_scan_functional import selective_scan

__all__ = [
    "batch_norm_act",
    "batch_norm_act_supported",
    "gelu_tanh",
    "ALIASES",
    "BACKENDS",
    "NeighborhoodParams",
    "attention_density",
    "block_sparse_attention",
    "can_run",
    "get_backend",
    "make_params",
    "na1d",
    "na2d",
    "na3d",
    "neighborhood_attention",
    "neighborhood_mask",
    "resolve_backend",
    "selective_scan",
    "set_backend",
    "use_backend",
    "window_bounds",
]
