"""``distill`` command line: train, export, probe, run (train + export + probe against baselines)."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .atomic import atomic_write_json
from .config import load_recipe, parse_overrides
from .errors import EXIT_CODES, TrainingInterrupted
from .version import __version__
from .vocab import AUGMENTS, SEG_DECODERS, SEG_LAYOUTS, SELECT_METHODS, SELECT_SCORE_ON, TASKS


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/quickstart.yaml")
    p.add_argument("--output-dir", "-o", required=True, help="run directory (checkpoints, logs, config)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe keys, e.g. steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue although the recipe or data differ from the run's (each change is "
                        "recorded in config.yaml with the step where it took effect)")
    p.add_argument("--no-progress", action="store_true")


def _add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="pretrain a student on a recipe")
    _add_recipe_args(t)
    t.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .trainer import train

    recipe = load_recipe(args.recipe, parse_overrides(args.set))
    summary = train(recipe, args.output_dir, resume=args.resume, overwrite=args.overwrite,
                    progress=not args.no_progress, allow_changes=args.allow_changes)
    print(json.dumps(summary, indent=2))
    return 0


def _add_export_parser(sub) -> None:
    e = sub.add_parser("export", help="write a run's student in timm format")
    e.add_argument("run_dir")
    e.add_argument("--out", required=True)
    e.add_argument("--checkpoint", default=None, help="a checkpoint-{step} directory (default: latest)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export import export_student

    out = export_student(args.run_dir, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite)
    ckpt = json.loads((out / "config.json").read_text())["distill"]["checkpoint"]
    print(f"exported the student of {ckpt} to {out}\nload it with: timm.create_model('local-dir:{out}', "
          f"pretrained=True, num_classes=K)")
    return 0


def _add_probe_parser(sub) -> None:
    pr = sub.add_parser("probe", help="linear + kNN probe of an exported student, a run, or timm:NAME (random init)")
    pr.add_argument("model")
    pr.add_argument("--dataset", default=None, help="fashion-mnist or image-folder (default: the run's)")
    pr.add_argument("--data-root", default=None)
    pr.add_argument("--train-fraction", type=float, default=1.0)
    pr.add_argument("--epochs", type=int, default=30)
    pr.add_argument("--k", type=int, default=20)
    pr.add_argument("--size", type=int, default=64, help="input size for timm:NAME")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--pixels", action="store_true", help="also probe raw pixels")
    pr.add_argument("--json", default=None, help="write results to this file")
    pr.add_argument("--blocks", nargs="+", default=None, help="teacher:NAME only: blocks to probe")
    pr.add_argument("--timesteps", nargs="+", type=int, default=None, help="teacher:NAME only: timesteps (default 11)")
    pr.add_argument("--ensemble", action="store_true",
                    help="teacher:NAME only: one probe per timestep, soft vote by averaging logits")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=cmd_probe)


def cmd_probe(args) -> int:
    from .evaluate import format_table, probe_model, resolve_probe_target

    kind, target = resolve_probe_target(args.model)
    if args.ensemble and kind != "teacher":
        raise ValueError(f"--ensemble soft-votes one probe per timestep of a diffusion teacher; {args.model!r} is a "
                         f"{kind} target. Use: distill probe teacher:fashion-mnist-ddpm --blocks mid_block "
                         f"--timesteps 1 11 50 --ensemble")
    if kind == "teacher":
        return _probe_teacher(target, args)
    rows = probe_model(kind, target, args.dataset, args.data_root, args.size, args.train_fraction, args.pixels,
                       args.seed, epochs=args.epochs, k=args.k, progress=not args.no_progress)
    print(format_table(rows))
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


def _probe_teacher(source: str, args) -> int:
    """``distill probe teacher:NAME``: linear probes of a teacher's pooled features, one per (block, timestep);
    ``--ensemble`` soft-votes the timesteps of each block (averaged logits)."""
    from .atomic import atomic_write_json
    from .select import format_teacher_probe, probe_teacher

    res = probe_teacher(source, args.blocks, args.timesteps, dataset=args.dataset, data_root=args.data_root,
                        train_fraction=args.train_fraction, epochs=args.epochs, seed=args.seed,
                        ensemble=args.ensemble, progress=not args.no_progress)
    print(format_teacher_probe(res))
    if args.json:
        atomic_write_json(args.json, res["rows"])
    return 0


def _add_run_parser(sub) -> None:
    r = sub.add_parser("run", help="train + export + probe against random-init and raw-pixel baselines")
    _add_recipe_args(r)
    r.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    """Pretrain, export, then probe the distilled student next to random init and raw pixels."""
    from .pipeline import run_recipe

    recipe = load_recipe(args.recipe, parse_overrides(args.set))
    res = run_recipe(recipe, args.output_dir, resume=args.resume, overwrite=args.overwrite,
                     allow_changes=args.allow_changes,
                     progress=not args.no_progress, recipe_name=str(args.recipe), overrides=args.set)
    rows = res["rows"]
    print(f"\n{res['table']}\n\nprobe: train on {rows[0]['num_train']} {recipe.dataset} train images "
          f"(fraction {recipe.probe_train_fraction}), test on {rows[0]['num_test']}; distillation {recipe.steps} steps "
          f"in {res['train_seconds']:.0f}s; total {res['total_seconds']:.0f}s on {res['machine']}")
    return 0


def _add_finetune_parser(sub) -> None:
    ft = sub.add_parser("finetune", help="fine-tune an exported student or timm:NAME (scratch) with a label "
                                         "fraction; top-1/top-5 on the test split")
    ft.add_argument("model", help="exported student directory (distill export) or timm:NAME for random init")
    ft.add_argument("--output-dir", "-o", required=True, help="run directory (result.json, train_log.csv); with "
                                                              "--fractions/--seeds one frac{F}-seed{S}/ per run")
    ft.add_argument("--dataset", default=None, help="fashion-mnist or image-folder (default: the export's dataset)")
    ft.add_argument("--data-root", default=None)
    ft.add_argument("--test-root", default=None, help="image-folder test split if not DATA_ROOT/test")
    ft.add_argument("--fraction", type=float, default=1.0, help="share of training labels (stratified, seeded)")
    ft.add_argument("--seed", type=int, default=0, help="subset, head init, data order and augmentation seed")
    ft.add_argument("--fractions", type=float, nargs="+", default=None, metavar="F",
                    help="sweep: one run per fraction (x --seeds)")
    ft.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S", help="sweep: one run per seed")
    ft.add_argument("--steps", type=int, default=500, help="optimizer steps, the same for every fraction")
    ft.add_argument("--batch-size", type=int, default=64)
    ft.add_argument("--optimizer", default="adamw", help="adamw, sgd or lamb (timm create_optimizer_v2)")
    ft.add_argument("--lr", type=float, default=1e-3)
    ft.add_argument("--weight-decay", type=float, default=0.05)
    ft.add_argument("--momentum", type=float, default=0.9, help="sgd only")
    ft.add_argument("--warmup-steps", type=int, default=50)
    ft.add_argument("--augment", default="crop-flip", help="none, flip or crop-flip (kornia)")
    ft.add_argument("--label-smoothing", type=float, default=0.0)
    ft.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm; 0: no clipping")
    ft.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (and at the end); 0: end")
    ft.add_argument("--eval-batch-size", type=int, default=256)
    ft.add_argument("--log-every", type=int, default=10)
    ft.add_argument("--like", default=None, metavar="EXPORTED_DIR",
                    help="timm:NAME runs copy this export's input size, mean/std and model args")
    ft.add_argument("--size", type=int, default=None, help="input size (default: the export's / --like's, else 64)")
    ft.add_argument("--mean", type=float, nargs="+", default=None, help="default: the export's, else the data's")
    ft.add_argument("--std", type=float, nargs="+", default=None)
    ft.add_argument("--label", default=None, help="name in reports (default: '<arch> distilled' / '<arch> scratch')")
    ft.add_argument("--mixed-precision", default="no", help="no, fp16 or bf16")
    ft.add_argument("--num-workers", type=int, default=0)
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
                    help="camvid: S/ + Sannot/; images-masks: S/images/ + S/masks/ (masks paired by file stem)")
    sg.add_argument("--num-classes", type=int, default=11, help="class ids 0..N-1 in the masks (CamVid: 11)")
    sg.add_argument("--ignore-index", type=int, default=11, help="id of unlabelled pixels (CamVid: 11)")
    sg.add_argument("--class-names", default=None, metavar="FILE", help="one class name per line")
    sg.add_argument("--eval-split", default="test", help="split evaluated at the end (test or val)")
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


def cmd_finetune(args) -> int:
    """Fine-tune an exported student or timm:NAME (random init) with a label fraction; one run or a sweep."""
    if args.task == "segmentation":
        return _segment(args)
    from .finetune import FinetuneConfig, finetune, finetune_sweep, result_line

    cfg = FinetuneConfig(
        model=args.model, dataset=args.dataset, data_root=args.data_root, test_root=args.test_root,
        fraction=args.fraction, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        warmup_steps=args.warmup_steps, augment=args.augment, label_smoothing=args.label_smoothing,
        grad_clip=args.grad_clip, eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
        log_every=args.log_every, size=args.size, mean=args.mean, std=args.std, like=args.like, label=args.label,
        mixed_precision=args.mixed_precision, num_workers=args.num_workers, eval_train=args.eval_train,
        save_model=args.save_model)
    progress = not args.no_progress
    if args.fractions or args.seeds:
        finetune_sweep(cfg, args.output_dir, args.fractions or [args.fraction], args.seeds or [args.seed],
                       overwrite=args.overwrite, skip_existing=args.skip_existing, progress=progress,
                       on_result=lambda r: print(result_line(r), flush=True))
        print(f"results in {args.output_dir}/frac*-seed*/result.json; table and plots: "
              f"distill report {args.output_dir} --out {args.output_dir}/report")
    else:
        print(result_line(finetune(cfg, args.output_dir, overwrite=args.overwrite, progress=progress)))
    return 0


def _segment(args) -> int:
    """``distill finetune --task segmentation``: one run or a sweep; mIoU on the evaluation split."""
    import dataclasses

    from .segment import SegmentConfig, segment_finetune, segment_sweep

    seg_defaults = {"steps": 300, "batch_size": 16, "warmup_steps": 30, "eval_every": 0, "eval_batch_size": 16}
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(SegmentConfig)}}
    parser_defaults = vars(build_parser().parse_args(["finetune", "MODEL", "-o", "OUT"]))
    for k, v in seg_defaults.items():  # an option left at classification's default takes segmentation's
        if given[k] == parser_defaults[k]:
            given[k] = v
    given.pop("dataset", None)
    cfg = SegmentConfig(**given)

    def line(r: dict) -> str:
        return (f"{r['label']}: fraction {r['fraction']:g} ({r['train_images']} images), seed {r['seed']}, "
                f"{r['steps']} steps: {r['eval_split']} mIoU {r['last_miou']:.2f}, pixel acc {r['last_pixel_acc']:.2f}"
                f", {r['seconds']:.0f}s")

    if args.fractions or args.seeds:
        segment_sweep(cfg, args.output_dir, args.fractions or [args.fraction], args.seeds or [args.seed],
                      overwrite=args.overwrite, skip_existing=args.skip_existing, progress=not args.no_progress,
                      on_result=lambda r: print(line(r), flush=True))
        print(f"results in {args.output_dir}/frac*-seed*/result.json; table and plots: "
              f"distill report {args.output_dir} --out {args.output_dir}/report")
    else:
        print(line(segment_finetune(cfg, args.output_dir, overwrite=args.overwrite, progress=not args.no_progress)))
    return 0


def _add_report_parser(sub) -> None:
    rp = sub.add_parser("report", help="Markdown table + PNG plots from train/run/finetune directories")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories holding them")
    rp.add_argument("--out", required=True, help="output directory (report.md, report.json, *.png)")
    rp.add_argument("--teacher-probe", default=None, metavar="JSON",
                    help="teacher probe rows, e.g. distill/teacher/packaged/fashion-mnist-ddpm/probe.json")
    rp.add_argument("--title", default="distill report")
    rp.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    """Markdown table + PNG plots from distillation and fine-tuning run directories."""
    from .report import write_report

    summary = write_report(args.runs, args.out, teacher_probe=args.teacher_probe, title=args.title)
    print(f"wrote {summary['report']}")
    for name, path in summary["plots"].items():
        print(f"  {name}: {path or '(no data)'}")
    return 0


def _add_extract_parser(sub) -> None:
    x = sub.add_parser("extract", help="cache the teacher's features of every training image (fp16, memory-mapped)")
    x.add_argument("recipe", help="YAML recipe, e.g. recipes/quickstart.yaml")
    x.add_argument("--out", required=True, help="cache directory (written atomically; manifest.json + one .npy per "
                                                "teacher feature)")
    x.add_argument("--draws", type=int, default=2, help="noise draws per image (training picks one per step)")
    x.add_argument("--batch-size", type=int, default=None, help="images per teacher forward (default: the recipe's)")
    x.add_argument("--max-images", type=int, default=None, help="cache only the first N training images")
    x.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe keys, e.g. timesteps=[11]")
    x.add_argument("--overwrite", action="store_true", help="replace an existing cache in --out")
    x.add_argument("--no-progress", action="store_true")
    x.set_defaults(func=cmd_extract)


def cmd_extract(args) -> int:
    """Write the teacher's features of every training image (N noise draws each) to a feature cache."""
    from .cache import extract_features_cache

    recipe = load_recipe(args.recipe, parse_overrides(args.set))
    res = extract_features_cache(recipe, args.out, num_draws=args.draws, batch_size=args.batch_size,
                                 overwrite=args.overwrite, progress=not args.no_progress, max_images=args.max_images)
    mib = res["bytes"] / 2**20
    print(f"wrote {res['num_images']} images x {res['num_draws']} draws of {', '.join(res['keys'])} (float16) to "
          f"{res['path']}: {mib:.1f} MiB on disk, {res['bytes_per_image'] / 1024:.1f} KiB per image "
          f"({res['bytes_per_image'] / res['num_draws'] / 1024:.1f} KiB per draw), {res['seconds']:.1f} s")
    print(f"train from it with: --set feature_cache={res['path']} augment=none")
    return 0


