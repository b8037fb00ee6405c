"""``RUN/.lock``: one training process per run directory (``fcntl.flock``; the kernel frees a dead holder's lock)."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from .atomic import writing
from .errors import RunLockedError, WriteError, option
from .rundir import CONFIG, LOCK


class RunLock:
    """``RUN/.lock``, held (``fcntl.flock``) by the one process training in a run directory.

    The kernel releases the lock when its process dies, so a stale lock of a killed run is recognised without
    guessing; the file holds the holder's pid, host and start time for the message a second process gets. A lock
    file that cannot be created or written (read-only or full directory) is a `WriteError`.

    Several hosts: the lock is judged by the kernel that serves the file, never by a pid (the pid and host in the
    file are only shown), so a holder on another node is never taken for a dead one. On shared storage it holds
    across nodes where the file system gives ``flock`` cluster-wide (Linux NFS clients map it to NFS byte-range
    locks; Lustre mounted with ``-o flock``, not ``localflock``; GPFS); a file system without locks (Lustre's
    ``noflock``, some FUSE mounts) is a ``WriteError`` naming it, rather than a run without a lock.
    """

    #: what the directory is and what a second process would mix, said when the lock is held
    what, mixes = "run directory", "metrics, config and checkpoints"

    def __init__(self, run_dir: Path):
        self.path, self.fd = Path(run_dir) / LOCK, None

    def __enter__(self) -> "RunLock":
        self.made = []  # the folders this lock creates (the run directory and missing parents), deepest first
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            self.made.append(folder)
            folder = folder.parent
        self.created = bool(self.made)
        self.lock_existed = self.path.exists()
        with writing(f"the run lock {LOCK}", self.path):  # a read-only or full run directory: WriteError, exit 2
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError):  # ENOLCK, ENOSYS, EOPNOTSUPP: this file system has no locks
                os.close(fd)
                if not self.lock_existed:  # leave nothing behind: the .lock, and the directories it made
                    self.path.unlink(missing_ok=True)
                    self._remove_made_folders()
                raise WriteError(
                    f"cannot lock {self.what} '{self.path.parent}': the file system refuses file locks "
                    f"(flock: {e.strerror or errno.errorcode.get(e.errno, e.errno)}), and without the lock a second "
                    f"process could mix its {self.mixes}. Fix: use a directory on a file system with locks (local "
                    f"disk, NFS with lockd or NFSv4, Lustre mounted with -o flock), or ask your admin to enable "
                    f"them.", e.errno, str(self.path)) from e
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"{self.what} '{self.path.parent}' is in use by {holder}; a second process would mix its "
                f"{self.mixes}. Fix: wait for that run to end (or stop it), or choose another {option('output_dir')}.")
        self.fd = fd
        try:
            with writing(f"the run lock {LOCK}", self.path):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        except BaseException:
            self.__exit__()
            raise
        return self

    def _remove_made_folders(self) -> None:
        """Remove the folders `__enter__` created, deepest first, each only while it is empty (another process may
        have written into a parent since)."""
        for folder in self.made:
            try:
                folder.rmdir()
            except OSError:  # not empty (someone else's files now), or gone: keep what is there
                return

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        if self.created and [p.name for p in self.path.parent.iterdir()] == [LOCK]:
            self.path.unlink()  # a run that wrote nothing leaves no directory behind, nor the parents it made
            self._remove_made_folders()
        elif not self.lock_existed and not (self.path.parent / CONFIG).is_file():
            self.path.unlink()  # a refused or failed command leaves no .lock in someone else's folder
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
