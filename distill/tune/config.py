"""The settings every supervised fine-tune reads, `TuneConfig`; each task's config
(`distill.finetune.FinetuneConfig`, `distill.segment.SegmentConfig`) adds only what that task reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import option
from ..vocab import AUGMENTS, MIXED_PRECISION, OPTIMIZERS, TRACKERS


@dataclass
class TuneConfig:
    """One fine-tuning run. ``model`` is an exported student directory or ``timm:NAME`` (random init)."""

    model: str
    data_root: Optional[str] = None
    fraction: float = 1.0  # of the training labels, seeded
    seed: int = 0  # subset, head init, data order, augmentation and dropout
    steps: int = 500  # optimizer steps: the same budget whatever the fraction
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    warmup_steps: int = 50
    augment: str = "crop-flip"
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # 0: no clipping
    eval_every: int = 100  # 0: evaluate only at the end
    eval_batch_size: int = 256
    log_every: int = 10
    size: Optional[int] = None  # input size (height); default: the task's
    mean: Optional[Sequence[float]] = None  # default: the export's, --like's, else the task's
    std: Optional[Sequence[float]] = None
    like: Optional[str] = None  # exported student whose size, mean/std (and model args) a timm:NAME run copies
    label: Optional[str] = None  # group name in reports; default '<arch> distilled' / '<arch> scratch'
    mixed_precision: Optional[str] = None  # None: Accelerate's configuration decides (accelerate launch / config)
    num_workers: int = 0
    save_model: bool = False  # write the fine-tuned model to OUT/model
    log_with: Optional[str] = None  # an Accelerate tracker (distill.vocab.TRACKERS), as distill train's log_with

    def validate(self) -> None:
        """Check every shared field; raises ``ValueError`` naming the setting as the caller spells it
        (`distill.errors.option`: ``--fraction`` on the command line, ``fraction`` from Python)."""
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or \
                not (0.0 < float(self.fraction) <= 1.0):
            raise ValueError(f"{option('fraction')} {self.fraction!r} is outside (0, 1]: give the share of training "
                             "labels to use, e.g. 0.01 for 1%, 0.1 for 10% or 1.0 for all.")
        for name, lo in (("steps", 1), ("batch_size", 1), ("eval_batch_size", 1), ("log_every", 1),
                         ("warmup_steps", 0), ("eval_every", 0), ("num_workers", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{option(name)} must be an integer >= {lo}; got {v!r}.")
        if not self.lr > 0:
            raise ValueError(f"{option('lr')} must be > 0; got {self.lr!r}.")
        if self.weight_decay < 0 or self.grad_clip < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError(f"{option('weight_decay')} and {option('grad_clip')} must be >= 0 and "
                             f"{option('label_smoothing')} in [0, 1); got {self.weight_decay}, {self.grad_clip}, "
                             f"{self.label_smoothing}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"{option('optimizer')} {self.optimizer!r} is not valid; valid: {', '.join(OPTIMIZERS)}.")
        if self.augment not in AUGMENTS:
            raise ValueError(f"{option('augment')} {self.augment!r} is not valid; valid: {', '.join(AUGMENTS)}.")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"{option('mixed_precision')} {self.mixed_precision!r} is not valid; valid: "
                             f"{', '.join(MIXED_PRECISION)}.")
        if self.log_with is not None and self.log_with not in TRACKERS:
            raise ValueError(f"{option('log_with')} {self.log_with!r} is not valid; valid: {', '.join(TRACKERS)} (or "
                             "leave it out for train_log.csv only).")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 8):
            raise ValueError(f"{option('size')} must be an integer >= 8; got {self.size!r}.")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) not in (1, 3):
                raise ValueError(f"{option(name)} takes 1 or 3 values (the model sees RGB); got {list(v)}.")
        if self.std is not None and any(float(s) <= 0 for s in self.std):
            raise ValueError(f"{option('std')} values must be > 0; got {list(self.std)}.")
