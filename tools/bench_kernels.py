#!/usr/bin/env python
"""Benchmark neighborhood attention implementations against each other in one run.

For each shape: forward and forward+backward time and peak memory of ``backend="cpu"`` ("ours") and
of the implementations it and ``backend="torch"`` choose between (``cpu:blocks``: dense attention per
block where the windows are disjoint blocks, ``cpu:window``: the C++ window kernel, ``torch:tiles``:
tiles through ATen's fused attention), the dense reference, a naive per-query gather, dense SDPA with a
boolean mask, compiled FlexAttention (forward only on CPU) and NATTEN (if installed), plus the "speed
of light": dense unmasked SDPA time x attention density (what a perfectly sparse kernel running at
dense-kernel efficiency would take). Forward+backward is the forward with inputs that require grad
and the backward of its output from a fixed random gradient (what the next layer of a network passes
back), the same for every method.

    python tools/bench_kernels.py                   # the default NAT-like shapes
    python tools/bench_kernels.py --quick           # one small shape, a few seconds
    python tools/bench_kernels.py --markdown perf.md --plot perf.png
    python tools/bench_kernels.py --tiling-only     # GPU tiling analysis, no timing (runs anywhere)
    python tools/bench_kernels.py --device cuda     # GPU: Triton vs FlexAttention vs flash SDPA vs NATTEN
    python tools/bench_kernels.py --isa avx2        # the C++ kernels built for another instruction set
    python tools/bench_kernels.py --selective-scan  # the selective scan at MambaVision's shapes (below)
    OMP_NUM_THREADS=1 python tools/bench_kernels.py --selective-scan --cpu-time  # the same on a busy machine
    python tools/bench_kernels.py --window          # Swin's window attention vs SDPA on pre-cut windows

``--selective-scan`` times ``visionzoo.kernels.selective_scan`` instead: forward and forward+backward
(gradients of every input) at MambaVision's mixer shapes (batch 8, 196 and 49 tokens per window, the
channels of one branch, d_state 8, dt through softplus with its bias, D), for ``cpu`` (the C++ kernel)
and ``torch`` (the chunked scan), or ``triton`` and ``torch`` on CUDA, against the sequential
``reference``, and mambapy's parallel scan (``mambapy.pscan``) when it imports; the ratios are the
reference's time over each method's, measured in the same run.

``--window`` times Swin's (shifted) window attention at Swin-T's four stages (batch 8, 224):
``neighborhood_attention(kernel_size = stride = window, shift, rpb)`` on q / k / v read in place from
the packed ``[B, H, W, 3, heads, D]`` qkv map (``cpu`` and ``torch``), against ATen's SDPA on the same
work with everything else done beforehand and untimed: q / k / v rolled and cut into windows
``[B * windows, heads, 49, D]``, and the bias-plus-shift mask materialised per window. That is the
speed of light of this op (density x dense time is the same work); its forward+backward gives q / k / v
gradients only, while the op also returns the gradient of the bias table.

Peak memory is measured as in ``tools/benchmark.py``: on CPU the growth of the process's peak
resident set (Linux VmHWM, reset before each run), on CUDA ``torch.cuda.max_memory_allocated``.

On CPU the benchmark first raises glibc's mmap and trim thresholds (``mallopt``), so that the
multi-MiB temporaries every method allocates are reused from the heap instead of being returned to
the kernel and page-faulted in again on the next call; with glibc's defaults that page faulting
made repeated timings of one method vary by up to 2x. ``--default-allocator`` leaves glibc alone.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from visionzoo.kernels import (
    NeighborhoodParams,
    selective_scan,
    build,
    attention_density,
    make_params,
    native,
    neighborhood_attention,
    neighborhood_mask,
    resolve_backend,
)
from visionzoo.kernels.indexing import disjoint_blocks
from visionzoo.kernels.portable import tile_plan
from visionzoo.kernels.tiles import tiling_analysis, torch_query_tile

sys.path.insert(0, os.path.dirname(__file__))
from bench_gpu import SHAPES as GPU_SHAPES  # noqa: E402
from bench_gpu import gpu_benchmark_rows  # noqa: E402
from benchmark import PeakMemory  # noqa: E402


@dataclass
class Shape:
    batch: int
    spatial: Tuple[int, ...]
    heads: int
    head_dim: int
    kernel_size: Tuple[int, ...]
    dilation: Tuple[int, ...]

    @property
    def label(self) -> str:
        dims = "x".join(map(str, self.spatial))
        kernel = "x".join(map(str, self.kernel_size))
        text = f"[{self.batch}, {dims}, {self.heads}h, {self.head_dim}] k{kernel}"
        if any(d > 1 for d in self.dilation):
            text += " d" + "x".join(map(str, self.dilation))
        return text


DEFAULT_SHAPES = [
    Shape(2, (56, 56), 4, 32, (7, 7), (1, 1)),
    Shape(8, (56, 56), 2, 32, (7, 7), (1, 1)),
    Shape(8, (28, 28), 4, 32, (7, 7), (4, 4)),
    Shape(8, (14, 14), 8, 32, (7, 7), (2, 2)),
    Shape(2, (8, 16, 16), 2, 32, (3, 5, 5), (1, 1, 1)),
]
QUICK_SHAPES = [Shape(1, (28, 28), 2, 32, (7, 7), (1, 1))]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def steady_allocator() -> bool:
    """Keep freed heap memory in the process (glibc): M_MMAP_THRESHOLD and M_TRIM_THRESHOLD to 1 GiB."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def peak_mib(fn: Callable[[], None], device: torch.device) -> Optional[float]:
    """Peak memory of one call in MiB (see ``tools/benchmark.py``'s :class:`PeakMemory`)."""
    with PeakMemory(device) as memory:
        fn()
    return memory.mib


