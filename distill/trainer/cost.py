"""Cost accounting of a run: FLOPs per image of each part, counted once at start, and at every log line the
achieved TFLOP/s and, on a GPU whose peak is known, the model FLOPs utilisation (MFU).

Parts (per training image): ``vae`` (the live VAE's encode; 0 from a latent or feature cache), ``teacher`` (the
UNet/DiT to its deepest requested block, every timestep; 0 from a feature cache), ``student`` and ``regressor``
(forward + backward). The teacher parts are counted on one real image (the frozen teacher in eval mode, its noise
drawn on a forked RNG so the run's stream is unchanged); the student and regressor on meta-device copies
(`distill.cost.student_step_flops`). ``achieved TFLOP/s = img/s x FLOPs per image / 1e12`` (all processes);
``MFU = achieved / (peak x processes)`` with the peak of `distill.cost.PEAK_TFLOPS` at
`distill.cost.step_precision`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..cost import count_flops, cpu_rate, peak_tflops, step_precision, student_step_flops

PARTS = ("vae", "teacher", "student", "regressor")


@dataclass
class RunCost:
    """FLOPs per image by part, and the device's peak (TFLOP/s per process, None when unknown)."""

    flops: dict = field(default_factory=dict)  # part -> FLOPs per image
    device: str = "cpu"
    precision: str = "fp32"
    peak: Optional[float] = None
    processes: int = 1
    warning: Optional[str] = None  # a precision this device runs slowly (distill.cost.cpu_rate)

    @property
    def per_image(self) -> int:
        return sum(self.flops.values())

    def lines(self) -> list[str]:
        """The lines ``train.log`` starts with."""
        parts = ", ".join(f"{k} {v / 1e9:.4g}" for k, v in self.flops.items())
        peak = (f"peak {self.peak:g} TFLOP/s {self.precision} per GPU (dense, datasheet)" if self.peak else
                f"peak unknown for this device: MFU not reported")
        return [f"cost per image (GFLOP, torch.utils.flop_counter): {parts}; total {self.per_image / 1e9:.4g} "
                f"(student and regressor forward + backward)",
                f"device {self.device} x {self.processes} process(es), {self.precision}; {peak}"] + (
                    [f"warning: {self.warning}"] if self.warning else [])

    def fields(self, img_per_s: float) -> dict:
        """``{'tflops': achieved TFLOP/s, 'mfu': fraction of the peak or ''}`` at ``img_per_s`` (all processes)."""
        achieved = img_per_s * self.per_image / 1e12
        mfu = round(achieved / (self.peak * self.processes), 5) if self.peak else ""
        return {"tflops": round(achieved, 5), "mfu": mfu}

    def summary(self, img_per_s: float) -> dict:
        """What ``summary.json`` records: the counts, the device, and the run's average throughput."""
        return {"flops_per_image": dict(self.flops), "flops_per_image_total": self.per_image, "device": self.device,
                "precision": self.precision, "peak_tflops": self.peak, **self.fields(img_per_s)}


def teacher_flops(teacher, live: bool) -> dict:
    """``{'vae', 'teacher'}`` FLOPs of one image through a live teacher (0 for parts that do not run)."""
    if not live:
        return {"vae": 0, "teacher": 0}
    dev = teacher.device
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        vae = 0
        if getattr(teacher, "vae", None) is not None:
            x = torch.zeros(1, teacher.in_channels, teacher.sample_size, teacher.sample_size, device=dev)
            vae = count_flops(lambda: teacher.encode(x))
        z = torch.zeros(1, teacher.model_in_channels, teacher.model_sample_size, teacher.model_sample_size, device=dev)
        return {"vae": vae, "teacher": count_flops(lambda: teacher.features(z))}


def measure_cost(teacher, model, recipe, accelerator, teacher_live: bool) -> RunCost:
    """Count the run's FLOPs per image (see the module docstring) and look up the device's peak.

    Args:
        teacher: the run's teacher (on its device when ``teacher_live``).
        model: the unwrapped `distill.student.DistillModel`.
        teacher_live: whether the teacher runs during training (False with a feature cache).
    """
    flops = teacher_flops(teacher, teacher_live)
    flops.update(student_step_flops(model.student, model.regressor, recipe.student_size))
    dev = accelerator.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    precision = step_precision(accelerator.mixed_precision, recipe.teacher_dtype)
    warning = cpu_rate(precision)[1] if dev.type == "cpu" and precision in ("bf16", "fp16") else None
    return RunCost({k: flops[k] for k in PARTS}, name, precision,
                   peak_tflops(name, precision) if dev.type == "cuda" else None, accelerator.num_processes, warning)
