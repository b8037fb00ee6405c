"""Tests for distill.data.filelist: CSV file lists (header or not, relative and absolute paths, integer, named or no
labels), split CSVs, and the errors that name the line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.data import DatasetNotFoundError, FileList, build_dataset, read_file_list

RNG = np.random.default_rng(0)


def _img(path: Path, h=6, w=5):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return a


def test_named_labels_relative_and_absolute_paths(tmp_path):
    a, b, c = _img(tmp_path / "imgs" / "a.png"), _img(tmp_path / "imgs" / "b, c.png"), _img(tmp_path / "far" / "c.png")
    (tmp_path / "list.csv").write_text(f'path,label\nimgs/a.png,zebra\n"imgs/b, c.png",apple\n{tmp_path / "far" / "c.png"},zebra\n')
    ds = FileList(str(tmp_path / "list.csv"))
    assert ds.classes == ("apple", "zebra") and ds.labels.tolist() == [1, 0, 1]
    for i, want in enumerate((a, b, c)):
        img, label = ds[i]
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), want)
    assert ds.input_files()[0] == str(tmp_path / "list.csv") and len(ds.input_files()) == 4


def test_integer_labels_and_unlabelled(tmp_path):
    for k in range(3):
        _img(tmp_path / f"{k}.png", 4 + k, 7)  # three sizes: brought to the first one's
    (tmp_path / "int.csv").write_text("0.png,3\n1.png,0\n2.png,3\n")
    ds = FileList(str(tmp_path / "int.csv"))
    assert ds.classes == () and ds.labels.tolist() == [3, 0, 3]
    assert {tuple(ds[i][0].shape) for i in range(3)} == {(3, 4, 7)}
    (tmp_path / "none.csv").write_text("0.png\n1.png\n")
    assert FileList(str(tmp_path / "none.csv")).labels.tolist() == [-1, -1]


@pytest.mark.parametrize("text, match", [("a.png,1,2\n", "line 1"), ("a.png,1\nb.png,cat\n", "mixes integer and named"),
                                         ("path,label\n", "lists no image")])
def test_bad_lists_are_named(tmp_path, text, match):
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises((ValueError, DatasetNotFoundError), match=match) as e:
        read_file_list(str(tmp_path / "l.csv"))
    assert "l.csv" in str(e.value)


def test_split_csvs(tmp_path):
    for k in range(4):
        _img(tmp_path / f"{k}.png")
    (tmp_path / "train.csv").write_text("0.png,a\n1.png,b\n2.png,a\n")
    (tmp_path / "val.csv").write_text("3.png,b\n")
    assert len(build_dataset("file-list", str(tmp_path), "train")) == 3
    te = build_dataset("file-list", str(tmp_path), "test")  # no test.csv: val.csv
    assert len(te) == 1 and te.csv.endswith("val.csv")
    assert te.root != build_dataset("file-list", str(tmp_path), "train").root  # fine-tuning tells the splits apart
    (tmp_path / "sub").mkdir()
    with pytest.raises(DatasetNotFoundError, match="holds no train.csv"):
        build_dataset("file-list", str(tmp_path / "sub"), "train")
