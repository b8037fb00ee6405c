"""Recipe wiring: the one place a `Recipe` is turned into objects.

Building blocks (data, teacher, student, regressor, losses, policy, optim) take plain arguments and know nothing
of recipes; every ``build_*`` here reads the recipe's keys and calls them. The trainer, the feature cache, the
timestep selection and the benchmarks build their pieces here, so they are built the same way everywhere.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .optim import build_optimizer as make_optimizer
from .optim import build_scheduler as make_scheduler
from .config import Recipe
from .data import IndexedDataset, build_dataset, collate, collate_indexed, dataset_labels, dataset_mean_std
from .losses import feature_distillation_loss
from .policy import TimestepPolicy
from .regressor import FeatureRegressor
from .student import DistillModel, Student
from .teacher import DiffusionTeacher, feature_key, load_teacher
from .vocab import dataset_channels


# ----------------------------------------------------------------------------------------------- data
def build_train_data(recipe: Recipe, split: str = "train", classes=None) -> tuple[Dataset, int]:
    """The recipe's dataset split and its number of channels (1 for Fashion-MNIST, else ``image_channels`` or 3).

    File datasets decode every image at ``image_size`` (``image_resize``; null: the first image's size) and skip
    images with a side below ``min_image_side`` with a warning naming the file. ``classes``: the training split's
    class names, for another split: its labels are paired with them by name (see `distill.data.build_dataset`).

    Raises:
        ValueError / DatasetNotFoundError: an unknown dataset or missing files (the message names the fix); with
            ``classes``, a class the training split lacks.
    """
    channels = dataset_channels(recipe.dataset, recipe.image_channels)
    ds = build_dataset(recipe.dataset, recipe.data_root, split, channels=channels, size=recipe.image_size,
                       resize=recipe.image_resize, min_side=recipe.min_image_side, classes=classes)
    return ds, channels


def resolve_mean_std(recipe: Recipe, ds: Dataset) -> tuple[list[float], list[float]]:
    """The student's normalisation (3 values each, [0, 1] units): the recipe's (one value is used for all three
    channels), else measured on ``ds`` (rounded to 4 decimals).

    Raises:
        ValueError: the recipe gives only one of mean and std, or other than 1 or 3 values.
    """
    if (recipe.mean is None) != (recipe.std is None):
        raise ValueError(f"recipe gives {'mean' if recipe.std is None else 'std'} without "
                         f"{'std' if recipe.std is None else 'mean'} (mean={recipe.mean}, std={recipe.std}); give both "
                         f"(1 or 3 values each, [0, 1] units), or neither to measure them on the data.")
    if recipe.mean is not None:
        if len(recipe.mean) not in (1, 3) or len(recipe.std) not in (1, 3):
            raise ValueError(f"mean/std take 1 or 3 values (the student takes RGB), got mean={recipe.mean} "
                             f"std={recipe.std}.")
        return [float(v) for v in recipe.mean] * (3 // len(recipe.mean)), \
            [float(v) for v in recipe.std] * (3 // len(recipe.std))
    mean, std = dataset_mean_std(ds)
    return [round(v, 4) for v in mean], [round(v, 4) for v in std]


def loader_workers(num_workers, processes: int = 1, cpus: Optional[int] = None) -> int:
    """DataLoader processes for a recipe's ``num_workers``: the number itself, or for ``auto`` the CPUs this process
    may use divided among the ``processes`` of this machine, minus one for the training process, at most 8
    (timm's ``train.py`` default is 4; more rarely helps a decoder-bound image loader); 0 on a 1-CPU share.
    ``cpus`` defaults to ``os.sched_getaffinity`` (what a scheduler granted), else ``os.cpu_count()``."""
    import os

    if num_workers != "auto":
        return int(num_workers)
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(1, processes) - 1))


def worker_ignores_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the training loader: its workers ignore SIGINT and SIGTERM. A Ctrl-C or a SIGTERM sent
    to every process of the job (``kill -TERM -PGID``, SLURM, systemd) then stops only the main process, which finishes
    the step, writes a checkpoint and shuts the workers down (`distill.trainer.batches.epoch_batches`); with
    torch's worker handler, a worker died by SIGTERM and the main process raised "DataLoader worker ... is killed by
    signal" wherever it was, the checkpoint included. A worker whose main process dies exits on its own (torch's
    worker watchdog)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(ds: Dataset, recipe: Recipe, generator: torch.Generator, processes: int = 1,
                 pin_memory: bool = False) -> DataLoader:
    """Shuffled loader of full batches (``drop_last``) whose order depends only on ``generator`` (the number of
    workers does not change the batches: the images are decoded, never augmented, in the workers). Workers are
    kept alive across epochs (``persistent_workers``), not restarted at each.
    ``processes``: training processes on this machine (for ``num_workers: auto``, `loader_workers`);
    ``pin_memory``: page-locked batches for a faster host-to-GPU copy (set on CUDA).

    Raises:
        ValueError: ``batch_size`` is larger than the dataset.
    """
    if recipe.batch_size > len(ds):
        raise ValueError(
            f"batch_size={recipe.batch_size} is larger than the dataset ({len(ds)} images); use batch_size <= {len(ds)}."
        )
    # The loader's own generator, apart from the sampler's: creating an iterator draws the workers' base seed from
    # it (from the global RNG without one, which would shift augmentation and noise after a resume). Apart, because
    # a persistent iterator draws it once, a fresh one at every epoch: shared, the draw would shift the sampler's
    # permutation of every epoch after the first, and a resumed run would see other batches than an uninterrupted
    # one. The workers only decode (no random numbers), so their seed cannot change a batch.
    workers = loader_workers(recipe.num_workers, processes)
    return DataLoader(ds, batch_size=recipe.batch_size, sampler=RandomSampler(ds, generator=generator),
                      generator=torch.Generator().manual_seed(recipe.seed), drop_last=True,
                      collate_fn=collate_indexed if isinstance(ds, IndexedDataset) else collate,
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory,
                      worker_init_fn=worker_ignores_stop_signals if workers > 0 else None)


def check_labelled(ds: Dataset, what: str, why: str, fix: str) -> None:
    """Raise ``ValueError`` naming ``what`` needs labels, ``why`` and the ``fix`` if ``ds`` has unlabelled images."""
    labels = dataset_labels(ds)
    if labels.numel() == 0 or int(labels.min()) < 0:
        raise ValueError(f"{what} needs labels ({why}), but the training set has unlabelled images (label -1). "
                         f"Fix: {fix}.")


# ----------------------------------------------------------------------------------------------- teacher
def check_channels(data_channels: int, teacher_channels: int, teacher_name) -> None:
    """Grayscale data feeds an RGB teacher (replicated); any other mismatch is an error.

    Raises:
        ValueError: naming both channel counts and the fix.
    """
    if data_channels == teacher_channels or (data_channels == 1 and teacher_channels == 3):
        return
    raise ValueError(
        f"teacher {teacher_name!r} takes in_channels={teacher_channels} images but the dataset has "
        f"{data_channels} channel(s); valid: a teacher with in_channels={data_channels} (or 3 for grayscale data). "
        f"Fix: use a teacher trained on {data_channels}-channel images, or set image_channels: {teacher_channels} "
        f"for an image-folder dataset."
    )


def build_teacher(recipe: Recipe, data_channels: int, timesteps: Optional[list] = None) -> DiffusionTeacher:
    """The recipe's teacher at ``timesteps`` (default: the recipe's list; a mode such as ``policy`` needs them), with
    the recipe's ``teacher_*`` keys (a ``python:module:factory`` teacher's kwargs, weights, input channels and noise
    schedule; see `distill.teacher.load_teacher`).

    Raises:
        ValueError: ``timesteps`` is still a mode, or the teacher's channels do not fit the data.
    """
    timesteps = recipe.timesteps if timesteps is None else timesteps
    if isinstance(timesteps, str):
        raise ValueError(f"timesteps: {timesteps} is resolved by distill.train; pass explicit timesteps to "
                         f"build_teacher.")
    extra = {"in_channels": recipe.teacher_in_channels} if recipe.teacher_in_channels is not None else {}
    teacher = load_teacher(recipe.teacher, recipe.teacher_blocks, timesteps,
                           torch_dtype=getattr(torch, recipe.teacher_dtype), vae_dtype=recipe.vae_dtype,
                           prompt_embedding=recipe.prompt_embedding, resolution=recipe.teacher_resolution,
                           teacher_kwargs=recipe.teacher_kwargs, weights=recipe.teacher_weights,
                           weights_prefix=recipe.teacher_weights_prefix, noise_schedule=recipe.teacher_scheduler,
                           **extra)
    check_channels(data_channels, teacher.in_channels, recipe.teacher)
    return teacher


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
        return TargetLayout([[feature_key(b, None)] for b in teacher.blocks],
                            [(first[b].num_chs, first[b].size) for b in teacher.blocks])
    if recipe.multi_timestep == "concat" and len(teacher.timesteps) > 1:
        K = len(teacher.timesteps)
        return TargetLayout([[feature_key(b, t) for t in teacher.timesteps] for b in teacher.blocks],
                            [(K * first[b].num_chs, first[b].size) for b in teacher.blocks])
    return TargetLayout([[f.key] for f in teacher.feature_info], [(f.num_chs, f.size) for f in teacher.feature_info])


# ----------------------------------------------------------------------------------------------- model
def build_student(recipe: Recipe) -> Student:
    """The recipe's timm student at ``student_size`` (``num_classes=0``, feature levels ``student_indices``)."""
    return Student(recipe.student, recipe.student_size, recipe.student_indices, recipe.student_kwargs)


