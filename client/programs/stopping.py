"""Stopping a training run only between steps, on every rank at the same step.

A checkpoint must hold the state of the last completed step: weights, optimizer, schedule and
the loader's position agreeing with each other. A stop that lands in the middle of a step (a
signal raised inside the forward pass, or between the optimizer's update and the scheduler's)
would save a half-made step, or count a batch the model never learnt from. So signals only ask
(:class:`StopRequest`), and the training loop decides at its step boundaries, where every rank
says what it has (:class:`RankAgreement`): all ranks then take the same step, or all stop
before it, each leaving the batch it holds to the resumed run.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

STEP, END, STOP, FAILED = 0, 1, 2, 3
"""What a rank has at a step boundary: a batch, the epoch's end, a stop request, a failed
stream. The run does what the highest of them says."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, to unwind as Ctrl-C does."""


class StopRequest:
    """SIGINT and SIGTERM during training. The first one asks for a stop: the loop stops
    before the next step, and a wait for data ends at once (``loader.interrupt()``, which
    loses nothing); a second one stops at once (:class:`KeyboardInterrupt`, or
    :class:`Terminated` for SIGTERM) without saving."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """The conventional status: 143 after SIGTERM, 130 after Ctrl-C."""
        return 143 if self.signum == signal.SIGTERM else 130

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle both signals while the block runs (only in the main thread, where Python
        delivers them); the previous handlers come back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.signum = signum
        self.loader.interrupt()  # sets a flag: nothing here that could block


class RankAgreement:
    """The ranks' verdict at each step boundary: the highest of what each has (:data:`STEP`,
    :data:`END`, :data:`STOP`, :data:`FAILED`). Under torch.distributed it is one all-reduce
    of a CPU integer over a gloo group of its own (no GPU synchronisation, whatever the
    training backend); alone, it is what this rank has."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None

    def verdict(self, mine: int) -> int:
        if self.group is None:
            return mine
        value = torch.tensor([mine], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return int(value.item())

    def reasons(self, mine: str | None) -> list[str]:
        """Every rank's reason for a stop (None where it had none), joined: ``rank R: ...``."""
        if self.group is None:
            return [mine] if mine else []
        every: list[str | None] = [None] * self.world_size
        dist.all_gather_object(every, mine, group=self.group)
        return [f"rank {rank}: {why}" for rank, why in enumerate(every) if why]
