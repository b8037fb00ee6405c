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
from .errors import option
from .export import export_data_root, load_exported, read_export
from .integrity import read_json
from .probe import eval_device, extract_features, knn_probe, linear_probe
from .rundir import load_trained
from .student import Student
from .vocab import dataset_channels

_logger = logging.getLogger(__name__)


@dataclass
class ProbeData:
    """The images a probe is fit on (``train``) and scored on (``test``). ``test_total``: images of the whole test
    split (None: ``len(test)``), of which ``test`` is a seeded stratified ``test_fraction`` (drawn with ``seed``)."""
    train: Dataset
    test: Dataset
    name: str
    test_total: Optional[int] = None
    test_fraction: float = 1.0
    seed: int = 0


def probe_data(dataset: str, data_root: Optional[str], channels: int, train_fraction: float = 1.0,
               seed: int = 0, test_fraction: float = 1.0) -> ProbeData:
    """Train split (a seeded stratified ``train_fraction`` of it) and test split (a seeded stratified
    ``test_fraction`` of it, e.g. 0.2 for a quick look; at least one image per class) of a labelled dataset. Test
    labels are paired with the training split's classes by name (``build_dataset(..., classes=...)``): a class the
    test split lacks is named in a warning, one the training split lacks is an error.

    Raises:
        ValueError: a fraction outside (0, 1]; the test split holds a class the training split lacks.
        DatasetNotFoundError: missing files or split.
    """
    for name, value in (("train", train_fraction), ("test", test_fraction)):
        key = f"{option(f'{name}_fraction')} / probe_{name}_fraction"
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(f"{name} fraction {value!r} ({key}) is outside (0, 1]; use e.g. 0.2 for a fifth of the "
                             f"{name} split, or 1.0 for all of it.")
    full = build_dataset(dataset, data_root, "train", channels)
    train = label_subset(full, train_fraction, seed)
    test = build_dataset(dataset, data_root, "test", channels, classes=getattr(full, "classes", None))
    return ProbeData(train, label_subset(test, test_fraction, seed), dataset, len(test), float(test_fraction), seed)


def tested_on(data: ProbeData) -> str:
    """``tested on 2,000 of 10,000 test images (test fraction 0.2, seed 0)``, or ``tested on all 10,000 test
    images``: what the probe rows of ``data`` were scored on."""
    total = len(data.test) if data.test_total is None else data.test_total
    if data.test_fraction >= 1.0:
        return f"tested on all {total:,} test images"
    return (f"tested on {len(data.test):,} of {total:,} test images (test fraction {data.test_fraction:g}, "
            f"seed {data.seed})")


def backbone_fn(model: nn.Module, size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """uint8 batch ``[B, C, H, W]`` -> pooled features ``[B, D]`` of a timm backbone built with ``num_classes=0``;
    the model moves to the device of the images it is given (where `probe_fn` runs)."""
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
             device=None, progress: bool = True, name: str = "model", weights: str = "live") -> dict:
    """Linear and kNN probe of features ``fn(images)`` on ``data``; returns accuracies in percent, the
    ``device`` the features were extracted and the probes trained on (``device``, default
    `distill.probe.eval_device`: Accelerate's, a GPU when there is one), which ``weights`` the model held
    (``live``, ``ema``, ``random init``, ``none`` for pixels) and what it was tested on (``num_test`` of
    ``num_test_total`` images, ``test_fraction``, the ``test`` line of `tested_on`). ``progress``:
    `distill.logs.progress` for feature extraction, the linear probe and the kNN probe."""
    t0 = time.time()
    device = eval_device(device)
    kw = dict(batch_size=batch_size, collate_fn=collate, shuffle=False)
    tr_x, tr_y = extract_features(fn, DataLoader(data.train, **kw), device, desc=f"{name}: train features",
                                  progress=progress)
    te_x, te_y = extract_features(fn, DataLoader(data.test, **kw), device, desc=f"{name}: test features",
                                  progress=progress)
    lin = linear_probe(tr_x, tr_y, te_x, te_y, epochs=epochs, seed=seed, device=device, progress=progress)
    knn = knn_probe(tr_x, tr_y, te_x, te_y, k=k, device=device, progress=progress)
    return {"name": name, "weights": weights, "linear_top1": round(lin["top1"], 2),
            "linear_top5": round(lin["top5"], 2), "knn_top1": round(knn["top1"], 2), "knn_top5": round(knn["top5"], 2),
            "k": k, "dim": lin["dim"], "num_train": lin["num_train"], "num_test": len(te_y),
            "num_test_total": len(te_y) if data.test_total is None else data.test_total,
            "test_fraction": data.test_fraction, "test": tested_on(data), "seconds": round(time.time() - t0, 1),
            "device": str(device)}


