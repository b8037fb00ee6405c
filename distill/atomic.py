"""Atomic writes: every file and directory distill writes appears complete or not at all.

A write goes to a temporary sibling (``.tmp-<name>-<pid>-<random>@<host>``, same filesystem), is flushed and fsync'd,
then renamed over the target with `os.replace` (atomic on POSIX), and the parent directory is fsync'd so
the rename itself survives a power cut. A failed write removes its temporary file or directory. One naming
convention for temporaries means `remove_stale_temps` can clean what a killed process left, and nothing
else. Written files get the mode the umask allows (``0o666 & ~umask``; some writers, e.g. safetensors, create
``0600`` files). A write that fails for lack of space or permission, or because a file is where a directory should
be, raises `WriteError` saying what, where and how much space it needed (`writing`:
the one place where such ``OSError`` s are translated). Torch-free.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

from .errors import WriteError

PathLike = Union[str, os.PathLike]
TMP_PREFIX = ".tmp-"
#: what follows ``.tmp-<name>-`` in a temporary of `temp_path`: pid, random hex, the host (absent from the names
#: older versions wrote)
_TEMP_SUFFIX = re.compile(r"(?P<pid>\d+)-[0-9a-f]+(?:@(?P<host>.+))?")

#: errno of a failed write -> (what it means, the fix)
WRITE_ERRNOS = {
    errno.ENOSPC: ("the disk is full", "free space there, or choose another location"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within your quota, or choose another location"),
    errno.EFBIG: ("the file is too large for the file system", "choose another location"),
    errno.EROFS: ("the file system is read-only", "choose a writable location"),
    errno.EACCES: ("permission denied", "choose a directory you can write to, or change its permissions"),
    errno.EPERM: ("permission denied", "choose a directory you can write to, or change its permissions"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose another path, or move that file away"),
    errno.EEXIST: ("a file is in the way", "choose another path, or move that file away"),
}
#: writers that do not raise OSError (safetensors' Rust writer): their message -> errno
LIBRARY_WRITE_MESSAGES = (("No space left on device", errno.ENOSPC), ("os error 28", errno.ENOSPC),
                          ("Disk quota exceeded", errno.EDQUOT), ("os error 122", errno.EDQUOT),
                          ("Read-only file system", errno.EROFS), ("os error 30", errno.EROFS),
                          ("Permission denied", errno.EACCES), ("os error 13", errno.EACCES),
                          ("Not a directory", errno.ENOTDIR), ("os error 20", errno.ENOTDIR))
#: torch's zip writer reports a failed write without its cause ("unexpected pos 576 vs 534")
TORCH_WRITER_MARK = "inline_container.cc"


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: PathLike) -> Optional[int]:
    """Free space (bytes, for this user) on the file system that holds ``path`` or its nearest existing ancestor."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    while p.is_file() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _blocking_file(path: Path) -> Optional[Path]:
    """The nearest ancestor of ``path`` that exists and is not a directory (what ENOTDIR/EEXIST is about)."""
    for p in [path, *path.parents]:
        if p.exists() or p.is_symlink():
            return p if not p.is_dir() else None
    return None


def _inside(name: PathLike, roots: Sequence[Path]) -> bool:
    p = Path(name).absolute()
    return any(p == r or r in p.parents or p in r.parents for r in roots)


