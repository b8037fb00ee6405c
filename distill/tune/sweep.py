"""Many fine-tuning runs of one task: one per (fraction, seed), each in ``OUT/frac{F}-seed{S}/``, all checked before
the first."""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import option, renamed
from ..logs import count
from .config import TuneConfig
from .outdir import RESULT_FILE, read_result


def run_dir_name(fraction: float, seed: int) -> str:
    """The sub-directory of one sweep run: ``frac{fraction:g}-seed{seed}`` (``frac0.1-seed0``, ``frac1-seed2``)."""
    return f"frac{float(fraction):g}-seed{seed}"


def sweep(cfg: TuneConfig, output_dir: str, fractions: Sequence[float], seeds: Sequence[int], run: Callable,
          overwrite: bool = False, skip_existing: bool = False, progress: bool = True,
          on_result: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """One run per (fraction, seed) in ``output_dir/frac{F}-seed{S}/``; everything is checked before the first
    run, so a bad fraction or an existing result fails at once instead of after hours. ``run``: the function of one
    run (`distill.finetune.finetune`, `distill.segment.segment_finetune`).

    Raises:
        ValueError: no fractions or seeds, duplicates, or a setting ``validate`` refuses.
        FileExistsError: results exist and neither ``overwrite`` nor ``skip_existing`` is set.
    """
    if not fractions or not seeds:
        raise ValueError(f"{option('fractions')} and {option('seeds')} need at least one value each.")
    runs = [(f, s) for f in fractions for s in seeds]
    for f, s in runs:
        run_cfg = dataclasses.replace(cfg, fraction=f, seed=s)
        with renamed({"fraction": "fractions", "seed": "seeds"}):  # a bad fraction is one of --fractions here
            run_cfg.validate()
    if len(set(map(lambda r: run_dir_name(*r), runs))) != len(runs):
        raise ValueError(f"{option('fractions')} {list(fractions)} / {option('seeds')} {list(seeds)} contain "
                         "duplicates.")
    out = Path(output_dir)
    existing = [run_dir_name(f, s) for f, s in runs if (out / run_dir_name(f, s) / RESULT_FILE).exists()]
    if existing and not (overwrite or skip_existing):
        raise FileExistsError(f"'{out}' already holds results for {', '.join(existing)}; pass "
                              f"{option('overwrite', flag=True)} to replace them, {option('skip_existing', flag=True)} "
                              f"to run only the missing ones, or choose another {option('output_dir')}.")
    results = []
    for f, s in runs:
        sub = out / run_dir_name(f, s)
        if skip_existing and not overwrite and (sub / RESULT_FILE).exists():
            r = read_result(sub)
        else:
            r = run(dataclasses.replace(cfg, fraction=f, seed=s), str(sub), overwrite=overwrite, progress=progress)
        results.append(r)
        if on_result:
            on_result(r)
    return results


def budget_label(r: dict, with_decoder: bool = False) -> str:
    """What must match for a fair comparison of two fine-tunes, from a ``result.json`` dict: steps, batch, input
    size (px), augmentation, optimizer, lr and, for segmentation, the decoder; e.g. ``"1 step x 8, 90px, crop-flip,
    adamw lr 0.001"``."""
    steps = r.get("steps")
    steps = count(steps, "step") if isinstance(steps, int) else f"{steps} steps"
    text = (f"{steps} x {r.get('batch_size')}, {r.get('input_size')}px, {r.get('augment')}, "
            f"{r.get('optimizer')} lr {r.get('lr')}")
    return text + (f", {r.get('decoder')} decoder" if with_decoder else "")


def seed_stats(values: Sequence[float]) -> dict:
    """Mean, min, max, sample standard deviation (0 for one value) and count of one metric over seeds.

    Raises:
        ValueError: ``values`` is empty (``min`` of an empty sequence).
    """
    values = list(values)
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def group_by_label_fraction(results: Sequence[dict]) -> dict[tuple, list[dict]]:
    """The results of a sweep grouped by ``(label, fraction)`` (the seeds of one setting), each group sorted by
    seed, in the order the groups first appear. ``results`` are ``result.json`` dicts (`read_result`)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["label"], float(r["fraction"])), []).append(r)
    return {key: sorted(rs, key=lambda r: r["seed"]) for key, rs in groups.items()}
