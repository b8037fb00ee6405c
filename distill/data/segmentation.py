"""Image + mask pairs of one segmentation split (`SegmentationFolder`), checked when built, and the batching
of pairs of mixed sizes.

Images are decoded by `decode_image` (every PIL mode to 8 bits, EXIF orientation, alpha,
CMYK; an unreadable file is named), masks by `read_mask` (ids, palette indices, 16-bit ids,
binary masks through a threshold, a layout's id table). With ``size=H`` each image and its mask are resized to ``H``
px high, keeping the image's aspect (image bilinear antialiased, mask ``nearest-exact``); a mask stored at another
resolution of the same aspect is resized with its image. Without ``size`` all images must share one size.

Batching: `CropPadCollate` brings every training pair to one size (random crop where larger, padding where
smaller: image 0, mask the ignore index), `size_batches` groups evaluation images of equal size so every pixel
of every image is scored at its own size, and `pad_pairs` pads a few pairs into one picture grid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import option
from .decode import decode_image
from .masks import read_mask, resize_image, resize_mask
from .seglayouts import layout_info, split_pairs

#: Decoded pairs kept in memory up to this many bytes per split; beyond it, pairs are read again when used.
MEMORY_LIMIT = 2 << 30


def resized_size(height: int, width: int, size: Optional[int]) -> tuple[int, int]:
    """``(H, W)`` an image of ``height x width`` is brought to: ``size`` px high, width by the aspect (at least 1)."""
    if size is None:
        return height, width
    return int(size), max(1, round(width * size / height))


def _same_aspect(a: Sequence[int], b: Sequence[int]) -> bool:
    """Two ``(H, W)`` of one aspect, up to the rounding of the smaller one (one pixel)."""
    return abs(a[1] * b[0] - b[1] * a[0]) <= max(a[0], b[0])


class SegmentationFolder(Dataset):
    """The image + mask pairs of one split, every pair read and checked when built.

    Items are ``(image uint8 [3, H, W], mask int64 [H, W])``; ``self.sizes[i]`` is item ``i``'s ``(H, W)``.

    Args:
        root: the dataset folder (see `distill.data.seglayouts` for each layout's tree).
        split: ``'train'``, ``'val'``, ``'test'`` (read as given: the caller resolves a fallback).
        num_classes: class ids ``0 .. num_classes - 1``.
        ignore_index: the id of unlabelled pixels.
        layout: one of `distill.vocab.SEG_LAYOUTS`; its id table (ADE20K, Cityscapes) is applied.
        size: resize every pair to this height (aspect kept), or None (the files' own size, one for all).
        mask_threshold: binary masks: grey ``>= T`` is class 1 (see `read_mask`).

    Raises:
        DatasetNotFoundError: the split or its images are missing.
        UnreadableFileError (a ``ValueError``): an image or mask that cannot be read (named).
        ValueError: an unpaired image or mask, a mask of another size (or aspect) than its image, a JPEG mask without
            a threshold, a colour mask, ids out of range, or images of different sizes without ``size`` (each names the
            file(s) and the fix).
    """

    def __init__(self, root: str | Path, split: str, num_classes: int, ignore_index: int, layout: str = "camvid",
                 size: Optional[int] = None, mask_threshold: Optional[int] = None):
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"{option('num_classes')} must be an integer >= 2; got {num_classes!r}.")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{option('size')} must be a positive integer (pixels high); got {size!r}.")
        self.root, self.split, self.layout = Path(root).expanduser(), split, layout
        self.num_classes, self.ignore_index, self.size = num_classes, ignore_index, size
        self.mask_threshold, self.id_map = mask_threshold, layout_info(layout).id_map
        self.pairs = split_pairs(self.root, split, layout)
        self._cache: list = []
        self.sizes: list[tuple[int, int]] = []
        used = 0
        for i in range(len(self.pairs)):
            image, mask = self._read(i)
            self.sizes.append(tuple(image.shape[-2:]))
            used += image.numel() + mask.numel() * mask.element_size()
            self._cache.append((image, mask) if used <= MEMORY_LIMIT else None)
        if size is None:
            check_one_size([self], "")

    def _read(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ip, mp = self.pairs[i]
        image = torch.from_numpy(decode_image(ip, 3)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        mask = read_mask(mp, self.num_classes, self.ignore_index, self.mask_threshold, self.id_map)
        hw, mhw = tuple(image.shape[-2:]), tuple(mask.shape)
        if hw != mhw and (self.size is None or not _same_aspect(hw, mhw)):
            fix = (f"pass {option('size')} H to resize both to H px high (they have one aspect)"
                   if _same_aspect(hw, mhw) else
                   "resize the mask with nearest neighbour to the image's size (or re-export both at one size)")
            raise ValueError(f"mask '{mp}' is {mhw[1]}x{mhw[0]} px but its image '{ip}' is {hw[1]}x{hw[0]}. Fix: "
                             f"{fix}.")
        target = resized_size(*hw, self.size)
        return resize_image(image, target), resize_mask(mask, target)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        item = self._cache[i]
        image, mask = item if item is not None else self._read(i)
        return image, mask.long()


def check_one_size(datasets: Sequence[SegmentationFolder], fix_hint: str = "") -> None:
    """Refuse images of different sizes across ``datasets`` (read without ``size``), naming two files and the fix.

    Raises:
        ValueError: two sizes found.
    """
    first = None
    for ds in datasets:
        for (ip, _), hw in zip(ds.pairs, ds.sizes):
            if first is None:
                first = (ip, hw)
            elif hw != first[1]:
                raise ValueError(f"images of different sizes: '{first[0]}' is {first[1][1]}x{first[1][0]} px and "
                                 f"'{ip}' is {hw[1]}x{hw[0]}. Fix: pass {option('size')} H (every image and mask "
                                 "resized to H px high, aspect kept; training crops or pads to one size, evaluation "
                                 f"scores each image at its own size){fix_hint}.")


def collate_pairs(batch):
    """Stack ``(image, mask)`` pairs: ``(uint8 [B, 3, H, W], int64 [B, H, W])``; different sizes are an error."""
    images, masks = zip(*batch)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images in one batch have different sizes {sorted(shapes)}; batch pairs of one size "
                         f"(size_batches), or bring them to one (CropPadCollate, {option('size')}).")
    return torch.stack(images), torch.stack(masks)


def _pad(image: torch.Tensor, mask: torch.Tensor, h: int, w: int, ignore_index: int):
    """Pad bottom/right to at least ``h x w``: the image with 0, the mask with ``ignore_index``."""
    ph, pw = max(0, h - image.shape[-2]), max(0, w - image.shape[-1])
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0)
        mask = F.pad(mask, (0, pw, 0, ph), value=ignore_index)
    return image, mask


class CropPadCollate:
    """Training batches of one size ``(H, W)``: a pair larger than it is cropped at a random place (drawn from this
    collate's own generator, seeded), a smaller one padded bottom/right (image 0, mask ``ignore_index``, so padding
    is out of the loss); a pair of that size is left as it is.

    ``__call__(batch of (uint8 [3, h, w], int64 [h, w])) -> (uint8 [B, 3, H, W], int64 [B, H, W])``.
    """

    def __init__(self, size: Sequence[int], ignore_index: int, seed: int = 0):
        self.size, self.ignore_index = (int(size[0]), int(size[1])), ignore_index
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch):
        h, w = self.size
        out = []
        for image, mask in batch:
            if tuple(image.shape[-2:]) != (h, w):
                image, mask = _pad(image, mask, h, w, self.ignore_index)
                top = int(torch.randint(0, image.shape[-2] - h + 1, (1,), generator=self.generator))
                left = int(torch.randint(0, image.shape[-1] - w + 1, (1,), generator=self.generator))
                image, mask = image[:, top:top + h, left:left + w], mask[top:top + h, left:left + w]
            out.append((image, mask))
        return collate_pairs(out)


def size_batches(sizes: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Evaluation batches (lists of indices, for ``DataLoader(batch_sampler=...)``): images of one size together,
    sizes in order of first appearance, each index exactly once; a batch holds at most ``batch_size`` images."""
    groups: dict = {}
    for i, hw in enumerate(sizes):
        groups.setdefault(tuple(hw), []).append(i)
    return [idx[k:k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]


def pad_pairs(batch, ignore_index: int):
    """Stack pairs of any sizes, each padded bottom/right to the largest (image 0, mask ``ignore_index``)."""
    h = max(im.shape[-2] for im, _ in batch)
    w = max(im.shape[-1] for im, _ in batch)
    return collate_pairs([_pad(im, m, h, w, ignore_index) for im, m in batch])
