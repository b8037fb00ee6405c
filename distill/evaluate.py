"""Probe backbones on a labelled dataset: an exported student, a student in training, a random-init baseline
or raw pixels, each under the same linear (BN + Linear) and kNN (cosine, k=20) protocol of ``distill.probe``."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .atomic import atomic_write_json
from .data import build_dataset, collate, dataset_mean_std, label_subset, to_student, to_unit
from .export import export_data_root, load_exported, read_export
from .integrity import read_json
from .probe import eval_device, extract_features, knn_probe, linear_probe
from .rundir import load_trained
from .student import Student
from .vocab import dataset_channels

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
    """uint8 batch ``[B, C, H, W]`` -> pooled features ``[B, D]`` of a timm backbone built with ``num_classes=0``;
    the model moves to the device of the images it is given (where :func:`probe_fn` runs)."""
    model.eval()

    def fn(images: torch.Tensor) -> torch.Tensor:
        p = next(model.parameters(), None)
        if p is not None and p.device != images.device:
            model.to(images.device)
        return model(to_student(to_unit(images), size, mean, std))  # (B, D)

    return fn


def pixels_fn(images: torch.Tensor) -> torch.Tensor:
    """Raw pixels in [0, 1], flattened: the linear-classifier-on-pixels baseline."""
    return to_unit(images).flatten(1)  # (B, C*H*W)


def probe_fn(fn: Callable, data: ProbeData, batch_size: int = 256, epochs: int = 30, k: int = 20, seed: int = 0,
             device=None, progress: bool = True, name: str = "model") -> dict:
    """Linear and kNN probe of features ``fn(images)`` on ``data``; returns accuracies in percent and the
    ``device`` the features were extracted and the probes trained on (``device``, default
    :func:`distill.probe.eval_device`: Accelerate's, a GPU when there is one)."""
    t0 = time.time()
    device = eval_device(device)
    kw = dict(batch_size=batch_size, collate_fn=collate, shuffle=False)
    tr_x, tr_y = extract_features(fn, DataLoader(data.train, **kw), device, desc=f"{name}: train features",
                                  progress=progress)
    te_x, te_y = extract_features(fn, DataLoader(data.test, **kw), device, desc=f"{name}: test features",
                                  progress=progress)
    lin = linear_probe(tr_x, tr_y, te_x, te_y, epochs=epochs, seed=seed, device=device)
    knn = knn_probe(tr_x, tr_y, te_x, te_y, k=k, device=device)
    return {"name": name, "linear_top1": round(lin["top1"], 2), "linear_top5": round(lin["top5"], 2),
            "knn_top1": round(knn["top1"], 2), "knn_top5": round(knn["top5"], 2), "k": k, "dim": lin["dim"],
            "num_train": lin["num_train"], "num_test": len(te_y), "seconds": round(time.time() - t0, 1),
            "device": str(device)}


def probe_exported(path: str, data: ProbeData, **kwargs) -> dict:
    """Probe a student exported by ``distill export`` with the input size and mean/std of its pretrained_cfg."""
    model = load_exported(path)
    cfg = model.pretrained_cfg
    return probe_fn(backbone_fn(model, cfg["input_size"][-1], cfg["mean"], cfg["std"]), data,
                    name=kwargs.pop("name", Path(path).name), **kwargs)


def probe_random_init(student: str, size: int, mean, std, data: ProbeData, seed: int = 0,
                      model_kwargs: Optional[dict] = None, **kwargs) -> dict:
    """The same student architecture at random init, same input pipeline: the baseline distillation must beat."""
    torch.manual_seed(seed)
    model = Student(student, size, model_kwargs=model_kwargs).model
    return probe_fn(backbone_fn(model, size, mean, std), data, name=kwargs.pop("name", f"{student} (random init)"),
                    **kwargs)


def resolve_probe_target(model: str) -> tuple:
    """``(kind, value)`` of a probe target: ``('exported', dir)``, ``('run', dir)``, ``('timm', name)`` (random
    init) or ``('teacher', name_or_dir)``.

    Raises:
        FileNotFoundError: none of these, with the forms that are accepted.
    """
    if model.startswith("timm:"):
        return "timm", model[5:]
    if model.startswith("teacher:"):
        return "teacher", model[8:]
    p = Path(model)
    if (p / "config.json").is_file():
        return "exported", p
    if (p / "config.yaml").is_file():
        return "run", p
    raise FileNotFoundError(
        f"cannot probe {model!r}: give an exported student directory (config.json), a run directory "
        f"(config.yaml), timm:NAME for a random-init baseline, or teacher:NAME_OR_DIR (a packaged name, directory, hub "
        f"id, python:module:factory, or a recipe .yaml whose teacher keys are used) for a diffusion teacher's own "
        f"pooled features."
    )


def probe_model(kind: str, target, dataset: Optional[str] = None, data_root: Optional[str] = None, size: int = 64,
                train_fraction: float = 1.0, pixels: bool = False, seed: int = 0, **kw) -> list[dict]:
    """Linear + kNN probe rows of a student target (see :func:`resolve_probe_target`; not a teacher), and of raw
    pixels with ``pixels``. The dataset defaults to the run's or the export's, else Fashion-MNIST; ``kw`` go to
    :func:`probe_fn` (epochs, k, progress)."""
    mean = std = None
    channels = 3
    if kind == "run":
        model, recipe, resolved = load_trained(str(target))
        size, mean, std = recipe.student_size, resolved["mean"], resolved["std"]
        dataset, data_root, channels = dataset or recipe.dataset, data_root or recipe.data_root, resolved["data_channels"]
    elif kind == "exported":
        d = read_export(str(target)).get("distill", {})
        dataset, channels = dataset or d.get("dataset"), d.get("data_channels", channels)
        data_root = data_root or export_data_root(d, dataset)
    dataset = dataset or "fashion-mnist"
    data = probe_data(dataset, data_root, dataset_channels(dataset, channels), train_fraction, seed)
    kw["seed"] = seed
    if kind == "exported":
        rows = [probe_exported(str(target), data, **kw)]
    elif kind == "run":
        rows = [probe_fn(backbone_fn(model.student.model, size, mean, std), data, name=f"{target} (run)", **kw)]
    else:
        mean, std = dataset_mean_std(data.train)
        rows = [probe_random_init(target, size, mean, std, data, **kw)]
    if pixels:
        rows.append(probe_fn(pixels_fn, data, name="raw pixels (linear on [0,1] pixels)", **kw))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of probe results."""
    lines = ["| model | linear top-1 | kNN top-1 | linear top-5 | feature dim | probe train / test images |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['linear_top1']:.2f} | {r['knn_top1']:.2f} (k={r['k']}) | "
                     f"{r['linear_top5']:.2f} | {r['dim']} | {r['num_train']} / {r['num_test']} |")
    devices = sorted({r["device"] for r in rows if r.get("device")})
    if devices:
        lines.append(f"\nfeatures extracted and probes trained on {', '.join(devices)}")
    return "\n".join(lines)


#: the probe rows of a ``distill run`` directory (:func:`save_results`, :func:`read_results`)
RESULTS_FILE = "results.json"


def save_results(rows: list[dict], path: Path, extra: Optional[dict] = None) -> None:
    """``{"results": rows, **extra}`` as JSON (atomically)."""
    atomic_write_json(path, {"results": rows, **(extra or {})})


def read_results(path: Path) -> dict:
    """A ``results.json`` written by :func:`save_results` (a bare list of rows, as ``distill probe --json``
    writes, is read as ``{"results": rows}``).

    Raises:
        UnreadableFileError / OSError: missing, empty or not JSON (named). ValueError: no ``results`` list.
    """
    data = read_json(path)
    if isinstance(data, list):
        data = {"results": data}
    if not isinstance(data, dict) or not isinstance(data.get("results", []), list):
        raise ValueError("not a `distill run` results.json ({'results': [...]})")
    return data
