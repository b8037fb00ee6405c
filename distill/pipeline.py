"""``distill run``: pretrain, export, then probe the distilled student next to the same student at random init
and a linear classifier on raw pixels (the same images, probe and seed for every row)."""
from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Optional

import torch

from .atomic import atomic_write_text
from .config import Recipe
from .evaluate import (format_table, pixels_fn, probe_data, probe_exported, probe_fn, probe_random_init,
                       save_results)
from .export import export_student, write_model_card
from .probe import eval_device
from .rundir import read_config
from .trainer import train


def machine_line(device=None) -> str:
    """One line naming the processor, torch threads, torch version and the device the probes ran on (``device``,
    default :func:`distill.probe.eval_device`), for result files; a GPU is named (``cuda:0 (NVIDIA H200)``)."""
    device = eval_device(device)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return (f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, device {device}{name}")


def run_recipe(recipe: Recipe, run_dir: str, resume: bool = False, overwrite: bool = False, progress: bool = True,
               recipe_name: Optional[str] = None, overrides: Optional[list] = None,
               allow_changes: bool = False) -> dict:
    """Train ``recipe`` in ``run_dir``, export the student to ``run_dir/student``, probe it and the baselines.

    The export and its probe row hold the EMA of the student's weights when the recipe keeps one (``ema: true``),
    else the live weights; every row says which (``weights``: ``ema``, ``live``, ``random init``, ``none``). The
    probes are scored on a seeded stratified ``probe_test_fraction`` of the test split, stated in the table.
    Writes ``results.json`` (rows, train summary, timings, machine) and ``results.md`` (the table) in ``run_dir``.
    Probe features are extracted and probes trained on Accelerate's device (:func:`distill.probe.eval_device`), named
    in every row and in ``machine``.

    Returns:
        ``{'rows': [...], 'table': str, 'train_seconds', 'total_seconds', 'machine', 'summary'}``.
    """
    t0 = time.time()
    run = Path(run_dir)
    summary = train(recipe, str(run), resume=resume, overwrite=overwrite, progress=progress,
                    allow_changes=allow_changes)
    t_train = time.time() - t0
    out = export_student(str(run), str(run / "student"), overwrite=True, ema=recipe.ema)  # the EMA when kept
    _, resolved = read_config(run)
    data = probe_data(recipe.dataset, recipe.data_root, resolved["data_channels"], recipe.probe_train_fraction,
                      recipe.seed, recipe.probe_test_fraction)
    device = eval_device()  # Accelerate's: features and probes on the GPU when there is one
    kw = dict(epochs=recipe.probe_epochs, k=recipe.knn_k, seed=recipe.seed, progress=progress, device=device)
    rows = [probe_exported(str(out), data, name=f"{recipe.student} distilled", **kw),
            probe_random_init(recipe.student, recipe.student_size, resolved["mean"], resolved["std"], data,
                              model_kwargs=recipe.student_kwargs, name=f"{recipe.student} random init", **kw),
            probe_fn(pixels_fn, data, name="raw pixels", weights="none", **kw)]
    total = time.time() - t0
    table, machine = format_table(rows), machine_line(device)
    save_results(rows, run / "results.json",
                 {"train_summary": summary, "train_seconds": round(t_train, 1), "total_seconds": round(total, 1),
                  "machine": machine, "recipe": str(recipe_name), "overrides": overrides or []})
    atomic_write_text(run / "results.md", table + "\n")
    write_model_card(out, rows)  # the export's card, now with the probe numbers
    return {"rows": rows, "table": table, "train_seconds": t_train, "total_seconds": total, "machine": machine,
            "summary": summary}