def _add_select_parser(sub) -> None:
    se = sub.add_parser("select", help="choose teacher block + timestep: grid probe (DDAE 3.2) and/or label-free "
                                       "alignment/uniformity (DDAE 3.3); CSV, heatmap PNG, recipe-ready best_*.yaml")
    se.add_argument("--method", choices=SELECT_METHODS, default="both")
    se.add_argument("--recipe", default=None, help="take teacher, data, blocks and timestep_candidates from a recipe")
    se.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe keys")
    se.add_argument("--teacher", default=None, help="packaged name, directory or hub id (default: the recipe's)")
    se.add_argument("--blocks", nargs="+", default=None, help="candidate blocks, e.g. mid_block up_blocks.0")
    se.add_argument("--timesteps", nargs="*", type=int, default=None, help="candidate timesteps, e.g. 1 11 50 100")
    se.add_argument("--dataset", default=None)
    se.add_argument("--data-root", default=None)
    se.add_argument("--images", type=int, default=None, help="grid: train images the probes fit on (default 3000)")
    se.add_argument("--val-images", type=int, default=None, help="grid: held-out train images scored (default 2000)")
    se.add_argument("--score-on", choices=SELECT_SCORE_ON, default="val",
                    help="grid: score probes on held-out train images (default) or on the test split (DDAE's table)")
    se.add_argument("--epochs", type=int, default=None, help="grid: passes, fresh noise every step (default 2)")
    se.add_argument("--label-free-images", type=int, default=None, help="label-free: images (default 750)")
    se.add_argument("--batch-size", type=int, default=64)
    se.add_argument("--augment", choices=AUGMENTS, default="flip")
    se.add_argument("--max-memory-gb", type=float, default=None,
                    help="refuse a grid whose estimated step memory exceeds this (default: the free memory)")
    se.add_argument("--compare", default=None, help="label-free only: a grid.csv to rank against")
    se.add_argument("--seed", type=int, default=None)
    se.add_argument("--out", required=True, help="output directory")
    se.add_argument("--no-progress", action="store_true")
    se.set_defaults(func=cmd_select)


