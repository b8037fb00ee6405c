"""Atomic writes: every file and directory distill writes appears complete or not at all.

A write goes to a temporary sibling (``.tmp-<name>-<pid>-<random>``, same filesystem), is flushed and fsync'd,
then renamed over the target with :func:`os.replace` (atomic on POSIX), and the parent directory is fsync'd so
the rename itself survives a power cut. A failed write removes its temporary file or directory. One naming
convention for temporaries means :func:`remove_stale_temps` can clean what a killed process left, and nothing
else. Torch-free.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]
TMP_PREFIX = ".tmp-"


def temp_path(path: PathLike, token: Optional[str] = None) -> Path:
    """A fresh temporary sibling of ``path``: ``.tmp-<name>-<pid>-<8 hex>``, or ``.tmp-<name>-<token>`` when
    several processes must agree on the name (a distributed checkpoint)."""
    p = Path(path)
    return p.with_name(f"{TMP_PREFIX}{p.name}-{token or f'{os.getpid()}-{uuid.uuid4().hex[:8]}'}")


def fsync_dir(path: PathLike) -> None:
    """fsync a directory (its entries: a rename into it, a new file); a no-op where the OS does not allow it."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: PathLike) -> None:
    """fsync every file of a directory tree and every directory in it (before the tree is renamed into place)."""
    for root, _dirs, files in os.walk(str(path)):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path; write the file there (e.g. ``fig.savefig(tmp)``, ``save_file(sd, tmp)``); on a
    clean exit it is fsync'd and renamed to ``path``, on an exception it is removed and ``path`` is untouched."""
    final = Path(path)
    tmp = temp_path(final)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(final.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, data: Any, default: Optional[Callable] = None) -> Path:
    """Write ``data`` as indented JSON (trailing newline) atomically; ``default`` as for :func:`json.dumps`."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=default) + "\n")


def atomic_write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV file (``header`` then ``rows``) atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(list(header))
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


@contextlib.contextmanager
def atomic_dir(path: PathLike, replace: bool = False, token: Optional[str] = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; fill it; on a clean exit its tree is fsync'd and it is
    renamed to ``path``. An exception removes the temporary directory and leaves ``path`` as it was.

    Args:
        path: the final directory. An existing empty directory is replaced.
        replace: an existing non-empty ``path`` is replaced: it is moved aside only once the new tree is complete,
            the new tree is renamed into place, then the old one is deleted. The caller must have proven that the
            old directory is its own to delete (an export by its files, a cache by its manifest).
        token: a fixed temporary name suffix (see :func:`temp_path`); a leftover of that name is removed first.

    Raises:
        FileExistsError: ``path`` exists, is not an empty directory, and ``replace`` is false.
    """
    final = Path(path)
    if final.exists() and not replace and not (final.is_dir() and not any(final.iterdir())):
        raise FileExistsError(f"'{final}' already exists; refusing to replace it.")
    tmp = temp_path(final, token)
    if token is not None and tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=False)
    try:
        yield tmp
        commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_dir(tmp: PathLike, path: PathLike) -> Path:
    """Put a complete temporary directory ``tmp`` in place as ``path``: fsync its tree, move an existing
    non-empty ``path`` aside, rename ``tmp`` to ``path``, fsync the parent, delete the old one. The step of
    :func:`atomic_dir` that renames; for writers whose temporary directory is filled by several processes
    (a distributed checkpoint), which call it once, on the main process. The caller has proven that an existing
    ``path`` is its own to replace."""
    tmp, final = Path(tmp), Path(path)
    fsync_tree(tmp)
    old = None
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        old = temp_path(final.with_name(f"{final.name}-old"))
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None and old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink()
    return final


def stale_temps(path: PathLike) -> list[Path]:
    """Temporaries of ``path`` left by a killed write (``.tmp-<name>-*`` beside it)."""
    p = Path(path)
    return sorted(p.parent.glob(f"{TMP_PREFIX}{p.name}-*")) if p.parent.is_dir() else []


def _writer_alive(tmp: Path, name: str) -> bool:
    """Whether the process whose pid is in a temporary's name (``.tmp-<name>-<pid>-<hex>``) is another live one."""
    rest = tmp.name[len(TMP_PREFIX) + len(name) + 1:]
    pid = rest.split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temps(path: PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` left by a killed write; returns what was removed. Only names of this
    module's convention are touched, and never one whose writing process is still alive."""
    removed = []
    name = Path(path).name
    for t in stale_temps(path):
        if _writer_alive(t, name):
            continue
        if t.is_dir() and not t.is_symlink():
            shutil.rmtree(t, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                t.unlink()
        removed.append(t)
    return removed
