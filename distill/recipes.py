"""Shipped recipes by name, ``--set`` overrides (`parse_overrides`), and the recipe key reference generated
from `distill.config.Recipe`.

The recipes in the repository's ``recipes/`` ship inside the package as ``distill/shipped_recipes/`` (a symlink in
the source tree, real files in a wheel), so ``distill train quickstart -o runs/q`` works from any install and
``recipes/quickstart.yaml`` keeps working in a checkout. The key reference (name, type, default, valid values, one
line) is read from the ``Recipe`` dataclass itself: its fields, their type hints and defaults, `RANGES` and the
vocabularies of `distill.vocab`, and the comment beside each field (or `_HELP` where it has none).
``docs/recipe-keys.md`` is `key_reference_markdown`'s output; a test keeps it up to date.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .config import (RANGES, Recipe, _type_name, load_recipe as _load_recipe_file, make_recipe, recipe_fields,
                     yaml_load)
from .vocab import (AT_MODES, AUGMENTS, DATA_HASH, DATASETS, IMAGE_RESIZE, MIXED_PRECISION, MULTI_TIMESTEP,
                    ON_NONFINITE, OPTIMIZERS, POLICY_BASELINES, TEACHER_DTYPES, TIMESTEP_MODES, TRACKERS, VAE_DTYPES)

#: The shipped recipes' directory (``distill/shipped_recipes``, a link to the repository's ``recipes/``).
RECIPE_DIR = Path(__file__).resolve().parent / "shipped_recipes"

#: Recipe fields whose value is one of a closed vocabulary.
CHOICES = {"dataset": DATASETS, "teacher_dtype": TEACHER_DTYPES, "vae_dtype": VAE_DTYPES,
           "multi_timestep": MULTI_TIMESTEP, "policy_baseline": POLICY_BASELINES, "at_mode": AT_MODES,
           "optimizer": OPTIMIZERS, "mixed_precision": MIXED_PRECISION, "on_nonfinite": ON_NONFINITE,
           "augment": AUGMENTS, "log_with": TRACKERS, "image_resize": IMAGE_RESIZE, "data_hash": DATA_HASH}

#: One line for the fields of `Recipe` that carry no comment in its source (or a better one than it).
_HELP = {
    "dataset": "image source: Fashion-MNIST IDX files, an image folder (class subfolders optional), a CSV file "
               "list, or a Hugging Face dataset (README: Data)",
    "log_with": "Accelerate experiment tracker besides metrics.csv and train.log (its pip extra must be installed)",
    "std": "student normalisation std in [0, 1] units; default: measured on the data",
    "teacher": "packaged name, local dir, hub id, a UNet2DModel config dict, or python:package.module:factory / "
               "python:/path/file.py:factory (imports and runs that code: such a recipe is code, trust it as such)",
    "teacher_blocks": "teacher blocks whose outputs are regressed, e.g. [mid_block, up_blocks.0]",
    "student": "timm model name of the student (built with num_classes=0)",
    "student_indices": "student feature levels fed to the regressor (forward_intermediates indices); default: all",
    "student_kwargs": "extra timm.create_model arguments, e.g. {patch_size: 4} for a ViT at 32 px",
    "regressor_width": "channels of the FPN regressor (DreamTeacher uses 256)",
    "use_ppm": "add the pyramid pooling module (scales 1, 2, 3, 6) on the deepest level (DreamTeacher)",
    "timestep_candidates": "timesteps the selection modes and the policy choose from",
    "policy_lr": "learning rate of the timestep policy (Adam)",
    "mse_weight": "weight of the MSE on whitened teacher features",
    "at_weight": "weight of attention transfer (DreamTeacher: 10)",
    "cos_weight": "weight of a cosine-distance term (0: off)",
    "at_mode": "attention transfer: code (mean of squares, the authors' code) | paper (L2 norm per sample)",
    "steps": "optimizer updates",
    "batch_size": "images per process per micro-batch (global batch: x processes x grad_accum_steps)",
    "grad_accum_steps": "micro-batches per optimizer update",
    "optimizer": "timm create_optimizer_v2 name (no weight decay on norms and biases)",
    "lr": "peak learning rate (after warmup, cosine decay to 0)",
    "weight_decay": "decoupled weight decay (AdamW/LAMB) or L2 (SGD)",
    "warmup_steps": "linear warmup steps",
    "grad_clip": "maximum gradient norm (0: no clipping)",
    "mixed_precision": "Accelerate mixed precision; null: Accelerate's configuration decides (accelerate config, "
                       "accelerate launch --mixed_precision, ACCELERATE_MIXED_PRECISION), recorded in config.yaml",
    "augment": "kornia augmentation, applied once so teacher and student see the same view",
    "seed": "seed of weights, data order, noise and augmentation",
    "num_workers": "DataLoader worker processes (0: load in the main process; auto: CPUs per process - 1, at "
                   "most 8), kept alive across epochs",
    "log_every": "steps between metrics.csv rows, train.log lines and tracker entries",
    "checkpoint_every": "steps between checkpoints (the last step is always saved)",
    "keep_checkpoints": "newest checkpoints kept on disk",
    "probe_epochs": "linear-probe epochs (distill run)",
    "knn_k": "neighbours of the kNN probe (distill run)",
}


def shipped_recipes() -> dict[str, Path]:
    """``{name: path}`` of the shipped recipes, sorted by name (``quickstart`` -> ``.../quickstart.yaml``)."""
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


def recipe_summary(path: Union[str, Path], width: int = 110) -> str:
    """A recipe's one-line description: the first sentence of the comment block at the top of its file (command
    lines indented in the comment are skipped), cut to ``width`` characters; ``''`` if the file starts with no
    comment."""
    words = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("#  "):
            words.append(line.lstrip("#").strip())
    text = " ".join(words)
    end = re.search(r"\.(\s|$)", text)
    text = text[: end.start()] if end else text
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def resolve_recipe(name_or_path: Union[str, Path]) -> Path:
    """A recipe file: ``name_or_path`` itself when it is a file, else the shipped recipe of that name
    (``quickstart`` or ``quickstart.yaml``).

    Raises:
        ValueError: ``name_or_path`` is a folder (names the YAML files in it).
        FileNotFoundError: neither; the message lists the shipped names and how to list them.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.yaml"))[:5]
        raise ValueError(f"recipe '{path}' is a folder, not a recipe file. Fix: give a YAML file"
                         f"{' in it (' + ', '.join(inside) + ')' if inside else ''}, or a shipped recipe's name "
                         f"(distill recipes lists them).")
    shipped = shipped_recipes()
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if str(path.parent) in (".", "recipes") and name in shipped:
        return shipped[name]
    raise FileNotFoundError(f"recipe {str(name_or_path)!r} is neither a file nor a shipped recipe; shipped: "
                            f"{', '.join(shipped) or '(none found in ' + str(RECIPE_DIR) + ')'}. Fix: give a YAML "
                            f"file's path or one of these names (distill recipes lists them).")


