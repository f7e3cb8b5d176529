"""The dispatcher's I/O shell: one ROUTER socket, CURVE, the loop, and the messages it sends.

Everyone connects to this one socket (the conversations are in :mod:`augserver.protocol`).
The shell decodes each message, hands it to :class:`augserver.dispatcher_state.DispatcherState`
(which holds peers, streams, tasks and credits and never touches a socket), and sends what the
state's outcomes call for: tasks to workers, relayed batches, ``end`` and errors to clients.
The dispatcher keeps no durable state: a stream is regenerated from ``(seed, epoch, dataset
length, rank, world size)`` and the positions the client says it already has.

A malformed message is logged, counted and answered with a non-fatal ``error`` when its sender
is known; an unreachable peer is forgotten; nothing a peer sends can stop the loop.

Every message sent is stamped with a receipt and counted in its peer's outbox until the peer
returns that receipt (:mod:`augserver.outbox`): replies to a peer that leaves
``limits.max_unread_replies`` of them unread are dropped (logged), batches are never dropped
and the state keeps them within its byte budgets. A peer that is gone while data sent to it is
still unread, or silent, is probed every :data:`PROBE_SECONDS` until ZeroMQ says its
connection is closed, which frees what it held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import zmq
from zmq.auth.thread import ThreadAuthenticator

from augserver import protocol, security
from augserver.addresses import is_local
from augserver.config import JobConfig
from augserver.datasets import Dataset, fingerprint_mismatch, open_dataset
from augserver.dispatcher_state import (
    CLIENT_TIMEOUT,
    DUPLICATE,
    FAILED,
    LATE,
    MAX_NAME,
    REJECTED,
    DispatcherState,
    Peer,
    Task,
)
from augserver.errors import ConfigError, ProtocolError
from augserver.stats import DispatcherStats

log = logging.getLogger("augserver.dispatcher")

_BURST = 256  # messages handled between housekeeping checks
PROBE_SECONDS = 2.0
"""Seconds between two probes of a gone peer that still holds unread data."""
ZMTP_HEARTBEAT_SECONDS = 5.0
"""How often ZeroMQ pings each connection (the peer's ZeroMQ answers by itself)."""
INBOUND_MESSAGES = 16
"""Messages ZeroMQ queues from one peer before it stops reading that peer's connection (the
peer then waits: nothing is lost). A worker sends at most its slots' results and a heartbeat
at a time, a client its grants and a ping: this is ample for any peer that is not flooding."""
_SNDMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)  # plain ints: no enum arithmetic
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class MessageError(Exception):
    """A well-formed message that makes no sense here (wrong role, bad result...)."""


class Supervised(Protocol):
    """What the loop polls when it also looks after local workers."""

    def poll(self) -> None: ...

    def problems(self) -> list[str]: ...


