"""Segmentation data: image + mask pairs read from folders, seeded label fractions, joint augmentation.

Layouts (``layout=``, :data:`distill.vocab.SEG_LAYOUTS`) of one split ``S`` under ``root``:

- ``camvid``: ``root/S/NAME.{png,jpg,...}`` images and ``root/Sannot/NAME.png`` masks (SegNet's CamVid layout);
- ``images-masks``: ``root/S/images/NAME.*`` and ``root/S/masks/NAME.png``.

Images and masks are paired by file stem, so a JPEG image takes the PNG mask of the same name. A mask holds one
class id per pixel (a one-channel ``L`` or palette ``P`` PNG; an RGB file whose three channels are equal is read as
ids too); ``ignore_index`` marks pixels left out of the loss and the metrics. Every pair is read and checked when the
dataset is built (small segmentation sets fit in memory: CamVid at 240x180 is 121 MB as uint8), so a bad file stops
the run before training with an error naming it and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..augment import JointAugment  # noqa: F401 (its home is distill.augment; imported from here before)
from ..data import IMAGE_EXTENSIONS
from ..errors import DatasetNotFoundError
from ..vocab import SEG_LAYOUTS

#: CamVid's 11 classes (SegNet tutorial order); id 11 is void (the ignore index).
CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car", "pedestrian",
                  "bicyclist")
#: CamVid's colours (SegNet tutorial), one RGB triple per class id, then void.
CAMVID_PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 0))
CAMVID_IGNORE_INDEX = 11


def split_dirs(root: str | Path, split: str, layout: str) -> tuple[Path, Path]:
    """``(image folder, mask folder)`` of ``split`` under ``root`` in ``layout``.

    Raises:
        ValueError: an unknown ``layout``.
        DatasetNotFoundError: either folder is missing (both paths and the expected layout in the message).
    """
    root = Path(root).expanduser()
    if layout == "camvid":
        images, masks = root / split, root / f"{split}annot"
    elif layout == "images-masks":
        images, masks = root / split / "images", root / split / "masks"
    else:
        raise ValueError(f"--layout {layout!r} is not valid; valid: {', '.join(SEG_LAYOUTS)}.")
    for what, d in (("image", images), ("mask", masks)):
        if not d.is_dir():
            expected = (f"ROOT/{split}/ (images) and ROOT/{split}annot/ (masks)" if layout == "camvid" else
                        f"ROOT/{split}/images/ and ROOT/{split}/masks/")
            hint = (" For CamVid: `mkdir -p ~/.cache/distill && tar -xzf ../shared/data/camvid-240x180.tar.gz -C "
                    "~/.cache/distill` and --data-root ~/.cache/distill/camvid-240x180.") if layout == "camvid" else ""
            raise DatasetNotFoundError(f"{what} folder '{d}' of split {split!r} does not exist; layout {layout!r} "
                                       f"expects {expected}.{hint} Layouts: {', '.join(SEG_LAYOUTS)} (--layout).")
    return images, masks


def find_pairs(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` paths paired by stem, sorted by name.

    Raises:
        ValueError: an image without a mask or a mask without an image (the first few named, with the fix).
        DatasetNotFoundError: no images at all.
    """
    img = {p.stem: p for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    msk = {p.stem: p for p in sorted(masks.iterdir()) if p.suffix.lower() in (".png", ".bmp", ".tif", ".tiff")}
    if not img:
        raise DatasetNotFoundError(f"no images with extensions {IMAGE_EXTENSIONS} in '{images}'.")
    lonely = sorted(set(img) - set(msk))
    if lonely:
        raise ValueError(f"image '{img[lonely[0]]}' has no mask in '{masks}' ({len(lonely)} such images: "
                         f"{', '.join(lonely[:5])}). Fix: add a lossless mask of the same name (NAME.png, one class "
                         f"id per pixel), or remove the image.")
    orphans = sorted(set(msk) - set(img))
    if orphans:
        raise ValueError(f"mask '{msk[orphans[0]]}' has no image in '{images}' ({len(orphans)} such masks: "
                         f"{', '.join(orphans[:5])}). Fix: add the image of the same name, or remove the mask.")
    return [(img[s], msk[s]) for s in sorted(img)]


def read_mask(path: str | Path, num_classes: int, ignore_index: int) -> torch.Tensor:
    """A mask file as class ids, uint8 ``[H, W]`` (int64 where ids exceed 255).

    Raises:
        ValueError: the file is a colour-coded RGB(A) mask, or holds ids ``>= num_classes`` that are not
            ``ignore_index`` (the file, the ids found and the fix in the message).
    """
    from PIL import Image

    with Image.open(path) as im:
        mode = im.mode
        arr = np.asarray(im)
    if arr.ndim == 3:
        rgb = arr[..., :3]
        if not ((rgb == rgb[..., :1]).all()):
            raise ValueError(f"mask '{path}' is a colour-coded {mode} image; masks must hold one class id per pixel "
                             f"(a one-channel PNG, mode L or P). Fix: map each colour to its class id (e.g. CamVid's "
                             f"palette in distill.segment.data.CAMVID_PALETTE) and save it as a one-channel PNG.")
        arr = rgb[..., 0]
    ids = torch.from_numpy(np.array(arr, copy=True))
    bad = ids.unique()
    bad = bad[(bad >= num_classes) & (bad != ignore_index)]
    if bad.numel():
        raise ValueError(f"mask '{path}' holds class ids {bad.tolist()[:10]}, outside [0, {num_classes}) and not the "
                         f"ignore index {ignore_index}. Fix: pass the right --num-classes / --ignore-index, or remap "
                         f"those ids in the mask.")
    return ids


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as RGB uint8 ``[3, H, W]``."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class SegmentationFolder(Dataset):
    """Image + mask pairs of one split, read into memory and checked when built.

    Items are ``(image uint8 [3, H, W], mask int64 [H, W])``.

    Args:
        root: the dataset folder (holding the splits).
        split: e.g. ``'train'``, ``'val'``, ``'test'``.
        num_classes: classes in the masks (ids ``0 .. num_classes - 1``).
        ignore_index: the id of unlabelled pixels (CamVid: 11).
        layout: one of :data:`distill.vocab.SEG_LAYOUTS`.

    Raises:
        DatasetNotFoundError: a folder is missing or holds no images.
        ValueError: an unpaired image or mask, a mask whose size differs from its image, a colour mask, or class ids
            out of range (each names the file and the fix).
    """

    def __init__(self, root: str | Path, split: str, num_classes: int, ignore_index: int, layout: str = "camvid"):
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"--num-classes must be an integer >= 2; got {num_classes!r}.")
        self.root, self.split, self.layout = Path(root).expanduser(), split, layout
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.pairs = find_pairs(*split_dirs(root, split, layout))
        self.images, self.masks = [], []
        for ip, mp in self.pairs:
            image, mask = read_image(ip), read_mask(mp, num_classes, ignore_index)
            if tuple(image.shape[1:]) != tuple(mask.shape):
                raise ValueError(f"mask '{mp}' is {mask.shape[1]}x{mask.shape[0]} px but its image '{ip}' is "
                                 f"{image.shape[2]}x{image.shape[1]}. Fix: resize the mask with nearest neighbour to "
                                 f"the image's size (or re-export both at one size).")
            self.images.append(image)
            self.masks.append(mask)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        return self.images[i], self.masks[i].long()


