"""augserver.plan: deterministic epoch order and DistributedSampler-style shards."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from augserver.augmix import sample_rng
from augserver.plan import ShardPlan, epoch_permutation, from_ranges, served_mask, to_ranges

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


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 60), old=st.integers(1, 5), new=st.integers(1, 5),
    batch=st.integers(1, 7), drop_last=st.booleans(), data=st.data(),
)
def test_an_epoch_resumed_on_another_world_size_serves_the_rest_once_in_equal_batches(
    n: int, old: int, new: int, batch: int, drop_last: bool, data: st.DataObject
) -> None:
    if drop_last and n < old:
        return
    plans = [ShardPlan(3, 1, n, r, old, batch, drop_last) for r in range(old)]
    consumed = [set(data.draw(st.lists(st.integers(0, max(p.num_batches - 1, 0)),
                                       max_size=p.num_batches))) if p.num_batches else set()
                for p in plans]
    delivered = [int(i) for p, done in zip(plans, consumed, strict=True)
                 for pos in sorted(done) for i in p.batch(pos)]
    whole = {int(i) for p in plans for pos in range(p.num_batches) for i in p.batch(pos)}
    skip = served_mask(plans, consumed)
    resumed = [ShardPlan(3, 1, n, r, new, batch, drop_last, skip) for r in range(new)]
    assert len({p.num_batches for p in resumed}) == 1  # equal batch counts
    rest = [int(i) for p in resumed for pos in range(p.num_batches) for i in p.batch(pos)]
    if not drop_last:
        assert set(delivered) | set(rest) == whole  # nothing of the epoch is lost
        assert len(rest) - len(set(rest)) < new  # repeats only as padding
    assert not (set(rest) - whole)
    assert not set(rest) & set(delivered)  # never served twice


def test_resumed_plans_nest_and_a_wrong_mask_is_refused() -> None:
    """A resumed epoch can be resumed again on yet another world size."""
    n, batch = 40, 3
    first = [ShardPlan(0, 0, n, r, 4, batch) for r in range(4)]
    done = [{0, 1}, {0}, set(), {0, 1, 2}]
    second = [ShardPlan(0, 0, n, r, 2, batch, False, served_mask(first, done))
              for r in range(2)]
    third = [ShardPlan(0, 0, n, r, 3, batch, False, served_mask(second, [{0}, {0, 1}]))
             for r in range(3)]
    got = ([i for p, d in zip(first, done, strict=True) for pos in d for i in p.batch(pos)]
           + [i for p, d in zip(second, [{0}, {0, 1}], strict=True) for pos in d
              for i in p.batch(pos)]
           + [i for p in third for pos in range(p.num_batches) for i in p.batch(pos)])
    assert set(got) == set(range(n)) and len(got) - n < 3
    with pytest.raises(ValueError, match="skip has 2 bytes"):
        ShardPlan(0, 0, n, 0, 1, batch, False, b"\0\0")
    with pytest.raises(ValueError, match="every rank"):
        served_mask(first[:3], done[:3])
