"""A learned timestep policy pi(t | x) trained by REINFORCE during distillation (RepFusion, Yang & Wang, ICCV 2023).

For every image the policy samples one timestep from a configurable discrete set of candidates; the teacher's
feature at that timestep is the distillation target for that image. The reward is the negative per-sample
cross-entropy of a small MLP head on the globally pooled teacher features at the sampled timestep (so the policy
needs LABELS); the head is trained on the same cross-entropy. RepFusion uses plain REINFORCE,
``-(log pi(t|x) * r).mean()``, with an entropy bonus 0.1 decaying linearly to 0 halfway through training.

Beyond RepFusion, a baseline ``b`` is subtracted from the reward (``-(log pi * (r - b)).mean()``):

* ``batch-mean``: leave-one-out mean of the other rewards in the batch (unbiased: ``b_i`` does not depend on
  sample ``i``'s action);
* ``ema``: exponential moving average of past batch-mean rewards (a buffer, so it is checkpointed);
* ``none``: RepFusion's plain REINFORCE.

`per_sample_grad_variance` measures what the baseline buys: the total variance (trace of the covariance) of
the per-sample policy-gradient estimates with and without the baseline, on the same batch.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .vocab import POLICY_BASELINES


class LeNetPolicy(nn.Module):
    """RepFusion's policy network: LeNet on the clean image -> logits over the K candidate timesteps.

    conv(C->6, k5) - ReLU - maxpool2 - conv(6->16, k5) - ReLU - maxpool2 - (adaptive pool to 5x5) - fc 400->120->84->K.
    The last layer starts at zero: the initial policy is uniform over the candidates.
    """

    def __init__(self, in_channels: int, num_actions: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(5),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(400, 120), nn.ReLU(inplace=True), nn.Linear(120, 84),
                                nn.ReLU(inplace=True), nn.Linear(84, num_actions))
        nn.init.zeros_(self.fc[-1].weight)
        nn.init.zeros_(self.fc[-1].bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) in [-1, 1] -> (B, K)
        return self.fc(self.features(x))


class TimestepPolicy(nn.Module):
    """Policy network + reward head + baseline state, trained together in one forward (one DDP call per step).

    Args:
        candidates: the discrete timesteps the policy chooses among.
        in_channels: channels of the teacher's input images (what the policy sees).
        feature_dim: channels of the pooled teacher features the reward head reads (all blocks concatenated).
        num_classes: classes of the labels.
        baseline: ``batch-mean | ema | none``.
        ema_momentum: weight of the old value in the ``ema`` baseline.
        hidden: width of the reward head's two hidden layers (RepFusion: 256).
    """

    def __init__(self, candidates: Sequence[int], in_channels: int, feature_dim: int, num_classes: int,
                 baseline: str = "batch-mean", ema_momentum: float = 0.9, hidden: int = 256):
        super().__init__()
        if baseline not in POLICY_BASELINES:
            raise ValueError(f"policy_baseline {baseline!r} is not one of {', '.join(POLICY_BASELINES)}.")
        if len(candidates) < 2:
            raise ValueError(f"the policy needs at least 2 candidate timesteps, got {list(candidates)}.")
        self.register_buffer("candidates", torch.tensor([int(t) for t in candidates], dtype=torch.long))
        self.net = LeNetPolicy(in_channels, len(candidates))
        self.head = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
        self.baseline = baseline
        self.ema_momentum = ema_momentum
        self.register_buffer("baseline_ema", torch.zeros(()))
        self.register_buffer("baseline_initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw one candidate per image: ``(action index [B], timestep [B])``."""
        probs = F.softmax(self.net(x).float(), dim=1)  # (B, K)
        a = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        return a, self.candidates[a]

    def advantage(self, reward: Tensor, update: bool = True) -> Tensor:
        """``reward - baseline`` for the configured baseline; updates the EMA state when ``update``."""
        if self.baseline == "none":
            return reward
        if self.baseline == "batch-mean":
            n = reward.shape[0]
            if n < 2:
                return reward - reward  # no other sample to compare with: no signal
            return reward - (reward.sum() - reward) / (n - 1)  # leave-one-out mean
        b = torch.where(self.baseline_initialised, self.baseline_ema, reward.mean())
        if update and self.training:
            self.baseline_ema.copy_(self.ema_momentum * b + (1 - self.ema_momentum) * reward.mean().detach())
            self.baseline_initialised.fill_(True)
        return reward - b

    def forward(self, x: Tensor, actions: Tensor, pooled: Tensor, labels: Tensor, entropy_weight: float) -> dict:
        """Losses of one step: the head's cross-entropy and the REINFORCE loss with baseline and entropy bonus.

        Args:
            x: the images the actions were sampled for, ``[B, C, H, W]``.
            actions: sampled candidate indices ``[B]``.
            pooled: pooled teacher features at the sampled timesteps ``[B, D]`` (no gradient flows to the teacher).
            labels: ``[B]`` class labels.
            entropy_weight: coefficient of the entropy bonus at this step.
        """
        logits = self.net(x).float()  # (B, K)
        logp_all = F.log_softmax(logits, dim=1)
        logp = logp_all.gather(1, actions[:, None]).squeeze(1)  # (B,)
        entropy = -(logp_all.exp() * logp_all).sum(1)  # (B,)
        ce = F.cross_entropy(self.head(pooled.detach().float()), labels, reduction="none")  # (B,)
        reward = -ce.detach()
        adv = self.advantage(reward)
        policy_loss = -(logp * adv).mean() - entropy_weight * entropy.mean()
        return {"loss": policy_loss + ce.mean(), "policy_loss": policy_loss.detach(), "head_ce": ce.mean().detach(),
                "reward": reward.mean(), "entropy": entropy.mean().detach(), "advantage_abs": adv.abs().mean()}


def entropy_weight(step: int, start: float, decay_steps: int) -> float:
    """Linear decay from ``start`` at step 0 to 0 at ``decay_steps`` (RepFusion: 0.1 -> 0 by epoch 100 of 200)."""
    if decay_steps <= 0:
        return 0.0
    return float(start) * max(0.0, 1.0 - step / decay_steps)


def per_sample_grad_variance(net: nn.Module, x: Tensor, actions: Tensor, advantages: dict[str, Tensor]) -> dict:
    """Total variance of per-sample REINFORCE gradients ``-grad log pi(a_i|x_i) * A_i`` for each advantage.

    The minibatch gradient is the mean of these per-sample terms, so its variance is this trace divided by B: the
    ratio between two advantages (e.g. with and without a baseline) is the ratio of the estimator variances.
    Computed with ``torch.func`` (``vmap`` over ``grad``) on a copy of the parameters; the model is untouched.

    Returns:
        ``{name: trace of the covariance of the per-sample gradients}``.
    """
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.detach() for k, v in net.named_buffers()}

    def logp(p, xi, ai):
        out = functional_call(net, (p, buffers), (xi[None],)).float()  # (1, K)
        return F.log_softmax(out, dim=1)[0].gather(0, ai.reshape(1))[0]

    g = vmap(grad(logp), in_dims=(None, 0, 0))(params, x.detach(), actions)  # {name: (B, *shape)}
    G = torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], dim=1)  # (B, P): grad log pi per sample
    out = {}
    for name, adv in advantages.items():
        per = -G * adv.detach().float()[:, None]  # (B, P)
        out[name] = float(per.var(dim=0, unbiased=True).sum())
    return out
