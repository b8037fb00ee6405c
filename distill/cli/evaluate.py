"""``distill probe``, ``select`` and ``report``: evaluating students and teachers, choosing blocks and timesteps,
and the Markdown + PNG report."""
from __future__ import annotations

import argparse

from ..atomic import atomic_write_json
from ..recipes import load_recipe, parse_overrides
from ..vocab import AUGMENTS, DATASETS, SELECT_METHODS, SELECT_SCORE_ON
from .common import RECIPE_TRUST, add_output_dir, add_set


def add_probe_parser(sub) -> None:
    pr = sub.add_parser("probe", help="linear + kNN probe of an exported student, a run, or timm:NAME (random init)")
    pr.add_argument("model")
    pr.add_argument("--dataset", default=None, help=f"{' | '.join(DATASETS)} (default: the run's or export's)")
    pr.add_argument("--data-root", default=None)
    pr.add_argument("--train-fraction", type=float, default=1.0,
                    help="stratified share of the train split the probes are fit on (the recipe key "
                         "probe_train_fraction); default 1.0: all of it")
    pr.add_argument("--test-fraction", type=float, default=1.0,
                    help="seeded stratified share of the test split the probes are scored on, for a quick look (the "
                         "recipe key probe_test_fraction; stated under the table); default 1.0: all of it")
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
    from ..evaluate import format_table, probe_model, resolve_probe_target

    kind, target = resolve_probe_target(args.model)
    if args.ensemble and kind != "teacher":
        raise ValueError(f"--ensemble soft-votes one probe per timestep of a diffusion teacher; {args.model!r} is a "
                         f"{kind} target. Use: distill probe teacher:fashion-mnist-ddpm --blocks mid_block "
                         f"--timesteps 1 11 50 --ensemble")
    if kind == "teacher":
        return _probe_teacher(target, args)
    rows = probe_model(kind, target, args.dataset, args.data_root, args.size, args.train_fraction, args.pixels,
                       args.seed, args.test_fraction, epochs=args.epochs, k=args.k, progress=not args.no_progress)
    print(format_table(rows))
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


def _probe_teacher(source: str, args) -> int:
    """``distill probe teacher:NAME``: linear probes of a teacher's pooled features, one per (block, timestep);
    ``--ensemble`` soft-votes the timesteps of each block (averaged logits)."""
    from ..atomic import atomic_write_json
    from ..select import format_teacher_probe, probe_teacher

    res = probe_teacher(source, args.blocks, args.timesteps, dataset=args.dataset, data_root=args.data_root,
                        train_fraction=args.train_fraction, test_fraction=args.test_fraction, epochs=args.epochs,
                        seed=args.seed,
                        ensemble=args.ensemble, progress=not args.no_progress)
    print(format_teacher_probe(res))
    if args.json:
        atomic_write_json(args.json, res["rows"])
    return 0


def add_select_parser(sub) -> None:
    se = sub.add_parser("select", help="choose teacher block + timestep: grid probe (DDAE 3.2) and/or label-free "
                                       "alignment/uniformity (DDAE 3.3); CSV, heatmap PNG, recipe-ready best_*.yaml",
                        description=RECIPE_TRUST, formatter_class=argparse.RawDescriptionHelpFormatter)
    se.add_argument("--method", choices=SELECT_METHODS, default="both")
    se.add_argument("--recipe", default=None, help="take teacher, data, blocks and timestep_candidates from a recipe "
                                                   "(a file or a shipped recipe's name)")
    add_set(se)
    se.add_argument("--teacher", default=None, help="packaged name, directory or hub id (default: the recipe's)")
    se.add_argument("--blocks", nargs="+", default=None, help="candidate blocks, e.g. mid_block up_blocks.0")
    se.add_argument("--timesteps", nargs="*", type=int, default=None, help="candidate timesteps, e.g. 1 11 50 100")
    se.add_argument("--dataset", default=None, help=f"{' | '.join(DATASETS)} (default: the recipe's, else fashion-mnist)")
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
    add_output_dir(se, "output directory")
    se.add_argument("--no-progress", action="store_true")
    se.set_defaults(func=cmd_select)


def cmd_select(args) -> int:
    """Grid probe and/or label-free selection over blocks x timesteps; files and a Markdown summary."""
    from ..select import format_selection, run_selection

    if args.timesteps == []:
        raise ValueError("--timesteps is empty; give candidate timesteps such as --timesteps 1 11 50 100.")
    recipe = load_recipe(args.recipe, parse_overrides(args.set)) if args.recipe else None
    sel = run_selection(args.output_dir, recipe=recipe, teacher=args.teacher, blocks=args.blocks, timesteps=args.timesteps,
                        dataset=args.dataset, data_root=args.data_root, method=args.method, images=args.images,
                        val_images=args.val_images, epochs=args.epochs, label_free_images=args.label_free_images,
                        seed=args.seed, score_on=args.score_on, batch_size=args.batch_size, augment=args.augment,
                        max_memory_gb=args.max_memory_gb, compare=args.compare, progress=not args.no_progress,
                        timesteps_name="--timesteps")
    print(format_selection(sel))
    return 0


def add_report_parser(sub) -> None:
    rp = sub.add_parser("report", help="Markdown table + PNG plots from train/run/finetune directories")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories holding them")
    add_output_dir(rp, "output directory (report.md, report.json, *.png)")
    rp.add_argument("--teacher-probe", default=None, metavar="JSON",
                    help="teacher probe rows, e.g. distill/teacher/packaged/fashion-mnist-ddpm/probe.json")
    rp.add_argument("--title", default="distill report")
    rp.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    """Markdown table + PNG plots from distillation and fine-tuning run directories."""
    from ..report import write_report

    summary = write_report(args.runs, args.output_dir, teacher_probe=args.teacher_probe, title=args.title)
    print(f"wrote {summary['report']}")
    for name, path in summary["plots"].items():
        print(f"  {name}: {path or '(no data)'}")
    return 0
