"""The batches of a fine-tune: a fixed number of steps drawn from an endless seeded shuffle."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler):
    """Exactly ``steps`` batches of ``batch_size`` indices from an endless stream of seeded permutations.

    Batches run across epoch boundaries, so a subset smaller than a batch still gives full batches, and the
    image order depends only on ``(n, batch_size, seed)``. With ``world > 1`` each process takes its share
    ``batch[rank::world]`` of every global batch.
    """

    def __init__(self, n: int, batch_size: int, steps: int, seed: int, start: int = 0, rank: int = 0,
                 world: int = 1):
        if n < 1:
            raise ValueError("the labelled subset is empty.")
        self.n, self.batch_size, self.steps, self.seed = n, batch_size, steps, seed
        self.start, self.rank, self.world = start, rank, world

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed)
        buf: list[int] = []
        for step in range(self.steps):
            while len(buf) < self.batch_size:
                buf += torch.randperm(self.n, generator=g).tolist()
            batch, buf = buf[:self.batch_size], buf[self.batch_size:]
            if step >= self.start:
                yield batch[self.rank::self.world]