def write_error(e: BaseException, what: str, path: PathLike, needed: Optional[int] = None,
                temp: Optional[PathLike] = None) -> Optional[WriteError]:
    """The `WriteError` for ``e`` raised while writing ``what`` to ``path`` (through ``temp``), or None when
    ``e`` is not a failed write (another error, or an ``OSError`` about a file elsewhere, e.g. an input).

    Recognised: ``OSError`` with an errno of `WRITE_ERRNOS`, the messages of `LIBRARY_WRITE_MESSAGES`,
    and torch's zip writer failing (reported as a full disk when the free space is below ``needed``).
    """
    if isinstance(e, WriteError):
        return e
    final = Path(path).absolute()
    code = None
    if isinstance(e, OSError):
        roots = [final, *([Path(temp).absolute()] if temp is not None else [])]
        if e.errno not in WRITE_ERRNOS or (e.filename is not None and not _inside(e.filename, roots)):
            return None
        code, detail = e.errno, e.strerror or str(e)
    else:
        msg = str(e)
        code = next((c for m, c in LIBRARY_WRITE_MESSAGES if m in msg), None)
        if code is None and TORCH_WRITER_MARK not in msg:
            return None
        detail = msg.strip().splitlines()[-1][:200] if msg.strip() else type(e).__name__
    free = free_bytes(final)
    if code is None:  # torch's writer: the cause is not reported
        code = errno.ENOSPC if needed is not None and free is not None and free < needed else None
        detail = "torch.save stopped mid-file"
    reason, fix = WRITE_ERRNOS.get(code, ("the write failed", "check the disk and the permissions of that location"))
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = _blocking_file(final)
        if blocker is not None:
            reason = f"'{blocker}' is a file, not a directory"
    size = f" (about {human_bytes(needed)})" if needed is not None else ""
    space = ""
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, None) and free is not None:
        space = f" {human_bytes(free)} are free there{f', {human_bytes(needed)} are needed' if needed else ''}."
    return WriteError(f"could not write {what}{size} to '{path}': {reason} ({detail}).{space} Temporary files were "
                      f"removed. Fix: {fix}.", code, str(path))


@contextlib.contextmanager
def writing(what: str, path: PathLike, needed: Optional[int] = None, temp: Optional[PathLike] = None) -> Iterator[None]:
    """Raise a failed write inside the block as `WriteError` (see `write_error`); other exceptions
    pass unchanged. ``what`` is said in the message (``"checkpoint-6"``), ``needed`` is the estimated size."""
    try:
        yield
    except Exception as e:
        err = write_error(e, what, path, needed, temp)
        if err is None or err is e:
            raise
        raise err from e


def current_umask() -> int:
    """The process's umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def settle_file(path: PathLike, mode: Optional[int] = None) -> None:
    """Give a freshly written file the mode the umask allows (``0o666 & ~umask``, or ``mode``) and fsync it."""
    os.chmod(path, mode if mode is not None else 0o666 & ~current_umask())
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def host_name() -> str:
    """This machine's host name as it appears in temporaries' names (characters other than letters, digits, '.',
    '-' and '_' replaced by '_', at most 64)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "_"


def temp_path(path: PathLike, token: Optional[str] = None) -> Path:
    """A fresh temporary sibling of ``path``: ``.tmp-<name>-<pid>-<8 hex>@<host>``, or ``.tmp-<name>-<token>`` when
    several processes must agree on the name (a distributed checkpoint). The host makes a pid meaningful on
    shared storage (NFS, Lustre): `remove_stale_temps` judges only this host's writers."""
    p = Path(path)
    return p.with_name(f"{TMP_PREFIX}{p.name}-{token or f'{os.getpid()}-{uuid.uuid4().hex[:8]}@{host_name()}'}")


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
    """Settle every file of a directory tree (`settle_file`: umask mode, fsync) and fsync every directory in
    it, deepest first (before the tree is renamed into place)."""
    mode = 0o666 & ~current_umask()
    for root, _dirs, files in os.walk(str(path), topdown=False):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                settle_file(p, mode)
        fsync_dir(root)


