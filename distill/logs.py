"""Console logging of the command line: one ``distill`` logger, and the hub libraries' own loggers set once; where
progress goes (`show_progress_bar`) and which experiment tracker may be used (`check_tracker`), for
``distill train`` and fine-tuning alike.

Every module logs through ``logging.getLogger(__name__)``, i.e. a child of the ``distill`` logger. The command line
gives that logger one stderr handler and leaves the root logger without one: configuring the root logger (as
``logging.basicConfig`` does) printed every huggingface_hub warning twice, once by huggingface_hub's own handler and
once more by the root's, since that library's logger propagates (transformers' does too when ``CI`` is set).
diffusers, transformers and huggingface_hub are set through their own verbosity setters (or their
``*_VERBOSITY`` environment variables when they are not imported yet, so ``distill --help`` imports none of them)
and stop propagating, so each of their messages is printed once, by their handler.

Progress of evaluations, extraction and selection goes through `progress`: a tqdm bar on a terminal, a plain
line now and then when stderr is a file (a bar would write every frame into it).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from typing import Optional

from .errors import MissingDependencyError
from .integrity import error_text
from .version import install_hint
from .vocab import TRACKER_EXTRAS, TRACKERS

#: The hub libraries whose loggers are set: ``{module: (verbosity environment variable, logging module)}``.
_HUB_LOGGERS = {
    "diffusers": ("DIFFUSERS_VERBOSITY", "diffusers.utils.logging"),
    "transformers": ("TRANSFORMERS_VERBOSITY", "transformers.utils.logging"),
    "huggingface_hub": ("HF_HUB_VERBOSITY", "huggingface_hub.utils.logging"),
}


class _DistillHandler(logging.StreamHandler):
    """The stderr handler of the ``distill`` logger (a class of its own, so setting up twice adds no second one).
    It writes to whatever ``sys.stderr`` is when a record comes, so a replaced stderr (pytest's capture, a notebook)
    is followed rather than a closed one kept."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ and setStream assign it; stderr is looked up instead
        pass


def count(n: int, noun: str) -> str:
    """``"1 image"``, ``"6 images"``, ``"1,234 images"``: ``n`` with ``noun`` in the singular for exactly one."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def setup_logging(verbose: bool = False) -> logging.Logger:
    """Give the ``distill`` logger one stderr handler (``LEVEL distill.module: message``) at INFO when
    ``verbose`` else WARNING, and set the hub libraries to the same level. The root logger gets no handler (records
    still propagate to it, for handlers a caller installs, e.g. pytest's caplog). Calling it again only changes the
    level. Returns the ``distill`` logger."""
    level = logging.INFO if verbose else logging.WARNING
    logger = logging.getLogger("distill")
    if not any(isinstance(h, _DistillHandler) for h in logger.handlers):
        handler = _DistillHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    set_hub_verbosity(level)
    return logger


def set_hub_verbosity(level: int) -> None:
    """Set diffusers, transformers and huggingface_hub to ``level`` (a ``logging`` level) without importing them:
    an imported one through its ``set_verbosity`` and ``disable_propagation``, one not imported yet through its
    environment variable (read when it is first imported; a value the user exported is kept)."""
    name = logging.getLevelName(level).lower()
    for module, (env, log_module) in _HUB_LOGGERS.items():
        if module in sys.modules:
            hub_logging = importlib.import_module(log_module)
            hub_logging.set_verbosity(level)
            hub_logging.disable_propagation()
        else:
            os.environ.setdefault(env, name)


def interactive_stderr() -> bool:
    """Whether stderr (where tqdm draws) is a terminal or a Jupyter kernel's (``tqdm.auto`` draws a widget there);
    when not (a redirected log, a scheduler's file), a bar would write every frame into the file."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


class PlainProgress:
    """Progress for a log file: a plain line on stderr at most every ``every`` seconds and one when it ends
    (``test features: 40/40 batches (100%) in 12 s, 3.3 batches/s``); no carriage returns, no bar. It takes the
    calls code makes on a tqdm bar: iteration, ``update``, ``set_postfix``, ``set_description``, ``close``, ``with``.
    """

    def __init__(self, iterable=None, desc: str = "", total: Optional[int] = None, unit: str = "it",
                 every: float = 30.0):
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.iterable, self.desc, self.total, self.unit, self.every = iterable, desc, total, unit, every
        self.n, self.postfix, self.closed = 0, "", False
        self.t0 = self.last = time.monotonic()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more; writes a line when ``every`` seconds passed since the last one."""
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._write(done=False)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        """Values appended to the next line (``loss=0.123``), as tqdm's ``set_postfix``."""
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        """Write the closing line (once)."""
        if not self.closed:
            self.closed = True
            self._write(done=True)

    def _write(self, done: bool) -> None:
        elapsed = time.monotonic() - self.t0
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self.n / elapsed:.3g} {self.unit}/s" if elapsed > 0 and self.n else ""
        post = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {'done ' if done else ''}{count} {self.unit}{share} in {elapsed:.0f} s{rate}{post}",
              file=sys.stderr, flush=True)


def progress(iterable=None, desc: str = "", total: Optional[int] = None, enabled: bool = True, unit: str = "it",
             every: float = 30.0):
    """Progress of a loop: a tqdm bar on a terminal (or a Jupyter widget), occasional plain lines
    (`PlainProgress`, at most one per ``every`` seconds, and one at the end) when stderr is redirected to a
    file, nothing when not ``enabled``. Use it as tqdm: ``for x in progress(loader, "features")`` or
    ``bar = progress(total=n, desc=...); bar.update(1); bar.close()``."""
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(iterable, desc=desc, total=total, disable=True)
    if interactive_stderr():
        return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True)
    return PlainProgress(iterable, desc, total, unit, every)


