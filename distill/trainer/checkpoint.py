"""Training checkpoints: Accelerate's full state (model, optimizers, RNG), written complete or not at all.

A checkpoint is ``RUN/checkpoint-{step}/`` (see `distill.rundir`). Every process writes its part into one
temporary directory; the main process settles it (umask modes, every file and the directory fsync'd) and renames it
into place (`distill.atomic.commit_dir`), so resume never sees a half-written checkpoint. A write that fails
(disk full, read-only, ...) removes the temporary directory and raises `WriteError` with the
space the checkpoint needs. On load, the checkpoint is checked first (`distill.rundir.checkpoint_problem`:
a damaged file is named) and every pickle is read with ``weights_only=True``.
"""
from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path

from ..atomic import commit_dir, temp_path, writing
from ..errors import UnreadableFileError, UntrustedCheckpointError, option
from ..integrity import error_text
from ..rundir import checkpoint_dir, checkpoint_problem, checkpoint_step, list_checkpoints

_logger = logging.getLogger(__name__)


def state_bytes(accelerator) -> int:
    """Bytes of the tensors a checkpoint holds: every prepared model's state dict and optimizer state (the size
    estimate a failed write reports)."""
    import torch

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    total = sum(t.numel() * t.element_size() for m in getattr(accelerator, "_models", [])
                for t in tensors(m.state_dict()))
    return total + sum(t.numel() * t.element_size() for o in getattr(accelerator, "_optimizers", [])
                       for t in tensors(o.state_dict().get("state", {})))


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int, model=None, ema=None) -> Path:
    """Write ``RUN/checkpoint-{step}`` and keep the newest ``keep`` checkpoints that are whole (older ones, and
    older damaged ones, are deleted). Call on every process. ``ema`` (a `StudentEma`)
    is written by the main process as ``ema.safetensors`` in the same checkpoint.

    With several processes, BN running statistics are averaged first (``model`` given): DDP broadcasts buffers
    only at the start of a forward, so they end rank-local (timm's ``distribute_bn``).

    Raises:
        WriteError: the checkpoint could not be written (disk full, read-only, ...): the message says where and how
            much space it needs; the temporary directory is removed and older checkpoints are kept.
    """
    final = checkpoint_dir(run_dir, step)
    if model is not None and accelerator.num_processes > 1:
        from timm.utils import distribute_bn

        distribute_bn(model, accelerator.num_processes, reduce=True)
    tmp = temp_path(final, token="writing")  # the same name on every process
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    what, needed = f"checkpoint-{step}", state_bytes(accelerator)
    try:
        with writing(what, final, needed, tmp):
            save_state(accelerator, tmp)
            if ema is not None and accelerator.is_main_process:
                ema.save(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            commit_dir(tmp, final, what, needed)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        prune_checkpoints(run_dir, step, keep)
    accelerator.wait_for_everyone()
    return final


def save_state(accelerator, directory: Path) -> None:
    """``accelerator.save_state(directory)`` with each file written by one process. Accelerate writes the files
    all processes share (model, optimizers, schedulers, samplers) on the main process only and the RNG states per
    process (``random_states_{i}.pkl``), but the fp16 GradScaler's ``scaler.pt`` with a plain ``torch.save`` on
    every process (``accelerate/checkpointing.py``, ``save_accelerator_state``): N writers of one file, a partial
    file on shared storage. Its state is the same on every process (its overflow checks see the all-reduced
    gradients), so the other processes save with the scaler set aside."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and not accelerator.is_main_process:
        accelerator.scaler = None
        try:
            accelerator.save_state(str(directory), safe_serialization=True)
        finally:
            accelerator.scaler = scaler
    else:
        accelerator.save_state(str(directory), safe_serialization=True)


def prune_checkpoints(run_dir: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` whole checkpoints (by header and zip structure) up to ``step``; delete the other
    checkpoints older than ``step``, damaged ones included (a damaged one never counts as one of the ``keep``)."""
    ckpts = [(s, p) for s, p in list_checkpoints(run_dir) if s <= step]
    whole = [s for s, p in ckpts if checkpoint_problem(p, deep=False) is None][-keep:]
    for s, p in ckpts:
        if s not in whole and s < step:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(accelerator, ckpt: Path) -> int:
    """Restore model, optimizer and RNG states from ``ckpt``; returns its step. The checkpoint is checked first
    (`distill.rundir.checkpoint_problem`) and every pickle is read with ``torch.load(weights_only=True)``.

    Raises:
        UntrustedCheckpointError: a file would import or call code when unpickled.
        UnreadableFileError: a file of the checkpoint is empty, truncated or damaged (named in the message).
    """
    unexpected = sorted(p.name for p in ckpt.glob("custom_checkpoint_*"))
    if unexpected:
        raise UntrustedCheckpointError(
            f"checkpoint '{ckpt}' holds {unexpected}, which Accelerate would unpickle with weights_only=False "
            f"(able to run code); distill never writes them. Delete them if you trust the checkpoint's source."
        )
    # Accelerate ignores a random_states file it cannot read (resume would silently lose determinism): every file
    # is read first with the same weights_only loader, so a bad one is an error naming it.
    problem = checkpoint_problem(ckpt)
    if problem:
        raise UnreadableFileError(f"cannot resume from checkpoint '{ckpt}': {problem}. Fix: delete or restore that "
                                  f"checkpoint; {option('resume', flag=True)} then continues from the newest one "
                                  f"that loads.", ckpt)
    try:
        accelerator.load_state(str(ckpt))  # weights_only=True for optimizer.bin and random_states_*.pkl
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpointError(
            f"refused to load checkpoint '{ckpt}': a file in it is a pickle that would import or call code, which "
            f"torch.load(weights_only=True) does not allow. Only resume checkpoints you wrote. ({str(e)[:300]})"
        ) from e
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as e:
        raise UnreadableFileError(f"cannot resume from checkpoint '{ckpt}': {error_text(e, 300)}", ckpt) from e
    return checkpoint_step(ckpt)
