"""Many segmentation runs: one per (fraction, seed) in ``OUT/frac{F}-seed{S}/``, through the classification
fine-tune's sweep (:func:`distill.finetune.finetune_sweep`: every setting checked before the first run)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..finetune.sweep import finetune_sweep
from .config import SegmentConfig
from .run import segment_finetune


def segment_sweep(cfg: SegmentConfig, output_dir: str, fractions: Sequence[float], seeds: Sequence[int],
                  overwrite: bool = False, skip_existing: bool = False, progress: bool = True,
                  on_result: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """:func:`segment_finetune` per (fraction, seed); see :func:`distill.finetune.finetune_sweep`."""
    return finetune_sweep(cfg, output_dir, fractions, seeds, overwrite=overwrite, skip_existing=skip_existing,
                          progress=progress, on_result=on_result, run=segment_finetune)
