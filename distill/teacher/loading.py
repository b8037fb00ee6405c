"""Loading a teacher by name: a packaged teacher, a local diffusers directory, a hub id, a config dict or a module.

`inspect_teacher` tells from the config alone which kind of model ``source`` is; `load_teacher` loads it
and wraps it in `DiffusionTeacher` (``UNet2DModel``),
`LatentDiffusionTeacher` (``UNet2DConditionModel``, with its empty-prompt embedding)
or `DiTTeacher`. The packaged teachers live in ``distill/teacher/packaged/<name>/``.

A local teacher directory is checked before diffusers reads it (`distill.teacher.model_dir`): a config that is
not JSON or holds wrongly typed values, missing, empty, truncated or partial weights are reported naming the directory
and the file, with the fix (re-save with ``save_pretrained``), instead of a traceback from inside diffusers.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .base import DiffusionTeacher
from .latent import DiTTeacher, LatentDiffusionTeacher, resolve_vae_dtype
from .model_dir import check_config_types, from_local, local_json, scheduler_from_local
from .prompt import empty_prompt_embedding, load_prompt_embedding
from .hub import check_hub_reachable, is_hub_id
from .python import build_python_model, code_record, is_python_source, load_weights, qualified_name
from .schedule import build_noise_schedule

_logger = logging.getLogger(__name__)

PACKAGED_TEACHERS_DIR = Path(__file__).resolve().parent / "packaged"


def packaged_teachers() -> list[str]:
    """Names of the teachers shipped inside the package (usable as ``teacher: NAME`` in a recipe)."""
    if not PACKAGED_TEACHERS_DIR.is_dir():
        return []
    return sorted(p.name for p in PACKAGED_TEACHERS_DIR.iterdir() if (p / "model_index.json").is_file())


def _resolve_source(source: str) -> str:
    if source in packaged_teachers():
        return str(PACKAGED_TEACHERS_DIR / source)
    return source


def load_unet(source: Union[str, Mapping[str, Any], nn.Module], torch_dtype: Optional[torch.dtype] = None):
    """Load a diffusers ``UNet2DModel`` and its scheduler.

    ``source`` is a packaged teacher name (see `packaged_teachers`), a local directory (a pipeline with
    ``unet/`` and ``scheduler/`` or a bare model directory), a hub id such as ``google/ddpm-cifar10-32``, a
    config dict (random weights, for tests) or a module (used as is).
    """
    from diffusers import DDPMScheduler, UNet2DModel

    if isinstance(source, nn.Module):
        return source, DDPMScheduler(num_train_timesteps=1000)
    if isinstance(source, Mapping):
        cfg = dict(source)
        cfg.pop("_class_name", None)
        T = int(cfg.pop("num_train_timesteps", 1000))
        check_config_types(UNet2DModel, cfg, "teacher config dict")
        return UNet2DModel(**cfg), DDPMScheduler(num_train_timesteps=T)
    path = _resolve_source(str(source))
    local = Path(path).expanduser()
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"teacher {source!r} is a file; give a diffusers directory (config.json + weights).")
        sub = "unet" if (local / "unet" / "config.json").is_file() else None
        if sub is None and not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"teacher directory '{local}' has neither unet/config.json nor config.json; save the model with "
                f"diffusers' save_pretrained (or DDPMPipeline.save_pretrained)."
            )
        unet = from_local(UNet2DModel, local, sub, **kwargs)
        sched_dir = local / "scheduler" if (local / "scheduler").is_dir() else local
        scheduler = (scheduler_from_local(sched_dir)
                     if (sched_dir / "scheduler_config.json").is_file() else DDPMScheduler(num_train_timesteps=1000))
        return unet, scheduler
    if str(source).count("/") != 1:
        raise ValueError(
            f"teacher {source!r} is neither a packaged teacher ({', '.join(packaged_teachers()) or 'none'}), an "
            f"existing directory, nor a hub id of the form 'owner/name'."
        )
    try:  # hub id: pipeline repos keep the model in unet/, model repos at the root
        unet = UNet2DModel.from_pretrained(path, **kwargs)
        sub = None
    except (OSError, EnvironmentError):
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", **kwargs)
        sub = "scheduler"
    try:
        scheduler = DDPMScheduler.from_pretrained(path, subfolder=sub)
    except (OSError, EnvironmentError):
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    return unet, scheduler


#: how a run's config.yaml names an nn.Module teacher: ``module:<package.module.Class>`` (not loadable by name)
MODULE_PREFIX = "module:"


def _set_input_size(model: nn.Module, kwargs: dict, resolution: Optional[int]) -> None:
    """A user network without a diffusers config: ``in_channels`` / ``sample_size`` from its attributes
    (``in_channels``; ``sample_size``, ``image_size`` (ADM) or ``img_resolution`` (EDM)) unless given."""
    if getattr(model, "config", None) is not None:
        return
    if kwargs.get("in_channels") is None and isinstance(getattr(model, "in_channels", None), int):
        kwargs["in_channels"] = model.in_channels
    if resolution is None and kwargs.get("sample_size") is None:
        for attr in ("sample_size", "image_size", "img_resolution"):
            if isinstance(getattr(model, attr, None), int):
                kwargs["sample_size"] = getattr(model, attr)
                break


LATENT_UNET_CLASSES = ("UNet2DConditionModel",)
DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the hub's DiT configs say Transformer2DModel


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _hub_json(repo: str, filename: str) -> Optional[dict]:
    """A JSON file of a hub repo (through the local hub cache): ``{}`` when the repo has no such file, ``None``
    when the hub cannot be asked (offline, no such repo): the caller then falls back to the UNet2DModel loader."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        return _read_json(Path(hf_hub_download(repo, filename)))
    except LocalEntryNotFoundError:  # offline and not in the hub cache (a subclass of EntryNotFoundError)
        return None
    except EntryNotFoundError:
        return {}
    except Exception:  # noqa: BLE001 - offline, no such repo, bad token: one try only (the hub client retries)
        return None


