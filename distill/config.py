"""Recipes: flat YAML whose keys are the fields of `Recipe` (the arguments of the pipeline's builders).

A recipe is checked at the boundary: an unknown key gets the closest valid key, a wrong type names the key, the
value and the expected type, and every number is checked against its range in `RANGES` (one entry per numeric
field). The YAML itself is read strictly: a key given twice, a syntax error and an empty file are errors naming the
file and line. The resolved recipe is written next to every run (``config.yaml``) so a run can be reproduced from its
output directory alone.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .atomic import atomic_write_text
from .ranges import Range
from .vocab import (AT_MODES, AUGMENTS, DATA_HASH, DATASETS, IMAGE_RESIZE, MIXED_PRECISION, MULTI_TIMESTEP,
                    NUM_WORKERS_WORDS, ON_NONFINITE, OPTIMIZERS, POLICY_BASELINES, TEACHER_DTYPES, TIMESTEP_MODES,
                    VAE_DTYPES)
from .vocab import LATENT_SAMPLE

_logger = logging.getLogger(__name__)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` as a float (YAML 1.1 wants a dot: ``3.0e-4``) and refuses a key given twice
    in one mapping (ValueError naming ``source``, the key and both places)."""

    source = "YAML text"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # merge keys (<<) may be overridden; a non-scalar key is refused by the base class
                key, again = self.construct_object(key_node), key_node.start_mark
                first = seen.setdefault(key, again)
                if first is not again:
                    where = (f"at lines {first.line + 1} and {again.line + 1}" if first.line != again.line else
                             f"on line {first.line + 1} (columns {first.column + 1} and {again.column + 1})")
                    raise ValueError(f"{self.source}: key {key!r} is given twice, {where}; YAML would silently keep "
                                     f"the last. Fix: delete one of them.")
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?$"
               r"|^[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def yaml_load(text: str, source: str = "YAML text"):
    """Parse ``text`` with the recipe loader (``3e-4`` is a float; a key given twice in one mapping is an error).

    Raises:
        ValueError: a key given twice (naming ``source``, the key and both lines) or a YAML syntax error (naming
            ``source``, the line, the column and the problem), on one line.
    """
    try:
        loader = _Loader(text)
        loader.source = source
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: {_yaml_problem(e, text)}. Fix: correct the YAML there (indent with spaces, "
                         f"close brackets and quotes, quote a value that contains ': ').") from None


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """One line: where the YAML error is (line, column; 1-based) and what is wrong."""
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow; position counts characters
        line = text.count("\n", 0, e.position) + 1
        column = e.position - text.rfind("\n", 0, e.position)
        return f"YAML error at line {line}, column {column}: character {chr(e.character)!r} is not allowed"
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        where, problem = e.problem_mark, e.problem
        if e.context and e.context_mark is not None:
            problem += f" ({e.context} at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        return " ".join(f"YAML syntax error at line {where.line + 1}, column {where.column + 1}: {problem}".split())
    return " ".join(f"YAML error: {e}".split())