def load_recipe(name_or_path: Union[str, Path], overrides: Optional[dict] = None) -> Recipe:
    """`distill.config.load_recipe` of a path or a shipped recipe's name (see `resolve_recipe`).

    Raises:
        FileNotFoundError: no such file or shipped recipe.
        ValueError: an invalid recipe or override (see `distill.config.make_recipe`).
    """
    return _load_recipe_file(resolve_recipe(name_or_path), overrides)


def parse_overrides(items: list[str]) -> dict:
    """``['steps=10', 'timesteps=[5, 11]']`` -> ``{'steps': 10, 'timesteps': [5, 11]}``: values parsed as YAML, then
    as the key's declared type (a float key takes ``inf``, ``nan``, ``1e-3``; an int key an integral ``1e3``), each
    checked on its own (key, type, choices, range) so that an error names the ``--set`` item, not the recipe file.

    Raises:
        ValueError: an item without ``=``, a key given twice, an unknown key (with the closest keys), a value that
            is not valid YAML (naming the item, line and column) or not valid for its key.
    """
    out, given = {}, {}
    fields_ = recipe_fields()
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is not of the form key=value (e.g. --set steps=100).")
        k, v = item.split("=", 1)
        k = k.strip()
        if k in given:
            raise ValueError(f"--set {k} is given twice ({given[k]!r} and {item!r}); one would be dropped silently. "
                             f"Fix: give {k} once.")
        given[k] = item
        if k not in fields_:
            close = difflib.get_close_matches(k, list(fields_), n=3)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown key {k!r} in --set {item!r}.{hint} Valid keys: {', '.join(fields_)}.")
        out[k] = _as_declared(yaml_load(v, source=f"--set {item!r} (value {v!r})"), fields_[k])
        try:
            make_recipe({k: out[k]}, source=f"--set {item!r}", warn=False)
        except ValueError as e:
            raise ValueError(str(e) if "--set" in str(e) else f"--set {item!r}: {e}") from None
    return out


