"""The logs a run appends to as it trains: ``RUN/train.log`` (plain lines) and the per-step CSV logs
(``metrics.csv``, ``policy.csv``, ``monitor.csv``).

``train.log`` holds one plain line every ``log_every`` steps, readable in a scheduler's log file. A progress bar
belongs on a terminal; in a file it is either nothing (``--no-progress``) or every frame. So the run writes these
lines to ``train.log`` in the run directory always, and to stdout too when there is no bar to watch (stderr is not a
terminal, or progress is off). A resumed run appends to the file after a ``resumed`` line.

Every open, append and flush goes through `distill.atomic.writing`: a full, read-only or quota-bound run
directory gives `WriteError` naming the file and the cause (exit 2 from the CLI), not a raw
``OSError``.
"""
from __future__ import annotations

import contextlib
import csv
import time
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write_text, writing
from ..logs import show_progress_bar  # noqa: F401 (shared with fine-tuning; imported from here before)

#: The name of the log file in a run directory.
TRAIN_LOG = "train.log"


def format_line(step: int, steps: int, terms: dict, lr: float, img_per_s: float, data_share: float,
                tflops=None, mfu=None) -> str:
    """``step 10/10 | total 0.6952 at 0.001607 mse 0.6791 | lr 0.002 | 1.7 img/s | data 0%`` (total = mse + 10 x at
    with the quickstart's loss weights); with ``tflops`` / ``mfu``, ``| 0.0315 TFLOP/s | MFU 41.2% |`` before ``data``
    (MFU ``''`` or None: left out).

    Args:
        terms: loss terms averaged over the step (``total`` first when present), printed with 4 significant digits.
        lr: the learning rate after the step.
        img_per_s: training images per second since the run (or resume) started, all processes together.
        data_share: share of wall time since the previous line spent waiting for the next batch, in [0, 1].
        tflops: achieved TFLOP/s (all processes); mfu: its fraction of the device's peak
            (`distill.trainer.cost`).
    """
    order = sorted(terms, key=lambda k: (k != "total", k))
    losses = " ".join(f"{k} {terms[k]:.4g}" for k in order)
    cost = "" if tflops is None else f"{tflops:.4g} TFLOP/s | "
    cost += "" if mfu in (None, "") else f"MFU {100 * mfu:.1f}% | "
    return (f"step {step}/{steps} | {losses} | lr {lr:.3g} | {img_per_s:.1f} img/s | {cost}"
            f"data {100 * data_share:.0f}%")


class TrainLog:
    """Appends lines to ``RUN/train.log`` (main process only) and echoes them to stdout when ``echo``.

    Raises:
        WriteError: the file cannot be opened or written (names it and the cause).
    """

    def __init__(self, run_dir: Path, start: int, enabled: bool = True, echo: bool = False):
        self.f, self.echo, self.path = None, echo and enabled, Path(run_dir) / TRAIN_LOG
        if enabled:
            with writing(TRAIN_LOG, self.path):
                self.f = open(self.path, "a")
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self.write(f"{stamp} {'resumed after step ' + str(start) if start else 'started'}")

    def write(self, line: str) -> None:
        """One line to the file (flushed, so ``tail -f`` follows it) and, when echoing, to stdout."""
        if self.f is None:
            return
        with writing(TRAIN_LOG, self.path):
            self.f.write(line + "\n")
            self.f.flush()
        if self.echo:
            print(line, flush=True)

    def close(self) -> None:
        if self.f is not None:
            f, self.f = self.f, None
            with contextlib.suppress(OSError):  # a failed flush was reported by write(); closing must not mask it
                f.close()


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the header and the rows of a per-step CSV log up to ``last_step`` (rows logged after the resumed
    checkpoint were lost with the killed run)."""
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [ln for ln in lines[1:] if ln.split(",", 1)[0].isdigit() and int(ln.split(",", 1)[0]) <= last_step]
    atomic_write_text(path, "".join(keep))


class CsvLog:
    """A per-step CSV log of the run directory (``metrics.csv``, ``policy.csv``, ``monitor.csv``), appended row by
    row.

    A fresh run (``start == 0``) starts a new file; a resumed one drops the rows after ``start`` and appends. The
    header is written with the first row (its columns are that row's keys) unless ``header`` is given. Only the
    main process writes (``enabled``).

    Raises:
        WriteError: the file cannot be opened or written (names it and the cause).
    """

    def __init__(self, path: Path, start: int, enabled: bool = True, header: Optional[list] = None):
        self.path, self.f, self.w = Path(path), None, None
        if not enabled:
            return
        if start and self.path.exists():
            truncate_log(self.path, start)
        self.need_header = start == 0 or not self.path.exists()
        with writing(self.path.name, self.path):
            self.f = open(self.path, "w" if start == 0 else "a", newline="")
            self.w = csv.writer(self.f)
            if header is not None and self.need_header:
                self.w.writerow(header)
                self.need_header = False

    def write(self, row: dict | list) -> None:
        """Append one row (a dict's keys form the header of a new file)."""
        if self.w is None:
            return
        with writing(self.path.name, self.path):
            if self.need_header and isinstance(row, dict):
                self.w.writerow(list(row))
                self.need_header = False
            self.w.writerow(list(row.values()) if isinstance(row, dict) else list(row))
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            f, self.f, self.w = self.f, None, None
            with contextlib.suppress(OSError):
                f.close()
