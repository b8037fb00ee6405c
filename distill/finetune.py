"""Fine-tune a backbone on a labelled dataset with a fraction of the labels: an exported student or a timm model at
random init (the scratch baseline), under the same step budget, input pipeline, augmentation and schedule.

One run: ``build_dataset`` train split -> seeded stratified ``label_subset`` -> batches drawn from an endless
seeded shuffle (a fixed number of *steps*, so 1% and 100% of the labels get the same budget) -> kornia
augmentation on its own RNG stream -> ``to_student`` (size, mean/std) -> timm model with a new head ->
cross-entropy, timm optimizer factory, warmup + cosine -> top-1/top-5 on the full test split every
``eval_every`` steps and at the end. The run directory holds ``result.json`` (everything needed for a results
table), ``train_log.csv`` (training loss) and, with ``save_model``, the fine-tuned model in timm format.

A distilled student and its scratch baseline seeded alike see the same images in the same order with the same
augmentation draws and the same learning rate at every step; only the initial weights differ.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import build_augment
from .config import AUGMENTS
from .data import (FASHION_MNIST_CLASSES, build_dataset, collate, dataset_labels, dataset_mean_std, label_subset,
                   to_student, to_unit)

_logger = logging.getLogger(__name__)

FINETUNE_OPTIMIZERS = ("adamw", "sgd", "lamb")
MIXED_PRECISION = ("no", "fp16", "bf16")
RESULT_FILE = "result.json"
LOG_FILE = "train_log.csv"


@dataclass
class FinetuneConfig:
    """One fine-tuning run. ``model`` is an exported student directory or ``timm:NAME`` (random init)."""

    model: str
    dataset: Optional[str] = None  # default: the exported student's dataset, else fashion-mnist
    data_root: Optional[str] = None
    test_root: Optional[str] = None  # image-folder only; default: data_root (its test/ folder)
    fraction: float = 1.0  # of the training labels, stratified and seeded
    seed: int = 0  # subset, head init, data order and augmentation
    steps: int = 500  # optimizer steps: the same budget whatever the fraction
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    warmup_steps: int = 50
    augment: str = "crop-flip"
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # 0: no clipping
    eval_every: int = 100  # 0: evaluate only at the end
    eval_batch_size: int = 256
    log_every: int = 10
    size: Optional[int] = None  # input size; default: the export's, --like's, else 64
    mean: Optional[Sequence[float]] = None  # default: the export's, --like's, else the dataset's
    std: Optional[Sequence[float]] = None
    like: Optional[str] = None  # exported student whose size, mean/std (and model args) a timm:NAME run copies
    label: Optional[str] = None  # group name in reports; default '<arch> distilled' / '<arch> scratch'
    mixed_precision: str = "no"
    num_workers: int = 0
    eval_train: bool = False  # also report accuracy on the (unaugmented) labelled subset at the end
    save_model: bool = False  # write the fine-tuned model (with head) to OUT/model in timm format

    def validate(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or \
                not (0.0 < float(self.fraction) <= 1.0):
            raise ValueError(f"--fraction {self.fraction!r} is outside (0, 1]: give the share of training labels "
                             f"to use, e.g. 0.01 for 1%, 0.1 for 10% or 1.0 for all.")
        for name, lo in (("steps", 1), ("batch_size", 1), ("eval_batch_size", 1), ("log_every", 1),
                         ("warmup_steps", 0), ("eval_every", 0), ("num_workers", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {lo}; got {v!r}.")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0; got {self.lr!r}.")
        if self.weight_decay < 0 or self.grad_clip < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--weight-decay and --grad-clip must be >= 0 and --label-smoothing in [0, 1); got "
                             f"{self.weight_decay}, {self.grad_clip}, {self.label_smoothing}.")
        if self.optimizer not in FINETUNE_OPTIMIZERS:
            raise ValueError(f"--optimizer {self.optimizer!r} is not valid; valid: {', '.join(FINETUNE_OPTIMIZERS)}.")
        if self.augment not in AUGMENTS:
            raise ValueError(f"--augment {self.augment!r} is not valid; valid: {', '.join(AUGMENTS)}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed-precision {self.mixed_precision!r} is not valid; valid: "
                             f"{', '.join(MIXED_PRECISION)}.")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 8):
            raise ValueError(f"--size must be an integer >= 8; got {self.size!r}.")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) not in (1, 3):
                raise ValueError(f"--{name} takes 1 or 3 values (the model sees RGB); got {list(v)}.")
        if self.std is not None and any(float(s) <= 0 for s in self.std):
            raise ValueError(f"--std values must be > 0; got {list(self.std)}.")


# ----------------------------------------------------------------------------------------------- model source
@dataclass
class ModelSource:
    kind: str  # 'exported' or 'timm'
    name: str  # timm architecture
    path: Optional[Path] = None  # exported directory
    config: dict = field(default_factory=dict)  # the export's config.json


def _read_export_config(path: Path, arg: str) -> dict:
    if not path.exists():
        raise FileNotFoundError(
            f"{arg} '{path}' does not exist; give a directory written by `distill export` (config.json + "
            f"model.safetensors){' or timm:NAME for a random-init baseline' if arg == '--model' else ''}.")
    if not (path / "config.json").is_file():
        hint = ""
        if (path / "student" / "config.json").is_file():
            hint = f" Did you mean '{path / 'student'}'?"
        elif (path / "config.yaml").is_file():
            hint = f" It is a run directory: export it first with `distill export {path} --out {path / 'student'}`."
        raise FileNotFoundError(f"{arg} '{path}' is not an exported student (no config.json).{hint}")
    if not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise FileNotFoundError(f"{arg} '{path}' has config.json but no model.safetensors; re-run `distill export`.")
    return json.loads((path / "config.json").read_text())


def check_timm_name(name: str) -> None:
    """A clear error, with the closest names, for a model timm does not know."""
    import timm

    if name and timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Closest timm names: {', '.join(close)}." if close else ""
    raise ValueError(f"--model timm:{name}: timm has no model {name!r}.{hint} List them with "
                     f"`timm.list_models('resnet*')`.")


def parse_model_source(model: str) -> ModelSource:
    """``timm:NAME`` -> random init; anything else must be a directory written by ``distill export``."""
    if model.startswith("timm:"):
        name = model[len("timm:"):]
        check_timm_name(name)
        return ModelSource("timm", name)
    path = Path(model).expanduser()
    cfg = _read_export_config(path, "--model")
    return ModelSource("exported", cfg.get("architecture", "?"), path, cfg)


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
            from .export import load_exported

            return load_exported(str(source.path), num_classes=num_classes)
        kwargs = {}
        if like_config and like_config.get("architecture") == source.name:
            kwargs = {k: v for k, v in like_config.get("model_args", {}).items() if k != "num_classes"}
        elif source.name.startswith(("vit_", "deit_", "eva", "beit")):
            kwargs = {"img_size": size, "dynamic_img_size": True}  # as distill.student.Student builds ViTs
        return timm.create_model(source.name, pretrained=False, num_classes=num_classes, **kwargs)


# ----------------------------------------------------------------------------------------------- data
@dataclass
class FinetuneData:
    train: Dataset  # the labelled subset
    test: Dataset
    num_classes: int
    classes: tuple
    channels: int
    train_full_size: int
    full_train: Dataset


def export_data_root(distill_meta: dict, dataset: str) -> Optional[str]:
    """The data root an export was distilled on (its config.json 'distill' key), when the dataset is the same and the
    folder exists here; else None (the dataset's default, or an error asking for --data-root)."""
    root = distill_meta.get("data_root")
    if root and distill_meta.get("dataset") == dataset and Path(root).expanduser().is_dir():
        return str(Path(root).expanduser())
    return None


def finetune_data(dataset: str, data_root: Optional[str], fraction: float, seed: int, channels: int,
                  test_root: Optional[str] = None) -> FinetuneData:
    """Train subset (seeded, stratified ``fraction``), full test split and the number of classes."""
    full = build_dataset(dataset, data_root, "train", channels)
    labels = dataset_labels(full)
    if labels.numel() == 0 or (labels < 0).any():
        raise ValueError(
            f"dataset {dataset!r} at '{data_root}' has no labels (images directly in the folder, label -1): "
            f"fine-tuning needs class folders, ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg.")
    test = build_dataset(dataset, test_root or data_root, "test", channels)
    if dataset == "image-folder":
        if Path(test.root).resolve() == Path(full.root).resolve():
            raise ValueError(
                f"--data-root '{data_root}' has no test/ split, so the test images would be the training images; "
                f"give a folder with train/ and test/ class folders, or --test-root.")
        if tuple(test.classes) != tuple(full.classes):
            raise ValueError(f"test classes {list(test.classes)} differ from train classes {list(full.classes)}; "
                             f"the class folders of train/ and test/ must have the same names.")
    classes = tuple(getattr(full, "classes", ()) or ())
    num_classes = len(classes) or int(labels.max()) + 1
    test_labels = dataset_labels(test)
    if (test_labels < 0).any() or int(test_labels.max()) >= num_classes:
        raise ValueError(f"test labels must lie in [0, {num_classes}); got {int(test_labels.min())}.."
                         f"{int(test_labels.max())}.")
    train = label_subset(full, fraction, seed)
    return FinetuneData(train, test, num_classes, classes, channels, len(full), full)


class StepBatchSampler(Sampler):
    """Exactly ``steps`` batches of ``batch_size`` indices from an endless stream of seeded permutations.

    Batches run across epoch boundaries, so a subset smaller than a batch still gives full batches, and the
    image order depends only on ``(n, batch_size, seed)``. With ``world > 1`` each process takes its share
    ``batch[rank::world]`` of every global batch.
    """

    def __init__(self, n: int, batch_size: int, steps: int, seed: int, start: int = 0, rank: int = 0,
                 world: int = 1):
        if n < 1:
            raise ValueError("the labelled subset is empty.")
        self.n, self.batch_size, self.steps, self.seed = n, batch_size, steps, seed
        self.start, self.rank, self.world = start, rank, world

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed)
        buf: list[int] = []
        for step in range(self.steps):
            while len(buf) < self.batch_size:
                buf += torch.randperm(self.n, generator=g).tolist()
            batch, buf = buf[:self.batch_size], buf[self.batch_size:]
            if step >= self.start:
                yield batch[self.rank::self.world]


