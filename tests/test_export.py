"""Export of a trained run (distill.export): the exported timm model gives the run's features, carries its
config, loads with a head for fine-tuning, and an existing export is not overwritten."""
import json

import pytest
import timm
import torch

from distill.export import export_student, load_exported
from distill.trainer import load_trained


def test_export_roundtrip_gives_same_features(trained_run, tmp_path):
    run, _ = trained_run
    model, recipe, resolved = load_trained(str(run))
    out = export_student(str(run), str(tmp_path / "student"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model.student.model(x))
        ref = model.student(x)
        got = reloaded.forward_intermediates(x, indices=model.student.indices, intermediates_only=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    cfg = reloaded.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 32, 32)
    assert tuple(cfg["mean"]) == pytest.approx((0.286,) * 3) and tuple(cfg["std"]) == pytest.approx((0.353,) * 3)
    assert cfg["tag"].startswith("distill-")
    assert "up_blocks.0" in cfg["description"] and "[11]" in cfg["description"]
    meta = json.loads((out / "config.json").read_text())["distill"]
    assert meta["timesteps"] == [11] and meta["steps"] == 40 and meta["data_root"] == recipe.data_root
    # a head for fine-tuning, with the distilled backbone underneath
    head = load_exported(str(out), num_classes=7)
    assert head(x).shape == (2, 7)
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_student(str(run), str(out))
