"""The release: one version (distill/version.py) read by the package metadata and `distill --version`; one
distribution name (diffusion-distill) in pyproject.toml, in every install hint distill prints and in the docs; a
changelog whose newest release is the version; CI builds the wheel and the site. (Building the wheel itself takes
30 s and more: tools/check_wheel.sh, which CI runs, checks its contents and runs it installed.)"""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

import distill
from distill.errors import MissingDependencyError
from distill.version import DISTRIBUTION, __version__, install_hint

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_the_version_has_one_place():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "distill.version.__version__"}
    assert distill.__version__ == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+)?(\.dev\d+)?", __version__)  # PEP 440, normalized


def test_cli_version_prints_it(capsys):
    from distill.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"distill {__version__}"


def test_the_distribution_name_is_the_one_in_pyproject():
    assert PYPROJECT["project"]["name"] == DISTRIBUTION == "diffusion-distill"
    assert PYPROJECT["project"]["scripts"] == {"distill": "distill.cli:main"}  # the command keeps its name
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"docs", "dev", "sd", "hf", "tensorboard", "wandb", "mlflow"} <= set(extras)


def test_install_hints_name_the_distribution():
    assert install_hint("sd") == 'pip install "diffusion-distill[sd]" (or pip install -e ".[sd]" in a checkout)'
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    from distill.vocab import TRACKER_EXTRAS

    assert set(TRACKER_EXTRAS.values()) <= extras  # every hint names an extra that exists


def test_no_message_names_the_bare_import_name_as_a_pip_package():
    """``pip install distill`` / ``distill[extra]`` would install another project: every hint in the code and every
    install command in the docs names the distribution."""
    bad = re.compile(r"(?<![\w-])distill\[|pip install \"?distill\b(?![-\w])")
    found = [f"{p.relative_to(ROOT)}:{n}" for p in [*sorted(f for d in ("distill", "examples", "bench", "tools") for f in (ROOT / d).rglob("*.py")),
                                                 *DOC_PAGES]
             for n, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert not found, found


def test_the_hf_source_without_datasets_names_the_extra(monkeypatch):
    from distill.data import hf

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(MissingDependencyError, match=re.escape('pip install "diffusion-distill[hf]"')):
        hf._import_datasets()


def test_the_changelog_has_unreleased_on_top_of_the_releases_before_this_version():
    """A development version (``0.2.0.dev0``) sits above the last release: ``[Unreleased]`` on top, then released
    versions, newest first, the newest below this version; a release version is the changelog's newest entry."""
    from packaging.version import Version

    text = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert releases[0] == "Unreleased", releases
    versions = [Version(r) for r in releases[1:]]
    assert versions == sorted(versions, reverse=True) and versions, releases
    this = Version(__version__)
    assert (versions[0] < this) if this.is_devrelease else (versions[0] == this), (releases, __version__)
    assert "Keep a Changelog" in text


def test_ci_builds_the_wheel_and_the_site():
    ci = (ROOT / ".ci" / "run").read_text()
    steps = [ci.index(s) for s in ("\n.venv/bin/python -m pytest -q tests", "\nbash tools/check_wheel.sh",
                                   ".venv/bin/mkdocs build --strict")]
    assert steps == sorted(steps), steps  # after the test suite
    check = (ROOT / "tools" / "check_wheel.sh").read_text()
    for step in ("-m build", "-m venv", "distill\" --version", "distill\" recipes", "distill\" train quickstart",
                 "distill\" export RUN"):
        assert step in check, step
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert all(f"graft {d}" in manifest for d in ("recipes", "tests", "tools", "docs"))


def test_no_shipped_file_or_user_doc_points_into_the_developers_checkout():
    """``../shared`` (data archives, review cases) exists only beside the developers' checkout: a user who installed
    the wheel, or cloned the repository, has no such folder. Messages, recipes, examples and the user docs name the
    official download instead (docs/data.md, "Getting the data"); only the developers' guide may mention it."""
    shipped = [f for d in ("distill", "recipes", "examples") for f in sorted((ROOT / d).rglob("*"))
               if f.is_file() and f.suffix not in (".safetensors", ".png", ".pyc")]
    docs = [p for p in DOC_PAGES if p.name != "development.md"]
    found = [f"{p.relative_to(ROOT)}:{n}" for p in [*shipped, *docs]
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if "../shared" in line]
    assert not found, found


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
def test_the_install_pages_list_every_extra(page):
    """The "Extras:" paragraph names each extra of pyproject.toml once (it lacked [onnx] and [ssl])."""
    text = (ROOT / page).read_text()
    paragraph = re.search(r"^Extras: (.+?)(?:\n\n|\Z)", text, re.M | re.S).group(1)
    listed = re.findall(r"`(?:pip install \"diffusion-distill|diffusion-distill)?\[(\w+)\]", paragraph)
    assert sorted(listed) == sorted(PYPROJECT["project"]["optional-dependencies"]), listed


def test_the_home_page_links_every_page():
    """docs/index.md links each top-level page of the site (it lacked Examples, Clusters, Deployment, Changelog)."""
    index = (ROOT / "docs" / "index.md").read_text()
    linked = set(re.findall(r"\]\(([\w-]+\.md)(?:#[\w-]+)?\)", index))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert pages - linked == set()
