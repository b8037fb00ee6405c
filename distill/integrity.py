"""Is an input file whole? Checks that name the file instead of letting a library fail deep inside it.

A safetensors file is checked from its header alone (8-byte length, JSON header, the data offsets it declares
against the file size): an empty, truncated or cut-and-padded file is found without reading the weights. A
``torch.save`` file (optimizer and RNG states) by its zip directory, or by loading it memory-mapped with
``weights_only=True``. JSON files are read with the file, line and column of a syntax error in the message.
Torch-free at import (used by the teacher loader, the run directory, the export and fine-tuning).
"""
from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

from .errors import UnreadableFileError, UntrustedCheckpointError

PathLike = Union[str, Path]
#: safetensors refuses headers above 100 MB; anything larger is not a header
MAX_SAFETENSORS_HEADER = 100_000_000


def safetensors_header(path: PathLike) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets; ``__metadata__``), checked
    against the file's size.

    Raises:
        FileNotFoundError: no such file.
        UnreadableFileError: the file is empty, truncated, longer than its header says, or not safetensors; the
            message says which, in bytes.
    """
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        raise UnreadableFileError(f"'{p}' is empty (0 bytes)", p)
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UnreadableFileError(f"'{p}' is truncated ({size} bytes, shorter than a safetensors header)", p)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER:
            raise UnreadableFileError(f"'{p}' is not a safetensors file (header length {n})", p)
        if 8 + n > size:
            raise UnreadableFileError(f"'{p}' is truncated ({size} bytes; its header alone needs {8 + n})", p)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise UnreadableFileError(f"'{p}' is not a safetensors file (its header is not JSON: {e})", p) from None
    if not isinstance(header, dict):
        raise UnreadableFileError(f"'{p}' is not a safetensors file (its header is not a JSON object)", p)
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise UnreadableFileError(f"'{p}' is truncated ({size} of {expected} bytes)", p)
    if size > expected:
        raise UnreadableFileError(f"'{p}' is damaged ({size} bytes, its header describes {expected})", p)
    return header


def safetensors_problem(path: PathLike) -> Optional[str]:
    """What is wrong with a safetensors file (``'missing'``, ``'empty (0 bytes)'``, ``'truncated (N of M bytes)'``,
    ...), or None when its header and size agree (see `safetensors_header`)."""
    p = Path(path)
    if not p.is_file():
        return "missing"
    try:
        safetensors_header(p)
    except UnreadableFileError as e:
        return str(e).replace(f"'{p}' is ", "", 1)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None


def error_text(e: BaseException, limit: int = 160) -> str:
    """An exception's message on one line, at most ``limit`` characters (for messages naming a file)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def torch_file_problem(path: PathLike, deep: bool = True) -> Optional[str]:
    """What keeps a ``torch.save`` file (a checkpoint's ``optimizer.bin``, ``random_states_0.pkl``) from loading,
    or None. ``deep``: load it as resume does (memory-mapped, ``weights_only=True``), else check its zip directory.

    Raises:
        UntrustedCheckpointError: (``deep``) a pickle that would import or call code.
    """
    p = Path(path)
    if not p.is_file():
        return "missing"
    size = p.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    with open(p, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip and not zipfile.is_zipfile(p):
        return f"truncated or damaged ({size} bytes, not a complete zip archive)"
    if not deep:
        return None if is_zip else "not a torch.save zip file"
    from accelerate.utils.other import load as weights_only_load  # torch.load(weights_only=True) + numpy RNG state

    try:
        weights_only_load(str(p), map_location="cpu", mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpointError(
            f"refused to load checkpoint '{p.parent}': {p.name} is a pickle that would import or call code (or is "
            f"no weights-only pickle), which torch.load(weights_only=True) does not allow. Only resume checkpoints "
            f"you wrote. ({error_text(e, 300)})") from e
    except Exception as e:  # noqa: BLE001 - torch reports a damaged file as RuntimeError, EOFError, KeyError, ...
        return f"cannot be read ({error_text(e)})"
    return None


def read_json(path: PathLike, what: str = "", fix: str = "") -> Any:
    """The parsed JSON file ``path``.

    Raises:
        FileNotFoundError: no such file.
        UnreadableFileError: empty, or not valid JSON (the message names the file, line and column, what the file is
            (``what``) and ``fix``).
    """
    p = Path(path)
    text = p.read_bytes().decode("utf-8", errors="replace")
    label = f"{what} '{p}'" if what else f"'{p}'"
    tail = f" Fix: {fix}" if fix else ""
    if not text.strip():
        raise UnreadableFileError(f"{label} is empty.{tail}", p)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UnreadableFileError(f"{label} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} "
                                  f"(truncated or edited by hand?).{tail}", p) from None
