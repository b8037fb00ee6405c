"""Tests for distill.data: IDX reading, Fashion-MNIST, image folders, subsets, batching and input conversions.

Most tests build tiny IDX files / image folders in ``tmp_path``; one test reads the installed Fashion-MNIST.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from distill.data import (
    DATASETS,
    DatasetNotFoundError,
    FashionMNIST,
    ImageFolder,
    build_dataset,
    collate,
    dataset_labels,
    dataset_mean_std,
    label_subset,
    read_idx,
    stratified_indices,
    to_student,
    to_teacher,
    to_unit,
)

torch.set_num_threads(1)

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------------------------------- helpers

def idx_bytes(arr: np.ndarray) -> bytes:
    """An unsigned-byte IDX file written from the format's definition, independently of read_idx."""
    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes(order="C")


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_fmnist(root: Path, n_train: int = 7, n_test: int = 5, gz=(True, False, True, False), seed: int = 0):
    """The four Fashion-MNIST IDX files with random content; ``gz`` picks gzipped or plain per file."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for name, n, is_img, z in zip(names, (n_train, n_train, n_test, n_test), (True, False, True, False), gz):
        arr = rng.integers(0, 256, (n, 28, 28)) if is_img else rng.integers(0, 10, (n,))
        write_idx(root / name, arr, z)
        data[name] = arr.astype(np.uint8)
    return data


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def rand_rgb(rng, h=6, w=5):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------- read_idx

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 3)])
def test_read_idx_round_trip(tmp_path, gz, shape):
    arr = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    path = write_idx(tmp_path / "f-idx-ubyte", arr, gz)
    out = read_idx(path)
    assert out.dtype == np.uint8
    assert out.shape == shape
    np.testing.assert_array_equal(out, arr)


def test_read_idx_truncated_data_names_file_and_sizes(tmp_path):
    data = idx_bytes(np.zeros((2, 3, 3), np.uint8))[:-8]  # header says 18 bytes, 10 remain
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="truncated") as e:
        read_idx(path)
    msg = str(e.value)
    assert str(path) in msg and "18" in msg and "10" in msg


def test_read_idx_truncated_gz_data(tmp_path):
    data = idx_bytes(np.zeros((4, 5), np.uint8))[:-1]
    path = tmp_path / "short-idx2-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_read_idx_truncated_header_is_a_clear_value_error(tmp_path):
    # magic says 3 dims (12 header bytes), but only 2 bytes of dims are there: a download cut short.
    path = tmp_path / "cut-idx3-ubyte"
    path.write_bytes(struct.pack(">BBBB", 0, 0, 8, 3) + b"\x00\x00")
    with pytest.raises(ValueError) as e:
        read_idx(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("magic", [b"\x00\x00\x0d\x01", b"\x01\x00\x08\x01", b"PK\x03\x04", b"\x00"])
def test_read_idx_rejects_wrong_magic(tmp_path, magic):
    path = tmp_path / "bad-idx"
    path.write_bytes(magic + b"\x00\x00\x00\x01\x07")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(path)


# --------------------------------------------------------------------------------------------------- FashionMNIST

@pytest.mark.parametrize("gz", [(True, False, True, False), (False, True, False, True), (True,) * 4, (False,) * 4])
def test_fashion_mnist_from_tiny_idx_files(tmp_path, gz):
    data = write_fmnist(tmp_path / "fm", gz=gz)
    for split, (img_name, lab_name) in {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                                         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}.items():
        ds = FashionMNIST(str(tmp_path / "fm"), split)
        assert len(ds) == len(data[img_name])
        for i in range(len(ds)):
            img, label = ds[i]
            assert img.dtype == torch.uint8 and tuple(img.shape) == (1, 28, 28)
            np.testing.assert_array_equal(img[0].numpy(), data[img_name][i])
            assert isinstance(label, int) and label == int(data[lab_name][i])
        assert ds.labels.dtype == torch.int64
        np.testing.assert_array_equal(ds.labels.numpy(), data[lab_name].astype(np.int64))
        assert ds.classes[0] == "t-shirt/top" and len(ds.classes) == 10


def test_fashion_mnist_invalid_split(tmp_path):
    write_fmnist(tmp_path / "fm")
    with pytest.raises(ValueError, match="'val'") as e:
        FashionMNIST(str(tmp_path / "fm"), "val")
    assert "test" in str(e.value) and "train" in str(e.value)


def _check_install_hint(msg: str, root) -> None:
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "data_root" in msg
    assert str(root) in msg


def test_fashion_mnist_missing_dir_tells_how_to_install(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as e:
        FashionMNIST(str(root), "train")
    _check_install_hint(str(e.value), root)
    assert isinstance(e.value, FileNotFoundError)


def test_fashion_mnist_missing_file_tells_how_to_install(tmp_path):
    root = tmp_path / "fm"
    write_fmnist(root)
    next(root.glob("t10k-labels*")).unlink()
    FashionMNIST(str(root), "train")  # the train split is complete
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte") as e:
        FashionMNIST(str(root), "test")
    _check_install_hint(str(e.value), root)


def test_fashion_mnist_image_label_count_mismatch(tmp_path):
    root = tmp_path / "fm"
    write_fmnist(root, gz=(False,) * 4)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), gz=False)  # 7 images, 3 labels
    with pytest.raises(ValueError, match="7 images but 3 labels"):
        FashionMNIST(str(root), "train")


def test_real_fashion_mnist_test_split():
    ds = FashionMNIST(None, "test")  # the default directory of the Debian package
    assert str(ds.root) == FMNIST_DIR
    assert len(ds) == 10_000
    img, label = ds[0]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (1, 28, 28)
    assert 0 <= label < 10
    # The published test split has exactly 1000 images per class.
    assert torch.bincount(ds.labels, minlength=10).tolist() == [1000] * 10


# --------------------------------------------------------------------------------------------------- ImageFolder

def test_image_folder_class_labels_sorted_by_name(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {}
    for cls in ("zebra", "apple", "mango"):
        for k in range(2):
            arr = rand_rgb(rng)
            save_png(tmp_path / "root" / cls / f"{k}.png", arr)
            imgs[(cls, k)] = arr
    (tmp_path / "root" / "apple" / "notes.txt").write_text("not an image")
    ds = ImageFolder(str(tmp_path / "root"))
    assert ds.classes == ("apple", "mango", "zebra")
    assert len(ds) == 6
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    seen = []
    for i in range(len(ds)):
        img, label = ds[i]
        cls = ds.classes[label]
        k = int(Path(ds.files[i][0]).stem)
        assert Path(ds.files[i][0]).parent.name == cls
        assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 6, 5)
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), imgs[(cls, k)])
        seen.append((cls, k))
    assert sorted(seen) == sorted(imgs)
    assert ds.num_skipped == 0


def test_image_folder_flat_has_label_minus_one(tmp_path):
    rng = np.random.default_rng(1)
    for k in range(3):
        save_png(tmp_path / "flat" / f"{k}.png", rand_rgb(rng))
    ds = ImageFolder(str(tmp_path / "flat"))
    assert ds.classes == ()
    assert len(ds) == 3
    assert ds.labels.tolist() == [-1, -1, -1]
    assert all(ds[i][1] == -1 for i in range(3))


def test_image_folder_grayscale_png_in_rgb_dataset(tmp_path):
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (7, 4), dtype=np.uint8)
    save_png(tmp_path / "d" / "a" / "g.png", gray)  # mode 'L'
    save_png(tmp_path / "d" / "a" / "rgb.png", rand_rgb(rng, 7, 4))
    assert Image.open(tmp_path / "d" / "a" / "g.png").mode == "L"
    ds = ImageFolder(str(tmp_path / "d"), channels=3)
    i = [Path(p).name for p, _ in ds.files].index("g.png")
    img, _ = ds[i]
    assert tuple(img.shape) == (3, 7, 4)
    for c in range(3):
        np.testing.assert_array_equal(img[c].numpy(), gray)


def test_image_folder_one_channel_uses_luma(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    save_png(tmp_path / "d" / "x.png", rgb)
    img, _ = ImageFolder(str(tmp_path / "d"), channels=1)[0]
    assert tuple(img.shape) == (1, 5, 6)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(img[0].numpy().astype(np.float64) - luma).max() <= 1.0


def _folder_with_corrupt_jpg(root: Path):
    rng = np.random.default_rng(4)
    good = {}
    for name in ("a.png", "c.png"):
        good[name] = rand_rgb(rng)
        save_png(root / "cls" / name, good[name])
    (root / "cls" / "b.jpg").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    return good


def test_image_folder_corrupt_file_skipped_and_counted(tmp_path):
    good = _folder_with_corrupt_jpg(tmp_path / "d")
    ds = ImageFolder(str(tmp_path / "d"), on_error="skip")
    names = [Path(p).name for p, _ in ds.files]
    assert names == ["a.png", "b.jpg", "c.png"]  # the broken file is listed, found only when read
    img0, _ = ds[0]
    np.testing.assert_array_equal(img0.permute(1, 2, 0).numpy(), good["a.png"])
    assert ds.num_skipped == 0
    img1, label1 = ds[1]  # b.jpg is unreadable: replaced by the next readable file
    np.testing.assert_array_equal(img1.permute(1, 2, 0).numpy(), good["c.png"])
    assert label1 == 0
    assert ds.num_skipped == 1
    ds[2]
    assert ds.num_skipped == 1


def test_image_folder_corrupt_file_raises_naming_it(tmp_path):
    _folder_with_corrupt_jpg(tmp_path / "d")
    ds = ImageFolder(str(tmp_path / "d"), on_error="raise")
    ds[0]
    with pytest.raises(ValueError, match="b.jpg"):
        ds[1]
    assert ds.num_skipped == 0


def test_image_folder_empty_class_folder_keeps_label(tmp_path):
    rng = np.random.default_rng(5)
    save_png(tmp_path / "d" / "a" / "0.png", rand_rgb(rng))
    (tmp_path / "d" / "b").mkdir()  # no images
    save_png(tmp_path / "d" / "c" / "0.png", rand_rgb(rng))
    ds = ImageFolder(str(tmp_path / "d"))
    assert ds.classes == ("a", "b", "c")
    assert ds.labels.tolist() == [0, 2]
    assert [ds[i][1] for i in range(len(ds))] == [0, 2]


def test_image_folder_missing_dir_says_where_to_get_cifar10_and_its_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        ImageFolder(str(tmp_path / "nope"))
    # it pointed at ../shared/data/cifar10-jpg.tar.gz, which exists only in the developers' checkout
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in str(e.value) and "../shared" not in str(e.value)
    assert "cifar10-jpg/{train,test}/<class>/" in str(e.value)
    assert str(tmp_path / "nope") in str(e.value)


def test_image_folder_without_images(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.txt").write_text("x")
    with pytest.raises(DatasetNotFoundError, match="no images"):
        ImageFolder(str(tmp_path / "d"))


@pytest.mark.parametrize("kwargs, word", [({"channels": 2}, "channels=2"), ({"on_error": "ignore"}, "'ignore'")])
def test_image_folder_bad_arguments(tmp_path, kwargs, word):
    save_png(tmp_path / "d" / "x.png", rand_rgb(np.random.default_rng(0)))
    with pytest.raises(ValueError) as e:
        ImageFolder(str(tmp_path / "d"), **kwargs)
    assert word in str(e.value)


# --------------------------------------------------------------------------------------------------- build_dataset

def test_build_dataset_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        build_dataset("cifar-100")
    msg = str(e.value)
    assert "'cifar-100'" in msg
    for name in DATASETS:
        assert name in msg
    assert set(DATASETS) == {"fashion-mnist", "image-folder", "file-list", "hf"}


def test_build_dataset_fashion_mnist_root_and_split(tmp_path):
    data = write_fmnist(tmp_path / "fm", n_train=4, n_test=3)
    ds = build_dataset("fashion-mnist", str(tmp_path / "fm"), "test")
    assert isinstance(ds, FashionMNIST) and len(ds) == 3
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), data["t10k-images-idx3-ubyte"])


def test_build_dataset_image_folder_picks_split_subfolder(tmp_path):
    rng = np.random.default_rng(6)
    for split, n in (("train", 3), ("test", 2)):
        for k in range(n):
            save_png(tmp_path / "r" / split / "cls" / f"{k}.png", rand_rgb(rng))
    tr = build_dataset("image-folder", str(tmp_path / "r"), "train")
    te = build_dataset("image-folder", str(tmp_path / "r"), "test", channels=1)
    assert isinstance(tr, ImageFolder) and len(tr) == 3 and tr.classes == ("cls",)
    assert len(te) == 2 and te[0][0].shape[0] == 1
    # A folder without split subfolders is the split itself.
    direct = build_dataset("image-folder", str(tmp_path / "r" / "test"), "train")
    assert len(direct) == 2


def test_build_dataset_image_folder_needs_root():
    with pytest.raises(ValueError, match="data_root"):
        build_dataset("image-folder", None)


# --------------------------------------------------------------------------------------------------- subsets

class LabelledDS(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.labels = torch.as_tensor(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.full((1, 2, 2), i % 256, dtype=torch.uint8), int(self.labels[i])


def make_labels(counts, seed=0):
    labels = torch.cat([torch.full((n,), c) for c, n in counts.items()])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


COUNTS = {0: 40, 1: 17, 3: 3, 7: 1, 9: 26}


@pytest.mark.parametrize("fraction", [0.3, 0.1, 0.55, 1.0])
def test_stratified_indices_per_class_counts(fraction):
    labels = make_labels(COUNTS)
    idx = stratified_indices(labels, fraction, seed=0)
    assert idx.tolist() == sorted(set(idx.tolist()))  # sorted, no duplicates
    assert 0 <= int(idx.min()) and int(idx.max()) < len(labels)
    got = {c: int((labels[idx] == c).sum()) for c in COUNTS}
    expected = {c: max(1, round(fraction * n)) for c, n in COUNTS.items()}
    assert got == expected


def test_stratified_indices_examples_by_hand():
    labels = make_labels(COUNTS)
    got = torch.bincount(labels[stratified_indices(labels, 0.3, seed=1)], minlength=10).tolist()
    # 0.3 * (40, 17, 3, 1, 26) = (12, 5.1, 0.9, 0.3, 7.8) -> (12, 5, 1, 1, 8)
    assert got == [12, 5, 0, 1, 0, 0, 0, 1, 0, 8]


def test_stratified_indices_fraction_one_is_everything():
    labels = make_labels(COUNTS)
    assert stratified_indices(labels, 1.0).tolist() == list(range(len(labels)))


def test_stratified_indices_seeded():
    labels = make_labels(COUNTS)
    a = stratified_indices(labels, 0.25, seed=3)
    b = stratified_indices(labels.tolist(), 0.25, seed=3)  # a plain list works too
    c = stratified_indices(labels, 0.25, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(torch.bincount(labels[a]), torch.bincount(labels[c]))


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, 2])
def test_stratified_indices_fraction_out_of_range(fraction):
    with pytest.raises(ValueError) as e:
        stratified_indices(make_labels(COUNTS), fraction)
    assert repr(fraction) in str(e.value)
    assert "(0, 1]" in str(e.value)


def test_stratified_indices_rejects_unlabelled():
    with pytest.raises(ValueError, match="-1"):
        stratified_indices(torch.tensor([0, 1, -1, 1]), 0.5)


def test_label_subset_fraction_one_returns_dataset_itself():
    ds = LabelledDS(make_labels(COUNTS))
    assert label_subset(ds, 1.0) is ds
    assert label_subset(ds, 1) is ds


def test_label_subset_matches_stratified_indices():
    labels = make_labels(COUNTS)
    ds = LabelledDS(labels)
    sub = label_subset(ds, 0.2, seed=5)
    assert isinstance(sub, Subset) and sub.dataset is ds
    assert list(sub.indices) == stratified_indices(labels, 0.2, seed=5).tolist()
    assert torch.equal(dataset_labels(sub), labels[torch.as_tensor(sub.indices)])
    assert [sub[i][1] for i in range(len(sub))] == labels[torch.as_tensor(sub.indices)].tolist()
    # A subset of a subset keeps stratifying on the right labels.
    sub2 = label_subset(sub, 0.5, seed=0)
    lab2 = dataset_labels(sub2)
    assert torch.equal(lab2, torch.tensor([sub[i][1] for i in sub2.indices]))


def test_label_subset_unlabelled_dataset():
    with pytest.raises(ValueError, match="labels"):
        label_subset(LabelledDS([-1, -1, -1]), 0.5)

    class NoLabels(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(1, 1, 1, dtype=torch.uint8), 0

    with pytest.raises(ValueError, match="NoLabels"):
        label_subset(NoLabels(), 0.5)


# --------------------------------------------------------------------------------------------------- collate

def test_collate_stacks_images_and_labels():
    g = torch.Generator().manual_seed(0)
    ims = [torch.randint(0, 256, (3, 4, 5), generator=g, dtype=torch.uint8) for _ in range(3)]
    x, y = collate([(ims[0], 2), (ims[1], -1), (ims[2], 7)])
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 3, 4, 5)
    for i in range(3):
        assert torch.equal(x[i], ims[i])
    assert y.dtype == torch.int64 and y.tolist() == [2, -1, 7]


def test_collate_different_shapes_lists_them():
    batch = [(torch.zeros(3, 4, 5, dtype=torch.uint8), 0), (torch.zeros(3, 6, 5, dtype=torch.uint8), 1)]
    with pytest.raises(ValueError) as e:
        collate(batch)
    assert "(3, 4, 5)" in str(e.value) and "(3, 6, 5)" in str(e.value)


# --------------------------------------------------------------------------------------------------- conversions

def rand_unit(shape, seed=0):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(seed))
    x.view(-1)[0], x.view(-1)[1] = 0.0, 1.0  # hit both ends of the range
    return x


def pil_resize(plane: np.ndarray, size: int) -> np.ndarray:
    """Reference antialiased bilinear resize of one float plane (PIL's 'F' mode)."""
    return np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))


