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


def test_spread_set_options_lets_set_stand_anywhere():
    from distill.cli import spread_set_options

    argv = ["train", "--set", "steps=20", "lr=1e-3", "recipes/quickstart.yaml", "-o", "x", "--set", "seed=1"]
    assert spread_set_options(argv) == ["train", "--set=steps=20", "--set=lr=1e-3", "recipes/quickstart.yaml", "-o",
                                        "x", "--set=seed=1"]
    assert spread_set_options(["--set", "a=1", "--", "--set", "b=2"]) == ["--set=a=1", "--", "--set", "b=2"]


def test_set_before_the_recipe(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--set", "steps=2", "seed=3", str(tiny_recipe), "-o", str(run), "--no-progress"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["steps"] == 2 and cfg["seed"] == 3


def test_recipes_lists_every_shipped_recipe(capsys):
    from distill.recipes import recipe_summary, shipped_recipes

    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, path in shipped_recipes().items():
        assert any(line.split() and line.split()[0] == name and recipe_summary(path) in line for line in lines)
    assert main(["recipes", "--show", "quickstart"]) == 0
    assert capsys.readouterr().out == shipped_recipes()["quickstart"].read_text()


def test_train_help_lists_every_recipe_key():
    import dataclasses

    from distill.config import Recipe

    out = subprocess.run([sys.executable, "-m", "distill.cli", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert all(f"\n  {f.name} (" in out for f in dataclasses.fields(Recipe))


def test_train_a_shipped_recipe_by_name(tmp_path, monkeypatch):
    from pathlib import Path

    from distill.data import FASHION_MNIST_DIR

    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip(f"Fashion-MNIST not installed in {FASHION_MNIST_DIR}")
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: the name is found in the package
    assert main(["train", "quickstart", "-o", "runs/q", "--set", "steps=1", "batch_size=4", "warmup_steps=0",
                 "checkpoint_every=1", "--no-progress"]) == 0
    assert yaml.safe_load((tmp_path / "runs/q/config.yaml").read_text())["teacher"] == "fashion-mnist-ddpm"


def test_unknown_recipe_name_exits_2(tmp_path, capsys):
    assert main(["train", "quikstart", "-o", str(tmp_path / "r")]) == 2
    assert "shipped: " in capsys.readouterr().err


def test_output_dir_is_one_spelling_with_out_as_hidden_alias(tiny_recipe, tmp_path, capsys):
    from distill.cli import build_parser

    run = tmp_path / "run"
    assert main(["train", str(tiny_recipe), "--output-dir", str(run), "--set", "steps=1", "--no-progress"]) == 0
    assert main(["export", str(run), "-o", str(tmp_path / "a")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "b")]) == 0  # the old spelling still works
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in ("train", "run", "export", "finetune", "report", "extract", "select"):
        text = sub[name].format_help()
        assert "--output-dir OUTPUT_DIR, -o OUTPUT_DIR" in text and "--out " not in text, name
    with pytest.raises(SystemExit) as e:
        main(["export", str(run)])
    assert e.value.code == 2 and "-o/--output-dir" in capsys.readouterr().err


def test_tracker_that_cannot_start_exits_2(tiny_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("accelerate.utils.is_tensorboard_available", lambda: False)
    assert main(["train", str(tiny_recipe), "-o", str(tmp_path / "run"), "--set", "log_with=tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "log_with: tensorboard" in err and 'pip install "diffusion-distill[tensorboard]"' in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("failure", [ImportError("cannot import name 'X' from 'mlflow.tracking'"),
                                     RuntimeError("MlflowException: Could not find experiment with ID 0\n" * 20)])
def test_tracker_that_fails_at_start_up_exits_2_naming_the_extra_or_setting(tiny_recipe, tmp_path, capsys,
                                                                           monkeypatch, failure):
    """A tracker whose package is installed but fails in Accelerate's init_trackers (MLflow 3 ended in a 40-line
    traceback and exit 1): one line, exit 2, naming the tracker, the cause, the pip extra or the setting; nothing
    written to the run directory."""
    import accelerate

    def fail(self, *a, **k):
        raise failure

    monkeypatch.setattr("accelerate.utils.is_mlflow_available", lambda: True)
    monkeypatch.setattr(accelerate.Accelerator, "init_trackers", fail)
    assert main(["train", str(tiny_recipe), "-o", str(tmp_path / "run"), "--set", "log_with=mlflow"]) == 2
    err = capsys.readouterr().err
    assert "distill train: error: log_with: mlflow could not start" in err and "Traceback" not in err
    assert 'pip install "diffusion-distill[mlflow]"' in err
    if isinstance(failure, RuntimeError):
        assert "MLFLOW_TRACKING_URI" in err and "Could not find experiment" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_help_texts_tell_the_truth():
    """export --help names the pinned huggingface_hub's login (`hf auth login`; `huggingface-cli` is gone), probe /
    finetune / select --dataset list all four sources, and the key reference describes the python: teacher."""
    from distill.cli import build_parser
    from distill.recipes import recipe_keys
    from distill.vocab import DATASETS

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    export = " ".join(sub["export"].format_help().split())
    assert "hf auth login" in export and "huggingface-cli" not in export and "--make-private" in export
    for name in ("probe", "finetune", "select"):
        text = " ".join(sub[name].format_help().split())
        assert " | ".join(DATASETS) in text, name
    teacher = next(k for k in recipe_keys() if k["name"] == "teacher")["help"]
    assert "python:package.module:factory" in teacher and "python:/path/file.py:factory" in teacher


def test_the_resume_hint_repeats_the_recipe_directory_and_set_values_shell_quoted():
    import shlex

    from distill.cli import build_parser, resume_command
    from distill.cli.common import spread_set_options

    argv = ["train", "quickstart", "-o", "runs/my q", "--set", "steps=10", "teacher_blocks=[mid_block, up_blocks.0]"]
    hint = resume_command(build_parser().parse_args(spread_set_options(argv)))
    words = shlex.split(hint)
    assert words[:6] == ["distill", "train", "quickstart", "-o", "runs/my q", "--resume"]
    assert words[6:] == ["--set", "steps=10", "teacher_blocks=[mid_block, up_blocks.0]"]
    assert build_parser().parse_args(spread_set_options(words[1:])).resume  # the hint itself parses
    assert resume_command(build_parser().parse_args(["export", "runs/q", "-o", "x"])) == ""
