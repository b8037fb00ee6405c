"""Batch augmentation with kornia, applied once so teacher and student see the same geometric view."""
from __future__ import annotations

import kornia.augmentation as K
import torch.nn as nn

from .vocab import AUGMENTS


def build_augment(name: str, size: int) -> nn.Module:
    """Augmentation on a ``[B, C, size, size]`` batch in [0, 1] (run on the device, before the teacher/student split).

    ``'none'``; ``'flip'`` (horizontal flip, DreamTeacher's ImageNet setting); ``'crop-flip'`` (random resized crop,
    scale 0.5-1, back to ``size``, plus flip).
    """
    if name == "none":
        return nn.Identity()
    if name == "flip":
        return K.AugmentationSequential(K.RandomHorizontalFlip())
    if name == "crop-flip":
        return K.AugmentationSequential(
            K.RandomResizedCrop((size, size), scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)),
            K.RandomHorizontalFlip(),
        )
    raise ValueError(f"unknown augment {name!r}; valid: {', '.join(AUGMENTS)}.")
