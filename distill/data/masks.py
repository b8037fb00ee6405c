"""Segmentation masks: one file -> class ids per pixel, and the one mask resampler.

`read_mask` reads what people store masks as:

=====================================  ==============================================================================
file                                   read as
=====================================  ==============================================================================
PNG / TIFF / BMP, mode ``L`` / ``P``   the stored value (for ``P``: the palette *index*, as VOC's
                                       ``SegmentationClass`` PNGs hold it), 8 bit
16-bit PNG / TIFF (``I;16``, ``I``)    the stored value as an id (not scaled: an id is not a brightness)
``1`` (bilevel)                        0 / 1
RGB(A) whose three channels are equal  the first channel (a grey mask saved as RGB)
a binary mask, with ``threshold=T``    ``1`` where the grey value is ``>= T``, else ``0`` (JPEG figure/ground masks
                                       with compression noise, or 0/255 PNGs)
JPEG without ``threshold``             refused: JPEG's lossy compression turns ids into neighbouring values
colour-coded RGB                       refused, with the fix (map each colour to its id)
=====================================  ==============================================================================

An ``id_map`` (a lookup table, e.g. Cityscapes' labelId -> trainId, ADE20K's ``0 -> ignore, k -> k - 1``) then maps
the stored values to training ids. EXIF orientation is applied as for images (`decode_image`),
so a mask stays aligned with its upright image.

`resize_mask` is the one mask resampler: ``nearest-exact`` (the source pixel whose centre is nearest the
target pixel's centre, ``src = floor((dst + 0.5) * in / out)``, as PIL's ``NEAREST`` and OpenCV's ``INTER_NEAREST_EXACT``).
torch's legacy ``nearest`` (``src = floor(dst * in / out)``) shifts the mask by ``(in / out - 1) / 2`` px against an
image resized with centred bilinear sampling: +0.33..0.375 px at downscale 3-4.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UnreadableFileError, option

#: Lossy formats: a mask stored so holds no exact ids, only a binary mask read through a threshold.
LOSSY_MASK_EXTENSIONS = (".jpg", ".jpeg", ".webp")
#: Extensions a mask file may have (lossy ones only with a threshold).
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".gif") + LOSSY_MASK_EXTENSIONS


def _fix_for_lossy(name: str) -> str:
    return (f"'{name}' is a JPEG mask: JPEG compression changes pixel values, so it cannot hold class ids. Fix: pass "
            f"{option('mask_threshold')} 128 for a binary mask (value >= 128 is class 1), or save the class ids as "
            "PNG.")


def _open_ids(path: str, threshold: Optional[int]) -> np.ndarray:
    """The raw stored values of a mask file, ``[H, W]`` (uint8, or int64 for 16/32-bit masks)."""
    from PIL import Image, ImageOps

    try:
        st = os.stat(path)
    except OSError as e:
        raise UnreadableFileError(f"cannot read mask '{path}': {e.strerror or e}", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableFileError(f"cannot read mask '{path}': not a regular file (a pipe, device or directory)", path)
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if threshold is not None and mode not in ("1", "L", "P", "I;16", "I;16B", "I;16L", "I", "LA"):
                arr = np.asarray(im.convert("L"))  # a colour JPEG of a binary mask: its luma
            elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                arr = np.asarray(im).astype(np.int64)  # ids beyond 255 kept; torch has no uint16 comparisons
            elif mode == "1":
                arr = np.asarray(im.convert("L")) // 255
            elif mode == "LA":
                arr = np.asarray(im)[..., 0]
            else:
                arr = np.asarray(im)
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for broken files
        text = " ".join(str(e).split()) or type(e).__name__
        raise UnreadableFileError(f"cannot read mask '{path}': {text[:200]}", path) from None
    if arr.ndim == 3:
        rgb = arr[..., :3]
        if not (rgb == rgb[..., :1]).all():
            raise ValueError(f"mask '{path}' is a colour-coded {mode} image; masks must hold one class id per pixel (a "
                             "one-channel PNG, mode L or P). Fix: map each colour to its class id (e.g. CamVid's "
                             "palette in distill.segment.data.CAMVID_PALETTE) and save it as a one-channel PNG, or "
                             f"pass {option('mask_threshold')} T for a binary mask.")
        arr = rgb[..., 0]
    return arr


def read_mask(path: str | Path, num_classes: int, ignore_index: int, threshold: Optional[int] = None,
              id_map: Optional[Sequence[int]] = None) -> torch.Tensor:
    """A mask file as class ids ``[H, W]`` (uint8 when every id fits, else int64); see the module table.

    Args:
        path: the mask file.
        num_classes: ids must lie in ``[0, num_classes)`` or equal ``ignore_index`` (after ``id_map``).
        ignore_index: the id of unlabelled pixels.
        threshold: binary masks: a stored grey value ``>= threshold`` is class 1, else class 0 (0..255; a 16-bit
            mask's values are compared as stored).
        id_map: stored value ``v`` -> ``id_map[v]`` (values beyond the table: ``ignore_index``).

    Raises:
        UnreadableFileError (a ``ValueError``): the file cannot be opened or decoded, or is not a regular file.
        ValueError: a JPEG mask without ``threshold``, a colour-coded mask, or ids out of range (each names the file,
            the values found and the fix).
    """
    path = os.fspath(path)
    if threshold is None and os.path.splitext(path)[1].lower() in LOSSY_MASK_EXTENSIONS:
        raise ValueError(f"mask {_fix_for_lossy(os.path.basename(path))} (the mask: '{path}')")
    arr = _open_ids(path, threshold)
    if threshold is not None:
        if arr.dtype == np.uint8 and threshold > 255:  # no stored value can reach it: every pixel would be class 0
            raise ValueError(f"{option('mask_threshold')} {threshold} is above 255, the largest value of the 8-bit "
                             f"mask '{path}': every pixel would be class 0. Fix: pass a grey value in 1..255 (e.g. "
                             f"{option('mask_threshold')} 128 for 0/255 masks).")
        arr = (arr >= threshold).astype(np.uint8)
    ids = torch.from_numpy(np.array(arr, copy=True))
    if id_map is not None:
        table = torch.as_tensor(list(id_map), dtype=torch.int64)
        big = ids.long()
        out = torch.full_like(big, ignore_index)
        inside = big < len(table)
        out[inside] = table[big[inside]]
        ids = out
    bad = ids.unique()
    bad = bad[(bad >= num_classes) & (bad != ignore_index)]
    if bad.numel():
        raise ValueError(f"mask '{path}' holds class ids {bad.tolist()[:10]}, outside [0, {num_classes}) and not the "
                         f"ignore index {ignore_index}. Fix: pass the right {option('num_classes')} / "
                         f"{option('ignore_index')} (or {option('layout')}), {option('mask_threshold')} T for a binary "
                         "0/255 mask, or remap those ids in the mask.")
    if ids.dtype != torch.uint8 and int(ids.max()) <= 255 and int(ids.min()) >= 0:
        ids = ids.to(torch.uint8)
    return ids


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample class ids ``[..., H, W]`` to ``size = (H', W')`` with ``nearest-exact`` (see the module doc); the
    dtype is kept. Ids stay ids (no blending)."""
    h, w = int(size[0]), int(size[1])
    if tuple(mask.shape[-2:]) == (h, w):
        return mask
    lead = mask.shape[:-2]
    x = mask.reshape(-1, 1, *mask.shape[-2:])
    # float32 holds every id below 2**24 exactly; uint8/int64 nearest-exact is not implemented on every device
    y = F.interpolate(x.float(), size=(h, w), mode="nearest-exact")
    return y.round().to(mask.dtype).reshape(*lead, h, w)


def resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize an image ``[..., C, H, W]`` (uint8 or float) to ``size = (H', W')``: bilinear, antialiased when
    shrinking (``F.interpolate(..., antialias=True)``, PIL's ``BILINEAR`` filter); uint8 stays uint8 (rounded)."""
    h, w = int(size[0]), int(size[1])
    if tuple(image.shape[-2:]) == (h, w):
        return image
    lead = image.shape[:-3]
    x = image.reshape(-1, *image.shape[-3:])
    y = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    if image.dtype == torch.uint8:
        y = y.round().clamp(0, 255).to(torch.uint8)
    return y.reshape(*lead, *y.shape[-3:])
