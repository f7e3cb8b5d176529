"""The dispatcher with real workers on loopback: exactly once, failures, credits, hostile input.

Dispatchers run in a thread of the test process; workers are processes where process death
matters and threads elsewhere. Every test ends what it starts (context managers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from augserver import dispatcher_state as dispatcher_module
from augserver import protocol
from augserver.augmix import sample_rng
from augserver.cli import main
from augserver.config import Limits
from augserver.datasets import open_dataset
from augserver.plan import ShardPlan
from augserver.preprocessing import preprocess
from augserver.status import request_status
from augserver.worker import EXIT_FATAL, Job, busy_tick, make_batch, run_worker
from tests.service_helpers import (
    REPO,
    Batch,
    RawClient,
    dispatcher_thread,
    end_process,
    free_port,
    job,
    make_image_folder,
    make_npz,
    spawn,
    wait_for,
    wait_workers,
    worker_processes,
    worker_threads,
    write_config,
)

pytestmark = pytest.mark.service

V = protocol.PROTOCOL_VERSION  # the version this side speaks

BATCH_BYTES = 3 * 4 * 32 * 32 * 3 + 16 * 4  # jsd views, batch 4, 32 px, labels + indices


def plan_of(config: Any, dataset_len: int, rank: int = 0, world_size: int = 1,
            epoch: int = 0) -> ShardPlan:
    return ShardPlan(config.seed, epoch, dataset_len, rank, world_size, config.batch_size,
                     config.drop_last)


def blank_result(indices: list[int], side: int = 32) -> list[np.ndarray]:
    """A result's arrays for ``indices`` (JSD views of zeros, zero labels): well formed for
    this module's jobs unless ``side`` differs from 32."""
    idx = np.array(indices, np.int64)
    return [np.zeros((3, len(idx), side, side, 3), np.uint8), np.zeros(len(idx), np.int64), idx]


def assert_exactly_once(batches: list[Batch], plan: ShardPlan) -> None:
    """Every position once, each holding exactly the plan's indices in the plan's order."""
    positions = [b.position for b in batches]
    assert sorted(positions) == list(range(plan.num_batches)), positions
    for batch in batches:
        assert batch.indices.tolist() == plan.batch(batch.position).tolist()


def test_a_busy_worker_checks_its_socket_several_times_per_heartbeat() -> None:
    assert busy_tick(Limits(heartbeat_interval=1.0)) == 0.025
    assert busy_tick(Limits(heartbeat_interval=0.02)) == pytest.approx(0.005)


# ---------------------------------------------------------------------------- exactly once


def test_full_epoch_with_two_worker_processes_arrives_exactly_once(tmp_path: Path) -> None:
    # Default heartbeats (3 s to be declared dead): nothing is re-issued on a loaded machine.
    config = job(tmp_path, make_npz(tmp_path, n=48), limits={"heartbeat_interval": 1.0})
    dataset = open_dataset("npz", config.dataset.path)
    with dispatcher_thread(config) as d, worker_processes(d.address, 2), RawClient(d.address) as c:
        wait_workers(d.address, 2)
        assert c.hello().type == "welcome"
        for rank in (0, 1):
            opened = c.open(f"r{rank}", epoch=3, rank=rank, world_size=2, credits=3)
            assert opened.fields == {"stream": f"r{rank}", "num_batches": 6,
                                     "batch_bytes": BATCH_BYTES}
        got = c.collect({"r0", "r1"})
        stats = request_status(d.address)
    assert got["errors"] == {}
    seen = []
    for rank in (0, 1):
        plan = plan_of(config, 48, rank, 2, epoch=3)
        assert_exactly_once(got[f"r{rank}"], plan)
        seen += [i for b in got[f"r{rank}"] for i in b.indices.tolist()]
    assert sorted(seen) == list(range(48))  # the two ranks' shards are disjoint and complete
    # Bytes depend on (seed, epoch, index) only: equal to a batch made here.
    reference = Job(config, dataset, config.to_dict())
    for batch in got["r1"][:2]:
        (views, labels, _), failed = make_batch(reference, 3, batch.indices.tolist())
        assert failed == []
        assert np.array_equal(batch.views, views) and np.array_equal(batch.labels, labels)
        assert batch.views.shape == (3, 4, 32, 32, 3)
    assert stats.counters.tasks_reissued == 0
    assert stats.counters.duplicates_dropped == 0
    assert sum(w.tasks_done for w in stats.workers) == 12


