"""Tests for distill.data.fingerprint: every input file is part of the key (an in-place edit of image 65 of 130
changes it), stat vs content modes, order, subsets, non-UTF-8 names."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import Subset

from distill.data import FileList, ImageFolder, data_fingerprint, file_record

RNG = np.random.default_rng(0)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for k in range(130):
        p = root / ("a" if k < 65 else "b") / f"{k:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(p)
    return root


def _edit_in_place(path: Path, keep_stat: bool = False):
    """New pixels, same byte length (an uncompressed BMP-like payload would also do: PNG size is checked)."""
    st = os.stat(path)
    a = np.asarray(Image.open(path)).copy()
    for value in range(256):
        b = a.copy()
        b[0, 0, 0] = value
        if value == a[0, 0, 0]:
            continue
        Image.fromarray(b).save(path)
        if os.path.getsize(path) == st.st_size:
            break
    assert os.path.getsize(path) == st.st_size, "could not keep the size"
    if keep_stat:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_editing_image_65_of_130_changes_the_key(folder):
    ds = ImageFolder(str(folder))
    assert len(ds) == 130
    key = data_fingerprint(ds)
    assert data_fingerprint(ImageFolder(str(folder))) == key  # deterministic
    _edit_in_place(Path(ds.files[64][0]))  # the 65th image, in the middle, same size: only its mtime moves
    assert data_fingerprint(ImageFolder(str(folder))) != key


def test_content_mode_catches_an_edit_that_keeps_size_and_mtime(folder):
    ds = ImageFolder(str(folder))
    stat_key, content_key = data_fingerprint(ds, "stat"), data_fingerprint(ds, "content")
    assert stat_key != content_key
    _edit_in_place(Path(ds.files[64][0]), keep_stat=True)
    ds2 = ImageFolder(str(folder))
    assert data_fingerprint(ds2, "stat") == stat_key  # documented: stat mode cannot see it
    assert data_fingerprint(ds2, "content") != content_key
    os.utime(ds2.files[3][0])  # touched, content unchanged
    assert data_fingerprint(ImageFolder(str(folder)), "content") == data_fingerprint(ds2, "content")
    with pytest.raises(ValueError, match="'md5'.*stat, content"):
        data_fingerprint(ds, "md5")


def test_rename_subset_and_decode_settings_change_the_key(folder):
    ds = ImageFolder(str(folder))
    key = data_fingerprint(ds)
    assert data_fingerprint(Subset(ds, range(10))) != data_fingerprint(Subset(ds, range(1, 11)))
    assert data_fingerprint(ImageFolder(str(folder), size=8)) != key
    os.rename(ds.files[0][0], ds.files[0][0].replace("000.png", "000x.png"))
    assert data_fingerprint(ImageFolder(str(folder))) != key


def test_file_list_covers_the_csv_and_non_utf8_names(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"\xe9t\xe9.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(os.fsdecode(raw), format="PNG")
    (tmp_path / "l.csv").write_bytes(b"\xe9t\xe9.png,1\n")
    ds = FileList(str(tmp_path / "l.csv"))
    key = data_fingerprint(ds)
    assert file_record(ds.files[0][0], str(tmp_path)).startswith(b"\xe9t\xe9.png\0")
    (tmp_path / "l.csv").write_bytes(b"\xe9t\xe9.png,2\n")
    assert data_fingerprint(FileList(str(tmp_path / "l.csv"))) != key
