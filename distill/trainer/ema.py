"""An exponential moving average of the student's weights (timm ``ModelEmaV3``), saved in every checkpoint.

After every optimizer update that was applied, each floating-point tensor of the student's state dict (parameters
and BatchNorm running statistics) moves toward the live one:

    ema_t = decay * ema_{t-1} + (1 - decay) * w_t        (ema_0 = the initial weights)

(Polyak & Juditsky 1992; timm's ``train.py --model-ema``, ``ModelEmaV3`` with its defaults: no warmup; integer
buffers such as ``num_batches_tracked`` are copied). Only the student backbone is averaged: it is what ``distill
export --ema`` writes. The EMA is written to ``checkpoint-{step}/ema.safetensors`` (the backbone's state dict,
safetensors) and read back on resume, so a resumed run's EMA equals an uninterrupted run's.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UnreadableFileError
from ..integrity import error_text, safetensors_problem
from ..rundir import EMA_FILE


class StudentEma:
    """The EMA of one timm backbone (``model``: the live student, already on its device)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=decay)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged backbone (eval mode)."""
        return self.ema.module

    def update(self, model: torch.nn.Module) -> None:
        """One EMA step toward ``model``'s current weights (call after each applied optimizer update)."""
        self.ema.update(model)

    def state_dict(self) -> dict:
        """The averaged backbone's state dict: contiguous CPU tensors, as written to ``ema.safetensors``."""
        return {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}

    def save(self, ckpt_dir: Path) -> None:
        """Write ``ckpt_dir/ema.safetensors``."""
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(Path(ckpt_dir) / EMA_FILE))

    def load(self, ckpt_dir: Path) -> None:
        """Restore the EMA from ``ckpt_dir/ema.safetensors``.

        Raises:
            UnreadableFileError: the file is missing (the run was trained without ``ema``), damaged, or does not fit
                the student.
        """
        from safetensors.torch import load_file

        path = Path(ckpt_dir) / EMA_FILE
        problem = "missing (was the run trained with ema: true?)" if not path.is_file() else safetensors_problem(path)
        if problem:
            raise UnreadableFileError(f"cannot resume the student EMA from '{path}': {problem}. Fix: resume with the "
                                      f"run's own recipe (its config.yaml), or restore that checkpoint.", path)
        try:
            self.module.load_state_dict(load_file(str(path), device=str(next(self.module.parameters()).device)))
        except (RuntimeError, KeyError) as e:
            raise UnreadableFileError(f"'{path}' does not fit the student: {error_text(e, 300)}", path) from e
