"""Many classification fine-tunes: one per (fraction, seed), each in ``OUT/frac{F}-seed{S}/``, all checked before the
first (`distill.tune.sweep`)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..tune.sweep import run_dir_name, sweep  # noqa: F401 (run_dir_name: imported from here before)
from .config import FinetuneConfig
from .run import finetune


def finetune_sweep(cfg: FinetuneConfig, output_dir: str, fractions: Sequence[float], seeds: Sequence[int],
                   overwrite: bool = False, skip_existing: bool = False, progress: bool = True,
                   on_result: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """`distill.finetune.finetune` per (fraction, seed); see `distill.tune.sweep`."""
    return sweep(cfg, output_dir, fractions, seeds, finetune, overwrite=overwrite, skip_existing=skip_existing,
                 progress=progress, on_result=on_result)
