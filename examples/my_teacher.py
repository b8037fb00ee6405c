"""A user's own diffusion network, as ``teacher: python:examples/my_teacher.py:make_unet`` loads it.

Any ``nn.Module`` called as ``model(noisy_image, timestep)`` works (ADM, EDM behind a wrapper, your DDPM): distill
adds the noise with the recipe's schedule (``teacher_scheduler``, DDPM's linear one by default), calls the network
once and reads the outputs of the blocks named in ``teacher_blocks`` (paths of ``named_modules()``: here ``mid``,
``up.0``, ``up.1``) with forward hooks. This one is a small two-level DDPM-style UNet (sinusoidal timestep
embedding, residual blocks, skip connections); its ``in_channels`` and ``image_size`` attributes tell distill the
input it takes. Train it (or load your weights with ``teacher_weights``) before distilling from it for real.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of integer timesteps t [B] (Vaswani et al. 2017, as DDPM uses it)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(4, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class TinyUNet(nn.Module):
    """x [B, in_channels, S, S] in [-1, 1], t [B] -> predicted noise [B, in_channels, S, S]."""

    def __init__(self, in_channels: int = 3, base: int = 32, image_size: int = 32):
        super().__init__()
        self.in_channels, self.image_size, self.base = in_channels, image_size, base
        tdim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.inp = nn.Conv2d(in_channels, base, 3, padding=1)
        self.down = nn.ModuleList([ResBlock(base, base, tdim), ResBlock(base, 2 * base, tdim)])
        self.mid = ResBlock(2 * base, 2 * base, tdim)
        self.up = nn.ModuleList([ResBlock(4 * base, base, tdim), ResBlock(2 * base, base, tdim)])
        self.out = nn.Conv2d(base, in_channels, 3, padding=1)

    def forward(self, x, t):
        emb = self.time_mlp(timestep_embedding(t, self.base))
        h, skips = self.inp(x), []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i == 0:
                h = F.avg_pool2d(h, 2)  # S -> S/2
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], 1), emb)
            if i == 0:
                h = F.interpolate(h, scale_factor=2.0)  # S/2 -> S
        return self.out(h)


def make_unet(in_channels: int = 3, base: int = 32, image_size: int = 32) -> TinyUNet:
    """The factory the recipe names; its keyword arguments come from ``teacher_kwargs``."""
    return TinyUNet(in_channels=in_channels, base=base, image_size=image_size)