def show_progress_bar(progress: bool, is_main_process: bool = True) -> bool:
    """Whether to draw tqdm: asked for, on the main process, and stderr (where tqdm draws) is a terminal or a
    Jupyter kernel's (``tqdm.auto`` draws a widget there)."""
    return progress and is_main_process and interactive_stderr()


def check_tracker(name: Optional[str]) -> None:
    """A recipe's ``log_with`` must name a tracker of `TRACKERS` whose package is installed (Accelerate
    itself only warns and trains without it).

    Raises:
        ValueError: an unknown tracker name (the valid ones listed).
        MissingDependencyError: its package is not installed (the message names the pip extra).
    """
    if name is None:
        return
    if name not in TRACKERS:
        raise ValueError(f"recipe key 'log_with' has value {name!r}; valid: {', '.join(TRACKERS)} (or null for "
                         f"metrics.csv and train.log only).")
    import accelerate.utils as au

    if not getattr(au, f"is_{name}_available")():
        extra = TRACKER_EXTRAS[name]
        raise MissingDependencyError(
            f"log_with: {name} needs the {name} package, which is not installed, so no tracker could start. Fix: "
            f"{install_hint(extra)}, or remove log_with.")


#: per tracker: the settings that most often stop it from starting (said in the error)
TRACKER_SETTINGS = {
    "tensorboard": "the run directory must be writable (event files go to RUN/distill/)",
    "wandb": "log in first (wandb login, or WANDB_API_KEY), or set WANDB_MODE=offline",
    "mlflow": "MLFLOW_TRACKING_URI must name a store this machine can reach and write (unset: MLflow's default "
              "local store in the working directory)",
}


def start_trackers(accelerator, name: Optional[str], config: dict, project: str = "distill") -> None:
    """``accelerator.init_trackers(project, config)`` for the recipe's ``log_with`` tracker ``name`` (nothing when
    None). A tracker that fails to start (an import error inside its package, a store it cannot reach or write, a
    login it lacks, a version Accelerate does not support) raises one error naming the tracker, the cause and the fix
    instead of the tracker's traceback.

    Raises:
        MissingDependencyError: its package (or one it needs) cannot be imported (names the pip extra).
        ValueError: it failed to start for another reason (names the setting to check, or removing ``log_with``).
    """
    if name is None:
        return
    try:
        accelerator.init_trackers(project, config=config)
    except Exception as e:  # noqa: BLE001 - every tracker package raises its own kinds; one message for all
        extra = TRACKER_EXTRAS.get(name, name)
        install = install_hint(extra)
        if isinstance(e, ImportError):
            raise MissingDependencyError(
                f"log_with: {name} could not start: a package it needs cannot be imported ({error_text(e, 200)}). "
                f"Fix: {install}, or remove log_with (metrics.csv and train.log record the run anyway).") from e
        raise ValueError(
            f"log_with: {name} could not start: {type(e).__name__}: {error_text(e, 300)}. Fix: check its settings "
            f"({TRACKER_SETTINGS.get(name, 'see its documentation')}); reinstall the tested versions with {install}; "
            f"or remove log_with (metrics.csv and train.log record the run anyway).") from e