class SeededAugment:
    """Run an augmentation on its own RNG stream, so its draws do not depend on what else used the global RNG
    (model init, dropout): two runs with the same seed augment every batch identically."""

    def __init__(self, augment: nn.Module, seed: int, device: torch.device):
        self.augment, self.device = augment, torch.device(device)
        self._cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=self._cuda):
            torch.manual_seed(seed)
            self._state = self._get()

    def _get(self):
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self._cuda else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng(devices=self._cuda):
            torch.set_rng_state(self._state[0])
            if self._cuda:
                torch.cuda.set_rng_state(self._state[1], self.device)
            out = self.augment(x)
            self._state = self._get()
        return out


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader, size: int, mean, std, num_classes: int, accelerator=None) -> dict:
    """Top-1 / top-5 (micro, ``MulticlassAccuracy``) in percent of ``model`` on every batch of ``loader``."""
    from torchmetrics.classification import MulticlassAccuracy

    k5 = min(5, num_classes)
    top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
    top5 = MulticlassAccuracy(num_classes=num_classes, top_k=k5, average="micro")
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    n = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(to_student(to_unit(images), size, mean, std)).float()
        if accelerator is not None and accelerator.num_processes > 1:
            logits, labels = accelerator.gather_for_metrics((logits, labels))
        logits, labels = logits.cpu(), labels.cpu()
        top1.update(logits, labels)
        top5.update(logits, labels)
        n += labels.shape[0]
    model.train(was_training)
    return {"top1": round(100.0 * float(top1.compute()), 2), "top5": round(100.0 * float(top5.compute()), 2),
            "top5_k": k5, "images": n}


