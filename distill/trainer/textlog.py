"""``RUN/train.log``: one plain line every ``log_every`` steps, readable in a scheduler's log file.

A progress bar belongs on a terminal; in a file it is either nothing (``--no-progress``) or every frame. So the run
writes these lines to ``train.log`` in the run directory always, and to stdout too when there is no bar to watch
(stderr is not a terminal, or progress is off). A resumed run appends to the file after a ``resumed`` line.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

#: The name of the log file in a run directory.
TRAIN_LOG = "train.log"


def show_progress_bar(progress: bool, is_main_process: bool = True) -> bool:
    """Whether to draw tqdm: asked for, on the main process, and stderr (where tqdm draws) is a terminal or a
    Jupyter kernel's (``tqdm.auto`` draws a widget there)."""
    return progress and is_main_process and (sys.stderr.isatty() or "ipykernel" in sys.modules)


def format_line(step: int, steps: int, terms: dict, lr: float, img_per_s: float, data_share: float,
                tflops=None, mfu=None) -> str:
    """``step 10/400 | total 0.8937 mse 0.001732 at 0.08937 | lr 6.67e-04 | 57.1 img/s | 0.0315 TFLOP/s | MFU 41.2% |
    data 3%`` (the TFLOP/s and MFU fields when given; MFU ``''`` or None: left out).

    Args:
        terms: loss terms averaged over the step (``total`` first when present), printed with 4 significant digits.
        lr: the learning rate after the step.
        img_per_s: training images per second since the run (or resume) started, all processes together.
        data_share: share of wall time since the previous line spent waiting for the next batch, in [0, 1].
        tflops: achieved TFLOP/s (all processes); mfu: its fraction of the device's peak
            (:mod:`distill.trainer.cost`).
    """
    order = sorted(terms, key=lambda k: (k != "total", k))
    losses = " ".join(f"{k} {terms[k]:.4g}" for k in order)
    cost = "" if tflops is None else f"{tflops:.4g} TFLOP/s | "
    cost += "" if mfu in (None, "") else f"MFU {100 * mfu:.1f}% | "
    return (f"step {step}/{steps} | {losses} | lr {lr:.3g} | {img_per_s:.1f} img/s | {cost}"
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
