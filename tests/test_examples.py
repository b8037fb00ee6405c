"""The runnable examples (examples/*.py) on their tiny settings, each in a subprocess as a user runs it: exit 0, the
files they say they write, finite numbers; the exported student loads in timm and gives the trained student's
features (checked here, independently of the script's own check); the segmentation legend's classes are the set's;
the --tiny data is removed afterwards. Bad input that passes argparse gives one line 'SCRIPT: error: ...' and exit 2,
before any training.

(a) and (b) run side by side (two cores), then (c) fine-tunes (b)'s export."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _env(tmp: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               TMPDIR=str(tmp), OMP_NUM_THREADS="1")  # --tiny data goes under the test's tmp
    return env


def _start(script: str, args: list, tmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(EXAMPLES / script), "--tiny", "--steps", "2", *args],
                            cwd=tmp, env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Run the three examples once: {'a': (stdout, out_dir), 'b': ..., 'c': ...}."""
    tmp = tmp_path_factory.mktemp("examples")
    a, b = tmp / "a", tmp / "b"
    procs = {"a": _start("distill_python_teacher.py", ["-o", str(a)], tmp),
             "b": _start("distill_export_finetune.py", ["-o", str(b)], tmp)}
    outs = {k: _finish(p) for k, p in procs.items()}
    c = tmp / "c"  # one step: the summary says "1 step"
    outs["c"] = _finish(_start("segmentation_finetune.py", ["-o", str(c), "--model", str(b / "student"),
                                                            "--steps", "1"], tmp))
    return {"a": (outs["a"], a), "b": (outs["b"], b), "c": (outs["c"], c), "tmp": tmp}


def test_examples_remove_the_tiny_data_they_wrote(ran):
    assert list(ran["tmp"].glob("distill-example-*")) == []


def test_python_teacher_example_distills_from_the_users_module(ran):
    out, run = ran["a"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["total"])) for r in rows)
    source = yaml.safe_load((run / "config.yaml").read_text())["_resolved"]["teacher_source"]
    assert source["kind"] == "python" and source["code"] == str(EXAMPLES / "my_teacher.py")
    assert (run / "checkpoint-2" / "model.safetensors").is_file()
    assert "final losses: mse" in out and "distill export" in out


def test_export_finetune_example_gives_a_timm_model_with_the_trained_features(ran):
    import timm

    from distill import load_trained

    out, root = ran["b"]
    student = root / "student"
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in student.iterdir()}
    backbone = timm.create_model(f"local-dir:{student}", pretrained=True, num_classes=0).eval()
    trained = load_trained(str(root / "run"))[0].student.model.eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), trained(x), rtol=0, atol=1e-6)
    result = json.loads((root / "finetune" / "result.json").read_text())
    assert result["steps"] == 2 and 0 <= result["last_top1"] <= 100 and result["model"] == str(student)
    assert "max |timm - trained| = 0" in out and "4. fine-tuned:" in out