def check_timesteps_value(value: Any, source: str = "recipe") -> None:
    """``timesteps`` is a non-empty list of integers or one of `TIMESTEP_MODES`."""
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
    dataset: str = "fashion-mnist"  # fashion-mnist | image-folder | file-list | hf
    data_root: Optional[str] = None  # default for fashion-mnist: /usr/share/datasets/fashion-mnist
    image_channels: Optional[int] = None  # image-folder only: 1 or 3 (default 3)
    mean: Optional[list] = None  # student normalisation in [0, 1] units; default: measured on the data
    std: Optional[list] = None
    image_size: Optional[int] = None  # decode-time size (square) of file datasets; null: the first image's size
    image_resize: str = "center-crop"  # center-crop (aspect kept) | squash: how images are brought to that size
    min_image_side: int = 8  # images with a side below this (px) are degenerate: skipped (warning names the file)
    data_hash: str = "stat"  # feature-cache key per input file: stat (size + mtime) | content (sha256 of the bytes)
    # teacher
    teacher: Any = "fashion-mnist-ddpm"  # packaged name, local dir, hub id, or a UNet2DModel config dict
    teacher_blocks: list = field(default_factory=lambda: ["up_blocks.0", "up_blocks.1"])
    timesteps: Any = field(default_factory=lambda: [11])  # [t, ...] | auto-grid | auto-label-free | policy
    teacher_dtype: str = "float32"  # float32 | bfloat16 | float16
    teacher_resolution: Optional[int] = None  # px the teacher sees; default its sample_size (x VAE factor for SD/DiT)
    vae_dtype: str = "float32"  # SD/DiT VAE: float32 | bfloat16 (float16 is refused: the VAE overflows)
    prompt_embedding: Optional[str] = None  # SD: [1, 77, D] tensor file; default: empty prompt, computed and cached
    teacher_kwargs: dict = field(default_factory=dict)  # teacher: python:module:factory only: the factory's arguments
    teacher_weights: Optional[str] = None  # python: teachers: .safetensors, or .pt/.pth read with weights_only=True
    teacher_weights_prefix: Optional[str] = None  # key prefix stripped from teacher_weights (e.g. module.)
    teacher_in_channels: Optional[int] = None  # python: teachers: input channels (default: the model's in_channels)
    teacher_scheduler: Any = None  # pixel teachers: scheduler_config.json path, or {beta_schedule: linear, ...}
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
    latent_cache: Optional[str] = None  # a `distill extract --latents` directory: VAE latents read from it (SD/DiT)
    latent_sample: str = "sample"  # latent_cache: sample (mean + std * eps, as diffusers trains) | mean
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
    mixed_precision: Optional[str] = None  # null: Accelerate's configuration decides; no | fp16 | bf16 win over it
    on_nonfinite: str = "error"  # error: stop, keep the last good checkpoint | skip: drop the batch, count it
    augment: str = "crop-flip"
    # run
    seed: int = 0
    num_workers: Union[int, str] = "auto"  # DataLoader processes, or auto (CPUs per process - 1, at most 8)
    log_every: int = 10
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_with: Optional[str] = None  # e.g. tensorboard (Accelerate tracker), besides the CSV log
    # "is it working?" while training, and the knobs of timm's train.py (README "Training knobs")
    monitor_every: int = 0  # kNN top-1 of the student's pooled features every N steps (and at step 0); 0: off
    monitor_images: int = 1000  # monitor: stratified train images (the kNN bank) and as many test images
    channels_last: bool = False  # student, regressor and their inputs in NHWC memory format
    compile: Union[bool, str] = False  # torch.compile student + regressor: true (inductor) or a backend name
    ema: bool = False  # keep an EMA of the student's weights (timm ModelEmaV3), saved in checkpoints
    ema_decay: float = 0.9998  # per optimizer update
    # probe (distill run / distill probe)
    probe_train_fraction: float = 1.0  # stratified fraction of the train split used to fit probes
    probe_test_fraction: float = 1.0  # seeded stratified fraction of the test split the probes are scored on
    probe_epochs: int = 30
    knn_k: int = 20

    def to_dict(self) -> dict:
        """The recipe's keys -> values (lists and dicts copied); a teacher given as an object (an ``nn.Module``) is
        the same object, not a deep copy of its weights."""
        return {f.name: (v if f.name == "teacher" and not isinstance(v, (str, dict, list)) else copy.deepcopy(v))
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


def recipe_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(Recipe)
    return {f.name: hints[f.name] for f in dataclasses.fields(Recipe)}


_WEIGHT = Range(lo=0, fix="Fix: a weight >= 0 (0 turns the term off); a negative weight trains the student to "
                          "maximise that error.")

#: The valid values of every numeric field of `Recipe` (ints, floats, Optional ones, and the lists mean/std);
#: `check_ranges` walks it, and a test checks that no numeric field is missing.
RANGES: dict[str, Range] = {
    "image_channels": Range(values=(1, 3), fix="Fix: 1 (grayscale) or 3 (RGB), or null for 3; image-folder only."),
    "mean": Range(lo=0, hi=1, lengths=(1, 3), fix="Fix: per-channel means in [0, 1] units (e.g. [0.5, 0.5, 0.5] "
                                                   "or [0.5]), or null to measure them on the data."),
    "std": Range(lo=0, lo_open=True, lengths=(1, 3), fix="Fix: per-channel standard deviations in [0, 1] units "
                                                         "(e.g. [0.25, 0.25, 0.25]), or null to measure them."),
    "image_size": Range(lo=1, fix="Fix: null (every image at the first image's size), or a size in px such as 64."),
    "teacher_resolution": Range(lo=8, fix="Fix: null for the teacher's own size, or a size it takes (e.g. 256 for SD "
                                          "or DiT; the teacher checks that it fits its downsampling)."),
    "teacher_in_channels": Range(lo=1, fix="Fix: the channels the teacher network takes (e.g. 3), or null."),
    "select_max_memory_gb": Range(lo=0, lo_open=True, fix="Fix: the memory budget in GB (e.g. 40), or null for no "
                                                          "limit."),
    "policy_lr": Range(lo=0, lo_open=True),
    "policy_entropy": Range(lo=0, fix="Fix: e.g. 0.1; 0 turns the entropy bonus off."),
    "policy_entropy_steps": Range(lo=0, fix="Fix: null for steps // 2, or the step where the bonus reaches 0 "
                                            "(0 turns it off)."),
    "mse_weight": _WEIGHT,
    "at_weight": _WEIGHT,
    "cos_weight": _WEIGHT,
    "lr": Range(lo=0, lo_open=True, fix="Fix: a small positive rate, e.g. 1e-3 (AdamW) or 0.1 (SGD)."),
    "weight_decay": Range(lo=0, fix="Fix: e.g. 0.05 (AdamW); 0 for none."),
    "momentum": Range(lo=0, hi=1, hi_open=True, fix="Fix: e.g. 0.9 (used by sgd only)."),
    "warmup_steps": Range(lo=0, fix="Fix: 0 for no warmup, or a few percent of steps (e.g. 50)."),
    "grad_clip": Range(lo=0, fix="Fix: a maximum gradient norm such as 1.0; 0 turns clipping off."),
    "seed": Range(lo=0, hi=2 ** 32 - 1, fix="Fix: e.g. 0 (numpy takes seeds below 2**32)."),
    "num_workers": Range(lo=0, words=NUM_WORKERS_WORDS, fix="Fix: 0 (load in the main process), the number of "
                         "DataLoader processes, or auto (CPUs per process - 1, at most 8)."),
    "ema_decay": Range(lo=0, hi=1, hi_open=True, fix="Fix: e.g. 0.9998 (timm's train.py uses 0.9998); the EMA "
                                                     "averages about 1 / (1 - decay) updates."),
    "monitor_every": Range(lo=0, fix="Fix: 0 (off) or a number of steps, e.g. 100."),
    "monitor_images": Range(lo=2, fix="Fix: e.g. 1000 (train images for the kNN bank, and as many test images)."),
    "probe_train_fraction": Range(lo=0, hi=1, lo_open=True, fix="Fix: e.g. 0.1 for 10%, 1.0 for all."),
    "probe_test_fraction": Range(lo=0, hi=1, lo_open=True, fix="Fix: e.g. 0.2 for a quick look, 1.0 for all."),
    **dict.fromkeys(("student_size", "regressor_width", "select_images", "select_val_images", "select_epochs",
                     "select_label_free_images", "steps", "batch_size", "grad_accum_steps", "log_every",
                     "checkpoint_every", "keep_checkpoints", "probe_epochs", "knn_k", "min_image_side"), Range(lo=1)),
}

def check_ranges(recipe: Recipe, source: str = "recipe") -> None:
    """Check every field of `RANGES` on ``recipe`` (types already checked) and that some loss weight is > 0.

    Raises:
        ValueError: ``'{source}: {key} must be {range}, got {value}. Fix: ...'`` for the first bad value.
    """
    fields_ = recipe_fields()
    for key, rng in RANGES.items():
        value = getattr(recipe, key)
        if value is None:
            continue  # a type check let it through: the field is Optional
        valid = rng.describe()
        if rng.hi is None and not rng.values and fields_[key] not in (int, Optional[int], Union[int, str]):
            # floats, lists of floats
            valid += " and finite"
        if rng.lengths:
            ok = isinstance(value, list) and len(value) in rng.lengths and all(map(rng.contains, value))
            valid = f"{' or '.join(map(str, rng.lengths))} numbers {valid}"
        else:
            ok = rng.contains(value)
        if not ok:
            null = " (or null)" if type(None) in typing.get_args(fields_[key]) else ""
            default = getattr(Recipe, key, None)
            fix = rng.fix or f"Fix: e.g. {default}."
            raise ValueError(f"{source}: {key} must be {valid}{null}, got {value!r}. {fix}")
    if recipe.mse_weight == recipe.at_weight == recipe.cos_weight == 0:
        raise ValueError(f"{source}: mse_weight, at_weight and cos_weight are all 0, so the loss is 0 and nothing is "
                         f"learned. Fix: set mse_weight: 1.0 and at_weight: 10.0 (the defaults, DreamTeacher's loss).")


def _warn_schedule(recipe: Recipe, source: str) -> None:
    """Log a warning for values that are valid but almost certainly not meant (``distill.config`` logger)."""
    if recipe.warmup_steps >= recipe.steps:
        _logger.warning("%s: warmup_steps %d >= steps %d: the whole run is warmup (the learning rate ramps up to lr "
                        "and never decays). Fix: warmup_steps a few percent of steps, e.g. %d.", source,
                        recipe.warmup_steps, recipe.steps, recipe.steps // 20)
    if recipe.checkpoint_every > recipe.steps:
        _logger.warning("%s: checkpoint_every %d > steps %d: no checkpoint before the last step, so a killed run "
                        "restarts from scratch. Fix: checkpoint_every <= steps, e.g. %d.", source,
                        recipe.checkpoint_every, recipe.steps, max(1, recipe.steps // 4))


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


def make_recipe(values: dict, source: str = "recipe", warn: bool = True) -> Recipe:
    """Build a `Recipe` from a dict, checking keys, types, choices and ranges (`RANGES`); logs a
    warning (``distill.config`` logger) when ``warmup_steps >= steps`` or ``checkpoint_every > steps`` unless
    ``warn`` is false (a run's own config.yaml read back).

    Raises:
        ValueError: ``'{source}: ...'`` naming the key, the value, what is valid and the fix.
    """
    fields_ = recipe_fields()
    values = dict(values)
    if values.get("mixed_precision") is False:  # YAML 1.1 reads an unquoted `no` as false (Accelerate's "no")
        values["mixed_precision"] = "no"
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
    if r.mixed_precision is not None:  # null: Accelerate's own configuration (accelerate config, launch, env)
        _check_choice("mixed_precision", r.mixed_precision, MIXED_PRECISION)
    _check_choice("at_mode", r.at_mode, AT_MODES)
    _check_choice("on_nonfinite", r.on_nonfinite, ON_NONFINITE)
    _check_choice("teacher_dtype", r.teacher_dtype, TEACHER_DTYPES)
    _check_choice("latent_sample", r.latent_sample, LATENT_SAMPLE)
    for key, choices in (("dataset", DATASETS), ("image_resize", IMAGE_RESIZE), ("data_hash", DATA_HASH)):
        _check_choice(key, getattr(r, key), choices)
    check_ranges(r, source)
    if r.image_size is not None and r.image_size < r.min_image_side:  # every image would be degenerate
        raise ValueError(f"{source}: image_size {r.image_size} is below min_image_side {r.min_image_side}: every image "
                         f"would be decoded at {r.image_size}x{r.image_size} px, under the side below which the run "
                         f"calls an image degenerate. Fix: image_size >= {r.min_image_side} (e.g. 32; null keeps the "
                         f"first image's size), or lower min_image_side.")
    if warn:
        _warn_schedule(r, source)
    return r


def load_recipe(path: Union[str, Path], overrides: Optional[dict] = None) -> Recipe:
    """Read a YAML recipe and apply ``overrides`` (e.g. from ``--set key=value``).

    Raises:
        FileNotFoundError: no such file (the message lists the bundled recipes).
        ValueError: the file is not UTF-8, empty, not a mapping, not valid YAML, gives a key twice, or a value is
            invalid (see `make_recipe`).
    """
    path = Path(path)
    if not path.is_file():
        bundled = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
        raise FileNotFoundError(f"recipe '{path}' not found. Recipes in the repository's recipes/: {', '.join(bundled)}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"recipe '{path}' is not UTF-8 text ({e.reason} at byte offset {e.start}). Fix: save it as "
                         f"UTF-8 (YAML files are UTF-8).") from None
    values = yaml_load(text, source=f"recipe '{path}'")
    if values is None:
        raise ValueError(f"recipe '{path}' is empty (or only comments); an empty recipe would silently train "
                         f"with every default. Fix: start from recipes/quickstart.yaml (in the repository) and keep "
                         f"the keys you need.")
    if not isinstance(values, dict):
        raise ValueError(f"recipe '{path}' must be a YAML mapping of key: value, got {type(values).__name__}.")
    values.update(overrides or {})
    return make_recipe(values, source=f"recipe '{path}'")


def save_recipe(recipe: Recipe, path: Union[str, Path], extra: Optional[dict] = None) -> None:
    """Write the recipe as YAML (atomically), with ``extra`` under ``_resolved`` (the values a run resolved)."""
    data = recipe.to_dict()
    if extra:
        data = {**data, "_resolved": extra}
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