def test_sigkill_worker_mid_epoch_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    config = job(tmp_path, make_npz(tmp_path, n=48))
    with dispatcher_thread(config) as d, worker_processes(d.address, 2) as procs, \
            RawClient(d.address) as c:
        wait_workers(d.address, 2)
        victim = procs[0]
        os.kill(victim.pid, signal.SIGSTOP)  # it takes tasks and makes none of them
        c.hello()
        c.open("s", credits=8)

        def kill_once(batch: Batch) -> None:
            if victim.poll() is None:
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait(5)

        got = c.collect({"s"}, on_batch=kill_once)
        stats = wait_for(lambda: (s := request_status(d.address)) and len(s.workers) == 1
                         and s, 5, "the killed worker to be declared dead")
    assert got["errors"] == {}
    assert_exactly_once(got["s"], plan_of(config, 48))
    indices = [i for b in got["s"] for i in b.indices.tolist()]
    assert len(indices) == len(set(indices)) == 48
    assert stats.counters.tasks_reissued >= 1


def test_resume_reopen_and_bad_open(tmp_path: Path) -> None:
    config = job(tmp_path, make_npz(tmp_path, n=48))
    plan = plan_of(config, 48)
    with dispatcher_thread(config) as d, worker_threads(d.address), RawClient(d.address) as c:
        c.hello()
        c.open("s", credits=0, done=[[0, 3], [5, 6]])
        c.open("s", credits=4, done=[[0, 3], [5, 6]])  # replaces the first one
        got = c.collect({"s"})
        assert sorted(b.position for b in got["s"]) == [3, 4, *range(6, 12)]
        for batch in got["s"]:
            assert batch.indices.tolist() == plan.batch(batch.position).tolist()
        assert c.open("t", done=[[0, 2**62]]).type == "opened"  # nothing left: end at once
        assert c.expect("end")["stream"] == "t"
        error = c.open("u", rank=2, world_size=2)
        assert error.type == "error" and error["fatal"] and error["stream"] == "u"
        assert "rank 2" in error["message"]
        assert "exceeds" in c.open("v", world_size=2**40)["message"]
        c.send("ping")
        assert c.expect("pong").type == "pong"


# ---------------------------------------------------------------------------- handshake


def test_version_mismatch_is_refused_by_name(tmp_path: Path, monkeypatch: Any) -> None:
    config = job(tmp_path, make_npz(tmp_path, n=8))
    versions = protocol.pixel_versions()
    with dispatcher_thread(config) as d:
        with RawClient(d.address) as w:
            refused = w.hello("worker", versions={**versions, "numpy": "0.0"})
        assert refused.type == "refused"
        assert "numpy 0.0" in refused["reason"] and versions["numpy"] in refused["reason"]
        with RawClient(d.address) as w:
            refused = w.hello("client", version=99)
        assert refused.type == "refused"
        assert "99" in refused["reason"] and f"protocol {protocol.PROTOCOL_VERSION}" in \
            refused["reason"]
        with RawClient(d.address) as w:  # a frame 0 of a future protocol version
            w.send_raw([msgpack.packb({"v": 7, "t": "hello", "role": "worker", "x": [1]})])
            refused = w.expect("refused")
        assert "protocol version 7" in refused["reason"]
        # A real worker whose versions differ stops for good with EXIT_FATAL.
        monkeypatch.setattr(protocol, "pixel_versions", lambda: {**versions, "pillow": "1.0"})
        start = time.monotonic()
        assert run_worker(d.address, "mismatched") == EXIT_FATAL
        assert time.monotonic() - start < 5
        assert request_status(d.address).workers == []


