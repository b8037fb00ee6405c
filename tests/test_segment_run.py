"""distill.segment.run and `distill finetune --task segmentation`: a model learns a synthetic shapes set well above
chance in tens of steps; a distilled run and its scratch baseline see the same images, masks and augmentation at
every step; the run's files; the output-directory safety; bad input exits 2 naming the file."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from safetensors.torch import load_file

from distill.cli import main
from distill.segment import SegmentConfig, evaluate_segmentation, segment_finetune
from distill.segment.data import collate_pairs, seg_data

from ._finetune import fake_export
from ._segment import IGNORE, NUM_CLASSES, write_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("seg") / "shapes", {"train": 24, "test": 8}, image_ext=".jpg")


def _cfg(model, root, **kw):
    base = dict(model=model, data_root=str(root), num_classes=NUM_CLASSES, ignore_index=IGNORE, steps=40,
                batch_size=8, lr=3e-3, warmup_steps=4, decoder_width=32, log_every=5, grid_images=2,
                eval_batch_size=8)
    base.update(kw)
    return SegmentConfig(**base)


def test_learns_synthetic_shapes_well_above_chance(shapes, tmp_path):
    r = segment_finetune(_cfg("timm:resnet10t", shapes), str(tmp_path / "run"), progress=False)
    # chance: every pixel background gives IoU ~0.8 for one class of three (mIoU ~27), pixel acc ~80
    masks = np.concatenate([np.array(Image.open(p)).ravel() for p in sorted((shapes / "testannot").glob("*.png"))])
    majority = 100 * (masks[masks != IGNORE] == 0).mean()
    assert r["last_miou"] > 60, r["per_class_iou"]
    assert r["last_pixel_acc"] > majority + 5
    assert r["test_images"] == 8 and r["train_images"] == 24 and r["steps"] == 40 and r["task"] == "segmentation"
    assert set(r["per_class_iou"]) == {"class0", "class1", "class2"}
    rows = list(csv.DictReader(open(tmp_path / "run" / "train_log.csv")))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert (tmp_path / "run" / "predictions.png").stat().st_size > 1000


def test_distilled_and_scratch_see_the_same_batches(shapes, tmp_path):
    export = fake_export(tmp_path / "student", arch="resnet10t")
    seen = {}
    for name, model, like in (("distilled", str(export), None), ("scratch", "timm:resnet10t", str(export))):
        batches = []
        segment_finetune(_cfg(model, shapes, like=like, steps=3, fraction=0.5, grid_images=0),
                         str(tmp_path / name), progress=False,
                         callback=lambda b: batches.append((b["inputs"].clone(), b["masks"].clone(), b["lr"])))
        seen[name] = batches
    for (xa, ma, la), (xb, mb, lb) in zip(seen["distilled"], seen["scratch"]):
        assert torch.equal(xa, xb) and torch.equal(ma, mb) and la == lb
    a = json.loads((tmp_path / "distilled" / "result.json").read_text())
    b = json.loads((tmp_path / "scratch" / "result.json").read_text())
    assert a["train_images"] == b["train_images"] == 12 and a["mean"] == b["mean"]
    assert (a["model_kind"], b["model_kind"]) == ("exported", "timm")


def test_one_seed_gives_the_same_run_dropout_included(shapes, tmp_path):
    """The decoder's dropout draws from the run's seed: the same command twice gives the same losses and weights,
    and the caller's global RNG is left as it was."""
    logs = []
    for name in ("a", "b"):
        torch.manual_seed(123)
        segment_finetune(_cfg("timm:resnet10t", shapes, steps=3, grid_images=0, save_model=True),
                         str(tmp_path / name), progress=False)
        logs.append((tmp_path / name / "train_log.csv").read_text().splitlines())
    strip = [[",".join(line.split(",")[:4]) for line in log] for log in logs]  # all but img/s
    assert strip[0] == strip[1]
    wa = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    segment_finetune(_cfg("timm:resnet10t", shapes, steps=1, grid_images=0), str(tmp_path / "c"), progress=False)
    assert torch.equal(torch.rand(4), expected)  # the global RNG continues as if nothing had run


