"""The run's Accelerator: precision, exact gradient accumulation, trackers (checked before any training), and
each process's RNG seed."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import Recipe
from ..logs import check_tracker, start_trackers  # noqa: F401 (shared with fine-tuning; imported from here before)


def make_accelerator(recipe: Recipe, run_dir: Path):
    """An Accelerator for the recipe (precision, accumulation, tracker). The recipe's ``mixed_precision`` is passed
    only when set: null leaves it to Accelerate's configuration (``accelerate config``, ``accelerate launch
    --mixed_precision``, ``ACCELERATE_MIXED_PRECISION``), the run records the one used. AcceleratorState is a
    process-wide singleton that refuses a second Accelerator with another precision (a notebook running two
    recipes), so it is reset first; the process group (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    check_tracker(recipe.log_with)
    world = launched_processes()
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(
        mixed_precision=recipe.mixed_precision, gradient_accumulation_steps=recipe.grad_accum_steps,
        log_with=recipe.log_with, project_dir=str(run_dir),
        # under torchrun / accelerate launch --multi_gpu on a machine without GPU, Accelerate joins the processes
        # only when told to use the CPU (else each one trains alone: DistributedType.NO)
        cpu=world > 1 and not torch.accelerator.is_available(),
        # ViT students leave their final norm unused in forward_intermediates
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if acc.num_processes != world:
        raise ValueError(f"{world} processes were launched (WORLD_SIZE={world}) but Accelerate joined "
                         f"{acc.num_processes} ({acc.distributed_type}); each would train alone in the same run "
                         f"directory. Fix: launch with accelerate launch --multi_gpu --num_processes {world} -m "
                         f"distill.cli train ... (CPU or GPU), or one process.")
    return acc


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE`` of torchrun / ``accelerate launch``, MPI's sizes).

    Raises:
        ValueError: ``accelerate launch --cpu --num_processes N`` (N > 1) without MPI: Accelerate's ``--cpu`` launcher
            starts one process (it sets ``MASTER_ADDR`` for an MPI launch that did not happen), so the N processes
            asked for would silently be one. Told apart from a ``MASTER_ADDR`` / ``MASTER_PORT`` merely exported in
            the user's shell (common on clusters) by `set_by_launcher`: only ones the launcher added or changed
            are refused.
    """
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and (
            set_by_launcher("MASTER_ADDR") or set_by_launcher("MASTER_PORT")):
        raise ValueError("accelerate launch --cpu --num_processes N started one process: Accelerate's --cpu "
                         "launcher runs several processes only through MPI (--mpirun_hostfile), so the others would "
                         "silently not exist. Fix: accelerate launch --multi_gpu --num_processes N -m distill.cli "
                         "train ... (on a machine without GPU the processes train on the CPU, joined with gloo), "
                         "or --num_processes 1.")
    return 1


def set_by_launcher(name: str) -> bool:
    """Whether the environment variable ``name`` is set here but was not, or had another value, in the parent
    process (the launcher that started this one): Accelerate's simple launcher sets ``MASTER_ADDR`` and
    ``MASTER_PORT`` only for ``--num_processes`` > 1 (or several machines). False when the parent's environment
    cannot be read (the run is then not refused)."""
    value = os.environ.get(name)
    if not value:
        return False
    parent = parent_environ()
    return parent is not None and parent.get(name) != value


def parent_environ() -> "dict[str, str] | None":
    """The environment the parent process started with (psutil, a dependency of Accelerate); None when there is no
    parent or its environment cannot be read (another user's process, a platform without it)."""
    import psutil

    try:
        parent = psutil.Process().parent()
        return None if parent is None else parent.environ()
    except (psutil.Error, OSError, NotImplementedError):
        return None


def exact_accumulation(accelerator, grad_accum_steps: int) -> None:
    """Make every optimizer update use exactly ``grad_accum_steps`` micro-batches. Accelerate's default
    (``GradientAccumulationPlugin.sync_with_dataloader=True``) also forces a sync at the end of every pass over a
    prepared DataLoader, so with a number of batches per epoch that is not a multiple of ``grad_accum_steps`` some
    updates used fewer micro-batches, some steps made none, and a resume taken with a gradient pending differed."""
    accelerator.gradient_state.plugin_kwargs.update({"num_steps": grad_accum_steps, "sync_with_dataloader": False})


def process_seed(seed: int, process_index: int) -> int:
    """The RNG seed of process ``process_index``: ``seed`` for the main process (a 1-process run is unchanged),
    ``seed + 1_000_003 * process_index`` (mod 2**32) for the others, so every process draws its own diffusion noise
    and augmentation; reproducible, and restored per process by Accelerate on resume."""
    return (seed + 1_000_003 * process_index) % 2**32
