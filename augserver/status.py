"""``augserver status``: ask a dispatcher for its statistics and show them."""

from __future__ import annotations

import time
from typing import Any

import zmq

from augserver import protocol


class StatusError(RuntimeError):
    """No usable answer from the dispatcher (the message says why)."""


def request_status(connect: str, timeout: float = 5.0) -> dict[str, Any]:
    """The dispatcher's ``stats`` (see :meth:`augserver.dispatcher.Dispatcher.stats`).

    Raises :class:`StatusError` when nothing answers at ``connect`` within ``timeout`` seconds
    or the answer is not a status.
    """
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    try:
        sock.connect(connect)
        deadline = time.monotonic() + timeout
        hello = protocol.encode(
            "hello", role="status", protocol=protocol.PROTOCOL_VERSION, versions={},
            name="status",
        )
        if not sock.poll(_ms_left(deadline), zmq.POLLOUT):
            raise StatusError(f"no dispatcher reachable at {connect} within {timeout:g} s")
        sock.send_multipart(hello)
        while sock.poll(_ms_left(deadline), zmq.POLLIN):
            try:
                message = protocol.decode(sock.recv_multipart(copy=False))
            except protocol.ProtocolError as exc:
                raise StatusError(f"the peer at {connect} speaks another protocol: {exc}") from None
            if message.type == "status":
                return message["stats"]
            if message.type in ("refused", "error"):
                reason = message["reason"] if message.type == "refused" else message["message"]
                raise StatusError(f"the dispatcher at {connect} refused: {reason}")
        raise StatusError(f"no dispatcher answered at {connect} within {timeout:g} s")
    finally:
        sock.close(linger=0)
        context.term()


def _ms_left(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000))


def format_status(stats: dict[str, Any]) -> str:
    """A human-readable report of ``stats``: job, workers, clients and streams, counters."""
    config = stats.get("config", {})
    lines = [
        f"dispatcher {stats.get('address', '?')}  up {stats.get('uptime_s', 0):.0f} s  "
        f"dataset {config.get('dataset', '?')} ({stats.get('dataset_len', '?')} samples)",
        f"job: preprocess {config.get('preprocess')}  jsd {config.get('jsd')}  "
        f"batch {config.get('batch_size')}  seed {config.get('seed')}  "
        f"error_policy {config.get('error_policy')}",
        "",
    ]
    workers = stats.get("workers", [])
    lines.append(f"workers: {len(workers)}")
    if workers:
        lines += _table(
            ["name", "tasks_done", "samples/s", "in_flight", "free_slots", "last_seen_s"],
            [[w["name"], w["tasks_done"], f"{w['samples_per_s']:.1f}", w["in_flight"],
              w.get("free_slots", "?"), f"{w['last_seen_s_ago']:.1f}"] for w in workers],
        )
    streams = [(c["name"], s) for c in stats.get("clients", []) for s in c["streams"]]
    lines += ["", f"clients: {len(stats.get('clients', []))}  streams: {len(streams)}"]
    if streams:
        lines += _table(
            ["client", "stream", "epoch", "rank", "delivered", "credits", "in_flight", "pending"],
            [[name, s["stream"][:12], s["epoch"], f"{s['rank']}/{s['world_size']}",
              f"{s['delivered']}/{s['num_batches']}", s["credits"], s["in_flight"],
              s["pending"]] for name, s in streams],
        )
    counters = stats.get("counters", {})
    lines += ["", "counters: " + "  ".join(f"{k} {v}" for k, v in sorted(counters.items()))]
    failures = stats.get("recent_failures", [])
    if failures:
        lines += ["", f"recent failed samples ({len(failures)}, newest last):"]
        lines += [f"  {f['index']}  {f['path']}: {f['error']}" for f in failures[-10:]]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells]
