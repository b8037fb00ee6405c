"""Collect run directories into a Markdown report and PNG plots.

Inputs are directories of ``distill train`` / ``distill run`` (``metrics.csv``, and ``results.json`` with probe
rows) and of ``distill finetune`` (``result.json``); a directory holding such runs (a fine-tuning sweep) is searched.
Outputs, in ``-o/--output-dir``:

* ``report.md``: distillation runs (final loss terms, probes), probes of teacher / distilled / random init, and
  fine-tuning accuracy per (model, label fraction): mean and min-max over seeds, with the difference to scratch;
* ``loss_curves.png``: distillation loss per term against step, one line per run;
* ``monitor.png``: the training monitor's kNN top-1 against step (runs with ``monitor_every``);
* ``finetune_fraction.png``: fine-tuning top-1 against label fraction, mean with a min-max band over seeds;
* ``probes.png``: linear / kNN probe top-1 of the teacher (``--teacher-probe``), distilled and random-init students;
* ``report.json``: the numbers of the tables.

An input file that cannot be read (a corrupted ``result.json``, an empty ``metrics.csv``, ...) is skipped with a
warning naming it; ``report.md`` and ``report.json`` (``skipped``) list what was skipped and why.
Plots use matplotlib's object API with the Agg canvas: no display and no pyplot global state.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .atomic import atomic_write_json, atomic_write_text, writing
from .errors import option
from .evaluate import RESULTS_FILE, read_results
from .integrity import error_text, read_json
from .rundir import METRICS, MONITOR, SUMMARY, read_metrics, read_summary
from .teacher import feature_key
from .plots import pct, plot_fraction, plot_loss_curves, plot_monitor, plot_probes
from .segment.report import segmentation_section
from .tune import RESULT_FILE, read_result
from .tune.sweep import budget_label, group_by_label_fraction, seed_stats

_logger = logging.getLogger(__name__)

# metrics.csv columns that are not loss terms
NON_LOSS_COLUMNS = ("step", "lr", "grad_norm", "img_per_s", "skipped", "monitor_knn_top1")


@dataclass
class DistillRun:
    path: Path
    name: str
    metrics: dict[str, list[float]] = field(default_factory=dict)  # column -> values (NaN where empty)
    probes: list[dict] = field(default_factory=list)  # results.json rows
    info: dict = field(default_factory=dict)  # results.json / summary.json extras
    monitor: dict[str, list[float]] = field(default_factory=dict)  # monitor.csv (training monitor) columns

    @property
    def loss_terms(self) -> list[str]:
        return [c for c in self.metrics if c not in NON_LOSS_COLUMNS]


# ----------------------------------------------------------------------------------------------- reading
def _is_finetune(d: Path) -> bool:
    return (d / RESULT_FILE).is_file()


def _is_distill(d: Path) -> bool:
    return (d / METRICS).is_file() or (d / RESULTS_FILE).is_file()


def discover(paths: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """(distillation run dirs, fine-tuning run dirs) among ``paths`` and, for a path that is neither, below it."""
    distill_runs, finetune_runs = [], []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"run directory '{p}' does not exist.")
        if p.is_file():
            p = p.parent
        if _is_finetune(p) or _is_distill(p):
            found = [p]
        else:
            found = sorted({f.parent for pat in (RESULT_FILE, METRICS, RESULTS_FILE) for f in p.rglob(pat)
                            if not any(part.startswith(("checkpoint-", ".tmp")) for part in f.relative_to(p).parts)})
        for d in found:
            (finetune_runs if _is_finetune(d) else distill_runs).append(d)
    dedup = lambda xs: list(dict.fromkeys(x.resolve() for x in xs))  # noqa: E731
    distill_runs, finetune_runs = dedup(distill_runs), dedup(finetune_runs)
    if not distill_runs and not finetune_runs:
        raise ValueError(f"no runs found in {list(paths)}: give directories of `distill train`/`distill run` "
                         f"(metrics.csv, results.json) or of `distill finetune` (result.json).")
    return distill_runs, finetune_runs


def _short_names(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(p) for p in paths])) if len(paths) > 1 else paths[0].parent
    return [str(p.relative_to(common)) if p != common else p.name for p in paths]


def _read_or_skip(path: Path, read: Callable, skipped: list):
    """``read(path)``, or None when the file cannot be read: then ``(path, reason)`` is added to ``skipped`` and a
    warning names the file."""
    try:
        return read(path)
    except (OSError, ValueError, KeyError, TypeError, csv.Error) as e:  # UnicodeDecodeError, JSON errors: ValueError
        reason = error_text(e, 300).replace(f"'{path}' ", "", 1)
        skipped.append({"path": str(path), "reason": reason})
        _logger.warning("report: skipping '%s': %s", path, reason)
        return None


def load_distill_runs(dirs: list[Path], skipped: Optional[list] = None) -> list[DistillRun]:
    """The distillation runs of ``dirs``; an unreadable ``metrics.csv``/``results.json``/``summary.json`` is
    skipped with a warning (added to ``skipped``), and a run with nothing readable is left out."""
    skipped = [] if skipped is None else skipped
    runs = []
    for d, name in zip(dirs, _short_names(dirs)):
        run = DistillRun(d, name)
        if (d / METRICS).is_file():
            run.metrics = _read_or_skip(d / METRICS, read_metrics, skipped) or {}
        if (d / MONITOR).is_file():  # same CSV layout (a step column)
            run.monitor = _read_or_skip(d / MONITOR, read_metrics, skipped) or {}
        data = _read_or_skip(d / RESULTS_FILE, read_results, skipped) if (d / RESULTS_FILE).is_file() else None
        if data is not None:
            run.probes = list(data.get("results", []))
            run.info = {k: v for k, v in data.items() if k != "results"}
        elif (d / SUMMARY).is_file():
            summary = _read_or_skip(d / SUMMARY, read_summary, skipped)
            run.info = {"train_summary": summary} if summary is not None else {}
        if run.metrics or run.probes or run.info:
            runs.append(run)
    return runs


def load_finetune_results(dirs: list[Path], skipped: Optional[list] = None) -> list[dict]:
    """The ``result.json`` of each fine-tuning run in ``dirs`` (with ``_dir``); an unreadable one is skipped with a
    warning (added to ``skipped``)."""
    skipped = [] if skipped is None else skipped
    out = []
    for d in dirs:
        r = _read_or_skip(d / RESULT_FILE, lambda p: read_result(p.parent), skipped)
        if r is not None and r.get("stopped"):  # a partial run would pass for a finished one in the tables
            reason = f"stopped by {r['stopped']} after step {r.get('steps_done')} of {r.get('steps')} (not finished)"
            skipped.append({"path": str(d / RESULT_FILE), "reason": reason})
            _logger.warning("report: skipping '%s': %s", d / RESULT_FILE, reason)
        elif r is not None:
            out.append({**r, "_dir": str(d)})
    return out


def load_teacher_probe(path: str) -> list[dict]:
    """Probe rows from a teacher probe JSON (``tools/probe_teacher.py``: best of ``trained`` and ``untrained``),
    a ``results.json`` (``{'results': [...]}``) or a ``distill probe --json`` list."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{option('teacher_probe')} '{p}' does not exist (e.g. "
                                f"distill/teacher/packaged/fashion-mnist-ddpm/probe.json).")
    data = read_json(p, option("teacher_probe"))
    if isinstance(data, dict) and "trained" in data:
        teacher = data.get("teacher", p.parent.name)
        rows = []
        for key, what in (("trained", f"teacher {teacher}"), ("untrained", f"teacher {teacher} untrained")):
            cands = data.get(key) or []
            if not cands:
                continue
            best = max(cands, key=lambda r: r["linear_top1"])
            where = feature_key(best["block"], best.get("timestep")) if "block" in best else "best"
            rows.append({"name": f"{what} ({where}, best of {len(cands)})", "linear_top1": best["linear_top1"],
                         "knn_top1": best.get("knn_top1"), "num_train": data.get("train_images"),
                         "num_test": data.get("test_images"), "source": str(p)})
        return rows
    rows = data.get("results", []) if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "linear_top1" in r for r in rows):
        raise ValueError(f"{option('teacher_probe')} '{p}' is not a probe JSON: expected 'trained' rows "
                         f"(tools/probe_teacher.py), a results.json or a `distill probe --json` list.")
    return [{**r, "name": r.get("name", "teacher"), "source": str(p)} for r in rows]


