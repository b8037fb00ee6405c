"""What is fine-tuned: an exported student or a ``timm:NAME`` model at random init, built with a new head, and the
input size and mean/std it is fed."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..data import dataset_mean_std
from ..errors import option
from ..export import load_exported, read_export
from ..student import student_model_kwargs
from .config import FinetuneConfig


@dataclass
class ModelSource:
    kind: str  # 'exported' or 'timm'
    name: str  # timm architecture
    path: Optional[Path] = None  # exported directory
    config: dict = field(default_factory=dict)  # the export's config.json


def read_export_config(path: Path, setting: str) -> dict:
    """The ``config.json`` of a directory written by ``distill export``; ``setting`` (``"model"``, ``"like"``) is
    the setting that gave ``path``, named in the errors as the caller spells it (`distill.errors.option`).

    Raises:
        FileNotFoundError: ``path`` is missing, is not an export (a hint for a run directory), or has no weights.
        UnreadableFileError: its config.json or model.safetensors is damaged (named, with the fix).
    """
    arg = option(setting)
    if not path.exists():
        raise FileNotFoundError(
            f"{arg} '{path}' does not exist; give a directory written by `distill export` (config.json + "
            f"model.safetensors){' or timm:NAME for a random-init baseline' if setting == 'model' else ''}.")
    if not (path / "config.json").is_file():
        hint = ""
        if (path / "student" / "config.json").is_file():
            hint = f" Did you mean '{path / 'student'}'?"
        elif (path / "config.yaml").is_file():
            hint = f" It is a run directory: export it first with `distill export {path} -o {path / 'student'}`."
        raise FileNotFoundError(f"{arg} '{path}' is not an exported student (no config.json).{hint}")
    return read_export(str(path), arg)


def check_timm_name(name: str) -> None:
    """A clear error, with the closest names, for a model timm does not know."""
    import timm

    if name and timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Closest timm names: {', '.join(close)}." if close else ""
    raise ValueError(f"{option('model')} timm:{name}: timm has no model {name!r}.{hint} List them with "
                     "`timm.list_models('resnet*')`.")


def parse_model_source(model: str) -> ModelSource:
    """``timm:NAME`` -> random init; anything else must be a directory written by ``distill export``."""
    if model.startswith("timm:"):
        name = model[len("timm:"):]
        check_timm_name(name)
        return ModelSource("timm", name)
    path = Path(model).expanduser()
    cfg = read_export_config(path, "model")
    return ModelSource("exported", cfg.get("architecture", "?"), path, cfg)


def default_label(source: ModelSource) -> str:
    """'<arch> distilled' for an export, '<arch> scratch' for a random init: the group name in reports."""
    return f"{source.name} {'distilled' if source.kind == 'exported' else 'scratch'}"


def build_model(source: ModelSource, num_classes: int, size: int, like_config: Optional[dict] = None,
                seed: int = 0) -> nn.Module:
    """The backbone with a new ``num_classes`` head: exported weights (head excluded) or seeded random init.

    A ``timm:NAME`` model with the architecture of ``like_config`` (an export's config.json) is built with the
    export's model arguments (e.g. a ViT's ``patch_size``), so scratch and distilled are the same network.
    """
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if source.kind == "exported":
            return load_exported(str(source.path), num_classes=num_classes)
        kwargs = {}
        if like_config and like_config.get("architecture") == source.name:
            kwargs = {k: v for k, v in like_config.get("model_args", {}).items() if k != "num_classes"}
        else:  # as distill.student.Student builds it: img_size for a fixed-input family (Swin, MaxViT, ViT, ...)
            kwargs = student_model_kwargs(source.name, size)
        return timm.create_model(source.name, pretrained=False, num_classes=num_classes, **kwargs)


def _round_list(v) -> list[float]:
    v = [float(x) for x in v]
    return v * 3 if len(v) == 1 else v


def resolve_preprocessing(cfg: FinetuneConfig, source: ModelSource, like_config: Optional[dict],
                          full_train: Dataset) -> tuple[int, list[float], list[float], str]:
    """Input size and mean/std: explicit values > the export's own (or --like's) pretrained_cfg > 64 and the
    dataset's statistics (computed as ``distill train`` does, so they equal an export's on the same data)."""
    ref = source.config if source.kind == "exported" else (like_config or {})
    pcfg = ref.get("pretrained_cfg", {})
    origin = "export" if source.kind == "exported" else ("--like" if like_config else "default")
    size = cfg.size or (int(pcfg["input_size"][-1]) if pcfg.get("input_size") else 64)
    mean, std = cfg.mean, cfg.std
    if mean is None or std is None:
        if pcfg.get("mean") and pcfg.get("std"):
            mean, std = mean or pcfg["mean"], std or pcfg["std"]
        else:
            m, s = dataset_mean_std(full_train)
            mean, std = mean or [round(v, 4) for v in m], std or [round(v, 4) for v in s]
            origin = "dataset" if origin == "default" else origin
    if cfg.size is not None or cfg.mean is not None or cfg.std is not None:
        origin += " + explicit"
    return size, _round_list(mean), _round_list(std), origin
