"""Redraw a fine-tune-vs-label-fraction figure from a table of docs/results.md, with every fraction in the table.

The figures in docs/img were drawn by ``distill report`` from the run directories of one session; later sessions
added columns (the 100% runs) whose run directories were on another machine, so the figures lacked them. This tool
reads the table rows instead: a cell ``**42.66** (40.67-44.65)`` is the mean and min-max over the seeds, which for
two seeds are the two runs themselves, and draws them with :func:`distill.plots.plot_fraction`, the function
``distill report`` uses.

    python tools/plot_results_fractions.py --section "## CIFAR-10" --rows "ResNet-18 distilled" \
        "ResNet-18 scratch (random init)" --seeds 2 --out docs/img/finetune_fraction_cifar10.png
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from distill.plots import plot_fraction

CELL = re.compile(r"\*{0,2}([\d.]+)\*{0,2}\s*\(([\d.]+)-([\d.]+)\)")
HEADER = re.compile(r"fine-tune (\d+)%")


def table_rows(text: str, section: str, names: list[str], seeds: int) -> list[dict]:
    """Rows for :func:`plot_fraction` from the first table after the heading ``section``: one per (row name,
    fine-tune column), ``model_kind`` 'timm' for rows whose name says scratch.

    Raises:
        ValueError: the section, its table, a row name or its fine-tune cells are missing (naming which).
    """
    if section not in text:
        raise ValueError(f"no section {section!r} in the results page")
    lines = text.split(section, 1)[1].splitlines()
    header = next((ln for ln in lines if ln.startswith("| model")), None)
    if header is None:
        raise ValueError(f"no table under {section!r}")
    cols = [c.strip() for c in header.strip("|").split("|")]
    fractions = {i: int(m.group(1)) / 100 for i, c in enumerate(cols) if (m := HEADER.match(c))}
    out = []
    for name in names:
        row = next((ln for ln in lines if ln.startswith(f"| {name} |")), None)
        if row is None:
            raise ValueError(f"no row {name!r} in the table under {section!r}")
        cells = [c.strip() for c in row.strip("|").split("|")]
        for i, fraction in fractions.items():
            m = CELL.match(cells[i])
            if m is None:
                raise ValueError(f"row {name!r}: cell {cells[i]!r} of column {cols[i]!r} is not 'mean (min-max)'")
            mean, lo, hi = map(float, m.groups())
            out.append({"label": name, "fraction": fraction, "model_kind": "timm" if "scratch" in name else "exported",
                        "last_top1": {"mean": mean, "min": lo, "max": hi, "n": seeds}})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="docs/results.md")
    p.add_argument("--section", required=True, help="heading above the table, e.g. '## CIFAR-10'")
    p.add_argument("--rows", nargs="+", required=True, help="model names of the rows to draw")
    p.add_argument("--seeds", type=int, required=True, help="seeds behind each cell (for the legend)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = table_rows(Path(args.results).read_text(), args.section, args.rows, args.seeds)
    print(plot_fraction(rows, Path(args.out)))


if __name__ == "__main__":
    main()
