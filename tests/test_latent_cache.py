"""The latent cache (distill/latent_cache.py): VAE posteriors cached once, fresh noise at every step.

Tiny Stable Diffusion and DiT pipelines built from configs (tests/_tiny_latent.py) on the 3-class RGB folder."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from distill.build import build_teacher, build_train_data
from distill.config import make_recipe
from distill.data import IndexedDataset, collate_indexed, to_teacher, to_unit
from distill.errors import CacheMismatchError
from distill.latent_cache import LatentCache, extract_latent_cache, open_for_recipe
from distill.trainer.targets import LatentCacheTargets

from ._tiny_latent import save_dit_pipeline, save_sd_pipeline, tiny_cond_unet_config, tiny_dit_config, tiny_vae_config


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent-teachers")
    return {
        "sd": save_sd_pipeline(root / "sd", tiny_cond_unet_config(sample_size=8), tiny_vae_config(),
                               torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))),
        "sd-other-vae": save_sd_pipeline(root / "sd2", tiny_cond_unet_config(sample_size=8), tiny_vae_config(),
                                         torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0)), seed=1),
        "dit": save_dit_pipeline(root / "dit", tiny_dit_config(sample_size=8), tiny_vae_config()),
    }


def _recipe(pipelines, rgb_folder, kind="sd", **kw):
    blocks = ["up_blocks.0"] if kind.startswith("sd") else ["transformer_blocks.1"]
    base = dict(teacher=str(pipelines[kind]), teacher_blocks=blocks, timesteps=[11, 50], dataset="image-folder",
                data_root=str(rgb_folder), student="resnet18", student_size=32, regressor_width=16, batch_size=6,
                augment="flip", mean=[0.5] * 3, std=[0.25] * 3, steps=2, warmup_steps=1, log_every=1)
    base.update(kw)
    return make_recipe(base)


def _batch(ds, idx):
    return collate_indexed([IndexedDataset(ds)[i] for i in idx])


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_features_from_the_cache_equal_the_live_vae_features(kind, tmp_path, pipelines, rgb_folder):
    """Same noise and t: the teacher's features of a cached posterior mean equal the live teacher's (VAE mean inside)
    for the image (view 0) and for its flip (view 1); float32 storage to within fp32 rounding, float16 to its own."""
    recipe = _recipe(pipelines, rgb_folder, kind)
    res = extract_latent_cache(recipe, tmp_path / "c32", batch_size=5, progress=False, storage="float32")
    assert res["flips"] == 2 and res["num_images"] == 36
    ds, channels = build_train_data(recipe)
    teacher = build_teacher(recipe, channels)
    cache = open_for_recipe(recipe, ds, teacher, channels, tmp_path / "c32")
    images, _, idx = _batch(ds, [0, 7, 20, 35])
    x = to_teacher(to_unit(images), teacher.in_channels, teacher.sample_size)
    src = LatentCacheTargets(cache, teacher, [[f.key] for f in teacher.feature_info], 32, [0.5] * 3, [0.25] * 3,
                             flip=True, sample=False, device="cpu")
    for view, images_ in ((0, x), (1, x.flip(-1))):
        live = teacher(images_, generator=torch.Generator().manual_seed(3))
        cached = teacher.features(src.latents(idx, torch.full((4,), view)), generator=torch.Generator().manual_seed(3))
        assert list(live) == list(cached)
        for k in live:
            torch.testing.assert_close(cached[k], live[k], rtol=1e-5, atol=1e-5)
    extract_latent_cache(recipe, tmp_path / "c16", batch_size=12, progress=False)
    half = open_for_recipe(recipe, ds, teacher, channels, tmp_path / "c16")
    m32, s32 = cache.rows(idx, [0, 1, 0, 1])
    m16, s16 = half.rows(idx, [0, 1, 0, 1])
    torch.testing.assert_close(m16, m32, rtol=1e-3, atol=1e-4)  # float16: 11 significant bits
    torch.testing.assert_close(s16, s32, rtol=1e-3, atol=1e-4)
    assert (s32 > 0).all()


def test_sample_draws_fresh_latents_around_the_mean(tmp_path, pipelines, rgb_folder):
    """latent_sample: sample gives mean + std * eps: a different latent each call, whose spread over many draws is
    the cached std (what diffusers' train_text_to_image feeds its UNet: latent_dist.sample())."""
    recipe = _recipe(pipelines, rgb_folder, augment="none")
    extract_latent_cache(recipe, tmp_path / "c", progress=False, storage="float32")
    ds, channels = build_train_data(recipe)
    teacher = build_teacher(recipe, channels)
    cache = open_for_recipe(recipe, ds, teacher, channels, tmp_path / "c")
    assert cache.flips == 1
    src = LatentCacheTargets(cache, teacher, [], 32, [0.5] * 3, [0.25] * 3, flip=False, sample=True, device="cpu")
    idx = torch.tensor([3] * 4000)
    z = src.latents(idx, None)
    mean, std = cache.rows(idx[:1])
    scale = teacher.vae_config["scaling_factor"]
    torch.testing.assert_close(z.mean(0), mean[0] * scale, atol=4 * float(std.max()) * scale / 60, rtol=0)
    torch.testing.assert_close(z.std(0), std[0] * scale, rtol=0.1, atol=1e-6)


def test_flip_view_is_shared_by_student_and_teacher(tmp_path, pipelines, rgb_folder):
    """augment: flip: each image is flipped (or not) by one draw, and the student sees the view the teacher's latent
    encodes: the step's student input and targets equal those of the flipped images through the live teacher."""
    recipe = _recipe(pipelines, rgb_folder)
    extract_latent_cache(recipe, tmp_path / "c", progress=False, storage="float32")
    ds, channels = build_train_data(recipe)
    teacher = build_teacher(recipe, channels)
    cache = open_for_recipe(recipe, ds, teacher, channels, tmp_path / "c")
    groups = [[f.key] for f in teacher.feature_info]
    src = LatentCacheTargets(cache, teacher, groups, 32, [0.5] * 3, [0.25] * 3, flip=True, sample=False, device="cpu")
    batch = _batch(ds, list(range(8)))
    torch.manual_seed(4)
    got = src(batch, 0)
    torch.manual_seed(4)
    flips = torch.randint(0, 2, (8,))
    assert 0 < int(flips.sum()) < 8  # both views occur in this batch
    view = torch.where(flips.view(-1, 1, 1, 1).bool(), to_unit(batch[0]).flip(-1), to_unit(batch[0]))
    live = teacher(to_teacher(view, 3, teacher.sample_size))
    from distill.data import to_student

    torch.testing.assert_close(got.student_x, to_student(view, 32, [0.5] * 3, [0.25] * 3))
    for target, g in zip(got.targets, groups):
        torch.testing.assert_close(target, live[g[0]].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change,field", [
    ({"teacher": "sd-other-vae"}, "vae_sha256"),
    ({"vae_dtype": "bfloat16"}, "vae_dtype"),
    ({"teacher_resolution": 32}, "sample_size"),
    ({"image_size": 24}, "decode"),
    ({"data": "touch"}, "data_sha256"),
])
def test_a_changed_key_field_is_refused(change, field, tmp_path, pipelines, rgb_folder):
    root = tmp_path / "imgs"
    shutil.copytree(rgb_folder, root)
    recipe = _recipe(pipelines, root)
    extract_latent_cache(recipe, tmp_path / "c", progress=False)
    kw = dict(change)
    if kw.pop("data", None):
        f = sorted((root / "train" / "cat").iterdir())[0]
        f.write_bytes(f.read_bytes() + b"\0")  # one file changed: its size and mtime
    if "teacher" in kw:
        kw["teacher"] = str(pipelines[kw["teacher"]])
    other = _recipe(pipelines, root, **kw)
    ds, channels = build_train_data(other)
    with pytest.raises(CacheMismatchError, match=rf"(?s){field}: cached .* vs expected"):
        open_for_recipe(other, ds, build_teacher(other, channels), channels, tmp_path / "c")


