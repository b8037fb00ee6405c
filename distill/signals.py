"""Stopping on a signal: SIGTERM (what schedulers send before pre-emption) and SIGINT (Ctrl-C) end a run cleanly.

The first signal is remembered; the loop (``distill train``: `distill.trainer.loop`; a fine-tune:
`distill.tune.loop`) finishes the current step, keeps what it made (a checkpoint; a result) and raises
`TrainingInterrupted` (the CLI exits 143 / 130 and prints how to continue). A second
signal aborts at once (`SignalStop`, a ``KeyboardInterrupt``), keeping what is already on
disk. With several processes, a stop
seen by any process stops all of them after the same step.
"""
from __future__ import annotations

import signal
import sys
import threading

from .errors import SignalStop

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """Context manager installing the handlers (main thread only; elsewhere it does nothing). ``after``: what the
    run does after the step, said when the first signal arrives."""

    def __init__(self, after: str = "writing a checkpoint"):
        self.signum, self.after = None, after
        self._old: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.__exit__()
            raise SignalStop(signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and {self.after} "
              f"(send it again to abort at once).", file=sys.stderr, flush=True)

    def requested(self, accelerator) -> bool:
        """Whether any process got a signal (one all-reduce per call with several processes)."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        import torch  # only with several processes: this module stays torch-free to import

        flag = torch.tensor([-1 if self.signum is None else self.signum], device=accelerator.device)
        flag = accelerator.reduce(flag, "max")
        if self.signum is None and int(flag.item()) > 0:
            self.signum = int(flag.item())
        return self.signum is not None