# ----------------------------------------------------------------------------------------------- numbers

def summarize_finetune(results: list[dict]) -> list[dict]:
    """One row per (label, fraction): statistics over seeds of last/best top-1 and last top-5, plus the
    difference of the mean last top-1 to the scratch run(s) of the same fraction and budget."""
    rows = []
    for (label, frac), rs in group_by_label_fraction(results).items():
        rows.append({
            "label": label, "fraction": frac, "model_kind": rs[0].get("model_kind"),
            "architecture": rs[0].get("architecture"), "seeds": [r["seed"] for r in rs],
            "train_images": sorted({r.get("train_images") for r in rs}, key=str),
            "steps": sorted({r.get("steps") for r in rs}, key=str),
            "budget": sorted({budget_label(r) for r in rs}),
            "last_top1": seed_stats([r["last_top1"] for r in rs]),
            "best_top1": seed_stats([r["best_top1"] for r in rs]),
            "last_top5": seed_stats([r.get("last_top5", math.nan) for r in rs]),
        })
    order = {lab: i for i, lab in enumerate(dict.fromkeys(r["label"] for r in sorted(
        results, key=lambda r: (r.get("model_kind") == "timm", r["label"]))))}
    rows.sort(key=lambda r: (order[r["label"]], r["fraction"]))
    for row in rows:  # compare with scratch at the same fraction and the same budget
        scratch = [s for s in rows if s["model_kind"] == "timm" and s["fraction"] == row["fraction"]
                   and s["budget"] == row["budget"] and s is not row]
        row["vs_scratch"] = (row["last_top1"]["mean"] - scratch[0]["last_top1"]["mean"]
                             if row["model_kind"] != "timm" and len(scratch) == 1 else None)
        row["scratch_label"] = scratch[0]["label"] if row["vs_scratch"] is not None else None
    return rows


