"""Latent cache: a latent teacher's VAE runs once per training image, the noise stays fresh at every step.

``distill extract RECIPE --latents -o DIR`` (`extract_latent_cache`) encodes every image of the recipe's
training split with the teacher's VAE and stores the posterior, a diagonal Gaussian, as two memory-mapped arrays::

    DIR/manifest.json        written last: its presence marks a complete cache
    DIR/latent_mean.npy      (num_images, flips, C, h, w), float16 (or float32): the unscaled posterior mean
    DIR/latent_std.npy       the same shape: its standard deviation

``flips`` is 1 (``augment: none``) or 2: index 1 holds ``encode(hflip(x))``. Both views are encoded rather than
the latent flipped, because a VAE is not exactly flip-equivariant (``bench/latent_cache.py`` measures
``|encode(flip(x)) - flip(encode(x))|`` against the noise; docs/benchmarks.md), and the second view costs one more
encode at extract time and ``2 x C x h x w x 2`` bytes per image (16 KiB for SD at 256 px).

A recipe with ``latent_cache: DIR`` trains from it (`distill.trainer.targets.LatentCacheTargets`): each step
reads its images' rows, takes the latent ``z = mean + std * eps`` (``latent_sample: sample``, what diffusers'
``train_text_to_image.py`` feeds the UNet: ``vae.encode(x).latent_dist.sample()``) or the mean (``latent_sample:
mean``, what the live teacher uses), scales it as diffusers' pipelines do (`distill.teacher.normalize_latents`:
``scaling_factor``, ``shift_factor``, ``latents_mean`` / ``latents_std``), then draws fresh noise and runs only the
UNet/DiT to the deepest block (`distill.teacher.DiffusionTeacher.features`). DreamTeacher found fresh noise
at every step better than a fixed encoding (24.3 vs 23.4 box AP); this cache fixes only what does not depend on
the noise.

The manifest's ``key`` holds what the latents depend on: the VAE's weights (sha256 of its state_dict) and config,
its dtype, the image resolution, the latent shape, the storage dtype, the number of flips, and the data fields of
the feature cache's key (`distill.cache.data_key`: dataset, decode settings, every input file's size and
mtime or sha256). The reading, shard checks and field-by-field refusal are `distill.cache.FeatureCache`'s.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .atomic import atomic_dir, atomic_write_json, remove_stale_temps
from .build import loader_workers
from .cache import (MANIFEST, FeatureCache, _jsonable, check_free_space, check_output_dir, data_key, extract_inputs,
                    shard_record, state_dict_sha256)
from .data import collate, to_teacher, to_unit
from .errors import CacheMismatchError, option
from .teacher import DiffusionTeacher
from .version import __version__
from .vocab import LATENT_AUGMENTS, LATENT_STORAGE

FORMAT = "distill-latent-cache"
FORMAT_VERSION = 1
FILES = {"mean": "latent_mean.npy", "std": "latent_std.npy"}
_HINT = ("Fix: rebuild it with `distill extract RECIPE --latents -o {path} --overwrite` (with the run's --set "
         "overrides), or point latent_cache at the cache made for this recipe.")


def _check_latent_teacher(teacher: DiffusionTeacher, what: str) -> None:
    if getattr(teacher, "vae", None) is None:
        raise ValueError(f"{what} needs a latent teacher with a VAE (Stable Diffusion or DiT with vae/); teacher "
                         f"{teacher.name!r} has none. Fix: unset latent_cache (use feature_cache for pixel teachers).")


def num_flips(augment: str) -> int:
    """Views a latent cache stores per image for a recipe's ``augment``: 1 for ``none``, else 2 (the image and its
    horizontal flip)."""
    return 1 if augment == "none" else 2


def latent_key(recipe, ds: Dataset, teacher: DiffusionTeacher, data_channels: int, storage: str,
               flips: Optional[int] = None) -> dict:
    """The key a latent cache of ``recipe``'s data encoded by ``teacher``'s VAE has; ``flips=None`` leaves the
    number of views out (a run checks it on its own: a cache of 2 views serves ``augment: none`` too)."""
    vae = teacher.vae
    key = {
        "format_version": FORMAT_VERSION,
        "storage_dtype": storage,
        "vae_sha256": state_dict_sha256(vae),
        "vae_config": _jsonable(dict(vae.config)),
        "vae_dtype": str(teacher.vae_dtype).replace("torch.", ""),
        "sample_size": int(teacher.sample_size),
        "latent_shape": [int(teacher.model_in_channels), int(teacher.model_sample_size), int(teacher.model_sample_size)],
        **data_key(recipe, ds, data_channels),
    }
    if flips is not None:
        key["flips"] = int(flips)
    return key


def encode_views(teacher: DiffusionTeacher, x: torch.Tensor, flips: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior ``(mean, std)`` of images ``x`` ``[B, 3, S, S]`` in [-1, 1] and, with ``flips=2``, of their
    horizontal flips, in one VAE forward: each ``[B, flips, C, h, w]`` fp32, unscaled."""
    B = x.shape[0]
    views = x if flips == 1 else torch.cat([x, x.flip(-1)])
    mean, std = teacher.latent_distribution(views)  # (flips*B, C, h, w), view-major
    return tuple(t.reshape(flips, B, *t.shape[1:]).transpose(0, 1) for t in (mean, std))


