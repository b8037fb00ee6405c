"""Stopping on a signal: SIGTERM (what schedulers send before pre-emption) and SIGINT (Ctrl-C) end a run cleanly.

The first signal is remembered; the loop (``distill train``: `distill.trainer.loop`; a fine-tune:
`distill.tune.loop`) finishes the current step, keeps what it made (a checkpoint; a result) and raises
`TrainingInterrupted` (the CLI exits 143 / 130 and prints how to continue). A second
signal aborts at once (`SignalStop`, a ``KeyboardInterrupt``), keeping what is already on
disk. With several processes, a stop seen by any process stops all of them after the same step: they agree
through one all-reduce, made not after every step (a collective waits for the device) but about once a second of
training, at least every 10 steps, and at every step the loop marks due (checkpoints, evaluations, the last step).
So a signal is acted on at most 9 steps later than with one process, about 1 s later where steps are steady and
longer than 0.1 s.
"""
from __future__ import annotations

import signal
import sys
import threading
import time

from .errors import SignalStop

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_now = time.monotonic  # the clock that spaces the checks of several processes (a test replaces it)


class StopOnSignal:
    """Context manager installing the handlers (main thread only; elsewhere it does nothing). ``after``: what the
    run does after the step, said when the first signal arrives; ``processes``: how many run (the message says how
    many steps later several stop). With several processes, `requested` agrees
    on a stop every ``every`` steps at most and, where steps take longer than ``seconds / every``, about every
    ``seconds`` of training."""

    def __init__(self, after: str = "writing a checkpoint", every: int = 10, seconds: float = 1.0,
                 processes: int = 1):
        self.signum, self.after, self.every, self.seconds = None, after, every, seconds
        self._old: dict = {}
        self._checked: "tuple[int, float] | None" = None  # (step, clock) of the last all-reduce
        self._next = 0  # the next step that all-reduces (the first call does)
        self.processes = processes  # the first signal's message says how late

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
        print(f"\n{signal.Signals(signum).name} received: {self.when()} and {self.after} (send it again to abort at "
              f"once).", file=sys.stderr, flush=True)

    def when(self) -> str:
        """When the run stops, in words: after this step with one process; with several, after the step where
        they next agree (about ``seconds`` of training, at most ``every - 1`` more steps)."""
        if self.processes == 1:
            return "finishing this step"
        return (f"finishing the steps until all {self.processes} processes agree to stop (about {self.seconds:g} s "
                f"of training, at most {self.every - 1} more steps)")

    def requested(self, accelerator, step: int, due: bool = False) -> bool:
        """Whether to stop after ``step``: a process got a signal.

        One process: checked at every call. Several: they must all stop after the same step, so the flag is
        max-reduced over them (one all-reduce and one host synchronisation), but only at the first call, at calls
        marked ``due`` and at the step planned by the previous check; elsewhere False on every process. The plan
        comes from the slowest process's mean step time since that check (reduced in the same call, so every
        process plans the same step): ``seconds`` of training ahead, at least 1 and at most ``every`` steps. Every
        process must call with the same ``step`` and ``due`` sequence.
        """
        if accelerator.num_processes == 1:
            return self.signum is not None
        if not due and step < self._next:
            return False
        import torch  # only with several processes: this module stays torch-free to import

        now = _now()
        per_step = 0.0 if self._checked is None else (now - self._checked[1]) / max(step - self._checked[0], 1)
        flag = torch.tensor([-1.0 if self.signum is None else float(self.signum), per_step],
                            device=accelerator.device)
        signum, per_step = accelerator.reduce(flag, "max").tolist()
        self._checked = (step, now)
        self._next = step + max(1, min(self.every, int(self.seconds / per_step) if per_step > 0 else 1))
        if self.signum is None and signum > 0:
            self.signum = int(signum)
        return self.signum is not None