def test_views_crops_and_modes_are_checked(tmp_path, pipelines, rgb_folder):
    recipe = _recipe(pipelines, rgb_folder, augment="none")
    extract_latent_cache(recipe, tmp_path / "c", progress=False)
    ds, channels = build_train_data(recipe)
    teacher = build_teacher(recipe, channels)
    with pytest.raises(CacheMismatchError, match="1 view per image but augment: flip"):
        open_for_recipe(_recipe(pipelines, rgb_folder), ds, teacher, channels, tmp_path / "c")
    with pytest.raises(ValueError, match="(?s)'augment' is 'crop-flip'.*rescales the image.*augment=flip"):
        open_for_recipe(_recipe(pipelines, rgb_folder, augment="crop-flip"), ds, teacher, channels, tmp_path / "c")
    with pytest.raises(ValueError, match="both feature_cache and latent_cache"):
        open_for_recipe(_recipe(pipelines, rgb_folder, augment="none", feature_cache=str(tmp_path)), ds, teacher,
                        channels, tmp_path / "c")
    with pytest.raises(FileExistsError, match="pass overwrite=True to replace"):
        extract_latent_cache(recipe, tmp_path / "c", progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="Nothing was deleted"):
        extract_latent_cache(recipe, tmp_path / "mine", progress=False, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["format"] == "distill-latent-cache" and m["shapes"]["mean"] == [36, 1, 4, 8, 8]


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_train_from_the_latent_cache_never_runs_the_vae(kind, tmp_path, pipelines, rgb_folder, monkeypatch):
    from distill.cli import main
    from distill.teacher.latent import LatentDiffusionTeacher
    from distill.trainer import train

    recipe = _recipe(pipelines, rgb_folder, kind)
    args = ["extract", str(pipelines[kind] / "r.yaml"), "--latents", "-o", str(tmp_path / "c"), "--no-progress"]
    (pipelines[kind] / "r.yaml").write_text(json.dumps({k: v for k, v in recipe.to_dict().items()}))
    assert main(args) == 0
    calls = []
    monkeypatch.setattr(LatentDiffusionTeacher, "latent_distribution", lambda self, x: calls.append(x) or 1 / 0)
    summary = train(_recipe(pipelines, rgb_folder, kind, latent_cache=str(tmp_path / "c")), str(tmp_path / "run"),
                    progress=False)
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final_losses"]["total"]))
    assert calls == []
    assert isinstance(LatentCache(tmp_path / "c"), LatentCache)
