"""Loading teachers: packaged names, pipeline and model directories (DDPM, Stable Diffusion, DiT), config dicts
and hub ids, dispatched on the model's class; the prompt-embedding rules of load_teacher; an unreadable teacher
directory (missing, truncated or partial weights, bad JSON, wrongly typed values) named with its file and the fix."""
import json
import shutil
import sys

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

from distill.errors import EXIT_CODES, UnreadableFileError
from distill.teacher.base import DiffusionTeacher
from distill.teacher.latent import DiTTeacher, LatentDiffusionTeacher
from distill.teacher.loading import inspect_teacher, load_teacher, packaged_teachers
from distill.teacher.prompt import EMBEDDING_FILENAME, embedding_cache_files

from ._tiny_latent import (_dit_config, _images, _sd_config, emb, save_dit_pipeline,  # noqa: F401 (emb: fixture)
                           save_sd_pipeline, tiny_cond_unet_config, tiny_dit_config, tiny_vae_config)


# ----------------------------------------------------------------------------------------------- pixel teachers
def test_load_from_pipeline_and_model_directories(tiny_pipeline_dir, tmp_path):
    a = load_teacher(str(tiny_pipeline_dir), ["mid_block"])
    unet = UNet2DModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    unet.save_pretrained(tmp_path / "bare")
    b = load_teacher(str(tmp_path / "bare"), ["mid_block"])
    x = torch.rand(1, 1, 32, 32)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(a(x, generator=g())["mid_block@t11"], b(x, generator=g())["mid_block@t11"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_teacher(str(tmp_path), ["mid_block"])


def test_packaged_teacher_is_shipped():
    assert "fashion-mnist-ddpm" in packaged_teachers()
    teacher = load_teacher("fashion-mnist-ddpm", ["up_blocks.0"])
    assert teacher.in_channels == 1 and teacher.sample_size == 32
    assert sum(p.numel() for p in teacher.parameters()) * 4 < 10e6  # fits the 10 MB budget in fp32


def test_packaged_cifar10_teacher_is_shipped_trained_and_small():
    """The CIFAR-10 teacher: 3 channels at 32 px, under the 25 MB budget; its training record says 1,250 EMA steps
    and its probe file shows the trained UNet above the untrained one (the card's table)."""
    import json
    from pathlib import Path

    from distill.teacher import PACKAGED_TEACHERS_DIR

    assert "cifar10-ddpm-small" in packaged_teachers()
    root = Path(PACKAGED_TEACHERS_DIR) / "cifar10-ddpm-small"
    assert (root / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < 25e6
    teacher = load_teacher("cifar10-ddpm-small", ["mid_block"])
    assert teacher.in_channels == 3 and teacher.sample_size == 32
    info = json.loads((root / "training.json").read_text())
    assert info["step"] == 1250 and info["ema"] is True
    probe = json.loads((root / "probe.json").read_text())
    assert probe["trained"][0]["block"] == "mid_block"
    assert probe["trained"][0]["linear_top1"] > probe["untrained"][0]["linear_top1"]


# ----------------------------------------------------------------------------------------------- latent pipeline dirs
def _sd_alphas_cumprod(T=1000, b0=0.00085, b1=0.012):
    betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float64) ** 2  # scaled_linear, as SD trains
    return torch.cumprod(1 - betas, 0)


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


# ----------------------------------------------------------------------------------------------- dispatch, prompt rules
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


def test_missing_embedding_for_config_dict():
    with pytest.raises(ValueError) as e:
        load_teacher(_sd_config(), ["mid_block"])
    assert "prompt_embedding" in str(e.value) and "[1, 77, 32]" in str(e.value)


def test_prompt_embedding_is_refused_for_pixel_and_dit_teachers(unet_config, emb):
    with pytest.raises(ValueError, match="remove prompt_embedding"):
        load_teacher(unet_config, ["mid_block"], prompt_embedding=emb)
    with pytest.raises(ValueError, match="remove prompt_embedding"):
        load_teacher(_dit_config(), ["transformer_blocks.0"], prompt_embedding=emb)


# ----------------------------------------------------------------------------------------------- hub ids
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


# ----------------------------------------------------------------------------------------------- unreadable teachers
def _damage_weights(d, keep):
    w = d / "diffusion_pytorch_model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:keep])


def _partial_weights(d):
    from safetensors.torch import load_file, save_file

    w = d / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(w))
    save_file({k: v for i, (k, v) in enumerate(sorted(sd.items())) if i % 2}, str(w))


def _edit_config(d, **values):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **values}))


