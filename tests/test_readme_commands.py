"""Every command the README and the documentation pages (docs/, the site) show parses: each ``distill ...`` / ``.venv/bin/distill ...`` / ``python -m distill.cli
...`` line of its ```bash blocks is parsed by the real argparse parser of that subcommand (nothing is run), so a
renamed or removed flag cannot stay in the docs."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from distill.cli import build_parser, spread_set_options

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the README and every page of the site (the README's sections moved there)
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
#: how a command line may start; what follows is distill's own argv (``accelerate launch [its options] -m
#: distill.cli`` too)
PREFIXES = (("distill",), (".venv/bin/distill",), ("python", "-m", "distill.cli"), (".venv/bin/python", "-m",
                                                                                     "distill.cli"))
#: shell words that end one command (the next command after them is not distill's)
SEPARATORS = {"&&", "||", "|", ";", "&"}


def bash_blocks(text: str) -> list[tuple[int, str]]:
    """``[(line number of the block's first line, block text)]`` of the ```bash fences of ``text``."""
    out = []
    for m in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
        out.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return out


def distill_commands(text: str) -> list[tuple[int, list[str]]]:
    """``[(README line, argv after the prefix)]`` for every distill command in the ```bash blocks (continuation
    lines joined, comments dropped, stopped at ``&&``, ``|``, ``;`` or a redirection; a sketch with a ``...``
    argument left out)."""
    found = []
    for first, block in bash_blocks(text):
        logical, start = "", None
        for k, line in enumerate(block.splitlines()):
            start = first + k if not logical else start
            logical += line[:-1] + " " if line.endswith("\\") else line
            if line.endswith("\\"):
                continue
            words, logical = shlex.split(logical, comments=True), ""
            for i in range(len(words)):
                if i and words[i - 1] not in SEPARATORS:
                    continue
                prefix = next((p for p in PREFIXES if tuple(words[i:i + len(p)]) == p), None)
                begin = i + len(prefix) if prefix else None
                if words[i:i + 2] == ["accelerate", "launch"] and "distill.cli" in words[i:]:
                    begin = words.index("distill.cli", i) + 1
                if begin is None:
                    continue
                argv = []
                for w in words[begin:]:
                    if w in SEPARATORS or w.startswith((">", "2>")):
                        break
                    argv.append(w)
                if "..." not in argv:  # an elided sketch ("train ..."), not a command to run
                    found.append((start, argv))
    return found


COMMANDS = [(page.relative_to(ROOT).as_posix(), line, argv) for page in PAGES
            for line, argv in distill_commands(page.read_text())]


def test_the_docs_show_commands_of_every_kind():
    names = {argv[0] for _, _, argv in COMMANDS if argv}
    assert len(COMMANDS) >= 20 and {"train", "run", "export", "probe", "finetune"} <= names, names
    assert any(page == "README.md" for page, _, _ in COMMANDS)  # the front page's quickstart is checked too


@pytest.mark.parametrize("page, line, argv", COMMANDS, ids=[f"{p}:{n}" for p, n, _ in COMMANDS])
def test_every_documented_command_parses(page, line, argv, capsys):
    parser = build_parser()
    try:
        args = parser.parse_args(spread_set_options(argv))
    except SystemExit as e:  # argparse: unknown flag, missing argument, bad choice (0: --help / --version)
        assert e.code == 0, f"{page} line {line}: `distill {' '.join(argv)}`: {capsys.readouterr().err.strip()}"
        return
    needs_out = getattr(args, "_output_dir_parser", None) is not None and args.output_dir is None
    assert not needs_out, f"{page} line {line}: `distill {' '.join(argv)}` lacks -o/--output-dir"


def test_the_parser_check_catches_an_unknown_flag():
    """The check itself: a flag no subcommand has is caught, with the README's way of writing commands."""
    text = ("```bash\ndistill train quickstart -o runs/q --no-such-flag \\\n    --set steps=1   # comment\n"
            "accelerate launch --cpu -m distill.cli train ...   # a sketch\n```\n")
    (line, argv), = distill_commands(text)
    assert line == 2 and argv == ["train", "quickstart", "-o", "runs/q", "--no-such-flag", "--set", "steps=1"]
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
