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


def test_the_random_init_row_is_computed_once_and_reused_until_student_seed_or_data_change(tmp_path, rgb_folder,
                                                                                          monkeypatch):
    """``distill run``'s random-init row is probed once per key (student, seed, data, probe settings, ...) and read
    back after; another seed, student or test subset probes again."""
    import distill.pipeline as pl
    from distill.config import make_recipe
    from distill.evaluate import probe_data

    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    calls, real = [], pl.probe_random_init
    monkeypatch.setattr(pl, "probe_random_init", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    r = make_recipe(dict(dataset="image-folder", data_root=str(rgb_folder), student="resnet18", student_size=32))
    data = probe_data("image-folder", str(rgb_folder), 3)
    kw = dict(epochs=1, k=3, seed=0, progress=False, device="cpu")
    ms = ([0.5] * 3, [0.25] * 3)
    first = pl.random_init_row(r, *ms, data, kw)
    again = pl.random_init_row(r, *ms, data, kw)
    assert calls == ["resnet18"] and again.pop("reused").startswith(str(tmp_path / "cache" / pl.BASELINES))
    assert again == first and "reused" not in first
    pl.random_init_row(r, *ms, data, {**kw, "seed": 1})
    pl.random_init_row(make_recipe({**r.to_dict(), "student": "resnet10t"}), *ms, data, kw)
    pl.random_init_row(r, *ms, probe_data("image-folder", str(rgb_folder), 3, test_fraction=0.5), kw)
    assert calls == ["resnet18", "resnet18", "resnet10t", "resnet18"]
    assert "reused" in pl.random_init_row(r, *ms, data, {**kw, "seed": 1})  # each kept apart
