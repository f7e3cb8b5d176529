"""Helpers for service tests: tiny datasets, configs, a dispatcher in a thread, workers as
threads or processes, and a raw protocol client. Everything started here is ended here."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import zmq
from PIL import Image

from augserver import protocol
from augserver.config import JobConfig, load_config
from augserver.dispatcher import Dispatcher
from augserver.security import ClientKeys
from augserver.stats import DispatcherStats
from augserver.status import StatusError, request_status
from augserver.worker import run_worker
from client.programs.local_server import free_port as free_port  # re-exported for the tests

REPO = Path(__file__).resolve().parents[1]
FAST_LIMITS = {"heartbeat_interval": 0.2, "heartbeat_misses": 3, "worker_slots": 2}
"""Limits for tests: a silent worker is declared dead after 0.6 s."""


# ---------------------------------------------------------------------------- data and config


def make_npz(folder: Path, n: int = 48, side: int = 32, seed: int = 0) -> Path:
    """``n`` random ``side`` x ``side`` RGB images with labels ``i % 10`` in one .npz file."""
    rng = np.random.default_rng(seed)
    path = folder / "data.npz"
    x = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    np.savez(path, x=x, y=np.arange(n) % 10)
    return path


def make_image_folder(folder: Path, per_class: int = 6, corrupt: bool = True) -> Path:
    """Two classes of 32 x 32 PNGs; with ``corrupt``, class ``b`` also holds ``bad.png``
    (garbage bytes), which sorts first in its class."""
    root = folder / "images"
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.png")
    if corrupt:
        (root / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def write_config(folder: Path, dataset: Path | str, fmt: str = "npz", **keys: Any) -> Path:
    """A job file for ``dataset`` with fast heartbeats, a batch of 4 and CIFAR preprocessing."""
    data: dict[str, Any] = {
        "dataset": {"format": fmt, "path": str(dataset)},
        "preprocess": "cifar",
        "batch_size": 4,
        "seed": 7,
        "bind": "tcp://127.0.0.1:0",
        "limits": dict(FAST_LIMITS),
    }
    limits = keys.pop("limits", {})
    data.update(keys)
    data["limits"].update(limits)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def job(folder: Path, dataset: Path, fmt: str = "npz", **keys: Any) -> JobConfig:
    """The validated config of :func:`write_config`."""
    return load_config(write_config(folder, dataset, fmt, **keys))


# ---------------------------------------------------------------------------- CIFAR files


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """CIFAR's on-disk rows: the R plane, then G, then B, each 32 x 32 row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def write_pickle(path: Path, obj: Any) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(folder: Path, images: np.ndarray) -> list[np.ndarray]:
    """A cifar-10-batches-py folder; batch k holds the photos rolled by k. Returns the batches."""
    folder.mkdir(parents=True)
    batches = []
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        x = np.roll(images, k, axis=0)
        labels = [(k + j) % 10 for j in range(len(x))]
        write_pickle(
            folder / name,
            {
                b"batch_label": f"batch {k}".encode(),
                b"labels": labels,
                b"data": cifar_rows(x),
                b"filenames": [f"img_{k}_{j}.png".encode() for j in range(len(x))],
            },
        )
        batches.append(x)
    names10 = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names10 += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_pickle(folder / "batches.meta", {b"label_names": names10, b"num_vis": 3072})
    return batches


def write_cifar100(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for name, x in (("train", images), ("test", images[::-1])):
        write_pickle(
            folder / name,
            {
                b"filenames": [b"x.png"] * len(x),
                b"batch_label": name.encode(),
                b"fine_labels": [99 - j for j in range(len(x))],
                b"coarse_labels": [j for j in range(len(x))],
                b"data": cifar_rows(x),
            },
        )
    fine = [f"class{j}".encode() for j in range(100)]
    coarse = [f"super{j}".encode() for j in range(20)]
    write_pickle(folder / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse})


# ---------------------------------------------------------------------------- processes


@contextlib.contextmanager
def dispatcher_thread(config: JobConfig) -> Iterator[Dispatcher]:
    """A dispatcher serving in a background thread; stopped and closed on exit."""
    dispatcher = Dispatcher(config)
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield dispatcher
    finally:
        stop.set()
        thread.join(timeout=10)
        dispatcher.close()


@contextlib.contextmanager
def worker_threads(address: str, count: int = 1) -> Iterator[list[threading.Thread]]:
    """``count`` in-process workers (threads); stopped on exit."""
    stop = threading.Event()
    threads = [
        threading.Thread(target=run_worker, args=(address, f"thread-{i}", stop), daemon=True)
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    try:
        yield threads
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)


def spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``python -m augserver ARGS`` in a new process (its own process group)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "augserver", *args], cwd=REPO, env=env,
                            start_new_session=True, **kwargs)


