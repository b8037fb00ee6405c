"""Classification fine-tuning: `ClassificationTask` on the one loop (`distill.tune.fit`) and
`finetune`, one run; `evaluate` gives top-1/top-5 on a loader.

Cross-entropy (label smoothing), kornia augmentation on its own RNG stream, ``to_student`` (size, mean/std), the
optimizer's layer decay and backbone lr factor; top-1/top-5 on the full test split every ``eval_every`` steps and
at the end. With ``save_model`` the model is written in timm format (``timm.create_model('local-dir:OUT/model')``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..atomic import atomic_dir
from ..augment import SeededAugment, build_augment
from ..data import FASHION_MNIST_CLASSES, collate, to_student, to_unit
from ..errors import option
from ..export import export_data_root
from ..logs import count
from ..tune import LOG_FILE, MODEL_DIR, MODEL_TAG, RESULT_FILE, Task, fit, machine_description  # noqa: F401
from ..tune import check_output_dir, prepare_output_dir, saved_model_problem  # noqa: F401 (imported from here before)
from ..vocab import dataset_channels
from .config import FinetuneConfig
from .data import finetune_data
from .model import build_model, default_label, parse_model_source, read_export_config, resolve_preprocessing

_logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model: nn.Module, loader, size: int, mean, std, num_classes: int, accelerator=None) -> dict:
    """Top-1 / top-5 (micro, ``MulticlassAccuracy``) in percent of ``model`` on every batch of ``loader`` (``(uint8
    images [B, C, H, W], int64 labels [B])``), each image once over all processes (``gather_for_metrics``)."""
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


class ClassificationTask(Task):
    """Image classification with a new head: an export or ``timm:NAME`` (``--like`` copies an export's size and
    mean/std), a seeded stratified label subset, cross-entropy, top-1/top-5."""

    name, target, train_metric, score = "classification", "labels", "batch_top1", "top1"
    config_class, entry = FinetuneConfig, "distill.finetune"

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        self.source = parse_model_source(cfg.model)
        like = read_export_config(Path(cfg.like).expanduser(), "like") if cfg.like else None
        if like and self.source.kind == "exported":
            _logger.warning(f"{option('like')} is for timm:NAME runs; %s keeps its own input size and mean/std",
                            cfg.model)
        if like and self.source.kind == "timm" and like.get("architecture") != self.source.name:
            _logger.warning(f"{option('like')} %s is a %s, not %s: only its input size and mean/std are copied",
                            cfg.like, like.get("architecture"), self.source.name)
        self.like_config = like
        d = (self.source.config if self.source.kind == "exported" else (like or {})).get("distill", {})
        self.dataset = cfg.dataset or d.get("dataset") or "fashion-mnist"
        self.channels = dataset_channels(self.dataset, d.get("data_channels"))
        self.data_root = cfg.data_root or export_data_root(d, self.dataset)
        self.label = cfg.label or default_label(self.source)

    def load_data(self) -> None:
        cfg = self.cfg
        self.data = finetune_data(self.dataset, self.data_root, cfg.fraction, cfg.seed, self.channels, cfg.test_root)
        self.train, self.test = self.data.train, self.data.test
        self.size, self.mean, self.std, self.prep_origin = resolve_preprocessing(cfg, self.source, self.like_config,
                                                                                 self.data.full_train)

    def collate(self, batch):
        return collate(batch)

    def build_model(self) -> nn.Module:
        return build_model(self.source, self.data.num_classes, self.size, self.like_config, self.cfg.seed)

    def optimizer_options(self) -> dict:
        return {"layer_decay": self.cfg.layer_decay, "backbone_lr_mult": self.cfg.backbone_lr_mult}

    def make_augment(self, device) -> None:
        native = self.train[0][0].shape[-1]
        self.augment = SeededAugment(build_augment(self.cfg.augment, native).to(device), self.cfg.seed, device)

    def inputs(self, batch, device):
        images, labels = batch[0].to(device), batch[1].to(device)
        return to_student(self.augment(to_unit(images)), self.size, self.mean, self.std), labels  # (B, 3, S, S)

    def loss(self, logits, labels):
        return F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)

    def batch_stats(self, logits, labels):
        return (logits.argmax(1) == labels).sum().float(), torch.tensor(float(labels.shape[0]), device=labels.device)

    def evaluate(self, model, batches, accelerator) -> dict:
        return evaluate(model, batches, self.size, self.mean, self.std, self.data.num_classes, accelerator)

    def history_row(self, r: dict) -> dict:
        return {"top1": r["top1"], "top5": r["top5"]}

    def eval_line(self, step: int, r: dict) -> str:
        return f"step {step}: test top-1 {r['top1']:.2f}  top-{r['top5_k']} {r['top5']:.2f}"

    def result(self, last, best) -> dict:
        cfg, data = self.cfg, self.data
        r = {"model_kind": self.source.kind, "architecture": self.source.name, "dataset": self.dataset,
             "data_root": self.data_root, "num_classes": data.num_classes,
             "layer_decay": cfg.layer_decay, "backbone_lr_mult": cfg.backbone_lr_mult,
             "input_size": self.size, "mean": self.mean, "std": self.std, "preprocessing_from": self.prep_origin,
             "train_images_total": data.train_full_size}
        if last is not None:
            r.update(test_images=last["images"], top5_k=last["top5_k"], best_top1=best["top1"],
                     best_top5=best["top5"], best_step=best["step"], last_top1=last["top1"], last_top5=last["top5"])
        return r

    def after_training(self, model, result: dict, accelerator, batches) -> None:
        if not self.cfg.eval_train:
            return
        loader = accelerator.prepare_data_loader(
            DataLoader(self.train, batch_size=self.cfg.eval_batch_size, shuffle=False, collate_fn=collate,
                       num_workers=self.cfg.num_workers), device_placement=True)
        r = evaluate(model, batches(loader, "evaluating the training subset"), self.size, self.mean, self.std,
                     self.data.num_classes, accelerator)
        result["train_top1"], result["train_top5"] = r["top1"], r["top5"]

    def save_model(self, model, path: Path, result: dict) -> None:
        import timm.models

        classes = self.data.classes or FASHION_MNIST_CLASSES
        desc = (f"{result['label']} fine-tuned by distill on {result['dataset']} ({result['fraction']:g} of the "
                f"labels, {count(result['train_images'], 'image')}, seed {result['seed']}, "
                f"{count(result['steps'], 'step')}).")
        model_config = {"pretrained_cfg": {"tag": f"{MODEL_TAG}{result['dataset']}", "description": desc}}
        if len(classes) == result["num_classes"]:
            model_config["label_names"] = list(classes)
        needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        with atomic_dir(path, replace=True, what="the fine-tuned model", needed=needed) as tmp:  # ours or absent
            timm.models.save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True,
                                    data_config={"input_size": (3, self.size, self.size), "mean": tuple(self.mean),
                                                 "std": tuple(self.std), "crop_pct": 1.0,
                                                 "interpolation": "bilinear", "crop_mode": "center"})


def finetune(cfg: FinetuneConfig, output_dir: str, overwrite: bool = False, accelerator=None,
             progress: bool = True, callback: Optional[Callable[[dict], None]] = None) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.dataset`` (`ClassificationTask` on `distill.tune.fit`); writes
    ``result.json`` and ``train_log.csv`` to ``output_dir``. Returns the result dict.

    ``callback`` (tests, custom logging) is called before every update with ``{'step', 'inputs', 'labels',
    'lr'}`` (``inputs``: the augmented, normalised batch the model sees).

    Raises:
        ValueError: a bad setting (`FinetuneConfig.validate`), unknown timm model, unlabelled data, or a batch
            size not divisible by the processes.
        FileNotFoundError: ``--model`` / ``--like`` is not an export, or the dataset is missing.
        FileExistsError: ``output_dir`` already holds a result and ``overwrite`` is False, or holds a
            ``result.json`` / ``model/`` that distill finetune did not write; RunLockedError: another fine-tune
            runs there.
        UnreadableFileError: the export's config.json or weights are damaged (named in the message).
        WriteError: an output could not be written (disk full, read-only, ...); ``result.json`` is kept when the
            model write fails.
        NonFiniteLossError: the loss became NaN or Inf (`distill.errors`).
        TrainingInterrupted: SIGTERM / SIGINT, after ``result.json`` (marked ``stopped``) was written.
    """
    return fit(ClassificationTask(cfg), output_dir, overwrite=overwrite, accelerator=accelerator, progress=progress,
               callback=callback)


def result_line(r: dict) -> str:
    """One line summing up a result dict: label, fraction, seed, steps, last and best top-1, top-k, seconds."""
    return (f"{r['label']}: fraction {r['fraction']:g} ({count(r['train_images'], 'image')}), seed {r['seed']}, "
            f"{count(r['steps'], 'step')}: last top-1 {r['last_top1']:.2f} (best {r['best_top1']:.2f} at step "
            f"{r['best_step']}), "
            f"top-{r['top5_k']} {r['last_top5']:.2f}, {r['seconds']:.0f}s")
