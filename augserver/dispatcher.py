"""The dispatcher: plans epochs, hands tasks to workers, relays batches to clients.

One ROUTER socket serves everyone (the conversations are in :mod:`augserver.protocol`). The
dispatcher keeps no durable state: a stream is regenerated from ``(seed, epoch, dataset
length, rank, world size)`` and the positions the client says it already has.

Scheduling and flow control. One task is one batch position; every issue of a position gets a
new, increasing task id. A stream's credits are the batches its client granted and has not
received yet; a task is assigned only while the stream's tasks in flight are fewer than its
credits, and sending the batch spends the credit. Credits never exceed
``max(1, limits.max_prefetch_bytes // batch_bytes)`` (extra grants are ignored), so what the
dispatcher holds or has in flight for a stream is bounded in bytes. The lowest pending
position is always assigned first, streams take turns, and a worker gets at most the slots it
announced with ``ready`` (each result gives its slot back).

Failures. A worker silent for ``heartbeat_interval * heartbeat_misses`` seconds is declared
dead and its tasks go back to their streams; a late result is dropped by task id. A result
that does not match its task is counted as malformed and its task re-issued. A client silent
for :data:`CLIENT_TIMEOUT` seconds, or unreachable, is forgotten with its streams. A malformed
message is logged, counted and answered with a non-fatal ``error`` when its sender is known;
nothing a peer sends can stop the loop.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from augserver import protocol, security
from augserver.config import ConfigError, JobConfig
from augserver.datasets import open_dataset
from augserver.plan import ShardPlan
from augserver.scaling import StreamMeter, estimate

log = logging.getLogger("augserver.dispatcher")

CLIENT_TIMEOUT = 30.0
"""Seconds without any message after which a client and its streams are forgotten."""
RECENT_FAILURES = 100
"""Failed samples kept for ``status``."""
RATE_WINDOW = 10.0
"""Seconds over which a worker's samples/s is measured."""
MAX_STREAMS = 64
"""Streams one client may have open at once."""
MAX_WORLD_SIZE = 1 << 16
"""Largest world size a stream may ask for (a plan holds about len + world_size indices)."""
MAX_NAME = 256
"""Longest stream id (and peer name, which is cut) accepted."""
_BURST = 256  # messages handled between housekeeping checks
_HEARTBEAT = protocol.encode("heartbeat")
_PONG = protocol.encode("pong")
_SNDMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)  # plain ints: no enum arithmetic
_UINT8, _INT64 = np.dtype(np.uint8), np.dtype(np.int64)


class MessageError(Exception):
    """A well-formed message that makes no sense here (wrong role, bad result...)."""


class Supervised(Protocol):
    """What the loop polls when it also looks after local workers."""

    def poll(self) -> None: ...


@dataclass(eq=False)
class Stream:
    """One client's epoch for one rank: what is pending, in flight, and granted."""

    client: bytes
    id: str
    plan: ShardPlan
    ordered: bool
    credits: int
    cap: int
    pending: list[int]
    remaining: int
    in_flight: dict[int, int] = field(default_factory=dict)  # position -> task id
    delivered: set[int] = field(default_factory=set)
    alive: bool = True
    meter: StreamMeter = field(default_factory=StreamMeter)  # consumption and data-wait

    def can_take(self) -> bool:
        return bool(self.pending) and len(self.in_flight) < self.credits


@dataclass(eq=False)
class Task:
    """One issue of one batch position to one worker."""

    id: int
    stream: Stream
    position: int
    batch: np.ndarray  # int64 dataset indices
    worker: bytes


@dataclass(eq=False)
class Peer:
    """Someone who said hello: a worker or a client."""

    ident: bytes
    role: str
    name: str
    last_seen: float
    free: int = 0  # worker: slots announced and not yet used
    tasks: set[int] = field(default_factory=set)  # worker: task ids in flight
    tasks_done: int = 0
    recent: deque[tuple[float, int]] = field(default_factory=deque)  # worker: (time, samples)
    streams: dict[str, Stream] = field(default_factory=dict)  # client: by stream id


