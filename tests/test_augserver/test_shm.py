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
        writer = worker.writer(Slot(arena.name, arena.token, index), pixels.nbytes)
        writer.write(pixels + index)
        writer.close()
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
    nbytes = int(np.prod(SHAPE))
    with pytest.raises(ShmError, match="does not fit"):
        worker.writer(Slot(arena.name, arena.token, 2), nbytes)
    with pytest.raises(ShmError, match="does not fit"):
        worker.writer(Slot(arena.name, arena.token, 0), arena.slot_bytes + 1)
    writer = worker.writer(Slot(arena.name, arena.token, 0), nbytes)
    with pytest.raises(ShmError, match="bytes of views"):
        writer.write(np.zeros(nbytes - 1, np.uint8))
    writer.close()
    # a worker that could not see an arena remembers why, and says it again
    with pytest.raises(ShmError, match="another host"):
        worker.writer(Slot(missing, arena.token, 0), nbytes)
    assert "another host" in worker.unusable[missing]
    off = Attachments(None)
    with pytest.raises(ShmError, match="off"):
        off.writer(Slot(arena.name, arena.token, 0), nbytes)
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
        worker.writer(Slot(name, _token(directory / name), 0), 16).close()
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


_HOSTILE_WRITER = """
import os, sys, threading, time
from pathlib import Path
import numpy as np
from augserver.shm import Attachments, Slot
directory, name, case = Path(sys.argv[1]), sys.argv[2], sys.argv[4]
token = bytes.fromhex(sys.argv[3])
worker = Attachments(directory)
views = np.full(3 * 4096 * 16, 7, np.uint8)
writer = worker.writer(Slot(name, token, 1), views.nbytes)
if case == "shrink":
    os.truncate(directory / name, 0)  # what a hostile owner does after the worker attached
    writer.write(views)
elif case == "replace":
    os.unlink(directory / name)
    (directory / name).write_bytes(b"")
    writer.write(views)
    worker.prune()
elif case == "close":
    # the arena retired and pruned while another thread writes into the slot, many times
    done = threading.Event()
    def write():
        for _ in range(200):
            writer.write(views)
        done.set()
    thread = threading.Thread(target=write)
    thread.start()
    os.unlink(directory / name)
    while not done.is_set():
        worker.prune()
        worker.close()
    thread.join()
writer.close()
print("alive", flush=True)
"""


@pytest.mark.parametrize("case", ["shrink", "replace", "close"])
def test_nothing_an_owner_does_to_its_arena_can_fault_a_worker(directory: Path, case: str
                                                               ) -> None:
    """A worker mapping the arena died of SIGBUS when the owner shrank the file, and of
    SIGSEGV when the mapping was closed while a thread wrote through it; a worker writes
    with pwrite through a descriptor of its own, so it lives on in every case."""
    arena = Arena.create(directory, 2, 3 * 4096 * 16)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _HOSTILE_WRITER, str(directory), arena.name,
             arena.token.hex(), case], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        assert done.stdout.strip() == "alive"
    finally:
        arena.close()
