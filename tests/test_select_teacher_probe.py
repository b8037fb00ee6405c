"""`distill probe teacher:NAME`: per-timestep probes and their soft-vote ensemble."""
import json

from distill.cli import main


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