def build_model(recipe: Recipe, teacher: DiffusionTeacher, layout: Optional[TargetLayout] = None) -> DistillModel:
    """Student + FPN regressor sized for ``layout``'s targets (default: `target_layout` of the recipe)."""
    student = build_student(recipe)
    targets = (layout or target_layout(recipe, teacher)).targets
    regressor = FeatureRegressor(student.channels, targets, sources=recipe.sources, width=recipe.regressor_width,
                                 use_ppm=recipe.use_ppm, level_sizes=student.sizes)
    return DistillModel(student, regressor)


def build_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model`` (`distill.optim.build_optimizer`)."""
    return make_optimizer(model, recipe.optimizer, recipe.lr, recipe.weight_decay, recipe.momentum)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer):
    """Warmup + cosine over ``steps`` (`distill.optim.build_scheduler`)."""
    return make_scheduler(optimizer, recipe.warmup_steps, recipe.steps)


def build_loss(recipe: Recipe) -> Callable[[list, list], dict]:
    """``loss(preds, targets) -> {'mse', 'at', ..., 'total'}`` with the recipe's weights and AT mode
    (`distill.losses.feature_distillation_loss`)."""
    return functools.partial(feature_distillation_loss, mse_weight=recipe.mse_weight, at_weight=recipe.at_weight,
                             cos_weight=recipe.cos_weight, at_mode=recipe.at_mode)


def build_policy(recipe: Recipe, teacher: DiffusionTeacher, ds: Dataset) -> TimestepPolicy:
    """RepFusion policy over the teacher's timesteps (the candidates) with a reward head on pooled features."""
    first = {}
    for f in teacher.feature_info:
        first.setdefault(f.block, f)
    return TimestepPolicy(teacher.timesteps, teacher.in_channels, sum(first[b].num_chs for b in teacher.blocks),
                          int(dataset_labels(ds).max()) + 1, baseline=recipe.policy_baseline)
