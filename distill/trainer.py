"""Feature distillation on Accelerate: teacher features -> student + regressor, MSE on whitened targets + AT.

The loop reads in one screen (:func:`train`); the pieces are built by ``build_*`` functions that the probe, the
export and the tests reuse. A run directory holds ``config.yaml`` (the resolved recipe), ``metrics.csv`` (loss
terms per logged step) and ``checkpoint-{step}/`` directories written atomically (temporary name, then rename).
"""
from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .augment import build_augment
from .config import Recipe, save_recipe
from .data import build_dataset, collate, dataset_mean_std, to_student, to_teacher, to_unit
from .losses import feature_distillation_loss
from .regressor import FeatureRegressor
from .student import DistillModel, Student
from .policy import TimestepPolicy, entropy_weight, per_sample_grad_variance
from .teacher import DiffusionTeacher, load_teacher

_logger = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RunExistsError(FileExistsError):
    """The output directory already holds a run."""


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or Inf."""


# ----------------------------------------------------------------------------------------------- builders
def build_train_data(recipe: Recipe, split: str = "train") -> tuple[Dataset, int]:
    """The dataset of the recipe and its number of channels."""
    channels = recipe.image_channels or (1 if recipe.dataset == "fashion-mnist" else 3)
    ds = build_dataset(recipe.dataset, recipe.data_root, split, channels=channels)
    return ds, channels


def resolve_mean_std(recipe: Recipe, ds: Dataset) -> tuple[list[float], list[float]]:
    if recipe.mean is not None and recipe.std is not None:
        if len(recipe.mean) != 3 or len(recipe.std) != 3:
            raise ValueError(f"mean/std need 3 values (the student takes RGB), got mean={recipe.mean} std={recipe.std}.")
        return [float(v) for v in recipe.mean], [float(v) for v in recipe.std]
    mean, std = dataset_mean_std(ds)
    return [round(v, 4) for v in mean], [round(v, 4) for v in std]


def build_teacher(recipe: Recipe, data_channels: int, timesteps: Optional[list] = None) -> DiffusionTeacher:
    """The recipe's teacher at ``timesteps`` (default: the recipe's list; a mode such as ``policy`` needs them)."""
    timesteps = recipe.timesteps if timesteps is None else timesteps
    if isinstance(timesteps, str):
        raise ValueError(f"timesteps: {timesteps} is resolved by distill.train; pass explicit timesteps to "
                         f"build_teacher.")
    teacher = load_teacher(recipe.teacher, recipe.teacher_blocks, timesteps,
                           torch_dtype=_DTYPES[recipe.teacher_dtype], vae_dtype=recipe.vae_dtype,
                           prompt_embedding=recipe.prompt_embedding, resolution=recipe.teacher_resolution)
    check_channels(data_channels, teacher.in_channels, recipe.teacher)
    return teacher


def check_channels(data_channels: int, teacher_channels: int, teacher_name) -> None:
    """Grayscale data feeds an RGB teacher (replicated); any other mismatch is an error."""
    if data_channels == teacher_channels or (data_channels == 1 and teacher_channels == 3):
        return
    raise ValueError(
        f"teacher {teacher_name!r} takes in_channels={teacher_channels} images but the dataset has "
        f"{data_channels} channel(s); valid: a teacher with in_channels={data_channels} (or 3 for grayscale data). "
        f"Fix: use a teacher trained on {data_channels}-channel images, or set image_channels: {teacher_channels} "
        f"for an image-folder dataset."
    )


@dataclass
class TargetLayout:
    """Which teacher features form each regression target: ``groups[i]`` keys are concatenated on channels."""

    groups: list  # [[key, ...], ...]
    targets: list  # [(channels, (H, W)), ...] one per group: what the regressor predicts


def target_layout(recipe: Recipe, teacher: DiffusionTeacher, policy: bool = False) -> TargetLayout:
    """One target per (block, timestep) (``multi_timestep: heads``), one per block with the timesteps concatenated
    (``concat``), or one per block at the per-image sampled timestep (``policy``, keys ``'<block>@t*'``)."""
    first = {}
    for f in teacher.feature_info:
        first.setdefault(f.block, f)
    if policy:
        return TargetLayout([[f"{b}@t*"] for b in teacher.blocks],
                            [(first[b].num_chs, first[b].size) for b in teacher.blocks])
    if recipe.multi_timestep == "concat" and len(teacher.timesteps) > 1:
        K = len(teacher.timesteps)
        return TargetLayout([[f"{b}@t{t}" for t in teacher.timesteps] for b in teacher.blocks],
                            [(K * first[b].num_chs, first[b].size) for b in teacher.blocks])
    return TargetLayout([[f.key] for f in teacher.feature_info], [(f.num_chs, f.size) for f in teacher.feature_info])


def build_model(recipe: Recipe, teacher: DiffusionTeacher, layout: Optional[TargetLayout] = None) -> DistillModel:
    student = Student(recipe.student, recipe.student_size, recipe.student_indices, recipe.student_kwargs)
    targets = (layout or target_layout(recipe, teacher)).targets
    regressor = FeatureRegressor(student.channels, targets, sources=recipe.sources, width=recipe.regressor_width,
                                 use_ppm=recipe.use_ppm, level_sizes=student.sizes)
    return DistillModel(student, regressor)


def build_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory (no weight decay on norms and biases; LAMB, AdamW or SGD)."""
    from timm.optim import create_optimizer_v2

    kwargs = {"momentum": recipe.momentum} if recipe.optimizer == "sgd" else {}
    return create_optimizer_v2(model, opt=recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay, **kwargs)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, min(recipe.warmup_steps, recipe.steps), recipe.steps)


