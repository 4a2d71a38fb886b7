"""`ShardedSampler`: the sample order of one rank, resumable in the middle of an epoch.

It plays the part of torch's DistributedSampler (with ``set_epoch``) and adds what exact resumption needs:
the order is a function of (seed, epoch) alone, ``set_epoch(epoch, start)`` skips the samples this rank
has already trained on, and it yields ``(index, epoch)`` keys so that the dataset can seed each sample's
augmentation without being told the epoch (DataLoader workers hold copies of the dataset made when the
iterator started, so an epoch counter set on the dataset would not reach them).

Training (shuffle=True): a fresh permutation every epoch, padded by wrapping around to a multiple of the
world size as DistributedSampler does, rank r takes every world_size-th index from r; then the first
`length` of those (whole optimizer steps only). Evaluation (shuffle=False): indices r, r + W, r + 2W, ...
with no padding, so that across ranks every sample is evaluated exactly once.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

from .seeding import derive_seed


class ShardedSampler(Sampler):
    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 length: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardedSampler: rank {rank} is not in 0..{world_size - 1}")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.shard_size = math.ceil(size / world_size) if shuffle else len(range(rank, size, world_size))
        self.length = self.shard_size if length is None else length
        if self.length > self.shard_size:
            raise ValueError(f"ShardedSampler: length {self.length} exceeds this rank's {self.shard_size} samples")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first `start` samples of this rank (a resumed epoch)."""
        self.epoch, self.start = epoch, start

    def shard(self) -> list[int]:
        """This rank's sample indices for the current epoch, in order, before skipping `start`."""
        if not self.shuffle:
            return list(range(self.rank, self.size, self.world_size))
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(
            derive_seed(self.seed, "order", self.epoch))).tolist()
        padded = (order * math.ceil(self.shard_size * self.world_size / self.size))[:self.shard_size * self.world_size]
        return padded[self.rank::self.world_size][:self.length]

    def __iter__(self):
        return iter([(index, self.epoch) for index in self.shard()[self.start:]])

    def __len__(self) -> int:
        return max(self.length - self.start, 0)
