"""Frozen-feature evaluation: feature extraction, linear probes and a weighted kNN probe.

The caller turns a model into ``fn(images) -> [B, D]`` (pooling, dtype and layout conversions inside ``fn``);
everything here works on feature tensors. Protocols:

* Linear probe (MAE-style): ``BatchNorm1d(D, affine=False) -> Linear(D, C)``, Adam lr 1e-3, cosine schedule
  over 30 epochs, cross-entropy. DDAE (Xiang et al., ICCV 2023) trains a plain ``Linear`` for 15 epochs at
  batch 128 with augmentation; here features are precomputed, so there is no augmentation and BN does the
  standardisation. `multi_linear_probe` trains a whole grid of (block, timestep) probes in one pass,
  as DDAE does for its layer/timestep search.
* kNN probe (solo-learn / InstDisc, Wu et al. 2018): cosine similarity on L2-normalised features, k=20,
  each neighbour votes for its class with weight ``exp(sim / T)``, T=0.07.

Accuracies are micro averages (``torchmetrics.Accuracy(task='multiclass')``) in percent. Everything runs on the
``device`` it is given; `eval_device` picks Accelerate's (a GPU when there is one, else the CPU).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Accuracy

from .logs import progress as progress_bar


def eval_device(device: Optional[str | torch.device] = None) -> torch.device:
    """Where feature extraction and probes run: ``device`` when given, else Accelerate's device
    (``PartialState().device``: this process's GPU under ``accelerate launch``, else ``cuda``, ``mps``, ``xpu`` ...
    when one is available, else the CPU).

    Raises:
        RuntimeError: ``device`` is not a device torch knows (torch's message).
    """
    if device is not None:
        return torch.device(device)
    from accelerate import PartialState

    return torch.device(PartialState().device)


def extract_features(
    fn: Callable[[Tensor], Tensor],
    loader: Iterable,
    device: str | torch.device = "cpu",
    desc: str = "features",
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Run ``fn`` over every ``(images, labels)`` batch of ``loader`` without gradients.

    Args:
        fn: maps a batch (as the loader gives it, moved to ``device``) to features ``[B, D]``.
        loader: yields ``(images, labels)``; kept in loader order.
        device: where ``fn`` runs.
        desc: progress-bar label.
        progress: show progress (`distill.logs.progress`: a bar on a terminal, plain lines in a log).

    Returns:
        ``(features, labels)``: float32 ``[N, D]`` and int64 ``[N]``, both on CPU.
    """
    feats, labels = [], []
    with torch.inference_mode():
        for images, y in progress_bar(loader, desc, enabled=progress, unit="batch"):
            f = fn(images.to(device, non_blocking=True))
            y = torch.as_tensor(y)
            if f.ndim != 2 or f.shape[0] != y.shape[0]:
                raise ValueError(
                    f"fn must return features [B, D] with B={y.shape[0]}; got shape {tuple(f.shape)}. "
                    "Pool or flatten inside fn.")
            feats.append(f.float().cpu())
            labels.append(y.long().cpu())
    if not feats:
        raise ValueError("extract_features got an empty loader.")
    return torch.cat(feats), torch.cat(labels)


def _check_split(x: Tensor, y: Tensor, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} features must be [N, D]; got shape {tuple(x.shape)}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name} has {x.shape[0]} feature rows but {y.shape[0]} labels.")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(
            f"{name} labels contain {int(y.min())}: probes need labelled data (-1 marks an unlabelled dataset).")


def _resolve_classes(train_y: Tensor, test_y: Tensor, num_classes: Optional[int]) -> int:
    top = int(torch.cat([train_y.flatten(), test_y.flatten()]).max()) + 1
    if num_classes is None:
        return max(top, 2)  # torchmetrics' multiclass Accuracy needs at least 2 classes
    if top > num_classes:
        raise ValueError(f"labels go up to {top - 1} but num_classes={num_classes}.")
    return num_classes


