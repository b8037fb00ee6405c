"""The closed vocabularies of recipes, commands and building blocks, declared once.

Every closed choice a user can make (optimizer, augmentation, precision, AT mode, ...) is listed here and
nowhere else: the recipe checks, the CLI's ``choices=`` and the building blocks' own argument checks all read
these tuples, so a new value is added in one place. Torch-free: importing it costs nothing.
"""
from __future__ import annotations

from typing import Optional

#: Optimizers, by timm's ``create_optimizer_v2`` names (distillation and fine-tuning alike).
OPTIMIZERS = ("adamw", "lamb", "sgd")
#: Augmentations (kornia, on the device): see `distill.augment.build_augment`.
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
#: ``num_workers`` words besides a number: ``auto`` = CPUs per process - 1, at most 8 (`distill.build.loader_workers`).
NUM_WORKERS_WORDS = ("auto",)
#: Dataset sources a recipe or command can name.
DATASETS = ("fashion-mnist", "image-folder", "file-list", "hf")
#: What an image folder does with an image it cannot decode.
ON_BAD_IMAGE = ("skip", "raise")
#: How an image is brought to ``image_size`` at decode time: cover + centre crop (aspect kept), or squash.
IMAGE_RESIZE = ("center-crop", "squash")
#: What the feature-cache key records of every input file: size + modification time, or a sha256 of its bytes.
DATA_HASH = ("stat", "content")
#: How much of each feature-cache shard is checked against its manifest when opened.
SHARD_VERIFY = ("sample", "full")
#: Augmentations a latent cache can serve: its stored views (the image, and its horizontal flip).
LATENT_AUGMENTS = ("none", "flip")
#: Storage dtypes of a latent cache's posterior mean and std.
LATENT_STORAGE = ("float16", "float32")
#: What a run from a latent cache feeds the teacher: a posterior sample (diffusers' training scripts) or its mean.
LATENT_SAMPLE = ("sample", "mean")
#: Split folder names of an image-folder / file-list dataset; ``val`` stands in for a missing ``test``.
SPLITS = ("train", "val", "test")
#: diffusers' beta schedules (``DDPMScheduler(beta_schedule=...)``), for a recipe's ``teacher_scheduler``.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
#: Suffixes of teacher weight files read with ``torch.load(weights_only=True)`` (besides ``.safetensors``).
TORCH_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: Label-free selection and grid probe methods of ``distill select``.
SELECT_METHODS = ("grid", "label-free", "both")
#: Where the grid's probes are scored: held-out training images, or the test split (DDAE's table).
SELECT_SCORE_ON = ("val", "test")
#: Experiment trackers a recipe's ``log_with`` may name (Accelerate's tracker names).
TRACKERS = ("tensorboard", "wandb", "mlflow")
#: The pip extra of distill that installs each tracker: ``pip install "diffusion-distill[EXTRA]"``.
TRACKER_EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
#: Downstream tasks of ``distill finetune --task``.
TASKS = ("classification", "segmentation")
#: Folder layouts of a segmentation set: ``S/`` + ``Sannot/`` (CamVid) or ``S/images/`` + ``S/masks/``, and three
#: sets as downloaded (Pascal VOC 2012, ADE20K SceneParsing, Cityscapes; distill.data.seglayouts).
SEG_LAYOUTS = ("camvid", "images-masks", "voc", "ade20k", "cityscapes")
#: ``(num_classes, ignore_index)`` of each layout (None: given with --num-classes); distill.data.seglayouts holds the
#: class names, palettes and id tables these count.
SEG_LAYOUT_CLASSES = {"camvid": (11, 11), "images-masks": (None, 255), "voc": (21, 255), "ade20k": (150, 255),
                      "cityscapes": (19, 255)}
#: Segmentation heads: a light FPN decoder over the backbone's levels, or one 1x1 conv (the dense linear probe).
SEG_DECODERS = ("fpn", "linear")


def dataset_channels(dataset: str, image_channels: Optional[int] = None) -> int:
    """Channels of a dataset's images: Fashion-MNIST is grayscale (1); an image folder is RGB (3) unless
    ``image_channels`` says 1. The one place this rule is written."""
    if dataset == "fashion-mnist":
        return 1
    return int(image_channels or 3)