def _as_declared(value: Any, tp: Any) -> Any:
    """A ``--set`` value read as its key's type: a string ``float()`` reads (``inf``, ``nan``) or an int for a float
    key (YAML 1.1 reads ``inf`` as a string), an integral float (``1e3``) for an int key; else as YAML gave it."""
    args = typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)
    if float in args and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if int in args and float not in args and isinstance(value, float) and value.is_integer():
        return int(value)
    if float in args and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _source_comments() -> dict[str, str]:
    """``{field: comment}`` from the ``# ...`` beside each field in `Recipe`'s source."""
    src = inspect.getsource(Recipe)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^    (\w+): [^\n#]*#\s*(.*)$", src, re.M)}


def _valid(name: str) -> str:
    """The valid values of one field, in words."""
    if name == "timesteps":
        return f"list of ints in [0, T), or {' | '.join(TIMESTEP_MODES)}"
    if name in CHOICES:
        return " | ".join(CHOICES[name])
    rng = RANGES.get(name)
    if rng is None:
        return ""
    text = rng.describe()
    return f"{' or '.join(map(str, rng.lengths))} numbers, each {text}" if rng.lengths else text


def recipe_keys() -> list[dict]:
    """One dict per `Recipe` field, in declaration order: ``name``, ``type`` (as in the recipe errors),
    ``default`` (as YAML reads it back: ``null``, ``false``, ``'no'``), ``valid`` (range or choices, ``''`` when free) and ``help``
    (one line; ``''`` when the field has neither a comment nor an entry in `_HELP`)."""
    comments, types = _source_comments(), recipe_fields()
    rows = []
    for f in dataclasses.fields(Recipe):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default = yaml.safe_dump(default, default_flow_style=True, width=1000).strip().removesuffix("\n...")
        rows.append({"name": f.name, "type": _type_name(types[f.name]).replace("Any", "any"),
                     "default": str(default), "valid": _valid(f.name),
                     "help": _HELP.get(f.name) or comments.get(f.name, "")})
    return rows


def key_reference_markdown() -> str:
    """``docs/recipe-keys.md``: a table of every recipe key (name, type, default, valid values, one line)."""
    lines = ["# Recipe keys", "",
             "Generated from `distill.config.Recipe` by `python -m distill.recipes > docs/recipe-keys.md` (a test "
             "checks that this page is up to date). Every key can be set in a recipe file or on the command line "
             "with `--set key=value` (values are YAML: `--set steps=2000 timesteps=[5,11]`).", "",
             "| key | type | default | valid | what it does |", "|---|---|---|---|---|"]
    for k in recipe_keys():
        cells = [f"`{k['name']}`", k["type"], f"`{k['default']}`", k["valid"], k["help"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def key_reference_text() -> str:
    """The key reference as plain lines for ``--help``: ``name (type, default D; valid V): help``."""
    return "\n".join(f"  {k['name']} ({k['type']}, default {k['default']}{'; ' + k['valid'] if k['valid'] else ''})"
                     f"{': ' + k['help'] if k['help'] else ''}" for k in recipe_keys())


if __name__ == "__main__":
    print(key_reference_markdown(), end="")
