"""Image folders as downloaded: ``root/[train|val|test/]<class>[/<subclass>...]/<image>``, or flat (unlabelled).

Only regular files are listed (a named pipe, socket or device with an image extension is skipped, never opened),
directories are walked with `os.scandir` (symlinked folders followed once), and names are kept as Python
``str`` paths (bytes that are not UTF-8 survive as surrogate escapes, so any name the OS allows opens).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import DatasetNotFoundError, option
from ..vocab import SPLITS
from .classes import class_index
from .images import DecodedImages

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _scan(folder: str, left_out: Optional[list] = None) -> tuple[list[str], list[str], int]:
    """``(image files, subfolders, skipped entries)`` of one folder, names sorted (hidden ones left out).

    Skipped, each with a warning and a line appended to ``left_out``: an image name that is not a regular file (a
    pipe, socket or device), and an entry whose symlinks cannot be followed (a symlink loop, ``ELOOP``), which
    ``os.scandir`` reports by raising from ``is_dir()``.
    """
    files, dirs, odd = [], [], 0
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            image = os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            try:
                is_dir, is_file = e.is_dir(), e.is_file()  # both follow symlinks
            except OSError as err:  # ELOOP: a symlink loop; EACCES on a network mount
                line = f"'{e.path}' skipped: it cannot be followed ({err.strerror or err}; a symlink loop?)"
            else:
                if is_dir:
                    dirs.append(e.name)
                elif image and is_file:
                    files.append(e.name)
                if is_dir or is_file or not image:
                    continue
                line = f"'{e.path}' skipped: not a regular file (a pipe, socket or device)"
            odd += 1
            _logger.warning("%s", line)
            if left_out is not None:
                left_out.append(line)
    return sorted(files), sorted(dirs), odd


def list_images(root: str, labelled: bool = True, classes: Optional[Sequence[str]] = None,
                left_out: Optional[list] = None) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    """Every image under ``root`` and its label: ``([(path, label)], classes)``.

    ``labelled`` and ``root`` has subfolders: a class is every folder below ``root`` that holds images directly
    (named by its path relative to ``root``, ``'animals/cat'``) or is empty (keeps its label, with a warning);
    classes sorted by name, or, when ``classes`` (the training split's list) is given, labelled by their position in
    it (`class_index`: a class missing here is named in a warning, one missing there is
    an error). Images directly in ``root`` beside class folders are left out (with a warning).
    Otherwise (flat folder, or ``labelled=False``): every image under ``root``, recursively, with label ``-1``.
    Entries that are skipped (see `_scan`) are appended to ``left_out``, one line each.

    Raises:
        ValueError: ``classes`` is given and ``root`` holds a class folder with images that it lacks.
    """
    files: list[tuple[str, int]] = []
    top_files, top_dirs, _ = _scan(root, left_out)
    if not labelled or not top_dirs:
        stack, seen = [root], set()
        while stack:
            d = stack.pop()
            real = os.path.realpath(d)
            if real in seen:
                continue
            seen.add(real)
            fs, ds, _ = _scan(d, left_out) if d != root else (top_files, top_dirs, 0)
            files += [(os.path.join(d, f), -1) for f in fs]
            stack += [os.path.join(d, s) for s in reversed(ds)]
        return sorted(files, key=lambda t: t[0]), ()
    per_class: dict[str, list[str]] = {}
    stack, seen = [(os.path.join(root, s), s) for s in top_dirs], set()
    while stack:
        d, rel = stack.pop()
        real = os.path.realpath(d)
        if real in seen:
            continue
        seen.add(real)
        fs, ds, _ = _scan(d, left_out)
        if fs or not ds:
            per_class[rel] = [os.path.join(d, f) for f in fs]
        stack += [(os.path.join(d, s), f"{rel}/{s}") for s in ds]
    if top_files:
        _logger.warning("%d image(s) directly in '%s' beside class folders are left out (e.g. '%s'); move them into "
                        "a class folder", len(top_files), root, top_files[0])
    if classes:
        index, classes = class_index([c for c, fs in per_class.items() if fs], classes, f"'{root}'")
    else:
        index, classes = class_index(per_class, None, f"'{root}'")
        for name, label in index.items():
            if not per_class[name]:
                _logger.warning("class folder '%s' holds no images; it keeps label %d", os.path.join(root, name),
                                label)
    for name in sorted(index, key=index.get):
        files += [(p, index[name]) for p in per_class[name]]
    return files, classes


def split_folder(root: str, split: str) -> str:
    """The folder of ``split`` under ``root``: ``root/split`` when ``root`` holds split folders (``train/``,
    ``val/``, ``test/``; ``val/`` stands in for a missing ``test/``), else ``root`` itself (a folder of one split).

    Raises:
        DatasetNotFoundError: ``root`` holds split folders but not this split (names the ones it has).
    """
    r = Path(root).expanduser()
    have = [s for s in SPLITS if (r / s).is_dir()]
    if not have:
        return str(r)
    if split in have:
        return str(r / split)
    if split == "test" and "val" in have:
        _logger.info("'%s' has no test/ split; evaluating on val/", r)
        return str(r / "val")
    raise DatasetNotFoundError(f"'{r}' holds the splits {have} but no '{split}/'. Fix: add '{r / split}', or point "
                               f"data_root at a folder holding '{split}/'.")


class ImageFolder(DecodedImages):
    """Images in ``root/<class>/.../*.jpg`` (labelled, classes sorted by name) or flat in ``root`` (label -1).

    Args:
        root: the folder (one split; see `split_folder` for a folder of splits).
        channels, size, resize, min_side, on_error: see `DecodedImages`.
        labelled: False reads class folders as unlabelled images (label -1), e.g. for distillation only.
        classes: the training split's class list: labels are positions in it, by name (see `list_images`);
            default: this folder's own classes, sorted.

    Attributes:
        files: ``[(path, label)]`` in dataset order. classes: class names (``()`` when unlabelled).

    Raises:
        DatasetNotFoundError: no folder, or no image in it.
        ValueError: ``classes`` is given and the folder holds a class it lacks.
    """

    def __init__(self, root: str, channels: int = 3, on_error: str = "skip", size=None, resize: str = "center-crop",
                 min_side: int = 1, labelled: bool = True, classes: Optional[Sequence[str]] = None):
        root_p = Path(root).expanduser()
        if not root_p.is_dir():
            raise DatasetNotFoundError(
                f"image folder '{root}' does not exist. Fix: give a folder of class folders as "
                f"{option('data_root')}: ROOT/<class>/*.jpg (or ROOT/train/<class>/ and ROOT/test/<class>/). For the "
                f"CIFAR-10 recipes: download CIFAR-10 from https://www.cs.toronto.edu/~kriz/cifar.html and write "
                f"its images as ~/.cache/distill/cifar10-jpg/{{train,test}}/<class>/NNNNN.jpg (the documentation's "
                f"Data page, 'Getting the data', has the script)."
            )
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} is not valid; use 1 (grayscale) or 3 (RGB).")
        left_out: list[str] = []
        self.files, self.classes = list_images(str(root_p), labelled, classes, left_out)
        if not self.files:
            raise DatasetNotFoundError(f"no images with extensions {IMAGE_EXTENSIONS} found under '{root}'"
                                       f"{' (skipped: ' + '; '.join(left_out[:3]) + ')' if left_out else ''}.")
        self.left_out_lines = tuple(left_out)  # each already logged by the listing
        self.labels = torch.tensor([label for _, label in self.files], dtype=torch.int64)
        self.root = root_p
        self._setup(channels, size, resize, min_side, on_error)

    def source(self, i: int):
        """``(path, path)``: the file of image ``i``, read by `decode_image` and named in messages."""
        path = self.files[i][0]
        return path, path

    def input_files(self) -> list[str]:
        """The files this dataset reads, in dataset order (for the feature-cache key)."""
        return [p for p, _ in self.files]
