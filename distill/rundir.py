"""The run directory: its one owner. Writes and reads every file of a distillation run.

Layout of ``RUN`` (``distill train -o RUN``)::

    RUN/config.yaml          the resolved recipe, with ``_resolved`` (mean/std, feature layout, sources, ...)
    RUN/metrics.csv          loss terms per logged step (rows after a resumed checkpoint are dropped)
    RUN/checkpoint-{step}/   Accelerate state (model.safetensors, optimizer.bin, random_states_*.pkl), renamed
                             into place complete
    RUN/summary.json         written when training ends
    RUN/monitor.csv          kNN top-1 of the student every ``monitor_every`` steps (and step 0)
    RUN/policy.csv, RUN/policy_histogram.png, RUN/selection/   for ``timesteps: policy`` / ``auto-*``

This module lists and chooses checkpoints, prepares or refuses a directory, writes the config and the summary, and
reloads a trained run (`load_trained`) for export and probes; the logs a run appends to as it trains
(``metrics.csv``, ``policy.csv``, ``monitor.csv``, ``train.log``) are written by `distill.trainer.textlog`.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Optional

import yaml

from .atomic import atomic_write_json
from .build import build_student
from .config import Recipe, make_recipe, save_recipe, yaml_load
from .errors import RunExistsError, UnreadableFileError, option
from .integrity import error_text, read_json, safetensors_problem, torch_file_problem
from .regressor import FeatureRegressor
from .student import DistillModel
from .teacher.loading import MODULE_PREFIX
from .teacher.python import qualified_name

_logger = logging.getLogger(__name__)

CONFIG = "config.yaml"
METRICS = "metrics.csv"
SUMMARY = "summary.json"
LOCK = ".lock"
MONITOR = "monitor.csv"  # step, kNN top-1 of the student (recipe monitor_every; distill.trainer.monitor)
EMA_FILE = "ema.safetensors"  # in a checkpoint: the student EMA (recipe ema; distill.trainer.ema)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: the files Accelerate's save_state writes into a checkpoint of a distill run (model, policy, optimizers, RNG)
CHECKPOINT_FILE_RE = re.compile(r"^(model(_\d+)?\.safetensors|optimizer(_\d+)?\.bin|random_states_\d+\.pkl|"
                                r"scaler\.pt|ema\.safetensors|\.tmp-.*)$")
#: what a run writes in its directory (besides checkpoint-{step}/ and .tmp-* temporaries): an --overwrite deletes
#: these and refuses a directory holding anything else
RUN_ARTEFACTS = frozenset({CONFIG, METRICS, SUMMARY, LOCK, MONITOR, "policy.csv", "policy_histogram.png", "selection",
                           "student", "results.json", "results.md", "train.log"})


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """``RUN/checkpoint-{step}``."""
    return Path(run_dir) / f"checkpoint-{step}"


def checkpoint_step(ckpt: Path) -> int:
    """The step of a ``checkpoint-{step}`` directory."""
    return int(CHECKPOINT_RE.match(Path(ckpt).name).group(1))


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The ``checkpoint-{step}`` directories of a run, oldest first, as ``(step, path)``. distill renames a
    checkpoint into place complete, but a copy or a disk fault can damage one: `newest_loadable_checkpoint`
    checks them."""
    out = []
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest ``checkpoint-{step}`` directory of ``run_dir``, or None (unchecked: to load one, use
    `newest_loadable_checkpoint`)."""
    ckpts = list_checkpoints(Path(run_dir))
    return ckpts[-1][1] if ckpts else None


MODEL_FILE = "model.safetensors"


def checkpoint_problem(ckpt: Path, model_only: bool = False, deep: bool = True) -> Optional[str]:
    """What keeps checkpoint ``ckpt`` from loading, naming the file (``'model.safetensors: truncated (1000000 of
    44926704 bytes)'``, ``'empty directory (an interrupted copy?)'``), or None.

    Checks: ``model*.safetensors`` by header and size; unless ``model_only`` (export needs the weights alone),
    the matching ``optimizer*.bin`` and the ``random_states_*.pkl`` files, loaded with ``weights_only=True`` when
    ``deep`` (resume), else by their zip structure.

    Raises:
        UntrustedCheckpointError: (``deep``, not ``model_only``) a file would import or call code when unpickled.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return "not a directory"
    names = sorted(p.name for p in ckpt.iterdir())
    if not names:
        return "empty directory (an interrupted copy or write?)"
    if MODEL_FILE not in names:
        return f"{MODEL_FILE}: missing (the directory holds {', '.join(names[:6])}{' ...' if len(names) > 6 else ''})"
    models = [n for n in names if re.fullmatch(r"model(_\d+)?\.safetensors", n)]
    for name in models:
        problem = safetensors_problem(ckpt / name)
        if problem:
            return f"{name}: {problem}"
    if model_only:
        return None
    torch_files = [n.replace("model", "optimizer").replace(".safetensors", ".bin") for n in models]
    rng = [n for n in names if re.fullmatch(r"random_states_\d+\.pkl", n)]
    for name in torch_files + (rng or ["random_states_0.pkl"]):
        problem = torch_file_problem(ckpt / name, deep)
        if problem:
            return f"{name}: {problem}"
    return None


