"""Frozen diffusion teachers that return features of named blocks at chosen timesteps.

- `base`: `DiffusionTeacher` (pixel-space model: noising, batched timesteps, hooks, early exit),
  `TeacherFeatureInfo` and the feature keys ``'<block>@t<t>'`` (`feature_key`, `parse_feature_key`).
- `latent`: `LatentDiffusionTeacher` (VAE + Stable Diffusion UNet) and `DiTTeacher`.
- `prompt`: the prompt embedding of a Stable Diffusion teacher (user-given or empty-prompt, cached).
- `loading`: `load_teacher` and `inspect_teacher` (packaged name, directory, hub id, config dict,
  ``python:module:factory``, module); the shipped teachers are in ``packaged/<name>/``.
- `python`: a teacher built by the user's factory (``python:module:factory``) and its weight file.
- `schedule`: a noise schedule given in a recipe (``teacher_scheduler``).
"""
from ..errors import MissingDependencyError
from .base import DiffusionTeacher, TeacherFeatureInfo, candidate_blocks, feature_key, parse_feature_key
from .latent import DiTTeacher, LatentDiffusionTeacher, resolve_vae_dtype, vae_scale_factor
from .loading import (DIT_CLASSES, LATENT_UNET_CLASSES, PACKAGED_TEACHERS_DIR, inspect_teacher, load_latent_model,
                      load_teacher, load_unet, packaged_teachers)
from .python import PYTHON_PREFIX, build_python_model, load_weights, read_state_dict
from .schedule import build_noise_schedule
from .prompt import (EMBEDDING_FILENAME, SD_EXTRA_HINT, distill_cache_dir, embedding_cache_files,
                     empty_prompt_embedding, load_prompt_embedding)

__all__ = [
    "MissingDependencyError",
    "DiffusionTeacher", "TeacherFeatureInfo", "candidate_blocks", "feature_key", "parse_feature_key",
    "DiTTeacher", "LatentDiffusionTeacher", "resolve_vae_dtype", "vae_scale_factor",
    "DIT_CLASSES", "LATENT_UNET_CLASSES", "PACKAGED_TEACHERS_DIR", "inspect_teacher", "load_latent_model",
    "load_teacher", "load_unet", "packaged_teachers",
    "EMBEDDING_FILENAME", "SD_EXTRA_HINT", "distill_cache_dir", "embedding_cache_files", "empty_prompt_embedding",
    "load_prompt_embedding",
    "PYTHON_PREFIX", "build_python_model", "load_weights", "read_state_dict", "build_noise_schedule",
]
