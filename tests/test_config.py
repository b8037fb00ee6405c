"""Tests for distill.config: recipe checking at the boundary, YAML loading, --set overrides, save/load round trip."""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path
from typing import Optional, Union

import pytest
import yaml

from distill.cli import main
from distill.config import (
    RANGES,
    yaml_load,
    AT_MODES,
    AUGMENTS,
    MIXED_PRECISION,
    OPTIMIZERS,
    Recipe,
    load_recipe,
    make_recipe,
    recipe_fields,
    save_recipe,
)
from distill.recipes import parse_overrides

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_FILES = sorted(RECIPES_DIR.glob("*.yaml"))


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------- make_recipe

def test_empty_recipe_is_the_defaults():
    assert make_recipe({}) == Recipe()


def test_values_are_set():
    r = make_recipe({"steps": 7, "student": "convnext_atto", "timesteps": [5, 11], "use_ppm": True,
                     "teacher": {"sample_size": 32}, "mean": [0.5], "std": None})
    assert (r.steps, r.student, r.timesteps, r.use_ppm, r.teacher, r.mean, r.std) == (
        7, "convnext_atto", [5, 11], True, {"sample_size": 32}, [0.5], None)
    # Everything else keeps its default.
    d, d0 = r.to_dict(), Recipe().to_dict()
    changed = {k for k in d if d[k] != d0[k]}
    assert changed == {"steps", "student", "timesteps", "use_ppm", "teacher", "mean"}


@pytest.mark.parametrize("key, closest", [
    ("teacher_block", "teacher_blocks"),
    ("timestep", "timesteps"),
    ("learning_rate_", None),
    ("optimiser", "optimizer"),
    ("batchsize", "batch_size"),
])
def test_unknown_key_suggests_closest(key, closest):
    with pytest.raises(ValueError) as e:
        make_recipe({key: 1}, source="my.yaml")
    msg = str(e.value)
    assert f"unknown key {key!r}" in msg and "my.yaml" in msg
    if closest is not None:
        assert f"Did you mean {closest!r}" in msg
    # All valid keys are listed.
    for name in recipe_fields():
        assert name in msg


def test_unknown_key_with_no_close_match_has_no_guess():
    with pytest.raises(ValueError) as e:
        make_recipe({"zzzzqqqq": 1})
    assert "Did you mean" not in str(e.value)


@pytest.mark.parametrize("key, value, type_name", [
    ("steps", "ten", "int"),
    ("lr", "fast", "float"),
    ("student", 18, "str"),
    ("student_kwargs", [1], "dict"),
    ("data_root", 3, "str or null"),
    ("use_ppm", "yes", "bool"),
])
def test_wrong_type_names_key_value_and_type(key, value, type_name):
    with pytest.raises(ValueError) as e:
        make_recipe({key: value}, source="r.yaml")
    msg = str(e.value)
    assert repr(key) in msg
    assert repr(value) in msg
    assert f"must be {type_name}" in msg
    assert type(value).__name__ in msg


@pytest.mark.parametrize("key, value", [("lr", 1), ("mse_weight", 1), ("at_weight", 1), ("grad_clip", 1),
                                        ("probe_train_fraction", 1), ("momentum", 0)])  # momentum is in [0, 1)
def test_int_for_float_field_becomes_float(key, value):
    r = make_recipe({key: value})
    assert type(getattr(r, key)) is float and getattr(r, key) == float(value)


@pytest.mark.parametrize("key", ["steps", "batch_size", "seed", "lr", "mse_weight"])
@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_a_number(key, value):
    with pytest.raises(ValueError) as e:
        make_recipe({key: value})
    assert repr(key) in str(e.value) and repr(value) in str(e.value)


def test_float_for_int_field_is_rejected():
    with pytest.raises(ValueError, match="'steps' must be int, got 10.5"):
        make_recipe({"steps": 10.5})


@pytest.mark.parametrize("key, value, choices", [
    ("optimizer", "adam2", OPTIMIZERS),
    ("augment", "x", AUGMENTS),
    ("mixed_precision", "fp8", MIXED_PRECISION),
    ("at_mode", "foo", AT_MODES),
    ("teacher_dtype", "float64", ("float32", "bfloat16", "float16")),
])
def test_bad_choice_names_value_and_lists_choices(key, value, choices):
    with pytest.raises(ValueError) as e:
        make_recipe({key: value})
    msg = str(e.value)
    assert repr(key) in msg and repr(value) in msg
    for c in choices:
        assert c in msg


