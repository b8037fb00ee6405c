"""distill.finetune.model: an exported student loads its weights and gets a new head; timm:NAME is random init."""
import torch
from safetensors.torch import load_file

from distill.finetune import build_model, parse_model_source

from ._finetune import exported  # noqa: F401 (the fixture: a fake `distill export` directory)


# ----------------------------------------------------------------------------------------------- model
def test_exported_student_loads_its_weights_and_gets_a_new_head(exported):
    saved = load_file(str(exported / "model.safetensors"))
    model = build_model(parse_model_source(str(exported)), num_classes=3, size=32)
    state = model.state_dict()
    assert set(state) - set(saved) == {"fc.weight", "fc.bias"}  # the head is new, nothing else is
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    assert model.fc.out_features == 3
    scratch = build_model(parse_model_source("timm:resnet10t"), num_classes=3, size=32)
    assert not torch.equal(scratch.state_dict()["conv1.0.weight"], saved["conv1.0.weight"])
    assert not torch.equal(scratch.state_dict()["bn1.running_mean"], saved["bn1.running_mean"])


def test_distill_finetune_is_callable_however_it_was_imported(tmp_path):
    """``from distill import FinetuneConfig, finetune`` bound the subpackage ``distill.finetune`` (imported for
    FinetuneConfig) instead of the function: calling it raised "'module' object is not callable". In a fresh
    interpreter, each import order gives something that runs the function (an invalid setting reaches its
    validation, a ValueError naming the setting), and submodule imports still work."""
    import subprocess
    import sys

    code = """
import importlib, sys
order = sys.argv[1]
if order == "config-first":
    from distill import FinetuneConfig, finetune
elif order == "submodule-first":
    import distill.finetune.run as run_mod
    import distill
    finetune, FinetuneConfig = distill.finetune, distill.FinetuneConfig
    assert run_mod.finetune is importlib.import_module("distill.finetune.run").finetune
else:
    from distill import finetune, FinetuneConfig
import inspect
assert list(inspect.signature(finetune).parameters)[:3] == ["cfg", "output_dir", "overwrite"], inspect.signature(finetune)
try:
    finetune(FinetuneConfig(model="timm:resnet18", dataset="fashion-mnist", steps=0), sys.argv[2])
except ValueError as e:
    print("ValueError", e)
"""
    for order in ("config-first", "submodule-first", "function-first"):
        r = subprocess.run([sys.executable, "-c", code, order, str(tmp_path / order)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, (order, r.stderr[-2000:])
        assert r.stdout.startswith("ValueError") and "steps" in r.stdout, (order, r.stdout, r.stderr[-1000:])
        assert not (tmp_path / order).exists()
