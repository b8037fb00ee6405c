"""The segmentation section of ``distill report``: mIoU and pixel accuracy per (model, fraction of the training
masks), mean and min-max over seeds, the difference to scratch at the same fraction and budget, per-class IoU, and
``segmentation_fraction.png`` (mIoU against the fraction of masks, distilled vs scratch)."""
from __future__ import annotations

import statistics
from pathlib import Path

from ..plots import pct, plot_fraction
from ..tune.sweep import budget_label, group_by_label_fraction, seed_stats


def summarize_segmentation(results: list[dict]) -> list[dict]:
    """One row per (label, fraction): statistics over seeds of the last mIoU and pixel accuracy, the mean per-class
    IoU, and ``vs_scratch`` (mean mIoU minus the one scratch (``timm``) row of the same fraction and budget)."""
    rows = []
    for (label, frac), rs in group_by_label_fraction(results).items():
        classes = list(rs[0].get("per_class_iou", {}))
        rows.append({"label": label, "fraction": frac, "model_kind": rs[0].get("model_kind"),
                     "seeds": [r["seed"] for r in rs], "train_images": sorted({r.get("train_images") for r in rs}),
                     "budget": sorted({budget_label(r, with_decoder=True) for r in rs}), "eval_split": rs[0].get("eval_split"),
                     "last_miou": seed_stats([r["last_miou"] for r in rs]),
                     "last_pixel_acc": seed_stats([r["last_pixel_acc"] for r in rs]),
                     "per_class_iou": {c: round(statistics.fmean(r["per_class_iou"][c] for r in rs), 2)
                                       for c in classes}})
    rows.sort(key=lambda r: (r["model_kind"] == "teacher", r["model_kind"] == "timm", r["label"], r["fraction"]))
    for row in rows:
        scratch = [s for s in rows if s["model_kind"] == "timm" and s["fraction"] == row["fraction"]
                   and s["budget"] == row["budget"] and s is not row]
        row["vs_scratch"] = (row["last_miou"]["mean"] - scratch[0]["last_miou"]["mean"]
                             if row["model_kind"] == "exported" and len(scratch) == 1 else None)
    return rows


def segmentation_section(results: list[dict], out: Path) -> tuple[list[str], dict, list[dict]]:
    """``(Markdown lines, {'segmentation_fraction': png or None}, summary rows)`` for ``results`` (``result.json``
    dicts of ``distill finetune --task segmentation`` with ``_dir``)."""
    rows = summarize_segmentation(results)
    plot = plot_fraction([r for r in rows if r["model_kind"] != "teacher"], out / "segmentation_fraction.png",
                         metric="last_miou", ylabel="mIoU (%), last step",
                         xlabel="fraction of the training masks (log scale)",
                         title="segmentation: mean and min-max over seeds")
    md = ["## Segmentation with a fraction of the masks", "",
          f"mIoU and pixel accuracy on the whole {rows[0]['eval_split']} split after the last step (mean, min-max over "
          "seeds); 'vs scratch' is the difference of the mean mIoU to the random-init run with the same fraction "
          "and budget. Teacher rows are dense linear probes of the teacher's own frozen features.", "",
          "| model | masks | train images | seeds | mIoU: mean (min-max) | vs scratch | pixel acc: mean |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["last_miou"]
        vs = "-" if r["vs_scratch"] is None else f"{r['vs_scratch']:+.2f}"
        md.append(f"| {r['label']} | {pct(r['fraction'])} | {', '.join(map(str, r['train_images']))} | "
                  f"{len(r['seeds'])} | **{s['mean']:.2f}** ({s['min']:.2f}-{s['max']:.2f}) | {vs} | "
                  f"{r['last_pixel_acc']['mean']:.2f} |")
    classes = list(rows[0]["per_class_iou"])
    md += ["", "Per-class IoU (mean over seeds):", "", "| model | masks | " + " | ".join(classes) + " |",
           "|---|---|" + "---|" * len(classes)]
    md += [f"| {r['label']} | {pct(r['fraction'])} | " + " | ".join(f"{r['per_class_iou'].get(c, 0):.1f}"
                                                                      for c in classes) + " |" for r in rows]
    if plot:
        md += ["", "![mIoU vs fraction of masks](segmentation_fraction.png)"]
    md += ["", "Budget: " + "; ".join(sorted({budget_label(r, with_decoder=True) for r in results})) + ".", "", "Prediction grids (test "
           "images, ground truth, prediction in the dataset's palette): " + ", ".join(
               f"`{Path(r['_dir']) / 'predictions.png'}`" for r in results
               if (Path(r['_dir']) / 'predictions.png').is_file()) + ".", ""]
    return md, {"segmentation_fraction": plot}, rows
