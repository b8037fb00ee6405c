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
