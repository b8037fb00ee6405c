"""Latent teachers: Stable Diffusion's UNet2DConditionModel + AutoencoderKL + prompt embedding, and DiT.

Every model is built tiny from a config (no download). Features are checked against independent computations:
latents from the VAE, DDPM noise with SD's betas written out, the UNet called with hooks and no early exit, DiT
tokens reshaped by hand.
"""
import pytest
import torch
from diffusers import AutoencoderKL

from distill.config import make_recipe
from distill.teacher.latent import DiTTeacher, LatentDiffusionTeacher
from distill.teacher.loading import load_teacher

from ._tiny_latent import (_dit_config, _images, _sd_config, emb, save_dit_pipeline,  # noqa: F401 (emb: fixture)
                           save_sd_pipeline, tiny_cond_unet_config, tiny_dit_config, tiny_vae_config)


SD_BLOCKS = ["down_blocks.0", "mid_block", "up_blocks.0", "up_blocks.1"]


@pytest.fixture
def sd_teacher(emb):
    torch.manual_seed(0)
    return load_teacher(_sd_config(), SD_BLOCKS, [11, 50], prompt_embedding=emb)


def _hooked(model, blocks, *args, **kwargs):
    """Independent extraction: plain hooks around the full forward (no early exit)."""
    out = {}
    modules = dict(model.named_modules())
    hs = [modules[b].register_forward_hook(lambda m, i, o, b=b: out.__setitem__(b, o[0] if isinstance(o, tuple) else o))
          for b in blocks]
    with torch.no_grad():
        model(*args, **kwargs)
    for h in hs:
        h.remove()
    return out


# ----------------------------------------------------------------------------------------------- Stable Diffusion
def test_sd_sizes_and_strides_are_in_pixels(sd_teacher):
    t = sd_teacher
    assert isinstance(t, LatentDiffusionTeacher)
    assert (t.in_channels, t.sample_size, t.model_in_channels, t.model_sample_size, t.latent_scale) == (3, 16, 4, 8, 2)
    feats = t(_images(3))
    assert list(feats) == [f.key for f in t.feature_info]
    for info in t.feature_info:
        assert feats[info.key].shape == (3, info.num_chs, *info.size)
        assert info.reduction == 16 // info.size[-1]
    # 8x8 latents: down_blocks.0 (after its downsampler) and mid at 4x4 = stride 4 px; up_blocks.0 upsamples to 8x8
    assert {i.block: (i.num_chs, i.reduction) for i in t.feature_info} == {
        "down_blocks.0": (32, 4), "mid_block": (64, 4), "up_blocks.0": (64, 2), "up_blocks.1": (32, 2)}


def test_sd_latents_are_vae_mean_times_scaling_factor(sd_teacher):
    vae = AutoencoderKL(**tiny_vae_config())
    vae.load_state_dict(sd_teacher.vae.state_dict())  # an independent copy of the same weights
    x = _images(2)
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    assert vae.config.scaling_factor == 0.18215
    torch.testing.assert_close(sd_teacher.encode(x), ref)


