"""The noise schedule of a teacher given in a recipe (``teacher_scheduler``): a diffusers scheduler config file (or a
directory holding ``scheduler_config.json``), or a mapping of ``DDPMScheduler`` arguments such as
``{beta_schedule: linear, beta_start: 0.0001, beta_end: 0.02, num_train_timesteps: 1000}`` (DDPM, Ho et al. 2020, and
ADM's ``linear`` schedule; ADM's ``cosine`` is diffusers' ``squaredcos_cap_v2``).

Whatever the file's scheduler class (PNDM, DDIM, Euler ...), distill noises with ``DDPMScheduler.add_noise``
(``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``) built from the same betas.
"""
from __future__ import annotations

import difflib
import inspect
import json
import math
from pathlib import Path
from typing import Any, Mapping, Union

from ..vocab import BETA_SCHEDULES



def _ddpm_args() -> list[str]:
    from diffusers import DDPMScheduler

    return [p for p in inspect.signature(DDPMScheduler.__init__).parameters if p != "self"]


def _read_config(spec: Union[str, Path]) -> dict:
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p / "scheduler_config.json" if (p / "scheduler_config.json").is_file() else p / "scheduler" / \
            "scheduler_config.json"
    if not p.is_file():
        raise FileNotFoundError(f"teacher_scheduler '{spec}' is neither a scheduler config file nor a directory "
                                f"holding scheduler_config.json (or scheduler/scheduler_config.json). Fix: give the "
                                f"file, or a mapping such as {{beta_schedule: linear, beta_start: 0.0001, beta_end: "
                                f"0.02, num_train_timesteps: 1000}}.")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"teacher_scheduler '{p}' is not a JSON scheduler config ({e}).") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"teacher_scheduler '{p}' holds a {type(cfg).__name__}, not a JSON object.")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def check_schedule_args(cfg: Mapping[str, Any], source: str = "teacher_scheduler") -> dict:
    """Check a mapping of ``DDPMScheduler`` arguments: known keys, ``beta_schedule`` one of `BETA_SCHEDULES`,
    ``0 < beta_start < beta_end < 1``, ``num_train_timesteps`` an integer >= 2.

    Raises:
        ValueError: naming the key, the value, the valid values and the fix.
    """
    cfg = dict(cfg)
    valid = _ddpm_args()
    unknown = [k for k in cfg if k not in valid]
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{source}: unknown key {unknown[0]!r}.{hint} Valid keys (DDPMScheduler's arguments): "
                         f"{', '.join(valid)}.")
    if "beta_schedule" in cfg and cfg["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(f"{source}: beta_schedule {cfg['beta_schedule']!r} is not valid; valid: "
                         f"{', '.join(BETA_SCHEDULES)} (ADM's cosine schedule is squaredcos_cap_v2).")
    T = cfg.get("num_train_timesteps", 1000)
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise ValueError(f"{source}: num_train_timesteps must be an integer >= 2, got {T!r}. Fix: e.g. 1000.")
    for key in ("beta_start", "beta_end"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or not 0 < v < 1):
            raise ValueError(f"{source}: {key} must be in (0, 1), got {v!r}. Fix: e.g. beta_start: 0.0001, "
                             f"beta_end: 0.02 (DDPM's linear schedule).")
    if cfg.get("beta_start") is not None and cfg.get("beta_end") is not None and cfg["beta_start"] >= cfg["beta_end"]:
        raise ValueError(f"{source}: beta_start {cfg['beta_start']} must be below beta_end {cfg['beta_end']}.")
    return cfg


def build_noise_schedule(spec: Union[str, Path, Mapping[str, Any]]):
    """A ``DDPMScheduler`` from a scheduler config path/directory or a mapping of its arguments (checked by
    `check_schedule_args`; a file's keys that DDPMScheduler does not take, such as PNDM's ``skip_prk_steps``,
    are dropped).

    Raises:
        FileNotFoundError: a path that holds no scheduler config.
        ValueError: a bad value (see `check_schedule_args`), or ``spec`` of another type.
    """
    from diffusers import DDPMScheduler

    if isinstance(spec, (str, Path)):
        cfg = _read_config(spec)
        cfg = {k: v for k, v in cfg.items() if k in _ddpm_args()}
        source = f"teacher_scheduler '{spec}'"
    elif isinstance(spec, Mapping):
        cfg, source = dict(spec), "teacher_scheduler"
    else:
        raise ValueError(f"teacher_scheduler must be a path to a scheduler config or a mapping of DDPMScheduler "
                         f"arguments, got {spec!r} ({type(spec).__name__}).")
    return DDPMScheduler(**check_schedule_args(cfg, source))
