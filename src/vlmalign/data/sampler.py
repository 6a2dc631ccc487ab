"""Length-grouped batching: fewer padding tokens in each batch.

As transformers' `group_by_length`: shuffle, cut into mega-batches of `batch_size * group`
samples, sort each mega-batch by length, cut it into batches, shuffle the batches. Batches
stay random across the epoch while their members have similar lengths. With `group=1` and
equal lengths it gives plain shuffled batches (what `DataLoader(shuffle=True)` gives).

The order is a function of (seed, epoch) only, so a resumed run continues it exactly:
`set_epoch(epoch)` then `skip_next(n)` drops the n batches the interrupted run consumed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

# Batches per length-sorted mega-batch (train.group_by_length): 8 keeps batches random
# on small datasets (transformers uses up to 50). The trainer and the bench both use it.
LENGTH_GROUP = 8


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices. Deterministic given `seed` and the epoch: every
    call to `__iter__` starts the next epoch (or the one set with `set_epoch`).

    `group` is the number of batches per mega-batch (transformers uses up to 50; 8 keeps
    batches random on small datasets); `group=1` only shuffles."""

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, group: int = LENGTH_GROUP, drop_last: bool = True
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if group < 1:
            raise ValueError(f"group must be >= 1 (1: no length grouping), got {group}")
        self.lengths = torch.as_tensor(list(lengths))
        self.batch_size = batch_size
        self.seed = seed
        self.group = group
        self.drop_last = drop_last and len(self.lengths) >= batch_size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch (shuffle) the next `__iter__` yields; Accelerate's loader calls this."""
        self.epoch = epoch

    def skip_next(self, batches: int) -> None:
        """Drop the first `batches` batches of the next `__iter__` only (resuming mid-epoch).
        The epoch's order is unchanged: the iteration yields its batches from `batches` on."""
        if batches < 0:
            raise ValueError(f"cannot skip a negative number of batches ({batches})")
        self._skip = batches

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=g)
        mega = self.batch_size * self.group
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        skip, self._skip = self._skip, 0
        for i in torch.randperm(len(batches), generator=g).tolist()[skip:]:
            yield batches[i]
