"""Console logging of the command line: one ``distill`` logger, and the hub libraries' own loggers set once; where
progress goes (:func:`show_progress_bar`) and which experiment tracker may be used (:func:`check_tracker`), for
``distill train`` and fine-tuning alike.

Every module logs through ``logging.getLogger(__name__)``, i.e. a child of the ``distill`` logger. The command line
gives that logger one stderr handler and leaves the root logger without one: configuring the root logger (as
``logging.basicConfig`` does) printed every huggingface_hub warning twice, once by huggingface_hub's own handler and
once more by the root's, since that library's logger propagates (transformers' does too when ``CI`` is set).
diffusers, transformers and huggingface_hub are set through their own verbosity setters (or their
``*_VERBOSITY`` environment variables when they are not imported yet, so ``distill --help`` imports none of them)
and stop propagating, so each of their messages is printed once, by their handler.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Optional

from .errors import MissingDependencyError
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


def show_progress_bar(progress: bool, is_main_process: bool = True) -> bool:
    """Whether to draw tqdm: asked for, on the main process, and stderr (where tqdm draws) is a terminal or a
    Jupyter kernel's (``tqdm.auto`` draws a widget there)."""
    return progress and is_main_process and (sys.stderr.isatty() or "ipykernel" in sys.modules)


def check_tracker(name: Optional[str]) -> None:
    """A recipe's ``log_with`` must name a tracker of :data:`TRACKERS` whose package is installed (Accelerate
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
            f"pip install \"distill[{extra}]\" (or pip install -e \".[{extra}]\" in a checkout), or remove log_with.")