# ----------------------------------------------------------------------------------------------- run
def machine_description() -> str:
    import timm

    dev = "cpu"
    if torch.cuda.is_available():
        dev = f"cuda ({torch.cuda.get_device_name(0)})"
    return (f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, timm {timm.__version__}, device {dev}").replace("  ", " ")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


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


def _default_label(source: ModelSource) -> str:
    return f"{source.name} {'distilled' if source.kind == 'exported' else 'scratch'}"


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    if (out / RESULT_FILE).exists():
        if not overwrite:
            raise FileExistsError(f"'{out}' already holds a fine-tuning result ({RESULT_FILE}); pass --overwrite to "
                                  f"replace it or choose another --output-dir.")
        (out / RESULT_FILE).unlink()  # a run killed after this point must not leave the old result beside new logs
    if overwrite and (out / "model").exists():
        shutil.rmtree(out / "model")
    out.mkdir(parents=True, exist_ok=True)


def finetune(cfg: FinetuneConfig, output_dir: str, overwrite: bool = False, accelerator=None,
             progress: bool = True, callback: Optional[Callable[[dict], None]] = None) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.dataset``; writes ``result.json`` and ``train_log.csv`` to ``output_dir``.

    ``callback`` (tests, custom logging) is called before every update with ``{'step', 'inputs', 'labels',
    'lr'}`` (``inputs``: the augmented, normalised batch the model sees). Returns the result dict.
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from timm.optim import create_optimizer_v2
    from tqdm.auto import tqdm

    cfg.validate()
    t_start = time.time()
    source = parse_model_source(cfg.model)
    like_config = _read_export_config(Path(cfg.like).expanduser(), "--like") if cfg.like else None
    if like_config and source.kind == "exported":
        _logger.warning("--like is for timm:NAME runs; %s keeps its own input size and mean/std", cfg.model)
    if like_config and source.kind == "timm" and like_config.get("architecture") != source.name:
        _logger.warning("--like %s is a %s, not %s: only its input size and mean/std are copied", cfg.like,
                        like_config.get("architecture"), source.name)
    ref = source.config if source.kind == "exported" else (like_config or {})
    d = ref.get("distill", {})
    dataset = cfg.dataset or d.get("dataset") or "fashion-mnist"
    channels = 1 if dataset == "fashion-mnist" else int(d.get("data_channels", 3))
    out = Path(output_dir)
    if (out / RESULT_FILE).exists() and not overwrite:
        prepare_output_dir(out, overwrite)  # raises: fail before the data is read
    data_root = cfg.data_root or export_data_root(d, dataset)
    data = finetune_data(dataset, data_root, cfg.fraction, cfg.seed, channels, cfg.test_root)
    size, mean, std, prep_origin = resolve_preprocessing(cfg, source, like_config, data.full_train)

    if accelerator is None:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)  # as distill.trainer.train
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    if accelerator.is_main_process:
        prepare_output_dir(out, overwrite)
    accelerator.wait_for_everyone()
    device = accelerator.device

    model = build_model(source, data.num_classes, size, like_config, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    opt_kwargs = {"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}
    optimizer = create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, **opt_kwargs)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, cfg.steps), cfg.steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes.")
    sampler = StepBatchSampler(len(data.train), cfg.batch_size, cfg.steps, cfg.seed, rank=rank, world=world)
    train_loader = DataLoader(data.train, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers)
    test_loader = accelerator.prepare_data_loader(
        DataLoader(data.test, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate,
                   num_workers=cfg.num_workers), device_placement=True)
    native = data.train[0][0].shape[-1]
    augment = SeededAugment(build_augment(cfg.augment, native).to(device), cfg.seed, device)

    history: list[dict] = []  # one row per evaluation

    def run_eval(step: int, train_loss: float) -> dict:
        r = evaluate(model, test_loader, size, mean, std, data.num_classes, accelerator)
        history.append({"step": step, "top1": r["top1"], "top5": r["top5"], "train_loss": round(train_loss, 5),
                        "seconds": round(time.time() - t_train, 1)})
        if progress and accelerator.is_main_process:
            bar.write(f"step {step}: test top-1 {r['top1']:.2f}  top-{r['top5_k']} {r['top5']:.2f}")
        return r

    log_f = open(out / LOG_FILE, "w", newline="") if accelerator.is_main_process else None
    writer = csv.writer(log_f) if log_f else None
    if writer:
        writer.writerow(["step", "loss", "batch_top1", "lr", "img_per_s"])
    bar = tqdm(total=cfg.steps, desc=f"finetune {_default_label(source)} f={cfg.fraction:g} s={cfg.seed}",
               disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    model.train()
    t_train = time.time()
    log_loss, log_correct, log_n, log_steps = 0.0, 0.0, 0, 0
    eval_loss, eval_steps = 0.0, 0
    last_eval = None
    try:
        for step, (images, labels) in enumerate(train_loader, start=1):
            images, labels = images.to(device), labels.to(device)
            x = to_student(augment(to_unit(images)), size, mean, std)  # (B, 3, size, size)
            lr = scheduler.get_last_lr()[0]  # the rate this update uses
            if callback is not None:
                callback({"step": step, "inputs": x, "labels": labels, "lr": lr})
            logits = model(x).float()  # (B, num_classes)
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                from .trainer import NonFiniteLossError

                raise NonFiniteLossError(f"non-finite fine-tuning loss at step {step} ({loss.item()}); lower --lr.")
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats = torch.stack([loss.detach() * labels.shape[0], (logits.argmax(1) == labels).sum().float(),
                                 torch.tensor(float(labels.shape[0]), device=device)])
            if world > 1:
                stats = accelerator.reduce(stats, "sum")
            stats = stats.tolist()
            step_loss = stats[0] / stats[2]
            log_loss, log_correct, log_n, log_steps = log_loss + step_loss, log_correct + stats[1], log_n + stats[2], \
                log_steps + 1
            eval_loss, eval_steps = eval_loss + step_loss, eval_steps + 1
            if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
                if writer:
                    writer.writerow([step, round(log_loss / log_steps, 6), round(100.0 * log_correct / log_n, 2), lr,
                                     round(step * cfg.batch_size / (time.time() - t_train), 1)])
                    log_f.flush()
                bar.set_postfix(loss=f"{log_loss / log_steps:.4f}")
                log_loss, log_correct, log_n, log_steps = 0.0, 0.0, 0, 0
            bar.update(1)
            if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                last_eval = run_eval(step, eval_loss / max(eval_steps, 1))
                eval_loss, eval_steps = 0.0, 0
    finally:
        bar.close()
        if log_f:
            log_f.close()
    train_seconds = time.time() - t_train
    best = max(history, key=lambda r: (r["top1"], -r["step"]))
    unwrapped = accelerator.unwrap_model(model)
    result = {
        "label": cfg.label or _default_label(source),
        "model": cfg.model, "model_kind": source.kind, "architecture": source.name,
        "like": cfg.like, "dataset": dataset, "data_root": data_root, "num_classes": data.num_classes,
        "fraction": float(cfg.fraction), "seed": cfg.seed, "steps": cfg.steps, "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
        "momentum": cfg.momentum if cfg.optimizer == "sgd" else None, "warmup_steps": min(cfg.warmup_steps, cfg.steps),
        "schedule": "linear warmup + cosine to 0 (diffusers get_cosine_schedule_with_warmup)",
        "augment": cfg.augment, "label_smoothing": cfg.label_smoothing, "grad_clip": cfg.grad_clip,
        "input_size": size, "mean": mean, "std": std, "preprocessing_from": prep_origin,
        "train_images": len(data.train), "train_images_total": data.train_full_size,
        "train_images_seen": cfg.steps * cfg.batch_size,
        "epochs": round(cfg.steps * cfg.batch_size / len(data.train), 2), "test_images": last_eval["images"],
        "top5_k": last_eval["top5_k"],
        "best_top1": best["top1"], "best_top5": best["top5"], "best_step": best["step"],
        "last_top1": history[-1]["top1"], "last_top5": history[-1]["top5"],
        "final_train_loss": history[-1]["train_loss"],
        "history": history, "params": n_params, "eval_every": cfg.eval_every,
        "mixed_precision": cfg.mixed_precision, "num_processes": world,
        "train_seconds": round(train_seconds, 1), "seconds": None, "machine": machine_description(),
    }
    if cfg.eval_train:
        train_eval_loader = accelerator.prepare_data_loader(
            DataLoader(data.train, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate,
                       num_workers=cfg.num_workers), device_placement=True)
        r = evaluate(model, train_eval_loader, size, mean, std, data.num_classes, accelerator)
        result["train_top1"], result["train_top5"] = r["top1"], r["top5"]
    if cfg.save_model and accelerator.is_main_process:
        _save_model(unwrapped, out / "model", size, mean, std, data.classes or FASHION_MNIST_CLASSES, result)
    result["seconds"] = round(time.time() - t_start, 1)
    if accelerator.is_main_process:
        _write_json(out / RESULT_FILE, result)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return result


def _save_model(model: nn.Module, path: Path, size: int, mean, std, classes, result: dict) -> None:
    import timm.models

    tmp = path.with_name(f".tmp-{path.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    desc = (f"{result['label']} fine-tuned by distill on {result['dataset']} ({result['fraction']:g} of the labels, "
            f"{result['train_images']} images, seed {result['seed']}, {result['steps']} steps).")
    model_config = {"pretrained_cfg": {"tag": f"distill-finetune-{result['dataset']}", "description": desc}}
    if len(classes) == result["num_classes"]:
        model_config["label_names"] = list(classes)
    timm.models.save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True,
                            data_config={"input_size": (3, size, size), "mean": tuple(mean), "std": tuple(std),
                                         "crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center"})
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def run_dir_name(fraction: float, seed: int) -> str:
    return f"frac{float(fraction):g}-seed{seed}"


def finetune_sweep(cfg: FinetuneConfig, output_dir: str, fractions: Sequence[float], seeds: Sequence[int],
                   overwrite: bool = False, skip_existing: bool = False, progress: bool = True,
                   on_result: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """One run per (fraction, seed) in ``output_dir/frac{F}-seed{S}/``; everything is checked before the first
    run, so a bad fraction or an existing result fails at once instead of after hours."""
    if not fractions or not seeds:
        raise ValueError("--fractions and --seeds need at least one value each.")
    runs = [(f, s) for f in fractions for s in seeds]
    for f, s in runs:
        dataclasses.replace(cfg, fraction=f, seed=s).validate()
    if len(set(map(lambda r: run_dir_name(*r), runs))) != len(runs):
        raise ValueError(f"--fractions {list(fractions)} / --seeds {list(seeds)} contain duplicates.")
    out = Path(output_dir)
    existing = [run_dir_name(f, s) for f, s in runs if (out / run_dir_name(f, s) / RESULT_FILE).exists()]
    if existing and not (overwrite or skip_existing):
        raise FileExistsError(f"'{out}' already holds results for {', '.join(existing)}; pass --overwrite to replace "
                              f"them, --skip-existing to run only the missing ones, or choose another --output-dir.")
    results = []
    for f, s in runs:
        sub = out / run_dir_name(f, s)
        if skip_existing and not overwrite and (sub / RESULT_FILE).exists():
            r = json.loads((sub / RESULT_FILE).read_text())
        else:
            r = finetune(dataclasses.replace(cfg, fraction=f, seed=s), str(sub), overwrite=overwrite,
                         progress=progress)
        results.append(r)
        if on_result:
            on_result(r)
    return results


def result_line(r: dict) -> str:
    return (f"{r['label']}: fraction {r['fraction']:g} ({r['train_images']} images), seed {r['seed']}, {r['steps']} "
            f"steps: last top-1 {r['last_top1']:.2f} (best {r['best_top1']:.2f} at step {r['best_step']}), "
            f"top-{r['top5_k']} {r['last_top5']:.2f}, {r['seconds']:.0f}s")


__all__ = ["FinetuneConfig", "finetune", "finetune_sweep", "finetune_data", "build_model", "parse_model_source",
           "evaluate", "StepBatchSampler", "SeededAugment", "run_dir_name"]