@contextlib.contextmanager
def atomic_file(path: PathLike, what: Optional[str] = None, needed: Optional[int] = None) -> Iterator[Path]:
    """Yield a temporary path; write the file there (e.g. ``fig.savefig(tmp)``, ``save_file(sd, tmp)``); on a
    clean exit it gets the umask's mode, is fsync'd and renamed to ``path`` (missing parent directories are
    created); on an exception it is removed and ``path`` is untouched.

    Raises:
        WriteError: the file could not be written (``what``, default its name, and ``needed`` bytes are said).
    """
    final = Path(path)
    tmp = temp_path(final)
    with writing(what or f"'{final.name}'", final, needed, tmp):
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            settle_file(tmp)
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
    """Write ``data`` as indented JSON (trailing newline) atomically; ``default`` as for `json.dumps`."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=default) + "\n")


def atomic_write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV file (``header`` then ``rows``) atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(list(header))
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


@contextlib.contextmanager
def atomic_dir(path: PathLike, replace: bool = False, token: Optional[str] = None, what: Optional[str] = None,
               needed: Optional[int] = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path`` (missing parents are created); fill it; on a clean exit its
    tree is settled (umask modes, fsync) and it is renamed to ``path``. An exception removes the temporary
    directory and leaves ``path`` as it was.

    Args:
        path: the final directory. An existing empty directory is replaced.
        replace: an existing non-empty ``path`` is replaced: it is moved aside only once the new tree is complete,
            the new tree is renamed into place, then the old one is deleted. The caller must have proven that the
            old directory is its own to delete (an export by its files, a cache by its manifest).
        token: a fixed temporary name suffix (see `temp_path`); a leftover of that name is removed first.
        what, needed: said in a `WriteError` (default: the directory's name; the estimated size in bytes).

    Raises:
        FileExistsError: ``path`` exists, is not an empty directory, and ``replace`` is false.
        WriteError: the directory or a file in it could not be written; nothing is left behind.
    """
    final = Path(path)
    if final.exists() and not replace and not (final.is_dir() and not any(final.iterdir())):
        raise FileExistsError(f"'{final}' already exists; refusing to replace it.")
    tmp = temp_path(final, token)
    what = what or f"directory '{final.name}'"
    with writing(what, final, needed, tmp):
        final.parent.mkdir(parents=True, exist_ok=True)
        if token is not None and tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=False)
        try:
            yield tmp
            commit_dir(tmp, final, what, needed)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def commit_dir(tmp: PathLike, path: PathLike, what: Optional[str] = None, needed: Optional[int] = None) -> Path:
    """Put a complete temporary directory ``tmp`` in place as ``path``: settle its tree (`fsync_tree`: umask
    modes, every file and directory fsync'd), move an existing non-empty ``path`` aside, rename ``tmp`` to
    ``path``, fsync the parent, delete the old one (a failed rename puts the old one back). The step of
    `atomic_dir` that renames; for writers whose temporary directory is filled by several processes
    (a distributed checkpoint), which call it once, on the main process. The caller has proven that an existing
    ``path`` is its own to replace, and removes ``tmp`` if this raises.

    Raises:
        WriteError: the tree could not be settled or renamed (see `writing`).
    """
    tmp, final = Path(tmp), Path(path)
    old = None
    with writing(what or f"directory '{final.name}'", final, needed, tmp):
        fsync_tree(tmp)
        if final.exists() and (not final.is_dir() or any(final.iterdir())):
            old = temp_path(final.with_name(f"{final.name}-old"))
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)
            raise
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
    """Whether the process whose pid is in a temporary's name (``.tmp-<name>-<pid>-<hex>@<host>``) is another live
    one. A writer on another host (shared storage) counts as alive: its pid means nothing here."""
    m = _TEMP_SUFFIX.fullmatch(tmp.name[len(TMP_PREFIX) + len(name) + 1:])
    if m is None:  # a token name (a distributed checkpoint's): no pid in it
        return False
    pid, host = m.group("pid"), m.group("host")
    if host is not None and host != host_name():
        return True
    if int(pid) == os.getpid():
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
    module's convention are touched, never one whose writing process is still alive, and never one written on
    another host (its pid cannot be checked from here; a temporary a dead host left stays until deleted by hand)."""
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
