"""The data of a fine-tuning run: a seeded stratified label subset and the full test split, batches drawn for a
fixed number of steps, and augmentation on its own RNG stream."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
from torch.utils.data import Dataset, Sampler

from ..data import build_dataset, dataset_labels, label_subset


@dataclass
class FinetuneData:
    train: Dataset  # the labelled subset
    test: Dataset
    num_classes: int
    classes: tuple
    channels: int
    train_full_size: int
    full_train: Dataset


def finetune_data(dataset: str, data_root: Optional[str], fraction: float, seed: int, channels: int,
                  test_root: Optional[str] = None) -> FinetuneData:
    """Train subset (seeded, stratified ``fraction``), full test split and the number of classes."""
    full = build_dataset(dataset, data_root, "train", channels)
    labels = dataset_labels(full)
    if labels.numel() == 0 or (labels < 0).any():
        raise ValueError(
            f"dataset {dataset!r} at '{data_root}' has no labels (images directly in the folder, label -1): "
            f"fine-tuning needs class folders, ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg.")
    test = build_dataset(dataset, test_root or data_root, "test", channels)
    if dataset == "image-folder":
        if Path(test.root).resolve() == Path(full.root).resolve():
            raise ValueError(
                f"--data-root '{data_root}' has no test/ split, so the test images would be the training images; "
                f"give a folder with train/ and test/ class folders, or --test-root.")
        if tuple(test.classes) != tuple(full.classes):
            raise ValueError(f"test classes {list(test.classes)} differ from train classes {list(full.classes)}; "
                             f"the class folders of train/ and test/ must have the same names.")
    classes = tuple(getattr(full, "classes", ()) or ())
    num_classes = len(classes) or int(labels.max()) + 1
    test_labels = dataset_labels(test)
    if (test_labels < 0).any() or int(test_labels.max()) >= num_classes:
        raise ValueError(f"test labels must lie in [0, {num_classes}); got {int(test_labels.min())}.."
                         f"{int(test_labels.max())}.")
    train = label_subset(full, fraction, seed)
    return FinetuneData(train, test, num_classes, classes, channels, len(full), full)


class StepBatchSampler(Sampler):
    """Exactly ``steps`` batches of ``batch_size`` indices from an endless stream of seeded permutations.

    Batches run across epoch boundaries, so a subset smaller than a batch still gives full batches, and the
    image order depends only on ``(n, batch_size, seed)``. With ``world > 1`` each process takes its share
    ``batch[rank::world]`` of every global batch.
    """

    def __init__(self, n: int, batch_size: int, steps: int, seed: int, start: int = 0, rank: int = 0,
                 world: int = 1):
        if n < 1:
            raise ValueError("the labelled subset is empty.")
        self.n, self.batch_size, self.steps, self.seed = n, batch_size, steps, seed
        self.start, self.rank, self.world = start, rank, world

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed)
        buf: list[int] = []
        for step in range(self.steps):
            while len(buf) < self.batch_size:
                buf += torch.randperm(self.n, generator=g).tolist()
            batch, buf = buf[:self.batch_size], buf[self.batch_size:]
            if step >= self.start:
                yield batch[self.rank::self.world]


class SeededAugment:
    """Run an augmentation on its own RNG stream, so its draws do not depend on what else used the global RNG
    (model init, dropout): two runs with the same seed augment every batch identically."""

    def __init__(self, augment: nn.Module, seed: int, device: torch.device):
        self.augment, self.device = augment, torch.device(device)
        self._cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=self._cuda):
            torch.manual_seed(seed)
            self._state = self._get()

    def _get(self):
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self._cuda else None)

    def __call__(self, *x: torch.Tensor):
        """``augment(*x)`` on this stream (one batch, or e.g. images and masks for a joint augmentation)."""
        with torch.random.fork_rng(devices=self._cuda):
            torch.set_rng_state(self._state[0])
            if self._cuda:
                torch.cuda.set_rng_state(self._state[1], self.device)
            out = self.augment(*x)
            self._state = self._get()
        return out
