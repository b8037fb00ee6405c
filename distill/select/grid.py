"""Linear probes of a teacher's own pooled features over a grid of blocks x timesteps (DDAE, section 3.2).

Every training step noises the batch afresh and runs ONE teacher forward that covers every candidate timestep
(batched) and every block (hooks); the features are globally average-pooled and every (block, timestep) probe
takes an Adam step on the same batch. So the grid costs ``epochs x ceil(N_train / B) + ceil(N_test / B)`` teacher
forwards however many probes it trains, and noise is fresh at every step as in DDAE (which also augments with
crop + flip; ``augment`` picks the same kornia views the trainer uses).

Before starting, `estimate_grid_memory` predicts the peak memory of one step; a grid that would not fit in
``max_memory_gb`` stops with the estimate and the batch size that fits.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler

from ..augment import build_augment
from ..data import collate, dataset_labels, to_teacher, to_unit
from ..errors import option
from ..evaluate import ProbeData
from ..logs import progress as progress_bar
from ..probe import _accuracy, _probe_head, multi_linear_probe
from ..teacher import DiffusionTeacher

GiB = 1024 ** 3


@torch.no_grad()
def pooled_teacher_features(teacher: DiffusionTeacher, dataset, batch_size: int = 128, seed: int = 0,
                            progress: bool = True, desc: str = "teacher features",
                            timesteps=None) -> tuple[dict, torch.Tensor]:
    """``{key: [N, C]}`` globally pooled features of every (block, timestep), and the labels ``[N]``.

    One noise draw per image (seeded); used to score the grid's probes, by the offline teacher probe and by
    `distill.select.probe_teacher` (``distill probe teacher:NAME``, ensembles included).
    """
    g = torch.Generator(device=teacher.device).manual_seed(seed)
    feats: dict[str, list] = {}
    labels = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for images, y in progress_bar(loader, desc, enabled=progress, unit="batch"):
        x = to_teacher(to_unit(images.to(teacher.device)), teacher.in_channels, teacher.sample_size)
        for key, f in teacher(x, timesteps=timesteps, generator=g).items():
            feats.setdefault(key, []).append(f.float().mean((2, 3)).cpu())  # (B, C)
        labels.append(y)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def available_memory_gb(device: torch.device) -> float:
    """Free memory where the grid runs: ``torch.cuda.mem_get_info`` on a GPU, available RAM on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / GiB
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return float("inf")


