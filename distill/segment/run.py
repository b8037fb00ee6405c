"""One segmentation run: :func:`segment_finetune` trains a backbone + decoder for a fixed number of steps on a
seeded fraction of the training masks and writes ``result.json`` (mIoU, per-class IoU, pixel accuracy on the whole
evaluation split), ``train_log.csv``, ``predictions.png`` and, with ``save_model``, ``model/``.

The classification fine-tune's pieces are reused (:mod:`distill.finetune`): the model source (export, ``timm:NAME``
with ``--like``), the step sampler (a fixed number of steps, so 10% and 100% of the masks get the same budget and a
distilled run and its scratch baseline seeded alike see the same images in the same order), the augmentation on its
own RNG stream (the same crops and flips for both), the optimizer and warmup + cosine schedule (:mod:`distill.optim`)
and the output-directory safety. Cross-entropy ignores ``ignore_index`` pixels.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..atomic import atomic_dir, atomic_write_json, writing
from ..data import to_unit
from ..errors import NonFiniteLossError
from ..finetune.data import SeededAugment, StepBatchSampler
from ..finetune.model import default_label, parse_model_source, read_export_config
from ..finetune.run import LOG_FILE, MODEL_DIR, MODEL_TAG, RESULT_FILE, check_output_dir, machine_description, \
    prepare_output_dir
from ..optim import build_optimizer, build_scheduler
from ..plots import segmentation_grid
from .config import SegmentConfig
from .data import JointAugment, collate_pairs, resize_image, resize_mask, seg_data
from .metrics import SegMetrics
from .model import SegModel, TeacherBackbone, build_decoder, timm_backbone

GRID_FILE = "predictions.png"


def resize_pair(images: torch.Tensor, masks: torch.Tensor, height: Optional[int]):
    """Resize a batch to ``height`` px high, keeping the aspect: images bilinear (antialiased), masks nearest-exact
    (:mod:`distill.data.masks`). ``images [B, C, H, W]`` float, ``masks [B, H, W]`` int64; ``height=None`` returns
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
    """mIoU, per-class IoU and pixel accuracy (:class:`SegMetrics`) of ``model`` on every batch of ``loader``
    (``(uint8 images, int64 masks)``); the masks are compared at ``height`` (default: their own size)."""
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    metrics = SegMetrics(num_classes, ignore_index)
    n = 0
    for images, masks in loader:
        x, y = resize_pair(to_unit(images.to(device)), masks.to(device), height)
        pred = model(x).argmax(1)  # (B, H, W)
        if accelerator is not None and accelerator.num_processes > 1:
            pred, y = accelerator.gather_for_metrics((pred, y))
        metrics.update(pred, y)
        n += y.shape[0]
    model.train(was_training)
    return {**metrics.compute(), "images": n}