def test_unknown_peer_is_reset_and_a_restarted_dispatcher_gets_its_worker_back(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = job(tmp_path, make_npz(tmp_path, n=16), bind=f"tcp://127.0.0.1:{port}")
    with worker_threads(f"tcp://127.0.0.1:{port}"):
        with dispatcher_thread(config) as d:
            wait_workers(d.address, 1)
            with RawClient(d.address) as c:
                c.send("ping")
                assert "hello" in c.expect("reset")["reason"]
        with dispatcher_thread(config) as d:  # same port, no memory of the worker
            wait_workers(d.address, 1, timeout=10)
            with RawClient(d.address) as c:
                c.hello()
                c.open("s")
                got = c.collect({"s"})
    assert_exactly_once(got["s"], plan_of(config, 16))


# ---------------------------------------------------------------------------- hostile input


def _header(**fields: Any) -> bytes:
    return msgpack.packb({"v": V, "arrays": [], **fields})


MALFORMED: dict[str, list[bytes]] = {
    "random bytes": [b"\xc1\xff\x00garbage"],
    "empty frame": [b""],
    "not a map": [msgpack.packb([1, 2, 3])],
    "wrong version": [msgpack.packb({"v": 99, "t": "ping", "arrays": []})],
    "unknown type": [_header(t="launch")],
    "bad field type": [_header(t="credit", stream="s", n="ten")],
    "bool for int": [_header(t="credit", stream="s", n=True)],
    "missing field": [_header(t="credit", stream="s")],
    "extra field": [_header(t="ping", extra=1)],
    "array size mismatch": [
        msgpack.packb({"v": V, "t": "result", "task": 0, "failed": [],
                       "arrays": [["|u1", [10]]]}), b"12345"],
    "frame count mismatch": [msgpack.packb({"v": V, "t": "ping", "arrays": [["|u1", [1]]]})],
    "forbidden dtype": [msgpack.packb({"v": V, "t": "ping", "arrays": [["|O", [1]]]}), b"x"],
    "extension type": [msgpack.packb({"v": V, "t": "ping", "arrays": [],
                                      "x": msgpack.ExtType(1, b"boom")})],
    "oversized header": [_header(t="ping", pad="x" * (protocol.MAX_HEADER_BYTES + 10))],
    "wrong role": [protocol.encode("result", task=0, failed=[])[0]],
}

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                               max_size=3),
    max_leaves=6,
)
_FUZZ_TYPES = sorted(set(protocol.SCHEMAS) - {"open", "hello"})


@st.composite
def _fuzz_frames(draw: Any) -> list[bytes]:
    """Frames that look like protocol messages: a real type, fields of random types,
    array descriptions that may not match the frames that follow."""
    mtype = draw(st.sampled_from(_FUZZ_TYPES))
    names = [*sorted(protocol.SCHEMAS[mtype]), "arrays", "junk"]
    fields = draw(st.dictionaries(st.sampled_from(names), _values, max_size=5))
    header = {"v": V, "t": mtype, **fields}
    if draw(st.booleans()):
        header["arrays"] = [[draw(st.sampled_from(["|u1", "<i8", "<f4", "<f8"])),
                             draw(st.lists(st.integers(0, 4), max_size=3))]]
    frames = draw(st.lists(st.binary(max_size=64), max_size=3))
    return [msgpack.packb(header), *frames]


def _fuzz(sock_owner: RawClient) -> None:
    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(frames=st.one_of(_fuzz_frames(), st.lists(st.binary(max_size=64), min_size=1,
                                                      max_size=4)))
    def send(frames: list[bytes]) -> None:
        sock_owner.send_raw(frames)

    send()


