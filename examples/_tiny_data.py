"""Tiny synthetic data sets the examples write with ``--tiny`` when no ``--data-root`` is given, so that each example
runs in seconds without a download: coloured squares, discs and bars on noise (classification, image-folder layout)
and the same shapes with their masks (segmentation, images-masks layout). Not for measuring anything."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("square", "disc", "bar")
COLOURS = ((230, 40, 40), (40, 60, 230), (40, 200, 60))


def _shape(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    """A boolean mask [h, w] of one shape of class ``cls`` at a random place and size."""
    yy, xx = np.mgrid[:h, :w]
    s = int(rng.integers(h // 4, h // 2))
    y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
    if cls == 0:
        return (yy >= y) & (yy < y + s) & (xx >= x) & (xx < x + s)
    if cls == 1:
        return (yy - y - s / 2) ** 2 + (xx - x - s / 2) ** 2 <= (s / 2) ** 2
    return (yy >= y) & (yy < y + max(2, s // 4)) & (xx >= 0) & (xx < w)


def shapes_folder(root, per_class: int = 4, size: int = 32, seed: int = 0) -> Path:
    """``root/{train,test}/{square,disc,bar}/*.png``: ``per_class`` RGB images per class and split."""
    rng, root = np.random.default_rng(seed), Path(root)
    for split in ("train", "test"):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
                img[_shape(rng, c, size, size)] = COLOURS[c]
                Image.fromarray(img).save(root / split / name / f"{i:03d}.png")
    return root


def segmentation_folder(root, per_split: int = 6, size: int = 32, seed: int = 0) -> Path:
    """``root/{train,test}/{images,masks}/*.png`` (images-masks layout): class ids 0 background, 1 square, 2 disc,
    3 bar in 8-bit grey masks; and ``root/classes.txt``, one class name per line."""
    rng, root = np.random.default_rng(seed), Path(root)
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(per_split):
            img = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            for c in range(len(CLASSES)):
                region = _shape(rng, c, size, size)
                img[region], mask[region] = COLOURS[c], c + 1
            Image.fromarray(img).save(root / split / "images" / f"{i:03d}.png")
            Image.fromarray(mask, mode="L").save(root / split / "masks" / f"{i:03d}.png")
    (root / "classes.txt").write_text("\n".join(("background",) + CLASSES) + "\n")
    return root
