"""The scaling signal: each stream's consumption and data-wait, and the workers a job needs.

Data-wait. A client grants credits as its trainer consumes batches, so a stream's credits are
the free room in the client's prefetch buffer (plus grants on their way). A stream's *window*
is the most credits it has had: the client's whole prefetch window. While ``credits > 0`` and
``credits == window`` the client has room for every batch it asked for and holds none (the
dispatcher relays a batch the moment a worker returns it, so nothing is ever ready and
unsent): its trainer is waiting on the workers. The stream's ``data_wait`` is the fraction of
the last :data:`WINDOW` seconds (or of its life, if shorter) spent in that state. With
``prefetch=1`` this is exactly "the client had credit and no batch was ready"; with a larger
prefetch it does not count the time a batch is being made while the trainer still eats from
its buffer, so a job whose workers just keep pace reads near 0, not near 1.

Workers needed. With ``r_s`` a stream's consumption (samples/s) and ``w_s`` its data-wait, the
trainer would consume ``r_s / max(1 - w_s, MIN_BUSY)`` if it never waited (it computes during
``1 - w_s`` of the time). With ``p`` the mean samples/s of the workers that made samples in the
window and ``n`` the current worker count::

    demand         = sum_s r_s / max(1 - w_s, MIN_BUSY)
    workers_needed = max(n, ceil(demand / p))   if max_s w_s > WAIT_THRESHOLD
                   = n                          otherwise

(``max(n, 1)`` when starved with no measured worker rate.) Dividing plain consumption by
``p`` would return ``n`` whenever the trainer starves, since it then consumes exactly what the
workers make; ``MIN_BUSY`` bounds one estimate to 10x the consumption, so an autoscaler steps
up rather than jumps.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from augserver.stats import Scaling, StreamStats

WINDOW = 10.0
"""Seconds over which consumption and data-wait are measured."""
WAIT_THRESHOLD = 0.2
"""Data-wait above which more workers are asked for."""
MIN_BUSY = 0.1
"""Smallest busy fraction used to turn consumption into demand."""
_MIN_SPAN = 0.25  # seconds: a younger stream's rates are measured over this much


@dataclass(eq=False)
class StreamMeter:
    """Consumption and data-wait of one stream over the last :data:`WINDOW` seconds."""

    opened: float = field(default_factory=time.monotonic)
    window: int = 0  # most credits seen: the client's prefetch window
    starved_since: float | None = None
    waits: deque[tuple[float, float]] = field(default_factory=deque)  # closed starved spans
    sent: deque[tuple[float, int]] = field(default_factory=deque)  # (time, samples)

    def credits(self, now: float, credits: int) -> None:
        """Note the stream's credits after they changed."""
        self.window = max(self.window, credits)
        starved = 0 < credits >= self.window
        if starved and self.starved_since is None:
            self.starved_since = now
        elif not starved and self.starved_since is not None:
            self.waits.append((self.starved_since, now))
            self.starved_since = None
        self._prune(now)

    def delivered(self, now: float, samples: int, credits: int) -> None:
        """Note a batch of ``samples`` sent, leaving ``credits``."""
        self.sent.append((now, samples))
        self.credits(now, credits)

    def _prune(self, now: float) -> None:
        while self.waits and self.waits[0][1] < now - WINDOW:
            self.waits.popleft()
        while self.sent and self.sent[0][0] < now - WINDOW:
            self.sent.popleft()

    def stats(self, now: float) -> dict[str, float]:
        """``batches_per_s``, ``samples_per_s`` and ``data_wait`` (0..1) at ``now``."""
        self._prune(now)
        start = max(self.opened, now - WINDOW)
        span = max(now - start, _MIN_SPAN)
        spans = list(self.waits)
        if self.starved_since is not None:
            spans.append((self.starved_since, now))
        waited = sum(max(0.0, end - max(begin, start)) for begin, end in spans)
        return {
            "batches_per_s": round(len(self.sent) / span, 3),
            "samples_per_s": round(sum(n for _, n in self.sent) / span, 1),
            "data_wait": round(min(1.0, waited / span), 3),
        }


def estimate(worker_rates: list[float], streams: list[StreamStats]) -> Scaling:
    """The job's scaling signal from the workers' samples/s and the streams' stats."""
    workers = len(worker_rates)
    busy = [r for r in worker_rates if r > 0]
    per_worker = sum(busy) / len(busy) if busy else 0.0
    wait = max((s.data_wait for s in streams), default=0.0)
    demand = sum(s.samples_per_s / max(1.0 - s.data_wait, MIN_BUSY) for s in streams)
    if wait <= WAIT_THRESHOLD:
        needed = workers
    elif per_worker > 0:
        needed = max(workers, math.ceil(demand / per_worker))
    else:
        needed = max(workers, 1)
    return Scaling(
        workers=workers,
        workers_needed=needed,
        data_wait=wait,
        wait_threshold=WAIT_THRESHOLD,
        consumption_samples_per_s=round(sum(s.samples_per_s for s in streams), 1),
        demand_samples_per_s=round(demand, 1),
        worker_samples_per_s=round(per_worker, 1),
    )
