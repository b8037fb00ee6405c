"""Recipes: flat YAML whose keys are the fields of :class:`Recipe` (the arguments of the pipeline's builders).

A recipe is checked at the boundary: an unknown key gets the closest valid key, a wrong type names the key, the
value and the expected type. The resolved recipe is written next to every run (``config.yaml``) so a run can be
reproduced from its output directory alone.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
import re
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .atomic import atomic_write_text
from .vocab import (AT_MODES, AUGMENTS, MIXED_PRECISION, MULTI_TIMESTEP, ON_NONFINITE, OPTIMIZERS,
                    POLICY_BASELINES, TEACHER_DTYPES, TIMESTEP_MODES, VAE_DTYPES)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` as a float (YAML 1.1 wants a dot: ``3.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?$"
               r"|^[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)



def check_timesteps_value(value: Any, source: str = "recipe") -> None:
    """``timesteps`` is a non-empty list of integers or one of :data:`TIMESTEP_MODES`."""
    if isinstance(value, str):
        if value not in TIMESTEP_MODES:
            raise ValueError(f"{source}: timesteps {value!r} is not a mode; valid: a list of integers such as [11] or "
                             f"[5, 11, 50], or one of {', '.join(TIMESTEP_MODES)}.")
        return
    if not isinstance(value, list) or not value or any(not isinstance(t, int) or isinstance(t, bool) for t in value):
        raise ValueError(f"{source}: timesteps must be a non-empty list of integers (e.g. [11] or [5, 11, 50]) or one "
                         f"of {', '.join(TIMESTEP_MODES)}; got {value!r}.")
    if len(set(value)) != len(value):
        raise ValueError(f"{source}: timesteps has duplicates: {value}.")


@dataclass
class Recipe:
    """Every setting of a distillation run. See ``recipes/quickstart.yaml`` for a commented example."""

    # data
    dataset: str = "fashion-mnist"  # fashion-mnist | image-folder
    data_root: Optional[str] = None  # default for fashion-mnist: /usr/share/datasets/fashion-mnist
    image_channels: Optional[int] = None  # image-folder only: 1 or 3 (default 3)
    mean: Optional[list] = None  # student normalisation in [0, 1] units; default: measured on the data
    std: Optional[list] = None
    # teacher
    teacher: Any = "fashion-mnist-ddpm"  # packaged name, local dir, hub id, or a UNet2DModel config dict
    teacher_blocks: list = field(default_factory=lambda: ["up_blocks.0", "up_blocks.1"])
    timesteps: Any = field(default_factory=lambda: [11])  # [t, ...] | auto-grid | auto-label-free | policy
    teacher_dtype: str = "float32"  # float32 | bfloat16 | float16
    teacher_resolution: Optional[int] = None  # px the teacher sees; default its sample_size (x VAE factor for SD/DiT)
    vae_dtype: str = "float32"  # SD/DiT VAE: float32 | bfloat16 (float16 is refused: the VAE overflows)
    prompt_embedding: Optional[str] = None  # SD: [1, 77, D] tensor file; default: empty prompt, computed and cached
    # student
    student: str = "resnet18"
    student_size: int = 64  # input resize (px) for the student
    student_indices: Optional[list] = None
    student_kwargs: dict = field(default_factory=dict)
    # regressor
    regressor_width: int = 256
    use_ppm: bool = False
    sources: Optional[list] = None  # student level per teacher feature; default: closest spatial size
    feature_cache: Optional[str] = None  # a `distill extract` directory: targets read from it (needs augment: none)
    # timestep selection (timesteps: auto-grid | auto-label-free | policy; see docs/selection.md)
    timestep_candidates: list = field(default_factory=lambda: [1, 11, 25, 50, 100, 200])
    multi_timestep: str = "heads"  # several timesteps: heads (one 1x1 head per timestep) | concat (one head)
    select_images: int = 3000  # auto-grid: train images the probes are fit on (stratified subset of train)
    select_val_images: int = 2000  # auto-grid: held-out train images the probes are scored on
    select_epochs: int = 2  # auto-grid: passes over select_images, fresh noise each step
    select_label_free_images: int = 750  # auto-label-free: images (two noisings each), labels unused
    select_max_memory_gb: Optional[float] = None  # refuse a grid whose estimated step memory exceeds this
    policy_baseline: str = "batch-mean"  # batch-mean (leave-one-out) | ema | none (RepFusion's plain REINFORCE)
    policy_lr: float = 1e-3
    policy_entropy: float = 0.1  # entropy bonus at step 0, decays linearly to 0
    policy_entropy_steps: Optional[int] = None  # step where the bonus reaches 0; default steps // 2
    # losses
    mse_weight: float = 1.0
    at_weight: float = 10.0
    cos_weight: float = 0.0
    at_mode: str = "code"
    # optimisation
    steps: int = 1000
    batch_size: int = 64
    grad_accum_steps: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    warmup_steps: int = 50
    grad_clip: float = 1.0
    mixed_precision: str = "no"
    on_nonfinite: str = "error"  # error: stop, keep the last good checkpoint | skip: drop the batch, count it
    augment: str = "crop-flip"
    # run
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_with: Optional[str] = None  # e.g. tensorboard (Accelerate tracker), besides the CSV log
    # probe (distill run / distill probe)
    probe_train_fraction: float = 1.0  # stratified fraction of the train split used to fit probes
    probe_epochs: int = 30
    knn_k: int = 20

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(Recipe)
    return {f.name: hints[f.name] for f in dataclasses.fields(Recipe)}


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Union:
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"recipe key {key!r} has value {value!r}; valid: {', '.join(map(str, choices))}.")


def make_recipe(values: dict, source: str = "recipe") -> Recipe:
    """Build a :class:`Recipe` from a dict, checking keys, types and choices."""
    fields_ = recipe_fields()
    values = dict(values)
    for key, value in list(values.items()):
        if key not in fields_:
            close = difflib.get_close_matches(key, list(fields_), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown key {key!r} in {source}.{hint} Valid keys: {', '.join(fields_)}.")
        if isinstance(value, int) and not isinstance(value, bool) and fields_[key] is float:
            values[key] = float(value)
        elif not _type_ok(value, fields_[key]):
            raise ValueError(
                f"{source}: key {key!r} must be {_type_name(fields_[key])}, got {value!r} ({type(value).__name__})."
            )
    r = Recipe(**values)
    check_timesteps_value(r.timesteps, source)
    if not isinstance(r.timestep_candidates, list) or not r.timestep_candidates or any(
            not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in r.timestep_candidates):
        raise ValueError(f"{source}: timestep_candidates must be a non-empty list of integers >= 0 (e.g. [1, 11, 50, "
                         f"100]), got {r.timestep_candidates!r}.")
    if len(set(r.timestep_candidates)) != len(r.timestep_candidates):
        raise ValueError(f"{source}: timestep_candidates has duplicates: {r.timestep_candidates}.")
    if r.timesteps == "policy" and len(r.timestep_candidates) < 2:
        raise ValueError(f"{source}: timesteps: policy needs at least 2 timestep_candidates, got "
                         f"{r.timestep_candidates}.")
    _check_choice("multi_timestep", r.multi_timestep, MULTI_TIMESTEP)
    if r.vae_dtype not in VAE_DTYPES:
        raise ValueError(f"{source}: vae_dtype {r.vae_dtype!r} is not valid; use float32 or bfloat16 (a float16 VAE "
                         f"overflows in the encoder and gives NaN/garbage latents).")
    _check_choice("policy_baseline", r.policy_baseline, POLICY_BASELINES)
    _check_choice("optimizer", r.optimizer, OPTIMIZERS)
    _check_choice("augment", r.augment, AUGMENTS)
    _check_choice("mixed_precision", r.mixed_precision, MIXED_PRECISION)
    _check_choice("at_mode", r.at_mode, AT_MODES)
    _check_choice("on_nonfinite", r.on_nonfinite, ON_NONFINITE)
    _check_choice("teacher_dtype", r.teacher_dtype, TEACHER_DTYPES)
    for key in ("select_images", "select_val_images", "select_epochs", "select_label_free_images",
                "steps", "batch_size", "grad_accum_steps", "student_size", "regressor_width", "log_every",
                "checkpoint_every", "probe_epochs", "knn_k", "keep_checkpoints"):
        if getattr(r, key) < 1:
            raise ValueError(f"{source}: {key} must be >= 1, got {getattr(r, key)}.")
    if not 0.0 < r.probe_train_fraction <= 1.0:
        raise ValueError(f"{source}: probe_train_fraction {r.probe_train_fraction} is outside (0, 1]; e.g. 0.1 for 10%.")
    if r.lr <= 0:
        raise ValueError(f"{source}: lr must be > 0, got {r.lr}.")
    if r.policy_lr <= 0 or r.policy_entropy < 0:
        raise ValueError(f"{source}: policy_lr must be > 0 and policy_entropy >= 0, got {r.policy_lr} and "
                         f"{r.policy_entropy}.")
    return r


def load_recipe(path: Union[str, Path], overrides: Optional[dict] = None) -> Recipe:
    """Read a YAML recipe and apply ``overrides`` (e.g. from ``--set key=value``)."""
    path = Path(path)
    if not path.is_file():
        bundled = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
        raise FileNotFoundError(f"recipe '{path}' not found. Recipes in the repository's recipes/: {', '.join(bundled)}.")
    values = yaml_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe '{path}' must be a YAML mapping of key: value, got {type(values).__name__}.")
    values.update(overrides or {})
    return make_recipe(values, source=f"recipe '{path}'")


def parse_overrides(items: list[str]) -> dict:
    """``['steps=10', 'timesteps=[5, 11]']`` -> ``{'steps': 10, 'timesteps': [5, 11]}`` (values parsed as YAML)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is not of the form key=value (e.g. --set steps=100).")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml_load(v)
    return out


def save_recipe(recipe: Recipe, path: Union[str, Path], extra: Optional[dict] = None) -> None:
    """Write the recipe as YAML (atomically), with ``extra`` under ``_resolved`` (the values a run resolved)."""
    data = recipe.to_dict()
    if extra:
        data = {**data, "_resolved": extra}
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
