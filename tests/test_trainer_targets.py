"""Target sources inside the loop (distill.trainer.targets): feature-cache targets belong to each batch image,
and the live teacher sees the student's augmented view, each compared with a computation written here.

Wiring tests (setup and shared runs in tests/_wiring.py). What each test compares with, and the
bug injected into ``distill/`` to check that it fails (each one made the listed test(s) fail at the
assertion meant for it; reverted with ``git checkout distill/``):

3. ``test_cache_targets_are_each_batch_images_own_features``: in ``train()`` with ``feature_cache`` (shuffled
   batches across an epoch), row i of the targets passed to train_step vs features computed here (UNet on the
   extraction's noise) of the image found at row i of the student batch, at the draw ``FeatureCache.draw_ids``
   gives for that image and step. Injected, caught: ``cache.targets(arange(B), ...)`` instead of the batch's
   indices; draws for the wrong step; mean and std swapped in the cache path's ``to_student``.
4. ``test_make_views_teacher_and_student_see_one_augmented_view`` [flip, crop-flip] and
   ``test_loop_teacher_and_student_see_one_augmented_view``: teacher input vs the de-normalised student input
   resized to 16 px, and (make_views) vs the augmentation applied once with the same seed; in the loop at every
   step of a crop-flip run. Injected, caught by all three: augment called separately for teacher and student.
   (The make_views test of 4 is in test_trainer_step.py.)
"""
from __future__ import annotations

import torch
import yaml

from distill.cache import FeatureCache

from ._wiring import TEACHER_PX, _dataset_images, _denormalise, _teacher_view, _unet_and_scheduler, _unet_blocks
from ._wiring import _one_thread, base_run, cache_run, folder, teacher_dir  # noqa: F401 (fixtures)


# ----------------------------------------------------------------------------------------------- 3. cache
def test_cache_targets_are_each_batch_images_own_features(cache_run, folder, teacher_dir):
    """In train() with feature_cache, row i of each step's targets is the teacher feature of the image that is
    row i of the student batch (found by matching the de-normalised student input against the dataset), at the
    draw distill.cache picks for that image and step; compared with features computed here for those images
    (the UNet on add_noise(x0, eps) with the extraction's noise: one generator seeded with the recipe seed,
    draw-major, all 12 images in one batch)."""
    r = cache_run.recipe
    data = _dataset_images(folder)  # (12, 3, 64, 64)
    N, D = len(data), 2
    unet, sched = _unet_and_scheduler(teacher_dir)
    x0 = _teacher_view(data.float() / 255)
    eps = torch.randn(D * N, 3, TEACHER_PX, TEACHER_PX, generator=torch.Generator().manual_seed(r.seed))
    live = {}  # key -> (N, D, C, H, W)
    for d in range(D):
        x_t = sched.add_noise(x0, eps[d * N:(d + 1) * N], torch.full((N,), 11, dtype=torch.long))
        for b, f in _unet_blocks(unet, x_t, 11).items():
            live.setdefault(f"{b}@t11", []).append(f)
    live = {k: torch.stack(v, dim=1) for k, v in live.items()}
    groups = yaml.safe_load((cache_run.path / "config.yaml").read_text())["_resolved"]["target_groups"]
    assert sorted(g[0] for g in groups) == sorted(live)

    cache = FeatureCache(r.feature_cache)
    flat = data.float().flatten(1) / 255
    assert len(cache_run.calls) == r.steps
    shuffled = False
    for step, call in enumerate(cache_run.calls, start=1):
        x = _denormalise(call["student_x"]).flatten(1)
        err = (x[:, None, :] - flat[None, :, :]).abs().amax(-1)  # (B, N)
        idx = err.argmin(1)
        assert bool((err.min(1).values < 1e-5).all()), "student input is not a normalised dataset image"
        shuffled |= idx.tolist() != list(range(idx[0], idx[0] + len(idx)))
        draws = cache.draw_ids(idx, step - 1, r.seed)
        assert call["targets"] is not None and len(call["targets"]) == len(groups)
        for g, t in zip(groups, call["targets"]):
            want = live[g[0]][idx, draws]  # (B, C, H, W): image idx[i] at its draw
            torch.testing.assert_close(t, want.half().float(), rtol=2e-3, atol=2e-3, msg=f"step {step} {g}")
            other = live[g[0]][idx.roll(1), draws.roll(1)]  # the features of another image are far off
            assert (t - other).abs().mean() > 20 * (t - want).abs().mean()
    assert shuffled, "batches were not shuffled: the test would not tell batch rows from dataset rows"


# ----------------------------------------------------------------------------------------------- 4. same view
def test_loop_teacher_and_student_see_one_augmented_view(base_run, folder):
    """Inside train() (crop-flip): at every step the teacher input is the de-normalised student input resized to
    16 px in [-1, 1], and that view is not a plain dataset image (the augmentation ran)."""
    data = _dataset_images(folder).float().flatten(1) / 255
    assert len(base_run.calls) == base_run.recipe.steps
    augmented = 0
    for call in base_run.calls:
        seen = _denormalise(call["student_x"])
        torch.testing.assert_close(call["teacher_x"], _teacher_view(seen), rtol=0, atol=1e-5)
        err = (seen.flatten(1)[:, None, :] - data[None]).abs().amax(-1).min(1).values
        augmented += int((err > 0.05).sum())
    assert augmented >= len(base_run.calls)  # crop-flip: most views differ from every stored image
