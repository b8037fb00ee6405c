"""Teacher-feature cache: run the frozen teacher once, train many times from memory-mapped fp16 features.

``distill extract RECIPE -o DIR`` (`extract_features_cache`) writes, for every image of the recipe's
training split, the teacher's features at the recipe's blocks and timesteps for ``num_draws`` seeded noise draws.
Images are not augmented: the features are those of the clean image converted as the trainer does
(``to_teacher(to_unit(images))``), so a run reading the cache must use ``augment: none``.

Layout of a cache directory::

    DIR/manifest.json            written last: its presence marks a complete cache
    DIR/<block>@t<t>.npy         one per teacher feature, float16, shape (num_images, num_draws, C, H, W)

Every shard (``.npy``) is tied to the manifest: its size, sha256 and a sha256 of 64 sampled 4 KiB blocks are
recorded at extract time (``shards``) and checked when the cache is opened (size and sampled blocks always, the
whole file with ``verify='full'``), so a shard copied in from another cache, or edited, is refused.

The ``.npy`` files are opened with ``np.load(mmap_mode='r')`` (a ``np.memmap``): a batch reads only its rows.
The cache is written in a temporary sibling directory and renamed into place, so ``DIR`` is either absent, the
previous cache, or complete.

The manifest's ``key`` holds everything the features depend on: a sha256 of the teacher's weights (every tensor of
its ``state_dict``, names in sorted order), of a ``python:`` teacher's code, of the model's, the noise scheduler's
and the VAE's settings (`teacher_settings`), the teacher source, blocks, timesteps, input size
and channels, dtype, the dataset (name, root, split, number of images and a sha256 fingerprint of its content and
order: every input file's size and mtime, or its sha256 with ``data_hash: content``), the decode settings, the
number of draws and the storage format. `FeatureCache` compares it with what a training run
expects (`expected_key`) and refuses any difference, field by field, so a stale cache is never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .atomic import atomic_dir, atomic_write_json, remove_stale_temps
from .build import build_teacher, build_train_data, loader_workers
from .data import base_dataset, collate, data_fingerprint, to_teacher, to_unit
from .errors import CacheMismatchError, IncompleteCacheError, option
from .logs import progress as progress_bar
from .teacher import DiffusionTeacher, TeacherFeatureInfo
from .version import __version__
from .vocab import SHARD_VERIFY

_logger = logging.getLogger(__name__)

FORMAT = "distill-feature-cache"
FORMAT_VERSION = 3  # 2: per-shard sizes and hashes, every input file in the data key; 3: teacher_settings
MANIFEST = "manifest.json"
STORAGE_DTYPE = "float16"
_FP16_MAX = 65504.0
_REBUILD_HINT = ("Fix: rebuild it with `distill extract RECIPE -o {path} --overwrite` (with the run's --set "
                 "overrides), or point feature_cache at the cache made for this recipe.")


# ----------------------------------------------------------------------------------------------- fingerprints
def _update_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 of every tensor (parameters and buffers) of ``module.state_dict()``, names in sorted order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        _update_tensor(h, t)
    return h.hexdigest()


def teacher_sha256(teacher: DiffusionTeacher) -> str:
    """sha256 of the teacher's class, every tensor of its ``state_dict`` (the diffusion model and, for a latent
    teacher, its VAE and encoders) and its ``forward_kwargs`` (e.g. conditioning embeddings)."""
    h = hashlib.sha256(type(teacher).__name__.encode())
    h.update(state_dict_sha256(teacher).encode())
    for name, v in sorted(getattr(teacher, "forward_kwargs", {}).items()):
        h.update(name.encode())
        if isinstance(v, torch.Tensor):
            _update_tensor(h, v)
        else:
            h.update(json.dumps(v, sort_keys=True, default=repr).encode())
    return h.hexdigest()


def config_sha256(obj: Any) -> Optional[str]:
    """sha256 of a diffusers object's class and ``config`` (every setting, keys sorted; not the bookkeeping keys
    ``_name_or_path``, ``_diffusers_version``, ...), or None when it has no config."""
    config = getattr(obj, "config", None)
    if not isinstance(config, Mapping):
        return None
    settings = {k: v for k, v in config.items() if not str(k).startswith("_")}
    text = type(obj).__name__ + json.dumps(settings, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def scheduler_sha256(scheduler: Any) -> str:
    """sha256 of the noise schedule that ``add_noise`` uses (``alphas_cumprod``) and of every setting of the
    scheduler's config (class included)."""
    h = hashlib.sha256(type(scheduler).__name__.encode())
    acp = getattr(scheduler, "alphas_cumprod", None)
    if isinstance(acp, torch.Tensor):
        _update_tensor(h, acp)
    h.update(str(config_sha256(scheduler)).encode())
    return h.hexdigest()


