"""Optimizer and learning-rate schedule, shared by distillation and fine-tuning (plain arguments, no recipe).

The optimizer is timm's factory (``create_optimizer_v2``: no weight decay on norms and biases; AdamW, LAMB or
SGD with momentum); the schedule is diffusers' ``get_cosine_schedule_with_warmup``: the rate rises linearly from
0 to ``lr`` over ``warmup_steps`` and then follows a half cosine to 0 at ``total_steps``:

    lr(s) = lr * s / w                                      for s < w
    lr(s) = lr * 0.5 * (1 + cos(pi * (s - w) / (T - w)))    for w <= s <= T

where ``s`` counts scheduler steps already taken (the rate used by update ``s + 1``), ``w`` = warmup_steps
(capped at T) and ``T`` = total_steps (Loshchilov & Hutter, SGDR, 2017; Goyal et al. 2017 for the warmup).
"""
from __future__ import annotations

import torch

from .vocab import OPTIMIZERS


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over ``model``'s parameters.

    Args:
        name: one of :data:`distill.vocab.OPTIMIZERS`.
        lr: peak learning rate (> 0).
        weight_decay: decoupled weight decay (AdamW, LAMB) or L2 (SGD); not applied to norms and biases.
        momentum: SGD only.

    Raises:
        ValueError: an unknown ``name``.
    """
    from timm.optim import create_optimizer_v2

    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not valid; valid: {', '.join(OPTIMIZERS)}.")
    kwargs = {"momentum": momentum} if name == "sgd" else {}
    return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup then cosine decay to 0 (module docstring's formula); call ``.step()`` once per update."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, min(warmup_steps, total_steps), total_steps)

