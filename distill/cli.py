"""``distill`` command line: train, export, probe, run (train + export + probe against baselines)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import load_recipe, parse_overrides


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/quickstart.yaml")
    p.add_argument("--output-dir", "-o", required=True, help="run directory (checkpoints, logs, config)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe keys, e.g. steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    p.add_argument("--no-progress", action="store_true")


def cmd_train(args) -> int:
    from .trainer import train

    recipe = load_recipe(args.recipe, parse_overrides(args.set))
    summary = train(recipe, args.output_dir, resume=args.resume, overwrite=args.overwrite,
                    progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_export(args) -> int:
    from .export import export_student

    out = export_student(args.run_dir, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(f"exported student to {out}\nload it with: timm.create_model('local-dir:{out}', pretrained=True, "
          f"num_classes=K)")
    return 0


def _resolve_probe_target(model: str):
    """(kind, value): 'exported' dir, 'run' dir, or 'timm' name at random init."""
    if model.startswith("timm:"):
        return "timm", model[5:]
    p = Path(model)
    if (p / "config.json").is_file():
        return "exported", p
    if (p / "config.yaml").is_file():
        return "run", p
    raise FileNotFoundError(
        f"cannot probe {model!r}: give an exported student directory (config.json), a run directory "
        f"(config.yaml), or timm:NAME for a random-init baseline."
    )


def cmd_probe(args) -> int:
    from .evaluate import (backbone_fn, format_table, pixels_fn, probe_data, probe_exported, probe_fn,
                           probe_random_init)

    kind, target = _resolve_probe_target(args.model)
    kw = dict(epochs=args.epochs, k=args.k, seed=args.seed, progress=not args.no_progress)
    size, mean, std, dataset, root, channels = args.size, None, None, args.dataset, args.data_root, 3
    if kind == "run":
        from .trainer import load_trained

        model, recipe, resolved = load_trained(str(target))
        size, mean, std = recipe.student_size, resolved["mean"], resolved["std"]
        dataset, root, channels = dataset or recipe.dataset, root or recipe.data_root, resolved["data_channels"]
    elif kind == "exported":
        cfg = json.loads((target / "config.json").read_text())
        d = cfg.get("distill", {})
        dataset, channels = dataset or d.get("dataset"), d.get("data_channels", channels)
    dataset = dataset or "fashion-mnist"
    if dataset == "fashion-mnist":
        channels = 1
    data = probe_data(dataset, root, channels, args.train_fraction, args.seed)
    rows = []
    if kind == "exported":
        rows.append(probe_exported(str(target), data, **kw))
    elif kind == "run":
        rows.append(probe_fn(backbone_fn(model.student.model, size, mean, std), data, name=f"{target} (run)", **kw))
    else:
        from .data import dataset_mean_std

        mean, std = dataset_mean_std(data.train)
        rows.append(probe_random_init(target, size, mean, std, data, **kw))
    if args.pixels:
        rows.append(probe_fn(pixels_fn, data, name="raw pixels (linear on [0,1] pixels)", **kw))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def cmd_run(args) -> int:
    """Pretrain, export, then probe the distilled student next to random init and raw pixels."""
    from .evaluate import (format_table, pixels_fn, probe_data, probe_exported, probe_fn, probe_random_init,
                           save_results)
    from .export import export_student
    from .trainer import train

    t0 = time.time()
    recipe = load_recipe(args.recipe, parse_overrides(args.set))
    run_dir = Path(args.output_dir)
    summary = train(recipe, str(run_dir), resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    t_train = time.time() - t0
    out = export_student(str(run_dir), str(run_dir / "student"), overwrite=True)
    import yaml

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["_resolved"]
    channels = resolved["data_channels"]
    data = probe_data(recipe.dataset, recipe.data_root, channels, recipe.probe_train_fraction, recipe.seed)
    kw = dict(epochs=recipe.probe_epochs, k=recipe.knn_k, seed=recipe.seed, progress=not args.no_progress)
    rows = [probe_exported(str(out), data, name=f"{recipe.student} distilled", **kw),
            probe_random_init(recipe.student, recipe.student_size, resolved["mean"], resolved["std"], data,
                              model_kwargs=recipe.student_kwargs,
                              name=f"{recipe.student} random init", **kw),
            probe_fn(pixels_fn, data, name="raw pixels", **kw)]
    total = time.time() - t0
    table = format_table(rows)
    import platform

    import torch

    machine = (f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"\n{table}\n\nprobe: train on {rows[0]['num_train']} {recipe.dataset} train images "
          f"(fraction {recipe.probe_train_fraction}), test on {rows[0]['num_test']}; distillation {recipe.steps} steps "
          f"in {t_train:.0f}s; total {total:.0f}s on {machine}")
    save_results(rows, run_dir / "results.json",
                 {"train_summary": summary, "train_seconds": round(t_train, 1), "total_seconds": round(total, 1),
                  "machine": machine, "recipe": str(args.recipe), "overrides": args.set})
    (run_dir / "results.md").write_text(table + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Distill diffusion-model features into timm students.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pretrain a student on a recipe")
    _add_recipe_args(t)
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("run", help="train + export + probe against random-init and raw-pixel baselines")
    _add_recipe_args(r)
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("export", help="write a run's student in timm format")
    e.add_argument("run_dir")
    e.add_argument("--out", required=True)
    e.add_argument("--checkpoint", default=None, help="a checkpoint-{step} directory (default: latest)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)

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
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=cmd_probe)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"distill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .trainer import NonFiniteLossError, UntrustedCheckpointError

        if isinstance(e, (NonFiniteLossError, UntrustedCheckpointError)):
            print(f"distill {args.command}: error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