def _collate_for(ds: Dataset):
    from .cache import IndexedDataset, collate_indexed

    return collate_indexed if isinstance(ds, IndexedDataset) else collate


def _loader(ds: Dataset, recipe: Recipe, generator: torch.Generator) -> DataLoader:
    if recipe.batch_size > len(ds):
        raise ValueError(
            f"batch_size={recipe.batch_size} is larger than the dataset ({len(ds)} images); use batch_size <= {len(ds)}."
        )
    # The loader's own generator too: otherwise creating an iterator draws a seed from the global RNG, which
    # would shift augmentation and noise after a resume.
    return DataLoader(ds, batch_size=recipe.batch_size, sampler=RandomSampler(ds, generator=generator),
                      generator=generator, drop_last=True, collate_fn=_collate_for(ds), num_workers=recipe.num_workers,
                      persistent_workers=False)


# ----------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those that were renamed into place), oldest first."""
    out = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = _CKPT_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    ckpts = list_checkpoints(Path(run_dir))
    return ckpts[-1][1] if ckpts else None


def _save_checkpoint(accelerator, run_dir: Path, step: int, keep: int, model=None) -> Path:
    final = run_dir / f"checkpoint-{step}"
    if model is not None and accelerator.num_processes > 1:
        # DDP broadcasts buffers only at the start of a forward, so BN running stats end rank-local: average them
        # (timm's distribute_bn) so every rank, and the checkpoint, hold the same statistics.
        from timm.utils import distribute_bn

        distribute_bn(model, accelerator.num_processes, reduce=True)
    tmp = run_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic: resume never sees a half-written checkpoint
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint file holds a pickle that would import or run code."""


def load_checkpoint(accelerator, ckpt: Path) -> int:
    """Restore model, optimizer and RNG states; every pickle is read with ``torch.load(weights_only=True)``."""
    import pickle

    unexpected = sorted(p.name for p in ckpt.glob("custom_checkpoint_*"))
    if unexpected:
        raise UntrustedCheckpointError(
            f"checkpoint '{ckpt}' holds {unexpected}, which Accelerate would unpickle with weights_only=False "
            f"(able to run code); distill never writes them. Delete them if you trust the checkpoint's source."
        )
    from accelerate.utils.other import load as accelerate_load

    try:
        # Accelerate ignores a random_states file it cannot read (resume would silently lose determinism):
        # read them first with the same weights_only loader, so a bad one is an error.
        for rng_file in sorted(ckpt.glob("random_states_*.pkl")):
            accelerate_load(rng_file)
        accelerator.load_state(str(ckpt))  # weights_only=True for optimizer.bin and random_states_*.pkl
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpointError(
            f"refused to load checkpoint '{ckpt}': a file in it is a pickle that would import or call code, which "
            f"torch.load(weights_only=True) does not allow. Only resume checkpoints you wrote. ({str(e)[:300]})"
        ) from e
    return int(_CKPT_RE.match(ckpt.name).group(1))


# ----------------------------------------------------------------------------------------------- training
@dataclass
class Batch:
    teacher_x: torch.Tensor  # (B, C_t, S_t, S_t) in [-1, 1]
    student_x: torch.Tensor  # (B, 3, S_s, S_s) normalised


def make_views(images: torch.Tensor, augment, teacher: DiffusionTeacher, student_size: int, mean, std) -> Batch:
    """One augmented view of a uint8 batch, converted for the teacher and for the student."""
    x = to_unit(images)  # (B, C, H, W) in [0, 1]
    x = augment(x)
    return Batch(to_teacher(x, teacher.in_channels, teacher.sample_size), to_student(x, student_size, mean, std))


def train_step(model, teacher: DiffusionTeacher, batch: Batch, keys, recipe: Recipe,
               accelerator, policy=None, labels: Optional[torch.Tensor] = None, entropy_weight: float = 0.0,
               extras: Optional[dict] = None, targets: Optional[list] = None) -> dict[str, torch.Tensor]:
    """Forward + backward of one micro-batch; returns the loss terms (not yet synchronised).

    ``keys``: a :class:`TargetLayout` or a list of feature keys (one target each). ``targets`` given (a feature
    cache) skips the teacher. With a ``policy``, each image's
    timestep is sampled from it, its features are the targets, and the policy + reward head get their own backward
    (``labels`` needed); the sampled actions and per-sample rewards go to ``extras`` when given.
    """
    groups = keys.groups if isinstance(keys, TargetLayout) else [[k] for k in keys]
    if targets is None:
        if policy is None:
            feats = teacher(batch.teacher_x)
        else:
            actions, t = accelerator.unwrap_model(policy).sample(batch.teacher_x)  # (B,), (B,)
            feats = teacher(batch.teacher_x, timesteps=t)  # keys '<block>@t*': each image at its own timestep
        targets = [(feats[g[0]] if len(g) == 1 else torch.cat([feats[k] for k in g], dim=1)).float()
                   for g in groups]  # each (B, C_k, H_k, W_k)
    else:  # from a feature cache
        targets = [t.float() for t in targets]
    preds = model(batch.student_x)
    losses = feature_distillation_loss(preds, targets, mse_weight=recipe.mse_weight, at_weight=recipe.at_weight,
                                       cos_weight=recipe.cos_weight, at_mode=recipe.at_mode)
    accelerator.backward(losses["total"])
    if policy is not None:
        pooled = torch.cat([feats[k].float().mean((2, 3)) for g in groups for k in g], dim=1)  # (B, sum C)
        out = policy(batch.teacher_x, actions, pooled, labels, entropy_weight)
        accelerator.backward(out["loss"])
        losses.update({"policy_loss": out["policy_loss"], "head_ce": out["head_ce"], "reward": out["reward"],
                       "entropy": out["entropy"]})
        if extras is not None:
            extras.update(actions=actions, pooled=pooled.detach(), labels=labels, x=batch.teacher_x)
    return losses


def nonfinite_terms(losses: dict[str, torch.Tensor], accelerator) -> list[str]:
    """Names of the loss terms that are NaN/Inf on any process (one host sync per call)."""
    vals = torch.stack([v.detach().float() for v in losses.values()])
    flag = (~torch.isfinite(vals)).any().float()
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "max")
    if not flag.item():
        return []
    return [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()] or ["(another process)"]


def _epoch_batches(ds, recipe: Recipe, accelerator, start_step: int) -> Iterator:
    """Infinite stream of batches; epoch ``e`` is shuffled with seed ``recipe.seed + e`` so resume repeats it."""
    per_step = recipe.grad_accum_steps
    g = torch.Generator()
    loader = accelerator.prepare_data_loader(_loader(ds, recipe, g), device_placement=True)
    n = len(loader)
    micro = start_step * per_step
    epoch, skip = divmod(micro, n)
    while True:
        g.manual_seed(recipe.seed * 100003 + epoch)
        it = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in it:
            yield batch
        epoch, skip = epoch + 1, 0


def _truncate_log(path: Path, last_step: int) -> None:
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [ln for ln in lines[1:] if ln.split(",", 1)[0].isdigit() and int(ln.split(",", 1)[0]) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def resolve_timesteps(recipe: Recipe, ds, channels: int, run_dir: Path, accelerator, progress: bool = True):
    """The timesteps a run uses and how they were chosen: ``(timesteps, selection info or None)``.

    A list is used as is. ``auto-grid`` / ``auto-label-free`` run the selection once (main process) into
    ``run_dir/selection/`` and reuse it on resume. ``policy`` returns the candidates (checked to have labels).
    """
    import json

    mode = recipe.timesteps
    if isinstance(mode, list):
        return list(mode), None
    if mode == "policy":
        check_labelled(ds, "timesteps: policy", "the policy's reward is a classifier's cross-entropy on teacher "
                       "features", "use labelled data, or timesteps: auto-label-free or a fixed list such as [11]")
        return list(recipe.timestep_candidates), {"method": "policy", "candidates": list(recipe.timestep_candidates)}
    if mode == "auto-grid":
        check_labelled(ds, "timesteps: auto-grid", "the grid trains linear probes", "use timesteps: auto-label-free")
    sel_dir = run_dir / "selection"
    path = sel_dir / "selection.json"
    if accelerator.is_main_process and not path.exists():
        from .select import auto_select_timestep

        res = auto_select_timestep(recipe, ds, channels, sel_dir, progress)
        accelerator.print(f"{mode}: timestep {res['timestep']} (scores per timestep {res['scores']}; "
                          f"{res['teacher_forwards']} teacher forwards, {res['seconds']} s); files in {sel_dir}")
    accelerator.wait_for_everyone()
    sel = json.loads(path.read_text())
    return [int(sel["timestep"])], sel


def check_labelled(ds, what: str, why: str, fix: str) -> None:
    from .data import dataset_labels

    labels = dataset_labels(ds)
    if labels.numel() == 0 or int(labels.min()) < 0:
        raise ValueError(f"{what} needs labels ({why}), but the training set has unlabelled images (label -1). "
                         f"Fix: {fix}.")


def build_policy(recipe: Recipe, teacher: DiffusionTeacher, ds) -> TimestepPolicy:
    """RepFusion policy over the teacher's timesteps (the candidates) with a reward head on pooled features."""
    from .data import dataset_labels

    first = {}
    for f in teacher.feature_info:
        first.setdefault(f.block, f)
    return TimestepPolicy(teacher.timesteps, teacher.in_channels, sum(first[b].num_chs for b in teacher.blocks),
                          int(dataset_labels(ds).max()) + 1, baseline=recipe.policy_baseline)


