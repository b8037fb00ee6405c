"""Target sources: where a training step's regression targets come from, behind one small interface.

A target source is called with one collated batch ``(images uint8 (B, C, H, W), labels (B,)[, indices (B,)])``
and the global micro-batch index, and returns a `StepInput`:

- `LiveTeacherTargets`: one augmented view per batch; the frozen teacher's features of it at the fixed
  timesteps (fresh noise each call).
- `PolicyTargets`: the same, but each image's timestep is sampled by the RepFusion policy.
- `CacheTargets`: no teacher; the features of each image of the batch read from a ``distill extract``
  cache, at a noise draw chosen by (seed, micro-batch, image index).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..data import to_student, to_unit
from .step import StepInput, group_targets, make_views


class LiveTeacherTargets:
    """Targets from the live teacher at its fixed timesteps.

    Args:
        teacher: a `distill.teacher.DiffusionTeacher` on the training device.
        groups: the target layout's key groups (``TargetLayout.groups``).
        augment: the batch augmentation (one view shared by teacher and student).
        student_size, mean, std: the student's input size (px) and normalisation ([0, 1] units, 3 values each).
    """

    def __init__(self, teacher, groups: Sequence[Sequence[str]], augment, student_size: int, mean, std):
        self.teacher, self.groups, self.augment = teacher, [list(g) for g in groups], augment
        self.student_size, self.mean, self.std = student_size, mean, std

    def __call__(self, batch, micro: int) -> StepInput:
        images, labels = batch[0], batch[1]
        view = make_views(images, self.augment, self.teacher, self.student_size, self.mean, self.std)
        feats = self.teacher(view.teacher_x)  # {key: (B, C, H, W)}
        return StepInput(view.student_x, group_targets(feats, self.groups), labels, view.teacher_x)


class PolicyTargets(LiveTeacherTargets):
    """Targets from the live teacher, each image at the timestep sampled for it by ``policy`` (RepFusion); the
    sampled actions and the pooled features (the reward head's input) travel with the step input."""

    def __init__(self, teacher, groups, augment, student_size: int, mean, std, policy, accelerator):
        super().__init__(teacher, groups, augment, student_size, mean, std)
        self.policy, self.accelerator = policy, accelerator

    def __call__(self, batch, micro: int) -> StepInput:
        images, labels = batch[0], batch[1]
        view = make_views(images, self.augment, self.teacher, self.student_size, self.mean, self.std)
        actions, t = self.accelerator.unwrap_model(self.policy).sample(view.teacher_x)  # (B,), (B,)
        feats = self.teacher(view.teacher_x, timesteps=t)  # keys '<block>@t*': each image at its own timestep
        pooled = torch.cat([feats[k].float().mean((2, 3)) for g in self.groups for k in g], dim=1)  # (B, sum C)
        return StepInput(view.student_x, group_targets(feats, self.groups), labels, view.teacher_x, actions, pooled)


class CacheTargets:
    """Targets read from a feature cache for the batch's own images (batches carry their dataset indices).

    No augmentation (the cache holds features of clean images; checked when the cache is opened).
    """

    def __init__(self, cache, groups, student_size: int, mean, std, seed: int, device):
        self.cache, self.groups, self.seed, self.device = cache, [list(g) for g in groups], seed, device
        self.student_size, self.mean, self.std = student_size, mean, std

    def __call__(self, batch, micro: int) -> StepInput:
        images, labels, indices = batch
        draws = self.cache.draw_ids(indices, micro, self.seed)
        targets = self.cache.targets(indices, draws, self.groups, device=self.device)
        return StepInput(to_student(to_unit(images), self.student_size, self.mean, self.std), targets, labels)


class LatentCacheTargets:
    """Targets from the live UNet/DiT on latents read from a latent cache (`distill.latent_cache`): the VAE
    never runs. Per step: each image's view (its horizontal flip with probability 1/2 when ``flip``, from the
    process's RNG), that view's posterior ``(mean, std)`` from the cache, ``z = mean + std * eps`` (``sample``) or
    ``mean``, scaled as diffusers does (``teacher.normalize_latents``), then fresh noise and the teacher's forward
    to its deepest block (``teacher.features``). The student sees the same view of the image.
    """

    def __init__(self, cache, teacher, groups, student_size: int, mean, std, flip: bool, sample: bool, device):
        self.cache, self.teacher, self.groups = cache, teacher, [list(g) for g in groups]
        self.student_size, self.mean, self.std = student_size, mean, std
        self.flip, self.sample, self.device = flip, sample, device

    def latents(self, indices, flips) -> torch.Tensor:
        """The teacher's clean input ``[B, C, h, w]`` (scaled latents, fp32) of images ``indices`` in views
        ``flips``."""
        mu, sd = self.cache.rows(indices, flips, self.device)
        z = mu + sd * torch.randn_like(mu) if self.sample else mu
        return self.teacher.normalize_latents(z)

    def __call__(self, batch, micro: int) -> StepInput:
        images, labels, indices = batch
        flips = (torch.randint(0, 2, (images.shape[0],)) if self.flip
                 else torch.zeros(images.shape[0], dtype=torch.long))
        feats = self.teacher.features(self.latents(indices, flips))
        x = to_unit(images)
        x = torch.where(flips.to(x.device).view(-1, 1, 1, 1).bool(), x.flip(-1), x)
        return StepInput(to_student(x, self.student_size, self.mean, self.std), group_targets(feats, self.groups),
                         labels)
