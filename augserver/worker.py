"""A worker process: asks the dispatcher for tasks, makes AugMix batches, sends them back.

The conversation is in :mod:`augserver.protocol`. A worker holds no state the job depends on:
every sample's bytes come from ``sample_rng(seed, epoch, index)``, so any worker, or a retry,
produces the same batch.

Liveness, in both directions:

- The worker makes each batch on a thread of its own (:class:`Making`) while its own thread
  sends ``heartbeat`` every ``limits.heartbeat_interval`` seconds and answers the dispatcher,
  however long one sample takes. A sample still in the making after ``limits.sample_seconds``
  is reported failed with its path (``error_policy`` applies: a stand-in takes its place under
  ``skip``), the task is made again without it, and that sample is never tried again by this
  worker; its thread cannot be stopped and is left to finish. A second sample stuck while the
  first still runs makes the worker exit with :data:`EXIT_STUCK` (a supervisor restarts it).
- Images larger than ``limits.max_image_pixels`` are refused before they are decoded.
- The dispatcher answers every heartbeat. A worker that hears nothing from it for
  ``2 * heartbeat_interval * heartbeat_misses`` seconds, or receives ``reset``, closes its
  socket and says ``hello`` again on a fresh one, so a restarted dispatcher gets its workers
  back.
- Warm-up: the worker loads the compiled kernels (:mod:`augserver.kernels_cache`) on a thread
  while it connects and heartbeats, and says ``ready`` (asks for tasks) only once they are
  loaded; until then the dispatcher shows it as warming up and gives it no task.
- ``refused`` (a version mismatch), a config the worker cannot use or a dataset it cannot open
  are final: :func:`run_worker` logs the reason and returns :data:`EXIT_FATAL`.

Shared memory (:mod:`augserver.shm`): a task that names a slot of its trainer's arena is made
in the worker's own memory and written into that slot with one ``pwrite`` when this worker can
open the arena (same host, same shared-memory directory); the result then carries only labels
and indices. The worker never maps an arena, so nothing a trainer does to its file (shrink it,
replace it, close it mid-write) can fault the worker. Otherwise the views go over TCP as
always and the result says why (``unusable``; logged once per arena). A task made again after
a sample was abandoned never writes its slot, since the abandoned thread might (``dirty``).
The worker sweeps the directory every :data:`augserver.shm.SWEEP_SECONDS`, which removes the
arenas of trainers that died.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
from PIL import Image

from augserver import protocol, session
from augserver.augmix import augmix_views, sample_rng
from augserver.batch import INDICES_DTYPE
from augserver.config import JobConfig, Limits, config_from_dict
from augserver.datasets import Dataset, fingerprint_mismatch, open_dataset
from augserver.errors import ConfigError, DatasetError, RemoteError, SessionTimeout
from augserver.kernels_cache import KernelLoad, load_kernels
from augserver.preprocessing import preprocess
from augserver.security import ClientKeys
from augserver.shm import SWEEP_SECONDS, Attachments, ShmError, Slot, SlotWriter, shm_dir
from augserver.storage import store_unreachable

log = logging.getLogger("augserver.worker")

EXIT_FATAL = 3
"""Exit status of a worker that must not be restarted (refused, unusable config or dataset)."""
HANDSHAKE_TIMEOUT = 5.0
"""Seconds to wait for ``welcome`` before saying hello again on a fresh socket."""
_POLL_MS = 100
_BUSY_TICK = 0.025  # see busy_tick


class Reconnect(Exception):
    """The dispatcher asked for (``reset``) or needs (silence) a new handshake."""


class Fatal(Exception):
    """The worker must stop for good; the message says why."""


class Stuck(Exception):
    """A second sample ran past its limit while the first still runs: the worker exits (and is
    restarted) rather than pile up threads that cannot be stopped."""


EXIT_STUCK = 4
"""Exit status of a worker that left because samples got stuck (a supervisor restarts it)."""


@dataclass
class Job:
    """What a welcome gives a worker: the validated config and its view of the dataset."""

    config: JobConfig
    dataset: Dataset
    raw: dict[str, Any]


def worker_name() -> str:
    """``host:pid``, how the dispatcher and its status name this worker."""
    return f"{socket.gethostname()}:{os.getpid()}"


def busy_tick(limits: Limits) -> float:
    """Seconds between socket checks (heartbeats, incoming messages) while a task runs: 25 ms,
    or a quarter of the heartbeat interval if that is shorter. A check costs tens of
    microseconds, so one per 32x32 sample would cost a few percent of the worker's time."""
    return min(_BUSY_TICK, limits.heartbeat_interval / 4)