class Dispatcher:
    """The dispatcher of one job; binds ``config.bind`` at construction.

    ``address`` is the bound endpoint (the real port when bound to port 0). :meth:`serve`
    runs the loop until ``stop`` is set; :meth:`close` releases the socket.
    """

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.limits = config.limits
        self.dataset_len = _check_job(config)
        self.versions = protocol.pixel_versions()
        self.batch_bytes = config.batch_bytes + 16 * config.batch_size
        self.welcome = protocol.encode(
            "welcome", config=config.to_dict(), dataset_len=self.dataset_len
        )
        self.peers: dict[bytes, Peer] = {}
        self.streams: dict[tuple[bytes, str], Stream] = {}
        self.tasks: dict[int, Task] = {}
        self.task_ids = itertools.count()
        self.turn = 0  # round-robin pointer over streams
        self.counters = Counter(
            tasks_reissued=0, duplicates_dropped=0, samples_failed=0, malformed_messages=0,
            handler_errors=0,
        )
        self.failures: deque[list[Any]] = deque(maxlen=RECENT_FAILURES)
        self.started = time.monotonic()
        self.snapshot: dict[str, Any] | None = None  # see start_snapshots()
        self.context = zmq.Context()
        self.sock = self._bind(config.bind)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.handlers: dict[str, dict[str, Callable[[Peer, protocol.Message], None]]] = {
            "worker": {"ready": self._ready, "result": self._result, "heartbeat": self._beat},
            "client": {
                "open": self._open, "credit": self._credit, "close": self._close,
                "ping": self._ping,
            },
        }

    def _bind(self, address: str) -> zmq.Socket:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        self.auth: ThreadAuthenticator | None = None
        try:
            self.auth = self._secure(sock)
            sock.bind(address)
        except (zmq.ZMQError, ValueError) as exc:
            sock.close()
            if self.auth is not None:
                self.auth.stop()
            self.context.term()
            if isinstance(exc, ValueError):
                raise
            raise OSError(f"cannot bind {address}: {exc}") from None
        return sock

    def _secure(self, sock: zmq.Socket) -> ThreadAuthenticator | None:
        """With ``security.curve``: make ``sock`` a CURVE server behind a ZAP allow-list."""
        sec = self.config.security
        if not sec.curve:
            return None
        if not security.has_curve():
            raise ValueError("security.curve: this libzmq has no CURVE support")
        assert sec.server_key is not None and sec.allow_dir is not None  # config checked
        auth = security.start_server(self.context, sock, sec.server_key, sec.allow_dir)
        log.info("CURVE on: allowing the keys in %s and the dispatcher's own", sec.allow_dir)
        return auth

    def close(self) -> None:
        """Release the socket (pending outgoing messages are dropped) and the authenticator."""
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.context.term()

    # ------------------------------------------------------------------ the loop

    def serve(
        self, stop: threading.Event | None = None, supervisor: Supervised | None = None
    ) -> None:
        """Serve until ``stop`` is set; ``supervisor.poll()`` runs on every housekeeping pass."""
        stop = stop or threading.Event()
        period = min(0.1, self.limits.heartbeat_interval / 4)
        log.info("dispatcher on %s: %d samples, %d views of %dpx, batch %d", self.address,
                 self.dataset_len, self.config.views, self.config.image_size,
                 self.config.batch_size)
        next_pass = 0.0
        while not stop.is_set():
            if self.sock.poll(int(period * 1000), zmq.POLLIN):
                self._drain()
            now = time.monotonic()
            if now >= next_pass:
                next_pass = now + period
                self._housekeeping(now)
                if supervisor is not None:
                    supervisor.poll()
        log.info("dispatcher on %s stopping", self.address)

    def _drain(self) -> None:
        """Handle up to a burst of waiting messages, then assign what they made possible."""
        for _ in range(_BURST):
            try:
                frames = [self.sock.recv(_NOBLOCK, copy=False)]
            except zmq.Again:
                break
            while frames[-1].more:  # the rest of a message is already here
                frames.append(self.sock.recv(0, copy=False))
            self._receive(frames)
        self._schedule()

    def _receive(self, frames: list[zmq.Frame]) -> None:
        """Handle one message; nothing a peer sends escapes from here."""
        ident = frames[0].bytes
        try:
            self._handle(ident, frames[1:])
        except MessageError as exc:
            self._malformed(ident, str(exc))
        except Exception:
            self.counters["handler_errors"] += 1
            log.exception("error handling a message from %s", self._who(ident))

    def _handle(self, ident: bytes, body: list[zmq.Frame]) -> None:
        try:
            message = protocol.decode(body)
        except protocol.ProtocolError as exc:
            version = _foreign_hello(body)
            if version is not None:
                self._refuse(ident, f"protocol version {version} is not supported: "
                                    f"this dispatcher speaks protocol {protocol.PROTOCOL_VERSION}")
                return
            raise MessageError(str(exc)) from None
        if message.type == "hello":
            self._hello(ident, message)
            return
        peer = self.peers.get(ident)
        if peer is None:
            self._send(ident, protocol.encode(
                "reset", reason=f"unknown peer sent {message.type}; say hello first"))
            return
        peer.last_seen = time.monotonic()
        handler = self.handlers[peer.role].get(message.type)
        if handler is None:
            raise MessageError(f"a {peer.role} may not send {message.type}")
        handler(peer, message)

    def _malformed(self, ident: bytes, problem: str) -> None:
        self.counters["malformed_messages"] += 1
        log.warning("malformed message from %s: %s", self._who(ident), problem)
        if ident in self.peers:
            self._send(ident, protocol.encode(
                "error", message=f"malformed message: {problem}", stream=None, fatal=False))

    def _housekeeping(self, now: float) -> None:
        """Declare silent workers dead and forget silent clients."""
        for peer in list(self.peers.values()):
            silence = now - peer.last_seen
            if peer.role == "worker" and silence > self.limits.heartbeat_timeout:
                log.warning("worker %s declared dead after %.1f s of silence; re-issuing %d "
                            "tasks", peer.name, silence, len(peer.tasks))
                self._forget(peer.ident)
            elif peer.role == "client" and silence > CLIENT_TIMEOUT:
                # A client with no stream only asked for the job (``len(loader)``): routine.
                level = logging.WARNING if peer.streams else logging.INFO
                log.log(level, "client %s silent for %.0f s; forgetting it and its %d streams",
                        peer.name, silence, len(peer.streams))
                self._forget(peer.ident)
        self._schedule()
        if self.snapshot is not None:
            self.snapshot = self.stats()  # one assignment: readers see the old or the new

    # ------------------------------------------------------------------ peers

    def _hello(self, ident: bytes, message: protocol.Message) -> None:
        role, name = message["role"], message["name"][:MAX_NAME]
        if message["protocol"] != protocol.PROTOCOL_VERSION:
            self._refuse(ident, f"protocol version {message['protocol']} is not supported: "
                                f"this dispatcher speaks protocol {protocol.PROTOCOL_VERSION}")
            return
        if ident in self.peers:
            self._forget(ident)
        if role == "status":
            self._send(ident, protocol.encode("status", stats=self.stats()))
            return
        if role == "worker":
            mismatch = protocol.version_mismatch(self.versions, message["versions"])
            if mismatch is not None:
                log.warning("worker %s refused: %s", name, mismatch)
                self._refuse(ident, mismatch)
                return
        self.peers[ident] = Peer(ident, role, name, time.monotonic())
        log.info("%s %s joined", role, name)
        self._send(ident, self.welcome)

    def _refuse(self, ident: bytes, reason: str) -> None:
        self._send(ident, protocol.encode("refused", reason=reason))

    def _forget(self, ident: bytes) -> None:
        """Drop a peer: a worker's tasks go back to their streams, a client's streams end."""
        peer = self.peers.pop(ident, None)
        if peer is None:
            return
        for task_id in sorted(peer.tasks):
            task = self.tasks.pop(task_id, None)
            if task is not None and task.stream.alive:
                del task.stream.in_flight[task.position]
                heapq.heappush(task.stream.pending, task.position)
                self.counters["tasks_reissued"] += 1
        for stream in list(peer.streams.values()):
            self._drop_stream(stream)

    def _who(self, ident: bytes) -> str:
        peer = self.peers.get(ident)
        return f"{peer.role} {peer.name}" if peer else f"unknown peer {ident.hex()}"

    def _send(self, ident: bytes, frames: list[Any]) -> bool:
        """Send to a peer; an unreachable one is forgotten (False)."""
        try:
            self.sock.send(ident, _SNDMORE)
            for frame in frames[:-1]:
                self.sock.send(frame, _SNDMORE, copy=False)
            self.sock.send(frames[-1], 0, copy=False)
            return True
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            if ident in self.peers:
                log.warning("%s is unreachable; forgetting it", self._who(ident))
                self._forget(ident)
            return False

    # ------------------------------------------------------------------ workers

    def _ready(self, worker: Peer, message: protocol.Message) -> None:
        self._free_slots(worker, message["slots"])

    def _free_slots(self, worker: Peer, slots: int) -> None:
        room = self.limits.worker_slots - len(worker.tasks)
        worker.free = max(0, min(worker.free + slots, room))

    def _beat(self, worker: Peer, message: protocol.Message) -> None:
        self._send(worker.ident, _HEARTBEAT)

    def _result(self, worker: Peer, message: protocol.Message) -> None:
        """Deliver a worker's batch; a result also frees the slot its task used."""
        try:
            self._take_result(worker, message)
        finally:
            self._free_slots(worker, 1)

    def _take_result(self, worker: Peer, message: protocol.Message) -> None:
        task = self.tasks.get(message["task"])
        if task is None or task.worker != worker.ident or task.position in task.stream.delivered:
            self.counters["duplicates_dropped"] += 1
            log.debug("dropped a stale or duplicate result for task %d", message["task"])
            return
        del self.tasks[task.id]
        worker.tasks.discard(task.id)
        stream = task.stream
        del stream.in_flight[task.position]
        problem = self._check_result(task, message)
        if problem is not None:
            heapq.heappush(stream.pending, task.position)
            self.counters["tasks_reissued"] += 1
            raise MessageError(f"result of task {task.id}: {problem}; task re-issued")
        failed = message["failed"]
        self._record(worker, failed, message.specs[2][1][0])
        if failed and self.config.error_policy == "fail":
            self._fail_stream(stream, failed[0])
        else:
            self._deliver(stream, task, message)

    def _check_result(self, task: Task, message: protocol.Message) -> str | None:
        """What is wrong with a result's arrays for ``task``, or None. The usual result (every
        sample made) is recognised by its shapes and index bytes, without numpy."""
        if len(message.specs) != 3:
            return f"{len(message.specs)} arrays instead of 3 (views, labels, indices)"
        (views, shape), (labels, n_labels), (indices, n_indices) = message.specs
        if indices != _INT64 or len(n_indices) != 1:
            return f"indices are {indices}{list(n_indices)}, expected int64[n]"
        n = n_indices[0]
        if labels != _INT64 or n_labels != (n,):
            return f"labels are {labels}{list(n_labels)}, expected int64[{n}]"
        side = self.config.image_size
        expected = (self.config.views, n, side, side, 3)
        if views != _UINT8 or shape != expected:
            return f"views are {views}{list(shape)}, expected uint8{list(expected)}"
        if message.frames[2].bytes == task.batch.tobytes():
            return None
        made = message.arrays[2].tolist()
        if Counter(made) + Counter(f[0] for f in message["failed"]) != Counter(task.batch.tolist()):
            return "its indices and failures do not match the task's indices"
        return None

    def _record(self, worker: Peer, failed: list[list[Any]], samples: int) -> None:
        now = time.monotonic()
        worker.tasks_done += 1
        worker.recent.append((now, samples))
        while worker.recent and worker.recent[0][0] < now - RATE_WINDOW:
            worker.recent.popleft()
        for index, path, error in failed:
            log.warning("sample %d (%s) failed: %s", index, path, error)
            self.failures.append([index, path, error])
        self.counters["samples_failed"] += len(failed)

    # ------------------------------------------------------------------ clients

    def _open(self, client: Peer, message: protocol.Message) -> None:
        sid = message["stream"]
        old = client.streams.get(sid)
        if old is not None:
            self._drop_stream(old)
        try:
            if len(sid) > MAX_NAME:
                raise ValueError(f"a stream id is at most {MAX_NAME} characters")
            if message["world_size"] > MAX_WORLD_SIZE:
                raise ValueError(f"world_size {message['world_size']} exceeds {MAX_WORLD_SIZE}")
            if len(client.streams) >= MAX_STREAMS:
                raise ValueError(f"this client already has {MAX_STREAMS} open streams")
            plan = ShardPlan(self.config.seed, message["epoch"], self.dataset_len,
                             message["rank"], message["world_size"], self.config.batch_size,
                             self.config.drop_last)
            num_batches = plan.num_batches
        except ValueError as exc:
            self._send(client.ident, protocol.encode(
                "error", message=f"cannot open stream {sid[:MAX_NAME]}: {exc}", stream=sid,
                fatal=True))
            return
        pending = _missing(num_batches, message["done"])
        cap = max(1, self.limits.max_prefetch_bytes // self.batch_bytes)
        if not self._send(client.ident, protocol.encode(
                "opened", stream=sid, num_batches=num_batches, batch_bytes=self.batch_bytes)):
            return
        if not pending:
            self._send(client.ident, protocol.encode("end", stream=sid))
            return
        stream = Stream(client.ident, sid, plan, message["ordered"],
                        min(message["credits"], cap), cap, pending, len(pending))
        client.streams[sid] = stream
        self.streams[(client.ident, sid)] = stream
        stream.meter.credits(time.monotonic(), stream.credits)
        log.info("client %s opened stream %s: epoch %d, rank %d/%d, %d of %d batches to send",
                 client.name, sid, plan.epoch, plan.rank, plan.world_size, len(pending),
                 num_batches)

    def _credit(self, client: Peer, message: protocol.Message) -> None:
        stream = client.streams.get(message["stream"])
        if stream is not None:  # else: ended already, a grant still on its way
            stream.credits = min(stream.credits + message["n"], stream.cap)
            stream.meter.credits(time.monotonic(), stream.credits)

    def _close(self, client: Peer, message: protocol.Message) -> None:
        stream = client.streams.get(message["stream"])
        if stream is not None:
            self._drop_stream(stream)

    def _ping(self, client: Peer, message: protocol.Message) -> None:
        self._send(client.ident, _PONG)

    def _deliver(self, stream: Stream, task: Task, result: protocol.Message) -> None:
        """Relay a result's frames (not copied) as batch ``task.position`` of ``stream``."""
        frames = protocol.relay("batch", result, {
            "stream": stream.id, "position": task.position, "failed": result["failed"]})
        stream.credits -= 1
        stream.meter.delivered(time.monotonic(), result.specs[2][1][0], stream.credits)
        stream.delivered.add(task.position)
        stream.remaining -= 1
        if self._send(stream.client, frames) and stream.remaining == 0:
            self._send(stream.client, protocol.encode("end", stream=stream.id))
            self._drop_stream(stream)

    def _fail_stream(self, stream: Stream, failure: list[Any]) -> None:
        index, path, error = failure
        message = (f"sample {index} ({path}) cannot be used and error_policy is fail: {error}")
        log.error("stream %s fails: %s", stream.id, message)
        self._send(stream.client, protocol.encode(
            "error", message=message, stream=stream.id, fatal=True))
        self._drop_stream(stream)

    def _drop_stream(self, stream: Stream) -> None:
        """Forget a stream; results of its tasks still in flight will be dropped."""
        if not stream.alive:
            return
        stream.alive = False
        self.streams.pop((stream.client, stream.id), None)
        client = self.peers.get(stream.client)
        if client is not None and client.streams.get(stream.id) is stream:
            del client.streams[stream.id]
        for task_id in stream.in_flight.values():
            task = self.tasks.pop(task_id, None)
            worker = self.peers.get(task.worker) if task else None
            if worker is not None:
                worker.tasks.discard(task_id)
        stream.in_flight.clear()
        stream.pending.clear()

    # ------------------------------------------------------------------ scheduling

    def _schedule(self) -> None:
        """Assign tasks while some worker has a free slot and some stream may take one: one
        task per worker per round, the workers with the most free slots first."""
        if not self.streams:
            return
        idle = sorted((p for p in self.peers.values() if p.role == "worker" and p.free > 0),
                      key=lambda p: p.free, reverse=True)
        while idle:
            for worker in idle:
                stream = self._next_stream()
                if stream is None:
                    return
                self._assign(worker, stream)
            # a worker found unreachable by _assign was forgotten (its tasks re-queued)
            idle = [w for w in idle if w.free > 0 and self.peers.get(w.ident) is w]

    def _next_stream(self) -> Stream | None:
        streams = list(self.streams.values())
        for offset in range(len(streams)):
            stream = streams[(self.turn + offset) % len(streams)]
            if stream.can_take():
                self.turn = (self.turn + offset + 1) % len(streams)
                return stream
        return None

    def _assign(self, worker: Peer, stream: Stream) -> None:
        position = heapq.heappop(stream.pending)
        task = Task(next(self.task_ids), stream, position, stream.plan.batch(position),
                    worker.ident)
        self.tasks[task.id] = task
        stream.in_flight[position] = task.id
        worker.tasks.add(task.id)
        worker.free -= 1
        self._send(worker.ident, protocol.pack(
            "task", (), {"task": task.id, "epoch": stream.plan.epoch,
                         "indices": task.batch.tolist()}))

    # ------------------------------------------------------------------ status

    def start_snapshots(self) -> Callable[[], dict[str, Any] | None]:
        """Have the loop refresh :attr:`snapshot` (a new :meth:`stats` dict) on every
        housekeeping pass; call before :meth:`serve`. Returns a reader any thread may call."""
        self.snapshot = self.stats()
        return lambda: self.snapshot

    def stats(self) -> dict[str, Any]:
        """Everything ``augserver status`` shows (msgpack- and JSON-safe); ``scaling`` is
        :func:`augserver.scaling.estimate` and each stream has its consumption and data-wait."""
        now = time.monotonic()
        peers = list(self.peers.values())
        workers = [self._worker_stats(p, now) for p in peers if p.role == "worker"]
        clients = [
            {"name": p.name, "last_seen_s_ago": round(now - p.last_seen, 3),
             "streams": [_stream_stats(s, now) for s in p.streams.values()]}
            for p in peers if p.role == "client"
        ]
        return {
            "uptime_s": round(now - self.started, 3),
            "address": self.address,
            "dataset_len": self.dataset_len,
            "config": self._summary(),
            "workers": workers,
            "clients": clients,
            "scaling": estimate([w["samples_per_s"] for w in workers],
                                [s for c in clients for s in c["streams"]]),
            "counters": dict(self.counters),
            "recent_failures": [
                {"index": i, "path": path, "error": error} for i, path, error in self.failures
            ],
        }

    def _summary(self) -> dict[str, Any]:
        c = self.config
        return {
            "dataset": f"{c.dataset.format}:{c.dataset.path}", "preprocess": c.preprocess,
            "jsd": c.jsd, "views": c.views, "image_size": c.image_size,
            "batch_size": c.batch_size, "seed": c.seed, "drop_last": c.drop_last,
            "error_policy": c.error_policy, "augmix": c.to_dict()["augmix"],
            "batch_bytes": self.batch_bytes,
        }

    @staticmethod
    def _worker_stats(worker: Peer, now: float) -> dict[str, Any]:
        recent = [(t, n) for t, n in worker.recent if t >= now - RATE_WINDOW]
        span = min(RATE_WINDOW, now - recent[0][0]) if recent else 0.0
        rate = sum(n for _, n in recent) / span if span > 0 else 0.0
        return {
            "name": worker.name, "tasks_done": worker.tasks_done,
            "samples_per_s": round(rate, 1), "in_flight": len(worker.tasks),
            "free_slots": worker.free,
            "last_seen_s_ago": round(now - worker.last_seen, 3),
        }


def _stream_stats(stream: Stream, now: float) -> dict[str, Any]:
    plan = stream.plan
    return {
        "stream": stream.id, "epoch": plan.epoch, "rank": plan.rank,
        "world_size": plan.world_size, "ordered": stream.ordered,
        "num_batches": plan.num_batches, "delivered": len(stream.delivered),
        "credits": stream.credits, "in_flight": len(stream.in_flight),
        "pending": len(stream.pending), **stream.meter.stats(now),
    }


def _missing(num_batches: int, done: list[list[int]]) -> list[int]:
    """Positions ``0..num_batches-1`` not covered by the ``[start, end)`` ranges in ``done``
    (sorted, so already a heap); ranges are clipped, so a huge range costs nothing."""
    have = np.zeros(num_batches, bool)
    for start, end in done:
        have[min(start, num_batches):min(end, num_batches)] = True
    return np.flatnonzero(~have).tolist()


def _check_job(config: JobConfig) -> int:
    """Open the dataset (a clear error when it is missing or broken) and return its length."""
    if config.batch_bytes > config.limits.max_message_bytes:
        raise ConfigError(
            f"limits.max_message_bytes: {config.limits.max_message_bytes} is smaller than one "
            f"batch of pixels ({config.batch_bytes} bytes)", None, "limits.max_message_bytes")
    dataset = open_dataset(config.dataset.format, config.dataset.path, config.dataset.train)
    if len(dataset) == 0:
        raise ConfigError(f"dataset.path: {config.dataset.path} holds no samples", None,
                          "dataset.path")
    return len(dataset)


def _foreign_hello(body: list[zmq.Frame]) -> Any:
    """The protocol version of a hello this protocol cannot decode, else None."""
    if not body or len(body[0].buffer) > protocol.MAX_HEADER_BYTES:
        return None
    try:
        header = msgpack.unpackb(body[0].bytes, raw=False, strict_map_key=True,
                                 ext_hook=_no_ext, timestamp=0)
    except Exception:
        return None
    if isinstance(header, dict) and header.get("t") == "hello":
        version = header.get("v")
        if version != protocol.PROTOCOL_VERSION and isinstance(version, int | str):
            return version
    return None


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("extension types are not allowed")
