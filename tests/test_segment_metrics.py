"""distill.segment.metrics: mIoU, per-class IoU and pixel accuracy against an independent confusion-matrix
computation in numpy, with an ignore index."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.segment.metrics import SegMetrics


def reference(preds: list[np.ndarray], targets: list[np.ndarray], k: int, ignore: int) -> dict:
    """IoU_c = TP / (TP + FP + FN) from a confusion matrix over all valid pixels of all batches."""
    cm = np.zeros((k, k), np.int64)
    for p, t in zip(preds, targets):
        valid = t != ignore
        np.add.at(cm, (t[valid], p[valid]), 1)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(denom > 0, tp / np.maximum(denom, 1), 0.0)
    return {"iou": 100 * iou, "miou": 100 * iou.mean(), "acc": 100 * tp.sum() / cm.sum()}


@pytest.mark.parametrize("seed", range(3))
def test_matches_an_independent_confusion_matrix_with_ignore_index(seed):
    rng = np.random.default_rng(seed)
    k, ignore = 5, 255
    metrics = SegMetrics(k, ignore)
    preds, targets = [], []
    for _ in range(3):  # several batches: IoU over the whole split, not averaged per batch
        t = rng.integers(0, k, (2, 7, 9))
        t[rng.random(t.shape) < 0.2] = ignore
        p = np.where(rng.random(t.shape) < 0.6, np.where(t == ignore, 0, t), rng.integers(0, k, t.shape))
        logits = torch.nn.functional.one_hot(torch.from_numpy(p), k).permute(0, 3, 1, 2).float()
        metrics.update(logits if _ % 2 else torch.from_numpy(p), torch.from_numpy(t))
        preds.append(p)
        targets.append(t)
    got, ref = metrics.compute(), reference(preds, targets, k, ignore)
    assert got["per_class_iou"] == pytest.approx(ref["iou"].tolist(), abs=0.006)
    assert got["miou"] == pytest.approx(ref["miou"], abs=0.006)
    assert got["pixel_acc"] == pytest.approx(ref["acc"], abs=0.006)
    assert got["pixels"] == sum(int((t != ignore).sum()) for t in targets)


def test_ignored_pixels_count_nowhere_and_absent_classes_are_listed():
    target = torch.tensor([[[0, 0, 1, 9]]])
    metrics = SegMetrics(3, 9)
    metrics.update(torch.tensor([[[0, 0, 1, 2]]]), target)  # the wrong '2' lies on an ignored pixel
    r = metrics.compute()
    assert r["per_class_iou"][:2] == [100.0, 100.0] and r["pixel_acc"] == 100.0
    assert r["absent_classes"] == [2] and r["miou_present"] == 100.0 and r["miou"] == pytest.approx(200 / 3, abs=0.01)


def test_a_class_only_in_the_prediction_counts_in_miou_present():
    """Class 2 never appears in the ground truth but is predicted: its IoU is 0 and it is present, so miou_present
    averages over three classes (a class left out because the truth lacks it would flatter the model)."""
    target = torch.tensor([[[0, 0, 1, 1]]])
    metrics = SegMetrics(4, 255)
    metrics.update(torch.tensor([[[0, 2, 1, 1]]]), target)
    r = metrics.compute()
    iou0, iou1 = 100 * 1 / 2, 100.0
    assert r["per_class_iou"] == pytest.approx([iou0, iou1, 0.0, 0.0], abs=0.01)
    assert r["absent_classes"] == [3]
    assert r["miou_present"] == pytest.approx((iou0 + iou1 + 0.0) / 3, abs=0.01)
    assert r["miou"] == pytest.approx((iou0 + iou1) / 4, abs=0.01)
