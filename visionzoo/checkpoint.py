"""Training checkpoints: safetensors weights plus a weights-only state file, written atomically.

A checkpoint is one directory, e.g. ``checkpoints/epoch_0003/``::

    model.safetensors   model weights; metadata names the model so tools can rebuild it
    ema.safetensors     EMA weights (when EMA is on)
    state.pt            optimizer, scheduler, RNG states, epoch, step: tensors and primitive
                        containers only, so ``torch.load(weights_only=True)`` reads it
    manifest.json       byte size and sha256 of each file above

It is written under a temporary name and renamed into place (``os.replace``), then the text file
``checkpoints/latest`` is replaced the same way, so a crash while saving leaves the previous
checkpoint and ``latest`` untouched. Loading checks the manifest first: a truncated or altered file
raises :class:`CheckpointError` naming the file. Nothing here unpickles arbitrary objects.

Single weights files (:func:`save_weights`, e.g. a run's final ``model.safetensors`` /
``model_ema.safetensors``) get the same protection: each is recorded, with its size and sha256, in
``weights_manifest.json`` beside it, and :func:`read_weights` checks a file that manifest lists.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

PathLike = Union[str, os.PathLike]

MANIFEST = "manifest.json"
WEIGHTS_MANIFEST = "weights_manifest.json"
LATEST = "latest"
STATE_FILE = "state.pt"
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, truncated or corrupted."""


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_entry(path: Path) -> Dict[str, object]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _saveable(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous, no shared storage (safetensors refuses tied tensors)."""
    out, seen = {}, set()
    for key, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _stringify(metadata: Optional[Mapping[str, object]]) -> Dict[str, str]:
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}


def write_text_atomic(path: PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_weights(path: PathLike, state_dict: Mapping[str, torch.Tensor],
                 metadata: Optional[Mapping[str, object]] = None) -> Path:
    """Write one safetensors file atomically (temp file + ``os.replace``) and record its size and
    sha256 in ``weights_manifest.json`` beside it (checked by :func:`read_weights`).

    ``metadata`` values that are not strings are stored as JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(_saveable(state_dict), str(tmp), metadata=_stringify(metadata))
        _fsync_file(tmp)
        entry = _file_entry(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    manifest_path = path.parent / WEIGHTS_MANIFEST
    files = _read_weights_manifest(manifest_path) if manifest_path.exists() else {}
    files[path.name] = entry
    write_text_atomic(manifest_path, json.dumps({"files": files}, indent=1))
    return path


def save_checkpoint(
    root: PathLike,
    name: str,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    state: Mapping[str, object],
    metadata: Optional[Mapping[str, object]] = None,
) -> Path:
    """Write checkpoint ``root/name`` atomically and point ``root/latest`` at it.

    Args:
        root: the checkpoints folder.
        name: checkpoint directory name, e.g. ``epoch_0003``.
        weights: ``{"model": state_dict, "ema": state_dict}``; each becomes ``<key>.safetensors``.
        state: training state for ``state.pt`` (tensors and primitive containers only).
        metadata: stored in every safetensors header (model name, epoch, ...).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    for stale in root.glob(f".{name}.tmp-*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        files = []
        for key, state_dict in weights.items():
            save_file(_saveable(state_dict), str(tmp / f"{key}.safetensors"), metadata=_stringify(metadata))
            files.append(f"{key}.safetensors")
        torch.save(dict(state), tmp / STATE_FILE)
        files.append(STATE_FILE)
        manifest = {f: _file_entry(tmp / f) for f in files}
        (tmp / MANIFEST).write_text(json.dumps({"files": manifest, "metadata": _stringify(metadata)}, indent=1))
        for f in files + [MANIFEST]:
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        if final.exists():  # re-saving an epoch after a resume: move the old copy aside first
            old = root / f".{name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(root)
    write_text_atomic(root / LATEST, name + "\n")
    return final


def list_checkpoints(root: PathLike) -> List[Path]:
    """Complete-looking checkpoint directories under ``root``, oldest name first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists())


def prune_checkpoints(root: PathLike, keep: int) -> None:
    """Delete all but the ``keep`` most recently written checkpoints; never the one ``latest`` names.

    Recency is the write time, not the name: after a resume from an earlier epoch, checkpoints left
    by the abandoned later epochs go first.
    """
    root = Path(root)
    latest = _read_latest(root)
    checkpoints = sorted((p for p in list_checkpoints(root) if p.name != latest),
                         key=lambda p: (p / MANIFEST).stat().st_mtime_ns)
    for path in checkpoints[: max(0, len(checkpoints) - max(keep - 1, 0))]:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def _read_latest(root: Path) -> Optional[str]:
    try:
        return (root / LATEST).read_text().strip() or None
    except FileNotFoundError:
        return None


def resolve_checkpoint(path: PathLike) -> Path:
    """A checkpoint directory from a checkpoint dir, a checkpoints folder or a run folder."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    for root in (path, path / CHECKPOINT_DIR):
        latest = _read_latest(root)
        if latest:
            return root / latest
    if path.is_dir() and any(p.name.startswith(".") and ".tmp-" in p.name for p in path.iterdir()):
        raise CheckpointError(f"{path}: only an unfinished (temporary) checkpoint is here; nothing complete to load")
    raise CheckpointError(
        f"{path}: not a checkpoint (no {MANIFEST}), a checkpoints folder or a run folder (no {LATEST} file)"
    )


def _others(checkpoint: Path) -> str:
    others = [str(p) for p in list_checkpoints(checkpoint.parent) if p != checkpoint]
    return f" Other checkpoints in {checkpoint.parent}: {', '.join(others)}." if others else ""


def verify_checkpoint(checkpoint: PathLike) -> dict:
    """Check every file against the manifest; returns the manifest or raises :class:`CheckpointError`."""
    checkpoint = Path(checkpoint)
    manifest_path = checkpoint / MANIFEST
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: checkpoint directory does not exist.{_others(checkpoint)}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path}: missing; {checkpoint} is incomplete.{_others(checkpoint)}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e}).{_others(checkpoint)}") from None
    for name, expected in files.items():
        _check_file(checkpoint / name, expected, _others(checkpoint))
    return manifest


def _read_weights_manifest(manifest_path: Path) -> Dict[str, dict]:
    try:
        files = json.loads(manifest_path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}, not a mapping")
        return files
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None


def _check_file(path: Path, expected: Mapping[str, object], hint: str = "") -> None:
    """Raise :class:`CheckpointError` when ``path`` differs from its manifest entry ``expected``."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, though the manifest lists it.{hint}")
    size = path.stat().st_size
    if size != expected["bytes"]:
        what = "truncated" if size < expected["bytes"] else "longer than written"
        raise CheckpointError(f"{path}: {what}: {size} bytes, the manifest says {expected['bytes']}.{hint}")
    if _sha256(path) != expected["sha256"]:
        raise CheckpointError(f"{path}: corrupted: sha256 differs from the manifest.{hint}")


