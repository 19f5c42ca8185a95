#!/usr/bin/env python
"""Token merging: images/s and agreement with the unmerged model, in one run.

    python tools/bench_tome.py                                   # ToMe on ViT-S/16 and DeiT-S, then 2D merging
    python tools/bench_tome.py --models vit_small_patch16_224 --r 0 8 13 --plot tome.png
    python tools/bench_tome.py --pretrained                      # timm's ImageNet weights (downloads)
    python tools/bench_tome.py --sections dense --rounds 3       # only the dense 2D-merging section

ToMe (``--sections tome``), per r:

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

2D merging for dense prediction (``--sections dense``): Segformer++'s presets (``apply_merge2d``:
none, hq, fast, 2x2) on one dense zoo backbone (``--dense-model``, default MambaVision-T with its
official segmentation windows from ``dense_kwargs``, ``features_only``, random initialisation), at
each ``--dense-sizes`` (512 and 1024 px):

* speed: as above, interleaved rounds of one image, the median per preset and its ratio to none;
* agreement, on ``--dense-eval-images`` Fashion-MNIST test images upsampled (bilinear) to the size:
  ``dS3`` / ``dS4`` the relative change of the last two stage outputs (``|f - f_none| / |f_none|``,
  the stages that merge), and ``agree`` the fraction of stride-16 pixels whose class under a fixed
  per-pixel linear probe equals the unmerged model's. The probe (11 classes: background, or the
  image's garment class where the 28x28 image's gray value exceeds 0.2) reads the four stage
  outputs resized to stride 16 and is fitted on the unmerged model's features of
  ``--dense-probe-images`` training images, once per size. As for ToMe, a random backbone makes
  the agreement a measure of how far merging moves the features, not a trained model's mIoU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config

from visionzoo import apply_tome, remove_tome
from visionzoo.data import create_dataset
from visionzoo.layers.token_merging import apply_merge2d, remove_merge2d
from visionzoo.models.dense import dense_kwargs

sys.path.insert(0, os.path.dirname(__file__))
from benchmark import machine_description  # noqa: E402


def _images(dataset, count: int, transform) -> tuple:
    dataset.transform = transform
    images, labels = zip(*(dataset[i] for i in range(min(count, len(dataset)))))
    return torch.stack(images), torch.tensor(labels)


def _in_batches(model, images: torch.Tensor, batch_size: int, fn) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(model, images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def _fit_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.nn.Linear:
    """A linear classifier of ``features`` [N, C] fitted by L-BFGS, the feature standardisation folded in."""
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
    with torch.no_grad():
        probe.weight.div_(std)
        probe.bias.sub_((probe.weight * mean).sum(1))
    return probe


def _fit_probe(model, images: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int) -> None:
    """Replace the classifier with a linear probe fitted on the unmerged model's pooled features."""
    features = _in_batches(
        model, images, batch_size, lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True)
    )
    probe = _fit_linear(features, labels, num_classes)
    model.reset_classifier(num_classes)
    with torch.no_grad():
        model.head.weight.copy_(probe.weight)
        model.head.bias.copy_(probe.bias)


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


DENSE_PRESETS = ("none", "hq", "fast", "2x2")
_PROBE_STRIDE = 16


