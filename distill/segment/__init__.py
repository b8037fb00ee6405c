"""Semantic segmentation as a downstream task: fine-tune an exported student (or ``timm:NAME`` from scratch) with a
light FPN decoder on a seeded fraction of the training masks, or probe a frozen backbone (a student or a diffusion
teacher's own features) with one 1x1 conv: the dense linear probe.

One run (`run.SegmentationTask` on the one fine-tuning loop, `distill.tune.fit`): `data.seg_data`
(image + mask pairs, checked; a seeded fraction of the training *images* keeps its masks) -> batches from
`distill.tune.StepBatchSampler` (a fixed number of steps) -> joint scale + crop + flip on its own RNG stream
-> `model.SegModel` -> cross-entropy with ``ignore_index`` -> the shared optimizer and warmup + cosine
schedule -> mIoU, per-class IoU and pixel accuracy (`metrics.SegMetrics`) on the whole
evaluation split. ``result.json``, ``train_log.csv``, ``predictions.png`` and, with ``save_model``, ``model/``.

Modules: `config`, `data`, `model`, `metrics`, `run`, `sweep`.
"""
from ..augment import JointAugment
from ..tune import GRID_FILE
from .config import SegmentConfig
from .data import CAMVID_CLASSES, CAMVID_PALETTE, SegmentationFolder, image_subset, read_mask, seg_data
from .metrics import SegMetrics
from .model import FPNDecoder, LinearDecoder, SegModel
from .run import SegmentationTask, evaluate_segmentation, segment_finetune
from .sweep import segment_sweep

__all__ = ["SegmentConfig", "CAMVID_CLASSES", "CAMVID_PALETTE", "JointAugment", "SegmentationFolder",
           "image_subset", "read_mask", "seg_data", "SegMetrics", "FPNDecoder", "LinearDecoder", "SegModel",
           "GRID_FILE", "SegmentationTask", "evaluate_segmentation", "segment_finetune", "segment_sweep"]