TEACHER_DAMAGE = {  # name -> (damage of unet/ or scheduler/, error, the text that names the file and problem)
    "missing weights": (lambda u: (u / "diffusion_pytorch_model.safetensors").unlink(), FileNotFoundError,
                        "unet' has config.json but no weights (diffusion_pytorch_model.safetensors"),
    "truncated weights": (lambda u: _damage_weights(u, 20000), UnreadableFileError,
                          "unet/diffusion_pytorch_model.safetensors' are truncated (20000 of"),
    "empty weights": (lambda u: _damage_weights(u, 0), UnreadableFileError,
                      "unet/diffusion_pytorch_model.safetensors' are empty (0 bytes)"),
    "partial weights": (_partial_weights, UnreadableFileError, "unet' are partial: "),
    "bad json": (lambda u: (u / "config.json").write_text('{"sample_size": 32,,}'), UnreadableFileError,
                 "unet/config.json' is not valid JSON: Expecting property name enclosed in double quotes at line 1, "
                 "column 20"),
    "config not an object": (lambda u: (u / "config.json").write_text("[1, 2]"), UnreadableFileError,
                             "unet/config.json' is not a JSON object"),
    "wrongly typed list": (lambda u: _edit_config(u, block_out_channels="eight"), UnreadableFileError,
                           "block_out_channels: 'eight' (expected tuple[int, ...])"),
    "wrongly typed number": (lambda u: _edit_config(u, sample_size="32", in_channels=1.5), UnreadableFileError,
                             "sample_size: '32' (expected int | tuple[int, int] | None); in_channels: 1.5"),
    "weights for another config": (lambda u: _edit_config(u, block_out_channels=[16, 16, 16]), UnreadableFileError,
                                   "cannot load the UNet2DModel in '"),
    "bad scheduler json": (lambda u: (u.parent / "scheduler" / "scheduler_config.json").write_text("{oops"),
                           UnreadableFileError, "scheduler/scheduler_config.json' is not valid JSON"),
}


@pytest.mark.parametrize("damage", list(TEACHER_DAMAGE))
def test_an_unreadable_teacher_directory_names_the_file_and_the_fix(tiny_pipeline_dir, tmp_path, damage):
    d = tmp_path / "teacher"
    shutil.copytree(tiny_pipeline_dir, d)
    fn, error, text = TEACHER_DAMAGE[damage]
    fn(d / "unet")
    with pytest.raises(error) as info:
        load_teacher(str(d), ["mid_block"])
    msg = str(info.value)
    assert text in msg and str(d) in msg and "save_pretrained" in msg, msg
    assert next(code for kinds, code in EXIT_CODES if isinstance(info.value, kinds)) == 2


def test_unreadable_latent_teacher_components_are_named(sd_dir, tmp_path):
    d = tmp_path / "sd"
    shutil.copytree(sd_dir, d)
    _damage_weights(d / "vae", 1000)
    with pytest.raises(UnreadableFileError, match=r"vae/diffusion_pytorch_model.safetensors' are truncated"):
        load_teacher(str(d), ["up_blocks.0"], [11])
    shutil.rmtree(d)
    shutil.copytree(sd_dir, d)
    _edit_config(d / "unet", cross_attention_dim="32")
    with pytest.raises(UnreadableFileError, match=r"unet/config.json' has wrongly typed values for a "
                                                  r"UNet2DConditionModel: cross_attention_dim: '32'"):
        load_teacher(str(d), ["up_blocks.0"], [11])


def test_wrongly_typed_config_dict_values_are_named(unet_config):
    with pytest.raises(UnreadableFileError, match=r"teacher config dict has wrongly typed values for a UNet2DModel: "
                                                  r"layers_per_block: '1'"):
        load_teacher(dict(unet_config, layers_per_block="1"), ["mid_block"])


def test_cli_exits_2_with_one_line_for_an_unreadable_teacher(tiny_pipeline_dir, fmnist_dir, tmp_path, capsys):
    import yaml

    from distill.cli import main

    from .conftest import fmnist_recipe

    d = tmp_path / "teacher"
    shutil.copytree(tiny_pipeline_dir, d)
    _damage_weights(d / "unet", 5000)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(fmnist_recipe(fmnist_dir, teacher=str(d)).to_dict())))
    assert main(["train", str(recipe), "-o", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distill train: error: teacher weights '") and "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
