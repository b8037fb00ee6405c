"""Hugging Face ``datasets`` as an image source: a folder written by ``save_to_disk``, or anything
``datasets.load_dataset`` reads (a hub id from the local hub cache, a folder of images or of parquet / webdataset
``.tar`` shards).

Why ``datasets`` directly rather than timm's ``create_dataset('hfds/...')``: timm's readers hand back PIL images
already ``convert('RGB')``-ed (a 16-bit image is clipped there) and read only hub names through ``load_dataset``,
not a ``save_to_disk`` folder. Here the image column is read undecoded (``Image(decode=False)``: the file's bytes)
and decoded by `decode_image`, so every PIL mode and size is handled as for files.
"""
from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import DatasetNotFoundError, MissingDependencyError, UnreadableFileError
from ..version import install_hint
from .classes import class_index
from .folder import IMAGE_EXTENSIONS
from .images import DecodedImages

_logger = logging.getLogger(__name__)
_SPLIT_ALIASES = {"test": ("test", "validation", "val", "valid"), "val": ("validation", "val", "valid"),
                  "train": ("train",)}


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise MissingDependencyError(f"dataset: hf needs the `datasets` library: {install_hint('hf')}, or pip "
                                     f"install datasets.") from e
    return datasets


def load_hf_split(root: str, split: str):
    """``(datasets.Dataset, split name used)`` of ``split`` from ``root`` (``save_to_disk`` folder, else
    ``load_dataset(root)``); ``test`` falls back to ``validation`` / ``val``; the name is None for a dataset saved
    without splits.

    Raises:
        DatasetNotFoundError: nothing loadable at ``root``, or no such split (names the splits there).
        UnreadableFileError: ``datasets`` failed on a webdataset shard that is cut short (names the shard).
    """
    datasets = _import_datasets()
    r = Path(root).expanduser()
    try:
        if r.is_dir() and ((r / "dataset_dict.json").is_file() or (r / "state.json").is_file()):
            obj = datasets.load_from_disk(str(r))
        else:
            obj = datasets.load_dataset(str(r) if r.exists() else root)
    except (FileNotFoundError, ValueError, ConnectionError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        shards = shard_problems(root)  # a shard cut inside a member fails the whole build
        if shards:
            raise UnreadableFileError(f"cannot load Hugging Face dataset '{root}': {shards[0]}.", root) from None
        raise DatasetNotFoundError(f"cannot load Hugging Face dataset '{root}': {' '.join(str(e).split())[:300]}. "
                                   f"Fix: give a folder written by Dataset.save_to_disk, a folder of data files, or "
                                   f"a hub id in the local cache.") from None
    if isinstance(obj, datasets.Dataset):
        if split != "train":
            raise DatasetNotFoundError(f"Hugging Face dataset '{root}' is one split without a name; it serves as "
                                       f"'train' only, not '{split}'. Fix: save a DatasetDict with a '{split}' split.")
        return obj, None
    for name in _SPLIT_ALIASES.get(split, (split,)):
        if name in obj:
            if name != split:
                _logger.info("Hugging Face dataset '%s' has no '%s' split; using '%s'", root, split, name)
            return obj[name], name
    raise DatasetNotFoundError(f"Hugging Face dataset '{root}' has the splits {sorted(obj)} but no '{split}'. Fix: "
                               f"add it, or use a dataset that has one.")


def tar_problem(path: str) -> Optional[str]:
    """Why the tar shard ``path`` is not whole, or None when it is: not a tar archive, a member whose data runs past
    the end of the file, or no end-of-archive marker (two zero blocks, POSIX) after the last member (the file was cut
    between two members). ``datasets``' webdataset reader stops silently at such a cut, so a shard cut in half gives
    half its rows without a word.
    """
    size = os.path.getsize(path)
    try:
        with tarfile.open(path, "r:") as t:
            members = t.getmembers()
            end = t.offset  # where the next header (the end-of-archive marker in a whole file) starts
    except (tarfile.TarError, OSError) as e:
        return f"not a readable tar archive ({' '.join(str(e).split())[:120]})"
    images = sum(os.path.splitext(m.name)[1].lower() in IMAGE_EXTENSIONS for m in members)
    cut = next((m for m in members if m.offset_data + m.size > size), None)
    if cut is not None:
        return (f"cut short: member '{cut.name}' needs bytes up to {cut.offset_data + cut.size} but the file ends at "
                f"{size}; {images} image(s) before the cut are read, the rest is lost")
    with open(path, "rb") as f:
        f.seek(end)
        marker = f.read(512)
    if len(marker) < 512 or marker.count(0) != 512:
        last = members[-1].name if members else "(none)"
        return (f"cut short: it ends at byte {size}, after member '{last}', without the end-of-archive marker; "
                f"{images} image(s) before the cut are read, the rest is lost")
    return None


def shard_problems(root: str) -> list[str]:
    """One line per webdataset ``.tar`` shard under the folder ``root`` that is not whole (`tar_problem`),
    naming the shard, the cause and the fix; ``[]`` for other sources."""
    r = Path(root).expanduser()
    if not r.is_dir():
        return []
    out = []
    for shard in sorted(r.rglob("*.tar")):
        problem = tar_problem(str(shard))
        if problem:
            out.append(f"webdataset shard '{shard}' is {problem}. Fix: copy or download that shard again")
    return out


class HFImages(DecodedImages):
    """Images (and labels, when there is a label column) of one split of a Hugging Face dataset.

    Args:
        root: see `load_hf_split`. split: ``train``, ``val`` or ``test``.
        image_column: default: the first column of feature type ``Image``.
        label_column: default: the first ``ClassLabel`` column, else an integer column named ``label``, ``labels``
            or ``cls`` (webdataset's ``.cls`` files); none: unlabelled (``-1``).
        channels, size, resize, min_side, on_error: see `DecodedImages`.
        classes: the training split's class names: when this split's ``ClassLabel`` names differ, its labels are
            renumbered by name (`class_index`).

    Raises:
        DatasetNotFoundError: see `load_hf_split`. ValueError: no image column, a named column is absent, or
            (with ``classes``) this split holds a class the training split lacks.
        UnreadableFileError: with ``on_error='raise'``, a webdataset shard that is cut short (`shard_problems`;
            with ``'skip'`` a warning names it and `left_out` says how many images were read).
    """

    def __init__(self, root: str, split: str = "train", channels: int = 3, on_error: str = "skip", size=None,
                 resize: str = "center-crop", min_side: int = 1, image_column: Optional[str] = None,
                 label_column: Optional[str] = None, classes: Optional[Sequence[str]] = None):
        datasets = _import_datasets()
        data, used = load_hf_split(root, split)
        feats = data.features
        if image_column is None:
            image_column = next((c for c, f in feats.items() if isinstance(f, datasets.Image)), None)
        if image_column not in feats:
            raise ValueError(f"Hugging Face dataset '{root}' ({split}) has no image column "
                             f"{'' if image_column is None else repr(image_column) + ' '}(columns: {list(feats)}). "
                             f"Fix: a column of feature type datasets.Image.")
        if label_column is None:
            label_column = next((c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
            if label_column is None:
                label_column = next((c for c in ("label", "labels", "cls") if c in feats and
                                     str(getattr(feats[c], "dtype", "")).startswith("int")), None)
        elif label_column not in feats:
            raise ValueError(f"label_column={label_column!r} is not a column of '{root}' ({split}); columns: "
                             f"{list(feats)}.")
        if isinstance(feats[image_column], datasets.Image):
            data = data.cast_column(image_column, datasets.Image(decode=False))  # {'bytes', 'path'}: decoded here
        self.data, self.image_column, self.label_column = data, image_column, label_column
        # the split's own source (``save_to_disk`` writes ROOT/<split>/): train and test are different roots
        self.root = str(Path(root).expanduser() / str(used)) if used is not None else str(Path(root).expanduser())
        self.source_root, self.split = root, split
        if label_column is None:
            self.labels, self.classes = torch.full((len(data),), -1, dtype=torch.int64), ()
        else:
            self.labels = torch.as_tensor(data[label_column], dtype=torch.int64)
            names = getattr(feats[label_column], "names", None)
            self.classes = tuple(names) if names else ()
            if classes and self.classes:  # renumbered by the training split's names (a ClassLabel may differ)
                present = [self.classes[i] for i in self.labels.unique().tolist() if 0 <= i < len(self.classes)]
                index, self.classes = class_index(present, classes, f"Hugging Face dataset '{root}' ({split})")
                lut = torch.tensor([index.get(n, -1) for n in names], dtype=torch.int64)
                self.labels = torch.where(self.labels >= 0, lut[self.labels.clamp(min=0)], self.labels)
        if len(data) == 0:
            raise DatasetNotFoundError(f"Hugging Face dataset '{root}' ({split}) has no rows.")
        self.leave_out(shard_problems(root), on_error)
        self._setup(channels, size, resize, min_side, on_error)

    def source(self, i: int):
        """``(source, name)`` of row ``i``: its encoded bytes or file path for `decode_image`, and
        ``"ROOT[split] row i (path)"`` for messages."""
        item = self.data[int(i)][self.image_column]
        if isinstance(item, dict):
            name = f"{self.source_root}[{self.split}] row {i}" + (f" ({item['path']})" if item.get("path") else "")
            if item.get("bytes") is not None:
                return item["bytes"], name
            return item["path"], name
        return item, f"{self.source_root}[{self.split}] row {i}"

    def input_files(self) -> list[str]:
        """The Arrow files holding this split, then every image file its rows name by path (for the cache key)."""
        arrow = [f["filename"] for f in self.data.cache_files]
        col = self.data.select_columns([self.image_column])
        paths = [it["path"] for it in col[self.image_column]
                 if isinstance(it, dict) and it.get("bytes") is None and it.get("path")]
        return arrow + paths
