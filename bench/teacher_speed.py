#!/usr/bin/env python
"""Teacher-side speed, measured side by side in one process (random weights are fine for timing).

1. Early exit: time(extract up to block) / time(full forward), next to the FLOP share of the forward that precedes
   the block (torch.utils.flop_counter), for the shipped quickstart teacher and a google/ddpm-cifar10-32-sized UNet.
2. Multi-timestep batching: K timesteps per image in one batched forward vs K separate forwards, K = 1, 3, 5.

    python bench/teacher_speed.py --out bench/results/teacher_speed_cpu.json

Prints a Markdown table and writes the figures (with the machine) to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.teacher import DiffusionTeacher, load_unet  # noqa: E402

CIFAR10_DDPM = dict(  # the architecture of google/ddpm-cifar10-32 (35.7M params)
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=[128, 256, 256, 256],
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6)


def timeit_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Median seconds of two functions timed alternately (a, b, a, b, ...), so drifts in machine speed hit both."""
    import statistics

    fn_a(), fn_b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@torch.no_grad()
def bench_model(name, unet, scheduler, blocks, batch, repeats):
    C, S = unet.config.in_channels, unet.config.sample_size
    x0 = torch.rand(batch, C, S, S) * 2 - 1
    t = torch.full((batch,), 11, dtype=torch.long)
    full_fn = lambda: unet(x0, t)  # noqa: E731
    f_full = flops(full_fn)
    rows = []
    for b in blocks:
        teacher = DiffusionTeacher(unet, [b], [11], scheduler=scheduler)
        ex = lambda: teacher(x0)  # noqa: E731
        (t_ex, t_full), f_ex = timeit_pair(ex, full_fn, repeats), flops(ex)
        rows.append({"model": name, "block": b, "time_ratio": round(t_ex / t_full, 3),
                     "flop_share": round(f_ex / f_full, 3), "ms_extract": round(1e3 * t_ex, 1),
                     "ms_full": round(1e3 * t_full, 1)})
    multi = []
    teacher = DiffusionTeacher(unet, [blocks[-1]], [11], scheduler=scheduler)
    for K in (1, 3, 5):
        ts = [1 + 10 * k for k in range(K)]
        batched = lambda: teacher(x0, timesteps=ts)  # noqa: E731
        separate = lambda: [teacher(x0, timesteps=[s]) for s in ts]  # noqa: E731
        tb, tsep = timeit_pair(batched, separate, repeats)
        multi.append({"model": name, "K": K, "batched_ms": round(1e3 * tb, 1), "separate_ms": round(1e3 * tsep, 1),
                      "speedup": round(tsep / tb, 3)})
    return rows, multi


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="bench/results/teacher_speed_cpu.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    models = [("fashion-mnist-ddpm (1.1M)", *load_unet("fashion-mnist-ddpm"),
               ["down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1"]),
              ("ddpm-cifar10-32 size (35.7M, random)", *load_unet(CIFAR10_DDPM),
               ["mid_block", "up_blocks.0", "up_blocks.1.resnets.2", "up_blocks.2"])]
    exits, multis = [], []
    for name, unet, sched, blocks in models:
        r, m = bench_model(name, unet.eval(), sched, blocks, args.batch, args.repeats)
        exits += r
        multis += m
    print("| teacher | block | time(extract)/time(full) | FLOP share | extract ms | full ms |\n|---|---|---|---|---|---|")
    for r in exits:
        print(f"| {r['model']} | {r['block']} | {r['time_ratio']} | {r['flop_share']} | {r['ms_extract']} | {r['ms_full']} |")
    print("\n| teacher | K | batched ms | K separate ms | speedup |\n|---|---|---|---|---|")
    for m in multis:
        print(f"| {m['model']} | {m['K']} | {m['batched_ms']} | {m['separate_ms']} | {m['speedup']} |")
    machine = (f"{platform.machine()} {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}, cuda={torch.cuda.is_available()}")
    print(f"\nbatch {args.batch}, median of {args.repeats} interleaved repeats; {machine}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"early_exit": exits, "multi_timestep": multis, "batch": args.batch,
                               "repeats": args.repeats, "machine": machine,
                               "command": "python bench/teacher_speed.py " + " ".join(sys.argv[1:])}, indent=2) + "\n")


if __name__ == "__main__":
    main()