def cmd_select(args) -> int:
    """Grid probe and/or label-free selection over blocks x timesteps; files and a Markdown summary."""
    from .select import format_selection, run_selection

    if args.timesteps == []:
        raise ValueError("--timesteps is empty; give candidate timesteps such as --timesteps 1 11 50 100.")
    recipe = load_recipe(args.recipe, parse_overrides(args.set)) if args.recipe else None
    sel = run_selection(args.out, recipe=recipe, teacher=args.teacher, blocks=args.blocks, timesteps=args.timesteps,
                        dataset=args.dataset, data_root=args.data_root, method=args.method, images=args.images,
                        val_images=args.val_images, epochs=args.epochs, label_free_images=args.label_free_images,
                        seed=args.seed, score_on=args.score_on, batch_size=args.batch_size, augment=args.augment,
                        max_memory_gb=args.max_memory_gb, compare=args.compare, progress=not args.no_progress,
                        timesteps_name="--timesteps")
    print(format_selection(sel))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Distill diffusion-model features into timm students.")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_train_parser, _add_run_parser, _add_export_parser, _add_probe_parser, _add_select_parser,
                _add_extract_parser, _add_finetune_parser, _add_report_parser):
        add(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except TrainingInterrupted as e:
        print(f"distill {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one: abort at once, no traceback
        print(f"distill {args.command}: interrupted; nothing more was written (checkpoints already on disk are "
              f"kept).", file=sys.stderr)
        return 130
    except Exception as e:
        for kinds, code in EXIT_CODES:
            if isinstance(e, kinds):
                print(f"distill {args.command}: error: {e}", file=sys.stderr)
                return code
        raise


if __name__ == "__main__":
    sys.exit(main())
