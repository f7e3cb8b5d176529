"""Deterministic epoch plans: which dataset indices rank ``r`` of ``W`` gets, in which batches.

The order of an epoch is a seeded permutation of ``(seed, epoch, dataset length)`` alone, so a
restarted dispatcher regenerates exactly the same plan and nothing durable is needed. Ranks
take their share as ``torch.utils.data.DistributedSampler`` does (pad by wrapping around, or
drop the tail with ``drop_last``), so every rank gets the same number of batches and DDP never
hangs on an uneven last step.

Elastic resume. A plan may ``skip`` part of the epoch: a packed bit mask over the epoch's order
(:func:`pack_mask`) of the samples not to serve, which :func:`served_mask` computes from the
progress of every rank of an earlier world size. The rest of the epoch is then dealt to the new
ranks by the same rule, so a job that lost or gained ranks mid-epoch finishes it with each
sample once (bar the usual padding) and equal batch counts on every new rank.
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
    skip: bytes | None = None
    """Samples of the epoch not to serve (see :func:`served_mask`); None: the whole epoch."""

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..world_size-1 ({self.world_size})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dataset_len < 1:
            raise ValueError("the dataset is empty")
        if self.skip is not None and len(self.skip) != mask_bytes(self.dataset_len):
            raise ValueError(f"skip has {len(self.skip)} bytes, a mask over {self.dataset_len} "
                             f"samples has {mask_bytes(self.dataset_len)}")
        if self.skip is None and self.drop_last and self.dataset_len < self.world_size:
            raise ValueError(
                f"drop_last leaves nothing: {self.dataset_len} samples for {self.world_size} ranks"
            )

    @cached_property
    def order(self) -> np.ndarray:
        """The epoch's order of the samples this job serves: all, less those ``skip`` names."""
        order = epoch_permutation(self.seed, self.epoch, self.dataset_len)
        if self.skip is not None:
            order = order[~unpack_mask(self.skip, self.dataset_len)]
        return order

    @cached_property
    def indices(self) -> np.ndarray:
        """This rank's dataset indices for the epoch, in order (DistributedSampler's share)."""
        return deal(self.order, self.rank, self.world_size, self.drop_last)

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


def deal(order: np.ndarray, rank: int, world_size: int, drop_last: bool) -> np.ndarray:
    """Rank ``rank``'s share of ``order``: every ``world_size``-th sample, the tail padded by
    repeating from the start (or dropped with ``drop_last``) so every rank gets as many."""
    n = len(order)
    per_rank = n // world_size if drop_last else -(-n // world_size)
    total = per_rank * world_size
    if total > n:
        order = np.resize(order, total)  # pads by repeating from the start
    return order[:total][rank::world_size]


def mask_bytes(dataset_len: int) -> int:
    """Bytes of a packed mask over ``dataset_len`` samples."""
    return -(-dataset_len // 8)


def pack_mask(mask: np.ndarray) -> bytes:
    return np.packbits(mask.astype(bool)).tobytes()


def unpack_mask(packed: bytes, dataset_len: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(packed, np.uint8), count=dataset_len).astype(bool)


def served_mask(plans: list[ShardPlan], consumed: list[set[int]]) -> bytes:
    """The ``skip`` for the rest of an epoch, from every rank's plan of that epoch and the
    batch positions each has consumed: set for each sample of the epoch's order that was
    delivered, that the plans never serve (dropped, or skipped already), i.e. all but the
    samples of batches not consumed yet that no rank has delivered."""
    first = plans[0]
    if sorted(p.rank for p in plans) != list(range(first.world_size)) or any(
            (p.seed, p.epoch, p.dataset_len, p.world_size, p.skip)
            != (first.seed, first.epoch, first.dataset_len, first.world_size, first.skip)
            for p in plans):
        raise ValueError("the states must be of every rank of one epoch of one job")
    delivered, waiting = [], []
    for plan, done in zip(plans, consumed, strict=True):
        for position in range(plan.num_batches):
            (delivered if position in done else waiting).append(plan.batch(position))
    todo = np.zeros(first.dataset_len, bool)
    if waiting:
        todo[np.concatenate(waiting)] = True
    if delivered:
        todo[np.concatenate(delivered)] = False
    order = epoch_permutation(first.seed, first.epoch, first.dataset_len)
    return pack_mask(~todo[order])


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
