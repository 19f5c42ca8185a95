#!/usr/bin/env python
"""Benchmark registered models: params, FLOPs, inference / training throughput, latency, peak memory.

    python tools/benchmark.py                                  # every visionzoo_* model, defaults
    python tools/benchmark.py --models 'visionzoo_nat_*' --img-size 64 128 224 --dtype float32 bfloat16
    python tools/benchmark.py --models visionzoo_nat_m --img-size 224 --batch-size 8 --update-cards
    python tools/benchmark.py --compare swin_tiny_patch4_window7_224 visionzoo_swin_t --img-size 224 --same-weights

Per (model, resolution, dtype) it measures, in one process and one run:
  * params; GMACs of one forward pass (multiply-accumulates, the papers' "FLOPs"; ``gflops`` in the
    CSV is twice that), counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device.
    The attention custom ops carry FLOP formulas (``visionzoo.kernels.ops``): neighborhood attention
    4 * B * tokens * heads * head_dim * prod(kernel) FLOPs (QK^T and AV); block-sparse attention is
    counted from its block mask, which needs values, so such a model is counted on real CPU tensors;
  * inference throughput (img/s at ``--batch-size``, ``torch.no_grad``) and latency (median ms at batch 1);
  * training throughput (forward + backward + AdamW step, img/s);
  * peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the growth of the process's
    peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before each pass),
    which also counts allocator slack.
bfloat16 / float16 run under ``torch.autocast`` (weights stay float32).

``--compare A B`` instead runs two models in turns in one process (A, B, A, B, ... for ``--rounds``
rounds of ``--iters`` timed calls each, after ``--warmup`` untimed ones) and prints each one's
images/s (batch size over the median call time) and the ratio B / A, for inference and training:
on a shared machine only rates measured side by side compare. ``--same-weights`` first loads A's
state dict into B through the ``checkpoint_filter_fn`` of B's model file and prints the largest
logit difference relative to A's largest logit, so the two runs are of equal models.
On a machine shared with other jobs, ``--threads 1 --clock cpu`` times each call by the CPU time of
the process (its time on the core) instead of the wall clock, which counts the time others held it.

Writes ``benchmark.csv``, ``throughput_vs_flops.png`` and ``throughput_vs_resolution.png`` to
``--output`` and prints a table. ``--update-cards`` replaces the text between
``<!-- measured:begin -->`` and ``<!-- measured:end -->`` in ``model_cards/<model>.md``.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import fnmatch
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import visionzoo  # noqa: F401  (registers the visionzoo_* models)
from visionzoo.engine import create_classifier
from visionzoo.kernels import get_backend, resolve_backend, use_backend

CARD_BEGIN = "<!-- measured:begin -->"
CARD_END = "<!-- measured:end -->"
FIELDS = ["model", "img_size", "batch_size", "dtype", "device", "channels_last", "compile", "params_m", "gmacs",
          "gflops", "gmacs_default", "default_size", "infer_img_s", "infer_latency_ms", "infer_peak_mib",
          "train_img_s", "train_peak_mib", "memory_method", "error"]


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------
def count_flops(name: str, img_size: int, model_kwargs: dict) -> int:
    """FLOPs (2 per multiply-add) of one forward pass at batch 1; the meta device when possible."""
    def run(device):
        with torch.device(device):
            model = create_classifier(name, img_size=img_size, **model_kwargs).eval()
        x = torch.zeros(1, 3, img_size, img_size, device=device)
        # the custom-op backends route attention through visionzoo::na_forward, whose FLOP formula
        # is registered with the op (visionzoo.kernels.ops)
        with use_backend("cpu"), FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        return counter.get_total_flops()

    try:
        return run("meta")
    except (NotImplementedError, RuntimeError):  # data-dependent code (e.g. .item(), block masks) needs values
        return run("cpu")


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------
def _release_freed_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:  # glibc keeps freed blocks; hand them back so the next RSS peak starts clean
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_kib(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or CPU peak-RSS growth (Linux), in MiB."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = None

    @staticmethod
    def method(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "peak RSS growth (VmHWM)" if _proc_status_kib("VmHWM") is not None else "n/a"

    def __enter__(self):
        _release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak RSS to the current RSS
            except OSError:
                pass
            self.start = _proc_status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.start) / 2 ** 20
        elif self.start is not None:
            self.mib = (_proc_status_kib("VmHWM") - self.start) / 1024
        return False


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# what a call's time is: wall-clock time, or (``--clock cpu``) the CPU time of this process, which
# leaves out the time other processes held the cores (on a shared, oversubscribed machine)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _timed(fn, device, warmup, iters):
    """Seconds per call of ``fn`` (each call timed; returns the list)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = _clock()
        fn()
        _sync(device)
        times.append(_clock() - start)
    return times


