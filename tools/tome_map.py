#!/usr/bin/env python
"""Draw where token merging (ToMe) put each patch of an image, as a PNG.

    python tools/tome_map.py --image cat.jpg --r 13 --output cat_tome.png
    python tools/tome_map.py --model vit_small_patch16_224 --pretrained --image cat.jpg
    python tools/tome_map.py --index 7 --output fashion_tome.png    # a Fashion-MNIST test image

The model runs with ``apply_tome(model, r, trace_source=True)``; every patch is then painted with
the mean colour of all the patches merged into the same final token, and outlined where its
neighbour belongs to another token (the ToMe paper's visualisation). The PNG shows the input (as
the model sees it, after its eval transform) beside the merge map. Any timm ViT / DeiT name or
``visionzoo_*_tome`` model works; ``--checkpoint`` loads a local state dict of it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from visionzoo import apply_tome
from visionzoo.data import create_dataset
from visionzoo.layers.token_merging import patch_token_ids


def merge_map(image: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``image`` ``[H, W, 3]`` uint8 painted per merged token; ``ids`` ``[gh, gw]`` token id of each patch."""
    grid_h, grid_w = ids.shape
    patch_h, patch_w = image.shape[0] // grid_h, image.shape[1] // grid_w
    image = image[:grid_h * patch_h, :grid_w * patch_w].astype(np.float64)
    patches = image.reshape(grid_h, patch_h, grid_w, patch_w, 3).mean(axis=(1, 3))  # [gh, gw, 3]
    flat_ids = ids.reshape(-1)
    colour_sum = np.zeros((flat_ids.max() + 1, 3))
    np.add.at(colour_sum, flat_ids, patches.reshape(-1, 3))
    colour = colour_sum / np.bincount(flat_ids)[:, None].clip(min=1)
    painted = colour[ids].repeat(patch_h, axis=0).repeat(patch_w, axis=1)
    pixel_ids = ids.repeat(patch_h, axis=0).repeat(patch_w, axis=1)
    border = np.zeros(pixel_ids.shape, dtype=bool)
    border[:-1] |= pixel_ids[:-1] != pixel_ids[1:]
    border[:, :-1] |= pixel_ids[:, :-1] != pixel_ids[:, 1:]
    painted[border] = 255.0
    return painted.round().astype(np.uint8)


def _shown(tensor: torch.Tensor, mean, std) -> np.ndarray:
    """The normalised input ``[3, H, W]`` back as uint8 ``[H, W, 3]``."""
    image = tensor * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--pretrained", action="store_true", help="timm's weights for --model (downloads)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a local state dict for --model")
    parser.add_argument("--r", type=int, default=13, help="tokens merged per block")
    parser.add_argument("--image", type=Path, default=None, help="an image file (default: a Fashion-MNIST test image)")
    parser.add_argument("--index", type=int, default=0, help="which Fashion-MNIST test image, without --image")
    parser.add_argument("--output", type=Path, default=Path("tome_map.png"))
    return parser


def main(argv=None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.r < 0:
        parser.error(f"--r must be >= 0, got {args.r}")
    if args.image is not None and not args.image.is_file():
        parser.error(f"--image: no file at {args.image}")
    overlay = dict(file=str(args.checkpoint)) if args.checkpoint else None
    model = timm.create_model(args.model, pretrained=args.pretrained or args.checkpoint is not None,
                              pretrained_cfg_overlay=overlay).eval()
    apply_tome(model, args.r, trace_source=True)
    config = resolve_data_config({}, model=model)
    if args.image is not None:
        picture = Image.open(args.image).convert("RGB")
    else:
        picture = create_dataset("builtin/fashion-mnist", split="test")[args.index][0]
    tensor = create_transform(**config)(picture)
    ids = patch_token_ids(model, tensor[None])[0].numpy()
    shown = _shown(tensor, config["mean"], config["std"])
    painted = merge_map(shown, ids)
    gap = np.full((painted.shape[0], 8, 3), 255, np.uint8)
    canvas = np.concatenate([shown[:painted.shape[0], :painted.shape[1]], gap, painted], axis=1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(args.output)
    print(f"{len(np.unique(ids))} merged tokens hold the {ids.size} patches; map written to {args.output}")
    return args.output


if __name__ == "__main__":
    main()
