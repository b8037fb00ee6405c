"""The package's structure, checked on its source: layers import one way, no import circles (function-local
imports count), one declaration per vocabulary, one builder of feature keys, one atomic-write helper, small modules,
and a package face that imports nothing heavy.

Layers, lowest first (a module imports only its own layer or lower ones):
foundation -> building blocks -> recipe wiring -> procedures -> faces.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "distill"

FOUNDATION = {"distill.vocab", "distill.errors", "distill.atomic", "distill.integrity", "distill.version",
              "distill.ranges", "distill.recipes", "distill.logs", "distill.config", "distill.signals"}
BLOCKS = {"distill.data", "distill.augment", "distill.teacher", "distill.student", "distill.regressor",
          "distill.losses", "distill.policy", "distill.probe", "distill.plots", "distill.optim"}
WIRING = {"distill.build", "distill.rundir", "distill.runlock", "distill.export", "distill.card"}
WIRING |= {"distill.deploy"}  # ONNX export of a timm model (distill export --onnx)
PROCEDURES = {"distill.trainer", "distill.select", "distill.cache", "distill.evaluate", "distill.finetune",
              "distill.pipeline", "distill.report", "distill.segment", "distill.tune"}
BLOCKS |= {"distill.cost"}  # FLOP counting and GPU peaks: torch only
PROCEDURES |= {"distill.latent_cache", "distill.plan"}  # latent-cache format; distill plan
FACES = {"distill.cli", "distill"}
LAYERS = [FOUNDATION, BLOCKS, WIRING, PROCEDURES, FACES]
# modules above ~400 lines, each because one on-disk format is written and read in one place
LARGE_OK = {"distill.cache": "the feature-cache format (manifest + memory-mapped .npy), written and read",
            "distill.rundir": "the run-directory format (config.yaml, metrics.csv, summary.json, checkpoints), "
                              "written and read"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def is_package(name: str, modules: dict) -> bool:
    return modules[name].name == "__init__.py"


def imports_of(name: str, path: Path, modules: dict) -> set[str]:
    """Package modules imported anywhere in ``path`` (module level and inside functions), with the packages a
    submodule import executes; relative and absolute forms."""
    tree = ast.parse(path.read_text())
    here = name if is_package(name, modules) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if not (mod == "distill" or mod.startswith("distill.")):
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                targets.append(sub if sub in modules else mod)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name == "distill" or a.name.startswith("distill.")]
        for t in targets:
            while t not in modules and "." in t:
                t = t.rpartition(".")[0]
            parts = t.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c executes a, a.b, a.b.c
                m = ".".join(parts[:i])
                if m in modules and m != name and not name.startswith(m + "."):
                    out.add(m)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in layer):
            return i
    raise AssertionError(f"module {name} is in no layer of tests/test_architecture.py: place it in one")


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer_of(name)


def test_no_import_circle(graph):
    """Depth-first search for a back edge; the error prints the circle."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_layers_import_one_way(graph):
    bad = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
           for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a)]
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_cli_or_the_package_face(graph):
    bad = [f"{a} imports {b}" for a, deps in graph.items() for b in deps if b in ("distill", "distill.cli")]
    assert not bad, "\n".join(bad)


def test_procedures_do_not_import_the_trainer(graph):
    for name, deps in graph.items():
        if name.split(".")[1:2] and name.split(".")[1] in ("cache", "select", "export", "evaluate", "finetune",
                                                           "segment", "tune"):
            assert not any(d == "distill.trainer" or d.startswith("distill.trainer.") for d in deps), name


def test_building_blocks_never_see_a_recipe(graph):
    for name, deps in graph.items():
        if layer_of(name) == 1:
            assert "distill.config" not in deps, f"{name} imports distill.config (building blocks take plain arguments)"


