"""The fine-tune output directory, owned here: the names of its files, what makes each valid, the overwrite rules
(delete only what a fine-tune provably wrote), the run lock, and reading ``result.json`` for ``distill report``.

``OUT/result.json`` (everything needed for a results table; `read_result`), ``OUT/train_log.csv`` (training
loss per ``log_every`` steps), ``OUT/predictions.png`` (segmentation: a few evaluation images), ``OUT/model/``
(``--save-model``: a directory whose ``config.json`` carries a ``pretrained_cfg`` tag starting with
`MODEL_TAG`) and, while a fine-tune runs, ``OUT/.lock`` (`distill.runlock.RunLock`: a second fine-tune
into the directory is refused, naming the holder).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write_json, writing
from ..errors import option
from ..export import EXPORT_FILES
from ..integrity import error_text, read_json
from ..runlock import RunLock

RESULT_FILE = "result.json"
LOG_FILE = "train_log.csv"
MODEL_DIR = "model"
GRID_FILE = "predictions.png"
#: the pretrained_cfg tag of a model saved with --save-model (``distill-finetune-<dataset>``)
MODEL_TAG = "distill-finetune-"
#: the score every result of a task holds (``task`` key of result.json; absent: classification)
SCORE_KEYS = {"classification": ("last_top1", "best_top1"), "segmentation": ("last_miou",)}
#: the model files a fine-tune writes: a timm export's, or a segmentation model's (the same two names)
MODEL_FILES = EXPORT_FILES


def result_problem(r) -> Optional[str]:
    """Why the dict ``r`` is not a ``result.json`` written by ``distill finetune`` (None when it is): the keys every
    result holds, and the task's score (a result marked ``stopped`` may have none: nothing was evaluated)."""
    if not isinstance(r, dict):
        return "not a JSON object"
    task = r.get("task", "classification")
    if task not in SCORE_KEYS:
        return f"unknown task {task!r}"
    needed = ("label", "fraction", "seed") + (() if r.get("stopped") else SCORE_KEYS[task])
    missing = [k for k in needed if k not in r]
    return f"no {', '.join(missing)}" if missing else None


def file_problem(path: Path) -> Optional[str]:
    """Why the file ``path`` is not a fine-tune's ``result.json`` (None when it is)."""
    try:
        r = read_json(path)
    except (OSError, ValueError) as e:
        return error_text(e)
    return result_problem(r)


def read_result(run_dir: Path) -> dict:
    """``RUN/result.json`` of a fine-tune.

    Raises:
        UnreadableFileError / OSError: the file is missing, empty or not JSON (named).
        ValueError: it is JSON but not a fine-tune result (what is missing named).
    """
    r = read_json(Path(run_dir) / RESULT_FILE)
    problem = result_problem(r)
    if problem:
        raise ValueError(f"not a `distill finetune` result ({problem})")
    return r


def write_result(out: Path, result: dict) -> None:
    """``OUT/result.json``, atomically (a reader sees the old file or the new one, never a part)."""
    atomic_write_json(Path(out) / RESULT_FILE, result)


