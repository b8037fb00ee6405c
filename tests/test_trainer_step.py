"""The training step (distill.trainer.step): one step's teacher features, student input, loss and gradients, and
make_views' single augmented view for teacher and student, each compared with a computation written here.

Wiring tests (setup and shared runs in tests/_wiring.py). What each test compares with, and the
bug injected into ``distill/`` to check that it fails (each one made the listed test(s) fail at the
assertion meant for it; reverted with ``git checkout distill/``):

1. ``test_one_train_step_targets_student_input_and_loss`` [heads/paper, concat/code]: one step through
   build_teacher/target_layout/build_model/make_views/train_step. Teacher features vs the UNet reloaded from
   disk, run here with my own hooks on ``scheduler.add_noise(x0, eps, t)`` (eps re-drawn from the global RNG
   with the same seed, shape (K*B, ...) timestep-major as the teacher draws it); student input vs
   ``(x - mean_c) / std_c``; teacher input vs a resize to 16 px in [-1, 1]; loss terms vs whitening, MSE and
   attention maps written here (mse_weight 0.7, at_weight 3, both AT modes); gradients vs autograd of that formula.
   Injected, all caught: concat of a block's timesteps in reverse order; ``add_noise`` with the timesteps flipped
   (noise level != conditioning timestep); teacher input left in [0, 1]; mean and std swapped in make_views;
   MSE on the raw instead of the whitened target; AT on the whitened target; ``at_mode`` not passed to the loss
   (paper case); ``mse_weight`` not passed.
4. ``test_make_views_teacher_and_student_see_one_augmented_view`` [flip, crop-flip] and
   ``test_loop_teacher_and_student_see_one_augmented_view``: teacher input vs the de-normalised student input
   resized to 16 px, and (make_views) vs the augmentation applied once with the same seed; in the loop at every
   step of a crop-flip run. Injected, caught by all three: augment called separately for teacher and student.
   (The loop test of 4 is in test_trainer_targets.py.)

Convention the step test pins (current behaviour): the live teacher's noise comes from the global RNG right at
the teacher call.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.augment import build_augment
from distill.build import build_loss, build_model, build_teacher, build_train_data, target_layout
from distill.trainer import make_views, train_step
from distill.trainer.targets import LiveTeacherTargets

from ._wiring import (BLOCKS, IMG, MEAN, STD, TEACHER_PX, _dataset_images, _denormalise, _recipe, _teacher_view,
                      _unet_and_scheduler, _unet_blocks)
from ._wiring import _one_thread, folder, teacher_dir  # noqa: F401 (fixtures)


# ----------------------------------------------------------------------------------------------- 1. one step
class _Acc:
    """The two things train_step asks of an Accelerator on one process without gradient accumulation."""

    num_processes = 1
    sync_gradients = True

    @staticmethod
    def backward(loss):
        loss.backward()

    @staticmethod
    def unwrap_model(m):
        return m


def _whiten(f, eps=1e-6):
    mu = f.mean(1, keepdim=True)
    var = ((f - mu) ** 2).mean(1, keepdim=True)  # biased, over channels, per sample and position
    return (f - mu) / torch.sqrt(var + eps)


def _attention(f, size=None):
    a = (f ** 2).mean(1, keepdim=True)  # (B, 1, H, W): p = 2
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.interpolate(a, size=tuple(size), mode="bilinear", align_corners=False)
    a = a.flatten(1)
    return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _expected_loss(preds, targets, mse_weight, at_weight, at_mode):
    mse = torch.stack([((p - _whiten(t)) ** 2).mean() for p, t in zip(preds, targets)]).mean()
    ats = []
    for p, t in zip(preds, targets):
        d = _attention(p, t.shape[-2:]) - _attention(t)  # teacher map from the raw (not whitened) target
        ats.append((d ** 2).mean() if at_mode == "code" else d.norm(dim=1).mean())
    at = torch.stack(ats).mean()
    return {"mse": mse, "at": at, "total": mse_weight * mse + at_weight * at}


@pytest.mark.parametrize("multi_timestep, at_mode", [("heads", "paper"), ("concat", "code")])
def test_one_train_step_targets_student_input_and_loss(folder, teacher_dir, multi_timestep, at_mode):
    """One step through build_teacher / target_layout / build_model / make_views / train_step on a fixed batch:
    (a) the teacher features are the UNet's block outputs at x_t = add_noise(x0, eps, t) for the eps drawn from the
    global RNG (re-drawn here with the same seed) and the timestep asked; (b) the student input is the image
    normalised with the run's per-channel mean/std; (c) the loss and its gradients equal the losses.py formula
    (whitened MSE + attention transfer on the raw target) with non-default weights and AT mode."""
    timesteps = [5, 40]
    r = _recipe(folder, teacher_dir, timesteps=timesteps, multi_timestep=multi_timestep, augment="none",
                mse_weight=0.7, at_weight=3.0, at_mode=at_mode)
    ds, channels = build_train_data(r)
    teacher = build_teacher(r, channels)
    layout = target_layout(r, teacher)
    torch.manual_seed(0)
    model = build_model(r, teacher, layout)
    images = torch.stack([ds[i][0] for i in (5, 0, 9, 2)])  # (4, 3, 64, 64) uint8
    B = images.shape[0]
    batch = make_views(images, build_augment("none", IMG), teacher, r.student_size, r.mean, r.std)

    # (b) student input: (x - mean_c) / std_c per channel; the teacher gets the same image at 16 px in [-1, 1]
    x01 = images.float() / 255.0
    want_student = (x01 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(batch.student_x, want_student, rtol=0, atol=1e-6)
    x0 = _teacher_view(x01)
    torch.testing.assert_close(batch.teacher_x, x0, rtol=0, atol=1e-5)

    # the step, with the teacher's outputs and the regressor's predictions recorded
    seen_feats, seen_preds = {}, []
    orig_forward = teacher.forward
    teacher.forward = lambda *a, **kw: seen_feats.update(orig_forward(*a, **kw)) or dict(seen_feats)
    hook = model.register_forward_hook(lambda _m, _i, out: seen_preds.append([p.detach().clone() for p in out]))
    torch.manual_seed(1234)
    # the trainer's own live-teacher target source on the same batch (no augmentation: no random draw before the
    # teacher's noise), then its train_step with the recipe's loss
    source = LiveTeacherTargets(teacher, layout.groups, build_augment("none", IMG), r.student_size, r.mean, r.std)
    inputs = source((images, torch.zeros(B, dtype=torch.long)), 0)
    torch.testing.assert_close(inputs.student_x, want_student, rtol=0, atol=1e-6)
    torch.testing.assert_close(inputs.teacher_x, x0, rtol=0, atol=1e-5)
    losses = train_step(model, inputs, build_loss(r), _Acc())
    hook.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads, "train_step did not backpropagate"

    # (a) independent teacher: the UNet from disk, noise re-drawn with the same seed (the teacher batches the
    # K timesteps timestep-major: rows k*B:(k+1)*B are timestep k), add_noise of the pipeline's scheduler
    unet, sched = _unet_and_scheduler(teacher_dir)
    torch.manual_seed(1234)
    eps = torch.randn(len(timesteps) * B, 3, TEACHER_PX, TEACHER_PX)
    mine = {}
    for k, t in enumerate(timesteps):
        x_t = sched.add_noise(x0, eps[k * B:(k + 1) * B], torch.full((B,), t, dtype=torch.long))
        for b, f in _unet_blocks(unet, x_t, t).items():
            mine[f"{b}@t{t}"] = f
    assert set(seen_feats) == set(mine)
    for key, f in mine.items():
        torch.testing.assert_close(seen_feats[key].float(), f, rtol=1e-4, atol=1e-5, msg=key)

    # the layout groups: one key each (heads) or one block's timesteps in recipe order (concat)
    if multi_timestep == "heads":
        assert sorted(g[0] for g in layout.groups) == sorted(mine) and all(len(g) == 1 for g in layout.groups)
    else:
        assert layout.groups == [[f"{b}@t{t}" for t in timesteps] for b in BLOCKS]
    targets = [torch.cat([mine[k] for k in g], dim=1) for g in layout.groups]

    # (c) the loss terms from the formula, on my targets and the regressor's predictions of this step
    (preds,) = seen_preds
    assert [p.shape for p in preds] == [t.shape for t in targets]
    want = _expected_loss(preds, targets, 0.7, 3.0, at_mode)
    for term in ("mse", "at", "total"):
        torch.testing.assert_close(losses[term].detach(), want[term], rtol=1e-4, atol=1e-7, msg=term)
    assert "cos" not in losses
    # ... and its gradient is what train_step backpropagated (BN in train mode: the same forward again)
    model.zero_grad(set_to_none=True)
    again = model(batch.student_x)
    for p, q in zip(again, preds):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)
    _expected_loss(again, targets, 0.7, 3.0, at_mode)["total"].backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------- 4. same view
@pytest.mark.parametrize("augment", ["flip", "crop-flip"])
def test_make_views_teacher_and_student_see_one_augmented_view(folder, teacher_dir, augment):
    """make_views: the teacher input is the de-normalised student input resized to the teacher's size and mapped
    to [-1, 1], and both equal the augmentation applied once (same seed) to the batch."""
    r = _recipe(folder, teacher_dir, augment=augment)
    ds, channels = build_train_data(r)
    teacher = build_teacher(r, channels)
    images = _dataset_images(folder)
    aug = build_augment(augment, IMG)
    torch.manual_seed(3)
    batch = make_views(images, aug, teacher, r.student_size, r.mean, r.std)
    torch.manual_seed(3)
    ref = aug(images.float() / 255)
    seen = _denormalise(batch.student_x)
    torch.testing.assert_close(seen, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(batch.teacher_x, _teacher_view(seen), rtol=0, atol=1e-5)
    torch.testing.assert_close(batch.teacher_x, _teacher_view(ref), rtol=0, atol=1e-5)
    changed = (ref - images.float() / 255).abs().flatten(1).amax(1) > 0.05
    assert changed.sum() >= 3, "the augmentation changed too few images for the check to mean anything"
