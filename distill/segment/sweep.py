"""Many segmentation runs: one per (fraction, seed) in ``OUT/frac{F}-seed{S}/``, all checked before the first
(`distill.tune.sweep`)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..tune.sweep import sweep
from .config import SegmentConfig
from .run import segment_finetune


def segment_sweep(cfg: SegmentConfig, output_dir: str, fractions: Sequence[float], seeds: Sequence[int],
                  overwrite: bool = False, skip_existing: bool = False, progress: bool = True,
                  on_result: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """`segment_finetune` per (fraction, seed); see `distill.tune.sweep`."""
    return sweep(cfg, output_dir, fractions, seeds, segment_finetune, overwrite=overwrite,
                 skip_existing=skip_existing, progress=progress, on_result=on_result)
