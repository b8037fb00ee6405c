"""What a supervised fine-tuning task adds to the one loop (`distill.tune.fit`): `Task`.

As timm's ``TrainingTask.forward -> {'loss', ...}`` and LightlyTrain's ``TrainModel.training_step``, and as
`distill.trainer.targets` does for distillation: the loop owns the Accelerator, the step sampler, the optimizer
and schedule, logging, evaluation times, signals, the run lock and the files; a task owns its data, its model, how a
batch becomes inputs and targets, its loss, its evaluation and its result keys. A new task is a subclass, never a
copy of the loop.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .config import TuneConfig


class Task(ABC):
    """The contract between `distill.tune.fit` and a task. Subclasses set the class attributes and implement
    every abstract method (a subclass that misses one cannot be built: ``TypeError`` naming it).

    Attributes:
        name: the ``task`` key of ``result.json`` (``'classification'``, ``'segmentation'``).
        target: the name of the targets in a callback batch (``'labels'``, ``'masks'``).
        train_metric: the ``train_log.csv`` column of the training accuracy (``'batch_top1'``, ``'pixel_acc'``).
        score: the history key that picks the best evaluation (``'top1'``, ``'miou'``).
        cfg: the run's settings; ``label``: the run's name in reports.
        config_class: the settings' class this task reads (`TuneConfig` or a subclass).
        entry: the public function that runs the task, named in the type error (``'distill.finetune'``).
    """

    name = ""
    target = ""
    train_metric = ""
    score = ""
    config_class: type = TuneConfig
    entry = "distill.tune.fit"

    def __init__(self, cfg: TuneConfig):
        """Raises:
            TypeError: ``cfg`` is not a ``config_class`` (e.g. a model path given where the settings go).
            ValueError: a setting ``cfg.validate`` refuses.
        """
        if not isinstance(cfg, self.config_class):
            name = self.config_class.__name__
            raise TypeError(f"{self.entry}() takes a {name} as its first argument; got {type(cfg).__name__} "
                            f"{cfg!r:.80}. Fix: {self.entry}({name}(model=..., ...), output_dir).")
        cfg.validate()
        self.cfg = cfg
        self.label = cfg.label or ""

    # ---------------------------------------------------------------- data and model
    @abstractmethod
    def load_data(self) -> None:
        """Read and check the data (before the output directory is touched); sets ``self.train`` and
        ``self.test`` (datasets of ``(uint8 image, target)`` items)."""
        raise NotImplementedError

    train: Dataset
    test: Dataset

    @abstractmethod
    def collate(self, batch: list):
        """Stack dataset items into ``(uint8 images [B, C, H, W], targets)``."""
        raise NotImplementedError

    #: True when `eval_loader_options` gives each process its own share of the evaluation batches and
    #: `evaluate` sums the metrics over processes itself (batches of unequal shapes cannot be gathered); False:
    #: the loop shards the loader with Accelerate and the task gathers with ``gather_for_metrics``.
    shards_evaluation = False

    def eval_loader_options(self, rank: int = 0, world: int = 1) -> dict:
        """How the evaluation ``DataLoader`` batches ``self.test`` (its keyword arguments besides the dataset and
        workers): by default ``cfg.eval_batch_size`` items in order, stacked by `collate` (``rank`` / ``world``
        are used only by a task that `shards_evaluation`)."""
        return {"batch_size": self.cfg.eval_batch_size, "shuffle": False, "collate_fn": self.collate}

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model to fine-tune, initialised from ``cfg.seed`` only (the same head for every arm)."""
        raise NotImplementedError

    def optimizer_options(self) -> dict:
        """Extra keyword arguments of `distill.optim.build_optimizer` (e.g. ``layer_decay``)."""
        return {}

    @abstractmethod
    def make_augment(self, device: torch.device) -> None:
        """Build the training augmentation on ``device`` (on its own RNG stream,
        `distill.augment.SeededAugment`), once the first image is known."""
        raise NotImplementedError

    # ---------------------------------------------------------------- one step
    @abstractmethod
    def inputs(self, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated training batch -> ``(model inputs, targets)`` on ``device``, augmented."""
        raise NotImplementedError

    @abstractmethod
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss, a scalar mean over the counted targets of this process."""
        raise NotImplementedError

    @abstractmethod
    def batch_stats(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(correct, counted)`` of a training batch, float scalars: the loss is a mean over ``counted`` targets
        (the loop weighs each process's loss by it) and ``correct / counted`` is the training accuracy."""
        raise NotImplementedError

    # ---------------------------------------------------------------- evaluation and result
    @abstractmethod
    def evaluate(self, model: nn.Module, batches, accelerator) -> dict:
        """Metrics of ``model`` on every batch of ``batches`` (the prepared evaluation loader, maybe wrapped in a
        progress bar), each image counted once over all processes (``gather_for_metrics``)."""
        raise NotImplementedError

    @abstractmethod
    def history_row(self, r: dict) -> dict:
        """The metrics of an evaluation kept in ``result['history']`` (``score`` among them)."""
        raise NotImplementedError

    @abstractmethod
    def eval_line(self, step: int, r: dict) -> str:
        """One line for the log after an evaluation."""
        raise NotImplementedError

    @abstractmethod
    def result(self, last: Optional[dict], best: Optional[dict]) -> dict:
        """The task's keys of ``result.json`` from the last evaluation (``evaluate``'s dict) and the best history
        row; both None when a stopped run evaluated nothing."""
        raise NotImplementedError

    def after_training(self, model: nn.Module, result: dict, accelerator, batches) -> None:
        """Work every process takes part in after the last step (e.g. accuracy on the training subset); adds keys
        to ``result``. ``batches(loader, desc)`` iterates a loader showing progress, as the loop's evaluations do."""

    def write_extras(self, model: nn.Module, out: Path, device: torch.device) -> None:
        """Files beside the result (main process only), e.g. a grid of predictions."""

    @abstractmethod
    def save_model(self, model: nn.Module, path: Path, result: dict) -> None:
        """Write the fine-tuned model to ``path`` (``--save-model``; main process only, after ``result.json``)."""
        raise NotImplementedError
