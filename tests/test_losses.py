"""Tests for distill.losses: independent formulas written here, and torchdistill's ATLoss as a peer."""
import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    attention_map,
    attention_transfer_loss,
    cosine_loss,
    feature_distillation_loss,
    mse_loss,
    whiten,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _manual_whiten(f, eps=1e-6):
    mu = f.mean(dim=1, keepdim=True)
    var = ((f - mu) ** 2).mean(dim=1, keepdim=True)  # biased
    return (f - mu) / torch.sqrt(var + eps)


def test_whiten_matches_manual():
    f = torch.randn(2, 5, 3, 4) * 3 + 1
    out = whiten(f)
    assert out.shape == f.shape
    torch.testing.assert_close(out, _manual_whiten(f), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean(1), torch.zeros(2, 3, 4), rtol=0, atol=1e-5)


def test_mse_loss_matches_manual():
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3) * 5
    expected = ((pred - _manual_whiten(target)) ** 2).sum() / pred.numel()
    torch.testing.assert_close(mse_loss(pred, target), expected)
    torch.testing.assert_close(mse_loss(pred, target, whiten_target=False), ((pred - target) ** 2).mean())


def test_mse_loss_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 3\).*\(2, 5, 3, 3\)"):
        mse_loss(torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3))


def test_attention_map_reductions_agree_and_unit_norm():
    f = torch.randn(3, 6, 4, 5)
    a_mean, a_sum = attention_map(f, reduction="mean"), attention_map(f, reduction="sum")
    assert a_mean.shape == (3, 20)
    torch.testing.assert_close(a_mean, a_sum)
    torch.testing.assert_close(a_mean.norm(dim=1), torch.ones(3))
    raw = (f ** 2).sum(1).flatten(1)
    torch.testing.assert_close(a_mean, raw / raw.norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="'max'.*mean, sum"):
        attention_map(f, reduction="max")


def test_attention_map_is_per_sample():
    f = torch.randn(3, 4, 5, 5)
    scaled = f.clone()
    scaled[1] *= 10  # with batch-wide normalisation this would change every sample's map
    torch.testing.assert_close(attention_map(scaled), attention_map(f))
    # and each sample's map equals the map of that sample alone
    torch.testing.assert_close(attention_map(f)[2:3], attention_map(f[2:3]))


def test_attention_map_p():
    f = torch.randn(2, 3, 2, 2)
    raw = f.abs().pow(3).sum(1).flatten(1)
    torch.testing.assert_close(attention_map(f, p=3), F.normalize(raw, dim=1))


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_attention_transfer_matches_torchdistill(mode):
    pytest.importorskip("torchdistill")
    from torchdistill.losses.mid_level import ATLoss

    s, t = torch.randn(4, 8, 6, 6), torch.randn(4, 16, 6, 6) * 2  # channels differ, spatial sizes equal
    pairs = {"pair": {"student": {"io": "output", "path": "s"}, "teacher": {"io": "output", "path": "t"}}}
    peer = ATLoss(pairs, mode=mode)
    # Full forward (per-pair weight 1, one pair): includes torchdistill's division by batch size in 'paper' mode.
    expected = peer({"s": {"output": s}}, {"t": {"output": t}})
    torch.testing.assert_close(attention_transfer_loss(s, t, mode=mode), expected, rtol=1e-6, atol=1e-7)
    if mode == "paper":
        # The per-pair method sums the per-sample norms; forward() divides by B afterwards. Our 'paper' mode is
        # the paper's (1/B) sum_b ||a_s - a_t||_2, so the per-pair value is ours times B.
        per_pair = peer.compute_at_loss_paper(s, t)
        ours = attention_transfer_loss(s, t, mode=mode) * s.shape[0]
        torch.testing.assert_close(ours, per_pair, rtol=1e-6, atol=1e-6)
    else:
        ours = attention_transfer_loss(s, t, mode=mode)
        torch.testing.assert_close(ours, peer.compute_at_loss(s, t), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_attention_transfer_manual_formula(mode):
    s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 7, 5, 5)
    a_s = (s ** 2).sum(1).flatten(1)
    a_s = a_s / a_s.norm(dim=1, keepdim=True)
    a_t = (t ** 2).sum(1).flatten(1)
    a_t = a_t / a_t.norm(dim=1, keepdim=True)
    d = a_s - a_t
    expected = (d ** 2).sum() / d.numel() if mode == "code" else torch.sqrt((d ** 2).sum(1)).sum() / 3
    torch.testing.assert_close(attention_transfer_loss(s, t, mode=mode), expected)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_attention_transfer_resizes_student_map(mode):
    s, t = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 8, 8)
    loss = attention_transfer_loss(s, t, mode=mode)
    a_s = F.interpolate((s ** 2).mean(1, keepdim=True), size=(8, 8), mode="bilinear", align_corners=False)
    a_s = F.normalize(a_s.flatten(1), dim=1)
    a_t = attention_map(t)
    d = a_s - a_t
    expected = d.pow(2).mean() if mode == "code" else d.norm(dim=1).mean()
    torch.testing.assert_close(loss, expected)


