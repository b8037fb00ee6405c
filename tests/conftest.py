"""Shared fixtures: tiny diffusers models built from configs (no download), tiny datasets on disk, tiny
distillation recipes over them, one trained Fashion-MNIST run and a non-finite-loss injector."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from distill.config import make_recipe

# Two cores: keep intra-op threads bounded so parallel tools don't thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def pytest_configure(config):
    """The test session's own DISTILL_CACHE_DIR (weight-hash memo, reused baseline rows, prompt embeddings), also
    for subprocesses: a test run never reads or writes the user's ~/.cache/distill."""
    import tempfile

    config._distill_cache = tempfile.TemporaryDirectory(prefix="distill-test-cache-")
    os.environ["DISTILL_CACHE_DIR"] = config._distill_cache.name


def pytest_unconfigure(config):
    cache = getattr(config, "_distill_cache", None)
    if cache is not None:
        cache.cleanup()


def tiny_unet_config(in_channels: int = 1, sample_size: int = 32) -> dict:
    """A UNet2DModel with the block names of real DDPM UNets (down_blocks.i, mid_block, up_blocks.i)."""
    return dict(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=[8, 16, 16], norm_num_groups=4, attention_head_dim=8,
        down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    )


@pytest.fixture
def unet_config():
    return tiny_unet_config()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A DDPMPipeline directory (model_index.json, unet/, scheduler/) with a tiny 1-channel UNet."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "tiny-ddpm"
    DDPMPipeline(unet=UNet2DModel(**tiny_unet_config()), scheduler=DDPMScheduler(num_train_timesteps=1000)
                 ).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def fmnist_dir():
    """The real Fashion-MNIST files (installed by tools/setup.sh); a clear failure if they are missing."""
    if not os.path.isfile(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.fail("Fashion-MNIST is missing: run `apt-get update && apt-get install -y dataset-fashion-mnist` "
                    "(tools/setup.sh does this).")
    return FMNIST_DIR


@pytest.fixture(scope="session")
def rgb_folder(tmp_path_factory):
    """A 3-class image folder with train/ and test/ splits of 32x32 RGB JPEGs (the CIFAR-10 JPEG layout)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("rgb") / "imgs"
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        for c, name in enumerate(("cat", "dog", "ship")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                arr[..., c] = 255  # a class-dependent colour so probes have signal
                Image.fromarray(arr).save(d / f"{i:04d}.jpg", quality=90)
    return root


# ------------------------------------------------------------------- tiny distillation runs
def fmnist_recipe(fmnist_dir, **kw):
    """A 40-step resnet18 recipe on Fashion-MNIST with the tiny 1-channel teacher (``trained_run``'s)."""
    base = dict(teacher=tiny_unet_config(), teacher_blocks=["up_blocks.0"], timesteps=[11], data_root=fmnist_dir,
                student="resnet18", student_size=32, regressor_width=32, steps=40, batch_size=32, lr=2e-3,
                warmup_steps=5, log_every=5, checkpoint_every=20, augment="flip", mean=[0.286] * 3, std=[0.353] * 3,
                num_workers=0)  # loaded in the test process: no worker start-up (the default is auto)
    base.update(kw)
    return make_recipe(base)


def rgb_recipe(rgb_folder, **kw):
    """A 6-step resnet18 recipe on ``rgb_folder`` with the tiny 3-channel teacher, a checkpoint every 2 steps."""
    base = dict(dataset="image-folder", data_root=str(rgb_folder), teacher=tiny_unet_config(3),
                teacher_blocks=["mid_block"], timesteps=[11], student="resnet18", student_size=32,
                regressor_width=16, steps=6, batch_size=6, checkpoint_every=2, keep_checkpoints=5, log_every=1,
                num_workers=0)
    base.update(kw)
    return make_recipe(base)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, fmnist_dir):
    """``fmnist_recipe`` trained once for the session (the loop, export and run-directory tests read it;
    none of them changes it): (run directory, summary)."""
    from distill.trainer import train

    run = tmp_path_factory.mktemp("runs") / "run"
    summary = train(fmnist_recipe(fmnist_dir), str(run), progress=False)
    return run, summary


@pytest.fixture
def nan_at_call(monkeypatch):
    """Make the AT term NaN on the n-th loss evaluation (patches the loss that distill.build.build_loss binds)."""
    import distill.build as build_mod

    def install(n, term="at"):
        real = build_mod.feature_distillation_loss
        calls = {"n": 0}

        def fake(*a, **k):
            out = real(*a, **k)
            calls["n"] += 1
            if calls["n"] == n:
                out[term] = out[term] * float("nan")
                out["total"] = out["total"] + out[term]
            return out

        monkeypatch.setattr(build_mod, "feature_distillation_loss", fake)
    return install
