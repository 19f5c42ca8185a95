"""tools/train.py: configs, resume after a kill, damaged checkpoints, torchrun."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from timm.loss import BinaryCrossEntropy

import visionzoo  # noqa: F401
from visionzoo.checkpoint import CheckpointError, load_checkpoint, load_weights, read_state, save_checkpoint

from .conftest import MODEL, ROOT, TINY_TRAIN, TOOLS, load_tool, run_tool, tool_command

CONFIGS = sorted((ROOT / "configs" / "imagenet").glob("*.yaml"))


def read_rows(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def train_tool():
    return load_tool("train")


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def test_every_zoo_family_size_has_a_config():
    assert CONFIGS, "no configs/imagenet/*.yaml"
    expected = {f"visionzoo_{n}" for n in
                "nat_m nat_t nat_s nat_b dinat_m dinat_t dinat_s dinat_b dinat_l dinats_t dinats_s dinats_b "
                "dinats_l nat_iso_s nat_iso_b dinat_iso_s dinat_iso_b".split()}
    expected |= {f"visionzoo_{n}" for n in "halonet26t sehalonet33ts halonet50ts".split()}
    expected |= {f"visionzoo_halonet_h{i}" for i in range(8)}
    expected |= {f"visionzoo_swin_vsa_{n}" for n in "ts"}
    expected |= {f"visionzoo_agent_{n}" for n in "swin_t swin_s swin_b pvt_t pvt_s pvt_m pvt_l deit_t deit_s deit_b".split()}
    expected |= {f"visionzoo_mambavision_{n}" for n in "t t2 s b l l2".split()}
    assert expected <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_names_a_registered_model(train_tool, config):
    args = train_tool.parse_args(["-c", str(config)])
    assert args.model in timm.list_models("visionzoo_*"), f"{config.name}: {args.model} is not registered"
    assert args.model == config.stem
    if args.model.startswith("visionzoo_maxvit_"):  # the official recipe (google-research/maxvit hp/vision_i1k.py)
        assert (args.opt, args.sched, args.weight_decay, args.lr_base, args.lr_base_size) == ("adamw", "cosine", 0.05,
                                                                                             3e-3, 4096)
        assert (args.mixup, args.cutmix, args.smoothing, args.reprob, args.aa) == (0.8, 0.0, 0.1, 0.0, "rand-m15-n2")
        assert (args.model_ema, args.model_ema_decay, args.clip_grad, args.epochs) == (True, 0.9999, 1.0, 300)
        assert 0 < args.drop_path <= 0.6
    elif args.model.startswith("visionzoo_coatnet_"):  # the CoAtNet paper's ImageNet-1K recipe
        assert (args.opt, args.sched, args.weight_decay, args.lr_base, args.lr_base_size) == ("adamw", "cosine", 0.05,
                                                                                             1e-3, 4096)
        assert (args.mixup, args.cutmix, args.smoothing, args.reprob, args.aa) == (0.8, 0.0, 0.1, 0.0, "rand-m15-n2")
        assert (args.model_ema, args.clip_grad, args.epochs) == (False, 1.0, 300)
        assert args.drop_path == {"0": 0.2, "1": 0.3, "2": 0.5, "3": 0.7}[args.model[-1]]
    elif "halonet" in args.model:  # the A1 procedure of ResNet strikes back (the base of timm's a1h recipe)
        assert (args.opt, args.sched, args.weight_decay, args.lr_base, args.lr_base_size) == ("lamb", "cosine", 0.01,
                                                                                             5e-3, 2048)
        assert (args.epochs, args.warmup_epochs, args.cooldown_epochs, args.clip_grad) == (600, 5, 0, None)
        assert (args.bce_loss, args.bce_target_thresh, args.smoothing) == (True, 0.2, 0.1)
        assert (args.mixup, args.cutmix, args.aug_repeats, args.aa) == (0.2, 1.0, 3, "rand-m7-mstd0.5-inc1")
        assert (args.reprob, args.color_jitter, args.model_ema, args.drop_path) == (0.0, 0.0, False, 0.05)
        assert args.batch_size * 8 * args.grad_accum_steps == 2048  # the launch command's 8 processes
        # the resolution and eval transform of the model's own pretrained cfg
        cfg = timm.models.get_pretrained_cfg(args.model)
        assert (args.img_size, args.crop_pct, args.interpolation) == (cfg.input_size[-1], cfg.crop_pct,
                                                                      cfg.interpolation)
    elif args.model.startswith(("visionzoo_swin_vsa_", "visionzoo_agent_")):
        # Swin's recipe: Swin-VSA follows it, Agent-Attention's config.py defaults are it (per-model cfgs on top)
        assert (args.opt, args.sched, args.weight_decay, args.lr_base, args.lr_base_size) == ("adamw", "cosine", 0.05,
                                                                                             5e-4, 512)
        assert (args.mixup, args.cutmix, args.smoothing, args.reprob, args.aa) == (0.8, 1.0, 0.1, 0.25,
                                                                                  "rand-m9-mstd0.5-inc1")
        assert (args.epochs, args.model_ema, args.aug_repeats, args.crop_pct) == (300, False, 0, 0.875)
        # the official warm-up / minimum lr (5e-7 / 5e-6 per 512 images; 1e-6 / 1e-5 for Agent-PVT) at this batch
        per_512 = 2.0 if "_pvt_" in args.model else 1.0
        assert args.warmup_lr == pytest.approx(5e-7 * per_512 * args.batch_size * 8 / 512)
        assert args.min_lr == pytest.approx(5e-6 * per_512 * args.batch_size * 8 / 512)
        official = {"swin_vsa_t": (0.2, 20, 0, 5.0, 128), "swin_vsa_s": (0.3, 20, 0, 5.0, 128),
                    "agent_swin_t": (0.2, 20, 0, 5.0, 128), "agent_swin_s": (0.3, 20, 0, 5.0, 128),
                    "agent_swin_b": (0.5, 20, 0, 5.0, 64), "agent_pvt_t": (0.1, 5, 10, None, 128),
                    "agent_pvt_s": (0.1, 5, 10, None, 128), "agent_pvt_m": (0.3, 5, 10, 1.0, 128),
                    "agent_pvt_l": (0.3, 5, 10, 1.0, 64), "agent_deit_t": (0.0, 20, 0, 5.0, 512),
                    "agent_deit_s": (0.1, 20, 0, 5.0, 128), "agent_deit_b": (0.3, 20, 0, 5.0, 128)}
        assert (args.drop_path, args.warmup_epochs, args.cooldown_epochs, args.clip_grad,
                args.batch_size) == official[args.model.removeprefix("visionzoo_")]
    elif args.model.startswith("visionzoo_mambavision_"):  # NVlabs/MambaVision mambavision/configs/*_1k.yaml
        assert (args.opt, args.sched, args.lr_base, args.lr_base_size, args.clip_grad) == ("lamb", "cosine", 5e-3,
                                                                                        4096, 5.0)
        assert (args.mixup, args.cutmix, args.smoothing, args.reprob, args.aa) == (0.8, 1.0, 0.1, 0.25,
                                                                                  "rand-m9-mstd0.5-inc1")
        assert (args.epochs, args.cooldown_epochs, args.warmup_lr, args.min_lr) == (310, 10, 1e-6, 5e-6)
        assert (args.model_ema, args.model_ema_decay, args.train_interpolation) == (True, 0.9998, "random")
        assert args.batch_size * 8 * args.grad_accum_steps == 4096  # the launch command's 8 processes
        official = {"t": (0.2, 0.05, 20, 1.0), "t2": (0.2, 0.05, 20, 1.0), "s": (0.2, 0.05, 20, 0.875),
                    "b": (0.3, 0.075, 35, 1.0), "l": (0.3, 0.12, 20, 1.0), "l2": (0.3, 0.12, 20, 1.0)}
        assert (args.drop_path, args.weight_decay, args.warmup_epochs,
                args.crop_pct) == official[args.model.removeprefix("visionzoo_mambavision_")]
    else:  # the papers' recipe (specs/training.md)
        assert (args.opt, args.sched, args.weight_decay, args.lr_base, args.lr_base_size) == ("adamw", "cosine", 0.05,
                                                                                             1e-3, 1024)
        assert (args.mixup, args.cutmix, args.smoothing, args.reprob) == (0.8, 1.0, 0.1, 0.25)
        assert args.aa.startswith("rand-m9-mstd0.5")
        assert args.warmup_epochs >= 20 and args.epochs == 300
        assert 0 < args.drop_path <= 0.5
    # command-line arguments override the file
    assert train_tool.parse_args(["-c", str(config), "--epochs", "3"]).epochs == 3


def test_run_args_reload_as_a_config(finished_run, train_tool):
    """args.yaml records the resolved loss beside the arguments, and still reads back as a config."""
    recorded = yaml.safe_load((finished_run / "args.yaml").read_text())
    assert recorded["train_loss"] == "SoftTargetCrossEntropy() on Mixup / CutMix targets smoothed by 0.1"
    reloaded = train_tool.parse_args(["-c", str(finished_run / "args.yaml")])
    assert (reloaded.model, reloaded.mixup, reloaded.lr) == (MODEL, 0.8, 5e-4)


def test_config_with_unknown_key_is_an_error(train_tool, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: visionzoo_nat_m\ndrop_pth: 0.1\n")
    with pytest.raises(SystemExit, match="drop_pth"):
        train_tool.parse_args(["-c", str(bad)])


# ----------------------------------------------------------------------------------------------
# a finished run, resume after a kill
# ----------------------------------------------------------------------------------------------
def test_run_writes_logs_checkpoints_and_plot(finished_run):
    for name in ("args.yaml", "steps.csv", "metrics.csv", "curves.png", "model.safetensors",
                 "model_ema.safetensors", "weights_manifest.json", "summary.json", "checkpoints/latest"):
        assert (finished_run / name).is_file(), name
    metrics = read_rows(finished_run / "metrics.csv")
    assert [int(r["epoch"]) for r in metrics] == [1, 2]
    summary = json.loads((finished_run / "summary.json").read_text())
    assert float(metrics[-1]["top1"]) == pytest.approx(summary["top1"], abs=1e-3)
    assert float(metrics[-1]["ema_top1"]) == pytest.approx(summary["ema_top1"], abs=1e-3)
    assert len(read_rows(finished_run / "steps.csv")) == 8  # 2 epochs x 4 steps
    checkpoint, weights, state, metadata = load_checkpoint(finished_run)
    assert checkpoint.name == "epoch_0002" and set(weights) == {"model", "ema"}
    assert metadata["model"] == MODEL and state["epoch"] == 2 and state["num_updates"] == 8
    # the state file holds only tensors and primitive containers
    torch.load(checkpoint / "state.pt", weights_only=True)


def test_resume_after_kill_equals_uninterrupted_run(finished_run, image_folder, tmp_path):
    run_dir = tmp_path / "killed"
    command = tool_command("train", *TINY_TRAIN, "--data-dir", image_folder, "--output", run_dir)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = run_dir / "checkpoints" / "epoch_0001" / "manifest.json"
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)  # mid-run, no chance to clean up
    process.wait()
    assert first.exists(), process.stderr.read().decode()[-3000:]

    run_tool("train", *TINY_TRAIN, "--data-dir", image_folder, "--output", run_dir,
             "--resume", run_dir / "checkpoints" / "epoch_0001")

    expected, resumed = read_rows(finished_run / "steps.csv"), read_rows(run_dir / "steps.csv")
    assert [(r["epoch"], r["step"]) for r in resumed] == [(r["epoch"], r["step"]) for r in expected]
    for a, b in zip(expected, resumed):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-6, (a, b)
        assert a["lr"] == b["lr"]
    assert read_rows(finished_run / "metrics.csv")[-1]["top1"] == read_rows(run_dir / "metrics.csv")[-1]["top1"]
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(finished_run / name), load_file(run_dir / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


# BCE starts from its constant-prediction level (0.56 for 4 classes, against ln 4 for cross-entropy) and
# needs a larger lr to fall as far in 5 epochs
@pytest.mark.parametrize("loss_args", [["--lr", "1e-3"], ["--lr", "3e-3", "--bce-loss", "--bce-target-thresh", "0.2"]],
                         ids=["ce", "bce"])
def test_training_learns_a_separable_folder(image_folder, tmp_path, loss_args):
    """Without augmentation, a few epochs on the 4 colour / stripe classes: the training loss falls
    and held-out top-1 is far above chance (25 %); constant predictions reach 25 %."""
    run_tool("train", "--model", "test_vit", "--img-size", "32", "--workers", "0", "--epochs", "5",
             "--warmup-epochs", "0", "--batch-size", "8", "--drop-path", "0", "--smoothing", "0",
             "--scale", "1", "1", "--no-progress", "--no-tensorboard", "--no-plot", "--data-dir", image_folder,
             "--output", tmp_path / "run", *loss_args)
    metrics = read_rows(tmp_path / "run" / "metrics.csv")
    losses = [float(r["train_loss"]) for r in metrics]
    assert losses[-1] < 0.75 * losses[0], losses
    assert float(metrics[-1]["top1"]) >= 75.0, metrics[-1]
    steps = [float(r["loss"]) for r in read_rows(tmp_path / "run" / "steps.csv")]
    assert sum(steps[-4:]) < sum(steps[:4]), steps
    loss = "BinaryCrossEntropy(target_threshold=0.2)" if "--bce-loss" in loss_args else "CrossEntropyLoss()"
    assert yaml.safe_load((tmp_path / "run" / "args.yaml").read_text())["train_loss"] == loss


# ----------------------------------------------------------------------------------------------
# losses and repeated augmentation
# ----------------------------------------------------------------------------------------------
def test_bce_loss_with_mixup_thresholds_the_smoothed_mixed_targets(train_tool):
    """With Mixup, smoothing is Mixup's and the BCE only thresholds (timm's train.py): the loss equals
    BCE-with-logits on the mixed, smoothed targets binarized above the threshold."""
    args = train_tool.parse_args(["--model", MODEL, "--bce-loss", "--bce-target-thresh", "0.2", "--mixup", "0.2",
                                  "--cutmix", "1.0", "--smoothing", "0.1", "--bce-pos-weight", "2"])
    loss_fn, mixup = train_tool.build_train_loss(args, num_classes=5)
    assert isinstance(loss_fn, BinaryCrossEntropy) and mixup is not None
    assert (loss_fn.target_threshold, loss_fn.smoothing, float(loss_fn.pos_weight)) == (0.2, 0.0, 2.0)
    assert (mixup.label_smoothing, mixup.mixup_alpha, mixup.cutmix_alpha) == (0.1, 0.2, 1.0)
    assert train_tool.describe_train_loss(loss_fn, mixup) == (
        "BinaryCrossEntropy(target_threshold=0.2, pos_weight=2) on Mixup / CutMix targets smoothed by 0.1")

    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 8, 8), torch.arange(8) % 5
    images, targets = mixup(images, labels)
    logits = torch.randn(8, 5)
    binary = (targets > 0.2).float()
    assert 0 < binary.sum() < binary.numel() and not torch.equal(binary, targets)
    expected = F.binary_cross_entropy_with_logits(logits, binary, pos_weight=torch.tensor(2.0))
    torch.testing.assert_close(loss_fn(logits, targets), expected)


def test_bce_loss_without_mixup_smooths_the_labels(train_tool):
    args = train_tool.parse_args(["--model", MODEL, "--bce-loss", "--smoothing", "0.2"])
    loss_fn, mixup = train_tool.build_train_loss(args, num_classes=4)
    assert mixup is None and isinstance(loss_fn, BinaryCrossEntropy)
    assert (loss_fn.smoothing, loss_fn.target_threshold, loss_fn.pos_weight) == (0.2, None, None)
    logits, labels = torch.randn(3, 4), torch.tensor([0, 3, 1])
    smoothed = torch.full((3, 4), 0.05).scatter_(1, labels[:, None], 0.85)  # 1 - 0.2 + 0.2 / 4 on the label
    torch.testing.assert_close(loss_fn(logits, labels), F.binary_cross_entropy_with_logits(logits, smoothed))
    # with a threshold the smoothed one-hot targets binarize back to one-hot
    args = train_tool.parse_args(["--model", MODEL, "--bce-loss", "--smoothing", "0.2", "--bce-target-thresh", "0.2"])
    loss_fn, _ = train_tool.build_train_loss(args, num_classes=4)
    one_hot = F.one_hot(labels, 4).float()
    torch.testing.assert_close(loss_fn(logits, labels), F.binary_cross_entropy_with_logits(logits, one_hot))
    # without smoothing too, --bce-loss is BCE (not a silent fallback to cross-entropy)
    args = train_tool.parse_args(["--model", MODEL, "--bce-loss", "--smoothing", "0"])
    loss_fn, _ = train_tool.build_train_loss(args, num_classes=4)
    torch.testing.assert_close(loss_fn(logits, labels), F.binary_cross_entropy_with_logits(logits, one_hot))
    assert train_tool.describe_train_loss(loss_fn, None) == "BinaryCrossEntropy()"


@pytest.mark.parametrize("argv, message", [
    (["--bce-target-thresh", "0.2"], "--bce-target-thresh only acts on --bce-loss"),
    (["--bce-pos-weight", "2"], "--bce-pos-weight only acts on --bce-loss"),
    (["--bce-loss", "--bce-target-thresh", "1.5"], r"--bce-target-thresh must be in \[0, 1\)"),
    (["--smoothing", "1"], r"--smoothing must be in \[0, 1\)"),
    (["--aug-repeats", "-1"], "--aug-repeats must be >= 0"),
])
def test_bad_loss_and_repeat_arguments_are_named(train_tool, capsys, argv, message):
    with pytest.raises(SystemExit):
        train_tool.parse_args(["--model", MODEL, *argv])
    assert re.search(message, capsys.readouterr().err)


def test_repeated_augmentation_needs_a_distributed_run(train_tool, image_folder, tmp_path):
    with pytest.raises(SystemExit, match=r"--aug-repeats 3: .* distributed run .* torchrun"):
        train_tool.main(["--model", MODEL, "--aug-repeats", "3", "--data-dir", str(image_folder),
                         "--output", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # stopped before writing anything


# ----------------------------------------------------------------------------------------------
# damaged checkpoints
# ----------------------------------------------------------------------------------------------
def test_final_weights_with_a_flipped_byte_are_a_clear_error(finished_run, tmp_path):
    run_dir = tmp_path / "flipped"
    shutil.copytree(finished_run, run_dir)
    weights = run_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x01  # inside the last tensor's data: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupted: sha256 differs"):
        load_weights(weights)
    load_weights(run_dir / "model_ema.safetensors")  # its neighbour is intact and loads
    result = run_tool("validate", "--checkpoint", run_dir, "--workers", "0", "--no-progress", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{weights}: corrupted" in result.stderr, result.stderr[-2000:]


def test_truncated_checkpoint_is_a_clear_error_and_the_previous_one_survives(finished_run, image_folder, tmp_path):
    run_dir = tmp_path / "damaged"
    shutil.copytree(finished_run, run_dir)
    latest = run_dir / "checkpoints" / "epoch_0002"
    weights = latest / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)

    result = run_tool("train", *TINY_TRAIN, "--data-dir", image_folder, "--output", run_dir,
                      "--resume", run_dir, check=False)
    assert result.returncode != 0
    assert str(weights) in result.stderr and "truncated" in result.stderr, result.stderr[-2000:]
    assert "epoch_0001" in result.stderr  # points at the checkpoint to fall back on
    assert "Traceback" not in result.stderr

    # nothing was overwritten: the earlier checkpoint loads, the damaged one still fails the same way
    checkpoint, weights_, state, _ = load_checkpoint(run_dir / "checkpoints" / "epoch_0001")
    assert state["epoch"] == 1 and "model" in weights_
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(latest)


def test_altered_and_incomplete_checkpoints_are_named(finished_run, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(finished_run / "checkpoints", root)
    state = root / "epoch_0002" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"state\.pt: corrupted"):
        load_checkpoint(root)
    # a state file read directly (no manifest) still fails cleanly, never unpickling code
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        read_state(tmp_path / "junk.pt")
    (root / "epoch_0001" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(root / "epoch_0001")


def test_failed_save_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    good = {"model": {"w": torch.ones(3)}}
    save_checkpoint(root, "epoch_0001", good, {"epoch": 1})

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(root, "epoch_0001", {"model": {"w": torch.zeros(3)}}, {"epoch": 1})
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(root, "epoch_0002", {"model": {"w": torch.zeros(3)}}, {"epoch": 2})
    monkeypatch.undo()
    checkpoint, weights, state, _ = load_checkpoint(root)
    assert checkpoint.name == "epoch_0001" and torch.equal(weights["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in root.iterdir()) == ["epoch_0001", "latest"]  # no temporary leftovers


# ----------------------------------------------------------------------------------------------
# torchrun
# ----------------------------------------------------------------------------------------------
def test_torchrun_two_processes(image_folder, tmp_path):
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(TOOLS / "train.py"), "--model", MODEL, "--img-size", "32", "--batch-size", "4", "--workers", "0",
               "--epochs", "1", "--warmup-epochs", "0", "--lr", "5e-4", "--no-progress", "--no-tensorboard",
               "--max-val-samples", "15", "--aug-repeats", "3", "--data-dir", str(image_folder),
               "--output", str(run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    steps = read_rows(run_dir / "steps.csv")
    assert len(steps) == 4  # 32 images / (2 processes x 4); with 3 repeats each process sees 16 of the 96 copies
    metrics = read_rows(run_dir / "metrics.csv")
    assert len(metrics) == 1 and metrics[0]["top1"] != ""
    _, _, state, _ = load_checkpoint(run_dir)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    # the padded last shard of the 2-process evaluation is left out: one process agrees exactly
    summary = json.loads((run_dir / "summary.json").read_text())
    single = load_tool("validate").main(["--checkpoint", str(run_dir), "--max-samples", "15", "--workers", "0",
                                         "--no-progress"])
    assert single["samples"] == 15
    assert single["top1"] == pytest.approx(summary["top1"], abs=1e-3)
    assert single["loss"] == pytest.approx(summary["val_loss"], abs=1e-4)


def test_gradient_accumulation_matches_the_full_batch(image_folder, tmp_path):
    # the mechanics are model-agnostic: timm's 0.4M-parameter test ViT (built for 32x32) keeps it quick
    common = ["--model", "test_vit", "--img-size", "32", "--workers", "0", "--epochs", "1", "--warmup-epochs", "0",
              "--lr", "5e-4", "--drop-path", "0", "--no-progress", "--no-tensorboard", "--no-plot", "--val-split", "",
              "--data-dir", image_folder]
    run_tool("train", *common, "--batch-size", "8", "--output", tmp_path / "full")
    run_tool("train", *common, "--batch-size", "4", "--grad-accum-steps", "2", "--output", tmp_path / "accum")
    full, accum = read_rows(tmp_path / "full" / "steps.csv"), read_rows(tmp_path / "accum" / "steps.csv")
    assert len(full) == len(accum) == 4
    for a, b in zip(full, accum):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4)
