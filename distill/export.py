"""Export the distilled student in timm's own layout (``config.json`` + ``model.safetensors``).

Only the backbone is written; the regressor is discarded. ``pretrained_cfg`` tells the truth about training: the
student's input size and mean/std, a tag, and a description naming the teacher, blocks and timesteps. Reload with
``timm.create_model('local-dir:OUT', pretrained=True, num_classes=K)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .atomic import atomic_dir, atomic_write_json
from .rundir import load_trained


def export_student(run_dir: str, out: str, checkpoint: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write the student of ``run_dir`` (latest checkpoint unless ``checkpoint``) to ``out`` in timm format."""
    import timm.models

    out_p = Path(out)
    if out_p.is_file() or (out_p.is_dir() and any(out_p.iterdir())):
        if not overwrite:
            raise FileExistsError(f"export target '{out_p}' already exists; pass --overwrite to replace it or choose "
                                  f"another --out.")
    model, recipe, resolved = load_trained(run_dir, checkpoint)
    backbone = model.student.model
    S = recipe.student_size
    teacher = recipe.teacher if isinstance(recipe.teacher, str) else "UNet2DModel(config dict)"
    step = Path(resolved["checkpoint"]).name.split("-")[-1]
    timesteps = resolved.get("timesteps_used", recipe.timesteps)  # what the run used (auto modes resolved)
    description = (f"{recipe.student} distilled with distill from teacher {teacher} (blocks {recipe.teacher_blocks}, "
                   f"timesteps {timesteps}) on {recipe.dataset} for {step} steps at {S}px.")
    tag = f"distill-{Path(str(teacher)).name}-{recipe.dataset}"
    data_config = {"input_size": (3, S, S), "mean": tuple(resolved["mean"]), "std": tuple(resolved["std"]),
                   "crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center"}
    model_config = {"pretrained_cfg": {"tag": tag, "description": description, "license": "same as teacher and data",
                                       "notes": (description,)}}
    with atomic_dir(out_p, replace=overwrite) as tmp:
        timm.models.save_for_hf(backbone, str(tmp), model_config=model_config, data_config=data_config,
                                safe_serialization=True)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["distill"] = {  # extra top-level key: timm ignores it, people and tools can read it
            "teacher": teacher, "teacher_blocks": recipe.teacher_blocks, "timesteps": timesteps,
            "dataset": recipe.dataset, "data_root": recipe.data_root, "steps": int(step), "student_size": S,
            "data_channels": resolved["data_channels"],
            "run_dir": str(Path(run_dir).resolve()), "checkpoint": resolved["checkpoint"],
        }
        atomic_write_json(cfg_path, cfg)
    return out_p


def export_data_root(distill_meta: dict, dataset: str) -> Optional[str]:
    """The data root an export was distilled on (its config.json 'distill' key), when the dataset is the same and the
    folder exists here; else None (the dataset's default, or an error asking for --data-root)."""
    root = distill_meta.get("data_root")
    if root and distill_meta.get("dataset") == dataset and Path(root).expanduser().is_dir():
        return str(Path(root).expanduser())
    return None


def load_exported(path: str, num_classes: int = 0):
    """``timm.create_model('local-dir:PATH', pretrained=True, num_classes=...)`` with a clear error for a bad path."""
    import timm

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"'{p}' is not an exported student (no config.json); run `distill export` first.")
    return timm.create_model(f"local-dir:{p}", pretrained=True, num_classes=num_classes)
