"""Messages name a setting as the caller spells it (`distill.errors.option`): the Python keyword (``overwrite=True``,
``output_dir``) from the Python API, the option (``--overwrite``, ``--output-dir``) under the ``distill`` command,
a script's own option under its parser (`parser_spelling` with ``rename``)."""
from __future__ import annotations

import argparse
import importlib.util

import pytest
import yaml

from distill.cli import build_parser, main
from distill.errors import RunExistsError, option, parser_spelling, python_spelling, spelled_as

from .conftest import rgb_recipe


# ----------------------------------------------------------------------------------------------- the mechanism
def test_parser_spelling_names_options_positionals_renames_and_unknown_settings():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", dest="output_dir", help=argparse.SUPPRESS)  # a hidden alias, added first
    p.add_argument("-o", "--output-dir", dest="output_dir")
    p.add_argument("--data-root")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--finetune-steps", type=int)
    sub = p.add_subparsers(dest="command")
    sub.add_parser("go").add_argument("--max-images", type=int)  # a sub-command's options count too
    spell = parser_spelling(p, rename={"steps": "finetune_steps"})
    assert spell("model") == "MODEL" and spell("runs") == "RUN_DIR"  # positionals: upper-cased dest, or metavar
    assert spell("output_dir") == "--output-dir"  # the longest -- string, never the hidden --out
    assert spell("data_root") == "--data-root" and spell("max_images") == "--max-images"
    assert spell("overwrite", True) == "--overwrite"
    assert spell("steps") == "--finetune-steps"  # the script's own name for the setting
    assert spell("batch_size") == "--batch-size"  # not in this parser: as distill's commands spell it


def test_parser_spelling_of_the_distill_commands():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    export = parser_spelling(commands["export"])
    assert (export("run_dir"), export("output_dir"), export("overwrite", True)) == ("RUN_DIR", "--output-dir",
                                                                                    "--overwrite")
    assert parser_spelling(commands["report"])("teacher_probe") == "--teacher-probe"


def test_python_spelling_and_the_default_outside_a_command():
    assert python_spelling("data_root") == "data_root" and python_spelling("overwrite", flag=True) == "overwrite=True"
    assert option("output_dir") == "output_dir" and option("resume", flag=True) == "resume=True"
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", dest="data_root")
    with spelled_as(parser_spelling(ap)):
        assert option("data_root") == "--root" and option("overwrite", flag=True) == "--overwrite"
    assert option("data_root") == "data_root"  # restored after the block


# ----------------------------------------------------------------------------------------------- run directory
def _fake_run(path):
    path.mkdir()
    (path / "config.yaml").write_text("steps: 1\n")  # a run, as far as the refusal is concerned
    return path