def samples(fn: Callable[[], None], device: torch.device, min_time: float, max_runs: int,
            clock: Callable[[], float] = time.perf_counter) -> List[float]:
    """Seconds per call of at least 3 calls (up to ``max_runs``, about ``min_time`` in all) after one
    warm-up call, by ``clock`` (wall time; ``time.process_time``: the process's CPU time)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < 3 or time.perf_counter() - start < min_time):
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - begin)
    return times


def median(values: List[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


# ----------------------------------------------------------------------------------------------
# the implementations compared
# ----------------------------------------------------------------------------------------------
def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[B, *spatial, H, D]`` -> ``[B, H, N, D]``."""
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1]).transpose(1, 2)


def make_methods(
    shape: Shape, params: NeighborhoodParams, mask: torch.Tensor, with_flex: bool
) -> Dict[str, Tuple[Callable, bool]]:
    """name -> (fn(q, k, v) -> out, supports backward)."""
    kwargs = dict(kernel_size=shape.kernel_size, dilation=shape.dilation)
    keys_per_query = int(mask[0].sum())
    methods: Dict[str, Tuple[Callable, bool]] = {
        "ours": (lambda q, k, v: neighborhood_attention(q, k, v, backend="cpu", **kwargs), True),
    }
    # the implementations "cpu" and "torch" choose between, each forced
    with_native = mask.device.type == "cpu" and native.available()
    if disjoint_blocks(shape.spatial, params) is not None:
        blocks = "cpu:blocks" if with_native else "torch:blocks"
        methods["ours: " + blocks] = (lambda q, k, v: neighborhood_attention(q, k, v, backend=blocks, **kwargs), True)
    if with_native:
        methods["ours: cpu:window"] = (lambda q, k, v: neighborhood_attention(q, k, v, backend="cpu:window", **kwargs),
                                       True)
    elif mask.device.type == "cpu":
        print("  native CPU kernel unavailable: " + str(native.unavailable_reason()), file=sys.stderr)
    methods["ours: torch:tiles"] = (lambda q, k, v: neighborhood_attention(q, k, v, backend="torch:tiles", **kwargs),
                                    True)
    methods["reference"] = (lambda q, k, v: neighborhood_attention(q, k, v, backend="reference", **kwargs), True)
    if bool((mask.sum(-1) == keys_per_query).all()):
        neighbors = mask.nonzero()[:, 1].view(mask.shape[0], keys_per_query).to(mask.device)

        def gather(q, k, v):
            q, k, v = _flat(q), _flat(k), _flat(v)
            k_n, v_n = k[:, :, neighbors], v[:, :, neighbors]  # [B, H, N, K, D]
            logits = torch.einsum("bhnd,bhnkd->bhnk", q, k_n) * q.shape[-1] ** -0.5
            return torch.einsum("bhnk,bhnkd->bhnd", logits.softmax(-1), v_n)

        methods["gather"] = (gather, True)
    methods["sdpa+mask"] = (lambda q, k, v: F.scaled_dot_product_attention(_flat(q), _flat(k), _flat(v), attn_mask=mask), True)
    if with_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            tokens = mask.shape[0]
            block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: mask[q_idx, kv_idx], None, None, tokens, tokens,
                                           device=str(mask.device))
            compiled = torch.compile(flex_attention, dynamic=False)
            on_cpu = mask.device.type == "cpu"  # FlexAttention has no backward on CPU
            methods["flex (compiled)"] = (lambda q, k, v: compiled(_flat(q), _flat(k), _flat(v), block_mask=block_mask),
                                          not on_cpu)
        except Exception as error:  # pragma: no cover - depends on the torch build
            print(f"  FlexAttention unavailable: {error}", file=sys.stderr)
    try:
        import natten  # noqa: F401
        from natten.functional import neighborhood_attention_generic

        methods["natten"] = (
            lambda q, k, v: neighborhood_attention_generic(q, k, v, kernel_size=shape.kernel_size,
                                                           dilation=shape.dilation),
            mask.device.type == "cuda",
        )
    except Exception:
        pass
    return methods


