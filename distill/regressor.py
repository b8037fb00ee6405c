"""Feature regressor: an FPN (optionally with a PPM) on the student's multi-scale features that predicts the
teacher's features, after DreamTeacher (Li et al., ICCV 2023, App. D.1).

It only exists during distillation: export keeps the student backbone and drops the regressor.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FeatureRegressor", "PyramidPooling", "default_sources"]


def default_sources(num_levels: int, target_sizes: Sequence[tuple[int, int]],
                    level_sizes: Sequence[tuple[int, int]]) -> list[int]:
    """For each target size, the index of the student level whose spatial size is closest.

    Distance is ``|log(h_l / h_t)| + |log(w_l / w_t)|`` (compared exactly, as a product of ratios), so a level
    twice as large is as far as one half as large; ties go to the finer (lower-index) level.

    Args:
        num_levels: number of student levels.
        target_sizes: ``(H, W)`` of each teacher feature.
        level_sizes: ``(H, W)`` of each student level, finest first.
    """
    if len(level_sizes) != num_levels:
        raise ValueError(f"level_sizes has {len(level_sizes)} entries {list(level_sizes)}; expected num_levels={num_levels}.")
    for size in (*target_sizes, *level_sizes):
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"sizes must be (H, W) with H, W > 0, got {tuple(size)}.")

    def dist(level: tuple[int, int], target: tuple[int, int]) -> Fraction:
        (hl, wl), (ht, wt) = level, target
        return max(Fraction(hl, ht), Fraction(ht, hl)) * max(Fraction(wl, wt), Fraction(wt, wl))

    return [min(range(num_levels), key=lambda i: (dist(level_sizes[i], t), i)) for t in target_sizes]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PyramidPooling(nn.Module):
    """Pyramid pooling module (PSPNet, Zhao et al. CVPR 2017), laid out as in UperNet's head.

    Each scale ``s`` average-pools the input to ``s x s``, maps it to ``width`` channels (1x1 conv+BN+ReLU) and
    upsamples it back; the branches are concatenated with the input and fused by a 3x3 conv+BN+ReLU.
    """

    def __init__(self, in_channels: int, width: int, scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv_bn_relu(in_channels, width, 1)) for s in scales
        )
        self.bottleneck = _conv_bn_relu(in_channels + len(scales) * width, width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        size = x.shape[-2:]
        pooled = [F.interpolate(b(x), size=size, mode="bilinear", align_corners=False)  # each (B, width, H, W)
                  for b in self.branches]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))  # (B, C + S*width, H, W) -> (B, width, H, W)


class FeatureRegressor(nn.Module):
    """DreamTeacher feature regressor (Li et al., ICCV 2023, App. D.1): an FPN top-down path over the student's
    features, optionally with a PPM on the coarsest stage, and one 1x1 conv head per teacher feature.

    Per level ``l`` (finest first): ``lat_l = ReLU(BN(conv1x1(x_l)))`` (the PPM instead on the coarsest level when
    ``use_ppm``); top-down ``m_l = lat_l + up(m_{l+1})``; ``p_l = ReLU(BN(conv3x3(m_l)))``. Output ``i`` is
    ``head_i(p_{sources[i]})`` resized (bilinear, align_corners=False) to the teacher feature's size. Only the levels
    from the finest source upwards are built and computed; finer student features are checked but not read.

    The regressor is used only during distillation and is discarded at export; only the backbone is kept.

    Normalisation is BatchNorm, as in the paper. In train mode BN needs more than one value per channel, so a
    batch of 1 fails on 1x1 maps (the PPM's scale-1 branch, or a 1x1 coarsest level): train with batch > 1.

    Args:
        student_channels: channels of the student's features, finest first (ResNet-18: 64, 128, 256, 512).
        targets: ``(channels, (H, W))`` of each teacher feature to regress.
        sources: for each target, the student level whose FPN output regresses it. ``None``: the level closest
            in size (`default_sources`), which needs ``level_sizes``.
        width: channels of the FPN.
        use_ppm: put a pyramid pooling module on the coarsest level.
        ppm_scales: output sizes of the PPM's pooling branches.
        level_sizes: ``(H, W)`` of each student level, finest first; used only when ``sources`` is ``None``.
    """

    def __init__(self, student_channels: Sequence[int], targets: Sequence[tuple[int, tuple[int, int]]],
                 sources: Sequence[int] | None = None, width: int = 256, use_ppm: bool = False,
                 ppm_scales: Sequence[int] = (1, 2, 3, 6), level_sizes: Sequence[tuple[int, int]] | None = None):
        super().__init__()
        num_levels = len(student_channels)
        if num_levels == 0 or len(targets) == 0:
            raise ValueError(f"need at least one student level and one target, got student_channels="
                             f"{list(student_channels)} and targets={list(targets)}.")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}.")
        targets = [(int(c), (int(size[0]), int(size[1]))) for c, size in targets]
        if sources is None:
            if level_sizes is None:
                raise ValueError("sources=None needs level_sizes: pass sources=[level index per target] or "
                                 "level_sizes=[(H, W) per student level, finest first] to pick the closest level.")
            sources = default_sources(num_levels, [size for _, size in targets], level_sizes)
        if len(sources) != len(targets):
            raise ValueError(f"got {len(sources)} sources {list(sources)} for {len(targets)} targets; need one each.")
        for s in sources:
            if s not in range(num_levels):
                raise ValueError(f"source {s!r} is not a student level; valid: 0..{num_levels - 1}.")

        self.student_channels = tuple(int(c) for c in student_channels)
        self.targets = tuple(targets)
        self.sources = tuple(int(s) for s in sources)
        self.width, self.use_ppm, self.ppm_scales = width, use_ppm, tuple(ppm_scales)
        self.first_level = min(self.sources)  # finer levels never reach any output
        coarsest = num_levels - 1
        self.laterals = nn.ModuleDict({
            str(l): (PyramidPooling(c, width, self.ppm_scales) if use_ppm and l == coarsest
                     else _conv_bn_relu(c, width, 1))
            for l, c in enumerate(self.student_channels) if l >= self.first_level
        })
        self.smooth = nn.ModuleDict({str(l): _conv_bn_relu(width, width, 3) for l in sorted(set(self.sources))})
        self.heads = nn.ModuleList(nn.Conv2d(width, c, 1) for c, _ in self.targets)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Regress the teacher features from the student's, each ``(B, C_l, H_l, W_l)``, finest first."""
        got = [f.shape[1] if f.dim() == 4 else f"shape {tuple(f.shape)}" for f in feats]
        if got != list(self.student_channels):
            raise ValueError(f"expected {len(self.student_channels)} student features (B, C, H, W) with channels "
                             f"{list(self.student_channels)}, finest first; got {len(feats)} with channels {got}.")
        pyramid: dict[int, torch.Tensor] = {}
        merged = None
        for l in range(len(feats) - 1, self.first_level - 1, -1):  # coarsest to finest
            x = self.laterals[str(l)](feats[l])  # (B, width, H_l, W_l)
            if merged is not None:
                x = x + _resize(merged, x.shape[-2:])  # (B, width, H_{l+1}, W_{l+1}) -> (B, width, H_l, W_l)
            merged = x
            if str(l) in self.smooth:
                pyramid[l] = self.smooth[str(l)](merged)  # (B, width, H_l, W_l)
        return [_resize(head(pyramid[s]), size)  # (B, C_t, H_l, W_l) -> (B, C_t, H_t, W_t)
                for head, s, (_, size) in zip(self.heads, self.sources, self.targets)]


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
