#!/usr/bin/env python
"""Linear-probe a diffusion teacher's own features (blocks x timesteps) next to an untrained UNet of the same config.

    python tools/probe_teacher.py --teacher fashion-mnist-ddpm --train-fraction 0.1 \
        --json distill/teacher/packaged/fashion-mnist-ddpm/PROBE.json

Prints one Markdown table per model (best first) and the best (block, timestep) of each.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.evaluate import probe_data  # noqa: E402
from distill.select import teacher_grid_probe  # noqa: E402
from distill.teacher import DiffusionTeacher, load_unet  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="fashion-mnist-ddpm")
    p.add_argument("--blocks", nargs="+",
                   default=["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"])
    p.add_argument("--timesteps", nargs="+", type=int, default=[1, 11, 50, 150])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--train-fraction", type=float, default=0.1)
    p.add_argument("--protocol", default="offline", choices=["offline", "online"],
                   help="offline (default): the students' probe (features pooled once, one noise draw per image, "
                        "Adam lr 1e-3, 30 epochs), so teacher and student numbers compare; online: distill select's "
                        "grid probe (fresh noise every step, lr 1e-2, 2 epochs)")
    p.add_argument("--epochs", type=int, default=None, help="probe epochs (default: 30 offline, 2 online)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=["trained", "untrained"], choices=["trained", "untrained"],
                   help="the teacher's weights, and/or the same config at random init (seeded)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    epochs = args.epochs or (30 if args.protocol == "offline" else 2)
    unet, scheduler = load_unet(args.teacher)
    channels = unet.config.in_channels
    data = probe_data(args.dataset, args.data_root, channels, args.train_fraction, args.seed)
    models = {}
    if "trained" in args.models:
        models["trained"] = unet
    if "untrained" in args.models:
        torch.manual_seed(args.seed)
        models["untrained"] = type(unet).from_config(unet.config)
    out = {"teacher": args.teacher, "train_images": len(data.train), "test_images": len(data.test),
           "command": "python tools/probe_teacher.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"}
    for name, model in models.items():
        t0 = time.time()
        teacher = DiffusionTeacher(model, args.blocks, args.timesteps, scheduler=scheduler, name=name)
        rows = teacher_grid_probe(teacher, data, args.batch_size, epochs, args.seed, protocol=args.protocol)
        print(f"\n## {name} UNet ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params): "
              f"linear probe on {len(data.train)} train / {len(data.test)} test images, {time.time() - t0:.0f}s")
        print("| block | t | channels | linear top-1 |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['block']} | {r['timestep']} | {r['channels']} | {r['linear_top1']:.2f} |")
        out[name] = rows
    print("\nbest: " + "; ".join(f"{n}: {out[n][0]['block']} @ t={out[n][0]['timestep']} -> "
                                 f"{out[n][0]['linear_top1']:.2f}%" for n in models))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
