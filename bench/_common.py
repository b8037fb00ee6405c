"""Shared pieces of the training-speed benchmarks: machine description, interleaved timing, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "python": platform.python_version(),
            "loadavg_at_start": [round(v, 2) for v in load] if load else None}


def interleave(fns: Sequence[Callable[[int], dict]], repeats: int, warmup: int = 1) -> list[list[dict]]:
    """Call ``fns[0](i), fns[1](i), ...`` alternately ``repeats`` times (after ``warmup`` untimed rounds).

    Each function returns a dict of sub-timings (seconds) or ``{}``; its wall time is added as ``'total'``. The order
    of the arms is reversed every other round, and drifts in machine speed (other jobs on a shared CPU) hit every
    arm alike.
    """
    out: list[list[dict]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for i in range(warmup + repeats):
        for j in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            sub = fns[j](i) or {}
            sub["total"] = time.perf_counter() - t0
            if i >= warmup:
                out[j].append(sub)
    return out


def med(rows: list[dict], key: str = "total") -> float:
    return statistics.median(r[key] for r in rows)


def emit(data: dict, path: "str | None", machine_at_start: dict) -> int:
    """Print ``data`` as JSON and, with ``path``, `save` it; returns 0 (a bench script's exit code)."""
    print(json.dumps(data, indent=2))
    if path:
        save(path, data, machine_at_start)
    return 0


def save(path: str, data: dict, machine_at_start: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    data = {**data, "machine": {**machine_at_start, "loadavg_at_end": [round(v, 2) for v in load] if load else None},
            "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {out}")


# ----------------------------------------------------------------------------------------------- training steps
def quickstart_setup(recipe_path: str, overrides: dict):
    """Recipe, dataset, mean/std, teacher, feature keys and one initial model (built as ``distill.train`` does)."""
    from distill.build import build_model, build_teacher, build_train_data, resolve_mean_std
    from distill.recipes import load_recipe  # a path or a shipped recipe name

    recipe = load_recipe(recipe_path, overrides)
    ds, ch = build_train_data(recipe)
    mean, std = resolve_mean_std(recipe, ds)
    torch.manual_seed(recipe.seed)
    teacher = build_teacher(recipe, ch)
    keys = [f.key for f in teacher.feature_info]
    model = build_model(recipe, teacher)
    return recipe, ds, mean, std, teacher, keys, model


def library_step(recipe, teacher, keys, model, mean, std, image_size: int, source=None, accelerator=None):
    """One step of ``distill.train``'s loop, by the library's own functions: the live-teacher target source (or
    ``source``, e.g. :class:`distill.trainer.targets.CacheTargets`),
    ``distill.trainer.loop.optimizer_step`` (``train_step`` inside ``accelerator.accumulate``, the non-finite check,
    clipping, the optimizer update) on an Accelerate-prepared model and optimizer, the scheduler step and, every
    ``log_every`` steps, ``log_step``'s reduce (its CSV row discarded). Returns ``step(images, i) -> total loss``."""
    import tempfile

    from distill.augment import build_augment
    from distill.build import build_loss, build_optimizer, build_scheduler
    from distill.trainer.textlog import CsvLog
    from distill.trainer.loop import Session, log_step, make_accelerator, optimizer_step
    from distill.trainer.targets import LiveTeacherTargets

    run_dir = Path(tempfile.gettempdir())
    accelerator = accelerator or make_accelerator(recipe, run_dir)
    optimizer = build_optimizer(recipe, model)
    scheduler = build_scheduler(recipe, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    augment = build_augment(recipe.augment, image_size).to(accelerator.device)
    source = source or LiveTeacherTargets(teacher, [[k] for k in keys], augment, recipe.student_size, mean, std)
    session = Session(recipe, run_dir, accelerator, model, optimizer, scheduler, source, build_loss(recipe),
                      ds=None, resolved={})
    no_log = CsvLog(run_dir / "unused.csv", 0, enabled=False)
    t0 = time.time()

    def step(images, i, batch=None):
        """``batch``: a whole collated batch (e.g. with indices for a cache source); default ``images`` alone."""
        batch = batch or (images, torch.zeros(images.shape[0], dtype=torch.long))
        sums, grad_norm, _ = optimizer_step(session, iter([batch]), i + 1, None)
        if not sums:
            raise RuntimeError(f"non-finite loss at bench step {i}")
        scheduler.step()
        if (i + 1) % recipe.log_every == 0:
            log_step(session, i + 1, sums, grad_norm, t0, no_log)
        return sums["total"] / recipe.grad_accum_steps

    return step


def lr_lambda(recipe):
    """diffusers' get_cosine_schedule_with_warmup (0.5 cycles), written out."""
    import math

    warm, total = min(recipe.warmup_steps, recipe.steps), recipe.steps

    def f(step):
        if step < warm:
            return step / max(1, warm)
        progress = (step - warm) / max(1, total - warm)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * 0.5 * progress)))

    return f


def paired(r_a: list[dict], r_b: list[dict], key: str = "total") -> dict:
    """Ratio a/b by three estimators: of the medians, of the minima (least disturbed by other jobs), and the median
    and quartiles of the per-round ratios (each round times a and b back to back)."""
    a, b = [r[key] for r in r_a], [r[key] for r in r_b]
    per = sorted(x / y for x, y in zip(a, b))
    q = statistics.quantiles(per, n=4) if len(per) >= 2 else [per[0]] * 3
    return {"ratio_of_medians": round(statistics.median(a) / statistics.median(b), 4),
            "ratio_of_minima": round(min(a) / min(b), 4),
            "paired_ratio_median": round(statistics.median(per), 4),
            "paired_ratio_quartiles": [round(q[0], 4), round(q[2], 4)],
            "step_s": {"a": [round(x, 4) for x in a], "b": [round(x, 4) for x in b]}}
