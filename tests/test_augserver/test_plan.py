"""augserver.plan: deterministic epoch order and DistributedSampler-style shards."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from augserver.augmix import sample_rng
from augserver.plan import ShardPlan, epoch_permutation, from_ranges, to_ranges

pytestmark = pytest.mark.unit


def test_permutation_is_a_function_of_seed_epoch_and_length():
    a = epoch_permutation(0, 0, 100)
    assert np.array_equal(a, epoch_permutation(0, 0, 100))
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, epoch_permutation(1, 0, 100))
    assert not np.array_equal(a, epoch_permutation(0, 1, 100))
    # distinct from the per-sample generators seeded with the same three numbers
    assert not np.array_equal(
        a, np.random.Generator(sample_rng(0, 0, 100).bit_generator).permutation(100)
    )


@settings(max_examples=150, deadline=None)
@given(
    length=st.integers(1, 300),
    world=st.integers(1, 9),
    batch=st.integers(1, 40),
    drop_last=st.booleans(),
)
def test_every_rank_gets_the_same_batch_count_and_shards_cover_the_epoch(
    length, world, batch, drop_last
):
    if drop_last and length < world:
        with pytest.raises(ValueError, match="drop_last"):
            ShardPlan(0, 0, length, 0, world, batch, drop_last)
        return
    plans = [ShardPlan(3, 2, length, r, world, batch, drop_last) for r in range(world)]
    counts = {p.num_batches for p in plans}
    assert len(counts) == 1, "ranks disagree on the number of batches: DDP would hang"
    sizes = {len(p.indices) for p in plans}
    assert len(sizes) == 1
    seen = np.concatenate([p.indices for p in plans])
    if drop_last:
        assert len(np.unique(seen)) == len(seen), "drop_last must not repeat samples"
    else:
        assert set(seen.tolist()) == set(range(length)), "padding must still cover everything"
        assert len(seen) - length < world
    for p in plans:
        batches = [p.batch(i) for i in range(p.num_batches)]
        joined = np.concatenate(batches) if batches else np.array([], int)
        if drop_last:
            assert all(len(b) == batch for b in batches)
        else:
            assert np.array_equal(joined, p.indices)


def test_disjoint_shards_when_divisible():
    plans = [ShardPlan(0, 0, 120, r, 4, 10) for r in range(4)]
    sets = [set(p.indices.tolist()) for p in plans]
    assert all(a.isdisjoint(b) for i, a in enumerate(sets) for b in sets[i + 1 :])
    assert set().union(*sets) == set(range(120))


def test_matches_distributed_sampler_rule():
    # DistributedSampler: pad the permutation by wrapping, then rank r takes [r::W]
    order = epoch_permutation(7, 1, 10).tolist()
    padded = order + order[:2]
    for rank in range(3):
        assert ShardPlan(7, 1, 10, rank, 3, 2).indices.tolist() == padded[rank::3]


def test_invalid_plans():
    with pytest.raises(ValueError, match="rank"):
        ShardPlan(0, 0, 10, 2, 2, 4)
    with pytest.raises(ValueError, match="batch_size"):
        ShardPlan(0, 0, 10, 0, 1, 0)
    with pytest.raises(ValueError, match="empty"):
        ShardPlan(0, 0, 0, 0, 1, 4)
    with pytest.raises(IndexError):
        ShardPlan(0, 0, 10, 0, 1, 4).batch(3)


def test_ranges_round_trip():
    positions = {0, 1, 2, 5, 7, 8, 20}
    assert to_ranges(positions) == [[0, 3], [5, 6], [7, 9], [20, 21]]
    assert from_ranges(to_ranges(positions)) == positions
    assert to_ranges([]) == []
