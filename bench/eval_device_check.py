#!/usr/bin/env python
"""Evaluation on the accelerator: the same probe (a random-init timm backbone's pooled features, linear + kNN) on
the device distill chooses (Accelerate's: a GPU when there is one) and on the CPU; prints the device each used and
the seconds, and checks that both give the same accuracies within a tolerance (they differ only by float
rounding of the backbone and the probe's optimisation on another device).

    python bench/eval_device_check.py --images 2000 --out bench/results/eval_device.json    # a GPU machine
    OMP_NUM_THREADS=1 python bench/eval_device_check.py --images 256 --epochs 2               # CPU only: one row

Data: synthetic uint8 images in ``--classes`` colour-coded classes (no download), ``--images`` train and half as many
test. Exit code 1 when a GPU is present but the probe did not run on it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import machine  # noqa: E402
from distill.evaluate import ProbeData, backbone_fn, probe_fn  # noqa: E402
from distill.probe import eval_device  # noqa: E402
from distill.student import Student  # noqa: E402


class Synthetic(Dataset):
    """``(uint8 [3, S, S], label)``: noise with one class-dependent colour channel raised, seeded per index."""

    def __init__(self, n: int, size: int, classes: int, seed: int):
        self.n, self.size, self.classes, self.seed = n, size, classes, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        y = i % self.classes
        x = torch.randint(0, 200, (3, self.size, self.size), generator=g, dtype=torch.uint8)
        x[y % 3] = x[y % 3] // 4 + 40 * (y // 3 + 1)
        return x, y


def run(device, args, data) -> dict:
    torch.manual_seed(0)
    model = Student(args.student, args.size).model
    fn = backbone_fn(model, args.size, [0.5] * 3, [0.25] * 3)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    row = probe_fn(fn, data, batch_size=args.batch_size, epochs=args.epochs, k=20, device=device, progress=False,
                   name=f"{args.student} on {device}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    row["wall_seconds"] = round(time.perf_counter() - t0, 2)
    row["model_device"] = str(next(model.parameters()).device)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=2000, help="train images (test: half as many)")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=None, help="write the rows and the machine as JSON")
    args = p.parse_args()
    data = ProbeData(Synthetic(args.images, 32, args.classes, 0), Synthetic(args.images // 2, 32, args.classes, 1),
                     "synthetic")
    chosen = eval_device()
    print(f"distill's evaluation device (Accelerate): {chosen}"
          + (f" ({torch.cuda.get_device_name(chosen)})" if chosen.type == "cuda" else ""))
    rows = [run(chosen, args, data)]
    if chosen.type != "cpu":
        rows.append(run(torch.device("cpu"), args, data))
    print("| run | device used (probe) | model on | wall s | linear top-1 | kNN top-1 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['device']} | {r['model_device']} | {r['wall_seconds']} | {r['linear_top1']:.2f} | "
              f"{r['knn_top1']:.2f} |")
    ok = rows[0]["device"] == str(chosen) and rows[0]["model_device"].split(":")[0] == chosen.type
    if len(rows) == 2:
        print(f"speed-up of {chosen} over the CPU: {rows[1]['wall_seconds'] / max(rows[0]['wall_seconds'], 1e-9):.1f}x;"
              f" accuracy difference (linear, kNN): {rows[0]['linear_top1'] - rows[1]['linear_top1']:+.2f}, "
              f"{rows[0]['knn_top1'] - rows[1]['knn_top1']:+.2f} points")
    if torch.cuda.is_available() and chosen.type != "cuda":
        ok = False
        print("FAIL: a GPU is present but distill chose", chosen)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "machine": machine(), "args": vars(args)}, indent=2))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
