"""Seeds derived from (seed, epoch, index, ...): randomness that does not depend on how a run was cut up.

Every random choice of the data pipeline and of the training step (which frames, which crop, which mixup
partner) draws from a generator seeded by a tuple that names *what* is being decided, never from a stream
shared across samples. A sample therefore looks the same whichever worker loads it, in whatever order,
and a run resumed in the middle of an epoch sees exactly the clips an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints and strings (a hash, so nearby tuples give unrelated seeds)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*parts: int | str) -> torch.Generator:
    """A CPU torch.Generator seeded with `derive_seed(*parts)`."""
    return torch.Generator().manual_seed(derive_seed(*parts))
