"""Shared fixtures: tiny diffusers models built from configs (no download) and tiny datasets on disk."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Two cores: keep intra-op threads bounded so parallel tools don't thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


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
