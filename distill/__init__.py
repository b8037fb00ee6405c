"""distill: turn the features of pretrained diffusion models into compact timm student backbones.

The package face is lazy (PEP 562 module ``__getattr__``, as diffusers' ``_LazyModule`` and timm do): a name is
imported from its module on first use, so ``import distill`` and ``distill --help`` do not load torch, diffusers,
torchmetrics, kornia or matplotlib. Nothing inside the package imports this module.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# public name -> module that defines it
_EXPORTS = {
    "cache": ["CacheMismatchError", "FeatureCache", "extract_features_cache"],
    "config": ["Recipe", "make_recipe"],
    "recipes": ["load_recipe", "shipped_recipes"],  # load_recipe takes a path or a shipped recipe's name
    "data": ["FashionMNIST", "ImageFolder", "build_dataset", "label_subset", "stratified_indices", "to_student",
             "to_teacher"],
    "evaluate": ["probe_exported", "probe_fn", "probe_random_init"],
    "export": ["export_student", "load_exported"],
    "finetune": ["FinetuneConfig", "finetune", "finetune_sweep"],
    "select": ["grid_probe", "pooled_teacher_features", "label_free_scores", "rank_correlation"],
    "losses": ["attention_map", "attention_transfer_loss", "cosine_loss", "feature_distillation_loss", "mse_loss",
               "whiten"],
    "policy": ["TimestepPolicy"],
    "probe": ["ensemble_probe", "extract_features", "knn_probe", "linear_probe", "multi_linear_probe"],
    "regressor": ["FeatureRegressor"],
    "report": ["write_report"],
    "student": ["DistillModel", "Student"],
    "teacher": ["DiffusionTeacher", "load_teacher", "packaged_teachers"],
    "rundir": ["load_trained"],
    "trainer": ["train"],
}
_NAME_TO_MODULE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["__version__", *_NAME_TO_MODULE]


def __getattr__(name: str) -> Any:
    module = _NAME_TO_MODULE.get(name)
    if module is None:
        raise AttributeError(f"module 'distill' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static type checkers and IDEs see the real names
    from .cache import CacheMismatchError, FeatureCache, extract_features_cache  # noqa: F401
    from .config import Recipe, make_recipe  # noqa: F401
    from .recipes import load_recipe, shipped_recipes  # noqa: F401
    from .data import (FashionMNIST, ImageFolder, build_dataset, label_subset, stratified_indices,  # noqa: F401
                       to_student, to_teacher)
    from .evaluate import probe_exported, probe_fn, probe_random_init  # noqa: F401
    from .export import export_student, load_exported  # noqa: F401
    from .finetune import FinetuneConfig, finetune, finetune_sweep  # noqa: F401
    from .losses import (attention_map, attention_transfer_loss, cosine_loss, feature_distillation_loss,  # noqa: F401
                         mse_loss, whiten)
    from .policy import TimestepPolicy  # noqa: F401
    from .probe import ensemble_probe, extract_features, knn_probe, linear_probe, multi_linear_probe  # noqa: F401
    from .regressor import FeatureRegressor  # noqa: F401
    from .report import write_report  # noqa: F401
    from .rundir import load_trained  # noqa: F401
    from .select import grid_probe, label_free_scores, pooled_teacher_features, rank_correlation  # noqa: F401
    from .student import DistillModel, Student  # noqa: F401
    from .teacher import DiffusionTeacher, load_teacher, packaged_teachers  # noqa: F401
    from .trainer import train  # noqa: F401
