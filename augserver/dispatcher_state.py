"""The dispatcher's state: peers, streams, tasks and credits, with no sockets and no clock.

:class:`DispatcherState` changes only through its methods, each given the time ``now`` when it
matters, and says what to send instead of sending: :meth:`~DispatcherState.schedule` returns
the tasks to hand out, :meth:`~DispatcherState.result` returns a :class:`ResultOutcome`,
:meth:`~DispatcherState.open` an :class:`OpenOutcome`. The I/O shell
(:class:`augserver.dispatcher.Dispatcher`) turns messages into these calls and outcomes into
messages, so scheduling, re-issue and the credit bounds are tested here without sockets.

Scheduling and flow control. One task is one batch position; every issue of a position gets a
new, increasing task id. A stream's credits are the batches its client granted and has not
received yet; a task is assigned only while the stream's tasks in flight are fewer than its
credits, and delivering the batch spends the credit. Credits never exceed
``max(1, limits.max_prefetch_bytes // batch_bytes)`` (extra grants are ignored). Credits are the
client's word; what it has really read is known from its receipts (:mod:`augserver.outbox`).
So a task is also assigned only while what its client holds (its tasks in flight and the data
sent to it and not yet shown read) stays within ``limits.max_prefetch_bytes``, and what all
peers hold together within ``limits.max_held_bytes``: half of that is reserved, split among
the clients with open streams (at least one batch each, so the smallest job moves), and only
the other half is first come, so peers that take batches and never read cannot starve a
client that reads (:meth:`~DispatcherState.reserve`). The lowest pending position is always
assigned first, streams take turns, and a worker gets at most the slots it announced with
``ready`` (each result gives its slot back).

Failures. A worker silent for ``limits.heartbeat_timeout`` seconds and a client silent for
:data:`CLIENT_TIMEOUT` seconds are :meth:`~DispatcherState.expired`; forgetting a worker
returns its tasks to their streams, forgetting a client ends its streams. A result for a task
that is no longer out (re-issued, or its stream ended) is a duplicate and dropped; a result
that does not match its task is rejected and its task re-issued.

Shared memory. A stream whose client offered an arena (``open``'s ``shm``) has a
:class:`~augserver.slot_pool.SlotPool`: its tasks carry a free slot, and a worker that writes
there sends only labels and indices, relayed with the slot's number. Such a stream's credits
are capped by its slots (the client's memory, not the dispatcher's), and a task with a slot
does not count against the dispatcher's byte budgets, since its pixels never pass here. A
worker that cannot see the arena sends over TCP and gets no slot of it again; a stream without
a free slot sends over TCP too.
"""

from __future__ import annotations

import heapq
import itertools
import statistics
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from augserver import protocol
from augserver.config import JobConfig
from augserver.outbox import Outboxes
from augserver.plan import ShardPlan
from augserver.scaling import StreamMeter, estimate
from augserver.slot_pool import SlotPool
from augserver.stats import (
    ClientStats,
    Counters,
    DispatcherStats,
    Failure,
    Memory,
    StreamStats,
    WorkerStats,
)

CLIENT_TIMEOUT = 30.0
"""Seconds without any message after which a client and its streams are forgotten."""
RECENT_FAILURES = 100
"""Failed samples kept for ``status``."""
RATE_WINDOW = 10.0
"""Seconds over which a worker's samples/s is measured."""
MAX_WORLD_SIZE = 1 << 16
"""Largest world size a stream may ask for (a plan holds about len + world_size indices)."""
RECENT_DURATIONS = 200
"""Task durations kept to tell a stalled task from a slow one."""
STALL_FACTOR = 10.0
"""A task out this many times longer than the typical (median) task is re-issued."""
RECENT_REFUSALS = 5
"""Reasons workers were refused, kept to explain a stream no worker can serve."""
MAX_NAME = 256
"""Longest stream id (and peer name, which is cut) accepted."""
TASK_BYTES = 64
"""Bytes of a task message besides its indices (at most 9 bytes each in msgpack)."""


