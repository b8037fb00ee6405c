"""The public exceptions of distill, in one place.

Each subclasses the built-in exception that callers would already catch (``ValueError`` for bad input,
``FileNotFoundError`` for missing files, ...), so ``except ValueError`` keeps working; the CLI maps bad input to
exit code 2 and a refused or diverged run to exit code 3 (`EXIT_CODES`).
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import signal
import sys
import threading
from typing import Callable, Iterator, Mapping, NoReturn, Optional


class RunExistsError(FileExistsError):
    """The output directory already holds a run (pass resume or overwrite)."""


class RunLockedError(RunExistsError):
    """Another live process trains in the run directory (it holds ``RUN/.lock``)."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint; ``exit_code`` is 128 + the signal number
    (143 for SIGTERM, 130 for Ctrl-C), as shells report a process ended by that signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


class SignalStop(KeyboardInterrupt):
    """A SIGTERM / SIGINT that ends a command at once (outside the training loop's step, which first finishes the
    step and checkpoints: `TrainingInterrupted`). A ``KeyboardInterrupt``, so ``except Exception`` blocks do
    not swallow it and atomic writes remove their temporaries; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum, self.exit_code = signum, 128 + signum


class NonFiniteLossError(RuntimeError):
    """A loss term or the gradient norm became NaN or Inf; no update was applied."""


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint file holds a pickle that would import or run code."""


class CacheMismatchError(ValueError):
    """A feature cache was written for another teacher, data, blocks, timesteps or resolution."""


class IncompleteCacheError(ValueError):
    """A feature-cache directory has no manifest (an interrupted ``distill extract``)."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says how to install or point to them."""


class MissingDependencyError(ImportError, ValueError):
    """An optional package is needed (e.g. transformers for a Stable Diffusion text encoder)."""


class UnreadableFileError(ValueError):
    """A file distill reads is empty, truncated, partial or malformed (weights, a config, a checkpoint, a result);
    the message names the file and the fix. ``path`` is the file."""

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = path


class WriteError(OSError):
    """A file or directory could not be written (disk full, quota, read-only file system, no permission, a file
    where a directory should be); the message says what, where and how much space it needed, and temporaries were
    removed. ``errno`` is the cause's (e.g. ``errno.ENOSPC``), ``filename`` the path that was written."""

    def __init__(self, message: str, errno_: "int | None" = None, filename=None):
        super().__init__(message)
        self.errno, self.filename = errno_, filename

    def __str__(self) -> str:
        return self.args[0]


class ExportMismatchError(RuntimeError):
    """A converted model (``distill export --onnx``) computes something else than the torch model on the same input;
    nothing was written."""


class HubUploadError(ConnectionError):
    """``distill export --push-to-hub``: the Hub refused the upload or could not be reached; the message names the
    repository, the cause and the fix, and the local export is unchanged."""


#: How the caller spells a setting in error messages: ``fn(name, flag) -> str`` (`option`).
Spelling = Callable[[str, bool], str]


def python_spelling(name: str, flag: bool = False) -> str:
    """A setting as a Python caller names it: the field or keyword itself (``fraction``), ``overwrite=True`` for a
    flag. The spelling outside `spelled_as` (``distill.finetune(FinetuneConfig(fraction=1.5), ...)`` reports
    ``fraction 1.5 is outside (0, 1]``)."""
    return f"{name}=True" if flag else name


_SPELLING: "contextvars.ContextVar[Spelling]" = contextvars.ContextVar("distill_spelling", default=python_spelling)


def option(name: str, flag: bool = False) -> str:
    """The setting ``name`` (a config field or keyword: ``fraction``, ``data_root``, ``overwrite``) as the caller
    spells it, for an error message: ``--fraction`` under ``distill finetune``, ``MODEL`` for its positional, the
    script's own option in ``examples/*.py`` (each front end sets its `parser_spelling` with `spelled_as`), and
    ``fraction`` / ``overwrite=True`` (``flag``: a boolean switch) from Python. So a message never names an option
    the caller does not have, e.g. ``--steps`` for a script whose option is ``--finetune-steps``."""
    return _SPELLING.get()(name, flag)


def parser_spelling(parser: argparse.ArgumentParser, rename: Optional[Mapping[str, str]] = None,
                    fallback: Optional[Spelling] = None) -> Spelling:
    """The spelling of ``parser``'s command line: a setting is the option whose ``dest`` it is (its longest
    ``--`` string: ``--data-root``), a positional its metavar or upper-cased dest (``MODEL``); ``rename`` maps
    settings to this parser's dests where they differ (``{"steps": "finetune_steps"}``). A setting the parser
    lacks is spelled by ``fallback`` (e.g. ``--set data_root=VALUE`` for a script that takes recipe keys with
    ``--set``), by default as distill's commands would (``--data-root``)."""
    rename = dict(rename or {})
    by_dest: dict[str, str] = {}
    stack = [parser]
    while stack:  # subparsers' options count too (a script with sub-commands)
        p = stack.pop()
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                stack.extend(a.choices.values())
            elif a.dest and a.dest != argparse.SUPPRESS and a.help != argparse.SUPPRESS:
                longs = [s for s in a.option_strings if s.startswith("--")]
                spelled = (max(longs, key=len) if longs else a.option_strings[0] if a.option_strings else
                           (a.metavar if isinstance(a.metavar, str) else a.dest.upper()))
                by_dest.setdefault(a.dest, spelled)

    def spell(name: str, flag: bool = False) -> str:
        dest = rename.get(name, name)
        if dest in by_dest:
            return by_dest[dest]
        return fallback(name, flag) if fallback is not None else "--" + dest.replace("_", "-")
    return spell


