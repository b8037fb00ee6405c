"""PNG plots: the package's one plotting convention, and the selection plots (grid heatmap, label-free vs probe
ranking, policy timestep histogram).

Every plot is a matplotlib `Figure` on an Agg canvas (object API, no pyplot state, no
display needed): `new_figure` makes one, `save_figure` writes it as a PNG atomically. Each plotting
function writes one PNG and returns its path.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Optional, Sequence

from .atomic import atomic_file

DPI = 110


def new_figure(w: float, h: float):
    """A ``w x h`` inch `Figure` on an Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, dpi: int = DPI) -> Path:
    """Lay ``fig`` out tightly and write it to ``path`` as a PNG, atomically; returns ``path``."""
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def grid_heatmap(rows: Sequence[dict], path, value: str = "linear_top1", title: str = "",
                 blocks: Sequence[str] | None = None) -> Path:
    """Blocks (rows: ``blocks`` order, default first seen) x timesteps (ascending) heatmap of ``value`` (DDAE Fig. 2)."""
    blocks = list(blocks or dict.fromkeys(r["block"] for r in rows))
    ts = sorted({int(r["timestep"]) for r in rows})
    grid = [[float("nan")] * len(ts) for _ in blocks]
    for r in rows:
        grid[blocks.index(r["block"])][ts.index(int(r["timestep"]))] = float(r[value])
    fig = new_figure(1.2 + 0.9 * len(ts), 1.0 + 0.55 * len(blocks))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(ts)), [str(t) for t in ts])
    ax.set_yticks(range(len(blocks)), blocks)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("teacher block")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color=text_color(im.cmap(im.norm(v))),
                        fontsize=8)
    fig.colorbar(im, ax=ax, label=value)
    ax.set_title(title or f"{value} per (block, timestep)")
    return save_figure(fig, path)