def teacher_settings(teacher: DiffusionTeacher) -> dict:
    """What shapes the teacher's features besides its weights (`teacher_sha256`): the sha256 of a ``python:``
    teacher's code (``source_info['code_sha256']``), of the model's and the noise scheduler's configs, and a latent
    teacher's VAE dtype and config (``scaling_factor``, ``shift_factor``, ``latents_mean`` / ``latents_std``, ...);
    None where the teacher has no such part. In the feature cache's key and the run's resume contract."""
    vae = getattr(teacher, "vae", None)
    return {"teacher_code_sha256": (getattr(teacher, "source_info", None) or {}).get("code_sha256"),
            "model_config_sha256": config_sha256(teacher.model),
            "scheduler_sha256": scheduler_sha256(teacher.scheduler),
            "vae_dtype": str(teacher.vae_dtype).removeprefix("torch.") if vae is not None else None,
            "vae_config_sha256": config_sha256(vae) if vae is not None else None}


def _jsonable(v: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, non-JSON objects their repr)."""
    return json.loads(json.dumps(v, sort_keys=True, default=repr))


def _feature_info_dicts(info: Sequence[TeacherFeatureInfo]) -> list[dict]:
    return [{"key": f.key, "block": f.block, "timestep": f.timestep, "num_chs": f.num_chs, "reduction": f.reduction,
             "size": list(f.size)} for f in info]


def data_key(recipe, ds: Dataset, data_channels: int) -> dict:
    """The data fields of a cache key: dataset, root, split, channels, number of images, decode settings and the
    sha256 fingerprint of the data's content and order (`distill.data.data_fingerprint`)."""
    base, _ = base_dataset(ds)
    root = getattr(base, "root", None) or recipe.data_root
    return {
        "dataset": recipe.dataset,
        "data_root": str(Path(root).expanduser().resolve()) if root else None,
        "split": getattr(base, "split", None) or "train",
        "data_channels": int(data_channels),
        "num_images": len(ds),
        "decode": {"image_size": recipe.image_size, "image_resize": recipe.image_resize,
                   "min_image_side": recipe.min_image_side, "decoded_size": _jsonable(getattr(base, "size", None))},
        "data_hash": recipe.data_hash,
        "data_sha256": data_fingerprint(ds, recipe.data_hash),
    }


def expected_key(recipe, ds: Dataset, teacher: DiffusionTeacher, data_channels: int,
                 num_draws: Optional[int] = None) -> dict:
    """The cache key a run with ``recipe`` on ``ds`` with ``teacher`` needs; ``num_draws=None`` accepts any."""
    key = {
        "format_version": FORMAT_VERSION,
        "dtype": STORAGE_DTYPE,
        "teacher": _jsonable(recipe.teacher),
        "teacher_kwargs": _jsonable(recipe.teacher_kwargs),  # a python: factory's arguments (not all change weights)
        "teacher_sha256": teacher_sha256(teacher),
        **teacher_settings(teacher),  # code, model / scheduler / VAE settings
        "teacher_dtype": recipe.teacher_dtype,
        "blocks": list(teacher.blocks),
        "timesteps": [int(t) for t in teacher.timesteps],
        "sample_size": int(teacher.sample_size),
        "in_channels": int(teacher.in_channels),
        **data_key(recipe, ds, data_channels),
    }
    if num_draws is not None:
        key["num_draws"] = int(num_draws)
    return key


# ----------------------------------------------------------------------------------------------- shards
_SAMPLES, _BLOCK = 64, 4096