def test_malformed_messages_while_a_stream_runs(tmp_path: Path) -> None:
    config = job(tmp_path, make_npz(tmp_path, n=48))
    with dispatcher_thread(config) as d, RawClient(d.address) as c:
        c.hello()
        c.open("s", credits=2)
        # A worker that returns a result of the wrong shape: malformed, and re-issued.
        with RawClient(d.address) as bad:
            bad.hello("worker")
            bad.ready(1)
            task = bad.expect("task")
            bad.send("result", blank_result(task["indices"], side=31), task=task["task"],
                     failed=[])
            error = bad.expect("error")
            assert not error["fatal"] and "re-issued" in error["message"]
            bad.ready(1)
            again = bad.expect("task")
            assert again["task"] > task["task"] and again["indices"] == task["indices"]
        # A known peer's malformed messages are each answered with a non-fatal error.
        with RawClient(d.address) as evil:
            evil.hello()
            for name, frames in MALFORMED.items():
                evil.send_raw(frames)
                error = evil.expect("error")
                assert not error["fatal"] and error["stream"] is None, name
            _fuzz(evil)
            evil.send("ping")  # answered once everything before it was handled
            while evil.expect("pong", "error", "status", "welcome", "refused",
                              timeout=10).type != "pong":
                pass
        # An unknown peer's messages: garbage is dropped, a valid message gets reset.
        with RawClient(d.address) as stranger:
            for frames in MALFORMED.values():
                stranger.send_raw(frames)
            stranger.send("credit", stream="s", n=5)
            stranger.expect("reset")
        with worker_threads(d.address, 2):
            got = c.collect({"s"})
            stats = request_status(d.address)
    assert got["errors"] == {}
    assert_exactly_once(got["s"], plan_of(config, 48))
    counters = stats.counters
    assert counters.malformed_messages >= 2 * len(MALFORMED) + 1
    assert counters.tasks_reissued >= 2  # the bad result, then the silent bad worker
    assert counters.handler_errors == 0


def test_results_that_do_not_match_their_task_are_named_and_reissued(tmp_path: Path) -> None:
    config = job(tmp_path, make_npz(tmp_path, n=16))
    with dispatcher_thread(config) as d, RawClient(d.address) as c:
        c.hello()
        c.open("s", credits=4)
        with RawClient(d.address) as w:
            w.hello("worker")
            wrong: list[tuple[Any, str]] = [
                (lambda v, lab, idx: [v, lab], "2 arrays instead of 3"),
                (lambda v, lab, idx: [v, lab, idx.reshape(1, -1)], "indices are int64[1,"),
                (lambda v, lab, idx: [v, lab.astype(np.uint8), idx], "labels are uint8"),
                (lambda v, lab, idx: [v[:1], lab, idx], "views are uint8[1,"),
                (lambda v, lab, idx: [v, lab, idx + 1], "do not match the task's indices"),
            ]
            w.ready(1)  # one slot: each result gives it back
            for build, problem in wrong:
                task = w.expect("task")
                w.send("result", build(*blank_result(task["indices"])), task=task["task"],
                       failed=[])
                error = w.expect("error")
                assert problem in error["message"] and "re-issued" in error["message"]
            # the same indices in another order, or a failed one replaced: valid
            task = w.expect("task")
            w.send("result", blank_result(task["indices"][::-1]), task=task["task"], failed=[])
            assert c.expect("batch")["position"] == 0
            task = w.expect("task")
            first, rest = task["indices"][0], task["indices"][1:]
            w.send("result", blank_result([(first + 1) % 16, *rest]), task=task["task"],
                   failed=[[first, "x.png", "broken"]])
            batch = c.expect("batch")
            assert batch["failed"][0][0] == first
            assert batch.arrays[2].tolist() == [(first + 1) % 16, *rest]
            # a failed one with no substitute: the stream fails, naming the sample
            task = w.expect("task")
            w.send("result", blank_result(task["indices"][1:]), task=task["task"],
                   failed=[[task["indices"][0], "y.png", "broken"]])
            error = c.expect("error")
            assert error["fatal"] and "y.png" in error["message"]
            assert "stand in" in error["message"]
        assert request_status(d.address).counters.tasks_reissued >= len(wrong)


