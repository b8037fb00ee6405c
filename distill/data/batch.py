"""Batches: stacking ``(uint8 image, label)`` pairs, and the conversions that turn one batch into what the teacher
and the student need.

Everything after decoding happens on whole batches, on the device: augmentation (``distill.augment``), then
`to_teacher` ([-1, 1], the teacher's channels and size) and `to_student` (3 channels, the student's size,
normalised with mean/std) from the *same* augmented view.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


def collate(batch):
    """Stack ``(uint8 image [C, H, W], label)`` pairs into ``(uint8 [B, C, H, W], int64 [B])``.

    Datasets of this package decode every image to one size (``image_size``, or their first image's size), so a
    batch always stacks; a dataset of another kind whose images differ is an error naming the sizes and the fix.
    """
    images, labels = zip(*batch)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images in one batch have different shapes {sorted(shapes)}; a dataset must return one "
                         f"size. Fix: set image_size (recipe) / size= (ImageFolder, FileList, HFImages) to decode "
                         f"every image to that size.")
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
