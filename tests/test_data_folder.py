"""Tests for distill.data.folder (and the decoding it shares with every file dataset): nested class folders, split
folders with val/ standing in for test/, unlabelled folders, a mix of image sizes and PIL modes in one batch, only
regular files listed (a FIFO named x.jpg), non-UTF-8 file names."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from distill.data import DatasetNotFoundError, ImageFolder, build_dataset, collate, dataset_mean_std

RNG = np.random.default_rng(0)


def _png(path: Path, h=8, w=8, value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8) if value is None else np.full((h, w, 3), value, np.uint8)
    Image.fromarray(a).save(path)
    return a


def test_nested_class_folders(tmp_path):
    for rel in ("animals/cat", "animals/dog", "vehicles/car", "vehicles/car/old"):
        for k in range(2):
            _png(tmp_path / rel / f"{k}.png")
    _png(tmp_path / "stray.png")  # beside class folders: left out
    ds = ImageFolder(str(tmp_path))
    assert ds.classes == ("animals/cat", "animals/dog", "vehicles/car", "vehicles/car/old")
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for (p, label) in ds.files:
        assert os.path.relpath(os.path.dirname(p), tmp_path) == ds.classes[label]
    flat = ImageFolder(str(tmp_path), labelled=False)  # labels optional: every image, recursively, label -1
    assert len(flat) == 9 and flat.classes == () and set(flat.labels.tolist()) == {-1}


def test_train_val_splits_and_val_for_test(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for c in ("a", "b"):
            for k in range(n):
                _png(tmp_path / split / c / f"{k}.png")
    tr = build_dataset("image-folder", str(tmp_path), "train")
    te = build_dataset("image-folder", str(tmp_path), "test")  # no test/: val/ is evaluated
    assert len(tr) == 6 and tr.classes == ("a", "b") and Path(tr.root).name == "train"
    assert len(te) == 4 and te.classes == ("a", "b") and Path(te.root).name == "val"
    (tmp_path / "only").mkdir()
    for k in range(2):
        _png(tmp_path / "only" / "train" / "a" / f"{k}.png")
    with pytest.raises(DatasetNotFoundError, match=r"\['train'\] but no 'test/'"):
        build_dataset("image-folder", str(tmp_path / "only"), "test")


def test_mixed_sizes_and_modes_stack_into_one_batch(tmp_path):
    root = tmp_path / "mix" / "c"
    _png(root / "00_first.png", 32, 32)
    _png(root / "01_wide.png", 40, 48)
    Image.fromarray(RNG.integers(0, 256, (13, 70), dtype=np.uint8)).save(root / "02_gray.png")
    Image.fromarray((RNG.random((50, 20)) * 65535).astype(np.uint16)).save(root / "03_16bit.png")
    Image.fromarray(RNG.integers(0, 256, (33, 33, 4), dtype=np.uint8), "RGBA").save(root / "04_rgba.png")
    Image.fromarray(RNG.integers(0, 256, (24, 31, 4), dtype=np.uint8), "CMYK").save(root / "05_cmyk.jpg")
    Image.fromarray(RNG.random((16, 16)).astype(np.float32), "F").save(root / "06_float.tif")
    Image.fromarray(RNG.integers(0, 2, (9, 12)).astype(bool)).save(root / "07_bits.png")
    Image.new("RGB", (600, 400), (10, 200, 30)).save(root / "08_big.jpg")
    ds = ImageFolder(str(tmp_path / "mix"))
    assert ds.size == (32, 32)  # the first image's size
    x, y = next(iter(DataLoader(ds, batch_size=len(ds), collate_fn=collate)))
    assert x.shape == (9, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == [0] * 9
    assert abs(x[3].float().mean().item() - 127.5) < 8  # the 16-bit image, scaled (not white)
    assert ds.num_skipped == 0
    mean, std = dataset_mean_std(ds)  # stacks the whole set: no size error
    assert len(mean) == 3
    sized = build_dataset("image-folder", str(tmp_path / "mix"), size=20, resize="squash")
    assert torch.stack([sized[i][0] for i in range(len(sized))]).shape == (9, 3, 20, 20)


def test_degenerate_image_is_skipped_naming_it(tmp_path, caplog):
    for k in range(3):
        _png(tmp_path / "c" / f"{k}.png", 16, 16)
    Image.new("RGB", (1, 1)).save(tmp_path / "c" / "1_thumb.png")
    ds = ImageFolder(str(tmp_path), min_side=8)
    names = [Path(p).name for p, _ in ds.files]
    i = names.index("1_thumb.png")
    img, _ = ds[i]  # replaced by the next readable image
    assert img.shape == (3, 16, 16) and ds.num_skipped == 1
    assert "1_thumb.png" in caplog.text and "1x1 px" in caplog.text
    strict = ImageFolder(str(tmp_path), min_side=8, on_error="raise")
    with pytest.raises(ValueError, match="1_thumb.png"):
        strict[i]


def test_named_pipe_is_not_listed(tmp_path):
    for k in range(2):
        _png(tmp_path / "c" / f"{k}.png")
    os.mkfifo(tmp_path / "c" / "x.jpg")
    out = []
    t = threading.Thread(target=lambda: out.append(ImageFolder(str(tmp_path))), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and out, "listing a folder with a named pipe blocked"
    ds = out[0]
    assert [Path(p).name for p, _ in ds.files] == ["0.png", "1.png"]
    assert torch.stack([ds[i][0] for i in range(len(ds))]).shape[0] == 2


def test_non_utf8_file_name(tmp_path):
    a = _png(tmp_path / "c" / "ok.png")
    raw = os.path.join(os.fsencode(tmp_path / "c"), b"\xff\xfe-caf\xe9.png")
    os.rename(tmp_path / "c" / "ok.png", raw)
    ds = ImageFolder(str(tmp_path))
    assert len(ds) == 1 and os.fsencode(ds.files[0][0]) == raw
    np.testing.assert_array_equal(ds[0][0].permute(1, 2, 0).numpy(), a)


def test_symlink_loops_are_skipped_with_a_warning_and_counted(tmp_path, caplog):
    """A symlink loop (a link to itself; a folder link back up the tree) is skipped with a warning naming it, in
    labelled and unlabelled listings; the dataset's left_out() says how many images were read and what was left out
    (regression: scandir's is_dir() raised ELOOP out of the listing and `distill train` crashed)."""
    for k in range(3):
        _png(tmp_path / "data" / "a" / f"{k}.png")
    os.symlink("self", tmp_path / "data" / "self")  # ELOOP on stat
    os.symlink("..", tmp_path / "data" / "a" / "up")  # a cycle: followed once
    with caplog.at_level("WARNING"):
        labelled = ImageFolder(str(tmp_path / "data"))
        flat = ImageFolder(str(tmp_path / "data"), labelled=False)
    assert [Path(p).name for p, _ in labelled.files] == ["0.png", "1.png", "2.png"] and labelled.classes == ("a",)
    assert len(flat) == 3
    assert f"'{tmp_path / 'data' / 'self'}' skipped: it cannot be followed" in caplog.text
    assert "symlink loop" in caplog.text
    assert flat.left_out().startswith("data: 3 images read; 1 file(s) left out: ")


def test_everything_is_read_leaves_nothing_out(tmp_path):
    _png(tmp_path / "c" / "0.png")
    assert ImageFolder(str(tmp_path)).left_out() == ""
