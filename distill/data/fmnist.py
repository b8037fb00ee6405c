"""Fashion-MNIST from its four IDX files (the Debian package ``dataset-fashion-mnist``), kept in memory as uint8."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
import os
from typing import Optional


import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetNotFoundError, option

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped): byte 3 = number of dims, then big-endian uint32 dims, then uint8."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic bytes {data[:4]!r}).")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated inside its header ({len(data)} bytes for {ndim} dimensions).")
    dims = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    expected = int(np.prod(dims))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != expected:
        raise ValueError(f"{path} is truncated: header says {dims} ({expected} bytes), found {arr.size} bytes.")
    return arr.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DatasetNotFoundError(
        f"Fashion-MNIST file '{stem}[.gz]' not found in '{root}'. Install the Debian package with "
        f"`apt-get update && apt-get install -y dataset-fashion-mnist` (it puts the four IDX files in "
        f"{FASHION_MNIST_DIR}), or give a directory holding them as {option('data_root')}: "
        f"{', '.join(s for pair in _FMNIST_FILES.values() for s in pair)} (gzipped or not)."
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST read from its four IDX files; the whole split is kept in memory as uint8.

    Args:
        root: directory with the IDX files (default: the Debian package's directory).
        split: ``'train'`` or ``'test'``.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: Optional[str] = None, split: str = "train"):
        if split not in _FMNIST_FILES:
            raise ValueError(f"split={split!r} is not valid for Fashion-MNIST; valid: {sorted(_FMNIST_FILES)}.")
        root = Path(root or FASHION_MNIST_DIR).expanduser()
        if not root.is_dir():
            _find_idx(root, _FMNIST_FILES[split][0])  # raises with the install hint
        images = read_idx(_find_idx(root, _FMNIST_FILES[split][0]))  # (N, 28, 28)
        labels = read_idx(_find_idx(root, _FMNIST_FILES[split][1]))  # (N,)
        if len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels in {root}.")
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.root, self.split = root, split

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])
