"""A fingerprint of everything a dataset reads, for the feature-cache key: every input file, not a sample.

File-backed datasets (image folders, file lists, Hugging Face datasets) expose ``input_files()``; each file adds its
path (relative to the dataset root, as OS bytes), its size and its modification time in nanoseconds (``mode='stat'``:
one ``os.stat`` per file: 0.4-0.7 s for 50,000 files, about 15 s per million, on this project's 2-core CPU,
``tools/bench_data_fingerprint.py``), or the sha256 of its bytes
(``mode='content'``: reads everything; catches an edit that keeps size and mtime, e.g. after ``touch -r``). An
in-memory dataset (Fashion-MNIST) hashes its pixels; any other dataset hashes every image it returns.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

import torch
from torch.utils.data import Dataset, Subset

from ..vocab import DATA_HASH
from .subsets import dataset_labels

_CHUNK = 1 << 20


def base_dataset(ds: Dataset) -> tuple[Dataset, Optional[list[int]]]:
    """The underlying dataset and the indices of a (possibly nested) Subset, or None for all of it."""
    idx = None
    while isinstance(ds, Subset):
        sub = list(ds.indices)
        idx = sub if idx is None else [sub[i] for i in idx]
        ds = ds.dataset
    return ds, idx


def file_record(path: str, root: Optional[str] = None, mode: str = "stat") -> bytes:
    """``relpath \\0 size mtime_ns`` (``stat``) or ``relpath \\0 size sha256`` (``content``) of one file, as bytes;
    a file that is gone records ``missing``. Paths are OS bytes (``os.fsencode``): any name the OS allows."""
    prefix = os.path.join(root, "") if root else ""
    rel = path[len(prefix):] if prefix and path.startswith(prefix) else path  # cheaper than os.path.relpath
    head = os.fsencode(rel) + b"\0"
    try:
        st = os.stat(path)
    except OSError:
        return head + b"missing\n"
    if mode == "stat":
        return head + f"{st.st_size} {st.st_mtime_ns}\n".encode()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return head + f"{st.st_size} {h.hexdigest()}\n".encode()


def _update_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def data_fingerprint(ds: Dataset, mode: str = "stat") -> str:
    """sha256 of the dataset's size, order, labels, decode settings and every input file (see the module doc).

    Args:
        ds: a dataset of this package or a ``Subset`` of one (its indices are part of the fingerprint).
        mode: ``'stat'`` (size + mtime of each file) or ``'content'`` (sha256 of each file's bytes).

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode not in DATA_HASH:
        raise ValueError(f"data hash mode {mode!r} is not valid; valid: {', '.join(DATA_HASH)}.")
    h = hashlib.sha256()
    h.update(f"n={len(ds)} mode={mode}\n".encode())
    base, idx = base_dataset(ds)
    if idx is not None:
        h.update(torch.as_tensor(idx, dtype=torch.int64).numpy().tobytes())
    try:
        h.update(dataset_labels(ds).to(torch.int64).numpy().tobytes())
    except ValueError:
        pass
    h.update(repr([getattr(base, k, None) for k in ("channels", "size", "resize", "min_side")]).encode())
    files = getattr(base, "input_files", None)
    images = getattr(base, "images", None)
    if callable(files):
        root = getattr(base, "root", None)
        root = os.fspath(root) if isinstance(root, (str, os.PathLike)) and os.path.isdir(root) else None
        for p in files():
            h.update(file_record(p, root, mode))
    elif isinstance(images, torch.Tensor) and len(images) == len(base):
        _update_tensor(h, images if idx is None else images[torch.as_tensor(idx, dtype=torch.long)])
    else:
        for i in range(len(ds)):
            _update_tensor(h, torch.as_tensor(ds[i][0]))
    return h.hexdigest()
