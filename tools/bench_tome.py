#!/usr/bin/env python
"""Token merging (ToMe): images/s and top-1 agreement with the unmerged model, per r, in one run.

    python tools/bench_tome.py                                   # ViT-S/16 and DeiT-S, r 0 4 8 13 16
    python tools/bench_tome.py --models vit_small_patch16_224 --r 0 8 13 --plot tome.png
    python tools/bench_tome.py --pretrained                      # timm's ImageNet weights (downloads)

For each model, every r is applied to the same weights (``visionzoo.apply_tome``) and measured on
the same images:

* speed: ``--rounds`` rounds over all r, interleaved (r0, r4, ..., r0, r4, ...), each timing one
  forward of a ``--batch-size`` batch under ``torch.no_grad``; the median per r gives images/s and
  the ratio to r = 0 (the machine's load then affects every r alike);
* agreement: the fraction of ``--eval-images`` Fashion-MNIST test images whose top-1 class with
  merging equals the unmerged model's, the relative change of the logits, and each r's top-1
  accuracy against the labels.

Without ``--pretrained`` the backbone keeps its random initialisation and the classifier is a
linear probe fitted on the unmerged model's pooled features of ``--probe-images`` Fashion-MNIST
training images: a classifier that separates real classes, so its agreement measures how much
merging moves the features that matter for it (the argmax of a random head would not). A random
backbone attends almost uniformly, which size-weighted merging with proportional attention nearly
preserves: its agreement is an upper bound, not the accuracy drop of trained weights (the paper:
ViT-S r 13 81.4 -> 79.3 on ImageNet). Agreement of ImageNet-trained weights is what
``--pretrained`` measures (same Fashion-MNIST images, ImageNet classes). Images are upsampled from
28x28 to the model's input size by its eval transform.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config

from visionzoo import apply_tome, remove_tome
from visionzoo.data import create_dataset

sys.path.insert(0, os.path.dirname(__file__))
from benchmark import machine_description  # noqa: E402


def _images(dataset, count: int, transform) -> tuple:
    dataset.transform = transform
    images, labels = zip(*(dataset[i] for i in range(min(count, len(dataset)))))
    return torch.stack(images), torch.tensor(labels)


def _in_batches(model, images: torch.Tensor, batch_size: int, fn) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(model, images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def _fit_probe(model, images: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int) -> None:
    """Replace the classifier with a linear probe fitted on the unmerged model's pooled features."""
    features = _in_batches(
        model, images, batch_size, lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True)
    )
    mean, std = features.mean(0), features.std(0) + 1e-6
    probe = torch.nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")
    normalized = (features - mean) / std

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(normalized), labels) + 1e-3 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    model.reset_classifier(num_classes)
    with torch.no_grad():  # fold the feature standardisation into the head
        model.head.weight.copy_(probe.weight / std)
        model.head.bias.copy_(probe.bias - (probe.weight * mean / std).sum(1))


def measure(name: str, args, dataset_train, dataset_test) -> list:
    torch.manual_seed(args.seed)
    model = timm.create_model(name, pretrained=args.pretrained).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    eval_images, eval_labels = _images(dataset_test, args.eval_images, transform)
    if not args.pretrained:
        probe_images, probe_labels = _images(dataset_train, args.probe_images, transform)
        _fit_probe(model, probe_images, probe_labels, 10, args.batch_size)

    logits = {}
    for r in args.r:
        apply_tome(model, r)
        logits[r] = _in_batches(model, eval_images, args.batch_size, lambda m, x: m(x))

    batch = eval_images[:args.batch_size]
    times = {r: [] for r in args.r}
    with torch.no_grad():
        for r in args.r:  # warm-up
            apply_tome(model, r)(batch)
        for _ in range(args.rounds):
            for r in args.r:
                apply_tome(model, r)
                start = time.perf_counter()
                model(batch)
                times[r].append(time.perf_counter() - start)
    remove_tome(model)

    reference = logits[args.r[0]]
    base = len(batch) / statistics.median(times[args.r[0]])
    rows = []
    for r in args.r:
        speed = len(batch) / statistics.median(times[r])
        rows.append(dict(
            model=name, r=r, images_per_s=speed, speedup=speed / base,
            agreement=float((logits[r].argmax(-1) == reference.argmax(-1)).float().mean()),
            logit_change=float((logits[r] - reference).norm() / reference.norm()),
            accuracy=None if args.pretrained else float((logits[r].argmax(-1) == eval_labels).float().mean()),
        ))
    return rows


def print_table(rows, reference_r: int) -> None:
    print(f"{'model':28s} {'r':>3s} {'img/s':>8s} {'speed':>7s} {'agree':>7s} {'dlogit':>7s} {'top-1':>7s}")
    for row in rows:
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        print(f"{row['model']:28s} {row['r']:3d} {row['images_per_s']:8.2f} {row['speedup']:6.2f}x "
              f"{100 * row['agreement']:6.1f}% {100 * row['logit_change']:6.2f}% {accuracy:>7s}")
    print(f"speed: images/s ratio to r = {reference_r}; agree: top-1 equal to r = {reference_r}'s; "
          f"dlogit: |logits - logits(r = {reference_r})| / |logits(r = {reference_r})|; top-1: against the labels")


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == name]
        ax.plot([row["speedup"] for row in mine], [100 * row["agreement"] for row in mine], marker="o", label=name)
        for row in mine:
            ax.annotate(f"r={row['r']}", (row["speedup"], 100 * row["agreement"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("throughput relative to the unmerged model")
    ax.set_ylabel("top-1 agreement with the unmerged model (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "deit_small_patch16_224"],
                        help="timm ViT / DeiT names (plain; merging is applied here)")
    parser.add_argument("--r", nargs="+", type=int, default=[0, 4, 8, 13, 16],
                        help="tokens merged per block; the first is the reference")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median taken)")
    parser.add_argument("--eval-images", type=int, default=128)
    parser.add_argument("--probe-images", type=int, default=256)
    parser.add_argument("--pretrained", action="store_true",
                        help="timm's ImageNet weights instead of a probe on a random backbone")
    parser.add_argument("--data-dir", default=None,
                        help="folder of the Fashion-MNIST idx files (default: the Debian package's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="PNG of speed vs agreement")
    return parser


def main(argv=None) -> list:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.r[0] != 0:
        parser.error(f"--r: the first value is the reference and must be 0, got {args.r[0]}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset_train = create_dataset("builtin/fashion-mnist", args.data_dir, split="train", max_samples=args.probe_images)
    dataset_test = create_dataset("builtin/fashion-mnist", args.data_dir, split="test", max_samples=args.eval_images)
    machine = machine_description(torch.device("cpu"))
    print(f"machine: {machine}")
    if args.pretrained:
        source = "timm ImageNet weights"
    else:
        source = f"random backbone + linear probe on {args.probe_images} Fashion-MNIST train images"
    print(f"weights: {source}; agreement on {args.eval_images} Fashion-MNIST test images; "
          f"batch {args.batch_size}, {args.rounds} rounds")
    rows = []
    for name in args.models:
        rows += measure(name, args, dataset_train, dataset_test)
        print_table(rows, args.r[0])  # so far, in case a long run is stopped
        sys.stdout.flush()
    if args.plot:
        plot(rows, args.plot, f"ToMe on CPU ({torch.get_num_threads()} threads)\n{source}")
    return rows


if __name__ == "__main__":
    main()
