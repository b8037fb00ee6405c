"""distill.segment.data: pairing by stem (JPEG images + PNG masks), both layouts, every bad-input error names the
file and the fix, seeded image fractions, and joint augmentation keeps image and mask aligned."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from distill.augment import JointAugment
from distill.segment.data import SegmentationFolder, image_subset, read_class_names, read_mask, seg_data

from ._segment import IGNORE, NUM_CLASSES, write_shapes


@pytest.fixture
def shapes(tmp_path):
    return write_shapes(tmp_path / "shapes", {"train": 6, "test": 3})


def test_reads_pairs_as_uint8_images_and_int64_masks(shapes):
    ds = SegmentationFolder(shapes, "train", NUM_CLASSES, IGNORE)
    image, mask = ds[0]
    assert len(ds) == 6 and image.dtype == torch.uint8 and image.shape == (3, 32, 40)
    assert mask.dtype == torch.int64 and mask.shape == (32, 40)
    expected = np.array(Image.open(shapes / "trainannot" / "im000.png"))
    assert torch.equal(mask, torch.from_numpy(expected).long())
    assert set(mask.unique().tolist()) <= {0, 1, 2, IGNORE}


@pytest.mark.parametrize("layout,ext", [("camvid", ".jpg"), ("images-masks", ".png"), ("images-masks", ".jpg")])
def test_layouts_and_jpeg_images_pair_with_png_masks(tmp_path, layout, ext):
    root = write_shapes(tmp_path / "d", {"train": 4, "test": 2}, layout=layout, image_ext=ext)
    data = seg_data(str(root), layout, 1.0, 0, NUM_CLASSES, IGNORE)
    assert len(data.train) == 4 and len(data.test) == 2
    assert [p[0].suffix for p in data.test.pairs] == [ext, ext]


def test_image_without_mask_and_mask_without_image_are_named(shapes):
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(shapes / "train" / "lonely.jpg")
    with pytest.raises(ValueError, match=r"lonely\.jpg' has no mask.*Fix"):
        SegmentationFolder(shapes, "train", NUM_CLASSES, IGNORE)
    (shapes / "train" / "lonely.jpg").unlink()
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(shapes / "trainannot" / "orphan.png")
    with pytest.raises(ValueError, match=r"orphan\.png' has no image.*Fix"):
        SegmentationFolder(shapes, "train", NUM_CLASSES, IGNORE)


def test_class_ids_out_of_range_are_refused_but_the_ignore_index_is_not(tmp_path):
    path = tmp_path / "m.png"
    arr = np.zeros((4, 4), np.uint8)
    arr[0, 0], arr[1, 1] = IGNORE, 7
    Image.fromarray(arr).save(path)
    with pytest.raises(ValueError, match=r"m\.png' holds class ids \[7\], outside \[0, 3\).*ignore index 3.*Fix"):
        read_mask(path, NUM_CLASSES, IGNORE)
    arr[1, 1] = 2
    Image.fromarray(arr).save(path)
    assert read_mask(path, NUM_CLASSES, IGNORE).tolist() == arr.tolist()


def test_colour_mask_is_refused_and_grey_rgb_and_palette_masks_are_ids(tmp_path):
    ids = np.array([[0, 1], [2, 3]], np.uint8)
    colour = np.stack([ids * 60, ids * 10, 255 - ids * 50], -1).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match=r"colour\.png' is a colour-coded RGB image.*one-channel PNG"):
        read_mask(tmp_path / "colour.png", NUM_CLASSES, IGNORE)
    Image.fromarray(np.repeat(ids[..., None], 3, -1)).save(tmp_path / "grey.png")
    assert read_mask(tmp_path / "grey.png", NUM_CLASSES, IGNORE).tolist() == ids.tolist()
    p = Image.fromarray(ids, mode="P")
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0])
    p.save(tmp_path / "palette.png")
    assert read_mask(tmp_path / "palette.png", NUM_CLASSES, IGNORE).tolist() == ids.tolist()


def test_image_subset_is_seeded_and_sized():
    ds = list(range(367))
    a, b, c = image_subset(ds, 0.1, 0), image_subset(ds, 0.1, 0), image_subset(ds, 0.1, 1)
    assert len(a) == round(36.7) and a.indices == b.indices and a.indices != c.indices
    assert len(set(a.indices)) == len(a.indices) and image_subset(ds, 1.0, 0) is ds
    assert len(image_subset(ds, 1e-4, 0)) == 1
    with pytest.raises(ValueError, match=r"fraction 0 is outside \(0, 1\]"):
        image_subset(ds, 0, 0)


def test_class_names_file_must_have_one_name_per_class(tmp_path):
    (tmp_path / "names.txt").write_text("bg\nsquare\n")
    with pytest.raises(ValueError, match=r"lists 2 names but num_classes is 3"):
        read_class_names(str(tmp_path / "names.txt"), 3)


@pytest.mark.parametrize("seed", range(4))
def test_joint_augmentation_keeps_image_and_mask_aligned(seed):
    """Property: an image whose pixel values encode the mask's class ids still encodes the augmented mask after the
    augmentation, wherever the image is not a bilinear blend of two classes (away from class borders)."""
    g = torch.Generator().manual_seed(seed)
    # blocky masks (8x8 cells), so most pixels lie away from a border
    cells = torch.randint(0, 5, (4, 1, 6, 8), generator=g).float()
    masks = torch.nn.functional.interpolate(cells, scale_factor=8, mode="nearest")[:, 0].long()  # (4, 48, 64)
    images = (masks.float() / 4.0)[:, None].repeat(1, 3, 1, 1)  # (4, 3, 48, 64), value = id / 4
    torch.manual_seed(seed)
    x, m = JointAugment((48, 64), scale=(0.25, 1.0))(images, masks)
    assert x.shape == images.shape and m.shape == masks.shape and m.dtype == torch.int64
    assert set(m.unique().tolist()) <= set(masks.unique().tolist())  # nearest: ids stay ids
    decoded = (x[:, 0] * 4).round().long()
    pure = (x[:, 0] * 4 - decoded).abs() < 0.05  # not a blend
    assert pure.float().mean() > 0.5
    assert (decoded[pure] == m[pure]).float().mean() > 0.97
    # and the augmentation did something: crops differ from the input for some image
    assert not torch.equal(m, masks)
