"""The one supervised fine-tuning loop, `fit`: a `Task` on top supplies the data,
model, inputs, loss, evaluation and result keys.

A fixed number of optimizer steps from an endless seeded shuffle (`StepBatchSampler`: 1% and 100% of the
labels get the same budget, and a distilled run and its scratch baseline seeded alike see the same images in the
same order with the same augmentation draws), the shared optimizer and warmup + cosine schedule
(`distill.optim`), evaluation every ``eval_every`` steps and at the end, ``train_log.csv``, an Accelerate
tracker (``log_with``), and ``result.json`` written by the main process only (`outdir`).

Several processes (``accelerate launch``) are data-parallel: each takes its share ``batch[rank::world]`` of every
global batch, the logged loss is the mean over all counted targets of all processes, and each evaluation image is
counted once. SIGTERM / Ctrl-C finish the step, write ``result.json`` with what was evaluated (marked ``stopped``)
and raise `TrainingInterrupted`.
"""
from __future__ import annotations

import contextlib
import os
import platform
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

from ..errors import NonFiniteLossError, TrainingInterrupted, WriteError, option
from ..logs import check_tracker, start_trackers
from ..optim import build_optimizer, build_scheduler
from ..signals import StopOnSignal
from .outdir import MODEL_DIR, RESULT_FILE, check_output_dir, lock_output_dir, prepare_output_dir, write_result
from .progress import Progress
from .sampler import StepBatchSampler
from .task import Task
from .trainlog import TrainLog


