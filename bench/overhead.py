#!/usr/bin/env python
"""Framework overhead: distill's training step vs a hand-written loop doing the same math, side by side.

- library: the body of ``distill.trainer.train``'s loop: ``make_views`` (augmentation + teacher/student views),
  ``train_step`` inside an Accelerate-prepared model and optimizer (``accelerator.accumulate``,
  ``accelerator.backward``), ``nonfinite_terms``, ``accelerator.clip_grad_norm_`` + finiteness check, optimizer step,
  ``zero_grad``, LR scheduler step, loss sums and the periodic reduce for logging;
- hand-written: the same math in plain PyTorch: kornia augmentation, ``teacher(x)``, student + regressor,
  ``feature_distillation_loss``, ``backward``, ``clip_grad_norm_``, ``torch.optim.AdamW`` with timm's weight-decay
  groups, a ``LambdaLR`` warmup + cosine, ``zero_grad``.

Both start from the same weights and draw the same random numbers (``torch.manual_seed`` at each step in both arms),
so their losses must agree; this is checked and reported. Steps are interleaved (A, B, B, A, ...), medians compared.
The quickstart recipe at its batch (64), and at batch 8, where fixed per-step costs weigh more.

    OMP_NUM_THREADS=1 python bench/overhead.py --out bench/results/overhead_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import time

from _common import interleave, library_step, lr_lambda, machine, med, paired, quickstart_setup, save

import torch


def run(recipe_path: str, batch: int, repeats: int) -> dict:
    from timm.optim import param_groups_weight_decay

    from distill.augment import build_augment
    from distill.data import to_student, to_teacher, to_unit
    from distill.losses import feature_distillation_loss

    recipe, ds, mean, std, teacher, keys, model = quickstart_setup(recipe_path, {"batch_size": batch})
    hand_model = copy.deepcopy(model).train()
    size = ds[0][0].shape[-1]
    lib = library_step(recipe, teacher, keys, model, mean, std, size)

    opt = torch.optim.AdamW(param_groups_weight_decay(hand_model, recipe.weight_decay), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe))
    augment = build_augment(recipe.augment, size)

    def hand(images):
        x = augment(to_unit(images))
        feats = teacher(to_teacher(x, teacher.in_channels, teacher.sample_size))
        preds = hand_model(to_student(x, recipe.student_size, mean, std))
        loss = feature_distillation_loss(preds, [feats[k].float() for k in keys], mse_weight=recipe.mse_weight,
                                         at_weight=recipe.at_weight, cos_weight=recipe.cos_weight,
                                         at_mode=recipe.at_mode)["total"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hand_model.parameters(), recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return loss.detach()

    g = torch.Generator().manual_seed(recipe.seed)
    n_batches = repeats + 1
    idx = torch.randperm(len(ds), generator=g)[: n_batches * batch].view(n_batches, batch)
    batches = [torch.stack([ds[j][0] for j in row.tolist()]) for row in idx]
    losses = {"library": [], "hand": []}

    def arm(name, fn):
        def call(i):
            torch.manual_seed(1000 + i)  # same augmentation and noise in both arms
            losses[name].append(float(fn(batches[i], i) if name == "library" else fn(batches[i])))
        return call

    t0 = time.time()
    r_lib, r_hand = interleave([arm("library", lib), arm("hand", hand)], repeats=repeats, warmup=1)
    m_lib, m_hand = med(r_lib), med(r_hand)
    diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["library"], losses["hand"])]
    return {"batch": batch, "timed_steps_per_arm": repeats, "median_step_s": {"library": round(m_lib, 4),
                                                                            "hand": round(m_hand, 4)},
            "ratio_library_over_hand": round(m_lib / m_hand, 4),
            "ratio_estimators": paired(r_lib, r_hand),  # a = library, b = hand-written
            "median_diff_ms": round(1e3 * (m_lib - m_hand), 2),
            "step_s_spread": {"library": [round(min(r["total"] for r in r_lib), 3), round(max(r["total"] for r in r_lib), 3)],
                              "hand": [round(min(r["total"] for r in r_hand), 3), round(max(r["total"] for r in r_hand), 3)]},
            "same_math_max_rel_loss_diff": float(f"{max(diffs):.3g}"), "first_losses": {k: round(v[0], 5) for k, v in losses.items()},
            "wall_s": round(time.time() - t0, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/quickstart.yaml")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 8])
    p.add_argument("--repeats", type=int, nargs="+", default=[30, 30], help="timed steps per arm, per batch size")
    p.add_argument("--out", default="bench/results/overhead_cpu.json")
    args = p.parse_args(argv)
    info = machine()
    rows = [run(args.recipe, b, r) for b, r in zip(args.batches, args.repeats)]
    print("\n| batch | library step (s) | hand-written step (s) | library / hand (medians) | of minima | paired median "
          "[quartiles] | max rel. loss diff |\n|---|---|---|---|---|---|---|")
    for r in rows:
        e = r["ratio_estimators"]
        print(f"| {r['batch']} | {r['median_step_s']['library']} | {r['median_step_s']['hand']} | "
              f"{r['ratio_library_over_hand']} | {e['ratio_of_minima']} | {e['paired_ratio_median']} "
              f"{e['paired_ratio_quartiles']} | {r['same_math_max_rel_loss_diff']} |")
    save(args.out, {"recipe": args.recipe, "goal_ratio_max": 1.05, "rows": rows}, info)


if __name__ == "__main__":
    main()