def collate_pairs(batch):
    """Stack ``(image, mask)`` pairs: ``(uint8 [B, 3, H, W], int64 [B, H, W])``; different sizes are an error."""
    images, masks = zip(*batch)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images in one batch have different sizes {sorted(shapes)}; segmentation batches need one "
                         f"size: resize the dataset to one size first (e.g. CamVid's 240x180 copy).")
    return torch.stack(images), torch.stack(masks)


def image_subset(ds: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """A seeded random ``fraction`` of the *images* (each keeps its whole mask; at least one image);
    ``fraction=1`` returns ``ds`` itself. The chosen indices depend only on ``(len(ds), fraction, seed)``.

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    if not (0.0 < float(fraction) <= 1.0):
        raise ValueError(f"--fraction {fraction!r} is outside (0, 1]; give the share of training masks to use, "
                         f"e.g. 0.1 for 10% or 1.0 for all.")
    if float(fraction) == 1.0:
        return ds
    n = max(1, round(float(fraction) * len(ds)))
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, torch.randperm(len(ds), generator=g)[:n].sort().values.tolist())


def read_class_names(path: Optional[str], num_classes: int) -> tuple[str, ...]:
    """Class names, one per line of ``path``; default: ``class0 ..``. ``num_classes`` lines are required.

    Raises:
        ValueError: the file holds a different number of names.
    """
    if path is None:
        return tuple(f"class{i}" for i in range(num_classes))
    names = tuple(line.strip() for line in Path(path).expanduser().read_text().splitlines() if line.strip())
    if len(names) != num_classes:
        raise ValueError(f"--class-names '{path}' lists {len(names)} names but --num-classes is {num_classes}; give "
                         f"one name per line, one line per class (not the ignore index).")
    return names


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """A fixed, seeded colour per class id (``num_classes`` colours, then black for the ignore index)."""
    g = np.random.default_rng(0)
    return [tuple(int(v) for v in g.integers(40, 256, 3)) for _ in range(num_classes)] + [(0, 0, 0)]


@dataclass
class SegData:
    train: Dataset  # the labelled subset
    test: Dataset
    full_train_size: int
    classes: tuple
    palette: list
    ignore_index: int


def seg_data(root: str, layout: str, fraction: float, seed: int, num_classes: int, ignore_index: int,
             eval_split: str = "test", class_names: Optional[str] = None) -> SegData:
    """The labelled training subset (a seeded ``fraction`` of the train images) and the full ``eval_split``.

    CamVid's class names and palette are used when ``layout='camvid'``, 11 classes and ignore index 11.
    """
    full = SegmentationFolder(root, "train", num_classes, ignore_index, layout)
    test = SegmentationFolder(root, eval_split, num_classes, ignore_index, layout)
    camvid = layout == "camvid" and num_classes == len(CAMVID_CLASSES) and ignore_index == CAMVID_IGNORE_INDEX
    classes = CAMVID_CLASSES if camvid and class_names is None else read_class_names(class_names, num_classes)
    palette = list(CAMVID_PALETTE) if camvid else default_palette(num_classes)
    return SegData(image_subset(full, fraction, seed), test, len(full), classes, palette, ignore_index)
