"""Prometheus metrics: the dispatcher's stats as text exposition on ``http://HOST:PORT/metrics``.

The dispatcher's loop is single-threaded and owns its state. It refreshes a snapshot (a new
:class:`~augserver.stats.DispatcherStats`, swapped in by one assignment) on every housekeeping
pass; the HTTP server runs in a daemon thread and only ever reads the latest snapshot, so a
scrape never touches live state.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from augserver.addresses import parse_host_port
from augserver.stats import Counters, DispatcherStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

def escape(value: object) -> str:
    """A label value escaped for the text format (backslash, double quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


_Samples = list[tuple[dict[str, Any], float]]


def _family(name: str, kind: str, text: str, samples: _Samples) -> list[str]:
    lines = [f"# HELP augserver_{name} {text}", f"# TYPE augserver_{name} {kind}"]
    for labels, value in samples:
        tags = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
        lines.append(f"augserver_{name}{{{tags}}} {_number(value)}" if tags
                     else f"augserver_{name} {_number(value)}")
    return lines


def render(stats: DispatcherStats) -> str:
    """``stats`` in the text exposition format; every :class:`~augserver.stats.Counters`
    field is a ``_total`` counter."""
    workers, streams, scaling = stats.workers, stats.streams, stats.scaling
    lines = _family("up", "gauge", "1 while the dispatcher serves.", [({}, 1)])
    lines += _family("uptime_seconds", "gauge", "Seconds since the dispatcher started.",
                     [({}, float(stats.uptime_s))])
    lines += _family("workers", "gauge", "Workers connected.", [({}, len(workers))])
    lines += _family("workers_warming", "gauge",
                     "Workers connected that are still loading their kernels (no task yet).",
                     [({}, sum(w.state == "warming" for w in workers))])
    lines += _family("worker_samples_per_second", "gauge",
                     "Samples a worker made per second over the recent window.",
                     [({"worker": w.name}, float(w.samples_per_s)) for w in workers])
    lines += _family("streams", "gauge", "Client streams open.", [({}, len(streams))])
    for key, name, text in (
        ("samples_per_s", "stream_samples_per_second", "Samples a stream received per second."),
        ("batches_per_s", "stream_batches_per_second", "Batches a stream received per second."),
        ("data_wait", "stream_data_wait_ratio",
         "Fraction of recent time the stream's client had room for every batch it asked for "
         "and none had arrived (its trainer waited on workers)."),
    ):
        lines += _family(name, "gauge", text, [
            ({"client": client, "stream": s.stream}, float(getattr(s, key)))
            for client, s in streams
        ])
    lines += _family("data_wait_ratio", "gauge", "Largest data-wait ratio of any stream.",
                     [({}, float(scaling.data_wait))])
    lines += _family("consumption_samples_per_second", "gauge",
                     "Samples per second all streams received.",
                     [({}, float(scaling.consumption_samples_per_s))])
    lines += _family("workers_needed", "gauge",
                     "Workers estimated to keep every trainer fed (the current count unless "
                     "data-wait is above the threshold).",
                     [({}, int(scaling.workers_needed))])
    memory = stats.memory
    lines += _family("held_bytes", "gauge",
                     "Bytes of batches in flight or sent and not yet shown read, all peers.",
                     [({}, int(memory.held_bytes))])
    lines += _family("max_held_bytes", "gauge", "limits.max_held_bytes.",
                     [({}, int(memory.max_held_bytes))])
    lines += _family("unread_reply_bytes", "gauge",
                     "Bytes of replies sent and not yet shown read, all peers.",
                     [({}, int(memory.unread_reply_bytes))])
    for key, value in vars(stats.counters).items():
        lines += _family(f"{key}_total", "counter", Counters.help(key), [({}, int(value))])
    return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves ``render(snapshot())`` at ``/metrics`` from a daemon thread.

    ``snapshot`` must be safe to call from another thread (it returns the latest stats record
    or None before the first one). ``address`` is ``(host, port)`` as bound (port 0 picks one).
    """

    def __init__(self, bind: str, snapshot: Callable[[], DispatcherStats | None]) -> None:
        host, port = parse_host_port(bind)
        handler = type("Handler", (_Handler,), {"snapshot": staticmethod(snapshot)})
        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        try:
            self.server = server_class((host, port), handler)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {bind}: {exc.strerror or exc}") from None
        self.server.daemon_threads = True
        self.address: tuple[str, int] = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, name="augserver-metrics",
                                       daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    snapshot: Callable[[], DispatcherStats | None]

    def do_GET(self) -> None:  # http.server's name
        if self.path.split("?", 1)[0] != "/metrics":
            self._reply(404, "text/plain; charset=utf-8", b"not found; try /metrics\n")
            return
        stats = self.snapshot()
        if stats is None:
            self._reply(503, "text/plain; charset=utf-8", b"no statistics yet\n")
            return
        self._reply(200, CONTENT_TYPE, render(stats).encode())

    def _reply(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""
