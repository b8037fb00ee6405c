"""Datasets of encoded images, decoded on access: the part image folders, file lists and Hugging Face datasets share.

A `DecodedImages` returns ``(uint8 [C, H, W], label)`` (label ``-1`` when unlabelled) with every image at one
size: ``size`` when given (decode-time resize, `distill.data.decode.fit`), else the size of the dataset's first
readable image (images of another size are brought to it the same way), so any mix of image sizes stacks into a
batch. The teacher and the student then get their own sizes from that batch, on the device.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch.utils.data import Dataset

from ..errors import UnreadableFileError
from ..vocab import IMAGE_RESIZE, ON_BAD_IMAGE
from .decode import decode_image

_logger = logging.getLogger(__name__)


class DecodedImages(Dataset):
    """Base of the file-backed datasets. Subclasses set ``self.labels`` (int64 ``[N]``), ``self.classes`` and
    implement `source` (what `decode_image` reads for item ``i``, and its name in messages).

    Args:
        channels: 1 or 3 (see `decode_image`).
        size: None, an int (square) or ``(H, W)``: the decode size (see the module doc).
        resize: ``'center-crop'`` or ``'squash'``.
        min_side: images with a shorter side below this (px) are degenerate: skipped or refused like unreadable ones.
        on_error: ``'skip'`` replaces an unreadable or degenerate image by the next readable one (a warning names
            the file; counted in ``self.num_skipped``); ``'raise'`` raises an error naming the file.
    """

    labels: torch.Tensor
    classes: tuple = ()
    #: what the source lists but the dataset cannot read, found when it is listed (a truncated shard, a symlink
    #: loop): one line each, naming the file and the cause (`left_out`)
    left_out_lines: tuple = ()

    def _setup(self, channels: int, size, resize: str, min_side: int, on_error: str) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} is not valid; use 1 (grayscale) or 3 (RGB).")
        if on_error not in ON_BAD_IMAGE:
            raise ValueError(f"on_error={on_error!r} is not valid; valid: {', '.join(ON_BAD_IMAGE)}.")
        if resize not in IMAGE_RESIZE:
            raise ValueError(f"resize={resize!r} is not valid; valid: {', '.join(IMAGE_RESIZE)}.")
        if size is not None and (isinstance(size, int) and size < 1 or not isinstance(size, int) and min(size) < 1):
            raise ValueError(f"size={size!r} is not valid; give a positive int (square), (H, W), or None.")
        if int(min_side) < 1:
            raise ValueError(f"min_side={min_side!r} is not valid; give a positive number of pixels (1 = any).")
        self.channels, self.resize, self.min_side, self.on_error = channels, resize, int(min_side), on_error
        self.num_skipped, self._warned = 0, set()
        self.size = size
        if size is None and len(self) > 0:
            self.size = self._reference_size()

    def leave_out(self, lines: list, on_error: str) -> None:
        """Record what the source lists but cannot be read (``lines``: one per file, naming it and the cause),
        found when listing: each logged as a warning (``on_error='skip'``), or the first raised (``'raise'``).

        Raises:
            UnreadableFileError: ``on_error='raise'`` and ``lines`` is not empty.
        """
        if lines and on_error == "raise":
            raise UnreadableFileError(f"{lines[0]} (on_error='raise')", None)
        for line in lines:
            _logger.warning("%s", line)
        self.left_out_lines = tuple(self.left_out_lines) + tuple(lines)

    def left_out(self) -> str:
        """``''`` when the dataset reads everything its source lists, else one line saying how many items were
        left out and why (for the run's log): ``'data: 13 images read; left out: shard ... is cut short ...'``."""
        if not self.left_out_lines:
            return ""
        return (f"data: {len(self)} images read; {len(self.left_out_lines)} file(s) left out: "
                f"{'; '.join(self.left_out_lines)}")

    def source(self, i: int):
        """``(source, name)``: a path or bytes `decode_image` reads, and how messages name it."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def _reference_size(self) -> tuple[int, int]:
        """The native ``(H, W)`` of the first readable image: what the others are brought to when size is None."""
        for i in range(len(self)):
            src, name = self.source(i)
            try:
                a = decode_image(src, self.channels, None, self.resize, self.min_side, name)
            except UnreadableFileError as e:
                if self.on_error == "raise":
                    raise
                _logger.warning("skipping %s", e)
                continue
            return tuple(a.shape[:2])
        raise UnreadableFileError(f"no readable image among the {len(self)} of this dataset (the first: "
                                  f"'{self.source(0)[1]}').", None)

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 ``[C, H, W]`` at the dataset's size. Raises UnreadableFileError naming the file."""
        src, name = self.source(i)
        a = decode_image(src, self.channels, self.size, self.resize, self.min_side, name)
        return torch.from_numpy(a).permute(2, 0, 1).contiguous()  # (H, W, C) -> (C, H, W)

    def __getitem__(self, i: int):
        n = len(self)
        for k in range(n):
            j = (i + k) % n
            try:
                return self.load(j), int(self.labels[j])
            except UnreadableFileError as e:
                if self.on_error == "raise":
                    raise
                self.num_skipped += 1
                if j not in self._warned:  # once per image and process, not at every epoch
                    self._warned.add(j)
                    _logger.warning("skipping %s", e)
        raise UnreadableFileError(f"no readable image in this dataset of {n} images (on_error='skip').", None)
