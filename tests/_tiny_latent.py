"""Tiny Stable Diffusion / DiT pipelines built from configs (no download), saved in the diffusers layout.

Shared by tests/test_teacher_{latent,prompt,loading}.py and tests/test_recipes.py (hub stand-ins). The configs keep
the class and the block names of the real models (SD: unet/ with CrossAttn down/up blocks, vae/, scheduler/; DiT:
transformer/ with transformer_blocks.N, vae/, scheduler/) at a few thousand parameters. The teacher tests also share
the config dicts ``_sd_config`` / ``_dit_config``, the ``emb`` fixture (a [1, 77, 32] text embedding) and ``_images``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
import torch

EMBEDDING_FILENAME = "empty_prompt_embedding.safetensors"


def tiny_cond_unet_config(sample_size: int = 8, cross_attention_dim: int = 32) -> dict:
    """UNet2DConditionModel, 2 levels: down CrossAttnDownBlock2D + DownBlock2D, up UpBlock2D + CrossAttnUpBlock2D."""
    return dict(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )


def sd15_like_unet_config(sample_size: int = 32) -> dict:
    """The SD 1.5 UNet's layout (3 CrossAttn down + DownBlock2D, UpBlock2D + 3 CrossAttn up, 2 layers per block)
    with 32/32/64/64 channels instead of 320/640/1280/1280 and cross_attention_dim 32 instead of 768."""
    return dict(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[32, 32, 64, 64],
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )


def tiny_vae_config(levels: int = 2) -> dict:
    """AutoencoderKL with ``levels`` encoder blocks: downsampling factor ``2 ** (levels - 1)``, 4 latent channels."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=[8] * (levels - 1) + [16], down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels, sample_size=32,
    )


def tiny_dit_config(num_layers: int = 2, sample_size: int = 8, num_classes: int = 10) -> dict:
    """DiTTransformer2DModel: 2 heads of 8 (16 wide), patch 2, learned sigma (8 output channels) like DiT-XL/2."""
    return dict(
        num_layers=num_layers, attention_head_dim=8, num_attention_heads=2, sample_size=sample_size, patch_size=2,
        in_channels=4, out_channels=8, num_embeds_ada_norm=num_classes,
    )


def sd_scheduler():
    """The scheduler SD 1.x ships: PNDM with scaled_linear betas 0.00085..0.012."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)


def save_sd_pipeline(path, unet_config: dict, vae_config: Optional[dict], embedding: Optional[torch.Tensor] = None,
                     seed: int = 0) -> Path:
    """unet/ vae/ scheduler/ + model_index.json as StableDiffusionPipeline.save_pretrained lays them out (no
    text_encoder/: the cached ``embedding`` [1, 77, D], when given, stands in for it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(path)
    torch.manual_seed(seed)
    UNet2DConditionModel(**unet_config).save_pretrained(path / "unet")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "PNDMScheduler"]}
    if vae_config is not None:
        AutoencoderKL(**vae_config).save_pretrained(path / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    sd_scheduler().save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    if embedding is not None:
        from safetensors.torch import save_file

        save_file({"prompt_embedding": embedding.contiguous()}, str(path / EMBEDDING_FILENAME))
    return path


def save_dit_pipeline(path, dit_config: dict, vae_config: Optional[dict], seed: int = 0,
                      legacy_class_name: bool = True) -> Path:
    """transformer/ vae/ scheduler/ + model_index.json like facebook/DiT-XL-2-256, whose transformer config says
    ``Transformer2DModel`` (with keys DiT does not take) when ``legacy_class_name``."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    path = Path(path)
    torch.manual_seed(seed)
    DiTTransformer2DModel(**dit_config).save_pretrained(path / "transformer")
    if legacy_class_name:
        cfg_file = path / "transformer" / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.update(_class_name="Transformer2DModel", cross_attention_dim=None, only_cross_attention=False,
                   use_linear_projection=False, num_vector_embeds=None, norm_type="ada_norm_zero")
        cfg_file.write_text(json.dumps(cfg, indent=2))
    index = {"_class_name": "DiTPipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "Transformer2DModel"], "scheduler": ["diffusers", "DDIMScheduler"]}
    if vae_config is not None:
        AutoencoderKL(**vae_config).save_pretrained(path / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    DDIMScheduler(beta_schedule="linear", clip_sample=False, num_train_timesteps=1000).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def _sd_config(vae=True, **kw):
    cfg = {"_class_name": "UNet2DConditionModel", **tiny_cond_unet_config(**kw)}
    if vae:
        cfg["vae"] = tiny_vae_config()  # factor 2: 8x8 latents <-> 16x16 images
    return cfg


def _dit_config(vae=False, **kw):
    cfg = {"_class_name": "DiTTransformer2DModel", **tiny_dit_config(**kw)}
    if vae:
        cfg["vae"] = tiny_vae_config()
    return cfg


@pytest.fixture
def emb():
    return torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))


def _images(b, size=16, seed=1):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
