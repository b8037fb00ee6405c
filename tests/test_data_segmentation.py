"""distill.data.segmentation: images through the package's one decoder (16-bit scaled, EXIF orientation), bad files
named when the split is built, --size for pairs of mixed sizes and masks stored at a lower resolution, mixed sizes
refused without it, and the batching of mixed sizes (crop/pad for training, size groups for evaluation)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import decode_image
from distill.data.masks import resize_image, resize_mask
from distill.data.segmentation import CropPadCollate, SegmentationFolder, pad_pairs, size_batches
from distill.errors import UnreadableFileError
from distill.segment.data import seg_data

from ._segment import IGNORE, NUM_CLASSES, write_shapes


@pytest.fixture
def shapes(tmp_path):
    return write_shapes(tmp_path / "shapes", {"train": 3, "test": 2})


def test_images_are_decoded_like_every_other_source(shapes):
    """A 16-bit PNG is scaled (not clipped to white) and an EXIF-rotated JPEG is used upright."""
    grey = np.random.default_rng(0).integers(0, 256, (32, 40)).astype(np.uint16)
    Image.fromarray(grey * 257).save(shapes / "train" / "im000.png")
    upright = np.zeros((40, 32, 3), np.uint8)  # portrait, stored landscape with orientation 8 (rotate 90 CW)
    upright[:20] = 255
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = 8
    stored.save(shapes / "train" / "im001.jpg", exif=exif.tobytes(), quality=95)
    (shapes / "train" / "im001.png").unlink()
    Image.fromarray(np.zeros((40, 32), np.uint8)).save(shapes / "trainannot" / "im001.png")
    ds = SegmentationFolder(shapes, "train", NUM_CLASSES, IGNORE, size=32)
    image0, _ = ds[0]
    assert torch.equal(image0, torch.from_numpy(decode_image(shapes / "train" / "im000.png")).permute(2, 0, 1))
    assert (image0 == 255).float().mean() < 0.05
    image1, mask1 = ds[1]
    assert image1.shape == (3, 32, 26) and mask1.shape == (32, 26)  # upright: portrait, resized to 32 high
    assert image1[:, :14].float().mean() > 200 and image1[:, 18:].float().mean() < 50


@pytest.mark.parametrize("bad", ["zero", "truncated", "symlink-loop", "directory", "bomb"])
def test_unreadable_image_is_named_when_the_split_is_built(shapes, bad, monkeypatch):
    path = shapes / "train" / "im001.png"
    path.unlink()
    if bad == "zero":
        path.write_bytes(b"")
    elif bad == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40, 3)).astype(np.uint8)).save(shapes / "f.png")
        path.write_bytes((shapes / "f.png").read_bytes()[:2000])
    elif bad == "symlink-loop":
        os.symlink(path, path)
    elif bad == "directory":
        path.mkdir()
    else:
        Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(path)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1300)  # 5120 px > 2 x 1300: PIL's DecompressionBombError
    with pytest.raises(UnreadableFileError, match=r"cannot read image '.*train/im001\.png'"):
        SegmentationFolder(shapes, "train", NUM_CLASSES, IGNORE)


def test_size_resizes_each_pair_and_a_lower_resolution_mask_with_its_image(shapes):
    mask = np.array(Image.open(shapes / "trainannot" / "im002.png"))
    Image.fromarray(mask[::2, ::2]).save(shapes / "trainannot" / "im002.png")  # 20x16: the image's aspect
    with pytest.raises(ValueError, match=r"im002\.png' is 20x16 px but its image .* is 40x32\. Fix: pass size H"):
        SegmentationFolder(shapes, "train", NUM_CLASSES, IGNORE)
    Image.fromarray(mask[:, :30]).save(shapes / "trainannot" / "im001.png")  # another aspect: refused even so
    with pytest.raises(ValueError, match=r"im001\.png' is 30x32 px .* is 40x32\. Fix: resize the mask with nearest"):
        SegmentationFolder(shapes, "train", NUM_CLASSES, IGNORE, size=24)
    Image.fromarray(mask).save(shapes / "trainannot" / "im001.png")
    ds = SegmentationFolder(shapes, "train", NUM_CLASSES, IGNORE, size=24)
    assert ds.sizes == [(24, 30)] * 3
    image = torch.from_numpy(decode_image(shapes / "train" / "im002.png")).permute(2, 0, 1)
    assert torch.equal(ds[2][0], resize_image(image, (24, 30)))
    assert torch.equal(ds[2][1], resize_mask(torch.from_numpy(mask[::2, ::2]), (24, 30)).long())


def test_mixed_sizes_are_refused_without_size_naming_two_files(tmp_path):
    root = write_shapes(tmp_path / "d", {"train": 2, "test": 1})
    img = np.zeros((20, 40, 3), np.uint8)
    Image.fromarray(img).save(root / "test" / "im000.png")
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(root / "testannot" / "im000.png")
    with pytest.raises(ValueError, match=r"different sizes: '.*train/im000\.png' is 40x32 px and '.*test/im000\.png' "
                                         r"is 40x20\. Fix: pass size H"):
        seg_data(str(root), "camvid", 1.0, 0, NUM_CLASSES, IGNORE)
    data = seg_data(str(root), "camvid", 1.0, 0, NUM_CLASSES, IGNORE, size=16)
    assert data.test.sizes == [(16, 32)] and data.train_size == (16, 20)


def test_crop_pad_collate_and_size_batches():
    big = (torch.arange(3 * 6 * 8, dtype=torch.uint8).view(3, 6, 8), torch.ones(6, 8, dtype=torch.int64))
    small = (torch.full((3, 2, 3), 7, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.int64))
    same = (torch.zeros(3, 4, 5, dtype=torch.uint8), torch.full((4, 5), 2, dtype=torch.int64))
    images, masks = CropPadCollate((4, 5), ignore_index=9, seed=0)([big, small, same])
    assert images.shape == (3, 3, 4, 5) and masks.shape == (3, 4, 5)
    crop = images[0, 0]  # a window of the big image: consecutive values along a row
    assert ((crop[:, 1:].int() - crop[:, :-1].int()) == 1).all() and (masks[0] == 1).all()
    assert (images[1, :, :2, :3] == 7).all() and (images[1, :, 2:] == 0).all() and (images[1, :, :, 3:] == 0).all()
    assert (masks[1, :2, :3] == 0).all() and (masks[1, 2:] == 9).all() and (masks[1, :, 3:] == 9).all()
    assert torch.equal(images[2], same[0]) and torch.equal(masks[2], same[1])
    sizes = [(4, 6), (6, 4), (4, 6), (4, 6), (6, 4)]
    batches = size_batches(sizes, 2)
    assert sorted(i for b in batches for i in b) == list(range(5))  # every image once
    assert all(len({sizes[i] for i in b}) == 1 and len(b) <= 2 for b in batches)
    padded = pad_pairs([small, same], 9)
    assert padded[0].shape == (2, 3, 4, 5) and (padded[1][0, 2:] == 9).all()
