"""``augserver status``: ask a dispatcher for its statistics and show them."""

from __future__ import annotations

import time
from typing import Any

import zmq

from augserver import protocol
from augserver.security import ClientKeys


class StatusError(RuntimeError):
    """No usable answer from the dispatcher (the message says why)."""


def request_status(
    connect: str, timeout: float = 5.0, keys: ClientKeys | None = None
) -> dict[str, Any]:
    """The dispatcher's ``stats`` (see :meth:`augserver.dispatcher.Dispatcher.stats`).

    ``keys``: CURVE keys for a dispatcher with CURVE on. Raises :class:`StatusError` when
    nothing answers at ``connect`` within ``timeout`` seconds or the answer is not a status.
    """
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    if keys is not None:
        keys.apply(sock)
    try:
        sock.connect(connect)
        deadline = time.monotonic() + timeout
        hello = protocol.encode(
            "hello", role="status", protocol=protocol.PROTOCOL_VERSION, versions={},
            name="status",
        )
        if not sock.poll(_ms_left(deadline), zmq.POLLOUT):
            hint = ("is it up? CURVE keys refused? check --key, --server-key, the allow-list"
                    if keys is not None else "is it up? with CURVE on: --key, --server-key")
            raise StatusError(f"no dispatcher reachable at {connect} within {timeout:g} s "
                              f"({hint})")
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
            ["client", "stream", "epoch", "rank", "delivered", "credits", "in_flight", "pending",
             "batches/s", "samples/s", "data_wait"],
            [[name, s["stream"][:12], s["epoch"], f"{s['rank']}/{s['world_size']}",
              f"{s['delivered']}/{s['num_batches']}", s["credits"], s["in_flight"],
              s["pending"], f"{s.get('batches_per_s', 0):.2f}",
              f"{s.get('samples_per_s', 0):.1f}", f"{s.get('data_wait', 0):.0%}"]
             for name, s in streams],
        )
    if "scaling" in stats:
        lines += ["", _scaling_line(stats["scaling"])]
    counters = stats.get("counters", {})
    lines += ["", "counters: " + "  ".join(f"{k} {v}" for k, v in sorted(counters.items()))]
    failures = stats.get("recent_failures", [])
    if failures:
        lines += ["", f"recent failed samples ({len(failures)}, newest last):"]
        lines += [f"  {f['index']}  {f['path']}: {f['error']}" for f in failures[-10:]]
    return "\n".join(lines)


def _scaling_line(scaling: dict[str, Any]) -> str:
    """One line: consumption, worst data-wait and workers needed (see augserver.scaling)."""
    return (
        f"scaling: consumption {scaling['consumption_samples_per_s']:.1f} samples/s  "
        f"demand {scaling['demand_samples_per_s']:.1f}  "
        f"per worker {scaling['worker_samples_per_s']:.1f}  "
        f"data_wait {scaling['data_wait']:.0%} (threshold {scaling['wait_threshold']:.0%})  "
        f"workers {scaling['workers']}  workers_needed {scaling['workers_needed']}"
    )


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells]
