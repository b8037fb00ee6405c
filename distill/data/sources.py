"""Datasets by name: the one dispatch from a source name (`distill.vocab.DATASETS`) to a dataset object."""
from __future__ import annotations

from typing import Optional, Sequence

from torch.utils.data import Dataset

from ..errors import option
from ..vocab import DATASETS
from .filelist import FileList, split_csv
from .fmnist import FashionMNIST
from .folder import ImageFolder, split_folder
from .hf import HFImages


def build_dataset(name: str, root: Optional[str] = None, split: str = "train", channels: int = 3, size=None,
                  resize: str = "center-crop", min_side: int = 1, on_error: str = "skip",
                  labelled: bool = True, classes: Optional[Sequence[str]] = None) -> Dataset:
    """Build a dataset by name.

    - ``'fashion-mnist'``: ``root`` = the IDX directory (28 px, in memory; ``size``/``resize`` do not apply).
    - ``'image-folder'``: ``root`` = one split's folder, or a folder holding ``train/`` (``val/``, ``test/``;
      ``val/`` serves ``test`` when there is no ``test/``); class folders may nest; flat = unlabelled.
    - ``'file-list'``: ``root`` = a CSV of ``path[,label]`` rows, or a folder of ``train.csv`` / ``val.csv`` /
      ``test.csv``.
    - ``'hf'``: ``root`` = a ``save_to_disk`` folder or what ``datasets.load_dataset`` reads.

    ``size`` (int or ``(H, W)``), ``resize``, ``min_side``, ``on_error``: decoding, see
    `DecodedImages`. ``labelled=False``: class folders read as unlabelled images.
    ``classes``: the training split's class names (its dataset's ``classes``), when building another split of the
    same data: that split's labels are paired with them by name (`class_index`), so a
    class missing from one split does not shift the others' labels; ignored by Fashion-MNIST (fixed classes).

    Raises:
        ValueError: unknown name (lists the valid ones), or no ``root`` where one is needed.
        DatasetNotFoundError: missing files or split (names the fix).
        ValueError (with ``classes``): this split holds a class the training split lacks (names it and the fix).
    """
    if name == "fashion-mnist":
        return FashionMNIST(root, split)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {list(DATASETS)}.")
    if root is None:
        raise ValueError(f"dataset {name!r} needs a data root (a folder of images or of class folders, a CSV file "
                         f"list, or a Hugging Face dataset); give it as {option('data_root')}.")
    kw = dict(channels=channels, size=size, resize=resize, min_side=min_side, on_error=on_error,
              classes=tuple(classes) if classes else None)
    if name == "image-folder":
        return ImageFolder(split_folder(root, split), labelled=labelled, **kw)
    if name == "file-list":
        return FileList(split_csv(root, split), **kw)
    return HFImages(root, split, **kw)