def segment_finetune(cfg: SegmentConfig, output_dir: str, overwrite: bool = False, accelerator=None,
                     progress: bool = True, callback: Optional[Callable[[dict], None]] = None) -> dict:
    """Train ``cfg.model`` + a decoder on a seeded ``cfg.fraction`` of the training masks for ``cfg.steps`` steps;
    evaluate on the whole ``cfg.eval_split``. Returns the result dict (also written to ``OUT/result.json``).

    ``callback`` is called before every update with ``{'step', 'inputs' [B, 3, H, W] in [0, 1], 'masks' [B, H, W],
    'lr'}`` (tests: the same batches and augmentation for two models).

    Raises:
        ValueError: a bad setting (:meth:`SegmentConfig.validate`), bad data (an unpaired, colour, out-of-range or
            wrongly sized mask, named), an unknown timm model.
        FileNotFoundError: the data, ``--model`` or ``--like`` is missing.
        FileExistsError: ``output_dir`` holds a result and ``overwrite`` is False, or files distill did not write.
        WriteError: an output could not be written. NonFiniteLossError: the loss became NaN or Inf.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg.validate()
    t_start = time.time()
    like_config = read_export_config(Path(cfg.like).expanduser(), "--like") if cfg.like else None
    out = Path(output_dir)
    check_output_dir(out, overwrite, cfg.save_model)
    data = seg_data(cfg.data_root, cfg.layout, cfg.fraction, cfg.seed, cfg.num_classes, cfg.ignore_index,
                    cfg.eval_split, cfg.class_names, cfg.size, cfg.mask_threshold)
    if accelerator is None:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    if accelerator.is_main_process:
        prepare_output_dir(out, overwrite, cfg.save_model)
    accelerator.wait_for_everyone()
    device = accelerator.device

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # backbone (scratch) and decoder init: the same decoder for both arms
        model, info = _build_model(cfg, like_config, cfg.num_classes, data.train_size[0])
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes.")
    sampler = StepBatchSampler(len(data.train), cfg.batch_size, cfg.steps, cfg.seed, rank=rank, world=world)
    train_loader = DataLoader(data.train, batch_sampler=sampler, collate_fn=data.collate_train,
                              num_workers=cfg.num_workers)
    test_loader = accelerator.prepare_data_loader(  # images of one size per batch, each at its own size
        DataLoader(data.test, batch_sampler=data.eval_batches(cfg.eval_batch_size), collate_fn=collate_pairs,
                   num_workers=cfg.num_workers), device_placement=True)
    h0, w0 = data.train[0][0].shape[-2:]
    size = (h0, w0) if cfg.size is None else (cfg.size, max(1, round(w0 * cfg.size / h0)))
    if cfg.augment == "crop-flip":
        aug = JointAugment(size, scale=(cfg.scale_min, 1.0), flip=True)
    elif cfg.augment == "flip":
        aug = JointAugment(size, scale=(1.0, 1.0), flip=True)
    else:
        aug = None
    augment = SeededAugment(aug.to(device), cfg.seed, device) if aug is not None else None
    label = cfg.label or info.get("label") or f"teacher {info['name']}"
    history: list[dict] = []

    def run_eval(step: int, train_loss: float) -> dict:
        r = evaluate_segmentation(model, test_loader, cfg.num_classes, cfg.ignore_index, cfg.size, accelerator)
        history.append({"step": step, "miou": r["miou"], "pixel_acc": r["pixel_acc"],
                        "train_loss": round(train_loss, 5), "seconds": round(time.time() - t_train, 1)})
        if progress and accelerator.is_main_process:
            bar.write(f"step {step}: {data.eval_split} mIoU {r['miou']:.2f}  pixel acc {r['pixel_acc']:.2f}")
        return r

    with writing("the training log", out / LOG_FILE):
        log_f = open(out / LOG_FILE, "w", newline="") if accelerator.is_main_process else None
    writer = csv.writer(log_f) if log_f else None
    if writer:
        writer.writerow(["step", "loss", "pixel_acc", "lr", "img_per_s"])
    bar = tqdm(total=cfg.steps, desc=f"segment {label} f={cfg.fraction:g} s={cfg.seed}",
               disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    model.train()
    # dropout masks from the run's seed (and process), on a forked RNG: two runs with one --seed draw the same masks
    # (a distilled run and its scratch baseline too), and the caller's RNG is left as it was
    rng_scope = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    rng_scope.__enter__()
    torch.manual_seed(cfg.seed * 1009 + rank + 1)
    t_train = time.time()
    log_loss, log_correct, log_n, log_steps, eval_loss, eval_steps = 0.0, 0.0, 0.0, 0, 0.0, 0
    last = None
    try:
        for step, (images, masks) in enumerate(train_loader, start=1):
            x, y = resize_pair(to_unit(images.to(device)), masks.to(device), cfg.size)  # (B, 3, H, W), (B, H, W)
            if augment is not None:
                x, y = augment(x, y)
            lr = scheduler.get_last_lr()[0]
            if callback is not None:
                callback({"step": step, "inputs": x, "masks": y, "lr": lr})
            logits = model(x)  # (B, K, H, W) float32
            loss = F.cross_entropy(logits, y, ignore_index=cfg.ignore_index, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"non-finite segmentation loss at step {step} ({loss.item()}); lower --lr.")
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            valid = y != cfg.ignore_index
            stats = torch.stack([loss.detach(), ((logits.argmax(1) == y) & valid).sum().float(), valid.sum().float()])
            if world > 1:
                stats = accelerator.reduce(stats, "sum")
                stats[0] /= world
            stats = stats.tolist()
            log_loss, log_correct, log_n, log_steps = log_loss + stats[0], log_correct + stats[1], log_n + stats[2], \
                log_steps + 1
            eval_loss, eval_steps = eval_loss + stats[0], eval_steps + 1
            if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
                if writer:
                    with writing("the training log", out / LOG_FILE):
                        writer.writerow([step, round(log_loss / log_steps, 6),
                                         round(100.0 * log_correct / max(log_n, 1), 2), lr,
                                         round(step * cfg.batch_size / (time.time() - t_train), 1)])
                        log_f.flush()
                bar.set_postfix(loss=f"{log_loss / log_steps:.4f}")
                log_loss, log_correct, log_n, log_steps = 0.0, 0.0, 0.0, 0
            bar.update(1)
            if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                last = run_eval(step, eval_loss / max(eval_steps, 1))
                eval_loss, eval_steps = 0.0, 0
    finally:
        rng_scope.__exit__(None, None, None)
        bar.close()
        if log_f:
            log_f.close()
    train_seconds = time.time() - t_train
    best = max(history, key=lambda r: (r["miou"], -r["step"]))
    result = {
        "task": "segmentation", "label": label, "model": cfg.model, "model_kind": info["kind"],
        "architecture": info["name"], "like": cfg.like, "dataset": f"segmentation:{cfg.layout}",
        "data_root": str(cfg.data_root), "eval_split": data.eval_split, "num_classes": cfg.num_classes,
        "ignore_index": cfg.ignore_index, "classes": list(data.classes),
        "fraction": float(cfg.fraction), "seed": cfg.seed, "steps": cfg.steps, "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
        "momentum": cfg.momentum if cfg.optimizer == "sgd" else None, "warmup_steps": min(cfg.warmup_steps, cfg.steps),
        "schedule": "linear warmup + cosine to 0 (diffusers get_cosine_schedule_with_warmup)",
        "augment": cfg.augment, "scale_min": cfg.scale_min, "label_smoothing": cfg.label_smoothing,
        "grad_clip": cfg.grad_clip, "decoder": cfg.decoder, "decoder_width": cfg.decoder_width,
        "freeze_backbone": bool(info["kind"] == "teacher" or cfg.freeze_backbone), "backbone": info,
        "input_size": [int(size[0]), int(size[1])], "mean": info["mean"], "std": info["std"],
        "train_images": len(data.train), "train_images_total": data.full_train_size,
        "train_images_seen": cfg.steps * cfg.batch_size,
        "epochs": round(cfg.steps * cfg.batch_size / len(data.train), 2), "test_images": last["images"],
        "last_miou": last["miou"], "last_miou_present": last["miou_present"], "last_pixel_acc": last["pixel_acc"],
        "per_class_iou": dict(zip(data.classes, last["per_class_iou"])), "absent_classes": last["absent_classes"],
        "best_miou": best["miou"], "best_step": best["step"], "final_train_loss": history[-1]["train_loss"],
        "history": history, "params": n_params, "trainable_params": n_trainable, "eval_every": cfg.eval_every,
        "mixed_precision": cfg.mixed_precision, "num_processes": world,
        "train_seconds": round(train_seconds, 1), "seconds": None, "machine": machine_description(),
    }
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if cfg.grid_images:
            _write_grid(unwrapped, data, cfg, out / GRID_FILE, device)
        if cfg.save_model:
            _save_model(unwrapped, out / MODEL_DIR, result, data.palette)
    result["seconds"] = round(time.time() - t_start, 1)
    if accelerator.is_main_process:
        atomic_write_json(out / RESULT_FILE, result)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return result


@torch.no_grad()
def _write_grid(model: nn.Module, data, cfg: SegmentConfig, path: Path, device) -> None:
    n = min(cfg.grid_images, len(data.test))
    images, masks = data.grid_pairs(n)
    x, y = resize_pair(to_unit(images.to(device)), masks.to(device), cfg.size)
    model.eval()
    pred = model(x).argmax(1)
    segmentation_grid((x * 255).round().byte().cpu(), y.cpu(), pred.cpu(), data.palette, cfg.ignore_index, path,
                      title=f"{cfg.label or cfg.model}: {data.eval_split} images, ground truth, prediction")


def _save_model(model: nn.Module, path: Path, result: dict, palette) -> None:
    """``model/config.json`` (how to rebuild it) + ``model/model.safetensors`` (the whole SegModel's state dict)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {"pretrained_cfg": {"tag": f"{MODEL_TAG}segmentation",
                                 "description": f"{result['label']} fine-tuned for segmentation by distill "
                                                f"({result['fraction']:g} of the masks, seed {result['seed']}, "
                                                f"{result['steps']} steps)."},
              "segmentation": {k: result[k] for k in ("model", "architecture", "like", "decoder", "decoder_width",
                                                      "num_classes", "ignore_index", "classes", "input_size", "mean",
                                                      "std", "backbone")},
              "palette": [list(c) for c in palette]}
    needed = sum(t.numel() * t.element_size() for t in state.values())
    with atomic_dir(path, replace=True, what="the fine-tuned segmentation model", needed=needed) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        atomic_write_json(tmp / "config.json", config)
