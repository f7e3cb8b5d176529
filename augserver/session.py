"""Opening a session with the dispatcher as one role: the socket, ``hello`` and its answer.

Workers, ``augserver status`` and the training-side loader all connect a DEALER socket to the
dispatcher's ROUTER and say ``hello`` (see :mod:`augserver.protocol`); the dispatcher answers
``welcome`` (``status`` for the status role) or ``refused``. This module is the one place that
conversation is written, together with the diagnosis of a dispatcher that never answers
(nothing listening, CURVE required or refused, not a dispatcher).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from augserver import protocol
from augserver.errors import ProtocolError, RemoteError, SessionTimeout
from augserver.security import ClientKeys

_POLL_MS = 100
WAIT_REPORT = 5.0
"""Seconds between two ``waiting`` calls while no dispatcher answers."""


class Refused(RemoteError):
    """The dispatcher refused this peer (a version mismatch, say); final, never retried."""


@dataclass(frozen=True)
class KeyNames:
    """How a program calls its two CURVE keys, for the hints it prints."""

    own: str
    server: str


FLAGS = KeyNames("--key", "--server-key")
"""The command-line flags of ``augserver worker`` and ``augserver status``."""
ARGUMENTS = KeyNames("curve_key", "server_key")
"""The keyword arguments of ``RemoteAugMixLoader``."""


class ConnectionWatch:
    """What a socket's monitor saw while a session opens: whether a TCP connection came up and
    how the ZMTP security handshake ended. It turns a dispatcher that never answers into a
    diagnosis (nothing listening, CURVE required, CURVE refused, not a dispatcher) instead of a
    guess."""

    _EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
               | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock
        # An endpoint of its own: pyzmq's default is named after the socket's file descriptor,
        # which a new socket can reuse before the old monitor's endpoint is gone.
        self._monitor: zmq.Socket | None = sock.get_monitor_socket(
            self._EVENTS, addr=f"inproc://augserver-monitor-{uuid.uuid4().hex}")
        self.connected = False
        self.handshake = ""
        """``""`` (none finished yet), ``"ok"``, ``"mechanism"`` (one side uses CURVE, the
        other not), ``"refused"`` (keys not accepted) or ``"protocol"`` (not ZMTP)."""

    def update(self) -> None:
        """Read the events the monitor has queued, without waiting."""
        if self._monitor is None:
            return
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_CONNECTED:
                self.connected = True
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshake = "ok"
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                mismatch = value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
                self.handshake = "mechanism" if mismatch else "protocol"
            else:
                self.handshake = "refused"

    def close(self) -> None:
        """Stop monitoring; the socket itself stays open."""
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def diagnosis(self, curve: bool, names: KeyNames = FLAGS) -> str:
        """Why no dispatcher answered, from what was seen."""
        self.update()
        if self.handshake == "mechanism" and not curve:
            return (f"the dispatcher requires CURVE: pass {names.own} (this side's secret key) "
                    f"and {names.server} (the dispatcher's public key)")
        if self.handshake == "mechanism":
            return (f"the dispatcher does not use CURVE here: drop {names.own} and "
                    f"{names.server}, or give the dispatcher its security keys")
        if self.handshake == "refused":
            return (f"CURVE authentication failed: check that {names.server} is the "
                    f"dispatcher's public key and that this side's public key ({names.own}) "
                    "is in the dispatcher's allow-list")
        if self.handshake == "protocol":
            return "the peer there does not speak ZeroMQ: is this the dispatcher's address?"
        if self.handshake == "ok":
            return ("a peer accepted the connection but did not answer: is it an augserver "
                    "dispatcher, and is it running?")
        if self.connected:
            return "a connection came up but its handshake never finished"
        return "nothing accepted a connection there: is the dispatcher running at this address?"


class DealerSocket(zmq.Socket):
    """A DEALER made by :func:`dealer`: it carries the :class:`ConnectionWatch` started before
    it connected, so that no event of the first connection is missed."""

    watch: ConnectionWatch | None = None


def dealer(
    context: zmq.Context,
    address: str,
    keys: ClientKeys | None = None,
    *,
    immediate: bool = False,
    reconnect_ms: tuple[int, int] | None = None,
) -> zmq.Socket:
    """A DEALER socket connected to ``address``: no linger, no receive high-water mark (credits
    bound what arrives), CURVE when ``keys`` are given. ``immediate`` queues nothing before the
    connection is up; ``reconnect_ms`` is ``(interval, max interval)`` of reconnection."""
    sock = context.socket(zmq.DEALER, socket_class=DealerSocket)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if "[" in address:  # tcp://[::1]:P (IPv4 addresses keep their plain form)
        sock.setsockopt(zmq.IPV6, 1)
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if reconnect_ms is not None:
        sock.setsockopt(zmq.RECONNECT_IVL, reconnect_ms[0])
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_ms[1])
    if keys is not None:
        keys.apply(sock)
    sock.watch = ConnectionWatch(sock)
    try:
        sock.connect(address)
    except zmq.ZMQError as exc:
        sock.watch.close()
        sock.close(linger=0)
        raise ValueError(f"cannot connect to {address!r}: {exc}") from None
    return sock


def hello(role: str, name: str) -> list[bytes]:
    """The ``hello`` of ``role``: workers and clients name the versions that decide pixel
    bytes (the dispatcher refuses a worker that differs); ``status`` needs none."""
    versions = protocol.pixel_versions() if role != "status" else {}
    return protocol.encode("hello", role=role, protocol=protocol.PROTOCOL_VERSION,
                           versions=versions, name=name)


def handshake(
    sock: zmq.Socket,
    role: str,
    name: str,
    address: str,
    timeout: float,
    *,
    curve: bool,
    names: KeyNames = FLAGS,
    stopped: Callable[[], bool] = lambda: False,
    on_other: Callable[[protocol.Message], None] = lambda message: None,
    waiting: Callable[[float], None] = lambda seconds: None,
) -> protocol.Message | None:
    """Say hello on ``sock`` once it is connected and return the dispatcher's answer:
    ``welcome``, or ``status`` for the status role. None when ``stopped()`` turns true.

    Raises :class:`SessionTimeout` (with a :class:`ConnectionWatch` diagnosis) when no
    connection or no answer comes within ``timeout`` seconds, :class:`Refused` when the
    dispatcher refuses, :class:`RemoteError` when the answer is not this protocol. Other
    messages before the answer go to ``on_other``; ``waiting(seconds so far)`` runs every
    :data:`WAIT_REPORT` seconds while nothing answers.
    """
    answer = "status" if role == "status" else "welcome"
    start = time.monotonic()
    deadline = start + timeout
    next_report = start + WAIT_REPORT

    def report() -> None:
        nonlocal next_report
        now = time.monotonic()
        if now >= next_report:
            next_report = now + WAIT_REPORT
            waiting(now - start)

    watch = getattr(sock, "watch", None) or ConnectionWatch(sock)
    if isinstance(sock, DealerSocket):
        sock.watch = None  # one handshake uses it; a later one watches afresh

    def expired(what: str) -> SessionTimeout:
        return SessionTimeout(f"no augserver dispatcher {what} at {address} within "
                              f"{timeout:g} s ({watch.diagnosis(curve, names)})")

    try:
        # Never a blocking send: a connection refused by CURVE can leave the socket no pipe,
        # also between the poll saying it may send and the send.
        while True:
            while not sock.poll(_POLL_MS, zmq.POLLOUT):
                if stopped():
                    return None
                if time.monotonic() >= deadline:
                    raise expired("reachable")
                report()
            try:
                sock.send_multipart(hello(role, name), flags=zmq.NOBLOCK)
                break
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise expired("reachable") from None
                time.sleep(_POLL_MS / 1000)
        while not stopped():
            left = deadline - time.monotonic()
            if left <= 0:
                raise expired("answered")
            if not sock.poll(int(min(left, _POLL_MS / 1000) * 1000) + 1, zmq.POLLIN):
                report()
                continue
            try:
                message = protocol.decode(sock.recv_multipart(copy=False))
            except ProtocolError as exc:
                raise RemoteError(f"the peer at {address} speaks another protocol: "
                                  f"{exc}") from None
            if message.type == answer:
                return message
            if message.type == "refused":
                raise Refused(f"the dispatcher at {address} refused this {role}: "
                              f"{message['reason']}")
            if message.type == "error" and role == "status":
                raise Refused(f"the dispatcher at {address} refused: {message['message']}")
            on_other(message)
        return None
    finally:
        watch.close()
