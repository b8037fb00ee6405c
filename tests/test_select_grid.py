"""Online grid probe (DDAE 3.2), its memory estimate, and the offline teacher probe of tools/probe_teacher.py."""
import math

import pytest
import torch

from distill.data import ImageFolder
from distill.evaluate import ProbeData
from distill.probe import multi_linear_probe
from distill.select import check_grid_memory, estimate_grid_memory, grid_probe, teacher_grid_probe
from distill.teacher import load_teacher

from .conftest import tiny_unet_config


def _rgb_data(rgb_folder):
    return ProbeData(ImageFolder(str(rgb_folder / "train")), ImageFolder(str(rgb_folder / "test")), "rgb")


def _count_forwards(teacher):
    calls = []
    teacher.model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return calls


def test_offline_teacher_probe_uses_one_forward_per_batch_and_the_students_probe(rgb_folder):
    """tools/probe_teacher.py's default protocol: features pooled once (one forward per batch, fixed noise), the
    same multi_linear_probe the students get; the rows match that probe run on the pooled features directly."""
    from distill.select import pooled_teacher_features

    torch.manual_seed(0)
    teacher = load_teacher(tiny_unet_config(3), ["mid_block", "up_blocks.0"], [1, 11])
    data = _rgb_data(rgb_folder)
    calls = _count_forwards(teacher)
    rows = teacher_grid_probe(teacher, data, batch_size=12, epochs=200, seed=3, progress=False, protocol="offline")
    assert calls == [12 * 2] * 3 + [12 * 2, 6 * 2]  # 36 train + 18 test images, once each (no epochs), 2 t each
    tr, tr_y = pooled_teacher_features(teacher, data.train, 12, 3, False)
    te, te_y = pooled_teacher_features(teacher, data.test, 12, 4, False)
    ref = multi_linear_probe(tr, tr_y, te, te_y, epochs=200, seed=3)
    assert {f"{r['block']}@t{r['timestep']}": r["linear_top1"] for r in rows} == {
        k: round(v["top1"], 2) for k, v in ref.items()}
    assert rows[0]["linear_top1"] > 60
    with pytest.raises(ValueError, match="protocol must be 'online' or 'offline', got 'both'"):
        teacher_grid_probe(teacher, data, protocol="both")


def test_grid_probe_one_forward_per_batch_fresh_noise_and_learns(rgb_folder):
    torch.manual_seed(0)
    teacher = load_teacher(tiny_unet_config(3), ["mid_block", "up_blocks.0"], [1, 11, 50])
    data = _rgb_data(rgb_folder)  # 36 train / 18 test images, colour-coded classes
    calls = _count_forwards(teacher)
    noises = []
    orig = teacher.add_noise
    teacher.add_noise = lambda x0, t, g=None: noises.append(orig(x0, t, g)) or noises[-1]
    res = grid_probe(teacher, data, epochs=3, batch_size=12, lr=1e-2, augment="none", progress=False)
    train_batches = 3 * math.ceil(36 / 12)
    test_batches = math.ceil(18 / 12)
    assert calls.pop(0) == 1  # the memory estimate's one-image dry run
    # one teacher forward per batch covers all 3 timesteps x 2 blocks (6 probes), not one per probe
    assert res["teacher_forwards"] == len(calls) == train_batches + test_batches
    assert calls[:train_batches] == [12 * 3] * train_batches
    assert res["image_forwards"] == (3 * 36 + 18) * 3
    assert {(r["block"], r["timestep"]) for r in res["rows"]} == {(b, t) for b in ("mid_block", "up_blocks.0")
                                                                   for t in (1, 11, 50)}
    assert [r["linear_top1"] for r in res["rows"]] == sorted((r["linear_top1"] for r in res["rows"]), reverse=True)
    assert res["best"]["linear_top1"] > 60  # the classes differ by colour: pooled features separate them
    # fresh noise at every step: the same clean batch is never noised the same way twice
    flat = [n.flatten()[:50] for n in noises[1:train_batches + 1]]
    assert all(not torch.equal(a, b) for i, a in enumerate(flat) for b in flat[i + 1:])


def test_grid_memory_estimate_scales_and_refuses_before_starting(rgb_folder):
    teacher = load_teacher(tiny_unet_config(3), ["up_blocks.0"], [1, 11])
    e1, e4 = estimate_grid_memory(teacher, 1), estimate_grid_memory(teacher, 4)
    assert e4["activations"] == 4 * e1["activations"] > 0
    teacher3 = load_teacher(tiny_unet_config(3), ["up_blocks.0"], [1, 11, 50])
    assert estimate_grid_memory(teacher3, 1)["activations"] == pytest.approx(1.5 * e1["activations"])
    calls = _count_forwards(teacher)
    limit_gb = (e1["weights"] + e1["probes"] + 3.5 * (e1["bytes"] - e1["weights"] - e1["probes"])) / 1024 ** 3
    with pytest.raises(MemoryError, match=r"needs about .* GiB .* Fix: batch_size 3 .*raise max_memory_gb "):
        grid_probe(teacher, _rgb_data(rgb_folder), batch_size=64, max_memory_gb=limit_gb, progress=False)
    assert calls == [1]  # refused after the one-image dry run of the estimate, before any batch
    assert check_grid_memory(teacher, 3, limit_gb)["bytes"] <= limit_gb * 1024 ** 3