@contextlib.contextmanager
def worker_processes(address: str, count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` worker processes; killed (with their process groups) on exit."""
    procs = [spawn(["worker", "--connect", address, "--log-level", "WARNING"])
             for _ in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            end_process(proc)


def end_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> int:
    """SIGTERM ``proc``'s process group, SIGKILL after ``grace``; its return code."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate()`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_workers(address: str, count: int, timeout: float = 20.0) -> DispatcherStats:
    """The dispatcher's stats once it has ``count`` workers, each ready for tasks."""

    def ready() -> DispatcherStats | None:
        try:
            stats = request_status(address, 2.0)
        except StatusError:  # not up yet (a serve process still starting on a busy host)
            return None
        workers = stats.workers
        if len(workers) == count and all(w.free_slots + w.in_flight for w in workers):
            return stats
        return None

    return wait_for(ready, timeout, f"{count} ready workers")


# ---------------------------------------------------------------------------- raw client


@dataclass
class Batch:
    position: int
    views: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    failed: list[list[Any]]


class RawClient:
    """A DEALER that speaks :mod:`augserver.protocol` frame by frame (or breaks it)."""

    def __init__(self, address: str, keys: ClientKeys | None = None) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            keys.apply(self.sock)
        self.sock.connect(address)
        self.stash: deque[protocol.Message] = deque()  # batches and ends expect() passed over
        self.receipt = 0  # of the latest message read, returned on each sent (as peers do)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, mtype: str, arrays: list[np.ndarray] | tuple = (), **fields: Any) -> None:
        self.sock.send_multipart(protocol.encode(mtype, arrays, receipt=self.receipt, **fields))

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 5.0) -> protocol.Message | None:
        """The next message (first those :meth:`expect` set aside), or None after
        ``timeout`` seconds."""
        if self.stash:
            return self.stash.popleft()
        return self._receive(timeout)

    def _receive(self, timeout: float) -> protocol.Message | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        message = protocol.decode(self.sock.recv_multipart(copy=False))
        self.receipt = message.receipt or self.receipt
        return message

    def expect(self, *types: str, timeout: float = 5.0) -> protocol.Message:
        """The next message of one of ``types``; pongs and heartbeats are skipped, batches and
        ends set aside for :meth:`recv`; anything else fails the test."""
        for message in self.stash:
            if message.type in types:
                self.stash.remove(message)
                return message
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(max(0.0, deadline - time.monotonic()))
            assert message is not None, f"no {'/'.join(types)} within {timeout} s"
            if message.type in ("pong", "heartbeat") and message.type not in types:
                continue
            if message.type in ("batch", "end") and message.type not in types:
                self.stash.append(message)  # for collect()
                continue
            assert message.type in types, f"expected {types}, got {message.type}: {message.fields}"
            return message

    def hello(self, role: str = "client", versions: dict[str, str] | None = None,
              version: int = protocol.PROTOCOL_VERSION) -> protocol.Message:
        self.send("hello", role=role, protocol=version, name=f"raw-{role}",
                  versions=protocol.pixel_versions() if versions is None else versions)
        answer = self.expect("welcome", "refused", "status")
        if answer.type == "welcome":
            self.welcome = answer
        return answer

    def ready(self, slots: int, dataset: dict[str, str] | None = None) -> None:
        """A worker's ``ready``, with the dispatcher's own dataset fingerprint by default."""
        self.send("ready", slots=slots, dataset=self.welcome["dataset"] if dataset is None
                  else dataset)

    def open(self, stream: str = "s", epoch: int = 0, rank: int = 0, world_size: int = 1,
             credits: int = 1000, done: list[list[int]] | None = None,
             ordered: bool = False) -> protocol.Message:
        self.send("open", stream=stream, epoch=epoch, rank=rank, world_size=world_size,
                  ordered=ordered, credits=credits, done=done or [], skip=None)
        return self.expect("opened", "error")

    def collect(self, streams: set[str], timeout: float = 30.0, regrant: bool = True,
                on_batch: Any = None) -> dict[str, Any]:
        """Receive batches of ``streams`` until each ended or failed, granting one credit
        back per batch when ``regrant`` and calling ``on_batch(batch)`` for each. Keys: stream
        id -> list of batches; ``errors`` -> {stream: fatal error message}."""
        batches: dict[str, list[Batch]] = {s: [] for s in streams}
        errors: dict[str, protocol.Message] = {}
        open_streams = set(streams)
        deadline = time.monotonic() + timeout
        while open_streams:
            message = self.recv(max(0.0, deadline - time.monotonic()))
            assert message is not None, f"streams {open_streams} did not finish in {timeout} s"
            if message.type == "batch" and message["stream"] in open_streams:
                views, labels, indices = (np.array(a) for a in message.arrays)
                batch = Batch(message["position"], views, labels, indices, message["failed"])
                batches[message["stream"]].append(batch)
                if on_batch is not None:
                    on_batch(batch)
                if regrant:
                    self.send("credit", stream=message["stream"], n=1)
            elif message.type == "end":
                open_streams.discard(message["stream"])
            elif message.type == "error" and message["fatal"]:
                errors[message["stream"]] = message
                open_streams.discard(message["stream"])
        return {**batches, "errors": errors}


# ---------------------------------------------------------------------------- metrics

_EXPOSITION_SAMPLE = re.compile(
    r'([a-z_]+)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (-?[0-9.e+]+|NaN)'
)


def parse_exposition(text: str) -> tuple[dict[str, str], dict[tuple[str, str], float]]:
    """Prometheus text exposition as (metric family -> type, (name, labels) -> value); every
    line must be well formed."""
    types: dict[str, str] = {}
    values: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif not line.startswith("# HELP "):
            match = _EXPOSITION_SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            assert match[1] in types, f"{match[1]} has no # TYPE line before it"
            values[(match[1], match[2] or "")] = float(match[3])
    return types, values
