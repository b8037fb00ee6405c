"""One training step: the student regresses the targets of a micro-batch, then one guarded optimizer update.

The targets come from a target source (:mod:`distill.trainer.targets`: the live teacher, the per-image policy,
or the feature cache) as a :class:`StepInput`; the step itself does not know which.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..data import to_student, to_teacher, to_unit


@dataclass
class Batch:
    """One augmented view of a batch, converted for each network."""

    teacher_x: Optional[torch.Tensor]  # (B, C_t, S_t, S_t) in [-1, 1]
    student_x: torch.Tensor  # (B, 3, S_s, S_s) normalised


def make_views(images: torch.Tensor, augment, teacher, student_size: int, mean, std) -> Batch:
    """One augmented view of a uint8 batch ``(B, C, H, W)``, converted for the teacher (its channels and
    ``sample_size``, [-1, 1]) and for the student (RGB, ``student_size``, normalised with ``mean``/``std``)."""
    x = to_unit(images)  # (B, C, H, W) in [0, 1]
    x = augment(x)
    return Batch(to_teacher(x, teacher.in_channels, teacher.sample_size), to_student(x, student_size, mean, std))


@dataclass
class StepInput:
    """What one micro-batch step needs, from any target source."""

    student_x: torch.Tensor  # (B, 3, S_s, S_s) normalised
    targets: list  # one (B, C_k, H_k, W_k) float32 tensor per target group
    labels: Optional[torch.Tensor] = None  # (B,) int64; -1 = unlabelled
    teacher_x: Optional[torch.Tensor] = None  # (B, C_t, S_t, S_t) in [-1, 1] (the policy's input)
    actions: Optional[torch.Tensor] = None  # (B,) index of each image's sampled timestep candidate (policy)
    pooled: Optional[torch.Tensor] = None  # (B, sum C) spatially pooled teacher features (policy reward head)


def group_targets(feats: dict, groups: Sequence[Sequence[str]]) -> list:
    """The regression targets of a target layout: each group's features concatenated on channels, as float32."""
    return [(feats[g[0]] if len(g) == 1 else torch.cat([feats[k] for k in g], dim=1)).float() for g in groups]


def train_step(model, inputs: StepInput, loss_fn: Callable, accelerator, policy=None,
               entropy_weight: float = 0.0) -> dict:
    """Forward + backward of one micro-batch; returns the loss terms (not yet synchronised).

    ``loss_fn(preds, targets)`` returns ``{..., 'total'}`` (:func:`distill.build.build_loss`). With a ``policy``
    (RepFusion), the policy and its reward head get their own backward from ``inputs.actions``/``pooled``/
    ``labels``, and their terms are added to the returned dict.
    """
    preds = model(inputs.student_x)  # one (B, C_k, H_k, W_k) per target
    losses = loss_fn(preds, inputs.targets)
    accelerator.backward(losses["total"])
    if policy is not None:
        out = policy(inputs.teacher_x, inputs.actions, inputs.pooled, inputs.labels, entropy_weight)
        accelerator.backward(out["loss"])
        losses.update({k: out[k] for k in ("policy_loss", "head_ce", "reward", "entropy")})
    return losses


def nonfinite_terms(losses: dict, accelerator) -> list:
    """Names of the loss terms that are NaN/Inf on any process (one host sync per call)."""
    vals = torch.stack([v.detach().float() for v in losses.values()])
    flag = (~torch.isfinite(vals)).any().float()
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "max")
    if not flag.item():
        return []
    return [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()] or ["(another process)"]


def clip_gradients(model, accelerator, grad_clip: float, bad: list) -> tuple:
    """Clip the gradient norm to ``grad_clip`` when gradients are synchronised (the last micro-batch) and
    nothing is wrong yet; returns ``(grad_norm or None, bad)`` with ``'grad_norm'`` added when it is not finite."""
    if not (accelerator.sync_gradients and grad_clip > 0 and not bad):
        return None, bad
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    return grad_norm, (["grad_norm"] if not torch.isfinite(grad_norm) else bad)


def apply_update(optimizers: Sequence, skip: bool) -> None:
    """Step every optimizer unless ``skip`` (a non-finite batch), then clear the gradients. Inside
    ``accelerator.accumulate`` the prepared optimizers step only on the last micro-batch."""
    if not skip:
        for opt in optimizers:
            opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
