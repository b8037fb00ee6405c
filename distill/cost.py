"""What a training step costs: FLOPs counted with ``torch.utils.flop_counter``, and the peaks of common GPUs.

`count_flops` runs a function under `torch.utils.flop_counter.FlopCounterMode`, which counts the
matrix products and convolutions (``2 x multiply-adds``: a ``Linear(i, o)`` on ``B`` rows is ``2 B i o``) of the
forward and, when the function calls ``backward``, of the backward. Element-wise work (norms, activations) is not
counted, as in the usual model-FLOPs utilisation (MFU) accounting (PaLM, Chowdhery et al. 2022, App. B).
`student_step_flops` counts a student's and a regressor's forward + backward on the meta device (shapes only:
no memory, no time). `PEAK_TFLOPS` holds the vendors' dense peaks, by GPU and precision.
"""
from __future__ import annotations

import copy
import re
import time
from typing import Callable, Optional

import torch
import torch.nn as nn

#: Dense (no structured sparsity) peak TFLOP/s by GPU and precision, from the vendors' datasheets: NVIDIA A100
#: Tensor Core GPU datasheet (SXM; PCIe has the same peaks), H100 datasheet (SXM / PCIe / NVL columns), H200
#: datasheet (SXM / NVL), L4 datasheet, L40S datasheet, and the NVIDIA Ada Lovelace architecture whitepaper
#: (GeForce RTX 4090: FP16/BF16 tensor with FP32 accumulate, as PyTorch runs them). The datasheets print the
#: tensor-core figures "with sparsity"; these are half of them. Patterns are matched against
#: ``torch.cuda.get_device_name()`` in this order.
PEAK_TFLOPS = (
    (r"H100.*PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    (r"H100.*NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"H200.*NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    (r"H100|H200", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),
    (r"A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    (r"L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05}),
    (r"\bL4\b", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    (r"RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}),
)
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (``2 x`` multiply-adds of matmuls and convolutions; see the module docstring) of calling ``fn()``,
    forward and any backward it runs, on whatever device its tensors are (``meta`` included)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _backward(outputs) -> None:
    outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    sum(o.float().sum() for o in outs).backward()


def student_step_flops(student: nn.Module, regressor: nn.Module, size: int) -> dict[str, int]:
    """FLOPs per image of the student's and the regressor's forward + backward on ``[3, size, size]`` images,
    counted on meta-device copies (no memory, no time; the modules themselves are untouched) at batch 2 (batch
    norm in training mode needs more than one value), halved.

    ``student(x)`` returns a list of feature maps and ``regressor(maps)`` a list of predictions (as
    `distill.student.Student` and `distill.regressor.FeatureRegressor`); the regressor's backward
    includes the gradient it passes to the student's maps, the student's its own weights and activations.

    Returns:
        ``{'student': int, 'regressor': int}``.
    """
    s = copy.deepcopy(student).to("meta").train()
    r = copy.deepcopy(regressor).to("meta").train()
    x = torch.zeros(2, 3, size, size, device="meta")
    student_flops = count_flops(lambda: _backward(s(x)))
    maps = [m.detach().requires_grad_(True) for m in s(x)]
    regressor_flops = count_flops(lambda: _backward(r(maps)))
    return {"student": student_flops // 2, "regressor": regressor_flops // 2}


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """The dense peak TFLOP/s of a GPU named ``device_name`` (``torch.cuda.get_device_name()``) at ``precision``
    (one of `PRECISIONS`), or None for a device not in `PEAK_TFLOPS` (a CPU, another GPU).

    Raises:
        ValueError: unknown ``precision``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not valid; valid: {', '.join(PRECISIONS)}.")
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return peaks[precision]
    return None


def step_precision(mixed_precision: str, teacher_dtype: str = "float32") -> str:
    """The fastest precision a step runs matrix products in, for its MFU's peak (the highest peak of its parts, so
    the MFU is not overstated): ``bf16`` / ``fp16`` when the student's mixed precision or the teacher's dtype is
    one, else ``tf32`` when PyTorch may use TF32 for fp32 matmuls (``torch.get_float32_matmul_precision() !=
    'highest'`` or ``torch.backends.cuda.matmul.allow_tf32``), else ``fp32``."""
    for low, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        if mixed_precision == low or teacher_dtype == dtype:
            return low
    tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "fp32"


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = 512, seconds: float = 0.3) -> float:
    """FLOP/s of ``n x n`` matmuls in ``dtype`` on this CPU (the threads torch uses): the best of three trials of
    ``seconds / 3`` each."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = 0.0
    for _ in range(3):  # the best of three: a CPU shared with other jobs gives each trial another share
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            reps += 1
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def cpu_rate(precision: str) -> tuple[float, Optional[str]]:
    """This CPU's matmul FLOP/s at a step's ``precision`` (`step_precision`), and a warning when it is a low
    precision (bf16 / fp16) that runs at less than half the fp32 rate (many CPUs emulate it), else None."""
    rate = matmul_rate(torch.float32)
    if precision not in ("bf16", "fp16"):
        return rate, None
    low = matmul_rate(getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision]), n=256)
    if low >= 0.5 * rate:
        return low, None
    return low, (f"{precision} matmuls run at {low / 1e9:.1f} GFLOP/s on this CPU against {rate / 1e9:.1f} for "
                 f"float32: set teacher_dtype: float32, vae_dtype: float32 and mixed_precision: 'no' to run here.")