def budget_warnings(results: list[dict]) -> list[str]:
    by_frac: dict[float, set] = {}
    for r in results:
        by_frac.setdefault(float(r["fraction"]), set()).add(budget_label(r))
    return [f"label fraction {pct(f)}: runs differ in budget ({'; '.join(sorted(b))}), so they are not compared"
            for f, b in sorted(by_frac.items()) if len(b) > 1]


def probe_rows(runs: list[DistillRun], teacher_rows: Optional[list[dict]] = None) -> list[dict]:
    rows = [dict(r, source=r.get("source", "teacher probe")) for r in (teacher_rows or [])]
    prefix = len([r for r in runs if r.probes]) > 1
    for run in runs:
        for r in run.probes:
            rows.append({**r, "name": f"{run.name}: {r['name']}" if prefix else r["name"], "source": str(run.path)})
    return rows


# ----------------------------------------------------------------------------------------------- formatting
def _fmt(v, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}"


def _fmt_loss(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.4g}"


def _last_finite(values: list[float]) -> float:
    for v in reversed(values):
        if not math.isnan(v):
            return v
    return math.nan


def distill_table(runs: list[DistillRun]) -> str:
    terms = list(dict.fromkeys(t for r in runs for t in r.loss_terms))
    lines = ["| run | steps | " + " | ".join(f"final {t}" for t in terms) + " | img/s | probes (linear / kNN top-1) |",
             "|---|---|" + "---|" * len(terms) + "---|---|"]
    for r in runs:
        steps = _last_finite(r.metrics.get("step", [])) if r.metrics else math.nan
        final = [_fmt_loss(_last_finite(r.metrics[t])) if t in r.metrics else "-" for t in terms]
        ips = _last_finite(r.metrics.get("img_per_s", [])) if r.metrics else math.nan
        probes = "; ".join(f"{p['name']}: {_fmt(p.get('linear_top1'))} / {_fmt(p.get('knn_top1'))}" for p in r.probes)
        lines.append(f"| {r.name} | {_fmt(steps, 0)} | " + " | ".join(final) + f" | {_fmt(ips, 1)} | {probes or '-'} |")
    return "\n".join(lines)


def probe_table(rows: list[dict]) -> str:
    """Markdown table of frozen-feature probes, with the weights each was measured on (EMA or live, as the model
    card says) and, under it, what each was tested on (``results.json``'s ``test`` line) when the rows say."""
    lines = ["| model | linear top-1 | kNN top-1 | probe train / test images | weights |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {_fmt(r.get('linear_top1'))} | {_fmt(r.get('knn_top1'))} | "
                     f"{r.get('num_train') or '-'} / {r.get('num_test') or '-'} | {r.get('weights') or '-'} |")
    tested = list(dict.fromkeys(str(r["test"]) for r in rows if r.get("test")))
    return "\n".join(lines + (["", "; ".join(tested) + "."] if tested else []))


