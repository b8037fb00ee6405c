"""Every recipe in recipes/ runs: two steps, with hub teachers swapped for tiny local models of the same class
and block layout (no download), and CIFAR-style data swapped for a tiny image folder."""
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from distill.config import load_recipe
from distill.teacher import packaged_teachers
from distill.trainer import load_trained, train

from ._tiny_latent import save_dit_pipeline, save_sd_pipeline, sd15_like_unet_config, tiny_dit_config, tiny_vae_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))

# Tiny models with the class, block types and layers_per_block of the hub models the recipes name.
HUB_STANDINS = {
    "google/ddpm-cifar10-32": dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=[8, 16, 16, 16],
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], norm_num_groups=4,
        attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6),
    # Pipelines: a function that saves the stand-in directory. SD 1.5: unet/ with SD's block types and
    # layers_per_block, a VAE with SD's factor 8 (256 px -> 32x32 latents), PNDM scheduler config, and a cached
    # empty-prompt embedding in place of text_encoder/ + tokenizer/.
    "runwayml/stable-diffusion-v1-5": lambda path: save_sd_pipeline(
        path, sd15_like_unet_config(sample_size=32), tiny_vae_config(levels=4),
        embedding=torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))),
    # DiT-XL/2 at 256: 28 blocks, patch 2, 1000 classes + null, factor-8 VAE, transformer config named
    # Transformer2DModel as on the hub.
    # Not a hub id: the CamVid teacher the recipe's comment trains with tools/train_teacher.py (its
    # tools/unet_camvid_64.json block layout: 4 levels, attention in the third down / second up block).
    "runs/camvid-teacher": dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=[8, 16, 16, 16],
        down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], norm_num_groups=4,
        attention_head_dim=8),
    "facebook/DiT-XL-2-256": lambda path: save_dit_pipeline(
        path, tiny_dit_config(num_layers=28, sample_size=32, num_classes=1000), tiny_vae_config(levels=4)),
}


def test_recipes_exist():
    assert {"quickstart.yaml", "cifar10-ddpm-resnet18.yaml"} <= {p.name for p in RECIPES}
    assert any("vit" in p.name for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_two_steps(path, tmp_path, rgb_folder, fmnist_dir):
    recipe = load_recipe(path)
    overrides = dict(steps=2, checkpoint_every=1, log_every=1, num_workers=0, batch_size=4, warmup_steps=1,
                     grad_accum_steps=1)  # ImageNet recipes accumulate 4 micro-batches: 4x the CPU time
    if recipe.student_size >= 224 and recipe.mixed_precision in ("bf16", "fp16"):
        # ResNet-50 / ViT-S at 256 px under a CPU's bf16 autocast ran at ~1 GFLOP/s (distill.cost.cpu_rate: ~80x
        # below fp32): 120-170 s of the suite, 98% in the two steps, not in setup or the FLOP count. Their student
        # steps run in fp32 at batch 2 (the PPM's batch norm needs 2); the teachers keep the recipes' bf16 weights,
        # and the CIFAR-10 recipes still run the bf16 autocast step.
        overrides.update(mixed_precision="no", batch_size=2)
    teacher = recipe.teacher
    if isinstance(teacher, str) and teacher not in packaged_teachers() and not Path(teacher).exists():
        assert teacher in HUB_STANDINS, f"recipe {path.name} names hub teacher {teacher!r}: add a stand-in config"
        torch.manual_seed(0)
        standin = tmp_path / "teacher"
        if callable(HUB_STANDINS[teacher]):
            HUB_STANDINS[teacher](standin)
        else:
            DDPMPipeline(unet=UNet2DModel(**HUB_STANDINS[teacher]), scheduler=DDPMScheduler(num_train_timesteps=1000)
                         ).save_pretrained(standin)
        overrides["teacher"] = str(standin)
    if recipe.dataset == "image-folder":
        overrides["data_root"] = str(rgb_folder)
    else:
        overrides["data_root"] = fmnist_dir
    recipe = load_recipe(path, overrides)
    summary = train(recipe, str(tmp_path / "run"), progress=False)
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final_losses"]["total"]))
    model, _, resolved = load_trained(str(tmp_path / "run"))
    assert [f["block"] for f in resolved["teacher_features"]][: len(recipe.teacher_blocks)] == recipe.teacher_blocks
