"""``augserver status``: ask a dispatcher for its statistics and show them."""

from __future__ import annotations

import zmq

from augserver import session
from augserver.errors import ProtocolError, RemoteError, SessionTimeout
from augserver.security import ClientKeys
from augserver.stats import DispatcherStats, Scaling
from augserver.text import render_table


class StatusError(RemoteError):
    """No usable answer from the dispatcher (the message says why)."""


def request_status(
    connect: str, timeout: float = 5.0, keys: ClientKeys | None = None
) -> DispatcherStats:
    """The dispatcher's statistics.

    ``keys``: CURVE keys for a dispatcher with CURVE on. Raises :class:`StatusError` when
    nothing answers at ``connect`` within ``timeout`` seconds or the answer is not a status.
    """
    context = zmq.Context()
    try:
        sock = session.dealer(context, connect, keys, immediate=True)
    except ValueError as exc:
        context.term()
        raise StatusError(str(exc)) from None
    try:
        answer = session.handshake(sock, "status", "status", connect, timeout,
                                   curve=keys is not None)
        assert answer is not None  # never stopped
        return DispatcherStats.from_dict(answer["stats"])
    except (SessionTimeout, RemoteError, ProtocolError) as exc:
        raise StatusError(str(exc)) from None
    finally:
        sock.close(linger=0)
        context.term()


def format_status(stats: DispatcherStats) -> str:
    """A human-readable report of ``stats``: job, workers, clients and streams, counters."""
    config = stats.config
    lines = [
        f"dispatcher {stats.address}  up {stats.uptime_s:.0f} s  "
        f"dataset {config.get('dataset', '?')} ({stats.dataset_len} samples)",
        f"job: preprocess {config.get('preprocess')}  jsd {config.get('jsd')}  "
        f"batch {config.get('batch_size')}  seed {config.get('seed')}  "
        f"error_policy {config.get('error_policy')}",
        "",
    ]
    workers = stats.workers
    warming = sum(w.state == "warming" for w in workers)
    lines.append(f"workers: {len(workers)}" + (f" ({warming} warming up)" if warming else ""))
    if workers:
        lines += render_table(
            ["name", "state", "tasks_done", "samples/s", "in_flight", "free_slots",
             "last_seen_s"],
            [[w.name, w.state, w.tasks_done, f"{w.samples_per_s:.1f}", w.in_flight,
              w.free_slots, f"{w.last_seen_s_ago:.1f}"] for w in workers],
        )
    streams = stats.streams
    lines += ["", f"clients: {len(stats.clients)}  streams: {len(streams)}"]
    if streams:
        lines += render_table(
            ["client", "stream", "epoch", "rank", "path", "delivered", "credits", "in_flight",
             "pending", "batches/s", "samples/s", "data_wait"],
            [[name, s.stream[:12], s.epoch, f"{s.rank}/{s.world_size}", s.path,
              f"{s.delivered}/{s.num_batches}", s.credits, s.in_flight, s.pending,
              f"{s.batches_per_s:.2f}", f"{s.samples_per_s:.1f}", f"{s.data_wait:.0%}"]
             for name, s in streams],
        )
    lines += ["", _scaling_line(stats.scaling)]
    memory = stats.memory
    lines += ["", f"held for peers: {memory.held_bytes / 2**20:.1f} MiB of "
                  f"{memory.max_held_bytes / 2**20:.0f} MiB (limits.max_held_bytes); unread "
                  f"replies {memory.unread_reply_bytes / 2**10:.1f} KiB"]
    counters = vars(stats.counters)
    lines += ["", "counters: " + "  ".join(f"{k} {v}" for k, v in sorted(counters.items()))]
    if stats.problems:
        lines += ["", "problems:", *(f"  {problem}" for problem in stats.problems)]
    failures = stats.recent_failures
    if failures:
        lines += ["", f"recent failed samples ({len(failures)}, newest last):"]
        lines += [f"  {f.index}  {f.path}: {f.error}" for f in failures[-10:]]
    return "\n".join(lines)


def _scaling_line(scaling: Scaling) -> str:
    """One line: consumption, worst data-wait and workers needed (see augserver.scaling)."""
    return (
        f"scaling: consumption {scaling.consumption_samples_per_s:.1f} samples/s  "
        f"demand {scaling.demand_samples_per_s:.1f}  "
        f"per worker {scaling.worker_samples_per_s:.1f}  "
        f"data_wait {scaling.data_wait:.0%} (threshold {scaling.wait_threshold:.0%})  "
        f"workers {scaling.workers}  workers_needed {scaling.workers_needed}"
    )
