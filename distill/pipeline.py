"""``distill run``: pretrain, export, then probe the distilled student next to the same student at random init
and a linear classifier on raw pixels (the same images, probe and seed for every row)."""
from __future__ import annotations

import hashlib
import json
import logging
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

_logger = logging.getLogger(__name__)

#: Where `random_init_row` keeps its rows, in `distill.teacher.prompt.distill_cache_dir`.
BASELINES = "baselines"


def machine_line(device=None) -> str:
    """One line naming the processor, torch threads, torch version and the device the probes ran on (``device``,
    default `distill.probe.eval_device`), for result files; a GPU is named (``cuda:0 (NVIDIA H200)``)."""
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
    Probe features are extracted and probes trained on Accelerate's device (`distill.probe.eval_device`), named
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
            random_init_row(recipe, resolved["mean"], resolved["std"], data, kw),
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


def random_init_key(recipe: Recipe, mean, std, data, kw: dict) -> dict:
    """Everything the random-init probe row depends on, as the feature cache's key is built: the student (name,
    kwargs, input size, mean/std), the seed, the probe settings (epochs, k), the probe data (the train and test
    subsets' `distill.data.fingerprint.data_fingerprint`, the dataset, the test fraction), the device type,
    the torch / timm versions and the sha256 of the code that builds and probes it (student, evaluate, probe)."""
    import timm

    from . import evaluate, probe, student
    from .data.fingerprint import data_fingerprint

    code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (student, evaluate, probe))).hexdigest()
    return {"student": recipe.student, "student_kwargs": recipe.student_kwargs, "size": recipe.student_size,
            "mean": [float(v) for v in mean], "std": [float(v) for v in std], "seed": kw["seed"],
            "epochs": kw["epochs"], "k": kw["k"], "dataset": data.name, "test_fraction": data.test_fraction,
            "data_seed": data.seed,
            "train_data": data_fingerprint(data.train), "test_data": data_fingerprint(data.test),
            "device": torch.device(kw["device"]).type, "torch": torch.__version__, "timm": timm.__version__,
            "code_sha256": code}


def random_init_row(recipe: Recipe, mean, std, data, kw: dict) -> dict:
    """The probe row of ``recipe.student`` at random init (`distill.evaluate.probe_random_init`), computed
    once per `random_init_key` and reused after: it never changes for the same student, data, seed and probe
    settings, and costs a feature extraction of every probe image (22,000 for the quickstart, about 10% of its run).
    Kept in ``distill_cache_dir() / baselines / <sha256 of the key>.json`` with its key (compared in full on
    reading; written atomically); a reused row says so (``reused``: the file). An unreadable or unwritable file is
    ignored (the row is computed)."""
    from .atomic import atomic_write_json
    from .errors import WriteError
    from .teacher.prompt import distill_cache_dir

    key = random_init_key(recipe, mean, std, data, kw)
    path = distill_cache_dir() / BASELINES / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
                                              + ".json")
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key and isinstance(stored.get("row"), dict):
            _logger.info("random-init probe row reused from %s", path)
            return {**stored["row"], "reused": str(path)}
    except (OSError, ValueError, AttributeError):
        pass
    row = probe_random_init(recipe.student, recipe.student_size, mean, std, data, model_kwargs=recipe.student_kwargs,
                            name=f"{recipe.student} random init", **kw)
    try:
        atomic_write_json(path, {"key": key, "row": row})
    except (OSError, WriteError) as e:
        _logger.warning("random-init probe row not kept for reuse (%s)", e)
    return row