@pytest.mark.parametrize("key, value, choices", [
    ("optimizer", OPTIMIZERS, ("adamw", "lamb", "sgd")),
    ("augment", AUGMENTS, ("none", "flip", "crop-flip")),
    ("mixed_precision", MIXED_PRECISION, ("no", "fp16", "bf16")),
    ("at_mode", AT_MODES, ("code", "paper")),
])
def test_every_choice_is_accepted(key, value, choices):
    assert tuple(value) == choices
    for c in choices:
        assert getattr(make_recipe({key: c}), key) == c


@pytest.mark.parametrize("key", ["steps", "batch_size", "grad_accum_steps", "student_size", "regressor_width",
                                 "log_every", "checkpoint_every", "probe_epochs", "knn_k", "keep_checkpoints"])
@pytest.mark.parametrize("value", [0, -3])
def test_counts_must_be_positive(key, value):
    with pytest.raises(ValueError) as e:
        make_recipe({key: value})
    assert f"{key} must be >= 1, got {value}" in str(e.value)
    assert getattr(make_recipe({key: 1}), key) == 1


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.01, 2])
def test_probe_train_fraction_outside_unit_interval(value):
    with pytest.raises(ValueError) as e:
        make_recipe({"probe_train_fraction": value})
    assert "probe_train_fraction" in str(e.value) and "(0, 1]" in str(e.value)
    assert str(float(value)) in str(e.value)


@pytest.mark.parametrize("value", [1e-9, 0.01, 1.0])
def test_probe_train_fraction_inside_unit_interval(value):
    assert make_recipe({"probe_train_fraction": value}).probe_train_fraction == value


@pytest.mark.parametrize("lr", [0, -1e-3])
def test_lr_must_be_positive(lr):
    with pytest.raises(ValueError, match="lr must be > 0"):
        make_recipe({"lr": lr})


@pytest.mark.parametrize("timesteps", [[5.0], [5, "11"], [True], [5, None], 11, []])
def test_timesteps_must_be_ints(timesteps):
    with pytest.raises(ValueError) as e:
        make_recipe({"timesteps": timesteps}, source="t.yaml")
    assert "t.yaml: timesteps must be a non-empty list of integers" in str(e.value)
    assert "one of auto-grid, auto-label-free, policy" in str(e.value)
    assert repr(timesteps) in str(e.value)


# --------------------------------------------------------------------------------------------------- load_recipe

