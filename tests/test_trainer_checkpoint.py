"""Faults: non-finite losses, malicious pickles in checkpoints, half-written checkpoints."""
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

import distill.trainer as trainer_mod
from distill.config import make_recipe
from distill.trainer import NonFiniteLossError, UntrustedCheckpointError, latest_checkpoint, list_checkpoints, train

from .conftest import tiny_unet_config


def _recipe(rgb_folder, **kw):
    base = dict(dataset="image-folder", data_root=str(rgb_folder), teacher=tiny_unet_config(3),
                teacher_blocks=["mid_block"], timesteps=[11], student="resnet18", student_size=32,
                regressor_width=16, steps=6, batch_size=6, checkpoint_every=2, keep_checkpoints=5, log_every=1)
    base.update(kw)
    return make_recipe(base)


@pytest.fixture
def nan_at_call(monkeypatch):
    """Make the AT term NaN on the n-th loss evaluation."""
    def install(n, term="at"):
        real = trainer_mod.feature_distillation_loss
        calls = {"n": 0}

        def fake(*a, **k):
            out = real(*a, **k)
            calls["n"] += 1
            if calls["n"] == n:
                out[term] = out[term] * float("nan")
                out["total"] = out["total"] + out[term]
            return out

        monkeypatch.setattr(trainer_mod, "feature_distillation_loss", fake)
    return install


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(rgb_folder, tmp_path, nan_at_call):
    nan_at_call(5)
    with pytest.raises(NonFiniteLossError) as e:
        train(_recipe(rgb_folder), str(tmp_path / "run"), progress=False)
    msg = str(e.value)
    assert "step 5" in msg and "at" in msg and "total" in msg and "checkpoint-4" in msg
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-4"
    weights = load_file(str(tmp_path / "run" / "checkpoint-4" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_nonfinite_batches_can_be_skipped(rgb_folder, tmp_path, nan_at_call):
    nan_at_call(3)
    summary = train(_recipe(rgb_folder, on_nonfinite="skip"), str(tmp_path / "run"), progress=False)
    assert summary["skipped_steps"] == 1
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[-1] == "skipped" and rows[-1].split(",")[-1] == "1"
    weights = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim,expected", [
    ("optimizer.bin", "would import or call code"),
    ("random_states_0.pkl", "would import or call code"),
    ("custom_checkpoint_0.pkl", "custom_checkpoint_0.pkl"),  # Accelerate would unpickle it with weights_only=False
])
def test_malicious_pickle_in_checkpoint_is_refused(rgb_folder, tmp_path, victim, expected):
    run = tmp_path / "run"
    train(_recipe(rgb_folder, steps=2), str(run), progress=False)
    marker = tmp_path / "pwned"
    with open(run / "checkpoint-2" / victim, "wb") as f:
        pickle.dump(_Evil(marker), f)
    with pytest.raises(UntrustedCheckpointError, match=expected):
        train(_recipe(rgb_folder, steps=4), str(run), resume=True, progress=False)
    assert not marker.exists()


def test_half_written_checkpoint_is_never_resumed(rgb_folder, tmp_path):
    run = tmp_path / "run"
    train(_recipe(rgb_folder, steps=2), str(run), progress=False)
    (run / ".tmp-checkpoint-4").mkdir()  # what a kill during a checkpoint write leaves
    (run / ".tmp-checkpoint-4" / "model.safetensors").write_bytes(b"truncated")
    assert [s for s, _ in list_checkpoints(run)] == [2]
    summary = train(_recipe(rgb_folder, steps=4), str(run), resume=True, progress=False)
    assert summary["steps"] == 4 and [s for s, _ in list_checkpoints(run)] == [2, 4]
    assert not list(run.glob(".tmp-*"))


def test_sigkill_at_random_steps_then_resume_equals_uninterrupted(rgb_folder, tmp_path):
    """Kill `distill train` with SIGKILL several times at random points (also mid-checkpoint); --resume must end
    with the same weights, bit for bit, as a run that was never interrupted."""
    import random
    import signal
    import subprocess
    import sys
    import time

    import yaml

    recipe = dict(_recipe(rgb_folder, steps=10, checkpoint_every=1, keep_checkpoints=2).to_dict())
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses: float reductions depend on the thread count
    try:
        train(make_recipe(recipe), str(tmp_path / "ref"), progress=False)
    finally:
        torch.set_num_threads(threads)

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "distill.cli", "train", str(path), "-o", str(run), "--no-progress", "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    kills = 0
    for _attempt in range(8):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 3:
            target = (latest_checkpoint(run).name.split("-")[-1] if latest_checkpoint(run) else "0")
            target = int(target) + rng.randint(1, 3)
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline:
                ckpt = latest_checkpoint(run)
                if ckpt is not None and int(ckpt.name.split("-")[-1]) >= target:
                    time.sleep(rng.random() * 0.5)  # land anywhere: mid-step or mid-checkpoint
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                    break
                time.sleep(0.02)
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert kills >= 2, "the run finished before it could be killed twice"
    assert latest_checkpoint(run).name == "checkpoint-10"
    ref = load_file(str(tmp_path / "ref" / "checkpoint-10" / "model.safetensors"))
    got = load_file(str(run / "checkpoint-10" / "model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    steps = [int(ln.split(",")[0]) for ln in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps))  # no duplicated rows after resumes


def _folder_with_broken_files(root):
    """Two classes of small PNGs plus a truncated JPEG, a text file named .jpg and a non-image file."""
    import io

    import numpy as np
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
    (root / "a" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "b" / "notes.jpg").write_text("not an image")
    (root / "b" / "README.txt").write_text("ignored: not an image extension")
    return root


def test_broken_images_are_skipped_inside_dataloader_workers(tmp_path):
    from torch.utils.data import DataLoader

    from distill.data import ImageFolder, collate

    ds = ImageFolder(str(_folder_with_broken_files(tmp_path / "imgs")), channels=3)
    assert len(ds) == 10  # 8 good + 2 broken with image extensions; README.txt is not listed
    batches = list(DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate))
    images = torch.cat([b[0] for b in batches])
    assert images.shape == (10, 3, 8, 8)  # every broken file replaced by a readable neighbour, no worker crash


def test_broken_images_can_be_an_error_naming_the_file(tmp_path):
    from distill.data import ImageFolder

    ds = ImageFolder(str(_folder_with_broken_files(tmp_path / "imgs")), channels=3, on_error="raise")
    bad = [i for i, (p, _) in enumerate(ds.files) if p.endswith(("truncated.jpg", "notes.jpg"))]
    for i in bad:
        with pytest.raises(ValueError, match=r"cannot read image '.*(truncated|notes)\.jpg'"):
            ds[i]


def test_cli_exits_nonzero_on_nonfinite_loss(rgb_folder, tmp_path, nan_at_call, capsys):
    import yaml

    from distill.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(rgb_folder).to_dict()))
    nan_at_call(3)
    assert main(["train", str(path), "-o", str(tmp_path / "run"), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 3: at" in err and "checkpoint-2" in err