def newest_loadable_checkpoint(run_dir: Path, model_only: bool = False, deep: bool = True) -> Optional[Path]:
    """The newest checkpoint of ``run_dir`` that loads (`checkpoint_problem`), or None when there is none.
    Each newer damaged one is skipped with a warning naming the checkpoint, the file and the problem.

    Raises:
        UnreadableFileError: every checkpoint is damaged (each listed with its problem).
        UntrustedCheckpointError: a checkpoint holds a pickle that would run code (never skipped silently).
    """
    run_dir = Path(run_dir)
    skipped = []
    for _, ckpt in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(ckpt, model_only, deep)
        if problem is None:
            for name, why in skipped:
                _logger.warning("%s of '%s' cannot be loaded (%s); using %s, the newest one that loads",
                                name, run_dir, why, ckpt.name)
            return ckpt
        skipped.append((ckpt.name, problem))
    if skipped:
        listed = "; ".join(f"{name}: {why}" for name, why in skipped)
        # a whole command, not option('overwrite'): under distill export or probe, --overwrite means another thing
        raise UnreadableFileError(
            f"no checkpoint of '{run_dir}' can be loaded ({listed}). Fix: restore the run from a copy, or train it "
            f"again with the recipe that made it (distill train RECIPE -o {run_dir} --overwrite).", run_dir)
    return None


def is_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run (a ``config.yaml`` or a checkpoint)."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and ((run_dir / CONFIG).exists() or bool(list_checkpoints(run_dir)))


def _other_files(run_dir: Path) -> list:
    """The names in ``run_dir`` other than its lock (none when it does not exist)."""
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK) if run_dir.is_dir() else []


def _listed(names: list) -> str:
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Optional[Path]:
    """Refuse to mix runs: an existing run is resumed (``resume``: returns its newest checkpoint, or None),
    replaced (``overwrite``) or an error.

    Raises:
        RunExistsError: ``run_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set; or it holds files
            that are not a run (with ``resume`` too: nothing to continue there, and a new run would mix with them).
    """
    run_dir = Path(run_dir)
    if resume:
        for stale in run_dir.glob(".tmp-checkpoint-*") if run_dir.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # a checkpoint write that was killed: never a checkpoint
        if list_checkpoints(run_dir) and not (run_dir / CONFIG).is_file():
            raise RunExistsError(f"{option('resume', flag=True)}: '{run_dir}' has checkpoint folders but no "
                                 f"config.yaml, so it is not a distill run (distill writes config.yaml before any "
                                 f"checkpoint). Fix: give the {option('output_dir')} of a distill run.")
        ckpt = newest_loadable_checkpoint(run_dir)  # a damaged newest one is skipped with a warning
        if ckpt is None:
            others = _other_files(run_dir)
            if others and not is_run(run_dir):  # nothing to continue, and the files are not a run's: never mix
                raise RunExistsError(
                    f"{option('resume', flag=True)}: output directory '{run_dir}' holds no distill run to continue "
                    f"({_listed(others)}); a run started there would mix with those files. Nothing was written. Fix: "
                    f"give the {option('output_dir')} of a distill run, or a new or empty one.")
            _logger.warning("%s: no checkpoint in '%s'; starting from step 0", option("resume", flag=True), run_dir)
        return ckpt
    others = _other_files(run_dir)
    if others and not is_run(run_dir):
        raise RunExistsError(
            f"output directory '{run_dir}' is not empty and holds no distill run ({_listed(others)}); a run written "
            f"there would mix with those files. Fix: choose a new or empty {option('output_dir')}.")
    if is_run(run_dir):
        if not overwrite:
            raise RunExistsError(
                f"output directory '{run_dir}' already holds a run; pass {option('resume', flag=True)} to continue "
                f"it, {option('overwrite', flag=True)} to replace it, or choose another {option('output_dir')}."
            )
        remove_run(run_dir)
    return None