def test_save_model_and_overwrite_safety(shapes, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg("timm:resnet10t", shapes, steps=2, save_model=True, grid_images=0)
    segment_finetune(cfg, str(out), progress=False)
    saved = load_file(str(out / "model" / "model.safetensors"))
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["segmentation"]["num_classes"] == NUM_CLASSES and "decoder.classifier.weight" in saved
    with pytest.raises(FileExistsError, match="pass overwrite=True to replace it"):
        segment_finetune(cfg, str(out), progress=False)
    segment_finetune(cfg, str(out), overwrite=True, progress=False)
    (out / "result.json").write_text('{"not": "ours"}')
    with pytest.raises(FileExistsError, match="not a distill finetune result"):
        segment_finetune(cfg, str(out), overwrite=True, progress=False)


def test_cli_sweep_writes_one_run_per_fraction_and_seed(shapes, tmp_path, capsys):
    rc = main(["finetune", "timm:resnet10t", "--task", "segmentation", "--data-root", str(shapes), "--num-classes",
               "3", "--ignore-index", "3", "--fractions", "0.25", "1.0", "--seeds", "0", "--steps", "2",
               "--batch-size", "4", "--grid-images", "0", "-o", str(tmp_path / "sweep"), "--no-progress"])
    assert rc == 0
    runs = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/result.json"))
    assert runs == ["frac0.25-seed0", "frac1-seed0"]
    r = json.loads((tmp_path / "sweep" / "frac0.25-seed0" / "result.json").read_text())
    assert r["train_images"] == 6 and r["steps"] == 2 and r["warmup_steps"] == 2  # segmentation's default 30, capped
    assert "test mIoU" in capsys.readouterr().out


@pytest.mark.parametrize("damage,expected", [
    ("colour", "colour-coded RGB"), ("ids", "holds class ids [7]"), ("size", "is 10x8 px but its image"),
    ("lonely", "has no mask"), ("ignore", "--ignore-index 1 is a class id")])
def test_cli_bad_input_exits_2_naming_the_file(tmp_path, capsys, damage, expected):
    root = write_shapes(tmp_path / "bad", {"train": 3, "test": 2})
    mask = root / "trainannot" / "im001.png"
    ignore = "3"
    if damage == "colour":
        Image.fromarray(np.dstack([np.full((32, 40), v, np.uint8) for v in (0, 1, 2)])).save(mask)
    elif damage == "ids":
        Image.fromarray(np.full((32, 40), 7, np.uint8)).save(mask)
    elif damage == "size":
        Image.fromarray(np.zeros((8, 10), np.uint8)).save(mask)
    elif damage == "lonely":
        mask.unlink()
    else:
        ignore = "1"
    rc = main(["finetune", "timm:resnet10t", "--task", "segmentation", "--data-root", str(root), "--num-classes", "3",
               "--ignore-index", ignore, "--steps", "1", "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err
    if damage != "ignore":
        assert "im001" in err and "Fix" in err
    assert not (tmp_path / "out").exists()


def test_cli_keeps_a_typed_value_equal_to_the_classification_default(shapes, tmp_path):
    """--batch-size 64 / --warmup-steps 50 are classification's defaults; typed with --task segmentation they are
    kept, not replaced by segmentation's (16 / 30); options segmentation does not use are refused (exit 2)."""
    out = tmp_path / "seg"
    assert main(["finetune", "timm:resnet10t", "--task", "segmentation", "--data-root", str(shapes), "--num-classes",
                 str(NUM_CLASSES), "--ignore-index", str(IGNORE), "--steps", "1", "--batch-size", "64",
                 "--warmup-steps", "50", "--grid-images", "0", "-o", str(out), "--no-progress"]) == 0
    r = json.loads((out / "result.json").read_text())
    assert (r["batch_size"], r["steps"]) == (64, 1)
    for extra in (["--layer-decay", "0.5"], ["--backbone-lr-mult", "0.1"], ["--eval-train"]):
        assert main(["finetune", "timm:resnet10t", "--task", "segmentation", "--data-root", str(shapes), *extra,
                     "-o", str(tmp_path / "x"), "--no-progress"]) == 2
        assert not (tmp_path / "x").exists()


def test_mixed_sizes_train_and_every_test_pixel_is_scored_at_its_own_size(tmp_path):
    """VOC as downloaded with portrait and landscape photos and one test image of another size: with --size the run
    trains (crops / pads to one size), evaluates each image at its own resized size (every valid pixel counted once)
    and keeps result.json and model/; the test split falls back to val and the result says so."""
    from distill.data.masks import resize_mask
    from distill.data.seglayouts import split_pairs

    from ._segment import write_voc

    devkit = write_voc(tmp_path, {"train": [(30, 40), (40, 30), (30, 40), (36, 36)],
                                  "val": [(30, 40), (40, 30), (50, 20)]})
    out = tmp_path / "run"
    rc = main(["finetune", "timm:resnet10t", "--task", "segmentation", "--layout", "voc", "--data-root", str(devkit),
               "--size", "24", "--steps", "2", "--batch-size", "2", "--eval-batch-size", "2", "--decoder-width", "8",
               "--grid-images", "3", "--save-model", "-o", str(out), "--no-progress"])
    assert rc == 0
    r = json.loads((out / "result.json").read_text())
    assert r["eval_split"] == "val" and r["test_images"] == 3 and r["num_classes"] == 21 and r["ignore_index"] == 255
    assert r["input_size"] == [24, 32] and (out / "model" / "model.safetensors").is_file()
    assert r["history"][-1]["step"] == 2 and len(r["per_class_iou"]) == 21
    # the evaluation the run does, on a model that predicts class 0 everywhere: every valid pixel counted once
    data = seg_data(str(devkit), "voc", 1.0, 0, None, None, size=24)
    loader = DataLoader(data.test, batch_sampler=data.eval_batches(2), collate_fn=collate_pairs)
    zero = torch.nn.Conv2d(3, 21, 1)
    torch.nn.init.zeros_(zero.weight)
    with torch.no_grad():
        zero.bias.copy_(torch.arange(21, 0, -1).float())
    m = evaluate_segmentation(zero, loader, 21, 255, 24)
    expected, background = 0, 0
    for _, mp in split_pairs(devkit, "val", "voc"):
        mask = torch.from_numpy(np.array(Image.open(mp)))
        h, w = mask.shape
        small = resize_mask(mask, (24, max(1, round(w * 24 / h))))
        expected += int((small != 255).sum())
        background += int((small == 0).sum())
    assert m["images"] == 3 and m["pixels"] == expected and m["pixel_acc"] == pytest.approx(100 * background / expected,
                                                                                           abs=0.01)


def test_binary_jpeg_masks_with_a_threshold(tmp_path, capsys):
    """A figure/ground set whose masks are JPEGs: refused without --mask-threshold (naming the file and the fix),
    trained with it (2 classes)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (tmp_path / "fg" / split / "images").mkdir(parents=True)
        (tmp_path / "fg" / split / "masks").mkdir(parents=True)
        for i in range(3):
            h, w = (30, 40) if i % 2 else (40, 30)
            m = np.zeros((h, w), np.uint8)
            m[h // 4:3 * h // 4, w // 4:3 * w // 4] = 255
            img = np.clip(m[..., None] * 0.6 + rng.integers(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "fg" / split / "images" / f"horse{i:03d}.jpg")
            Image.fromarray(m).save(tmp_path / "fg" / split / "masks" / f"horse{i:03d}.jpg", quality=80)
    args = ["finetune", "timm:resnet10t", "--task", "segmentation", "--layout", "images-masks", "--data-root",
            str(tmp_path / "fg"), "--size", "24", "--steps", "2", "--batch-size", "2", "--grid-images", "0",
            "--no-progress"]
    assert main(args + ["--num-classes", "2", "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "horse000.jpg' is a JPEG mask" in err and "--mask-threshold 128" in err and not (tmp_path / "a").exists()
    assert main(args + ["--mask-threshold", "128", "-o", str(tmp_path / "b")]) == 0
    r = json.loads((tmp_path / "b" / "result.json").read_text())
    assert r["num_classes"] == 2 and r["ignore_index"] == 255 and r["test_images"] == 3