def text_color(rgba: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with a cell of colour ``rgba`` (components in [0, 1]): black on
    cells whose relative luminance (WCAG 2.x, sRGB) is above 0.179, where black's contrast ratio exceeds white's."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    luminance = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return "black" if luminance > 0.179 else "white"


def seeds_label(n: int) -> str:
    """``'1 seed'``, ``'3 seeds'``."""
    return f"{n} seed{'' if n == 1 else 's'}"


def ranking_scatter(label_free: Sequence[dict], probe: Sequence[dict], path, spearman: float | None = None) -> Path:
    """Label-free score (x, lower is better) against linear-probe accuracy (y) for the same (block, timestep)s."""
    from matplotlib import colormaps

    acc = {(r["block"], int(r["timestep"])): float(r["linear_top1"]) for r in probe}
    fig = new_figure(6, 4.5)
    ax = fig.subplots()
    blocks = list(dict.fromkeys(r["block"] for r in label_free))
    cmap = colormaps["tab10"]
    for r in label_free:
        k = (r["block"], int(r["timestep"]))
        if k not in acc:
            continue
        c = cmap(blocks.index(r["block"]) % 10)
        ax.scatter(float(r["score"]), acc[k], color=c, label=r["block"])
        ax.annotate(f"t{k[1]}", (float(r["score"]), acc[k]), fontsize=7, xytext=(3, 2), textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    ax.set_xlabel("label-free score = alignment + uniformity (lower = predicted better)")
    ax.set_ylabel("linear probe top-1 (%)")
    ax.set_title("label-free score vs probe accuracy" + (f" (Spearman {spearman:.2f})" if spearman is not None else ""))
    return save_figure(fig, path)


def policy_histogram(steps: Sequence[int], counts: Sequence[Sequence[float]], candidates: Sequence[int], path) -> Path:
    """Share of each candidate timestep among the policy's samples, per logging interval (stacked areas)."""
    import numpy as np

    c = np.asarray(counts, dtype=float)  # (intervals, K)
    share = c / np.clip(c.sum(1, keepdims=True), 1, None)
    fig = new_figure(11, 4)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    ax.stackplot(list(steps), share.T, labels=[f"t={t}" for t in candidates])
    ax.set_xlabel("training step")
    ax.set_ylabel("share of sampled timesteps")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("policy timestep histogram over training")
    half = max(1, len(c) // 5)
    ax2.bar([str(t) for t in candidates], c[:half].sum(0) / max(c[:half].sum(), 1), alpha=0.5, label="first 20%")
    ax2.bar([str(t) for t in candidates], c[-half:].sum(0) / max(c[-half:].sum(), 1), alpha=0.5, label="last 20%")
    ax2.set_xlabel("timestep")
    ax2.set_ylabel("share")
    ax2.legend(fontsize=7)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------- report plots
def pct(f: float) -> str:
    """A label fraction as a percentage: 0.01 -> '1%'."""
    return f"{100 * f:g}%"


def plot_loss_curves(runs: Sequence, path: Path) -> Optional[Path]:
    """One panel per loss term, loss against step, one line per run (log scale where all values are positive).

    ``runs``: objects with ``name``, ``metrics`` (column -> values, incl. ``step``) and ``loss_terms``. Returns
    ``path``, or None when no run has metrics."""
    runs = [r for r in runs if r.metrics and r.loss_terms]
    if not runs:
        return None
    terms = list(dict.fromkeys(t for r in runs for t in r.loss_terms))
    fig = new_figure(4.2 * len(terms), 3.4)
    axes = fig.subplots(1, len(terms), squeeze=False)[0]
    for ax, term in zip(axes, terms):
        positive = True
        for r in runs:
            if term in r.metrics:
                xs, ys = zip(*[(x, y) for x, y in zip(r.metrics["step"], r.metrics[term]) if not math.isnan(y)] or
                             [(math.nan, math.nan)])
                positive &= all(y > 0 for y in ys if not math.isnan(y))
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=r.name)
        if positive:
            ax.set_yscale("log")
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[-1].legend(fontsize=7)
    fig.suptitle("distillation loss per term")
    return save_figure(fig, path)


def plot_fraction(rows: list[dict], path: Path, metric: str = "last_top1",
                  ylabel: str = "test top-1 (%), last step", xlabel: str = "label fraction (log scale)",
                  title: str = "fine-tuning: mean and min-max over seeds") -> Optional[Path]:
    """Fine-tuning ``metric`` (top-1, or mIoU for segmentation) against label fraction (log x), mean with a min-max
    band over seeds, one line per model (rows of ``distill.report.summarize_finetune``, whose ``metric`` entries are
    ``{'mean', 'min', 'max', 'n'}``). Returns ``path``, or None without rows."""
    if not rows:
        return None
    fig = new_figure(6.0, 4.2)
    ax = fig.subplots()
    fractions = sorted({r["fraction"] for r in rows})
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = sorted((r for r in rows if r["label"] == label), key=lambda r: r["fraction"])
        xs = [r["fraction"] for r in rs]
        mean = [r[metric]["mean"] for r in rs]
        lo, hi = [r[metric]["min"] for r in rs], [r[metric]["max"] for r in rs]
        line, = ax.plot(xs, mean, marker="o", linestyle="--" if rs[0]["model_kind"] == "timm" else "-",
                        label=f"{label} ({seeds_label(max(r[metric]['n'] for r in rs))})")
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.vlines(xs, lo, hi, color=line.get_color(), alpha=0.6)
    ax.set_xscale("log")
    ax.set_xticks(fractions, [pct(f) for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_probes(rows: list[dict], path: Path) -> Optional[Path]:
    """Bars of linear and kNN probe top-1 (%) per model row, on a y axis from 0 (a truncated axis exaggerates
    differences), each model labelled with the number of training images its probes were fit on (``num_train``)
    and the title with the test images (``num_test``) when the rows carry them. Returns ``path``, or None without
    probe numbers."""
    rows = [r for r in rows if r.get("linear_top1") is not None]
    if not rows:
        return None
    fig = new_figure(max(5.0, 1.3 * len(rows) + 1.5), 4.4)
    ax = fig.subplots()
    w = 0.38
    xs = list(range(len(rows)))
    for off, key, name in ((-w / 2, "linear_top1", "linear probe"), (w / 2, "knn_top1", "kNN probe")):
        pts = [(x + off, r[key]) for x, r in zip(xs, rows) if r.get(key) is not None]
        if not pts:
            continue
        bars = ax.bar([p[0] for p in pts], [p[1] for p in pts], width=w, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(xs, [textwrap.fill(r["name"], 22) + (f"\nfit on {int(r['num_train']):,} images"
                                                          if r.get("num_train") else "") for r in rows], fontsize=7)
    ax.set_ylim(0, 108)  # from 0, with room for the bar labels above 100
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("test top-1 (%)")
    tests = {int(r["num_test"]) for r in rows if r.get("num_test")}
    ax.set_title("frozen-feature probes" + (f" (tested on {tests.pop():,} images)" if len(tests) == 1 else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_monitor(runs: Sequence, path: Path) -> Optional[Path]:
    """The training monitor: kNN top-1 (percent) of the student's pooled features against step, one line per run,
    the y axis from 0 to 100 (not truncated).

    ``runs``: objects with ``name`` and ``monitor`` (``monitor.csv`` columns -> values, incl. ``step`` and
    ``knn_top1``). Returns ``path``, or None when no run was monitored."""
    runs = [r for r in runs if getattr(r, "monitor", None) and r.monitor.get("knn_top1")]
    if not runs:
        return None
    fig = new_figure(5.0, 3.4)
    ax = fig.subplots()
    for r in runs:
        xs, ys = r.monitor["step"], r.monitor["knn_top1"]
        n = (r.monitor.get("train_images") or [math.nan])[-1]
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=f"{r.name} ({n:g} train / test images)")
    ax.set_ylim(0, 100)
    ax.set_xlabel("step")
    ax.set_ylabel("kNN top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("training monitor: kNN top-1 of the student")
    return save_figure(fig, path)


#: the legend label of the pixels at the ignore index (void) in `segmentation_grid`
VOID_LABEL = "ignored (void)"


def void_colour(palette: Sequence[Sequence[int]], num_classes: int) -> tuple:
    """The RGB colour of ignored (void) pixels: the palette's entry after the ``num_classes`` class colours (the
    layouts' void colour, `distill.data.seglayouts.layout_info`) when it has one that no class has; else the
    first colour no class has among VOC's void (224, 224, 192), white, magenta, cyan, grey, then all 24-bit colours
    (black is CamVid's, Cityscapes' and the seeded palettes' void colour, but VOC's background class)."""
    import itertools

    taken = {tuple(int(v) for v in c) for c in palette[:num_classes]}
    own = [tuple(int(v) for v in palette[num_classes])] if len(palette) > num_classes else []
    fixed = [(224, 224, 192), (255, 255, 255), (255, 0, 255), (0, 255, 255), (128, 128, 128)]
    return next(c for c in itertools.chain(own, fixed, itertools.product(range(256), repeat=3)) if c not in taken)


def colorize(ids, palette: Sequence[Sequence[int]], ignore_index: int, void: Sequence[int] = (0, 0, 0)):
    """Class ids ``[H, W]`` (tensor or array) -> RGB uint8 ``[H, W, 3]`` in ``palette`` (one colour per id);
    ``ignore_index`` in ``void`` (`void_colour`; default black), ids without a colour black."""
    import numpy as np

    ids = np.asarray(ids).astype(np.int64)
    lut = np.zeros((max(int(ids.max(initial=0)), len(palette), ignore_index) + 1, 3), dtype=np.uint8)
    lut[:len(palette)] = np.asarray(palette, dtype=np.uint8)
    lut[ignore_index] = np.asarray(void, dtype=np.uint8)
    return lut[ids]


def present_classes(masks, preds, ignore_index: int, num_classes: int) -> list[int]:
    """The class ids ``0 <= id < num_classes`` that occur in ``masks`` or ``preds`` (class ids, any shape),
    ``ignore_index`` excluded, ascending: the classes `segmentation_grid`'s legend names."""
    import numpy as np

    ids = np.union1d(np.unique(np.asarray(masks)), np.unique(np.asarray(preds))).astype(np.int64)
    return [int(i) for i in ids if 0 <= i < num_classes and i != ignore_index]


def segmentation_grid(images, masks, preds, palette: Sequence[Sequence[int]], ignore_index: int, path,
                      title: str = "", class_names: Optional[Sequence[str]] = None) -> Path:
    """One row per image: the image, its ground truth and the prediction, in the dataset's palette; with
    ``class_names`` (one per class id) a legend under the rows gives the name and colour of every class present in
    the shown masks or predictions (`present_classes`). Pixels at ``ignore_index`` are drawn in
    `void_colour` (distinct from every class colour) and, where there are any, the legend names them
    ``"ignored (void)"`` (`VOID_LABEL`).

    ``images``: uint8 ``[N, 3, H, W]``; ``masks``, ``preds``: class ids ``[N, H, W]``; ``palette``: an RGB colour per
    class id, optionally followed by the void colour (a layout's palette). Writes ``path`` (PNG)."""
    import numpy as np
    from matplotlib.patches import Patch

    n = len(images)
    h, w = images.shape[-2:]
    num_classes = min(len(class_names), len(palette)) if class_names else len(palette)
    void = void_colour(palette, len(class_names) if class_names else len(palette))
    shown = present_classes(masks, preds, ignore_index, num_classes) if class_names else []
    entries = [(palette[c], str(class_names[c])) for c in shown]
    if (np.asarray(masks) == ignore_index).any() or (np.asarray(preds) == ignore_index).any():
        entries.append((void, VOID_LABEL))
    ncol = min(4, max(1, len(entries)))
    legend_h = 0.3 * math.ceil(len(entries) / ncol) + 0.2 if entries else 0.0
    fig = new_figure(3 * 2.6 * w / max(h, w) + 0.4, n * 2.6 * h / max(h, w) + 0.6 + legend_h)
    grid = fig.add_gridspec(n + bool(entries), 3,
                            height_ratios=[2.6 * h / max(h, w)] * n + ([legend_h] if entries else []))
    axes = np.array([[fig.add_subplot(grid[i, j]) for j in range(3)] for i in range(n)]).reshape(n, 3)
    for i in range(n):
        panels = (np.asarray(images[i]).transpose(1, 2, 0), colorize(masks[i], palette, ignore_index, void),
                  colorize(preds[i], palette, ignore_index, void))
        for j, (ax, im, name) in enumerate(zip(axes[i], panels, ("image", "ground truth", "prediction"))):
            ax.imshow(im, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    if entries:
        key = fig.add_subplot(grid[n, :])
        key.axis("off")
        key.legend(handles=[Patch(facecolor=np.asarray(colour) / 255, edgecolor="black", linewidth=0.5, label=label)
                            for colour, label in entries],
                   loc="center", ncol=ncol, fontsize=8, frameon=False, handlelength=1.2)
    if title:
        fig.suptitle(textwrap.fill(title, 90), fontsize=9)
    return save_figure(fig, path)
