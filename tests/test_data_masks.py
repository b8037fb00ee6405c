"""distill.data.masks: every stored form of a mask read as ids (16-bit, palette, bilevel, binary through a threshold),
JPEG masks named with the fix, unreadable mask files named, and the mask resampler against independent references."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data.masks import read_mask, resize_mask
from distill.errors import UnreadableFileError


def test_sixteen_bit_ids_are_ids_not_scaled(tmp_path):
    ids = np.array([[0, 1, 300], [1000, 2, 65535]], np.uint16)
    Image.fromarray(ids).save(tmp_path / "m16.png")
    assert Image.open(tmp_path / "m16.png").mode.startswith("I")
    got = read_mask(tmp_path / "m16.png", 1001, 65535)
    assert got.dtype == torch.int64 and got.tolist() == ids.astype(np.int64).tolist()
    small = np.array([[0, 1], [2, 255]], np.uint16)
    Image.fromarray(small).save(tmp_path / "s16.tif")
    assert read_mask(tmp_path / "s16.tif", 3, 255).tolist() == small.tolist()
    with pytest.raises(ValueError, match=r"m16\.png' holds class ids \[300, 1000\]"):
        read_mask(tmp_path / "m16.png", 3, 65535)


def test_palette_indices_and_bilevel_masks(tmp_path):
    ids = np.array([[0, 1], [2, 255]], np.uint8)
    p = Image.fromarray(ids, mode="P")
    p.putpalette([200, 10, 10] * 256)  # one colour for every index: only the indices can be the ids
    p.save(tmp_path / "p.png")
    assert read_mask(tmp_path / "p.png", 3, 255).tolist() == ids.tolist()
    Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1").save(tmp_path / "b.png")
    assert read_mask(tmp_path / "b.png", 2, 255).tolist() == [[0, 1], [1, 0]]


def test_jpeg_mask_is_named_with_the_fix_and_read_with_a_threshold(tmp_path):
    rng = np.random.default_rng(0)
    truth = np.zeros((32, 48), np.uint8)
    truth[8:24, 10:30] = 1
    Image.fromarray(truth * 255).save(tmp_path / "horse001.jpg", quality=75)
    noisy = np.array(Image.open(tmp_path / "horse001.jpg"))
    assert len(np.unique(noisy)) > 2  # compression noise: not two values
    with pytest.raises(ValueError, match=r"horse001\.jpg' is a JPEG mask.*mask_threshold 128.*save the class ids "
                                         r"as PNG"):
        read_mask(tmp_path / "horse001.jpg", 2, 255)
    got = read_mask(tmp_path / "horse001.jpg", 2, 255, threshold=128).numpy()
    assert got.tolist() == (noisy >= 128).astype(np.uint8).tolist()
    assert (got == truth).mean() > 0.98
    # a colour JPEG of a binary mask: its luma, thresholded
    Image.fromarray(np.repeat(truth[..., None] * 250, 3, -1) + rng.integers(0, 5, (32, 48, 3)).astype(np.uint8)).save(
        tmp_path / "c.jpg", quality=90)
    assert (read_mask(tmp_path / "c.jpg", 2, 255, threshold=128).numpy() == truth).mean() > 0.98
    # a 0/255 grey PNG without a threshold: the fix names --mask-threshold
    Image.fromarray(truth * 255).save(tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"holds class ids \[255\].*, mask_threshold T"):
        read_mask(tmp_path / "g.png", 2, 11)
    assert read_mask(tmp_path / "g.png", 2, 11, threshold=128).tolist() == truth.tolist()


def test_a_threshold_no_8bit_value_can_reach_is_refused(tmp_path):
    """--mask-threshold 300 on 8-bit masks made every pixel class 0 and the run reported an mIoU (new-user review)."""
    truth = np.zeros((16, 16), np.uint8)
    truth[4:12, 4:12] = 255
    Image.fromarray(truth).save(tmp_path / "m.jpg", quality=90)
    with pytest.raises(ValueError, match=r"mask_threshold 300 is above 255.*m\.jpg.*every pixel would be class 0"):
        read_mask(tmp_path / "m.jpg", 2, 255, threshold=300)
    assert read_mask(tmp_path / "m.jpg", 2, 255, threshold=255).sum() > 0  # 255 itself still reachable
    sixteen = tmp_path / "m16.png"  # a 16-bit mask may hold values above 255
    Image.fromarray(truth.astype(np.uint16) * 257).save(sixteen)  # mode I;16
    assert read_mask(sixteen, 2, 255, threshold=300).sum() == 64


def test_id_table_maps_stored_values(tmp_path):
    Image.fromarray(np.array([[0, 1, 2, 7]], np.uint8)).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", 3, 255, id_map=(255, 0, 1)).tolist() == [[255, 0, 1, 255]]


def test_unreadable_masks_are_named(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "full.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    (tmp_path / "dir.png").mkdir()
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    for name in ("zero.png", "trunc.png", "dir.png", "loop.png"):
        with pytest.raises(UnreadableFileError, match=rf"cannot read mask '.*{name}'"):
            read_mask(tmp_path / name, 2, 255)


def _nearest_exact_by_hand(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Target pixel (i, j) takes the source pixel whose centre is nearest its centre: floor((i + 0.5) * in / out)."""
    ys = np.minimum(np.floor((np.arange(h) + 0.5) * a.shape[0] / h).astype(int), a.shape[0] - 1)
    xs = np.minimum(np.floor((np.arange(w) + 0.5) * a.shape[1] / w).astype(int), a.shape[1] - 1)
    return a[ys][:, xs]


@pytest.mark.parametrize("src,dst", [((90, 120), (30, 40)), ((96, 128), (24, 32)), ((375, 500), (96, 128)),
                                     ((97, 131), (25, 33)), ((20, 30), (57, 85))])
def test_mask_resampling_is_centred(src, dst):
    """Against a hand computation for every factor, and against PIL's NEAREST (also centred) for integer
    downscales: torch's legacy 'nearest' (floor(i * in / out)) fails both at downscale 3-4."""
    a = np.random.default_rng(0).integers(0, 21, src).astype(np.uint8)
    got = resize_mask(torch.from_numpy(a), dst)
    assert got.dtype == torch.uint8 and tuple(got.shape) == dst
    assert got.numpy().tolist() == _nearest_exact_by_hand(a, *dst).tolist()
    if src[0] % dst[0] == 0 and src[1] % dst[1] == 0:
        ref = np.asarray(Image.fromarray(a).resize(dst[::-1], Image.NEAREST))
        assert got.numpy().tolist() == ref.tolist()


def test_mask_edge_stays_on_the_image_edge_at_downscale_3():
    """A vertical edge at x = 30 of a 90 px wide mask lies at x = 10 after a 3x downscale (not 10.33)."""
    m = torch.zeros(9, 90, dtype=torch.int64)
    m[:, 30:] = 1
    assert resize_mask(m, (3, 30))[0].tolist() == [0] * 10 + [1] * 20
    m[:, 31:] = 2  # target column 10 covers source 30..32 (centre 31.5): pixel 31; legacy 'nearest' takes 30
    assert resize_mask(m, (3, 30))[0, 10].item() == 2
