"""Cost accounting (distill/cost.py, distill/trainer/cost.py): FLOPs counted with torch.utils.flop_counter against
closed-form formulas, GPU peaks by name, and what a run writes (train.log, metrics.csv, summary.json)."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn as nn

from distill.cost import count_flops, peak_tflops, step_precision, student_step_flops
from distill.trainer.cost import RunCost


def test_linear_and_conv_flops_match_the_closed_form():
    B, i, o = 5, 12, 7
    lin = nn.Linear(i, o)
    x = torch.randn(B, i, requires_grad=True)
    assert count_flops(lambda: lin(x)) == 2 * B * i * o
    # backward: grad of the input and of the weight, one matmul of the same size each
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * B * i * o
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, groups=1)
    img = torch.randn(2, 3, 16, 16)
    assert count_flops(lambda: conv(img)) == 2 * 2 * 8 * 8 * 8 * 3 * 3 * 3  # 2 B Cout Hout Wout Cin k k
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert count_flops(lambda: dw(torch.randn(1, 8, 4, 4))) == 2 * 8 * 4 * 4 * 3 * 3  # groups: Cin/groups = 1


def test_student_and_regressor_counts_add_up_to_the_whole_model_step():
    """Counted apart on meta copies, the two parts equal one forward + backward of the real model (per image)."""
    from distill.regressor import FeatureRegressor
    from distill.student import DistillModel, Student

    student = Student("resnet18", 64)
    regressor = FeatureRegressor(student.channels, [(32, (8, 8)), (16, (4, 4))], width=16, level_sizes=student.sizes)
    parts = student_step_flops(student, regressor, 64)
    model = DistillModel(student, regressor)
    x = torch.randn(2, 3, 64, 64)
    whole = count_flops(lambda: sum(p.sum() for p in model(x)).backward()) // 2
    assert parts["student"] > 0 and parts["regressor"] > 0
    assert parts["student"] + parts["regressor"] == pytest.approx(whole, rel=0.02)
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model itself is untouched
    # ResNet-18's forward at 224 px is 1.82 GMAC (timm): at 64 px, x (64/224)^2; forward + backward about 3x
    assert parts["student"] == pytest.approx(3 * 2 * 1.82e9 * (64 / 224) ** 2, rel=0.15)


def test_peaks_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "fp32") == 67.0 and peak_tflops("h100 pcie", "fp32") == 51.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert peak_tflops("NVIDIA L40S", "fp16") == 362.05 and peak_tflops("NVIDIA L4", "fp16") == 121.0
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16") == 165.2
    assert peak_tflops("cpu", "fp32") is None and peak_tflops("Tesla T4", "fp16") is None
    with pytest.raises(ValueError, match="valid: fp32, tf32, bf16, fp16"):
        peak_tflops("NVIDIA H100", "int8")
    assert step_precision("bf16") == "bf16" and step_precision("no", "float16") == "fp16"


def test_mfu_is_the_achieved_rate_over_the_peak():
    cost = RunCost({"vae": 0, "teacher": 3e9, "student": 2e9, "regressor": 1e9}, "NVIDIA H100", "bf16", 989.5, 2)
    f = cost.fields(1000.0)
    assert f["tflops"] == pytest.approx(6.0) and f["mfu"] == pytest.approx(6.0 / (2 * 989.5), rel=1e-3)
    assert RunCost({"teacher": 1e9}).fields(10.0)["mfu"] == ""


def test_teacher_cost_counts_timesteps_and_stops_at_the_deepest_block():
    from distill.teacher import DiffusionTeacher
    from distill.trainer.cost import teacher_flops
    from diffusers import UNet2DModel

    from .conftest import tiny_unet_config

    unet = UNet2DModel(**tiny_unet_config())
    one = teacher_flops(DiffusionTeacher(unet, ["up_blocks.0"], [11]), True)
    two = teacher_flops(DiffusionTeacher(unet, ["up_blocks.0"], [11, 50]), True)
    deep = teacher_flops(DiffusionTeacher(unet, ["up_blocks.2"], [11]), True)
    assert one["vae"] == 0 and two["teacher"] == 2 * one["teacher"] and deep["teacher"] > one["teacher"]
    state = torch.random.get_rng_state()
    teacher_flops(DiffusionTeacher(unet, ["up_blocks.0"], [11]), True)
    assert torch.equal(state, torch.random.get_rng_state())  # the noise of the count does not move the run's RNG


def test_a_run_records_its_cost(rgb_folder, tmp_path):
    from distill.trainer import train

    from .conftest import rgb_recipe

    run = tmp_path / "run"
    summary = train(rgb_recipe(rgb_folder, steps=2, log_every=1), str(run), progress=False)
    cost = json.loads((run / "summary.json").read_text())["cost"]
    assert cost == summary["cost"] and cost["device"] == "cpu" and cost["peak_tflops"] is None
    parts = cost["flops_per_image"]
    assert list(parts) == ["vae", "teacher", "student", "regressor"] and parts["vae"] == 0
    assert all(parts[k] > 0 for k in ("teacher", "student", "regressor"))
    assert cost["flops_per_image_total"] == sum(parts.values())
    for row in csv.DictReader(open(run / "metrics.csv")):
        assert float(row["tflops"]) == pytest.approx(float(row["img_per_s"]) * sum(parts.values()) / 1e12, rel=1e-3,
                                                     abs=1e-5)
    assert f"total {sum(parts.values()) / 1e9:.4g}" in (run / "train.log").read_text().splitlines()[1]


def test_a_slow_precision_on_the_cpu_is_flagged_at_start(monkeypatch):
    """A bf16 step on a CPU whose bf16 matmuls are slow (measured; here set to the 0.9 vs 72 GFLOP/s seen on this
    project's CPU) gets a warning line in train.log's header naming the keys to change."""
    import distill.cost as C

    monkeypatch.setattr(C, "matmul_rate", lambda dtype=torch.float32, n=512, seconds=0.3:
                        72e9 if dtype == torch.float32 else 0.9e9)
    rate, warning = C.cpu_rate("bf16")
    assert rate == 0.9e9 and "teacher_dtype: float32" in warning and "0.9 GFLOP/s" in warning
    assert C.cpu_rate("fp32") == (72e9, None)
    lines = RunCost({"teacher": 1e9}, warning=warning).lines()
    assert lines[-1] == f"warning: {warning}"
