"""Tests for distill.data.hf: a Hugging Face dataset built offline in the test (Dataset.from_dict with Image and
ClassLabel features, saved with save_to_disk, and an imagefolder read by load_dataset), decoded by our decoder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from distill.data import DatasetNotFoundError, HFImages, build_dataset, data_fingerprint  # noqa: E402

RNG = np.random.default_rng(0)


def _files(tmp_path: Path, n: int):
    paths, arrays = [], []
    for k in range(n):
        a = RNG.integers(0, 256, (6 + k % 2, 8, 3), dtype=np.uint8)
        p = tmp_path / "src" / f"{k}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(p)
        paths.append(str(p))
        arrays.append(a)
    return paths, arrays


@pytest.fixture
def saved(tmp_path):
    paths, arrays = _files(tmp_path, 6)
    v16 = (RNG.random((6, 8)) * 65535).astype(np.uint16)
    Image.fromarray(v16).save(tmp_path / "src" / "g16.png")
    feats = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["cat", "dog"])})
    train = datasets.Dataset.from_dict({"img": paths[:4] + [str(tmp_path / "src" / "g16.png")],
                                        "y": [0, 1, 1, 0, 1]}, features=feats)
    val = datasets.Dataset.from_dict({"img": paths[4:], "y": [1, 0]}, features=feats)
    out = tmp_path / "hfds"
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(out))
    return out, arrays, v16


def test_save_to_disk_dataset(saved):
    out, arrays, v16 = saved
    tr = build_dataset("hf", str(out), "train", size=(6, 8))
    assert isinstance(tr, HFImages) and tr.classes == ("cat", "dog") and tr.labels.tolist() == [0, 1, 1, 0, 1]
    np.testing.assert_array_equal(tr[0][0].permute(1, 2, 0).numpy(), arrays[0])  # bytes in the Arrow file, decoded
    g = tr[4][0][0].numpy()  # the 16-bit image, scaled not clipped
    np.testing.assert_array_equal(g, np.rint(v16 * 255.0 / 65535).astype(np.uint8))
    te = build_dataset("hf", str(out), "test", size=(6, 8))  # no test split: validation
    assert len(te) == 2 and te.labels.tolist() == [1, 0] and te.split == "test"
    assert Path(tr.root) == out / "train" and Path(te.root) == out / "validation"  # splits are distinct sources
    np.testing.assert_array_equal(te[0][0].permute(1, 2, 0).numpy(), arrays[4])
    assert all(Path(f).suffix == ".arrow" for f in tr.input_files())


def test_a_dataset_dict_without_test_or_validation_is_never_evaluated_on_train(tmp_path):
    """Evaluation splits fall back test -> validation / val / valid, never to train (the training images)."""
    paths, _ = _files(tmp_path, 3)
    feats = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b"])})
    train = datasets.Dataset.from_dict({"img": paths, "y": [0, 1, 0]}, features=feats)
    datasets.DatasetDict({"train": train, "extra": train}).save_to_disk(str(tmp_path / "dd"))
    for split in ("test", "val"):
        with pytest.raises(DatasetNotFoundError, match=rf"has the splits \['extra', 'train'\] but no '{split}'"):
            build_dataset("hf", str(tmp_path / "dd"), split)
    assert len(build_dataset("hf", str(tmp_path / "dd"), "train")) == 3


def test_unlabelled_and_one_split(tmp_path):
    paths, arrays = _files(tmp_path, 3)
    ds = datasets.Dataset.from_dict({"image": paths}, features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "one"))
    h = build_dataset("hf", str(tmp_path / "one"), "train")
    assert h.labels.tolist() == [-1, -1, -1] and h.classes == () and h.size == (6, 8)
    with pytest.raises(DatasetNotFoundError, match="'train' only"):
        build_dataset("hf", str(tmp_path / "one"), "test")
    with pytest.raises(ValueError, match="no image column 'pic'"):
        HFImages(str(tmp_path / "one"), image_column="pic")


def test_load_dataset_imagefolder(tmp_path):
    for c in ("a", "b"):
        for k in range(2):
            p = tmp_path / "folder" / "train" / c / f"{k}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(RNG.integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(p)
    h = build_dataset("hf", str(tmp_path / "folder"), "train")  # datasets' imagefolder builder, offline
    assert len(h) == 4 and h.classes == ("a", "b") and sorted(h.labels.tolist()) == [0, 0, 1, 1]
    assert h[0][0].shape == (3, 5, 5)


def test_fingerprint_follows_the_arrow_files(saved):
    out, _, _ = saved
    tr = build_dataset("hf", str(out), "train")
    key = data_fingerprint(tr)
    assert data_fingerprint(build_dataset("hf", str(out), "train")) == key
    arrow = Path(tr.input_files()[0])
    data = bytearray(arrow.read_bytes())
    arrow.write_bytes(bytes(data))  # rewritten in place: new mtime
    assert data_fingerprint(build_dataset("hf", str(out), "train")) != key


def test_webdataset_tar_shards(tmp_path):
    """A folder of webdataset .tar shards (sample = NNNN.png + NNNN.cls) read through datasets' webdataset builder."""
    import io
    import tarfile

    want = []
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "train-0000.tar", "w") as t:
        for k in range(4):
            a = RNG.integers(0, 256, (5, 6, 3), dtype=np.uint8)
            want.append(a)
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            for name, data in ((f"{k:04d}.png", buf.getvalue()), (f"{k:04d}.cls", str(k % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    ds = build_dataset("hf", str(tmp_path / "wds"), "train")
    assert len(ds) == 4 and ds.labels.tolist() == [0, 1, 0, 1] and ds.label_column == "cls"
    for k in range(4):
        np.testing.assert_array_equal(ds[k][0].permute(1, 2, 0).numpy(), want[k])


def _shard(path: Path, n: int) -> None:
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as t:
        for k in range(n):
            buf = io.BytesIO()
            Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
            for name, data in ((f"{k:04d}.png", buf.getvalue()), (f"{k:04d}.cls", str(k % 3).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("cut", ["half", "inside a member"])
def test_truncated_webdataset_shard_is_named_and_the_shortfall_counted(tmp_path, caplog, cut):
    """datasets' webdataset reader stops silently where a shard is cut: 24 images written, 13 read with no word.
    The shard is named with the cause, the count read is said, and on_error='raise' refuses it."""
    import os

    shard = tmp_path / "wds" / "data-000.tar"
    _shard(shard, 24)
    size = os.path.getsize(shard)
    os.truncate(shard, size // 2 + (0 if cut == "half" else 700))
    if cut == "inside a member":  # datasets fails on it: the error names the shard, not only datasets' words
        with pytest.raises(ValueError, match=r"data-000.tar' is not a readable tar archive \(unexpected end"):
            build_dataset("hf", str(tmp_path / "wds"), "train")
        return
    with caplog.at_level("WARNING"):
        ds = build_dataset("hf", str(tmp_path / "wds"), "train")
    assert 0 < len(ds) < 24  # what datasets itself reads
    assert f"'{shard}' is cut short" in caplog.text and "copy or download that shard again" in caplog.text
    note = ds.left_out()
    assert note.startswith(f"data: {len(ds)} images read; 1 file(s) left out: webdataset shard '{shard}'"), note
    with pytest.raises(ValueError, match="data-000.tar' is cut short"):
        build_dataset("hf", str(tmp_path / "wds"), "train", on_error="raise")


def test_whole_shards_leave_nothing_out(tmp_path):
    from distill.data.hf import tar_problem

    _shard(tmp_path / "wds" / "data-000.tar", 5)
    _shard(tmp_path / "wds" / "data-001.tar", 3)
    ds = build_dataset("hf", str(tmp_path / "wds"), "train")
    assert len(ds) == 8 and ds.left_out() == ""
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    assert tar_problem(str(tmp_path / "junk.tar")).startswith("not a readable tar archive")
