"""``teacher_resolution`` the teacher cannot take: refused at construction with a ValueError naming the value, the
multiple the model needs (computed from its config) and the fix, instead of a shape error from inside diffusers.

Every model is built tiny from a config. Each case also shows, on the bare diffusers model, why the multiple is the
right one: the size it refuses breaks (or silently crops) the model's forward, the size it suggests runs.
"""
import pytest
import torch
import torch.nn as nn
import yaml

from distill.cli import main
from distill.teacher.base import input_multiple
from distill.teacher.loading import load_teacher

from ._tiny_latent import _dit_config, _images, _sd_config, emb, tiny_dit_config  # noqa: F401 (emb: fixture)
from .conftest import tiny_unet_config


def _unet_config(levels: int) -> dict:
    """A 1-channel UNet2DModel with ``levels`` down blocks (all but the last halve the size)."""
    return dict(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1, norm_num_groups=4,
                block_out_channels=[8] * (levels - 1) + [16], down_block_types=["DownBlock2D"] * levels,
                up_block_types=["UpBlock2D"] * levels)


@pytest.mark.parametrize("levels, multiple", [(2, 2), (3, 4), (4, 8)])
def test_pixel_unet_resolution_must_be_a_multiple_of_its_downsampling(levels, multiple):
    from diffusers import UNet2DModel

    bad, good = 3 * multiple + 1, 3 * multiple
    with pytest.raises(ValueError) as e:
        load_teacher(_unet_config(levels), ["mid_block"], [11], resolution=bad)
    msg = str(e.value)
    assert msg.startswith(f"teacher_resolution {bad} px does not fit this teacher: the size must be a multiple of the "
                          f"UNet's downsampling {multiple} ({levels} down blocks), e.g. {good} or {good + multiple}.")
    assert msg.endswith(f"Fix: set teacher_resolution: {good}, or null for its own 32 px.")
    teacher = load_teacher(_unet_config(levels), ["mid_block", "up_blocks.0"], [11], resolution=good)
    assert teacher.sample_size == good
    assert teacher(torch.zeros(2, 1, good, good))["mid_block@t11"].shape[-1] == good // multiple
    # The bare model: the refused size breaks its forward (skip connections of different sizes), the suggested runs.
    torch.manual_seed(0)
    unet, t = UNet2DModel(**_unet_config(levels)), torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError):
        unet(torch.zeros(1, 1, bad, bad), t)
    assert unet(torch.zeros(1, 1, good, good), t).sample.shape[-1] == good


def test_pixel_unet_resolution_below_the_multiple():
    with pytest.raises(ValueError, match=r"teacher_resolution 2 px .* multiple of the UNet's downsampling 4 .*e\.g\. "
                                         r"4 or 8\. Fix: set teacher_resolution: 4"):
        load_teacher(tiny_unet_config(), ["mid_block"], [11], resolution=2)


def test_latent_unet_resolution_must_be_a_multiple_of_the_vae_factor(emb):
    from diffusers import UNet2DConditionModel

    with pytest.raises(ValueError) as e:
        load_teacher(_sd_config(), ["up_blocks.0"], [11], prompt_embedding=emb, resolution=33)
    msg = str(e.value)
    assert msg == ("teacher_resolution 33 px does not fit this teacher: the size must be a multiple of the VAE factor "
                   "2, e.g. 32 or 34. Fix: set teacher_resolution: 32, or null for its own 16 px.")
    # UNet2DConditionModel forwards upsample sizes: any latent size runs, here 9x9 (18 px / VAE factor 2), although
    # its down path halves the size once.
    teacher = load_teacher(_sd_config(), ["mid_block", "up_blocks.1"], [11], prompt_embedding=emb, resolution=18)
    feats = teacher(_images(2, size=18))
    assert feats["up_blocks.1@t11"].shape[-1] == 9 and feats["mid_block@t11"].shape[-1] == 5
    assert input_multiple(teacher.model) == (1, "")
    assert isinstance(teacher.model, UNet2DConditionModel)


def test_dit_resolution_must_be_a_multiple_of_vae_factor_times_patch_size():
    with pytest.raises(ValueError) as e:
        load_teacher(_dit_config(vae=True), ["transformer_blocks.1"], [11], resolution=34)
    assert str(e.value) == (
        "teacher_resolution 34 px does not fit this teacher: the size must be a multiple of 4 (the VAE factor 2 x the "
        "patch size 2), e.g. 32 or 36. Fix: set teacher_resolution: 32, or null for its own 16 px.")
    teacher = load_teacher(_dit_config(vae=True), ["transformer_blocks.1"], [11], resolution=36)
    assert teacher(_images(2, size=36))["transformer_blocks.1@t11"].shape[-2:] == (9, 9)  # 18x18 latents, patch 2


def test_dit_without_vae_resolution_must_be_a_multiple_of_the_patch_size():
    from diffusers import DiTTransformer2DModel

    with pytest.raises(ValueError, match=r"^teacher_resolution 9 px .* multiple of the patch size 2, e\.g\. 8 or 10\. "
                                         r"Fix: set teacher_resolution: 8, or null for its own 8 px\.$"):
        load_teacher(_dit_config(), ["transformer_blocks.1"], [11], resolution=9)
    # The bare DiT does not fail at 9x9 latents: it silently drops the last row and column (8x8 output).
    dit = DiTTransformer2DModel(**tiny_dit_config())
    out = dit(torch.zeros(1, 4, 9, 9), timestep=torch.zeros(1, dtype=torch.long), class_labels=torch.tensor([10]))
    assert out.sample.shape[-2:] == (8, 8)


def test_input_multiple_from_the_config():
    from diffusers import DiTTransformer2DModel, UNet2DModel

    assert input_multiple(UNet2DModel(**tiny_unet_config())) == (4, "the UNet's downsampling 4 (3 down blocks)")
    assert input_multiple(DiTTransformer2DModel(**tiny_dit_config())) == (2, "the patch size 2")
    assert input_multiple(nn.Conv2d(3, 3, 3)) == (1, "")  # no config: nothing to check against


def test_recipe_teacher_resolution_the_teacher_cannot_take_exits_2(tmp_path, rgb_folder, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(
        dataset="image-folder", data_root=str(rgb_folder), teacher=tiny_unet_config(3), teacher_blocks=["mid_block"],
        teacher_resolution=30, student_size=32, regressor_width=16, steps=3, batch_size=6, warmup_steps=1,
        checkpoint_every=3)))
    assert main(["train", str(recipe), "-o", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("distill train: error: teacher_resolution 30 px does not fit this teacher: the size must be a "
                   "multiple of the UNet's downsampling 4 (3 down blocks), e.g. 28 or 32. Fix: set "
                   "teacher_resolution: 28, or null for its own 32 px.")
