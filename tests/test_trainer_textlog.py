"""RUN/train.log: plain lines every log_every steps (step, loss terms, lr, img/s, data-wait share), echoed to stdout
when there is no progress bar; a resume appends; tracker errors name the pip extra."""
import csv

import pytest

from distill.errors import MissingDependencyError
from distill.trainer import train
from distill.trainer.accelerator import check_tracker
from distill.trainer.textlog import TRAIN_LOG, format_line, show_progress_bar

from .conftest import rgb_recipe


def test_format_line_holds_every_field():
    line = format_line(10, 400, {"mse": 0.001732, "total": 0.8954, "at": 0.08937}, 6.6667e-4, 57.14, 0.034)
    assert line == "step 10/400 | total 0.8954 at 0.08937 mse 0.001732 | lr 0.000667 | 57.1 img/s | data 3%"
    line = format_line(10, 400, {"total": 0.8937}, 6.6667e-4, 57.14, 0.034, tflops=0.031512, mfu=0.41234)
    assert line == "step 10/400 | total 0.8937 | lr 0.000667 | 57.1 img/s | 0.03151 TFLOP/s | MFU 41.2% | data 3%"


def test_the_readme_example_line_adds_up():
    """The train.log example of docs/training.md (moved there from the README) is a line of the format whose total is mse + 10 x at (the quickstart's
    weights), to the 4 significant digits printed (it showed a total 0.0017 off its terms)."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    line = re.search(r"\n(step \d+/\d+ \| total [^\n]*)\n```", page).group(1)
    terms = dict(zip(line.split(" | ")[1].split()[::2], map(float, line.split(" | ")[1].split()[1::2])))
    assert terms["total"] == pytest.approx(terms["mse"] + 10 * terms["at"], abs=1e-4), line


def test_bar_only_on_a_terminal_or_in_jupyter(monkeypatch):
    import sys
    import types

    class Err:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stderr", Err(False))
    assert not show_progress_bar(True)
    monkeypatch.setattr(sys, "stderr", Err(True))
    assert show_progress_bar(True) and not show_progress_bar(False) and not show_progress_bar(True, False)
    monkeypatch.setattr(sys, "stderr", Err(False))
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert show_progress_bar(True)


def test_train_log_lines_match_metrics_and_are_echoed(rgb_folder, tmp_path, capsys):
    run = tmp_path / "run"
    train(rgb_recipe(rgb_folder, steps=4, log_every=2, checkpoint_every=2), str(run), progress=True)
    lines = (run / TRAIN_LOG).read_text().splitlines()
    assert lines[0].endswith("started") and len(lines) == 1 + 2 + 3  # cost lines, then steps 1 (first), 2, 4
    assert lines[1].startswith("cost per image (GFLOP") and lines[2].startswith("device cpu x 1 process(es)")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    for line, row in zip(lines[3:], rows):
        fields = line.split(" | ")
        assert fields[0] == f"step {row['step']}/4"
        terms = dict(zip(fields[1].split()[::2], map(float, fields[1].split()[1::2])))
        assert terms == pytest.approx({k: float(row[k]) for k in terms}, rel=1e-3) and "total" in terms
        assert float(fields[2].split()[1]) == pytest.approx(float(row["lr"]), rel=1e-2)
        assert fields[3] == f"{float(row['img_per_s']):.1f} img/s"
        assert fields[4] == f"{float(row['tflops']):.4g} TFLOP/s" and row["mfu"] == ""  # a CPU: no known peak
        assert 0 <= int(fields[5].removeprefix("data ").removesuffix("%")) <= 100
    assert capsys.readouterr().out.splitlines()[-5:] == lines[1:]  # pytest's stderr is no terminal: no bar, lines
    # a resume appends after a marker; nothing written before is lost
    train(rgb_recipe(rgb_folder, steps=6, log_every=2, checkpoint_every=2), str(run), resume=True, progress=False)
    again = (run / TRAIN_LOG).read_text().splitlines()
    n = len(lines)
    assert again[:n] == lines and again[n].endswith("resumed after step 4") and again[-1].startswith("step 6/6")


def test_overwrite_removes_train_log_as_its_own(rgb_folder, tmp_path):
    run = tmp_path / "run"
    train(rgb_recipe(rgb_folder, steps=2), str(run), progress=False)
    train(rgb_recipe(rgb_folder, steps=2), str(run), overwrite=True, progress=False)
    assert (run / TRAIN_LOG).read_text().count("started") == 1


def test_unknown_or_missing_tracker_is_an_error(monkeypatch):
    check_tracker(None)
    with pytest.raises(ValueError, match="valid: tensorboard, wandb, mlflow"):
        check_tracker("tensorbord")
    monkeypatch.setattr("accelerate.utils.is_wandb_available", lambda: False)
    with pytest.raises(MissingDependencyError, match=r'pip install "diffusion-distill\[wandb\]"'):
        check_tracker("wandb")


def test_a_run_that_reads_fewer_images_than_listed_says_so_in_train_log(rgb_folder, tmp_path, caplog):
    """A symlink loop in the image folder: skipped with a warning (it crashed `distill train` before), and train.log
    says how many images were read and what was left out, naming the file."""
    import os
    import shutil

    data = tmp_path / "data"
    shutil.copytree(rgb_folder / "train", data / "train")
    os.symlink("loop", data / "train" / "cat" / "loop")
    run = tmp_path / "run"
    with caplog.at_level("WARNING"):
        train(rgb_recipe(data, steps=1), str(run), progress=False)
    lines = (run / TRAIN_LOG).read_text().splitlines()
    assert lines[1] == (f"data: 36 images read; 1 file(s) left out: '{data / 'train' / 'cat' / 'loop'}' skipped: it "
                        f"cannot be followed (Too many levels of symbolic links; a symlink loop?)")
    assert "data: 36 images read" in caplog.text


@pytest.mark.parametrize("log", ["metrics.csv", "policy.csv", "train.log"])
def test_a_full_disk_under_a_run_log_is_a_write_error_naming_the_file(tmp_path, log):
    """Appends to metrics.csv / policy.csv / train.log go through distill.atomic.writing: a full disk (/dev/full
    returns ENOSPC on every write) is a WriteError naming the file and the cause (exit 2), not a raw OSError."""
    import errno
    import os

    from distill.cli import main  # noqa: F401 - the CLI maps WriteError to exit 2
    from distill.errors import EXIT_CODES, WriteError
    from distill.trainer.textlog import CsvLog, TrainLog

    os.symlink("/dev/full", tmp_path / log)
    with pytest.raises(WriteError) as e:
        if log == "train.log":
            TrainLog(tmp_path, 0)
        else:
            CsvLog(tmp_path / log, 0, header=["step", "loss"] if log == "policy.csv" else None).write({"step": 1})
    assert e.value.errno == errno.ENOSPC and f"could not write {log} to '{tmp_path / log}': the disk is full" in str(e.value)
    assert next(code for kinds, code in EXIT_CODES if isinstance(e.value, kinds)) == 2
