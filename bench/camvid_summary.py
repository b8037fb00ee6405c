#!/usr/bin/env python
"""Summarise an ``OUT`` folder of bench/camvid_experiment.sh: ``OUT/summary.json`` and ``OUT/summary.md`` (the
segmentation table per fraction, arm and seed with means and the distilled - scratch difference, the teacher's
training time and loss, its dense probe, the distillation, wall times) and ``OUT/miou_fraction.png``.

    python bench/camvid_summary.py OUT
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def main(out: str) -> dict:
    from distill.atomic import atomic_write_json, atomic_write_text

    out = Path(out)
    s: dict = {"machine": (out / "machine.txt").read_text().strip() if (out / "machine.txt").is_file() else None}
    s["wall_seconds"] = {}
    if (out / "wall_times.txt").is_file():
        for line in (out / "wall_times.txt").read_text().splitlines():
            k, v = line.split()
            s["wall_seconds"][k] = int(v)
    t = _read(out / "teacher" / "training.json")
    loss_csv = out / "teacher.loss.csv"
    if t:
        rows = list(csv.DictReader(open(loss_csv))) if loss_csv.is_file() else []
        s["teacher"] = {k: t.get(k) for k in ("step", "planned_steps", "stopped_by_time_limit", "seconds", "loss_ema",
                                              "params", "images", "batch_size", "resolution", "mixed_precision",
                                              "device", "command")}
        s["teacher"]["file_mb"] = round(sum(p.stat().st_size for p in (out / "teacher").rglob("*") if p.is_file())
                                        / 2**20, 2)
        s["teacher"]["loss_csv"] = str(loss_csv)
        s["teacher"]["loss_first_100_mean"] = round(statistics.mean(float(r["loss"]) for r in rows[:100]), 5) \
            if rows else None
    s["teacher_probe"] = [{k: r[k] for k in ("label", "last_miou", "last_pixel_acc", "steps", "train_seconds")}
                          for r in (_read(p) for p in sorted((out / "teacher_probe").glob("*/result.json"))) if r]
    d = _read(out / "distill" / "summary.json")
    if d:
        s["distill"] = d
    runs = [r for r in (_read(p) for p in sorted((out / "seg").glob("*/*/result.json"))) if r]
    s["runs"] = [{k: r[k] for k in ("label", "model_kind", "fraction", "seed", "train_images", "steps", "batch_size",
                                    "last_miou", "last_pixel_acc", "best_miou", "per_class_iou", "train_seconds",
                                    "seconds", "test_images", "input_size")} for r in runs]
    table = []
    for f in sorted({r["fraction"] for r in runs}):
        row = {"fraction": f}
        for kind in ("exported", "timm"):
            rs = [r for r in runs if r["fraction"] == f and r["model_kind"] == kind]
            if rs:
                row[kind] = {"miou": [r["last_miou"] for r in sorted(rs, key=lambda r: r["seed"])],
                             "pixel_acc": [r["last_pixel_acc"] for r in sorted(rs, key=lambda r: r["seed"])],
                             "seeds": sorted(r["seed"] for r in rs),
                             "miou_mean": round(statistics.mean(r["last_miou"] for r in rs), 2),
                             "pixel_acc_mean": round(statistics.mean(r["last_pixel_acc"] for r in rs), 2)}
        if "exported" in row and "timm" in row:
            row["miou_diff"] = round(row["exported"]["miou_mean"] - row["timm"]["miou_mean"], 2)
        table.append(row)
    s["table"] = table
    atomic_write_json(out / "summary.json", s)

    md = ["# CamVid: distilled vs scratch ResNet-18 (bench/camvid_experiment.sh)", "", f"machine: {s['machine']}", ""]
    if t:
        tt = s["teacher"]
        md += [f"teacher: UNet2DModel {tt['params'] / 1e6:.2f}M params at {tt['resolution']} px, {tt['step']} of "
               f"{tt['planned_steps']} steps of {tt['batch_size']} on {tt['images']} frames in {tt['seconds']} s, "
               f"smoothed loss {tt['loss_ema']} (first 100 steps {tt['loss_first_100_mean']}), "
               f"{tt['file_mb']} MB on disk" + (" **stopped by the time limit**" if tt["stopped_by_time_limit"]
                                                else ""),
               ""]
    for p in s["teacher_probe"]:
        md.append(f"- {p['label']}: mIoU {p['last_miou']:.2f}, pixel acc {p['last_pixel_acc']:.2f} ({p['steps']} "
                  f"steps, {p['train_seconds']} s)")
    if d:
        md += ["", f"distillation: {d.get('steps')} steps, {d.get('train_seconds', d.get('seconds'))} s, final losses "
               f"{d.get('final_losses')}", ""]
    md += ["| masks | arm | mIoU per seed | mean mIoU | pixel acc per seed | mean pixel acc |",
           "|---|---|---|---|---|---|"]
    for row in table:
        for kind, name in (("exported", "distilled"), ("timm", "scratch")):
            if kind in row:
                r = row[kind]
                md.append(f"| {100 * row['fraction']:g}% | {name} | {' / '.join(f'{v:.2f}' for v in r['miou'])} | "
                          f"**{r['miou_mean']:.2f}** | {' / '.join(f'{v:.2f}' for v in r['pixel_acc'])} | "
                          f"{r['pixel_acc_mean']:.2f} |")
        if "miou_diff" in row:
            md.append(f"| {100 * row['fraction']:g}% | distilled - scratch | | {row['miou_diff']:+.2f} | | |")
    md += ["", "wall times (s): " + ", ".join(f"{k} {v}" for k, v in s["wall_seconds"].items()), ""]
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return s


if __name__ == "__main__":
    main(sys.argv[1])
