"""``distill`` command line: train, run, export, extract, recipes, probe, select, report, finetune.

One module per group of commands, each command's parser beside its thin handler (``train``: pretraining and what it
needs and makes; ``evaluate``: probes, selection, reports; ``finetune``: classification and segmentation); heavy
imports stay inside the handlers, so ``distill --help`` loads no torch.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..errors import TrainingInterrupted, parser_spelling, run_reporting, set_spelling
from ..logs import setup_logging
from ..version import __version__
from .common import spread_set_options
from .evaluate import add_probe_parser, add_report_parser, add_select_parser
from .finetune import add_finetune_parser
from .plan import add_plan_parser
from .train import (add_export_parser, add_extract_parser, add_recipes_parser, add_run_parser,
                    add_train_parser)

__all__ = ["build_parser", "main", "spread_set_options"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Distill diffusion-model features into timm students.")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"distill {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (add_train_parser, add_run_parser, add_export_parser, add_probe_parser, add_select_parser,
                add_extract_parser, add_finetune_parser, add_report_parser, add_recipes_parser, add_plan_parser):
        add(sub)
    return p


def kept(output_dir) -> str:
    """What a command stopped at once leaves behind, in words (its ``-o/--output-dir`` when it has one)."""
    if output_dir is None:
        return "nothing more was written; files already complete on disk are kept, unfinished ones were removed."
    out = Path(output_dir)
    if not out.exists():
        return f"nothing was written to '{out}'."
    steps = sorted(int(c.name.split("-")[1]) for c in out.glob("checkpoint-*") if c.name.split("-")[1].isdigit())
    newest = (f"; its newest checkpoint is checkpoint-{steps[-1]} (continue with the same command plus --resume)"
              if steps else "")
    return f"what is complete in '{out}' is kept, unfinished files were removed{newest}."


def resume_command(args) -> str:
    """The command that continues an interrupted ``distill train`` / ``distill run``: the same recipe, output directory
    and ``--set`` values plus ``--resume`` (shell-quoted), or ``""`` for other commands."""
    if args.command not in ("train", "run") or getattr(args, "output_dir", None) is None:
        return ""
    sets = list(getattr(args, "set", None) or [])
    extra = ([] if getattr(args, "test_fraction", None) is None else ["--test-fraction", str(args.test_fraction)])
    return shlex.join(["distill", args.command, str(args.recipe), "-o", str(args.output_dir), "--resume", *extra]
                      + (["--set", *sets] if sets else []))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(spread_set_options(sys.argv[1:] if argv is None else list(argv)))
    if getattr(args, "_output_dir_parser", None) is not None and args.output_dir is None:
        args._output_dir_parser.error("the following arguments are required: -o/--output-dir")
    setup_logging(args.verbose)

    def note(error: BaseException) -> str:
        if isinstance(error, TrainingInterrupted):
            again = resume_command(args)
            return f"to continue: {again}" if again else ""
        return kept(getattr(args, "output_dir", None))

    command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    # messages name this command's options; a recipe key it has no option for is `--set KEY=VALUE` where it takes one
    takes_set = any(a.dest == "set" for a in command._actions)
    spelling = parser_spelling(command, fallback=set_spelling if takes_set else None)
    return run_reporting(f"distill {args.command}", args.func, args, note=note, spelling=spelling)