def saved_model_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a model saved by ``distill finetune --save-model`` (None when it is): a directory of
    ``config.json`` and ``model.safetensors`` whose pretrained_cfg tag starts with `MODEL_TAG`."""
    if path.is_symlink() or not path.is_dir():
        return "it is a file, not a directory"
    foreign = sorted(p.name for p in path.iterdir() if p.name not in MODEL_FILES)
    if foreign:
        return f"it holds {', '.join(foreign[:8])}, which distill finetune does not write there"
    try:
        tag = read_json(path / "config.json").get("pretrained_cfg", {}).get("tag", "")
    except (OSError, ValueError, AttributeError) as e:
        return f"its config.json cannot be read ({error_text(e)})"
    return None if str(tag).startswith(MODEL_TAG) else f"its pretrained_cfg tag is {tag!r}, not {MODEL_TAG}*"


def check_output_dir(out: Path, overwrite: bool, save_model: bool = False) -> None:
    """Refuse an output directory whose files a run would replace but did not provably write (reads only).

    Raises:
        FileExistsError: ``out`` is a ``distill train`` run directory; or holds a ``result.json`` and ``overwrite`` is
            False; or a ``result.json`` (with ``overwrite``) or a ``model/`` (with ``save_model``) that distill
            finetune did not write; or a ``train_log.csv`` / ``predictions.png`` beside neither a fine-tune's
            ``result.json`` nor its ``.lock`` (a user's own files, which a run would replace).
    """
    from ..rundir import LOCK, is_run  # the run directory's owner knows what a training run holds (and the lock)

    out = Path(out)
    result, model = out / RESULT_FILE, out / MODEL_DIR
    refused = f"Nothing was deleted. Fix: choose another {option('output_dir')}, or move it away."
    if is_run(out):
        raise FileExistsError(f"'{out}' is a distill train run directory (config.yaml, checkpoints): a fine-tune there "
                              "would mix its files into the run. Nothing was written. Fix: choose another "
                              f"{option('output_dir')}, e.g. '{out / 'finetune'}'.")
    written = [name for name in (LOG_FILE, GRID_FILE) if (out / name).exists()]
    if written and not result.exists() and not (out / LOCK).exists():
        raise FileExistsError(f"'{out}' holds {', '.join(written)} that distill finetune did not write (no "
                              f"{RESULT_FILE}, no {LOCK} of a fine-tune): a run would replace them. Nothing was "
                              f"written. Fix: choose another {option('output_dir')}, or move those files away.")
    if result.exists():
        if not overwrite:
            raise FileExistsError(f"'{out}' already holds a fine-tuning result ({RESULT_FILE}); pass "
                                  f"{option('overwrite', flag=True)} to replace it or choose another "
                                  f"{option('output_dir')}.")
        problem = file_problem(result)
        if problem:
            raise FileExistsError(f"{option('overwrite', flag=True)} refused: '{result}' is not a distill finetune "
                                  f"result ({problem}). {refused}")
    if save_model and (model.exists() or model.is_symlink()):
        problem = saved_model_problem(model)
        if problem:
            raise FileExistsError(f"'{model}' is not a model saved by distill finetune ({problem}); "
                                  f"{option('save_model', flag=True)} would replace it. {refused}")


def prepare_output_dir(out: Path, overwrite: bool, save_model: bool = False) -> None:
    """Create ``out`` for a run (`check_output_dir` first); with ``overwrite`` the earlier result and the
    model saved beside it are removed (a ``model/`` that distill finetune did not write is left alone).

    Raises:
        FileExistsError: see `check_output_dir`.
        WriteError: ``out`` cannot be created (read-only, a file in the path, ...).
    """
    out = Path(out)
    check_output_dir(out, overwrite, save_model)
    if (out / RESULT_FILE).exists():
        (out / RESULT_FILE).unlink()  # a run killed after this point must not leave the old result beside new logs
    if overwrite and (out / MODEL_DIR).exists() and saved_model_problem(out / MODEL_DIR) is None:
        shutil.rmtree(out / MODEL_DIR)
    with writing("the fine-tuning output directory", out):
        out.mkdir(parents=True, exist_ok=True)


def lock_output_dir(out: Path) -> RunLock:
    """The run lock of ``out`` (enter it on the main process before anything is written; a second fine-tune into
    ``out`` gets `distill.errors.RunLockedError` naming the holder's pid, host and start time).

    Raises (on enter):
        WriteError: ``out`` cannot be created (a file in the path, read-only, ...).
        RunLockedError: another live process holds ``out/.lock``.
    """
    return _WritingLock(Path(out))


class _WritingLock(RunLock):
    """`RunLock` whose failure to create the directory is a `WriteError` naming it."""

    what, mixes = "fine-tuning output directory", "result.json, train_log.csv and model"

    def __enter__(self) -> "RunLock":
        with writing("the fine-tuning output directory", self.path.parent):  # a RunLockedError passes unchanged
            return super().__enter__()
