"""tools/plot_results_fractions.py: reads every fine-tune column of a results table, mean and min-max per cell."""
import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "plot_results_fractions.py"
spec = importlib.util.spec_from_file_location("plot_results_fractions", TOOL)
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

PAGE = """## A
| model | linear probe | fine-tune 1% (5 labels) | fine-tune 10% (50) | fine-tune 100% |
|---|---|---|---|---|
| net distilled | **85.22** | **80.47** (79.31-81.63) | 83.27 (83.06-83.48) | **83.30** (82.98-83.61) * |
| net scratch | 62.59 | 79.25 (78.82-79.67) | - | 80.19 (79.87-80.51) |
## B
"""


def test_every_fraction_column_is_read():
    rows = tool.table_rows(PAGE, "## A", ["net distilled"], seeds=2)
    assert [r["fraction"] for r in rows] == [0.01, 0.1, 1.0]
    assert rows[2]["last_top1"] == {"mean": 83.30, "min": 82.98, "max": 83.61, "n": 2}
    assert {r["model_kind"] for r in rows} == {"exported"}


def test_a_cell_without_numbers_or_a_missing_row_is_named():
    with pytest.raises(ValueError, match="'net scratch': cell '-'"):
        tool.table_rows(PAGE, "## A", ["net scratch"], seeds=2)
    with pytest.raises(ValueError, match="no row 'other'"):
        tool.table_rows(PAGE, "## A", ["other"], seeds=2)


def test_the_real_cifar10_table_has_three_fractions():
    text = (TOOL.parents[1] / "docs" / "results.md").read_text()
    rows = tool.table_rows(text, "## CIFAR-10", ["ResNet-18 distilled", "ResNet-18 scratch (random init)"], 2)
    assert sorted({r["fraction"] for r in rows}) == [0.01, 0.1, 1.0]
