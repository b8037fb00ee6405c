"""``RUN/train.log``: one plain line every ``log_every`` steps, readable in a scheduler's log file.

A progress bar belongs on a terminal; in a file it is either nothing (``--no-progress``) or every frame. So the run
writes these lines to ``train.log`` in the run directory always, and to stdout too when there is no bar to watch
(stderr is not a terminal, or progress is off). A resumed run appends to the file after a ``resumed`` line.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..logs import show_progress_bar  # noqa: F401 (shared with fine-tuning; imported from here before)

#: The name of the log file in a run directory.
TRAIN_LOG = "train.log"


def format_line(step: int, steps: int, terms: dict, lr: float, img_per_s: float, data_share: float) -> str:
    """``step 10/400 | total 0.8937 mse 0.001732 at 0.08937 | lr 6.67e-04 | 57.1 img/s | data 3%``.

    Args:
        terms: loss terms averaged over the step (``total`` first when present), printed with 4 significant digits.
        lr: the learning rate after the step.
        img_per_s: training images per second since the run (or resume) started, all processes together.
        data_share: share of wall time since the previous line spent waiting for the next batch, in [0, 1].
    """
    order = sorted(terms, key=lambda k: (k != "total", k))
    losses = " ".join(f"{k} {terms[k]:.4g}" for k in order)
    return (f"step {step}/{steps} | {losses} | lr {lr:.3g} | {img_per_s:.1f} img/s | "
            f"data {100 * data_share:.0f}%")


class TrainLog:
    """Appends lines to ``RUN/train.log`` (main process only) and echoes them to stdout when ``echo``."""

    def __init__(self, run_dir: Path, start: int, enabled: bool = True, echo: bool = False):
        self.f, self.echo = None, echo and enabled
        if enabled:
            self.f = open(Path(run_dir) / TRAIN_LOG, "a")
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self.write(f"{stamp} {'resumed after step ' + str(start) if start else 'started'}")

    def write(self, line: str) -> None:
        """One line to the file (flushed, so ``tail -f`` follows it) and, when echoing, to stdout."""
        if self.f is None:
            return
        self.f.write(line + "\n")
        self.f.flush()
        if self.echo:
            print(line, flush=True)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
