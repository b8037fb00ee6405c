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

from typing import Optional

import torch

from .vocab import OPTIMIZERS


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float,
                    momentum: float = 0.9, layer_decay: Optional[float] = None,
                    backbone_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over ``model``'s parameters.

    Args:
        name: one of `distill.vocab.OPTIMIZERS`.
        lr: peak learning rate (> 0).
        weight_decay: decoupled weight decay (AdamW, LAMB) or L2 (SGD); not applied to norms and biases.
        momentum: SGD only.
        layer_decay: layer-wise lr decay in (0, 1] (BEiT, Bao et al. 2022; timm's ``layer_decay``): a parameter of
            layer ``l`` of ``L`` (timm's ``group_matcher`` order, stem first, head last) gets
            ``lr * layer_decay ** (L - l)``. None: off.
        backbone_lr_mult: factor (> 0) on the rate of every parameter outside the classifier head
            (``model.get_classifier()``), after layer decay; 1: off.

    Each parameter group's rate is ``lr`` times its scale (``param_group['lr_scale']``), set here, so the warmup +
    cosine schedule (`build_scheduler`) scales every group alike.

    Raises:
        ValueError: an unknown ``name``, ``layer_decay`` outside (0, 1] or ``backbone_lr_mult`` <= 0.
    """
    from timm.optim import create_optimizer_v2

    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not valid; valid: {', '.join(OPTIMIZERS)}.")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay {layer_decay!r} is outside (0, 1]; give e.g. 0.75 (the lr shrinks by this "
                         f"factor per layer below the head), or none to turn it off.")
    if not backbone_lr_mult > 0:
        raise ValueError(f"backbone_lr_mult {backbone_lr_mult!r} must be > 0; give e.g. 0.1 (the backbone learns at "
                         f"a tenth of the head's rate), or 1 to turn it off.")
    kwargs = {"momentum": momentum} if name == "sgd" else {}
    if layer_decay is None and backbone_lr_mult == 1.0:
        return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)
    groups = scaled_param_groups(model, weight_decay, layer_decay, backbone_lr_mult)
    optimizer = create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return optimizer


def scaled_param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: Optional[float],
                        backbone_lr_mult: float) -> list[dict]:
    """timm's parameter groups (no decay on 1-d parameters and ``model.no_weight_decay()``; with ``layer_decay``,
    one group per layer with ``lr_scale``), each split into its classifier-head and backbone parameters, the
    backbone's ``lr_scale`` multiplied by ``backbone_lr_mult``. Groups left empty are dropped."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, torch.nn.Module) else set()
    out = []
    for g in groups:
        scale = g.get("lr_scale", 1.0)
        params = list(g["params"])
        for is_head, mult in ((True, 1.0), (False, backbone_lr_mult)):
            part = [p for p in params if (id(p) in head_ids) == is_head]
            if part:
                out.append({**g, "params": part, "lr_scale": scale * mult})
    return out


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup then cosine decay to 0 (module docstring's formula); call ``.step()`` once per update."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, min(warmup_steps, total_steps), total_steps)

