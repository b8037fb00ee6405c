"""Datasets and the conversions that turn one image batch into what the teacher and the student need.

Datasets return ``(image, label)`` with ``image`` a ``uint8`` tensor ``[C, H, W]`` and ``label`` an int
(``-1`` when the dataset has no labels). Everything after that happens on whole batches, on the device:
augmentation (``distill.augment``), then :func:`to_teacher` ([-1, 1], the teacher's channels and size) and
:func:`to_student` (3 channels, the student's size, normalised with mean/std) from the *same* augmented view.
"""
from __future__ import annotations

import gzip
import logging
import os
import struct
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .errors import DatasetNotFoundError
from .vocab import DATASETS, ON_BAD_IMAGE

_logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


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
        f"{FASHION_MNIST_DIR}), or set `data_root` / `--data-root` to a directory holding "
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


class ImageFolder(Dataset):
    """Images in ``root/<class>/*.jpg`` (labelled, classes sorted by name) or flat in ``root`` (label -1).

    Args:
        root: the folder.
        channels: 1 or 3; images are converted with PIL (``'L'`` or ``'RGB'``) so a grayscale file in an RGB
            dataset is expanded, never a crash.
        on_error: ``'skip'`` replaces an unreadable file by the next readable one and counts it in
            ``self.num_skipped``; ``'raise'`` raises an error naming the file.
    """

    def __init__(self, root: str, channels: int = 3, on_error: str = "skip"):
        root_p = Path(root).expanduser()
        if not root_p.is_dir():
            raise DatasetNotFoundError(
                f"image folder '{root}' does not exist. For the CIFAR-10 JPEGs shipped beside the project run "
                f"`mkdir -p ~/.cache/distill && tar -xzf ../shared/data/cifar10-jpg.tar.gz -C ~/.cache/distill` "
                f"and point `data_root` at ~/.cache/distill/cifar10-jpg/train (or test)."
            )
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} is not valid; use 1 (grayscale) or 3 (RGB).")
        if on_error not in ON_BAD_IMAGE:
            raise ValueError(f"on_error={on_error!r} is not valid; valid: {', '.join(ON_BAD_IMAGE)}.")
        subdirs = sorted(d.name for d in root_p.iterdir() if d.is_dir() and not d.name.startswith("."))
        files: list[tuple[str, int]] = []
        if subdirs:
            self.classes = tuple(subdirs)
            for label, name in enumerate(subdirs):
                found = sorted(p for p in (root_p / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
                if not found:
                    _logger.warning("class folder '%s' holds no images; it keeps label %d", root_p / name, label)
                files += [(str(p), label) for p in found]
        else:
            self.classes = ()
            files = [(str(p), -1) for p in sorted(root_p.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise DatasetNotFoundError(f"no images with extensions {IMAGE_EXTENSIONS} found under '{root}'.")
        self.files = files
        self.labels = torch.tensor([label for _, label in files], dtype=torch.int64)
        self.channels, self.on_error, self.root = channels, on_error, root_p
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: str) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (C, H, W)

    def __getitem__(self, i: int):
        for k in range(len(self.files)):
            path, label = self.files[(i + k) % len(self.files)]
            try:
                return self._load(path), label
            except Exception as e:  # PIL raises several types for broken files
                if self.on_error == "raise":
                    raise ValueError(f"cannot read image '{path}': {e}") from e
                self.num_skipped += 1
                _logger.warning("skipping unreadable image '%s': %s", path, e)
        raise ValueError(f"no readable image in '{self.root}'")


def build_dataset(name: str, root: Optional[str] = None, split: str = "train", channels: int = 3) -> Dataset:
    """Build a dataset by name: ``'fashion-mnist'`` (root = the IDX directory) or ``'image-folder'``.

    For ``image-folder``, ``root`` is the split's folder itself, or a folder holding ``train/`` and ``test/``.
    """
    if name == "fashion-mnist":
        return FashionMNIST(root, split)
    if name == "image-folder":
        if root is None:
            raise ValueError("dataset 'image-folder' needs a data root (a folder of images or of class folders): set "
                             "`data_root` in the recipe, or pass --data-root on the command line.")
        if (Path(root).expanduser() / split).is_dir():
            root = str(Path(root).expanduser() / split)
        return ImageFolder(root, channels=channels)
    raise ValueError(f"unknown dataset {name!r}; valid: {list(DATASETS)}.")


def dataset_labels(ds: Dataset) -> torch.Tensor:
    """Labels of a dataset (or of a Subset of one) without loading images."""
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(ds.indices)]
    labels = getattr(ds, "labels", None)
    if labels is None:
        raise ValueError(f"{type(ds).__name__} exposes no `labels`; cannot make a stratified subset.")
    return torch.as_tensor(labels)


def stratified_indices(labels: Sequence[int] | torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Indices of a seeded subset holding ``fraction`` of each class (at least one per class), sorted."""
    if not (0.0 < float(fraction) <= 1.0):
        raise ValueError(f"label fraction {fraction!r} is outside (0, 1]; use e.g. 0.01 for 1% or 1.0 for all.")
    labels = torch.as_tensor(labels)
    if (labels < 0).any():
        raise ValueError("a stratified subset needs labels, but this dataset has unlabelled images (label -1).")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        n = max(1, round(fraction * len(idx)))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(keep).sort().values


def label_subset(ds: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """A seeded, stratified subset of ``ds``; ``fraction=1`` returns ``ds`` itself."""
    if float(fraction) == 1.0:
        return ds
    return Subset(ds, stratified_indices(dataset_labels(ds), fraction, seed).tolist())


def collate(batch):
    """Stack ``(uint8 image, label)`` pairs; images of different sizes are an error naming both sizes."""
    images, labels = zip(*batch)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images in one batch have different shapes {sorted(shapes)}; resize the dataset first.")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class IndexedDataset(Dataset):
    """Wraps a dataset to return ``(image, label, index)`` so a training step can look up cached features."""

    def __init__(self, ds: Dataset):
        self.dataset = ds

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return image, label, i


def collate_indexed(batch):
    """Collate ``(image, label, index)`` triples: ``(images uint8 [B,C,H,W], labels [B], indices [B])``."""
    images, labels = collate([(im, lb) for im, lb, _ in batch])
    return images, labels, torch.tensor([i for _, _, i in batch], dtype=torch.int64)


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1 and c == 3:  # ITU-R 601 luma, as PIL's convert('L')
        w = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise ValueError(f"cannot convert images with {c} channels to {channels} channels.")


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float32 in [0, 1]."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def to_teacher(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Batch in [0, 1] -> the teacher's input: ``channels`` channels, ``size`` px, values in [-1, 1]."""
    return _resize(_match_channels(x, channels), size) * 2.0 - 1.0


def to_student(x: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Batch in [0, 1] -> the student's input: 3 channels, ``size`` px, ``(x - mean) / std`` per channel."""
    x = _resize(_match_channels(x, 3), size)
    m = x.new_tensor(mean).view(1, -1, 1, 1)
    s = x.new_tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def dataset_mean_std(ds: Dataset, n: int = 2000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] of up to ``n`` random images, after expansion to 3 channels."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].tolist()
    x = to_unit(torch.stack([_match_channels(ds[i][0][None], 3)[0] for i in idx]))
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()
