"""The REINFORCE timestep policy (RepFusion): entropy schedule, baselines, gradient variance, learning a bandit."""
import pytest
import torch
import torch.nn.functional as F

from distill.policy import LeNetPolicy, TimestepPolicy, entropy_weight, per_sample_grad_variance


def test_entropy_weight_decays_linearly():
    assert entropy_weight(0, 0.1, 100) == pytest.approx(0.1)
    assert entropy_weight(50, 0.1, 100) == pytest.approx(0.05)
    assert entropy_weight(100, 0.1, 100) == 0.0 and entropy_weight(150, 0.1, 100) == 0.0


def test_batch_mean_baseline_is_leave_one_out_and_ema_tracks():
    pol = TimestepPolicy([1, 11], 1, 4, 3, baseline="batch-mean")
    r = torch.tensor([1.0, 2.0, 6.0])
    assert pol.advantage(r).tolist() == pytest.approx([1 - 4.0, 2 - 3.5, 6 - 1.5])
    ema = TimestepPolicy([1, 11], 1, 4, 3, baseline="ema", ema_momentum=0.5).train()
    assert ema.advantage(torch.tensor([2.0, 4.0])).tolist() == pytest.approx([-1.0, 1.0])  # first batch: its mean
    assert float(ema.baseline_ema) == pytest.approx(3.0)
    assert ema.advantage(torch.tensor([5.0, 5.0])).tolist() == pytest.approx([2.0, 2.0])
    assert float(ema.baseline_ema) == pytest.approx(4.0)
    assert TimestepPolicy([1, 11], 1, 4, 3, baseline="none").advantage(r).tolist() == r.tolist()
    with pytest.raises(ValueError, match="policy_baseline 'mean' is not one of batch-mean, ema, none"):
        TimestepPolicy([1, 11], 1, 4, 3, baseline="mean")


def test_per_sample_grad_variance_matches_autograd_loop_and_baseline_lowers_it():
    torch.manual_seed(0)
    net = LeNetPolicy(1, 4)
    torch.nn.init.normal_(net.fc[-1].weight, std=0.1)
    x, a = torch.randn(16, 1, 16, 16), torch.randint(0, 4, (16,))
    r = -2.0 + 0.1 * torch.randn(16)  # rewards far from zero, as negative cross-entropies are
    adv = {"none": r, "loo": r - (r.sum() - r) / 15}
    got = per_sample_grad_variance(net, x, a, adv)
    for name, A in adv.items():  # independent: one autograd backward per sample
        grads = []
        for i in range(16):
            net.zero_grad()
            (-F.log_softmax(net(x[i:i + 1]), 1)[0, a[i]] * A[i]).backward()
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        assert got[name] == pytest.approx(float(torch.stack(grads).var(0).sum()), rel=1e-4)
    assert got["loo"] < 0.1 * got["none"]


def test_policy_learns_the_informative_timestep():
    """A bandit: the pooled feature holds the label only at candidate index 1; the head learns to read it, the reward
    follows, and REINFORCE moves the policy onto that timestep."""
    torch.manual_seed(0)
    pol = TimestepPolicy([1, 11, 50], 1, 8, 4, baseline="batch-mean").train()
    opt = torch.optim.Adam(pol.parameters(), lr=3e-3)
    x = torch.randn(64, 1, 16, 16)
    for _ in range(300):
        y = torch.randint(0, 4, (64,))
        a, t = pol.sample(x)
        pooled = torch.randn(64, 8)
        pooled[a == 1, :4] += 4 * F.one_hot(y[a == 1], 4).float()
        out = pol(x, a, pooled, y, entropy_weight=0.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    probs = F.softmax(pol.net(x), 1).mean(0)
    assert probs[1] > 0.8, probs
    assert set(t.tolist()) <= {1, 11, 50}
