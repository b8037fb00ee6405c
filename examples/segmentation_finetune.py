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
import math
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="timm:resnet18", help="an exported student directory, or timm:NAME")
    p.add_argument("--data-root", default=None, help="CamVid (train/ + trainannot/, ...) or --layout's folders; with "
                                                     "--tiny and none: a synthetic images/masks set")
    p.add_argument("--layout", default="camvid", help="camvid, images-masks, voc, ade20k, cityscapes")
    p.add_argument("--num-classes", type=int, default=None, help="images-masks: class ids 0..N-1 in the masks")
    p.add_argument("--class-names", default=None, help="a file of class names, one per line")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the training masks")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--size", type=int, default=None, help="input height (default: the images' own)")
    p.add_argument("-o", "--output-dir", default="runs/example-segmentation")
    p.add_argument("--tiny", action="store_true", help="tiny data, decoder and batches: a smoke run")
    args = p.parse_args(argv)

    from distill.segment import SegmentConfig, segment_finetune

    kw = dict(layout=args.layout, num_classes=args.num_classes, class_names=args.class_names)
    if args.tiny:
        from _tiny_data import segmentation_folder

        root = args.data_root or str(segmentation_folder(Path(tempfile.mkdtemp(prefix="distill-example-")) / "seg"))
        print(f"--tiny: fine-tuning on the synthetic images and masks in {root}")
        kw = dict(layout="images-masks", num_classes=4, class_names=str(Path(root) / "classes.txt"),
                  decoder_width=16, batch_size=4, eval_batch_size=6, warmup_steps=0, log_every=1, grid_images=3)
    elif args.data_root is None:
        p.error("--data-root is required (CamVid: the folder holding train/ and trainannot/), or --tiny")
    else:
        root = args.data_root
    cfg = SegmentConfig(model=args.model, data_root=root, fraction=args.fraction, steps=args.steps, size=args.size,
                        **kw)
    r = segment_finetune(cfg, args.output_dir, overwrite=True, progress=not args.tiny)
    worst = sorted(r["per_class_iou"].items(), key=lambda kv: kv[1])[:3]
    print(f"fine-tuned {r['label']} for segmentation on {r['train_images']} training images, {r['steps']} steps: "
          f"mIoU {r['last_miou']:.2f}, pixel accuracy {r['last_pixel_acc']:.2f} on {r['test_images']} test images; "
          f"lowest IoU: " + ", ".join(f"{k} {v:.1f}" for k, v in worst))
    print(f"wrote {', '.join(sorted(p.name for p in Path(args.output_dir).iterdir() if not p.name.startswith('.')))} "
          f"in {args.output_dir}")
    return 0 if math.isfinite(r["last_miou"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
