"""distill.recipes: shipped recipes by name (package data), and the key reference generated from Recipe."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from distill.config import RANGES, Recipe
from distill.recipes import (CHOICES, RECIPE_DIR, key_reference_markdown, load_recipe, recipe_keys, recipe_summary,
                             resolve_recipe, shipped_recipes)

REPO = Path(__file__).resolve().parents[1]


def test_shipped_recipes_are_the_repository_recipes():
    # the package's copy (a link in a checkout, files in a wheel) holds exactly recipes/*.yaml, byte for byte
    repo = {p.stem: p.read_bytes() for p in (REPO / "recipes").glob("*.yaml")}
    assert {n: p.read_bytes() for n, p in shipped_recipes().items()} == repo and "quickstart" in repo


def test_recipe_dir_is_package_data():
    # pyproject ships it: the package-data glob names the folder RECIPE_DIR points at
    text = (REPO / "pyproject.toml").read_text()
    assert f'"{RECIPE_DIR.name}/*.yaml"' in text and RECIPE_DIR.parent.name == "distill"


def test_load_by_name_equals_load_by_path():
    assert load_recipe("quickstart", {"steps": 700}) == load_recipe(REPO / "recipes" / "quickstart.yaml",
                                                                    {"steps": 700})


def test_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the shipped copy answers, by name or by the README's path
    assert resolve_recipe("quickstart") == resolve_recipe("quickstart.yaml") == \
        resolve_recipe("recipes/quickstart.yaml") == shipped_recipes()["quickstart"]


def test_a_local_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("quickstart").write_text("steps: 3\n")
    assert resolve_recipe("quickstart") == Path("quickstart") and load_recipe("quickstart").steps == 3


def test_unknown_name_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError) as e:
        resolve_recipe("quikstart")
    assert "'quikstart'" in str(e.value) and "quickstart" in str(e.value) and "distill recipes" in str(e.value)


def test_summary_is_the_first_sentence_of_the_top_comment(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("# Small: a test recipe. More words here.\n#   distill run r.yaml\nsteps: 1\n")
    assert recipe_summary(p) == "Small: a test recipe"
    p.write_text("steps: 1\n# late comment\n")
    assert recipe_summary(p) == ""


def test_every_key_is_documented_with_its_default_and_range():
    rows = {r["name"]: r for r in recipe_keys()}
    assert list(rows) == [f.name for f in dataclasses.fields(Recipe)]
    undocumented = [n for n, r in rows.items() if not r["help"]]
    assert not undocumented, f"add a comment beside these Recipe fields (or an entry in recipes._HELP): {undocumented}"
    for name, r in rows.items():  # the default printed is the dataclass default, in YAML spelling
        assert yaml.safe_load(r["default"]) == getattr(Recipe(), name), name
    assert rows["steps"]["default"] == str(Recipe().steps) and rows["steps"]["type"] == "int"
    assert rows["lr"]["valid"] == RANGES["lr"].describe() == "> 0"
    assert rows["optimizer"]["valid"] == " | ".join(CHOICES["optimizer"])
    assert rows["use_ppm"]["default"] == "false" and rows["data_root"]["default"] == "null"


def test_docs_page_is_up_to_date():
    page = REPO / "docs" / "recipe-keys.md"
    assert page.read_text() == key_reference_markdown(), \
        "docs/recipe-keys.md is stale; regenerate it: python -m distill.recipes > docs/recipe-keys.md"


def test_a_folder_given_as_the_recipe_says_so(tmp_path, capsys):
    """A folder is 'a folder, not a recipe file' (it said 'not found'), naming the YAML files in it; exit 2."""
    from distill.cli import main

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text("steps: 3\n")
    with pytest.raises(ValueError, match=r"'.*recipes' is a folder, not a recipe file. Fix: give a YAML file in it "
                                         r"\(mine.yaml\)"):
        resolve_recipe(tmp_path / "recipes")
    assert main(["train", str(tmp_path / "recipes"), "-o", str(tmp_path / "run")]) == 2
    assert "is a folder, not a recipe file" in capsys.readouterr().err


def test_a_non_utf8_recipe_names_the_file(tmp_path, capsys):
    from distill.cli import main

    path = tmp_path / "latin1.yaml"
    path.write_bytes("steps: 3\nteacher: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"recipe '{path}' is not UTF-8 text \\(invalid continuation byte at byte offset 21\\)"):
        load_recipe(path)
    assert main(["train", str(path), "-o", str(tmp_path / "run")]) == 2
    assert f"recipe '{path}' is not UTF-8" in capsys.readouterr().err
