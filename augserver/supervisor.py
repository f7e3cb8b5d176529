"""Local worker processes: start N, restart the ones that crash, stop them all.

Each worker is ``python -m augserver worker --connect ADDR`` in its own process (on Linux it
gets SIGTERM when the supervising process dies, so no orphan outlives a killed dispatcher). A
worker that
exits is logged with its exit status and started again, after a delay that doubles (up to
:data:`MAX_DELAY`) while it keeps dying young; one that exits with
:data:`augserver.worker.EXIT_FATAL` (refused by the dispatcher, unusable job) is not restarted.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import augserver
from augserver.worker import EXIT_FATAL

log = logging.getLogger("augserver.supervisor")

MIN_DELAY = 0.5
MAX_DELAY = 30.0
HEALTHY_AFTER = 10.0
"""A worker that ran this many seconds died of something other than its start-up."""
LAST_WORDS = 40
"""Lines of a worker's error output kept to say why it died."""
_CRASH = re.compile(r"Fatal Python error: (Segmentation fault|Bus error|Aborted|"
                    r"Floating.point exception|Illegal instruction)")
"""The first line of faulthandler's report of a fatal signal."""
LAST_WORDS_SECONDS = 10.0
"""Only what a worker printed this many seconds before it exited is quoted as the reason."""


@dataclass
class Slot:
    """One supervised worker: its process (None while waiting to restart) and its backoff."""

    number: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float = 0.0
    delay: float = MIN_DELAY
    fatal: bool = False
    young_deaths: int = 0  # exits in a row before HEALTHY_AFTER seconds
    last_words: deque[tuple[float, str]] = field(
        default_factory=lambda: deque(maxlen=LAST_WORDS))  # (monotonic time, line)
    last_exit: str = ""
    reason: str = "it printed nothing"


class Supervisor:
    """Keeps ``count`` local workers connected to ``connect`` alive until :meth:`stop`."""

    def __init__(
        self, connect: str, count: int, log_level: str = "INFO", extra: Sequence[str] = ()
    ) -> None:
        """``extra``: more ``augserver worker`` arguments (``--key``, ``--server-key``)."""
        self.connect = connect
        self.command, self.env = augserver_command(
            "worker", "--connect", connect, "--log-level", log_level, *extra)
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

    def problems(self) -> list[str]:
        """A sentence for each worker that keeps dying young or stopped for good, with the
        last line of its error output (for ``status``)."""
        found = []
        for s in self.slots:
            if s.fatal or s.young_deaths >= 2:
                what = ("stopped for good" if s.fatal
                        else f"keeps dying at start ({s.young_deaths} times in a row)")
                found.append(f"local worker {s.number} {what}, {s.last_exit}: {_reason(s)}")
        return found

    def _spawn(self, slot: Slot) -> None:
        slot.process = subprocess.Popen(self.command, env=self.env, stderr=subprocess.PIPE,
                                        preexec_fn=dies_with_parent())
        slot.last_words.clear()
        threading.Thread(target=_relay, args=(slot.process.stderr, slot.last_words),
                         name=f"augserver-worker-{slot.number}-stderr", daemon=True).start()
        slot.started = time.monotonic()
        log.info("started local worker %d (pid %d) -> %s", slot.number, slot.process.pid,
                 self.connect)

    def _exited(self, slot: Slot, code: int, now: float) -> None:
        assert slot.process is not None
        process, slot.process = slot.process, None
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(1)  # let the relay thread read its last words
        time.sleep(0.05)
        slot.last_exit = describe_exit(code)
        slot.reason = last_words(slot.last_words, time.monotonic())
        if code == EXIT_FATAL:
            slot.fatal = True
            log.error("local worker %d (pid %d) stopped for good (exit %d); not restarting: %s",
                      slot.number, process.pid, code, _reason(slot))
            return
        young = now - slot.started < HEALTHY_AFTER
        slot.young_deaths = slot.young_deaths + 1 if young else 0
        slot.delay = min(slot.delay * 2, MAX_DELAY) if young else MIN_DELAY
        slot.restart_at = now + slot.delay
        log.log(logging.ERROR if slot.young_deaths >= 2 else logging.WARNING,
                "local worker %d (pid %d) died with %s%s; restarting in %.1f s: %s",
                slot.number, process.pid, slot.last_exit,
                f", {slot.young_deaths} times in a row at start" if slot.young_deaths >= 2
                else "", slot.delay, _reason(slot))


def _relay(pipe: IO[bytes], last_words: deque[tuple[float, str]]) -> None:
    """Forward a worker's error output to ours, keeping its last lines."""
    out = sys.stderr.buffer
    for line in iter(pipe.readline, b""):
        with contextlib.suppress(OSError, ValueError):
            out.write(line)
            out.flush()
        text = line.decode(errors="replace").strip()
        if text:
            last_words.append((time.monotonic(), text))
    pipe.close()


def _reason(slot: Slot) -> str:
    """Why a worker stopped, as :func:`last_words` found it when it exited."""
    return slot.reason


def last_words(lines: Sequence[tuple[float, str]], died: float,
               window: float = LAST_WORDS_SECONDS) -> str:
    """What to quote for a worker that exited at ``died``, from its ``(time, line)`` error
    output: a crash report's first line and the innermost frame of the crashing thread
    (``faulthandler``'s report), else the last line printed in the ``window`` seconds before
    it exited; never an older line, which would name some earlier, unrelated event."""
    recent = [text for at, text in lines if at >= died - window]
    if not recent:
        return f"it printed nothing in its last {window:g} s"
    crash = next((i for i, text in enumerate(recent) if _CRASH.match(text)), None)
    if crash is None:
        return f"its last line: {recent[-1]}"
    report = recent[crash + 1:]
    current = next((i for i, t in enumerate(report) if t.startswith("Current thread")), 0)
    frames = [t for t in report[current:] if t.startswith("File ")]
    where = f"; in {frames[0]}" if frames else ""
    return f"{recent[crash]}{where}"


def augserver_command(*args: str) -> tuple[list[str], dict[str, str]]:
    """``python -P -m augserver ARGS`` and its environment. The child imports this very
    augserver (its folder goes first on ``PYTHONPATH``), never a folder named ``augserver`` that
    happens to be in the working directory (``-P``: the working directory is not put on
    ``sys.path``), so workers start from any folder."""
    root = str(Path(augserver.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return [sys.executable, "-P", "-m", "augserver", *args], env


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
