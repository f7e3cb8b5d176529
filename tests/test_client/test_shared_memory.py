"""The same-host shared-memory path end to end: real dispatcher, worker and trainer processes,
real SIGKILLs, a shared-memory directory of the test's own under /dev/shm."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from augserver.plan import ShardPlan
from augserver.shm import arena_bytes, slot_bytes
from augserver.stats import DispatcherStats
from augserver.status import request_status
from client import RemoteAugMixLoader
from tests.service_helpers import REPO, end_process, wait_for, wait_workers
from tests.test_client.test_loader import (
    Processes,
    collect,
    free_address,
    indices,
    job_config,
    stream_hash,
)

pytestmark = pytest.mark.service

N = 96  # batch 8: 12 batches an epoch


@pytest.fixture
def shm(shm_directory: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's shared-memory directory, given to every process it starts."""
    monkeypatch.setenv("AUGSERVER_SHM_DIR", str(shm_directory))
    return shm_directory


def status(address: str) -> DispatcherStats:
    return request_status(address, 10.0)


def arenas(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".shm"))


def test_the_stream_is_the_same_through_shared_memory_and_tcp_for_any_worker_count(
        tmp_path, procs, shm):
    """The ordered stream's hash through TCP and through shared memory, with 1 and 3 workers,
    and with a worker SIGKILLed while it writes a slot: one hash. Each sample once, and the
    trainer's arena gone when the epoch is."""
    config = job_config(tmp_path, N)
    hashes, expected = {}, ShardPlan(0, 0, N, 0, 1, 8).indices.tolist()
    for path, workers, kill in (("tcp", 1, False), ("shm", 1, False), ("shm", 3, False),
                                ("shm", 2, True), ("tcp", 2, True)):
        address = free_address()
        server = procs.serve(config, address)
        started = [procs.worker(address) for _ in range(workers)]
        wait_workers(address, workers)
        loader = RemoteAugMixLoader(address, ordered=True, prefetch=4, timeout=60,
                                    normalize=False, shm=None if path == "shm" else False)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == 1 and path == "shm":
                (arena,) = arenas(shm)  # prefetch slots of a full batch's views
                views = 3 * 8 * 32 * 32 * 3
                assert os.path.getsize(shm / arena) == arena_bytes(4, slot_bytes(views))
            if kill and len(batches) == 2:
                Processes.kill(started[0])  # it holds tasks, their slots half written
        stats = status(address)
        assert sorted(indices(batches)) == sorted(expected), (path, workers, kill)
        if path == "shm":
            # a killed worker's slots are never reused: some batches may then go over TCP
            assert stats.counters.batches_shm >= (1 if kill else 12), stats.counters
        else:
            assert stats.counters.batches_shm == 0 and stats.counters.batches_tcp == 12
        if kill:
            assert stats.counters.tasks_reissued >= 1
        hashes[(path, workers, kill)] = stream_hash(batches)
        if kill:  # a slot was lost: the arena is not kept for a next epoch
            assert arenas(shm) == []
        elif workers == 1:
            loader.close()  # the arena kept for the next epoch, released
        else:
            del loader, batch, batches
            gc.collect()  # or when the loader is collected
        assert arenas(shm) == []
        Processes.kill(server)
    assert len(set(hashes.values())) == 1, hashes


def test_status_shows_each_streams_path_and_workers_that_cannot_see_fall_back(
        tmp_path, procs, shm, monkeypatch):
    address = free_address()
    procs.serve(job_config(tmp_path, N), address)
    procs.worker(address)  # shares the trainer's directory
    monkeypatch.setenv("AUGSERVER_SHM_DIR", str(tmp_path))  # as if on another host
    procs.worker(address)
    wait_workers(address, 2)
    loader = RemoteAugMixLoader(address, prefetch=2, timeout=60, normalize=False)
    paths = set()
    seen: list[int] = []
    for batch in loader:
        seen += batch.index.tolist()
        paths |= {s.path for _, s in status(address).streams}
        time.sleep(0.05)
    stats = status(address)
    assert stats.counters.batches_shm and stats.counters.batches_tcp, stats.counters
    assert "shm+tcp" in paths
    assert len(seen) == len(set(seen)) == N
    tcp = RemoteAugMixLoader(address, prefetch=2, timeout=60, shm=False)
    for _ in tcp:
        paths = {s.path for _, s in status(address).streams}
        assert paths == {"tcp"}
        break


