"""Local worker processes: start N, restart the ones that crash, stop them all.

Each worker is ``python -m augserver worker --connect ADDR`` in its own process (on Linux it
gets SIGTERM when the supervising process dies, so no orphan outlives a killed dispatcher). A
worker that
exits is logged with its exit status and started again, after a delay that doubles (up to
:data:`MAX_DELAY`) while it keeps dying young; one that exits with
:data:`augserver.worker.EXIT_FATAL` (refused by the dispatcher, unusable job) is not restarted.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from augserver.worker import EXIT_FATAL

log = logging.getLogger("augserver.supervisor")

MIN_DELAY = 0.5
MAX_DELAY = 30.0
HEALTHY_AFTER = 10.0
"""A worker that ran this many seconds died of something other than its start-up."""


@dataclass
class Slot:
    """One supervised worker: its process (None while waiting to restart) and its backoff."""

    number: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float = 0.0
    delay: float = MIN_DELAY
    fatal: bool = False


class Supervisor:
    """Keeps ``count`` local workers connected to ``connect`` alive until :meth:`stop`."""

    def __init__(
        self, connect: str, count: int, log_level: str = "INFO", extra: Sequence[str] = ()
    ) -> None:
        """``extra``: more ``augserver worker`` arguments (``--key``, ``--server-key``)."""
        self.connect = connect
        self.command = [sys.executable, "-m", "augserver", "worker", "--connect", connect,
                        "--log-level", log_level, *extra]
        self.slots = [Slot(i) for i in range(count)]
        self.stopped = False

    def start(self) -> None:
        """Start every worker."""
        for slot in self.slots:
            self._spawn(slot)

    def poll(self) -> None:
        """Notice exited workers and restart them when their delay has passed."""
        if self.stopped:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is not None:
                code = slot.process.poll()
                if code is not None:
                    self._exited(slot, code, now)
            elif not slot.fatal and now >= slot.restart_at:
                self._spawn(slot)

    @property
    def alive(self) -> int:
        """Workers running now."""
        return sum(s.process is not None and s.process.poll() is None for s in self.slots)

    @property
    def finished(self) -> bool:
        """True when every worker stopped for good (fatal exits)."""
        return all(s.fatal for s in self.slots)

    def pids(self) -> list[int]:
        """Process ids of the running workers."""
        return [s.process.pid for s in self.slots if s.process is not None]

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every worker, SIGKILL those still running after ``grace`` seconds."""
        self.stopped = True
        running = [s.process for s in self.slots if s.process is not None]
        log.info("stopping %d local workers", len(running))
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d ignored SIGTERM; killing it", process.pid)
                process.kill()
                process.wait()
        for slot in self.slots:
            slot.process = None

    def _spawn(self, slot: Slot) -> None:
        slot.process = subprocess.Popen(self.command, preexec_fn=dies_with_parent())
        slot.started = time.monotonic()
        log.info("started local worker %d (pid %d) -> %s", slot.number, slot.process.pid,
                 self.connect)

    def _exited(self, slot: Slot, code: int, now: float) -> None:
        assert slot.process is not None
        pid, slot.process = slot.process.pid, None
        if code == EXIT_FATAL:
            slot.fatal = True
            log.error("local worker %d (pid %d) stopped for good (exit %d); not restarting",
                      slot.number, pid, code)
            return
        slot.delay = MIN_DELAY if now - slot.started >= HEALTHY_AFTER else min(
            slot.delay * 2, MAX_DELAY)
        slot.restart_at = now + slot.delay
        log.warning("local worker %d (pid %d) died with %s; restarting in %.1f s",
                    slot.number, pid, describe_exit(code), slot.delay)


def dies_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` that has Linux send the child SIGTERM when
    its parent dies (no orphans); None elsewhere."""
    return _die_with_parent if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent dies."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def describe_exit(code: int) -> str:
    """``exit status 1`` or ``signal SIGKILL`` for a Popen return code."""
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"
