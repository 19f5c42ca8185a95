"""tools/validate.py, tools/benchmark.py, tools/demo.py and the built-in dataset."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import visionzoo  # noqa: F401
from visionzoo.checkpoint import load_weights
from visionzoo.data import FASHION_MNIST_DIR, FashionMNIST, SampleSubset, create_dataset, dataset_num_classes

from .conftest import MODEL, load_tool, run_tool

HAVE_FASHION_MNIST = Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file()
needs_fashion_mnist = pytest.mark.skipif(
    not HAVE_FASHION_MNIST, reason="offline Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist")


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def test_missing_builtin_data_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        create_dataset("builtin/fashion-mnist", root=str(tmp_path))
    with pytest.raises(ValueError, match="builtin/fashion-mnist"):
        create_dataset("builtin/no-such-set")


@needs_fashion_mnist
def test_fashion_mnist_gives_rgb_pil_images():
    test = FashionMNIST(split="validation")
    assert len(test) == 10000 and dataset_num_classes(test) == 10
    image, label = test[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (28, 28)
    assert 0 <= label < 10
    subset = create_dataset("builtin/fashion-mnist", split="train", max_samples=50)
    assert isinstance(subset, SampleSubset) and len(subset) == 50 and dataset_num_classes(subset) == 10
    subset.transform = lambda img: img.size  # timm's loaders assign .transform; it must reach the data
    assert subset[0][0] == (28, 28)


# ----------------------------------------------------------------------------------------------
# validate
# ----------------------------------------------------------------------------------------------
def test_validate_train_checkpoint_matches_training_eval(finished_run, tmp_path):
    validate = load_tool("validate")
    expected = json.loads((finished_run / "summary.json").read_text())
    for argv, key in ((["--checkpoint", str(finished_run)], "top1"),
                      (["--checkpoint", str(finished_run / "checkpoints"), "--ema"], "ema_top1")):
        results = validate.main(argv + ["--workers", "0", "--no-progress"])
        assert results["model"] == MODEL and results["samples"] == 16
        assert results["top1"] == pytest.approx(expected[key], abs=1e-3)


def test_validate_official_checkpoint_through_pretrained_loading(finished_run, tmp_path):
    """A plain ``.pth`` state dict goes through timm's pretrained loader (weights_only, filter fn)."""
    validate = load_tool("validate")
    state_dict, metadata = load_weights(finished_run / "model.safetensors")
    official = tmp_path / "official.pth"
    torch.save({"model": state_dict}, official)
    expected = validate.main(["--checkpoint", str(finished_run), "--workers", "0", "--no-progress"])
    results = validate.main(["--model", MODEL, "--checkpoint", str(official), "--num-classes", "4",
                             "--img-size", "32", "--crop-pct", str(json.loads(metadata["crop_pct"])),
                             "--data-dir", metadata["data_dir"], "--workers", "0", "--no-progress"])
    assert results["top1"] == pytest.approx(expected["top1"], abs=1e-3)


# ----------------------------------------------------------------------------------------------
# benchmark
# ----------------------------------------------------------------------------------------------
def test_benchmark_measures_and_fills_only_the_measured_section(tmp_path):
    benchmark = load_tool("benchmark")
    cards = tmp_path / "cards"
    cards.mkdir()
    card = cards / f"{MODEL}.md"
    card.write_text("# NAT-Mini\n\nreported: 81.8\n\n<!-- measured:begin -->\nold numbers\n"
                    "<!-- measured:end -->\n\n## Citation\n")
    output = tmp_path / "bench"
    rows = benchmark.main(["--models", MODEL, "--img-size", "32", "--batch-size", "2", "--warmup", "1",
                           "--iters", "1", "--output", str(output), "--update-cards", "--cards-dir", str(cards)])
    (row,) = rows
    assert not row.get("error")
    assert row["params_m"] == pytest.approx(19.98, abs=0.05)  # specs/neighborhood.md: 19.98M
    assert row["gmacs_default"] == pytest.approx(2.7, abs=0.1)  # reported 2.7G at 224
    assert row["infer_img_s"] > 0 and row["train_img_s"] > 0 and row["infer_latency_ms"] > 0
    with open(output / "benchmark.csv", newline="") as f:
        assert next(csv.DictReader(f))["model"] == MODEL
    assert (output / "throughput_vs_flops.png").is_file() and (output / "throughput_vs_resolution.png").is_file()
    text = card.read_text()
    assert text.startswith("# NAT-Mini\n\nreported: 81.8\n\n<!-- measured:begin -->\n**Measured**")
    assert text.endswith("<!-- measured:end -->\n\n## Citation\n") and "old numbers" not in text
    assert "19.98 M" in text and "benchmark.py" in text and "torch" in text


def test_neighborhood_attention_flops_are_counted():
    benchmark = load_tool("benchmark")
    # NAT-Mini at 224: 2.7 GMACs reported; without the attention formula the count is ~0.14 G lower
    assert benchmark.count_flops(MODEL, 224, {}) / 2e9 == pytest.approx(2.69, abs=0.02)


# ----------------------------------------------------------------------------------------------
# quick start in miniature
# ----------------------------------------------------------------------------------------------
@needs_fashion_mnist
def test_demo_in_miniature(tmp_path):
    output = tmp_path / "demo"
    result = run_tool("demo", "--epochs", "1", "--max-samples", "128", "--max-val-samples", "64",
                      "--batch-size", "32", "--bench-models", MODEL, "--bench-img-size", "32",
                      "--bench-batch-size", "2", "--output", output, "--no-progress")
    summary = json.loads((output / "train" / "summary.json").read_text())
    # what the demo prints is the run's held-out result (learning itself: tests/tools/test_train.py)
    assert summary["model"] == MODEL and f"held-out top-1 {summary['top1']:.2f}%" in result.stdout
    for name in ("train/model.safetensors", "train/curves.png", "train/metrics.csv", "benchmark/benchmark.csv",
                 "benchmark/throughput_vs_flops.png"):
        assert (output / name).is_file(), name
    assert "held-out top-1" in result.stdout and "GMACs" in result.stdout