def test_oversized_message_does_not_kill_the_dispatcher(tmp_path: Path) -> None:
    config = job(tmp_path, make_npz(tmp_path, n=16), limits={"max_message_bytes": 100_000})
    with dispatcher_thread(config) as d, RawClient(d.address) as c:
        c.hello()
        c.open("s", credits=2)
        for role in ("client", None):
            with RawClient(d.address) as big:
                if role:
                    big.hello(role)
                header = msgpack.packb({"v": V, "t": "ping", "arrays": [["|u1", [300_000]]]})
                big.send_raw([header, bytes(300_000)])
                assert big.recv(0.3) is None  # disconnected, not answered
        assert request_status(d.address).dataset_len == 16
        with worker_threads(d.address):
            got = c.collect({"s"})
    assert_exactly_once(got["s"], plan_of(config, 16))


# ---------------------------------------------------------------------------- policies, credits


def _bad_index(root: Path) -> int:
    dataset = open_dataset("imagefolder", root)
    return next(i for i in range(len(dataset)) if dataset.path(i).endswith("bad.png"))


def test_error_policy_skip_reports_the_corrupt_sample(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path)
    bad = _bad_index(root)
    config = job(tmp_path, root, "imagefolder", error_policy="skip")
    plan = plan_of(config, 13)
    with dispatcher_thread(config) as d, worker_threads(d.address), RawClient(d.address) as c:
        c.hello()
        c.open("s")
        got = c.collect({"s"})
        stats = request_status(d.address)
    assert got["errors"] == {}
    delivered = [i for b in got["s"] for i in b.indices.tolist()]
    stand_in = bad + 1  # the next sample in dataset order (bad.png sorts first in its class)
    assert bad not in delivered and len(delivered) == 13
    assert sorted(delivered) == sorted([*(set(range(13)) - {bad}), stand_in])
    failed = [f for b in got["s"] for f in b.failed]
    assert len(failed) == 1 and failed[0][0] == bad and failed[0][1].endswith("bad.png")
    for batch in got["s"]:  # every batch full, the stand-in in the failed sample's place
        expected = [stand_in if i == bad else i for i in plan.batch(batch.position).tolist()]
        assert batch.indices.tolist() == expected
        assert batch.views.shape[1] == len(expected) == len(batch.labels)
        if bad in plan.batch(batch.position).tolist():  # its bytes: the stand-in's, this epoch
            slot = expected.index(stand_in)
            rng = sample_rng(config.seed, 0, stand_in)
            source = open_dataset("imagefolder", str(root)).load(stand_in)
            image = preprocess(config.preprocess, source, rng)
            np.testing.assert_array_equal(batch.views[0, slot], image)
    assert stats.counters.samples_failed == 1
    assert stats.recent_failures[0].path.endswith("bad.png")
    assert stats.recent_failures[0].index == bad


def test_error_policy_fail_ends_the_stream_with_the_path(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path)
    bad = _bad_index(root)
    config = job(tmp_path, root, "imagefolder", error_policy="fail")
    with dispatcher_thread(config) as d, worker_threads(d.address), RawClient(d.address) as c:
        c.hello()
        c.open("s")
        got = c.collect({"s"})
    error = got["errors"]["s"]
    assert error["fatal"] and "bad.png" in error["message"]
    assert f"sample {bad}" in error["message"] and "error_policy" in error["message"]
    assert bad not in [i for b in got["s"] for i in b.indices.tolist()]


