"""``distill`` command line: train, export, probe, run (train + export + probe against baselines)."""
from __future__ import annotations

import argparse
import json
import re
import sys

from .atomic import atomic_write_json
from .config import parse_overrides
from .errors import EXIT_CODES, TrainingInterrupted
from .logs import setup_logging
from .recipes import load_recipe
from .version import __version__
from .vocab import AUGMENTS, SELECT_METHODS, SELECT_SCORE_ON

_KEY_VALUE = re.compile(r"^[A-Za-z_]\w*=")
_RECIPE_HELP = "YAML recipe file, or the name of a shipped recipe (distill recipes lists them), e.g. quickstart"
_SET_HELP = ("override recipe keys, e.g. --set steps=100 lr=1e-3 (values are YAML; anywhere on the line; "
             "distill train --help lists every key)")


def spread_set_options(argv: list[str]) -> list[str]:
    """``['--set', 'a=1', 'b=2', 'RECIPE']`` -> ``['--set=a=1', '--set=b=2', 'RECIPE']``: ``--set`` takes the
    KEY=VALUE words that follow it and no other, so it may stand anywhere on the line (before the recipe too).
    Words after ``--`` are left alone."""
    out, i = [], 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return out + argv[i:]
        if word == "--set" and i + 1 < len(argv) and _KEY_VALUE.match(argv[i + 1]):
            while i + 1 < len(argv) and _KEY_VALUE.match(argv[i + 1]):
                out.append(f"--set={argv[i + 1]}")
                i += 1
        else:
            out.append(word)
        i += 1
    return out


def _add_output_dir(p: argparse.ArgumentParser, help: str) -> None:
    """``-o/--output-dir`` (required), with the old ``--out`` kept as a hidden alias."""
    p.add_argument("--output-dir", "-o", dest="output_dir", default=None, help=f"(required) {help}")
    p.add_argument("--out", dest="output_dir", default=None, help=argparse.SUPPRESS)
    p.set_defaults(_output_dir_parser=p)  # main() checks it was given (argparse cannot require one of two flags)


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=_SET_HELP)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help=_RECIPE_HELP)
    _add_output_dir(p, "run directory (checkpoints, logs, config)")
    _add_set(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue although the recipe or data differ from the run's (each change is "
                        "recorded in config.yaml with the step where it took effect)")
    p.add_argument("--no-progress", action="store_true")


def _keys_epilog() -> str:
    from .recipes import key_reference_text

    return ("recipe keys (in the YAML file or as --set KEY=VALUE; also in docs/recipe-keys.md):\n"
            + key_reference_text())


def _add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="pretrain a student on a recipe", epilog=_keys_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
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
    _add_output_dir(e, "directory for the exported student (config.json + model.safetensors)")
    e.add_argument("--checkpoint", default=None, help="a checkpoint-{step} directory (default: latest)")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--ema", action="store_true", help="export the EMA of the student's weights (recipe ema: true)")
    e.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="then upload the export (config.json, model.safetensors, README.md) to this Hugging Face Hub "
                        "model repo (huggingface-cli login or HF_TOKEN)")
    e.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    e.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export import export_student

    from .export import REPO_ID_RE

    if args.push_to_hub is not None and not REPO_ID_RE.match(args.push_to_hub):  # before the export is written
        raise ValueError(f"--push-to-hub {args.push_to_hub!r} is not a Hub repository id; valid: NAMESPACE/NAME "
                         f"(letters, digits, '-', '_', '.'), e.g. your-user/resnet18-distill-fmnist.")
    out = export_student(args.run_dir, args.output_dir, checkpoint=args.checkpoint, overwrite=args.overwrite, ema=args.ema)
    ckpt = json.loads((out / "config.json").read_text())["distill"]["checkpoint"]
    print(f"exported the {'EMA ' if args.ema else ''}student of {ckpt} to {out}\nload it with: "
          f"timm.create_model('local-dir:{out}', pretrained=True, num_classes=K)")
    if args.push_to_hub:
        from .export import push_to_hub

        url = push_to_hub(str(out), args.push_to_hub, private=args.private)
        print(f"pushed to {url}\nload it with: timm.create_model('hf-hub:{args.push_to_hub}', pretrained=True)")
    return 0


