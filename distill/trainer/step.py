"""One training step: the student regresses the targets of a micro-batch, then one guarded optimizer update.

The targets come from a target source (`distill.trainer.targets`: the live teacher, the per-image policy,
or the feature cache) as a `StepInput`; the step itself does not know which.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..data import to_student, to_teacher, to_unit
from ..errors import NonFiniteLossError


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

    ``loss_fn(preds, targets)`` returns ``{..., 'total'}`` (`distill.build.build_loss`). With a ``policy``
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


def nonfinite_terms(sums: dict, grad_norm: Optional[torch.Tensor], accelerator) -> list:
    """Names of the loss terms summed over an update's micro-batches (``sums``: name -> tensor; a sum is NaN/Inf
    when any of its micro-batches' values is) and of ``'grad_norm'`` (named only when every term is finite) that
    are NaN/Inf on any process; ``[]`` when the update is sound.

    One host synchronisation per optimizer update, the only one outside log steps (a per-process flag vector,
    max-reduced over processes first): the same one check per step that ``torch.amp.GradScaler.step`` makes before
    it steps or skips, here for every loss term, so an update is never applied from a non-finite batch.
    """
    names = list(sums) + (["grad_norm"] if grad_norm is not None else [])
    vals = list(sums.values()) + ([grad_norm] if grad_norm is not None else [])
    flags = torch.stack([(~torch.isfinite(torch.as_tensor(v).detach())).any() for v in vals]).float()
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "max")  # a term bad on any process is named on all
    bad = [k for k, f in zip(names, flags.tolist()) if f]
    return [k for k in bad if k != "grad_norm"] or bad


def nonfinite_error(step: int, bad: list, sums: dict, micro_batches: int, run_dir, last_checkpoint):
    """The `NonFiniteLossError` of ``on_nonfinite: error``: the step, the terms named by
    `nonfinite_terms`, every term's mean over the update's micro-batches, and the checkpoint that is kept."""
    values = ", ".join(f"{k}={float(v) / micro_batches:.4g}" for k, v in sums.items())
    return NonFiniteLossError(
        f"non-finite loss at step {step}: {', '.join(bad)} ({values}, mean of {micro_batches} micro-batch(es)); no "
        f"update was applied and the last good checkpoint in '{run_dir}' is kept ({last_checkpoint or 'none yet'}). "
        f"Lower lr, check the data, or set on_nonfinite: skip to drop such batches.")


def clip_gradients(model, accelerator, grad_clip: float) -> Optional[torch.Tensor]:
    """Clip the gradient norm to ``grad_clip`` when gradients are synchronised (the last micro-batch); returns the
    norm before clipping (a 0-dim tensor, not synchronised to the host), or None when nothing was clipped. Clipping
    non-finite gradients leaves them non-finite: `nonfinite_terms` then names ``'grad_norm'`` and the update
    is skipped."""
    if not (accelerator.sync_gradients and grad_clip > 0):
        return None
    return accelerator.clip_grad_norm_(model.parameters(), grad_clip)


def apply_update(optimizers: Sequence, skip: bool) -> None:
    """Step every optimizer unless ``skip`` (a non-finite batch), then clear the gradients. Inside
    ``accelerator.accumulate`` the prepared optimizers step only on the last micro-batch."""
    if not skip:
        for opt in optimizers:
            opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
