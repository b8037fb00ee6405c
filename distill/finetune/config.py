"""The settings of one classification fine-tune, `FinetuneConfig`: the shared settings of
`distill.tune.TuneConfig` plus what classification alone reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import option
from ..tune.config import TuneConfig


@dataclass
class FinetuneConfig(TuneConfig):
    """One classification fine-tune. ``model`` is an exported student directory or ``timm:NAME`` (random init)."""

    dataset: Optional[str] = None  # default: the exported student's dataset, else fashion-mnist
    test_root: Optional[str] = None  # image-folder only; default: data_root (its test/ folder)
    layer_decay: Optional[float] = None  # layer-wise lr decay (timm create_optimizer_v2), e.g. 0.75; None: off
    backbone_lr_mult: float = 1.0  # lr factor on every parameter outside the new head (after layer_decay)
    eval_train: bool = False  # also report accuracy on the (unaugmented) labelled subset at the end

    def validate(self) -> None:
        """`TuneConfig.validate`, then the classification fields; raises ``ValueError`` naming the option."""
        super().validate()
        if self.layer_decay is not None and (isinstance(self.layer_decay, bool) or not 0 < self.layer_decay <= 1):
            raise ValueError(f"{option('layer_decay')} {self.layer_decay!r} is outside (0, 1]: give e.g. 0.75 (each "
                             "layer below the head learns at 0.75x the rate of the layer above), or leave it out.")
        if isinstance(self.backbone_lr_mult, bool) or not self.backbone_lr_mult > 0:
            raise ValueError(f"{option('backbone_lr_mult')} {self.backbone_lr_mult!r} must be > 0: give e.g. 0.1 (the "
                             f"backbone learns at a tenth of {option('lr')}, the new head at {option('lr')}), or 1 for "
                             "the same rate.")
