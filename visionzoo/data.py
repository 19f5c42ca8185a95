"""Datasets for the tools: timm's dataset specs plus small built-in sets that install offline.

``create_dataset("builtin/fashion-mnist", split="train")`` reads the Debian package
``dataset-fashion-mnist``; any other name goes to :func:`timm.data.create_dataset` (ImageFolder /
tar layouts, ``torch/...``, ``hfds/...``, ...). Samples are ``(PIL.Image RGB, int)`` so timm's
transforms (``create_transform`` / ``create_loader``) apply unchanged.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

BUILTIN_PREFIX = "builtin/"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"

_TRAIN_SPLITS = ("train", "training")
_EVAL_SPLITS = ("validation", "val", "eval", "evaluation", "test")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzip idx file (the MNIST format): big-endian magic, dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    found, = struct.unpack(">I", data[:4])
    if found != magic:
        raise ValueError(f"{path}: not an idx file with magic {magic} (found {found})")
    num_dims = magic & 0xFF
    dims = struct.unpack(f">{num_dims}I", data[4:4 + 4 * num_dims])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, found {array.size}")
    return array.reshape(dims)


class FashionMNIST(Dataset):
    """Zalando's Fashion-MNIST (60k train / 10k test, 28x28 grayscale, 10 classes, MIT licence).

    Images come out as 3-channel PIL images (gray copied to R, G and B) at 28x28; the transform
    resizes them to the model's input size.
    """

    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    num_classes = len(classes)
    _files = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }

    def __init__(self, root: Optional[str] = None, split: str = "train", transform=None):
        root = Path(root or FASHION_MNIST_DIR)
        split = _canonical_split(split, "builtin/fashion-mnist")
        image_file, label_file = (root / name for name in self._files[split])
        missing = [str(p) for p in (image_file, label_file) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST not found: missing {', '.join(missing)}. Install the offline copy with "
                f"`{FASHION_MNIST_INSTALL}` (Debian/Ubuntu package; files land in {FASHION_MNIST_DIR}), "
                f"or point --data-dir at a folder holding the four idx .gz files of "
                f"https://github.com/zalandoresearch/fashion-mnist."
            )
        self.images = _read_idx(image_file, 2051)
        self.targets = _read_idx(label_file, 2049).astype(np.int64)
        if len(self.images) != len(self.targets):
            raise ValueError(f"{root}: {len(self.images)} images but {len(self.targets)} labels")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


BUILTIN_DATASETS = {"fashion-mnist": FashionMNIST}


def _canonical_split(split: str, name: str) -> str:
    if split in _TRAIN_SPLITS:
        return "train"
    if split in _EVAL_SPLITS:
        return "test"
    raise ValueError(f"{name}: unknown split {split!r}; use 'train' or one of {', '.join(_EVAL_SPLITS)}")


class SampleSubset(Dataset):
    """A fixed subset of a dataset that forwards ``transform`` to it (timm's loaders set it).

    ``torch.utils.data.Subset`` would swallow the ``dataset.transform = ...`` assignment that
    :func:`timm.data.create_loader` makes.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = list(indices)

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, transform):
        self.dataset.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def create_dataset(
    name: str,
    root: Optional[str] = None,
    split: str = "train",
    max_samples: Optional[int] = None,
    subset_seed: int = 0,
    **timm_kwargs,
) -> Dataset:
    """A dataset by name: ``builtin/<name>`` or anything :func:`timm.data.create_dataset` takes.

    Args:
        name: ``builtin/fashion-mnist``, ``""`` / ``folder`` for an ImageFolder under ``root``, or a
            timm spec such as ``torch/cifar10``.
        root: data folder (ImageFolder root; for built-ins it overrides the install location).
        split: ``train`` or ``validation`` (timm searches ``root`` for the split's sub-folder).
        max_samples: keep a fixed random subset of this many samples (quick runs, tests).
        subset_seed: seed of that subset, independent of the training seed.
    """
    if name.lower().startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX):].lower()
        if key not in BUILTIN_DATASETS:
            raise ValueError(f"unknown built-in dataset {name!r}; available: "
                             + ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_DATASETS))
        dataset = BUILTIN_DATASETS[key](root=root, split=split)
    else:
        from timm.data import create_dataset as timm_create_dataset

        if "/" not in name and (root is None or not os.path.exists(root)):
            raise FileNotFoundError(f"dataset {name or 'folder'!r}: data folder {root!r} does not exist (--data-dir)")
        dataset = timm_create_dataset(name, root=root, split=split, **timm_kwargs)
    if max_samples is not None and max_samples < len(dataset):
        generator = torch.Generator().manual_seed(subset_seed)
        indices = torch.randperm(len(dataset), generator=generator)[:max_samples].tolist()
        dataset = SampleSubset(dataset, indices)
    return dataset


def dataset_num_classes(dataset: Dataset) -> Optional[int]:
    """Number of classes a dataset declares (built-ins, ImageFolder readers, torchvision sets), else None."""
    while isinstance(dataset, SampleSubset):
        dataset = dataset.dataset
    if getattr(dataset, "num_classes", None):
        return int(dataset.num_classes)
    reader = getattr(dataset, "reader", None)
    class_to_idx = getattr(reader, "class_to_idx", None) or getattr(dataset, "class_to_idx", None)
    if class_to_idx:
        return len(class_to_idx)
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else None
