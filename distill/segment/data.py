"""Segmentation data of a run: the labelled training subset and the evaluation split, read through the data package
(`distill.data.segmentation`: the pairs, checked; `distill.data.seglayouts`: the layouts as downloaded,
with their classes, palettes and id tables; `distill.data.masks`: mask files and the mask resampler), seeded
label fractions and the joint augmentation.

The readers' names stay importable from here (``SegmentationFolder``, ``read_mask``, ``CAMVID_CLASSES``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset, Subset

from ..augment import JointAugment  # noqa: F401 (its home is distill.augment; imported from here before)
from ..data.masks import read_mask, resize_image, resize_mask  # noqa: F401  (re-exported)
from ..data.segmentation import (CropPadCollate, SegmentationFolder, check_one_size, collate_pairs,  # noqa: F401
                                 pad_pairs, size_batches)
from ..data.seglayouts import (ADE20K_CLASSES, CAMVID_CLASSES, CAMVID_IGNORE_INDEX, CAMVID_PALETTE,  # noqa: F401
                               CITYSCAPES_CLASSES, CITYSCAPES_TRAIN_ID, VOC_CLASSES, layout_info, resolve_split,
                               seeded_palette)
from ..errors import UnreadableFileError, option
from .config import layout_classes


def image_subset(ds: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """A seeded random ``fraction`` of the *images* (each keeps its whole mask; at least one image);
    ``fraction=1`` returns ``ds`` itself. The chosen indices depend only on ``(len(ds), fraction, seed)``.

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    if not (0.0 < float(fraction) <= 1.0):
        raise ValueError(f"{option('fraction')} {fraction!r} is outside (0, 1]; give the share of training masks to "
                         "use, e.g. 0.1 for 10% or 1.0 for all.")
    if float(fraction) == 1.0:
        return ds
    n = max(1, round(float(fraction) * len(ds)))
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, torch.randperm(len(ds), generator=g)[:n].sort().values.tolist())


def read_class_names(path: Optional[str], num_classes: int) -> tuple[str, ...]:
    """Class names, one per line of ``path``; default: ``class0 ..``. ``num_classes`` lines are required.

    Raises:
        ValueError: the file holds a different number of names.
        FileNotFoundError: ``path`` is not a file.
        UnreadableFileError: it cannot be read as UTF-8 text.
    """
    if path is None:
        return tuple(f"class{i}" for i in range(num_classes))
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{option('class_names')} '{path}' is not a file. Fix: give a text file with one class "
                                f"name per line ({num_classes} lines), or leave it out for class0, class1, ...")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UnreadableFileError(f"{option('class_names')} '{path}' could not be read as UTF-8 text ({e}). Fix: give "
                                  "a text file with one class name per line.", file) from e
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != num_classes:
        raise ValueError(f"{option('class_names')} '{path}' lists {len(names)} names but {option('num_classes')} is "
                         f"{num_classes}; give one name per line, one line per class (not the ignore index).")
    return names


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """A fixed, seeded colour per class id (``num_classes`` colours, then black for the ignore index)."""
    return list(seeded_palette(num_classes))


@dataclass
class SegData:
    """The datasets of a run and how they are batched.

    ``train``: the labelled subset; ``test``: the whole evaluation split (``eval_split``: the one read, after a
    ``test`` -> ``val`` fallback); ``train_size``: the ``(H, W)`` training batches have (the first training image's,
    after ``--size``); ``collate_train``: brings pairs of other sizes to it (`CropPadCollate`).
    """

    train: Dataset  # the labelled subset
    test: Dataset
    full_train_size: int
    classes: tuple
    palette: list
    ignore_index: int
    eval_split: str = "test"
    train_size: tuple = (0, 0)
    collate_train: object = field(default=collate_pairs, repr=False)

    def eval_batches(self, batch_size: int) -> list[list[int]]:
        """Evaluation batches of equal-size images (every image once, at its own size): ``size_batches``."""
        return size_batches(self.test.sizes, batch_size)

    def grid_pairs(self, n: int):
        """The first ``n`` evaluation pairs, padded to one size (`pad_pairs`)."""
        return pad_pairs([self.test[i] for i in range(min(n, len(self.test)))], self.ignore_index)


def seg_data(root: str, layout: str, fraction: float, seed: int, num_classes: Optional[int],
             ignore_index: Optional[int], eval_split: str = "test", class_names: Optional[str] = None,
             size: Optional[int] = None, mask_threshold: Optional[int] = None) -> SegData:
    """The labelled training subset (a seeded ``fraction`` of the train images) and the full ``eval_split``, every
    pair of both read and checked here (before a model is built).

    ``eval_split='test'`` falls back to ``val`` where there is no labelled test split (logged; never to ``train``).
    A layout's class names and palette are used unless ``class_names`` is given (or the class count differs);
    ``num_classes`` / ``ignore_index`` None take the layout's (`config.layout_classes`). Without ``size``, images of
    different sizes (in either split) are refused, naming two files.
    """
    num_classes, ignore_index = layout_classes(layout, num_classes, ignore_index, mask_threshold)
    used = resolve_split(root, eval_split, layout)
    full = SegmentationFolder(root, "train", num_classes, ignore_index, layout, size, mask_threshold)
    test = SegmentationFolder(root, used, num_classes, ignore_index, layout, size, mask_threshold)
    if size is None:
        check_one_size([full, test], f" (here between the train and {used} splits)")
    info = layout_info(layout)
    builtin = info.classes is not None and num_classes == len(info.classes) and ignore_index == info.ignore_index
    classes = info.classes if builtin and class_names is None else read_class_names(class_names, num_classes)
    palette = list(info.palette) if builtin else default_palette(num_classes)
    train = image_subset(full, fraction, seed)
    first = train.indices[0] if isinstance(train, Subset) else 0
    train_size = tuple(full.sizes[first])
    return SegData(train, test, len(full), classes, palette, ignore_index, used, train_size,
                   CropPadCollate(train_size, ignore_index, seed))
