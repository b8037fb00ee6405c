"""``distill finetune``: classification (``--task classification``) and semantic segmentation
(``--task segmentation``) fine-tuning of an export or of ``timm:NAME`` from scratch."""
from __future__ import annotations

from ..vocab import DATASETS, SEG_DECODERS, SEG_LAYOUTS, TASKS, TRACKERS
from ..logs import count
from .common import add_output_dir


def add_finetune_parser(sub) -> None:
    ft = sub.add_parser("finetune", help="fine-tune an exported student or timm:NAME (scratch) with a label "
                                         "fraction; top-1/top-5 on the test split")
    ft.add_argument("model", help="exported student directory (distill export) or timm:NAME for random init")
    add_output_dir(ft, "run directory (result.json, train_log.csv); with --fractions/--seeds one "
                        "frac{F}-seed{S}/ per run")
    ft.add_argument("--dataset", default=None, help=f"{' | '.join(DATASETS)} (default: the export's dataset)")
    ft.add_argument("--data-root", default=None)
    ft.add_argument("--test-root", default=None, help="image-folder test split if not DATA_ROOT/test")
    ft.add_argument("--fraction", type=float, default=1.0, help="share of training labels (stratified, seeded)")
    ft.add_argument("--seed", type=int, default=0, help="subset, head init, data order and augmentation seed")
    ft.add_argument("--fractions", type=float, nargs="+", default=None, metavar="F",
                    help="sweep: one run per fraction (x --seeds)")
    ft.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S", help="sweep: one run per seed")
    ft.add_argument("--steps", type=int, default=None, help="optimizer steps, the same for every fraction (default 500)")
    ft.add_argument("--batch-size", type=int, default=None, help="default 64")
    ft.add_argument("--optimizer", default="adamw", help="adamw, sgd or lamb (timm create_optimizer_v2)")
    ft.add_argument("--lr", type=float, default=1e-3)
    ft.add_argument("--weight-decay", type=float, default=0.05)
    ft.add_argument("--momentum", type=float, default=0.9, help="sgd only")
    ft.add_argument("--warmup-steps", type=int, default=None, help="default 50")
    ft.add_argument("--layer-decay", type=float, default=None, metavar="D",
                    help="layer-wise lr decay in (0, 1], e.g. 0.75: each layer below the head learns at D x the rate "
                         "of the one above (timm create_optimizer_v2); default off")
    ft.add_argument("--backbone-lr-mult", type=float, default=1.0, metavar="M",
                    help="lr factor on the backbone (every parameter but the new head), e.g. 0.1; default 1")
    ft.add_argument("--augment", default="crop-flip", help="none, flip or crop-flip (kornia)")
    ft.add_argument("--label-smoothing", type=float, default=0.0)
    ft.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm; 0: no clipping")
    ft.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (and at the end); 0: end "
                                                                "(default 100)")
    ft.add_argument("--eval-batch-size", type=int, default=None, help="default 256")
    ft.add_argument("--log-every", type=int, default=10)
    ft.add_argument("--like", default=None, metavar="EXPORTED_DIR",
                    help="timm:NAME runs copy this export's input size, mean/std and model args")
    ft.add_argument("--size", type=int, default=None, help="input size (default: the export's / --like's, else 64)")
    ft.add_argument("--mean", type=float, nargs="+", default=None, help="default: the export's, else the data's")
    ft.add_argument("--std", type=float, nargs="+", default=None)
    ft.add_argument("--label", default=None, help="name in reports (default: '<arch> distilled' / '<arch> scratch')")
    ft.add_argument("--mixed-precision", default=None,
                    help="no, fp16 or bf16 (default: Accelerate's configuration: accelerate launch --mixed_precision, "
                         "accelerate config; 'no' without one)")
    ft.add_argument("--num-workers", type=int, default=0)
    ft.add_argument("--log-with", default=None, choices=TRACKERS,
                    help="also report to this Accelerate tracker (as distill train's log_with), in OUT")
    ft.add_argument("--eval-train", action="store_true", help="also report accuracy on the labelled subset")
    ft.add_argument("--save-model", action="store_true", help="write the fine-tuned model to OUT/model (timm format)")
    ft.add_argument("--overwrite", action="store_true", help="replace an existing result.json")
    ft.add_argument("--skip-existing", action="store_true", help="sweep: keep runs that already have a result")
    ft.add_argument("--no-progress", action="store_true")
    _add_segmentation_args(ft)
    ft.set_defaults(func=cmd_finetune)