def test_load_recipe_from_yaml(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", """
# a comment
student: convnext_atto
steps: 20
lr: 0.002
at_weight: 5          # an int for a float field
timesteps: [5, 11]
teacher_blocks: [up_blocks.1]
student_kwargs: {drop_path_rate: 0.1}
data_root: null
""")
    r = load_recipe(path)
    assert r == dataclasses.replace(Recipe(), student="convnext_atto", steps=20, lr=0.002, at_weight=5.0,
                                    timesteps=[5, 11], teacher_blocks=["up_blocks.1"],
                                    student_kwargs={"drop_path_rate": 0.1})
    assert type(r.at_weight) is float


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# steps: 10\n"], ids=["empty", "blank", "comments"])
def test_load_recipe_empty_file_is_an_error(tmp_path, text):
    # An empty recipe used to run the 1000-step defaults silently; make_recipe({}) from Python still gives them.
    path = write_yaml(tmp_path / "empty.yaml", text)
    with pytest.raises(ValueError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert f"recipe '{path}' is empty (or only comments)" in msg and "recipes/quickstart.yaml" in msg
    with pytest.raises(ValueError, match="is empty"):
        load_recipe(path, {"steps": 10})  # overrides do not make an empty file a recipe


def test_load_recipe_overrides_win(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", "steps: 20\nseed: 3\n")
    r = load_recipe(path, {"steps": 5, "batch_size": 8})
    assert (r.steps, r.seed, r.batch_size) == (5, 3, 8)


def test_load_recipe_errors_name_the_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", "teacher_block: [mid_block]\n")
    with pytest.raises(ValueError) as e:
        load_recipe(path)
    assert str(path) in str(e.value) and "Did you mean 'teacher_blocks'" in str(e.value)
    path = write_yaml(tmp_path / "bad2.yaml", "steps: ten\n")
    with pytest.raises(ValueError) as e:
        load_recipe(path)
    assert str(path) in str(e.value) and "'steps'" in str(e.value) and "'ten'" in str(e.value)


def test_load_recipe_not_a_mapping(tmp_path):
    path = write_yaml(tmp_path / "list.yaml", "- steps\n- 10\n")
    with pytest.raises(ValueError, match="mapping") as e:
        load_recipe(path)
    assert "list" in str(e.value)


def test_missing_recipe_lists_bundled_recipes(tmp_path):
    missing = tmp_path / "no-such-recipe.yaml"
    with pytest.raises(FileNotFoundError) as e:
        load_recipe(missing)
    msg = str(e.value)
    assert str(missing) in msg
    assert "recipes/" in msg
    bundled = sorted(p.name for p in RECIPES_DIR.glob("*.yaml"))
    assert msg.rstrip(".").endswith(", ".join(bundled))
    for name in bundled:
        assert name in msg


@pytest.mark.parametrize(
    "path", RECIPE_FILES or [None], ids=[p.name for p in RECIPE_FILES] or ["no-recipes-found"])
def test_bundled_recipe_loads(path):
    if path is None:  # no recipe at collection time: fail loudly rather than run nothing
        assert sorted(RECIPES_DIR.glob("*.yaml")), f"no *.yaml recipes in {RECIPES_DIR}"
        path = sorted(RECIPES_DIR.glob("*.yaml"))[0]
    r = load_recipe(path)
    assert isinstance(r, Recipe)
    # Every key written in the file is a Recipe field and was applied as written (ints for floats aside).
    raw = yaml_load(path.read_text()) or {}  # the recipe loader's YAML (reads 2e-3 as a float)
    for key, value in raw.items():
        assert getattr(r, key) == value, key


# --------------------------------------------------------------------------------------------------- parse_overrides

def test_parse_overrides_parses_yaml_values():
    out = parse_overrides(["steps=10", "timesteps=[5, 11]", "lr=0.002", "use_ppm=true", "data_root=null",
                           " student = resnet50", "student_kwargs={patch_size: 4}", "teacher=a=b"])
    assert out == {"steps": 10, "timesteps": [5, 11], "lr": 0.002, "use_ppm": True, "data_root": None,
                   "student": "resnet50", "student_kwargs": {"patch_size": 4}, "teacher": "a=b"}
    assert isinstance(out["timesteps"], list) and type(out["steps"]) is int


@pytest.mark.parametrize("items", [[], None])
def test_parse_overrides_empty(items):
    assert parse_overrides(items) == {}


@pytest.mark.parametrize("item", ["steps", "steps:10", "--steps 10"])
def test_parse_overrides_rejects_items_without_equals(item):
    with pytest.raises(ValueError) as e:
        parse_overrides(["seed=1", item])
    assert repr(item) in str(e.value) and "key=value" in str(e.value)


def test_overrides_go_through_the_same_checks(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", "steps: 20\n")
    assert load_recipe(path, parse_overrides(["timesteps=[5, 11]"])).timesteps == [5, 11]
    with pytest.raises(ValueError, match="Did you mean 'timesteps'"):
        load_recipe(path, parse_overrides(["timestep=5"]))
    with pytest.raises(ValueError, match="'adam2'"):
        load_recipe(path, parse_overrides(["optimizer=adam2"]))


@pytest.mark.parametrize("source", ["recipe-file", "override"])
def test_scientific_notation_learning_rates_are_floats(tmp_path, source):
    # `lr: 3e-4` is how learning rates are usually written; PyYAML's YAML 1.1 resolver reads it as a string.
    if source == "recipe-file":
        r = load_recipe(write_yaml(tmp_path / "r.yaml", "lr: 3e-4\nweight_decay: 1e-2\n"))
    else:
        r = load_recipe(write_yaml(tmp_path / "r.yaml", "steps: 20\n"),
                        parse_overrides(["lr=3e-4", "weight_decay=1e-2"]))
    assert r.lr == pytest.approx(3e-4) and r.weight_decay == pytest.approx(1e-2)


# --------------------------------------------------------------------------------------------------- save_recipe

@pytest.mark.parametrize("values", [
    {},
    {"student": "vit_tiny_patch16_224", "student_kwargs": {"patch_size": 4}, "student_size": 32,
     "timesteps": [5, 11, 50], "lr": 0.0003, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
     "teacher": {"sample_size": 32, "block_out_channels": [8, 16]}, "sources": [1, 2], "log_with": "tensorboard",
     "optimizer": "sgd", "mixed_precision": "bf16", "at_weight": 3},
])
def test_save_then_load_round_trip(tmp_path, values):
    r = make_recipe(dict(values))
    path = tmp_path / "config.yaml"
    save_recipe(r, path)
    again = load_recipe(path)
    assert again == r
    assert again.to_dict() == r.to_dict()
    assert {type(v) for v in (again.lr, again.at_weight)} == {float}


def test_save_recipe_with_extra_writes_resolved_section(tmp_path):
    r = make_recipe({"steps": 3})
    path = tmp_path / "config.yaml"
    save_recipe(r, path, extra={"mean": [0.1, 0.2, 0.3], "teacher_channels": [16]})
    data = yaml.safe_load(path.read_text())
    assert data.pop("_resolved") == {"mean": [0.1, 0.2, 0.3], "teacher_channels": [16]}
    assert data == r.to_dict()
    assert list(data) == [f.name for f in dataclasses.fields(Recipe)]  # field order kept
    assert make_recipe(data) == r


# --------------------------------------------------------------------------------------------------- value ranges

NUMERIC = (int, float, Optional[int], Optional[float], Union[int, str])  # int or a word (num_workers: auto)


def test_every_numeric_field_has_a_range():
    # A new int/float key cannot be added without an entry in RANGES: this test names the one that is missing.
    fields_ = recipe_fields()
    missing = [k for k, tp in fields_.items() if tp in NUMERIC and k not in RANGES]
    assert not missing, f"numeric recipe fields without a range in distill.config.RANGES: {missing}"
    assert set(RANGES) <= set(fields_)
    for key, rng in RANGES.items():  # the only non-scalar entries are lists of numbers (mean, std)
        assert fields_[key] in NUMERIC or (rng.lengths and fields_[key] == Optional[list]), key


# Below (or above) the range of every key of RANGES: (value, what the message says is valid).
OUT_OF_RANGE = {
    "image_channels": [(2, "must be 1 or 3 (or null)"), (0, "must be 1 or 3 (or null)")],
    "mean": [([-0.1], "must be 1 or 3 numbers in [0, 1] (or null)"), ([0.5, 0.5], "1 or 3 numbers"),
             ([0.5, 1.5, 0.5], "in [0, 1]"), ([0.5, "a", 0.5], "1 or 3 numbers")],
    "std": [([0.0], "must be 1 or 3 numbers > 0 and finite (or null)"), ([0.2, 0.2], "1 or 3 numbers"),
            ([0.2, -0.1, 0.2], "> 0")],
    "teacher_resolution": [(4, "must be >= 8 (or null)")],
    "image_size": [(0, "must be >= 1 (or null)")],
    "min_image_side": [(0, "must be >= 1")],
    "teacher_in_channels": [(0, "must be >= 1 (or null)")],
    "select_max_memory_gb": [(0, "must be > 0 and finite (or null)")],
    "policy_lr": [(0, "must be > 0 and finite"), (-1e-3, "must be > 0 and finite")],
    "policy_entropy": [(-0.1, "must be >= 0 and finite")],
    "policy_entropy_steps": [(-1, "must be >= 0 (or null)")],
    "mse_weight": [(-1, "must be >= 0 and finite")],
    "at_weight": [(-10, "must be >= 0 and finite")],
    "cos_weight": [(-0.5, "must be >= 0 and finite")],
    "lr": [(0, "must be > 0 and finite"), (-1e-3, "must be > 0 and finite")],
    "weight_decay": [(-0.05, "must be >= 0 and finite")],
    "momentum": [(-0.1, "must be in [0, 1)"), (1, "must be in [0, 1)")],
    "warmup_steps": [(-1, "must be >= 0")],
    "grad_clip": [(-1.0, "must be >= 0 and finite")],
    "seed": [(-1, "must be in [0, 4294967295]"), (2 ** 32, "must be in [0, 4294967295]")],
    "num_workers": [(-1, "must be 'auto' or >= 0"), ("four", "must be 'auto' or >= 0")],
    "ema_decay": [(1.0, "must be in [0, 1)"), (-0.1, "must be in [0, 1)")],
    "monitor_every": [(-1, "must be >= 0")],
    "monitor_images": [(1, "must be >= 2")],
    "probe_train_fraction": [(0, "must be in (0, 1]"), (1.5, "must be in (0, 1]")],
    "probe_test_fraction": [(0, "must be in (0, 1]"), (1.5, "must be in (0, 1]")],
    **{k: [(0, "must be >= 1")] for k in ("student_size", "regressor_width", "select_images", "select_val_images",
                                         "select_epochs", "select_label_free_images", "steps", "batch_size",
                                         "grad_accum_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                                         "probe_epochs", "knn_k")},
}
FLOAT_KEYS = [k for k, tp in recipe_fields().items() if tp in (float, Optional[float])]


def _assert_range_error(values, key, value, valid, source="r.yaml"):
    with pytest.raises(ValueError) as e:
        make_recipe(values, source=source)
    msg = str(e.value)
    shown = float(value) if isinstance(value, int) and recipe_fields()[key] is float else value  # ints become floats
    assert msg.startswith(f"{source}: {key} must be "), msg
    assert valid in msg and f"got {shown!r}" in msg and "Fix: " in msg and "\n" not in msg, msg


def test_out_of_range_cases_cover_every_key():
    assert set(OUT_OF_RANGE) == set(RANGES)


@pytest.mark.parametrize("key, value, valid", [(k, v, valid) for k, cases in OUT_OF_RANGE.items()
                                               for v, valid in cases])
def test_out_of_range_names_key_value_range_and_fix(key, value, valid):
    _assert_range_error({key: value}, key, value, valid)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_are_refused(key, value):
    _assert_range_error({key: value}, key, value, f"{key} must be ")


@pytest.mark.parametrize("key", ["mean", "std"])
@pytest.mark.parametrize("value", [[math.nan], [0.5, math.inf, 0.5]], ids=["nan", "inf"])
def test_non_finite_mean_std_are_refused(key, value):
    with pytest.raises(ValueError, match=f"r.yaml: {key} must be 1 or 3 numbers"):
        make_recipe({key: value}, source="r.yaml")


def test_non_finite_lr_from_yaml_is_refused(tmp_path):
    # `.inf` passed before: a recipe that trains with an infinite learning rate.
    path = write_yaml(tmp_path / "r.yaml", "steps: 100\nlr: .inf\n")
    with pytest.raises(ValueError, match=r"lr must be > 0 and finite, got inf\. Fix: "):
        load_recipe(path)


def test_all_zero_loss_weights_are_refused():
    with pytest.raises(ValueError) as e:
        make_recipe({"mse_weight": 0, "at_weight": 0, "cos_weight": 0}, source="r.yaml")
    msg = str(e.value)
    assert msg.startswith("r.yaml: mse_weight, at_weight and cos_weight are all 0") and "Fix: set mse_weight" in msg
    make_recipe({"mse_weight": 0, "at_weight": 0, "cos_weight": 1})  # any one term is enough


@pytest.mark.parametrize("key, value", [
    ("warmup_steps", 0), ("grad_clip", 0), ("weight_decay", 0), ("momentum", 0), ("momentum", 0.999), ("seed", 0),
    ("seed", 2 ** 32 - 1), ("num_workers", 0), ("policy_entropy", 0), ("policy_entropy_steps", 0),
    ("probe_train_fraction", 1), ("teacher_resolution", 8), ("image_channels", 1), ("image_channels", 3),
    ("teacher_in_channels", 1),
    ("mean", [0, 1, 0.5]), ("mean", [0.5]), ("std", [1e-3]), ("std", [0.2, 0.3, 0.4]), ("select_max_memory_gb", 0.5),
    ("mse_weight", 0), ("at_weight", 0), ("cos_weight", 2.5),
    ("num_workers", "auto"), ("ema_decay", 0), ("monitor_every", 0), ("monitor_images", 2),
])
def test_range_edges_are_accepted(key, value):
    assert getattr(make_recipe({key: value}), key) == value


# --------------------------------------------------------------------------------------------------- warnings

@pytest.mark.parametrize("values, expected", [
    ({"steps": 100, "warmup_steps": 100, "checkpoint_every": 50}, "warmup_steps 100 >= steps 100"),
    ({"steps": 100, "warmup_steps": 10, "checkpoint_every": 101}, "checkpoint_every 101 > steps 100"),
])
def test_suspicious_schedule_is_a_warning(caplog, values, expected):
    with caplog.at_level(logging.WARNING, logger="distill.config"):
        r = make_recipe(values, source="r.yaml")
    assert r.steps == 100  # valid: a warning, not an error
    records = [rec for rec in caplog.records if rec.name == "distill.config"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert records[0].getMessage().startswith(f"r.yaml: {expected}") and "Fix: " in records[0].getMessage()


def test_sensible_schedule_gives_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="distill.config"):
        make_recipe({"steps": 100, "warmup_steps": 99, "checkpoint_every": 100})
    assert not [rec for rec in caplog.records if rec.name == "distill.config"]


# --------------------------------------------------------------------------------------------------- strict YAML

def test_key_given_twice_in_a_file_is_an_error(tmp_path):
    path = write_yaml(tmp_path / "twice.yaml", "steps: 100\nlr: 0.001\n# later ...\nsteps: 5\n")
    with pytest.raises(ValueError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert msg.startswith(f"recipe '{path}': key 'steps' is given twice, at lines 1 and 4") and "Fix: " in msg


def test_key_given_twice_in_a_nested_mapping_is_an_error():
    with pytest.raises(ValueError, match=r"^r\.yaml: key 'drop_path_rate' is given twice, on line 2 \(columns 18 and "
                                         r"39\)"):
        yaml_load("steps: 1\nstudent_kwargs: {drop_path_rate: 0.1, drop_path_rate: 0.2}\n", source="r.yaml")


def test_merge_keys_may_be_overridden():
    assert yaml_load("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")["other"] == {"x": 3, "y": 2}


@pytest.mark.parametrize("text, line, column, problem", [
    ("steps: 10\n  lr: 0.1\n", 2, 5, "mapping values are not allowed here"),
    ("steps: 10\ntimesteps: [5, 11\nlr: 0.1\n", 3, 3, "expected ',' or ']'"),
    ("steps: 10\n\tlr: 0.1\n", 2, 1, "found character '\\t' that cannot start any token"),
])
def test_yaml_syntax_error_in_a_file_names_file_line_and_column(tmp_path, text, line, column, problem):
    path = write_yaml(tmp_path / "broken.yaml", text)
    with pytest.raises(ValueError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert msg.startswith(f"recipe '{path}': YAML syntax error at line {line}, column {column}: {problem}"), msg
    assert "Fix: " in msg and "\n" not in msg and "<unicode string>" not in msg


def test_yaml_syntax_error_in_a_set_item_names_the_item_line_and_column():
    with pytest.raises(ValueError) as e:
        parse_overrides(["steps=10", "timesteps=[5, 11"])
    msg = str(e.value)
    assert msg.startswith("--set 'timesteps=[5, 11' (value '[5, 11'): YAML syntax error at line 1, column 7: "
                          "expected ',' or ']'"), msg
    assert "\n" not in msg


# --------------------------------------------------------------------------------------------------- CLI: exit 2

@pytest.mark.parametrize("text, args, expected", [
    ("steps: 100\n", ["--set", "lr=.inf"], "lr must be > 0 and finite, got inf"),
    ("steps: 100\n", ["--set", "mse_weight=-1"], "mse_weight must be >= 0 and finite, got -1.0"),
    ("steps: 100\nmse_weight: 0\nat_weight: 0\n", [], "are all 0"),
    ("steps: 100\nstd: [0.2, 0, 0.2]\n", [], "std must be 1 or 3 numbers > 0"),
    ("steps: 100\nwarmup_steps: -5\n", [], "warmup_steps must be >= 0, got -5"),
    ("steps: 100\nsteps: 10\n", [], "key 'steps' is given twice, at lines 1 and 2"),
    ("steps: 100\n  lr: 0.1\n", [], "YAML syntax error at line 2, column 5"),
    ("# nothing yet\n", [], "is empty (or only comments)"),
    ("steps: 100\n", ["--set", "timesteps=[5"], "--set 'timesteps=[5' (value '[5'): YAML syntax error at line 1"),
], ids=["inf-lr", "negative-weight", "zero-weights", "zero-std", "negative-warmup", "duplicate-key", "syntax-file",
        "empty-file", "syntax-set"])
def test_cli_train_exits_2_with_one_line(tmp_path, capsys, text, args, expected):
    path = write_yaml(tmp_path / "r.yaml", text)
    assert main(["train", str(path), "-o", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distill train: error: ") and expected in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, ok", [(True, True), (False, True), ("aot_eager", True), (3, False)])
def test_compile_is_a_bool_or_a_backend_name(value, ok):
    if ok:
        assert make_recipe({"compile": value}).compile == value
    else:
        with pytest.raises(ValueError, match="compile"):
            make_recipe({"compile": value})
@pytest.mark.parametrize("key, value, valid", [("dataset", "cifar-100", "fashion-mnist, image-folder, file-list, hf"),
                                               ("image_resize", "crop", "center-crop, squash"),
                                               ("data_hash", "md5", "stat, content")])
def test_data_choices_are_checked_at_load(key, value, valid):
    with pytest.raises(ValueError) as e:
        make_recipe({key: value})
    assert f"'{key}'" in str(e.value) and repr(value) in str(e.value) and valid in str(e.value)


def test_mixed_precision_no_unquoted_in_yaml_means_no(tmp_path):
    """YAML 1.1 reads `mixed_precision: no` as false; it means Accelerate's "no" (full precision)."""
    path = tmp_path / "r.yaml"
    path.write_text("mixed_precision: no\n")
    assert load_recipe(path).mixed_precision == "no"
    with pytest.raises(ValueError, match="mixed_precision"):
        make_recipe({"mixed_precision": True})


# --------------------------------------------------------------------------- --set: never dropped, named as --set

def test_a_key_given_twice_in_set_is_refused():
    """`--set steps=3 steps=2` kept the last silently."""
    for items in (["steps=3", "steps=2"], ["steps=3", "lr=0.1", " steps = 2"]):
        with pytest.raises(ValueError, match=r"--set steps is given twice \('steps=3' and '.*steps ?= ?2'\).*"
                                             r"Fix: give steps once"):
            parse_overrides(items)


@pytest.mark.parametrize("item, key, value", [("lr=1e-3", "lr", 1e-3), ("lr=inf", "lr", math.inf),
                                              ("weight_decay=-inf", "weight_decay", -math.inf),
                                              ("select_max_memory_gb=1e1", "select_max_memory_gb", 10.0),
                                              ("steps=1e3", "steps", 1000), ("lr=2", "lr", 2.0)])
def test_set_values_are_read_as_the_keys_type(item, key, value):
    """YAML 1.1 reads `inf` as a string: a float key takes it as a float (then refused by its range, naming --set)."""
    if math.isinf(value):
        with pytest.raises(ValueError, match=rf"^--set '{re.escape(item)}': {key} must be .* finite, got {value}"):
            parse_overrides([item])
        return
    out = parse_overrides([item])
    assert out == {key: value} and type(out[key]) is type(value)


@pytest.mark.parametrize("item, expected", [
    ("stpes=3", r"^unknown key 'stpes' in --set 'stpes=3'\. Did you mean 'steps'"),
    ("steps=ten", r"^--set 'steps=ten': key 'steps' must be int, got 'ten'"),
    ("optimizer=adam2", r"^--set 'optimizer=adam2': .*'adam2'; valid: adamw, lamb, sgd"),
    ("lr=0", r"^--set 'lr=0': lr must be > 0"),
    ("timesteps=[]", r"^--set 'timesteps=\[\]': timesteps must be a non-empty list"),
])
def test_a_bad_set_value_is_blamed_on_set_not_on_the_recipe_file(tmp_path, item, expected):
    path = write_yaml(tmp_path / "r.yaml", "steps: 20\n")
    with pytest.raises(ValueError, match=expected) as e:
        load_recipe(path, parse_overrides([item]))
    assert str(path) not in str(e.value)


def test_set_errors_through_the_cli_exit_2_naming_set(tmp_path, capsys):
    path = write_yaml(tmp_path / "r.yaml", "steps: 20\n")
    for args, expected in ((["--set", "steps=3", "steps=2"], "--set steps is given twice"),
                           (["--set", "stpes=3"], "unknown key 'stpes' in --set"),
                           (["--set", "lr=inf"], "--set 'lr=inf': lr must be > 0 and finite, got inf")):
        assert main(["train", str(path), "-o", str(tmp_path / "run"), *args]) == 2
        err = capsys.readouterr().err
        assert expected in err and "in recipe" not in err, err
    assert not (tmp_path / "run").exists()


def test_mixed_precision_is_unset_by_default():
    """null: Accelerate's configuration decides (tests/test_trainer_multiprocess.py shows it reaching Accelerator)."""
    assert make_recipe({}).mixed_precision is None
    assert make_recipe({"mixed_precision": "bf16"}).mixed_precision == "bf16"
