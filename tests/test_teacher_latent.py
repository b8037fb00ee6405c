"""Latent teachers: Stable Diffusion's UNet2DConditionModel + AutoencoderKL + empty-prompt embedding, and DiT.

Every model is built tiny from a config (no download). Features are checked against independent computations:
latents from the VAE, DDPM noise with SD's betas written out, the UNet called with hooks and no early exit, DiT
tokens reshaped by hand.
"""
import json
import sys

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DConditionModel

from distill.config import make_recipe
from distill.teacher import (EMBEDDING_FILENAME, DiffusionTeacher, DiTTeacher, LatentDiffusionTeacher,
                             MissingDependencyError, embedding_cache_files, inspect_teacher, load_prompt_embedding,
                             load_teacher)

from ._tiny_latent import (save_dit_pipeline, save_sd_pipeline, tiny_cond_unet_config, tiny_dit_config,
                           tiny_vae_config)

SD_BLOCKS = ["down_blocks.0", "mid_block", "up_blocks.0", "up_blocks.1"]


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


@pytest.fixture
def sd_teacher(emb):
    torch.manual_seed(0)
    return load_teacher(_sd_config(), SD_BLOCKS, [11, 50], prompt_embedding=emb)


def _images(b, size=16, seed=1):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


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


def _sd_alphas_cumprod(T=1000, b0=0.00085, b1=0.012):
    betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float64) ** 2  # scaled_linear, as SD trains
    return torch.cumprod(1 - betas, 0)


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


def test_missing_embedding_for_config_dict():
    with pytest.raises(ValueError) as e:
        load_teacher(_sd_config(), ["mid_block"])
    assert "prompt_embedding" in str(e.value) and "[1, 77, 32]" in str(e.value)


def test_prompt_embedding_is_refused_for_pixel_and_dit_teachers(unet_config, emb):
    with pytest.raises(ValueError, match="remove prompt_embedding"):
        load_teacher(unet_config, ["mid_block"], prompt_embedding=emb)
    with pytest.raises(ValueError, match="remove prompt_embedding"):
        load_teacher(_dit_config(), ["transformer_blocks.0"], prompt_embedding=emb)


def test_prompt_embedding_files(tmp_path, emb):
    from safetensors.torch import save_file

    save_file({"anything": emb[0]}, str(tmp_path / "e.safetensors"))  # [77, D] is taken as [1, 77, D]
    torch.save(emb, tmp_path / "e.pt")
    for f in ("e.safetensors", "e.pt"):
        torch.testing.assert_close(load_prompt_embedding(str(tmp_path / f), 32), emb)
    t = load_teacher(_sd_config(), ["mid_block"], prompt_embedding=str(tmp_path / "e.pt"))
    torch.testing.assert_close(t.conditioning("encoder_hidden_states"), emb)
    torch.testing.assert_close(t.state_dict()["cond_encoder_hidden_states"], emb)  # hashed by feature caches
    with pytest.raises(ValueError, match="cross_attention_dim is 64"):
        load_prompt_embedding(emb, 64)
    with pytest.raises(ValueError, match=r"expected \[1, L, D\]"):
        load_prompt_embedding(torch.zeros(2, 77, 32))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompt_embedding(str(tmp_path / "nope.pt"))
    torch.save({"a": emb, "b": emb}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="prompt_embedding"):
        load_prompt_embedding(str(tmp_path / "two.pt"))