def measure(name, img_size, batch_size, dtype, device, args) -> dict:
    row = dict(model=name, img_size=img_size, batch_size=batch_size, dtype=dtype, device=device.type,
               channels_last=args.channels_last, compile=args.compile,
               memory_method=PeakMemory.method(device))
    model_kwargs = dict(num_classes=args.num_classes) if args.num_classes else {}
    flops = count_flops(name, img_size, model_kwargs)
    default_size = timm.models.get_pretrained_cfg(name)
    default_size = default_size.input_size[-1] if default_size is not None else img_size
    flops_default = flops if default_size == img_size else count_flops(name, default_size, model_kwargs)
    row.update(gflops=flops / 1e9, gmacs=flops / 2e9, gmacs_default=flops_default / 2e9, default_size=default_size)

    torch.manual_seed(0)
    model = create_classifier(name, img_size=img_size, **model_kwargs).to(device)
    row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    run_model = torch.compile(model) if args.compile else model
    amp_dtype = None if dtype == "float32" else getattr(torch, dtype)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    def batch(n):
        return torch.randn(n, 3, img_size, img_size, device=device).contiguous(memory_format=memory_format)

    # inference
    model.eval()
    x, x1 = batch(batch_size), batch(1)

    def infer(inputs):
        with torch.no_grad(), autocast():
            run_model(inputs)

    with PeakMemory(device) as memory:
        times = _timed(lambda: infer(x), device, args.warmup, args.iters)
    row.update(infer_img_s=batch_size / statistics.median(times), infer_peak_mib=memory.mib)
    row["infer_latency_ms"] = 1e3 * statistics.median(_timed(lambda: infer(x1), device, args.warmup, args.iters))

    # training
    if not args.no_train:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        target = torch.randint(0, getattr(model, "num_classes", None) or 1000, (batch_size,), device=device)

        def train_step():
            with autocast():
                loss = torch.nn.functional.cross_entropy(run_model(x), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with PeakMemory(device) as memory:
            times = _timed(train_step, device, args.warmup, args.iters)
        row.update(train_img_s=batch_size / statistics.median(times), train_peak_mib=memory.mib)
        del optimizer
    del model, run_model, x, x1
    _release_freed_memory()
    return row


# ----------------------------------------------------------------------------------------------
# side by side
# ----------------------------------------------------------------------------------------------
def _filter_fn_of(model: torch.nn.Module):
    """The ``checkpoint_filter_fn`` of the file defining ``model``'s class (timm's and ours)."""
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None:
        raise SystemExit(f"--same-weights: {type(model).__module__} has no checkpoint_filter_fn "
                         f"to load another model's weights into {type(model).__name__}")
    return filter_fn


@torch.no_grad()
def copy_weights(source: torch.nn.Module, target: torch.nn.Module, img_size: int, device) -> float:
    """Load ``source``'s weights into ``target`` (strictly, through ``target``'s checkpoint filter);
    returns max |logits_target - logits_source| / max |logits_source| on one random batch."""
    state_dict = {k: v.detach().clone() for k, v in source.state_dict().items()}
    target.load_state_dict(_filter_fn_of(target)(state_dict, target), strict=True)
    source.eval()
    target.eval()
    x = torch.randn(2, 3, img_size, img_size, device=device, generator=torch.Generator(device).manual_seed(0))
    expected, got = source(x).float(), target(x).float()
    if expected.shape != got.shape:
        raise SystemExit(f"--same-weights: logits of shape {tuple(expected.shape)} and {tuple(got.shape)}")
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _interleaved(steps, device, warmup, iters, rounds):
    """Seconds per call of each of ``steps``, run in turns: ``rounds`` x (``iters`` calls of each)."""
    for step in steps:
        for _ in range(warmup):
            step()
    _sync(device)
    times = [[] for _ in steps]
    for _ in range(rounds):
        for step, measured in zip(steps, times):
            measured += _timed(step, device, 0, iters)
    return times


def compare(args, device) -> dict:
    """Images/s of ``args.compare`` = (A, B) measured in turns, and B / A; prints a table."""
    img_size, batch_size = args.img_size[0], args.batch_size
    try:
        model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}: {e}")
    if args.num_classes:
        model_kwargs["num_classes"] = args.num_classes
    models = []
    for name in args.compare:
        torch.manual_seed(0)
        models.append(create_classifier(name, img_size=img_size, **model_kwargs).to(device))
    result = dict(models=list(args.compare), img_size=img_size, batch_size=batch_size,
                  machine=machine_description(device))
    if args.same_weights:
        result["max_rel_logit_diff"] = copy_weights(models[0], models[1], img_size, device)
    amp_dtype = None if args.dtype[0] == "float32" else getattr(torch, args.dtype[0])

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    timing = dict(warmup=args.warmup, iters=args.iters, rounds=args.rounds)

    def infer(model):
        def step():
            with torch.no_grad(), autocast():
                model(x)
        return step

    for model in models:
        model.eval()
    times = _interleaved([infer(m) for m in models], device, **timing)
    result["infer_img_s"] = [batch_size / statistics.median(t) for t in times]

    if not args.no_train:
        def train(model):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            target = torch.randint(0, getattr(model, "num_classes", None) or 1000, (batch_size,), device=device)

            def step():
                with autocast():
                    loss = torch.nn.functional.cross_entropy(model(x), target)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return step

        for model in models:
            model.train()
        times = _interleaved([train(m) for m in models], device, **timing)
        result["train_img_s"] = [batch_size / statistics.median(t) for t in times]

    print_comparison(result, args)
    return result


