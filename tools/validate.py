#!/usr/bin/env python
"""Top-1 / top-5 of a checkpoint on a dataset.

    # a run of tools/train.py (run folder, checkpoint dir or .safetensors file); model and data
    # settings come from the checkpoint's metadata, the dataset from the run unless given
    python tools/validate.py --checkpoint output/train/<run>
    python tools/validate.py --checkpoint output/train/<run>/checkpoints/epoch_0010 --ema

    # an official checkpoint through the model's own pretrained loading (key mapping included)
    python tools/validate.py --model visionzoo_nat_m --checkpoint nat_mini.pth --data-dir /data/imagenet

Checkpoints are read without running code from them: safetensors, or ``torch.load(weights_only=True)``
inside timm for ``.pth`` files.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import timm
import torch
from timm.data import create_loader, resolve_data_config

import visionzoo  # noqa: F401  (registers the visionzoo_* models)
from visionzoo.checkpoint import CheckpointError, load_weights
from visionzoo.data import create_dataset
from visionzoo.engine import create_classifier, evaluate

_logger = logging.getLogger("validate")
TRAIN_FORMAT = "visionzoo-train-v1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=None,
                        help="run folder, checkpoint dir, our .safetensors, or an official checkpoint file")
    parser.add_argument("--model", default=None, help="model name (needed for official checkpoints)")
    parser.add_argument("--pretrained", action="store_true", help="the model's own pretrained weights")
    parser.add_argument("--ema", action="store_true", help="the EMA weights of a training checkpoint")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=timm.utils.ParseKwargs)
    parser.add_argument("--dataset", default=None, help="'' (ImageFolder), timm spec or builtin/fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--max-samples", type=int, default=None, help="a fixed random subset")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--crop-pct", type=float, default=None)
    parser.add_argument("--interpolation", default=None)
    parser.add_argument("--batch-size", "-b", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results-file", default=None, help="write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _json(metadata: dict, key: str, default=None):
    return json.loads(metadata[key]) if key in metadata else default


def build_model(args):
    """(model, metadata) from our training checkpoints, official files or the model's pretrained weights."""
    metadata = {}
    if args.checkpoint is not None:
        path = Path(args.checkpoint)
        ours = not path.is_file() or path.suffix == ".safetensors"
        if ours:
            if path.is_file() and args.ema:
                raise SystemExit("--ema needs a checkpoint directory or run folder, not a single weights file")
            if path.is_dir() and (path / "model.safetensors").is_file() and not args.ema:
                path = path / "model.safetensors"  # a finished run: its final weights
            elif path.is_dir() and args.ema and (path / "model_ema.safetensors").is_file():
                path = path / "model_ema.safetensors"
            state_dict, metadata = load_weights(path, key="ema" if args.ema else "model")
            ours = metadata.get("format") == TRAIN_FORMAT
        if ours:
            name = args.model or metadata["model"]
            if name != metadata["model"]:
                raise SystemExit(f"{args.checkpoint} holds {metadata['model']}, not {name}")
            model_kwargs = dict(_json(metadata, "model_kwargs", {}), **args.model_kwargs)
            num_classes = int(metadata["num_classes"])
            img_size = _json(metadata, "input_size", [None])[-1]
            model = create_classifier(name, img_size=img_size, num_classes=num_classes, **model_kwargs)
            model.load_state_dict(state_dict)
            return model, metadata
        if not args.model:
            raise SystemExit(f"{args.checkpoint} is not a tools/train.py checkpoint: pass --model to load it "
                             "through the model's pretrained loader")
        # with num_classes in the overlay, timm keeps the file's classifier instead of dropping it
        overlay = dict(file=str(path), **({"num_classes": args.num_classes} if args.num_classes else {}))
        model = create_classifier(args.model, img_size=args.img_size, pretrained=True,
                                  pretrained_cfg_overlay=overlay, num_classes=args.num_classes, **args.model_kwargs)
        return model, metadata
    if not args.model:
        raise SystemExit("give --checkpoint, or --model (with --pretrained for its published weights)")
    model = create_classifier(args.model, img_size=args.img_size, pretrained=args.pretrained,
                              num_classes=args.num_classes, **args.model_kwargs)
    return model, metadata


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    model, metadata = build_model(args)
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    config = dict(img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation)
    for key in ("crop_pct", "interpolation", "mean", "std"):
        if config.get(key) is None and key in metadata:
            config[key] = _json(metadata, key) if key != "interpolation" else metadata[key]
    if args.img_size is None and "input_size" in metadata:
        config["input_size"] = tuple(_json(metadata, "input_size"))
    data_config = resolve_data_config(config, model=model, verbose=False)

    dataset_name = args.dataset if args.dataset is not None else metadata.get("dataset", "")
    data_dir = args.data_dir if args.data_dir is not None else (metadata.get("data_dir") or None)
    dataset = create_dataset(dataset_name, root=data_dir, split=args.split, max_samples=args.max_samples)
    loader = create_loader(dataset, input_size=data_config["input_size"], batch_size=args.batch_size,
                           is_training=False, interpolation=data_config["interpolation"], mean=data_config["mean"],
                           std=data_config["std"], crop_pct=data_config["crop_pct"],
                           crop_mode=data_config.get("crop_mode"), num_workers=args.workers,
                           use_prefetcher=device.type == "cuda", device=device, pin_memory=device.type == "cuda")
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(loader), desc="validate", leave=False)
    started = time.time()
    metrics = evaluate(model, loader, device, torch.bfloat16 if args.amp else None, args.channels_last,
                       num_samples=len(dataset), progress=progress)
    if progress is not None:
        progress.close()
    name = metadata.get("model", args.model)
    results = dict(model=name, checkpoint=args.checkpoint, dataset=dataset_name or data_dir, split=args.split,
                   top1=round(metrics["top1"], 3), top5=round(metrics["top5"], 3), loss=round(metrics["loss"], 5),
                   samples=metrics["samples"], input_size=list(data_config["input_size"]),
                   seconds=round(time.time() - started, 1))
    print(f"{name}: top-1 {results['top1']:.2f}%  top-5 {results['top5']:.2f}%  loss {results['loss']:.4f}  "
          f"({results['samples']} images of {results['dataset']} {args.split}, "
          f"{data_config['input_size'][-1]}px)")
    if args.results_file:
        Path(args.results_file).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as e:
        sys.exit(f"checkpoint error: {e}")