class _NotATensor:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_prompt_embedding_pickle_is_not_executed(tmp_path, capsys):
    torch.save(_NotATensor(), tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a plain tensor file"):
        load_prompt_embedding(str(tmp_path / "evil.pt"))
    assert "unpickled!" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- pipeline dirs
@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny SD pipeline directory (unet/ vae/ scheduler/ with SD's PNDM config) and a cached embedding."""
    emb = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(7))
    return save_sd_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd", tiny_cond_unet_config(), tiny_vae_config(), emb)


def test_sd_pipeline_directory_loads(sd_dir):
    assert inspect_teacher(str(sd_dir))["kind"] == "latent-unet"
    t = load_teacher(str(sd_dir), ["up_blocks.0"], [11])
    assert isinstance(t, LatentDiffusionTeacher) and t.name == str(sd_dir)
    from safetensors.torch import load_file

    torch.testing.assert_close(t.conditioning("encoder_hidden_states"),
                               load_file(str(sd_dir / EMBEDDING_FILENAME))["prompt_embedding"])
    # DDPM noising with the betas of SD's own (PNDM) scheduler config
    assert type(t.scheduler).__name__ == "DDPMScheduler"
    torch.testing.assert_close(t.scheduler.alphas_cumprod.double(), _sd_alphas_cumprod(), rtol=1e-5, atol=1e-7)
    # same features as the components loaded by hand
    unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(sd_dir, subfolder="vae")
    ref = LatentDiffusionTeacher(unet, ["up_blocks.0"], [11], scheduler=t.scheduler, vae=vae,
                                 conditioning={"encoder_hidden_states": t.conditioning("encoder_hidden_states")})
    x = _images(2)
    torch.testing.assert_close(t(x, generator=torch.Generator().manual_seed(0))["up_blocks.0@t11"],
                               ref(x, generator=torch.Generator().manual_seed(0))["up_blocks.0@t11"])


def test_sd_directory_without_text_encoder_or_cache(tmp_path, monkeypatch):
    d = save_sd_pipeline(tmp_path / "sd", tiny_cond_unet_config(), tiny_vae_config(), embedding=None)
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the sd extra were not installed
    with pytest.raises(MissingDependencyError) as e:
        load_teacher(str(d), ["mid_block"])
    assert 'pip install -e ".[sd]"' in str(e.value) and "prompt_embedding" in str(e.value)
    assert isinstance(e.value, ValueError)  # the CLI prints it and exits with 2
    monkeypatch.delitem(sys.modules, "transformers")
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="no text_encoder/ and tokenizer/"):
        load_teacher(str(d), ["mid_block"])


