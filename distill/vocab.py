"""The closed vocabularies of recipes, commands and building blocks, declared once.

Every closed choice a user can make (optimizer, augmentation, precision, AT mode, ...) is listed here and
nowhere else: the recipe checks, the CLI's ``choices=`` and the building blocks' own argument checks all read
these tuples, so a new value is added in one place. Torch-free: importing it costs nothing.
"""
from __future__ import annotations

from typing import Optional

#: Optimizers, by timm's ``create_optimizer_v2`` names (distillation and fine-tuning alike).
OPTIMIZERS = ("adamw", "lamb", "sgd")
#: Augmentations (kornia, on the device): see :func:`distill.augment.build_augment`.
AUGMENTS = ("none", "flip", "crop-flip")
#: Accelerate's ``mixed_precision`` values.
MIXED_PRECISION = ("no", "fp16", "bf16")
#: Attention-transfer variants (Zagoruyko & Komodakis 2017): ``code`` = the authors' code, ``paper`` = the paper.
AT_MODES = ("code", "paper")
#: ``timesteps:`` modes besides an explicit list.
TIMESTEP_MODES = ("auto-grid", "auto-label-free", "policy")
#: How several timesteps form regression targets: one head each, or one head on their concatenation.
MULTI_TIMESTEP = ("heads", "concat")
#: REINFORCE baselines of the timestep policy (RepFusion uses none).
POLICY_BASELINES = ("batch-mean", "ema", "none")
#: What the trainer does with a non-finite loss.
ON_NONFINITE = ("error", "skip")
#: Teacher weight dtypes (torch attribute names: ``getattr(torch, name)``).
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
#: VAE dtypes: float16 is refused, the SD VAE encoder overflows in it.
VAE_DTYPES = ("float32", "bfloat16")
#: Dataset sources a recipe or command can name.
DATASETS = ("fashion-mnist", "image-folder")
#: What an image folder does with an image it cannot decode.
ON_BAD_IMAGE = ("skip", "raise")
#: Label-free selection and grid probe methods of ``distill select``.
SELECT_METHODS = ("grid", "label-free", "both")
#: Where the grid's probes are scored: held-out training images, or the test split (DDAE's table).
SELECT_SCORE_ON = ("val", "test")
#: Downstream tasks of ``distill finetune --task``.
TASKS = ("classification", "segmentation")
#: Folder layouts of a segmentation set: ``S/`` + ``Sannot/`` (CamVid) or ``S/images/`` + ``S/masks/``.
SEG_LAYOUTS = ("camvid", "images-masks")
#: Segmentation heads: a light FPN decoder over the backbone's levels, or one 1x1 conv (the dense linear probe).
SEG_DECODERS = ("fpn", "linear")


def dataset_channels(dataset: str, image_channels: Optional[int] = None) -> int:
    """Channels of a dataset's images: Fashion-MNIST is grayscale (1); an image folder is RGB (3) unless
    ``image_channels`` says 1. The one place this rule is written."""
    if dataset == "fashion-mnist":
        return 1
    return int(image_channels or 3)