def extract_latent_cache(recipe, out_dir: Union[str, Path], batch_size: Optional[int] = None, overwrite: bool = False,
                         progress: bool = True, max_images: Optional[int] = None,
                         device: Union[str, torch.device, None] = None, storage: str = "float16",
                         flips: Optional[int] = None) -> dict:
    """Encode the recipe's training images with its teacher's VAE into ``out_dir`` (see the module docstring).

    Args:
        recipe: a `distill.config.Recipe` with a latent teacher (SD ``UNet2DConditionModel`` or DiT + VAE).
        out_dir: the cache directory (created; an existing latent cache needs ``overwrite=True``).
        batch_size: images per VAE forward (default: the recipe's).
        max_images: cache only the first N images (a run on the whole dataset refuses such a cache).
        device: where the VAE runs (default: cuda if available).
        storage: ``'float16'`` (default: half the disk) or ``'float32'`` (bit-exact means).
        flips: 1 or 2 views per image (default `num_flips` of the recipe's ``augment``).

    Returns:
        ``{'path', 'num_images', 'flips', 'bytes', 'bytes_per_image', 'seconds'}``.

    Raises:
        ValueError: a pixel teacher, an unknown ``storage`` or ``flips``, too little disk, a latent beyond float16.
        FileExistsError: ``out_dir`` exists (without ``overwrite``, or it is not a latent cache).
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    out = Path(out_dir).expanduser()
    if storage not in LATENT_STORAGE:
        raise ValueError(f"latent storage {storage!r} is not valid; valid: {', '.join(LATENT_STORAGE)}.")
    flips = num_flips(recipe.augment) if flips is None else int(flips)
    if flips not in (1, 2):
        raise ValueError(f"flips={flips} is not valid; valid: 1 (no flip) or 2 (the image and its horizontal flip).")
    check_output_dir(out, overwrite, FORMAT)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds, channels, teacher = extract_inputs(recipe, max_images, recipe.timesteps
                                           if isinstance(recipe.timesteps, list) else [0])  # t: unused by the VAE
    _check_latent_teacher(teacher, "distill extract --latents")
    key = latent_key(recipe, ds, teacher, channels, storage, flips)
    teacher.vae.to(device)
    N, shape = len(ds), [len(ds), flips, *key["latent_shape"]]
    nbytes = 2 * int(np.prod(shape)) * np.dtype(storage).itemsize
    check_free_space(out, nbytes, N, f"use {option('max_images')}")
    remove_stale_temps(out)
    limit = float(np.finfo(storage).max)
    with atomic_dir(out, replace=True) as tmp:
        arrays = {k: np.lib.format.open_memmap(tmp / f, mode="w+", dtype=storage, shape=tuple(shape))
                  for k, f in FILES.items()}
        bs = int(batch_size or recipe.batch_size)
        loader = DataLoader(ds, batch_size=bs, shuffle=False, num_workers=loader_workers(recipe.num_workers),
                            collate_fn=collate)
        start = 0
        with torch.no_grad():
            for images, _ in tqdm(loader, desc="encode", disable=not progress, dynamic_ncols=True):
                x = to_teacher(to_unit(images.to(device)), teacher.in_channels, teacher.sample_size)
                parts = dict(zip(FILES, encode_views(teacher, x, flips)))
                B = images.shape[0]
                for k, v in parts.items():
                    peak = v.abs().max().item()
                    if not peak <= limit:
                        raise ValueError(f"latent {k} reaches |z|={peak:.4g} (or is not finite) in images {start}-"
                                         f"{start + B - 1}, beyond {storage}'s range; use {option('storage')} float32.")
                    arrays[k][start:start + B] = v.cpu().numpy().astype(storage)
                start += B
        for a in arrays.values():
            a.flush()
        del arrays
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "key": key, "storage_dtype": storage,
            "files": dict(FILES), "shapes": {k: shape for k in FILES},
            "conversion": "to_teacher(to_unit(images), 3, sample_size); view 1 = encode(hflip(x))",
            "library_version": __version__, "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "extract_seconds": round(time.time() - t0, 2),
            "bytes": nbytes, "shards": {f: shard_record(tmp / f) for f in FILES.values()},
        }
        atomic_write_json(tmp / MANIFEST, manifest)  # written last: marks the cache complete
    return {"path": str(out), "num_images": N, "flips": flips, "bytes": nbytes, "bytes_per_image": nbytes / max(N, 1),
            "seconds": round(time.time() - t0, 2)}


class LatentCache(FeatureCache):
    """A complete latent cache opened read-only (memory-mapped); validation as `FeatureCache`
    (manifest, shard sizes and sampled hashes, every field of ``expect``).

    Raises:
        FileNotFoundError, IncompleteCacheError, CacheMismatchError: as `FeatureCache`.
    """

    FORMAT, FORMAT_VERSION, REQUIRED = FORMAT, FORMAT_VERSION, ("key", "files", "shapes")
    REBUILD_HINT = _HINT

    @property
    def flips(self) -> int:
        return int(self.manifest["key"]["flips"])

    def __repr__(self) -> str:
        return f"LatentCache('{self.path}', images={self.num_images}, flips={self.flips})"

    def rows(self, indices, flips=None, device: Union[str, torch.device, None] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mean, std)`` of images ``indices`` (``[B]``) in view ``flips`` (``[B]`` of 0/1, default 0):
        each ``[B, C, h, w]`` float32 on ``device``, unscaled. Reads only those rows of the memory-mapped files.

        Raises:
            IndexError: an index outside ``[0, num_images)`` or a view outside ``[0, flips)``.
        """
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        f = (np.zeros(len(idx), dtype=np.int64) if flips is None else
             np.asarray(flips.cpu() if isinstance(flips, torch.Tensor) else flips, dtype=np.int64))
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"image indices must be in [0, {self.num_images}); got {idx.min()}..{idx.max()}.")
        if len(f) != len(idx) or (len(f) and (f.min() < 0 or f.max() >= self.flips)):
            raise IndexError(f"need one view in [0, {self.flips}) per image (this cache holds {self.flips}); got "
                             f"{f.tolist()[:8]}.")
        return tuple(torch.from_numpy(np.ascontiguousarray(self.arrays[k][idx, f])).to(device or "cpu").float()
                     for k in FILES)


