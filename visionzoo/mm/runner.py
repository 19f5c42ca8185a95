"""What ``tools/{train,test}_{det,seg}.py`` share: arguments, config adjustments, mmengine's Runner.

The scripts follow mmdet's / mmseg's own ``tools/train.py`` and ``tools/test.py``. On a machine
without CUDA, :func:`adapt_to_device` makes a GPU config run as is: SyncBN -> BN (SyncBN has no CPU
kernel), gloo instead of NCCL, DDP without device ids. With ``--launcher pytorch`` the gloo process
group is started here, because mmengine's launcher calls ``torch.cuda.set_device``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.runner import Runner

TASKS = {"det": "mmdet", "seg": "mmseg"}
CHECKPOINT_HOOK = "WeightsOnlyCheckpointHook"
_ONE_VALUE_PER_CHANNEL = (
    "train_dataloader.batch_size={batch_size} is too small for a BatchNorm in the model ({error}): "
    "e.g. UperNet's pooling branch reduces each image to 1x1, so a BatchNorm there sees one value per "
    "channel and image. Train with at least 2 images per process (--cfg-options "
    "train_dataloader.batch_size=2), or use GroupNorm in the heads (--cfg-options "
    "model.decode_head.norm_cfg.type=GN model.decode_head.norm_cfg.num_groups=32 "
    "model.auxiliary_head.norm_cfg.type=GN model.auxiliary_head.norm_cfg.num_groups=32); see docs/mm.md."
)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", help="where logs and checkpoints go (default: ./work_dirs/<config name>)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config entries, e.g. train_dataloader.batch_size=4 model.backbone.with_cp=True")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                        help="'pytorch' under torchrun")
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)


def train_parser(task: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=f"Train a {TASKS[task]} model with mmengine's Runner")
    parser.add_argument("config", help="config file, e.g. one of configs/coco/ or configs/ade20k/")
    parser.add_argument("--resume", nargs="?", const="auto",
                        help="resume from this checkpoint, or from the work dir's latest when no path is given")
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision (needs a GPU)")
    _common_arguments(parser)
    return parser


def test_parser(task: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=f"Evaluate a {TASKS[task]} checkpoint with mmengine's Runner")
    parser.add_argument("config", help="config file")
    parser.add_argument("checkpoint", help="checkpoint file (.pth written by the train tool)")
    _common_arguments(parser)
    return parser


def replace_sync_bn(cfg: Any) -> Any:
    """``cfg`` with every ``dict(type='SyncBN', ...)`` turned into ``'BN'`` (in place for ConfigDicts)."""
    if isinstance(cfg, dict):
        if cfg.get("type") == "SyncBN":
            cfg["type"] = "BN"
        for value in cfg.values():
            replace_sync_bn(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            replace_sync_bn(value)
    return cfg


def adapt_to_device(cfg: Config) -> Config:
    """Run a GPU config on CPU when CUDA is absent (see the module docstring); unchanged otherwise."""
    if torch.cuda.is_available():
        return cfg
    for key in cfg.keys():
        replace_sync_bn(cfg[key])
    cfg.env_cfg = ConfigDict(cfg.get("env_cfg", {}))
    cfg.env_cfg.setdefault("dist_cfg", {})["backend"] = "gloo"
    if cfg.get("launcher", "none") != "none" and cfg.get("model_wrapper_cfg") is None:
        cfg.model_wrapper_cfg = dict(
            type="MMDistributedDataParallel",
            device_ids=None,  # a CPU module takes none
            broadcast_buffers=False,
            find_unused_parameters=cfg.get("find_unused_parameters", False),
        )
    return cfg


def _datasets(dataset: Any) -> Iterator[Any]:
    """``dataset`` and the datasets a wrapper (``RepeatDataset``, ``ConcatDataset``, ...) holds."""
    if not isinstance(dataset, dict):
        return
    yield dataset
    yield from _datasets(dataset.get("dataset"))
    for inner in dataset.get("datasets") or ():
        yield from _datasets(inner)


def check_coco_classes(cfg: Config) -> None:
    """Stop with the expected and found class names when a COCO-format dataset's annotation file
    lacks a class of the config: mmdet's ``CocoDataset`` keeps only the categories whose names
    are in its ``metainfo`` classes (COCO's 80 by default), so data with other names loads no
    annotation at all and fails much later ("need at least one array to concatenate")."""
    from mmdet.registry import DATASETS

    for split in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg.get(split)
        if not isinstance(loader, dict):
            continue
        for dataset in _datasets(loader.get("dataset")):
            ann_file = dataset.get("ann_file")
            if not isinstance(ann_file, str) or not ann_file.endswith(".json"):
                continue
            path = Path(ann_file) if Path(ann_file).is_absolute() else Path(dataset.get("data_root") or "") / ann_file
            if not path.is_file():  # mmdet names a missing file itself
                continue
            dataset_type = DATASETS.get(dataset.get("type")) if isinstance(dataset.get("type"), str) else None
            classes = (dataset.get("metainfo") or {}).get("classes")
            if classes is None:
                classes = getattr(dataset_type, "METAINFO", {}).get("classes")
            if classes is None:
                continue
            found = [category["name"] for category in json.loads(path.read_text()).get("categories", [])]
            missing = [name for name in classes if name not in found]
            if missing:
                raise SystemExit(
                    f"{split}.dataset: the classes of the config are not those of {path}: expected "
                    f"{len(classes)} ({_names(classes)}), the file has {len(found)} ({_names(found)}); "
                    f"missing from the file: {_names(missing)}. Set {split}.dataset.metainfo=dict(classes=(...)) "
                    f"to the file's category names and the heads' num_classes to their number (docs/mm.md).")


def _names(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(name) for name in list(names)[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "")


def _check_scope(cfg: Config, task: str) -> None:
    scope = cfg.get("default_scope")
    if scope is not None and scope != TASKS[task]:
        raise SystemExit(f"{cfg.filename}: a {scope} config; use the {'det' if scope == 'mmdet' else 'seg'} tool")


def load_config(args: argparse.Namespace, task: str) -> Config:
    """The config of ``args.config`` with the command-line options applied (as mmdet's tools do)."""
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    _check_scope(cfg, task)
    if task == "det":
        check_coco_classes(cfg)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = str(Path("work_dirs") / Path(args.config).stem)
    # checkpoints readable by torch.load(weights_only=True), for --resume and testing
    hooks = list(cfg.get("custom_hooks", []))
    if not any(hook.get("type") == CHECKPOINT_HOOK for hook in hooks):
        cfg.custom_hooks = hooks + [dict(type=CHECKPOINT_HOOK)]
    return adapt_to_device(cfg)


@contextlib.contextmanager
def _distributed(launcher: str) -> Iterator[None]:
    """Start gloo ourselves on CPU (mmengine's launcher calls ``torch.cuda.set_device``) and always
    destroy the process group at the end. Ranks meet at a barrier first: a rank that tears its gloo
    connections down while a peer still uses them can abort that peer at exit ("terminate called
    without an active exception")."""
    if launcher == "pytorch" and not torch.cuda.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    try:
        yield
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _release_distributed_model(runner: Runner) -> None:
    """Unwrap a DistributedDataParallel model while its process group still exists: a DDP reducer
    destroyed after ``destroy_process_group`` (when the runner is freed at interpreter exit) can
    abort the process after a finished run."""
    if dist.is_initialized() and hasattr(runner.model, "module"):
        runner.model = runner.model.module
        gc.collect()


def train(task: str, argv: Optional[Sequence[str]] = None) -> Runner:
    """``tools/train_{task}.py``: build the Runner from the config and train."""
    args = train_parser(task).parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = load_config(args, task)
    if args.amp:
        if not torch.cuda.is_available():
            raise SystemExit("--amp needs a GPU (mmengine's AmpOptimWrapper runs on CUDA only)")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    with _distributed(args.launcher):
        runner = Runner.from_cfg(cfg)
        try:
            runner.train()
        except ValueError as e:
            if "Expected more than 1 value per channel" not in str(e):
                raise
            raise SystemExit(_ONE_VALUE_PER_CHANNEL.format(error=e, batch_size=cfg.train_dataloader.batch_size)) from None
        _release_distributed_model(runner)
    return runner


def test(task: str, argv: Optional[Sequence[str]] = None) -> dict:
    """``tools/test_{task}.py``: evaluate ``checkpoint`` with the config's test dataloader and evaluator."""
    args = test_parser(task).parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = load_config(args, task)
    cfg.load_from = args.checkpoint
    with _distributed(args.launcher):
        runner = Runner.from_cfg(cfg)
        metrics = runner.test()
        _release_distributed_model(runner)
        return metrics
