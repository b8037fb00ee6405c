"""One fine-tuning run: :func:`finetune` trains a model with a new head for a fixed number of steps and writes
``result.json`` (everything needed for a results table), ``train_log.csv`` (training loss) and, with ``save_model``,
the fine-tuned model in timm format; :func:`evaluate` gives top-1/top-5 on a loader.

Cross-entropy, the shared optimizer and warmup + cosine schedule (:mod:`distill.optim`), kornia augmentation on its
own RNG stream, ``to_student`` (size, mean/std); top-1/top-5 on the full test split every ``eval_every`` steps and
at the end.
"""
from __future__ import annotations

import csv
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..atomic import atomic_dir, atomic_write_json, writing
from ..augment import build_augment
from ..data import FASHION_MNIST_CLASSES, collate, to_student, to_unit
from ..errors import NonFiniteLossError
from ..integrity import error_text, read_json
from ..optim import build_optimizer, build_scheduler
from ..vocab import dataset_channels
from .config import FinetuneConfig
from ..export import EXPORT_FILES, export_data_root
from .data import SeededAugment, StepBatchSampler, finetune_data
from .model import build_model, default_label, parse_model_source, read_export_config, resolve_preprocessing

_logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
LOG_FILE = "train_log.csv"
MODEL_DIR = "model"
#: the pretrained_cfg tag of a model saved with --save-model (``distill-finetune-<dataset>``)
MODEL_TAG = "distill-finetune-"


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
    """Architecture, CPU threads, torch and timm versions and device, for a result's ``machine`` field."""
    import timm

    dev = "cpu"
    if torch.cuda.is_available():
        dev = f"cuda ({torch.cuda.get_device_name(0)})"
    return (f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, timm {timm.__version__}, device {dev}").replace("  ", " ")


def result_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a ``result.json`` written by ``distill finetune`` (None when it is)."""
    try:
        r = read_json(path)
    except (OSError, ValueError) as e:
        return error_text(e)
    if not isinstance(r, dict):
        return "not a JSON object"
    score = "last_miou" if r.get("task") == "segmentation" else "last_top1"  # distill.segment writes last_miou
    missing = [k for k in ("label", "fraction", "seed", score) if k not in r]
    return f"no {', '.join(missing)}" if missing else None


def saved_model_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a model saved by ``distill finetune --save-model`` (None when it is): a directory of
    ``config.json`` and ``model.safetensors`` whose pretrained_cfg tag starts with :data:`MODEL_TAG`."""
    if path.is_symlink() or not path.is_dir():
        return "it is a file, not a directory"
    foreign = sorted(p.name for p in path.iterdir() if p.name not in EXPORT_FILES)
    if foreign:
        return f"it holds {', '.join(foreign[:8])}, which distill finetune does not write there"
    try:
        tag = read_json(path / "config.json").get("pretrained_cfg", {}).get("tag", "")
    except (OSError, ValueError, AttributeError) as e:
        return f"its config.json cannot be read ({error_text(e)})"
    return None if str(tag).startswith(MODEL_TAG) else f"its pretrained_cfg tag is {tag!r}, not {MODEL_TAG}*"


def check_output_dir(out: Path, overwrite: bool, save_model: bool = False) -> None:
    """Refuse an output directory whose files a run would replace but did not provably write.

    Raises:
        FileExistsError: ``out`` holds a ``result.json`` and ``overwrite`` is False; or a ``result.json`` (with
            ``overwrite``) or a ``model/`` (with ``save_model``) that distill finetune did not write.
    """
    result, model = out / RESULT_FILE, out / MODEL_DIR
    refused = "Nothing was deleted. Fix: choose another --output-dir, or move it away."
    if result.exists():
        if not overwrite:
            raise FileExistsError(f"'{out}' already holds a fine-tuning result ({RESULT_FILE}); pass --overwrite to "
                                  f"replace it or choose another --output-dir.")
        problem = result_problem(result)
        if problem:
            raise FileExistsError(f"--overwrite refused: '{result}' is not a distill finetune result ({problem}). "
                                  f"{refused}")
    if save_model and (model.exists() or model.is_symlink()):
        problem = saved_model_problem(model)
        if problem:
            raise FileExistsError(f"'{model}' is not a model saved by distill finetune ({problem}); --save-model "
                                  f"would replace it. {refused}")


def prepare_output_dir(out: Path, overwrite: bool, save_model: bool = False) -> None:
    """Create ``out`` for a run (:func:`check_output_dir` first); with ``overwrite`` the earlier result and the
    model saved beside it are removed (a ``model/`` that distill finetune did not write is left alone).

    Raises:
        FileExistsError: see :func:`check_output_dir`.
        WriteError: ``out`` cannot be created (read-only, a file in the path, ...).
    """
    check_output_dir(out, overwrite, save_model)
    if (out / RESULT_FILE).exists():
        (out / RESULT_FILE).unlink()  # a run killed after this point must not leave the old result beside new logs
    if overwrite and (out / MODEL_DIR).exists() and saved_model_problem(out / MODEL_DIR) is None:
        shutil.rmtree(out / MODEL_DIR)
    with writing("the fine-tuning output directory", out):
        out.mkdir(parents=True, exist_ok=True)


def finetune(cfg: FinetuneConfig, output_dir: str, overwrite: bool = False, accelerator=None,
             progress: bool = True, callback: Optional[Callable[[dict], None]] = None) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.dataset``; writes ``result.json`` and ``train_log.csv`` to ``output_dir``.

    ``callback`` (tests, custom logging) is called before every update with ``{'step', 'inputs', 'labels',
    'lr'}`` (``inputs``: the augmented, normalised batch the model sees). Returns the result dict.

    Raises:
        ValueError: a bad setting (:meth:`FinetuneConfig.validate`), unknown timm model, unlabelled data, or a batch
            size not divisible by the processes.
        FileNotFoundError: ``--model`` / ``--like`` is not an export, or the dataset is missing.
        FileExistsError: ``output_dir`` already holds a result and ``overwrite`` is False, or holds a
            ``result.json`` / ``model/`` that distill finetune did not write (:func:`check_output_dir`).
        UnreadableFileError: the export's config.json or weights are damaged (named in the message).
        WriteError: an output could not be written (disk full, read-only, ...).
        NonFiniteLossError: the loss became NaN or Inf (:mod:`distill.errors`).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg.validate()
    t_start = time.time()
    source = parse_model_source(cfg.model)
    like_config = read_export_config(Path(cfg.like).expanduser(), "--like") if cfg.like else None
    if like_config and source.kind == "exported":
        _logger.warning("--like is for timm:NAME runs; %s keeps its own input size and mean/std", cfg.model)
    if like_config and source.kind == "timm" and like_config.get("architecture") != source.name:
        _logger.warning("--like %s is a %s, not %s: only its input size and mean/std are copied", cfg.like,
                        like_config.get("architecture"), source.name)
    ref = source.config if source.kind == "exported" else (like_config or {})
    d = ref.get("distill", {})
    dataset = cfg.dataset or d.get("dataset") or "fashion-mnist"
    channels = dataset_channels(dataset, d.get("data_channels"))
    out = Path(output_dir)
    check_output_dir(out, overwrite, cfg.save_model)  # fail before the data is read
    data_root = cfg.data_root or export_data_root(d, dataset)
    data = finetune_data(dataset, data_root, cfg.fraction, cfg.seed, channels, cfg.test_root)
    size, mean, std, prep_origin = resolve_preprocessing(cfg, source, like_config, data.full_train)

    if accelerator is None:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)  # as distill.trainer.train
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    if accelerator.is_main_process:
        prepare_output_dir(out, overwrite, cfg.save_model)
    accelerator.wait_for_everyone()
    device = accelerator.device

    model = build_model(source, data.num_classes, size, like_config, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum,
                                layer_decay=cfg.layer_decay, backbone_lr_mult=cfg.backbone_lr_mult)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps)
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

    with writing("the training log", out / LOG_FILE):
        log_f = open(out / LOG_FILE, "w", newline="") if accelerator.is_main_process else None
    writer = csv.writer(log_f) if log_f else None
    if writer:
        writer.writerow(["step", "loss", "batch_top1", "lr", "img_per_s"])
    bar = tqdm(total=cfg.steps, desc=f"finetune {default_label(source)} f={cfg.fraction:g} s={cfg.seed}",
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
                    with writing("the training log", out / LOG_FILE):
                        writer.writerow([step, round(log_loss / log_steps, 6), round(100.0 * log_correct / log_n, 2),
                                         lr, round(step * cfg.batch_size / (time.time() - t_train), 1)])
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
        "label": cfg.label or default_label(source),
        "model": cfg.model, "model_kind": source.kind, "architecture": source.name,
        "like": cfg.like, "dataset": dataset, "data_root": data_root, "num_classes": data.num_classes,
        "fraction": float(cfg.fraction), "seed": cfg.seed, "steps": cfg.steps, "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
        "momentum": cfg.momentum if cfg.optimizer == "sgd" else None, "warmup_steps": min(cfg.warmup_steps, cfg.steps),
        "layer_decay": cfg.layer_decay, "backbone_lr_mult": cfg.backbone_lr_mult,
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
        _save_model(unwrapped, out / MODEL_DIR, size, mean, std, data.classes or FASHION_MNIST_CLASSES, result)
    result["seconds"] = round(time.time() - t_start, 1)
    if accelerator.is_main_process:
        atomic_write_json(out / RESULT_FILE, result)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return result


def _save_model(model: nn.Module, path: Path, size: int, mean, std, classes, result: dict) -> None:
    import timm.models

    desc = (f"{result['label']} fine-tuned by distill on {result['dataset']} ({result['fraction']:g} of the labels, "
            f"{result['train_images']} images, seed {result['seed']}, {result['steps']} steps).")
    model_config = {"pretrained_cfg": {"tag": f"{MODEL_TAG}{result['dataset']}", "description": desc}}
    if len(classes) == result["num_classes"]:
        model_config["label_names"] = list(classes)
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with atomic_dir(path, replace=True, what="the fine-tuned model", needed=needed) as tmp:  # checked: ours or absent
        timm.models.save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True,
                                data_config={"input_size": (3, size, size), "mean": tuple(mean), "std": tuple(std),
                                             "crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center"})


def result_line(r: dict) -> str:
    """One line summing up a result dict: label, fraction, seed, steps, last and best top-1, top-k, seconds."""
    return (f"{r['label']}: fraction {r['fraction']:g} ({r['train_images']} images), seed {r['seed']}, {r['steps']} "
            f"steps: last top-1 {r['last_top1']:.2f} (best {r['best_top1']:.2f} at step {r['best_step']}), "
            f"top-{r['top5_k']} {r['last_top5']:.2f}, {r['seconds']:.0f}s")