def test_segmentation_example_writes_results_and_a_legend_of_its_classes(ran):
    out, run = ran["c"]
    result = json.loads((run / "result.json").read_text())
    assert list(result["per_class_iou"]) == ["background", "square", "disc", "bar"]
    assert math.isfinite(result["last_miou"]) and 0 <= result["last_miou"] <= 100
    assert result["test_images"] == 6 and result["steps"] == 1
    png = (run / "predictions.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "mIoU" in out and "6 training images, 1 step: mIoU" in out and "on 6 test images" in out


def _refused(script: str, args: list, tmp: Path) -> str:
    """Run ``script args`` (no --tiny unless given); assert exit 2 and one error line naming the script, no
    traceback. Returns stderr."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=tmp, env=_env(tmp),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if f"{script}: error: " in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_python_teacher_example_reports_a_missing_file_in_one_line(tmp_path):
    line = _refused("distill_python_teacher.py", ["--data-root", str(tmp_path / "no-such-folder"),
                                                  "-o", str(tmp_path / "run")], tmp_path)
    assert "no-such-folder" in line and "does not exist" in line
    line = _refused("distill_python_teacher.py", ["--tiny", "--teacher-weights", str(tmp_path / "w.safetensors"),
                                                  "-o", str(tmp_path / "run")], tmp_path)
    assert "teacher_weights" in line and "w.safetensors" in line and "Fix:" in line
    assert not (tmp_path / "run" / "metrics.csv").exists() and not list(tmp_path.glob("distill-example-*"))


def test_export_finetune_example_checks_the_fraction_before_distilling(tmp_path):
    # --tiny used to replace the given --fraction with 1 silently; out of range it is now refused before step 1
    line = _refused("distill_export_finetune.py", ["--tiny", "--fraction", "2", "-o", str(tmp_path / "o")], tmp_path)
    assert "--fraction 2.0 is outside (0, 1]" in line
    assert not (tmp_path / "o").exists()


def test_segmentation_example_refuses_settings_that_tiny_would_override(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "segmentation_finetune.py"), "--tiny", "--layout", "voc",
                           "--num-classes", "3"], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert "--layout voc, --num-classes 3: --tiny without --data-root" in proc.stderr and "Fix:" in proc.stderr


def test_segmentation_example_reports_a_missing_model_in_one_line(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        from _tiny_data import segmentation_folder
    finally:
        sys.path.remove(str(EXAMPLES))
    root = segmentation_folder(tmp_path / "seg", per_split=2)
    line = _refused("segmentation_finetune.py", ["--data-root", str(root), "--layout", "images-masks",
                                                 "--num-classes", "4", "--model", str(tmp_path / "no-export"),
                                                 "-o", str(tmp_path / "o")], tmp_path)
    assert "--model" in line and "no-export" in line and "distill export" in line


def _suggests_only_its_own_options(script: str, line: str, tmp: Path) -> None:
    import re

    helptext = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], env=_env(tmp), capture_output=True,
                              text=True, timeout=120).stdout
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", line.split("error:", 1)[1])) - {"--depth"}  # git clone's
    assert all(opt in helptext for opt in named), (named, line)


def test_library_messages_name_the_scripts_own_options(tmp_path):
    """The library's checks name the option of the script that was run: the fine-tune's steps are --finetune-steps
    in distill_export_finetune.py (the message said --steps, the script's distillation steps); the segmentation
    example's messages suggested --mask-threshold, which it lacked, and a missing --class-names file was a bare
    Errno line."""
    line = _refused("distill_export_finetune.py", ["--tiny", "--finetune-steps", "0", "-o", str(tmp_path / "o")],
                    tmp_path)
    assert "--finetune-steps must be an integer >= 1; got 0" in line
    _suggests_only_its_own_options("distill_export_finetune.py", line, tmp_path)
    for script in ("distill_export_finetune.py", "distill_python_teacher.py"):  # one line (no usage block), the
        line = _refused(script, ["--tiny", "--steps", "0", "-o", str(tmp_path / "o")], tmp_path)  # option's name
        assert "--steps must be an integer >= 1 (distillation steps)" in line and not (tmp_path / "o").exists()
    sys.path.insert(0, str(EXAMPLES))
    try:
        from _tiny_data import segmentation_folder
    finally:
        sys.path.remove(str(EXAMPLES))
    root = segmentation_folder(tmp_path / "seg", per_split=2)
    common = ["--data-root", str(root), "--layout", "images-masks", "-o", str(tmp_path / "s")]
    line = _refused("segmentation_finetune.py", common, tmp_path)
    assert "--layout images-masks needs --num-classes N" in line and "--mask-threshold T" in line
    _suggests_only_its_own_options("segmentation_finetune.py", line, tmp_path)
    line = _refused("segmentation_finetune.py", common + ["--num-classes", "4", "--class-names",
                                                          str(tmp_path / "missing.txt")], tmp_path)
    assert f"--class-names '{tmp_path / 'missing.txt'}' is not a file" in line and "Errno" not in line
    _suggests_only_its_own_options("segmentation_finetune.py", line, tmp_path)
    assert not (tmp_path / "s").exists()


def test_a_second_run_into_the_same_output_dir_is_refused_without_overwrite(ran):
    """The examples replaced an earlier run silently (overwrite was hard-coded): now one line, exit 2, the earlier
    run untouched, unless --overwrite is given."""
    a = ran["a"][1]

    def files():  # the run's files (its .lock is opened by every command that checks for a live holder)
        return {p.name: p.stat().st_mtime_ns for p in a.iterdir() if p.name != ".lock"}
    before = files()
    proc = _start("distill_python_teacher.py", ["-o", str(a)], ran["tmp"])
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, text[-2000:]
    assert "error:" in text and "Traceback" not in text and "overwrite" in text
    assert files() == before
    # every option the message suggests is one the script has (it named --resume, which the script lacked)
    import re

    helptext = subprocess.run([sys.executable, str(EXAMPLES / "distill_python_teacher.py"), "--help"],
                              env=_env(ran["tmp"]), capture_output=True, text=True, timeout=120).stdout
    suggested = set(re.findall(r"--[a-z][a-z-]+", text.split("error:", 1)[1]))
    assert suggested and all(opt in helptext for opt in suggested), (suggested, helptext)