def remove_run(run_dir: Path) -> None:
    """Delete a run's own artefacts (`RUN_ARTEFACTS`, checkpoints, temporaries), keeping its lock.

    Raises:
        RunExistsError: ``run_dir`` is not provably a distill run: its ``config.yaml`` is not a distill recipe, or
            it holds files or folders distill does not write there (another project, a nested run); nothing is
            deleted.
    """
    run_dir = Path(run_dir)
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if not (p.name in RUN_ARTEFACTS or CHECKPOINT_RE.match(p.name) or p.name.startswith(".tmp-")))
    foreign += sorted(f"{c.name}/{f.name}" for _, c in list_checkpoints(run_dir) for f in c.iterdir()
                      if not CHECKPOINT_FILE_RE.match(f.name))
    reason = f"it holds {', '.join(foreign[:8])}{' ...' if len(foreign) > 8 else ''}, which distill does not write"
    if not foreign and not (run_dir / CONFIG).is_file():
        reason, foreign = "it has checkpoints or logs but no config.yaml (distill writes one before any of them)", \
            [CONFIG]
    if not foreign:
        try:
            _, resolved = read_config(run_dir)
            if not resolved:
                reason, foreign = "its config.yaml has no _resolved section (not written by distill train)", [CONFIG]
        except (ValueError, TypeError, AttributeError, yaml.YAMLError) as e:
            reason, foreign = f"its config.yaml is not a distill recipe ({str(e)[:200]})", [CONFIG]
    if foreign:
        raise RunExistsError(f"{option('overwrite', flag=True)} refused: '{run_dir}' is not provably a distill run: "
                             f"{reason}. Nothing was deleted. Fix: choose another {option('output_dir')}, or move "
                             f"those files away first.")
    for p in run_dir.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def recipe_for_yaml(recipe: Recipe) -> Recipe:
    """``recipe`` as ``config.yaml`` records it: an ``nn.Module`` teacher (``distill.train``'s Python API) becomes
    ``'module:<package.module.Class>'`` (its class, factory and weights hash are in ``_resolved.teacher_source``)."""
    if isinstance(recipe.teacher, (str, dict, type(None))):
        return recipe
    return dataclasses.replace(recipe, teacher=f"{MODULE_PREFIX}{qualified_name(recipe.teacher)}")


def write_config(run_dir: Path, recipe: Recipe, resolved: dict) -> None:
    """``RUN/config.yaml``: the recipe (`recipe_for_yaml`) and the values the run resolved (atomically)."""
    save_recipe(recipe_for_yaml(recipe), Path(run_dir) / CONFIG, resolved)


def read_config(run_dir: Path) -> tuple[Recipe, dict]:
    """The recipe and ``_resolved`` values of a run.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``config.yaml``.
        UnreadableFileError: ``config.yaml`` is not UTF-8, not YAML (naming the file, line and column) or no mapping.
    """
    run, path = Path(run_dir), Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"'{run}' is not a run directory (no config.yaml); give the output directory of a "
                                f"`distill train` run.")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"), source=f"run config '{path}'")
        problem = None if isinstance(data, dict) else f"run config '{path}' is not a mapping of recipe keys"
    except UnicodeDecodeError as e:
        problem = f"run config '{path}' is not UTF-8 text ({e.reason} at byte offset {e.start})"
    except ValueError as e:  # YAML: the message names the line and the column
        problem = str(e).split(" Fix: ")[0].removesuffix(".")
    if problem:
        raise UnreadableFileError(f"{problem}. Fix: restore it (distill train writes it; it is not edited by hand), "
                                  f"or train into a new {option('output_dir')}.", path)
    resolved = data.pop("_resolved", {})
    return make_recipe(data, source=f"'{path}'", warn=False), resolved


#: recipe keys a resume may change without ``allow_changes``: they do not change what is trained (``steps`` may
#: only grow past the resumed checkpoint)
RESUME_FREE_KEYS = ("steps", "num_workers", "log_every", "checkpoint_every", "keep_checkpoints", "log_with",
                    "probe_train_fraction", "probe_epochs", "knn_k", "channels_last", "compile",
                    "probe_test_fraction")
