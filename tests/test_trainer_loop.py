"""Integration tests of the training loop on real Fashion-MNIST images with a tiny teacher."""
import csv
import json

import pytest
import timm
import torch
import yaml

from distill.config import make_recipe
from distill.export import export_student, load_exported
from distill.trainer import RunExistsError, check_channels, latest_checkpoint, list_checkpoints, load_trained, train

from .conftest import tiny_unet_config


def _recipe(fmnist_dir, **kw):
    base = dict(teacher=tiny_unet_config(), teacher_blocks=["up_blocks.0"], timesteps=[11], data_root=fmnist_dir,
                student="resnet18", student_size=32, regressor_width=32, steps=40, batch_size=32, lr=2e-3,
                warmup_steps=5, log_every=5, checkpoint_every=20, augment="flip", mean=[0.286] * 3, std=[0.353] * 3)
    base.update(kw)
    return make_recipe(base)


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["total"])) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, fmnist_dir):
    run = tmp_path_factory.mktemp("runs") / "run"
    summary = train(_recipe(fmnist_dir), str(run), progress=False)
    return run, summary


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


def test_export_roundtrip_gives_same_features(trained_run, tmp_path):
    run, _ = trained_run
    model, recipe, resolved = load_trained(str(run))
    out = export_student(str(run), str(tmp_path / "student"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model.student.model(x))
        ref = model.student(x)
        got = reloaded.forward_intermediates(x, indices=model.student.indices, intermediates_only=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    cfg = reloaded.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 32, 32)
    assert tuple(cfg["mean"]) == pytest.approx((0.286,) * 3) and tuple(cfg["std"]) == pytest.approx((0.353,) * 3)
    assert cfg["tag"].startswith("distill-")
    assert "up_blocks.0" in cfg["description"] and "[11]" in cfg["description"]
    meta = json.loads((out / "config.json").read_text())["distill"]
    assert meta["timesteps"] == [11] and meta["steps"] == 40 and meta["data_root"] == recipe.data_root
    # a head for fine-tuning, with the distilled backbone underneath
    head = load_exported(str(out), num_classes=7)
    assert head(x).shape == (2, 7)
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_student(str(run), str(out))


def test_same_seed_same_loss_curve(fmnist_dir, tmp_path):
    r = _recipe(fmnist_dir, steps=6, checkpoint_every=6, log_every=1)
    train(r, str(tmp_path / "a"), progress=False)
    train(r, str(tmp_path / "b"), progress=False)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    train(make_recipe({**r.to_dict(), "seed": 1}), str(tmp_path / "c"), progress=False)
    assert _losses(tmp_path / "c") != _losses(tmp_path / "a")


def test_kill_and_resume_matches_uninterrupted(fmnist_dir, tmp_path):
    """Stop a run after its step-6 checkpoint (simulated by deleting later ones) and resume: same weights."""
    r = _recipe(fmnist_dir, steps=12, checkpoint_every=6, keep_checkpoints=5, log_every=1)
    full = tmp_path / "full"
    train(r, str(full), progress=False)
    import shutil

    interrupted = tmp_path / "interrupted"
    shutil.copytree(full, interrupted)
    shutil.rmtree(interrupted / "checkpoint-12")
    train(r, str(interrupted), resume=True, progress=False)
    a, _, _ = load_trained(str(full))
    b, _, _ = load_trained(str(interrupted))
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)


def test_existing_run_is_refused(trained_run, fmnist_dir):
    run, _ = trained_run
    with pytest.raises(RunExistsError, match="--resume .* --overwrite"):
        train(_recipe(fmnist_dir), str(run), progress=False)


def test_batch_larger_than_dataset(tmp_path, rgb_folder):
    r = make_recipe(dict(teacher=tiny_unet_config(3), teacher_blocks=["mid_block"], dataset="image-folder",
                         data_root=str(rgb_folder), student_size=32, regressor_width=16, steps=2, batch_size=1000))
    with pytest.raises(ValueError, match="batch_size=1000 is larger than the dataset \\(36 images\\)"):
        train(r, str(tmp_path / "run"), progress=False)


def test_teacher_channels_must_match_data(tmp_path, rgb_folder):
    r = make_recipe(dict(teacher=tiny_unet_config(1), teacher_blocks=["mid_block"], dataset="image-folder",
                         data_root=str(rgb_folder), student_size=32, steps=2, batch_size=4))
    with pytest.raises(ValueError) as e:
        train(r, str(tmp_path / "run"), progress=False)
    assert "in_channels=1" in str(e.value) and "3 channel" in str(e.value) and "Fix:" in str(e.value)
    check_channels(1, 3, "x")  # grayscale data feeds an RGB teacher
    with pytest.raises(ValueError):
        check_channels(3, 4, "x")
