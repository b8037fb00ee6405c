"""Training checkpoints: Accelerate's full state (model, optimizers, RNG), written complete or not at all.

A checkpoint is ``RUN/checkpoint-{step}/`` (see :mod:`distill.rundir`). Every process writes its part into one
temporary directory; the main process fsyncs it and renames it into place (:func:`distill.atomic.commit_dir`),
so resume never sees a half-written checkpoint. On load, every pickle is read with ``weights_only=True``.
"""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

from ..atomic import commit_dir, temp_path
from ..errors import UntrustedCheckpointError
from ..rundir import checkpoint_dir, checkpoint_step, list_checkpoints


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int, model=None) -> Path:
    """Write ``RUN/checkpoint-{step}`` and keep the newest ``keep`` checkpoints. Call on every process.

    With several processes, BN running statistics are averaged first (``model`` given): DDP broadcasts buffers
    only at the start of a forward, so they end rank-local (timm's ``distribute_bn``).
    """
    final = checkpoint_dir(run_dir, step)
    if model is not None and accelerator.num_processes > 1:
        from timm.utils import distribute_bn

        distribute_bn(model, accelerator.num_processes, reduce=True)
    tmp = temp_path(final, token="writing")  # the same name on every process
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit_dir(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ckpt: Path) -> int:
    """Restore model, optimizer and RNG states from ``ckpt``; returns its step. Every pickle is read with
    ``torch.load(weights_only=True)``.

    Raises:
        UntrustedCheckpointError: a file would import or call code when unpickled.
    """
    unexpected = sorted(p.name for p in ckpt.glob("custom_checkpoint_*"))
    if unexpected:
        raise UntrustedCheckpointError(
            f"checkpoint '{ckpt}' holds {unexpected}, which Accelerate would unpickle with weights_only=False "
            f"(able to run code); distill never writes them. Delete them if you trust the checkpoint's source."
        )
    from accelerate.utils.other import load as accelerate_load

    try:
        # Accelerate ignores a random_states file it cannot read (resume would silently lose determinism):
        # read them first with the same weights_only loader, so a bad one is an error.
        for rng_file in sorted(ckpt.glob("random_states_*.pkl")):
            accelerate_load(rng_file)
        accelerator.load_state(str(ckpt))  # weights_only=True for optimizer.bin and random_states_*.pkl
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpointError(
            f"refused to load checkpoint '{ckpt}': a file in it is a pickle that would import or call code, which "
            f"torch.load(weights_only=True) does not allow. Only resume checkpoints you wrote. ({str(e)[:300]})"
        ) from e
    return checkpoint_step(ckpt)
