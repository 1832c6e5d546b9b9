"""Which samples go into which micro-batch, as a pure function of the seed.

Two plans:

- by samples (`batch_size`): each epoch is a seeded permutation cut into batches of N samples;
- by tokens (`max_tokens_per_batch`): each epoch's permutation is cut into pools of about 64
  batches, each pool is sorted by length and cut so that rows x longest row stays within the
  budget, and the batches are shuffled again. Rows in one batch then have nearly the same
  length, so little compute goes to padding (MSRA lengths run from 60 to 410 tokens, and padding
  every row to the longest of a random batch wastes about a third of the compute), while the
  order stays random at the level of batches.

Either way the plan of epoch e depends only on (seed, e), so the micro-batch at position p of
the endless stream is known without replaying anything: that is what makes resume exact.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import lru_cache

POOL_BATCHES = 64


def _permutation(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def plan_by_samples(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = _permutation(n, seed)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def plan_by_tokens(lengths: Sequence[int], max_tokens: int, seed: int) -> list[list[int]]:
    """Length-grouped batches whose padded size (rows x longest) is at most max_tokens."""
    longest = max(lengths)
    if longest > max_tokens:
        raise ValueError(f"max_tokens_per_batch {max_tokens} is below the longest sample ({longest} tokens)")
    order = _permutation(len(lengths), seed)
    mean = sum(lengths) / len(lengths)
    pool_size = max(1, int(POOL_BATCHES * max_tokens / mean))
    batches: list[list[int]] = []
    for start in range(0, len(order), pool_size):
        pool = sorted(order[start:start + pool_size], key=lambda i: lengths[i])
        batch: list[int] = []
        width = 0
        for i in pool:
            new_width = max(width, lengths[i])
            if batch and new_width * (len(batch) + 1) > max_tokens:
                batches.append(batch)
                batch, new_width = [], lengths[i]
            batch.append(i)
            width = new_width
        if batch:
            batches.append(batch)
    random.Random(seed + 1_000_003).shuffle(batches)
    return batches


class BatchStream:
    """The endless, seeded stream of micro-batches (lists of sample indices) over the epochs."""

    def __init__(self, lengths: Sequence[int], seed: int, batch_size: int = 0, max_tokens: int = 0) -> None:
        if not lengths:
            raise ValueError("no samples")
        self.lengths = list(lengths)
        self.seed = seed
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self._plan = lru_cache(maxsize=2)(self._make_plan)
        self._sizes: dict[int, int] = {}

    def _make_plan(self, epoch: int) -> list[list[int]]:
        seed = self.seed + epoch
        if self.max_tokens:
            return plan_by_tokens(self.lengths, self.max_tokens, seed)
        return plan_by_samples(len(self.lengths), self.batch_size, seed)

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        return self._plan(epoch)

    def epoch_size(self, epoch: int) -> int:
        if epoch not in self._sizes:
            self._sizes[epoch] = len(self.epoch_plan(epoch))
        return self._sizes[epoch]

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, index in that epoch) of micro-batch number `position` of the stream."""
        epoch = 0
        while position >= self.epoch_size(epoch):
            position -= self.epoch_size(epoch)
            epoch += 1
        return epoch, position

    def batch(self, position: int) -> list[int]:
        epoch, index = self.locate(position)
        return self.epoch_plan(epoch)[index]

    def total_micro_batches(self, epochs: float) -> int:
        whole = int(epochs)
        count = sum(self.epoch_size(e) for e in range(whole))
        if epochs > whole:
            count += math.ceil((epochs - whole) * self.epoch_size(whole))
        return count
