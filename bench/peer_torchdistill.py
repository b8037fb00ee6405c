#!/usr/bin/env python
"""Peer comparison: the same FitNet-style regression + attention transfer with torchdistill's machinery vs distill.

Same teacher (the shipped fashion-mnist-ddpm UNet), same student + FPN regressor (same initial weights), same
batches, augmentation and noise (``torch.manual_seed`` at each step in both arms), same optimizer, clip and LR
schedule; steps interleaved, medians compared.

- distill: the body of ``distill.trainer.train``'s loop (``make_views`` + ``train_step`` in an Accelerate-prepared
  model/optimizer, non-finite check, clip, step; see bench/_common.py ``library_step``). The teacher stops its
  forward after the deepest requested block.
- torchdistill (PyPI ``torchdistill``): its ``ForwardHookManager`` collects the teacher's block outputs (a full UNet
  forward: torchdistill's hooks do not stop a forward) and the regressor heads' outputs, and its losses compute the
  objective: ``WeightedSumLoss`` over ``SimpleLossWrapper(nn.MSELoss)`` per level (on channel-LayerNorm'ed teacher
  features, DreamTeacher's whitening, added to the teacher io_dict) and ``ATLoss`` (mode 'code'), weights
  ``mse_weight / L`` and ``at_weight`` with per-pair weight ``1 / L``: the same value as distill's
  ``feature_distillation_loss`` (checked: the step losses of both arms are reported). Noise with the teacher
  scheduler's ``add_noise``, as distill does. A plain PyTorch loop around it (torchdistill's YAML-driven
  ``DistillationBox`` builds datasets and loaders of its own and is not used).

    OMP_NUM_THREADS=1 python bench/peer_torchdistill.py --out bench/results/peer_torchdistill_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import time

from _common import interleave, library_step, lr_lambda, machine, med, paired, quickstart_setup, save

import torch
import torch.nn as nn
import torch.nn.functional as F


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/quickstart.yaml")
    p.add_argument("--batch", type=int, default=None, help="default: the recipe's (64)")
    p.add_argument("--repeats", type=int, default=15, help="timed steps per arm")
    p.add_argument("--out", default="bench/results/peer_torchdistill_cpu.json")
    args = p.parse_args(argv)
    info = machine()
    import torchdistill
    from timm.optim import param_groups_weight_decay
    from torchdistill.core.forward_hook import ForwardHookManager
    from torchdistill.losses.high_level import WeightedSumLoss
    from torchdistill.losses.mid_level import ATLoss, SimpleLossWrapper

    from distill.augment import build_augment
    from distill.data import to_student, to_teacher, to_unit

    recipe, ds, mean, std, teacher, keys, model = quickstart_setup(
        args.recipe, {"batch_size": args.batch} if args.batch else {})
    if len(teacher.timesteps) != 1:
        raise SystemExit("this comparison takes one timestep (a hook sees one output per forward)")
    B, size = recipe.batch_size, ds[0][0].shape[-1]
    peer_model = copy.deepcopy(model).train()
    ours = library_step(recipe, teacher, keys, model, mean, std, size)

    # --- torchdistill arm
    device = torch.device("cpu")
    unet, L, t_val = copy.deepcopy(teacher.model), len(keys), teacher.timesteps[0]  # its own copy: no hooks on ours
    t_hooks, s_hooks = ForwardHookManager(device), ForwardHookManager(device)
    for b in teacher.blocks:
        t_hooks.add_hook(unet, b, requires_input=False, requires_output=True)
    heads = [f"regressor.heads.{i}" for i in range(L)]
    for h in heads:
        s_hooks.add_hook(peer_model, h, requires_input=False, requires_output=True)
    with torch.no_grad():  # regressor heads must already be at the teacher's size (no resize after the head)
        probe = peer_model(torch.zeros(2, 3, recipe.student_size, recipe.student_size))
        io = s_hooks.pop_io_dict()
        assert all(io[h]["output"].shape == p_.shape for h, p_ in zip(heads, probe)), "head output is resized"
    peer_model.train()
    sub_terms = {f"mse{i}": {"criterion": SimpleLossWrapper(
        nn.MSELoss(), input={"is_from_teacher": False, "module_path": heads[i], "io": "output"},
        target={"is_from_teacher": True, "module_path": f"{b}:whitened", "io": "output"}),
        "weight": recipe.mse_weight / L} for i, b in enumerate(teacher.blocks)}
    at_pairs = {f"pair{i}": {"student": {"io": "output", "path": heads[i]}, "teacher": {"io": "output", "path": b},
                             "weight": 1.0 / L} for i, b in enumerate(teacher.blocks)}
    sub_terms["at"] = {"criterion": ATLoss(at_pairs, mode=recipe.at_mode), "weight": recipe.at_weight}
    criterion = WeightedSumLoss(sub_terms=sub_terms)
    if recipe.cos_weight:
        raise SystemExit("cos_weight is not part of this comparison")
    opt = torch.optim.AdamW(param_groups_weight_decay(peer_model, recipe.weight_decay), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe))
    augment = build_augment(recipe.augment, size)

    def peer(images):
        x = augment(to_unit(images))
        x0 = to_teacher(x, teacher.in_channels, teacher.sample_size)
        with torch.no_grad():
            t = torch.full((x0.shape[0],), t_val, dtype=torch.long)
            x_t = teacher.scheduler.add_noise(x0.float(), torch.randn(x0.shape), t).to(teacher.dtype)
            unet(x_t, t)  # full forward; the hooks keep the block outputs
            t_io = t_hooks.pop_io_dict()
            for b in teacher.blocks:
                f = t_io[b]["output"].float()
                t_io[b]["output"] = f
                t_io[f"{b}:whitened"] = {"output": F.layer_norm(f.movedim(1, -1), (f.shape[1],), eps=1e-6).movedim(-1, 1)}
        peer_model(to_student(x, recipe.student_size, mean, std))
        s_io = s_hooks.pop_io_dict()
        loss = criterion({"student": s_io, "teacher": t_io}, {}, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer_model.parameters(), recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return loss.detach()

    g = torch.Generator().manual_seed(recipe.seed)
    n_batches = args.repeats + 1
    idx = torch.randperm(len(ds), generator=g)[: n_batches * B].view(n_batches, B)
    batches = [torch.stack([ds[j][0] for j in row.tolist()]) for row in idx]
    losses = {"distill": [], "torchdistill": []}

    def arm(name, fn):
        def call(i):
            torch.manual_seed(1000 + i)
            losses[name].append(float(fn(batches[i], i) if name == "distill" else fn(batches[i])))
        return call

    t0 = time.time()
    r_ours, r_peer = interleave([arm("distill", ours), arm("torchdistill", peer)], repeats=args.repeats, warmup=1)
    m_ours, m_peer = med(r_ours), med(r_peer)
    diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["distill"], losses["torchdistill"])]
    out = {"recipe": args.recipe, "batch": B, "augment": recipe.augment, "blocks": teacher.blocks,
           "timesteps": teacher.timesteps, "timed_steps_per_arm": args.repeats,
           "torchdistill_version": torchdistill.__version__,
           "median_step_s": {"distill": round(m_ours, 4), "torchdistill": round(m_peer, 4)},
           "steps_per_s": {"distill": round(1 / m_ours, 4), "torchdistill": round(1 / m_peer, 4)},
           "speedup_distill_over_torchdistill": round(m_peer / m_ours, 3),
           "ratio_estimators_torchdistill_over_distill": paired(r_peer, r_ours),  # a = torchdistill, b = distill
           "step_s_spread": {"distill": [round(min(r["total"] for r in r_ours), 3), round(max(r["total"] for r in r_ours), 3)],
                             "torchdistill": [round(min(r["total"] for r in r_peer), 3), round(max(r["total"] for r in r_peer), 3)]},
           "same_objective_max_rel_loss_diff": float(f"{max(diffs):.3g}"),
           "losses_first_last": {k: [round(v[0], 5), round(v[-1], 5)] for k, v in losses.items()},
           "wall_s": round(time.time() - t0, 1)}
    print(f"\n| implementation | median step (s) | steps/s |\n|---|---|---|")
    print(f"| distill (train_step, Accelerate, early exit) | {m_ours:.3f} | {1 / m_ours:.3f} |")
    print(f"| torchdistill {torchdistill.__version__} (ForwardHookManager + WeightedSumLoss/ATLoss) | {m_peer:.3f} | "
          f"{1 / m_peer:.3f} |")
    e = out["ratio_estimators_torchdistill_over_distill"]
    print(f"\ntorchdistill step / distill step: {out['speedup_distill_over_torchdistill']} (medians), "
          f"{e['ratio_of_minima']} (minima), {e['paired_ratio_median']} {e['paired_ratio_quartiles']} (per-round ratio, "
          f"median [quartiles]); same objective: max relative loss difference {out['same_objective_max_rel_loss_diff']}")
    save(args.out, out, info)


if __name__ == "__main__":
    main()
