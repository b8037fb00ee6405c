"""The component example of the getting-started page runs as written, and the README's and the documentation's
commands name files that exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GETTING_STARTED = ROOT / "docs" / "getting-started.md"  # the README's Python API moved there (the site's pages)
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _python_blocks(page):
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_component_example_runs():
    block = next(b for b in _python_blocks(GETTING_STARTED) if "FeatureRegressor(" in b)
    ns = {}
    exec(compile(block, "docs/getting-started.md", "exec"), ns)
    assert set(ns["losses"]) == {"mse", "at", "total"}
    assert ns["feats"]["up_blocks.0@t11"].shape == (8, 64, 16, 16)
    assert [p.shape[-2:] for p in ns["preds"]] == [f.shape[-2:] for f in ns["feats"].values()]


def test_readme_commands_exist():
    text = README.read_text()
    root = README.parent
    for page in PAGES:
        for path in re.findall(r"(?<![\w/.])(recipes/[\w.-]+\.yaml|tools/[\w.-]+\.(?:sh|py))", page.read_text()):
            assert (root / path).is_file(), f"{page.relative_to(root)} names {path}, which does not exist"
    ci = (root / ".ci" / "run").read_text()
    assert "bash tools/setup.sh" in ci and "pytest -q tests" in ci
    assert "bash tools/setup.sh && .venv/bin/python -m pytest -q tests" in text


def test_license_file_matches_the_package_metadata():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    text = " ".join((ROOT / "LICENSE").read_text().split())
    assert text.startswith("Apache License Version 2.0, January 2004")
