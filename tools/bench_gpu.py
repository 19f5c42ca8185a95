"""GPU timings of neighborhood attention: the Triton kernels against FlexAttention, dense flash
attention (SDPA) and NATTEN, forward and forward+backward, in fp16.

``gpu_benchmark_rows()`` returns one dict per (shape, method); ``tools/bench_kernels.py`` prints
them. The speed of light of a shape is the dense flash time scaled by the attention density (the
fraction of the N x N logits the neighborhood keeps); ``*_vs_sol`` is time / speed of light (1.0 =
as fast as a perfectly sparse flash kernel). Imports without CUDA; running needs a GPU.

    python tools/bench_gpu.py
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from visionzoo.kernels import attention_density, make_params, neighborhood_attention, window_bounds

# (name, [B, *spatial, heads, head_dim], neighborhood arguments): NAT/DiNAT stages at batch 64
# (224 px), a large image and a video clip.
SHAPES = [
    ("nat stage 1", (64, 56, 56, 2, 32), dict(kernel_size=7)),
    ("dinat stage 1", (64, 56, 56, 2, 32), dict(kernel_size=7, dilation=8)),
    ("nat stage 2", (64, 28, 28, 4, 32), dict(kernel_size=7)),
    ("dinat stage 2", (64, 28, 28, 4, 32), dict(kernel_size=7, dilation=4)),
    ("nat stage 3", (64, 14, 14, 8, 32), dict(kernel_size=7)),
    ("dinat stage 3", (64, 14, 14, 8, 32), dict(kernel_size=7, dilation=2)),
    ("nat stage 4", (64, 7, 7, 16, 32), dict(kernel_size=7)),
    ("large image", (4, 128, 128, 4, 64), dict(kernel_size=13)),
    ("video", (4, 16, 32, 32, 4, 64), dict(kernel_size=(3, 7, 7))),
]


def _time_ms(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = ()) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_to_none)))


def flex_mask_mod(spatial: Sequence[int], params, device="cuda"):
    """FlexAttention mask_mod of the neighborhood, from the same index math as every backend."""
    tables = []
    for dim, length in enumerate(spatial):
        group, coord, start, end = window_bounds(length, params.kernel_size[dim], params.stride[dim],
                                                 params.dilation[dim], params.is_causal[dim], params.shift[dim])
        tables.append([t.to(device) for t in (group, coord, start, end)])

    def mask_mod(b, h, q_idx, kv_idx):
        keep = None
        q_rest, kv_rest = q_idx, kv_idx
        for dim in reversed(range(len(spatial))):  # row-major flattening: last dimension fastest
            group, coord, start, end = tables[dim]
            q_pos, kv_pos = q_rest % spatial[dim], kv_rest % spatial[dim]
            q_rest, kv_rest = q_rest // spatial[dim], kv_rest // spatial[dim]
            ok = (group[q_pos] == group[kv_pos]) & (coord[kv_pos] >= start[q_pos]) & (coord[kv_pos] < end[q_pos])
            keep = ok if keep is None else keep & ok
        return keep

    return mask_mod


def _natten_fn(num_dims: int) -> Optional[Callable]:
    try:
        import natten
    except Exception:
        return None
    functional = getattr(natten, "functional", natten)
    return getattr(functional, f"na{num_dims}d", None) or getattr(natten, f"na{num_dims}d", None)


def _methods(shape, kwargs) -> Dict[str, Callable]:
    """Method name -> builder returning (forward fn on fresh inputs, inputs that carry grads)."""
    batch, *spatial, heads, head_dim = shape
    tokens = math.prod(spatial)
    params = make_params(len(spatial), **kwargs)

    def heads_last():
        return [torch.randn(shape, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3)]

    def heads_first():  # [B, heads, N, D], the layout flex and SDPA want (conversion not timed)
        return [torch.randn(batch, heads, tokens, head_dim, device="cuda", dtype=torch.float16, requires_grad=True)
                for _ in range(3)]

    def triton():
        q, k, v = heads_last()
        return (lambda: neighborhood_attention(q, k, v, backend="triton", **kwargs)), (q, k, v)

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(flex_mask_mod(spatial, params), None, None, tokens, tokens, device="cuda",
                                       _compile=True)
        compiled = torch.compile(flex_attention)
        q, k, v = heads_first()
        return (lambda: compiled(q, k, v, block_mask=block_mask)), (q, k, v)

    def sdpa_dense():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = heads_first()

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        return run, (q, k, v)

    methods = {"triton": triton, "flex": flex, "sdpa_dense": sdpa_dense}
    natten_fn = _natten_fn(len(spatial))
    if natten_fn is not None:
        def natten():
            q, k, v = heads_last()
            return (lambda: natten_fn(q, k, v, **kwargs)), (q, k, v)

        methods["natten"] = natten
    return methods


def _measure(builder) -> Dict[str, float]:
    forward, inputs = builder()
    out = forward()
    grad = torch.randn_like(out)

    def forward_backward():
        forward().backward(grad)

    def forward_only():
        with torch.no_grad():
            forward()

    return {"fwd_ms": _time_ms(forward_only), "fwd_bwd_ms": _time_ms(forward_backward, inputs)}


def gpu_benchmark_rows(shapes=SHAPES) -> List[Dict[str, object]]:
    """Time every method on every shape (fp16, CUDA). A method that fails (not installed, out of
    memory, unsupported) gets ``error`` instead of times. Raises RuntimeError without CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("gpu_benchmark_rows needs a CUDA device")
    rows = []
    for name, shape, kwargs in shapes:
        spatial = shape[1:-2]
        density = attention_density(spatial, make_params(len(spatial), **kwargs))
        results = {}
        for method, builder in _methods(shape, kwargs).items():
            try:
                results[method] = _measure(builder)
            except Exception as error:  # keep the table going: report the failure in the row
                results[method] = {"error": f"{type(error).__name__}: {str(error)[:160]}"}
            torch.cuda.empty_cache()
        dense = results.get("sdpa_dense", {})
        for method, result in results.items():
            row = {"name": name, "shape": list(shape), **kwargs, "density": density, "method": method, **result}
            for key in ("fwd_ms", "fwd_bwd_ms"):
                if key in result and key in dense:
                    row[key.replace("_ms", "_vs_sol")] = result[key] / (dense[key] * density)
            rows.append(row)
    return rows


def main() -> None:
    columns = ("name", "method", "fwd_ms", "fwd_bwd_ms", "fwd_vs_sol", "fwd_bwd_vs_sol")
    print(" | ".join(columns))
    for row in gpu_benchmark_rows():
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns]
        print(" | ".join(cells) + (f"  ({row['error']})" if "error" in row else ""))


if __name__ == "__main__":
    main()
