"""PNG plots: the package's one plotting convention, and the selection plots (grid heatmap, label-free vs probe
ranking, policy timestep histogram).

Every plot is a matplotlib :class:`~matplotlib.figure.Figure` on an Agg canvas (object API, no pyplot state, no
display needed): :func:`new_figure` makes one, :func:`save_figure` writes it as a PNG atomically. Each plotting
function writes one PNG and returns its path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .atomic import atomic_file

DPI = 110


def new_figure(w: float, h: float):
    """A ``w x h`` inch :class:`~matplotlib.figure.Figure` on an Agg canvas (no pyplot, no display)."""
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
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label=value)
    ax.set_title(title or f"{value} per (block, timestep)")
    return save_figure(fig, path)


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