#: resolved values a resume must find unchanged (what the run measured or loaded at its start)
RESUME_RESOLVED_KEYS = ("mean", "std", "data_channels", "teacher_sha256", "data_sha256", "teacher_features",
                        "sources", "regressor_targets", "target_groups", "timesteps_used", "teacher_source",
                        "teacher_settings", "mixed_precision")


def resume_changes(old: Recipe, old_resolved: dict, new: Recipe, new_resolved: Optional[dict] = None) -> list:
    """What a resume would change: ``[(key, old value, new value), ...]`` over the recipe's keys and, when
    ``new_resolved`` is given, the resolved values of `RESUME_RESOLVED_KEYS` that both runs recorded
    (a resolved key is prefixed ``_resolved.``)."""
    new = recipe_for_yaml(new)
    out = [(k, v, getattr(new, k)) for k, v in old.to_dict().items() if getattr(new, k) != v]
    for k in RESUME_RESOLVED_KEYS if new_resolved is not None else ():
        if k in old_resolved and k in new_resolved and _plain(old_resolved[k]) != _plain(new_resolved[k]):
            out.append((f"_resolved.{k}", old_resolved[k], new_resolved[k]))
    return out


def _plain(v):
    """Tuples as lists, as they read back from YAML."""
    return yaml.safe_load(yaml.safe_dump(v))


def check_resume_flags(resume: bool, allow_changes: bool) -> None:
    """``allow_changes`` applies to a resume only (alone it was accepted and did nothing).

    Raises:
        ValueError: ``allow_changes`` without ``resume``.
    """
    if allow_changes and not resume:
        raise ValueError(f"{option('allow_changes', flag=True)} applies to a resume only (it lets a resumed run "
                         f"continue with changed settings); add {option('resume', flag=True)}, or leave it out.")


def check_resume(run_dir: Path, start: int, recipe: Recipe, resolved: Optional[dict], allow_changes: bool) -> list:
    """The resume contract: refuse a resume whose recipe or resolved values differ from the run's, except
    `RESUME_FREE_KEYS` (and ``steps`` only upwards of the checkpoint ``start``); with ``allow_changes``
    the differences are accepted and returned, to be recorded in ``config.yaml`` with the step where they took
    effect. Returns the list of changes (``[{'step', 'key', 'old', 'new'}]``).

    Raises:
        ValueError: a difference that needs ``allow_changes`` (each listed as ``key: old -> new``), or ``steps``
            not past the checkpoint.
    """
    if not (Path(run_dir) / CONFIG).is_file():
        return []
    old, old_resolved = read_config(run_dir)
    changes = resume_changes(old, old_resolved, recipe, resolved)
    blocking = [c for c in changes if c[0] not in RESUME_FREE_KEYS]
    if recipe.steps <= start:
        also = f" (and the recipe differs: {'; '.join(f'{k}: {_short(a)} -> {_short(b)}' for k, a, b in blocking)})" \
            if blocking else ""
        raise ValueError(f"{option('resume', flag=True)}: steps={recipe.steps} but the run's newest checkpoint is at "
                         f"step {start}; give steps > {start} (--set steps=N) to train on, or use the run as it "
                         f"is{also}.")
    if blocking and not allow_changes:
        listed = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in blocking)
        raise ValueError(
            f"{option('resume', flag=True)} of '{run_dir}' with settings that differ from the run's config.yaml "
            f"({listed}). A resumed run must be the run its directory describes. Fix: resume with the run's own "
            f"recipe (its config.yaml), start a new {option('output_dir')}, or pass "
            f"{option('allow_changes', flag=True)} to continue with the new values (recorded in config.yaml with "
            f"step {start}).")
    for k, a, b in changes:
        if k == "steps":  # free, but the warmup + cosine schedule is stretched or squeezed from here on
            _logger.warning("%s: steps %s -> %s (the recipe given now); the learning-rate schedule follows the new "
                            "length from step %d on. To continue the run as it was planned, pass --set steps=%s.",
                            option("resume", flag=True), a, b, start, a)
    return [{"step": start, "key": k, "old": _plain(a), "new": _plain(b)} for k, a, b in changes]