def test_attention_transfer_zero_for_same_map_and_bad_mode():
    f = torch.randn(2, 3, 4, 4)
    assert attention_transfer_loss(f, f * 3).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="'sum'.*code, paper"):
        attention_transfer_loss(f, f, mode="sum")
    with pytest.raises(ValueError, match="batch sizes differ"):
        attention_transfer_loss(f, f[:1])


def test_cosine_loss_values():
    f = torch.randn(2, 5, 3, 3)
    assert cosine_loss(f, f).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(f, -f).item() == pytest.approx(2.0, abs=1e-6)
    assert cosine_loss(f, 4 * f).item() == pytest.approx(0.0, abs=1e-6)
    g = torch.randn(2, 5, 3, 3)
    expected = 1 - ((f * g).sum(1) / (f.norm(dim=1) * g.norm(dim=1))).mean()
    torch.testing.assert_close(cosine_loss(f, g), expected)
    with pytest.raises(ValueError, match="cosine_loss"):
        cosine_loss(f, g[:, :4])


def _levels():
    preds = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 6, 4, 4, requires_grad=True)]
    targets = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 6, 4, 4, requires_grad=True)]
    return preds, targets


def test_feature_distillation_default_is_dreamteacher():
    preds, targets = _levels()
    out = feature_distillation_loss(preds, targets)
    assert set(out) == {"mse", "at", "total"}
    mse = sum(mse_loss(p, t) for p, t in zip(preds, targets)) / 2
    at = sum(attention_transfer_loss(p, t) for p, t in zip(preds, targets)) / 2  # raw teacher feature
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["at"], at)
    torch.testing.assert_close(out["total"], mse + 10 * at)


def test_feature_distillation_weights_and_cosine():
    preds, targets = _levels()
    out = feature_distillation_loss(preds, targets, mse_weight=2.0, at_weight=0.0, cos_weight=0.5, at_mode="paper")
    assert set(out) == {"mse", "cos", "total"}
    cos = sum(cosine_loss(p, whiten(t)) for p, t in zip(preds, targets)) / 2
    torch.testing.assert_close(out["cos"], cos)
    torch.testing.assert_close(out["total"], 2.0 * out["mse"] + 0.5 * cos)
    out = feature_distillation_loss(preds, targets, mse_weight=0.0, at_mode="paper")
    assert set(out) == {"at", "total"}
    at = sum(attention_transfer_loss(p, t, mode="paper") for p, t in zip(preds, targets)) / 2
    torch.testing.assert_close(out["total"], 10 * at)


def test_feature_distillation_gradients():
    preds, targets = _levels()
    feature_distillation_loss(preds, targets, cos_weight=1.0)["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in preds)
    assert all(t.grad is None for t in targets)


def test_feature_distillation_errors():
    preds, targets = _levels()
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        feature_distillation_loss(preds, targets[:1])
    with pytest.raises(ValueError, match="at least one"):
        feature_distillation_loss([], [])
    with pytest.raises(ValueError, match=r"\(2, 4, 8, 8\).*\(2, 6, 4, 4\)"):
        feature_distillation_loss(preds, targets[::-1])


def test_whitened_teacher_has_uniform_attention():
    # Why AT uses the raw teacher feature: per-position whitening flattens the attention map.
    t = torch.randn(2, 16, 5, 5) * torch.rand(2, 1, 5, 5) * 10
    uniform = torch.full((2, 25), 1 / 5.0)
    torch.testing.assert_close(attention_map(whiten(t)), uniform, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(attention_map(t), uniform, atol=1e-2)