@dataclass(eq=False)
class Stream:
    """One client's epoch for one rank: what is pending, in flight, and granted."""

    client: bytes
    id: str
    plan: ShardPlan
    ordered: bool
    credits: int
    cap: int
    pending: list[int]  # a heap of positions
    remaining: int
    opened: float = 0.0
    in_flight: dict[int, int] = field(default_factory=dict)  # position -> task id
    delivered: set[int] = field(default_factory=set)
    alive: bool = True
    meter: StreamMeter = field(default_factory=StreamMeter)  # consumption and data-wait
    shm: SlotPool | None = None  # the client's arena, when it offered one
    shm_batches: int = 0  # delivered through shared memory
    tcp_batches: int = 0  # delivered with their pixels

    def path(self) -> str:
        """How its batches travel: ``shm``, ``tcp`` or ``shm+tcp`` (before the first batch:
        ``shm`` when an arena was offered)."""
        if self.shm_batches and self.tcp_batches:
            return "shm+tcp"
        if self.shm_batches or (self.shm is not None and not self.tcp_batches):
            return "shm"
        return "tcp"

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
    issued: float = 0.0
    receipt: int = 0  # stamped on the task message (see augserver.outbox)
    slot: int | None = None  # in the stream's arena, when its views go through shared memory


@dataclass(eq=False)
class Peer:
    """Someone who said hello: a worker or a client."""

    ident: bytes
    role: str
    name: str
    last_seen: float
    free: int = 0  # worker: slots announced and not yet used
    warming: bool = True  # worker: no ready yet (it is loading its kernels)
    tasks: set[int] = field(default_factory=set)  # worker: task ids in flight
    tasks_done: int = 0
    recent: deque[tuple[float, int]] = field(default_factory=deque)  # worker: (time, samples)
    streams: dict[str, Stream] = field(default_factory=dict)  # client: by stream id


RELAY, DUPLICATE, LATE, REJECTED, FAILED = "relay", "duplicate", "late", "rejected", "failed"


@dataclass
class ResultOutcome:
    """What a worker's result led to.

    - ``relay``: send it to ``task.stream``'s client as batch ``task.position``; ``end``: it
      was the stream's last, so ``end`` follows (the stream is already forgotten);
    - ``duplicate``: a repeated result, or one for a task re-issued since, dropped;
    - ``late``: a result for a stream that has ended, failed or been closed, dropped;
    - ``rejected``: it does not match its task (``problem`` says how); the task is re-issued;
    - ``failed``: a sample failed under ``error_policy: fail``; ``problem`` is the stream's
      error for its client (the stream is already forgotten).
    """

    kind: str
    task: Task | None = None
    problem: str | None = None
    receipt: int = 0  # ``relay``: to stamp on the batch
    end: bool = False
    slot: int | None = None  # ``relay``: the views are in this slot of the client's arena


@dataclass
class OpenOutcome:
    """What an ``open`` led to: an ``error`` for the client, or ``opened`` with
    ``num_batches`` (then ``end`` too when nothing is left to send: ``stream`` is None)."""

    error: str | None = None
    num_batches: int = 0
    stream: Stream | None = None