def make_batch(
    job: Job, epoch: int, indices: list[int], between: Callable[[int], None] = lambda i: None,
    refused: Mapping[int, str] | None = None, out: np.ndarray | None = None,
) -> tuple[list[np.ndarray], list[list[Any]]]:
    """The arrays of one task's result and its failures ``[[index, path, error], ...]``.

    Arrays: views, labels and indices as :mod:`augserver.batch` lays them out. A sample that
    cannot be made is reported in the failures and, under ``error_policy: skip``, replaced in
    its place by :func:`substitute`'s sample, so the batch keeps its size and every rank its
    batch count; the indices array names the sample actually delivered. A sample with no
    usable substitute is left out (the dispatcher then fails the stream). ``between(index)``
    runs before every sample is made (the worker times each one); ``refused`` maps the samples
    not to try at all (they took too long before) to the reason reported for them. ``out``:
    the ``views_shape(len(indices))`` array to make the views in (a shared-memory slot); the
    views returned are ``out`` itself unless samples are missing.
    """
    refused = refused or {}
    config, dataset = job.config, job.dataset
    dataset.prefetch([i for i in indices if i not in refused])
    views = config.layout.empty_views(len(indices)) if out is None else out
    done = np.empty(len(indices), INDICES_DTYPE)
    failed: list[list[Any]] = []
    n = 0
    for index in indices:
        between(index)
        try:
            if index in refused:
                raise DatasetError(_path(dataset, index), index, refused[index])
            _fill_sample(job, epoch, index, views[:, n])
            made: int | None = index
        except Exception as exc:  # reported with its path; never kills the worker
            failed.append(_failure(dataset, index, exc))
            # With the dataset's store gone, a stand-in cannot be read either: do not wait
            # for SUBSTITUTE_TRIES more reads to time out.
            made = (None if store_unreachable(exc) else
                    substitute(job, epoch, index, views[:, n], between, refused))
        if made is None:
            continue
        done[n] = made
        n += 1
    if n < len(indices):
        views, done = np.ascontiguousarray(views[:, :n]), done[:n]
    return [views, dataset.labels(done), done], failed


SUBSTITUTE_TRIES = 16
"""How many following samples :func:`substitute` tries."""


def substitute(job: Job, epoch: int, index: int, slot: np.ndarray,
               between: Callable[[int], None] = lambda i: None,
               refused: Mapping[int, str] | None = None) -> int | None:
    """Under ``error_policy: skip``, fill ``slot`` with the stand-in for sample ``index``,
    which could not be made: the first of the next :data:`SUBSTITUTE_TRIES` samples in dataset
    order (``index + 1``, ``index + 2``, ... wrapping around) that can be made, exactly as that
    sample is made in this epoch. The choice depends on the dataset alone, so it is the same
    for any worker and worker count. None when the policy is not skip or none can be made."""
    if job.config.error_policy != "skip":
        return None
    n = len(job.dataset)
    for k in range(1, min(SUBSTITUTE_TRIES, n - 1) + 1):
        candidate = (index + k) % n
        if refused and candidate in refused:
            continue
        between(candidate)
        try:
            _fill_sample(job, epoch, candidate, slot)
        except Exception as exc:  # that one is reported when its own turn comes
            if store_unreachable(exc):
                return None
            continue
        return candidate
    return None


def _path(dataset: Dataset, index: int) -> str:
    try:
        return dataset.path(index)
    except Exception:
        return f"<index {index} of {len(dataset)}>"


def _failure(dataset: Dataset, index: int, exc: Exception) -> list[Any]:
    """``[index, path, error]`` for a sample that could not be made."""
    if isinstance(exc, DatasetError):
        return [index, exc.path, str(exc)]
    path = _path(dataset, index)
    log.warning("sample %d (%s) failed: %s: %s", index, path, type(exc).__name__, exc)
    return [index, path, f"{type(exc).__name__}: {exc}"]


