"""Linear probes of a teacher's own pooled features over a grid of blocks x timesteps (DDAE, section 3.2).

One teacher forward per batch covers every timestep (they are batched) and every block (hooks); the features
are globally average-pooled and all (block, timestep) probes are trained together by
:func:`distill.probe.multi_linear_probe`. Noise is drawn once per image and pass (seeded), so train and test
features are each one stochastic encoding; DDAE redraws noise every epoch with augmentation.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from torch.utils.data import DataLoader

from .data import collate, to_teacher, to_unit
from .evaluate import ProbeData
from .probe import multi_linear_probe
from .teacher import DiffusionTeacher


@torch.no_grad()
def pooled_teacher_features(teacher: DiffusionTeacher, dataset, batch_size: int = 128, seed: int = 0,
                            progress: bool = True, desc: str = "teacher features") -> tuple[dict, torch.Tensor]:
    """``{key: [N, C]}`` globally pooled features of every (block, timestep), and the labels ``[N]``."""
    from tqdm.auto import tqdm

    g = torch.Generator(device=teacher.device).manual_seed(seed)
    feats: dict[str, list] = {}
    labels = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for images, y in tqdm(loader, desc=desc, disable=not progress):
        x = to_teacher(to_unit(images.to(teacher.device)), teacher.in_channels, teacher.sample_size)
        for key, f in teacher(x, generator=g).items():
            feats.setdefault(key, []).append(f.float().mean((2, 3)).cpu())  # (B, C)
        labels.append(y)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def teacher_grid_probe(teacher: DiffusionTeacher, data: ProbeData, batch_size: int = 128, epochs: int = 30,
                       seed: int = 0, progress: bool = True, device: Optional[str] = None) -> list[dict]:
    """Linear-probe accuracy of every (block, timestep) of ``teacher``, best first."""
    t0 = time.time()
    tr, tr_y = pooled_teacher_features(teacher, data.train, batch_size, seed, progress, "teacher train features")
    te, te_y = pooled_teacher_features(teacher, data.test, batch_size, seed + 1, progress, "teacher test features")
    res = multi_linear_probe(tr, tr_y, te, te_y, epochs=epochs, seed=seed, device=device or str(teacher.device))
    info = {f.key: f for f in teacher.feature_info}
    rows = [{"block": info[k].block, "timestep": info[k].timestep, "channels": info[k].num_chs,
             "linear_top1": round(r["top1"], 2), "linear_top5": round(r["top5"], 2)} for k, r in res.items()]
    rows.sort(key=lambda r: -r["linear_top1"])
    for r in rows:
        r["seconds_total"] = round(time.time() - t0, 1)
    return rows