def read_weights(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and header metadata of one safetensors file, with a clear error when it is damaged.

    A file listed in the ``weights_manifest.json`` beside it (:func:`save_weights`) is checked
    against its recorded size and sha256 first.
    """
    path = Path(path)
    manifest_path = path.parent / WEIGHTS_MANIFEST
    if manifest_path.is_file():
        expected = _read_weights_manifest(manifest_path).get(path.name)
        if expected is not None:
            _check_file(path, expected, f" (recorded in {manifest_path})")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such weights file") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupted ({e})") from None


def read_state(path: PathLike) -> dict:
    """The training-state file, loaded with ``weights_only=True`` (no code from the file runs)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such state file") from None
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for damaged files
        raise CheckpointError(f"{path}: unreadable training state, truncated or corrupted ({type(e).__name__}: {e})") from None


def load_checkpoint(path: PathLike) -> Tuple[Path, Dict[str, Dict[str, torch.Tensor]], dict, Dict[str, str]]:
    """Verify and read a checkpoint.

    Returns ``(checkpoint_dir, weights, state, metadata)`` with ``weights = {"model": ..., "ema": ...}``.
    """
    checkpoint = resolve_checkpoint(path)
    manifest = verify_checkpoint(checkpoint)
    weights = {}
    for name in manifest["files"]:
        if name.endswith(".safetensors"):
            weights[name[: -len(".safetensors")]], _ = read_weights(checkpoint / name)
    return checkpoint, weights, read_state(checkpoint / STATE_FILE), dict(manifest.get("metadata", {}))


def load_weights(path: PathLike, key: str = "model") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Weights and metadata from a safetensors file or a checkpoint (dir / run folder; ``key``: model or ema)."""
    path = Path(path)
    if path.is_file():
        return read_weights(path)
    checkpoint = resolve_checkpoint(path)
    manifest = verify_checkpoint(checkpoint)
    if f"{key}.safetensors" not in manifest["files"]:
        raise CheckpointError(f"{checkpoint}: has no {key}.safetensors (files: {', '.join(manifest['files'])})")
    return read_weights(checkpoint / f"{key}.safetensors")


# ----------------------------------------------------------------------------------------------
# RNG state as tensors / primitives (weights_only-loadable)
# ----------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """The torch (CPU and CUDA), numpy and python RNG states of this process."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gauss"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
