"""A timm student: ``create_model(name, num_classes=0)`` plus multi-scale features from ``forward_intermediates``.

Small datasets (28-32 px) are handled by an input resize: the student sees ``img_size`` pixels (64 by default
for ResNet/ConvNeXt, so ResNet-18 yields 16/8/4/2 maps), recorded in the exported ``pretrained_cfg``. No stem is
modified, so the exported model is a stock timm architecture that ``timm.create_model`` rebuilds exactly.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import timm
import torch
import torch.nn as nn


@dataclass(frozen=True)
class StudentFeatureInfo:
    index: int
    num_chs: int
    reduction: int
    size: tuple[int, int]


def check_student_name(name: str) -> None:
    """Raise a clear error for a model name timm does not know, with the closest names."""
    if timm.is_model(name):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f" Closest timm names: {', '.join(close)}." if close else ""
    raise ValueError(
        f"unknown student {name!r}: timm has no such model.{hint} See `timm.list_models('resnet*')` for the list; "
        f"tested students: resnet18, resnet50, convnext_atto, vit_tiny_patch16_224."
    )


def _is_vit_like(model: nn.Module) -> bool:
    info = getattr(model, "feature_info", None) or []
    reductions = {f["reduction"] for f in info}
    return len(info) > 4 and len(reductions) == 1


class Student(nn.Module):
    """Wraps a timm backbone and returns a list of NCHW feature maps, finest first.

    Args:
        name: a timm model name (``resnet18``, ``convnext_atto``, ``vit_tiny_patch16_224``...).
        img_size: the student's input size in pixels (the input is resized to it).
        indices: which ``forward_intermediates`` outputs to use. Default: the last 4 stages of a CNN, or 4
            evenly spaced blocks of a ViT-like model (all blocks share one stride).
        model_kwargs: extra ``timm.create_model`` arguments (``patch_size=4``, ``drop_path_rate=0.1``...). ViTs
            get ``img_size`` and ``dynamic_img_size=True`` automatically.
        pretrained: load timm's pretrained weights (needs the hub; off by default).
    """

    def __init__(
        self,
        name: str,
        img_size: int = 64,
        indices: Optional[Sequence[int]] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        pretrained: bool = False,
    ):
        super().__init__()
        check_student_name(name)
        kwargs = dict(model_kwargs or {})
        if name.startswith(("vit_", "deit_", "eva", "beit")):
            kwargs.setdefault("img_size", img_size)
            kwargs.setdefault("dynamic_img_size", True)
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(
                f"student {name!r} has no forward_intermediates in timm {timm.__version__}; pick a ResNet, ConvNeXt, "
                f"EfficientNet, RegNet, ViT, DeiT, EVA or Swin model."
            )
        self.name, self.img_size, self.model_kwargs = name, int(img_size), kwargs
        n_feat = len(getattr(self.model, "feature_info", []) or [])
        if indices is None:
            if _is_vit_like(self.model):
                indices = [round((i + 1) * n_feat / 4) - 1 for i in range(4)]
            else:
                indices = list(range(max(0, n_feat - 4), n_feat))
        indices = list(indices)
        bad = [i for i in indices if not -n_feat <= i < n_feat]
        if bad:
            raise ValueError(f"student_indices {bad} out of range for {name!r}, which has {n_feat} feature levels.")
        # forward_intermediates returns maps in network order whatever the order asked: keep ours sorted to match
        self.indices = sorted({i % n_feat for i in indices})
        self.feature_info = self._dry_run()

    @torch.no_grad()
    def _dry_run(self) -> list[StudentFeatureInfo]:
        was_training = self.training
        self.eval()
        p = next(self.model.parameters())
        feats = self.forward(torch.zeros(1, 3, self.img_size, self.img_size, device=p.device, dtype=p.dtype))
        self.train(was_training)
        return [StudentFeatureInfo(i, f.shape[1], self.img_size // f.shape[-1], tuple(f.shape[-2:]))
                for i, f in zip(self.indices, feats)]

    @property
    def channels(self) -> list[int]:
        return [f.num_chs for f in self.feature_info]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [f.size for f in self.feature_info]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``: ``[B, 3, img_size, img_size]`` normalised images -> maps ``[B, C_l, H_l, W_l]``, finest first."""
        return self.model.forward_intermediates(x, indices=self.indices, output_fmt="NCHW", intermediates_only=True)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled backbone features (the model's own head with ``num_classes=0``): ``[B, D]``."""
        return self.model(x)


class DistillModel(nn.Module):
    """Student + regressor in one module so Accelerate/DDP wraps both and forward is one call."""

    def __init__(self, student: Student, regressor: nn.Module):
        super().__init__()
        self.student, self.regressor = student, regressor

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.regressor(self.student(x))
