"""Selection runs: ``distill select`` (`run_selection`) and a recipe's ``timesteps: auto-grid | auto-label-free``
(`auto_select_timestep`), built on the grid probe (`grid`) and the label-free scores (`label_free`).

Both score candidates on the TRAIN split only (the grid on held-out training images) unless asked otherwise, so a
pick never leaks the test set that reports accuracy.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import Subset

from ..atomic import atomic_write_json
from ..build import build_teacher, build_train_data
from ..config import RANGES, Recipe, make_recipe
from ..data import dataset_labels, stratified_indices
from ..errors import option
from ..evaluate import ProbeData, probe_data
from ..probe import eval_device
from ..vocab import SELECT_METHODS
from .grid import grid_probe
from .label_free import label_free_scores
from .outputs import SelectionResult, write_grid_outputs, write_label_free_outputs


def check_candidates(candidates, num_train_timesteps: int, name: str = "timestep_candidates") -> list[int]:
    """A non-empty list of distinct integers in ``[0, T)``; the error names ``name`` and the fix.

    Raises:
        ValueError: ``candidates`` is empty, has duplicates, or holds a value that is not an integer in ``[0, T)``.
    """
    ts = list(candidates) if candidates is not None else []
    if not ts:
        raise ValueError(f"{name} is empty; give two or more timesteps in [0, {num_train_timesteps}), e.g. "
                         f"[1, 11, 50, 100].")
    bad = [t for t in ts if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < num_train_timesteps]
    if bad:
        raise ValueError(f"{name} {bad} are outside [0, {num_train_timesteps}) for this teacher's scheduler "
                         f"(num_train_timesteps={num_train_timesteps}); use integers such as "
                         f"[1, 11, 50, {min(100, num_train_timesteps - 1)}].")
    if len(set(ts)) != len(ts):
        raise ValueError(f"{name} has duplicates: {ts}.")
    return [int(t) for t in ts]


def selection_split(dataset, num_train: int, num_val: int, seed: int = 0) -> ProbeData:
    """Disjoint, class-stratified fit/score subsets of a labelled TRAIN split (never the test split).

    Selecting on the test set and then reporting test accuracy would leak; the grid scores its probes on held-out
    training images instead.

    Raises:
        ValueError: ``num_train + num_val`` exceeds the dataset.
    """
    labels = dataset_labels(dataset)
    n = len(labels)
    if num_train + num_val > n:
        raise ValueError(f"select_images + select_val_images = {num_train + num_val} exceeds the {n} training images; "
                         f"lower them (e.g. select_images={max(1, n * 7 // 10)}, select_val_images={n * 3 // 10}).")
    idx = stratified_indices(labels, (num_train + num_val) / n, seed)
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))].tolist()
    return ProbeData(Subset(dataset, idx[:num_train]), Subset(dataset, idx[num_train:num_train + num_val]), "select")


def per_timestep(rows: list[dict], value: str, blocks=None) -> dict[int, float]:
    """Mean of ``value`` over ``blocks`` (default all) for each timestep: how a recipe with fixed blocks picks t."""
    out: dict[int, list] = {}
    for r in rows:
        if blocks is None or r["block"] in blocks:
            out.setdefault(int(r["timestep"]), []).append(float(r[value]))
    return {t: sum(v) / len(v) for t, v in out.items()}


def _teacher_name(recipe: Recipe) -> str:
    return recipe.teacher if isinstance(recipe.teacher, str) else "teacher"


def auto_select_timestep(recipe: Recipe, dataset, channels: int, out_dir, progress: bool = True,
                         device=None) -> dict:
    """Pick the recipe's timestep among ``recipe.timestep_candidates`` (``timesteps: auto-grid | auto-label-free``).

    The recipe's blocks are fixed; each candidate timestep is scored by the mean over those blocks of the grid
    probe's held-out accuracy (auto-grid) or of the label-free score (auto-label-free). Writes the selection's files
    to ``out_dir`` and returns ``{'timestep', 'method', 'teacher_forwards', 'image_forwards', 'scores', ...}``
    (also written to ``out_dir/selection.json``). The teacher and the probes run on ``device`` (default
    `distill.probe.eval_device`: Accelerate's, a GPU when there is one), recorded as ``'device'``.

    Raises:
        ValueError: ``recipe.timesteps`` is neither mode, or the candidates are out of the teacher's range.
    """
    mode = recipe.timesteps
    teacher = build_teacher(recipe, channels, timesteps=[0]).to(eval_device(device))
    teacher.set_timesteps(check_candidates(recipe.timestep_candidates, teacher.num_train_timesteps))
    teacher_name = _teacher_name(recipe)
    out = Path(out_dir)
    if mode == "auto-grid":
        data = selection_split(dataset, recipe.select_images, recipe.select_val_images, recipe.seed)
        res = grid_probe(teacher, data, epochs=recipe.select_epochs, seed=recipe.seed,
                         max_memory_gb=recipe.select_max_memory_gb, progress=progress)
        write_grid_outputs(res, out, teacher_name)
        scores = per_timestep(res["rows"], "linear_top1")
        t = max(scores, key=lambda k: (scores[k], -k))
        info = {"teacher_forwards": res["teacher_forwards"], "image_forwards": res["image_forwards"],
                "seconds": res["seconds"]}
    elif mode == "auto-label-free":
        rows = label_free_scores(teacher, dataset, recipe.select_label_free_images, seed=recipe.seed,
                                 progress=progress)
        write_label_free_outputs(rows, out, teacher_name)
        scores = per_timestep(rows, "score")
        t = min(scores, key=lambda k: (scores[k], k))
        info = {"teacher_forwards": rows[0]["teacher_forwards"],
                "image_forwards": 2 * rows[0]["images"] * len(teacher.timesteps), "seconds": rows[0]["seconds_total"]}
    else:
        raise ValueError(f"auto_select_timestep: timesteps {mode!r} is not auto-grid or auto-label-free.")
    result = {"timestep": int(t), "method": mode, "candidates": teacher.timesteps, "blocks": teacher.blocks,
              "scores": {str(k): round(v, 5) for k, v in sorted(scores.items())}, **info, "device": str(teacher.device)}
    atomic_write_json(out / "selection.json", result)
    return result


def run_selection(out_dir, *, recipe: Optional[Recipe] = None, teacher=None, blocks: Optional[Sequence[str]] = None,
                  timesteps: Optional[Sequence[int]] = None, dataset: Optional[str] = None,
                  data_root: Optional[str] = None, method: str = "both", images: Optional[int] = None,
                  val_images: Optional[int] = None, epochs: Optional[int] = None,
                  label_free_images: Optional[int] = None, seed: Optional[int] = None, score_on: str = "val",
                  batch_size: int = 64, augment: str = "flip", max_memory_gb: Optional[float] = None,
                  compare=None, progress: bool = True, timesteps_name: Optional[str] = None,
                  device=None) -> SelectionResult:
    """Grid probe and/or label-free selection over blocks x timesteps (``distill select``); files in ``out_dir``.

    Every argument left None comes from ``recipe`` (default: the `Recipe` defaults).

    Args:
        out_dir: output directory (created): the files of `write_grid_outputs` and
            `write_label_free_outputs`, and ``select.json`` (the returned ``report``).
        recipe: base recipe (teacher, data, ``teacher_blocks``, ``timestep_candidates``, ``select_*``, seed).
        teacher: packaged name, directory, hub id or config (recipe key ``teacher``).
        blocks: candidate blocks (``teacher_blocks``).
        timesteps: candidate timesteps (``timestep_candidates``), integers in ``[0, T)``.
        dataset, data_root: the data (its TRAIN split is scored, except with ``score_on='test'``).
        method: one of `distill.vocab.SELECT_METHODS` (``both`` = grid, then label-free ranked against it).
        images, val_images: grid: train images the probes fit on / held-out train images they are scored on
            (``select_images``, ``select_val_images``).
        epochs: grid: passes over ``images``, fresh noise every step (``select_epochs``).
        label_free_images: label-free: images, two noisings each (``select_label_free_images``).
        seed: subset, noise and probe seed.
        score_on: grid: ``'val'`` (held-out train images) or ``'test'`` (the test split, as DDAE's table).
        batch_size: images per teacher forward (a forward holds ``batch_size x K`` images).
        augment: grid: one of `distill.vocab.AUGMENTS`, on train images.
        max_memory_gb: grid: refuse to start above this estimated step memory (default: the free memory).
        compare: label-free only: a ``grid.csv`` to rank against.
        progress: progress bars (`distill.logs.progress`: plain lines when stderr is a file).
        timesteps_name: how errors name the candidate list (default: ``timesteps`` as the caller spells it,
            `distill.errors.option`: ``--timesteps`` under ``distill select``).
        device: where the teacher and the probes run (default `distill.probe.eval_device`: Accelerate's, a GPU
            when there is one); recorded in ``report['device']``.

    Returns:
        a `SelectionResult`; `distill.select.format_selection` renders it as Markdown.

    Raises:
        ValueError: unknown ``method``, a bad recipe value, candidates outside the teacher's range, too many images.
        MemoryError: the grid's estimated step memory exceeds ``max_memory_gb``.
    """
    if method not in SELECT_METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(SELECT_METHODS)}.")
    for name, key, arg in (("images", "select_images", images), ("val_images", "select_val_images", val_images),
                           ("epochs", "select_epochs", epochs), ("label_free_images", "select_label_free_images",
                                                                 label_free_images)):
        rng = RANGES[key]  # the argument is checked as itself (--images under distill select), not as its recipe key
        if arg is not None and not rng.contains(arg):
            raise ValueError(f"{option(name)} must be an integer {rng.describe()}; got {arg!r}. Fix: e.g. "
                             f"{getattr(Recipe, key)}.")
    values = recipe.to_dict() if recipe is not None else {}
    for key, arg in (("teacher", teacher), ("dataset", dataset), ("data_root", data_root),
                     ("teacher_blocks", None if blocks is None else list(blocks)),
                     ("timestep_candidates", None if timesteps is None else list(timesteps)),
                     ("select_images", images), ("select_val_images", val_images), ("select_epochs", epochs),
                     ("select_label_free_images", label_free_images), ("seed", seed)):
        if arg is not None:
            values[key] = arg
    values["timesteps"] = [0]
    recipe = make_recipe(values, source="selection settings")  # not "distill select": the CLI prefixes that
    ds, channels = build_train_data(recipe)
    tea = build_teacher(recipe, channels, timesteps=[0]).to(eval_device(device))
    tea.set_timesteps(check_candidates(recipe.timestep_candidates, tea.num_train_timesteps,
                                      timesteps_name or option("timesteps")))
    name = _teacher_name(recipe)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = ["grid", "label-free"] if method == "both" else [method]
    report: dict = {"teacher": name, "blocks": tea.blocks, "timesteps": tea.timesteps, "dataset": recipe.dataset,
                    "device": str(tea.device)}
    grid_rows = res = rows = None
    if compare:
        with open(compare, newline="") as f:
            grid_rows = list(csv.DictReader(f))
    if "grid" in methods:
        if score_on == "test":
            full = probe_data(recipe.dataset, recipe.data_root, channels, 1.0, recipe.seed)
            data = selection_split(full.train, recipe.select_images, 0, recipe.seed)
            data.test = full.test
        else:
            data = selection_split(ds, recipe.select_images, recipe.select_val_images, recipe.seed)
        res = grid_probe(tea, data, epochs=recipe.select_epochs, batch_size=batch_size, seed=recipe.seed,
                         max_memory_gb=max_memory_gb, augment=augment, progress=progress)
        res["scored_on"] = score_on
        write_grid_outputs(res, out, name)
        grid_rows = res["rows"]
        report["grid"] = {k: v for k, v in res.items() if k != "rows"}
    if "label-free" in methods:
        rows = label_free_scores(tea, ds, recipe.select_label_free_images, batch_size=batch_size, seed=recipe.seed,
                                 progress=progress)
        extra = write_label_free_outputs(rows, out, name, grid_rows)
        lf_image_forwards = 2 * rows[0]["images"] * len(tea.timesteps)
        report["label_free"] = {"best": rows[0], "image_forwards": lf_image_forwards, **extra}
        if extra and "grid" in report:
            report["label_free"]["compute_ratio_vs_grid"] = round(lf_image_forwards / report["grid"]["image_forwards"],
                                                                  4)
    atomic_write_json(out / "select.json", report)
    return SelectionResult(report=report, out_dir=out, methods=methods, grid=res, label_free=rows)