def test_sd_features_equal_independent_pipeline(sd_teacher, emb):
    """VAE mean x scaling, DDPM noise with SD's scaled_linear betas, UNet with the embedding expanded to B*K."""
    t = sd_teacher
    x = _images(2)
    feats = t(x, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z0 = t.vae.encode(x).latent_dist.mean * 0.18215
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # a config dict: DDPMScheduler(1000), linear
    ac = torch.cumprod(1 - betas, 0)
    ts = torch.tensor([11, 11, 50, 50])
    eps = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    a = ac[ts].float().view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0.repeat(2, 1, 1, 1) + (1 - a).sqrt() * eps
    ref = _hooked(t.model, SD_BLOCKS, z_t, ts, encoder_hidden_states=emb.expand(4, -1, -1))
    for b in SD_BLOCKS:
        torch.testing.assert_close(feats[f"{b}@t11"], ref[b][:2], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(feats[f"{b}@t50"], ref[b][2:], rtol=1e-4, atol=1e-4)


def test_sd_batched_timesteps_equal_separate_calls(sd_teacher):
    x = _images(2)
    batched = sd_teacher(x, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # sequential draws of B continue the same stream
    for t in (11, 50):
        single = sd_teacher(x, timesteps=[t], generator=g)
        for b in SD_BLOCKS:
            torch.testing.assert_close(batched[f"{b}@t{t}"], single[f"{b}@t{t}"], rtol=1e-4, atol=1e-5)


def test_sd_per_image_timesteps(sd_teacher):
    feats = sd_teacher(_images(3), timesteps=torch.tensor([1, 100, 999]))
    assert feats["mid_block@t*"].shape == (3, 64, 4, 4)


def test_sd_early_exit_skips_later_blocks(emb):
    t = load_teacher(_sd_config(), ["down_blocks.1", "down_blocks.0"], [11], prompt_embedding=emb)
    assert t._stop_block == "down_blocks.1"
    called = []
    hooks = [m.register_forward_hook(lambda *a, n=n: called.append(n)) for n, m in
             [("down1", t.model.down_blocks[1]), ("mid", t.model.mid_block), ("up0", t.model.up_blocks[0]),
              ("conv_out", t.model.conv_out)]]
    t(_images(1), timesteps=[11, 50])
    for h in hooks:
        h.remove()
    assert called == ["down1"]  # one forward for both timesteps, stopped after the deepest requested block


def test_sd_bf16_vae(emb):
    torch.manual_seed(0)
    t32 = load_teacher(_sd_config(), ["mid_block"], [11], prompt_embedding=emb)
    t16 = LatentDiffusionTeacher(t32.model, ["mid_block"], [11], vae=AutoencoderKL(**tiny_vae_config()),
                                 vae_dtype="bfloat16", conditioning={"encoder_hidden_states": emb})
    t16.vae.load_state_dict(t32.vae.state_dict())
    assert next(t16.vae.parameters()).dtype == torch.bfloat16 and t16.dtype == torch.float32
    x = _images(2)
    z = t16.encode(x)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, t32.encode(x), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("bad", ["float16", "fp16", torch.float16])
def test_fp16_vae_is_refused(bad, emb):
    with pytest.raises(ValueError) as e:
        load_teacher(_sd_config(), ["mid_block"], prompt_embedding=emb, vae_dtype=bad)
    msg = str(e.value)
    assert "vae_dtype" in msg and "float16" in msg and "float32, bfloat16" in msg and "vae_dtype: bfloat16" in msg
    with pytest.raises(ValueError, match="vae_dtype"):
        load_teacher(_dit_config(vae=True), ["transformer_blocks.0"], vae_dtype=bad)


def test_unknown_vae_dtype(emb):
    with pytest.raises(ValueError, match="valid: float32, bfloat16"):
        load_teacher(_sd_config(), ["mid_block"], prompt_embedding=emb, vae_dtype="float64")


def test_resolution_sets_latent_size(emb):
    t = load_teacher(_sd_config(), ["up_blocks.0"], [11], prompt_embedding=emb, resolution=32)
    assert (t.sample_size, t.model_sample_size) == (32, 16)
    assert t.feature_info[0].size == (16, 16) and t.feature_info[0].reduction == 2
    assert t(_images(1, size=32))["up_blocks.0@t11"].shape == (1, 64, 16, 16)
    with pytest.raises(ValueError, match="multiple of the VAE factor 2"):
        load_teacher(_sd_config(), ["up_blocks.0"], prompt_embedding=emb, resolution=33)


def test_vae_and_unet_channels_must_match(emb):
    cfg = _sd_config()
    cfg["vae"] = dict(cfg["vae"], latent_channels=8)
    with pytest.raises(ValueError, match="8-channel latents but the model takes in_channels=4"):
        load_teacher(cfg, ["mid_block"], prompt_embedding=emb)


# ----------------------------------------------------------------------------------------------- DiT
def test_dit_maps_equal_hooked_tokens_reshaped():
    torch.manual_seed(0)
    t = load_teacher(_dit_config(num_layers=3), ["transformer_blocks.0", "transformer_blocks.1"], [11, 50])
    assert isinstance(t, DiTTeacher) and (t.in_channels, t.sample_size) == (4, 8)
    assert [(i.num_chs, i.size, i.reduction) for i in t.feature_info] == [(16, (4, 4), 2)] * 4
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = {}
    h = t.model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    feats = t(z0, generator=torch.Generator().manual_seed(2))
    h.remove()
    assert seen["class_labels"].tolist() == [10] * 4  # the null class, one per image x timestep
    ts = torch.tensor([11, 11, 50, 50])
    eps = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[ts].float().view(-1, 1, 1, 1)
    z_t = ac.sqrt() * z0.repeat(2, 1, 1, 1) + (1 - ac).sqrt() * eps
    tokens = _hooked(t.model, ["transformer_blocks.0", "transformer_blocks.1"], z_t, timestep=ts,
                     class_labels=torch.full((4,), 10))
    for b in ("transformer_blocks.0", "transformer_blocks.1"):
        assert tokens[b].shape == (4, 16, 16)  # [B*K, 4x4 patches, C]
        ref = tokens[b].reshape(4, 4, 4, 16).permute(0, 3, 1, 2)  # row-major patch grid -> [B*K, C, 4, 4]
        torch.testing.assert_close(feats[f"{b}@t11"], ref[:2], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(feats[f"{b}@t50"], ref[2:], rtol=1e-4, atol=1e-5)


def test_dit_early_exit_skips_later_blocks():
    t = load_teacher(_dit_config(num_layers=3), ["transformer_blocks.0"], [11])
    assert t._stop_block == "transformer_blocks.0"
    called = []
    hooks = [m.register_forward_hook(lambda *a, n=n: called.append(n)) for n, m in
             [("b0", t.model.transformer_blocks[0]), ("b1", t.model.transformer_blocks[1]),
              ("b2", t.model.transformer_blocks[2]), ("proj_out_2", t.model.proj_out_2)]]
    t(torch.zeros(2, 4, 8, 8), timesteps=[5, 11])
    for h in hooks:
        h.remove()
    assert called == ["b0"]


def test_dit_batched_timesteps_equal_separate_calls():
    t = load_teacher(_dit_config(), ["transformer_blocks.1"], [5, 11, 50])
    z0 = torch.randn(2, 4, 8, 8)
    batched = t(z0, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for ts in (5, 11, 50):
        torch.testing.assert_close(batched[f"transformer_blocks.1@t{ts}"],
                                   t(z0, timesteps=[ts], generator=g)[f"transformer_blocks.1@t{ts}"],
                                   rtol=1e-4, atol=1e-5)


def test_dit_with_vae_and_resolution():
    t = load_teacher(_dit_config(vae=True), ["transformer_blocks.1"], [11], resolution=32)
    assert (t.in_channels, t.sample_size, t.model_sample_size) == (3, 32, 16)
    info = t.feature_info[0]
    assert (info.num_chs, info.size, info.reduction) == (16, (8, 8), 4)  # patch 2 x VAE 2
    assert t(_images(2, size=32))["transformer_blocks.1@t11"].shape == (2, 16, 8, 8)


@pytest.mark.parametrize("bad", ["transformer_blocks.2", "transformer_block.0", "pos_embed", "transformer_blocks"])
def test_unknown_dit_block(bad):
    with pytest.raises(ValueError) as e:
        load_teacher(_dit_config(), [bad])
    msg = str(e.value)
    assert repr(bad) in msg and "transformer_blocks.0 ... transformer_blocks.1" in msg and "2 transformer blocks" in msg


# ----------------------------------------------------------------------------------------------- recipe, training
def test_recipe_keys():
    r = make_recipe({"teacher_resolution": 256, "vae_dtype": "bfloat16", "prompt_embedding": "/tmp/e.pt"})
    assert (r.teacher_resolution, r.vae_dtype, r.prompt_embedding) == (256, "bfloat16", "/tmp/e.pt")
    assert make_recipe({}).vae_dtype == "float32" and make_recipe({}).teacher_resolution is None


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_training_run_with_latent_teacher_directory(kind, tmp_path, rgb_folder):
    from distill.trainer import load_trained, train

    if kind == "sd":
        teacher = save_sd_pipeline(tmp_path / "sd", tiny_cond_unet_config(sample_size=16), tiny_vae_config(),
                                   torch.randn(1, 77, 32))
        blocks = ["up_blocks.0", "up_blocks.1"]
    else:
        teacher = save_dit_pipeline(tmp_path / "dit", tiny_dit_config(sample_size=16), tiny_vae_config())
        blocks = ["transformer_blocks.1"]
    recipe = make_recipe(dict(teacher=str(teacher), teacher_blocks=blocks, timesteps=[11], dataset="image-folder",
                              data_root=str(rgb_folder), student="resnet18", student_size=32, regressor_width=16,
                              steps=2, batch_size=4, warmup_steps=1, log_every=1, checkpoint_every=2,
                              augment="flip", mean=[0.5] * 3, std=[0.25] * 3))
    summary = train(recipe, str(tmp_path / "run"), progress=False)
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final_losses"]["total"]))
    _, _, resolved = load_trained(str(tmp_path / "run"))
    assert resolved["teacher_in_channels"] == 3 and resolved["teacher_sample_size"] == 32  # pixels: 16 latent x 2
    assert [f["block"] for f in resolved["teacher_features"]] == blocks


@pytest.mark.parametrize("extra", [
    {"latents_mean": [0.5, -1.0, 2.0, 0.1], "latents_std": [2.0, 0.5, 1.5, 4.0]},  # SDXL-style VAE config
    {"shift_factor": 0.1159},  # SD3-style
    {},  # SD 1.x
])
def test_latents_normalised_as_diffusers_pipelines_do(extra, emb):
    """The teacher's latents follow diffusers' formulas (StableDiffusionXLImg2ImgPipeline:
    (z - latents_mean) * scaling_factor / latents_std; StableDiffusion3Img2ImgPipeline: (z - shift) * scaling_factor),
    written out here from the config, not through distill's code."""
    cfg = _sd_config()
    cfg["vae"] = {**tiny_vae_config(), "scaling_factor": 0.13025, **extra}
    t = load_teacher(cfg, ["mid_block"], [11], prompt_embedding=emb)
    x = _images(2)
    with torch.no_grad():
        z = t.vae.encode(x).latent_dist.mean
    if "latents_mean" in extra:
        m = torch.tensor(extra["latents_mean"]).view(1, 4, 1, 1)
        s = torch.tensor(extra["latents_std"]).view(1, 4, 1, 1)
        ref = (z - m) * 0.13025 / s
    else:
        ref = (z - extra.get("shift_factor", 0.0)) * 0.13025
    torch.testing.assert_close(t.encode(x), ref)


def test_ambiguous_latent_normalisation_is_refused():
    from distill.teacher.latent import normalize_latents

    z = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="latents_mean and latents_std together"):
        normalize_latents(z, {"scaling_factor": 1.0, "latents_mean": [0.0] * 4})
    with pytest.raises(ValueError, match="latents_mean and latents_std together"):
        normalize_latents(z, {"scaling_factor": 1.0, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4,
                              "shift_factor": 0.1})
    with pytest.raises(ValueError, match="3 / 3 values for 4 latent channels"):
        normalize_latents(z, {"scaling_factor": 1.0, "latents_mean": [0.0] * 3, "latents_std": [1.0] * 3})