def test_credits_bound_what_is_sent(tmp_path: Path) -> None:
    config = job(tmp_path, make_npz(tmp_path, n=48),
                 limits={"max_prefetch_bytes": 3 * BATCH_BYTES})
    received: list[int] = []

    def take(c: RawClient, count: int) -> None:
        for _ in range(count):
            received.append(c.expect("batch")["position"])
        assert c.recv(0.4) is None, "more batches than credits"

    with dispatcher_thread(config) as d, worker_threads(d.address, 2), \
            RawClient(d.address) as c:
        c.hello()
        c.open("s", credits=2)
        take(c, 2)
        stream = request_status(d.address).clients[0].streams[0]
        assert (stream.credits, stream.in_flight, stream.delivered) == (0, 0, 2)
        c.send("credit", stream="s", n=1)
        take(c, 1)
        c.send("credit", stream="s", n=100)  # capped by max_prefetch_bytes: 3 batches
        take(c, 3)
        c.send("credit", stream="s", n=100)
        take(c, 3)
        c.send("credit", stream="s", n=100)
        for _ in range(3):
            received.append(c.expect("batch")["position"])
        assert c.expect("end")["stream"] == "s"
    assert sorted(received) == list(range(12))
    assert sorted(received[:2]) == [0, 1]  # lowest positions are assigned first


def test_what_a_client_left_unread_is_freed_once_its_connection_is_gone(
    tmp_path: Path,
) -> None:
    """A client that takes batches, never shows it read them, and dies holds the whole
    max_held_bytes budget; the dispatcher's probe finds its connection gone and frees it, so
    the next client gets its epoch (without the probe it would starve)."""
    config = job(tmp_path, make_npz(tmp_path, n=48),
                 limits={"max_held_bytes": 3 * BATCH_BYTES})
    with dispatcher_thread(config) as d, worker_threads(d.address, 2):
        with RawClient(d.address) as hog:
            hog.hello()
            hog.open("s", credits=100)
            for _ in range(3):
                hog.expect("batch")
            assert hog.recv(0.5) is None  # the budget is spent: nothing more comes
            held = request_status(d.address).memory
            assert 0 < held.held_bytes <= held.max_held_bytes == 3 * BATCH_BYTES
        with RawClient(d.address) as c:  # the hog's socket is closed
            c.hello()
            c.open("t", credits=2)
            got = c.collect({"t"}, timeout=20)
        assert sorted(b.position for b in got["t"]) == list(range(12))
        wait_for(lambda: request_status(d.address).memory.held_bytes == 0, 10,
                 "what the closed clients held to be freed")


