"""Batch augmentation with kornia, in one place: the distillation / classification views (`build_augment`),
the joint image + mask views of segmentation (`JointAugment`, `build_joint_augment`), and
`SeededAugment`, which runs any of them on its own RNG stream."""
from __future__ import annotations

from typing import Optional, Sequence

import kornia.augmentation as K
import torch
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


class JointAugment(nn.Module):
    """Random scale + crop (``RandomResizedCrop`` back to the input size, area ``scale``) and horizontal flip, applied
    to image and mask with the same parameters (kornia ``AugmentationSequential`` with ``data_keys=['input',
    'mask']``: bilinear for the image, nearest for the mask, so ids stay ids).

    ``forward(images [B, C, H, W] float, masks [B, H, W] int64) -> (images, masks)`` of the same shapes.
    """

    def __init__(self, size: Sequence[int], scale: tuple[float, float] = (0.25, 1.0), flip: bool = True):
        super().__init__()
        h, w = int(size[0]), int(size[1])
        ops = [K.RandomResizedCrop((h, w), scale=scale, ratio=(0.75 * w / h, 1.333 * w / h))]
        if flip:
            ops.append(K.RandomHorizontalFlip())
        self.aug = K.AugmentationSequential(*ops, data_keys=["input", "mask"])

    def forward(self, images: torch.Tensor, masks: torch.Tensor):
        x, m = self.aug(images, masks[:, None].float())
        return x, m[:, 0].round().long()


def build_joint_augment(name: str, size: Sequence[int], scale_min: float = 0.25) -> Optional[JointAugment]:
    """The segmentation augmentation ``name`` (`distill.vocab.AUGMENTS`) at ``size = (H, W)``: ``'crop-flip'``
    = random scale (area ``scale_min`` to 1) + crop back to ``size`` + flip; ``'flip'``; ``'none'`` gives None.

    Raises:
        ValueError: an unknown ``name`` (the valid ones listed).
    """
    if name == "crop-flip":
        return JointAugment(size, scale=(scale_min, 1.0), flip=True)
    if name == "flip":
        return JointAugment(size, scale=(1.0, 1.0), flip=True)
    if name == "none":
        return None
    raise ValueError(f"unknown augment {name!r}; valid: {', '.join(AUGMENTS)}.")


class SeededAugment:
    """Run an augmentation on its own RNG stream, so its draws do not depend on what else used the global RNG
    (model init, dropout): two runs with the same seed augment every batch identically."""

    def __init__(self, augment: nn.Module, seed: int, device: torch.device):
        self.augment, self.device = augment, torch.device(device)
        self._cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=self._cuda):
            torch.manual_seed(seed)
            self._state = self._get()

    def _get(self):
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self._cuda else None)

    def __call__(self, *x: torch.Tensor):
        """``augment(*x)`` on this stream (one batch, or e.g. images and masks for a joint augmentation)."""
        with torch.random.fork_rng(devices=self._cuda):
            torch.set_rng_state(self._state[0])
            if self._cuda:
                torch.cuda.set_rng_state(self._state[1], self.device)
            out = self.augment(*x)
            self._state = self._get()
        return out
