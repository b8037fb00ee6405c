"""Distill, export, load the student in timm, and fine-tune it on labels.

    python examples/distill_export_finetune.py                         # quickstart: Fashion-MNIST, shipped teacher
    python examples/distill_export_finetune.py --recipe cifar10-small-resnet18 --fraction 0.1
    python examples/distill_export_finetune.py --tiny --steps 2        # seconds: a tiny synthetic image folder

1. ``distill.train``: pretrain the recipe's student on the teacher's features (run directory ``OUT/run``).
2. ``distill.export_student``: write it in timm's format (``OUT/student``: ``config.json`` + ``model.safetensors``;
   with ``--onnx`` also ``model.onnx``).
3. ``timm.create_model('local-dir:OUT/student', pretrained=True, num_classes=0)``: a stock timm model, checked to
   give the trained student's features on the same images.
4. ``distill.finetune``: a new head on a seeded fraction of the labels for a fixed number of steps, top-1 on the
   test split (``OUT/finetune/result.json``). The same is three lines of plain timm:
   ``timm.create_model('local-dir:OUT/student', pretrained=True, num_classes=K)`` and your training loop.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import tempfile
from pathlib import Path

from distill.errors import parser_spelling, refuse, run_reporting
from distill.logs import count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="quickstart", help="a shipped recipe's name or a YAML file")
    p.add_argument("--data-root", default=None, help="the recipe's data (with --tiny and none: a synthetic folder)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: the recipe's)")
    p.add_argument("--fraction", type=float, default=None, help="share of the training labels to fine-tune on, in "
                                                                 "(0, 1] (default 0.01; --tiny: 1)")
    p.add_argument("--finetune-steps", type=int, default=None, help="default 500; --tiny: 2")
    p.add_argument("--onnx", action="store_true", help='also export model.onnx (pip install "diffusion-distill[onnx]")')
    p.add_argument("-o", "--output-dir", default="runs/example-export-finetune")
    p.add_argument("--resume", action="store_true",
                   help="continue the distillation stopped in --output-dir (the same arguments; not with --tiny, "
                        "whose data is gone)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run this script wrote before in --output-dir (never a folder of other files)")
    p.add_argument("--tiny", action="store_true", help="tiny data, student input and batches: a smoke run")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:  # before --tiny builds its data
        refuse(p, f"--steps must be an integer >= 1 (distillation steps); got {args.steps}.")
    with contextlib.ExitStack() as stack:  # the --tiny data lives as long as the run and is removed after it
        # the library's messages name this script's options: the fine-tune's steps are --finetune-steps here
        return run_reporting(p.prog, run, args, stack, spelling=parser_spelling(p, {"steps": "finetune_steps"}))


def run(args, stack: contextlib.ExitStack) -> int:
    """The four steps as ``args`` say; bad input raises the library's errors (``main`` reports them, exit 2)."""
    import distill
    from distill.finetune import FinetuneConfig, finetune, result_line

    out = Path(args.output_dir)
    overrides = {} if args.steps is None else {"steps": args.steps, "checkpoint_every": args.steps}
    if args.data_root:
        overrides["data_root"] = args.data_root
    finetune_kw = dict(fraction=1.0 if args.tiny else 0.01, steps=2 if args.tiny else 500)
    if args.tiny:
        finetune_kw.update(batch_size=6, warmup_steps=0, eval_batch_size=12, log_every=1)
    finetune_kw.update({k: v for k, v in (("fraction", args.fraction), ("steps", args.finetune_steps))
                        if v is not None})  # what the user gave wins over the defaults
    # every fine-tuning setting is checked before the distillation starts, not after it
    finetune_cfg = FinetuneConfig(model="OUT/student", **finetune_kw)
    finetune_cfg.validate()
    if args.tiny:
        from _tiny_data import shapes_folder

        root = args.data_root
        if root is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="distill-example-"))
            root = str(shapes_folder(Path(tmp) / "shapes"))
        print(f"--tiny: the recipe's student at 32 px, batch 4, distilled from the shipped CIFAR-10 teacher "
              f"(cifar10-ddpm-small, mid_block) on the images in {root}")
        overrides.update(dataset="image-folder", data_root=root, image_size=32, image_channels=3,
                         teacher="cifar10-ddpm-small", teacher_blocks=["mid_block"], student_size=32,
                         regressor_width=16, batch_size=4, warmup_steps=0, log_every=1, augment="flip",
                         probe_train_fraction=1.0)
    recipe = distill.load_recipe(args.recipe, overrides)
    import timm
    import torch

    # 1. distill
    summary = distill.train(recipe, str(out / "run"), resume=args.resume, overwrite=args.overwrite, progress=not args.tiny)
    print(f"1. distilled {recipe.student} from {recipe.teacher} for {count(summary['steps'], 'step')}: final losses "
          + ", ".join(f"{k} {v:.4f}" for k, v in summary["final_losses"].items()))

    # 2. export in timm's format
    student_dir = distill.export_student(str(out / "run"), str(out / "student"), overwrite=args.overwrite,
                                         onnx=args.onnx)
    print(f"2. exported to {student_dir}: {', '.join(sorted(p.name for p in student_dir.iterdir()))}")

    # 3. load it in timm; same features as the trained student on the same images
    backbone = timm.create_model(f"local-dir:{student_dir}", pretrained=True, num_classes=0).eval()
    trained = distill.load_trained(str(out / "run"))[0].student.model.eval()
    x = torch.randn(4, *backbone.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats, want = backbone(x), trained(x)
    diff = (feats - want).abs().max().item()
    print(f"3. timm.create_model('local-dir:{student_dir}'): {type(backbone).__name__}, features "
          f"{list(feats.shape)}, max |timm - trained| = {diff:.3g}")
    if not diff <= 1e-5:
        print("the exported student does not reproduce the trained one")
        return 1

    # 4. fine-tune with a fraction of the labels
    data_root = recipe.data_root if recipe.dataset != "fashion-mnist" else None
    result = finetune(dataclasses.replace(finetune_cfg, model=str(student_dir), dataset=recipe.dataset,
                                          data_root=data_root),
                      str(out / "finetune"), overwrite=args.overwrite, progress=not args.tiny)
    print(f"4. fine-tuned: {result_line(result)}; result in {out / 'finetune' / 'result.json'}")
    return 0 if math.isfinite(result["last_top1"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