def _string_tuples(tree) -> list[tuple[int, frozenset]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            out.append((node.lineno, frozenset(e.value for e in node.elts)))
    return out


def test_each_closed_vocabulary_is_declared_once():
    """No module but vocab.py spells out a vocabulary of vocab.py as a literal (recipe checks, CLI choices, ...)."""
    vocab_tree = ast.parse((PKG / "vocab.py").read_text())
    vocabs = {}
    for node in vocab_tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            vocabs[node.targets[0].id] = frozenset(e.value for e in node.value.elts)
    assert {"OPTIMIZERS", "AUGMENTS", "MIXED_PRECISION", "AT_MODES", "POLICY_BASELINES"} <= set(vocabs)
    bad = []
    for path in PKG.rglob("*.py"):
        if path.name == "vocab.py":
            continue
        for line, values in _string_tuples(ast.parse(path.read_text())):
            for vname, v in vocabs.items():
                if values == v:
                    bad.append(f"{path.relative_to(PKG.parent)}:{line} spells out vocab.{vname}")
    assert not bad, "\n".join(bad)


def test_feature_keys_are_built_and_parsed_in_one_place():
    """Only distill/teacher's feature_key / parse_feature_key write or split the '@t' of '<block>@t<t>'."""
    bad = []
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr) and any(
                    isinstance(v, ast.Constant) and "@t" in str(v.value) for v in node.values):
                bad.append((path, node.lineno))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("split", "rsplit", "partition", "rpartition") and node.args and \
                    isinstance(node.args[0], ast.Constant) and "@" in str(node.args[0].value):
                bad.append((path, node.lineno))
    owners = {p for p, _ in bad}
    assert len(owners) <= 1 and all(p.parent.name == "teacher" for p in owners), \
        "feature keys built or split by hand at: " + ", ".join(f"{p.relative_to(PKG.parent)}:{n}" for p, n in bad)


def test_every_atomic_write_goes_through_the_helper():
    """Renames and whole-file writes happen in distill/atomic.py only."""
    bad = []
    for path in PKG.rglob("*.py"):
        if path.name == "atomic.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                f = node.func
                owner = f.value.id if isinstance(f.value, ast.Name) else None
                if (owner == "os" and f.attr in ("replace", "rename")) or (owner == "shutil" and f.attr == "move") \
                        or f.attr in ("write_text", "write_bytes"):
                    bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {owner or '...'}.{f.attr}")
    assert not bad, "write through distill.atomic instead:\n" + "\n".join(bad)


def test_modules_are_small():
    big = {module_name(p): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    big = {m: n for m, n in big.items() if n > 420 and m not in LARGE_OK}
    assert not big, f"modules above ~400 lines (split them, or add the one on-disk format they own): {big}"


def test_import_distill_is_light():
    code = ("import sys, distill, distill.cli; heavy = [m for m in ('torch', 'torchmetrics', 'diffusers', 'kornia', "
            "'matplotlib', 'timm') if m in sys.modules]; print(heavy); assert not heavy, heavy; "
            "assert distill.__version__ and callable(distill.load_recipe)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout


def test_lazy_face_resolves_every_public_name():
    import distill

    for name in distill.__all__:
        assert getattr(distill, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        distill.no_such_name  # noqa: B018


def _calls(name: str) -> list[str]:
    """Where a function called ``name`` is called in the package."""
    out = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called == name:
                    out.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    return out


def test_one_optimizer_and_schedule_builder():
    """Distillation and fine-tuning build their optimizer and LR schedule through distill/optim.py alone."""
    for name in ("create_optimizer_v2", "get_cosine_schedule_with_warmup"):
        where = _calls(name)
        assert where and all(w.startswith("distill/optim.py:") for w in where), f"{name} called at {where}"
    assert _calls("build_optimizer") and _calls("build_scheduler")
    for module in ("distill/build.py", "distill/tune/loop.py"):
        src = (PKG.parent / module).read_text()
        assert "build_optimizer(" in src and "build_scheduler(" in src, module


def test_grayscale_rule_is_written_once():
    """'Fashion-MNIST has one channel' lives in vocab.dataset_channels: no module compares a dataset name to pick a
    channel count."""
    bad = []
    for path in PKG.rglob("*.py"):
        if path.name == "vocab.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.IfExp) and isinstance(node.test, ast.Compare) and any(
                    isinstance(c, ast.Constant) and c.value == "fashion-mnist" for c in node.test.comparators) and \
                    any(isinstance(v, ast.Constant) and v.value in (1, 3) for v in (node.body, node.orelse)):
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
            if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and any(
                    isinstance(c, ast.Constant) and c.value == "fashion-mnist" for c in node.test.comparators) and \
                    any(isinstance(s, ast.Assign) and any(getattr(t, "id", "") == "channels" for t in s.targets)
                        for s in node.body):
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert not bad, f"use vocab.dataset_channels instead: {bad}"