@dataclass
class Row:
    shape: Shape
    method: str
    forward: Optional[float] = None
    forward_backward: Optional[float] = None
    memory_forward: Optional[float] = None
    memory_forward_backward: Optional[float] = None
    notes: List[str] = field(default_factory=list)


def bench_shape(shape: Shape, device: torch.device, dtype: torch.dtype, args) -> Tuple[List[Row], Dict[str, float]]:
    params = make_params(len(shape.spatial), shape.kernel_size, 1, shape.dilation, False)
    mask = neighborhood_mask(shape.spatial, params).to(device)
    size = (shape.batch, *shape.spatial, shape.heads, shape.head_dim)
    q, k, v = (torch.randn(size, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    q_plain, k_plain, v_plain = q.detach(), k.detach(), v.detach()  # compiled FlexAttention on CPU refuses grad inputs
    skip = set(args.skip or [])
    methods = {
        name: method for name, method in make_methods(shape, params, mask, with_flex="flex" not in skip).items()
        if name not in skip and not (name == "reference" and math.prod(shape.spatial) > args.max_reference_tokens)
    }

    def runners(fn: Callable, has_backward: bool) -> Tuple[Callable[[], None], Optional[Callable[[], None]]]:
        def forward():
            with torch.no_grad():
                fn(q_plain, k_plain, v_plain)

        grads = {}

        def forward_backward():
            out = fn(q, k, v)
            grad = grads.get(out.shape)
            if grad is None:  # a fixed output gradient, as the next layer would pass back
                grad = grads[out.shape] = torch.randn(out.shape, device=out.device, dtype=out.dtype)
            out.backward(grad)
            q.grad = k.grad = v.grad = None

        return forward, (forward_backward if has_backward else None)

    # the speed of light: dense (unmasked) SDPA, scaled by the density of the neighborhood mask below
    dense = (lambda q, k, v: F.scaled_dot_product_attention(_flat(q), _flat(k), _flat(v)), True)
    timings = {name: runners(*method) for name, method in {**methods, "dense": dense}.items()}
    # methods take turns over the rounds, so that a slow spell of a shared machine hits them all alike
    measured = {name: ([], []) for name in timings}
    for _ in range(args.rounds):
        for name, (forward, forward_backward) in timings.items():
            measured[name][0].extend(samples(forward, device, args.min_time / args.rounds, args.max_runs))
            if forward_backward is not None:
                measured[name][1].extend(samples(forward_backward, device, args.min_time / args.rounds, args.max_runs))
    rows = []
    for name in methods:
        forward, forward_backward = timings[name]
        row = Row(shape, name, forward=median(measured[name][0]), memory_forward=peak_mib(forward, device))
        if forward_backward is not None:
            row.forward_backward = median(measured[name][1])
            row.memory_forward_backward = peak_mib(forward_backward, device)
        rows.append(row)
        print(f"  {name:16s} fwd {row.forward * 1e3:9.2f} ms   fwd+bwd "
              + (f"{row.forward_backward * 1e3:9.2f} ms" if row.forward_backward else "      n/a"), file=sys.stderr)

    density = attention_density(shape.spatial, params)
    plan = tile_plan(shape.spatial, params, torch_query_tile(shape.spatial, params), False)
    light = {
        "density": density,
        "forward": median(measured["dense"][0]) * density,
        "forward_backward": median(measured["dense"][1]) * density,
        "halo": plan.kv_slots / plan.keys_per_query,
        "q_tile": torch_query_tile(shape.spatial, params),
        "path": resolve_backend("cpu", device, shape.spatial, params),
    }
    return rows, light


def _ms(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value * 1e3:.1f}"


def _mb(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def render(results, device_name: str) -> str:
    lines = [
        f"Device: {device_name}; torch {torch.__version__}; times are medians in ms, memory is peak MiB.",
        "",
        "| shape | method | fwd ms | fwd+bwd ms | fwd MiB | fwd+bwd MiB | ours faster (fwd / fwd+bwd) |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = [
        "",
        "| shape | ours runs | density | speed of light fwd / fwd+bwd ms | ours / light (fwd, fwd+bwd) | best alternative fwd+bwd | ours faster | tiled halo |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rows, light in results:
        ours = next(row for row in rows if row.method == "ours")
        for row in rows:
            ratio_f = ratio_fb = "-"
            if row is not ours:
                ratio_f = f"{row.forward / ours.forward:.1f}x"
                if row.forward_backward and ours.forward_backward:
                    ratio_fb = f"{row.forward_backward / ours.forward_backward:.1f}x"
            lines.append(
                f"| {row.shape.label} | {row.method} | {_ms(row.forward)} | {_ms(row.forward_backward)} | "
                f"{_mb(row.memory_forward)} | {_mb(row.memory_forward_backward)} | {ratio_f} / {ratio_fb} |"
            )
        alternatives = [r for r in rows if not r.method.startswith("ours") and r.method != "reference" and r.forward_backward]
        best = min(alternatives, key=lambda r: r.forward_backward) if alternatives else None
        summary.append(
            f"| {ours.shape.label} | {light['path']} | {light['density'] * 100:.2f}% | {light['forward'] * 1e3:.2f} / "
            f"{light['forward_backward'] * 1e3:.2f} | {ours.forward / light['forward']:.1f}x, "
            f"{ours.forward_backward / light['forward_backward']:.1f}x | "
            + (f"{best.method} {_ms(best.forward_backward)} ms | {best.forward_backward / ours.forward_backward:.1f}x"
               if best else "- | -")
            + f" | {light['halo']:.2f}x keys (q tile {'x'.join(map(str, light['q_tile']))}) |"
        )
    notes = [
        "",
        "'ours' is backend='cpu', which runs the implementation named in 'ours runs'. 'cpu:blocks' (windows",
        "that cut the input into disjoint blocks, e.g. whole dilation groups) is dense attention per block: no",
        "extra pairs,",
        "register-blocked GEMMs near the FMA peak; what is left is memory traffic (q, k, v, dO in, the",
        "gradients out: the bytes dense attention moves too, which sparsity does not reduce) and the softmax,",
        "so at high density (25% at 14x14 d2) it gains less over dense than the density suggests. 'cpu:window' runs",
        "tiles of one vector of queries (16 float32 on AVX-512, 8 on AVX2) against the halo of keys their windows",
        "span, with GEMMs near the FMA peak, but about half of those pairs are masked out (49 of 100 keys for 7x7",
        "windows and 4x4 tiles, 75 of 192 in 3D), and the masked softmax, gathers and writes around the GEMMs take about as long again.",
        "Speed of light = dense unmasked SDPA time x attention density. 'tiled halo' is the keys a query",
        "tile of torch:tiles computes per query over the keys it needs (that path's extra work).",
    ]
    return "\n".join(lines + summary + notes)


def render_tiling() -> str:
    """The Triton kernels' GNA tiling for every GPU benchmark shape: KV tiles visited per query tile
    against the minimum and the dense count, and the speed-of-light bound that follows."""
    lines = [
        "GPU tiling (Triton kernels; per batch and head):",
        "",
        "| shape | q tile | kv tile | KV tiles visited max / mean | min to cover a window | dense | bound (dense / max) | 1/density |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, shape, kwargs in GPU_SHAPES:
        spatial = shape[1:-2]
        params = make_params(len(spatial), **kwargs)
        info = tiling_analysis(spatial, params)
        lines.append(
            f"| {name} {list(shape)} {kwargs} | {'x'.join(map(str, info['q_tile']))} | "
            f"{'x'.join(map(str, info['kv_tile']))} | {info['kv_tiles_visited_max']} / "
            f"{info['kv_tiles_visited_mean']:.1f} | {info['kv_tiles_min']} | {info['dense_kv_tiles']} | "
            f"{info['speed_of_light']:.1f}x | {info['mask_bound']:.1f}x |"
        )
    return "\n".join(lines)


def render_gpu(rows, device_name: str) -> str:
    lines = [
        f"Device: {device_name}; torch {torch.__version__}; fp16; times in ms; 'vs light' = time / (dense flash x density).",
        "",
        "| shape | method | fwd ms | fwd+bwd ms | fwd vs light | fwd+bwd vs light |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row["name"], row["method"]]
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_vs_sol", "fwd_bwd_vs_sol"):
            value = row.get(key)
            cells.append(f"{value:.2f}" if isinstance(value, float) else row.get("error", "-")[:60] if key == "fwd_ms" else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for axis, attribute, title in ((axes[0], "forward", "forward"), (axes[1], "forward_backward", "forward + backward")):
        labels = [rows[0].shape.label for rows, _ in results]
        methods = sorted({row.method for rows, _ in results for row in rows}, key=lambda m: (m != "ours", m))
        width = 0.8 / len(methods)
        for index, method in enumerate(methods):
            values = []
            for rows, _ in results:
                row = next((r for r in rows if r.method == method), None)
                value = getattr(row, attribute) if row else None
                values.append(value * 1e3 if value else 0.0)
            axis.bar([i + index * width for i in range(len(labels))], values, width, label=method)
        light = [light[attribute] * 1e3 for _, light in results]
        axis.scatter([i + 0.4 - width / 2 for i in range(len(labels))], light, marker="_", s=400, color="black",
                     label="speed of light", zorder=3)
        axis.set_yscale("log")
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=20, ha="right", fontsize=7)
        axis.set_ylabel("ms (log)")
        axis.set_title(title)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------
# the selective scan
# ----------------------------------------------------------------------------------------------
@dataclass
class ScanShape:
    batch: int
    dim: int
    length: int
    d_state: int = 8
    note: str = ""

    @property
    def label(self) -> str:
        return f"[{self.batch}, {self.dim}, L {self.length}] N {self.d_state}" + (f" ({self.note})" if self.note else "")


SCAN_SHAPES = [
    ScanShape(8, 80, 196),
    ScanShape(8, 160, 196, note="MambaVision-T stage 3"),
    ScanShape(8, 392, 196, note="-L stage 3"),
    ScanShape(8, 320, 49, note="-T stage 4"),
    ScanShape(8, 640, 49),
]
QUICK_SCAN_SHAPES = [ScanShape(2, 64, 49)]


def _mambapy_scan():
    """mambapy's Mamba scan (its ``selective_scan``: exp(dt A) and dt B u per step, ``pscan`` over the
    sequence, then C), in our layout; None when mambapy does not import."""
    try:
        from mambapy.pscan import pscan
    except ImportError:
        return None

    def scan(u, delta, A, B, C, D, delta_bias):
        dt = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)  # [batch, L, dim]
        x = u.transpose(1, 2)
        states = pscan(torch.exp(dt[..., None] * A), dt[..., None] * B.transpose(1, 2)[:, :, None] * x[..., None])
        return ((states @ C.transpose(1, 2)[..., None]).squeeze(-1) + D * x).transpose(1, 2)

    return scan


def bench_selective_scan(device: torch.device, args) -> str:
    shapes = QUICK_SCAN_SHAPES if args.quick else SCAN_SHAPES
    ours = ["triton", "torch"] if device.type == "cuda" else (["cpu", "torch"] if native.available() else ["torch"])
    methods = {name: functools.partial(_scan_call, backend=name) for name in ours + ["reference"]}
    mambapy = _mambapy_scan()
    if mambapy is not None:
        methods["mambapy pscan"] = mambapy
    methods = {name: fn for name, fn in methods.items() if name not in set(args.skip or [])}
    lines = [
        "| shape | method | fwd ms | fwd+bwd ms | reference / method (fwd) | (fwd+bwd) |",
        "|---|---|---|---|---|---|",
    ]
    for index, shape in enumerate(shapes):
        print(f"[{index + 1}/{len(shapes)}] selective scan {shape.label}", file=sys.stderr)
        generator = torch.Generator().manual_seed(index)

        def rand(*size, scale=1.0):
            return (torch.randn(*size, generator=generator) * scale).to(device)

        b, d, length, n = shape.batch, shape.dim, shape.length, shape.d_state
        inputs = [rand(b, d, length), rand(b, d, length, scale=0.5),
                  -torch.arange(1, n + 1, dtype=torch.float32, device=device).repeat(d, 1), rand(b, n, length),
                  rand(b, n, length), rand(d), rand(d, scale=0.5)]
        leaves = [x.clone().requires_grad_() for x in inputs]
        grad = rand(b, d, length)

        def runners(fn):
            def forward():
                with torch.no_grad():
                    fn(*inputs)

            def forward_backward():
                fn(*leaves).backward(grad)
                for leaf in leaves:
                    leaf.grad = None

            return forward, forward_backward

        timings = {name: runners(fn) for name, fn in methods.items()}
        measured = {name: ([], []) for name in timings}
        clock = time.process_time if args.cpu_time else time.perf_counter
        for _ in range(args.rounds):  # the methods take turns, as above
            for name, (forward, forward_backward) in timings.items():
                for target, fn in zip(measured[name], (forward, forward_backward)):
                    target.extend(samples(fn, device, args.min_time / args.rounds, args.max_runs, clock))
        reference = [median(m) for m in measured["reference"]] if "reference" in measured else None
        for name in timings:
            fwd, fwd_bwd = (median(m) for m in measured[name])
            ratios = (f"{reference[0] / fwd:.1f}x | {reference[1] / fwd_bwd:.1f}x" if reference else "n/a | n/a")
            lines.append(f"| {shape.label} | {name} | {fwd * 1e3:.2f} | {fwd_bwd * 1e3:.2f} | {ratios} |")
            print(f"  {name:14s} fwd {fwd * 1e3:9.2f} ms   fwd+bwd {fwd_bwd * 1e3:9.2f} ms", file=sys.stderr)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Swin's (shifted) window attention
# ----------------------------------------------------------------------------------------------
@dataclass
class WindowShape:
    batch: int
    size: int
    heads: int
    window: int
    shift: int
    head_dim: int = 32
    note: str = ""

    @property
    def label(self) -> str:
        text = f"[{self.batch}, {self.size}x{self.size}, {self.heads}h, {self.head_dim}] w{self.window}"
        return text + (f" shift {self.shift}" if self.shift else "") + (f" ({self.note})" if self.note else "")


# Swin-T's four stages at 224, batch 8 (the last stage is one window and never shifts)
WINDOW_SHAPES = [
    WindowShape(8, 56, 3, 7, 0, note="Swin-T stage 1"),
    WindowShape(8, 56, 3, 7, 3),
    WindowShape(8, 28, 6, 7, 0, note="stage 2"),
    WindowShape(8, 28, 6, 7, 3),
    WindowShape(8, 14, 12, 7, 0, note="stage 3"),
    WindowShape(8, 14, 12, 7, 3),
    WindowShape(8, 7, 24, 7, 0, note="stage 4"),
]
QUICK_WINDOW_SHAPES = [WindowShape(2, 14, 2, 7, 3)]


def _cut_windows(x: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """``[B, S, S, heads, D]`` -> ``[B * windows, heads, window**2, D]`` after Swin's cyclic roll by ``-shift``."""
    batch, size, _, heads, dim = x.shape
    if shift:
        x = x.roll((-shift, -shift), dims=(1, 2))
    cells = size // window
    x = x.reshape(batch, cells, window, cells, window, heads, dim).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(batch * cells * cells, heads, window * window, dim).contiguous()


def _window_mask(shape: WindowShape, rpb: torch.Tensor) -> torch.Tensor:
    """Swin's additive mask on the cut windows: the relative position bias (query minus key offsets of
    the table read at key minus query, as the op reads it) plus -100 between regions of a shifted window."""
    window, cells = shape.window, shape.size // shape.window
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offset = coords[:, None, :] - coords[:, :, None] + window - 1  # [2, query, key]: key minus query
    bias = rpb[:, offset[0], offset[1]]  # [heads, N, N]
    region = torch.zeros(shape.size, shape.size, dtype=torch.long)
    if shape.shift:
        bounds = (0, shape.size - window, shape.size - shape.shift, shape.size)
        for i, (top, bottom) in enumerate(zip(bounds, bounds[1:])):
            for j, (left, right) in enumerate(zip(bounds, bounds[1:])):
                region[top:bottom, left:right] = 3 * i + j
    region = region.reshape(cells, window, cells, window).transpose(1, 2).reshape(cells * cells, window * window)
    apart = (region[:, :, None] != region[:, None, :]).to(rpb.dtype) * -100.0  # [windows, N, N]
    mask = bias[None] + apart[:, None]  # [windows, heads, N, N]
    return mask.repeat(shape.batch, 1, 1, 1)


def _check_window_equal(shape: WindowShape, qkv, rpb, cut, mask, scale, backends) -> None:
    """The methods timed compute the same attention: SDPA's windows put back equal the op's output."""
    batch, size, window, cells = shape.batch, shape.size, shape.window, shape.size // shape.window
    with torch.no_grad():
        out = F.scaled_dot_product_attention(*cut, attn_mask=mask, scale=scale)
        out = out.reshape(batch, cells, cells, shape.heads, window, window, shape.head_dim)
        out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, size, size, shape.heads, shape.head_dim)
        out = out.roll((shape.shift, shape.shift), dims=(1, 2))
        for backend in backends:
            ours = neighborhood_attention(*qkv.unbind(3), kernel_size=window, stride=window, shift=shape.shift,
                                          rpb=rpb, scale=scale, backend=backend)
            torch.testing.assert_close(ours, out, rtol=1e-4, atol=1e-4, msg=f"{backend} vs SDPA on {shape.label}")


def bench_window(device: torch.device, args) -> str:
    """Swin's window attention: ``na2d(kernel_size = stride = window, shift, rpb)`` on q / k / v read in
    place from the packed qkv map, against SDPA on windows cut beforehand with the mask built beforehand
    (the copies and the mask are not timed: the dense kernel doing only the work the windows need)."""
    shapes = QUICK_WINDOW_SHAPES if args.quick else WINDOW_SHAPES
    backends = ["cpu", "torch"] if native.available() else ["torch"]
    backends = [name for name in backends if name not in set(args.skip or [])]
    lines = [
        "| shape | method | fwd ms | fwd+bwd ms | method / SDPA on cut windows (fwd, fwd+bwd) |",
        "|---|---|---|---|---|",
    ]
    clock = time.process_time if args.cpu_time else time.perf_counter
    for index, shape in enumerate(shapes):
        print(f"[{index + 1}/{len(shapes)}] window attention {shape.label}", file=sys.stderr)
        generator = torch.Generator().manual_seed(index)
        size, heads, dim = shape.size, shape.heads, shape.head_dim
        qkv = torch.randn(shape.batch, size, size, 3, heads, dim, generator=generator).to(device)
        rpb = torch.randn(heads, 2 * shape.window - 1, 2 * shape.window - 1, generator=generator).to(device)
        grad = torch.randn(shape.batch, size, size, heads, dim, generator=generator).to(device)
        cut = [_cut_windows(x, shape.window, shape.shift) for x in qkv.unbind(3)]
        cut_grad = torch.randn_like(cut[0])
        mask = _window_mask(shape, rpb)
        scale = dim ** -0.5
        _check_window_equal(shape, qkv, rpb, cut, mask, scale, backends)

        def ours(backend):
            leaf_qkv, leaf_rpb = qkv.clone().requires_grad_(), rpb.clone().requires_grad_()

            def forward():
                with torch.no_grad():
                    q, k, v = qkv.unbind(3)
                    neighborhood_attention(q, k, v, kernel_size=shape.window, stride=shape.window, shift=shape.shift,
                                           rpb=rpb, scale=scale, backend=backend)

            def forward_backward():
                q, k, v = leaf_qkv.unbind(3)
                neighborhood_attention(q, k, v, kernel_size=shape.window, stride=shape.window, shift=shape.shift,
                                       rpb=leaf_rpb, scale=scale, backend=backend).backward(grad)
                leaf_qkv.grad = leaf_rpb.grad = None

            return forward, forward_backward

        def sdpa_cut():
            leaves = [x.clone().requires_grad_() for x in cut]

            def forward():
                with torch.no_grad():
                    F.scaled_dot_product_attention(*cut, attn_mask=mask, scale=scale)

            def forward_backward():
                F.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=scale).backward(cut_grad)
                for leaf in leaves:
                    leaf.grad = None

            return forward, forward_backward

        timings = {f"ours: {name}": ours(name) for name in backends}
        timings["SDPA on cut windows"] = sdpa_cut()
        measured = {name: ([], []) for name in timings}
        for _ in range(args.rounds):  # the methods take turns
            for name, (forward, forward_backward) in timings.items():
                for target, fn in zip(measured[name], (forward, forward_backward)):
                    target.extend(samples(fn, device, args.min_time / args.rounds, args.max_runs, clock))
        light = [median(m) for m in measured["SDPA on cut windows"]]
        for name in timings:
            fwd, fwd_bwd = (median(m) for m in measured[name])
            lines.append(f"| {shape.label} | {name} | {fwd * 1e3:.2f} | {fwd_bwd * 1e3:.2f} | "
                         f"{fwd / light[0]:.2f}x, {fwd_bwd / light[1]:.2f}x |")
            print(f"  {name:20s} fwd {fwd * 1e3:9.2f} ms   fwd+bwd {fwd_bwd * 1e3:9.2f} ms", file=sys.stderr)
    return "\n".join(lines)


def _scan_call(u, delta, A, B, C, D, delta_bias, backend):
    return selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True, backend=backend)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="one small shape")
    parser.add_argument("--skip", nargs="*", help="methods to leave out (e.g. flex reference)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per method (all rounds)")
    parser.add_argument("--max-runs", type=int, default=20, help="timed calls per method and round at most")
    parser.add_argument("--rounds", type=int, default=3,
                        help="methods take turns this many times; the time is the median over all calls")
    parser.add_argument("--max-reference-tokens", type=int, default=4096, help="skip the dense reference above this")
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--plot", help="write a bar chart (PNG) to this file")
    parser.add_argument("--tiling-only", action="store_true", help="print the GPU tiling analysis and stop")
    parser.add_argument("--isa", choices=build.ISAS,
                        help="instruction set of the C++ kernels (default: the best this CPU executes)")
    parser.add_argument("--selective-scan", action="store_true",
                        help="time the selective scan at MambaVision's shapes instead (see above)")
    parser.add_argument("--window", action="store_true",
                        help="time Swin's (shifted) window attention against SDPA on pre-cut windows instead (see above)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="--selective-scan / --window: time by the process's CPU time (all threads) instead of wall time, "
                             "which a busy shared machine inflates for calls longer than a scheduler time slice")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc thresholds alone (see the module docstring)")
    args = parser.parse_args(argv)
    if args.isa:
        os.environ["VISIONZOO_NATIVE_ISA"] = args.isa

    if args.selective_scan or args.window:
        device = torch.device(args.device)
        if device.type == "cuda":
            device_name = torch.cuda.get_device_name(device)
        else:
            isa = native.isa() if native.available() else "unavailable"
            device_name = f"CPU {cpu_model()}, C++ kernels for {isa}, {torch.get_num_threads()} threads"
            if not args.default_allocator and steady_allocator():
                device_name += "; glibc malloc thresholds raised (freed buffers are reused)"
        clock = "process CPU time" if args.cpu_time else "wall time"
        title, bench = ("Window attention", bench_window) if args.window else ("Selective scan", bench_selective_scan)
        text = (f"{title}. Device: {device_name}; torch {torch.__version__}; float32, medians in ms of "
                f"{clock}.\n\n"
                + bench(device, args))
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as handle:
                handle.write(text + "\n")
        return

    tiling = render_tiling()
    if args.tiling_only:
        print(tiling)
        return

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        text = render_gpu(gpu_benchmark_rows(), torch.cuda.get_device_name(device)) + "\n\n" + tiling
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as handle:
                handle.write(text + "\n")
        return
    shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    if device.type == "cpu":
        isa = native.isa() if native.available() else "unavailable"
        device_name = f"CPU {cpu_model()}, C++ kernels for {isa}, {torch.get_num_threads()} threads"
        if not args.default_allocator and steady_allocator():
            device_name += "; glibc malloc thresholds raised (freed buffers are reused)"
    else:
        device_name = torch.cuda.get_device_name(device)
    results = []
    for index, shape in enumerate(shapes):
        print(f"[{index + 1}/{len(shapes)}] {shape.label}", file=sys.stderr)
        results.append(bench_shape(shape, device, dtype, args))
    text = render(results, device_name) + "\n\n" + tiling
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")
    if args.plot:
        plot(results, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