def _fill_sample(job: Job, epoch: int, index: int, slot: np.ndarray) -> None:
    """Write sample ``index``'s views into ``slot`` (``(V, H, W, 3)``, a sample's place in the
    batch buffer): the preprocessed image then its AugMix views, or the one AugMix view
    without JSD, or the preprocessed image alone with ``augment: none``."""
    config, dataset = job.config, job.dataset
    rng = sample_rng(config.seed, epoch, index)
    limit = config.limits.max_image_pixels

    def transform(source: Any) -> np.ndarray:
        if isinstance(source, Image.Image) and source.width * source.height > limit:
            raise ValueError(f"{source.width} x {source.height} pixels exceed "
                             f"limits.max_image_pixels ({limit}); not decoded")
        return preprocess(config.preprocess, source, rng, config.image_size)

    image = dataset.sample(index, transform)
    side = config.image_size
    if image.shape != (side, side, 3):
        raise DatasetError(
            dataset.path(index), index, f"preprocessed to {image.shape}, not {(side, side, 3)}"
        )
    if config.augment == "none":
        slot[0] = image
    elif config.jsd:
        slot[0] = image
        augmix_views(image, rng, config.augmix, 2, out=slot[1:])
    else:
        augmix_views(image, rng, config.augmix, 1, out=slot)