def _save_tiny_clip(d):
    """A 6-token CLIP tokenizer and a 2-layer CLIP text encoder (width 32) in tokenizer/ and text_encoder/."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>")
    tok.save_pretrained(d / "tokenizer")
    torch.manual_seed(3)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=6, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=77, bos_token_id=0,
                                       eos_token_id=1, pad_token_id=1)).eval()
    enc.save_pretrained(d / "text_encoder")
    (d / "vocab.json").unlink()
    (d / "merges.txt").unlink()
    return tok, enc


def test_empty_prompt_embedding_is_computed_once_and_cached(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    d = save_sd_pipeline(tmp_path / "sd", tiny_cond_unet_config(), tiny_vae_config(), embedding=None)
    tok, enc = _save_tiny_clip(d)
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    ids = tok("", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids[0, 0] == 0 and (ids[0, 1:] == 1).all()  # <|startoftext|> then <|endoftext|> padding, as SD 1.x
    with torch.no_grad():
        ref = enc(ids)[0]  # last_hidden_state [1, 77, 32]
    t = load_teacher(str(d), ["mid_block"])
    torch.testing.assert_close(t.conditioning("encoder_hidden_states"), ref)
    assert (d / EMBEDDING_FILENAME).is_file()
    # read back without transformers: the cache is enough
    monkeypatch.setitem(sys.modules, "transformers", None)
    t2 = load_teacher(str(d), ["mid_block"])
    torch.testing.assert_close(t2.conditioning("encoder_hidden_states"), ref)
    # a changed text encoder makes the cache stale
    cfg = d / "text_encoder" / "config.json"
    cfg.write_text(cfg.read_text() + "\n")
    with pytest.raises(MissingDependencyError):
        load_teacher(str(d), ["mid_block"])


def test_embedding_cache_falls_back_to_home_cache(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import safetensors.torch

    d = save_sd_pipeline(tmp_path / "sd", tiny_cond_unet_config(), tiny_vae_config(), embedding=None)
    _save_tiny_clip(d)
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    real_save = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):  # the teacher directory is read-only
        if str(filename).startswith(str(d)):
            raise PermissionError(13, "Read-only file system", str(filename))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    t = load_teacher(str(d), ["mid_block"])
    local, home = embedding_cache_files(str(d), d)
    assert not local.exists() and home.is_file() and str(home).startswith(str(tmp_path / "cache"))
    assert not list(d.glob("*.tmp-*"))
    monkeypatch.setitem(sys.modules, "transformers", None)
    torch.testing.assert_close(load_teacher(str(d), ["mid_block"]).conditioning("encoder_hidden_states"),
                               t.conditioning("encoder_hidden_states"))


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


def test_dit_pipeline_directory_with_hub_class_name(tmp_path):
    d = save_dit_pipeline(tmp_path / "dit", tiny_dit_config(), tiny_vae_config(), legacy_class_name=True)
    assert json.loads((d / "transformer" / "config.json").read_text())["_class_name"] == "Transformer2DModel"
    info = inspect_teacher(str(d))
    assert info["kind"] == "dit" and info["subfolder"] == "transformer" and {"vae", "scheduler"} <= info["components"]
    t = load_teacher(str(d), ["transformer_blocks.1"], [11])
    assert isinstance(t, DiTTeacher) and isinstance(t.model, DiTTransformer2DModel)
    assert (t.in_channels, t.sample_size) == (3, 16) and type(t.scheduler).__name__ == "DDPMScheduler"
    ref = DiTTransformer2DModel.from_pretrained(d, subfolder="transformer")
    for a, b in zip(t.model.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------- dispatch, training
def test_inspect_teacher_dispatch(unet_config, tiny_pipeline_dir):
    assert inspect_teacher(unet_config)["kind"] == "pixel"
    assert inspect_teacher(dict(unet_config, _class_name="UNet2DModel"))["kind"] == "pixel"
    assert inspect_teacher(str(tiny_pipeline_dir))["kind"] == "pixel"
    assert inspect_teacher("fashion-mnist-ddpm")["kind"] == "pixel"
    assert inspect_teacher(_sd_config())["kind"] == "latent-unet"
    assert inspect_teacher({"_class_name": "Transformer2DModel", "norm_type": "ada_norm_zero"})["kind"] == "dit"
    with pytest.raises(ValueError, match="supported: UNet2DModel"):
        inspect_teacher({"_class_name": "UNet3DConditionModel"})
    with pytest.raises(ValueError, match="supported"):
        inspect_teacher({"_class_name": "Transformer2DModel", "norm_type": "ada_norm_single"})
    assert type(load_teacher(dict(unet_config, _class_name="UNet2DModel"), ["mid_block"])) is DiffusionTeacher


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


def _fake_hub_repo(cache, repo, save):
    """A repo in the hub cache layout (models--owner--name/snapshots/<commit>, refs/main), as a download leaves it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    save(root / "snapshots" / ("0" * 40))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)


def test_hub_ids_load_through_the_hub_cache(tmp_path, monkeypatch):
    """Hub ids take the hub code path (model_index.json through hf_hub_download, from_pretrained with subfolder=),
    served offline from a hub cache; the SD embedding comes from the distill cache keyed by the hub id."""
    import os
    import subprocess

    from safetensors.torch import save_file

    _fake_hub_repo(tmp_path / "hub", "owner/tiny-sd",
                   lambda p: save_sd_pipeline(p, tiny_cond_unet_config(), tiny_vae_config(), embedding=None))
    _fake_hub_repo(tmp_path / "hub", "owner/tiny-dit",
                   lambda p: save_dit_pipeline(p, tiny_dit_config(), tiny_vae_config()))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"),
               DISTILL_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    (cache_file,) = embedding_cache_files("owner/tiny-sd", None)  # a hub id: the distill cache only
    cache_file.parent.mkdir(parents=True)
    save_file({"prompt_embedding": torch.full((1, 77, 32), 0.5)}, str(cache_file))
    code = ("from distill.teacher import load_teacher\n"
            "sd = load_teacher('owner/tiny-sd', ['up_blocks.0'], [11])\n"
            "dit = load_teacher('owner/tiny-dit', ['transformer_blocks.1'], [11])\n"
            "print(type(sd).__name__, sd.sample_size, float(sd.conditioning('encoder_hidden_states').mean()),"
            " type(sd.scheduler).__name__, type(dit).__name__, dit.sample_size, dit.feature_info[0].size)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["LatentDiffusionTeacher", "16", "0.5", "DDPMScheduler", "DiTTeacher", "16", "(4,", "4)"]
