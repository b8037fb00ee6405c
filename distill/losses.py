"""Feature-distillation losses: pure tensor functions, no hooks, no config.

The training objective is DreamTeacher's (Li et al., "DreamTeacher: Pretraining Image Backbones with Deep
Generative Models", ICCV 2023, arXiv 2307.07487)::

    L_feat = L_MSE + 10 * L_AT

with ``L_MSE`` the squared error between the regressor's prediction and the channel-whitened teacher feature
(`mse_loss`) and ``L_AT`` attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention",
ICLR 2017; `attention_transfer_loss`). All feature maps are NCHW.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .vocab import AT_MODES

AT_REDUCTIONS = ("mean", "sum")


def _check_same_shape(pred: Tensor, target: Tensor, name: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"{name}: pred and target must have the same shape, got pred {tuple(pred.shape)} "
            f"and target {tuple(target.shape)}; project the prediction to the teacher's channels and size first."
        )


def whiten(f: Tensor, eps: float = 1e-6) -> Tensor:
    """Non-learnable LayerNorm over channels: DreamTeacher's "whitening" of teacher features.

    For every sample b and position (h, w)::

        LN(f)[b, c, h, w] = (f[b, c, h, w] - mu[b, h, w]) / sqrt(var[b, h, w] + eps)

    with ``mu`` and the biased ``var`` taken over the channel dim c.

    Args:
        f: Feature map ``[B, C, H, W]``.
        eps: Added to the variance.

    Returns:
        The whitened map, same shape as ``f``.
    """
    # [B, C, H, W] -> [B, H, W, C] so layer_norm normalises the last (channel) dim, then back.
    return F.layer_norm(f.movedim(1, -1), (f.shape[1],), eps=eps).movedim(-1, 1)


def mse_loss(pred: Tensor, target: Tensor, whiten_target: bool = True) -> Tensor:
    """DreamTeacher's regression loss for one level (paper Eq. 2): ``mean((f_r - LN(f_g))^2)``.

    The mean runs over every element (batch, channels, positions), as ``F.mse_loss`` does.

    Args:
        pred: Regressor output ``f_r``, ``[B, C, H, W]``.
        target: Teacher feature ``f_g``, same shape.
        whiten_target: Apply `whiten` to the target first (DreamTeacher does).

    Raises:
        ValueError: If the shapes differ.
    """
    _check_same_shape(pred, target, "mse_loss")
    return F.mse_loss(pred, whiten(target) if whiten_target else target)


def _attention_2d(f: Tensor, p: float, reduction: str) -> Tensor:
    """Un-normalised attention map ``[B, 1, H, W]``: sum (or mean) over channels of ``|f_c|^p``."""
    if reduction not in AT_REDUCTIONS:
        raise ValueError(f"unknown attention reduction {reduction!r}; valid: {', '.join(AT_REDUCTIONS)}")
    a = f.abs().pow(p)  # [B, C, H, W]
    return a.mean(1, keepdim=True) if reduction == "mean" else a.sum(1, keepdim=True)  # [B, 1, H, W]


def attention_map(f: Tensor, p: float = 2, reduction: str = "mean") -> Tensor:
    """Spatial attention map of Zagoruyko & Komodakis (ICLR 2017), L2-normalised per sample.

    ::

        a(f) = vec(sum_c |f_c|^p) / || vec(sum_c |f_c|^p) ||_2

    The authors' code takes the mean over channels instead of the sum (``reduction='mean'``); the per-sample
    normalisation makes both identical. Each sample is normalised on its own (the unofficial DreamTeacher code
    normalises over the whole batch, which couples samples).

    Args:
        f: Feature map ``[B, C, H, W]``.
        p: Exponent.
        reduction: ``'mean'`` (authors' code) or ``'sum'`` (paper) over channels.

    Returns:
        ``[B, H * W]``, unit L2 norm per row.
    """
    return F.normalize(_attention_2d(f, p, reduction).flatten(1), dim=1)  # [B, H*W]


def attention_transfer_loss(student: Tensor, teacher: Tensor, p: float = 2, mode: str = "code") -> Tensor:
    """Attention transfer loss (Zagoruyko & Komodakis, ICLR 2017).

    With ``a_s = a(student)``, ``a_t = a(teacher)`` from `attention_map`:

    - ``mode='code'`` (the authors' code): ``mean_{b, j} (a_s[b, j] - a_t[b, j])^2``, mean over the batch and
      the H*W positions.
    - ``mode='paper'`` (paper Eq. 2): ``(1/B) sum_b || a_s[b] - a_t[b] ||_2`` (the norm, not squared).

    The channel counts may differ (the map is a reduction over channels). If the spatial sizes differ, the
    student's un-normalised map ``[B, 1, Hs, Ws]`` is resized bilinearly to the teacher's size before it is
    flattened and normalised, so the teacher's map is never altered (one of the two options the paper gives;
    pooling the larger one is the other).

    Args:
        student: Student (or regressor) feature ``[B, Cs, Hs, Ws]``.
        teacher: Teacher feature ``[B, Ct, Ht, Wt]``.
        p: Exponent of the attention map.
        mode: ``'code'`` or ``'paper'``.

    Raises:
        ValueError: On an unknown mode, or a batch-size mismatch.
    """
    if mode not in AT_MODES:
        raise ValueError(f"unknown attention transfer mode {mode!r}; valid: {', '.join(AT_MODES)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"attention_transfer_loss: batch sizes differ, student {tuple(student.shape)} "
            f"and teacher {tuple(teacher.shape)}"
        )
    a_s = _attention_2d(student, p, "mean")  # [B, 1, Hs, Ws]
    if a_s.shape[-2:] != teacher.shape[-2:]:
        a_s = F.interpolate(a_s, size=teacher.shape[-2:], mode="bilinear", align_corners=False)  # [B, 1, Ht, Wt]
    a_s = F.normalize(a_s.flatten(1), dim=1)  # [B, Ht*Wt]
    a_t = attention_map(teacher, p, "mean")  # [B, Ht*Wt]
    if mode == "code":
        return (a_s - a_t).pow(2).mean()
    return (a_s - a_t).norm(dim=1).mean()


def cosine_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - cos(pred, target)`` along the channel dim, averaged over the batch and positions.

    ::

        L_cos = mean_{b, h, w} (1 - <p, t> / (||p|| ||t||)),  p = pred[b, :, h, w], t = target[b, :, h, w]

    The target is used as given (no whitening); `feature_distillation_loss` decides what to pass. The
    loss is 0 for equal directions and 2 for opposite ones.

    Raises:
        ValueError: If the shapes differ.
    """
    _check_same_shape(pred, target, "cosine_loss")
    return (1 - F.cosine_similarity(pred, target, dim=1)).mean()  # [B, H, W] -> scalar


def feature_distillation_loss(
    preds: Sequence[Tensor],
    targets: Sequence[Tensor],
    mse_weight: float = 1.0,
    at_weight: float = 10.0,
    cos_weight: float = 0.0,
    at_mode: str = "code",
) -> dict[str, Tensor]:
    """DreamTeacher's ``L_feat = L_MSE + 10 * L_AT`` over L levels (paper Eq. 2-4), plus an optional cosine term.

    ::

        mse   = (1/L) sum_l mse_loss(f_r^l, f_g^l)                  (target whitened)
        at    = (1/L) sum_l attention_transfer_loss(f_r^l, f_g^l)   (target raw)
        cos   = (1/L) sum_l cosine_loss(f_r^l, LN(f_g^l))
        total = mse_weight * mse + at_weight * at + cos_weight * cos

    AT uses the raw teacher feature: after the per-position whitening every position has ``sum_c LN(f)_c^2 ~ C``,
    so the whitened teacher's attention map is uniform and would carry no spatial information. The cosine term
    uses the whitened target, the same target as the MSE (cosine is scale-free, so this only centres the teacher
    over channels). Targets are detached: the teacher is frozen.

    Args:
        preds: Regressor outputs, one ``[B, C_l, H_l, W_l]`` per level.
        targets: Teacher features, same shapes, same order.
        mse_weight: Weight of the MSE term.
        at_weight: Weight of the AT term (DreamTeacher: 10).
        cos_weight: Weight of the cosine term (0 = off).
        at_mode: ``'code'`` or ``'paper'``, see `attention_transfer_loss`.

    Returns:
        ``{'mse', 'at', 'cos', 'total'}``; a term whose weight is 0 is left out, ``'total'`` is always there.

    Raises:
        ValueError: If the lists are empty or of different lengths, or a pair's shapes differ.
    """
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions but {len(targets)} targets; pass one target per level")
    if len(preds) == 0:
        raise ValueError("feature_distillation_loss needs at least one (pred, target) level")
    targets = [t.detach() for t in targets]
    whitened = [whiten(t) for t in targets]
    terms: dict[str, Tensor] = {}
    if mse_weight:
        terms["mse"] = torch.stack([mse_loss(p, w, whiten_target=False) for p, w in zip(preds, whitened)]).mean()
    if at_weight:
        terms["at"] = torch.stack([attention_transfer_loss(p, t, mode=at_mode) for p, t in zip(preds, targets)]).mean()
    if cos_weight:
        terms["cos"] = torch.stack([cosine_loss(p, w) for p, w in zip(preds, whitened)]).mean()
    weights = {"mse": mse_weight, "at": at_weight, "cos": cos_weight}
    total = sum((weights[k] * v for k, v in terms.items()), preds[0].new_zeros(()))
    return {**terms, "total": total}
