"""What the commands share: ``--set`` anywhere on the line, ``-o/--output-dir`` (``--out`` kept as an alias), the
recipe arguments of ``train`` / ``run`` and the recipe-key reference of their ``--help``."""
from __future__ import annotations

import argparse
import re
import textwrap

KEY_VALUE = re.compile(r"^[A-Za-z_]\w*=")
RECIPE_HELP = "YAML recipe file, or the name of a shipped recipe (distill recipes lists them), e.g. quickstart"
#: the trust model, in the --help of every command that takes a recipe (README: "A recipe with a python: teacher")
RECIPE_TRUST = textwrap.fill(
    "Trust: a recipe with a python: teacher (teacher: python:MODULE:FACTORY) runs that code, as a Hydra _target_ "
    "does: importing the module runs its top-level code, then the factory, a function or nn.Module class defined "
    "in that module or file, is called (os.system, builtins and imported names are refused). Use such a recipe only "
    "if you would run its module yourself. Everything else (weights, feature caches, runs, checkpoints, exports, "
    "YAML) runs no code.", 100)
SET_HELP = ("override recipe keys, e.g. --set steps=100 lr=1e-3 (values are YAML; anywhere on the line; "
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
        if word == "--set" and i + 1 < len(argv) and KEY_VALUE.match(argv[i + 1]):
            while i + 1 < len(argv) and KEY_VALUE.match(argv[i + 1]):
                out.append(f"--set={argv[i + 1]}")
                i += 1
        else:
            out.append(word)
        i += 1
    return out


def add_output_dir(p: argparse.ArgumentParser, help: str) -> None:
    """``-o/--output-dir`` (required), with the old ``--out`` kept as a hidden alias."""
    p.add_argument("--output-dir", "-o", dest="output_dir", default=None, help=f"(required) {help}")
    p.add_argument("--out", dest="output_dir", default=None, help=argparse.SUPPRESS)
    p.set_defaults(_output_dir_parser=p)  # main() checks it was given (argparse cannot require one of two flags)


def add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help=RECIPE_HELP)
    add_output_dir(p, "run directory (checkpoints, logs, config)")
    add_set(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue although the recipe or data differ from the run's (each change is "
                        "recorded in config.yaml with the step where it took effect)")
    p.add_argument("--no-progress", action="store_true")


def keys_epilog() -> str:
    from ..recipes import key_reference_text

    return ("recipe keys (in the YAML file or as --set KEY=VALUE; also in docs/recipe-keys.md):\n"
            + key_reference_text())
