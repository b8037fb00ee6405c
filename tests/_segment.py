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
