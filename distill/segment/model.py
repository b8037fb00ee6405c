"""Segmentation models: a multi-scale backbone (exported student, ``timm:NAME`` at random init, or a frozen diffusion
teacher's own block features) and a light decoder that predicts one class score per pixel at the input size.

``SegModel.forward`` takes images in [0, 1] (``[B, 3, H, W]``) and does its backbone's preprocessing itself (mean/std
for a timm backbone; [-1, 1] at the teacher's size for a teacher), so a student and a teacher are probed alike.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import to_teacher
from ..vocab import SEG_DECODERS


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class FPNDecoder(nn.Module):
    """Semantic FPN (Kirillov et al., Panoptic FPN, CVPR 2019, semantic branch, shortened to one conv per level):
    1x1 laterals (BN+ReLU) to ``width``, top-down sum, a 3x3 conv per level, every level upsampled to the finest one
    and summed, a 3x3 conv and a 1x1 classifier.

    ``forward(feats: list of [B, C_i, H_i, W_i], finest first) -> [B, num_classes, H_0, W_0]``.
    """

    def __init__(self, channels: Sequence[int], num_classes: int, width: int = 128, dropout: float = 0.1):
        super().__init__()
        self.laterals = nn.ModuleList(_conv_bn_relu(c, width, 1) for c in channels)
        self.smooth = nn.ModuleList(_conv_bn_relu(width, width, 3) for _ in channels)
        self.fuse = _conv_bn_relu(width, width, 3)
        self.drop = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        lat = [lateral(f) for lateral, f in zip(self.laterals, feats)]  # each (B, width, H_i, W_i)
        for i in range(len(lat) - 2, -1, -1):  # top-down: coarse into fine
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="bilinear", align_corners=False)
        size = lat[0].shape[-2:]
        x = sum(F.interpolate(s(p), size=size, mode="bilinear", align_corners=False) if k else s(p)
                for k, (s, p) in enumerate(zip(self.smooth, lat)))  # (B, width, H_0, W_0)
        return self.classifier(self.drop(self.fuse(x)))


class LinearDecoder(nn.Module):
    """The dense linear probe: every level upsampled (bilinear) to the finest one, concatenated, BatchNorm (no affine),
    one 1x1 conv. ``forward(feats) -> [B, num_classes, H_0, W_0]``."""

    def __init__(self, channels: Sequence[int], num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(sum(channels), affine=False)
        self.classifier = nn.Conv2d(sum(channels), num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        x = torch.cat([F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False) for f in feats], 1)
        return self.classifier(self.bn(x))


class TimmBackbone(nn.Module):
    """A timm ``features_only`` model; normalises [0, 1] input with ``mean``/``std``. Levels finest first.

    With ``drop_stem`` a CNN's stride-2 stem level is dropped (levels at strides 4..32, as FPN segmentation heads
    take them); pass False for a model built with explicit ``out_indices``.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], drop_stem: bool = True):
        super().__init__()
        self.model = model
        red = list(model.feature_info.reduction())
        self.keep = list(range(1, len(red))) if drop_stem and len(red) == 5 and red[0] == 2 else list(range(len(red)))
        self.channels = [model.feature_info.channels()[i] for i in self.keep]
        self.reductions = [red[i] for i in self.keep]
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.model((x - self.mean) / self.std)
        return [feats[i] for i in self.keep]


class TeacherBackbone(nn.Module):
    """A frozen diffusion teacher's block features (one map per block x timestep, fresh noise each call) as levels,
    ordered finest first. Input [0, 1] is turned into the teacher's input (:func:`distill.data.to_teacher`)."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher
        info = sorted(teacher.feature_info, key=lambda f: f.reduction)  # finest first
        self.keys = [f.key for f in info]
        self.channels = [f.num_chs for f in info]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # always frozen
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.teacher(to_teacher(x, self.teacher.in_channels, self.teacher.sample_size))
        return [feats[k].float() for k in self.keys]


class SegModel(nn.Module):
    """``backbone`` + ``decoder``; logits upsampled (bilinear) to the input size.

    ``forward(x [B, 3, H, W] in [0, 1]) -> logits [B, num_classes, H, W]``. With ``freeze_backbone`` the backbone
    has no gradients and stays in eval mode (BatchNorm statistics frozen): the dense linear probe.
    """

    def __init__(self, backbone: nn.Module, decoder: nn.Module, freeze_backbone: bool = False):
        super().__init__()
        self.backbone, self.decoder, self.freeze_backbone = backbone, decoder, freeze_backbone
        if freeze_backbone:
            for p in backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze_backbone:
            with torch.no_grad():
                feats = self.backbone(x)
        else:
            feats = self.backbone(x)
        logits = self.decoder(feats)  # (B, K, H_0, W_0)
        return F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_decoder(name: str, channels: Sequence[int], num_classes: int, width: int = 128) -> nn.Module:
    """``'fpn'`` (:class:`FPNDecoder`) or ``'linear'`` (:class:`LinearDecoder`).

    Raises:
        ValueError: an unknown ``name`` (valid: :data:`distill.vocab.SEG_DECODERS`).
    """
    if name == "fpn":
        return FPNDecoder(channels, num_classes, width)
    if name == "linear":
        return LinearDecoder(channels, num_classes)
    raise ValueError(f"--decoder {name!r} is not valid; valid: {', '.join(SEG_DECODERS)}.")


def timm_features(source, levels: Optional[Sequence[int]], like_config: Optional[dict] = None) -> nn.Module:
    """A timm ``features_only`` model of a :class:`distill.finetune.ModelSource`: the export's weights, or random
    init (call under a seeded RNG) with ``--like``'s model arguments when the architecture matches.

    ``levels``: timm ``out_indices``; default all levels (:class:`TimmBackbone` drops a CNN's stride-2 one).
    """
    import timm

    from ..export import read_export

    kwargs = {"features_only": True}
    if source.kind == "exported":
        read_export(str(source.path), "--model")
        name, pretrained = f"local-dir:{source.path}", True
        model_args = source.config.get("model_args", {})
    else:
        name, pretrained = source.name, False
        model_args = like_config.get("model_args", {}) if like_config and \
            like_config.get("architecture") == source.name else {}
    kwargs.update({k: v for k, v in model_args.items() if k not in ("num_classes", "global_pool")})
    if levels is not None:
        kwargs["out_indices"] = tuple(levels)
    return timm.create_model(name, pretrained=pretrained, **kwargs)
