"""`distill probe teacher:NAME`: per-timestep probes and their soft-vote ensemble."""
import json

import pytest
import torch
import torch.nn.functional as F

from distill.cli import main
from distill.probe import ensemble_probe, multi_linear_probe


def test_ensemble_probe_averages_member_logits():
    g = torch.Generator().manual_seed(0)
    y, yt = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (30,), generator=g)
    tr = {k: torch.randn(60, 5, generator=g) + F.one_hot(y, 5) * s for k, s in (("a", 1.0), ("b", 2.0), ("c", 0.5))}
    te = {k: torch.randn(30, 5, generator=g) + F.one_hot(yt, 5) * s for k, s in (("a", 1.0), ("b", 2.0), ("c", 0.5))}
    res = ensemble_probe(tr, y, te, yt, epochs=5)
    ref = multi_linear_probe(tr, y, te, yt, epochs=5, return_logits=True)
    avg = torch.stack([ref[k]["test_logits"] for k in "abc"]).mean(0)
    assert res["ensemble"]["top1"] == pytest.approx(100 * float((avg.argmax(1) == yt).float().mean()), abs=1e-4)
    assert res["best_member"] == max("abc", key=lambda k: ref[k]["top1"])
    single = ensemble_probe(tr, y, te, yt, members=["b"], epochs=5)
    assert single["ensemble"]["top1"] == pytest.approx(single["members"]["b"]["top1"])


def test_probe_ensemble_cli(tmp_path, fmnist_dir, tiny_pipeline_dir, capsys):
    out = tmp_path / "e.json"
    rc = main(["probe", f"teacher:{tiny_pipeline_dir}", "--blocks", "mid_block", "--timesteps", "1", "50",
               "--ensemble", "--data-root", fmnist_dir, "--train-fraction", "0.002", "--epochs", "2", "--json",
               str(out), "--no-progress"])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["timestep"] for r in rows] == [1, 50, "ensemble"]
    assert "soft vote" in capsys.readouterr().out
    assert main(["probe", "timm:resnet18", "--ensemble", "--no-progress"]) == 2
    assert "--ensemble soft-votes one probe per timestep" in capsys.readouterr().err
