"""visionzoo.kernels: generalized neighborhood attention (1D/2D/3D) and block-sparse attention.

Backends behind one dispatcher: an exact dense reference, fused C++ kernels for CPU (built on first
use: tiles of queries against the halo of keys their windows span, and dense attention per block
where the windows are disjoint blocks), a tiled path built
on ATen's fused attention, and fused Triton kernels for GPUs. See :func:`na2d` for the calling
convention and :mod:`visionzoo.kernels.dispatch` for the backends.
"""
from .checks import NeighborhoodParams, make_params
from .dispatch import ALIASES, BACKENDS, can_run, get_backend, resolve_backend, set_backend, use_backend
from .functional import block_sparse_attention, na1d, na2d, na3d, neighborhood_attention
from .indexing import attention_density, neighborhood_mask, window_bounds

__all__ = [
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
    "set_backend",
    "use_backend",
    "window_bounds",
]
