"""Distill a timm student from your own diffusion network (a ``python:`` teacher).

    python examples/distill_python_teacher.py --teacher-weights my_unet.safetensors --data-root ~/data/imgs
    python examples/distill_python_teacher.py --tiny --steps 2          # seconds: tiny data and models, no weights

The teacher is ``examples/my_teacher.py:make_unet`` (stand in your own file and factory with ``--teacher``): any
``nn.Module`` called as ``model(noisy_image, timestep)``. A recipe naming a ``python:`` teacher runs that file's
code, as importing it would: name only code you would run yourself. Without ``--teacher-weights`` the teacher keeps
its random initialisation, which tries the wiring but distills nothing useful. Writes a run directory (``config.yaml``
recording the teacher's code and weights sha256, ``metrics.csv``, ``checkpoint-{step}/``, ``summary.json``) and
prints the final losses.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
from pathlib import Path

from distill.errors import parser_spelling, refuse, run_reporting
from distill.logs import count

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=f"python:{HERE / 'my_teacher.py'}:make_unet",
                   help="python:MODULE_OR_FILE:FACTORY (default: the example UNet)")
    p.add_argument("--teacher-weights", default=None, help=".safetensors or .pt state dict of the teacher")
    p.add_argument("--blocks", nargs="+", default=["mid", "up.0"], help="teacher blocks (named_modules paths)")
    p.add_argument("--timesteps", nargs="+", type=int, default=[11])
    p.add_argument("--dataset", default="image-folder", help="fashion-mnist, image-folder, file-list or hf")
    p.add_argument("--data-root", default=None, help="the images (with --tiny and none: a tiny synthetic folder)")
    p.add_argument("--image-size", type=int, default=32, help="images are decoded to this size; the teacher's input")
    p.add_argument("--student", default="resnet18")
    p.add_argument("--student-size", type=int, default=None, help="student input size (default 64; --tiny: 32)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=None, help="default 64; --tiny: 4")
    p.add_argument("-o", "--output-dir", default="runs/example-python-teacher")
    p.add_argument("--resume", action="store_true",
                   help="continue the distillation stopped in --output-dir (the same arguments; not with --tiny, "
                        "whose data is gone)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run this script wrote before in --output-dir (never a folder of other files)")
    p.add_argument("--tiny", action="store_true", help="tiny teacher, student input and batch (where not given): a "
                                                       "smoke run")
    args = p.parse_args(argv)
    if args.steps < 1:  # before --tiny builds its data (the recipe would name its key, steps, not this option)
        refuse(p, f"--steps must be an integer >= 1 (distillation steps); got {args.steps}.")
    if args.data_root is None and not args.tiny and args.dataset != "fashion-mnist":
        refuse(p, "--data-root is required (or --tiny for a synthetic folder, or --dataset fashion-mnist)")
    with contextlib.ExitStack() as stack:  # the --tiny data lives as long as the run and is removed after it
        return run_reporting(p.prog, run, args, stack, spelling=parser_spelling(p))  # messages name its options


def run(args, stack: contextlib.ExitStack) -> int:
    """Distill as ``args`` say; bad input raises the library's errors (``main`` reports them, exit 2)."""
    import distill

    data_root = args.data_root
    if args.tiny and data_root is None:
        from _tiny_data import shapes_folder

        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="distill-example-"))
        data_root = str(shapes_folder(Path(tmp) / "shapes"))
        print(f"--tiny: wrote a synthetic image folder to {data_root} (removed at the end)")
    channels = 1 if args.dataset == "fashion-mnist" else 3
    student_size = args.student_size if args.student_size is not None else (32 if args.tiny else 64)
    batch_size = args.batch_size if args.batch_size is not None else (4 if args.tiny else 64)
    recipe = distill.make_recipe(dict(
        teacher=args.teacher, teacher_kwargs={"in_channels": channels, "image_size": args.image_size,
                                              "base": 8 if args.tiny else 32},
        teacher_weights=args.teacher_weights, teacher_blocks=args.blocks, timesteps=args.timesteps,
        dataset=args.dataset, data_root=data_root, image_size=args.image_size,
        student=args.student, student_size=student_size,
        regressor_width=16 if args.tiny else 128, steps=args.steps, batch_size=batch_size,
        warmup_steps=0 if args.tiny else 100, log_every=1 if args.tiny else 50,
        checkpoint_every=args.steps, mean=[0.5] * 3, std=[0.5] * 3))
    summary = distill.train(recipe, args.output_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.tiny)
    losses = summary["final_losses"]
    print(f"distilled {args.student} from {args.teacher} (blocks {args.blocks}, timesteps {args.timesteps}) for "
          f"{count(summary['steps'], 'step')} into {args.output_dir}; final losses: "
          + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    if not all(math.isfinite(v) for v in losses.values()):
        print("a loss is not finite")
        return 1
    import yaml

    resolved = yaml.safe_load((Path(args.output_dir) / "config.yaml").read_text())["_resolved"]
    source = json.dumps(resolved["teacher_source"], default=str)
    print(f"the run records the teacher's code and weights: {source}")
    print(f"next: distill export {args.output_dir} -o {args.output_dir}/student")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