def _add_probe_parser(sub) -> None:
    pr = sub.add_parser("probe", help="linear + kNN probe of an exported student, a run, or timm:NAME (random init)")
    pr.add_argument("model")
    pr.add_argument("--dataset", default=None, help="fashion-mnist or image-folder (default: the run's)")
    pr.add_argument("--data-root", default=None)
    pr.add_argument("--train-fraction", type=float, default=1.0,
                    help="stratified share of the train split the probes are fit on (the recipe key "
                         "probe_train_fraction); default 1.0: all of it")
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
    r = sub.add_parser("run", help="train + export + probe against random-init and raw-pixel baselines",
                       epilog=_keys_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
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
    _add_output_dir(ft, "run directory (result.json, train_log.csv); with --fractions/--seeds one "
                        "frac{F}-seed{S}/ per run")
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
    ft.add_argument("--layer-decay", type=float, default=None, metavar="D",
                    help="layer-wise lr decay in (0, 1], e.g. 0.75: each layer below the head learns at D x the rate "
                         "of the one above (timm create_optimizer_v2); default off")
    ft.add_argument("--backbone-lr-mult", type=float, default=1.0, metavar="M",
                    help="lr factor on the backbone (every parameter but the new head), e.g. 0.1; default 1")
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
    ft.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    """Fine-tune an exported student or timm:NAME (random init) with a label fraction; one run or a sweep."""
    from .finetune import FinetuneConfig, finetune, finetune_sweep, result_line

    cfg = FinetuneConfig(
        model=args.model, dataset=args.dataset, data_root=args.data_root, test_root=args.test_root,
        fraction=args.fraction, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
        warmup_steps=args.warmup_steps, layer_decay=args.layer_decay, backbone_lr_mult=args.backbone_lr_mult,
        augment=args.augment, label_smoothing=args.label_smoothing,
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
              f"distill report {args.output_dir} -o {args.output_dir}/report")
    else:
        print(result_line(finetune(cfg, args.output_dir, overwrite=args.overwrite, progress=progress)))
    return 0


def _add_report_parser(sub) -> None:
    rp = sub.add_parser("report", help="Markdown table + PNG plots from train/run/finetune directories")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories holding them")
    _add_output_dir(rp, "output directory (report.md, report.json, *.png)")
    rp.add_argument("--teacher-probe", default=None, metavar="JSON",
                    help="teacher probe rows, e.g. distill/teacher/packaged/fashion-mnist-ddpm/probe.json")
    rp.add_argument("--title", default="distill report")
    rp.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    """Markdown table + PNG plots from distillation and fine-tuning run directories."""
    from .report import write_report

    summary = write_report(args.runs, args.output_dir, teacher_probe=args.teacher_probe, title=args.title)
    print(f"wrote {summary['report']}")
    for name, path in summary["plots"].items():
        print(f"  {name}: {path or '(no data)'}")
    return 0


def _add_extract_parser(sub) -> None:
    x = sub.add_parser("extract", help="cache the teacher's features of every training image (fp16, memory-mapped)")
    x.add_argument("recipe", help=_RECIPE_HELP)
    _add_output_dir(x, "cache directory (written atomically; manifest.json + one .npy per teacher feature)")
    x.add_argument("--draws", type=int, default=2, help="noise draws per image (training picks one per step)")
    x.add_argument("--batch-size", type=int, default=None, help="images per teacher forward (default: the recipe's)")
    x.add_argument("--max-images", type=int, default=None, help="cache only the first N training images")
    _add_set(x)
    x.add_argument("--overwrite", action="store_true", help="replace an existing cache in --output-dir")
    x.add_argument("--no-progress", action="store_true")
    x.set_defaults(func=cmd_extract)


def cmd_extract(args) -> int:
    """Write the teacher's features of every training image (N noise draws each) to a feature cache."""
    from .cache import extract_features_cache

    recipe = load_recipe(args.recipe, parse_overrides(args.set))
    res = extract_features_cache(recipe, args.output_dir, num_draws=args.draws, batch_size=args.batch_size,
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
    se.add_argument("--recipe", default=None, help="take teacher, data, blocks and timestep_candidates from a recipe "
                                                   "(a file or a shipped recipe's name)")
    _add_set(se)
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
    _add_output_dir(se, "output directory")
    se.add_argument("--no-progress", action="store_true")
    se.set_defaults(func=cmd_select)


def cmd_select(args) -> int:
    """Grid probe and/or label-free selection over blocks x timesteps; files and a Markdown summary."""
    from .select import format_selection, run_selection

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


def _add_recipes_parser(sub) -> None:
    rc = sub.add_parser("recipes", help="list the shipped recipes (usable by name: distill train quickstart -o DIR)")
    rc.add_argument("--keys", action="store_true", help="print every recipe key (type, default, valid values)")
    rc.add_argument("--show", default=None, metavar="NAME", help="print one shipped recipe's YAML")
    rc.set_defaults(func=cmd_recipes)


def cmd_recipes(args) -> int:
    """List the shipped recipes (name and first comment line), the key reference, or one recipe's text."""
    from .recipes import key_reference_text, recipe_summary, resolve_recipe, shipped_recipes

    if args.show:
        print(resolve_recipe(args.show).read_text(), end="")
    elif args.keys:
        print(key_reference_text())
    else:
        shipped = shipped_recipes()
        width = max(map(len, shipped), default=0)
        for name, path in shipped.items():
            print(f"{name:<{width}}  {recipe_summary(path)}")
        print(f"\nrun one by name: distill train NAME -o runs/NAME; see one: distill recipes --show NAME; keys: "
              f"distill recipes --keys")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Distill diffusion-model features into timm students.")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_train_parser, _add_run_parser, _add_export_parser, _add_probe_parser, _add_select_parser,
                _add_extract_parser, _add_finetune_parser, _add_report_parser, _add_recipes_parser):
        add(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(spread_set_options(sys.argv[1:] if argv is None else list(argv)))
    if getattr(args, "_output_dir_parser", None) is not None and args.output_dir is None:
        args._output_dir_parser.error("the following arguments are required: -o/--output-dir")
    setup_logging(args.verbose)
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