def set_spelling(name: str, flag: bool = False) -> str:
    """A recipe key as ``--set`` gives it (``--set data_root=VALUE``): the fallback of `parser_spelling` for scripts
    whose only way to a setting is ``--set KEY=VALUE`` (``bench/*.py``)."""
    return f"--set {name}={'true' if flag else 'VALUE'}"


@contextlib.contextmanager
def spelled_as(spelling: Spelling) -> Iterator[None]:
    """Within the block, `option` spells settings with ``spelling`` (e.g. ``parser_spelling(parser)``)."""
    token = _SPELLING.set(spelling)
    try:
        yield
    finally:
        _SPELLING.reset(token)


@contextlib.contextmanager
def renamed(names: Mapping[str, str]) -> Iterator[None]:
    """Within the block, setting ``a`` is named as the current spelling names ``names[a]``: a check made on one
    item of a list setting names the list (a sweep's run checks ``fraction``; the caller gave ``fractions``)."""
    outer = _SPELLING.get()
    with spelled_as(lambda name, flag=False: outer(names.get(name, name), flag)):
        yield


def refuse(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Bad input found after parsing, reported as `run_reporting` reports the library's: one line ``PROG: error:
    MESSAGE`` on stderr, exit 2 (``parser.error`` would print the whole usage block first).

    Raises:
        SystemExit: always, with code 2.
    """
    parser.exit(2, f"{parser.prog}: error: {message}\n")


#: CLI exit code per exception kind: 2 for bad input, 3 for a run that was refused or stopped, 1 for a failed upload.
EXIT_CODES = (
    ((NonFiniteLossError, UntrustedCheckpointError, ExportMismatchError), 3),
    ((ValueError, FileNotFoundError, FileExistsError, MemoryError, WriteError), 2),
    ((HubUploadError,), 1),
)


def report_error(prog: str, error: BaseException) -> Optional[int]:
    """Print ``PROG: error: MESSAGE`` on stderr and return the exit code of ``error`` where it is a kind
    `EXIT_CODES` lists (bad input: 2); return ``None`` and print nothing for any other error, a bug that the
    caller re-raises with its traceback."""
    for kinds, code in EXIT_CODES:
        if isinstance(error, kinds):
            print(f"{prog}: error: {error}", file=sys.stderr)
            return code
    return None


def stop_at_once(signum, frame) -> None:
    """SIGTERM handler outside the training loop's step (start-up, export, probe, a script's own loop): end at once,
    as Ctrl-C does, instead of the default's silent kill, so ``finally`` blocks and atomic writes clean up.

    Raises:
        SignalStop: always.
    """
    raise SignalStop(signum)


def run_reporting(prog: str, fn: Callable[..., int], *args, note: Optional[Callable[[BaseException], str]] = None,
                  spelling: Optional[Spelling] = None, **kwargs) -> int:
    """``fn(*args, **kwargs)``'s exit code, as the ``distill`` command reports errors and signals; the ``distill``
    command itself and scripts built on distill (``examples/*.py``, ``bench/*.py``) run through it:
    ``raise SystemExit(run_reporting(parser.prog, run, args))``.

    - bad input: one line ``PROG: error: MESSAGE`` (`report_error`), exit 2 (3 for a refused or diverged run);
    - training stopped by a signal after its checkpoint (`TrainingInterrupted`): one line, exit 130 / 143;
    - SIGTERM (handled here as `SignalStop` while ``fn`` runs, in the main thread) or Ctrl-C elsewhere: one line
      ``PROG: stopped by SIGINT``, exit 128 + the signal number, no traceback;
    - ``note(error)``: more words for the two signal cases (e.g. the command that continues, or what was kept).
    - ``spelling``: how messages raised inside ``fn`` name settings (`option`; e.g. ``parser_spelling(parser)``,
      so they name the caller's own options); default: as from Python.

    Any other exception is a bug and propagates with its traceback.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, stop_at_once) if main_thread else None
    try:
        with spelled_as(spelling) if spelling is not None else contextlib.nullcontext():
            return fn(*args, **kwargs)
    except TrainingInterrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        extra = note(e) if note else ""
        if extra:
            print(f"{prog}: {extra}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # a signal before training started, after it, or a second one: no traceback
        signum = getattr(e, "signum", signal.SIGINT)
        extra = note(e) if note else ""
        print(f"{prog}: stopped by {signal.Signals(signum).name}" + (f"; {extra}" if extra else ""),
              file=sys.stderr)
        return 128 + signum
    except Exception as e:
        code = report_error(prog, e)
        if code is None:
            raise
        return code
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