def print_comparison(result: dict, args) -> None:
    a, b = result["models"]
    print(f"machine: {result['machine']}")
    print(f"compare: A = {a}, B = {b}; {result['img_size']}x{result['img_size']}, batch {result['batch_size']}, "
          f"{args.dtype[0]}; {args.rounds} rounds of {args.iters} calls each in turns (medians of "
          f"{'process CPU' if args.clock == 'cpu' else 'wall-clock'} time)")
    if "max_rel_logit_diff" in result:
        print(f"same weights: max relative logit difference {result['max_rel_logit_diff']:.2e}")
    header = ["", "A img/s", "B img/s", "B / A"]
    body = [[what, f"{rates[0]:.2f}", f"{rates[1]:.2f}", f"{rates[1] / rates[0]:.3f}"]
            for what, rates in (("inference", result["infer_img_s"]), ("training", result.get("train_img_s")))
            if rates is not None]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    for line in [header] + body:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))


# ----------------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------------
def _native_isa() -> str:
    """The instruction set the CPU kernels were built for, or why they are not available."""
    try:
        from visionzoo.kernels import native

        return native.isa()
    except Exception as e:  # no compiler, failed build: the header still describes the machine
        return f"unavailable ({type(e).__name__}: {e})".replace("\n", " ")[:120]


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = (f"{platform.platform()}, {os.cpu_count()} CPUs ({cpu or 'unknown CPU'}), {torch.get_num_threads()} "
            f"torch threads, Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}")
    text += f", native kernels {_native_isa()}"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    backend, resolved = get_backend(), resolve_backend(None, device)
    if resolved in ("cpu:window", "torch:tiles"):  # per layer, the block implementation where windows are blocks
        resolved = f"{resolved.split(':')[0]}:blocks where the windows are disjoint blocks, else {resolved}"
    return text + f", attention backend {backend}" + (f" ({resolved})" if resolved != backend else "")