def test_existing_run_names_the_python_keywords_and_under_the_cli_the_options(tmp_path, rgb_folder, capsys):
    from distill import train

    run = _fake_run(tmp_path / "run")
    with pytest.raises(RunExistsError) as e:
        train(rgb_recipe(rgb_folder), str(run), progress=False)
    msg = str(e.value)
    assert "pass resume=True to continue it, overwrite=True to replace it, or choose another output_dir" in msg
    assert "--" not in msg
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(rgb_recipe(rgb_folder).to_dict()))
    assert main(["train", str(recipe), "-o", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pass --resume to continue it, --overwrite to replace it, or choose another --output-dir" in err


def test_overwrite_of_a_foreign_directory_names_the_keyword(tmp_path):
    from distill.rundir import prepare_run_dir

    run = _fake_run(tmp_path / "run")
    (run / "thesis.tex").write_text("mine")
    with pytest.raises(RunExistsError, match=r"^overwrite=True refused: .* choose another output_dir,") as e:
        prepare_run_dir(run, resume=False, overwrite=True)
    assert "--" not in str(e.value) and (run / "thesis.tex").exists()


# ----------------------------------------------------------------------------------------------- export
def _occupied(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return out


def test_export_onto_an_existing_directory_names_the_python_keywords(tmp_path):
    from distill import export_student

    out = _occupied(tmp_path)
    with pytest.raises(FileExistsError) as e:
        export_student(str(tmp_path / "run"), str(out))
    msg = str(e.value)
    assert "pass overwrite=True to replace an earlier export, or choose another output_dir" in msg and "--" not in msg
    with pytest.raises(FileExistsError, match=r"^overwrite=True refused: .* choose another output_dir, e\.g\.") as e:
        export_student(str(tmp_path / "run"), str(out), overwrite=True)
    assert "--" not in str(e.value) and (out / "notes.txt").read_text() == "mine"


def test_export_onto_an_existing_directory_names_the_options_under_the_cli(tmp_path, capsys):
    out = _occupied(tmp_path)
    assert main(["export", str(tmp_path / "run"), "-o", str(out)]) == 2
    assert "pass --overwrite to replace an earlier export, or choose another --output-dir" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "-o", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite refused: export target" in err and "choose another --output-dir, e.g." in err


def test_a_script_with_its_own_options_gets_its_own_names(tmp_path):
    """A script built on distill (its options spelled otherwise) names its own options, not distill's."""
    from distill import export_student

    ap = argparse.ArgumentParser()
    ap.add_argument("--student-dir", dest="student_dir")
    ap.add_argument("--replace", action="store_true")
    out = _occupied(tmp_path)
    with spelled_as(parser_spelling(ap, rename={"output_dir": "student_dir", "overwrite": "replace"})):
        with pytest.raises(FileExistsError) as e:
            export_student(str(tmp_path / "run"), str(out))
    assert "pass --replace to replace an earlier export, or choose another --student-dir" in str(e.value)


def test_a_missing_onnx_extra_names_the_keyword(tmp_path, monkeypatch):
    from distill import export_student
    from distill.errors import MissingDependencyError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"^onnx=True needs onnxscript.*or drop onnx=True\.$"):
        export_student(str(tmp_path / "run"), str(tmp_path / "out"), onnx=True)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- plan, probes
def test_plan_names_the_keyword_from_python_and_the_option_under_the_cli(tmp_path, rgb_folder, capsys):
    from distill.plan import plan_recipe

    with pytest.raises(ValueError, match=r"^processes 0 must be >= 1\.$"):
        plan_recipe(rgb_recipe(rgb_folder), processes=0)
    with pytest.raises(ValueError, match=r"^mfu 2\.0 must be in \(0, 1\]"):
        plan_recipe(rgb_recipe(rgb_folder), mfu=2.0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(rgb_recipe(rgb_folder).to_dict()))
    assert main(["plan", str(recipe), "--processes", "0"]) == 2
    assert "--processes 0 must be >= 1." in capsys.readouterr().err


def test_probe_and_report_inputs_name_the_keywords(tmp_path):
    from distill.evaluate import probe_data
    from distill.report import load_teacher_probe
    from distill.select import probe_teacher

    with pytest.raises(ValueError, match=r"test fraction 0 \(test_fraction / probe_test_fraction\) is outside"):
        probe_data("fashion-mnist", None, 1, test_fraction=0)
    with pytest.raises(ValueError, match=r"^probing a teacher needs blocks, e\.g\. blocks mid_block"):
        probe_teacher("fashion-mnist-ddpm", [])
    with pytest.raises(FileNotFoundError, match=r"^teacher_probe '.*nope\.json' does not exist"):
        load_teacher_probe(str(tmp_path / "nope.json"))


def test_a_missing_data_root_names_the_keyword():
    from distill.data import build_dataset

    with pytest.raises(ValueError, match=r"a Hugging Face dataset\); give it as data_root\.$"):
        build_dataset("image-folder", None, "train", 3)


def test_a_missing_data_root_under_a_command_without_data_root_names_set(tmp_path, capsys):
    """`distill train` has no --data-root: its recipe keys come through --set, so a message naming data_root says
    `--set data_root=VALUE` (it said 'pass --data-root on the command line', an option train lacks); `distill probe`
    has --data-root and keeps it; a script with --set (bench/ssl_baseline.py) gets the same as train."""
    from distill.errors import set_spelling

    assert main(["train", "quickstart", "--set", "dataset=image-folder", "-o", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith("give it as --set data_root=VALUE.") and "--data-root" \
        not in err
    assert not (tmp_path / "run").exists()
    probe = build_parser()._subparsers._group_actions[0].choices["probe"]
    assert parser_spelling(probe, fallback=set_spelling)("data_root") == "--data-root"
    assert set_spelling("data_root") == "--set data_root=VALUE" and set_spelling("ema", flag=True) == "--set ema=true"
    pytest.importorskip("lightly")
    from bench import ssl_baseline as sb

    assert sb.main(["--steps", "2", "--set", "dataset=image-folder", f"data_root={tmp_path / 'none'}",
                    "-o", str(tmp_path / "ssl")]) == 2
    err = capsys.readouterr().err
    assert "give a folder of class folders as --set data_root=VALUE: ROOT/" in err and not (tmp_path / "ssl").exists()


@pytest.mark.parametrize("argv, named", [
    (["select", "--method", "grid", "--images", "0"], "distill select: error: --images must be an integer >= 1; got 0."),
    (["select", "--method", "grid", "--epochs", "0"], "distill select: error: --epochs must be an integer >= 1; got 0."),
    (["extract", "quickstart", "--draws", "0"], "distill extract: error: --draws 0 must be >= 1 (noise draws per image)."),
])
def test_arguments_whose_setting_has_another_name_are_named_by_their_option(argv, named, tmp_path, capsys):
    """distill select checked --images as the recipe key select_images, behind a doubled 'distill select:' prefix;
    distill extract named --draws by its keyword num_draws=0 (its dest is now the keyword, so the spelling maps)."""
    assert main([*argv, "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(named) and err.count("distill ") == 1, err
    assert not (tmp_path / "o").exists()


def test_a_binary_mask_threshold_with_other_than_two_classes_is_refused():
    from distill.segment.config import layout_classes

    with pytest.raises(ValueError, match=r"^mask_threshold 128 makes every mask binary .* but num_classes is 3"):
        layout_classes("images-masks", 3, None, 128)
    assert layout_classes("images-masks", None, None, 128) == (2, 255) == layout_classes("images-masks", 2, None, 128)