def _accuracy(scores: Tensor, target: Tensor, num_classes: int, top_k: int) -> float:
    """Micro top-k accuracy in percent."""
    metric = Accuracy(task="multiclass", num_classes=num_classes, top_k=min(top_k, num_classes))
    return 100.0 * float(metric(scores.float().cpu(), target.long().cpu()))


def _probe_head(dim: int, num_classes: int, seed: int) -> nn.Module:
    # Seeded per head so a probe's init does not depend on which other keys are trained beside it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))


@torch.no_grad()
def _logits(head: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    head.eval()
    return torch.cat([head(x[i:i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)])


def multi_linear_probe(
    train_feats: dict[str, Tensor],
    train_y: Tensor,
    test_feats: dict[str, Tensor],
    test_y: Tensor,
    num_classes: Optional[int] = None,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    return_logits: bool = False,
) -> dict[str, dict]:
    """Train one linear probe per feature key, all in the same pass over the data.

    Every key sees the same shuffled minibatches (one seeded ``torch.Generator``) and gets the same seeded
    init, so a key's result equals `linear_probe` on that key alone. The losses are independent, so one
    Adam over all heads on their summed loss is the same as one Adam per head. This is how DDAE searches its
    (block, timestep) grid.

    Args:
        train_feats: ``{key: [N, D_key]}`` training features (may stay on CPU; minibatches go to ``device``).
        train_y: ``[N]`` labels shared by all keys.
        test_feats: ``{key: [M, D_key]}`` with the same keys.
        test_y: ``[M]`` labels.
        num_classes: defaults to the largest label + 1.
        epochs, batch_size, lr, weight_decay: Adam with a per-step cosine schedule to 0.
        seed: shuffling and init seed.
        device: where the heads train.
        progress: progress over epochs (`distill.logs.progress`).
        return_logits: also return each key's test logits ``[M, C]`` (``'test_logits'``), e.g. for soft voting.

    Returns:
        ``{key: {'top1', 'top5', 'train_top1', 'epochs', 'num_train', 'dim'}}``, accuracies in percent.
    """
    if set(train_feats) != set(test_feats) or not train_feats:
        raise ValueError(f"train and test feature keys differ or are empty: {sorted(train_feats)} vs "
                         f"{sorted(test_feats)}.")
    for key in train_feats:
        _check_split(train_feats[key], train_y, f"train[{key!r}]")
        _check_split(test_feats[key], test_y, f"test[{key!r}]")
        if train_feats[key].shape[1] != test_feats[key].shape[1]:
            raise ValueError(f"feature dim of {key!r} differs: train {train_feats[key].shape[1]}, "
                             f"test {test_feats[key].shape[1]}.")
    num_classes = _resolve_classes(train_y, test_y, num_classes)
    device = torch.device(device)
    n = train_y.shape[0]
    heads = {k: _probe_head(x.shape[1], num_classes, seed).to(device) for k, x in train_feats.items()}
    params = [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    for _ in progress_bar(range(epochs), "linear probe", enabled=progress, unit="epoch"):
        for h in heads.values():
            h.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if idx.numel() < 2:  # BatchNorm cannot train on a single sample
                continue
            y = train_y[idx].long().to(device)
            loss = sum(F.cross_entropy(h(train_feats[k][idx].to(device)), y) for k, h in heads.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    results = {}
    for k, h in heads.items():
        test_logits = _logits(h, test_feats[k], batch_size, device)  # [M, C]
        train_logits = _logits(h, train_feats[k], batch_size, device)  # [N, C]
        results[k] = {
            "top1": _accuracy(test_logits, test_y, num_classes, 1),
            "top5": _accuracy(test_logits, test_y, num_classes, 5),
            "train_top1": _accuracy(train_logits, train_y, num_classes, 1),
            "epochs": epochs,
            "num_train": n,
            "dim": train_feats[k].shape[1],
        }
        if return_logits:
            results[k]["test_logits"] = test_logits
    return results


def ensemble_probe(train_feats: dict[str, Tensor], train_y: Tensor, test_feats: dict[str, Tensor], test_y: Tensor,
                   members: Optional[list[str]] = None, **kwargs) -> dict:
    """Soft-voting ensemble (representation-dynamics paper, section 4.1): one linear probe per member (e.g. one per
    timestep of a block), trained as `multi_linear_probe` does; the prediction averages the members' logits.

    Returns:
        ``{'members': {key: {'top1', 'top5', ...}}, 'ensemble': {'top1', 'top5'}, 'best_member': key}``.
    """
    members = list(members or train_feats)
    res = multi_linear_probe({k: train_feats[k] for k in members}, train_y, {k: test_feats[k] for k in members},
                             test_y, return_logits=True, **kwargs)
    num_classes = res[members[0]]["test_logits"].shape[1]
    avg = torch.stack([res[k].pop("test_logits") for k in members]).mean(0)  # (M, C)
    best = max(members, key=lambda k: res[k]["top1"])
    return {"members": res, "best_member": best,
            "ensemble": {"top1": _accuracy(avg, test_y, num_classes, 1), "top5": _accuracy(avg, test_y, num_classes, 5)}}


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: Optional[int] = None,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Linear probe (BN without affine + Linear, Adam lr 1e-3, cosine, 30 epochs) on one feature set.

    Arguments as in `multi_linear_probe`, with ``[N, D]`` / ``[M, D]`` tensors instead of dicts.

    Returns:
        ``{'top1', 'top5', 'train_top1', 'epochs', 'num_train', 'dim'}``, accuracies in percent.
    """
    return multi_linear_probe(
        {"x": train_x}, train_y, {"x": test_x}, test_y, num_classes=num_classes, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, device=device, progress=progress,
    )["x"]


@torch.no_grad()
def knn_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
    chunk: int = 1024,
    device: Optional[str | torch.device] = None,
    progress: bool = False,
) -> dict:
    """Weighted cosine kNN probe (solo-learn ``WeightedKNNClassifier`` / InstDisc convention).

    Features are L2-normalised; each test sample's ``k`` most similar training samples vote for their class
    with weight ``exp(sim / temperature)``; class score = sum of its voters' weights. The test set is processed
    ``chunk`` rows at a time, so memory is ``O(chunk * N_train)``.

    Args:
        train_x, train_y: ``[N, D]`` features and ``[N]`` labels (the memory bank).
        test_x, test_y: ``[M, D]`` and ``[M]``.
        k: neighbours (solo-learn 20; lightly uses 200 with T=0.1).
        temperature: vote temperature.
        num_classes: defaults to the largest label + 1.
        chunk: test rows per similarity matrix.
        device: where the similarities are computed (default: where ``train_x`` is); results come back on the CPU.
        progress: progress over the test chunks (`distill.logs.progress`).

    Returns:
        ``{'top1', 'top5', 'k'}``, accuracies in percent.
    """
    _check_split(train_x, train_y, "train")
    _check_split(test_x, test_y, "test")
    if not 1 <= k <= train_x.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the number of training samples ({train_x.shape[0]}).")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"feature dims differ: train {train_x.shape[1]}, test {test_x.shape[1]}.")
    num_classes = _resolve_classes(train_y, test_y, num_classes)
    bank = F.normalize(train_x.float().to(device or train_x.device), dim=1)  # [N, D]
    bank_y = train_y.long().to(bank.device)
    scores = []
    for i in progress_bar(range(0, test_x.shape[0], chunk), "kNN probe", enabled=progress, unit="chunk"):
        q = F.normalize(test_x[i:i + chunk].float().to(bank.device), dim=1)  # [b, D]
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [b, k]
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device)
        scores.append(votes.scatter_add_(1, bank_y[idx], (sim / temperature).exp()).cpu())  # [b, C]
    scores = torch.cat(scores)  # [M, C]
    return {"top1": _accuracy(scores, test_y, num_classes, 1),
            "top5": _accuracy(scores, test_y, num_classes, 5), "k": k}
