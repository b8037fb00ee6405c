import math

import pytest
import torch
import torch.nn.functional as F

from distill.select import alignment_loss, label_free_scores, rank_correlation, uniformity_loss
from distill.teacher import load_teacher

from .conftest import tiny_unet_config


def test_alignment_matches_formula():
    z1, z2 = F.normalize(torch.randn(50, 8), dim=1), F.normalize(torch.randn(50, 8), dim=1)
    ref = sum(float(((a - b) ** 2).sum()) for a, b in zip(z1, z2)) / 50
    assert alignment_loss(z1, z2).item() == pytest.approx(ref, rel=1e-5)
    assert alignment_loss(z1, z1).item() == 0.0
    with pytest.raises(ValueError, match=r"\(50, 8\) and \(49, 8\)"):
        alignment_loss(z1, z2[:49])


def test_uniformity_matches_formula_and_prefers_spread_points():
    z = F.normalize(torch.randn(30, 4), dim=1)
    pairs = [math.exp(-2 * float(((z[i] - z[j]) ** 2).sum())) for i in range(30) for j in range(i + 1, 30)]
    assert uniformity_loss(z).item() == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-5)
    clustered = F.normalize(torch.ones(30, 4) + 0.01 * torch.randn(30, 4), dim=1)
    assert uniformity_loss(clustered) > uniformity_loss(z)
    assert uniformity_loss(clustered).item() == pytest.approx(0.0, abs=1e-2)  # log(1) when all points coincide
    with pytest.raises(ValueError, match="at least 2"):
        uniformity_loss(z[:1])


def test_label_free_scores_over_a_teacher(rgb_folder):
    from distill.data import ImageFolder

    teacher = load_teacher(tiny_unet_config(3), ["mid_block", "up_blocks.0"], [1, 500])
    rows = label_free_scores(teacher, ImageFolder(str(rgb_folder / "train")), num_images=20, batch_size=8,
                             progress=False)
    assert {(r["block"], r["timestep"]) for r in rows} == {(b, t) for b in ("mid_block", "up_blocks.0") for t in (1, 500)}
    assert [r["score"] for r in rows] == sorted(r["score"] for r in rows)
    assert all(r["score"] == pytest.approx(r["alignment"] + r["uniformity"], abs=2e-5) for r in rows)
    assert rows[0]["teacher_forwards"] == 2 * 3  # two noisings x ceil(20 / 8) batches, all timesteps batched
    # more noise -> the two noisings of an image differ more
    align = {(r["block"], r["timestep"]): r["alignment"] for r in rows}
    assert align[("mid_block", 500)] > align[("mid_block", 1)]


def test_rank_correlation():
    a = {"x": 1.0, "y": 2.0, "z": 3.0}
    assert rank_correlation(a, {"x": 10, "y": 20, "z": 30}) == pytest.approx(1.0, abs=1e-5)
    assert rank_correlation(a, {"x": 3, "y": 2, "z": 1}) == pytest.approx(-1.0, abs=1e-5)
    with pytest.raises(ValueError, match="different candidates"):
        rank_correlation(a, {"x": 1, "y": 2})
