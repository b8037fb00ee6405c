""""Is the backbone getting better?" while it trains: a kNN probe of the student's pooled features every
``monitor_every`` steps.

The probe is distill's own (``distill.probe.knn_probe``: cosine, ``knn_k`` neighbours, T=0.07, on
``distill.evaluate.backbone_fn`` features, the same input pipeline as ``distill probe``) on a fixed labelled subset:
``monitor_images`` stratified training images as the memory bank and ``monitor_images`` stratified test images as
queries, drawn once with seed 0 (the same images for every run and seed, so curves compare). It runs on the main
process, on the accelerator, in eval mode (BatchNorm statistics untouched) and on a forked RNG, so a monitored run
trains exactly as an unmonitored one. The numbers are a trend, not the final probe: the bank is small and there is
no linear probe.
"""
from __future__ import annotations

import time

import torch

from ..build import build_train_data, check_labelled
from ..config import Recipe
from ..data import collate, label_subset
from ..evaluate import backbone_fn
from ..probe import extract_features, knn_probe

#: the subset's seed: the same images whatever the run's seed
MONITOR_SEED = 0
#: the column it adds to ``metrics.csv`` (and the tracker key, ``monitor/knn_top1``)
MONITOR_COLUMN = "monitor_knn_top1"


def fixed_subset(ds, n: int, seed: int = MONITOR_SEED) -> tuple:
    """``(uint8 images [N, C, H, W], labels [N])`` of a stratified seeded subset of about ``n`` images of ``ds``
    (all of them when ``n >= len(ds)``; at least one per class)."""
    sub = label_subset(ds, min(1.0, n / len(ds)), seed)
    return collate([sub[i] for i in range(len(sub))])


class Monitor:
    """kNN top-1 of a student backbone on the recipe's fixed monitor subset (see the module docstring).

    Raises (at construction):
        ValueError: the training images are unlabelled, the dataset has no test split, or its test split holds a
            class the training split lacks (the message names ``monitor_every`` and the fix). Test labels are
            paired with the training split's classes by name.
    """

    def __init__(self, recipe: Recipe, mean, std, device, batch_size: int = 256):
        train_ds, _ = build_train_data(recipe, "train")
        check_labelled(train_ds, "monitor_every", "a kNN probe scores the student on labelled images",
                       "set monitor_every: 0, or give a labelled image folder (one subfolder per class)")
        try:  # test labels paired with the training split's classes by name
            test_ds, _ = build_train_data(recipe, "test", classes=getattr(train_ds, "classes", None))
        except (FileNotFoundError, ValueError) as e:
            fix = ("or give test/ only classes of train/" if not isinstance(e, FileNotFoundError) else
                   "or add a test/ split")
            raise ValueError(f"monitor_every: {recipe.monitor_every} needs the dataset's test split, which cannot be "
                             f"read ({str(e)[:600]}). Fix: set monitor_every: 0, {fix}.") from e
        self.train = fixed_subset(train_ds, recipe.monitor_images)
        self.test = fixed_subset(test_ds, recipe.monitor_images)
        self.size, self.mean, self.std, self.device = recipe.student_size, mean, std, device
        self.k, self.batch_size = min(recipe.knn_k, len(self.train[1])), batch_size

    def _batches(self, split: tuple) -> list:
        x, y = split
        return [(x[i:i + self.batch_size], y[i:i + self.batch_size]) for i in range(0, len(y), self.batch_size)]

    def __call__(self, backbone: torch.nn.Module) -> dict:
        """``{'knn_top1': percent, 'k', 'train_images', 'test_images', 'seconds'}`` of ``backbone`` (a timm model
        with ``num_classes=0``: ``backbone(x)`` is ``[B, D]``); its train/eval mode and the RNG are restored."""
        t0, was_training = time.time(), backbone.training
        devices = [self.device] if torch.device(self.device).type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                fn = backbone_fn(backbone, self.size, self.mean, self.std)  # sets eval mode
                tr_x, tr_y = extract_features(fn, self._batches(self.train), self.device, progress=False)
                te_x, te_y = extract_features(fn, self._batches(self.test), self.device, progress=False)
        finally:
            backbone.train(was_training)
        knn = knn_probe(tr_x.to(self.device), tr_y, te_x, te_y, k=self.k)
        return {"knn_top1": round(knn["top1"], 2), "k": self.k, "train_images": len(tr_y),
                "test_images": len(te_y), "seconds": round(time.time() - t0, 2)}