def finetune_table(rows: list[dict]) -> str:
    lines = ["| model | label fraction | train images | seeds | steps | top-1 last: mean (min-max) | vs scratch | "
             "top-1 best: mean | top-5 last: mean |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["last_top1"]
        vs = "-" if r["vs_scratch"] is None else f"{r['vs_scratch']:+.2f}"
        lines.append(
            f"| {r['label']} | {pct(r['fraction'])} | {', '.join(map(str, r['train_images']))} | "
            f"{len(r['seeds'])} | {', '.join(map(str, r['steps']))} | **{s['mean']:.2f}** ({s['min']:.2f}-"
            f"{s['max']:.2f}) | {vs} | {r['best_top1']['mean']:.2f} | {_fmt(r['last_top5']['mean'])} |")
    return "\n".join(lines)


def finetune_runs_table(results: list[dict]) -> str:
    lines = ["| model | fraction | seed | train images | steps | top-1 last | top-1 best (step) | top-5 last | "
             "seconds | directory |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["label"], r["fraction"], r["seed"])):
        lines.append(f"| {r['label']} | {pct(r['fraction'])} | {r['seed']} | {r.get('train_images', '-')} | "
                     f"{r.get('steps', '-')} | {r['last_top1']:.2f} | {r['best_top1']:.2f} ({r.get('best_step', '-')})"
                     f" | {_fmt(r.get('last_top5'))} | {r.get('seconds', '-')} | {r['_dir']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- report
def _no_nan(x):
    """NaN -> None, so report.json is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def write_report(paths: Sequence[str], out: str, teacher_probe: Optional[str] = None,
                 title: str = "distill report") -> dict:
    """Read the runs under ``paths``, write ``report.md``, ``report.json`` and the PNGs to ``out``; returns
    ``{'report', 'plots', 'finetune', 'probes', 'distill_runs', 'skipped'}``; unreadable input files are skipped with
    a warning and listed in ``skipped``.

    Raises:
        ValueError: no runs found, or none of them readable (the skipped files are named).
    """
    distill_dirs, finetune_dirs = discover(paths)
    skipped: list[dict] = []
    runs = load_distill_runs(distill_dirs, skipped)
    results = load_finetune_results(finetune_dirs, skipped)
    if not runs and not results:
        raise ValueError(f"no readable runs in {list(paths)}: " + "; ".join(f"'{s['path']}': {s['reason']}"
                                                                          for s in skipped))
    seg_results = [r for r in results if r.get("task") == "segmentation"]
    results = [r for r in results if r.get("task") != "segmentation"]
    teacher_rows = load_teacher_probe(teacher_probe) if teacher_probe else []
    ft_rows = summarize_finetune(results)
    p_rows = probe_rows(runs, teacher_rows)
    out_p = Path(out).expanduser()
    with writing("the report", out_p):
        out_p.mkdir(parents=True, exist_ok=True)
    plots = {
        "loss_curves": plot_loss_curves(runs, out_p / "loss_curves.png"),
        "monitor": plot_monitor(runs, out_p / "monitor.png"),
        "finetune_fraction": plot_fraction(ft_rows, out_p / "finetune_fraction.png"),
        "probes": plot_probes(p_rows, out_p / "probes.png"),
    }
    md = [f"# {title}", ""]
    if runs:
        md += ["## Distillation runs", "", distill_table(runs), ""]
        if plots["loss_curves"]:
            md += ["![distillation loss per term](loss_curves.png)", ""]
        if plots["monitor"]:
            md += ["![training monitor: kNN top-1 against step](monitor.png)", ""]
    if p_rows:
        md += ["## Probes: teacher, distilled student, random init", "",
               "Frozen features; each row's own probe protocol (see its source). Compare rows with the same "
               "probe train/test images.", "", probe_table(p_rows), ""]
        if plots["probes"]:
            md += ["![probe accuracy](probes.png)", ""]
    if results:
        warn = budget_warnings(results)
        md += ["## Fine-tuning with a fraction of the labels", "",
               "Test top-1 on the full test split after the last step (mean, min-max over seeds); 'vs scratch' is "
               "the difference of the means to the random-init run with the same fraction and budget. 'best' is "
               "the best of the periodic evaluations on the test split (optimistic).", "",
               finetune_table(ft_rows), ""]
        md += [f"Note: {w}." for w in warn] + ([""] if warn else [])
        if plots["finetune_fraction"]:
            md += ["![accuracy vs label fraction](finetune_fraction.png)", ""]
        budgets = sorted({budget_label(r) for r in results})
        md += [f"Budget: {'; '.join(budgets)}.", "", "### Runs", "", finetune_runs_table(results), ""]
    seg_md, seg_plots, seg_rows = segmentation_section(seg_results, out_p) if seg_results else ([], {}, [])
    md, plots = md + seg_md, {**plots, **seg_plots}
    if skipped:
        md += ["## Skipped (unreadable)", ""] + [f"- `{s['path']}`: {s['reason']}" for s in skipped] + [""]
    report_md = atomic_write_text(out_p / "report.md", "\n".join(md))
    summary = {"report": str(report_md), "plots": {k: str(v) if v else None for k, v in plots.items()},
               "finetune": ft_rows, "segmentation": seg_rows, "probes": p_rows, "skipped": skipped,
               "distill_runs": [{"name": r.name, "path": str(r.path), "loss_terms": r.loss_terms,
                                 "final": {t: _last_finite(r.metrics[t]) for t in r.loss_terms},
                                 "probes": r.probes} for r in runs]}
    atomic_write_json(out_p / "report.json", _no_nan(summary), default=str)
    return summary
