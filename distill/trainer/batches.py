"""The training batch stream: epochs reshuffled from the seed, so a resumed run sees the same batches."""
from __future__ import annotations

import os
from typing import Iterator

import torch

from ..build import build_loader
from ..config import Recipe


def epoch_batches(ds, recipe: Recipe, accelerator, start_step: int) -> Iterator:
    """Infinite stream of collated batches on the device, starting after ``start_step`` optimizer steps
    (``grad_accum_steps`` micro-batches each); epoch ``e`` is shuffled with seed ``recipe.seed * 100003 + e``."""
    per_step = recipe.grad_accum_steps
    g = torch.Generator()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # processes on this machine
    loader = build_loader(ds, recipe, g, processes=local, pin_memory=accelerator.device.type == "cuda")
    loader = accelerator.prepare_data_loader(loader, device_placement=True)
    n = len(loader)
    micro = start_step * per_step
    epoch, skip = divmod(micro, n)
    it = loader
    try:
        while True:
            g.manual_seed(recipe.seed * 100003 + epoch)
            it = accelerator.skip_first_batches(loader, skip) if skip else loader
            for batch in it:
                yield batch
            epoch, skip = epoch + 1, 0
    finally:  # on close(): stop the loader's workers now; they ignore SIGTERM, so an exit must not leave it to
        for dl in {id(loader): loader, id(it): it}.values():  # multiprocessing's atexit terminate-and-join
            shutdown_workers(dl)


def shutdown_workers(loader) -> None:
    """Stop the worker processes of ``loader``'s live iterator (persistent workers), if it has any. Uses torch's
    ``_MultiProcessingDataLoaderIter._shutdown_workers`` (what its ``__del__`` calls): there is no public call."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
