"""Deterministic epoch plans: which dataset indices rank ``r`` of ``W`` gets, in which batches.

The order of an epoch is a seeded permutation of ``(seed, epoch, dataset length)`` alone, so a
restarted dispatcher regenerates exactly the same plan and nothing durable is needed. Ranks
take their share as ``torch.utils.data.DistributedSampler`` does (pad by wrapping around, or
drop the tail with ``drop_last``), so every rank gets the same number of batches and DDP never
hangs on an uneven last step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

_PLAN_DOMAIN = 0x706C616E  # separates plan seeds from per-sample seeds (augmix.sample_rng)


def epoch_permutation(seed: int, epoch: int, dataset_len: int) -> np.ndarray:
    """The epoch's order of all dataset indices: a function of these three numbers only."""
    sequence = np.random.SeedSequence([seed, epoch, dataset_len], spawn_key=(_PLAN_DOMAIN,))
    return np.random.Generator(np.random.PCG64(sequence)).permutation(dataset_len)


@dataclass(frozen=True)
class ShardPlan:
    """The batches of one rank for one epoch."""

    seed: int
    epoch: int
    dataset_len: int
    rank: int
    world_size: int
    batch_size: int
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..world_size-1 ({self.world_size})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dataset_len < 1:
            raise ValueError("the dataset is empty")
        if self.drop_last and self.dataset_len < self.world_size:
            raise ValueError(
                f"drop_last leaves nothing: {self.dataset_len} samples for {self.world_size} ranks"
            )

    @cached_property
    def indices(self) -> np.ndarray:
        """This rank's dataset indices for the epoch, in order (DistributedSampler's share)."""
        order = epoch_permutation(self.seed, self.epoch, self.dataset_len)
        if self.drop_last:
            per_rank = self.dataset_len // self.world_size
        else:
            per_rank = -(-self.dataset_len // self.world_size)
        total = per_rank * self.world_size
        if total > len(order):
            order = np.resize(order, total)  # pads by repeating from the start
        return order[:total][self.rank :: self.world_size]

    @property
    def num_batches(self) -> int:
        """Batches of this rank, the same for every rank of the job."""
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch(self, position: int) -> np.ndarray:
        """Dataset indices of batch ``position`` (0-based) of this rank."""
        if not 0 <= position < self.num_batches:
            raise IndexError(f"batch {position} is not in 0..{self.num_batches - 1}")
        start = position * self.batch_size
        return self.indices[start : start + self.batch_size]


def to_ranges(positions: set[int] | list[int]) -> list[list[int]]:
    """Compress positions into sorted half-open ``[start, end)`` ranges (small checkpoints)."""
    ranges: list[list[int]] = []
    for p in sorted(set(positions)):
        if ranges and ranges[-1][1] == p:
            ranges[-1][1] = p + 1
        else:
            ranges.append([p, p + 1])
    return ranges


def from_ranges(ranges: list[list[int]]) -> set[int]:
    """The positions that :func:`to_ranges` compressed."""
    return {p for start, end in ranges for p in range(start, end)}