def _sample_sha256(path: Path, size: int) -> str:
    """sha256 of the size and of ``_SAMPLES`` blocks of ``_BLOCK`` bytes evenly spaced from the first byte to the
    last (256 KiB read whatever the file's size): any other teacher's or image's features differ in every block."""
    h = hashlib.sha256(str(size).encode())
    last = max(0, size - _BLOCK)
    with open(path, "rb") as f:
        for i in range(_SAMPLES):
            f.seek(last * i // (_SAMPLES - 1))
            h.update(f.read(_BLOCK))
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def shard_record(path: Path) -> dict:
    """What the manifest records of one shard: ``{'bytes', 'sha256', 'sample_sha256'}``."""
    size = path.stat().st_size
    return {"bytes": size, "sha256": _file_sha256(path), "sample_sha256": _sample_sha256(path, size)}


def check_shard(path: Path, record: Optional[Mapping[str, Any]], verify: str = "sample", hint: str = "") -> None:
    """Check one shard against its manifest record: size and sampled blocks (``verify='sample'``), and the sha256
    of the whole file (``'full'``).

    Raises:
        CacheMismatchError: no record, or the file differs (names the file, what differs and the fix).
        ValueError: unknown ``verify``.
    """
    if verify not in SHARD_VERIFY:
        raise ValueError(f"verify={verify!r} is not valid; valid: {', '.join(SHARD_VERIFY)}.")
    why = None
    if not isinstance(record, Mapping) or not {"bytes", "sha256", "sample_sha256"} <= set(record):
        why = "the manifest records no size and hash for it"
    else:
        size = path.stat().st_size
        if size != record["bytes"]:
            why = f"it has {size} bytes, the manifest recorded {record['bytes']}"
        elif _sample_sha256(path, size) != record["sample_sha256"]:
            why = "its content differs from what was extracted (sampled-block sha256)"
        elif verify == "full" and _file_sha256(path) != record["sha256"]:
            why = "its content differs from what was extracted (sha256 of the whole file)"
    if why:
        raise CacheMismatchError(f"feature cache shard '{path}' is refused: {why}; a shard copied in from another "
                                 f"cache, or edited after extraction, would give features of another teacher or "
                                 f"other images. {hint}")


# ----------------------------------------------------------------------------------------------- writing
def extract_batch(teacher: DiffusionTeacher, x: torch.Tensor, num_draws: int,
                  generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """Features of ``num_draws`` noisings of each image of ``x`` in one teacher forward.

    The teacher sees ``x.repeat(num_draws)`` (draw-major) with noise from ``generator``; returns
    ``{key: [B, num_draws, C, H, W]}``.
    """
    B = x.shape[0]
    feats = teacher(x.repeat(num_draws, 1, 1, 1), generator=generator)  # key -> (D*B, C, H, W), draw-major
    return {k: v.reshape(num_draws, B, *v.shape[1:]).transpose(0, 1) for k, v in feats.items()}


def _cache_file(key: str) -> str:
    return key.replace("/", "_") + ".npy"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def is_feature_cache(path: Path, fmt: str = FORMAT) -> bool:
    """Whether ``path`` is provably a distill cache of format ``fmt`` (so ``--overwrite`` may replace it): a
    manifest.json of this format, and only the ``.npy`` files it lists besides it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        return False
    listed = set((manifest.get("files") or {}).values()) | {MANIFEST}
    return all(p.is_file() and p.name in listed for p in path.iterdir())


def check_output_dir(out: Path, overwrite: bool, fmt: str = FORMAT) -> None:
    """Refuse an output directory a cache of format ``fmt`` may not be written to: a file, or a non-empty directory
    without ``overwrite``, or one that is not provably such a cache (`is_feature_cache`); nothing is deleted.

    Raises:
        FileExistsError: naming the directory and the fix.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"'{out}' is a file; give a directory for the cache ({option('output_dir')}).")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"'{out}' already exists; pass {option('overwrite', flag=True)} to replace it, or "
                                  f"choose another {option('output_dir')}.")
        if not is_feature_cache(out, fmt):
            raise FileExistsError(f"'{out}' exists and is not a {fmt.removeprefix('distill-').replace('-', ' ')} made "
                                  f"by distill extract (no distill "
                                  f"manifest.json, or it holds other files: "
                                  f"{', '.join(sorted(p.name for p in out.iterdir())[:8])}); refusing to replace it. "
                                  f"Nothing was deleted. Choose another {option('output_dir')}.")


