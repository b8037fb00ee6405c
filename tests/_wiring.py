"""Setup shared by the wiring tests: how the trainer combines data, teacher, student, regressor, losses,
cache, policy and schedule, each compared with a computation written in the tests rather than with the
library's code for the same step. The tests are in test_trainer_step.py (1, 4), test_build.py (2),
test_trainer_targets.py (3, 4), test_optim.py (5) and test_trainer_checkpoint.py (6); each file's docstring
lists what its tests compare with and the bugs injected to check that they fail.

Setup: 12 + 4 random 64 px RGB PNGs in two classes, a tiny 3-channel DDPM UNet at 16 px saved as a pipeline
directory (its own weights and scheduler are reloaded here for the independent forwards), timm's ``test_resnet``
student at 64 px (levels 16/8/4/2), teacher blocks ``mid_block`` (4x4) and ``down_blocks.0`` (8x8), and
mean/std that differ per channel (0.1/0.5/0.9 and 0.2/0.4/0.8). Runs go through ``train()``; ``train_step`` is
recorded by replacing it in ``train()``'s module globals (``_spy_in_train``), so the spies keep working if the
code moves to another module. Each test module that imports ``_one_thread`` (autouse) uses one torch thread
(restored afterwards); the module-scoped fixtures (``folder``, ``teacher_dir``, ``base_run``, ``cache_run``) are
built once per test module that imports them. Runtime, when all wiring tests were one module: about 20 s of
tests, 28 s wall with imports on a quiet machine (45-60 s on the loaded 2-core one).
"""
from __future__ import annotations

import csv
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.cache import extract_features_cache
from distill.config import make_recipe
from distill.trainer import train

from .conftest import tiny_unet_config

