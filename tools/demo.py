#!/usr/bin/env python
"""Quick start: train a zoo model on the built-in Fashion-MNIST for a few CPU minutes, then benchmark.

    python tools/demo.py                      # about 3-5 minutes on 2 CPU cores
    python tools/demo.py --epochs 1 --max-samples 2000 --no-bench   # a one-minute smoke run

It runs two documented commands and prints them first, so each step can be rerun or changed:
``tools/train.py`` (a real registered model, ``visionzoo_nat_m`` by default, at 32x32 input) with
the held-out top-1 / top-5 on Fashion-MNIST's test set, then ``tools/benchmark.py`` on a few zoo
models. Needs the offline dataset: ``apt-get install -y dataset-fashion-mnist``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from visionzoo.data import FashionMNIST

TOOLS = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="visionzoo_nat_m")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-samples", type=int, default=10000, help="training images (of 60,000)")
    parser.add_argument("--max-val-samples", type=int, default=2000, help="held-out test images (of 10,000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    parser.add_argument("--output", default="output/demo")
    parser.add_argument("--bench-models", nargs="+",
                        default=["visionzoo_nat_m", "visionzoo_dinat_m", "visionzoo_dinats_t", "visionzoo_nat_iso_s"])
    parser.add_argument("--bench-img-size", type=int, nargs="+", default=[64])
    parser.add_argument("--bench-batch-size", type=int, default=8)
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run(command) -> None:
    print("\n$ " + " ".join(shlex.quote(str(c)) for c in command).replace(sys.executable, "python"), flush=True)
    subprocess.run([str(c) for c in command], check=True)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        FashionMNIST(root=args.data_dir, split="test")
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    started = time.time()
    output = Path(args.output)
    run_dir = output / "train"
    train = [sys.executable, TOOLS / "train.py", "--model", args.model, "--dataset", "builtin/fashion-mnist",
             "--img-size", args.img_size, "--epochs", args.epochs, "--max-samples", args.max_samples,
             "--max-val-samples", args.max_val_samples, "--batch-size", args.batch_size, "--lr", args.lr,
             "--sched-on-updates", "--warmup-epochs", 0.5, "--min-lr", 1e-5, "--clip-grad", 1.0, "--drop-path", 0.0,
             "--scale", 0.75, 1.0, "--ratio", 0.9, 1.1, "--color-jitter", 0.0, "--smoothing", 0.1,
             "--crop-pct", 1.0, "--workers", args.workers, "--output", run_dir]
    if args.data_dir:
        train += ["--data-dir", args.data_dir]
    if args.no_progress:
        train.append("--no-progress")
    run(train)
    train_seconds = time.time() - started
    summary = json.loads((run_dir / "summary.json").read_text())

    if not args.no_bench:
        run([sys.executable, TOOLS / "benchmark.py", "--models", *args.bench_models,
             "--img-size", *args.bench_img_size, "--batch-size", args.bench_batch_size, "--iters", 3,
             "--output", output / "benchmark"])

    print(f"\n{args.model} trained from scratch on {args.max_samples} Fashion-MNIST images at "
          f"{args.img_size}x{args.img_size} for {args.epochs} epochs in {train_seconds / 60:.1f} min: "
          f"held-out top-1 {summary['top1']:.2f}% (chance 10%), top-5 {summary['top5']:.2f}% "
          f"on {args.max_val_samples} test images.")
    print(f"curves: {run_dir / 'curves.png'}; weights: {run_dir / 'model.safetensors'}"
          + ("" if args.no_bench else f"; benchmark: {output / 'benchmark'}")
          + f"; total {(time.time() - started) / 60:.1f} min")
    return dict(summary, train_seconds=train_seconds)


if __name__ == "__main__":
    main()
