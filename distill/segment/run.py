"""Segmentation fine-tuning: `SegmentationTask` on the one loop (`distill.tune.fit`) and
`segment_finetune`, one run: a backbone + decoder trained for a fixed number of steps on a seeded fraction of
the training masks; ``result.json`` (mIoU, per-class IoU, pixel accuracy on the whole evaluation split),
``train_log.csv``, ``predictions.png`` and, with ``save_model``, ``model/``.

The loop's pieces are shared with classification (`distill.tune`: the step sampler, so 10% and 100% of the
masks get the same budget and a distilled run and its scratch baseline seeded alike see the same images in the same
order; the optimizer and schedule; the output directory), and so is the model source (`distill.finetune.model`:
an export, ``timm:NAME`` with ``--like``). Joint image + mask augmentation on its own RNG stream (the same crops and
flips for both arms); cross-entropy ignores ``ignore_index`` pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic import atomic_dir, atomic_write_json
from ..augment import SeededAugment, build_joint_augment
from ..data import to_unit
from ..finetune.model import default_label, parse_model_source, read_export_config
from ..logs import count
from ..plots import segmentation_grid
from ..tune import GRID_FILE, MODEL_TAG, Task, fit
from .config import SegmentConfig
from .data import collate_pairs, resize_image, resize_mask, seg_data
from .metrics import SegMetrics
from .model import SegModel, TeacherBackbone, build_decoder, timm_backbone


def resize_pair(images: torch.Tensor, masks: torch.Tensor, height: Optional[int]):
    """Resize a batch to ``height`` px high, keeping the aspect: images bilinear (antialiased), masks nearest-exact
    (`distill.data.masks`). ``images [B, C, H, W]`` float, ``masks [B, H, W]`` int64; ``height=None`` returns
    them unchanged."""
    if height is None or images.shape[-2] == height:
        return images, masks
    w = max(1, round(images.shape[-1] * height / images.shape[-2]))
    return resize_image(images, (height, w)), resize_mask(masks, (height, w))


def _build_model(cfg: SegmentConfig, like_config: Optional[dict], num_classes: int, img_size: Optional[int] = None):
    """The SegModel and a description of its backbone (kind, name, mean/std)."""
    if cfg.model.startswith("teacher:"):
        from ..teacher import load_teacher

        name = cfg.model[len("teacher:"):]
        teacher = load_teacher(name, blocks=list(cfg.blocks), timesteps=list(cfg.timesteps or [11]))
        backbone = TeacherBackbone(teacher)
        info = {"kind": "teacher", "name": name, "mean": None, "std": None, "features": backbone.keys}
        freeze = True
    else:
        source = parse_model_source(cfg.model)
        ref = source.config if source.kind == "exported" else (like_config or {})
        pcfg = ref.get("pretrained_cfg", {})
        mean = list(cfg.mean or pcfg.get("mean") or (0.485, 0.456, 0.406))
        std = list(cfg.std or pcfg.get("std") or (0.229, 0.224, 0.225))
        mean, std = (mean * 3 if len(mean) == 1 else mean), (std * 3 if len(std) == 1 else std)
        backbone = timm_backbone(source, cfg.levels, like_config, mean, std, img_size)
        info = {"kind": source.kind, "name": source.name, "mean": mean, "std": std,
                "label": default_label(source), "reductions": backbone.reductions}
        freeze = cfg.freeze_backbone
    decoder = build_decoder(cfg.decoder, backbone.channels, num_classes, cfg.decoder_width)
    return SegModel(backbone, decoder, freeze_backbone=freeze), info


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader, num_classes: int, ignore_index: int, height: Optional[int] = None,
                          accelerator=None) -> dict:
    """mIoU, per-class IoU and pixel accuracy (`SegMetrics`) of ``model`` on every batch of ``loader``
    (``(uint8 images, int64 masks)``); the masks are compared at ``height`` (default: their own size). With several
    processes each one scores its own batches (batches of different image sizes cannot be gathered) and the
    confusion matrices, class presence and counts are summed over processes."""
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    metrics = SegMetrics(num_classes, ignore_index)
    n = 0
    for images, masks in loader:  # with several processes: this process's share of the batches
        x, y = resize_pair(to_unit(images.to(device)), masks.to(device), height)
        pred = model(x).argmax(1)  # (B, H, W)
        metrics.update(pred, y)
        n += y.shape[0]
    model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:  # sum over processes: each image counted once
        n = metrics.sum_over_processes(accelerator, n)
    return {**metrics.compute(), "images": n}


class SegmentationTask(Task):
    """Semantic segmentation: a backbone (export, ``timm:NAME`` or a frozen ``teacher:NAME``) + a decoder, a seeded
    fraction of the training images with their masks, cross-entropy ignoring ``ignore_index``, mIoU on the whole
    evaluation split."""

    name, target, train_metric, score = "segmentation", "masks", "pixel_acc", "miou"
    config_class, entry = SegmentConfig, "distill.segment.segment_finetune"

    def __init__(self, cfg: SegmentConfig):
        super().__init__(cfg)
        self.like_config = read_export_config(Path(cfg.like).expanduser(), "like") if cfg.like else None

    def load_data(self) -> None:
        cfg = self.cfg
        self.data = seg_data(cfg.data_root, cfg.layout, cfg.fraction, cfg.seed, cfg.num_classes, cfg.ignore_index,
                             cfg.eval_split, cfg.class_names, cfg.size, cfg.mask_threshold)
        self.train, self.test = self.data.train, self.data.test

    def collate(self, batch):
        """Training batches: each pair cropped or padded (with the ignore index) to the training size."""
        return self.data.collate_train(batch)

    shards_evaluation = True  # batches of different image sizes cannot be gathered: confusion matrices are summed

    def eval_loader_options(self, rank: int = 0, world: int = 1) -> dict:
        """Images of one size per batch, each scored at its own (resized) size; process ``rank`` of ``world`` takes
        every ``world``-th batch, so every image is scored once over all processes."""
        batches = self.data.eval_batches(self.cfg.eval_batch_size)
        return {"batch_sampler": batches[rank::world], "collate_fn": collate_pairs}

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)  # backbone (scratch) and decoder init: the same decoder for both arms
            model, self.info = _build_model(self.cfg, self.like_config, self.cfg.num_classes,
                                            self.data.train_size[0])
        self.label = self.cfg.label or self.info.get("label") or f"teacher {self.info['name']}"
        return model

    def make_augment(self, device) -> None:
        cfg = self.cfg
        h0, w0 = self.train[0][0].shape[-2:]
        self.size = (h0, w0) if cfg.size is None else (cfg.size, max(1, round(w0 * cfg.size / h0)))
        aug = build_joint_augment(cfg.augment, self.size, cfg.scale_min)
        self.augment = SeededAugment(aug.to(device), cfg.seed, device) if aug is not None else None

    def inputs(self, batch, device):
        x, y = resize_pair(to_unit(batch[0].to(device)), batch[1].to(device), self.cfg.size)  # (B, 3, H, W), (B, H, W)
        return self.augment(x, y) if self.augment is not None else (x, y)

    def loss(self, logits, masks):
        return F.cross_entropy(logits, masks, ignore_index=self.cfg.ignore_index,
                               label_smoothing=self.cfg.label_smoothing)

    def batch_stats(self, logits, masks):
        valid = masks != self.cfg.ignore_index
        return ((logits.argmax(1) == masks) & valid).sum().float(), valid.sum().float()

    def evaluate(self, model, batches, accelerator) -> dict:
        cfg = self.cfg
        return evaluate_segmentation(model, batches, cfg.num_classes, cfg.ignore_index, cfg.size, accelerator)

    def history_row(self, r: dict) -> dict:
        return {"miou": r["miou"], "pixel_acc": r["pixel_acc"]}

    def eval_line(self, step: int, r: dict) -> str:
        return f"step {step}: {self.data.eval_split} mIoU {r['miou']:.2f}  pixel acc {r['pixel_acc']:.2f}"

    def result(self, last, best) -> dict:
        cfg, info, data = self.cfg, self.info, self.data
        r = {"model_kind": info["kind"], "architecture": info["name"], "dataset": f"segmentation:{cfg.layout}",
             "data_root": str(cfg.data_root), "eval_split": data.eval_split, "num_classes": cfg.num_classes,
             "ignore_index": cfg.ignore_index, "mask_threshold": cfg.mask_threshold, "size": cfg.size,
             "classes": list(data.classes), "scale_min": cfg.scale_min,
             "decoder": cfg.decoder, "decoder_width": cfg.decoder_width,
             "freeze_backbone": bool(info["kind"] == "teacher" or cfg.freeze_backbone), "backbone": info,
             "input_size": [int(self.size[0]), int(self.size[1])], "mean": info["mean"], "std": info["std"],
             "train_images_total": data.full_train_size}
        if last is not None:
            r.update(test_images=last["images"], last_miou=last["miou"], last_miou_present=last["miou_present"],
                     last_pixel_acc=last["pixel_acc"], per_class_iou=dict(zip(data.classes, last["per_class_iou"])),
                     absent_classes=last["absent_classes"], best_miou=best["miou"], best_step=best["step"])
        return r

    def write_extras(self, model, out: Path, device) -> None:
        if self.cfg.grid_images:
            _write_grid(model, self.data, self.cfg, out / GRID_FILE, device)

    def save_model(self, model, path: Path, result: dict) -> None:
        _save_model(model, path, result, self.data.palette)


def segment_finetune(cfg: SegmentConfig, output_dir: str, overwrite: bool = False, accelerator=None,
                     progress: bool = True, callback: Optional[Callable[[dict], None]] = None) -> dict:
    """Train ``cfg.model`` + a decoder on a seeded ``cfg.fraction`` of the training masks for ``cfg.steps`` steps;
    evaluate on the whole ``cfg.eval_split`` (`SegmentationTask` on `distill.tune.fit`). Returns the
    result dict (also written to ``OUT/result.json``).

    ``callback`` is called before every update with ``{'step', 'inputs' [B, 3, H, W] in [0, 1], 'masks' [B, H, W],
    'lr'}`` (tests: the same batches and augmentation for two models).

    Raises:
        ValueError: a bad setting (`SegmentConfig.validate`), bad data (an unpaired, colour, out-of-range or
            wrongly sized mask, named), an unknown timm model.
        FileNotFoundError: the data, ``--model`` or ``--like`` is missing.
        FileExistsError: ``output_dir`` holds a result and ``overwrite`` is False, or files distill did not write;
            RunLockedError: another fine-tune runs there.
        WriteError: an output could not be written (``result.json`` is kept when the model write fails).
        NonFiniteLossError: the loss became NaN or Inf. TrainingInterrupted: SIGTERM / SIGINT (after the result).
    """
    return fit(SegmentationTask(cfg), output_dir, overwrite=overwrite, accelerator=accelerator, progress=progress,
               callback=callback)


@torch.no_grad()
def _write_grid(model: nn.Module, data, cfg: SegmentConfig, path: Path, device) -> None:
    n = min(cfg.grid_images, len(data.test))
    images, masks = data.grid_pairs(n)
    x, y = resize_pair(to_unit(images.to(device)), masks.to(device), cfg.size)
    model.eval()
    pred = model(x).argmax(1)
    segmentation_grid((x * 255).round().byte().cpu(), y.cpu(), pred.cpu(), data.palette, cfg.ignore_index, path,
                      title=f"{cfg.label or cfg.model}: {data.eval_split} images, ground truth, prediction",
                      class_names=data.classes)


def _save_model(model: nn.Module, path: Path, result: dict, palette) -> None:
    """``model/config.json`` (how to rebuild it) + ``model/model.safetensors`` (the whole SegModel's state dict)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {"pretrained_cfg": {"tag": f"{MODEL_TAG}segmentation",
                                 "description": f"{result['label']} fine-tuned for segmentation by distill "
                                                f"({result['fraction']:g} of the masks, seed {result['seed']}, "
                                                f"{count(result['steps'], 'step')})."},
              "segmentation": {k: result[k] for k in ("model", "architecture", "like", "decoder", "decoder_width",
                                                      "num_classes", "ignore_index", "classes", "input_size", "mean",
                                                      "std", "backbone")},
              "palette": [list(c) for c in palette]}
    needed = sum(t.numel() * t.element_size() for t in state.values())
    with atomic_dir(path, replace=True, what="the fine-tuned segmentation model", needed=needed) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        atomic_write_json(tmp / "config.json", config)
