"""Flood benchmark: the dispatcher's resident memory while peers ask and never read.

Each flood runs against a fresh ``augserver serve`` (in a subprocess) fed by no-op workers that
answer every task at once, so batches are ready as fast as the dispatcher can relay them:

- ``status``: one socket sends ``hello`` as the status role as fast as it can, reading nothing;
- ``ping``: one client pings as fast as it can, reading nothing;
- ``streams``: one client opens 8 streams with huge credits, then keeps granting more (credits
  it cannot have earned: it reads nothing), as fast as it can.

Prints, per flood, the dispatcher's RSS before, at its peak and at the end, the messages the
flooder sent, and what ``status`` reports the dispatcher holds (``memory.held_bytes``) against
its budgets. The figures hold if RSS stays flat: peak minus before within the byte budgets.

    python bench/floods.py [--seconds 10] [--prefetch-mib 64] [--held-mib 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service import Server, noop_fleet

from augserver import protocol
from augserver.status import request_status

FLOOD_STREAMS = 8
HUGE_CREDITS = 1 << 30


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _deaf_socket(context: zmq.Context, address: str) -> zmq.Socket:
    """A DEALER that takes in as little as ZeroMQ lets it: what it does not read stays with the
    sender."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(address)
    return sock


def _hello(role: str) -> list[bytes]:
    return protocol.encode("hello", role=role, protocol=protocol.PROTOCOL_VERSION,
                           versions=protocol.pixel_versions() if role != "status" else {},
                           name=f"flood-{role}")


def status_flood(sock: zmq.Socket, until: float) -> int:
    """``hello`` as the status role until ``until``; returns messages sent."""
    hello, sent = _hello("status"), 0
    while time.monotonic() < until:
        sock.send_multipart(hello)
        sent += 1
    return sent


def ping_flood(sock: zmq.Socket, until: float) -> int:
    """A client's ``hello`` (its welcome read), then pings until ``until``."""
    sock.send_multipart(_hello("client"))
    sock.recv_multipart()
    ping, sent = protocol.encode("ping"), 0
    while time.monotonic() < until:
        sock.send_multipart(ping)
        sent += 1
    return sent


def streams_flood(sock: zmq.Socket, until: float) -> int:
    """A client's ``hello``, :data:`FLOOD_STREAMS` streams opened with huge credits, then
    grants on every stream until ``until``."""
    sock.send_multipart(_hello("client"))
    sock.recv_multipart()
    sent = 0
    for epoch in range(FLOOD_STREAMS):
        sock.send_multipart(protocol.encode(
            "open", stream=f"s{epoch}", epoch=epoch, rank=0, world_size=1, ordered=False,
            credits=HUGE_CREDITS, done=[], skip=None))
        sent += 1
    grants = [protocol.encode("credit", stream=f"s{e}", n=HUGE_CREDITS)
              for e in range(FLOOD_STREAMS)]
    while time.monotonic() < until:
        for grant in grants:
            sock.send_multipart(grant)
        sent += FLOOD_STREAMS
        time.sleep(0.001)
    return sent


FLOODS: dict[str, Callable[[zmq.Socket, float], int]] = {
    "status": status_flood, "ping": ping_flood, "streams": streams_flood,
}


@dataclass
class FloodResult:
    flood: str
    sent: int
    rss_before_mib: float
    rss_peak_mib: float
    rss_end_mib: float
    held_mib: float
    replies_dropped: int

    @property
    def growth_mib(self) -> float:
        return self.rss_peak_mib - self.rss_before_mib


def write_job(folder: Path, prefetch_bytes: int, held_bytes: int, samples: int = 4096) -> Path:
    """A 224 px JSD job over ``samples`` random images (no-op workers never look at them)."""
    rng = np.random.default_rng(0)
    data = folder / "flood.npz"
    np.savez(data, x=rng.integers(0, 256, (samples, 8, 8, 3), dtype=np.uint8),
             y=rng.integers(0, 10, samples))
    config = folder / "flood.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": {"format": "npz", "path": str(data)}, "preprocess": "imagenet",
        "batch_size": 8, "jsd": True,
        "limits": {"max_prefetch_bytes": prefetch_bytes, "max_held_bytes": held_bytes},
    }))
    return config


def run_flood(config: Path, flood: str, seconds: float, workers: int = 4) -> FloodResult:
    """One flood against a fresh dispatcher; RSS sampled every 50 ms while it runs."""
    with Server(config, 0) as server, noop_fleet(server.address, workers) as context:
        request_status(server.address, 30.0)  # up
        time.sleep(0.5)
        before = rss_mib(server.process.pid)
        sock = _deaf_socket(context, server.address)
        sent: list[int] = []
        until = time.monotonic() + seconds
        thread = threading.Thread(target=lambda: sent.append(FLOODS[flood](sock, until)))
        thread.start()
        peak = before
        while thread.is_alive() or time.monotonic() < until + 1.0:
            peak = max(peak, rss_mib(server.process.pid))
            time.sleep(0.05)
        thread.join()
        stats = request_status(server.address, 30.0)
        end = rss_mib(server.process.pid)
        sock.close(linger=0)
    return FloodResult(flood, sent[0], before, max(peak, end), end,
                       stats.memory.held_bytes / 2**20, stats.counters.replies_dropped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--prefetch-mib", type=int, default=64,
                        help="limits.max_prefetch_bytes, in MiB")
    parser.add_argument("--held-mib", type=int, default=256, help="limits.max_held_bytes, in MiB")
    parser.add_argument("--floods", default=",".join(FLOODS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = write_job(Path(tmp), args.prefetch_mib << 20, args.held_mib << 20)
        print(f"budgets: {args.prefetch_mib} MiB per client, {args.held_mib} MiB in all; "
              f"{args.seconds:g} s per flood")
        print(f"{'flood':8} {'sent':>10} {'RSS before':>11} {'peak':>8} {'end':>8} "
              f"{'growth':>8} {'held':>8} {'dropped':>8}")
        for flood in args.floods.split(","):
            r = run_flood(config, flood, args.seconds)
            print(f"{r.flood:8} {r.sent:10d} {r.rss_before_mib:9.1f}MB {r.rss_peak_mib:6.1f}MB "
                  f"{r.rss_end_mib:6.1f}MB {r.growth_mib:6.1f}MB {r.held_mib:6.1f}MB "
                  f"{r.replies_dropped:8d}")


if __name__ == "__main__":
    main()
