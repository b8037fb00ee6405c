"""Probe backbones on a labelled dataset: an exported student, a student in training, a random-init baseline
or raw pixels, each under the same linear (BN + Linear) and kNN (cosine, k=20) protocol of ``distill.probe``."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .data import build_dataset, collate, label_subset, to_student, to_unit
from .probe import extract_features, knn_probe, linear_probe

_logger = logging.getLogger(__name__)


@dataclass
class ProbeData:
    train: Dataset
    test: Dataset
    name: str


def probe_data(dataset: str, data_root: Optional[str], channels: int, train_fraction: float = 1.0,
               seed: int = 0) -> ProbeData:
    """Train split (a seeded stratified fraction of it) and test split of a labelled dataset."""
    train = label_subset(build_dataset(dataset, data_root, "train", channels), train_fraction, seed)
    test = build_dataset(dataset, data_root, "test", channels)
    return ProbeData(train, test, dataset)


def backbone_fn(model: nn.Module, size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """uint8 batch -> pooled features of a timm backbone built with ``num_classes=0``."""
    model.eval()

    def fn(images: torch.Tensor) -> torch.Tensor:
        return model(to_student(to_unit(images), size, mean, std))  # (B, D)

    return fn


def pixels_fn(images: torch.Tensor) -> torch.Tensor:
    """Raw pixels in [0, 1], flattened: the linear-classifier-on-pixels baseline."""
    return to_unit(images).flatten(1)  # (B, C*H*W)


def probe_fn(fn: Callable, data: ProbeData, batch_size: int = 256, epochs: int = 30, k: int = 20, seed: int = 0,
             device: str = "cpu", progress: bool = True, name: str = "model") -> dict:
    """Linear and kNN probe of features ``fn(images)`` on ``data``; returns accuracies in percent."""
    t0 = time.time()
    kw = dict(batch_size=batch_size, collate_fn=collate, shuffle=False)
    tr_x, tr_y = extract_features(fn, DataLoader(data.train, **kw), device, desc=f"{name}: train features",
                                  progress=progress)
    te_x, te_y = extract_features(fn, DataLoader(data.test, **kw), device, desc=f"{name}: test features",
                                  progress=progress)
    lin = linear_probe(tr_x, tr_y, te_x, te_y, epochs=epochs, seed=seed, device=device)
    knn = knn_probe(tr_x, tr_y, te_x, te_y, k=k)
    return {"name": name, "linear_top1": round(lin["top1"], 2), "linear_top5": round(lin["top5"], 2),
            "knn_top1": round(knn["top1"], 2), "knn_top5": round(knn["top5"], 2), "k": k, "dim": lin["dim"],
            "num_train": lin["num_train"], "num_test": len(te_y), "seconds": round(time.time() - t0, 1)}


def probe_exported(path: str, data: ProbeData, **kwargs) -> dict:
    """Probe a student exported by ``distill export`` with the input size and mean/std of its pretrained_cfg."""
    from .export import load_exported

    model = load_exported(path)
    cfg = model.pretrained_cfg
    return probe_fn(backbone_fn(model, cfg["input_size"][-1], cfg["mean"], cfg["std"]), data,
                    name=kwargs.pop("name", Path(path).name), **kwargs)


def probe_random_init(student: str, size: int, mean, std, data: ProbeData, seed: int = 0,
                      model_kwargs: Optional[dict] = None, **kwargs) -> dict:
    """The same student architecture at random init, same input pipeline: the baseline distillation must beat."""
    from .student import Student

    torch.manual_seed(seed)
    model = Student(student, size, model_kwargs=model_kwargs).model
    return probe_fn(backbone_fn(model, size, mean, std), data, name=kwargs.pop("name", f"{student} (random init)"),
                    **kwargs)


def format_table(rows: list[dict]) -> str:
    """Markdown table of probe results."""
    lines = ["| model | linear top-1 | kNN top-1 | linear top-5 | feature dim | probe train / test images |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['linear_top1']:.2f} | {r['knn_top1']:.2f} (k={r['k']}) | "
                     f"{r['linear_top5']:.2f} | {r['dim']} | {r['num_train']} / {r['num_test']} |")
    return "\n".join(lines)


def save_results(rows: list[dict], path: Path, extra: Optional[dict] = None) -> None:
    path.write_text(json.dumps({"results": rows, **(extra or {})}, indent=2) + "\n")
