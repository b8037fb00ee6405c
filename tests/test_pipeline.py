"""``distill run`` (distill.pipeline.run_recipe): with ``ema: true`` the run's export and its probe row hold the EMA
of the student's weights (the checkpoint's ema.safetensors, not the live weights), and every results row
(results.json, results.md, the model card) says which weights it holds; ``--test-fraction`` scores the probes on a
stated seeded subset of the test split."""
import json

import torch
import yaml
from safetensors.torch import load_file

from distill.cli import main

from .conftest import tiny_unet_config


def test_run_with_ema_exports_and_probes_the_ema_and_says_so(tmp_path, rgb_folder, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(dict(
        dataset="image-folder", data_root=str(rgb_folder), teacher=tiny_unet_config(3), teacher_blocks=["mid_block"],
        timesteps=[11], student="resnet18", student_size=32, regressor_width=16, steps=2, batch_size=6,
        warmup_steps=0, checkpoint_every=2, log_every=1, probe_epochs=1, knn_k=3, ema=True, ema_decay=0.5)))
    run = tmp_path / "run"
    assert main(["run", str(recipe), "-o", str(run), "--no-progress", "--test-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    ckpt = run / "checkpoint-2"
    live = {k[len("student.model."):]: v for k, v in load_file(str(ckpt / "model.safetensors")).items()
            if k.startswith("student.model.")}
    ema = load_file(str(ckpt / "ema.safetensors"))
    exported = load_file(str(run / "student" / "model.safetensors"))
    assert sum(not torch.equal(ema[k], live[k]) for k in ema) > len(ema) // 2  # the two differ
    assert set(exported) == set(ema) and all(torch.equal(exported[k], ema[k]) for k in ema)
    assert json.loads((run / "student" / "config.json").read_text())["distill"]["weights"] == "ema"
    rows = json.loads((run / "results.json").read_text())["results"]
    assert [(r["name"], r["weights"]) for r in rows] == [
        ("resnet18 distilled", "ema"), ("resnet18 random init", "random init"), ("raw pixels", "none")]
    table = (run / "results.md").read_text()
    assert "| resnet18 distilled | ema |" in table and "| model | weights |" in table
    card = (run / "student" / "README.md").read_text()
    assert f"(k={rows[0]['k']}) | {rows[0]['num_train']} / {rows[0]['num_test']} | ema |" in card
    # --test-fraction 0.5: 9 of the 18 test images (3 of 6 per class), stated in the table, results and card
    stated = "tested on 9 of 18 test images (test fraction 0.5, seed 0)"
    assert all((r["num_test"], r["num_test_total"], r["test"]) == (9, 18, stated) for r in rows)
    assert stated in table and stated in card and stated in out
    assert yaml.safe_load((run / "config.yaml").read_text())["probe_test_fraction"] == 0.5
