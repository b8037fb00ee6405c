"""Shared by the selection and timestep-mode tests: the PNG signature and a tiny recipe with selection keys."""
from distill.config import make_recipe

from .conftest import tiny_unet_config

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_recipe(fmnist_dir, **kw):
    base = dict(teacher=tiny_unet_config(), teacher_blocks=["mid_block", "up_blocks.0"], timesteps=[11],
                data_root=fmnist_dir, student="resnet18", student_size=32, regressor_width=16, steps=6, batch_size=16,
                lr=2e-3, warmup_steps=1, log_every=1, checkpoint_every=3, augment="flip", mean=[0.286] * 3,
                std=[0.353] * 3, timestep_candidates=[1, 11, 50], select_images=64, select_val_images=32,
                select_epochs=1, select_label_free_images=16)
    base.update(kw)
    return make_recipe(base)
