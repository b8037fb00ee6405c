"""Labels of a dataset and seeded, stratified label subsets (the fraction of every class, at least one each)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset, Subset


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
