"""The loader's side of shared memory without a service: the arena per connection and the
reused host buffers a slot is copied into."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from client.shared_memory import HostBuffers, SessionArena

pytestmark = pytest.mark.unit


@pytest.fixture
def directory(shm_directory: Path) -> Path:
    return shm_directory


def test_a_buffer_is_reused_only_once_no_tensor_uses_it() -> None:
    pool = HostBuffers(keep=2)
    source = torch.arange(3 * 4096, dtype=torch.int64).to(torch.uint8).reshape(3, 4096)
    first = pool.copy(source)
    assert torch.equal(first, source) and first.data_ptr() % 4096 == 0
    second = pool.copy(source)
    assert second.data_ptr() != first.data_ptr()  # the first is still in use
    kept = first.permute(1, 0)  # a view keeps the buffer in use
    address = first.data_ptr()
    del first
    gc.collect()
    third = pool.copy(source)
    assert third.data_ptr() != address
    del kept
    gc.collect()
    again = pool.copy(source)
    assert again.data_ptr() == address and torch.equal(again, source)
    assert third.data_ptr() != second.data_ptr()


def test_a_retired_arena_is_unlinked_at_once_and_unmapped_when_its_batches_are_read(
        directory: Path) -> None:
    warned: list[str] = []
    arena = SessionArena.create(directory, 2, 4096, warned)
    assert arena is not None and warned == []
    arena.hold()
    arena.view(1, (4096,))[...] = 7
    arena.retire()
    assert os.listdir(directory) == []  # nobody new can attach
    assert int(arena.view(1, (4096,)).sum()) == 7 * 4096  # still readable until released
    arena.release()
    with pytest.raises(ValueError):
        arena.view(1, (4096,))  # unmapped once nothing was held
    assert SessionArena.create(None, 2, 4096, warned) is None
    assert SessionArena.create(directory / "absent", 2, 4096, warned) is None
    assert SessionArena.create(directory / "absent", 2, 4096, warned) is None
    assert len(warned) == 1 and "cannot create" in warned[0]  # the reason, logged once
