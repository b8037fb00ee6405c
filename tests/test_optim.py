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


# ----------------------------------------------------------------------------------------------- lr scales
def _scale_by_hand(name: str, layer_decay, mult: float) -> float:
    """A test_resnet parameter's lr factor written out: layers are the stem (conv1, bn1) = 0, then each residual
    block layer{i}.{j} in order (1..4), the head fc = 5; a parameter of layer l gets layer_decay ** (5 - l), and
    every parameter but the head's also ``mult``."""
    if name.startswith("fc."):
        return 1.0
    layer = 0 if name.startswith(("conv1.", "bn1.")) else int(name[len("layer")])  # one block per stage here
    return (layer_decay ** (5 - layer) if layer_decay else 1.0) * mult


@pytest.mark.parametrize("layer_decay, mult", [(0.5, 1.0), (None, 0.1), (0.7, 0.2)])
def test_layer_decay_and_backbone_lr_mult_give_each_parameter_its_rate(layer_decay, mult):
    import timm

    from distill.optim import build_optimizer

    model = timm.create_model("test_resnet", num_classes=3)
    opt = build_optimizer(model, "adamw", 0.01, 0.05, layer_decay=layer_decay, backbone_lr_mult=mult)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert set(lr_of) == {id(p) for p in named.values()}  # every parameter once
    for name, p in named.items():
        assert lr_of[id(p)] == pytest.approx(0.01 * _scale_by_hand(name, layer_decay, mult), rel=1e-12), name
        assert wd_of[id(p)] == (0.0 if p.ndim <= 1 else 0.05), name  # no decay on norms and biases, as before


def test_default_optimizer_is_unchanged_by_the_new_arguments():
    import timm

    from distill.optim import build_optimizer

    model = timm.create_model("test_resnet", num_classes=3)
    a, b = build_optimizer(model, "adamw", 0.01, 0.05), timm.optim.create_optimizer_v2(model, "adamw", lr=0.01,
                                                                                      weight_decay=0.05)
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in a.param_groups] == \
        [(len(g["params"]), g["lr"], g["weight_decay"]) for g in b.param_groups]


@pytest.mark.parametrize("kw, text", [({"layer_decay": 0.0}, "layer_decay 0.0 is outside"),
                                      ({"layer_decay": 1.5}, "outside \\(0, 1\\]"),
                                      ({"backbone_lr_mult": 0.0}, "backbone_lr_mult 0.0 must be > 0")])
def test_bad_scales_are_refused(kw, text):
    import timm

    from distill.optim import build_optimizer

    with pytest.raises(ValueError, match=text):
        build_optimizer(timm.create_model("test_resnet", num_classes=3), "adamw", 0.01, 0.05, **kw)


def test_finetune_group_rates_follow_the_schedule_times_their_scale(folder, tmp_path, monkeypatch):
    """distill finetune --layer-decay 0.5 --backbone-lr-mult 0.1: at each update every parameter's rate is the
    warmup + cosine rate times its scale by hand; result.json records both settings."""
    import json

    import timm.optim

    opts = []
    orig = timm.optim.create_optimizer_v2
    monkeypatch.setattr(timm.optim, "create_optimizer_v2", lambda *a, **kw: opts.append(orig(*a, **kw)) or opts[-1])
    seen = []
    cfg = FinetuneConfig(model="timm:test_resnet", dataset="image-folder", data_root=str(folder), steps=5,
                         batch_size=4, lr=0.01, warmup_steps=2, augment="none", eval_every=0, log_every=1,
                         size=32, mean=MEAN, std=STD, eval_batch_size=8, layer_decay=0.5, backbone_lr_mult=0.1)

    def record(b):
        seen.append({id(p): g["lr"] for g in opts[-1].param_groups for p in g["params"]})

    holder = {}
    real_build = __import__("distill.finetune.run", fromlist=["build_model"]).build_model

    def build(*a, **kw):
        holder["model"] = real_build(*a, **kw)
        return holder["model"]

    monkeypatch.setattr("distill.finetune.run.build_model", build)
    finetune(cfg, str(tmp_path / "ft"), progress=False, callback=record)
    named = dict(holder["model"].named_parameters())
    for s, rates in enumerate(seen, start=1):
        for name, p in named.items():
            want = _cosine_lr(0.01, 2, 5, s - 1) * _scale_by_hand(name, 0.5, 0.1)
            assert rates[id(p)] == pytest.approx(want, rel=1e-9, abs=1e-15), (s, name)
    result = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert result["layer_decay"] == 0.5 and result["backbone_lr_mult"] == 0.1