@torch.no_grad()
def estimate_grid_memory(teacher: DiffusionTeacher, batch_size: int, num_classes: int = 10) -> dict:
    """Predicted peak bytes of one grid step: weights + activations of one teacher forward on ``B x K`` images.

    Activations are measured, not guessed: a forward on one image records the bytes of every module's output
    up to the deepest requested block (an upper bound: the forward frees most of them as it goes), times
    ``B x K``. Probes (weights, grads, two Adam moments) and the pooled features are added.
    """
    per_image = 0
    stop = teacher._stop_block

    def hook(_m, _i, out):
        nonlocal per_image
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            o = getattr(o, "sample", o)
            if isinstance(o, torch.Tensor):
                per_image += o.numel() * o.element_size()

    leaves = [m for m in teacher.model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        x = torch.zeros(1, teacher.in_channels, teacher.sample_size, teacher.sample_size, device=teacher.device)
        teacher(x, timesteps=teacher.timesteps[:1])
    finally:
        for h in handles:
            h.remove()
    K = len(teacher.timesteps)
    weights = sum(p.numel() * p.element_size() for p in teacher.model.parameters())
    probe_params = sum(f.num_chs * (num_classes + 3) for f in teacher.feature_info)  # Linear + BN buffers
    probes = 4 * 4 * probe_params  # fp32 weights, grads, two Adam moments
    pooled = 4 * batch_size * sum(f.num_chs for f in teacher.feature_info)
    activations = per_image * batch_size * K
    teacher._stop_block = stop
    return {"bytes": weights + activations + probes + pooled, "weights": weights, "activations": activations,
            "activations_per_image": per_image, "probes": probes, "images_per_forward": batch_size * K}


def check_grid_memory(teacher: DiffusionTeacher, batch_size: int, max_memory_gb: Optional[float],
                      num_classes: int = 10) -> dict:
    """Raise before starting when the estimate exceeds ``max_memory_gb`` (default: the free memory)."""
    est = estimate_grid_memory(teacher, batch_size, num_classes)
    limit = available_memory_gb(teacher.device) if max_memory_gb is None else float(max_memory_gb)
    need = est["bytes"] / GiB
    if need > limit:
        K = len(teacher.timesteps)
        fixed = est["weights"] + est["probes"]
        per_sample = (est["bytes"] - fixed) / batch_size  # activations + pooled features per image
        fits = int((limit * GiB - fixed) // max(per_sample, 1))
        fix = (f"{option('batch_size')} {fits} (fits the estimate)" if fits >= 1 else
               "fewer timesteps or blocks (even batch size 1 does not fit)")
        raise MemoryError(
            f"the grid of {len(teacher.blocks)} blocks x {K} timesteps needs about {need:.2f} GiB per step "
            f"(teacher weights {est['weights'] / GiB:.2f} GiB + activations of {batch_size} images x {K} timesteps "
            f"= {est['images_per_forward']} images per forward, {est['activations'] / GiB:.2f} GiB) but "
            f"max_memory_gb is {limit:.2f} GiB. Fix: {fix}, or raise {option('max_memory_gb')} if more memory is free."
        )
    est["limit_gb"] = limit
    return est


def grid_probe(teacher: DiffusionTeacher, data: ProbeData, epochs: int = 2, batch_size: int = 64,
               lr: float = 1e-2, augment: str = "flip", seed: int = 0, max_memory_gb: Optional[float] = None,
               progress: bool = True) -> dict:
    """Train one linear probe per (block, timestep) of ``teacher`` online, with fresh noise at every step.

    Args:
        teacher: wraps the candidate blocks and timesteps (``teacher.blocks`` x ``teacher.timesteps``).
        data: labelled train and test splits (images as the datasets of `distill.data` give them).
        epochs: passes over ``data.train``; each pass sees new noise (and new augmented views).
        batch_size: images per step; a teacher forward holds ``batch_size x K`` images.
        lr: Adam learning rate of the probes (cosine to 0 over all steps); probes are BN (no affine) + Linear.
            1e-2, not the offline probe's 1e-3: an online grid takes few steps (on the Fashion-MNIST teacher, 2,000
            images x 2 epochs at batch 64: 1e-3 reached 43.6% on the best cell, 1e-2 73.7%).
        augment: one of `distill.vocab.AUGMENTS` (kornia, as in the trainer), applied to train images only.
        seed: shuffling, noise, augmentation and probe-init seed.
        max_memory_gb: refuse to start when the step's estimated memory exceeds it (default: the free memory).

    Returns:
        ``{'rows': [...best first...], 'best': row, 'teacher_forwards', 'image_forwards', 'seconds', ...}``;
        each row has ``block, timestep, channels, linear_top1, linear_top5``.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}.")
    labels = dataset_labels(data.train)
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("the grid probe needs labels, but the training set is unlabelled (labels -1); use "
                         "`distill select --method label-free` instead.")
    num_classes = int(max(labels.max(), dataset_labels(data.test).max())) + 1
    mem = check_grid_memory(teacher, batch_size, max_memory_gb, num_classes)
    t0 = time.time()
    device = teacher.device
    keys = [f.key for f in teacher.feature_info]
    info = {f.key: f for f in teacher.feature_info}
    heads = torch.nn.ModuleDict({str(i): _probe_head(info[k].num_chs, num_classes, seed) for i, k in enumerate(keys)}
                                ).to(device)
    opt = torch.optim.Adam(heads.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data.train, batch_size=batch_size, sampler=RandomSampler(data.train, generator=gen),
                        collate_fn=collate, drop_last=len(data.train) > batch_size)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    noise = torch.Generator(device=device).manual_seed(seed)
    aug = build_augment(augment, data.train[0][0].shape[-1]).to(device)
    forwards = image_forwards = 0
    K = len(teacher.timesteps)
    bar = progress_bar(desc="grid probe", total=total, enabled=progress, unit="step")
    heads.train()
    for _ in range(epochs):
        for images, y in loader:
            x = to_teacher(aug(to_unit(images.to(device))), teacher.in_channels, teacher.sample_size)
            with torch.no_grad():
                feats = teacher(x, generator=noise)  # one forward: all K timesteps x all blocks, fresh noise
            forwards, image_forwards = forwards + 1, image_forwards + x.shape[0] * K
            y = y.to(device)
            loss = sum(F.cross_entropy(heads[str(i)](feats[k].float().mean((2, 3))), y) for i, k in enumerate(keys))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item() / len(keys):.3f}")
    bar.close()
    heads.eval()
    test_feats, test_y = pooled_teacher_features(teacher, data.test, batch_size, seed + 1, progress,
                                                 "grid probe: test")
    forwards += math.ceil(len(data.test) / batch_size)
    image_forwards += len(data.test) * K
    rows = []
    with torch.no_grad():
        for i, k in enumerate(keys):
            logits = heads[str(i)](test_feats[k].to(device)).cpu()
            rows.append({"block": info[k].block, "timestep": info[k].timestep, "channels": info[k].num_chs,
                         "linear_top1": round(_accuracy(logits, test_y, num_classes, 1), 2),
                         "linear_top5": round(_accuracy(logits, test_y, num_classes, 5), 2)})
    rows.sort(key=lambda r: -r["linear_top1"])
    return {"rows": rows, "best": rows[0], "blocks": teacher.blocks, "timesteps": teacher.timesteps,
            "teacher_forwards": forwards, "image_forwards": image_forwards,
            "train_images": len(data.train), "test_images": len(data.test), "epochs": epochs,
            "batch_size": batch_size, "augment": augment, "seconds": round(time.time() - t0, 1), "device": str(device),
            "memory_estimate_gb": round(mem["bytes"] / GiB, 3)}


def teacher_grid_probe(teacher: DiffusionTeacher, data: ProbeData, batch_size: int = 64, epochs: int = 2,
                       seed: int = 0, progress: bool = True, protocol: str = "online", **kwargs) -> list[dict]:
    """Linear-probe rows of every (block, timestep) of ``teacher``, best first (``tools/probe_teacher.py``).

    ``protocol='online'``: `grid_probe` (fresh noise every step, few epochs, lr 1e-2).
    ``protocol='offline'``: the probe students get (`distill.probe.multi_linear_probe`, Adam lr 1e-3, cosine,
    ``epochs`` over features pooled once, one seeded noise draw per image), so a teacher's and a student's numbers
    compare like for like.
    """
    if protocol == "online":
        return grid_probe(teacher, data, epochs=epochs, batch_size=batch_size, seed=seed, progress=progress,
                          **kwargs)["rows"]
    if protocol != "offline":
        raise ValueError(f"protocol must be 'online' or 'offline', got {protocol!r}")
    t0 = time.time()
    tr, tr_y = pooled_teacher_features(teacher, data.train, batch_size, seed, progress, "teacher: train features")
    te, te_y = pooled_teacher_features(teacher, data.test, batch_size, seed + 1, progress, "teacher: test features")
    res = multi_linear_probe(tr, tr_y, te, te_y, epochs=epochs, seed=seed, device=str(teacher.device))
    info = {f.key: f for f in teacher.feature_info}
    rows = [{"block": info[k].block, "timestep": info[k].timestep, "channels": info[k].num_chs,
             "linear_top1": round(r["top1"], 2), "linear_top5": round(r["top5"], 2)} for k, r in res.items()]
    rows.sort(key=lambda r: -r["linear_top1"])
    for r in rows:
        r["seconds_total"] = round(time.time() - t0, 1)
    return rows
