"""Input checks for the attention ops, gathered in one place.

Every public op normalises and validates its arguments here, so that a bad call raises a
``ValueError`` naming the argument and the sizes involved instead of computing something wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]


@dataclass(frozen=True)
class NeighborhoodParams:
    """Per-dimension parameters of one generalized neighborhood attention call.

    ``shift`` (default: zeros) offsets the window grid of blocked attention (see
    :func:`~visionzoo.kernels.indexing.window_bounds`)."""

    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    is_causal: Tuple[bool, ...]
    shift: Tuple[int, ...] = ()

    def __post_init__(self):
        if not self.shift:
            object.__setattr__(self, "shift", (0,) * len(self.kernel_size))

    @property
    def num_dims(self) -> int:
        return len(self.kernel_size)


def _as_tuple(name: str, value, num_dims: int, kind: type) -> tuple:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a {kind.__name__} or a tuple of {num_dims} {kind.__name__}s, "
                        f"got the string {value!r}")
    if isinstance(value, (bool, int)) and not isinstance(value, torch.Tensor):
        if kind is int and isinstance(value, bool):
            raise ValueError(f"{name} must be an int or a tuple of {num_dims} ints, got {value!r}")
        return (kind(value),) * num_dims
    try:
        values = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a {kind.__name__} or a tuple of {num_dims}, got {value!r}") from None
    if len(values) != num_dims:
        raise ValueError(f"{name} must have {num_dims} entries (one per spatial dimension), got {values!r}")
    for entry in values:
        if kind is int and (isinstance(entry, bool) or not isinstance(entry, int)):
            raise ValueError(f"{name} entries must be ints, got {values!r}")
        if kind is bool and not isinstance(entry, bool):
            raise ValueError(f"{name} entries must be bools, got {values!r}")
    return values


def make_params(
    num_dims: int,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    shift: IntOrTuple = 0,
) -> NeighborhoodParams:
    """Normalise int/bool or per-dimension arguments into a :class:`NeighborhoodParams`."""
    kernel_size = _as_tuple("kernel_size", kernel_size, num_dims, int)
    stride = _as_tuple("stride", stride, num_dims, int)
    dilation = _as_tuple("dilation", dilation, num_dims, int)
    is_causal = _as_tuple("is_causal", is_causal, num_dims, bool)
    shift = _as_tuple("shift", shift, num_dims, int)
    for dim in range(num_dims):
        if kernel_size[dim] < 1:
            raise ValueError(f"kernel_size must be >= 1 in every dimension, got {kernel_size}")
        if dilation[dim] < 1:
            raise ValueError(f"dilation must be >= 1 in every dimension, got {dilation}")
        if stride[dim] < 1:
            raise ValueError(f"stride must be >= 1 in every dimension, got {stride}")
        if stride[dim] > kernel_size[dim]:
            raise ValueError(
                f"stride must not exceed kernel_size: stride {stride} > kernel_size {kernel_size} "
                f"in dimension {dim}"
            )
        if not 0 <= shift[dim] < kernel_size[dim]:
            raise ValueError(
                f"shift must satisfy 0 <= shift < kernel_size (the window) in every dimension: shift {shift}, "
                f"kernel_size {kernel_size} in dimension {dim}"
            )
        if shift[dim] and (stride[dim] != kernel_size[dim] or dilation[dim] != 1 or is_causal[dim]):
            raise ValueError(
                f"shift offsets the grid of blocked windows: it needs stride == kernel_size, dilation 1 and no "
                f"causal masking where it is nonzero; got shift {shift}, kernel_size {kernel_size}, stride {stride}, "
                f"dilation {dilation}, is_causal {is_causal} in dimension {dim}"
            )
    return NeighborhoodParams(kernel_size, stride, dilation, is_causal, shift)


def check_neighborhood_inputs(
    op_name: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    params: NeighborhoodParams,
    rpb: Optional[torch.Tensor] = None,
) -> None:
    """Validate q/k/v (heads-last ``[B, *spatial, heads, head_dim]``), sizes and the optional rpb."""
    num_dims = params.num_dims
    expected_rank = num_dims + 3
    names = {1: "[B, L, heads, head_dim]", 2: "[B, H, W, heads, head_dim]", 3: "[B, T, H, W, heads, head_dim]"}
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{op_name}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != expected_rank:
            raise ValueError(
                f"{op_name}: {name} must have shape {names[num_dims]} ({expected_rank} dims), "
                f"got shape {tuple(tensor.shape)}"
            )
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            f"{op_name}: query, key and value must have the same shape, got {tuple(query.shape)}, "
            f"{tuple(key.shape)} and {tuple(value.shape)}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"{op_name}: query, key and value must have the same dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not query.is_floating_point():
        raise ValueError(f"{op_name}: inputs must be floating point, got {query.dtype}")
    if query.shape[-1] == 0:
        raise ValueError(f"{op_name}: head_dim (the last dimension of query, key and value) must be >= 1, got 0")
    if not (query.device == key.device == value.device):
        raise ValueError(f"{op_name}: query, key and value must be on one device")
    spatial = tuple(query.shape[1 : 1 + num_dims])
    for dim, (length, kernel, dilation) in enumerate(zip(spatial, params.kernel_size, params.dilation)):
        if kernel * dilation > length:
            raise ValueError(
                f"{op_name}: kernel_size * dilation must not exceed the input size in every dimension; "
                f"dimension {dim} has size {length} but kernel_size {kernel} * dilation {dilation} = "
                f"{kernel * dilation}"
            )
    if rpb is not None:
        heads = query.shape[-2]
        expected = (heads,) + tuple(2 * kernel - 1 for kernel in params.kernel_size)
        if tuple(rpb.shape) != expected:
            raise ValueError(
                f"{op_name}: rpb must have shape [heads, 2*kernel_size-1 per dim] = {list(expected)}, "
                f"got {list(rpb.shape)}"
            )
        if any(stride not in (1, kernel) for stride, kernel in zip(params.stride, params.kernel_size)):
            raise ValueError(
                f"{op_name}: rpb (relative position bias) is defined for stride 1 (neighborhoods) or stride == "
                f"kernel_size (blocked windows) in each dimension, got stride {params.stride}, kernel_size "
                f"{params.kernel_size}"
            )
        if rpb.device != query.device:
            raise ValueError(f"{op_name}: rpb must be on the same device as query")
        if not rpb.is_floating_point():
            raise ValueError(f"{op_name}: rpb must be floating point, got {rpb.dtype}")


def check_block_sparse_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: Union[torch.Tensor, Sequence],
    block_size: IntOrTuple,
) -> Tuple[torch.Tensor, int, int]:
    """Validate block-sparse attention inputs; returns ``(block_mask, q_block, kv_block)``, a nested
    list or tuple of bools given as ``block_mask`` turned into a tensor."""
    op_name = "block_sparse_attention"
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{op_name}: {name} must have shape [B, N, heads, head_dim], got {shape}")
    if key.shape != value.shape:
        raise ValueError(f"{op_name}: key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    if key.shape[0] != query.shape[0] or key.shape[2:] != query.shape[2:]:
        raise ValueError(
            f"{op_name}: query {tuple(query.shape)} and key {tuple(key.shape)} must agree in batch, heads and head_dim"
        )
    if not (query.dtype == key.dtype == value.dtype) or not query.is_floating_point():
        raise ValueError(f"{op_name}: query, key and value must share one floating dtype")
    if query.shape[-1] == 0:
        raise ValueError(f"{op_name}: head_dim (the last dimension of query, key and value) must be >= 1, got 0")
    if isinstance(block_mask, (list, tuple)):
        try:
            block_mask = torch.tensor(block_mask, dtype=torch.bool)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{op_name}: block_mask must be a bool tensor or a nested list of bools: {error}") from None
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"{op_name}: block_mask must be a bool tensor, got {type(block_mask).__name__}")
    if isinstance(block_size, (str, bytes)):
        raise TypeError(f"{op_name}: block_size must be an int or (q_block, kv_block), got the string {block_size!r}")
    if isinstance(block_size, int):
        q_block = kv_block = block_size
    else:
        sizes = tuple(block_size)
        if len(sizes) != 2:
            raise ValueError(f"{op_name}: block_size must be an int or (q_block, kv_block), got {block_size!r}")
        q_block, kv_block = sizes
    if q_block < 1 or kv_block < 1:
        raise ValueError(f"{op_name}: block sizes must be >= 1, got {(q_block, kv_block)}")
    num_q_blocks = -(-query.shape[1] // q_block)
    num_kv_blocks = -(-key.shape[1] // kv_block)
    if block_mask.dtype != torch.bool:
        raise ValueError(f"{op_name}: block_mask must be a bool tensor, got {block_mask.dtype}")
    heads = query.shape[2]
    if block_mask.dim() == 2:
        expected = (num_q_blocks, num_kv_blocks)
    elif block_mask.dim() == 3:
        expected = (heads, num_q_blocks, num_kv_blocks)
    else:
        expected = None
    if expected is None or tuple(block_mask.shape) != expected:
        raise ValueError(
            f"{op_name}: block_mask must have shape [num_q_blocks, num_kv_blocks] = [{num_q_blocks}, {num_kv_blocks}] "
            f"or [heads, num_q_blocks, num_kv_blocks] = [{heads}, {num_q_blocks}, {num_kv_blocks}], "
            f"got {list(block_mask.shape)}"
        )
    return block_mask, q_block, kv_block