def test_to_unit():
    u8 = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    assert torch.allclose(to_unit(u8), torch.tensor([[0.0, 0.2, 1.0]]))
    f = torch.tensor([0.25])
    assert to_unit(f).dtype == torch.float32 and torch.equal(to_unit(f), f)


@pytest.mark.parametrize("c_in, c_out", [(1, 1), (3, 3), (1, 3), (3, 1)])
def test_to_teacher_same_size(c_in, c_out):
    x = rand_unit((2, c_in, 8, 8))
    y = to_teacher(x, c_out, 8)
    assert tuple(y.shape) == (2, c_out, 8, 8)
    assert y.min() >= -1.0 and y.max() <= 1.0
    if c_in == c_out:
        ref = x
    elif c_in == 1:
        ref = x.repeat(1, 3, 1, 1)
    else:
        ref = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    torch.testing.assert_close(y, ref * 2 - 1, rtol=0, atol=1e-6)


def test_to_teacher_gray_to_rgb_replicates():
    x = rand_unit((3, 1, 5, 5), seed=1)
    y = to_teacher(x, 3, 5)
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    assert torch.equal(y[:, :1], x * 2 - 1)


def test_to_teacher_luma_extremes():
    # Columns: pure red, pure green, pure blue, white (every row the same).
    x = torch.zeros(1, 3, 4, 4)
    x[0, 0, :, 0] = 1.0
    x[0, 1, :, 1] = 1.0
    x[0, 2, :, 2] = 1.0
    x[0, :, :, 3] = 1.0
    y = to_teacher(x, 1, 4)  # (1, 1, 4, 4)
    expected = (torch.tensor([0.299, 0.587, 0.114, 1.0]) * 2 - 1).expand(4, 4)
    torch.testing.assert_close(y[0, 0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("c_in, c_out, size", [(1, 1, 16), (3, 3, 12), (1, 3, 48), (3, 1, 20)])
def test_to_teacher_resizes_like_pil_bilinear(c_in, c_out, size):
    x = rand_unit((2, c_in, 32, 32), seed=2)
    y = to_teacher(x, c_out, size)
    assert tuple(y.shape) == (2, c_out, size, size)
    assert y.min() >= -1.0 and y.max() <= 1.0
    xn = x.numpy().astype(np.float64)
    if c_in == 3 and c_out == 1:
        xn = (xn * np.array([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdims=True)
    elif c_in == 1 and c_out == 3:
        xn = np.repeat(xn, 3, axis=1)
    ref = np.stack([np.stack([pil_resize(xn[b, c], size) for c in range(c_out)]) for b in range(2)])
    np.testing.assert_allclose(y.numpy(), ref * 2 - 1, rtol=0, atol=1e-5)


def test_to_teacher_constant_image_stays_constant():
    x = torch.full((1, 1, 28, 28), 0.25)
    y = to_teacher(x, 3, 64)
    torch.testing.assert_close(y, torch.full((1, 3, 64, 64), -0.5), rtol=0, atol=1e-6)


MEAN, STD = [0.5, 0.25, 0.125], [0.2, 0.4, 0.8]


@pytest.mark.parametrize("c_in", [1, 3])
def test_to_student_normalises_per_channel(c_in):
    x = rand_unit((2, c_in, 6, 6), seed=3)
    y = to_student(x, 6, MEAN, STD)
    assert tuple(y.shape) == (2, 3, 6, 6)
    x3 = x if c_in == 3 else x.repeat(1, 3, 1, 1)
    for c in range(3):
        torch.testing.assert_close(y[:, c], (x3[:, c] - MEAN[c]) / STD[c], rtol=1e-6, atol=1e-6)


def test_to_student_resizes_then_normalises():
    x = rand_unit((1, 1, 28, 28), seed=4)
    y = to_student(x, 64, MEAN, STD)
    assert tuple(y.shape) == (1, 3, 64, 64)
    up = pil_resize(x[0, 0].numpy(), 64)
    for c in range(3):
        np.testing.assert_allclose(y[0, c].numpy(), (up - MEAN[c]) / STD[c], rtol=0, atol=1e-4)


def test_conversions_reject_unsupported_channels():
    with pytest.raises(ValueError, match="2 channels"):
        to_teacher(torch.rand(1, 2, 4, 4), 3, 4)
    with pytest.raises(ValueError, match="4 channels"):
        to_student(torch.rand(1, 4, 4, 4), 4, MEAN, STD)


# --------------------------------------------------------------------------------------------------- mean / std

class ImagesDS(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 0


@pytest.mark.parametrize("channels", [1, 3])
def test_dataset_mean_std_all_images(channels):
    g = torch.Generator().manual_seed(7)
    ims = torch.randint(0, 256, (5, channels, 4, 3), generator=g, dtype=torch.uint8)
    mean, std = dataset_mean_std(ImagesDS(ims), n=100)
    assert len(mean) == 3 and len(std) == 3
    a = ims.numpy().astype(np.float64) / 255.0
    if channels == 1:
        a = np.repeat(a, 3, axis=1)
    ref_mean = a.mean(axis=(0, 2, 3))
    ref_std = a.transpose(1, 0, 2, 3).reshape(3, -1).std(axis=1, ddof=1)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5)
    np.testing.assert_allclose(std, ref_std, rtol=1e-5)


def test_dataset_mean_std_subsample_uses_n_images():
    # Image i is constant with value 10 * i: one image gives std 0 and a mean equal to one of the values.
    values = [10 * i for i in range(8)]
    ims = torch.stack([torch.full((1, 3, 3), v, dtype=torch.uint8) for v in values])
    for seed in range(3):
        mean, std = dataset_mean_std(ImagesDS(ims), n=1, seed=seed)
        assert std == [0.0, 0.0, 0.0]
        assert mean[0] == mean[1] == mean[2]
        assert min(abs(mean[0] - v / 255.0) for v in values) < 1e-6
    mean2, _ = dataset_mean_std(ImagesDS(ims), n=2, seed=0)
    pair_means = {round((a + b) / 2 / 255.0, 6) for a in values for b in values if a != b}
    assert round(mean2[0], 6) in pair_means
    assert dataset_mean_std(ImagesDS(ims), n=3, seed=1) == dataset_mean_std(ImagesDS(ims), n=3, seed=1)


# ------------------------------------------------------------------- broken images in DataLoader workers
def _folder_with_broken_files(root):
    """Two classes of small PNGs plus a truncated JPEG, a text file named .jpg and a non-image file."""
    import io

    import numpy as np
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
    (root / "a" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "b" / "notes.jpg").write_text("not an image")
    (root / "b" / "README.txt").write_text("ignored: not an image extension")
    return root


def test_broken_images_are_skipped_inside_dataloader_workers(tmp_path):
    from torch.utils.data import DataLoader

    from distill.data import ImageFolder, collate

    ds = ImageFolder(str(_folder_with_broken_files(tmp_path / "imgs")), channels=3)
    assert len(ds) == 10  # 8 good + 2 broken with image extensions; README.txt is not listed
    batches = list(DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate))
    images = torch.cat([b[0] for b in batches])
    assert images.shape == (10, 3, 8, 8)  # every broken file replaced by a readable neighbour, no worker crash


def test_broken_images_can_be_an_error_naming_the_file(tmp_path):
    from distill.data import ImageFolder

    ds = ImageFolder(str(_folder_with_broken_files(tmp_path / "imgs")), channels=3, on_error="raise")
    bad = [i for i, (p, _) in enumerate(ds.files) if p.endswith(("truncated.jpg", "notes.jpg"))]
    for i in bad:
        with pytest.raises(ValueError, match=r"cannot read image '.*(truncated|notes)\.jpg'"):
            ds[i]
