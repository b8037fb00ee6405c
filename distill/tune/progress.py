"""Progress of a fine-tune: a tqdm bar on a terminal, plain occasional lines in a redirected log (as ``distill
train`` does, `distill.logs.show_progress_bar`), nothing with progress off or on other processes."""
from __future__ import annotations

import time
from typing import Iterable, Iterator, Optional

from ..logs import show_progress_bar

#: seconds between two plain progress lines of one evaluation
LINE_EVERY_S = 30.0


class Progress:
    """Where a run's progress goes: ``bar`` (tqdm draws on a terminal) or ``lines`` (stdout, one line at a time)."""

    def __init__(self, progress: bool, is_main_process: bool, line_every_s: Optional[float] = None):
        self.bar = show_progress_bar(progress, is_main_process)
        self.lines = progress and is_main_process and not self.bar
        self.line_every_s = LINE_EVERY_S if line_every_s is None else line_every_s

    def write(self, line: str, bar=None) -> None:
        """A line under the bar (``bar.write``) or on stdout; nothing when progress is off."""
        if self.bar and bar is not None:
            bar.write(line)
        elif self.lines:
            print(line, flush=True)

    def batches(self, loader: Iterable, desc: str) -> Iterator:
        """Iterate ``loader`` (one evaluation) showing progress: a transient tqdm bar over its batches, or a line
        ``desc: i/n batches, s`` at most every ``line_every_s`` seconds."""
        if self.bar:
            from tqdm.auto import tqdm

            yield from tqdm(loader, desc=desc, total=len(loader), leave=False, dynamic_ncols=True)
            return
        n, t0 = len(loader), time.time()
        last = t0
        for i, batch in enumerate(loader, start=1):
            yield batch
            now = time.time()
            if self.lines and now - last >= self.line_every_s and i < n:
                print(f"{desc}: {i}/{n} batches, {now - t0:.0f}s", flush=True)
                last = now
