"""tools/train_teacher.py: trains, saves a pipeline distill loads, and --stop-after keeps the --steps schedule."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_teacher.py"


def _tool():
    spec = importlib.util.spec_from_file_location("train_teacher", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tiny_unet_json(tmp_path):
    path = tmp_path / "unet.json"
    path.write_text(json.dumps({"block_out_channels": [8, 16, 16], "norm_num_groups": 4, "attention_head_dim": 8}))
    return path


def test_stop_after_keeps_schedule_and_saves_loadable_pipeline(rgb_folder, tiny_unet_json, tmp_path):
    from distill.teacher import load_unet

    out = tmp_path / "teacher"
    lr, warmup, steps, stop = 1e-3, 2, 8, 4
    _tool().main(["--dataset", "image-folder", "--data-root", str(rgb_folder), "--out", str(out),
                  "--unet-config", str(tiny_unet_json), "--batch-size", "4", "--steps", str(steps),
                  "--stop-after", str(stop), "--warmup", str(warmup), "--lr", str(lr), "--ema", "--save-every", "100"])
    info = json.loads((out / "training.json").read_text())
    assert info["step"] == stop
    rows = list(csv.DictReader(open(out.with_name(out.name + ".loss.csv"))))
    assert len(rows) == stop
    # diffusers' cosine-with-warmup over --steps (8), not over the 4 steps run: lr after step 4 is
    # lr * 0.5 * (1 + cos(pi * (4 - 2) / (8 - 2)))
    expected = lr * 0.5 * (1 + math.cos(math.pi * (stop - warmup) / (steps - warmup)))
    assert float(rows[-1]["lr"]) == pytest.approx(expected, rel=1e-3)
    unet, scheduler = load_unet(str(out))
    assert unet.config.in_channels == 3 and list(unet.config.block_out_channels) == [8, 16, 16]
    assert scheduler.config.num_train_timesteps == 1000


def test_stop_after_out_of_range_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _tool().parse_args(["--out", str(tmp_path / "t"), "--steps", "10", "--stop-after", "11"])
    err = capsys.readouterr().err
    assert "--stop-after" in err and "11" in err and "--steps=10" in err


def test_resume_continues_the_schedule_and_the_loss_csv(rgb_folder, tiny_unet_json, tmp_path):
    """Two roots pooled, preloaded; stopped at step 2 of 4 and resumed: 4 CSV rows, the lr of an uninterrupted run at
    every step (optimizer and schedule restored from OUT.state/), and a loadable pipeline at step 4."""
    common = ["--dataset", "image-folder", "--data-root", str(rgb_folder / "train"), str(rgb_folder / "test"),
              "--unet-config", str(tiny_unet_json), "--batch-size", "4", "--steps", "4", "--warmup", "1",
              "--lr", "1e-3", "--save-every", "2", "--preload", "--ema"]
    _tool().main(common + ["--out", str(tmp_path / "straight")])
    _tool().main(common + ["--out", str(tmp_path / "cut"), "--stop-after", "2"])
    assert json.loads((tmp_path / "cut" / "training.json").read_text())["step"] == 2
    _tool().main(common + ["--out", str(tmp_path / "cut"), "--resume"])
    rows = {name: list(csv.DictReader(open(tmp_path / f"{name}.loss.csv"))) for name in ("straight", "cut")}
    assert [r["step"] for r in rows["cut"]] == ["1", "2", "3", "4"]
    assert [r["lr"] for r in rows["cut"]] == [r["lr"] for r in rows["straight"]]
    assert [r["loss"] for r in rows["cut"][:2]] == [r["loss"] for r in rows["straight"][:2]]
    info = json.loads((tmp_path / "cut" / "training.json").read_text())
    assert info["step"] == 4 and info["images"] == 54 and not info["stopped_by_time_limit"]


def test_resume_without_state_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no training state"):
        _tool().main(["--out", str(tmp_path / "none"), "--resume", "--steps", "2"])