def check_free_space(out: Path, nbytes: int, num_images: int, fix: str) -> None:
    """Create ``out``'s parent and refuse a cache of ``nbytes`` that would not fit on its disk.

    Raises:
        ValueError: naming the sizes and ``fix``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if nbytes > 0.98 * free:
        raise ValueError(f"the cache needs {nbytes / 2**30:.2f} GiB ({nbytes // max(num_images, 1)} bytes per image) "
                         f"but '{out.parent}' has {free / 2**30:.2f} GiB free; {fix}, or choose another "
                         f"{option('output_dir')}.")


def extract_inputs(recipe, max_images: Optional[int], timesteps: Sequence[int]) -> tuple[Dataset, int, DiffusionTeacher]:
    """What an extraction reads: the recipe's training split (its first ``max_images``), its channels, and the
    teacher at ``timesteps``, built after ``set_seed(recipe.seed)`` as ``train()`` builds it (a config-dict teacher
    is a seeded init).

    Raises:
        ValueError: ``max_images`` below 1; see `distill.build.build_teacher`.
    """
    from accelerate.utils import set_seed

    ds, channels = build_train_data(recipe)
    if max_images is not None:
        if not 1 <= int(max_images):
            raise ValueError(f"max_images={max_images} must be >= 1.")
        ds = Subset(ds, list(range(min(int(max_images), len(ds)))))
    set_seed(recipe.seed)
    return ds, channels, build_teacher(recipe, channels, timesteps)


def extract_features_cache(recipe, out_dir: Union[str, Path], num_draws: int = 2, batch_size: Optional[int] = None,
                           overwrite: bool = False, progress: bool = True, max_images: Optional[int] = None,
                           device: Union[str, torch.device, None] = None, seed: Optional[int] = None,
                           timesteps: Optional[Sequence[int]] = None) -> dict:
    """Write the teacher features of the recipe's training images to ``out_dir`` (see the module docstring).

    Args:
        recipe: a `distill.config.Recipe`; its dataset, teacher, blocks, timesteps, teacher_dtype,
            num_workers and seed are used.
        out_dir: the cache directory (created; an existing cache needs ``overwrite=True``).
        num_draws: noise draws per image (a training run picks one per image and step).
        batch_size: images per teacher forward (the forward holds ``batch_size * num_draws * len(timesteps)``);
            default: the recipe's.
        max_images: cache only the first N images (a run on the whole dataset refuses such a cache).
        timesteps: default: the recipe's list. A recipe whose ``timesteps`` is a mode chosen at train time
            (``auto-grid``, ``auto-label-free``) needs the chosen list here (``--set timesteps=[11]``).
        device: where the teacher runs (default: cuda if available). Noise is drawn on the CPU from a generator
            seeded with ``seed`` (default: the recipe's), so the cache is the same on any device.

    Returns:
        ``{'path', 'num_images', 'num_draws', 'keys', 'bytes', 'bytes_per_image', 'seconds'}``.
    """
    from accelerate.utils import set_seed

    t0 = time.time()
    out = Path(out_dir).expanduser()
    if int(num_draws) < 1:
        raise ValueError(f"{option('num_draws')} {num_draws} must be >= 1 (noise draws per image).")
    num_draws = int(num_draws)
    check_output_dir(out, overwrite)
    seed = recipe.seed if seed is None else int(seed)
    if timesteps is None:
        timesteps = recipe.timesteps
    if isinstance(timesteps, str):
        raise ValueError(f"timesteps: {timesteps!r} is chosen when a run starts; a cache needs the explicit list. "
                         f"Fix: --set timesteps=[T, ...] with the run's choice (for auto-grid / auto-label-free it is "
                         f"in RUN_DIR/selection/selection.json); timesteps: policy cannot train from a cache.")
    timesteps = [int(t) for t in timesteps]
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    ds, channels, teacher = extract_inputs(recipe, max_images, timesteps)
    key = expected_key(recipe, ds, teacher, channels, num_draws)
    teacher = teacher.to(device)
    info = teacher.feature_info
    N = len(ds)
    shapes = {f.key: [N, num_draws, f.num_chs, *f.size] for f in info}
    nbytes = sum(int(np.prod(s)) * 2 for s in shapes.values())
    check_free_space(out, nbytes, N, f"lower {option('num_draws')}, use {option('max_images')}")
    remove_stale_temps(out)
    # atomic: `out` is the old cache or the complete new one, never half of one (replacing a cache was allowed above)
    with atomic_dir(out, replace=True) as tmp:
        arrays = {k: np.lib.format.open_memmap(tmp / _cache_file(k), mode="w+", dtype=np.float16, shape=tuple(s))
                  for k, s in shapes.items()}
        bs = int(batch_size or recipe.batch_size)
        loader = DataLoader(ds, batch_size=bs, shuffle=False, num_workers=loader_workers(recipe.num_workers),
                            collate_fn=collate)
        gen = torch.Generator().manual_seed(seed)
        start = 0
        for images, _ in progress_bar(loader, "extract", enabled=progress, unit="batch"):
            x = to_teacher(to_unit(images.to(device)), teacher.in_channels, teacher.sample_size)
            feats = extract_batch(teacher, x, num_draws, gen)
            B = images.shape[0]
            for k, v in feats.items():
                v = v.float()
                peak = v.abs().max().item()
                if not peak <= _FP16_MAX:
                    raise ValueError(f"teacher feature {k} reaches |x|={peak:.4g} (or is not finite) in images "
                                     f"{start}-{start + B - 1}, beyond float16's range ({_FP16_MAX:g}); the cache "
                                     f"stores float16. Train from the live teacher for this recipe.")
                arrays[k][start:start + B] = v.half().cpu().numpy()
            start += B
        for a in arrays.values():
            a.flush()
        del arrays
        shards = {_cache_file(k): shard_record(tmp / _cache_file(k)) for k in shapes}
        seconds = time.time() - t0
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "key": key,
            "feature_info": _feature_info_dicts(info),
            "files": {k: _cache_file(k) for k in shapes},
            "shapes": shapes,
            "seed": seed, "batch_size": bs,
            "timesteps_source": _jsonable(recipe.timesteps),
            "noise": "one CPU torch.Generator(seed) consumed in image order; each forward holds "
                     "x.repeat(num_draws) (draw-major), see distill.cache.extract_batch",
            "conversion": "to_teacher(to_unit(images), in_channels, sample_size), no augmentation",
            "library_version": __version__, "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "extract_seconds": round(seconds, 2),
            "bytes": nbytes,
            "shards": shards,
        }
        atomic_write_json(tmp / MANIFEST, manifest)  # written last: marks the cache complete
    total = _dir_bytes(out)
    return {"path": str(out), "num_images": N, "num_draws": num_draws, "keys": list(shapes), "bytes": total,
            "bytes_per_image": total / max(N, 1), "seconds": round(time.time() - t0, 2)}


# ----------------------------------------------------------------------------------------------- reading
def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class FeatureCache:
    """A complete feature cache opened read-only (memory-mapped), validated against ``expect``.

    Args:
        path: the directory written by `extract_features_cache`.
        expect: the key a run needs (`expected_key`); every field given is compared with the manifest and
            any difference raises `CacheMismatchError` listing each field (cached vs expected).
        verify: ``'sample'`` (default: each shard's size and 64 sampled blocks, 256 KiB read per shard) or
            ``'full'`` (also the sha256 of every shard, reading the whole cache) against the manifest.

    Raises:
        FileNotFoundError: no directory at ``path``.
        IncompleteCacheError: no manifest (half-written), a missing, truncated or misshapen feature file.
        CacheMismatchError: see ``expect``; a shard whose size or hash differs from the manifest's record.
    """

    #: the manifest's ``format`` / ``format_version`` / required entries this reader takes (a sibling cache format,
    #: `distill.latent_cache.LatentCache`, overrides them and reuses the checks)
    FORMAT, FORMAT_VERSION, REQUIRED = FORMAT, FORMAT_VERSION, ("key", "files", "shapes", "feature_info")
    REBUILD_HINT = _REBUILD_HINT

    def __init__(self, path: Union[str, Path], expect: Optional[Mapping[str, Any]] = None, verify: str = "sample"):
        self.path = Path(path).expanduser()
        p = self.path
        hint = self.REBUILD_HINT.format(path=p)
        if not p.is_dir():
            raise FileNotFoundError(f"feature cache '{p}' does not exist; create it with "
                                    f"`distill extract RECIPE -o {p}`.")
        mpath = p / MANIFEST
        if not mpath.is_file():
            raise IncompleteCacheError(f"'{p}' is not a complete feature cache: it has no {MANIFEST} (a half-written "
                                       f"or interrupted extraction, or not a cache). {hint}")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IncompleteCacheError(f"'{mpath}' is not valid JSON ({e}). {hint}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != self.FORMAT:
            raise IncompleteCacheError(f"'{mpath}' is not a {self.FORMAT} manifest. {hint}")
        if manifest.get("format_version") != self.FORMAT_VERSION:
            raise CacheMismatchError(f"cache '{p}' has format_version {manifest.get('format_version')!r}; this "
                                     f"version of distill reads {self.FORMAT_VERSION}. {hint}")
        missing = [k for k in self.REQUIRED if not isinstance(manifest.get(k), (dict, list))]
        if missing:
            raise IncompleteCacheError(f"'{mpath}' lacks {', '.join(missing)}. {hint}")
        self.manifest = manifest
        self.arrays: dict[str, np.memmap] = {}
        for k, fname in manifest["files"].items():
            fp = p / fname
            if not fp.is_file():
                raise IncompleteCacheError(f"feature cache '{p}' lacks {fname} (feature {k}). {hint}")
            try:
                arr = np.load(fp, mmap_mode="r")
            except (ValueError, OSError) as e:
                raise IncompleteCacheError(f"feature cache file '{fp}' is truncated or unreadable ({e}). {hint}") from e
            dtype = np.dtype(manifest.get("storage_dtype", STORAGE_DTYPE))
            if list(arr.shape) != list(manifest["shapes"][k]) or arr.dtype != dtype:
                raise IncompleteCacheError(f"cache file '{fp}' has shape {list(arr.shape)} {arr.dtype}; the "
                                           f"manifest says {manifest['shapes'][k]} {dtype}. {hint}")
            check_shard(fp, manifest.get("shards", {}).get(fname), verify, hint)
            self.arrays[k] = arr
        if expect is not None:
            self.check(expect)

    # -- validation
    def mismatches(self, expect: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """``[(field, cached, expected)]`` for every field of ``expect`` that differs from the manifest's key."""
        cached = self.manifest.get("key", {})
        missing = object()
        out = []
        for field, want in expect.items():
            have = cached.get(field, missing)
            if have is missing or _jsonable(have) != _jsonable(want):
                out.append((field, "(absent)" if have is missing else have, want))
        return out

    def check(self, expect: Mapping[str, Any]) -> None:
        """Raise `CacheMismatchError` naming every field of ``expect`` that the cache does not match."""
        diffs = self.mismatches(expect)
        if diffs:
            lines = "\n".join(f"  {f}: cached {_short(c)} vs expected {_short(w)}" for f, c, w in diffs)
            raise CacheMismatchError(
                f"feature cache '{self.path}' does not match this run ({len(diffs)} field(s) differ); it is refused "
                f"so that stale teacher features are never used:\n{lines}\n{self.REBUILD_HINT.format(path=self.path)}"
            )

    # -- description
    @property
    def key(self) -> dict:
        """The manifest's cache key (teacher weights and settings, blocks, timesteps, resolution, draws, data)."""
        return dict(self.manifest["key"])

    @property
    def keys(self) -> list[str]:
        """The feature keys held, ``'<block>@t<t>'`` (`distill.teacher.feature_key`), in manifest order."""
        return list(self.manifest["files"])

    @property
    def num_images(self) -> int:
        """Number of training images whose features are cached."""
        return int(self.manifest["key"]["num_images"])

    @property
    def num_draws(self) -> int:
        """Noise draws per image (``distill extract --draws``); a run picks one per image and step."""
        return int(self.manifest["key"]["num_draws"])

    @property
    def feature_info(self) -> list[TeacherFeatureInfo]:
        """The teacher's feature_info, read from the manifest (no teacher forward): usable by ``build_model``."""
        return [TeacherFeatureInfo(f["block"], int(f["timestep"]), int(f["num_chs"]), int(f["reduction"]),
                                   tuple(f["size"])) for f in self.manifest["feature_info"]]

    @property
    def blocks(self) -> list[str]:
        """Teacher blocks the features come from (``named_modules()`` paths)."""
        return list(self.manifest["key"]["blocks"])

    @property
    def timesteps(self) -> list[int]:
        """Diffusion timesteps the features were taken at, each in ``[0, T)``."""
        return [int(t) for t in self.manifest["key"]["timesteps"]]

    @property
    def in_channels(self) -> int:
        """Channels of the images the teacher saw (1 for grayscale, 3 for RGB)."""
        return int(self.manifest["key"]["in_channels"])

    @property
    def sample_size(self) -> int:
        """Side in pixels of the square images the teacher saw."""
        return int(self.manifest["key"]["sample_size"])

    @property
    def nbytes(self) -> int:
        """Bytes the cache directory takes on disk (every file in it)."""
        return _dir_bytes(self.path)

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (f"FeatureCache('{self.path}', images={self.num_images}, draws={self.num_draws}, "
                f"keys={self.keys})")

    # -- reading
    def draw_ids(self, indices, step: int, seed: int = 0) -> torch.Tensor:
        """One draw per image: a hash of ``(seed, step, image index)`` mod ``num_draws``, as a LongTensor.

        A function of its arguments only (not of batch composition, process count or RNG state), so a resumed
        run picks the same draws; over steps every draw of an image comes up with equal frequency.
        """
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        if self.num_draws == 1:
            return torch.zeros(len(idx), dtype=torch.long)
        with np.errstate(over="ignore"):
            salt = _splitmix64(np.array([(int(seed) & 0xFFFFFFFF) << 32 | (int(step) & 0xFFFFFFFF)], dtype=np.uint64))
            z = _splitmix64(idx.astype(np.uint64) ^ salt)
        return torch.from_numpy((z % np.uint64(self.num_draws)).astype(np.int64))

    def targets(self, indices, draws=None, keys: Optional[Sequence] = None,
                device: Union[str, torch.device, None] = None, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Teacher features of images ``indices`` at noise draws ``draws`` (default 0): one ``[B, C, H, W]`` per key.

        ``keys``: feature keys (default: all, in the cache's order), or groups of keys (a list of lists, e.g. the
        trainer's ``TargetLayout.groups``), whose features are concatenated along channels into one target each.
        Reads only those rows from the memory-mapped files; moves float16 to ``device``, then casts to ``dtype``.
        """
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        d = (np.zeros(len(idx), dtype=np.int64) if draws is None else
             np.asarray(draws.cpu() if isinstance(draws, torch.Tensor) else draws, dtype=np.int64))
        if d.ndim == 0:
            d = np.full(len(idx), int(d), dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"image indices must be in [0, {self.num_images}); got {idx.min()}..{idx.max()}.")
        if len(d) != len(idx) or (len(d) and (d.min() < 0 or d.max() >= self.num_draws)):
            raise IndexError(f"need one draw in [0, {self.num_draws}) per image; got {d.tolist()[:8]}...")
        out = []
        for group in (keys if keys is not None else self.keys):
            parts = []
            for k in ([group] if isinstance(group, str) else group):
                if k not in self.arrays:
                    raise KeyError(f"feature {k!r} is not in cache '{self.path}'; it holds {self.keys}.")
                a = np.ascontiguousarray(self.arrays[k][idx, d])  # (B, C, H, W) float16, read from the memmap
                parts.append(torch.from_numpy(a).to(device or "cpu", non_blocking=True).to(dtype))
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        return out


def _short(v: Any) -> str:
    s = json.dumps(v, default=repr) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 120 else s[:117] + "..."


# ----------------------------------------------------------------------------------------------- training glue
def check_recipe_for_cache(recipe) -> None:
    """A cache holds features of un-augmented images at fixed timesteps: ``augment`` must be ``'none'`` and
    ``timesteps`` not ``policy`` (per-image sampled timesteps)."""
    if getattr(recipe, "timesteps", None) == "policy":
        raise ValueError("recipe key 'feature_cache' is set but 'timesteps' is 'policy', which samples a timestep "
                         "per image at train time; a cache holds fixed timesteps. Fix: unset feature_cache, or use "
                         "a fixed list of timesteps.")
    if getattr(recipe, "augment", "none") != "none":
        raise ValueError(
            f"recipe key 'feature_cache' is set but 'augment' is {recipe.augment!r}; the cache holds the teacher's "
            f"features of un-augmented images, so an augmented view would be regressed onto the wrong target. "
            f"valid with feature_cache: augment: none. Fix: --set augment=none, or unset feature_cache to train "
            f"from the live teacher."
        )


def open_for_recipe(recipe, ds: Dataset, teacher: DiffusionTeacher, data_channels: int,
                    path: Union[str, Path, None] = None) -> FeatureCache:
    """Open ``path`` (default ``recipe.feature_cache``) for a run: checks ``augment`` and the whole cache key."""
    check_recipe_for_cache(recipe)
    path = path if path is not None else getattr(recipe, "feature_cache")
    return FeatureCache(path, expect=expected_key(recipe, ds, teacher, data_channels))
