"""distill finetune runs and the CLI: equal budgets for distilled and scratch, evaluation, sweeps, errors."""
import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import timm
import timm.models
import torch

from distill.cli import main
from distill.data import build_dataset, collate, to_student, to_unit
from distill.finetune import FinetuneConfig, finetune
from distill.vocab import OPTIMIZERS

from ._finetune import MEAN, STD, fake_export
from ._finetune import exported  # noqa: F401 (the fixture: a fake `distill export` directory)


def _cfg(model, rgb_folder, **kw):
    base = dict(model=str(model), dataset="image-folder", data_root=str(rgb_folder), steps=6, batch_size=8,
                warmup_steps=2, eval_every=3, log_every=1, lr=1e-3)
    return FinetuneConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------------------- runs
def test_distilled_and_scratch_get_the_same_budget_schedule_and_augmentation(exported, rgb_folder, tmp_path):
    seen = {}

    def recorder(key):
        seen[key] = []
        return lambda b: seen[key].append((b["step"], b["inputs"].clone(), b["labels"].clone(), b["lr"]))

    dist = finetune(_cfg(exported, rgb_folder), tmp_path / "d", progress=False, callback=recorder("d"))
    scr = finetune(_cfg("timm:resnet10t", rgb_folder, like=str(exported)), tmp_path / "s", progress=False,
                   callback=recorder("s"))
    finetune(_cfg(exported, rgb_folder, seed=1, steps=1, eval_every=0), tmp_path / "d1", progress=False,
             callback=recorder("d1"))
    assert [s for s, *_ in seen["d"]] == [s for s, *_ in seen["s"]] == list(range(1, 7))
    for (_, xd, yd, lrd), (_, xs, ys, lrs) in zip(seen["d"], seen["s"]):
        assert torch.equal(xd, xs) and torch.equal(yd, ys) and lrd == lrs  # same images, same augmentation draws
    assert not torch.equal(seen["d"][0][1], seen["d1"][0][1])  # ... and the seed does change them
    # linear warmup over 2 steps, then cosine to 0 over the remaining 4 (diffusers' schedule), per update
    expected = [1e-3 * s / 2 if s < 2 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(6)]
    assert [lr for *_, lr in seen["d"]] == pytest.approx(expected)
    # the model sees the export's size and mean/std, also for the scratch run (--like)
    x = seen["d"][0][1]
    assert x.shape == (8, 3, 32, 32)
    for r in (dist, scr):
        assert (r["input_size"], r["mean"], r["std"]) == (32, list(MEAN), list(STD))
        assert (r["steps"], r["train_images_seen"], r["augment"], r["warmup_steps"]) == (6, 48, "crop-flip", 2)
        assert [h["step"] for h in r["history"]] == [3, 6] and r["test_images"] == 18
    assert (dist["label"], dist["model_kind"], scr["label"], scr["model_kind"]) == (
        "resnet10t distilled", "exported", "resnet10t scratch", "timm")
    on_disk = json.loads((tmp_path / "d" / "result.json").read_text())
    assert on_disk["last_top1"] == dist["last_top1"] and on_disk["fraction"] == 1.0 and on_disk["seed"] == 0
    log = (tmp_path / "d" / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,batch_top1,lr,img_per_s" and [ln.split(",")[0] for ln in log[1:]] == list("123456")


def test_reported_accuracy_equals_argmax_on_the_saved_model(exported, rgb_folder, tmp_path):
    r = finetune(_cfg(exported, rgb_folder, steps=4, eval_every=0, save_model=True), tmp_path / "ft",
                 progress=False)
    model = timm.create_model(f"local-dir:{tmp_path / 'ft' / 'model'}", pretrained=True).eval()
    assert tuple(model.pretrained_cfg["mean"]) == MEAN and model.num_classes == 3
    test = build_dataset("image-folder", str(rgb_folder), "test", 3)
    images, labels = collate([test[i] for i in range(len(test))])
    with torch.no_grad():
        logits = model(to_student(to_unit(images), 32, MEAN, STD))
    top1 = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    top2 = 100.0 * (logits.topk(2, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert r["last_top1"] == pytest.approx(top1, abs=0.01) and len(r["history"]) == 1
    assert r["top5_k"] == 3 and r["last_top5"] == 100.0  # 3 classes: top-5 is top-3
    assert top2 < 100.0 or top1 == 100.0


def test_overfits_a_tiny_fashion_mnist_subset(fmnist_dir, tmp_path):
    cfg = FinetuneConfig(model="timm:test_resnet", dataset="fashion-mnist", data_root=fmnist_dir, fraction=0.002,
                         size=32, steps=50, batch_size=32, lr=3e-3, warmup_steps=5, augment="none", eval_every=0,
                         eval_train=True)
    r = finetune(cfg, tmp_path / "of", progress=False)
    assert r["train_images"] == 120 and r["train_images_total"] == 60000 and r["test_images"] == 10000
    assert r["train_top1"] >= 95.0  # memorised its 120 labelled images
    assert r["last_top1"] > 40.0  # and learned something that transfers (chance: 10%)
    assert r["preprocessing_from"] == "dataset + explicit" and r["mean"][0] == r["mean"][2]  # grey: dataset stats


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_sweep_writes_one_directory_per_run(exported, rgb_folder, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["finetune", str(exported), "--data-root", str(rgb_folder), "-o", str(out), "--steps", "2",
            "--batch-size", "4", "--eval-every", "0", "--fractions", "0.5", "1.0", "--seeds", "0", "1",
            "--no-progress"]
    assert main(args) == 0
    runs = sorted(p.parent.name for p in out.glob("*/result.json"))
    assert runs == ["frac0.5-seed0", "frac0.5-seed1", "frac1-seed0", "frac1-seed1"]
    r = json.loads((out / "frac0.5-seed1" / "result.json").read_text())
    assert (r["fraction"], r["seed"], r["train_images"], r["steps"]) == (0.5, 1, 18, 2)
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    before = (out / "frac1-seed0" / "result.json").read_text()
    assert main(args + ["--skip-existing"]) == 0
    assert (out / "frac1-seed0" / "result.json").read_text() == before


def test_export_data_root_is_the_default_and_a_missing_one_asks_for_data_root(rgb_folder, tmp_path, capsys):
    """An export records the data root it was distilled on; finetune (and probe) use it when --data-root is not
    given and the folder exists here; otherwise the error names --data-root."""
    exp = fake_export(tmp_path / "student")
    cfg = json.loads((exp / "config.json").read_text())
    cfg["distill"]["data_root"] = str(rgb_folder)
    (exp / "config.json").write_text(json.dumps(cfg))
    args = ["finetune", str(exp), "-o", str(tmp_path / "o"), "--steps", "1", "--batch-size", "4",
            "--eval-every", "0", "--no-progress"]
    assert main(args) == 0
    r = json.loads((tmp_path / "o" / "result.json").read_text())
    assert r["data_root"] == str(rgb_folder) and r["train_images"] == 36
    cfg["distill"]["data_root"] = str(tmp_path / "moved-away")
    (exp / "config.json").write_text(json.dumps(cfg))
    assert main(args[:3] + [str(tmp_path / "o2")] + args[4:]) == 2
    assert "--data-root" in capsys.readouterr().err


@pytest.mark.parametrize("extra,expected", [
    (["--fraction", "0"], "--fraction 0.0 is outside (0, 1]"),
    (["--fraction", "1.5"], "--fraction 1.5 is outside (0, 1]"),
    (["--fractions", "0.1", "2"], "--fractions 2.0 is outside (0, 1]"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--optimizer", "adam"], f"--optimizer 'adam' is not valid; valid: {', '.join(OPTIMIZERS)}"),
    (["--augment", "mixup"], "--augment 'mixup' is not valid"),
    (["--like", "/nonexistent/student"], "--like '/nonexistent/student' does not exist"),
    (["--layer-decay", "0"], "--layer-decay 0.0 is outside (0, 1]"),
    (["--layer-decay", "1.2"], "--layer-decay 1.2 is outside (0, 1]"),
    (["--backbone-lr-mult", "0"], "--backbone-lr-mult 0.0 must be > 0"),
])
def test_bad_arguments_exit_2_naming_the_argument(exported, rgb_folder, tmp_path, capsys, extra, expected):
    assert main(["finetune", str(exported), "--data-root", str(rgb_folder), "-o", str(tmp_path / "o"),
                 "--no-progress", *extra]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "o" / "result.json").exists()


def test_bad_models_and_datasets_exit_2(exported, rgb_folder, tmp_path, capsys):
    def err(*args):
        assert main(["finetune", *args, "-o", str(tmp_path / "o"), "--no-progress"]) == 2
        return capsys.readouterr().err

    e = err("/nonexistent/student")  # the positional MODEL: named as in `distill finetune --help`, not as --model
    assert "MODEL '/nonexistent/student' does not exist" in e and "--model" not in e
    e = err("timm:resnet181", "--data-root", str(rgb_folder))
    assert "timm has no model 'resnet181'" in e and "resnet18" in e.split("Closest timm names:")[1]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("steps: 1\n")
    assert "distill export" in err(str(run_dir))
    assert "has no test/ split" in err(str(exported), "--data-root", str(rgb_folder / "train"))
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    (tmp_path / "flat" / "test").mkdir()
    for src in sorted((rgb_folder / "train" / "cat").iterdir())[:2]:
        (flat / src.name).write_bytes(src.read_bytes())
    assert "has no labels" in err(str(exported), "--data-root", str(tmp_path / "flat"))


def test_python_callers_are_told_the_setting_names_they_use_not_command_line_options(exported, rgb_folder, tmp_path):
    """The same checks as the CLI's (above), called from Python: the message names the FinetuneConfig field or the
    keyword (``fraction``, ``model``, ``overwrite=True``), never an option of a command the caller did not run."""
    def refused(kind, cfg, out=tmp_path / "o", **kw):
        with pytest.raises(kind) as e:
            finetune(cfg, str(out), progress=False, **kw)
        assert "--" not in str(e.value), str(e.value)
        return str(e.value)

    assert refused(ValueError, FinetuneConfig(model=str(exported), data_root=str(rgb_folder), fraction=1.5)) \
        .startswith("fraction 1.5 is outside (0, 1]")
    assert refused(ValueError, FinetuneConfig(model=str(exported), data_root=str(rgb_folder), steps=0)) \
        .startswith("steps must be an integer >= 1; got 0")
    assert refused(FileNotFoundError, FinetuneConfig(model=str(tmp_path / "none"))) \
        .startswith(f"model '{tmp_path / 'none'}' does not exist")
    done = tmp_path / "done"
    done.mkdir()
    (done / "result.json").write_text("{}")
    e = refused(FileExistsError, FinetuneConfig(model=str(exported), data_root=str(rgb_folder)), out=done)
    assert "pass overwrite=True to replace it or choose another output_dir" in e
    assert (done / "result.json").read_text() == "{}"


def test_a_model_path_where_the_settings_go_is_one_type_error_naming_the_fix(tmp_path):
    from distill.segment import SegmentConfig, segment_finetune

    with pytest.raises(TypeError, match=r"distill\.finetune\(\) takes a FinetuneConfig as its first argument; got "
                                        r"str 'runs/a/student'\. Fix: distill\.finetune\(FinetuneConfig\(model="):
        finetune("runs/a/student", str(tmp_path / "o"))
    with pytest.raises(TypeError, match=r"segment_finetune\(\) takes a SegmentConfig .* got FinetuneConfig"):
        segment_finetune(FinetuneConfig(model="timm:resnet18"), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- what a run may replace
def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def test_overwrite_refuses_a_result_json_finetune_did_not_write(exported, rgb_folder, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"accuracy": 0.9}))  # another tool's result
    (out / "model").mkdir()
    (out / "model" / "weights.pt").write_bytes(b"mine")
    before = _tree(out)
    with pytest.raises(FileExistsError, match="is not a distill finetune result .no label, fraction, seed"):
        finetune(_cfg(exported, rgb_folder), out, overwrite=True, progress=False)
    assert main(["finetune", str(exported), "--data-root", str(rgb_folder), "-o", str(out), "--overwrite",
                 "--no-progress"]) == 2
    assert "Nothing was deleted" in capsys.readouterr().err and _tree(out) == before


def test_save_model_refuses_a_model_folder_finetune_did_not_write(exported, rgb_folder, tmp_path):
    out = tmp_path / "o"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text(json.dumps({"architecture": "resnet10t"}))  # a user's own model
    before = _tree(out)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"model' is not a model saved by distill finetune .its "
                                                  r"pretrained_cfg tag is ''.*save_model=True would replace it"):
            finetune(_cfg(exported, rgb_folder, save_model=True), out, overwrite=overwrite, progress=False)
    assert _tree(out) == before


def test_overwrite_replaces_its_own_result_and_model_and_keeps_a_foreign_model(exported, rgb_folder, tmp_path):
    out = tmp_path / "o"
    finetune(_cfg(exported, rgb_folder, steps=1, eval_every=0, save_model=True), out, progress=False)
    # a hard link keeps the first file's inode in use, so the file system cannot hand it to the replacement
    os.link(out / "model" / "model.safetensors", tmp_path / "first.safetensors")
    first = (tmp_path / "first.safetensors").stat().st_ino
    finetune(_cfg(exported, rgb_folder, steps=1, eval_every=0, save_model=True), out, overwrite=True, progress=False)
    assert (out / "model" / "model.safetensors").stat().st_ino != first  # its own model: replaced
    shutil.rmtree(out / "model")
    (out / "model").mkdir()
    (out / "model" / "notes.txt").write_text("mine")
    finetune(_cfg(exported, rgb_folder, steps=1, eval_every=0), out, overwrite=True, progress=False)
    assert (out / "model" / "notes.txt").read_text() == "mine"  # not its own, not needed: left alone


# ----------------------------------------------------------------------------------------------- unreadable, unwritable
def test_a_truncated_export_exits_2_naming_the_file(exported, rgb_folder, tmp_path, capsys):
    bad = tmp_path / "student"
    shutil.copytree(exported, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:len(data) // 2])
    for arg in ([str(bad)], ["timm:resnet10t", "--like", str(bad)]):
        assert main(["finetune", *arg, "--data-root", str(rgb_folder), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"'{bad / 'model.safetensors'}' are truncated (" in err and "distill export" in err, err
        assert "Traceback" not in err
    (bad / "config.json").write_text('{"architecture": ')
    assert main(["finetune", str(bad), "--data-root", str(rgb_folder), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    assert f"MODEL config '{bad / 'config.json'}' is not valid JSON" in capsys.readouterr().err


def test_an_output_dir_under_a_file_exits_2_naming_the_file(exported, rgb_folder, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "ft"
    assert main(["finetune", str(exported), "--data-root", str(rgb_folder), "-o", str(out), "--steps", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"to '{out}" in err and "Not a directory" in err and "Traceback" not in err
    assert f"'{tmp_path / 'notes.txt'}' is a file, not a directory" in err and "Traceback" not in err


def test_disk_full_while_saving_the_model_exits_2_keeps_the_result_and_no_temporary(exported, rgb_folder, tmp_path,
                                                                         monkeypatch, capsys):
    def full(model, path, **kw):
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(timm.models, "save_for_hf", full)
    out = tmp_path / "o"
    assert main(["finetune", str(exported), "--data-root", str(rgb_folder), "-o", str(out), "--steps", "1",
                 "--eval-every", "0", "--save-model", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not write the fine-tuned model (about " in err and "the disk is full" in err
    assert not (out / "model").exists() and not list(out.glob(".tmp-*"))
    # the result was written before the model and is kept; it does not claim a saved model
    assert f"The result was written before the model and is kept: '{out / 'result.json'}'" in err
    r = json.loads((out / "result.json").read_text())
    assert r["last_top1"] >= 0 and "saved_model" not in r
