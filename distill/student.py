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


VIT_PREFIXES = ("vit_", "deit_", "eva", "beit")  # families whose position embedding timm resizes per input


def fixed_input_size(name: str) -> Optional[int]:
    """The input side a timm model is built for when its family has a fixed one (timm's ``pretrained_cfg``
    ``fixed_input_size``: ViT, DeiT, Swin, MaxViT, CoAtNet, CaiT, ...), else None (any size works: ResNet, ConvNeXt,
    EfficientNet, RegNet, ...)."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not getattr(cfg, "fixed_input_size", False):
        return None
    return int(cfg.input_size[-1])


def student_model_kwargs(name: str, img_size: int, model_kwargs: Optional[Mapping[str, Any]] = None) -> dict:
    """The ``timm.create_model`` arguments of a student fed ``img_size`` px: the user's ``model_kwargs`` plus
    ``img_size`` for a fixed-input family (`fixed_input_size`) and ``dynamic_img_size=True`` for a ViT-like one.

    Raises:
        ValueError: ``model_kwargs['img_size']`` differs from ``img_size`` (the model would be built for one size and
            fed the other).
    """
    kwargs = dict(model_kwargs or {})
    given = kwargs.get("img_size")
    if given is not None:
        side = given if isinstance(given, int) else (list(given) if isinstance(given, (list, tuple)) else given)
        if side != img_size and side != [img_size, img_size]:
            raise ValueError(f"student_kwargs img_size={given!r} differs from student_size={img_size}: the student "
                             f"would be built for one size and fed the other. Fix: remove img_size from student_kwargs "
                             f"(distill sets it from student_size), or set student_size: {given}.")
    if fixed_input_size(name) is not None or name.startswith(VIT_PREFIXES):
        kwargs.setdefault("img_size", img_size)
    if name.startswith(VIT_PREFIXES):
        kwargs.setdefault("dynamic_img_size", True)
    return kwargs


def _create(name: str, img_size: int, kwargs: dict, pretrained: bool) -> nn.Module:
    """``timm.create_model(name, num_classes=0, **kwargs)``; a family that refuses ``img_size`` is named."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as e:
        own = fixed_input_size(name)
        if "img_size" in str(e) and own is not None:
            raise ValueError(f"student {name!r} takes only its own {own} px input (timm builds it for a fixed size and "
                             f"it has no img_size argument), but student_size is {img_size}. Fix: set student_size: "
                             f"{own}, or choose a family that takes any size (resnet18, convnext_atto) or sets it "
                             f"(vit_*, swin_*).") from None
        raise ValueError(f"student {name!r} does not take student_kwargs {kwargs}: {e}. Fix: remove or rename the "
                         f"argument (see the model's class in timm).") from None


def _multiples(size: int, step: int) -> list[int]:
    below = size // step * step
    return [below, below + step] if below >= step else [step, 2 * step]


def _size_error(name: str, model: nn.Module, img_size: int, why: str) -> str:
    """One message: the student cannot take ``img_size`` px, why, and sizes of the model's stride to try."""
    reductions = [f["reduction"] for f in getattr(model, "feature_info", None) or []] or [32]
    a, b = _multiples(img_size, max(reductions))
    return (f"student {name!r} cannot take student_size {img_size} px ({why}). Fix: set student_size to a size the "
            f"model takes, e.g. a multiple of its largest stride {max(reductions)} ({a} or {b}), or choose another "
            f"student.")


def check_patch_size(name: str, model: nn.Module, img_size: int) -> None:
    """A patch-embedding student (ViT, DeiT, EVA, Swin, ...) needs ``img_size`` to be a multiple of its patch size.

    Raises:
        ValueError: naming the student, the size, the patch size and the two nearest valid sizes.
    """
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return
    p = max(patch) if isinstance(patch, (tuple, list)) else int(patch)
    if img_size % p:
        a, b = _multiples(img_size, p)
        raise ValueError(f"student_size {img_size} is not a multiple of the patch size {p} of student {name!r} (a "
                         f"{img_size % p} px border would be cut off or refused). Fix: set student_size: {a} or {b}, or "
                         f"a patch_size in student_kwargs that divides {img_size}.")


class Student(nn.Module):
    """Wraps a timm backbone and returns a list of NCHW feature maps, finest first.

    Args:
        name: a timm model name (``resnet18``, ``convnext_atto``, ``vit_tiny_patch16_224``...).
        img_size: the student's input size in pixels (the input is resized to it).
        indices: which ``forward_intermediates`` outputs to use. Default: the last 4 stages of a CNN, or 4
            evenly spaced blocks of a ViT-like model (all blocks share one stride).
        model_kwargs: extra ``timm.create_model`` arguments (``patch_size=4``, ``drop_path_rate=0.1``...). A family
            with a fixed input size (timm's ``fixed_input_size``: ViT, DeiT, Swin, MaxViT, CoAtNet, ...) gets
            ``img_size`` automatically, ViT-like ones also ``dynamic_img_size=True`` (`student_model_kwargs`).

    Raises:
        ValueError: an unknown name, arguments the model does not take, a size that is not a multiple of the patch
            size, or any size the model refuses (timm's assertion is quoted, with sizes to try).
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
        img_size = int(img_size)
        kwargs = student_model_kwargs(name, img_size, model_kwargs)
        self.model = _create(name, img_size, kwargs, pretrained)
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(
                f"student {name!r} has no forward_intermediates in timm {timm.__version__}; pick a ResNet, ConvNeXt, "
                f"EfficientNet, RegNet, ViT, DeiT, EVA or Swin model."
            )
        if not kwargs.get("dynamic_img_pad"):  # timm pads a partial patch only when asked to
            check_patch_size(name, self.model, img_size)
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
        try:
            self.feature_info = self._dry_run()
        except (AssertionError, RuntimeError, ValueError) as e:  # timm's own shape checks, e.g. a window size
            raise ValueError(_size_error(name, self.model, img_size, f"timm says: {e}")) from None

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
        """Channels of each returned map, finest first (``feature_info[l].num_chs``)."""
        return [f.num_chs for f in self.feature_info]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """``(H, W)`` in pixels of each returned map at ``img_size``, finest first."""
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
        """``x``: normalised images ``[B, 3, S, S]`` -> one prediction ``[B, C_k, H_k, W_k]`` per teacher feature, in
        the regressor's target order."""
        return self.regressor(self.student(x))
