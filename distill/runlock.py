"""``RUN/.lock``: one training process per run directory (``fcntl.flock``; the kernel frees a dead holder's lock)."""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from .atomic import writing
from .errors import RunLockedError
from .rundir import CONFIG, LOCK


class RunLock:
    """``RUN/.lock``, held (``fcntl.flock``) by the one process training in a run directory.

    The kernel releases the lock when its process dies, so a stale lock of a killed run is recognised without
    guessing; the file holds the holder's pid, host and start time for the message a second process gets. A lock
    file that cannot be created or written (read-only or full directory) is a :class:`~distill.errors.WriteError`.
    """

    #: what the directory is and what a second process would mix, said when the lock is held
    what, mixes = "run directory", "metrics, config and checkpoints"

    def __init__(self, run_dir: Path):
        self.path, self.fd = Path(run_dir) / LOCK, None

    def __enter__(self) -> "RunLock":
        self.created = not self.path.parent.exists()
        self.lock_existed = self.path.exists()
        with writing(f"the run lock {LOCK}", self.path):  # a read-only or full run directory: WriteError, exit 2
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"{self.what} '{self.path.parent}' is in use by {holder}; a second process would mix its "
                f"{self.mixes}. Fix: wait for that run to end (or stop it), or choose another --output-dir.")
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

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        if self.created and [p.name for p in self.path.parent.iterdir()] == [LOCK]:
            self.path.unlink()  # a run that wrote nothing leaves no directory behind
            self.path.parent.rmdir()
        elif not self.lock_existed and not (self.path.parent / CONFIG).is_file():
            self.path.unlink()  # a refused or failed command leaves no .lock in someone else's folder
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
