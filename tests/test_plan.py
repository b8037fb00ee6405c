"""distill plan (distill/plan.py): its FLOPs are the run's, its disk figures what extract writes, its memory terms
follow their formulas, a slow precision is flagged, the CLI prints the plan."""
from __future__ import annotations

import pytest
import torch

from distill.cache import extract_features_cache
from distill.config import make_recipe
from distill.latent_cache import extract_latent_cache
from distill.plan import format_plan, plan_recipe

from ._tiny_latent import save_sd_pipeline, tiny_cond_unet_config, tiny_vae_config
from .conftest import rgb_recipe


def test_plan_matches_the_run_and_extract(rgb_folder, tmp_path):
    from distill.trainer import train

    recipe = rgb_recipe(rgb_folder, steps=2, log_every=1, augment="none")
    plan = plan_recipe(recipe, processes=2, gpu="H100", mfu=0.5)
    summary = train(recipe, str(tmp_path / "run"), progress=False)
    assert plan["flops_per_image"] == summary["cost"]["flops_per_image"]
    res = extract_features_cache(recipe, tmp_path / "c", num_draws=2, progress=False)
    assert plan["disk"]["features"] == sum(p.stat().st_size for p in (tmp_path / "c").glob("*.npy")) - 128 * len(
        list((tmp_path / "c").glob("*.npy")))  # each .npy has a 128-byte header
    assert res["num_images"] == plan["num_images"] == 36 and plan["disk"]["latents"] is None
    assert plan["peak_flops"] == 989.5e12 and plan["precision"] == "tf32" or plan["peak_flops"] == 67e12
    images = recipe.batch_size * recipe.grad_accum_steps
    assert plan["step_seconds"] == pytest.approx(plan["flops_per_image_total"] * images / (plan["peak_flops"] * 0.5))
    assert plan["steps_per_epoch"] == 36 // (recipe.batch_size * 2)
    n = sum(plan["params"][k] for k in ("student", "regressor"))
    assert plan["memory_per_process"]["student_weights_grads_optimizer"] == n * 16  # fp32 w + g + AdamW's 2 moments
    assert "process_baseline" not in plan["memory_per_process"]  # planned for a GPU
    assert "GFLOP per image" in format_plan(plan)


def test_latent_teacher_disk_and_bf16_flag(tmp_path, rgb_folder, monkeypatch):
    import distill.cost as C

    sd = save_sd_pipeline(tmp_path / "sd", tiny_cond_unet_config(sample_size=8), tiny_vae_config(), torch.randn(1, 77, 32))
    recipe = make_recipe(dict(teacher=str(sd), teacher_blocks=["up_blocks.0"], timesteps=[11], dataset="image-folder",
                              data_root=str(rgb_folder), student="resnet18", student_size=32, regressor_width=16,
                              batch_size=6, augment="flip", mean=[0.5] * 3, std=[0.25] * 3, teacher_dtype="bfloat16"))
    monkeypatch.setattr(C, "matmul_rate", lambda dtype=torch.float32, n=512, seconds=0.3:
                        72e9 if dtype == torch.float32 else 0.9e9)
    plan = plan_recipe(recipe)
    res = extract_latent_cache(recipe, tmp_path / "c", progress=False)
    assert plan["disk"]["latents"] == res["bytes"] and plan["flops_per_image"]["vae"] > 0
    assert plan["precision"] == "bf16" and plan["peak_flops"] == 0.9e9
    assert any("bf16 matmuls run at 0.9 GFLOP/s on this CPU against 72.0" in f for f in plan["flags"])
    assert plan["memory_per_process"]["process_baseline"] > 0


def test_cli_plan_and_bad_input(rgb_folder, tmp_path, capsys):
    import yaml

    from distill.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rgb_recipe(rgb_folder).to_dict()))
    assert main(["plan", str(path), "--gpu", "A100", "--processes", "8"]) == 0
    out = capsys.readouterr().out
    assert "device: A100, tf32, 8 process(es)" in out or "device: A100, fp32, 8 process(es)" in out
    assert "time at MFU 40%" in out
    assert main(["plan", str(path), "--gpu", "K80"]) == 2
    assert "--gpu 'K80' has no known peak" in capsys.readouterr().err


def test_saved_activations_count_each_tensor_once_and_no_weights():
    """Conv2d(3, 8) + ReLU + Conv2d(8, 8): autograd keeps the input (for the first conv's weight gradient) and the
    ReLU output (saved by ReLU and by the second conv: once): 3 + 8 values per pixel, fp32, per image; the weights
    (saved by both convs) are not activations."""
    import torch.nn as nn

    from distill.plan import saved_activation_bytes

    S = 16
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    assert saved_activation_bytes(model, S) == (3 + 8) * S * S * 4