def _fmt(value, digits=1):
    if value is None or value == "":
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_table(rows) -> None:
    header = ["model", "size", "batch", "dtype", "params (M)", "GMACs", "infer img/s", "latency ms", "infer MiB",
              "train img/s", "train MiB"]
    body = [[r["model"], r["img_size"], r["batch_size"], r["dtype"], _fmt(r.get("params_m"), 2),
             _fmt(r.get("gmacs"), 3), _fmt(r.get("infer_img_s")), _fmt(r.get("infer_latency_ms")),
             _fmt(r.get("infer_peak_mib"), 0), _fmt(r.get("train_img_s")), _fmt(r.get("train_peak_mib"), 0)]
            if not r.get("error") else [r["model"], r["img_size"], r["batch_size"], r["dtype"], "error: " + r["error"]]
            + [""] * 6 for r in rows]
    widths = [max(len(str(line[i])) for line in [header] + body) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths]] + body:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)))


def _log_if_wide(ax, xs, ys) -> None:
    """Log axes only for data spanning more than a decade (log ticks on a narrow range are unreadable)."""
    for values, setter in ((xs, ax.set_xscale), (ys, ax.set_yscale)):
        values = [v for v in values if v and v > 0]
        if values and max(values) / min(values) > 10:
            setter("log")


def plot(rows, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("error")]
    fig, ax = plt.subplots(figsize=(7, 5))
    for (size, dtype) in sorted({(r["img_size"], r["dtype"]) for r in rows}):
        group = [r for r in rows if (r["img_size"], r["dtype"]) == (size, dtype)]
        ax.scatter([r["gmacs"] for r in group], [r["infer_img_s"] for r in group], label=f"{size}px {dtype}")
        for r in group:
            ax.annotate(r["model"].replace("visionzoo_", ""), (r["gmacs"], r["infer_img_s"]), fontsize=7)
    ax.set(xlabel="GMACs per image", ylabel="inference img/s", title="throughput vs compute")
    _log_if_wide(ax, [r["gmacs"] for r in rows], [r["infer_img_s"] for r in rows])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output / "throughput_vs_flops.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for (model, dtype) in sorted({(r["model"], r["dtype"]) for r in rows}):
        group = sorted((r for r in rows if (r["model"], r["dtype"]) == (model, dtype)), key=lambda r: r["img_size"])
        ax.plot([r["img_size"] for r in group], [r["infer_img_s"] for r in group], "o-",
                label=f"{model.replace('visionzoo_', '')} {dtype}")
    ax.set(xlabel="input resolution (px)", ylabel="inference img/s", title="throughput vs resolution")
    _log_if_wide(ax, [r["img_size"] for r in rows], [r["infer_img_s"] for r in rows])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(output / "throughput_vs_resolution.png", dpi=110)
    plt.close(fig)


def card_section(rows, command: str, machine: str) -> str:
    first = rows[0]
    where = "GPU" if first["device"] == "cuda" else "CPU"
    lines = [
        "**Measured** with `tools/benchmark.py` on the machine below (our measurement, not the paper's).",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| params | {first['params_m']:.2f} M |",
        f"| GMACs (the papers' \"FLOPs\") at {first['default_size']}x{first['default_size']} | "
        f"{first['gmacs_default']:.2f} |",
    ]
    for r in rows:
        setting = f"batch {r['batch_size']} at {r['img_size']}x{r['img_size']}, {r['dtype']}"
        if r["channels_last"]:
            setting += ", channels-last"
        if r["compile"]:
            setting += ", torch.compile"
        lines.append(f"| {where} inference, {setting} | {r['infer_img_s']:.1f} img/s |")
        if r.get("train_img_s") not in (None, ""):
            lines.append(f"| {where} training (fwd + bwd + AdamW), {setting} | {r['train_img_s']:.1f} img/s |")
    lines += ["", f"Command: `{command}`", "", f"Machine: {machine}."]
    return "\n".join(lines)


