#!/usr/bin/env python
"""Train an image classifier: any registered model (``visionzoo_*`` or timm), one process or torchrun.

    # the papers' ImageNet recipe (configs/imagenet/<model>.yaml), 8 GPUs on one machine
    torchrun --nproc_per_node 8 tools/train.py -c configs/imagenet/visionzoo_nat_m.yaml --data-dir /data/imagenet

    # built-in offline data, a few CPU minutes
    python tools/train.py --model visionzoo_nat_m --dataset builtin/fashion-mnist --img-size 32 --epochs 2

    # continue an interrupted run (same losses as if it had never stopped)
    python tools/train.py -c ... --resume output/train/<run>            # or a checkpoints/epoch_XXXX dir

A config is YAML whose keys are this script's argument names (``drop_path`` or ``drop-path``);
command-line arguments override it. Data, augmentation, optimizer, scheduler, losses and EMA are
timm's (``create_dataset`` / ``create_loader`` with its ``RepeatAugSampler``, ``Mixup``,
``create_optimizer_v2``, ``create_scheduler_v2``, ``SoftTargetCrossEntropy`` / ``BinaryCrossEntropy``,
``ModelEmaV3``).

The run folder (``--output``) receives ``args.yaml``, ``checkpoints/epoch_XXXX/`` (see
:mod:`visionzoo.checkpoint`), ``metrics.csv`` (per epoch), ``steps.csv`` (per optimizer step),
``tb/`` (TensorBoard, when installed), ``curves.png`` and, at the end, ``model.safetensors`` /
``model_ema.safetensors`` with their sizes and sha256 in ``weights_manifest.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from timm.data import Mixup, create_loader, resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, ParseKwargs, dispatch_clip_grad, random_seed
from timm.utils.distributed import init_distributed_device_so
from tqdm import tqdm

import visionzoo  # noqa: F401  (registers the visionzoo_* models)
from visionzoo.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from visionzoo.data import create_dataset, dataset_num_classes
from visionzoo.engine import create_classifier, evaluate, unwrap_model

_logger = logging.getLogger("train")

STEP_FIELDS = ["epoch", "step", "global_step", "loss", "lr"]
EPOCH_FIELDS = ["epoch", "train_loss", "val_loss", "top1", "top5", "ema_top1", "ema_top5", "lr", "epoch_seconds",
                "train_samples_per_s"]


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-c", "--config", default=None, help="YAML file of argument defaults (keys = argument names)")

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="registered model name, e.g. visionzoo_nat_m")
    group.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    group.add_argument("--num-classes", type=int, default=None, help="classes (default: from the dataset)")
    group.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    group.add_argument("--drop", type=float, default=None, help="dropout before the classifier")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                       help="extra create_model arguments, key=value")

    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="", help="'' (ImageFolder under --data-dir), a timm spec "
                       "(torch/cifar10, hfds/...), or builtin/fashion-mnist")
    group.add_argument("--data-dir", default=None, help="dataset root (for built-ins: overrides the install path)")
    group.add_argument("--train-split", default="train")
    group.add_argument("--val-split", default="validation", help="'' to skip evaluation")
    group.add_argument("--max-samples", type=int, default=None, help="train on a fixed random subset")
    group.add_argument("--max-val-samples", type=int, default=None, help="evaluate on a fixed random subset")
    group.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    group.add_argument("--crop-pct", type=float, default=None, help="eval center-crop fraction")
    group.add_argument("--mean", type=float, nargs=3, default=None)
    group.add_argument("--std", type=float, nargs=3, default=None)
    group.add_argument("--interpolation", default="", help="eval resize interpolation (default: the model's)")
    group.add_argument("--train-interpolation", default="random")
    group.add_argument("--workers", type=int, default=4, help="data loader processes per training process")
    group.add_argument("--no-prefetcher", action="store_true", help="normalize in the workers, not on the device")

    group = parser.add_argument_group("augmentation and regularization")
    group.add_argument("--no-aug", action="store_true", help="no training augmentation (resize + crop only)")
    group.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], help="random-resized-crop area range")
    group.add_argument("--ratio", type=float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0])
    group.add_argument("--hflip", type=float, default=0.5)
    group.add_argument("--color-jitter", type=float, default=0.4)
    group.add_argument("--aa", default=None, help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    group.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    group.add_argument("--remode", default="pixel")
    group.add_argument("--recount", type=int, default=1)
    group.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    group.add_argument("--mixup-prob", type=float, default=1.0)
    group.add_argument("--mixup-switch-prob", type=float, default=0.5)
    group.add_argument("--mixup-mode", default="batch")
    group.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup/cutmix off from this epoch")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group.add_argument("--bce-loss", action="store_true",
                       help="binary cross-entropy on the (mixed / smoothed) targets instead of cross-entropy "
                            "(timm's BinaryCrossEntropy; validation loss stays cross-entropy)")
    group.add_argument("--bce-target-thresh", type=float, default=None,
                       help="with --bce-loss: targets above this become 1, the rest 0")
    group.add_argument("--bce-pos-weight", type=float, default=None,
                       help="with --bce-loss: weight of the positive term of every class")
    group.add_argument("--aug-repeats", type=int, default=0,
                       help="repeated augmentation: each image this many times per epoch, differently augmented, "
                            "on different processes (distributed runs only; timm's RepeatAugSampler)")

    group = parser.add_argument_group("optimizer")
    group.add_argument("--opt", default="adamw")
    group.add_argument("--lr", type=float, default=None, help="learning rate (default: lr-base scaled to the batch)")
    group.add_argument("--lr-base", type=float, default=1e-3, help="learning rate at --lr-base-size")
    group.add_argument("--lr-base-size", type=int, default=1024, help="global batch that --lr-base is for")
    group.add_argument("--lr-base-scale", default="linear", choices=["linear", "sqrt"])
    group.add_argument("--weight-decay", type=float, default=0.05)
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--opt-eps", type=float, default=None)
    group.add_argument("--opt-betas", type=float, nargs="+", default=None)
    group.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay")
    group.add_argument("--clip-grad", type=float, default=None, help="gradient clipping (norm / value)")
    group.add_argument("--clip-mode", default="norm", choices=["norm", "value", "agc"])
    group.add_argument("--grad-accum-steps", type=int, default=1, help="batches per optimizer step")

    group = parser.add_argument_group("schedule")
    group.add_argument("--sched", default="cosine")
    group.add_argument("--epochs", type=int, default=300, help="schedule length (cooldown epochs come on top)")
    group.add_argument("--warmup-epochs", type=float, default=20, help="linear warm-up (fractions allowed)")
    group.add_argument("--cooldown-epochs", type=int, default=0, help="epochs at --min-lr after the schedule")
    group.add_argument("--warmup-lr", type=float, default=1e-6)
    group.add_argument("--min-lr", type=float, default=1e-5)
    group.add_argument("--sched-on-updates", action="store_true", help="update the lr every step, not per epoch")

    group = parser.add_argument_group("EMA")
    group.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of the weights")
    group.add_argument("--model-ema-decay", type=float, default=0.9998)
    group.add_argument("--model-ema-warmup", action="store_true")

    group = parser.add_argument_group("run")
    group.add_argument("--batch-size", "-b", type=int, default=128, help="images per process per step")
    group.add_argument("--validation-batch-size", type=int, default=None)
    group.add_argument("--amp", action="store_true", help="autocast (bfloat16 by default)")
    group.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    group.add_argument("--channels-last", action="store_true")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--output", default=None, help="run folder (default: output/train/<model>-<time>)")
    group.add_argument("--resume", default=None,
                       help="checkpoint dir, checkpoints folder or run folder to continue; 'auto': the latest "
                            "checkpoint in --output if there is one")
    group.add_argument("--keep-checkpoints", type=int, default=2, help="epoch checkpoints kept (newest)")
    group.add_argument("--log-interval", type=int, default=50, help="steps between TensorBoard loss points")
    group.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    group.add_argument("--no-tensorboard", action="store_true")
    group.add_argument("--no-plot", action="store_true")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config", default=None)
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        defaults = load_config(known.config, parser)
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model is required (or a config with 'model:')")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        parser.error("mixup / cutmix pair samples within a batch: --batch-size must be even")
    if not 0.0 <= args.smoothing < 1.0:
        parser.error(f"--smoothing must be in [0, 1), got {args.smoothing}")
    for flag in ("bce_target_thresh", "bce_pos_weight"):
        if getattr(args, flag) is not None and not args.bce_loss:
            parser.error(f"--{flag.replace('_', '-')} only acts on --bce-loss, which is off")
    if args.bce_target_thresh is not None and not 0.0 <= args.bce_target_thresh < 1.0:
        parser.error(f"--bce-target-thresh must be in [0, 1), got {args.bce_target_thresh}")
    if args.aug_repeats < 0:
        parser.error(f"--aug-repeats must be >= 0, got {args.aug_repeats}")
    return args


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """YAML keys are argument names; unknown keys are an error (a typo would silently do nothing)."""
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise SystemExit(f"{path}: expected a mapping of argument names to values")
    known = {action.dest for action in parser._actions}
    config = {key.replace("-", "_"): value for key, value in config.items()}
    # a run's args.yaml also records the loss its arguments resolved to: derived, not an argument
    config.pop("train_loss", None)
    unknown = sorted(set(config) - known)
    if unknown:
        raise SystemExit(f"{path}: unknown keys {', '.join(unknown)} (see tools/train.py --help)")
    return config


# ----------------------------------------------------------------------------------------------
# logs
# ----------------------------------------------------------------------------------------------
class CsvLog:
    """Append-only CSV; on resume rows after the checkpoint's epoch are dropped first."""

    def __init__(self, path: Path, fields, keep_through_epoch=None):
        self.path, self.fields = path, fields
        rows = []
        if keep_through_epoch is not None and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_through_epoch]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow({k: row.get(k, "") for k in self.fields})


