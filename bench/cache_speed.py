#!/usr/bin/env python
"""Training from the feature cache (`distill extract`) vs from the live teacher, side by side in one process.

The quickstart recipe (shipped fashion-mnist-ddpm teacher, blocks mid_block + up_blocks.0 at t=11, ResNet-18 at
64 px, FPN width 128, batch 64, AdamW, grad clip 1, warmup + cosine) with ``augment: none`` (a cache holds
features of un-augmented images, so both arms use none) on the first ``steps x batch`` Fashion-MNIST training
images, i.e. one epoch of that subset. Both arms train their own copy of the same initial student + regressor on
the same batches; steps are interleaved (live, cache, cache, live, ...) and the medians compared:

- live: ``teacher(to_teacher(x))`` (noise, forward to the deepest block, early exit), then the student step;
- cache: ``cache.targets(indices, cache.draw_ids(indices, step, seed))`` (memory-mapped fp16 reads), then the same
  student step.

    OMP_NUM_THREADS=1 python bench/cache_speed.py --out bench/results/cache_speed_cpu.json

Prints the figures and writes them to --out.
"""
from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path

from _common import interleave, library_step, machine, med, save

import torch
from torch.utils.data import Subset

from distill.cache import FeatureCache, expected_key, extract_features_cache
from distill.config import load_recipe
from distill.build import build_model, build_teacher, build_train_data, resolve_mean_std
from distill.trainer.targets import CacheTargets, LiveTeacherTargets


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/quickstart.yaml")
    p.add_argument("--steps", type=int, default=25, help="timed steps per arm = one epoch of steps*batch images")
    p.add_argument("--batch", type=int, default=None, help="default: the recipe's (64)")
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--cache-dir", default=None, help="default: a temporary directory, removed at the end")
    p.add_argument("--out", default="bench/results/cache_speed_cpu.json")
    args = p.parse_args(argv)
    info = machine()
    t_start = time.time()
    recipe = load_recipe(args.recipe, {"augment": "none", **({"batch_size": args.batch} if args.batch else {})})
    B, steps = recipe.batch_size, args.steps
    n = steps * B
    ds_full, ch = build_train_data(recipe)
    mean, std = resolve_mean_std(recipe, ds_full)
    ds = Subset(ds_full, list(range(n)))

    tmp = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="distill-cache-bench-")) / "cache"
    t0 = time.time()
    res = extract_features_cache(recipe, tmp, num_draws=args.draws, max_images=n, overwrite=True, progress=False,
                                 device="cpu")
    t_extract = time.time() - t0
    torch.manual_seed(recipe.seed)
    teacher = build_teacher(recipe, ch)
    cache = FeatureCache(tmp, expect=expected_key(recipe, ds, teacher, ch, args.draws))  # as a run would open it
    keys = [f.key for f in teacher.feature_info]
    print(f"extracted {n} images x {args.draws} draws in {t_extract:.1f} s: {res['bytes'] / 2**20:.1f} MiB, "
          f"{res['bytes_per_image'] / 1024:.1f} KiB per image")

    torch.manual_seed(recipe.seed)
    model_live = build_model(recipe, teacher).train()
    model_cache = copy.deepcopy(model_live)
    images = torch.stack([ds[i][0] for i in range(n)])  # (n, 1, 28, 28) uint8, in memory for both arms
    labels = torch.zeros(n, dtype=torch.long)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed)).view(steps, B)
    last, target_s = {}, {}

    class Timed:
        """A target source whose calls are timed (the 'targets' share of a step)."""

        def __init__(self, name, source):
            self.name, self.source = name, source

        def __call__(self, batch, micro):
            t0 = time.perf_counter()
            out = self.source(batch, micro)
            target_s[self.name] = time.perf_counter() - t0
            return out

    groups = [[k] for k in keys]
    # the library's own loop step (distill.trainer.loop.optimizer_step) for both arms, with its two target sources
    arms = {"live": library_step(recipe, teacher, keys, model_live, mean, std, images.shape[-1], source=Timed(
                "live", LiveTeacherTargets(teacher, groups, torch.nn.Identity(), recipe.student_size, mean, std))),
            "cache": library_step(recipe, teacher, keys, model_cache, mean, std, images.shape[-1], source=Timed(
                "cache", CacheTargets(cache, groups, recipe.student_size, mean, std, recipe.seed, "cpu")))}

    def arm(name):
        def call(i):
            idx = order[i % steps]
            last[name] = float(arms[name](None, i, batch=(images[idx], labels[idx], idx)))
            return {"targets": target_s[name]}
        return call

    live, cached = arm("live"), arm("cache")

    t0 = time.time()
    r_live, r_cache = interleave([live, cached], repeats=steps, warmup=1)
    t_train = time.time() - t0
    m_live, m_cache = med(r_live), med(r_cache)
    teacher_s, read_s = med(r_live, "targets"), med(r_cache, "targets")
    share = teacher_s / m_live
    steps_full = len(ds_full) // B
    out = {
        "recipe": args.recipe, "augment": "none", "batch": B, "timed_steps_per_arm": steps,
        "subset_images": n, "subset_note": f"first {n} of {len(ds_full)} training images = one epoch of the subset",
        "draws": args.draws, "keys": keys,
        "median_step_s": {"live": round(m_live, 4), "cache": round(m_cache, 4)},
        "epoch_s_sum_of_steps": {"live": round(sum(r["total"] for r in r_live), 2),
                                 "cache": round(sum(r["total"] for r in r_cache), 2)},
        "speedup_cache_over_live": round(m_live / m_cache, 3),
        "goal_speedup": 3.0,
        "median_targets_s": {"teacher_forward": round(teacher_s, 4), "cache_read": round(read_s, 5)},
        "targets_speedup_cache_read_over_teacher": round(teacher_s / read_s, 1),
        "teacher_share_of_live_step": round(share, 4),
        "max_speedup_if_targets_were_free": round(1 / (1 - share), 3),
        "full_epoch_projection_s": {"live": round(m_live * steps_full, 1), "cache": round(m_cache * steps_full, 1),
                                    "steps": steps_full},
        "cache_bytes": res["bytes"], "bytes_per_image": round(res["bytes_per_image"], 1),
        "bytes_per_image_per_draw": round(res["bytes_per_image"] / args.draws, 1),
        "full_train_set_cache_gib": round(res["bytes_per_image"] * len(ds_full) / 2**30, 2),
        "extract_s": round(t_extract, 1), "extract_img_per_s": round(n / t_extract, 1),
        "final_loss": {k: round(v, 4) for k, v in last.items()},
        "step_s_spread": {k: [round(min(r["total"] for r in rs), 3), round(max(r["total"] for r in rs), 3)]
                          for k, rs in (("live", r_live), ("cache", r_cache))},
        "train_wall_s": round(t_train, 1), "script_wall_s": round(time.time() - t_start, 1),
    }
    print(f"\n| arm | median step (s) | targets (s) | epoch of {n} images (s) |\n|---|---|---|---|")
    print(f"| live teacher | {m_live:.3f} | {teacher_s:.3f} (teacher forward) | {out['epoch_s_sum_of_steps']['live']} |")
    print(f"| feature cache | {m_cache:.3f} | {read_s:.4f} (memmap read) | {out['epoch_s_sum_of_steps']['cache']} |")
    print(f"\nspeedup {out['speedup_cache_over_live']}x (goal 3x); teacher share of a live step {share:.1%}, so at most "
          f"{out['max_speedup_if_targets_were_free']}x here; target fetch {out['targets_speedup_cache_read_over_teacher']}x "
          f"faster. Disk: {out['bytes_per_image']:.0f} B/image ({args.draws} draws), "
          f"{out['full_train_set_cache_gib']} GiB for all {len(ds_full)} images.")
    save(args.out, out, info)
    if not args.cache_dir:
        shutil.rmtree(tmp.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
