"""Deployment (distill.deploy, ``distill export --onnx``): the ONNX file run by onnxruntime gives the trained
student's pooled features on the same input (max abs difference <= 1e-4, fp32 CPU), at a batch size other than the
traced one; a missing extra is one error naming it (exit 2, nothing written); --opset is checked."""
import importlib.util
import json

import numpy as np
import pytest
import timm
import torch

from .conftest import rgb_recipe
from distill.cli import main
from distill.deploy import ONNX_ATOL, ONNX_OPSET
from distill.export import export_problem
from distill.trainer import load_trained, train

#: the tolerance of these tests: fp32 on CPU, pooled features of order 1 (measured: ~1e-7 for ResNet-18)
ATOL = 1e-4
assert ATOL == ONNX_ATOL

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]'; the test "
                                                "extra includes it)")


@pytest.fixture(scope="module")
def run(tmp_path_factory, rgb_folder):
    """A 2-step ResNet-18 run on the tiny RGB folder (32 px)."""
    out = tmp_path_factory.mktemp("onnx") / "run"
    train(rgb_recipe(rgb_folder, steps=2, checkpoint_every=2), str(out), progress=False)
    return out


def test_export_onnx_runs_in_onnxruntime_like_the_trained_student(run, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["export", str(run), "-o", str(out), "--onnx"]) == 0
    assert "model.onnx (opset 18)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.onnx", "model.safetensors"]
    trained = load_trained(str(run))[0].student.model.eval()
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for batch in (1, 5):  # traced at 2: the batch axis is dynamic
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        got = session.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            want, again = trained(x).numpy(), reloaded(x).numpy()
        assert got.shape == (batch, trained.num_features) and np.isfinite(got).all()
        assert np.abs(got - want).max() <= ATOL and np.abs(got - again).max() <= ATOL
        assert np.abs(want).max() > 100 * ATOL  # features, not zeros
    meta = json.loads((out / "config.json").read_text())["distill"]["onnx"]
    assert meta["opset"] == ONNX_OPSET and meta["input_shape"] == ["batch", 3, 32, 32]
    assert 0 <= meta["max_abs_diff_onnxruntime"] <= ATOL
    import onnx

    assert {o.domain: o.version for o in onnx.load(str(out / "model.onnx")).opset_import}[""] == ONNX_OPSET
    assert export_problem(out) is None  # an export with model.onnx is still an export: --overwrite may replace it


def test_export_onnx_without_the_extra_names_it_and_writes_nothing(run, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    out = tmp_path / "student"
    assert main(["export", str(run), "-o", str(out), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert "--onnx needs onnxscript" in err and 'pip install "diffusion-distill[onnx]"' in err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [(["--opset", "17"], "--opset 17 applies to an ONNX export"),
                                           (["--onnx", "--opset", "7"], "--opset 7 is not valid; valid: 18 to 23"),
                                           (["--onnx", "--opset", "13"], "--opset 13 is not valid; valid: 18 to 23")])
def test_export_opset_is_checked(run, tmp_path, capsys, argv, message):
    assert main(["export", str(run), "-o", str(tmp_path / "s")] + argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_an_onnx_file_that_computes_something_else_fails_the_export_and_writes_nothing(run, tmp_path, monkeypatch,
                                                                                     capsys):
    """The check is real: a graph whose output differs (here: onnxruntime's output shifted by 1e-3) stops the export,
    exit 3, nothing at -o."""
    import distill.deploy as deploy

    real = ort.InferenceSession

    class Shifted:
        def __init__(self, *a, **k):
            self.s = real(*a, **k)

        def run(self, *a, **k):
            return [o + 1e-3 for o in self.s.run(*a, **k)]

    monkeypatch.setattr(ort, "InferenceSession", Shifted)
    out = tmp_path / "student"
    assert main(["export", str(run), "-o", str(out), "--onnx"]) == 3
    assert "the ONNX export differs from the timm model by up to 0.001" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())
    assert deploy.ONNX_ATOL < 1e-3


def test_a_file_with_another_opset_than_asked_is_refused_and_removed(tmp_path):
    """torch's exporter, asked for an opset it cannot convert down to, writes its own (18) without a word; the
    export reads the file back and refuses it, keeping nothing."""
    import torch

    from distill.deploy import export_onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ValueError, match="^opset 13: torch's exporter wrote opset 18.* Fix: opset 18 to"):
        export_onnx(model, tmp_path / "m.onnx", (3, 8, 8), opset=13)
    assert not (tmp_path / "m.onnx").exists()
    assert export_onnx(model, tmp_path / "ok.onnx", (3, 8, 8), opset=18).exists()
