#!/usr/bin/env python
"""Step time of a recipe variant against the recipe itself, timed alternately in one process: how many steps of
the variant fit in the wall time of N steps of the recipe, on this machine.

A budget such as "10 minutes of distillation" becomes steps only through a step time, and two runs on a shared CPU
see different load; timing one step of each alternately on the same batches (:func:`bench._common.interleave`,
the order reversed every other round) lets load from other jobs hit both alike. Each step is ``distill train``'s
own (:func:`bench._common.library_step`: live teacher forward, student, regressor, losses, optimizer update).

    python bench/step_ratio.py quickstart --variant student_size=32 --rounds 6 \\
        --json bench/results/fmnist_step_ratio_s32.json
    # ratio_of_medians r: a variant step takes r x a recipe step, so N recipe steps buy N / r variant steps

Bad input (an unknown recipe or key, rounds < 1) is one argparse error, exit 2, before any work.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import emit, interleave, library_step, machine, paired, quickstart_setup  # noqa: E402
from distill.errors import refuse  # noqa: E402


def step_fn(recipe_name: str, overrides: dict, n_batches: int):
    """``(step(i), recipe)``: one ``distill train`` step of the recipe with ``overrides`` on batch ``i`` (of
    ``n_batches`` read beforehand from its own seeded loader, so loading is not timed and both arms see the same
    images when their data keys agree)."""
    from distill.build import build_loader
    from distill.trainer.batches import shutdown_workers

    recipe, ds, mean, std, teacher, keys, model = quickstart_setup(recipe_name, overrides)
    step = library_step(recipe, teacher, keys, model, mean, std, ds[0][0].shape[-1])
    loader = build_loader(ds, recipe, torch.Generator().manual_seed(0))
    try:
        batches = [b[0] for _, b in zip(range(n_batches), loader)]
    finally:
        shutdown_workers(loader)  # its workers ignore SIGINT/SIGTERM: stop them now, not at exit

    def run(i: int) -> dict:
        step(batches[i], i)
        return {}

    return run, recipe


def main(argv=None) -> int:
    """Command line; prints and (``--json``) saves the ratio. Returns 0; a missing dataset is one line, exit 2;
    Ctrl-C / SIGTERM stop at once (130 / 143) without a traceback (`distill.errors.run_reporting`)."""
    from distill.errors import parser_spelling, run_reporting, set_spelling

    ap = build_parser()  # the library's messages name this script's options: -o, --set data_root=VALUE
    return run_reporting("step_ratio.py", _main, ap, argv, spelling=parser_spelling(ap, fallback=set_spelling))


def build_parser() -> argparse.ArgumentParser:
    """The script's command line."""
    ap = argparse.ArgumentParser(prog="step_ratio.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", help="a shipped recipe's name or a recipe file")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for both arms")
    ap.add_argument("--variant", nargs="+", required=True, metavar="KEY=VALUE",
                    help="overrides of the variant arm only (e.g. student_size=32)")
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds (>= 1), after one untimed warm-up round")
    ap.add_argument("--json", default=None, help="write the figures here (e.g. under bench/results/)")
    return ap


def _main(ap: argparse.ArgumentParser, argv=None) -> int:
    args = ap.parse_args(argv)
    if args.rounds < 1:
        refuse(ap, f"--rounds {args.rounds} must be >= 1 (e.g. 6)")
    from distill.recipes import load_recipe, parse_overrides

    for flag, items in (("--set", args.set), ("--variant", args.variant)):
        try:
            parse_overrides(items)
        except ValueError as e:
            refuse(ap, f"{flag}: {str(e).replace('--set ', flag + ' ')}")
    base = parse_overrides(args.set)
    variant = {**base, **parse_overrides(args.variant)}
    try:
        load_recipe(args.recipe, variant)
    except (ValueError, FileNotFoundError) as e:
        refuse(ap, f"recipe {args.recipe!r} with --set / --variant: {e}")
    at_start = machine()
    recipe_step, _ = step_fn(args.recipe, base, args.rounds + 1)
    variant_step, _ = step_fn(args.recipe, variant, args.rounds + 1)
    a, b = interleave([variant_step, recipe_step], repeats=args.rounds, warmup=1)
    res = {"recipe": args.recipe, "set": args.set, "variant": args.variant, "rounds": args.rounds,
           "variant_over_recipe": paired(a, b)}
    return emit(res, args.json, at_start)


if __name__ == "__main__":
    raise SystemExit(main())
