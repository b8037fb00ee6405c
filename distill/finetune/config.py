"""The settings of one fine-tuning run, :class:`FinetuneConfig`, and their checks (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..vocab import AUGMENTS, MIXED_PRECISION, OPTIMIZERS


@dataclass
class FinetuneConfig:
    """One fine-tuning run. ``model`` is an exported student directory or ``timm:NAME`` (random init)."""

    model: str
    dataset: Optional[str] = None  # default: the exported student's dataset, else fashion-mnist
    data_root: Optional[str] = None
    test_root: Optional[str] = None  # image-folder only; default: data_root (its test/ folder)
    fraction: float = 1.0  # of the training labels, stratified and seeded
    seed: int = 0  # subset, head init, data order and augmentation
    steps: int = 500  # optimizer steps: the same budget whatever the fraction
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    warmup_steps: int = 50
    layer_decay: Optional[float] = None  # layer-wise lr decay (timm create_optimizer_v2), e.g. 0.75; None: off
    backbone_lr_mult: float = 1.0  # lr factor on every parameter outside the new head (after layer_decay)
    augment: str = "crop-flip"
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # 0: no clipping
    eval_every: int = 100  # 0: evaluate only at the end
    eval_batch_size: int = 256
    log_every: int = 10
    size: Optional[int] = None  # input size; default: the export's, --like's, else 64
    mean: Optional[Sequence[float]] = None  # default: the export's, --like's, else the dataset's
    std: Optional[Sequence[float]] = None
    like: Optional[str] = None  # exported student whose size, mean/std (and model args) a timm:NAME run copies
    label: Optional[str] = None  # group name in reports; default '<arch> distilled' / '<arch> scratch'
    mixed_precision: str = "no"
    num_workers: int = 0
    eval_train: bool = False  # also report accuracy on the (unaugmented) labelled subset at the end
    save_model: bool = False  # write the fine-tuned model (with head) to OUT/model in timm format

    def validate(self) -> None:
        """Check every field; raises ``ValueError`` naming the command-line option (``--fraction``, ...)."""
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or \
                not (0.0 < float(self.fraction) <= 1.0):
            raise ValueError(f"--fraction {self.fraction!r} is outside (0, 1]: give the share of training labels "
                             f"to use, e.g. 0.01 for 1%, 0.1 for 10% or 1.0 for all.")
        for name, lo in (("steps", 1), ("batch_size", 1), ("eval_batch_size", 1), ("log_every", 1),
                         ("warmup_steps", 0), ("eval_every", 0), ("num_workers", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {lo}; got {v!r}.")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0; got {self.lr!r}.")
        if self.weight_decay < 0 or self.grad_clip < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--weight-decay and --grad-clip must be >= 0 and --label-smoothing in [0, 1); got "
                             f"{self.weight_decay}, {self.grad_clip}, {self.label_smoothing}.")
        if self.layer_decay is not None and (isinstance(self.layer_decay, bool) or not 0 < self.layer_decay <= 1):
            raise ValueError(f"--layer-decay {self.layer_decay!r} is outside (0, 1]: give e.g. 0.75 (each layer below "
                             f"the head learns at 0.75x the rate of the layer above), or leave it out.")
        if isinstance(self.backbone_lr_mult, bool) or not self.backbone_lr_mult > 0:
            raise ValueError(f"--backbone-lr-mult {self.backbone_lr_mult!r} must be > 0: give e.g. 0.1 (the backbone "
                             f"learns at a tenth of --lr, the new head at --lr), or 1 for the same rate.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer {self.optimizer!r} is not valid; valid: {', '.join(OPTIMIZERS)}.")
        if self.augment not in AUGMENTS:
            raise ValueError(f"--augment {self.augment!r} is not valid; valid: {', '.join(AUGMENTS)}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed-precision {self.mixed_precision!r} is not valid; valid: "
                             f"{', '.join(MIXED_PRECISION)}.")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 8):
            raise ValueError(f"--size must be an integer >= 8; got {self.size!r}.")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) not in (1, 3):
                raise ValueError(f"--{name} takes 1 or 3 values (the model sees RGB); got {list(v)}.")
        if self.std is not None and any(float(s) <= 0 for s in self.std):
            raise ValueError(f"--std values must be > 0; got {list(self.std)}.")