def probe_exported(path: str, data: ProbeData, **kwargs) -> dict:
    """Probe a student exported by ``distill export`` with the input size and mean/std of its pretrained_cfg."""
    model = load_exported(path)
    cfg = model.pretrained_cfg
    return probe_fn(backbone_fn(model, cfg["input_size"][-1], cfg["mean"], cfg["std"]), data,
                    name=kwargs.pop("name", Path(path).name), weights=export_weights(read_export(path)), **kwargs)


def export_weights(cfg: dict) -> str:
    """Which weights an export holds, from its ``config.json``: ``ema`` or ``live`` (distill's ``distill.weights``;
    an export written before it was recorded holds the live weights), ``unknown`` for a timm export of other
    origin."""
    d = cfg.get("distill")
    return str(d.get("weights") or "live") if isinstance(d, dict) else "unknown"


def probe_random_init(student: str, size: int, mean, std, data: ProbeData, seed: int = 0,
                      model_kwargs: Optional[dict] = None, **kwargs) -> dict:
    """The same student architecture at random init, same input pipeline: the baseline distillation must beat."""
    torch.manual_seed(seed)
    model = Student(student, size, model_kwargs=model_kwargs).model
    return probe_fn(backbone_fn(model, size, mean, std), data, name=kwargs.pop("name", f"{student} (random init)"),
                    weights="random init", seed=seed, **kwargs)


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
                train_fraction: float = 1.0, pixels: bool = False, seed: int = 0, test_fraction: float = 1.0,
                **kw) -> list[dict]:
    """Linear + kNN probe rows of a student target (see `resolve_probe_target`; not a teacher), and of raw
    pixels with ``pixels``. The dataset defaults to the run's or the export's, else Fashion-MNIST; the probes are
    scored on a seeded stratified ``test_fraction`` of its test split (`probe_data`); ``kw`` go to
    `probe_fn` (epochs, k, progress)."""
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
    data = probe_data(dataset, data_root, dataset_channels(dataset, channels), train_fraction, seed, test_fraction)
    kw["seed"] = seed
    if kind == "exported":
        rows = [probe_exported(str(target), data, **kw)]
    elif kind == "run":  # load_trained: the live weights of the newest checkpoint
        rows = [probe_fn(backbone_fn(model.student.model, size, mean, std), data, name=f"{target} (run)",
                         weights="live", **kw)]
    else:
        mean, std = dataset_mean_std(data.train)
        rows = [probe_random_init(target, size, mean, std, data, **kw)]
    if pixels:
        rows.append(probe_fn(pixels_fn, data, name="raw pixels (linear on [0,1] pixels)", weights="none", **kw))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of probe results: one row per model with the weights it held, then what the probes were tested
    on (each row's ``test`` line, once) and the device."""
    lines = ["| model | weights | linear top-1 | kNN top-1 | linear top-5 | feature dim | probe train / test images |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r.get('weights', '?')} | {r['linear_top1']:.2f} | {r['knn_top1']:.2f} "
                     f"(k={r['k']}) | {r['linear_top5']:.2f} | {r['dim']} | {r['num_train']} / {r['num_test']} |")
    tested = list(dict.fromkeys(r["test"] for r in rows if r.get("test")))
    if tested:
        lines.append("\n" + "; ".join(tested))
    devices = sorted({r["device"] for r in rows if r.get("device")})
    if devices:
        lines.append(f"\nfeatures extracted and probes trained on {', '.join(devices)}")
    return "\n".join(lines)


#: the probe rows of a ``distill run`` directory (`save_results`, `read_results`)
RESULTS_FILE = "results.json"


def save_results(rows: list[dict], path: Path, extra: Optional[dict] = None) -> None:
    """``{"results": rows, **extra}`` as JSON (atomically)."""
    atomic_write_json(path, {"results": rows, **(extra or {})})


def read_results(path: Path) -> dict:
    """A ``results.json`` written by `save_results` (a bare list of rows, as ``distill probe --json``
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