class PolicyLog:
    """``policy.csv``: per logging interval, how often each candidate was sampled, reward, entropy and the
    variance of the per-sample policy gradient with no baseline, the leave-one-out batch mean and the EMA."""

    def __init__(self, path: Path, candidates: list, start: int, accelerator):
        self.path, self.candidates, self.accelerator = path, list(candidates), accelerator
        self.counts = torch.zeros(len(candidates), dtype=torch.long, device=accelerator.device)
        self.total = torch.zeros(len(candidates), dtype=torch.long)
        self.f = None
        if accelerator.is_main_process:
            if start and path.exists():
                _truncate_log(path, start)
            new = start == 0 or not path.exists()
            self.f = open(path, "w" if new else "a", newline="")
            self.w = csv.writer(self.f)
            if new:
                self.w.writerow(["step", "entropy_weight", "reward", "entropy", "head_ce", "gradvar_none",
                                 "gradvar_batch_mean", "gradvar_ema"] + [f"n_t{t}" for t in self.candidates])

    def count(self, actions: torch.Tensor) -> None:
        self.counts += torch.bincount(actions, minlength=len(self.candidates))

    def write(self, step: int, pol: TimestepPolicy, extras: dict, terms: dict, ew: float) -> None:
        counts = self.counts.clone()
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, "sum")
        counts = counts.cpu()
        self.counts.zero_()
        self.total += counts
        if self.f is None:
            return
        with torch.no_grad():
            r = -torch.nn.functional.cross_entropy(pol.head(extras["pooled"]), extras["labels"], reduction="none")
        n = r.shape[0]
        b_ema = pol.baseline_ema if bool(pol.baseline_initialised) else r.mean()
        gv = per_sample_grad_variance(pol.net, extras["x"], extras["actions"], {
            "none": r, "batch_mean": r - (r.sum() - r) / max(n - 1, 1), "ema": r - b_ema})
        self.w.writerow([step, round(ew, 5), round(terms.get("reward", 0.0), 5), round(terms.get("entropy", 0.0), 5),
                         round(terms.get("head_ce", 0.0), 5), f"{gv['none']:.6g}", f"{gv['batch_mean']:.6g}",
                         f"{gv['ema']:.6g}"] + counts.tolist())
        self.f.flush()

    def close(self) -> None:
        if self.f is None:
            return
        self.f.close()
        self.f = None
        try:  # the histogram plot; the CSV holds the same numbers
            from .plots import policy_histogram

            rows = list(csv.DictReader(open(self.path)))
            if rows:
                policy_histogram([int(r["step"]) for r in rows],
                                 [[int(r[f"n_t{t}"]) for t in self.candidates] for r in rows],
                                 self.candidates, self.path.with_name("policy_histogram.png"))
        except ImportError as e:  # matplotlib missing
            _logger.warning("policy histogram not plotted: %s", e)

    def summary(self) -> dict:
        import statistics

        rows = list(csv.DictReader(open(self.path))) if self.path.exists() else []
        tot = [sum(int(r[f"n_t{t}"]) for r in rows) for t in self.candidates]
        out = {"candidates": self.candidates, "samples_per_timestep": dict(zip(map(str, self.candidates), tot)),
               "histogram_png": str(self.path.with_name("policy_histogram.png"))}
        vs = [(float(r["gradvar_none"]), float(r["gradvar_batch_mean"]), float(r["gradvar_ema"])) for r in rows]
        vs = [v for v in vs if v[0] > 0]
        if vs:
            out["gradvar_ratio_batch_mean_over_none_median"] = round(statistics.median(b / a for a, b, _ in vs), 4)
            out["gradvar_ratio_ema_over_none_median"] = round(statistics.median(c / a for a, _, c in vs), 4)
        return out


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Optional[Path]:
    """Refuse to mix runs: an existing run is resumed (``resume``), replaced (``overwrite``) or an error."""
    has_run = run_dir.is_dir() and ((run_dir / "config.yaml").exists() or list_checkpoints(run_dir))
    if resume:
        for stale in run_dir.glob(".tmp-checkpoint-*"):  # a write that was killed: never a checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            _logger.warning("--resume: no checkpoint in '%s'; starting from step 0", run_dir)
        return ckpt
    if has_run:
        if not overwrite:
            raise RunExistsError(
                f"output directory '{run_dir}' already holds a run; pass --resume to continue it, --overwrite to "
                f"replace it, or choose another --output-dir."
            )
        shutil.rmtree(run_dir)
    return None