def _class_of(cfg: Mapping[str, Any]) -> Optional[str]:
    name = cfg.get("_class_name")
    if name == "Transformer2DModel" and cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        return f"Transformer2DModel(norm_type={cfg.get('norm_type')})"  # PixArt & co: not a DiT
    return name


def inspect_teacher(source: Union[str, Mapping[str, Any], nn.Module]) -> dict:
    """What kind of teacher ``source`` is, from its config alone (nothing is loaded).

    Returns ``{'kind': 'pixel' | 'latent-unet' | 'dit', 'class': model class name, 'subfolder': folder of the model
    in a pipeline (``'unet'``, ``'transformer'``) or None, 'components': pipeline folders present, 'local': Path or
    None}``. A packaged name, a DDPM pipeline and anything unrecognised is ``'pixel'`` (the ``UNet2DModel`` loader,
    which gives its own errors).
    """
    info: dict = {"kind": "pixel", "class": None, "subfolder": None, "components": set(), "local": None}
    if is_python_source(source):  # the user's network, called as model(noisy_image, timestep)
        info["class"] = source
        return info

    def classify(name: Optional[str]) -> str:
        if name in LATENT_UNET_CLASSES:
            return "latent-unet"
        if name in DIT_CLASSES:
            return "dit"
        if name in (None, "UNet2DModel"):
            return "pixel"
        raise ValueError(
            f"teacher {source if isinstance(source, str) else name!r} is a {name}; supported: UNet2DModel (pixel "
            f"DDPM), UNet2DConditionModel (Stable Diffusion 1.x/2.x) and DiTTransformer2DModel (DiT)."
        )

    if isinstance(source, nn.Module):
        info["class"] = type(source).__name__
        info["kind"] = classify(info["class"]) if info["class"] in LATENT_UNET_CLASSES + DIT_CLASSES else "pixel"
        return info
    if isinstance(source, Mapping):
        info["class"] = _class_of(source)
        info["kind"] = classify(info["class"])
        info["components"] = {"vae"} if "vae" in source else set()
        return info
    path = _resolve_source(str(source))
    local = Path(path).expanduser()
    if local.is_dir():
        info["local"] = local
        info["components"] = {p.name for p in local.iterdir() if (p / "config.json").is_file()
                              or (p / "scheduler_config.json").is_file() or p.name == "tokenizer"}
        for sub in ("unet", "transformer"):
            if (local / sub / "config.json").is_file():
                info.update(subfolder=sub, **{"class": _class_of(local_json(local / sub / "config.json"))})
                break
        else:
            info["class"] = _class_of(local_json(local / "config.json"))
        info["kind"] = classify(info["class"])
        return info
    if local.exists() or str(source).count("/") != 1:
        return info  # a file or a malformed name: load_unet says what is wrong
    index = _hub_json(path, "model_index.json")  # hub id: the pipeline's index names its components
    if index:
        info["components"] = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
        for sub in ("unet", "transformer"):
            if sub in info["components"]:
                info["subfolder"] = sub
                info["class"] = _class_of(_hub_json(path, f"{sub}/config.json") or {}) or index[sub][1]
                break
    elif index is not None:  # a model repo (no pipeline index): its own config.json
        info["class"] = _class_of(_hub_json(path, "config.json") or {})
    info["kind"] = classify(info["class"])  # hub unreachable: class None, the UNet2DModel loader reports it
    return info


