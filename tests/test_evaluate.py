"""distill.evaluate and `distill probe` on damaged inputs: a truncated or unreadable export names its file (exit 2,
no traceback from safetensors or timm), a run whose newest checkpoint is damaged is probed from the newest one that
loads (with a warning), and results that cannot be written are a WriteError (exit 2). Test labels are paired with the
training split's classes by name (a class missing from test/ is named, never a silent 0%), a --test-fraction subset
is seeded, stratified and stated, and progress in a redirected log is a few plain lines."""
import json
import os
import shutil

import pytest

from distill.cli import main
from distill.errors import UnreadableFileError
from distill.evaluate import probe_model, resolve_probe_target

from ._finetune import exported  # noqa: F401 (the fixture: a fake `distill export` directory)
from .test_data_classes import image_folder


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


# ------------------------------------------------------------------ classes paired by name; a test subset
def _pixels_and_random_init(root, tmp_path, *extra):
    """``distill probe timm:resnet18 --pixels`` on the image folder ``root``: (exit code, rows or None)."""
    out = tmp_path / "rows.json"
    code = main(["probe", "timm:resnet18", "--dataset", "image-folder", "--data-root", str(root), "--size", "16",
                 "--pixels", "--epochs", "30", "--k", "3", "--no-progress", "--json", str(out), *extra])
    return code, (json.loads(out.read_text()) if out.is_file() else None)


def test_probe_pairs_classes_by_name_when_the_test_split_lacks_one(tmp_path, caplog):
    from distill.evaluate import pixels_fn, probe_data, probe_fn

    # cat, dog, ship: red, green, blue images; test/ has no cat, so by position dog would be scored as cat (0%)
    image_folder(tmp_path / "d", {"train": {"cat": 6, "dog": 6, "ship": 6}, "test": {"dog": 4, "ship": 4}})
    with caplog.at_level("WARNING", logger="distill.data"):
        data = probe_data("image-folder", str(tmp_path / "d"), 3)
    row = probe_fn(pixels_fn, data, epochs=30, k=3, progress=False, weights="none")
    assert row["knn_top1"] == 100.0 and row["linear_top1"] > 50.0  # was 0.0: labels paired by position
    assert "has no images of class(es) 'cat'" in caplog.text and "not scored" in caplog.text


def test_probe_of_a_test_class_the_training_split_lacks_exits_2_naming_it(tmp_path, capsys):
    image_folder(tmp_path / "d", {"train": {"cat": 3, "dog": 3}, "test": {"cat": 2, "horse": 2}})
    code, rows = _pixels_and_random_init(tmp_path / "d", tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and rows is None
    assert "'horse'" in err and "the training split lacks" in err and "Fix:" in err and "Traceback" not in err


def test_test_fraction_is_a_seeded_stratified_subset_stated_in_the_table(tmp_path, capsys):
    import torch

    from distill.data import dataset_labels
    from distill.evaluate import probe_data

    image_folder(tmp_path / "d", {"train": {"cat": 4, "dog": 4, "ship": 4}, "test": {"cat": 10, "dog": 6, "ship": 4}})
    root = str(tmp_path / "d")
    a, b, c = (probe_data("image-folder", root, 3, test_fraction=0.5, seed=s) for s in (0, 0, 1))
    assert torch.bincount(dataset_labels(a.test)).tolist() == [5, 3, 2]  # half of every class
    assert a.test.indices == b.test.indices and a.test.indices != c.test.indices  # seeded
    assert (len(a.test), a.test_total) == (10, 20)
    code, rows = _pixels_and_random_init(tmp_path / "d", tmp_path, "--test-fraction", "0.5")
    out = capsys.readouterr().out
    assert code == 0 and [(r["num_test"], r["num_test_total"], r["test_fraction"]) for r in rows] == [(10, 20, 0.5)] * 2
    assert "tested on 10 of 20 test images (test fraction 0.5, seed 0)" in out
    assert main(["probe", "timm:resnet18", "--data-root", root, "--dataset", "image-folder", "--test-fraction", "0"]) == 2
    assert "--test-fraction / probe_test_fraction" in capsys.readouterr().err


def test_probe_progress_in_a_redirected_log_is_a_few_plain_lines(tmp_path):
    import subprocess
    import sys

    image_folder(tmp_path / "d", {"train": {"cat": 6, "dog": 6}, "test": {"cat": 3, "dog": 3}})
    log = tmp_path / "probe.log"
    with open(log, "w") as f:  # stderr is a file, not a terminal
        subprocess.run([sys.executable, "-m", "distill.cli", "probe", "timm:resnet18", "--dataset", "image-folder",
                        "--data-root", str(tmp_path / "d"), "--size", "16", "--pixels", "--epochs", "30", "--k", "3"],
                       stderr=f, stdout=subprocess.DEVNULL, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text  # no bar frames
    lines = text.splitlines()
    for what in ("train features: done", "test features: done", "linear probe: done 30/30 epoch", "kNN probe: done"):
        assert sum(what in line for line in lines) == 2, (what, text)  # once per probed model
    assert len(lines) <= 10, text