MEAN, STD = [0.1, 0.5, 0.9], [0.2, 0.4, 0.8]  # clearly different per channel: a swap or a mix-up shows
IMG = 64  # image size on disk = student size: the student input is the augmented image, only normalised
TEACHER_PX = 16  # the teacher's sample_size: down_blocks.0 -> 8x8, mid_block -> 4x4
BLOCKS = ["mid_block", "down_blocks.0"]  # coarse first, so "target i <- student level i" is not the right answer
N_TRAIN, N_TEST = 12, 4  # 2 classes


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module (conftest allows 2): on the shared 2-core machine two threads per op
    were 5-20x slower than one. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/{a,b}/ 6 + 6 and test/{a,b}/ 2 + 2 distinct random RGB PNGs (lossless: exact pixel values)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("wiring") / "imgs"
    rng = np.random.default_rng(7)
    for split, n in (("train", N_TRAIN // 2), ("test", N_TEST // 2)):
        for c, name in enumerate(("a", "b")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8)
                arr[..., c] = arr[..., c] // 2 + 128  # some class signal for the policy's reward head
                Image.fromarray(arr).save(d / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A DDPM pipeline directory with a tiny 3-channel UNet at 16 px (fixed weights on disk)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    DDPMPipeline(unet=UNet2DModel(**tiny_unet_config(3, TEACHER_PX)), scheduler=DDPMScheduler(num_train_timesteps=1000)
                 ).save_pretrained(path, safe_serialization=True)
    return path


def _recipe(folder, teacher_dir, **kw):
    base = dict(teacher=str(teacher_dir), teacher_blocks=BLOCKS, timesteps=[11], dataset="image-folder",
                data_root=str(folder), student="test_resnet", student_size=IMG, regressor_width=16, batch_size=4,
                lr=2e-3, warmup_steps=3, steps=8, log_every=1, checkpoint_every=100, augment="crop-flip",
                mean=MEAN, std=STD, seed=0, num_workers=0)
    base.update(kw)
    return make_recipe(base)


def _dataset_images(folder):
    from distill.data import build_dataset

    ds = build_dataset("image-folder", str(folder), "train", channels=3)
    return torch.stack([ds[i][0] for i in range(len(ds))])  # (N, 3, IMG, IMG) uint8, dataset order


def _denormalise(student_x):
    """Student input -> the image in [0, 1] it was made from (student_size == image size: no resize)."""
    return student_x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def _teacher_view(x01):
    """An image batch in [0, 1] -> what the teacher should see: TEACHER_PX px (bilinear, antialiased), in [-1, 1]."""
    return F.interpolate(x01, size=(TEACHER_PX, TEACHER_PX), mode="bilinear", align_corners=False,
                         antialias=True) * 2 - 1


def _unet_and_scheduler(teacher_dir):
    from diffusers import DDPMScheduler, UNet2DModel

    return (UNet2DModel.from_pretrained(str(teacher_dir), subfolder="unet").eval(),
            DDPMScheduler.from_pretrained(str(teacher_dir), subfolder="scheduler"))


@torch.no_grad()
def _unet_blocks(unet, x_t, t: int, blocks=BLOCKS):
    """Outputs of ``blocks`` in one forward of the UNet at timestep ``t``, with hooks written here."""
    out, mods = {}, dict(unet.named_modules())

    def hook(name):
        def f(_m, _i, o):
            out[name] = (o[0] if isinstance(o, (tuple, list)) else o).clone()
        return f

    handles = [mods[b].register_forward_hook(hook(b)) for b in blocks]
    try:
        unet(x_t, torch.full((x_t.shape[0],), t, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return out


def _spy_in_train(mp, name, wrap):
    """Replace ``name`` where ``train()`` looks it up (its module's globals, wherever that module now is)."""
    g = train.__globals__
    assert name in g, f"train() no longer calls a global {name!r}; update this test"
    mp.setitem(g, name, wrap(g[name]))


def _record_train_step(mp, calls, optimizers=None):
    """Record, for every call of train_step inside train(): the batch, the cache targets and the optimizer's lr."""
    def wrap(orig):
        sig = inspect.signature(orig)

        def spy(*a, **kw):
            args = sig.bind(*a, **kw).arguments
            inputs = args["inputs"]  # the StepInput a target source made for this micro-batch
            calls.append({
                "student_x": inputs.student_x.detach().cpu().clone(),
                "teacher_x": None if inputs.teacher_x is None else inputs.teacher_x.detach().cpu().clone(),
                "targets": [t.detach().cpu().clone() for t in inputs.targets],
                "lr": None if not optimizers else [g["lr"] for g in optimizers[-1].param_groups],
            })
            return orig(*a, **kw)
        return spy

    _spy_in_train(mp, "train_step", wrap)
    if optimizers is not None:  # every builder reaches timm's factory, imported at call time
        import timm.optim

        orig_factory = timm.optim.create_optimizer_v2
        mp.setattr(timm.optim, "create_optimizer_v2",
                   lambda *a, **kw: optimizers.append(orig_factory(*a, **kw)) or optimizers[-1])


def _metrics(run):
    with open(Path(run) / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------- shared runs (module scope)
class _Run:
    def __init__(self, path, recipe, calls, optimizers=None):
        self.path, self.recipe, self.calls, self.optimizers = Path(path), recipe, calls, optimizers


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, folder, teacher_dir):
    """A live-teacher run (crop-flip, PPM, 8 steps, warmup 3) with every train_step call recorded."""
    r = _recipe(folder, teacher_dir, use_ppm=True)
    calls, opts = [], []
    path = tmp_path_factory.mktemp("runs") / "base"
    with pytest.MonkeyPatch.context() as mp:
        _record_train_step(mp, calls, opts)
        train(r, str(path), progress=False)
    return _Run(path, r, calls, opts)


@pytest.fixture(scope="module")
def cache_run(tmp_path_factory, folder, teacher_dir):
    """A feature cache of the 12 training images (2 draws, one extraction batch) and a 4-step run reading it
    (batch 4: 3 batches per epoch, so the run crosses an epoch), every train_step call recorded."""
    r = _recipe(folder, teacher_dir, augment="none", steps=4, checkpoint_every=2, keep_checkpoints=5)
    root = tmp_path_factory.mktemp("cache")
    extract_features_cache(r, root / "cache", num_draws=2, batch_size=N_TRAIN, progress=False)
    r = make_recipe({**r.to_dict(), "feature_cache": str(root / "cache")})
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        _record_train_step(mp, calls)
        train(r, str(root / "run"), progress=False)
    return _Run(root / "run", r, calls)
