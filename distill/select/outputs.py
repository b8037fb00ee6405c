"""What a selection leaves behind: CSV/JSON/YAML/PNG files (all written atomically) and the Markdown summary.

``grid.csv``, ``grid.json``, ``grid_heatmap.png``, ``best_grid.yaml`` from the grid probe; ``label_free.csv``,
``label_free.json``, ``best_label_free.yaml`` and, ranked against a grid, ``ranking.png`` from the label-free
scores. The ``best_*.yaml`` files hold recipe keys (``teacher``, ``teacher_blocks``, ``timesteps``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from ..atomic import atomic_write_csv, atomic_write_json, atomic_write_text
from ..plots import grid_heatmap, ranking_scatter
from ..teacher import feature_key
from .label_free import rank_correlation


@dataclass
class SelectionResult:
    """What `distill.select.run_selection` returns.

    Attributes:
        report: the content of ``select.json`` (teacher, blocks, timesteps, dataset, and per method its summary).
        out_dir: the directory holding the files.
        methods: the methods run, in order (``'grid'``, ``'label-free'``).
        grid: `distill.select.grid_probe`'s result (rows best first, plus ``scored_on``), or None.
        label_free: the label-free rows, best first (with ``rank`` and, ranked against a grid, ``probe_top1``),
            or None.
    """

    report: dict
    out_dir: Path
    methods: list
    grid: Optional[dict] = None
    label_free: Optional[list] = None


def write_rows_csv(rows: list[dict], path) -> None:
    """Write dict rows (union of keys, first row's order first) as CSV, atomically; a missing key is blank."""
    fields = list(dict.fromkeys(list(rows[0]) + [k for r in rows for k in r if k not in rows[0]]))
    atomic_write_csv(path, fields, ([r.get(k, "") for k in fields] for r in rows))


def _write_best_yaml(path: Path, teacher_name: str, best: dict) -> None:
    atomic_write_text(path, yaml.safe_dump(
        {"teacher": teacher_name, "teacher_blocks": [best["block"]], "timesteps": [int(best["timestep"])]},
        sort_keys=False))


def write_grid_outputs(result: dict, out_dir, teacher_name: str) -> dict:
    """grid.csv, grid.json, grid_heatmap.png and best_grid.yaml (recipe keys) in ``out_dir``; returns their paths
    (``{'csv', 'heatmap', 'best'}``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(result["rows"], out / "grid.csv")
    grid_heatmap(result["rows"], out / "grid_heatmap.png",
                 title=f"linear probe top-1 on {result['test_images']} held-out images", blocks=result.get("blocks"))
    _write_best_yaml(out / "best_grid.yaml", teacher_name, result["best"])
    atomic_write_json(out / "grid.json", result)
    return {"csv": str(out / "grid.csv"), "heatmap": str(out / "grid_heatmap.png"), "best": str(out / "best_grid.yaml")}


def write_label_free_outputs(rows: list[dict], out_dir, teacher_name: str, grid_rows=None) -> dict:
    """label_free.csv, label_free.json, best_label_free.yaml and, with ``grid_rows``, ranking.png + the Spearman
    correlation.

    Adds ``rank`` (1 = best) to every row and, with ``grid_rows``, ``probe_top1`` (the grid's accuracy of that
    candidate, None where the grid lacks it). Returns the comparison with the grid (empty without one, or with fewer
    than 2 shared candidates): ``{'spearman', 'candidates_compared', 'label_free_pick', 'label_free_pick_probe_top1',
    'grid_best', 'grid_best_probe_top1', 'ranking_png'}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra: dict = {}
    if grid_rows:
        acc = {feature_key(r["block"], int(r["timestep"])): float(r["linear_top1"]) for r in grid_rows}
        score = {feature_key(r["block"], int(r["timestep"])): -float(r["score"]) for r in rows}
        common = sorted(set(acc) & set(score))
        if len(common) >= 2:
            rho = rank_correlation({k: score[k] for k in common}, {k: acc[k] for k in common})
            pick = feature_key(rows[0]["block"], int(rows[0]["timestep"]))
            best_key = max(common, key=lambda k: acc[k])
            extra = {"spearman": round(rho, 4), "candidates_compared": len(common),
                     "label_free_pick": pick, "label_free_pick_probe_top1": acc.get(pick),
                     "grid_best": best_key, "grid_best_probe_top1": acc[best_key]}
            for r in rows:
                r["probe_top1"] = acc.get(feature_key(r["block"], int(r["timestep"])))
            ranking_scatter(rows, grid_rows, out / "ranking.png", spearman=rho)
            extra["ranking_png"] = str(out / "ranking.png")
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    write_rows_csv(rows, out / "label_free.csv")
    _write_best_yaml(out / "best_label_free.yaml", teacher_name, rows[0])
    atomic_write_json(out / "label_free.json", {"rows": rows, **extra})
    return extra


def yaml_value(path, key) -> str:
    """The list under ``key`` of the YAML file ``path``, comma-joined (``'mid_block'``, ``'1, 11'``)."""
    return ", ".join(str(v) for v in yaml.safe_load(Path(path).read_text())[key])


def format_selection(result: SelectionResult) -> str:
    """The Markdown summary ``distill select`` prints: each method's table and cost, the label-free ranking against
    the grid, and each method's pick as ``--set`` overrides for ``distill train``."""
    report, res, rows = result.report, result.grid, result.label_free
    lines = [f"selection of {report['teacher']} on {report['device']}"] if report.get("device") else []
    if res is not None:
        lines += [f"\n## grid probe: {res['train_images']} train images x {res['epochs']} epochs, scored on "
                  f"{res['test_images']} {res['scored_on']} images; {res['teacher_forwards']} teacher forwards "
                  f"({res['image_forwards']} image-timestep evaluations), {res['seconds']} s",
                  "| block | t | linear top-1 |\n|---|---|---|"]
        lines += [f"| {r['block']} | {r['timestep']} | {r['linear_top1']:.2f} |" for r in res["rows"]]
    if rows is not None:
        lf = report["label_free"]
        lines += [f"\n## label-free: {rows[0]['images']} images x 2 noisings; {rows[0]['teacher_forwards']} teacher "
                  f"forwards ({lf['image_forwards']} image-timestep evaluations), {rows[0]['seconds_total']} s",
                  "| rank | block | t | alignment | uniformity | score | probe top-1 |\n|---|---|---|---|---|---|---|"]
        lines += [f"| {r['rank']} | {r['block']} | {r['timestep']} | {r['alignment']:.4f} | {r['uniformity']:.4f} | "
                  f"{r['score']:.4f} | {r.get('probe_top1') if r.get('probe_top1') is not None else '-'} |"
                  for r in rows]
        if "spearman" in lf:
            lines.append(f"\nSpearman(label-free, probe) = {lf['spearman']:.3f}; label-free pick "
                         f"{lf['label_free_pick']} probes {lf['label_free_pick_probe_top1']:.2f} vs grid best "
                         f"{lf['grid_best']} {lf['grid_best_probe_top1']:.2f}")
            if "compute_ratio_vs_grid" in lf:
                lines.append(f"compute: label-free {lf['image_forwards']} vs grid {report['grid']['image_forwards']} "
                             f"image-timestep evaluations (ratio {lf['compute_ratio_vs_grid']:.3f})")
    for m in result.methods:
        f = Path(result.out_dir) / f"best_{m.replace('-', '_')}.yaml"
        lines.append(f"\n{m} pick ({f}):\n{f.read_text().strip()}\nuse it: distill train RECIPE -o RUN --set "
                     f"teacher_blocks=[{yaml_value(f, 'teacher_blocks')}] timesteps=[{yaml_value(f, 'timesteps')}]")
    return "\n".join(lines)
