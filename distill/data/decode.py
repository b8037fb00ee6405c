"""Decode one image file into 8-bit pixels: every PIL mode handled explicitly, an optional decode-time resize.

`decode_image` is the one image decoder of the package (image folders, file lists, Hugging Face datasets, and
image+mask readers call it). It returns a ``uint8`` numpy array ``[H, W, C]`` with ``C`` = 1 or 3, whatever the
file holds:

============================  =====================================================================================
PIL mode                      conversion to 8 bits
============================  =====================================================================================
``1``                         0 -> 0, 1 -> 255
``L``, ``RGB``                as stored
``P`` / ``PA``                palette looked up; with a transparency entry or alpha, composited like ``RGBA``
``LA``, ``RGBA``, ``RGBa``    composited over `ALPHA_BACKGROUND` (white, as image viewers and ImageMagick's
                              ``-flatten`` show it): ``round(c * a / 255 + bg * (1 - a / 255))``
``CMYK``, ``YCbCr``, ``LAB``,  PIL's conversion to RGB
``HSV``
``I;16`` (and ``I;16B/L/N``)  16-bit: ``round(v * 255 / 65535)`` (scaled, not clipped)
``I`` (32-bit int)            values in [0, 65535] (16-bit PNG/TIFF as some Pillow versions open them): as ``I;16``;
                              other ranges: min-max scaled per image, with a warning naming the file
``F`` (32-bit float)          values in [0, 1]: ``round(v * 255)``; other finite ranges: min-max per image, with a
                              warning; NaN/inf: an error naming the file
============================  =====================================================================================

Then ``channels=3`` replicates a gray image and ``channels=1`` takes the ITU-R 601 luma of a colour one (PIL's
``convert('L')``). EXIF orientation is applied (a phone photo is used upright). Multi-frame files (GIF, TIFF) give
their first frame.
"""
from __future__ import annotations

import io
import logging
import os
from typing import BinaryIO, Optional, Union

import numpy as np

from ..errors import UnreadableFileError
from ..vocab import IMAGE_RESIZE

_logger = logging.getLogger(__name__)

#: Background that transparent pixels are composited over (0-255, all channels).
ALPHA_BACKGROUND = 255
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV")
Source = Union[str, bytes, os.PathLike, BinaryIO]