def record_changes(run_dir: Path, resolved: dict, changes: list) -> dict:
    """``resolved`` with ``changes``: the run's earlier accepted resume changes plus these ones (each with the step
    where it took effect), as written to ``config.yaml``."""
    earlier = read_config(run_dir)[1].get("changes", []) if (Path(run_dir) / CONFIG).is_file() else []
    return {**resolved, "changes": earlier + changes} if earlier or changes else resolved


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def write_summary(run_dir: Path, summary: dict) -> None:
    """``RUN/summary.json`` (atomically)."""
    atomic_write_json(Path(run_dir) / SUMMARY, summary)


def read_summary(path: Path) -> dict:
    """A ``summary.json`` written by `write_summary`.

    Raises:
        UnreadableFileError / OSError: missing, empty or not JSON (named). ValueError: not a JSON object.
    """
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError("not a `distill train` summary.json (a JSON object)")
    return data


def read_metrics(path: Path) -> dict[str, list[float]]:
    """A per-step CSV log (``metrics.csv``, ``monitor.csv``) -> ``{column: [values]}``; empty cells are NaN.

    Raises:
        ValueError: the file is empty or has no ``step`` column. OSError: it cannot be read.
    """
    def number(v) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"'{path}' is empty; a `distill train` metrics.csv starts with a header row.")
    header, body = rows[0], [r for r in rows[1:] if r]
    if "step" not in header:
        raise ValueError(f"'{path}' has no 'step' column (header: {header}); is it a `distill train` metrics.csv?")
    return {c: [number(r[i]) if i < len(r) else math.nan for r in body] for i, c in enumerate(header)}


def load_trained(run_dir: str, checkpoint: Optional[str] = None, map_location="cpu") -> tuple[DistillModel, Recipe, dict]:
    """Rebuild student + regressor of a run and load a checkpoint's weights (default: the newest checkpoint whose
    weights load; newer damaged ones are skipped with a warning, see `newest_loadable_checkpoint`).
    ``checkpoint`` is a checkpoint directory, or the name of one in the run (``checkpoint-4``).

    Returns:
        ``(model in eval mode, recipe, resolved values + 'checkpoint')``.

    Raises:
        FileNotFoundError: not a run directory, no checkpoint, or no such ``checkpoint``.
        UnreadableFileError: the given ``checkpoint`` (or every checkpoint) has damaged weights (the message names
            the checkpoint and the file), or they do not fit the run's ``config.yaml``.
    """
    from safetensors.torch import load_file

    run = Path(run_dir)
    recipe, resolved = read_config(run)
    ckpt = (run / checkpoint if checkpoint and (run / checkpoint).is_dir() else Path(checkpoint)) if checkpoint \
        else newest_loadable_checkpoint(run, model_only=True)
    if ckpt is None or not ckpt.is_dir():
        have = ", ".join(p.name for _, p in list_checkpoints(run)) or "none"
        raise FileNotFoundError(f"no checkpoint{' ' + str(checkpoint) if checkpoint else ''} in '{run}' (it has: "
                                f"{have}); train first, or give one of its checkpoint directories.")
    problem = checkpoint_problem(ckpt, model_only=True) if checkpoint else None
    if problem:
        raise UnreadableFileError(f"checkpoint '{ckpt}' cannot be loaded: {problem}. Fix: give another checkpoint, "
                                  f"or none to use the newest one that loads.", ckpt / MODEL_FILE)
    student = build_student(recipe)
    targets = ([(c, tuple(size)) for c, size in resolved["regressor_targets"]] if "regressor_targets" in resolved
               else [(f["num_chs"], tuple(f["size"])) for f in resolved["teacher_features"]])
    regressor = FeatureRegressor(student.channels, targets, sources=resolved["sources"], width=recipe.regressor_width,
                                 use_ppm=recipe.use_ppm)
    model = DistillModel(student, regressor)
    try:
        model.load_state_dict(load_file(str(ckpt / MODEL_FILE), device=str(map_location)), strict=True)
    except Exception as e:  # noqa: BLE001 - safetensors' and torch's errors, named here
        raise UnreadableFileError(f"cannot load '{ckpt / MODEL_FILE}' into the model described by '{run / CONFIG}': "
                                  f"{error_text(e)}. Fix: give the checkpoint of this run.", ckpt / MODEL_FILE) from e
    resolved["checkpoint"] = str(ckpt)
    return model.eval(), recipe, resolved
