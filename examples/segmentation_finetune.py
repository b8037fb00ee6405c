"""Fine-tune a backbone for semantic segmentation on a small set: CamVid, your own images + masks, or a tiny
synthetic set.

    python examples/segmentation_finetune.py --data-root ~/data/camvid --model runs/example-export-finetune/student
    python examples/segmentation_finetune.py --data-root ~/data/mine --layout images-masks --num-classes 5 \\
        --class-names ~/data/mine/classes.txt --model timm:resnet18
    python examples/segmentation_finetune.py --tiny --steps 2             # seconds: a synthetic images/masks set

``--model`` is an exported student (``distill export``), or ``timm:NAME`` for the same architecture at random
init (the scratch baseline). Its multi-scale maps feed a light FPN decoder trained with a seeded fraction of the
training masks (``distill.segment.segment_finetune``; the CLI is ``distill finetune --task segmentation``); mIoU,
per-class IoU and pixel accuracy are measured on the test split. Writes ``OUT/result.json``, ``OUT/train_log.csv``
and ``OUT/predictions.png`` (images, ground truth, prediction, and a legend of the classes shown).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
from pathlib import Path

from distill.errors import parser_spelling, refuse, run_reporting
from distill.logs import count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="timm:resnet18", help="an exported student directory, or timm:NAME")
    p.add_argument("--data-root", default=None, help="CamVid (train/ + trainannot/, ...) or --layout's folders; with "
                                                     "--tiny and none: a synthetic images/masks set")
    p.add_argument("--layout", default=None, help="camvid (default), images-masks, voc, ade20k, cityscapes")
    p.add_argument("--num-classes", type=int, default=None, help="images-masks: class ids 0..N-1 in the masks")
    p.add_argument("--class-names", default=None, help="a file of class names, one per line")
    p.add_argument("--mask-threshold", type=int, default=None, metavar="T",
                   help="binary masks (8-bit grey or JPEG): grey value >= T is class 1, else 0 (e.g. 128)")
    p.add_argument("--ignore-index", type=int, default=None,
                   help="id of unlabelled pixels (default: camvid 11, others 255)")
    p.add_argument("--eval-split", default="test", help="split evaluated at the end: test or val")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the training masks")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--size", type=int, default=None, help="input height (default: the images' own)")
    p.add_argument("-o", "--output-dir", default="runs/example-segmentation")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run this script wrote before in --output-dir (never a folder of other files)")
    p.add_argument("--tiny", action="store_true", help="tiny decoder and batches (and with no --data-root: a "
                                                       "synthetic set): a smoke run")
    args = p.parse_args(argv)
    synthetic = args.tiny and args.data_root is None
    if synthetic:
        given = [f"{flag} {v}" for flag, v in (("--layout", args.layout), ("--num-classes", args.num_classes),
                                                ("--class-names", args.class_names),
                                                ("--mask-threshold", args.mask_threshold),
                                                ("--ignore-index", args.ignore_index)) if v is not None]
        if given:
            refuse(p, f"{', '.join(given)}: --tiny without --data-root fine-tunes on a synthetic set of its own "
                    f"(images-masks layout, 4 classes, its classes.txt), which these do not describe. Fix: give "
                    f"--data-root with the data they describe, or leave them out.")
    elif args.data_root is None:
        refuse(p, "--data-root is required (CamVid: the folder holding train/ and trainannot/), or --tiny")
    with contextlib.ExitStack() as stack:  # the --tiny data lives as long as the run and is removed after it
        # the library's messages name this script's options (--model, --steps, ...), not distill finetune's
        return run_reporting(p.prog, run, args, stack, synthetic, spelling=parser_spelling(p))


def run(args, stack: contextlib.ExitStack, synthetic: bool) -> int:
    """Fine-tune as ``args`` say; bad input raises the library's errors (``main`` reports them, exit 2)."""
    from distill.segment import SegmentConfig, segment_finetune

    root = args.data_root
    kw = dict(layout=args.layout or "camvid", num_classes=args.num_classes, class_names=args.class_names,
              mask_threshold=args.mask_threshold, ignore_index=args.ignore_index)
    if synthetic:
        from _tiny_data import segmentation_folder

        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="distill-example-"))
        root = str(segmentation_folder(Path(tmp) / "seg"))
        print(f"--tiny: fine-tuning on the synthetic images and masks in {root} (removed at the end)")
        kw = dict(layout="images-masks", num_classes=4, class_names=str(Path(root) / "classes.txt"),
                  mask_threshold=None, ignore_index=None)
    if args.tiny:
        kw.update(decoder_width=16, batch_size=4, eval_batch_size=6, warmup_steps=0, log_every=1, grid_images=3)
    cfg = SegmentConfig(model=args.model, data_root=root, fraction=args.fraction, steps=args.steps, size=args.size,
                        eval_split=args.eval_split, **kw)
    r = segment_finetune(cfg, args.output_dir, overwrite=args.overwrite, progress=not args.tiny)
    worst = sorted(r["per_class_iou"].items(), key=lambda kv: kv[1])[:3]
    print(f"fine-tuned {r['label']} for segmentation on {count(r['train_images'], 'training image')}, "
          f"{count(r['steps'], 'step')}: mIoU {r['last_miou']:.2f}, pixel accuracy {r['last_pixel_acc']:.2f} on "
          f"{count(r['test_images'], 'test image')}; lowest IoU: " + ", ".join(f"{k} {v:.1f}" for k, v in worst))
    mine = ("result.json", "train_log.csv", "predictions.png", "model")  # what segment_finetune writes, nothing else
    print(f"wrote {', '.join(n for n in mine if (Path(args.output_dir) / n).exists())} in {args.output_dir}")
    return 0 if math.isfinite(r["last_miou"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
