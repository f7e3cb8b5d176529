"""The dispatcher's statistics as one typed record, shared by ``status``, metrics and scaling.

:class:`DispatcherStats` is what the dispatcher's state reports; it travels in the ``status``
message as its :meth:`~DispatcherStats.to_dict` form (plain msgpack/JSON types) and is rebuilt
with :meth:`~DispatcherStats.from_dict` on the other side. ``augserver status`` formats it,
the Prometheus endpoint renders it, and :func:`augserver.scaling.estimate` fills its
:class:`Scaling`. A counter added to :class:`Counters` reaches all three.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from augserver.errors import ProtocolError


def _counter(text: str) -> Any:
    return field(default=0, metadata={"help": text})


@dataclass
class Counters:
    """Event counts since the dispatcher started; each field's ``help`` is its Prometheus
    help text."""

    tasks_reissued: int = _counter(
        "Tasks re-issued after a worker died or returned a bad result.")
    duplicates_dropped: int = _counter("Stale or duplicate results dropped.")
    tasks_stalled: int = _counter(
        "Tasks re-issued because their worker held them far longer than tasks take.")
    late_results: int = _counter("Results for streams that had ended or failed, dropped.")
    samples_failed: int = _counter("Samples that could not be read or decoded.")
    malformed_messages: int = _counter("Malformed messages received.")
    handler_errors: int = _counter(
        "Messages whose handling raised an unexpected error (logged with a traceback).")
    replies_dropped: int = _counter(
        "Replies dropped because their peer left limits.max_unread_replies unread.")
    batches_shm: int = _counter(
        "Batches delivered through shared memory (same-host workers write the trainer's slot).")
    batches_tcp: int = _counter("Batches delivered with their pixels, over TCP.")

    @staticmethod
    def help(name: str) -> str:
        """The help text of counter ``name``."""
        return _FIELDS[name].metadata["help"]


_FIELDS = {f.name: f for f in dataclasses.fields(Counters)}


@dataclass
class WorkerStats:
    """One worker: ``state`` is ``warming`` until it asked for tasks (its kernels are loaded),
    then ``ready``."""

    name: str
    state: str
    tasks_done: int
    samples_per_s: float
    in_flight: int
    free_slots: int
    last_seen_s_ago: float


@dataclass
class StreamStats:
    """One stream: its plan, its progress and its recent consumption (see
    :class:`augserver.scaling.StreamMeter`)."""

    stream: str
    epoch: int
    rank: int
    world_size: int
    ordered: bool
    num_batches: int
    delivered: int
    credits: int
    in_flight: int
    pending: int
    batches_per_s: float
    samples_per_s: float
    data_wait: float
    path: str = "tcp"
    """How its batches travel: ``shm`` (same host, shared memory), ``tcp`` or ``shm+tcp``."""
    shm_batches: int = 0
    tcp_batches: int = 0


@dataclass
class ClientStats:
    name: str
    last_seen_s_ago: float
    streams: list[StreamStats]


@dataclass
class Scaling:
    """The scaling signal (see :mod:`augserver.scaling`)."""

    workers: int
    workers_needed: int
    data_wait: float
    wait_threshold: float
    consumption_samples_per_s: float
    demand_samples_per_s: float
    worker_samples_per_s: float


@dataclass
class Failure:
    """A sample a worker could not make."""

    index: int
    path: str
    error: str


@dataclass
class Memory:
    """What the dispatcher holds for its peers (see :mod:`augserver.outbox`): batches in
    flight or sent and not yet shown read, against ``limits.max_held_bytes``, and replies not
    yet shown read."""

    held_bytes: int
    max_held_bytes: int
    unread_reply_bytes: int


@dataclass
class DispatcherStats:
    """Everything ``augserver status`` shows."""

    uptime_s: float
    address: str
    dataset_len: int
    config: dict[str, Any]
    workers: list[WorkerStats]
    clients: list[ClientStats]
    scaling: Scaling
    counters: Counters
    recent_failures: list[Failure]
    problems: list[str] = field(default_factory=list)
    """What needs a person: local workers that keep dying at start, with their reason."""
    memory: Memory = field(default_factory=lambda: Memory(0, 0, 0))

    @property
    def streams(self) -> list[tuple[str, StreamStats]]:
        """Every open stream with its client's name."""
        return [(c.name, s) for c in self.clients for s in c.streams]

    def to_dict(self) -> dict[str, Any]:
        """Plain types only: what the ``status`` message and ``status --json`` carry."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DispatcherStats:
        """The record from :meth:`to_dict`'s form; :class:`ProtocolError` naming the first
        field that is missing or of the wrong type."""
        return _build(cls, data, "stats")


def _build(kind: Any, data: Any, where: str) -> Any:
    """``data`` checked against the type ``kind`` (dataclasses, lists, dicts, scalars)."""
    if dataclasses.is_dataclass(kind):
        if not isinstance(data, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(data).__name__}")
        hints = typing.get_type_hints(kind)
        values = {}
        for f in dataclasses.fields(kind):
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ProtocolError(f"{where}.{f.name}: missing")
                continue
            values[f.name] = _build(hints[f.name], data[f.name], f"{where}.{f.name}")
        return kind(**values)
    origin = typing.get_origin(kind)
    if origin is list:
        if not isinstance(data, list):
            raise ProtocolError(f"{where}: expected a list, got {type(data).__name__}")
        (item,) = typing.get_args(kind)
        return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(data).__name__}")
        return dict(data)
    if kind is float:
        ok = isinstance(data, int | float) and not isinstance(data, bool)
        data = float(data) if ok else data
    elif kind is int:
        ok = isinstance(data, int) and not isinstance(data, bool)
    elif isinstance(kind, type):
        ok = isinstance(data, kind)
    else:
        raise TypeError(f"{where}: unsupported field type {kind!r}")
    if not ok:
        raise ProtocolError(f"{where}: expected {kind.__name__}, got {data!r:.40}")
    return data
