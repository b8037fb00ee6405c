"""Selection runs: candidate checks, the selection split, `distill select`, and a recipe's auto-grid / auto-label-free."""
import csv
import json

import pytest
import torch
import yaml

from distill.cli import main
from distill.config import make_recipe
from distill.select import check_candidates, selection_split
from distill.trainer import train

from ._selection import PNG, tiny_recipe as _recipe


def test_candidate_list_errors():
    assert check_candidates([1, 11], 1000) == [1, 11]
    with pytest.raises(ValueError, match=r"timestep_candidates is empty; give two or more timesteps in \[0, 1000\)"):
        check_candidates([], 1000)
    with pytest.raises(ValueError, match=r"timestep_candidates \[1000, -1\] are outside \[0, 1000\)"):
        check_candidates([1, 1000, -1], 1000)
    with pytest.raises(ValueError, match="duplicates"):
        check_candidates([5, 5], 1000)


def test_selection_split_is_disjoint_stratified_train_only(fmnist_dir):
    from distill.data import FashionMNIST, dataset_labels

    ds = FashionMNIST(fmnist_dir, "train")
    data = selection_split(ds, 300, 200, seed=0)
    a, b = set(data.train.indices), set(data.test.indices)
    assert len(a) == 300 and len(b) == 200 and not a & b
    counts = torch.bincount(dataset_labels(ds)[sorted(a | b)], minlength=10)
    assert counts.tolist() == [50] * 10
    with pytest.raises(ValueError, match="exceeds the 60000 training images"):
        selection_split(ds, 60000, 1)


def test_select_cli_both_methods_writes_csv_png_and_recipe_ready_yaml(tmp_path, fmnist_dir, tiny_pipeline_dir):
    out = tmp_path / "sel"
    rc = main(["select", "--method", "both", "--teacher", str(tiny_pipeline_dir), "--blocks", "mid_block",
               "up_blocks.0", "--timesteps", "1", "50", "--data-root", fmnist_dir, "--images", "64",
               "--val-images", "32", "--epochs", "1", "--label-free-images", "16", "--batch-size", "32",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "grid.csv")))
    assert len(rows) == 4 and {r["block"] for r in rows} == {"mid_block", "up_blocks.0"}
    lf = list(csv.DictReader(open(out / "label_free.csv")))
    assert [int(r["rank"]) for r in lf] == [1, 2, 3, 4]
    for png in ("grid_heatmap.png", "ranking.png"):
        assert (out / png).read_bytes()[:8] == PNG
    report = json.loads((out / "select.json").read_text())
    assert report["label_free"]["image_forwards"] == 2 * 16 * 2
    assert report["label_free"]["compute_ratio_vs_grid"] == pytest.approx(64 / report["grid"]["image_forwards"],
                                                                           abs=1e-3)
    assert -1 <= report["label_free"]["spearman"] <= 1
    best = yaml.safe_load((out / "best_grid.yaml").read_text())
    assert (best["teacher_blocks"][0], best["timesteps"][0]) == (rows[0]["block"], int(rows[0]["timestep"]))
    recipe = make_recipe({**best, "data_root": fmnist_dir})  # usable as recipe keys as is
    assert recipe.timesteps == best["timesteps"]


@pytest.mark.parametrize("args, message", [
    (["--timesteps"], "--timesteps is empty"),
    (["--timesteps", "1", "5000"], r"--timesteps \[5000\] are outside \[0, 1000\)"),
    (["--timesteps", "1", "11", "--max-memory-gb", "0.000001"], "Fix: "),
])
def test_select_cli_bad_input_exits_2(tmp_path, fmnist_dir, tiny_pipeline_dir, capsys, args, message):
    rc = main(["select", "--method", "grid", "--teacher", str(tiny_pipeline_dir), "--blocks", "mid_block",
               "--data-root", fmnist_dir, "--images", "32", "--val-images", "16", "--out", str(tmp_path / "s"),
               "--no-progress", *args])
    assert rc == 2
    assert __import__("re").search(message, capsys.readouterr().err)


