"""The settings of one segmentation run, `SegmentConfig` (torch-free): the shared fine-tuning settings
(`distill.tune.TuneConfig`) plus the segmentation ones."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import option
from ..tune.config import TuneConfig
from ..vocab import SEG_DECODERS, SEG_LAYOUT_CLASSES, SEG_LAYOUTS


def layout_classes(layout: str, num_classes: Optional[int], ignore_index: Optional[int],
                   mask_threshold: Optional[int] = None) -> tuple[int, int]:
    """``(num_classes, ignore_index)``: the given ones, else the layout's (`distill.vocab.SEG_LAYOUT_CLASSES`);
    binary masks (``mask_threshold``) have 2 classes.

    Raises:
        ValueError: ``images-masks`` without ``--num-classes`` or ``--mask-threshold``; a ``--mask-threshold``
            (binary masks) with ``--num-classes`` other than 2.
    """
    default_classes, default_ignore = SEG_LAYOUT_CLASSES[layout]
    if mask_threshold is not None and num_classes is not None and num_classes != 2:
        raise ValueError(f"{option('mask_threshold')} {mask_threshold} makes every mask binary (class 0 below it, 1 "
                         f"from it on), but {option('num_classes')} is {num_classes}; leave {option('num_classes')} "
                         f"out (2), or leave {option('mask_threshold')} out for masks that hold class ids.")
    if num_classes is None:
        num_classes = 2 if mask_threshold is not None else default_classes
        if num_classes is None:
            raise ValueError(f"{option('layout')} {layout} needs {option('num_classes')} N (class ids 0..N-1 in the "
                             f"masks), or {option('mask_threshold')} T for binary masks (2 classes).")
    return num_classes, default_ignore if ignore_index is None else ignore_index


@dataclass
class SegmentConfig(TuneConfig):
    """One segmentation fine-tune (or dense linear probe with ``decoder='linear'`` and ``freeze_backbone``).

    ``model``: an exported student, ``timm:NAME`` (random init) or ``teacher:NAME`` (a diffusion teacher's own
    features, frozen: the dense probe of a teacher). ``augment``: ``crop-flip`` = random scale (area ``scale_min``
    to 1) + crop back to the input size + flip, applied to image and mask alike; ``flip``; ``none``. ``size``:
    resize every image (bilinear) and mask (nearest-exact) to this height, keeping the aspect; default the data's own
    (one size for all). ``num_classes`` / ``ignore_index`` None: the layout's (`distill.vocab.SEG_LAYOUT_CLASSES`;
    2 classes with ``mask_threshold``), filled in by `validate`. ``mask_threshold``: binary masks (8-bit grey or
    JPEG), grey ``>= T`` is class 1.
    """

    layout: str = "camvid"
    num_classes: Optional[int] = None
    ignore_index: Optional[int] = None
    mask_threshold: Optional[int] = None
    class_names: Optional[str] = None  # a file, one name per line
    eval_split: str = "test"
    decoder: str = "fpn"
    decoder_width: int = 128
    freeze_backbone: bool = False
    levels: Optional[Sequence[int]] = None  # timm out_indices; default strides 4..32
    scale_min: float = 0.25  # crop-flip: the smallest crop area (share of the image)
    blocks: Optional[Sequence[str]] = None  # teacher:NAME only
    timesteps: Optional[Sequence[int]] = None  # teacher:NAME only (default 11)
    grid_images: int = 4  # test images in predictions.png; 0: none
    steps: int = 300
    batch_size: int = 16
    warmup_steps: int = 30
    eval_every: int = 0
    eval_batch_size: int = 16

    def validate(self) -> None:
        """`TuneConfig.validate`, then the segmentation fields; raises ``ValueError`` naming the option."""
        super().validate()
        if self.data_root is None:
            raise ValueError(f"{option('data_root')} is required for segmentation: a folder with train/ + trainannot/ "
                             f"(CamVid layout) or train/images/ + train/masks/ ({option('layout')} images-masks), and "
                             "the same for the evaluation split; or VOCdevkit, ADEChallengeData2016 or a Cityscapes "
                             f"folder as downloaded ({option('layout')} voc, ade20k, cityscapes).")
        if self.layout not in SEG_LAYOUTS:
            raise ValueError(f"{option('layout')} {self.layout!r} is not valid; valid: {', '.join(SEG_LAYOUTS)}.")
        if self.decoder not in SEG_DECODERS:
            raise ValueError(f"{option('decoder')} {self.decoder!r} is not valid; valid: {', '.join(SEG_DECODERS)}.")
        mt = self.mask_threshold
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or not 1 <= mt <= 65535):
            raise ValueError(f"{option('mask_threshold')} must be an integer grey value in 1..65535 (e.g. 128 for "
                             f"8-bit masks: value >= 128 is class 1); got {mt!r}.")
        self.num_classes, self.ignore_index = layout_classes(self.layout, self.num_classes, self.ignore_index, mt)
        for name, lo in (("num_classes", 2), ("decoder_width", 1), ("grid_images", 0), ("ignore_index", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{option(name)} must be an integer >= {lo}; got {v!r}.")
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(f"{option('ignore_index')} {self.ignore_index} is a class id ({option('num_classes')} "
                             f"{self.num_classes}); give the id of unlabelled pixels, >= the number of classes "
                             "(CamVid: 11, or 255).")
        if not 0 < self.scale_min <= 1:
            raise ValueError(f"{option('scale_min')} must be in (0, 1]; got {self.scale_min!r}.")
        if (self.blocks or self.timesteps) and not self.model.startswith("teacher:"):
            raise ValueError(f"{option('blocks')}/{option('timesteps')} choose a teacher's features; {option('model')} "
                             f"{self.model!r} is not teacher:NAME.")
        if self.model.startswith("teacher:") and not self.blocks:
            raise ValueError(f"teacher:NAME needs {option('blocks')} (e.g. {option('blocks')} up_blocks.1 "
                             f"up_blocks.2); its features are probed frozen (use {option('decoder')} linear "
                             f"{option('freeze_backbone', flag=True)} for the dense linear probe).")