def _composite(rgba: np.ndarray) -> np.ndarray:
    """``[H, W, C+1]`` uint8 with alpha last -> ``[H, W, C]`` composited over `ALPHA_BACKGROUND`."""
    color, alpha = rgba[..., :-1].astype(np.float32), rgba[..., -1:].astype(np.float32) / 255.0
    out = color * alpha + ALPHA_BACKGROUND * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _minmax(a: np.ndarray, name: str, mode: str) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    _logger.warning("image '%s' (PIL mode %s) holds values %g..%g, outside the mode's usual range; scaled "
                    "min-max to 0..255", name, mode, lo, hi)
    if hi == lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_8bit(im, name: str = "<image>") -> np.ndarray:
    """A PIL image of any mode -> uint8 ``[H, W, 1]`` (gray) or ``[H, W, 3]`` (colour); see the module table.

    Raises:
        UnreadableFileError: a float image with NaN/inf, or a mode this table does not cover (names the file and
            the mode).
    """
    mode = im.mode
    if mode == "P" and "transparency" in im.info or mode == "PA":
        im, mode = im.convert("RGBA"), "RGBA"
    elif mode == "P":
        im, mode = im.convert("RGB"), "RGB"
    if mode == "1":
        a = np.asarray(im.convert("L"), dtype=np.uint8)[..., None]
    elif mode in ("L", "RGB"):
        a = np.asarray(im, dtype=np.uint8)
    elif mode in ("LA", "RGBA", "RGBa"):
        a = np.asarray(im.convert("RGBA" if mode == "RGBa" else mode), dtype=np.uint8)
        a = _composite(a)
    elif mode in _TO_RGB:
        a = np.asarray(im.convert("RGB"), dtype=np.uint8)
    elif mode in _SIXTEEN_BIT:
        v = np.asarray(im).astype(np.uint32)
        a = ((v * 255 + 32767) // 65535).astype(np.uint8)
    elif mode == "I":
        v = np.asarray(im).astype(np.int64)
        if v.size and v.min() >= 0 and v.max() <= 65535:
            a = ((v * 255 + 32767) // 65535).astype(np.uint8)
        else:
            a = _minmax(v, name, mode)
    elif mode == "F":
        v = np.asarray(im, dtype=np.float32)
        if not np.isfinite(v).all():
            raise UnreadableFileError(f"cannot read image '{name}': PIL mode F (float) with NaN or inf values", name)
        if v.size and v.min() >= 0.0 and v.max() <= 1.0:
            a = np.rint(v * 255.0).astype(np.uint8)
        else:
            a = _minmax(v, name, mode)
    else:
        raise UnreadableFileError(
            f"cannot read image '{name}': PIL mode {mode!r} is not handled (handled: 1, L, LA, P, PA, RGB, RGBA, "
            f"CMYK, YCbCr, LAB, HSV, I;16, I, F). Fix: convert the file to 8-bit RGB or grayscale PNG.", name)
    return a[..., None] if a.ndim == 2 else a


def target_size(size, height: int, width: int) -> Optional[tuple[int, int]]:
    """``(H, W)`` an image is brought to: ``size`` int -> square, ``(H, W)`` as given, None -> no resize."""
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def fit(im, size: tuple[int, int], resize: str = "center-crop"):
    """Resize a PIL image (8-bit L or RGB) to ``size = (H, W)``.

    ``resize='center-crop'``: scale so the image covers ``size`` (aspect kept), then crop the centre (timm's eval
    transform); ``'squash'``: scale each side to ``size`` (aspect changed, nothing cut). Bicubic, antialiased (PIL).
    """
    from PIL import Image

    H, W = size
    w, h = im.size
    if (h, w) == (H, W):
        return im
    if resize == "squash":
        return im.resize((W, H), Image.BICUBIC)
    scale = max(H / h, W / w)
    nh, nw = max(H, round(h * scale)), max(W, round(w * scale))
    top, left = (nh - H) // 2, (nw - W) // 2
    return im.resize((nw, nh), Image.BICUBIC).crop((left, top, left + W, top + H))


def decode_image(source: Source, channels: int = 3, size=None, resize: str = "center-crop", min_side: int = 1,
                 name: Optional[str] = None) -> np.ndarray:
    """Decode an image file into ``uint8 [H, W, channels]`` (every PIL mode scaled to 8 bits, see the module doc).

    Args:
        source: a path (str, bytes or ``os.PathLike``; any name the OS allows), the file's bytes, or a binary
            file object.
        channels: 1 (gray; colour images by ITU-R 601 luma) or 3 (RGB; gray images replicated).
        size: None (native size), an int (square) or ``(H, W)``: the image is brought to this size at decode
            time (``resize``: ``'center-crop'`` or ``'squash'``, see `fit`). JPEGs are decoded at a reduced
            scale first when that is still at least ``size`` (PIL ``draft``), so an 8000 px scan costs little.
        min_side: an image whose file is below this many pixels on its shorter side is refused (degenerate: a 1x1
            thumbnail); the file's stored size counts, not ``size`` or a JPEG draft.
        name: how errors name the image (default: the path).

    Returns:
        ``np.ndarray`` uint8 of shape ``[H, W, channels]``.

    Raises:
        UnreadableFileError (a ``ValueError``): the file cannot be opened or decoded, is not a regular file, is
            smaller than ``min_side``, or holds NaN; the message starts with ``cannot read image '<name>'``.
        ValueError: bad ``channels`` or ``resize``.
    """
    from PIL import Image, ImageOps

    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r} is not valid; use 1 (grayscale) or 3 (RGB).")
    if resize not in IMAGE_RESIZE:
        raise ValueError(f"resize={resize!r} is not valid; valid: {', '.join(IMAGE_RESIZE)}.")
    if name is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<image>"
    if isinstance(source, (str, os.PathLike)):
        import stat

        try:
            st = os.stat(source)
        except OSError as e:
            raise UnreadableFileError(f"cannot read image '{name}': {e.strerror or e}", name) from None
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFileError(f"cannot read image '{name}': not a regular file (a pipe, device or "
                                      f"directory); only regular files are read", name)
    elif isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as im:
            if min(im.size) < min_side:  # the file's own size: a JPEG draft below is smaller by design
                raise UnreadableFileError(
                    f"cannot read image '{name}': it is {im.width}x{im.height} px, below min_image_side={min_side} "
                    f"(a degenerate image). Fix: remove it, or lower min_image_side", name)
            want = target_size(size, im.height, im.width)
            if want is not None and im.format == "JPEG":
                im.draft("RGB" if channels == 3 else "L", (want[1], want[0]))
            im.load()
            im = ImageOps.exif_transpose(im)
            a = to_8bit(im, name)
    except UnreadableFileError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for broken files
        text = " ".join(str(e).split()) or type(e).__name__
        raise UnreadableFileError(f"cannot read image '{name}': {text[:200]}", name) from None
    if a.shape[-1] != channels:
        if channels == 3:
            a = np.repeat(a, 3, axis=-1)
        else:
            a = np.asarray(Image.fromarray(a).convert("L"), dtype=np.uint8)[..., None]
    if want is not None and a.shape[:2] != want:
        mode_im = Image.fromarray(a[..., 0] if channels == 1 else a)
        a = np.asarray(fit(mode_im, want, resize), dtype=np.uint8)
        a = a[..., None] if a.ndim == 2 else a
    return a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C")