def read_csv(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(run_dir: Path) -> Path:
    """``curves.png``: training loss per step and validation loss / accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, epochs = read_csv(run_dir / "steps.csv"), read_csv(run_dir / "metrics.csv")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        per_epoch = {}
        for r in steps:
            per_epoch[int(r["epoch"])] = max(per_epoch.get(int(r["epoch"]), 0), int(r["step"]) + 1)
        x = [int(r["epoch"]) - 1 + (int(r["step"]) + 1) / per_epoch[int(r["epoch"])] for r in steps]
        ax_loss.plot(x, [float(r["loss"]) for r in steps], lw=0.6, alpha=0.6, label="train loss (step)")
    done = [r for r in epochs if r["val_loss"] != ""]
    if done:
        ax_loss.plot([int(r["epoch"]) for r in done], [float(r["val_loss"]) for r in done], "o-", label="val loss")
        ax_acc.plot([int(r["epoch"]) for r in done], [float(r["top1"]) for r in done], "o-", label="top-1")
        ax_acc.plot([int(r["epoch"]) for r in done], [float(r["top5"]) for r in done], "s--", label="top-5")
        ema = [r for r in done if r["ema_top1"] != ""]
        if ema:
            ax_acc.plot([int(r["epoch"]) for r in ema], [float(r["ema_top1"]) for r in ema], "^:", label="EMA top-1")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def open_tensorboard(run_dir: Path, purge_step, disabled: bool):
    if disabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        _logger.info("tensorboard is not installed; CSV logs only")
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def build_train_loss(args, num_classes: int):
    """The training loss and the Mixup / CutMix target transform (None when both are off), as timm's
    train.py pairs them: with Mixup, label smoothing is applied by Mixup to the dense targets it makes,
    so the loss itself does not smooth; without it the loss smooths the class indices.
    ``--bce-loss`` without smoothing is BCE on one-hot targets (timm's train.py falls back to
    cross-entropy there, silently dropping the flag)."""
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        if args.bce_loss:
            return BinaryCrossEntropy(smoothing=0.0, target_threshold=args.bce_target_thresh,
                                      pos_weight=args.bce_pos_weight), mixup
        return SoftTargetCrossEntropy(), mixup
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh,
                                  pos_weight=args.bce_pos_weight), None
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing), None
    return torch.nn.CrossEntropyLoss(), None


def describe_train_loss(loss_fn, mixup) -> str:
    """``BinaryCrossEntropy(target_threshold=0.2) on Mixup / CutMix targets smoothed by 0.1``."""
    settings = {name: getattr(loss_fn, name) for name in ("smoothing", "target_threshold")
                if getattr(loss_fn, name, None) not in (None, 0.0)}
    if getattr(loss_fn, "pos_weight", None) is not None:
        settings["pos_weight"] = float(loss_fn.pos_weight)
    text = f"{type(loss_fn).__name__}({', '.join(f'{k}={v:g}' for k, v in settings.items())})"
    if mixup is not None:
        text += f" on Mixup / CutMix targets smoothed by {mixup.label_smoothing:g}"
    return text


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, scheduler, ema, mixup, scaler, autocast, args,
                    device, num_updates, on_step, progress):
    """One pass over ``loader``; returns (mean loss, updates so far, images seen)."""
    model.train()
    distributed = dist.is_available() and dist.is_initialized()
    accum = args.grad_accum_steps
    num_batches = len(loader)
    last_accum = num_batches % accum or accum
    total_loss, total_updates, seen = 0.0, 0, 0
    update_loss = torch.zeros((), device=device)
    optimizer.zero_grad(set_to_none=True)
    for batch_idx, (images, target) in enumerate(loader):
        last_batch = batch_idx == num_batches - 1
        need_update = last_batch or (batch_idx + 1) % accum == 0
        accum_steps = last_accum if batch_idx >= num_batches - last_accum else accum
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if mixup is not None:
            images, target = mixup(images, target)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        sync = model.no_sync if distributed and not need_update else nullcontext
        with sync():
            with autocast():
                loss = loss_fn(model(images), target)
            scaled = loss / accum_steps
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        update_loss += loss.detach() / accum_steps
        seen += len(images)
        if not need_update:
            continue
        if scaler is not None:
            scaler.unscale_(optimizer)
        if args.clip_grad is not None:
            dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        if ema is not None:
            ema.update(unwrap_model(model), step=num_updates)
        if distributed:
            dist.all_reduce(update_loss)
            update_loss /= dist.get_world_size()
        step_loss = update_loss.item()
        update_loss.zero_()
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss} at epoch {epoch + 1}, step {batch_idx // accum}; "
                                     "lower --lr or enable --clip-grad")
        lr = optimizer.param_groups[0]["lr"]
        on_step(epoch, batch_idx // accum, num_updates, step_loss, lr)
        total_loss += step_loss
        total_updates += 1
        scheduler.step_update(num_updates=num_updates)
        if progress is not None:
            progress.update(accum_steps)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
    return total_loss / max(total_updates, 1), num_updates, seen * (dist.get_world_size() if distributed else 1)


def gather_rng_states(world_size: int):
    """Every rank's RNG state, on rank 0 (a list indexed by rank); None elsewhere."""
    state = rng_state()
    if world_size == 1:
        return [state]
    states = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(state, states, dst=0)
    return states


def main(argv=None) -> dict:
    args = parse_args(argv)
    dist_info = init_distributed_device_so(device=args.device, dist_backend=args.dist_backend)
    device = torch.device(dist_info["device"])
    rank, world_size, distributed = dist_info["global_rank"], dist_info["world_size"], dist_info["distributed"]
    is_main = rank == 0
    if args.aug_repeats and not distributed:
        raise SystemExit(f"--aug-repeats {args.aug_repeats}: repeated augmentation sends the copies of each image "
                         "to different processes of a distributed run (timm's RepeatAugSampler); this run has one "
                         "process: launch it with torchrun or set --aug-repeats 0")
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s")
    show_progress = is_main and not args.no_progress

    # where to resume from
    resume_dir = None
    if args.resume == "auto":
        if args.output is None:
            raise SystemExit("--resume auto needs --output (the run folder to look in)")
        try:
            resume_dir = resolve_checkpoint(args.output)
        except CheckpointError:
            resume_dir = None  # nothing there yet: a fresh start
    elif args.resume:
        resume_dir = resolve_checkpoint(args.resume)
    run_dir = Path(args.output) if args.output else (
        resume_dir.parent.parent if resume_dir is not None
        else Path("output/train") / f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")

    # data
    train_set = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, max_samples=args.max_samples)
    val_set = None
    if args.val_split:
        val_set = create_dataset(args.dataset, root=args.data_dir, split=args.val_split,
                                 max_samples=args.max_val_samples)
    num_classes = args.num_classes or dataset_num_classes(train_set)
    if args.aug_repeats and isinstance(train_set, torch.utils.data.IterableDataset):
        raise SystemExit(f"--aug-repeats needs a dataset with indices; {args.dataset} is streamed")

    # model: the same initial weights on every rank, then per-rank seeds for augmentation
    random_seed(args.seed, 0)
    model = create_classifier(args.model, img_size=args.img_size, pretrained=args.pretrained,
                              num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                              **args.model_kwargs)
    num_classes = model.num_classes if hasattr(model, "num_classes") else num_classes
    random_seed(args.seed, rank)
    data_config = resolve_data_config(
        dict(img_size=args.img_size, crop_pct=args.crop_pct, mean=args.mean, std=args.std,
             interpolation=args.interpolation), model=model, verbose=False)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    global_batch = args.batch_size * world_size * args.grad_accum_steps
    if args.lr is None:
        ratio = global_batch / args.lr_base_size
        args.lr = args.lr_base * (math.sqrt(ratio) if args.lr_base_scale == "sqrt" else ratio)
    opt_kwargs = {k: v for k, v in dict(eps=args.opt_eps, betas=args.opt_betas).items() if v is not None}
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay, **opt_kwargs)
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    use_prefetcher = device.type == "cuda" and not args.no_prefetcher
    loader_common = dict(input_size=data_config["input_size"], interpolation=data_config["interpolation"],
                         mean=data_config["mean"], std=data_config["std"], num_workers=args.workers,
                         distributed=distributed, device=device, use_prefetcher=use_prefetcher,
                         pin_memory=device.type == "cuda", persistent_workers=False)
    # persistent_workers=False: each epoch's workers are seeded from the main RNG, which a resume restores
    loader_train = create_loader(
        train_set, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, num_aug_repeats=args.aug_repeats,
        **{**loader_common, "interpolation": args.train_interpolation})
    loader_val = None
    if val_set is not None:
        loader_val = create_loader(val_set, batch_size=args.validation_batch_size or args.batch_size,
                                   is_training=False, crop_pct=data_config["crop_pct"],
                                   crop_mode=data_config.get("crop_mode"), **loader_common)
    if len(loader_train) == 0:
        raise SystemExit(f"{len(train_set)} training samples make no full batch of {args.batch_size} per process")

    updates_per_epoch = math.ceil(len(loader_train) / args.grad_accum_steps)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        cooldown_epochs=args.cooldown_epochs, warmup_lr=args.warmup_lr, min_lr=args.min_lr,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch)

    train_loss_fn, mixup = build_train_loss(args, num_classes)
    train_loss_fn.to(device)
    args.train_loss = describe_train_loss(train_loss_fn, mixup)

    # resume: weights before DDP and EMA are built from them, the rest after
    start_epoch, num_updates, checkpoint = 0, 0, None
    if resume_dir is not None:
        checkpoint_dir, weights, state, _ = load_checkpoint(resume_dir)
        model.load_state_dict(weights["model"])
        checkpoint = (checkpoint_dir, weights, state)
    if args.compile:
        model = torch.compile(model)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    ema = None
    if args.model_ema:
        ema = ModelEmaV3(unwrap_model(model), decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    if checkpoint is not None:
        checkpoint_dir, weights, state = checkpoint
        optimizer.load_state_dict(state["optimizer"])
        # the schedule comes from this run's arguments, positioned at the checkpoint's epoch / step
        changed = sorted(k for k, v in scheduler.state_dict().items()
                         if k != "metric" and state["scheduler"].get(k, v) != v)
        if changed:
            _logger.warning(f"the lr schedule differs from the checkpoint's ({', '.join(changed)}); using this run's")
        scheduler.step(int(state["epoch"]))
        scheduler.step_update(int(state["num_updates"]))
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            if "ema" not in weights:
                raise SystemExit(f"{checkpoint_dir}: has no EMA weights, but --model-ema is on")
            ema.module.load_state_dict(weights["ema"])
        start_epoch, num_updates = int(state["epoch"]), int(state["num_updates"])
        rng = state["rng"]
        if len(rng) == world_size:
            set_rng_state(rng[rank])
        else:
            _logger.warning(f"checkpoint has RNG states of {len(rng)} processes, this run has {world_size}: "
                            "continuing with fresh seeds (losses will differ from an uninterrupted run)")
            random_seed(args.seed + start_epoch, rank)
        _logger.info(f"resumed from {checkpoint_dir} (epoch {start_epoch}, step {num_updates})")
        del checkpoint, weights, state

    # logs (rank 0)
    step_log = epoch_log = writer = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "args.yaml", "w") as f:
            yaml.safe_dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}, f,
                           sort_keys=False)
        keep = start_epoch if resume_dir is not None else 0
        step_log = CsvLog(run_dir / "steps.csv", STEP_FIELDS, keep_through_epoch=keep)
        epoch_log = CsvLog(run_dir / "metrics.csv", EPOCH_FIELDS, keep_through_epoch=keep)
        writer = open_tensorboard(run_dir, num_updates if resume_dir is not None else None, args.no_tensorboard)
        n_params = sum(p.numel() for p in unwrap_model(model).parameters())
        _logger.info(f"{args.model}: {n_params / 1e6:.2f}M params, input {tuple(data_config['input_size'])}, "
                     f"{num_classes} classes; {len(train_set)} train / {len(val_set) if val_set else 0} val images; "
                     f"{world_size} process(es) x batch {args.batch_size} x accum {args.grad_accum_steps} = "
                     f"{global_batch}, lr {args.lr:.3g}; {num_epochs} epochs; run folder {run_dir}")

    def on_step(epoch, step, global_step, loss, lr):
        if not is_main:
            return
        step_log.write(dict(epoch=epoch + 1, step=step, global_step=global_step, loss=f"{loss:.8f}", lr=f"{lr:.8g}"))
        if writer is not None and global_step % args.log_interval == 0:
            writer.add_scalar("train/loss", loss, global_step)
            writer.add_scalar("train/lr", lr, global_step)

    metadata = dict(model=args.model, num_classes=num_classes, model_kwargs=args.model_kwargs,
                    input_size=list(data_config["input_size"]), crop_pct=data_config["crop_pct"],
                    interpolation=data_config["interpolation"], mean=list(data_config["mean"]),
                    std=list(data_config["std"]), dataset=args.dataset,
                    data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else "", format="visionzoo-train-v1")
    metrics = {}
    epoch_bar = tqdm(total=num_epochs, initial=start_epoch, desc="epochs", position=0, disable=not show_progress,
                     dynamic_ncols=True)
    for epoch in range(start_epoch, num_epochs):
        started = time.time()
        if distributed and hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        if mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            mixup.mixup_enabled = False
        step_bar = tqdm(total=len(loader_train), desc=f"epoch {epoch + 1}", position=1, leave=False,
                        disable=not show_progress, dynamic_ncols=True)
        train_loss, num_updates, seen = train_one_epoch(
            epoch, model, loader_train, optimizer, train_loss_fn, scheduler, ema, mixup, scaler, autocast, args,
            device, num_updates, on_step, step_bar)
        step_bar.close()
        train_seconds = time.time() - started
        metrics = dict(epoch=epoch + 1, train_loss=train_loss, lr=optimizer.param_groups[0]["lr"],
                       train_samples_per_s=seen / train_seconds)
        if loader_val is not None:
            metrics.update({k: v for k, v in evaluate(model, loader_val, device, amp_dtype, args.channels_last,
                                                      num_samples=len(val_set)).items() if k != "samples"})
            metrics["val_loss"] = metrics.pop("loss")
            if ema is not None:
                ema_metrics = evaluate(ema.module, loader_val, device, amp_dtype, args.channels_last,
                                       num_samples=len(val_set))
                metrics.update(ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"])
        scheduler.step(epoch + 1, metrics.get("top1"))
        metrics["epoch_seconds"] = time.time() - started

        # checkpoint: every rank's RNG state goes to rank 0, which writes
        rng = gather_rng_states(world_size)
        if is_main:
            state = dict(epoch=epoch + 1, num_updates=num_updates, optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                         rng=rng, world_size=world_size, metrics=metrics, args=json.loads(json.dumps(vars(args))))
            weights = {"model": unwrap_model(model).state_dict()}
            if ema is not None:
                weights["ema"] = ema.module.state_dict()
            save_checkpoint(run_dir / CHECKPOINT_DIR, f"epoch_{epoch + 1:04d}", weights, state,
                            dict(metadata, epoch=epoch + 1, num_updates=num_updates))
            prune_checkpoints(run_dir / CHECKPOINT_DIR, args.keep_checkpoints)
            epoch_log.write({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in metrics.items()})
            if writer is not None:
                for key in ("train_loss", "val_loss", "top1", "top5", "ema_top1"):
                    if key in metrics:
                        writer.add_scalar(f"epoch/{key}", metrics[key], epoch + 1)
                writer.flush()
            summary = f"epoch {epoch + 1}/{num_epochs}: train loss {train_loss:.4f}"
            if "top1" in metrics:
                summary += f", val loss {metrics['val_loss']:.4f}, top-1 {metrics['top1']:.2f}%, " \
                           f"top-5 {metrics['top5']:.2f}%"
            summary += f" ({metrics['epoch_seconds']:.1f} s, {metrics['train_samples_per_s']:.1f} img/s)"
            if show_progress:
                tqdm.write(summary, file=sys.stderr)
            else:
                _logger.info(summary)
        epoch_bar.update(1)
        if distributed:
            dist.barrier()
    epoch_bar.close()

    if is_main:
        final_meta = dict(metadata, epoch=num_epochs, num_updates=num_updates)
        save_weights(run_dir / "model.safetensors", unwrap_model(model).state_dict(), final_meta)
        if ema is not None:
            save_weights(run_dir / "model_ema.safetensors", ema.module.state_dict(), final_meta)
        if writer is not None:
            writer.close()
        if not args.no_plot:
            plot_curves(run_dir)
        (run_dir / "summary.json").write_text(json.dumps(dict(metrics, model=args.model, run_dir=str(run_dir)),
                                                         indent=1))
        _logger.info(f"done: {run_dir}/model.safetensors" + (
            f"; held-out top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%" if "top1" in metrics else ""))
    if distributed:
        dist.destroy_process_group()
    return dict(metrics, run_dir=str(run_dir))


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as e:
        raise SystemExit(f"checkpoint error: {e}") from None