def _add_segmentation_args(ft) -> None:
    """``distill finetune --task segmentation`` options (docs/segmentation.md)."""
    sg = ft.add_argument_group("segmentation (--task segmentation; defaults differ: --steps 300 --batch-size 16 "
                               "--warmup-steps 30 --eval-every 0 --eval-batch-size 16)")
    sg.add_argument("--task", choices=TASKS, default="classification")
    sg.add_argument("--layout", choices=SEG_LAYOUTS, default="camvid",
                    help="camvid: S/ + Sannot/; images-masks: S/images/ + S/masks/ (masks paired by file stem); voc "
                         "(VOCdevkit), ade20k (ADEChallengeData2016), cityscapes (leftImg8bit/ + gtFine/) as "
                         "downloaded")
    sg.add_argument("--num-classes", type=int, default=None,
                    help="class ids 0..N-1 in the masks (default: the layout's: camvid 11, voc 21, ade20k 150, "
                         "cityscapes 19; 2 with --mask-threshold)")
    sg.add_argument("--ignore-index", type=int, default=None, help="id of unlabelled pixels (default: camvid 11, "
                                                                   "others 255)")
    sg.add_argument("--mask-threshold", type=int, default=None, metavar="T",
                    help="binary masks (8-bit grey or JPEG): grey value >= T is class 1, else 0 (e.g. 128)")
    sg.add_argument("--class-names", default=None, metavar="FILE", help="one class name per line")
    sg.add_argument("--eval-split", default="test",
                    help="split evaluated at the end (test or val; test falls back to val where there is no "
                         "labelled test split)")
    sg.add_argument("--decoder", choices=SEG_DECODERS, default="fpn",
                    help="fpn: light FPN decoder; linear: BN + one 1x1 conv (the dense linear probe)")
    sg.add_argument("--decoder-width", type=int, default=128)
    sg.add_argument("--freeze-backbone", action="store_true", help="train the decoder only (with --decoder linear: "
                                                                   "the dense linear probe)")
    sg.add_argument("--levels", type=int, nargs="+", default=None, help="timm out_indices (default: strides 4..32)")
    sg.add_argument("--scale-min", type=float, default=0.25, help="crop-flip: smallest crop area share")
    sg.add_argument("--blocks", nargs="+", default=None, help="teacher:NAME: the teacher blocks probed")
    sg.add_argument("--timesteps", nargs="+", type=int, default=None, help="teacher:NAME: timesteps (default 11)")
    sg.add_argument("--grid-images", type=int, default=4, help="test images drawn in predictions.png (0: none)")


#: Defaults of the options whose default depends on --task (argparse gives None, so a value typed is never replaced).
CLASSIFICATION_DEFAULTS = {"steps": 500, "batch_size": 64, "warmup_steps": 50, "eval_every": 100, "eval_batch_size": 256}
SEGMENTATION_DEFAULTS = {"steps": 300, "batch_size": 16, "warmup_steps": 30, "eval_every": 0, "eval_batch_size": 16}


def _fill_defaults(args, defaults: dict) -> None:
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def cmd_finetune(args) -> int:
    """Fine-tune an exported student or timm:NAME (random init) with a label fraction; one run or a sweep."""
    if args.task == "segmentation":
        return _segment(args)
    from ..finetune import FinetuneConfig, finetune, finetune_sweep, result_line

    _fill_defaults(args, CLASSIFICATION_DEFAULTS)
    cfg = FinetuneConfig(
        model=args.model, dataset=args.dataset, data_root=args.data_root, test_root=args.test_root,
        fraction=args.fraction, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        warmup_steps=args.warmup_steps, layer_decay=args.layer_decay, backbone_lr_mult=args.backbone_lr_mult,
        augment=args.augment, label_smoothing=args.label_smoothing,
        grad_clip=args.grad_clip, eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
        log_every=args.log_every, size=args.size, mean=args.mean, std=args.std, like=args.like, label=args.label,
        mixed_precision=args.mixed_precision, num_workers=args.num_workers, eval_train=args.eval_train,
        save_model=args.save_model, log_with=args.log_with)
    return _run(args, cfg, finetune, finetune_sweep, result_line)


def _run(args, cfg, one, sweep, line) -> int:
    """One run (``one``) or a sweep (``sweep``) of ``cfg``; the main process prints ``line(result)`` per run."""
    from ..tune import is_main_process

    def say(text: str) -> None:
        if is_main_process():  # several processes (accelerate launch): one line, not one per process
            print(text, flush=True)

    progress = not args.no_progress
    if args.fractions or args.seeds:
        sweep(cfg, args.output_dir, args.fractions or [args.fraction], args.seeds or [args.seed],
              overwrite=args.overwrite, skip_existing=args.skip_existing, progress=progress,
              on_result=lambda r: say(line(r)))
        say(f"results in {args.output_dir}/frac*-seed*/result.json; table and plots: "
            f"distill report {args.output_dir} -o {args.output_dir}/report")
    else:
        say(line(one(cfg, args.output_dir, overwrite=args.overwrite, progress=progress)))
    return 0


def _segment(args) -> int:
    """``distill finetune --task segmentation``: one run or a sweep; mIoU on the evaluation split."""
    import dataclasses

    from ..segment import SegmentConfig, segment_finetune, segment_sweep

    unused = [opt for opt, given in (("--layer-decay", args.layer_decay is not None),
                                     ("--backbone-lr-mult", args.backbone_lr_mult != 1.0),
                                     ("--eval-train", args.eval_train), ("--test-root", args.test_root is not None),
                                     ("--dataset", args.dataset is not None)) if given]
    if unused:
        raise ValueError(f"{', '.join(unused)}: not used by --task segmentation (classification only); remove "
                         f"{'it' if len(unused) == 1 else 'them'} (segmentation reads --data-root with --layout).")
    _fill_defaults(args, SEGMENTATION_DEFAULTS)
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(SegmentConfig)}}
    cfg = SegmentConfig(**given)

    def line(r: dict) -> str:
        return (f"{r['label']}: fraction {r['fraction']:g} ({count(r['train_images'], 'image')}), seed {r['seed']}, "
                f"{count(r['steps'], 'step')}: {r['eval_split']} mIoU {r['last_miou']:.2f}, pixel acc {r['last_pixel_acc']:.2f}"
                f", {r['seconds']:.0f}s")

    return _run(args, cfg, segment_finetune, segment_sweep, line)
