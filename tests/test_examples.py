"""The runnable examples (examples/*.py) on their tiny settings, each in a subprocess as a user runs it: exit 0, the
files they say they write, finite numbers; the exported student loads in timm and gives the trained student's
features (checked here, independently of the script's own check); the segmentation legend's classes are the set's.

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
    c = tmp / "c"
    outs["c"] = _finish(_start("segmentation_finetune.py", ["-o", str(c), "--model", str(b / "student")], tmp))
    return {"a": (outs["a"], a), "b": (outs["b"], b), "c": (outs["c"], c)}


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
    assert result["test_images"] == 6 and result["steps"] == 2
    png = (run / "predictions.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "mIoU" in out
