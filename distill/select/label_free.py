"""Label-free choice of teacher block and timestep (DDAE, Xiang et al. ICCV 2023, section 3.3).

Features are globally pooled and L2-normalised; two independent noisings of the same image are a positive pair.
Alignment and uniformity are Wang & Isola's (ICML 2020) metrics; DDAE finds that blocks whose features sit near the
"lower left" (both small) probe best, so candidates are ranked by ``alignment + uniformity`` (lower is better).
No labels are read.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ..data import collate, to_teacher, to_unit
from ..logs import progress as progress_bar
from ..teacher import DiffusionTeacher


def alignment_loss(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> Tensor:
    """``L_align = E_i || z1_i - z2_i ||_2^alpha`` for L2-normalised ``z1, z2`` of shape ``[N, D]``."""
    if z1.shape != z2.shape:
        raise ValueError(f"alignment needs paired features of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}.")
    return (z1 - z2).norm(dim=1).pow(alpha).mean()


def uniformity_loss(z: Tensor, t: float = 2.0) -> Tensor:
    """``L_uniform = log E_{i<j} exp(-t || z_i - z_j ||_2^2)`` for L2-normalised ``z`` of shape ``[N, D]``, N >= 2."""
    if z.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 samples, got {z.shape[0]}.")
    return torch.pdist(z, p=2).pow(2).mul(-t).exp().mean().log()


@torch.no_grad()
def label_free_scores(teacher: DiffusionTeacher, dataset, num_images: int = 1000, batch_size: int = 128,
                      seed: int = 0, progress: bool = True) -> list[dict]:
    """Alignment, uniformity and their sum for every (block, timestep) of ``teacher``, best (lowest) first.

    Uses ``num_images`` images (a seeded random subset, labels ignored) and two teacher passes over them, each pass
    batching every timestep into one forward: ``2 * ceil(num_images / batch_size)`` forwards in all.
    """
    t0 = time.time()
    n = min(num_images, len(dataset))
    if n < 2:
        raise ValueError(f"label-free selection needs at least 2 images, the dataset has {len(dataset)}.")
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False, collate_fn=collate)
    g = torch.Generator(device=teacher.device).manual_seed(seed)
    views: list[dict[str, list[Tensor]]] = [{}, {}]
    forwards = 0
    for images, _ in progress_bar(loader, "label-free", enabled=progress, unit="batch"):
        x = to_teacher(to_unit(images.to(teacher.device)), teacher.in_channels, teacher.sample_size)
        for v in views:  # two independent noisings of the same images: a positive pair
            for key, f in teacher(x, generator=g).items():
                v.setdefault(key, []).append(F.normalize(f.float().mean((2, 3)), dim=1).cpu())  # (B, C)
            forwards += 1
    info = {f.key: f for f in teacher.feature_info}
    rows = []
    for key in views[0]:
        z1, z2 = torch.cat(views[0][key]), torch.cat(views[1][key])
        a, u = alignment_loss(z1, z2).item(), uniformity_loss(torch.cat([z1, z2])).item()
        rows.append({"block": info[key].block, "timestep": info[key].timestep, "alignment": round(a, 5),
                     "uniformity": round(u, 5), "score": round(a + u, 5)})
    rows.sort(key=lambda r: r["score"])
    for r in rows:
        r.update(images=n, teacher_forwards=forwards, seconds_total=round(time.time() - t0, 1))
    return rows


def rank_correlation(scores_a: dict, scores_b: dict) -> float:
    """Spearman correlation of two rankings given as ``{key: value}`` over the same keys (torchmetrics)."""
    from torchmetrics.functional import spearman_corrcoef

    keys = sorted(scores_a)
    if set(keys) != set(scores_b):
        raise ValueError(f"rankings cover different candidates: {sorted(set(keys) ^ set(scores_b))}.")
    a = torch.tensor([float(scores_a[k]) for k in keys])
    b = torch.tensor([float(scores_b[k]) for k in keys])
    return float(spearman_corrcoef(a, b))