def load_latent_model(source: Union[str, Mapping[str, Any], nn.Module], info: Mapping[str, Any],
                      torch_dtype: Optional[torch.dtype] = None, vae_dtype: Union[str, torch.dtype] = "float32"):
    """Load the model (``UNet2DConditionModel`` or ``DiTTransformer2DModel``), its ``AutoencoderKL`` (or None) and a
    ``DDPMScheduler`` built from the pipeline's scheduler config (SD ships PNDM/DDIM configs: same betas, and
    ``add_noise`` is the DDPM one), as `inspect_teacher` described ``source``.

    Config dicts (random weights, for tests): the model's config with ``_class_name``, plus optionally
    ``vae`` (an ``AutoencoderKL`` config dict) and ``num_train_timesteps``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel

    cls = UNet2DConditionModel if info["kind"] == "latent-unet" else DiTTransformer2DModel
    vae_dt = resolve_vae_dtype(vae_dtype)
    if isinstance(source, nn.Module):
        return source, None, DDPMScheduler(num_train_timesteps=1000)
    if isinstance(source, Mapping):
        cfg = {k: v for k, v in source.items() if k != "_class_name"}
        vae_cfg = cfg.pop("vae", None)
        T = int(cfg.pop("num_train_timesteps", 1000))
        check_config_types(cls, cfg, "teacher config dict")
        if vae_cfg is not None:
            check_config_types(AutoencoderKL, vae_cfg, "teacher config dict (vae)")
        vae = AutoencoderKL(**vae_cfg) if vae_cfg is not None else None
        return cls(**cfg), vae, DDPMScheduler(num_train_timesteps=T)
    local = info["local"]
    src = str(local) if local is not None else _resolve_source(str(source))
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    sub = info["subfolder"]

    def load(c, subfolder, **kw):  # a local directory is checked and its errors named (from_local)
        return from_local(c, local, subfolder, **kw) if local is not None else c.from_pretrained(src, subfolder=subfolder,
                                                                                                  **kw)

    model = load(cls, sub, **kwargs)
    vae = None
    if sub is not None and "vae" in info["components"]:
        vae = load(AutoencoderKL, "vae", torch_dtype=vae_dt)
    elif sub is not None:
        _logger.warning("teacher %s has no vae/: it takes latents, not images", source)
    if sub is not None and "scheduler" in info["components"]:
        scheduler = (scheduler_from_local(local, "scheduler") if local is not None
                     else DDPMScheduler.from_pretrained(src, subfolder="scheduler"))
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000)
    return model, vae, scheduler


def load_teacher(
    source: Union[str, Mapping[str, Any], nn.Module],
    blocks: Sequence[str],
    timesteps: Sequence[int] = (11,),
    torch_dtype: Optional[torch.dtype] = None,
    vae_dtype: Union[str, torch.dtype] = "float32",
    prompt_embedding: Union[None, str, Path, torch.Tensor] = None,
    resolution: Optional[int] = None,
    teacher_kwargs: Optional[Mapping[str, Any]] = None,
    weights: Union[None, str, Path] = None,
    weights_prefix: Optional[str] = None,
    noise_schedule: Union[None, str, Path, Mapping[str, Any]] = None,
    **kwargs,
) -> DiffusionTeacher:
    """Load a teacher and wrap it in the class its config calls for (see `inspect_teacher`).

    - ``UNet2DModel`` (packaged name, DDPM pipeline or model directory, hub id such as ``google/ddpm-cifar10-32``,
      config dict without ``_class_name``): `DiffusionTeacher` on pixels (see `load_unet`).
    - ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x pipeline directory with ``unet/ vae/ scheduler/
      text_encoder/ tokenizer/``, or hub id such as ``runwayml/stable-diffusion-v1-5``):
      `LatentDiffusionTeacher` conditioned on the empty-prompt embedding (`empty_prompt_embedding`).
    - ``DiTTransformer2DModel`` (DiT pipeline with ``transformer/ vae/ scheduler/``, e.g. ``facebook/DiT-XL-2-256``):
      `DiTTeacher` with the null class.
    - ``'python:package.module:factory'`` (or ``python:/path/file.py:factory``): ``factory(**teacher_kwargs)``, the
      user's network called as ``model(noisy_image, timestep)`` (`distill.teacher.python`), and an
      ``nn.Module`` given as is: `DiffusionTeacher` on pixels. Their input channels and size come from
      ``in_channels=`` / ``resolution``, else from the model's ``in_channels`` and ``sample_size`` / ``image_size`` /
      ``img_resolution`` attributes.

    The returned teacher's ``source_info`` says what was built: ``{'kind', 'class', 'factory', 'weights',
    'weights_sha256'}``, and for a ``python:`` teacher ``'code'`` and ``'code_sha256'`` (its source:
    `distill.teacher.python.code_record`); what a run's ``config.yaml`` records and ``--resume`` compares.

    Args:
        torch_dtype: dtype of the UNet/DiT (``from_pretrained(torch_dtype=...)``).
        vae_dtype: ``'float32'`` or ``'bfloat16'`` (float16 is refused: the VAE overflows).
        prompt_embedding: SD only: the text embedding ``[1, L, D]`` (tensor or .safetensors/.pt file) instead of
            the empty-prompt one; required for a config dict or module (no text encoder).
        resolution: pixel size the teacher sees; default the model's ``sample_size`` (x the VAE factor).
        teacher_kwargs: ``python:`` teachers only: the factory's keyword arguments.
        weights: ``python:`` teachers and modules: a ``.safetensors`` or ``.pt``/``.pth`` state dict loaded strictly
            (``torch.load(weights_only=True)``; see `distill.teacher.python.load_weights`).
        weights_prefix: key prefix stripped from ``weights`` (e.g. ``'module.'``).
        noise_schedule: pixel teachers: a scheduler config path or a mapping of DDPMScheduler arguments
            (`distill.teacher.schedule.build_noise_schedule`) replacing the teacher's own (default for a
            ``python:`` teacher or a module: DDPM's linear schedule, 1000 steps).
        kwargs: passed to the teacher class (e.g. ``in_channels``, ``forward_kwargs`` for a pixel module).

    Raises:
        ValueError: a hub id while the hub cannot be reached (at once, with the fix: a local directory or
            ``HF_HUB_OFFLINE=1``; `distill.teacher.hub.check_hub_reachable`), ``teacher_kwargs`` / ``weights``
            for a diffusers teacher, ``noise_schedule`` for a latent one,
            or a bad value of any of them (see `distill.teacher.python`); the message names the fix.
    """
    vae_dt = resolve_vae_dtype(vae_dtype)  # checked for every teacher: a wrong recipe value fails early
    if is_hub_id(source) and not Path(source).expanduser().exists():
        check_hub_reachable(source)  # one short request, not 79 s of retries per file
    info = inspect_teacher(source)
    name = source if isinstance(source, str) else (info["class"] or type(source).__name__)
    if info["kind"] != "latent-unet" and prompt_embedding is not None:
        raise ValueError(
            f"prompt_embedding is set but teacher {name!r} is a {info['class'] or 'UNet2DModel'}, which takes no text; "
            f"remove prompt_embedding (it is for Stable Diffusion UNet2DConditionModel teachers)."
        )
    user_model = is_python_source(source) or isinstance(source, nn.Module)
    for key, value in (("teacher_kwargs", teacher_kwargs), ("teacher_weights", weights),
                       ("teacher_weights_prefix", weights_prefix)):
        if value and not user_model:
            raise ValueError(f"{key} is set but teacher {name!r} is not a python:module:factory teacher (a diffusers "
                             f"model loads its own weights). Fix: remove {key}, or name the network's factory as "
                             f"teacher: python:package.module:factory.")
    if weights_prefix and not weights:
        raise ValueError("teacher_weights_prefix is set without teacher_weights; give the weight file, or remove it.")
    if noise_schedule is not None and info["kind"] != "pixel":
        raise ValueError(f"teacher_scheduler is set but teacher {name!r} is a {info['class']}, which noises with its "
                         f"pipeline's own scheduler; remove teacher_scheduler.")
    if isinstance(source, str) and source.startswith(MODULE_PREFIX):
        raise ValueError(f"teacher {source!r} is the record of an nn.Module given to distill.train; a module cannot "
                         f"be rebuilt from its name. Fix: pass the module again (distill.train(recipe with teacher="
                         f"module)), or name its factory as teacher: python:package.module:factory.")
    if info["kind"] == "pixel":
        source_info = {"kind": "diffusers", "class": None, "factory": None, "weights": None, "weights_sha256": None}
        if user_model:
            python = is_python_source(source)
            model = build_python_model(source, teacher_kwargs) if python else source
            source_info.update(kind="python" if python else "module", factory=source if python else None,
                               **{"class": qualified_name(model)}, **(code_record(source) if python else {}))
            if weights:
                source_info.update(weights=str(weights), weights_sha256=load_weights(model, weights, weights_prefix))
            if torch_dtype is not None:
                model = model.to(torch_dtype)
            scheduler = None
            _set_input_size(model, kwargs, resolution)
        else:
            model, scheduler = load_unet(source, torch_dtype)
            source_info["class"] = type(model).__name__
        if noise_schedule is not None:
            scheduler = build_noise_schedule(noise_schedule)
        if resolution is not None:
            kwargs.setdefault("sample_size", resolution)
        teacher = DiffusionTeacher(model, blocks, timesteps, scheduler=scheduler, name=name, **kwargs)
        teacher.source_info = source_info
        return teacher
    model, vae, scheduler = load_latent_model(source, info, torch_dtype, vae_dt)
    if info["kind"] == "dit":
        return DiTTeacher(model, blocks, timesteps, scheduler=scheduler, vae=vae, vae_dtype=vae_dt,
                          sample_size=resolution, name=name, **kwargs)
    cross_dim = model.config.cross_attention_dim
    if prompt_embedding is not None:
        emb = load_prompt_embedding(prompt_embedding, cross_dim)
    elif info["local"] is None and not isinstance(source, str):
        raise ValueError(
            f"teacher {name!r} (a UNet2DConditionModel {'config' if isinstance(source, Mapping) else 'module'}) has "
            f"no text encoder: give prompt_embedding= (a [1, 77, {cross_dim}] tensor or .safetensors/.pt file, e.g. "
            f"the empty-prompt embedding of its pipeline), or load the teacher from a pipeline directory."
        )
    else:
        src = str(info["local"]) if info["local"] is not None else _resolve_source(str(source))
        emb = load_prompt_embedding(empty_prompt_embedding(str(source), src, info["local"]), cross_dim)
    return LatentDiffusionTeacher(model, blocks, timesteps, scheduler=scheduler, vae=vae, vae_dtype=vae_dt,
                                  conditioning={"encoder_hidden_states": emb}, sample_size=resolution, name=name,
                                  **kwargs)
