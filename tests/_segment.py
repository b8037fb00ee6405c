"""A tiny synthetic segmentation set written in the test: squares (class 1) and discs (class 2) of class-dependent
colours on a noisy background (class 0), a one-pixel void border (ignore index 3), CamVid or images/masks layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np

NUM_CLASSES, IGNORE = 3, 3


def shapes_pair(rng: np.random.Generator, h: int = 32, w: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image uint8 [h, w, 3], mask uint8 [h, w])`` pair."""
    img = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for cls, colour in ((1, (230, 40, 40)), (2, (40, 60, 230))):
        s = int(rng.integers(7, 13))
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        if cls == 1:
            region = (yy >= y) & (yy < y + s) & (xx >= x) & (xx < x + s)
        else:
            region = (yy - y - s / 2) ** 2 + (xx - x - s / 2) ** 2 <= (s / 2) ** 2
        mask[region] = cls
        img[region] = np.clip(np.array(colour) + rng.integers(-25, 25, (int(region.sum()), 3)), 0, 255)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = IGNORE
    return img, mask


def write_shapes(root: Path, n: dict, layout: str = "camvid", seed: int = 0, image_ext: str = ".png") -> Path:
    """``n``: images per split, e.g. ``{'train': 24, 'test': 8}``; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in n.items():
        if layout == "camvid":
            di, dm = root / split, root / f"{split}annot"
        else:
            di, dm = root / split / "images", root / split / "masks"
        di.mkdir(parents=True, exist_ok=True)
        dm.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, mask = shapes_pair(rng)
            Image.fromarray(img).save(di / f"im{i:03d}{image_ext}", **({"quality": 95} if image_ext == ".jpg" else {}))
            Image.fromarray(mask, mode="L").save(dm / f"im{i:03d}.png")
    return root


def voc_palette_png(ids: np.ndarray, path: Path) -> None:
    """Save class ids as a palette PNG (mode P) with VOC's colour map, as VOC's SegmentationClass/ holds them."""
    from PIL import Image

    from distill.data.seglayouts import voc_palette

    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    im.putpalette([c for rgb in voc_palette(256) for c in rgb])
    im.save(path)


def write_voc(root: Path, sizes: dict, seed: int = 0) -> Path:
    """A tiny ``VOCdevkit/VOC2012`` tree: ``sizes = {'train': [(h, w), ...], 'val': [...]}``; masks are palette PNGs
    with ids 0..2 and a 255 border around each object. Returns the VOCdevkit folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    k = 0
    for split, shapes in sizes.items():
        ids = []
        for h, w in shapes:
            name = f"2007_{k:06d}"
            k += 1
            img, mask = shapes_pair(rng, h, w)
            mask[mask == IGNORE] = 0
            border = np.zeros_like(mask, bool)
            border[1:] |= mask[1:] != mask[:-1]
            mask[border] = 255
            Image.fromarray(img).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            voc_palette_png(mask, voc / "SegmentationClass" / f"{name}.png")
            ids.append(name)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root / "VOCdevkit"