class Dispatcher:
    """The dispatcher of one job; binds ``config.bind`` at construction.

    ``address`` is the bound endpoint (the real port when bound to port 0); ``state`` is its
    :class:`~augserver.dispatcher_state.DispatcherState`. :meth:`serve` runs the loop until
    ``stop`` is set; :meth:`close` releases the socket.
    """

    def __init__(self, config: JobConfig) -> None:
        _check_exposure(config)
        self.config = config
        self.limits = config.limits
        dataset = _open_job_dataset(config)
        classes = class_names(dataset)
        self.state = DispatcherState(config, len(dataset), len(classes))
        self.versions = protocol.pixel_versions()
        self.fingerprint = dataset.fingerprint()
        self.welcome = {"config": config.to_dict(), "dataset_len": len(dataset),
                        "classes": classes, "dataset": self.fingerprint}
        protocol.check_fields("welcome", self.welcome)
        self.started = time.monotonic()
        self.next_probe = 0.0
        self.supervisor: Supervised | None = None
        self.snapshot: DispatcherStats | None = None  # see start_snapshots()
        self.context = zmq.Context(io_threads=self.limits.zmq_io_threads)
        self.sock = self._bind(config.bind)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.handlers: dict[str, dict[str, Callable[[Peer, protocol.Message], None]]] = {
            "worker": {"ready": self._ready, "result": self._result, "heartbeat": self._beat,
                       "leave": self._leave},
            "client": {
                "open": self._open, "credit": self._credit, "close": self._close,
                "ping": self._ping,
            },
        }

    def _bind(self, address: str) -> zmq.Socket:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # what goes out is bounded by the outboxes instead
        sock.setsockopt(zmq.RCVHWM, INBOUND_MESSAGES)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if "[" in address:  # tcp://[::1]:P, tcp://[::]:P (IPv4 binds keep their plain form)
            sock.setsockopt(zmq.IPV6, 1)
        # ZMTP heartbeats: a connection whose peer process cannot answer (stopped, frozen,
        # cut off) is closed, and what ZeroMQ queued for it is freed with it
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(ZMTP_HEARTBEAT_SECONDS * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(CLIENT_TIMEOUT * 1000))
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_inbound_bytes())
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

    def max_inbound_bytes(self) -> int:
        """The largest message accepted: ``limits.max_message_bytes``, and never more than
        the job's largest valid message (a full batch's result with the largest header), so
        that what one peer can queue here is :data:`INBOUND_MESSAGES` of those at most."""
        largest = self.state.batch_bytes + protocol.MAX_HEADER_BYTES
        return min(self.limits.max_message_bytes, largest)

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
        self.supervisor = supervisor
        period = min(0.1, self.limits.heartbeat_interval / 4)
        log.info("dispatcher on %s: %d samples, %d views of %dpx, batch %d", self.address,
                 self.state.dataset_len, self.config.views, self.config.image_size,
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
            if not self.sock.getsockopt(_EVENTS) & _POLLIN:  # cheaper than a zmq.Again
                break
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
            self.state.counters.handler_errors += 1
            log.exception("error handling a message from %s", self._who(ident))

    def _handle(self, ident: bytes, body: list[zmq.Frame]) -> None:
        try:
            message = protocol.decode(body)
        except ProtocolError as exc:
            version = protocol.foreign_hello(body)
            if version is not None:
                self._refuse(ident, f"protocol version {version} is not supported: "
                                    f"this dispatcher speaks protocol {protocol.PROTOCOL_VERSION}")
                return
            raise MessageError(str(exc)) from None
        self.state.outboxes.seen(ident, message.receipt)
        if message.type == "hello":
            self._hello(ident, message)
            return
        peer = self.state.peers.get(ident)
        if peer is None:
            self._reply(ident, "reset", reason=f"unknown peer sent {message.type}; "
                                               "say hello first")
            return
        peer.last_seen = time.monotonic()
        handler = self.handlers[peer.role].get(message.type)
        if handler is None:
            raise MessageError(f"a {peer.role} may not send {message.type}")
        handler(peer, message)

    def _malformed(self, ident: bytes, problem: str) -> None:
        self.state.counters.malformed_messages += 1
        log.warning("malformed message from %s: %s", self._who(ident), problem)
        if ident in self.state.peers:
            self._reply(ident, "error", message=f"malformed message: {problem}", stream=None,
                        fatal=False)

    def _housekeeping(self, now: float) -> None:
        """Declare silent workers dead and forget silent clients."""
        for task in self.state.stalled(now):
            log.warning("task %d (batch %d of stream %s) held by %s for more than %.0f s; "
                        "re-issued", task.id, task.position, task.stream.id,
                        self._who(task.worker), self.state.stall_limit())
        for stream, reason in self.state.unserved(now):
            log.error("stream %s fails: %s", stream.id, reason)
            self._reply(stream.client, "error", message=reason, stream=stream.id, fatal=True)
        for peer, silence in self.state.expired(now):
            if peer.role == "worker":
                log.warning("worker %s declared dead after %.1f s of silence; re-issuing %d "
                            "tasks", peer.name, silence, len(peer.tasks))
            else:
                # A client with no stream only asked for the job (``len(loader)``): routine.
                level = logging.WARNING if peer.streams else logging.INFO
                log.log(level, "client %s silent for %.0f s; forgetting it and its %d streams",
                        peer.name, silence, len(peer.streams))
                # what it held no longer counts: a live one has it in its own process, and
                # ZeroMQ closes the connection of a stopped one (ZMTP heartbeats, below)
                self.state.outboxes.release(peer.ident)
            self.state.forget(peer.ident)
        if now >= self.next_probe:
            self.next_probe = now + PROBE_SECONDS
            self._probe_holders(now)
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
        self.state.forget(ident)
        if role == "status":
            self._reply(ident, "status", stats=self.stats().to_dict())
            return
        if role == "worker":
            mismatch = protocol.version_mismatch(self.versions, message["versions"])
            if mismatch is not None:
                log.warning("worker %s refused: %s", name, mismatch)
                self._refuse(ident, mismatch)
                return
        self.state.join(ident, role, name, time.monotonic())
        log.info("%s %s joined", role, name)
        self._reply(ident, "welcome", **self.welcome)

    def _refuse(self, ident: bytes, reason: str) -> None:
        self._reply(ident, "refused", reason=reason)

    def _who(self, ident: bytes) -> str:
        peer = self.state.peers.get(ident)
        return f"{peer.role} {peer.name}" if peer else f"unknown peer {ident.hex()}"

    def _reply(self, ident: bytes, mtype: str, **fields: Any) -> bool:
        """Send a reply (anything but data) unless ``ident`` leaves too many unread: then it
        is dropped and counted, logged when the peer starts to lose replies."""
        outboxes = self.state.outboxes
        frames = outboxes.reply(ident, lambda receipt: protocol.pack(mtype, (), fields, receipt))
        if frames is None:
            self.state.counters.replies_dropped += 1
            if outboxes.dropping(ident) == 1:
                log.warning("%s leaves %d replies unread: dropping its replies until it reads "
                            "(limits.max_unread_replies)", self._who(ident),
                            outboxes.unread_replies(ident))
            return False
        return self._send(ident, frames)

    def _probe_holders(self, now: float) -> None:
        """Probe the peers that hold unread data and are gone, or silent for
        :data:`PROBE_SECONDS`: a closed connection shows as unreachable, and what ZeroMQ held
        for it is freed (a live client takes the probe, a ``pong``, as a keepalive)."""
        for ident in self.state.outboxes.holding():
            peer = self.state.peers.get(ident)
            if peer is None:
                self._reply(ident, "reset", reason="this dispatcher does not know you; "
                                                   "say hello first")
            elif now - peer.last_seen > PROBE_SECONDS:
                self._reply(ident, "pong")

    def _send(self, ident: bytes, frames: list[Any]) -> bool:
        """Send to a peer; an unreachable one is forgotten (False) with its outbox."""
        try:
            self.sock.send(ident, _SNDMORE)
            for frame in frames[:-1]:
                self.sock.send(frame, _SNDMORE, copy=False)
            self.sock.send(frames[-1], 0, copy=False)
            return True
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.state.outboxes.release(ident)
            peer = self.state.peers.get(ident)
            if peer is not None:
                # A client whose streams are done has simply closed its socket: routine.
                busy = peer.role == "worker" or peer.streams
                log.log(logging.WARNING if busy else logging.INFO,
                        "%s is unreachable; forgetting it", self._who(ident))
                self.state.forget(ident)
            return False

    # ------------------------------------------------------------------ workers

    def _ready(self, worker: Peer, message: protocol.Message) -> None:
        """A worker asks for tasks: only one whose view of the dataset is the dispatcher's."""
        mismatch = fingerprint_mismatch(self.fingerprint, message["dataset"])
        if mismatch is not None:
            log.warning("worker %s refused: %s", worker.name, mismatch)
            self.state.refused(worker, mismatch)
            self._refuse(worker.ident, mismatch)
            return
        self.state.ready(worker, message["slots"])

    def _leave(self, worker: Peer, message: protocol.Message) -> None:
        """A worker that cannot serve this job says why before it exits: kept, so that a
        stream no worker can serve fails with that reason, not "no worker has joined"."""
        log.error("worker %s cannot serve this job: %s", worker.name, message["reason"])
        self.state.refused(worker, message["reason"][:1000])

    def _beat(self, worker: Peer, message: protocol.Message) -> None:
        self._reply(worker.ident, "heartbeat")

    def _result(self, worker: Peer, message: protocol.Message) -> None:
        """Relay a worker's batch to its client, or say why not."""
        outcome = self.state.result(worker, message, time.monotonic())
        if outcome.kind in (DUPLICATE, LATE):
            log.debug("dropped a %s result for task %d", outcome.kind, message["task"])
            return
        if outcome.kind == REJECTED:
            raise MessageError(outcome.problem)
        for index, path, error in message["failed"]:
            log.warning("sample %d (%s) failed: %s", index, path, error)
        task = outcome.task
        assert task is not None
        stream = task.stream
        if outcome.kind == FAILED:
            log.error("stream %s fails: %s", stream.id, outcome.problem)
            self._reply(stream.client, "error", message=outcome.problem, stream=stream.id,
                        fatal=True)
            return
        frames = protocol.relay("batch", message, {  # the frames as received: not copied
            "stream": stream.id, "position": task.position, "failed": message["failed"],
            "slot": outcome.slot}, outcome.receipt)
        if self._send(stream.client, frames) and outcome.end:
            lost = stream.shm.unsafe() if stream.shm is not None else []
            self._reply(stream.client, "end", stream=stream.id, lost=lost)

    # ------------------------------------------------------------------ clients

    def _open(self, client: Peer, message: protocol.Message) -> None:
        sid = message["stream"]
        outcome = self.state.open(client, message.fields, time.monotonic())
        if outcome.error is not None:
            self._reply(client.ident, "error", message=outcome.error, stream=sid, fatal=True)
            return
        if not self._reply(client.ident, "opened", stream=sid, num_batches=outcome.num_batches,
                           batch_bytes=self.state.batch_bytes):
            return
        stream = outcome.stream
        if stream is None:
            self._reply(client.ident, "end", stream=sid)
            return
        plan = stream.plan
        log.info("client %s opened stream %s: epoch %d, rank %d/%d, %d of %d batches to send, "
                 "%s", client.name, sid, plan.epoch, plan.rank, plan.world_size,
                 stream.remaining, plan.num_batches,
                 f"shared memory offered ({stream.shm.slots} slots)" if stream.shm else
                 "over TCP")

    def _credit(self, client: Peer, message: protocol.Message) -> None:
        self.state.credit(client, message["stream"], message["n"], time.monotonic(),
                          message["free"])

    def _close(self, client: Peer, message: protocol.Message) -> None:
        self.state.close(client, message["stream"])

    def _ping(self, client: Peer, message: protocol.Message) -> None:
        self._reply(client.ident, "pong")

    # ------------------------------------------------------------------ scheduling

    def _schedule(self) -> None:
        """Send the tasks the state assigns; a worker found unreachable is forgotten (its
        tasks go back to their streams), and what it would have had is assigned again."""
        while True:
            unreachable = False
            for task in self.state.schedule(time.monotonic()):
                if task.id in self.state.tasks and not self._send(task.worker, _task_message(task)):
                    unreachable = True
            if not unreachable:
                return

    # ------------------------------------------------------------------ status

    def start_snapshots(self) -> Callable[[], DispatcherStats | None]:
        """Have the loop refresh :attr:`snapshot` (a new :meth:`stats` record) on every
        housekeeping pass; call before :meth:`serve`. Returns a reader any thread may call."""
        self.snapshot = self.stats()
        return lambda: self.snapshot

    def stats(self) -> DispatcherStats:
        """Everything ``augserver status`` shows, now."""
        now = time.monotonic()
        stats = self.state.stats(now, uptime=now - self.started, address=self.address,
                                 summary=self._summary())
        if self.supervisor is not None:
            stats.problems = self.supervisor.problems()
        return stats

    def _summary(self) -> dict[str, Any]:
        c = self.config
        return {
            "dataset": f"{c.dataset.format}:{c.dataset.path}", "preprocess": c.preprocess,
            "jsd": c.jsd, "views": c.views, "image_size": c.image_size,
            "batch_size": c.batch_size, "seed": c.seed, "drop_last": c.drop_last,
            "error_policy": c.error_policy, "augmix": c.to_dict()["augmix"],
            "batch_bytes": self.state.batch_bytes,
        }


def _task_message(task: Task) -> list[Any]:
    pool = task.stream.shm
    slot = pool.wire(task.slot) if pool is not None and task.slot is not None else None
    return protocol.pack("task", (), {"task": task.id, "epoch": task.stream.plan.epoch,
                                      "indices": task.batch.tolist(), "slot": slot},
                         task.receipt)


def class_names(dataset: Dataset) -> list[str]:
    """The names of the dataset's classes, by label; unnamed classes (an npz) by number."""
    return list(dataset.classes) or [str(i) for i in range(dataset.num_classes)]


def _check_exposure(config: JobConfig) -> None:
    """Secure by default: a bind other hosts can reach needs CURVE, or the job's explicit
    ``security.insecure: true`` (then a warning is logged)."""
    sec = config.security
    if sec.curve or is_local(config.bind):
        return
    if not sec.insecure:
        raise ConfigError(
            f"security: bind {config.bind} accepts peers from other hosts and CURVE is off, so "
            "any host that reaches the port could join as a worker or a client. Turn CURVE on "
            "(augserver keys; serve --curve-key KEY --allow DIR, or security.curve), bind a "
            "loopback address, or, on a network you trust, opt out with "
            "security.insecure: true", None, "security.insecure")
    log.warning("SECURITY: %s is open to any host that reaches it, without authentication "
                "or encryption (security.insecure: true); any peer can join as a worker and "
                "send pixels and labels to the trainers", config.bind)


def _open_job_dataset(config: JobConfig) -> Dataset:
    """Open the dataset (a clear error when it is missing, broken or empty)."""
    if config.batch_bytes > config.limits.max_message_bytes:
        raise ConfigError(
            f"limits.max_message_bytes: {config.limits.max_message_bytes} is smaller than one "
            f"batch of pixels ({config.batch_bytes} bytes)", None, "limits.max_message_bytes")
    d = config.dataset
    dataset = open_dataset(d.format, d.path, d.train, d.s3)
    if len(dataset) == 0:
        raise ConfigError(f"dataset.path: {config.dataset.path} holds no samples", None,
                          "dataset.path")
    return dataset
