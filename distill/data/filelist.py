"""Plain file lists: a CSV of ``path[,label]`` rows, one image each.

``path`` is absolute or relative to the CSV's folder. ``label`` is an integer (used as is) or a class name (classes
sorted by name, numbered from 0); a row without one is unlabelled (``-1``). A first row ``path[,label]`` is a header.
``data_root`` is the CSV itself (one split) or a folder holding ``train.csv``, ``val.csv``, ``test.csv``
(``val.csv`` stands in for a missing ``test.csv``). Python's ``csv`` module reads it: quoting, commas in names.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import DatasetNotFoundError
from ..vocab import SPLITS
from .classes import class_index
from .images import DecodedImages

_logger = logging.getLogger(__name__)


def split_csv(root: str, split: str) -> str:
    """The CSV of ``split``: ``root`` itself when it is a file, else ``root/<split>.csv`` (``val.csv`` for a missing
    ``test.csv``). Raises DatasetNotFoundError naming what exists."""
    r = Path(root).expanduser()
    if r.is_file():
        return str(r)
    if not r.is_dir():
        raise DatasetNotFoundError(f"file list '{r}' does not exist; give a CSV of path[,label] rows, or a folder "
                                   f"holding train.csv / val.csv / test.csv.")
    have = [s for s in SPLITS if (r / f"{s}.csv").is_file()]
    if split in have:
        return str(r / f"{split}.csv")
    if split == "test" and "val" in have:
        return str(r / "val.csv")
    raise DatasetNotFoundError(f"'{r}' holds no {split}.csv (found: {[f'{s}.csv' for s in have]}). Fix: add "
                               f"'{r / (split + '.csv')}', or point data_root at the CSV itself.")


def read_file_list(path: str, classes: Optional[Sequence[str]] = None) -> tuple[list[tuple[str, int]],
                                                                              tuple[str, ...]]:
    """``([(absolute path, label)], classes)`` of a CSV file list (see the module doc). ``classes``: the training
    split's class names; named labels are then numbered by their position in it
    (`class_index`), not by this CSV's own sorted names.

    Raises:
        ValueError: a row with more than two fields, an empty path, or integer and named labels mixed (names the
            CSV and the line); with ``classes``, a label name it lacks, or integer labels where the training split
            names its classes.
        DatasetNotFoundError: the CSV lists no image.
    """
    base = os.path.dirname(os.path.abspath(path))
    rows: list[tuple[str, str, int]] = []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            row = [c.strip() for c in row]
            if not row or not any(row):
                continue
            if line_no == 1 and row[0].lower() in ("path", "file", "filename", "image"):
                continue
            if len(row) > 2 or not row[0]:
                raise ValueError(f"file list '{path}' line {line_no}: {row!r} is not 'path[,label]'. Fix: one image "
                                 f"path per row, optionally a comma and its label; quote names that hold commas.")
            rows.append((row[0], row[1] if len(row) == 2 else "", line_no))
    if not rows:
        raise DatasetNotFoundError(f"file list '{path}' lists no image (expected rows of path[,label]).")
    raw = [lb for _, lb, _ in rows if lb != ""]
    numeric = [lb.lstrip("-").isdigit() for lb in raw]
    if any(numeric) and not all(numeric):
        bad = next(n for (_, lb, n) in rows if lb != "" and not lb.lstrip("-").isdigit())
        raise ValueError(f"file list '{path}' mixes integer and named labels (line {bad}). Fix: use one kind.")
    if all(numeric):
        if classes and raw:
            raise ValueError(f"file list '{path}' has integer labels but the training split names its classes "
                             f"({', '.join(map(repr, list(classes)[:6]))}...); labels cannot be paired by name. Fix: "
                             f"use the class names in both CSVs, or integers in both.")
        index, classes = {}, ()
    else:
        index, classes = class_index(raw, classes, f"file list '{path}'")
    files = []
    for p, lb, _ in rows:
        label = -1 if lb == "" else (int(lb) if not classes else index[lb])
        files.append((p if os.path.isabs(p) else os.path.join(base, p), label))
    return files, classes


class FileList(DecodedImages):
    """The images a CSV file list names (see the module doc), decoded like an image folder's.

    Args:
        path: the CSV.
        channels, size, resize, min_side, on_error: see `DecodedImages`.
        classes: the training split's class names (see `read_file_list`).
    """

    def __init__(self, path: str, channels: int = 3, on_error: str = "skip", size=None, resize: str = "center-crop",
                 min_side: int = 1, classes: Optional[Sequence[str]] = None):
        self.csv = str(Path(path).expanduser())
        self.files, self.classes = read_file_list(self.csv, classes)
        self.labels = torch.tensor([label for _, label in self.files], dtype=torch.int64)
        self.root = Path(self.csv)  # the split's own source: train.csv and test.csv beside it are different roots
        self._setup(channels, size, resize, min_side, on_error)

    def source(self, i: int):
        """``(path, path)``: the file of image ``i``, read by `decode_image` and named in messages."""
        path = self.files[i][0]
        return path, path

    def input_files(self) -> list[str]:
        """The CSV and every file it lists, in dataset order (for the feature-cache key)."""
        return [self.csv] + [p for p, _ in self.files]
