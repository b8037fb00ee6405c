"""Tests for distill.data.decode: every PIL mode from real files, scaled (not clipped) to 8 bits, decode-time
resize, degenerate / undecodable / non-regular files. Expected values are computed here from each mode's definition
(or by PIL's own conversion where the table says PIL converts)."""
from __future__ import annotations

import logging
import os
import threading

import numpy as np
import pytest
from PIL import Image

from distill.data import ALPHA_BACKGROUND, decode_image
from distill.errors import UnreadableFileError

RNG = np.random.default_rng(0)


def _u8(shape):
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def test_mode_1_l_rgb(tmp_path):
    bits = RNG.integers(0, 2, (9, 7)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    np.testing.assert_array_equal(decode_image(tmp_path / "b.png", 1)[..., 0], bits * 255)
    gray, rgb = _u8((9, 7)), _u8((9, 7, 3))
    Image.fromarray(gray).save(tmp_path / "l.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "l.png", 1)[..., 0], gray)
    np.testing.assert_array_equal(decode_image(tmp_path / "l.png", 3), np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(decode_image(tmp_path / "rgb.png", 3), rgb)
    luma = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]
    assert np.abs(decode_image(tmp_path / "rgb.png", 1)[..., 0] - luma).max() <= 1.0


def _over_white(color, alpha):
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(color.astype(np.float64) * a + ALPHA_BACKGROUND * (1 - a)).astype(np.uint8)


def test_alpha_modes_are_composited_over_white(tmp_path):
    rgba = _u8((6, 8, 4))
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = decode_image(tmp_path / "rgba.png", 3)
    np.testing.assert_array_equal(got, _over_white(rgba[..., :3], rgba[..., 3]))
    assert (got[0, 0] == 255).all() and (got[0, 1] == rgba[0, 1, :3]).all()
    la = _u8((6, 8, 2))
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    np.testing.assert_array_equal(decode_image(tmp_path / "la.png", 1)[..., 0], _over_white(la[..., :1], la[..., 1])[..., 0])


def test_palette_with_transparency(tmp_path):
    idx = RNG.integers(0, 4, (10, 5)).astype(np.uint8)
    pal = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(pal.flatten().tolist() + [0] * (768 - 12))
    im.save(tmp_path / "p.png", transparency=2)  # palette entry 2 (blue) is fully transparent
    assert Image.open(tmp_path / "p.png").mode == "P" and "transparency" in Image.open(tmp_path / "p.png").info
    want = pal[idx].copy()
    want[idx == 2] = ALPHA_BACKGROUND
    np.testing.assert_array_equal(decode_image(tmp_path / "p.png", 3), want)
    im.save(tmp_path / "p_opaque.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "p_opaque.png", 3), pal[idx])


def test_cmyk_uses_pils_conversion(tmp_path):
    cmyk = Image.fromarray(_u8((8, 8, 4)), "CMYK")
    cmyk.save(tmp_path / "c.tif")
    assert Image.open(tmp_path / "c.tif").mode == "CMYK"
    np.testing.assert_array_equal(decode_image(tmp_path / "c.tif", 3), np.asarray(cmyk.convert("RGB")))


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    v = (RNG.random((32, 32)) * 65535).astype(np.uint16)
    v[0, 0], v[0, 1] = 0, 65535
    Image.fromarray(v).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    got = decode_image(tmp_path / "g16.png", 3)
    want = np.rint(v.astype(np.float64) * 255 / 65535).astype(np.uint8)  # v / 257 never ties
    np.testing.assert_array_equal(got[..., 0], want)
    assert got[0, 0, 0] == 0 and got[0, 1, 0] == 255
    assert abs(got.mean() - 127.5) < 3 and (got == 255).mean() < 0.01  # the old convert('RGB') gave 99.6% at 255


def test_mode_i_32bit(tmp_path, caplog):
    v = RNG.integers(0, 65536, (8, 8)).astype(np.int32)
    Image.fromarray(v, "I").save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    np.testing.assert_array_equal(decode_image(tmp_path / "i.tif", 1)[..., 0],
                                  np.rint(v * 255 / 65535).astype(np.uint8))
    w = RNG.integers(-1000, 200000, (8, 8)).astype(np.int32)  # not a 16-bit range: min-max, with a warning
    Image.fromarray(w, "I").save(tmp_path / "w.tif")
    with caplog.at_level(logging.WARNING):
        got = decode_image(tmp_path / "w.tif", 1)[..., 0]
    want = np.rint((w - w.min()) * 255.0 / (w.max() - w.min())).astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    assert "w.tif" in caplog.text and "min-max" in caplog.text


def test_mode_f(tmp_path, caplog):
    v = RNG.random((8, 8)).astype(np.float32)
    Image.fromarray(v, "F").save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    np.testing.assert_array_equal(decode_image(tmp_path / "f.tif", 1)[..., 0], np.rint(v * 255).astype(np.uint8))
    big = (v * 4000 - 100).astype(np.float32)
    Image.fromarray(big, "F").save(tmp_path / "big.tif")
    with caplog.at_level(logging.WARNING):
        got = decode_image(tmp_path / "big.tif", 1)[..., 0]
    assert got.min() == 0 and got.max() == 255 and "big.tif" in caplog.text
    nan = v.copy()
    nan[2, 2] = np.nan
    Image.fromarray(nan, "F").save(tmp_path / "nan.tif")
    with pytest.raises(UnreadableFileError, match="nan.tif.*NaN"):
        decode_image(tmp_path / "nan.tif", 1)


def test_resize_modes(tmp_path):
    a = np.full((20, 40, 3), 128, np.uint8)
    a[:, :6] = (255, 0, 0)  # red stripes at the left and right edges: a centre crop (columns 10-29) cuts them off
    a[:, 34:] = (255, 0, 0)
    Image.fromarray(a).save(tmp_path / "wide.png")
    crop = decode_image(tmp_path / "wide.png", 3, size=10, resize="center-crop")
    squash = decode_image(tmp_path / "wide.png", 3, size=10, resize="squash")
    assert crop.shape == squash.shape == (10, 10, 3)
    assert np.abs(crop.astype(int) - 128).max() <= 2  # only the grey middle is left
    assert squash[:, 0, 1].max() < 64 and squash[:, -1, 1].max() < 64  # the stripes survive a squash
    assert decode_image(tmp_path / "wide.png", 3, size=(8, 12)).shape == (8, 12, 3)
    ramp = np.linspace(0, 255, 800)
    big = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.full((800, 800), 128.0)), -1)
    Image.fromarray(np.rint(big).astype(np.uint8)).save(tmp_path / "big.jpg", quality=95)  # an 800 px gradient
    small = decode_image(tmp_path / "big.jpg", 3, size=25)  # JPEG draft decoding, then an exact resize
    assert small.shape == (25, 25, 3) and np.abs(small.astype(float) - big[16::32, 16::32]).max() < 6


def test_degenerate_and_undecodable_files_are_named(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "thumb.png")
    with pytest.raises(UnreadableFileError, match=r"thumb\.png.*1x1 px.*min_image_side=8"):
        decode_image(tmp_path / "thumb.png", 3, min_side=8)
    assert decode_image(tmp_path / "thumb.png", 3, size=4).shape == (4, 4, 3)  # min_side=1 accepts it
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(UnreadableFileError, match=r"cannot read image '.*junk\.jpg'"):
        decode_image(tmp_path / "junk.jpg")
    with pytest.raises(ValueError, match="channels=2"):
        decode_image(tmp_path / "thumb.png", 2)
    with pytest.raises(ValueError, match="'crop'.*center-crop"):
        decode_image(tmp_path / "thumb.png", 3, resize="crop")


def test_named_pipe_is_refused_without_opening_it(tmp_path):
    os.mkfifo(tmp_path / "x.jpg")
    err = []

    def run():
        try:
            decode_image(tmp_path / "x.jpg")
        except UnreadableFileError as e:
            err.append(str(e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "decoding a named pipe blocked"
    assert err and "not a regular file" in err[0] and "x.jpg" in err[0]


def test_bytes_source_and_non_utf8_name(tmp_path):
    rgb = _u8((5, 6, 3))
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(decode_image((tmp_path / "a.png").read_bytes(), 3), rgb)
    name = os.path.join(os.fsencode(tmp_path), b"caf\xe9-\xff.png")  # not valid UTF-8
    with open(name, "wb") as f:
        f.write((tmp_path / "a.png").read_bytes())
    np.testing.assert_array_equal(decode_image(os.fsdecode(name), 3), rgb)


def test_min_side_counts_the_file_not_the_jpeg_draft(tmp_path):
    """A 32 px JPEG decoded at size 4: PIL's draft decodes it at 1/8 scale (4x4) and a check after the draft blamed
    the file ("4x4 px, degenerate, remove it"); the file is 32 px, so it is read."""
    Image.fromarray(_u8((32, 32, 3))).save(tmp_path / "a.jpg", quality=90)
    assert decode_image(str(tmp_path / "a.jpg"), size=4, min_side=8).shape == (4, 4, 3)
    Image.fromarray(_u8((4, 32, 3))).save(tmp_path / "thin.jpg", quality=90)
    with pytest.raises(UnreadableFileError, match="it is 32x4 px, below min_image_side=8"):
        decode_image(str(tmp_path / "thin.jpg"), size=64, min_side=8)


@pytest.mark.parametrize("size", [1, 7])
def test_image_size_below_min_image_side_blames_the_keys(size):
    """image_size below min_image_side would make every image 'degenerate': the recipe is refused naming both keys,
    not the files."""
    from distill.config import make_recipe

    with pytest.raises(ValueError, match=f"r.yaml: image_size {size} is below min_image_side 8: every image"):
        make_recipe({"dataset": "image-folder", "image_size": size}, source="r.yaml")
    assert make_recipe({"dataset": "image-folder", "image_size": size, "min_image_side": size}).image_size == size
