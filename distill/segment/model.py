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
from ..errors import option
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


class SimplePyramid(nn.Module):
    """The simple feature pyramid of ViTDet (Li et al., "Exploring Plain Vision Transformer Backbones for Object
    Detection", ECCV 2022, Fig. 2c; detectron2 ``SimpleFeaturePyramid``): from a plain ViT's single map at stride
    ``s``, maps at strides ``s/4`` (two 2x2 deconvolutions, LayerNorm + GELU between), ``s/2`` (one deconvolution),
    ``s`` (the map) and ``2s`` (2x2 max pool), with ``C/4, C/2, C, C`` channels. The FPN decoder's laterals then
    play the role of ViTDet's per-level 1x1 + 3x3 convolutions.

    ``forward(x [B, C, H, W]) -> [[B, C/4, 4H, 4W], [B, C/2, 2H, 2W], x, [B, C, ceil(H/2), ceil(W/2)]]``.
    """

    def __init__(self, dim: int):
        super().__init__()
        from timm.layers import LayerNorm2d

        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                                 nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim // 2, 2, 2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)
        self.channels = [dim // 4, dim // 2, dim, dim]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.up4(x), self.up2(x), x, self.down2(x)]


class TimmBackbone(nn.Module):
    """A timm ``features_only`` model; normalises [0, 1] input with ``mean``/``std``. Levels finest first, NCHW.

    With ``drop_stem`` a CNN's stride-2 stem level is dropped (levels at strides 4..32, as FPN segmentation heads
    take them); pass False for a model built with explicit ``out_indices``. Maps a model gives channels-last (timm's
    ``output_fmt`` NHWC: Swin, MaxViT's ``features_only``) are permuted to NCHW. A plain ViT (every level at one
    stride, timm's ``forward_intermediates``) gives its last map through `SimplePyramid` (strides 4..32 for
    patch 16). ``pad_multiple``: the input side must be a multiple of it (ViT patch, Swin's 32; `SegModel`
    pads); ``fixed_size``: a model that takes one input size only gets its input resized to it.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], drop_stem: bool = True,
                 pad_multiple: Optional[int] = None, fixed_size: Optional[Sequence[int]] = None):
        super().__init__()
        self.model = model
        red = list(model.feature_info.reduction())
        chans = list(model.feature_info.channels())
        self.nhwc = str(getattr(model, "output_fmt", "NCHW")).upper().endswith("NHWC")
        self.pyramid = None
        if drop_stem and len(set(red)) == 1 and red[0] >= 8:  # plain ViT: one stride; ViTDet's pyramid
            self.keep = [len(red) - 1]
            self.pyramid = SimplePyramid(chans[-1])
            self.channels = self.pyramid.channels
            self.reductions = [red[-1] // 4, red[-1] // 2, red[-1], red[-1] * 2]
        else:
            self.keep = list(range(1, len(red))) if drop_stem and len(red) == 5 and red[0] == 2 else \
                list(range(len(red)))
            self.channels = [chans[i] for i in self.keep]
            self.reductions = [red[i] for i in self.keep]
        self.pad_multiple = pad_multiple
        self.fixed_size = tuple(fixed_size) if fixed_size is not None else None
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fixed_size is not None and tuple(x.shape[-2:]) != self.fixed_size:
            x = F.interpolate(x, size=self.fixed_size, mode="bilinear", align_corners=False, antialias=True)
        feats = self.model((x - self.mean) / self.std)
        feats = [feats[i].permute(0, 3, 1, 2) if self.nhwc else feats[i] for i in self.keep]  # NHWC -> NCHW
        return self.pyramid(feats[0]) if self.pyramid is not None else feats


class TeacherBackbone(nn.Module):
    """A frozen diffusion teacher's block features (one map per block x timestep, fresh noise each call) as levels,
    ordered finest first. Input [0, 1] is turned into the teacher's input (`distill.data.to_teacher`)."""

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
        """``nn.Module.train``, except that a frozen backbone (``freeze_backbone``) stays in eval mode."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: images ``[B, 3, H, W]`` in [0, 1] -> logits ``[B, num_classes, H, W]`` (a transformer backbone's
        input is padded to its patch / window multiple and the logits cropped back)."""
        h, w = x.shape[-2:]
        m = getattr(self.backbone, "pad_multiple", None)
        if m:  # a transformer's patch / window grid: pad bottom-right, crop the logits back
            x = F.pad(x, (0, (-w) % m, 0, (-h) % m))
        if self.freeze_backbone:
            with torch.no_grad():
                feats = self.backbone(x)
        else:
            feats = self.backbone(x)
        logits = self.decoder(feats)  # (B, K, H_0, W_0)
        logits = F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


def build_decoder(name: str, channels: Sequence[int], num_classes: int, width: int = 128) -> nn.Module:
    """``'fpn'`` (`FPNDecoder`) or ``'linear'`` (`LinearDecoder`).

    Raises:
        ValueError: an unknown ``name`` (valid: `distill.vocab.SEG_DECODERS`).
    """
    if name == "fpn":
        return FPNDecoder(channels, num_classes, width)
    if name == "linear":
        return LinearDecoder(channels, num_classes)
    raise ValueError(f"{option('decoder')} {name!r} is not valid; valid: {', '.join(SEG_DECODERS)}.")


def _architecture(source, like_config: Optional[dict]) -> tuple[str, bool, dict]:
    """``(timm name to create, pretrained, model_args)`` of a model source."""
    if source.kind == "exported":
        return f"local-dir:{source.path}", True, dict(source.config.get("model_args", {}))
    same = like_config and like_config.get("architecture") == source.name
    return source.name, False, dict(like_config.get("model_args", {})) if same else {}


def timm_features(source, levels: Optional[Sequence[int]], like_config: Optional[dict] = None,
                  img_size: Optional[int] = None) -> nn.Module:
    """A timm ``features_only`` model of a `distill.finetune.ModelSource`: the export's weights, or random
    init (call under a seeded RNG) with ``--like``'s model arguments when the architecture matches.

    ``levels``: timm ``out_indices``; default all levels (`TimmBackbone` drops a CNN's stride-2 one); an index
    the model does not have is a ``ValueError`` naming its levels.
    ``img_size``: a fixed-input family (ViT, Swin, ...: `distill.student.fixed_input_size`) is built for this
    side (scratch; an export keeps the size it was trained at) with ``dynamic_img_size=True`` where timm offers it,
    so any input size (a multiple of its patch / window grid) runs.
    """
    import timm

    from ..export import read_export
    from ..student import VIT_PREFIXES

    if source.kind == "exported":
        read_export(str(source.path), option("model"))
    name, pretrained, model_args = _architecture(source, like_config)
    kwargs = {"features_only": True}
    kwargs.update({k: v for k, v in model_args.items() if k not in ("num_classes", "global_pool")})
    arch = source.config.get("architecture", "") if source.kind == "exported" else source.name
    if fixed_family(arch):
        if img_size is not None:
            kwargs.setdefault("img_size", int(img_size))
        kwargs.setdefault("dynamic_img_size", True)
    if levels is not None:
        kwargs["out_indices"] = tuple(levels)
    elif arch.startswith(VIT_PREFIXES):
        kwargs["out_indices"] = 1  # a plain ViT: its last block (forward_intermediates' last-n), for SimplePyramid

    def create(kw: dict) -> nn.Module:
        try:
            return timm.create_model(name, pretrained=pretrained, **kw)
        except TypeError as e:
            if "dynamic_img_size" not in str(e) or "dynamic_img_size" in model_args:
                raise
            kw = {k: v for k, v in kw.items() if k != "dynamic_img_size"}  # a fixed family without it: input
            return timm.create_model(name, pretrained=pretrained, **kw)  # resized to its size (TimmBackbone)

    try:
        return create(kwargs)
    except (IndexError, AssertionError) as e:  # timm's feature_info lookup of an out_indices entry out of range
        if levels is None:
            raise
        n = len(create({k: v for k, v in kwargs.items() if k != "out_indices"}).feature_info)
        raise ValueError(f"{option('levels')} {' '.join(map(str, levels))}: {arch or name} has {n} feature levels, "
                         f"0..{n - 1} (timm out_indices, stride 2 at 0 for CNNs); e.g. "
                         f"{' '.join(map(str, range(max(n - 4, 0), n)))}, or leave it out for strides 4..32.") from e


def fixed_family(arch: str) -> bool:
    """Whether timm builds ``arch`` for one input size (``img_size``): `distill.student.fixed_input_size` or
    a ViT-like family (`distill.student.VIT_PREFIXES`)."""
    import timm

    from ..student import VIT_PREFIXES, fixed_input_size

    return bool(arch) and (arch.startswith(VIT_PREFIXES) or (timm.is_model(arch) and fixed_input_size(arch) is not None))


def timm_backbone(source, levels: Optional[Sequence[int]], like_config: Optional[dict], mean: Sequence[float],
                  std: Sequence[float], img_size: Optional[int] = None) -> TimmBackbone:
    """`TimmBackbone` of `timm_features`, with the input grid a patch-embedding model needs: a multiple
    of its largest stride when its patch embedding takes any size (timm ``strict_img_size=False``, set by
    ``dynamic_img_size``), else its one built size (the input is resized to it)."""
    model = timm_features(source, levels, like_config, img_size)
    strict = [m.strict_img_size for m in model.modules() if isinstance(getattr(m, "strict_img_size", None), bool)]
    pad, fixed = None, None
    if strict and not any(strict):
        pad = max(model.feature_info.reduction())
    elif strict:
        side = next(m.img_size for m in model.modules() if getattr(m, "strict_img_size", None) is True)
        fixed = tuple(side) if isinstance(side, (tuple, list)) else (int(side), int(side))
    return TimmBackbone(model, mean, std, drop_stem=levels is None, pad_multiple=pad, fixed_size=fixed)