@pytest.mark.parametrize("mode, files", [("auto-grid", ["grid.csv", "grid_heatmap.png", "best_grid.yaml"]),
                                         ("auto-label-free", ["label_free.csv", "best_label_free.yaml"])])
def test_auto_timesteps_select_record_and_reuse_on_resume(tmp_path, fmnist_dir, mode, files):
    run = tmp_path / mode
    summary = train(_recipe(fmnist_dir, timesteps=mode, steps=2, checkpoint_every=1), str(run), progress=False)
    sel = json.loads((run / "selection" / "selection.json").read_text())
    for f in files:
        assert (run / "selection" / f).is_file()
    scores = {int(k): v for k, v in sel["scores"].items()}
    pick = (max if mode == "auto-grid" else min)(scores, key=scores.get)
    assert sel["timestep"] == pick and summary["timesteps_used"] == [pick]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["timesteps"] == mode and cfg["_resolved"]["timesteps_used"] == [pick]
    from distill.export import export_student

    exported = export_student(str(run), str(tmp_path / "student"))
    assert json.loads((exported / "config.json").read_text())["distill"]["timesteps"] == [pick]
    mtime = (run / "selection" / "selection.json").stat().st_mtime_ns
    train(_recipe(fmnist_dir, timesteps=mode, steps=3, checkpoint_every=1), str(run), resume=True, progress=False)
    assert (run / "selection" / "selection.json").stat().st_mtime_ns == mtime  # not re-run


def test_auto_grid_out_of_range_candidates_error(tmp_path, fmnist_dir):
    with pytest.raises(ValueError, match=r"timestep_candidates \[1000\] are outside \[0, 1000\)"):
        train(_recipe(fmnist_dir, timesteps="auto-grid", timestep_candidates=[1, 1000]), str(tmp_path / "r"),
              progress=False)


def test_auto_selection_runs_on_the_device_chosen_and_records_it(tmp_path, fmnist_dir, monkeypatch):
    import distill.select.auto as auto
    from distill.build import build_train_data

    chosen = []

    def fake_eval_device(device=None):  # stands in for Accelerate's choice (a GPU on a GPU machine)
        chosen.append(device)
        return torch.device("cpu")

    monkeypatch.setattr(auto, "eval_device", fake_eval_device)
    recipe = _recipe(fmnist_dir, timesteps="auto-label-free", timestep_candidates=[1, 11])
    ds, channels = build_train_data(recipe)
    res = auto.auto_select_timestep(recipe, ds, channels, tmp_path / "sel", progress=False)
    assert chosen == [None] and res["device"] == "cpu"
    assert json.loads((tmp_path / "sel" / "selection.json").read_text())["device"] == "cpu"


def test_grid_scored_on_the_test_split_pairs_its_labels_by_name(tmp_path, monkeypatch):
    """--score-on test with a test split lacking a class: the grid is scored on test labels numbered as in train/."""
    import distill.select.auto as auto
    from distill.data import dataset_labels

    from .conftest import rgb_recipe
    from .test_data_classes import image_folder

    class Seen(Exception):
        pass

    def spy(teacher, data, **kw):  # stands in for the grid: what it would be scored on
        raise Seen(dataset_labels(data.test).tolist())

    image_folder(tmp_path / "d", {"train": {"cat": 4, "dog": 4, "ship": 4}, "test": {"dog": 2, "ship": 2}})
    monkeypatch.setattr(auto, "grid_probe", spy)
    with pytest.raises(Seen) as e:
        auto.run_selection(tmp_path / "sel", recipe=rgb_recipe(tmp_path / "d", timestep_candidates=[1, 11]),
                           method="grid", score_on="test", images=6, val_images=3, progress=False)
    assert e.value.args[0] == [1, 1, 2, 2]  # dog and ship, not shifted onto cat and dog