def train(recipe: Recipe, output_dir: str, resume: bool = False, overwrite: bool = False,
          accelerator=None, progress: bool = True) -> dict:
    """Distill ``recipe.teacher`` into ``recipe.student``; returns a summary dict (also in ``summary.json``)."""
    import json

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm

    run_dir = Path(output_dir)
    if accelerator is None:
        # AcceleratorState is a process-wide singleton that refuses a second Accelerator with another precision
        # (a notebook running two recipes); the process group (PartialState) is kept.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = accelerator or Accelerator(
        mixed_precision=recipe.mixed_precision, gradient_accumulation_steps=recipe.grad_accum_steps,
        log_with=recipe.log_with, project_dir=str(run_dir),
        # ViT students leave their final norm unused in forward_intermediates
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    ckpt = prepare_run_dir(run_dir, resume, overwrite) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process and resume:
        ckpt = latest_checkpoint(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(recipe.seed)

    ds, channels = build_train_data(recipe)
    mean, std = resolve_mean_std(recipe, ds)
    use_policy = recipe.timesteps == "policy"
    timesteps, selection = resolve_timesteps(recipe, ds, channels, run_dir, accelerator, progress)
    teacher = build_teacher(recipe, channels, [0] if use_policy else timesteps)
    if use_policy:
        from .select import check_candidates

        teacher.set_timesteps(check_candidates(timesteps, teacher.num_train_timesteps))
    cache = None
    if recipe.feature_cache:  # targets read from `distill extract`'s files; the key (weights, data, ...) is checked
        from .cache import open_for_recipe

        cache = open_for_recipe(recipe, ds, teacher, channels)
    else:
        teacher = teacher.to(accelerator.device)  # never prepared: frozen, no DDP
    layout = target_layout(recipe, teacher, policy=use_policy)
    model = build_model(recipe, teacher, layout)
    optimizer = build_optimizer(recipe, model)
    scheduler = build_scheduler(recipe, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = policy_opt = None
    if use_policy:  # its own model + optimizer: checkpointed as model_1 / optimizer_1 (safetensors / weights only)
        policy = build_policy(recipe, teacher, ds)
        policy_opt = torch.optim.Adam(policy.parameters(), lr=recipe.policy_lr)
        policy, policy_opt = accelerator.prepare(policy, policy_opt)
    entropy_steps = recipe.policy_entropy_steps if recipe.policy_entropy_steps is not None else recipe.steps // 2
    # The LR schedule is a function of the step: it is not checkpointed (Accelerate unpickles custom objects with
    # weights_only=False, which would run code from a stranger's checkpoint) but stepped forward on resume.
    augment = build_augment(recipe.augment, ds[0][0].shape[-1]).to(accelerator.device)

    resolved = {
        "mean": mean, "std": std, "data_channels": channels,
        "teacher_features": [vars(f) | {"size": list(f.size)} for f in teacher.feature_info],
        "teacher_in_channels": teacher.in_channels, "teacher_sample_size": teacher.sample_size,
        "student_features": [vars(f) | {"size": list(f.size)} for f in accelerator.unwrap_model(model).student.feature_info],
        "sources": accelerator.unwrap_model(model).regressor.sources,
        "num_processes": accelerator.num_processes,
        "timesteps_used": {"policy": teacher.timesteps} if use_policy else teacher.timesteps,
        "selection": selection,
        "regressor_targets": [[c, list(size)] for c, size in layout.targets],
        "target_groups": layout.groups,
        "feature_cache": {"path": str(cache.path), "key": cache.key} if cache is not None else None,
    }
    if accelerator.is_main_process:
        save_recipe(recipe, run_dir / "config.yaml", resolved)

    start = 0
    if ckpt is not None:
        start = load_checkpoint(accelerator, ckpt)
        import warnings

        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start):
                scheduler.step()
        accelerator.print(f"resumed from {ckpt} (step {start})")
    if recipe.log_with:
        accelerator.init_trackers("distill", config={k: v for k, v in recipe.to_dict().items()
                                                     if isinstance(v, (int, float, str, bool))})

    if cache is not None:
        from .cache import IndexedDataset

        batches = _epoch_batches(IndexedDataset(ds), recipe, accelerator, start)
    else:
        batches = _epoch_batches(ds, recipe, accelerator, start)
    metrics_path = run_dir / "metrics.csv"
    policy_log = PolicyLog(run_dir / "policy.csv", teacher.timesteps, start, accelerator) if use_policy else None
    if start and accelerator.is_main_process and metrics_path.exists():
        _truncate_log(metrics_path, start)  # rows logged after the checkpoint were lost with the killed run
    new_file = not metrics_path.exists() or start == 0
    log_f = open(metrics_path, "w" if start == 0 else "a", newline="") if accelerator.is_main_process else None
    writer = csv.writer(log_f) if log_f else None
    bar = tqdm(total=recipe.steps, initial=start, desc="distill", disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    model.train()
    t0, seen, last, skipped = time.time(), 0, {}, 0
    try:
        for step in range(start + 1, recipe.steps + 1):
            sums: dict[str, float] = {}
            bad: list[str] = []
            for micro in range(recipe.grad_accum_steps):
                images, labels, *rest = next(batches)
                targets = None
                if cache is not None:  # no augmentation (checked): the cached features are of the clean image
                    draws = cache.draw_ids(rest[0], (step - 1) * recipe.grad_accum_steps + micro, recipe.seed)
                    targets = cache.targets(rest[0], draws, layout.groups, device=accelerator.device)
                    batch = Batch(None, to_student(to_unit(images), recipe.student_size, mean, std))
                else:
                    batch = make_views(images, augment, teacher, recipe.student_size, mean, std)
                extras: dict = {}
                with accelerator.accumulate(*([model] if policy is None else [model, policy])):
                    losses = train_step(model, teacher, batch, layout, recipe, accelerator, policy=policy,
                                        labels=labels, extras=extras, targets=targets,
                                        entropy_weight=entropy_weight(step - 1, recipe.policy_entropy, entropy_steps))
                    bad = bad or nonfinite_terms(losses, accelerator)
                    grad_norm = None
                    if accelerator.sync_gradients and recipe.grad_clip > 0 and not bad:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                        if not torch.isfinite(grad_norm):
                            bad = ["grad_norm"]
                    if bad and recipe.on_nonfinite == "error":
                        raise NonFiniteLossError(
                            f"non-finite loss at step {step}: {', '.join(bad)} "
                            f"({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}); no update was "
                            f"applied and the last good checkpoint in '{run_dir}' is kept "
                            f"({latest_checkpoint(run_dir) or 'none yet'}). Lower lr, check the data, or set "
                            f"on_nonfinite: skip to drop such batches."
                        )
                    if not bad:
                        optimizer.step()
                        if policy_opt is not None:
                            policy_opt.step()
                    optimizer.zero_grad(set_to_none=True)
                    if policy_opt is not None:
                        policy_opt.zero_grad(set_to_none=True)
                if policy_log is not None and not bad:
                    policy_log.count(extras["actions"])
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach()
                seen += images.shape[0] * accelerator.num_processes
            if bad:
                skipped += 1
                _logger.warning("step %d: non-finite %s; batch skipped (%d so far)", step, ", ".join(bad), skipped)
                sums = {}
            scheduler.step()
            if sums and (step % recipe.log_every == 0 or step == recipe.steps or step == start + 1):
                terms = {k: accelerator.reduce(v, "mean").item() / recipe.grad_accum_steps for k, v in sums.items()}
                last = terms
                row = {"step": step, **{k: round(v, 6) for k, v in terms.items()},
                       "lr": scheduler.get_last_lr()[0],
                       "grad_norm": round(float(grad_norm), 4) if grad_norm is not None else "",
                       "img_per_s": round(seen / (time.time() - t0), 1), "skipped": skipped}
                if writer:
                    if new_file:
                        writer.writerow(list(row))
                        new_file = False
                    writer.writerow(list(row.values()))
                    log_f.flush()
                if recipe.log_with:
                    accelerator.log({k: v for k, v in row.items() if isinstance(v, float)}, step=step)
                bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items() if k in ("total", "mse", "at", "reward")})
                if policy_log is not None and extras:
                    policy_log.write(step, accelerator.unwrap_model(policy), extras, terms,
                                     entropy_weight(step - 1, recipe.policy_entropy, entropy_steps))
            bar.update(1)
            if step % recipe.checkpoint_every == 0 or step == recipe.steps:
                _save_checkpoint(accelerator, run_dir, step, recipe.keep_checkpoints, model)
    finally:
        bar.close()
        if log_f:
            log_f.close()
        if policy_log is not None:
            policy_log.close()
        if recipe.log_with:
            accelerator.end_training()
    summary = {"steps": recipe.steps, "final_losses": last, "skipped_steps": skipped, "seconds": round(time.time() - t0, 1),
               "img_per_s": round(seen / max(time.time() - t0, 1e-9), 1), "run_dir": str(run_dir),
               "checkpoint": str(latest_checkpoint(run_dir))}
    summary["timesteps_used"] = resolved["timesteps_used"]
    if policy_log is not None and accelerator.is_main_process:
        summary["policy"] = policy_log.summary()
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_trained(run_dir: str, checkpoint: Optional[str] = None, map_location="cpu") -> tuple[DistillModel, Recipe, dict]:
    """Rebuild student + regressor of a run and load a checkpoint's weights (default: the latest)."""
    import yaml
    from safetensors.torch import load_file

    from .config import make_recipe

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"'{run}' is not a run directory (no config.yaml); give the --output-dir of `distill train`.")
    data = yaml.safe_load((run / "config.yaml").read_text())
    resolved = data.pop("_resolved", {})
    recipe = make_recipe(data, source=f"'{run / 'config.yaml'}'")
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run)
    if ckpt is None or not (ckpt / "model.safetensors").is_file():
        raise FileNotFoundError(f"no complete checkpoint in '{run}'; train first (or pass a checkpoint directory).")
    student = Student(recipe.student, recipe.student_size, recipe.student_indices, recipe.student_kwargs)
    targets = ([(c, tuple(size)) for c, size in resolved["regressor_targets"]] if "regressor_targets" in resolved
               else [(f["num_chs"], tuple(f["size"])) for f in resolved["teacher_features"]])
    regressor = FeatureRegressor(student.channels, targets, sources=resolved["sources"], width=recipe.regressor_width,
                                 use_ppm=recipe.use_ppm)
    model = DistillModel(student, regressor)
    model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(map_location)), strict=True)
    resolved["checkpoint"] = str(ckpt)
    return model.eval(), recipe, resolved
