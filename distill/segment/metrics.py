"""Segmentation metrics from torchmetrics: per-class IoU and mIoU (``MulticlassJaccardIndex``) and pixel accuracy
(``MulticlassAccuracy``, micro), both with ``ignore_index`` so unlabelled pixels count nowhere.

IoU_c = TP_c / (TP_c + FP_c + FN_c) over all evaluated pixels of the split (not averaged per image);
mIoU = mean of IoU_c over the classes (Everingham et al., PASCAL VOC, 2010; Cityscapes and CamVid report the same).
A class absent from both the predictions and the ground truth of the whole split gets IoU 0 from torchmetrics'
default ``zero_division=0``; it is reported in ``absent_classes`` and left out of ``miou_present``.
"""
from __future__ import annotations

import torch


class SegMetrics:
    """Accumulate predictions; `compute` gives percentages.

    ``update(logits [B, K, H, W] or predicted ids [B, H, W], target ids [B, H, W])``.
    """

    def __init__(self, num_classes: int, ignore_index: int):
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.iou = MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index)
        self.acc = MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index)
        self.present = torch.zeros(num_classes, dtype=torch.bool)
        self.pixels = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` logits ``[B, K, H, W]`` or class ids ``[B, H, W]``, ``target`` class ids ``[B, H, W]``
        (pixels equal to ``ignore_index`` are not counted)."""
        if pred.dim() == 4:
            pred = pred.argmax(1)
        pred, target = pred.detach().cpu(), target.detach().cpu()
        self.iou.update(pred, target)
        self.acc.update(pred, target)
        valid = target != self.ignore_index
        for t in (pred[valid], target[valid]):
            ids = t.unique()
            self.present[ids[ids < self.num_classes]] = True
        self.pixels += int(valid.sum())

    def sum_over_processes(self, accelerator, images: int) -> int:
        """Sum this process's states with the other processes' (each scored its own images): the confusion
        matrices and correct/total counts of the two torchmetrics metrics, class presence and pixel counts. Every
        process must call it. Returns the number of images over all processes."""
        dev = accelerator.device
        for metric in (self.iou, self.acc):
            for name in metric._defaults:  # torchmetrics' states, all reduced by sum for these two metrics
                state = getattr(metric, name)
                setattr(metric, name, accelerator.reduce(state.to(dev), "sum").to(state.device))
            metric.sync_on_compute = metric._to_sync = False  # already summed: compute() must not sync again
        counts = torch.tensor([float(images), float(self.pixels)], device=dev)
        counts = accelerator.reduce(counts, "sum").tolist()
        self.present = accelerator.reduce(self.present.to(dev).long(), "sum").cpu() > 0
        self.pixels = int(counts[1])
        return int(counts[0])

    def compute(self) -> dict:
        """``{'miou', 'miou_present', 'pixel_acc', 'per_class_iou': [K], 'absent_classes', 'pixels'}``, in percent."""
        iou = (100.0 * self.iou.compute()).tolist()
        present = [i for i in range(self.num_classes) if self.present[i]]
        return {"miou": round(sum(iou) / self.num_classes, 2),
                "miou_present": round(sum(iou[i] for i in present) / max(len(present), 1), 2),
                "pixel_acc": round(100.0 * float(self.acc.compute()), 2),
                "per_class_iou": [round(v, 2) for v in iou],
                "absent_classes": [i for i in range(self.num_classes) if not self.present[i]],
                "pixels": self.pixels}
