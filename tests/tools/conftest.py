"""Shared fixtures for the tools tests: a synthetic ImageFolder, tool runners, one finished run."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
MODEL = "visionzoo_nat_m"  # a real zoo model; small inputs keep it fast

# a tiny run: 4 classes x 8 train images, batch 8 -> 4 steps an epoch
TINY_TRAIN = ["--model", MODEL, "--img-size", "32", "--batch-size", "8", "--workers", "0", "--epochs", "2",
              "--warmup-epochs", "1", "--sched-on-updates", "--lr", "5e-4", "--no-progress", "--no-tensorboard",
              "--model-ema", "--model-ema-decay", "0.9", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25",
              "--mixup", "0.8", "--cutmix", "1.0", "--drop-path", "0.1", "--clip-grad", "5.0"]


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (tools/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"visionzoo_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool_command(name: str, *args) -> list:
    return [sys.executable, str(TOOLS / f"{name}.py"), *map(str, args)]


def run_tool(name: str, *args, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(tool_command(name, *args), capture_output=True, text=True, timeout=timeout,
                            cwd=ROOT, env=dict(os.environ))
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def make_image_folder(root: Path, classes: int = 4, train: int = 8, val: int = 4, size: int = 20) -> Path:
    """``root/{train,validation}/class_k/*.png``: a per-class colour and stripe pattern plus noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("validation", val)):
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = np.zeros((size, size, 3), dtype=np.float32)
                image[..., k % 3] = 160
                image[:, :: k + 2] += 80
                image += rng.normal(0, 20, image.shape)
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, image_folder) -> Path:
    """Two uninterrupted epochs on the synthetic folder (shared by the resume, corruption and validate tests)."""
    run_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    run_tool("train", *TINY_TRAIN, "--data-dir", image_folder, "--output", run_dir)
    return run_dir
