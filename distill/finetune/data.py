"""The data of a fine-tuning run: a seeded stratified label subset and the full test split, batches drawn for a
fixed number of steps (augmentation: `distill.augment`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from ..augment import SeededAugment  # noqa: F401 (its home is distill.augment; imported from here before)
from ..data import build_dataset, dataset_labels, label_subset
from ..errors import option
from ..tune.sampler import StepBatchSampler  # noqa: F401 (its home is distill.tune; imported from here before)


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
                f"{option('data_root')} '{data_root}' has no test/ split, so the test images would be the training "
                f"images; give a folder with train/ and test/ class folders, or {option('test_root')}.")
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
