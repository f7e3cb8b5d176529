"""Shared-memory arenas: made, attached, written and read, refused, and swept once their
owner is dead (a real SIGKILL of a real owner process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from augserver.shm import (
    HEADER_BYTES,
    Arena,
    Attachments,
    ShmError,
    Slot,
    attach,
    shm_dir,
    slot_bytes,
    sweep,
)

pytestmark = pytest.mark.unit

SHAPE = (3, 4, 8, 8, 3)  # a batch of 4 JSD samples of 8 px


@pytest.fixture
def directory(shm_directory: Path) -> Path:
    return shm_directory


def test_a_worker_writes_a_slot_and_the_trainer_reads_the_same_bytes(directory: Path) -> None:
    arena = Arena.create(directory, 3, int(np.prod(SHAPE)))
    assert arena.slot_bytes == slot_bytes(int(np.prod(SHAPE))) and arena.slot_bytes % 4096 == 0
    assert os.path.getsize(arena.path) == HEADER_BYTES + 3 * arena.slot_bytes
    worker = Attachments(directory)
    pixels = np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)
    for index in range(3):
        worker.view(Slot(arena.name, arena.token, index), SHAPE)[...] = pixels + index
    for index in range(3):
        np.testing.assert_array_equal(arena.view(index, SHAPE), pixels + index)
    arena.close()
    assert os.listdir(directory) == []
    worker.prune()
    assert worker.mapped == {}  # the worker lets go of an arena whose name is gone


def test_attach_refuses_other_names_tokens_and_slots(directory: Path) -> None:
    arena = Arena.create(directory, 2, int(np.prod(SHAPE)))
    with pytest.raises(ShmError, match="not an augserver arena name"):
        attach(directory, "../../etc/passwd", arena.token)
    with pytest.raises(ShmError, match="token differs"):
        attach(directory, arena.name, b"x" * 16)
    missing = f"augserver-{uuid.uuid4().hex}.shm"
    with pytest.raises(ShmError, match="another host"):
        attach(directory, missing, arena.token)
    worker = Attachments(directory)
    with pytest.raises(ShmError, match="does not fit"):
        worker.view(Slot(arena.name, arena.token, 2), SHAPE)
    with pytest.raises(ShmError, match="does not fit"):
        worker.view(Slot(arena.name, arena.token, 0), (arena.slot_bytes + 1,))
    # a worker that could not see an arena remembers why, and says it again
    with pytest.raises(ShmError, match="another host"):
        worker.view(Slot(missing, arena.token, 0), SHAPE)
    assert "another host" in worker.unusable[missing]
    off = Attachments(None)
    with pytest.raises(ShmError, match="off"):
        off.view(Slot(arena.name, arena.token, 0), SHAPE)
    arena.close()


def test_an_arena_too_big_for_the_mount_fails_at_creation_and_leaves_nothing(
        directory: Path) -> None:
    with pytest.raises(ShmError, match="not enough shared memory"):
        Arena.create(directory, 4, 2**40)  # 4 TiB: more than any tmpfs here
    assert os.listdir(directory) == []
    with pytest.raises(ShmError, match="cannot create"):
        Arena.create(directory / "missing", 1, 1024)


_OWNER = """
import sys, time
from pathlib import Path
from augserver.shm import Arena
arena = Arena.create(Path(sys.argv[1]), 2, 4096)
print(arena.name, flush=True)
time.sleep(60)
"""


def test_sweep_removes_the_arena_of_a_killed_owner_and_keeps_live_ones(
        directory: Path) -> None:
    live = Arena.create(directory, 1, 4096)
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(directory)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        name = owner.stdout.readline().strip()
        worker = Attachments(directory)
        worker.view(Slot(name, _token(directory / name), 0), (16,))
        assert sweep(directory) == []  # both owners live
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        worker.prune()  # what a worker does every SWEEP_SECONDS
        assert sorted(os.listdir(directory)) == [live.name]
        assert name not in worker.mapped
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    live.close()
    assert sweep(directory) == [] and os.listdir(directory) == []


def test_the_directory_comes_from_the_argument_the_environment_or_dev_shm(monkeypatch) -> None:
    monkeypatch.delenv("AUGSERVER_SHM_DIR", raising=False)
    assert shm_dir() == Path("/dev/shm")
    monkeypatch.setenv("AUGSERVER_SHM_DIR", "/run/shared")
    assert shm_dir() == Path("/run/shared")
    assert shm_dir("/elsewhere") == Path("/elsewhere")
    monkeypatch.setenv("AUGSERVER_SHM_DIR", "off")
    assert shm_dir() is None


def _token(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(24)[8:]
