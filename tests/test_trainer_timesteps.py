"""The trainer's timestep modes: the RL policy (histogram, variance, resume), its recipe checks, multi-timestep."""
import csv

import pytest
import torch

from distill.config import make_recipe
from distill.trainer import load_trained, target_layout, train

from ._selection import PNG, tiny_recipe as _recipe
from .conftest import tiny_unet_config


def test_train_with_policy_logs_histogram_variance_and_resumes(tmp_path, fmnist_dir):
    run = tmp_path / "pol"
    recipe = _recipe(fmnist_dir, timesteps="policy", policy_baseline="ema", steps=3)
    summary = train(recipe, str(run), progress=False)
    rows = list(csv.DictReader(open(run / "policy.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert sum(int(r[f"n_t{t}"]) for r in rows for t in (1, 11, 50)) == 3 * 16  # one timestep per image per step
    assert all(float(r["gradvar_batch_mean"]) < float(r["gradvar_none"]) for r in rows)
    assert (run / "policy_histogram.png").read_bytes()[:8] == PNG
    assert summary["timesteps_used"] == {"policy": [1, 11, 50]}
    assert summary["policy"]["gradvar_ratio_batch_mean_over_none_median"] < 1
    assert (run / "checkpoint-3" / "model_1.safetensors").is_file()  # policy + head + baseline checkpointed
    metrics = list(csv.DictReader(open(run / "metrics.csv")))
    assert {"reward", "entropy", "policy_loss", "head_ce"} <= set(metrics[0])
    # resume to step 6 from the checkpoint: policy.csv continues, the policy weights are restored
    from safetensors.torch import load_file

    before = load_file(str(run / "checkpoint-3" / "model_1.safetensors"))
    train(_recipe(fmnist_dir, timesteps="policy", policy_baseline="ema", steps=6), str(run), resume=True,
          progress=False)
    rows = list(csv.DictReader(open(run / "policy.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    after = load_file(str(run / "checkpoint-6" / "model_1.safetensors"))
    assert before.keys() == after.keys() and float(after["baseline_initialised"]) == 1.0
    assert not torch.equal(before["net.features.0.weight"], after["net.features.0.weight"])
    model, _, resolved = load_trained(str(run))
    assert resolved["target_groups"] == [["mid_block@t*"], ["up_blocks.0@t*"]]


def test_policy_without_labels_is_a_clear_error(tmp_path, rgb_folder):
    import shutil

    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (rgb_folder / "train" / "cat").iterdir():
        shutil.copy(p, flat / p.name)
    recipe = make_recipe(dict(teacher=tiny_unet_config(3), teacher_blocks=["up_blocks.0"], timesteps="policy",
                              dataset="image-folder", data_root=str(flat), student="resnet18", student_size=32,
                              regressor_width=16, steps=2, batch_size=4, mean=[0.5] * 3, std=[0.25] * 3))
    with pytest.raises(ValueError, match=r"timesteps: policy needs labels .* Fix: use labelled data"):
        train(recipe, str(tmp_path / "run"), progress=False)


def test_policy_recipe_errors():
    with pytest.raises(ValueError, match="policy needs at least 2 timestep_candidates"):
        make_recipe({"timesteps": "policy", "timestep_candidates": [11]})
    with pytest.raises(ValueError, match="valid: batch-mean, ema, none"):
        make_recipe({"policy_baseline": "avg"})
    with pytest.raises(ValueError, match="one of auto-grid, auto-label-free, policy"):
        make_recipe({"timesteps": "grid"})


@pytest.mark.parametrize("mode", ["heads", "concat"])
def test_multi_timestep_layouts_one_batched_forward_per_step(tmp_path, fmnist_dir, mode):
    recipe = _recipe(fmnist_dir, timesteps=[1, 11, 50], multi_timestep=mode, steps=2, teacher_blocks=["up_blocks.0"])
    from distill.trainer import build_teacher

    teacher = build_teacher(recipe, 1)
    layout = target_layout(recipe, teacher)
    C = teacher.feature_info[0].num_chs
    if mode == "heads":
        assert layout.groups == [["up_blocks.0@t1"], ["up_blocks.0@t11"], ["up_blocks.0@t50"]]
        assert [c for c, _ in layout.targets] == [C] * 3
    else:
        assert layout.groups == [["up_blocks.0@t1", "up_blocks.0@t11", "up_blocks.0@t50"]]
        assert [c for c, _ in layout.targets] == [3 * C]
    import distill.teacher as T

    calls = []
    orig = T.DiffusionTeacher._run
    T.DiffusionTeacher._run = lambda self, x, t, stop: calls.append(x.shape[0]) or orig(self, x, t, stop)
    try:
        train(recipe, str(tmp_path / mode), progress=False)
    finally:
        T.DiffusionTeacher._run = orig
    assert calls[-2:] == [3 * 16, 3 * 16]  # each step: one forward of B x K images
    model, _, resolved = load_trained(str(tmp_path / mode))
    assert len(model.regressor.heads) == len(layout.targets)
    assert resolved["timesteps_used"] == [1, 11, 50]
