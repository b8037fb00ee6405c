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
    assert f"distill export RUN --out {damaged_export} --overwrite" in err and "Traceback" not in err
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