def check_recipe_for_latents(recipe) -> None:
    """A latent cache serves fixed timesteps and the views it stores: ``augment`` in ``none`` / ``flip``, ``timesteps``
    not ``policy``, and not together with ``feature_cache``.

    Raises:
        ValueError: naming the key, its value, the valid ones and the fix.
    """
    if getattr(recipe, "feature_cache", None):
        raise ValueError("recipe sets both feature_cache and latent_cache; a run reads one. Fix: unset one of them.")
    if recipe.timesteps == "policy":
        raise ValueError("recipe key 'latent_cache' is set but 'timesteps' is 'policy' (its network reads pixels); "
                         "Fix: a fixed list of timesteps, or unset latent_cache.")
    if recipe.augment not in LATENT_AUGMENTS:
        raise ValueError(
            f"recipe key 'latent_cache' is set but 'augment' is {recipe.augment!r}; valid with latent_cache: "
            f"{', '.join(LATENT_AUGMENTS)}. A random resized crop rescales the image, which no operation on the "
            f"8-px latent grid reproduces (resampling a latent is not encoding the resampled image), so the teacher "
            f"would see another view than the student. Fix: --set augment=flip (both views are in the cache), or "
            f"unset latent_cache to train from the live VAE.")


def open_for_recipe(recipe, ds: Dataset, teacher: DiffusionTeacher, data_channels: int,
                    path: Union[str, Path, None] = None) -> LatentCache:
    """Open ``path`` (default ``recipe.latent_cache``) for a run: checks the recipe, the key and the views.

    Raises:
        ValueError: see `check_recipe_for_latents`; a pixel teacher.
        CacheMismatchError: a key field differs, or the cache holds 1 view and the recipe flips.
    """
    check_recipe_for_latents(recipe)
    _check_latent_teacher(teacher, "latent_cache")
    path = Path(path if path is not None else recipe.latent_cache).expanduser()
    cache = LatentCache(path)
    cache.check(latent_key(recipe, ds, teacher, data_channels, cache.manifest["key"].get("storage_dtype", "")))
    if cache.flips < num_flips(recipe.augment):
        raise CacheMismatchError(f"latent cache '{path}' holds 1 view per image but augment: {recipe.augment} needs "
                                 f"the flipped one too. {_HINT.format(path=path)}")
    return cache
