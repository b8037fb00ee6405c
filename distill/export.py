"""Export the distilled student in timm's own layout (``config.json`` + ``model.safetensors``).

Only the backbone is written; the regressor is discarded. ``pretrained_cfg`` tells the truth about training: the
student's input size and mean/std, a tag, and a description naming the teacher, blocks and timesteps. Reload with
``timm.create_model('local-dir:OUT', pretrained=True, num_classes=K)``.

An export deletes only what it can prove it wrote: an existing ``--out`` is replaced (``overwrite``) only when it is
an earlier export (:func:`export_problem`), and never when it is the run directory or holds it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from .atomic import atomic_dir, atomic_write_json
from .errors import RunExistsError, UnreadableFileError
from .integrity import error_text, read_json, safetensors_problem
from .rundir import is_run, load_trained

_logger = logging.getLogger(__name__)

#: the files ``distill export`` writes
EXPORT_FILES = ("config.json", "model.safetensors")


def _listing(path: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:8]) + (f" ... ({len(names)} entries)" if len(names) > 8 else "")


def export_problem(path: Path) -> Optional[str]:
    """Why the existing ``path`` is not an export written by distill, or None when it is: a directory holding only
    :data:`EXPORT_FILES`, whose ``config.json`` has the ``distill`` key."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return "it is a file, not a directory"
    foreign = sorted(p.name for p in path.iterdir() if p.name not in EXPORT_FILES)
    if foreign:
        return f"it holds {_listing(path)}; an export holds only {' and '.join(EXPORT_FILES)}"
    try:
        cfg = read_json(path / "config.json")
    except (OSError, ValueError) as e:
        return f"its config.json cannot be read ({error_text(e)})"
    if not isinstance(cfg, dict) or "distill" not in cfg:
        return "its config.json has no 'distill' key (it was not written by distill export)"
    return None


def check_export_target(run_dir: str, out: str, overwrite: bool) -> None:
    """Refuse an export target that holds data the export did not write; returns when ``out`` may be written.

    Raises:
        RunExistsError: ``out`` is the run directory, a folder holding it, or a directory holding another run.
        FileExistsError: ``out`` exists (without ``overwrite``), or is not an earlier export (with it); the message
            names what is in it. Nothing is deleted.
    """
    run, target = Path(run_dir).resolve(), Path(out).resolve()
    fix = f"Fix: choose another --out, e.g. {Path(run_dir) / 'student'}."
    if target == run or target in run.parents:
        where = "is the run directory" if target == run else f"holds the run directory '{run_dir}'"
        raise RunExistsError(f"export target '{out}' {where}; exporting there would replace the run (checkpoints, "
                             f"config, metrics). Nothing was written. {fix}")
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if target.is_dir() and (is_run(target) or any(is_run(p) for p in target.iterdir() if p.is_dir())):
        raise RunExistsError(f"export target '{out}' holds a distill run ({_listing(target)}); an export never "
                             f"replaces a run. Nothing was deleted. {fix}")
    if not overwrite:
        what = _listing(target) if target.is_dir() else "a file"
        raise FileExistsError(f"export target '{out}' already exists ({what}); pass --overwrite to replace an "
                              f"earlier export, or choose another --out.")
    problem = export_problem(target)
    if problem:
        raise FileExistsError(f"--overwrite refused: export target '{out}' is not an export written by distill: "
                              f"{problem}. Nothing was deleted. {fix}")