def machine_description() -> str:
    """Architecture, CPU threads, torch and timm versions and device, for a result's ``machine`` field."""
    import timm

    dev = "cpu"
    if torch.cuda.is_available():
        dev = f"cuda ({torch.cuda.get_device_name(0)})"
    return (f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, timm {timm.__version__}, device {dev}").replace("  ", " ")


def is_main_process() -> bool:
    """Whether this is the main process of the launch (one process: True); for what only one process prints."""
    from accelerate.state import PartialState

    return PartialState().is_main_process


def make_accelerator(cfg, out: Path):
    """An Accelerator for a fine-tune (precision, tracker). AcceleratorState is reset first (as
    `distill.trainer.accelerator.make_accelerator` does), keeping the process group.

    Raises:
        ValueError / MissingDependencyError: ``cfg.log_with`` is unknown or its package is not installed.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    check_tracker(cfg.log_with)
    AcceleratorState._reset_state(reset_partial_state=False)
    # launched on several processes (torchrun, accelerate launch) without CUDA: Accelerate forms the CPU process group
    # (gloo) only with cpu=True and otherwise runs every process as its own one-process job into one directory
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=cfg.mixed_precision, log_with=cfg.log_with, project_dir=str(out),
                       cpu=launched and not torch.cuda.is_available())


def fit(task: Task, output_dir, overwrite: bool = False, accelerator=None, progress: bool = True,
        callback: Optional[Callable[[dict], None]] = None) -> dict:
    """Fine-tune ``task``'s model on its data for ``task.cfg.steps`` optimizer steps; writes ``result.json`` and
    ``train_log.csv`` (and ``model/`` with ``save_model``) to ``output_dir``. Returns the result dict.

    ``callback`` is called before every update with ``{'step', 'inputs', task.target, 'lr'}`` (``inputs``: the
    augmented batch the model sees).

    Raises:
        FileExistsError: ``output_dir`` holds a result and ``overwrite`` is False, or files distill did not write
            (`outdir.check_output_dir`). RunLockedError: another fine-tune runs in ``output_dir``.
        ValueError: bad data (the task's checks) or a batch size not divisible by the processes.
        WriteError: an output could not be written; a failed model write keeps ``result.json``.
        NonFiniteLossError: the loss became NaN or Inf. TrainingInterrupted: SIGTERM / SIGINT (after the result).
    """
    cfg, out, t_start = task.cfg, Path(output_dir), time.time()
    check_tracker(cfg.log_with)
    check_output_dir(out, overwrite, cfg.save_model)  # fail before the data is read
    task.load_data()
    if accelerator is None:
        accelerator = make_accelerator(cfg, out)
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(f"{option('batch_size')} {cfg.batch_size} is not divisible by the {accelerator.num_processes} "
                         "processes.")
    lock = lock_output_dir(out) if accelerator.is_main_process else contextlib.nullcontext()
    with lock:  # one fine-tune per output directory
        if accelerator.is_main_process:
            prepare_output_dir(out, overwrite, cfg.save_model)
        accelerator.wait_for_everyone()
        return _fit(task, out, accelerator, Progress(progress, accelerator.is_main_process), callback, t_start)


def _fit(task: Task, out: Path, accelerator, show: Progress, callback, t_start: float) -> dict:
    """`fit` in its locked, prepared output directory."""
    from tqdm.auto import tqdm

    cfg, device = task.cfg, accelerator.device
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    model = task.build_model()
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum,
                                **task.optimizer_options())
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    sampler = StepBatchSampler(len(task.train), cfg.batch_size, cfg.steps, cfg.seed, rank=rank, world=world)
    train_loader = DataLoader(task.train, batch_sampler=sampler, collate_fn=task.collate, num_workers=cfg.num_workers)
    if task.shards_evaluation:  # each process its own batches; the task sums the metrics over processes
        test_loader = DataLoader(task.test, num_workers=cfg.num_workers, **task.eval_loader_options(rank, world))
    else:
        test_loader = accelerator.prepare_data_loader(
            DataLoader(task.test, num_workers=cfg.num_workers, **task.eval_loader_options()), device_placement=True)
    task.make_augment(device)
    tracking = bool(getattr(accelerator, "log_with", None))  # --log-with, or trackers of a caller's Accelerator
    if tracking:
        start_trackers(accelerator, getattr(cfg, "log_with", None) or "tracker", project="distill-finetune",
                       config={k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))})
    bar = tqdm(total=cfg.steps, desc=f"{task.name} {task.label} f={cfg.fraction:g} s={cfg.seed}",
               disable=not show.bar, dynamic_ncols=True)
    log = TrainLog(out, task.train_metric, cfg.steps, cfg.log_every, cfg.batch_size, main, show, bar,
                   accelerator if tracking else None)
    history: list[dict] = []

    def run_eval(step: int, train_loss: float) -> dict:
        r = task.evaluate(model, show.batches(test_loader, f"step {step}: evaluating"), accelerator)
        row = task.history_row(r)
        history.append({"step": step, **row, "train_loss": round(train_loss, 5),
                        "seconds": round(time.time() - log.t0, 1)})
        show.write(task.eval_line(step, r), bar)
        if tracking:
            accelerator.log({f"eval/{k}": v for k, v in row.items()}, step=step)
        return r

    model.train()
    # dropout masks from the run's seed (and process), on a forked RNG: two runs with one --seed draw the same masks
    # (a distilled run and its scratch baseline too), and the caller's RNG is left as it was
    rng_scope = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    rng_scope.__enter__()
    torch.manual_seed(cfg.seed * 1009 + rank + 1)
    eval_loss, eval_steps, last, step, stopped = 0.0, 0, None, 0, None
    try:
        with StopOnSignal(after="writing the result", processes=accelerator.num_processes) as stop:
            for step, batch in enumerate(train_loader, start=1):
                lr = scheduler.get_last_lr()[0]  # the rate this update uses
                loss, correct, counted = _update(task, batch, model, optimizer, accelerator, step, lr, callback)
                scheduler.step()
                log.add(step, loss, correct, counted, lr)
                bar.update(1)
                eval_loss, eval_steps = eval_loss + loss, eval_steps + 1
                evaluated = step == cfg.steps or bool(cfg.eval_every and step % cfg.eval_every == 0)
                if evaluated:
                    last = run_eval(step, eval_loss / max(eval_steps, 1))
                    eval_loss, eval_steps = 0.0, 0
                if stop.requested(accelerator, step, due=evaluated):
                    stopped = stop.signum
                    break
    finally:
        rng_scope.__exit__(None, None, None)
        bar.close()
        log.close()
    result = _result(task, history, last, time.time() - log.t0, world,
                     sum(p.numel() for p in model.parameters()),
                     sum(p.numel() for p in model.parameters() if p.requires_grad))
    result["mixed_precision"] = str(accelerator.mixed_precision)  # the one used (--mixed-precision or Accelerate's)
    if stopped is not None:
        result.update(stopped=signal.Signals(stopped).name, steps_done=step)
    else:
        task.after_training(model, result, accelerator, show.batches)
    if tracking:
        accelerator.end_training()
    unwrapped = accelerator.unwrap_model(model)
    result["seconds"] = round(time.time() - t_start, 1)
    if main:
        write_result(out, result)  # first: a failed write of a figure or the model must not lose the result
        task.write_extras(unwrapped, out, device)
        if cfg.save_model:
            _save_model(task, unwrapped, out, result)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    if stopped is not None:
        raise TrainingInterrupted(
            f"stopped by {result['stopped']} after step {step} of {cfg.steps}; '{out / RESULT_FILE}' holds the "
            f"{len(history)} evaluation(s) done so far, marked 'stopped' (distill report leaves it out). A fine-tune "
            f"does not resume: to train the whole budget, run it again with {option('overwrite', flag=True)}.",
            stopped)
    return result


def _update(task: Task, batch, model, optimizer, accelerator, step: int, lr: float, callback) -> tuple:
    """One optimizer update on ``batch``; returns ``(loss, correct, counted)`` over all processes, the loss as the
    mean over every counted target (each process's mean weighted by its count).

    Raises:
        NonFiniteLossError: the loss is NaN or Inf (no update was applied).
    """
    x, y = task.inputs(batch, accelerator.device)
    if callback is not None:
        callback({"step": step, "inputs": x, task.target: y, "lr": lr})
    logits = model(x).float()
    loss = task.loss(logits, y)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"non-finite {task.name} loss at step {step} ({loss.item()}); lower {option('lr')}.")
    accelerator.backward(loss)
    if task.cfg.grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), task.cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    correct, counted = task.batch_stats(logits.detach(), y)
    stats = torch.stack([loss.detach() * counted, correct, counted])
    if accelerator.num_processes > 1:
        stats = accelerator.reduce(stats, "sum")
    total, correct, counted = stats.tolist()
    return total / max(counted, 1.0), correct, counted


def _result(task: Task, history: list, last, train_seconds: float, world: int, params: int, trainable: int) -> dict:
    """The ``result.json`` dict: the loop's keys, the task's (`Task.result`) and every evaluation."""
    cfg = task.cfg
    best = max(history, key=lambda r: (r[task.score], -r["step"])) if history else None
    return {"task": task.name, "label": task.label, "model": cfg.model, "like": cfg.like,
            "fraction": float(cfg.fraction), "seed": cfg.seed, "steps": cfg.steps, "batch_size": cfg.batch_size,
            "optimizer": cfg.optimizer, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
            "momentum": cfg.momentum if cfg.optimizer == "sgd" else None,
            "warmup_steps": min(cfg.warmup_steps, cfg.steps),
            "schedule": "linear warmup + cosine to 0 (diffusers get_cosine_schedule_with_warmup)",
            "augment": cfg.augment, "label_smoothing": cfg.label_smoothing, "grad_clip": cfg.grad_clip,
            "train_images": len(task.train), "train_images_seen": cfg.steps * cfg.batch_size,
            "epochs": round(cfg.steps * cfg.batch_size / len(task.train), 2),
            **task.result(last, best),
            "final_train_loss": history[-1]["train_loss"] if history else None,
            "history": history, "params": params, "trainable_params": trainable,
            "eval_every": cfg.eval_every, "mixed_precision": task.cfg.mixed_precision, "num_processes": world,
            "log_with": cfg.log_with, "train_seconds": round(train_seconds, 1), "seconds": None,
            "machine": machine_description()}


def _save_model(task: Task, model, out: Path, result: dict) -> None:
    """``--save-model`` after ``result.json``; a failed write says that the result was kept."""
    try:
        task.save_model(model, out / MODEL_DIR, result)
    except WriteError as e:
        raise WriteError(f"{e} The result was written before the model and is kept: '{out / RESULT_FILE}'.",
                         e.errno, e.filename) from e
    result["saved_model"] = MODEL_DIR
    write_result(out, result)
