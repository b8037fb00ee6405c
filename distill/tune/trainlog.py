"""``OUT/train_log.csv`` of a fine-tune and what goes with each of its rows: the tracker entry (``log_with``), the
progress bar's loss, and a plain line when no bar is drawn."""
from __future__ import annotations

import csv
import time
from pathlib import Path

from ..atomic import writing
from .outdir import LOG_FILE
from .progress import Progress


class TrainLog:
    """Training loss and accuracy averaged over ``log_every`` steps; a row at the first and the last step and every
    ``log_every`` steps (the file on the main process only)."""

    def __init__(self, out: Path, metric: str, steps: int, log_every: int, batch_size: int, main: bool,
                 show: Progress, bar, accelerator=None):
        self.path, self.metric, self.steps, self.log_every, self.batch_size = out / LOG_FILE, metric, steps, \
            log_every, batch_size
        self.show, self.bar, self.accelerator = show, bar, accelerator  # accelerator: given when tracking
        self.f = None
        if main:
            with writing("the training log", self.path):
                self.f = open(self.path, "w", newline="")
                self.writer = csv.writer(self.f)
                self.writer.writerow(["step", "loss", metric, "lr", "img_per_s"])
        self.t0 = time.time()
        self._reset()

    def _reset(self) -> None:
        self.loss, self.correct, self.counted, self.n = 0.0, 0.0, 0.0, 0

    def add(self, step: int, loss: float, correct: float, counted: float, lr: float) -> None:
        """One step's loss (mean over every counted target of every process), correct and counted targets, and the
        learning rate it used; writes a row when one is due."""
        self.loss, self.correct, self.counted, self.n = self.loss + loss, self.correct + correct, \
            self.counted + counted, self.n + 1
        if not (step % self.log_every == 0 or step == self.steps or step == 1):
            return
        row = {"loss": self.loss / self.n, self.metric: 100.0 * self.correct / max(self.counted, 1)}
        img_s = step * self.batch_size / (time.time() - self.t0)
        if self.f is not None:
            with writing("the training log", self.path):
                self.writer.writerow([step, round(row["loss"], 6), round(row[self.metric], 2), lr, round(img_s, 1)])
                self.f.flush()
        if self.accelerator is not None:
            self.accelerator.log({f"train/{k}": v for k, v in row.items()} | {"lr": lr}, step=step)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}")
        if self.show.lines:
            self.show.write(f"step {step}/{self.steps} | loss {row['loss']:.4g} | {self.metric} "
                            f"{row[self.metric]:.2f} | lr {lr:.3g} | {img_s:.1f} img/s")
        self._reset()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