def test_a_trainer_without_usable_shared_memory_says_why_and_uses_tcp(
        tmp_path, procs, shm, caplog):
    address = free_address()
    procs.serve(job_config(tmp_path, N), address, workers=1)
    caplog.set_level(logging.WARNING, "augserver.client")
    loader = RemoteAugMixLoader(address, timeout=60, shm=tmp_path / "no-such-dir")
    assert len(collect(loader)) == 12
    assert "batches come over TCP: cannot create a shared-memory arena" in caplog.text
    assert status(address).counters.batches_shm == 0


_TRAINER = """
import sys, time
from client import RemoteAugMixLoader
loader = RemoteAugMixLoader(sys.argv[1], prefetch=2, timeout=60)
for step, batch in enumerate(loader):
    if step == 1:
        print("training", flush=True)
    time.sleep(0.5)
"""


def test_a_trainer_killed_mid_epoch_leaves_no_arena_once_the_workers_notice(
        tmp_path, procs, shm):
    address = free_address()
    procs.serve(job_config(tmp_path, N), address, workers=2)
    wait_workers(address, 2)
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, address], cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout is not None and trainer.stdout.readline() == "training\n"
        assert len(arenas(shm)) == 1
        assert status(address).counters.batches_shm >= 2
        Processes.kill(trainer)
        wait_for(lambda: arenas(shm) == [], 10.0, "the killed trainer's arena to be swept")
    finally:
        end_process(trainer)


def test_a_dispatcher_killed_mid_epoch_leaves_no_arena_and_the_epoch_completes(
        tmp_path, procs, shm):
    config = job_config(tmp_path, N)
    address = free_address()
    procs.serve(config, address, workers=2)
    reference = collect(RemoteAugMixLoader(address, ordered=True, timeout=60, normalize=False,
                                           shm=False))
    address = free_address()
    server = procs.serve(config, address)
    procs.worker(address)
    procs.worker(address)
    loader = RemoteAugMixLoader(address, ordered=True, prefetch=2, timeout=90, liveness=2.0,
                                normalize=False)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 4:
            Processes.kill(server)
            time.sleep(0.5)
            server = procs.serve(config, address)  # workers and trainer come back
    assert stream_hash(batches) == stream_hash(reference)
    assert status(address).counters.batches_shm >= 1
    assert len(arenas(shm)) == 1  # the last connection's, kept for the next epoch
    loader.close()
    assert arenas(shm) == []


def test_an_epoch_resumed_mid_way_through_shared_memory_is_the_same_stream(
        tmp_path, procs, shm):
    address = free_address()
    procs.serve(job_config(tmp_path, N), address, workers=2)
    whole = collect(RemoteAugMixLoader(address, ordered=True, timeout=60, normalize=False,
                                       shm=False))
    loader = RemoteAugMixLoader(address, ordered=True, timeout=60, normalize=False)
    head = collect(loader, stop_after=5)
    resumed = RemoteAugMixLoader(address, ordered=True, prefetch=3, timeout=60,
                                 normalize=False)
    resumed.load_state_dict(loader.state_dict())
    assert stream_hash(head + collect(resumed)) == stream_hash(whole)
    assert status(address).counters.batches_shm >= 12
    resumed.close()
    assert arenas(shm) == []


def test_a_clean_epoch_hands_its_arena_to_the_next_and_a_lost_slot_does_not(
        tmp_path, procs, shm):
    """Making an arena costs about 0.5 CPU-s per GB: an epoch that ended with no slot whose
    writer was lost passes it to the next epoch; one with such a slot does not."""
    address = free_address()
    procs.serve(job_config(tmp_path, N), address)
    workers = [procs.worker(address), procs.worker(address)]
    wait_workers(address, 2)
    loader = RemoteAugMixLoader(address, prefetch=4, timeout=60, normalize=False)
    names = []
    for _ in range(2):
        for step, _batch in enumerate(loader):
            if step == 1:
                names.append(arenas(shm))
    assert len(names[0]) == 1 and names[0] == names[1]  # the same arena, epochs 0 and 1
    seen: list[int] = []
    workers[0].send_signal(signal.SIGSTOP)  # holds tasks, their slots, and never answers
    for step, batch in enumerate(loader):  # epoch 2: its tasks are re-issued, slots lost
        seen += batch.index.tolist()
        if step == 1:
            names.append(arenas(shm))
    assert sorted(seen) == sorted(ShardPlan(0, 2, N, 0, 1, 8).indices.tolist())
    assert status(address).counters.tasks_reissued >= 1
    Processes.kill(workers[0])
    for step, _batch in enumerate(loader):  # epoch 3: a new arena
        if step == 1:
            names.append(arenas(shm))
    assert names[2] == names[0] and len(names[3]) == 1 and names[3] != names[0]
