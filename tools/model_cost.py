#!/usr/bin/env python
"""Parameters and forward FLOPs of a teacher and an exported student, and their ratios (docs/results.md).

    python tools/model_cost.py --teacher fashion-mnist-ddpm --student runs/quickstart/student

The teacher's FLOPs are one full UNet forward on one image at its sample size (a feature extraction that stops at
an early block costs less: see bench/teacher_speed.py); the student's are one forward of the backbone at the input
size its export records. FLOPs counted by torch.utils.flop_counter (a multiply-add is 2 FLOPs).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.export import load_exported  # noqa: E402
from distill.teacher import load_unet  # noqa: E402


def forward_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops()


def model_cost(teacher: str, student: str) -> dict:
    unet, _ = load_unet(teacher)
    unet.eval()
    r = unet.config.sample_size
    x = torch.randn(1, unet.config.in_channels, r, r)
    t = torch.tensor([11])
    model = load_exported(student)
    model.eval()
    size = model.pretrained_cfg.get("input_size", (3, 64, 64))
    s = torch.randn(1, *size)
    out = {
        "teacher": teacher, "teacher_params": sum(p.numel() for p in unet.parameters()),
        "teacher_gflops": forward_flops(lambda: unet(x, t)) / 1e9, "teacher_input": list(x.shape[1:]),
        "student": student, "student_params": sum(p.numel() for p in model.parameters()),
        "student_gflops": forward_flops(lambda: model(s)) / 1e9, "student_input": list(s.shape[1:]),
    }
    out["params_ratio"] = out["student_params"] / out["teacher_params"]
    out["flops_ratio"] = out["student_gflops"] / out["teacher_gflops"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="packaged teacher name or diffusers directory")
    p.add_argument("--student", required=True, help="exported student directory (distill export)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    c = model_cost(args.teacher, args.student)
    print(f"teacher {c['teacher']}: {c['teacher_params'] / 1e6:.2f}M params, {c['teacher_gflops']:.3f} GFLOPs "
          f"per image at {c['teacher_input']}")
    print(f"student {c['student']}: {c['student_params'] / 1e6:.2f}M params, {c['student_gflops']:.3f} GFLOPs "
          f"per image at {c['student_input']}")
    print(f"student / teacher: params {c['params_ratio']:.2f}x, FLOPs {c['flops_ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(c, indent=2) + "\n")


if __name__ == "__main__":
    main()