class DispatcherState:
    """Peers, streams and tasks of one job over a dataset of ``dataset_len`` samples in
    ``num_classes`` classes (labels outside them are refused)."""

    def __init__(self, config: JobConfig, dataset_len: int, num_classes: int) -> None:
        self.config = config
        self.limits = config.limits
        self.dataset_len = dataset_len
        self.num_classes = num_classes
        self.layout = config.layout
        self.batch_bytes = self.layout.message_bytes(config.batch_size)
        self.cap = max(1, self.limits.max_prefetch_bytes // self.batch_bytes)
        self.peers: dict[bytes, Peer] = {}
        self.streams: dict[tuple[bytes, str], Stream] = {}
        self.tasks: dict[int, Task] = {}
        self.task_ids = itertools.count()
        self.turn = 0  # round-robin pointer over streams
        self.counters = Counters()
        self.failures: deque[Failure] = deque(maxlen=RECENT_FAILURES)
        self.ended: dict[int, bytes] = {}  # tasks out when their stream ended -> their worker
        self.refusals: deque[str] = deque(maxlen=RECENT_REFUSALS)  # why workers were refused
        self.served_at: float | None = None  # last time some worker could take tasks
        self.durations: deque[float] = deque(maxlen=RECENT_DURATIONS)  # seconds per task
        self.outboxes = Outboxes(self.limits.max_unread_replies)
        self.inline_tasks = 0  # tasks out without a slot: their pixels will come here

    # ------------------------------------------------------------------ peers

    def join(self, ident: bytes, role: str, name: str, now: float) -> Peer:
        """A worker or client said hello (a peer saying hello again starts afresh)."""
        self.forget(ident)
        peer = self.peers[ident] = Peer(ident, role, name[:MAX_NAME], now)
        return peer

    def forget(self, ident: bytes) -> Peer | None:
        """Drop a peer: a worker's tasks go back to their streams, a client's streams end."""
        peer = self.peers.pop(ident, None)
        if peer is None:
            return None
        for task_id in [t for t, w in self.ended.items() if w == ident]:
            del self.ended[task_id]
        for task_id in sorted(peer.tasks):
            task = self._untrack(task_id)
            if task is not None and task.stream.alive:
                self._lose(task)
                self.counters.tasks_reissued += 1
        for stream in list(peer.streams.values()):
            self.drop_stream(stream)
        return peer

    def expired(self, now: float) -> list[tuple[Peer, float]]:
        """The peers silent too long, with their silence in seconds (not yet forgotten)."""
        timeout = {"worker": self.limits.heartbeat_timeout, "client": CLIENT_TIMEOUT}
        return [(p, now - p.last_seen) for p in self.peers.values()
                if now - p.last_seen > timeout[p.role]]

    def refused(self, worker: Peer, reason: str) -> None:
        """``worker`` may not serve this job (its dataset differs, say): forget it, keep why."""
        self.refusals.append(f"worker {worker.name}: {reason}")
        self.forget(worker.ident)

    def unserved(self, now: float) -> list[tuple[Stream, str]]:
        """Streams with batches to go that no worker could take for
        ``limits.no_worker_seconds``: dropped, each with the reason for its client."""
        if any(p.role == "worker" and not p.warming for p in self.peers.values()):
            self.served_at = now
            return []
        limit = self.limits.no_worker_seconds
        starving = [s for s in self.streams.values()
                    if now - max(s.opened, self.served_at or s.opened) > limit]
        if not starving:
            return []
        why = ("; ".join(self.refusals) if self.refusals else
               "no worker has joined (start some: augserver worker --connect ADDRESS)")
        reason = f"no worker could serve this stream for {limit:g} s: {why}"
        for stream in starving:
            self.drop_stream(stream)
        return [(stream, reason) for stream in starving]

    # ------------------------------------------------------------------ workers

    def ready(self, worker: Peer, slots: int) -> None:
        """``worker`` announced ``slots`` more free slots (never more than it may hold)."""
        room = self.limits.worker_slots - len(worker.tasks)
        worker.free = max(0, min(worker.free + slots, room))
        worker.warming = False

    def result(self, worker: Peer, message: protocol.Message, now: float) -> ResultOutcome:
        """A worker's ``result``; it also gives back the slot its task used."""
        try:
            return self._take_result(worker, message, now)
        finally:
            self.ready(worker, 1)

    def _take_result(self, worker: Peer, message: protocol.Message, now: float) -> ResultOutcome:
        if self.ended.get(message["task"]) == worker.ident:
            del self.ended[message["task"]]
            self.counters.late_results += 1
            return ResultOutcome(LATE)
        task = self.tasks.get(message["task"])
        if task is None or task.worker != worker.ident or task.position in task.stream.delivered:
            self.counters.duplicates_dropped += 1
            return ResultOutcome(DUPLICATE)
        self._untrack(task.id)
        worker.tasks.discard(task.id)
        stream = task.stream
        del stream.in_flight[task.position]
        in_slot = task.slot is not None and message["slot"] == protocol.SLOT_WRITTEN
        problem = self._check_result(task, message, in_slot, task.slot is not None)
        if task.slot is not None and stream.shm is not None:
            self._settle_slot(stream.shm, task, message["slot"], problem is None)
        if problem is not None:
            heapq.heappush(stream.pending, task.position)
            self.counters.tasks_reissued += 1
            return ResultOutcome(REJECTED, task, f"result of task {task.id}: {problem}; "
                                                 "task re-issued")
        failed = message["failed"]
        samples = message.specs[-1][1][0]
        self._record(worker, failed, samples, now)
        if failed and (self.config.error_policy == "fail" or samples < len(task.batch)):
            self.drop_stream(stream)
            return ResultOutcome(FAILED, task, self._failure_message(task, message))
        self.durations.append(now - task.issued)
        stream.credits -= 1
        stream.meter.delivered(now, samples, stream.credits)
        stream.delivered.add(task.position)
        stream.remaining -= 1
        end = stream.remaining == 0
        if end:
            self.drop_stream(stream)
        if in_slot:
            stream.shm_batches += 1
            self.counters.batches_shm += 1
        else:
            stream.tcp_batches += 1
            self.counters.batches_tcp += 1
        receipt = self.outboxes.data(stream.client, protocol.size(message.frames))
        return ResultOutcome(RELAY, task, end=end, receipt=receipt,
                             slot=task.slot if in_slot else None)

    @staticmethod
    def _settle_slot(pool: SlotPool, task: Task, status: Any, valid: bool) -> None:
        """What the result's ``slot`` status (and whether the result is ``valid``) means for
        the slot ``task`` was given: delivered with the batch, quarantined if someone may
        still write it, else free again (and no more slots for a worker that cannot see the
        arena)."""
        assert task.slot is not None
        if status == protocol.SLOT_WRITTEN and valid:
            pool.deliver(task.slot)
        elif status == protocol.SLOT_DIRTY:
            pool.lost(task.slot)
        else:  # never written, or written and refused: its writer is done
            pool.untouched(task.slot, task.worker if status == protocol.SLOT_UNUSABLE else None)

    def _untrack(self, task_id: int) -> Task | None:
        """Remove a task from those out (keeping the count of inline ones)."""
        task = self.tasks.pop(task_id, None)
        if task is not None and task.slot is None:
            self.inline_tasks -= 1
        return task

    def _lose(self, task: Task) -> None:
        """``task``'s worker is lost (dead or stalled): its position goes back to pending and
        its slot, which the worker might still write, to quarantine."""
        stream = task.stream
        del stream.in_flight[task.position]
        heapq.heappush(stream.pending, task.position)
        if task.slot is not None and stream.shm is not None:
            stream.shm.lost(task.slot)

    def _failure_message(self, task: Task, message: protocol.Message) -> str:
        """The stream's error for a result with failed samples that cannot be delivered."""
        failed = message["failed"]
        if self.config.error_policy == "fail":
            index, path, error = failed[0]
            return f"sample {index} ({path}) cannot be used and error_policy is fail: {error}"
        missing = Counter(task.batch.tolist()) - Counter(message.arrays[-1].tolist())
        index, path, error = next(f for f in failed if f[0] in missing)
        return (f"sample {index} ({path}) cannot be used and none of the samples after it can "
                f"stand in for it (error_policy skip): {error}")

    def _check_result(self, task: Task, message: protocol.Message, in_slot: bool,
                      given: bool) -> str | None:
        """What is wrong with a result's arrays for ``task``, or None. The usual result (every
        sample made) is recognised by its shapes and index bytes; then the labels must lie in
        the dataset's classes. A failed sample may be replaced in its place by another (a
        substitute) or be missing."""
        if message["slot"] in (protocol.SLOT_WRITTEN, protocol.SLOT_DIRTY) and not given:
            return f"it says its slot is {message['slot']} but it was given none"
        problem = self.layout.problem(message.specs, in_slot)
        if problem is not None:
            return problem
        # int64 (checked above); plain min/max: a numpy array costs more on this hot path
        labels = memoryview(message.frames[-2]).cast("B").cast("q")
        if len(labels) and not (min(labels) >= 0 and max(labels) < self.num_classes):
            return (f"labels {min(labels)}..{max(labels)} are not all classes of this "
                    f"dataset (0..{self.num_classes - 1})")
        if message.frames[-1].bytes == task.batch.tobytes():
            return None
        made, batch = Counter(message.arrays[-1].tolist()), Counter(task.batch.tolist())
        removed, added = batch - made, made - batch  # failed samples, their substitutes
        if removed != Counter(f[0] for f in message["failed"]) or added.total() > removed.total() \
                or not all(0 <= i < self.dataset_len for i in added):
            return "its indices, failures and substitutes do not match the task's indices"
        return None

    def _record(self, worker: Peer, failed: list[list[Any]], samples: int, now: float) -> None:
        worker.tasks_done += 1
        worker.recent.append((now, samples))
        while worker.recent and worker.recent[0][0] < now - RATE_WINDOW:
            worker.recent.popleft()
        self.failures.extend(Failure(index, path, error) for index, path, error in failed)
        self.counters.samples_failed += len(failed)

    # ------------------------------------------------------------------ clients

    def open(self, client: Peer, fields: dict[str, Any], now: float) -> OpenOutcome:
        """A client's ``open``: a stream for one rank's share of one epoch (a stream id
        already open is replaced); positions in ``done`` are not sent again."""
        sid = fields["stream"]
        old = client.streams.get(sid)
        if old is not None:
            self.drop_stream(old)
        try:
            if len(sid) > MAX_NAME:
                raise ValueError(f"a stream id is at most {MAX_NAME} characters")
            if fields["world_size"] > MAX_WORLD_SIZE:
                raise ValueError(f"world_size {fields['world_size']} exceeds {MAX_WORLD_SIZE}")
            most = self.limits.max_streams_per_client
            if len(client.streams) >= most:
                raise ValueError(f"this client already has {most} open streams "
                                 "(limits.max_streams_per_client)")
            plan = ShardPlan(self.config.seed, fields["epoch"], self.dataset_len,
                             fields["rank"], fields["world_size"], self.config.batch_size,
                             self.config.drop_last, fields["skip"])
            num_batches = plan.num_batches
        except ValueError as exc:
            return OpenOutcome(error=f"cannot open stream {sid[:MAX_NAME]}: {exc}")
        pending = _missing(num_batches, fields["done"])
        if not pending:
            return OpenOutcome(num_batches=num_batches)
        shm = SlotPool.offered(fields["shm"]) if fields.get("shm") is not None else None
        cap = max(self.cap, shm.slots) if shm is not None else self.cap
        stream = Stream(client.ident, sid, plan, fields["ordered"],
                        min(fields["credits"], cap), cap, pending, len(pending), now, shm=shm)
        client.streams[sid] = stream
        self.streams[(client.ident, sid)] = stream
        stream.meter.credits(now, stream.credits)
        return OpenOutcome(num_batches=num_batches, stream=stream)

    def credit(self, client: Peer, sid: str, n: int, now: float,
               free: list[int] | None = None) -> None:
        """The client consumed ``n`` batches of stream ``sid``: that many more may go out;
        ``free``: the slots of its arena it has copied out."""
        stream = client.streams.get(sid)
        if stream is not None:  # else: ended already, a grant still on its way
            if free and stream.shm is not None:
                stream.shm.released(free)
            stream.credits = min(stream.credits + n, stream.cap)
            stream.meter.credits(now, stream.credits)

    def close(self, client: Peer, sid: str) -> None:
        stream = client.streams.get(sid)
        if stream is not None:
            self.drop_stream(stream)

    def drop_stream(self, stream: Stream) -> None:
        """Forget a stream; results of its tasks still in flight will be dropped."""
        if not stream.alive:
            return
        stream.alive = False
        self.streams.pop((stream.client, stream.id), None)
        client = self.peers.get(stream.client)
        if client is not None and client.streams.get(stream.id) is stream:
            del client.streams[stream.id]
        for task_id in stream.in_flight.values():
            task = self._untrack(task_id)
            worker = self.peers.get(task.worker) if task else None
            if worker is not None:
                worker.tasks.discard(task_id)
                self.ended[task_id] = worker.ident
        stream.in_flight.clear()
        stream.pending.clear()

    # ------------------------------------------------------------------ scheduling

    def stall_limit(self) -> float:
        """Seconds after which a task still out is taken as stalled: :data:`STALL_FACTOR` times
        the median of recent task durations, never less than ``limits.task_seconds``."""
        floor = self.limits.task_seconds
        if not self.durations:
            return floor
        return max(floor, STALL_FACTOR * statistics.median(self.durations))

    def stalled(self, now: float) -> list[Task]:
        """Re-issue the tasks out longer than :meth:`stall_limit` (a worker that heartbeats
        but never answers keeps none for ever); their late results are dropped. The worker's
        slot stays taken until it answers, so a worker that never does gets nothing more."""
        limit = self.stall_limit()
        late = [t for t in self.tasks.values() if now - t.issued > limit]
        for task in late:
            self._untrack(task.id)
            worker = self.peers.get(task.worker)
            if worker is not None:
                worker.tasks.discard(task.id)
            self._lose(task)
            self.counters.tasks_reissued += 1
            self.counters.tasks_stalled += 1
        return late

    def schedule(self, now: float = 0.0) -> list[Task]:
        """Assign tasks while some worker has a free slot and some stream may take one: one
        task per worker per round, the workers with the most free slots first. Returns the
        new tasks, in order, for the shell to send; ``now`` is when they go out."""
        assigned: list[Task] = []
        if not self.streams:
            return assigned
        idle = sorted((p for p in self.peers.values() if p.role == "worker" and p.free > 0),
                      key=lambda p: p.free, reverse=True)
        while idle:
            for worker in idle:
                stream = self._next_stream(worker)
                if stream is None:
                    return assigned
                assigned.append(self._assign(worker, stream, now))
            idle = [w for w in idle if w.free > 0]
        return assigned

    def _next_stream(self, worker: Peer) -> Stream | None:
        streams = list(self.streams.values())
        for offset in range(len(streams)):
            stream = streams[(self.turn + offset) % len(streams)]
            shm = stream.shm is not None and stream.shm.can_take(worker.ident)
            if stream.can_take() and (shm or self._room(stream.client)):
                self.turn = (self.turn + offset + 1) % len(streams)
                return stream
        return None

    def held_bytes(self) -> int:
        """What the dispatcher holds or has in flight for all peers: tasks out without a
        slot (their batches will come back to be relayed) and data sent and not yet shown
        read."""
        return self.outboxes.data_bytes + self.batch_bytes * self.inline_tasks

    def client_bytes(self, client: bytes) -> int:
        """:meth:`held_bytes` for one client."""
        peer = self.peers.get(client)
        out = sum(1 for s in peer.streams.values() for t in s.in_flight.values()
                  if self.tasks[t].slot is None) if peer else 0
        return self.outboxes.unread_data(client) + self.batch_bytes * out

    def reserve(self) -> int:
        """Each client's reserved share of ``limits.max_held_bytes``: half of it split among
        the clients with open streams (at least one batch). Within its share a client always
        gets batches, whatever the others hold; the other half is shared, first come."""
        clients = {s.client for s in self.streams.values()}
        return max(self.batch_bytes, self.limits.max_held_bytes // (2 * max(1, len(clients))))

    def _room(self, client: bytes) -> bool:
        """Whether one more batch for ``client`` stays within the byte budgets: its own
        (``limits.max_prefetch_bytes``), and its reserved share (:meth:`reserve`) or else
        room in the shared part of ``limits.max_held_bytes``. Peers that hold batches and do
        not read can fill the shared part, never a reading client's share."""
        more = self.batch_bytes
        held = self.client_bytes(client)
        if held and held + more > self.limits.max_prefetch_bytes:
            return False
        reserve = self.reserve()
        if held + more <= reserve:
            return True
        clients = {s.client for s in self.streams.values()} | {client}
        mine = {c: self.client_bytes(c) for c in clients}
        orphaned = max(0, self.held_bytes() - sum(mine.values()))  # peers gone, or unknown
        beyond = orphaned + sum(max(0, h - reserve) for h in mine.values())
        shared = max(0, self.limits.max_held_bytes - reserve * len(clients))
        return beyond + held + more - max(held, reserve) <= shared

    def _assign(self, worker: Peer, stream: Stream, now: float) -> Task:
        position = heapq.heappop(stream.pending)
        batch = stream.plan.batch(position)
        slot = stream.shm.take(worker.ident) if stream.shm is not None else None
        task = Task(next(self.task_ids), stream, position, batch, worker.ident, now,
                    self.outboxes.task(worker.ident, TASK_BYTES + 9 * len(batch)), slot)
        self.tasks[task.id] = task
        if slot is None:
            self.inline_tasks += 1
        stream.in_flight[position] = task.id
        worker.tasks.add(task.id)
        worker.free -= 1
        return task

    # ------------------------------------------------------------------ statistics

    def stats(self, now: float, *, uptime: float, address: str,
              summary: dict[str, Any]) -> DispatcherStats:
        """Everything ``augserver status`` shows, at ``now``."""
        peers = list(self.peers.values())
        workers = [_worker_stats(p, now) for p in peers if p.role == "worker"]
        clients = [
            ClientStats(p.name, round(now - p.last_seen, 3),
                        [_stream_stats(s, now) for s in p.streams.values()])
            for p in peers if p.role == "client"
        ]
        return DispatcherStats(
            uptime_s=round(uptime, 3), address=address, dataset_len=self.dataset_len,
            config=summary, workers=workers, clients=clients,
            scaling=estimate([w.samples_per_s for w in workers],
                             [s for c in clients for s in c.streams]),
            counters=Counters(**vars(self.counters)), recent_failures=list(self.failures),
            memory=Memory(self.held_bytes(), self.limits.max_held_bytes,
                          self.outboxes.unread_reply_bytes()),
        )


def _worker_stats(worker: Peer, now: float) -> WorkerStats:
    recent = [(t, n) for t, n in worker.recent if t >= now - RATE_WINDOW]
    span = min(RATE_WINDOW, now - recent[0][0]) if recent else 0.0
    rate = sum(n for _, n in recent) / span if span > 0 else 0.0
    return WorkerStats(worker.name, "warming" if worker.warming else "ready", worker.tasks_done,
                       round(rate, 1), len(worker.tasks), worker.free,
                       round(now - worker.last_seen, 3))


def _stream_stats(stream: Stream, now: float) -> StreamStats:
    plan = stream.plan
    return StreamStats(
        stream=stream.id, epoch=plan.epoch, rank=plan.rank, world_size=plan.world_size,
        ordered=stream.ordered, num_batches=plan.num_batches, delivered=len(stream.delivered),
        credits=stream.credits, in_flight=len(stream.in_flight), pending=len(stream.pending),
        **stream.meter.stats(now), path=stream.path(), shm_batches=stream.shm_batches,
        tcp_batches=stream.tcp_batches,
    )


def _missing(num_batches: int, done: list[list[int]]) -> list[int]:
    """Positions ``0..num_batches-1`` not covered by the ``[start, end)`` ranges in ``done``
    (sorted, so already a heap); ranges are clipped, so a huge range costs nothing."""
    have = np.zeros(num_batches, bool)
    for start, end in done:
        have[min(start, num_batches):min(end, num_batches)] = True
    return np.flatnonzero(~have).tolist()
