"""Learning-rate schedules (distill.optim.build_scheduler) for distillation and fine-tuning: linear warmup +
cosine, compared with the formula written here, on a bare optimizer and inside real runs.

Wiring tests (setup and shared runs in tests/_wiring.py). What each test compares with, and the
bug injected into ``distill/`` to check that it fails (each one made the listed test(s) fail at the
assertion meant for it; reverted with ``git checkout distill/``):

5. ``test_distill_lr_schedule_warmup_cosine`` and ``test_finetune_lr_schedule_warmup_cosine``: build_scheduler on
   a bare optimizer, the lr the optimizer holds when each update's train_step runs, metrics.csv's lr column; and
   for distill.finetune the optimizer's lr at each update, the callback's lr and train_log.csv: all vs linear
   warmup + cosine written here. Injected, caught: warmup + 1 (trainer), total steps + 1 (trainer), warmup + 1
   (finetune).

Conventions these tests pin (current behaviour): update s uses lr(s - 1), so the first update of a run with warmup
uses lr 0; metrics.csv row s logs lr(s), the rate after that step's scheduler.step() (train_log.csv of finetune
logs the rate the update used).
"""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn as nn

from distill.build import build_scheduler
from distill.finetune import FinetuneConfig, finetune

from ._wiring import MEAN, STD, _metrics, _recipe
from ._wiring import _one_thread, base_run, folder, teacher_dir  # noqa: F401 (fixtures)


def _cosine_lr(lr: float, warmup: int, total: int, step: int) -> float:
    """Learning rate after ``step`` scheduler steps: linear 0 -> lr over ``warmup`` steps, then half a cosine to 0
    at ``total`` (diffusers' get_cosine_schedule_with_warmup, num_cycles=0.5), written out here."""
    if step < warmup:
        return lr * step / warmup
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------------------------- 5. lr
def test_distill_lr_schedule_warmup_cosine(base_run, folder, teacher_dir):
    """build_scheduler on a bare optimizer, the lr each update of a real run used (read from its optimizer when
    train_step is called) and the lr column of metrics.csv, against linear warmup + cosine to 0 written here.
    Conventions: update s uses lr(s - 1) (so update 1 uses 0 during warmup); metrics.csv row s logs lr(s), the
    rate after that step's scheduler.step(); warmup is min(warmup_steps, steps)."""
    for warmup, steps in ((3, 8), (20, 6)):
        r = _recipe(folder, teacher_dir, warmup_steps=warmup, steps=steps, lr=0.02)
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=r.lr)
        sched = build_scheduler(r, opt)
        got = []
        for _ in range(steps + 1):
            got.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert got == pytest.approx([_cosine_lr(0.02, min(warmup, steps), steps, s) for s in range(steps + 1)],
                                    rel=1e-9, abs=1e-15)

    r = base_run.recipe
    want = lambda s: _cosine_lr(r.lr, r.warmup_steps, r.steps, s)  # noqa: E731
    used = [call["lr"] for call in base_run.calls]
    assert len(used) == r.steps and all(len(set(u)) == 1 for u in used)  # every param group alike
    assert [u[0] for u in used] == pytest.approx([want(s - 1) for s in range(1, r.steps + 1)], rel=1e-9, abs=1e-15)
    rows = _metrics(base_run.path)
    assert [int(row["step"]) for row in rows] == list(range(1, r.steps + 1))
    assert [float(row["lr"]) for row in rows] == pytest.approx([want(s) for s in range(1, r.steps + 1)],
                                                               rel=1e-9, abs=1e-15)


def test_finetune_lr_schedule_warmup_cosine(folder, tmp_path, monkeypatch):
    """distill.finetune: the lr the optimizer holds at each update (callback before the update), the callback's
    lr and train_log.csv's lr column, against the same formula: update s uses lr(s - 1)."""
    import timm.optim

    opts = []
    orig = timm.optim.create_optimizer_v2
    monkeypatch.setattr(timm.optim, "create_optimizer_v2", lambda *a, **kw: opts.append(orig(*a, **kw)) or opts[-1])
    seen = []
    cfg = FinetuneConfig(model="timm:test_resnet", dataset="image-folder", data_root=str(folder), steps=7,
                         batch_size=4, lr=0.01, warmup_steps=3, augment="none", eval_every=0, log_every=1,
                         size=32, mean=MEAN, std=STD, eval_batch_size=8)
    finetune(cfg, str(tmp_path / "ft"), progress=False,
             callback=lambda b: seen.append((b["step"], b["lr"], [g["lr"] for g in opts[-1].param_groups])))
    want = [_cosine_lr(0.01, 3, 7, s - 1) for s in range(1, 8)]
    assert [s for s, _, _ in seen] == list(range(1, 8))
    assert [lr for _, lr, _ in seen] == pytest.approx(want, rel=1e-9, abs=1e-15)
    for (_, _, groups), w in zip(seen, want):
        assert groups == pytest.approx([w] * len(groups), rel=1e-9, abs=1e-15)
    with open(tmp_path / "ft" / "train_log.csv") as f:
        assert [float(row["lr"]) for row in csv.DictReader(f)] == pytest.approx(want, rel=1e-9, abs=1e-15)