def update_card(path: Path, section: str) -> bool:
    """Replace the measured block of one card; False when the card or its markers are missing."""
    if not path.is_file():
        return False
    text = path.read_text()
    begin, end = text.find(CARD_BEGIN), text.find(CARD_END)
    if begin < 0 or end < begin:
        return False
    text = text[: begin + len(CARD_BEGIN)] + "\n" + section + "\n" + text[end:]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["visionzoo_*"], help="model names or glob patterns")
    parser.add_argument("--exclude", nargs="*", default=[], help="glob patterns to leave out")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                        help="measure two models in turns and print B / A (first --img-size and --dtype)")
    parser.add_argument("--same-weights", action="store_true",
                        help="with --compare: load A's weights into B and print the logit difference")
    parser.add_argument("--rounds", type=int, default=5, help="with --compare: rounds of turns")
    parser.add_argument("--model-kwargs", default="{}",
                        help="with --compare: JSON keyword arguments for both models, e.g. '{\"depths\": [2, 2, 2, 2]}'")
    parser.add_argument("--img-size", type=int, nargs="+", default=[224], help="input resolutions")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile (compile time is not timed)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per measurement")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per measurement (median)")
    parser.add_argument("--no-train", action="store_true", help="inference only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="time calls by wall clock, or by this process's CPU time (CPU device; with --threads 1 "
                             "the time on a core, whatever else runs on the machine)")
    parser.add_argument("--output", default="output/benchmark")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--update-cards", action="store_true", help="fill the measured section of model cards")
    parser.add_argument("--cards-dir", default=str(Path(__file__).resolve().parents[1] / "model_cards"))
    return parser


def resolve_models(patterns, exclude):
    names = []
    for pattern in patterns:
        found = timm.list_models(pattern) if any(c in pattern for c in "*?[") else [pattern]
        if not found:
            raise SystemExit(f"no registered model matches {pattern!r}")
        names += [n for n in found if n not in names]
    return [n for n in names if not any(fnmatch.fnmatch(n, e) for e in exclude)]


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit(f"--clock cpu times CPU runs only, got --device {args.device}")
    global _clock
    _clock = CLOCKS[args.clock]
    if args.same_weights and not args.compare:
        raise SystemExit("--same-weights needs --compare A B")
    if args.compare:
        if args.rounds < 1 or args.iters < 1:
            raise SystemExit(f"--rounds and --iters must be >= 1, got {args.rounds} and {args.iters}")
        return compare(args, device)
    names = resolve_models(args.models, args.exclude)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        for img_size in args.img_size:
            for dtype in args.dtype:
                try:
                    row = measure(name, img_size, args.batch_size, dtype, device, args)
                except Exception as e:  # one failing model should not hide the others' numbers
                    row = dict(model=name, img_size=img_size, batch_size=args.batch_size, dtype=dtype,
                               device=device.type, error=f"{type(e).__name__}: {e}".replace("\n", " ")[:300])
                rows.append(row)
                print(f"{name} {img_size}px {dtype}: " + (
                    f"{row['infer_img_s']:.1f} img/s inference" if not row.get("error") else row["error"]),
                    file=sys.stderr, flush=True)
    with open(output / "benchmark.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in FIELDS})
    print_table(rows)
    if not args.no_plot:
        plot(rows, output)
    machine = machine_description(device)
    print(f"\nmachine: {machine}\nresults: {output / 'benchmark.csv'}")
    if args.clock == "cpu":
        machine += "; images per second of the process's CPU time (not wall time)"
    if args.update_cards:
        backend = os.environ.get("VISIONZOO_ATTN_BACKEND")
        command = ("VISIONZOO_ATTN_BACKEND=" + backend + " " if backend else "") + "python tools/benchmark.py " + \
            " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        for name in names:
            measured = [r for r in rows if r["model"] == name and not r.get("error")]
            if not measured:
                continue
            card = Path(args.cards_dir) / f"{name}.md"
            if update_card(card, card_section(measured, command, machine)):
                print(f"updated {card}")
            else:
                print(f"skipped {card} (missing, or no {CARD_BEGIN} / {CARD_END} markers)")
    return rows


if __name__ == "__main__":
    main()