def test_silent_client_is_forgotten(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(dispatcher_module, "CLIENT_TIMEOUT", 0.5)
    config = job(tmp_path, make_npz(tmp_path, n=16))
    with dispatcher_thread(config) as d, RawClient(d.address) as c:
        c.hello()
        c.open("s", credits=1)
        assert len(request_status(d.address).clients) == 1
        wait_for(lambda: request_status(d.address).clients == [], 5, "client forgotten")


# ---------------------------------------------------------------------------- command line


def test_serve_restarts_a_killed_worker_and_status_shows_it(tmp_path: Path) -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    config = write_config(tmp_path, make_npz(tmp_path, n=16), security={"insecure": True})
    serve = spawn(["serve", "--config", str(config), "--bind", f"tcp://0.0.0.0:{port}",
                   "--workers", "2", "--log-level", "WARNING"], stderr=subprocess.PIPE)
    try:
        names = {w.name for w in wait_workers(address, 2).workers}
        victim = int(sorted(names)[0].rpartition(":")[2])
        os.kill(victim, signal.SIGKILL)
        stats = wait_for(
            lambda: (s := request_status(address)) and len(s.workers) == 2
            and not {w.name for w in s.workers} & {sorted(names)[0]} and s,
            20, "the killed worker to be replaced",
        )
        survivors = [int(w.name.rpartition(":")[2]) for w in stats.workers]
        text = subprocess.run(
            [sys.executable, "-m", "augserver", "status", "--connect", address],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )
        assert text.returncode == 0, text.stderr
        assert "workers: 2" in text.stdout and "tasks_reissued 0" in text.stdout
        raw = subprocess.run(
            [sys.executable, "-m", "augserver", "status", "--connect", address, "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )
        assert json.loads(raw.stdout)["dataset_len"] == 16
        os.kill(serve.pid, signal.SIGTERM)
        assert serve.wait(15) == 0
        for pid in survivors:  # the local workers were stopped with the dispatcher
            wait_for(lambda pid=pid: not _alive(pid), 5, f"worker {pid} to exit")
    finally:
        end_process(serve)
    log = serve.stderr.read().decode() if serve.stderr else ""
    assert "SIGKILL" in log and "restarting" in log


@pytest.mark.parametrize("io_threads", [1, 3])
def test_the_dispatcher_runs_the_configured_zeromq_io_threads(
    tmp_path: Path, io_threads: int
) -> None:
    """limits.io_threads: each connection is served by one of them (bench/dataplane.py
    measures the relay spreading over them with several trainers)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    config = write_config(tmp_path, make_npz(tmp_path, n=16), limits={"io_threads": io_threads})
    serve = spawn(["serve", "--config", str(config), "--bind", address, "--log-level",
                   "WARNING"])
    try:
        request_status(address, 20.0)
        names = [Path(f"/proc/{serve.pid}/task/{t}/comm").read_text().strip()
                 for t in os.listdir(f"/proc/{serve.pid}/task")]
        assert sum(n.startswith("ZMQbg/IO/") for n in names) == io_threads
    finally:
        end_process(serve)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cli_rejects_a_bad_config_naming_the_key(tmp_path: Path, capsys: Any) -> None:
    config = write_config(tmp_path, make_npz(tmp_path, n=8), batchsize=3)
    assert main(["serve", "--config", str(config)]) == 2
    assert "batchsize" in capsys.readouterr().err
    config = write_config(tmp_path, tmp_path / "missing.npz")
    assert main(["serve", "--config", str(config)]) == 2
    assert "dataset.path" in capsys.readouterr().err


def test_cli_status_without_dispatcher_fails_clearly(capsys: Any) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    assert main(["status", "--connect", address, "--timeout", "0.3"]) == 1
    err = capsys.readouterr().err
    assert "no augserver dispatcher" in err and address in err


@pytest.mark.parametrize("procs", [1, 2])
def test_worker_cli_exits_fatal_when_refused(tmp_path: Path, procs: int) -> None:
    """A worker whose dispatcher refuses it exits non-zero instead of retrying forever."""
    config = job(tmp_path, make_npz(tmp_path, n=8))
    with dispatcher_thread(config) as d:
        d.versions = {**d.versions, "numpy": "0.0-other"}
        proc = spawn(["worker", "--connect", d.address, "--procs", str(procs)],
                     stderr=subprocess.PIPE)
        try:
            assert proc.wait(20) == EXIT_FATAL
        finally:
            end_process(proc)
    assert "0.0-other" in proc.stderr.read().decode()


def test_kernel_command_times_the_kernel_and_writes_a_preview(tmp_path: Path,
                                                               capsys: Any) -> None:
    preview = tmp_path / "preview.png"
    assert main(["kernel", "--seconds", "0.05", "--preview", str(preview)]) == 0
    out = capsys.readouterr().out
    assert "cifar 32x32 severity 3:" in out and "imagenet 224x224 severity 1:" in out
    assert out.count("triples/s on one core") == 2
    with Image.open(preview) as grid:  # two rows (32 px and 224 px) of orig | aug1 | aug2
        assert grid.size == (3 * 224, 2 * 224)
