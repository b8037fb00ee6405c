"""A local diffusers model directory (``config.json`` + ``diffusion_pytorch_model.safetensors``), checked before
diffusers reads it: a config that is not JSON or holds values of the wrong type, missing, empty, truncated or partial
weights are reported naming the directory and the file, with the fix, instead of a traceback from inside diffusers,
torch or safetensors."""
from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..errors import UnreadableFileError
from ..integrity import error_text, read_json, safetensors_problem

#: the fix every message suggests
SAVE_FIX = ("re-save the model with diffusers' save_pretrained (e.g. DDPMPipeline.save_pretrained(DIR)), or copy the "
            "directory again")
WEIGHTS = "diffusion_pytorch_model"


def _fits(value, ann) -> bool:
    """Whether a JSON config value fits a constructor annotation (int, float, bool, str, tuples/lists of them,
    unions, None); annotations it does not understand accept anything."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if ann is type(None):
        return value is None
    if ann in (int, float, bool, str):
        if isinstance(value, bool) != (ann is bool):
            return False
        return isinstance(value, (int, float) if ann is float else ann)
    if origin in (tuple, list) or ann in (tuple, list):
        elems = [a for a in args if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(not elems or any(_fits(v, a) for a in elems) for v in value)
    return True


def check_config_types(cls, cfg: Mapping[str, Any], where: str) -> None:
    """Refuse config values whose type does not fit ``cls.__init__`` (``"block_out_channels": "eight"``), naming
    each key, its value and the expected type (``where``: the file or 'teacher config dict').

    Raises:
        UnreadableFileError: one or more wrongly typed values.
    """
    bad = []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name not in cfg or p.annotation is inspect.Parameter.empty or isinstance(p.annotation, str):
            continue
        value = cfg[name]
        if not (value is None and p.default is None) and not _fits(value, p.annotation):
            ann = p.annotation
            expected = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
            bad.append(f"{name}: {value!r} (expected {expected})")
    if bad:
        raise UnreadableFileError(f"{where} has wrongly typed values for a {cls.__name__}: {'; '.join(bad)}. Fix: "
                                  f"correct them, or {SAVE_FIX}.", where)


def check_model_dir(model_dir: Path, cls) -> None:
    """Check a local diffusers model directory before diffusers reads it: ``config.json`` is JSON with values of
    the types ``cls`` takes, and the weights (``diffusion_pytorch_model.safetensors``, its shards, or ``.bin``)
    are there and whole (safetensors: header and size).

    Raises:
        FileNotFoundError: no weights file (the names looked for are listed).
        UnreadableFileError: bad JSON, wrongly typed values, or an empty or truncated weights file (named).
    """
    cfg_path = model_dir / "config.json"
    cfg = read_json(cfg_path, "teacher config", SAVE_FIX + ".")
    if not isinstance(cfg, dict):
        raise UnreadableFileError(f"teacher config '{cfg_path}' is not a JSON object. Fix: {SAVE_FIX}.", cfg_path)
    check_config_types(cls, cfg, f"teacher config '{cfg_path}'")
    index = model_dir / f"{WEIGHTS}.safetensors.index.json"
    if index.is_file():
        shards = read_json(index, "teacher weights index", SAVE_FIX + ".").get("weight_map", {}).values()
        files = [model_dir / name for name in sorted(set(shards))]
    elif (model_dir / f"{WEIGHTS}.safetensors").is_file():
        files = [model_dir / f"{WEIGHTS}.safetensors"]
    elif (model_dir / f"{WEIGHTS}.bin").is_file():
        files = []  # a torch pickle: diffusers reads it with weights_only=True
    else:
        raise FileNotFoundError(f"teacher directory '{model_dir}' has config.json but no weights ({WEIGHTS}.safetensors "
                                f"or {WEIGHTS}.bin). Fix: {SAVE_FIX}.")
    for f in files:
        problem = safetensors_problem(f)
        if problem:
            raise UnreadableFileError(f"teacher weights '{f}' are {problem}. Fix: {SAVE_FIX}.", f)


def from_local(cls, root: Path, subfolder: Optional[str], **kwargs):
    """``cls.from_pretrained`` of a local directory (``root/subfolder``), checked first (`check_model_dir`);
    partial weights (tensors the config describes but the file lacks) and any diffusers error are reported
    naming the directory.

    Raises:
        FileNotFoundError, UnreadableFileError: see `check_model_dir`; partial or mismatched weights.
    """
    model_dir = root / subfolder if subfolder else root
    check_model_dir(model_dir, cls)
    try:
        model, info = cls.from_pretrained(str(root), subfolder=subfolder, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise UnreadableFileError(f"cannot load the {cls.__name__} in '{model_dir}': {error_text(e, 300)}. Fix: "
                                  f"{SAVE_FIX}.", model_dir) from e
    missing = info.get("missing_keys") or []
    if missing:
        raise UnreadableFileError(
            f"teacher weights in '{model_dir}' are partial: {len(missing)} tensors that its config.json describes "
            f"are missing (e.g. {', '.join(sorted(missing)[:3])}). Fix: {SAVE_FIX}.", model_dir)
    return model


def scheduler_from_local(scheduler_dir: Path, subfolder: Optional[str] = None):
    """``DDPMScheduler.from_pretrained`` of a local scheduler config, its JSON checked first (named if bad)."""
    from diffusers import DDPMScheduler

    cfg_path = scheduler_dir / (subfolder or "") / "scheduler_config.json"
    read_json(cfg_path, "teacher scheduler config", SAVE_FIX + ".")
    try:
        return DDPMScheduler.from_pretrained(str(scheduler_dir), subfolder=subfolder)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UnreadableFileError(f"cannot read the scheduler config '{cfg_path}': {error_text(e)}. Fix: {SAVE_FIX}.",
                                  cfg_path) from e


def local_json(path: Path) -> dict:
    """A local teacher config: ``{}`` when there is none; an error naming it when it is not a JSON object."""
    if not path.is_file():
        return {}
    cfg = read_json(path, "teacher config", SAVE_FIX + ".")
    if not isinstance(cfg, dict):
        raise UnreadableFileError(f"teacher config '{path}' is not a JSON object. Fix: {SAVE_FIX}.", path)
    return cfg
