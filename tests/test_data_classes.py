"""Class names -> labels across splits (distill.data.classes, build_dataset(..., classes=)): a split built with the
training split's class list numbers its images by NAME, for image folders, CSV file lists and Hugging Face datasets
built here. A class the test split lacks is named in a warning and shifts nothing; a class the training split lacks
is an error naming it and the fix."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from distill.data import build_dataset
from distill.data.classes import class_index


def image_folder(root, splits: dict) -> None:
    """``root/<split>/<class>/<i>.png`` for ``splits = {split: {class: n}}``; class k's images have channel k%3 at
    255 (so probes can tell them apart), the rest noise."""
    rng = np.random.default_rng(0)
    colour = {}
    for split, classes in splits.items():
        for name, n in classes.items():
            c = colour.setdefault(name, len(colour) % 3)
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 120, (16, 16, 3), dtype=np.uint8)
                arr[..., c] = 255
                Image.fromarray(arr).save(d / f"{i}.png")


def _by_class(ds) -> dict:
    """``{class folder name: set of labels of its images}``."""
    out: dict = {}
    for path, label in ds.files:
        out.setdefault(path.replace("\\", "/").split("/")[-2], set()).add(label)
    return out


def test_image_folder_test_split_missing_a_class_keeps_the_training_numbering(tmp_path, caplog):
    image_folder(tmp_path, {"train": {"cat": 2, "dog": 2, "ship": 2}, "test": {"dog": 2, "ship": 2}})
    train = build_dataset("image-folder", str(tmp_path), "train")
    alone = build_dataset("image-folder", str(tmp_path), "test")
    assert _by_class(alone) == {"dog": {0}, "ship": {1}}  # numbered on its own: by position, shifted
    with caplog.at_level(logging.WARNING, logger="distill.data"):
        test = build_dataset("image-folder", str(tmp_path), "test", classes=train.classes)
    assert _by_class(test) == {"dog": {1}, "ship": {2}}  # by name: the training split's labels
    assert test.labels.tolist() == [1, 1, 2, 2] and test.classes == ("cat", "dog", "ship")
    assert "has no images of class(es) 'cat'" in caplog.text and "not scored" in caplog.text


def test_image_folder_test_class_unknown_to_training_is_an_error_naming_it(tmp_path):
    image_folder(tmp_path, {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1, "horse": 1}})
    train = build_dataset("image-folder", str(tmp_path), "train")
    with pytest.raises(ValueError) as e:
        build_dataset("image-folder", str(tmp_path), "test", classes=train.classes)
    msg = str(e.value)
    assert "'horse'" in msg and "the training split lacks" in msg and "'cat', 'dog'" in msg and "Fix:" in msg
    assert str(tmp_path / "test") in msg


def test_file_list_named_labels_paired_by_name(tmp_path):
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(tmp_path / name)
    (tmp_path / "train.csv").write_text("a.png,cat\nb.png,dog\nc.png,ship\n")
    (tmp_path / "test.csv").write_text("b.png,dog\nc.png,ship\n")
    train = build_dataset("file-list", str(tmp_path), "train")
    test = build_dataset("file-list", str(tmp_path), "test", classes=train.classes)
    assert build_dataset("file-list", str(tmp_path), "test").labels.tolist() == [0, 1]  # on its own
    assert test.labels.tolist() == [1, 2] and test.classes == train.classes
    (tmp_path / "test.csv").write_text("b.png,1\n")
    with pytest.raises(ValueError, match="integer labels but the training split names its classes"):
        build_dataset("file-list", str(tmp_path), "test", classes=train.classes)


def test_hf_split_with_other_class_label_is_renumbered_by_name(tmp_path):
    datasets = pytest.importorskip("datasets")
    paths = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(p)
        paths.append(str(p))
    tr = datasets.Dataset.from_dict({"img": paths[:3], "y": [0, 1, 2]}, features=datasets.Features(
        {"img": datasets.Image(), "y": datasets.ClassLabel(names=["cat", "dog", "ship"])}))
    te = datasets.Dataset.from_dict({"img": paths[3:] * 2, "y": [0, 1]}, features=datasets.Features(
        {"img": datasets.Image(), "y": datasets.ClassLabel(names=["dog", "ship"])}))  # cat left out of the labels
    datasets.DatasetDict({"train": tr, "test": te}).save_to_disk(str(tmp_path / "hf"))
    train = build_dataset("hf", str(tmp_path / "hf"), "train")
    test = build_dataset("hf", str(tmp_path / "hf"), "test", classes=train.classes)
    assert test.labels.tolist() == [1, 2] and test.classes == ("cat", "dog", "ship")


def test_class_index_alone():
    assert class_index(["b", "a"], None, "x") == ({"a": 0, "b": 1}, ("a", "b"))
    assert class_index(["c"], ("a", "b", "c"), "x") == ({"c": 2}, ("a", "b", "c"))
    with pytest.raises(ValueError, match="x holds class"):
        class_index(["d"], ("a", "b"), "x")