def export_student(run_dir: str, out: str, checkpoint: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write the student of ``run_dir`` to ``out`` in timm format. The checkpoint is ``checkpoint``, or the newest
    one whose weights load (newer damaged ones are skipped with a warning); it is logged and recorded in
    ``config.json`` (``distill.checkpoint``).

    Raises:
        RunExistsError, FileExistsError: ``out`` may not be written (see :func:`check_export_target`).
        FileNotFoundError: not a run directory, or no checkpoint.
        UnreadableFileError: the checkpoint's weights are damaged (the message names the checkpoint and file).
        WriteError: the export could not be written (disk full, read-only, ...): what, where and the space needed.
    """
    import timm.models

    check_export_target(run_dir, out, overwrite)
    out_p = Path(out)
    model, recipe, resolved = load_trained(run_dir, checkpoint)
    _logger.info("exporting the student of %s", resolved["checkpoint"])
    backbone = model.student.model
    S = recipe.student_size
    teacher = recipe.teacher if isinstance(recipe.teacher, str) else "UNet2DModel(config dict)"
    step = Path(resolved["checkpoint"]).name.split("-")[-1]
    timesteps = resolved.get("timesteps_used", recipe.timesteps)  # what the run used (auto modes resolved)
    description = (f"{recipe.student} distilled with distill from teacher {teacher} (blocks {recipe.teacher_blocks}, "
                   f"timesteps {timesteps}) on {recipe.dataset} for {step} steps at {S}px.")
    tag = f"distill-{Path(str(teacher)).name}-{recipe.dataset}"
    data_config = {"input_size": (3, S, S), "mean": tuple(resolved["mean"]), "std": tuple(resolved["std"]),
                   "crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center"}
    model_config = {"pretrained_cfg": {"tag": tag, "description": description, "license": "same as teacher and data",
                                       "notes": (description,)}}
    needed = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
    with atomic_dir(out_p, replace=overwrite, what=f"the student of {resolved['checkpoint']}", needed=needed) as tmp:
        timm.models.save_for_hf(backbone, str(tmp), model_config=model_config, data_config=data_config,
                                safe_serialization=True)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["distill"] = {  # extra top-level key: timm ignores it, people and tools can read it
            "teacher": teacher, "teacher_blocks": recipe.teacher_blocks, "timesteps": timesteps,
            "dataset": recipe.dataset, "data_root": recipe.data_root, "steps": int(step), "student_size": S,
            "data_channels": resolved["data_channels"],
            "run_dir": str(Path(run_dir).resolve()), "checkpoint": resolved["checkpoint"],
        }
        atomic_write_json(cfg_path, cfg)
    return out_p


def export_data_root(distill_meta: dict, dataset: str) -> Optional[str]:
    """The data root an export was distilled on (its config.json 'distill' key), when the dataset is the same and the
    folder exists here; else None (the dataset's default, or an error asking for --data-root)."""
    root = distill_meta.get("data_root")
    if root and distill_meta.get("dataset") == dataset and Path(root).expanduser().is_dir():
        return str(Path(root).expanduser())
    return None


def read_export(path: str, arg: str = "exported student") -> dict:
    """The ``config.json`` of an exported student, after checking that its files are whole (``arg`` names the
    directory's role in the messages, e.g. ``--model``).

    Raises:
        FileNotFoundError: no ``config.json``, or no ``model.safetensors`` (nor a ``pytorch_model.bin``).
        UnreadableFileError: ``config.json`` is not a JSON object, or ``model.safetensors`` is empty, truncated or
            damaged (the message names the file and says to export again).
    """
    p = Path(path)
    fix = f"export it again: distill export RUN --out {p} --overwrite."
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{arg} '{p}' is not an exported student (no config.json); run `distill export` first.")
    cfg = read_json(p / "config.json", f"{arg} config", fix)
    if not isinstance(cfg, dict):
        raise UnreadableFileError(f"{arg} config '{p / 'config.json'}' is not a JSON object. Fix: {fix}", p)
    if not (p / "model.safetensors").is_file():
        if (p / "pytorch_model.bin").is_file():  # a timm export of other origin
            return cfg
        raise FileNotFoundError(f"{arg} '{p}' has config.json but no model.safetensors. Fix: {fix}")
    problem = safetensors_problem(p / "model.safetensors")
    if problem:
        raise UnreadableFileError(f"{arg} weights '{p / 'model.safetensors'}' are {problem}. Fix: {fix}",
                                  p / "model.safetensors")
    return cfg


def load_exported(path: str, num_classes: int = 0):
    """``timm.create_model('local-dir:PATH', pretrained=True, num_classes=...)``, its files checked first
    (:func:`read_export`).

    Raises:
        FileNotFoundError, UnreadableFileError: see :func:`read_export`; or the weights do not fit the
            architecture its config.json names.
    """
    import timm

    p = Path(path)
    read_export(str(p))
    try:
        return timm.create_model(f"local-dir:{p}", pretrained=True, num_classes=num_classes)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise UnreadableFileError(f"cannot load exported student '{p}': {error_text(e, 300)}. Fix: export it again "
                                  f"(distill export RUN --out {p} --overwrite).", p) from e
