"""Feature distillation on Accelerate: teacher features -> student + regressor, MSE on whitened targets + AT.

`train` reads in one screen: `setup` builds the run's pieces (through `distill.build`) and a
target source, `optimizer_step` makes one update of ``grad_accum_steps`` micro-batches, and the run
directory's files are written through `distill.rundir`.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..augment import build_augment
from ..build import (build_loss, build_model, build_optimizer, build_policy, build_scheduler, build_teacher,
                     build_train_data, resolve_mean_std, target_layout)
from ..config import Recipe
from ..data import IndexedDataset
from ..errors import TrainingInterrupted, option
from ..policy import entropy_weight
from ..cache import data_fingerprint, teacher_settings, teacher_sha256
from ..rundir import (MONITOR, check_resume, check_resume_flags, checkpoint_step, latest_checkpoint,
                      newest_loadable_checkpoint, prepare_run_dir, record_changes, write_config, write_summary)
from ..runlock import RunLock
from ..select import check_candidates
from .accelerator import exact_accumulation, make_accelerator, process_seed, start_trackers
from .batches import epoch_batches
from .checkpoint import load_checkpoint, save_checkpoint
from .cost import RunCost, measure_cost
from .ema import StudentEma
from .monitor import MONITOR_COLUMN, Monitor
from .policy_log import PolicyLog
from .stop import StopOnSignal
from .textlog import CsvLog, TrainLog, format_line, show_progress_bar
from .step import apply_update, clip_gradients, nonfinite_error, nonfinite_terms, train_step
from .targets import CacheTargets, LatentCacheTargets, LiveTeacherTargets, PolicyTargets
from .timesteps import resolve_timesteps

_logger = logging.getLogger(__name__)


@dataclass
class Session:
    """Everything a run holds while it trains."""

    recipe: Recipe
    run_dir: Path
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    source: Any  # a target source (distill.trainer.targets)
    loss_fn: Any
    ds: Any  # the training set as the loader sees it
    resolved: dict
    policy: Any = None
    policy_opt: Any = None
    entropy_steps: int = 0
    seen: int = 0
    skipped: int = 0
    last: dict = field(default_factory=dict)
    metrics: Any = None  # RUN/metrics.csv (textlog.CsvLog)
    policy_log: Optional[PolicyLog] = None
    bar: Any = None  # tqdm
    t0: float = 0.0
    ema: Optional[StudentEma] = None  # recipe ema: the student's weight average
    monitor: Optional[Monitor] = None  # recipe monitor_every (main process only)
    monitor_log: Any = None  # RUN/monitor.csv (textlog.CsvLog)
    monitor_last: Optional[dict] = None
    text_log: Optional[TrainLog] = None  # RUN/train.log (and stdout without a progress bar)
    data_wait: float = 0.0  # seconds spent waiting for batches since t0
    mark: tuple = (0.0, 0.0)  # (time, data_wait) at the previous log line
    data_note: str = ""  # what the data source lists but the dataset cannot read (DecodedImages.left_out)
    cost: Optional[RunCost] = None  # FLOPs per image by part, the device's peak (trainer.cost)

    @property
    def optimizers(self) -> list:
        return [o for o in (self.optimizer, self.policy_opt) if o is not None]

    def entropy_weight(self, step: int) -> float:
        return entropy_weight(step - 1, self.recipe.policy_entropy, self.entropy_steps)


def setup(recipe: Recipe, run_dir: Path, accelerator, progress: bool) -> Session:
    """Build data, teacher (or feature cache), model, optimizers and the target source, in the order that fixes
    the RNG stream (so a seed reproduces a run)."""
    backend = compile_backend(recipe.compile) if recipe.compile else None  # a bad name fails before any work
    ds, channels = build_train_data(recipe)
    mean, std = resolve_mean_std(recipe, ds)
    use_policy = recipe.timesteps == "policy"
    timesteps, selection = resolve_timesteps(recipe, ds, channels, run_dir, accelerator, progress)
    teacher = build_teacher(recipe, channels, [0] if use_policy else timesteps)
    if use_policy:
        teacher.set_timesteps(check_candidates(timesteps, teacher.num_train_timesteps))
    cache = latents = None
    if recipe.feature_cache:  # targets read from `distill extract`'s files; the key (weights, data, ...) is checked
        from ..cache import open_for_recipe

        cache = open_for_recipe(recipe, ds, teacher, channels)
    elif recipe.latent_cache:  # VAE latents read from `distill extract --latents`; the UNet/DiT runs live
        from ..latent_cache import open_for_recipe as open_latents

        latents = open_latents(recipe, ds, teacher, channels)
        teacher.vae = None  # never runs: not moved to the device
        teacher = teacher.to(accelerator.device)
    else:
        teacher = teacher.to(accelerator.device)  # never prepared: frozen, no DDP
    layout = target_layout(recipe, teacher, policy=use_policy)
    model = build_model(recipe, teacher, layout)
    if recipe.channels_last:  # NHWC weights (the inputs follow in optimizer_step), as timm's train.py does
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(recipe, model)
    # The LR schedule is a function of the step: it is not checkpointed (Accelerate unpickles custom objects with
    # weights_only=False, which would run code from a stranger's checkpoint) but stepped forward on resume.
    scheduler = build_scheduler(recipe, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = policy_opt = None
    if use_policy:  # its own model + optimizer: checkpointed as model_1 / optimizer_1 (safetensors / weights only)
        policy = build_policy(recipe, teacher, ds)
        policy_opt = torch.optim.Adam(policy.parameters(), lr=recipe.policy_lr)
        policy, policy_opt = accelerator.prepare(policy, policy_opt)
    augment = build_augment(recipe.augment, ds[0][0].shape[-1]).to(accelerator.device)
    if latents is not None:
        source = LatentCacheTargets(latents, teacher, layout.groups, recipe.student_size, mean, std,
                                    recipe.augment == "flip", recipe.latent_sample == "sample", accelerator.device)
    elif cache is not None:
        source = CacheTargets(cache, layout.groups, recipe.student_size, mean, std, recipe.seed, accelerator.device)
    elif use_policy:
        source = PolicyTargets(teacher, layout.groups, augment, recipe.student_size, mean, std, policy, accelerator)
    else:
        source = LiveTeacherTargets(teacher, layout.groups, augment, recipe.student_size, mean, std)
    unwrapped = accelerator.unwrap_model(model)
    ema = StudentEma(unwrapped.student.model, recipe.ema_decay) if recipe.ema else None
    if recipe.compile:  # in place (nn.Module.compile): state-dict keys, checkpoints and exports are unchanged
        unwrapped.compile(backend=backend)
    monitor = None
    if recipe.monitor_every and accelerator.is_main_process:
        with torch.random.fork_rng(devices=[]):  # reading the subset must not move the training RNG stream
            monitor = Monitor(recipe, mean, std, accelerator.device)
    resolved = {
        "mean": mean, "std": std, "data_channels": channels,
        "teacher_features": [vars(f) | {"size": list(f.size)} for f in teacher.feature_info],
        "teacher_in_channels": teacher.in_channels, "teacher_sample_size": teacher.sample_size,
        "student_features": [vars(f) | {"size": list(f.size)} for f in unwrapped.student.feature_info],
        "sources": unwrapped.regressor.sources,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,  # the recipe's, else Accelerate's configuration
        "timesteps_used": {"policy": teacher.timesteps} if use_policy else teacher.timesteps,
        "selection": selection,
        "regressor_targets": [[c, list(size)] for c, size in layout.targets],
        "target_groups": layout.groups,
        "feature_cache": {"path": str(cache.path), "key": cache.key} if cache is not None else None,
        **({"latent_cache": {"path": str(latents.path), "key": latents.key}} if latents is not None else {}),
        "teacher_sha256": teacher_sha256(teacher), "data_sha256": data_fingerprint(ds),
        "teacher_source": teacher.source_info,  # class, factory, weights sha256 of a python: or module teacher
        "teacher_settings": teacher_settings(teacher),  # code, model / scheduler / VAE settings (as the cache key)
    }
    cost = measure_cost(teacher, unwrapped, recipe, accelerator, teacher_live=cache is None)
    entropy_steps = recipe.policy_entropy_steps if recipe.policy_entropy_steps is not None else recipe.steps // 2
    return Session(recipe, run_dir, accelerator, model, optimizer, scheduler, source, build_loss(recipe),
                   IndexedDataset(ds) if cache is not None or latents is not None else ds, resolved, policy,
                   policy_opt, entropy_steps, ema=ema, monitor=monitor, cost=cost,
                   data_note=ds.left_out() if hasattr(ds, "left_out") else "")


def compile_backend(value) -> str:
    """The torch.compile backend of the recipe's ``compile`` (``True``: inductor, as timm's ``--torchcompile``).

    Raises:
        ValueError: a name torch.compile does not know (the message lists the ones it does).
    """
    import torch._dynamo

    backend = "inductor" if value is True else str(value)
    valid = torch._dynamo.list_backends(exclude_tags=())
    if backend not in valid:
        raise ValueError(f"recipe: compile {value!r} is not a torch.compile backend; valid: true (inductor), false, "
                         f"or one of {', '.join(valid)}.")
    return backend


def resume_from(s: Session, ckpt: Optional[Path]) -> int:
    """Load ``ckpt`` (if any) and step the schedule forward to its step; returns the step to continue after."""
    if ckpt is None:
        return 0
    start = load_checkpoint(s.accelerator, ckpt)
    if s.ema is not None:
        s.ema.load(ckpt)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start):
            s.scheduler.step()
    s.accelerator.print(f"resumed from {ckpt} (step {start})")
    return start


def optimizer_step(s: Session, batches, step: int, policy_log: Optional[PolicyLog]) -> tuple:
    """One optimizer update from ``grad_accum_steps`` micro-batches, checked for non-finite values once (one host
    synchronisation per update; log steps add theirs in `log_step`). Returns ``(summed loss terms, or {} when
    the update was skipped; grad norm or None; the last micro-batch's StepInput)``.

    Raises:
        NonFiniteLossError: a non-finite loss or gradient norm with ``on_nonfinite: error`` (no update applied).
    """
    r, acc = s.recipe, s.accelerator
    sums, bad, grad_norm, inputs, actions = {}, [], None, None, []
    for micro in range(r.grad_accum_steps):
        t_wait = time.perf_counter()
        batch = next(batches)
        s.data_wait += time.perf_counter() - t_wait
        inputs = s.source(batch, (step - 1) * r.grad_accum_steps + micro)
        if r.channels_last:
            inputs.student_x = inputs.student_x.contiguous(memory_format=torch.channels_last)
        with acc.accumulate(*([s.model] if s.policy is None else [s.model, s.policy])):
            losses = train_step(s.model, inputs, s.loss_fn, acc, s.policy, s.entropy_weight(step))
            for k, v in losses.items():  # summed on the device: nothing waits for the host per micro-batch
                sums[k] = sums.get(k, 0.0) + v.detach()
            if acc.sync_gradients:  # the last micro-batch: the update is checked once, before it is applied
                grad_norm = clip_gradients(s.model, acc, r.grad_clip)
                bad = nonfinite_terms(sums, grad_norm, acc)
                if bad and r.on_nonfinite == "error":
                    raise nonfinite_error(step, bad, sums, r.grad_accum_steps, s.run_dir, latest_checkpoint(s.run_dir))
            apply_update(s.optimizers, skip=bool(bad))
        if policy_log is not None:
            actions.append(inputs.actions)
        s.seen += batch[0].shape[0] * acc.num_processes
    if bad:
        s.skipped += 1
        _logger.warning("step %d: non-finite %s; batch skipped (%d so far)", step, ", ".join(bad), s.skipped)
        return {}, grad_norm, inputs
    for a in actions:  # the timesteps of an applied update only
        policy_log.count(a)
    if s.ema is not None:
        s.ema.update(acc.unwrap_model(s.model).student.model)
    return sums, grad_norm, inputs


def log_step(s: Session, step: int, sums: dict, grad_norm, t0: float, metrics: CsvLog,
             extra: Optional[dict] = None) -> dict:
    """Average the loss terms over processes and micro-batches; one ``metrics.csv`` row (and tracker entry), with
    the ``extra`` columns (the monitor's) last."""
    terms = {k: s.accelerator.reduce(v, "mean").item() / s.recipe.grad_accum_steps for k, v in sums.items()}
    row = {"step": step, **{k: round(v, 6) for k, v in terms.items()}, "lr": s.scheduler.get_last_lr()[0],
           "grad_norm": round(float(grad_norm), 4) if grad_norm is not None else "",
           "img_per_s": round(s.seen / (time.time() - t0), 1)}
    row.update(s.cost.fields(row["img_per_s"]) if s.cost is not None else {})  # tflops, mfu
    row["skipped"] = s.skipped
    row.update(extra or {})
    metrics.write(row)
    now = time.time()
    if s.text_log is not None:
        share = (s.data_wait - s.mark[1]) / max(now - s.mark[0], 1e-9)
        s.text_log.write(format_line(step, s.recipe.steps, terms, row["lr"], row["img_per_s"], min(share, 1.0),
                                     row.get("tflops"), row.get("mfu")))
    s.mark = (now, s.data_wait)
    if s.recipe.log_with:
        s.accelerator.log({k: v for k, v in row.items() if isinstance(v, float)}, step=step)
    return terms


def train(recipe: Recipe, output_dir: str, resume: bool = False, overwrite: bool = False,
          accelerator=None, progress: bool = True, allow_changes: bool = False) -> dict:
    """Distill ``recipe.teacher`` into ``recipe.student`` in ``output_dir``; returns a summary dict (also in
    ``summary.json``).

    Raises:
        RunExistsError: ``output_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set, or an
            ``overwrite`` of a directory that is not provably a distill run.
        RunLockedError: another live process trains in ``output_dir``.
        TrainingInterrupted: SIGTERM/SIGINT; a checkpoint of the last finished step was written.
        NonFiniteLossError: a non-finite loss with ``on_nonfinite: error``.
        ValueError: a recipe that cannot run (the message names the key and the fix), or a resume whose recipe or
            resolved values (mean/std, teacher weights, data, feature layout) differ from the run's without
            ``allow_changes`` (each difference listed; ``steps`` may grow); ``allow_changes`` without ``resume``.
    """
    check_resume_flags(resume, allow_changes)
    run_dir = Path(output_dir)
    acc = accelerator or make_accelerator(recipe, run_dir)
    with RunLock(run_dir) if acc.is_main_process else contextlib.nullcontext():  # one training process per run
        return _train(recipe, run_dir, acc, resume, overwrite, progress, allow_changes)


def _train(recipe: Recipe, run_dir: Path, acc, resume: bool, overwrite: bool, progress: bool,
           allow_changes: bool) -> dict:
    """`train` in its locked run directory."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    ckpt = prepare_run_dir(run_dir, resume, overwrite) if acc.is_main_process else None
    acc.wait_for_everyone()
    if not acc.is_main_process and resume:
        ckpt = newest_loadable_checkpoint(run_dir)
    if ckpt is not None:  # the recipe's side of the resume contract, before anything is built
        check_resume(run_dir, checkpoint_step(ckpt), recipe, None, allow_changes)
    run_dir.mkdir(parents=True, exist_ok=True)
    exact_accumulation(acc, recipe.grad_accum_steps)
    set_seed(recipe.seed)  # the same on every process: identical initial weights and data order
    s = setup(recipe, run_dir, acc, progress)
    if acc.process_index > 0:  # from here on each process draws its own noise and augmentation
        set_seed(process_seed(recipe.seed, acc.process_index))
    changes = check_resume(run_dir, checkpoint_step(ckpt), recipe, s.resolved, allow_changes) if ckpt else []
    start = resume_from(s, ckpt)  # nothing in the run directory is written before the checkpoint has loaded
    start_trackers(acc, recipe.log_with, {k: v for k, v in recipe.to_dict().items()  # before config.yaml: a
                                          if isinstance(v, (int, float, str, bool))})  # failed start writes nothing
    if acc.is_main_process:
        write_config(run_dir, recipe, record_changes(run_dir, s.resolved, changes))
    batches = epoch_batches(s.ds, recipe, acc, start)
    s.metrics = CsvLog(run_dir / "metrics.csv", start, acc.is_main_process)
    if s.policy is not None:
        s.policy_log = PolicyLog(run_dir / "policy.csv", s.resolved["timesteps_used"]["policy"], start, acc)
    show_bar = show_progress_bar(progress, acc.is_main_process)
    s.bar = tqdm(total=recipe.steps, initial=start, desc="distill", disable=not show_bar, dynamic_ncols=True)
    s.text_log = TrainLog(run_dir, start, acc.is_main_process, echo=not show_bar)
    if s.data_note:  # a run that reads fewer images than its source lists says so in its log
        _logger.warning("%s", s.data_note)
        s.text_log.write(s.data_note)
    for line in s.cost.lines():
        s.text_log.write(line)
    if s.monitor is not None:
        s.monitor_log = CsvLog(run_dir / MONITOR, start, acc.is_main_process)
        if start == 0:
            monitor_step(s, 0)
    s.model.train()
    s.t0 = time.time()
    s.mark = (s.t0, 0.0)
    try:
        with StopOnSignal(processes=s.accelerator.num_processes) as stop:
            for step in range(start + 1, recipe.steps + 1):
                sums, grad_norm, inputs = optimizer_step(s, batches, step, s.policy_log)
                s.scheduler.step()
                end_of_step(s, step, step == start + 1, sums, grad_norm, inputs, stop)
    finally:
        batches.close(), s.bar.close()  # close(): the loader's workers stop here (they ignore SIGTERM)
        s.metrics.close()
        if s.monitor_log is not None:
            s.monitor_log.close()
        s.text_log.close()
        if s.policy_log is not None:
            s.policy_log.close()
        if recipe.log_with:
            acc.end_training()
    return finish(s)


def end_of_step(s: Session, step: int, first: bool, sums: dict, grad_norm, inputs, stop: StopOnSignal) -> None:
    """After an update: log every ``log_every`` steps (and the first and last), checkpoint every
    ``checkpoint_every`` steps (and the last), and stop with a checkpoint when a signal came.

    Raises:
        TrainingInterrupted: a SIGTERM/SIGINT was received (after the checkpoint is written).
    """
    r, acc = s.recipe, s.accelerator
    knn = monitor_step(s, step)
    if sums and (step % r.log_every == 0 or step == r.steps or first or knn is not None):
        extra = {MONITOR_COLUMN: "" if knn is None else knn} if r.monitor_every else None
        s.last = log_step(s, step, sums, grad_norm, s.t0, s.metrics, extra)
        s.bar.set_postfix({k: f"{v:.4f}" for k, v in s.last.items() if k in ("total", "mse", "at", "reward")})
        if s.policy_log is not None:
            s.policy_log.write(step, acc.unwrap_model(s.policy), inputs, s.last, s.entropy_weight(step))
    s.bar.update(1)
    saved = step % r.checkpoint_every == 0 or step == r.steps
    if saved:
        save_checkpoint(acc, s.run_dir, step, r.keep_checkpoints, s.model, s.ema)
    if stop.requested(acc, step, due=saved):  # several processes: checked at checkpoints and every few steps
        if not saved:
            save_checkpoint(acc, s.run_dir, step, r.keep_checkpoints, s.model, s.ema)
        raise interrupted(stop.signum, step, s.run_dir)


def monitor_step(s: Session, step: int) -> Optional[float]:
    """The kNN monitor at ``step`` when it is due (step 0, every ``monitor_every`` steps and the last; main process):
    a ``monitor.csv`` row, a tracker entry (``monitor/knn_top1``) and a log line. Returns its top-1 (percent), or
    None when not due."""
    r = s.recipe
    if s.monitor is None or not (step == 0 or step % r.monitor_every == 0 or step == r.steps):
        return None
    s.monitor_last = {"step": step, **s.monitor(s.accelerator.unwrap_model(s.model).student.model)}
    s.monitor_log.write(s.monitor_last)
    if r.log_with:
        s.accelerator.log({"monitor/knn_top1": s.monitor_last["knn_top1"]}, step=step)
    m = s.monitor_last
    line = (f"step {step}/{r.steps} | monitor kNN top-1 {m['knn_top1']:.2f}% (k={m['k']}, {m['train_images']} train / "
            f"{m['test_images']} test images, {m['seconds']:.1f}s)")
    if s.text_log is not None:
        s.text_log.write(line)  # train.log (and stdout when no bar is drawn)
    else:
        _logger.info(line)
    return s.monitor_last["knn_top1"]


def interrupted(signum: int, step: int, run_dir: Path) -> TrainingInterrupted:
    """The exception that ends a run stopped by a signal, saying how to continue."""
    return TrainingInterrupted(
        f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint written to "
        f"{run_dir / f'checkpoint-{step}'}. Continue with the same recipe plus {option('resume', flag=True)}.",
        signum)  # the distill command adds the exact command line (distill.cli.resume_command)


def finish(s: Session) -> dict:
    """The run's summary (``summary.json`` on the main process)."""
    elapsed = time.time() - s.t0
    summary = {"steps": s.recipe.steps, "final_losses": s.last, "skipped_steps": s.skipped,
               "seconds": round(elapsed, 1), "img_per_s": round(s.seen / max(elapsed, 1e-9), 1),
               "run_dir": str(s.run_dir), "checkpoint": str(latest_checkpoint(s.run_dir)),
               "timesteps_used": s.resolved["timesteps_used"]}
    if s.policy_log is not None and s.accelerator.is_main_process:
        summary["policy"] = s.policy_log.summary()
    if s.monitor_last is not None:
        summary["monitor"] = s.monitor_last
    summary["cost"] = s.cost.summary(summary["img_per_s"])
    if s.accelerator.is_main_process:
        write_summary(s.run_dir, summary)
    return summary
