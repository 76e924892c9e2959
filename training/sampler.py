"""Deterministic per-epoch data order, optionally grouped by length.

The order of epoch `e` depends only on (seed, e), never on RNG state consumed elsewhere, so a
run resumed mid-epoch (with the first batches skipped) sees exactly the batches an
uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Random permutation per epoch; with `lengths`, similar lengths are put in the same batch.

    Length grouping: shuffle, cut into mega-batches of `batch_size * mega_batch_factor` examples,
    sort each by length and cut it into batches, then shuffle the order of those batches. Batches
    pad little (most of the speed of dynamic padding) but, unlike a plain long-to-short order,
    the lengths a step sees do not cycle with the mega-batches.
    """

    def __init__(self, num_samples: int, seed: int, lengths: Sequence[int] | None = None,
                 batch_size: int = 1, mega_batch_factor: int = 50) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.lengths = lengths
        self.batch_size = max(batch_size, 1)
        self.mega_batch = self.batch_size * mega_batch_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        if self.lengths is None:
            return iter(order)
        lengths = self.lengths
        grouped: list[int] = []
        for start in range(0, len(order), self.mega_batch):
            chunk = sorted(order[start:start + self.mega_batch], key=lambda i: lengths[i], reverse=True)
            batches = [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            # The last (possibly short) batch of the epoch stays last: DataLoader cuts batches by
            # position, so a short batch in the middle would shift every later batch boundary.
            tail = [batches.pop()] if len(batches[-1]) < self.batch_size else []
            for b in torch.randperm(len(batches), generator=generator).tolist():
                grouped.extend(batches[b])
            for batch in tail:
                grouped.extend(batch)
        return iter(grouped)
