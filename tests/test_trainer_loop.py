"""The training loop (distill.trainer.loop) on real Fashion-MNIST images with a tiny teacher: the loss goes down,
the same seed gives the same curve, a non-finite loss stops the run or skips the batch."""
import csv

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.config import make_recipe
from distill.trainer import NonFiniteLossError, latest_checkpoint, list_checkpoints, train

from .conftest import fmnist_recipe, rgb_recipe


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["total"])) for r in csv.DictReader(f)]


def test_loss_goes_down_and_checkpoints_appear(trained_run):
    run, summary = trained_run
    losses = _losses(run)
    assert [s for s, _ in losses][-1] == 40
    first, last = losses[0][1], sum(v for _, v in losses[-3:]) / 3
    assert last < 0.8 * first, losses
    assert [s for s, _ in list_checkpoints(run)] == [20, 40]
    assert (latest_checkpoint(run) / "model.safetensors").is_file()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["steps"] == 40 and cfg["_resolved"]["teacher_features"][0]["block"] == "up_blocks.0"
    assert summary["final_losses"]["total"] == pytest.approx(losses[-1][1], rel=1e-4)


def test_same_seed_same_loss_curve(fmnist_dir, tmp_path):
    r = fmnist_recipe(fmnist_dir, steps=6, checkpoint_every=6, log_every=1)
    train(r, str(tmp_path / "a"), progress=False)
    train(r, str(tmp_path / "b"), progress=False)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    train(make_recipe({**r.to_dict(), "seed": 1}), str(tmp_path / "c"), progress=False)
    assert _losses(tmp_path / "c") != _losses(tmp_path / "a")


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(rgb_folder, tmp_path, nan_at_call):
    nan_at_call(5)
    with pytest.raises(NonFiniteLossError) as e:
        train(rgb_recipe(rgb_folder), str(tmp_path / "run"), progress=False)
    msg = str(e.value)
    assert "step 5" in msg and "at" in msg and "total" in msg and "checkpoint-4" in msg
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-4"
    weights = load_file(str(tmp_path / "run" / "checkpoint-4" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_nonfinite_batches_can_be_skipped(rgb_folder, tmp_path, nan_at_call):
    nan_at_call(3)
    summary = train(rgb_recipe(rgb_folder, on_nonfinite="skip"), str(tmp_path / "run"), progress=False)
    assert summary["skipped_steps"] == 1
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[-1] == "skipped" and rows[-1].split(",")[-1] == "1"
    weights = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