class Making:
    """One task's batch, made on a thread of its own so that the worker's own thread keeps
    heartbeating and answering however long a sample takes; it notes which sample it is on.

    With a ``writer`` (the task's shared-memory slot) the views are made in ``out``, memory of
    the worker's own, and written into the slot with one ``pwrite`` by this thread when the
    batch is whole; :attr:`written` says whether that worked (else the views go over TCP).
    ``on_done`` runs on this thread when it finishes, after the write.
    """

    def __init__(self, job: Job, task: protocol.Message, refused: Mapping[int, str],
                 on_done: Callable[[Making], None] = lambda m: None,
                 out: np.ndarray | None = None, slot: str = protocol.SLOT_NONE,
                 writer: SlotWriter | None = None) -> None:
        self.job = job
        self.task = task
        self.on_done = on_done
        self.out = out  # where the views are made (the worker's own memory)
        self.writer = writer  # the task's slot, when the views are to be written there
        self.slot = slot  # result.slot when the views are not in the slot
        self.written = False
        self.write_error: str | None = None
        self.refused = dict(refused)
        self.current: tuple[int, float] | None = None  # (index, started) of the sample being made
        self.result: tuple[list[np.ndarray], list[list[Any]]] | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.thread = threading.Thread(target=self._run, name="augserver-make", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = make_batch(self.job, self.task["epoch"], self.task["indices"],
                                     self._starting, self.refused, self.out)
            views = self.result[0][0]
            if self.writer is not None and self.out is not None and views is self.out:
                try:
                    self.writer.write(views)
                    self.written = True
                except ShmError as exc:
                    self.write_error = str(exc)
        except BaseException as exc:  # raised again in the worker's thread by done()
            self.error = exc
        finally:
            if self.writer is not None:
                self.writer.close()
            self.current = None
            self.finished = True  # before the wake-up: the thread itself is still alive
            self.on_done(self)

    def _starting(self, index: int) -> None:
        self.current = (index, time.monotonic())

    def done(self) -> bool:
        if not self.finished:
            return False
        if self.error is not None:
            raise self.error
        return True

    def overrun(self, limit: float, now: float) -> int | None:
        """The sample that has been in the making for more than ``limit`` seconds, if any."""
        current = self.current
        return current[0] if current is not None and now - current[1] > limit else None


class KernelLoader:
    """Loads the compiled kernels on a thread of their own, so that a worker whose cache is
    cold keeps heartbeating while numba compiles; :meth:`done` raises :class:`Fatal` if the
    kernels cannot be loaded."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.result: KernelLoad | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._load, name="augserver-kernels", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _load(self) -> None:
        try:
            self.result = load_kernels()
            level = logging.WARNING if self.result.problems else logging.INFO
            log.log(level, "worker %s: %s", self.name, self.result.describe())
        except BaseException as exc:  # reported by done(), in the worker's own thread
            self.error = exc

    def done(self) -> bool:
        """Whether the kernels are loaded (never before the thread finished)."""
        if self.thread.is_alive():
            return False
        if self.error is not None:
            raise Fatal(f"cannot load the AugMix kernels: {self.error}")
        return self.result is not None


class Worker:
    """One connection's worth of worker state; :func:`run_worker` drives it."""

    def __init__(
        self, connect: str, name: str, stop: threading.Event, keys: ClientKeys | None = None
    ) -> None:
        self.connect = connect
        self.name = name
        self.stop = stop
        self.keys = keys
        self.context = zmq.Context()
        # A made batch wakes the worker's thread at once (it waits on its socket otherwise).
        wake = f"inproc://augserver-made-{id(self)}"
        self.made = self.context.socket(zmq.PAIR)
        self.made.bind(wake)
        self._made_signal = self.context.socket(zmq.PAIR)
        self._made_signal.connect(wake)
        self._signal_lock = threading.Lock()
        self.sock: zmq.Socket | None = None
        self.job: Job | None = None
        self.tasks: deque[protocol.Message] = deque()
        self.last_heard = self.last_beat = time.monotonic()
        self.busy_tick = _BUSY_TICK
        self.kernels = KernelLoader(name)
        self.ready_sent = False  # on this connection
        self.receipt = 0  # of the latest message read from the dispatcher (augserver.outbox)
        self.making: Making | None = None
        self.shm = Attachments(shm_dir())
        self.scratch: list[np.ndarray] = []  # buffers for slot views, given back when written
        self.next_sweep = 0.0
        self.too_slow: dict[int, str] = {}  # samples past limits.sample_seconds: not tried again
        self.abandoned: threading.Thread | None = None  # still making a too slow sample
        self.leaving = False  # said leave: the socket lingers so that it goes out

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Serve until ``stop`` is set (0) or a fatal condition (:data:`EXIT_FATAL`)."""
        self.kernels.start()  # while it connects; no task is asked for before they are loaded
        try:
            while not self.stop.is_set():
                try:
                    if self._handshake():
                        self._serve()
                except Reconnect as exc:
                    if not self.stop.is_set():
                        log.warning("worker %s: %s; saying hello again", self.name, exc)
            return 0
        except Fatal as exc:
            log.error("worker %s stops: %s", self.name, exc)
            return EXIT_FATAL
        except Stuck as exc:
            log.error("worker %s leaves to be restarted: %s", self.name, exc)
            return EXIT_STUCK
        finally:
            if self.sock is not None:
                self.sock.close(linger=1000 if self.leaving else 0)  # leave goes out first
            with self._signal_lock:
                self._made_signal.close(linger=0)
            self.made.close(linger=0)
            self.context.term()
            self.shm.close()

    def _new_socket(self) -> zmq.Socket:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.tasks.clear()
        self.making = None  # a result for the old connection would be a duplicate
        self.ready_sent = False
        self.sock = session.dealer(self.context, self.connect, self.keys, immediate=True,
                                   reconnect_ms=(100, 2000))
        return self.sock

    def _handshake(self) -> bool:
        """hello on a fresh socket until welcome; False when stopped or timed out."""
        sock = self._new_socket()
        log.info("worker %s: connecting to %s", self.name, self.connect)
        try:
            welcome = session.handshake(
                sock, "worker", self.name, self.connect, HANDSHAKE_TIMEOUT,
                curve=self.keys is not None, stopped=self.stop.is_set,
                on_other=lambda m: log.warning("worker %s: unexpected %s before welcome, "
                                               "ignored", self.name, m.type))
        except session.Refused as exc:
            raise Fatal(str(exc)) from None
        except (SessionTimeout, RemoteError) as exc:
            log.warning("worker %s: %s; retrying", self.name, exc)
            return False
        if welcome is None:
            return False
        self.receipt = welcome.receipt
        self._welcome(welcome)
        return True

    def _welcome(self, message: protocol.Message) -> None:
        """Build the job from the welcome's config (reusing the dataset when unchanged)."""
        raw = message["config"]
        if self.job is None or self.job.raw != raw:
            try:
                config = config_from_dict(raw, f"config from {self.connect}", check_paths=False)
                d = config.dataset
                dataset = open_dataset(d.format, d.path, d.train, d.s3)
            except (ConfigError, DatasetError, OSError, ValueError) as exc:
                raise self._leave(f"cannot use the job: {exc}") from None
            if len(dataset) != message["dataset_len"]:
                raise self._leave(
                    f"dataset {config.dataset.path} has {len(dataset)} samples here but "
                    f"{message['dataset_len']} at the dispatcher"
                )
            mismatch = fingerprint_mismatch(message["dataset"], dataset.fingerprint())
            if mismatch is not None:  # the dispatcher refuses it too, and says why
                log.error("worker %s: %s", self.name, mismatch)
            self.job = Job(config, dataset, raw)
            # Pillow's own bomb check stays above the job's limit (make_batch applies that)
            Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0,
                                         config.limits.max_image_pixels)
        self.busy_tick = busy_tick(self.job.config.limits)
        log.info("worker %s: welcomed by %s", self.name, self.connect)
        self.last_heard = self.last_beat = time.monotonic()
        self._ready_when_loaded()

    def _leave(self, reason: str) -> Fatal:
        """Tell the dispatcher why this worker cannot serve its job (the trainers then hear
        it); the :class:`Fatal` to raise."""
        self._send("leave", reason=f"{self.name}: {reason}")
        self.leaving = True
        return Fatal(reason)

    def _ready_when_loaded(self) -> None:
        """Ask for tasks (``ready``) once the kernels are loaded: until then the dispatcher
        shows this worker as warming up and gives it nothing."""
        assert self.job is not None
        if self.ready_sent or not self.kernels.done():
            return
        self._send("ready", slots=self.job.config.limits.worker_slots,
                   dataset=self.job.dataset.fingerprint())
        self.ready_sent = True

    # ------------------------------------------------------------------ serving

    def _serve(self) -> None:
        assert self.job is not None and self.sock is not None
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.made, zmq.POLLIN)
        while not self.stop.is_set():
            if self.making is None and self.tasks:
                self.making = self._start(self.tasks.popleft())
            if self.making is None:
                self._tick(_POLL_MS)
                continue
            if self.made in dict(poller.poll(int(self.busy_tick * 1000))):
                while self.made.poll(0):
                    self.made.recv()
            self._tick()
            self._check_making()

    def _start(self, task: protocol.Message, abandoned: Making | None = None) -> Making:
        """Make ``task``'s batch, for its slot when it names one this worker can write; made
        again after ``abandoned`` was left running, never for the slot that one writes."""
        assert self.job is not None
        out, writer, status, wire = None, None, protocol.SLOT_NONE, task["slot"]
        if abandoned is not None:
            status = protocol.SLOT_DIRTY if abandoned.writer is not None else abandoned.slot
        elif wire is not None:
            slot = Slot.from_wire(wire)
            known = slot.name in self.shm.unusable
            shape = self.job.config.layout.views_shape(len(task["indices"]))
            try:
                writer = self.shm.writer(slot, int(np.prod(shape)))
                out = self._scratch(shape)
            except ShmError as exc:
                status = protocol.SLOT_UNUSABLE
                if not known:
                    log.info("worker %s: sending over TCP to the trainer of arena %s: %s",
                             self.name, slot.name, exc)
        return Making(self.job, task, self.too_slow, self._made_one, out, status, writer)

    def _scratch(self, shape: tuple[int, ...]) -> np.ndarray:
        """A buffer of ``shape`` to make a slot's views in: one a finished task gave back
        (fresh pages cost page faults), else a new one."""
        while self.scratch:
            buffer = self.scratch.pop()
            if buffer.shape == shape:
                return buffer
        return np.empty(shape, np.uint8)

    def _made_one(self, making: Making) -> None:
        """Called on a making thread when its batch is done (or failed): its buffer goes back
        when the slot holds the views (nothing else refers to it), and the worker wakes."""
        if making.written and making.out is not None and len(self.scratch) < 2:
            self.scratch.append(making.out)
        with self._signal_lock, contextlib.suppress(zmq.ZMQError):
            self._made_signal.send(b"", zmq.NOBLOCK)

    def _check_making(self) -> None:
        """Send the batch once made; fail a sample that runs past ``limits.sample_seconds``."""
        making, job = self.making, self.job
        assert making is not None and job is not None
        if making.done():
            self.making = None
            assert making.result is not None
            arrays, failed = making.result
            status = making.slot
            if making.writer is not None:
                # in the slot; else the write failed (the views come inline, and no more slots
                # of that arena for this worker) or samples are missing (views compacted)
                status = (protocol.SLOT_WRITTEN if making.written else protocol.SLOT_UNUSABLE
                          if making.write_error else protocol.SLOT_NONE)
                if making.write_error:
                    log.warning("worker %s: %s; sending over TCP", self.name,
                                making.write_error)
                if status == protocol.SLOT_WRITTEN:
                    arrays = arrays[1:]
            # A result also frees the worker slot its task used: no separate ready message.
            self._send("result", arrays, task=making.task["task"], failed=failed, slot=status)
            return
        limit = job.config.limits.sample_seconds
        index = making.overrun(limit, time.monotonic())
        if index is None:
            return
        path = _path(job.dataset, index)
        log.warning("worker %s: sample %d (%s) took longer than limits.sample_seconds (%g s); "
                    "it is reported failed and never tried again here", self.name, index, path,
                    limit)
        if self.abandoned is not None and self.abandoned.is_alive():
            raise Stuck(f"sample {index} ({path}) ran past limits.sample_seconds while an "
                        "earlier one still runs")
        self.too_slow[index] = f"took longer than limits.sample_seconds ({limit:g} s) to make"
        self.abandoned = making.thread  # it cannot be stopped; its result is ignored
        self.making = self._start(making.task, making)  # the task again, without it

    def _tick(self, timeout_ms: int = 0) -> None:
        """Heartbeat when due, handle what arrived, notice a silent dispatcher."""
        assert self.job is not None
        limits = self.job.config.limits
        now = time.monotonic()
        if now - self.last_beat >= limits.heartbeat_interval:
            self._send("heartbeat", quiet=True)
            self.last_beat = now
        if now >= self.next_sweep:  # arenas of dead trainers, and those their owners closed
            self.next_sweep = now + SWEEP_SECONDS
            self.shm.prune()
        message = self._receive(timeout_ms)
        while message is not None:
            self._handle(message)
            message = self._receive(0)
        self._ready_when_loaded()
        silence = time.monotonic() - self.last_heard
        if silence > 2 * limits.heartbeat_timeout:
            raise Reconnect(f"dispatcher {self.connect} silent for {silence:.1f} s")
        if self.stop.is_set():
            raise Reconnect("stopping")

    def _handle(self, message: protocol.Message) -> None:
        kind = message.type
        if kind == "task":
            self.tasks.append(message)
        elif kind == "reset":
            raise Reconnect(f"reset by the dispatcher: {message['reason']}")
        elif kind == "refused":
            raise Fatal(f"refused by the dispatcher at {self.connect}: {message['reason']}")
        elif kind == "error":
            log.warning("worker %s: dispatcher says: %s", self.name, message["message"])
        elif kind != "heartbeat":
            log.warning("worker %s: unexpected %s from the dispatcher, ignored", self.name, kind)

    # ------------------------------------------------------------------ socket

    def _receive(self, timeout_ms: int) -> protocol.Message | None:
        """The next valid message, or None; malformed ones are logged and skipped."""
        assert self.sock is not None
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return None
        frames = self.sock.recv_multipart(copy=False)
        self.last_heard = time.monotonic()
        try:
            message = protocol.decode(frames)
        except protocol.ProtocolError as exc:
            log.warning("worker %s: malformed message from the dispatcher: %s", self.name, exc)
            return None
        self.receipt = message.receipt or self.receipt
        return message

    def _send(
        self, mtype: str, arrays: Sequence[np.ndarray] = (), *, quiet: bool = False,
        **fields: Any,
    ) -> None:
        """Send without blocking, returning the receipt of the latest message read; a message
        the socket cannot take now (no connection) is dropped and logged (the dispatcher
        re-issues what it does not get)."""
        assert self.sock is not None
        frames = protocol.encode(mtype, arrays, receipt=self.receipt, **fields)
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            level = logging.DEBUG if quiet else logging.WARNING
            log.log(level, "worker %s: dispatcher unreachable, message dropped", self.name)


def run_worker(
    connect: str,
    name: str | None = None,
    stop: threading.Event | None = None,
    keys: ClientKeys | None = None,
) -> int:
    """Run a worker against the dispatcher at ``connect`` until ``stop`` is set.

    ``keys``: CURVE keys (see :mod:`augserver.security`) for a dispatcher with CURVE on.
    Returns the exit status: 0 when stopped, :data:`EXIT_FATAL` when refused by the dispatcher
    or unable to use its job (logged with the reason).
    """
    worker = Worker(connect, name or worker_name(), stop or threading.Event(), keys)
    return worker.run()
