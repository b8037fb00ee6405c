"""CLI smoke tests: the console script, train -> export -> probe, run, and clear errors with exit code 2."""
import json
import subprocess
import sys

import pytest
import yaml

from distill.cli import main

from .conftest import rgb_recipe, tiny_unet_config


@pytest.fixture
def tiny_recipe(tmp_path, rgb_folder):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(dict(
        dataset="image-folder", data_root=str(rgb_folder), teacher=tiny_unet_config(3), teacher_blocks=["mid_block"],
        timesteps=[11], student="resnet18", student_size=32, regressor_width=16, steps=3, batch_size=6,
        checkpoint_every=3, log_every=1, probe_epochs=3, knn_k=5)))
    return path


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "distill.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "run", "export", "probe"):
        assert cmd in out.stdout


def test_train_export_probe(tiny_recipe, tmp_path, rgb_folder, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_recipe), "-o", str(run), "--set", "steps=4", "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert main(["export", str(run), "--out", str(tmp_path / "student")]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert main(["probe", str(tmp_path / "student"), "--data-root", str(rgb_folder), "--epochs", "3", "--k", "5",
                 "--pixels", "--json", str(tmp_path / "p.json"), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["num_test"] for r in rows] == [18, 18] and rows[1]["dim"] == 3 * 32 * 32
    assert main(["probe", str(run), "--epochs", "3", "--k", "5", "--no-progress"]) == 0  # the run's own student
    assert main(["probe", "timm:resnet18", "--dataset", "image-folder", "--data-root", str(rgb_folder),
                 "--size", "32", "--epochs", "3", "--k", "5", "--no-progress"]) == 0


def test_run_prints_the_comparison(tiny_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", str(tiny_recipe), "-o", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resnet18 distilled" in out and "resnet18 random init" in out and "raw pixels" in out
    res = json.loads((run / "results.json").read_text())
    assert [r["name"] for r in res["results"]] == ["resnet18 distilled", "resnet18 random init", "raw pixels"]
    assert (run / "student" / "model.safetensors").is_file()
    card = (run / "student" / "README.md").read_text()  # the model card, rewritten with the probe numbers
    d = res["results"][0]
    assert f"| resnet18 distilled | {d['linear_top1']} | {d['knn_top1']} (k={d['k']}) |" in card


@pytest.mark.parametrize("args,expected", [
    (["--set", "teacher_block=[mid_block]"], "Did you mean 'teacher_blocks'"),
    (["--set", "student=resnet181"], "unknown student 'resnet181'"),
    (["--set", "teacher_blocks=[mid_blok]"], "unknown teacher block 'mid_blok'"),
    (["--set", "timesteps=[1000]"], "outside [0, 1000)"),
    (["--set", "data_root=/nonexistent/imgs"], "does not exist"),
    (["--set", "steps=ten"], "'steps' must be int"),
])
def test_bad_input_exits_2_with_the_fix(tiny_recipe, tmp_path, capsys, args, expected):
    assert main(["train", str(tiny_recipe), "-o", str(tmp_path / "run"), *args]) == 2
    assert expected in capsys.readouterr().err


def test_missing_fashion_mnist_says_how_to_install(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: fashion-mnist\ndata_root: /nonexistent\nsteps: 1\n")
    assert main(["train", str(recipe), "-o", str(tmp_path / "run")]) == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


def test_probe_of_unknown_path(capsys, tmp_path):
    assert main(["probe", str(tmp_path)]) == 2
    assert "timm:NAME" in capsys.readouterr().err


def test_cli_exits_nonzero_on_nonfinite_loss(rgb_folder, tmp_path, nan_at_call, capsys):
    import yaml

    from distill.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rgb_recipe(rgb_folder).to_dict()))
    nan_at_call(3)
    assert main(["train", str(path), "-o", str(tmp_path / "run"), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 3: at" in err and "checkpoint-2" in err
