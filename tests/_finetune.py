"""A fake `distill export` directory for the fine-tuning and report tests."""
import json

import pytest
import timm
import timm.models
import torch

MEAN, STD = (0.45, 0.40, 0.35), (0.25, 0.26, 0.27)


def fake_export(path, arch="resnet10t", size=32, seed=123, dataset="image-folder", channels=3):
    """A directory laid out as `distill export` writes it (timm save_for_hf + a 'distill' key), random weights
    with BN statistics moved away from their init so a load is visible in every tensor."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    timm.models.save_for_hf(
        model, str(path), model_config={"pretrained_cfg": {"tag": "distill-test"}}, safe_serialization=True,
        data_config={"input_size": (3, size, size), "mean": MEAN, "std": STD, "crop_pct": 1.0,
                     "interpolation": "bilinear", "crop_mode": "center"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["distill"] = {"dataset": dataset, "data_channels": channels, "student_size": size}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return fake_export(tmp_path_factory.mktemp("export") / "student")
