"""The run's Accelerator: precision, exact gradient accumulation, trackers (checked before any training), and
each process's RNG seed."""
from __future__ import annotations

from pathlib import Path

from ..config import Recipe
from ..logs import check_tracker  # noqa: F401 (shared with fine-tuning; imported from here before)


def make_accelerator(recipe: Recipe, run_dir: Path):
    """An Accelerator for the recipe (precision, accumulation, tracker). AcceleratorState is a process-wide
    singleton that refuses a second Accelerator with another precision (a notebook running two recipes), so it is
    reset first; the process group (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    check_tracker(recipe.log_with)
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        mixed_precision=recipe.mixed_precision, gradient_accumulation_steps=recipe.grad_accum_steps,
        log_with=recipe.log_with, project_dir=str(run_dir),
        # ViT students leave their final norm unused in forward_intermediates
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


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