def _dense_images(dataset, count: int, size: int) -> tuple:
    """``count`` images upsampled to ``size`` px, ImageNet-normalised ``[N, 3, S, S]``, and per-pixel
    labels at stride 16 ``[N, S/16, S/16]`` (0: background, 1 + class where the gray value > 0.2)."""
    images, labels = [], []
    for i in range(min(count, len(dataset))):
        image, label = dataset[i]
        gray = torch.tensor(np.asarray(image.convert("L")), dtype=torch.float32)[None, None] / 255
        images.append(F.interpolate(gray, size=(size, size), mode="bilinear").expand(-1, 3, -1, -1))
        mask = F.interpolate(gray, size=(size // _PROBE_STRIDE,) * 2, mode="bilinear")[0, 0] > 0.2
        labels.append(mask.long() * (1 + label))
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    return (torch.cat(images) - mean) / std, torch.stack(labels)


def _pixel_features(maps, size: int) -> torch.Tensor:
    """The stage outputs ``[B, C_i, H_i, W_i]`` resized to stride 16 and concatenated: ``[B * H * W, sum C_i]``."""
    grid = (size // _PROBE_STRIDE,) * 2
    resized = [F.interpolate(m, size=grid, mode="bilinear") if m.shape[-2:] != grid else m for m in maps]
    return torch.cat(resized, dim=1).permute(0, 2, 3, 1).flatten(0, 2)


def _set_preset(model, preset: str) -> None:
    if preset == "none":
        remove_merge2d(model)
    else:
        apply_merge2d(model, preset)


def measure_dense(args, dataset_train, dataset_test) -> list:
    torch.manual_seed(args.seed)
    name = args.dense_model
    model = timm.create_model(name, features_only=True, **dense_kwargs(name, "seg")).eval()
    rows = []
    for size in args.dense_sizes:
        started = time.perf_counter()

        def progress(text: str) -> None:
            print(f"  [{name} {size}px, {time.perf_counter() - started:5.0f} s] {text}", flush=True)

        probe_images, probe_labels = _dense_images(dataset_train, args.dense_probe_images, size)
        eval_images, eval_labels = _dense_images(dataset_test, args.dense_eval_images, size)
        remove_merge2d(model)
        with torch.no_grad():
            features = torch.cat([_pixel_features(model(image[None]), size) for image in probe_images])
        probe = _fit_linear(features, probe_labels.flatten(), 11)
        progress(f"probe fitted on {len(probe_images)} images ({len(features)} pixels)")

        outputs, classes = {}, {}
        with torch.no_grad():
            for preset in DENSE_PRESETS:
                _set_preset(model, preset)
                maps = [model(image[None]) for image in eval_images]
                outputs[preset] = [torch.cat(stage) for stage in zip(*maps)]
                classes[preset] = torch.cat([probe(_pixel_features(m, size)).argmax(-1) for m in maps])
                progress(f"{preset}: outputs of {len(eval_images)} images")

        batch = eval_images[:1]
        times = {preset: [] for preset in DENSE_PRESETS}
        with torch.no_grad():
            for preset in DENSE_PRESETS:  # warm-up
                _set_preset(model, preset)
                model(batch)
            for round_index in range(args.rounds):
                for preset in DENSE_PRESETS:
                    _set_preset(model, preset)
                    start = time.perf_counter()
                    model(batch)
                    times[preset].append(time.perf_counter() - start)
                progress(f"timing round {round_index + 1}/{args.rounds}")
        remove_merge2d(model)

        reference = outputs["none"]
        base = 1 / statistics.median(times["none"])
        for preset in DENSE_PRESETS:
            speed = 1 / statistics.median(times[preset])
            change = [float((new - old).norm() / old.norm()) for new, old in zip(outputs[preset], reference)]
            rows.append(dict(
                model=name, size=size, preset=preset, images_per_s=speed, speedup=speed / base,
                agreement=float((classes[preset] == classes["none"]).float().mean()),
                change_s3=change[-2], change_s4=change[-1],
                probe_accuracy=float((classes[preset] == eval_labels.flatten()).float().mean()),
            ))
    return rows


def print_dense_table(rows) -> None:
    print(f"{'model':26s} {'size':>5s} {'preset':>6s} {'img/s':>7s} {'speed':>7s} {'agree':>7s} "
          f"{'dS3':>7s} {'dS4':>7s} {'probe':>7s}")
    for row in rows:
        print(f"{row['model']:26s} {row['size']:5d} {row['preset']:>6s} {row['images_per_s']:7.3f} "
              f"{row['speedup']:6.2f}x {100 * row['agreement']:6.1f}% {100 * row['change_s3']:6.2f}% "
              f"{100 * row['change_s4']:6.2f}% {100 * row['probe_accuracy']:6.1f}%")
    print("speed: images/s ratio to none; agree: stride-16 pixels whose probe class equals none's; "
          "dS3 / dS4: |f - f_none| / |f_none| of the stage 3 / 4 outputs; probe: pixel accuracy against the labels")


def print_table(rows, reference_r: int) -> None:
    print(f"{'model':28s} {'r':>3s} {'img/s':>8s} {'speed':>7s} {'agree':>7s} {'dlogit':>7s} {'top-1':>7s}")
    for row in rows:
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        print(f"{row['model']:28s} {row['r']:3d} {row['images_per_s']:8.2f} {row['speedup']:6.2f}x "
              f"{100 * row['agreement']:6.1f}% {100 * row['logit_change']:6.2f}% {accuracy:>7s}")
    print(f"speed: images/s ratio to r = {reference_r}; agree: top-1 equal to r = {reference_r}'s; "
          f"dlogit: |logits - logits(r = {reference_r})| / |logits(r = {reference_r})|; top-1: against the labels")


def plot(rows, dense_rows, path: Path, title: str) -> None:
    """Speed vs agreement: ToMe per r (left), 2D merging per preset and size (right), as measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(rows, "model", "r", "top-1 agreement with the unmerged model (%)", "ToMe"),
              (dense_rows, "size", "preset", "stride-16 pixel agreement with the unmerged model (%)", "2D merging")]
    panels = [panel for panel in panels if panel[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (mine, series, point, ylabel, name) in zip(axes[0], panels):
        for key in dict.fromkeys(row[series] for row in mine):
            line = [row for row in mine if row[series] == key]
            label = f"{line[0]['model']} {key} px" if series == "size" else key
            ax.plot([row["speedup"] for row in line], [100 * row["agreement"] for row in line], marker="o",
                    linestyle="-" if point == "r" else "none", label=label)  # presets are points, not a curve
            for row in line:
                ax.annotate(f"{point}={row[point]}", (row["speedup"], 100 * row["agreement"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("throughput relative to the unmerged model")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}: {title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=("tome", "dense"), default=["tome", "dense"],
                        help="ToMe on ViTs, 2D merging on a dense backbone, or both")
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "deit_small_patch16_224"],
                        help="timm ViT / DeiT names (plain; merging is applied here)")
    parser.add_argument("--r", nargs="+", type=int, default=[0, 4, 8, 13, 16],
                        help="tokens merged per block; the first is the reference")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median taken)")
    parser.add_argument("--eval-images", type=int, default=128)
    parser.add_argument("--probe-images", type=int, default=256)
    parser.add_argument("--dense-model", default="visionzoo_mambavision_t",
                        help="a zoo model with a dense declaration (its segmentation kwargs are used)")
    parser.add_argument("--dense-sizes", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--dense-eval-images", type=int, default=8)
    parser.add_argument("--dense-probe-images", type=int, default=8)
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
    if any(size % 32 for size in args.dense_sizes):
        parser.error(f"--dense-sizes must be multiples of 32, got {args.dense_sizes}")
    train_count = max(args.probe_images, args.dense_probe_images)
    test_count = max(args.eval_images, args.dense_eval_images)
    dataset_train = create_dataset("builtin/fashion-mnist", args.data_dir, split="train", max_samples=train_count)
    dataset_test = create_dataset("builtin/fashion-mnist", args.data_dir, split="test", max_samples=test_count)
    machine = machine_description(torch.device("cpu"))
    print(f"machine: {machine}")
    rows, dense_rows = [], []
    if "tome" in args.sections:
        if args.pretrained:
            source = "timm ImageNet weights"
        else:
            source = f"random backbone + linear probe on {args.probe_images} Fashion-MNIST train images"
        print(f"ToMe: weights: {source}; agreement on {args.eval_images} Fashion-MNIST test images; "
              f"batch {args.batch_size}, {args.rounds} rounds")
        for name in args.models:
            rows += measure(name, args, dataset_train, dataset_test)
            print_table(rows, args.r[0])  # so far, in case a long run is stopped
            sys.stdout.flush()
    if "dense" in args.sections:
        print(f"2D merging: {args.dense_model} (features_only, segmentation windows, random weights); agreement on "
              f"{args.dense_eval_images} Fashion-MNIST test images, probe fitted on {args.dense_probe_images} train "
              f"images; batch 1, {args.rounds} rounds", flush=True)
        dense_rows = measure_dense(args, dataset_train, dataset_test)
        print_dense_table(dense_rows)
    if args.plot:
        plot(rows, dense_rows, args.plot, f"CPU, {torch.get_num_threads()} threads")
    return rows + dense_rows


if __name__ == "__main__":
    main()
