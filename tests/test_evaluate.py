"""distill.evaluate and `distill probe` on damaged inputs: a truncated or unreadable export names its file (exit 2,
no traceback from safetensors or timm), a run whose newest checkpoint is damaged is probed from the newest one that
loads (with a warning), and results that cannot be written are a WriteError (exit 2)."""
import json
import os
import shutil

import pytest

from distill.cli import main
from distill.errors import UnreadableFileError
from distill.evaluate import probe_model, resolve_probe_target

from ._finetune import exported  # noqa: F401 (the fixture: a fake `distill export` directory)


def _probe(target, rgb_folder, *extra):
    return main(["probe", str(target), "--dataset", "image-folder", "--data-root", str(rgb_folder), "--epochs", "1",
                 "--k", "3", "--no-progress", *extra])


@pytest.fixture
def damaged_export(exported, tmp_path):
    out = tmp_path / "student"
    shutil.copytree(exported, out)
    return out


@pytest.mark.parametrize("damage,text", [
    ("truncated", "model.safetensors' are truncated ("),
    ("empty", "model.safetensors' are empty (0 bytes)"),
    ("padded", "model.safetensors' are damaged ("),
    ("bad json", "config.json' is not valid JSON: Expecting value at line 1, column 18"),
])
def test_probe_of_a_damaged_export_exits_2_naming_the_file(damaged_export, rgb_folder, capsys, damage, text):
    weights = damaged_export / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[:len(data) // 3])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "padded":  # an interrupted copy over an older, longer file
        weights.write_bytes(data + b"\0" * 100)
    else:
        (damaged_export / "config.json").write_text('{"architecture": ')
    assert _probe(damaged_export, rgb_folder) == 2
    err = capsys.readouterr().err
    assert err.startswith("distill probe: error: exported student") and text in err, err
    assert f"distill export RUN -o {damaged_export} --overwrite" in err and "Traceback" not in err
    with pytest.raises(UnreadableFileError):
        probe_model(*resolve_probe_target(str(damaged_export)), dataset="image-folder", data_root=str(rgb_folder))


def test_probe_of_a_run_uses_the_newest_checkpoint_that_loads(trained_run, rgb_folder, tmp_path, caplog, capsys):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, copy_function=os.link)  # hard links: the damage below replaces, never edits in place
    weights = copy / "checkpoint-40" / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[:100000])
    with caplog.at_level("WARNING", logger="distill.rundir"):
        assert _probe(copy, rgb_folder, "--json", str(tmp_path / "rows.json")) == 0
    assert "checkpoint-40" in caplog.text and "model.safetensors: truncated" in caplog.text
    assert "using checkpoint-20" in caplog.text
    assert json.loads((tmp_path / "rows.json").read_text())[0]["name"] == f"{copy} (run)"


def test_probe_results_that_cannot_be_written_exit_2(exported, rgb_folder, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert _probe(exported, rgb_folder, "--json", str(tmp_path / "notes.txt" / "rows.json")) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path / 'notes.txt'}' is a file, not a directory" in err and "Traceback" not in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ device: chosen, used and reported
def test_probe_uses_and_reports_the_device_chosen(monkeypatch, rgb_folder):
    import torch

    import distill.evaluate as ev

    chosen = []

    def fake_eval_device(device=None):  # stands in for Accelerate's choice (a GPU on a GPU machine)
        chosen.append(device)
        return torch.device("cpu")

    monkeypatch.setattr(ev, "eval_device", fake_eval_device)
    used = {}
    for name in ("extract_features", "linear_probe", "knn_probe"):  # record the device each step is given
        real = getattr(ev, name)

        def spy(*a, _real=real, _name=name, **kw):
            used.setdefault(_name, []).append(str(kw.get("device", a[2] if _name == "extract_features" else None)))
            return _real(*a, **kw)

        monkeypatch.setattr(ev, name, spy)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    seen = []
    fn = ev.backbone_fn(model, 16, [0.5] * 3, [0.25] * 3)
    data = ev.probe_data("image-folder", str(rgb_folder), 3)
    row = ev.probe_fn(lambda x: seen.append((x.device, next(model.parameters()).device)) or fn(x), data, epochs=1,
                      k=3, progress=False)
    assert chosen == [None] and row["device"] == "cpu"
    assert used == {"extract_features": ["cpu", "cpu"], "linear_probe": ["cpu"], "knn_probe": ["cpu"]}
    assert seen and all(d == (torch.device("cpu"), torch.device("cpu")) for d in seen)
    assert ev.format_table([row]).endswith("features extracted and probes trained on cpu")


def test_backbone_moves_to_the_device_of_its_input():
    import torch

    from distill.evaluate import backbone_fn

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    out = backbone_fn(model, 16, [0.5] * 3, [0.25] * 3)(torch.zeros(2, 3, 8, 8, dtype=torch.uint8, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 4)  # a device other than the CPU without a GPU
    assert all(p.device.type == "meta" for p in model.parameters())


def test_run_pipeline_machine_line_names_the_device_used(monkeypatch):
    import torch

    import distill.pipeline as pl

    assert pl.machine_line("cpu").endswith("device cpu")
    monkeypatch.setattr(pl, "eval_device", lambda device=None: torch.device("cpu") if device is None else device)
    assert pl.machine_line().endswith("device cpu")
