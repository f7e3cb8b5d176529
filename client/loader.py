"""``RemoteAugMixLoader``: the training side of augserver, a PyTorch iterable over batches.

It connects to the dispatcher, opens a stream for ``(epoch, rank, world_size)``, grants
credits, receives batches on a background thread, and yields :class:`AugMixBatch` objects
whose tensors are converted and normalised on the training device. The loader holds the
stream's progress itself, so :meth:`RemoteAugMixLoader.state_dict` resumes an epoch exactly,
and a dispatcher that goes away is reconnected to and told what was already received.

Batches made by workers on the trainer's own host come through shared memory
(:mod:`client.shared_memory`): the loader offers an arena of ``prefetch`` slots, same-host
workers write the views there, and only a descriptor travels through the dispatcher. The
training thread copies each slot once and releases it. Workers elsewhere send over TCP, in
the same stream; the choice is per worker and automatic.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zmq

from augserver import protocol, session
from augserver.addresses import check_endpoint
from augserver.config import JobConfig, config_from_dict
from augserver.errors import AugserverError, RemoteError
from augserver.plan import ShardPlan, from_ranges, served_mask, to_ranges
from augserver.security import ClientKeys, KeySource
from augserver.shm import shm_dir
from client.distributed import world
from client.shared_memory import HostBuffers, SessionArena

log = logging.getLogger("augserver.client")

_PING_INTERVAL = 1.0
_END_GRACE = 1.0
"""Seconds a stream whose batches all arrived waits for the dispatcher's ``end`` when it
stops (the ``end`` follows the last batch at once; it says whether the arena is clean)."""


@dataclass
class AugMixBatch:
    """One batch: NCHW image tensors on the loader's device, labels and dataset indices.

    With JSD (the default) ``orig``, ``aug1`` and ``aug2`` are the clean image and two AugMix
    views; without JSD ``aug1`` is the single AugMix view and ``orig``/``aug2`` are None; with
    ``augment: none`` (no AugMix) ``orig`` is the single view and ``aug1``/``aug2`` are None.
    """

    orig: torch.Tensor | None
    aug1: torch.Tensor | None
    aug2: torch.Tensor | None
    target: torch.Tensor
    index: torch.Tensor
    views: torch.Tensor | None = field(default=None, repr=False, compare=False)
    """All views as one ``(V, B, 3, H, W)`` tensor (``orig`` and the rest are its slices)."""
    position: int = field(default=-1, compare=False)
    """The batch's place in this rank's plan of the epoch (what the loader's state counts)."""

    def concat(self) -> torch.Tensor:
        """The views concatenated along the batch (clean, aug1, aug2) for one forward pass:
        a view of the batch's memory when the loader made it (no copy), else a copy."""
        if self.views is not None and len(self.views) > 1:
            return self.views.flatten(0, 1)
        views = [v for v in (self.orig, self.aug1, self.aug2) if v is not None]
        return torch.cat(views) if len(views) > 1 else views[0]

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, targets)`` in timm's layout: :meth:`concat`'s ``V * B`` images and the
        labels repeated to match, image ``i + j * B`` having label ``i`` (what timm's
        ``fast_collate`` makes of ``AugMixDataset(num_splits=V)`` samples)."""
        images = self.concat()
        views = len(images) // len(self.target) if len(self.target) else 1
        return images, self.target.repeat(views)

    def __len__(self) -> int:
        return len(self.target)


@dataclass
class _Received:
    position: int
    views: torch.Tensor | None  # (V, n, H, W, 3) uint8 (augserver.batch), pinned on CUDA
    labels: np.ndarray
    indices: np.ndarray
    arena: SessionArena | None = None  # the views are in ``slot`` of this arena instead
    slot: int | None = None


class _End:
    """Sentinel: the dispatcher sent every batch of the stream."""


class LoaderInterrupted(AugserverError):
    """:meth:`RemoteAugMixLoader.interrupt` stopped the iteration while it waited, before it
    took another batch: nothing was consumed that the trainer did not get."""


class RemoteAugMixLoader:
    """Iterate AugMix batches served by an augserver dispatcher.

    ``rank``/``world_size`` default to torch.distributed's when it is initialised (else 0/1).
    ``ordered=True`` yields batches in plan order, so the stream is bit-for-bit reproducible;
    the default yields them as they complete. ``prefetch`` is the number of batches granted
    ahead (the credits: what the dispatcher may hold or have in flight for this loader).
    ``normalize`` converts to float and normalises with the job's mean/std (or ``mean``/
    ``std``) on ``device``; ``normalize=False`` yields uint8 NCHW tensors. ``timeout`` is how
    long the loader waits without progress (no dispatcher, no batch) before raising.
    ``curve_key`` (this client's secret key file, or Z85 bytes) and ``server_key`` (the
    dispatcher's public key file, or Z85 bytes) connect to a dispatcher with CURVE on.
    ``shm``: the shared-memory directory for batches from same-host workers (default
    ``$AUGSERVER_SHM_DIR``, else ``/dev/shm``); ``False`` sends everything over TCP.
    """

    def __init__(
        self,
        address: str,
        rank: int | None = None,
        world_size: int | None = None,
        epoch: int = 0,
        ordered: bool = False,
        prefetch: int = 4,
        device: str | torch.device | None = None,
        normalize: bool = True,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        channels_last: bool = False,
        timeout: float = 600.0,
        liveness: float = 5.0,
        curve_key: KeySource | None = None,
        server_key: KeySource | None = None,
        as_tuples: bool = False,
        shm: bool | str | os.PathLike[str] | None = None,
    ) -> None:
        if rank is None or world_size is None:
            dist_rank, dist_world = world()
            rank = dist_rank if rank is None else rank
            world_size = dist_world if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 ({world_size})")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        check_endpoint(address, bind=False)
        self.address = address
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.ordered = ordered
        self.prefetch = prefetch
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.normalize = normalize
        self.channels_last = channels_last
        self.timeout = timeout
        self.liveness = liveness
        self.as_tuples = as_tuples
        self._keys = ClientKeys.load(curve_key, server_key)
        self._mean_override = mean
        self._std_override = std
        self._consumed: set[int] = set()
        self._consumed_epoch: int | None = None
        self._chosen = False  # set_epoch since the last iteration began
        self._skip: bytes | None = None  # an elastic resume's skip mask (augserver.plan)
        self._skip_epoch: int | None = None  # the epoch it applies to
        self._job: JobConfig | None = None
        self._dataset_len: int | None = None
        self._classes: list[str] = []
        self._scale: torch.Tensor | None = None
        self._shift: torch.Tensor | None = None
        self.shm_dir = None if shm is False else shm_dir(None if shm in (None, True) else shm)
        self._shm_warned: list[str] = []  # reasons already logged for falling back to TCP
        self._spare_arena: SessionArena | None = None  # a clean arena for the next stream
        self._host_buffers = HostBuffers(keep=prefetch + 2)
        self._interrupted = False  # see interrupt()

    # ------------------------------------------------------------------ public API

    def interrupt(self) -> None:
        """Make the iteration in progress raise :class:`LoaderInterrupted` at its next wait
        for a batch (within 0.1 s), before it takes one. Safe to call from a signal handler
        (it only sets a flag) and from any thread; a trainer's graceful stop uses it so that
        a stop while waiting for data never loses the batch that was about to arrive."""
        self._interrupted = True

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration streams (its own seeded order). Without it, an
        iteration that follows a completed epoch streams the next one."""
        self.epoch = epoch
        self._chosen = True

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch (the same on every rank; after an
        elastic resume, of what the epoch has left)."""
        return self._plan().num_batches

    def batches_left(self) -> int:
        """Batches of the current epoch this rank has not consumed yet."""
        consumed = len(self._consumed) if self._consumed_epoch == self.epoch else 0
        return self._plan().num_batches - consumed

    @property
    def classes(self) -> list[str]:
        """The dataset's class names by label (numbers as names for an unnamed npz); asks the
        dispatcher on first use."""
        self._ensure_job()
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        """How many classes the dataset has (the labels run from 0 to this - 1)."""
        return len(self.classes)

    @property
    def image_size(self) -> int:
        """Side of the square images served (the job's ``image_size``)."""
        return self.config.image_size

    @property
    def preprocess(self) -> str:
        """The job's preprocessing: ``cifar`` or ``imagenet``."""
        return self.config.preprocess

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel (RGB) normalisation mean the batches are normalised with (pixels in
        [0, 1]): the ``mean`` argument, else the job's; also without ``normalize``, for a
        model that normalises itself."""
        return tuple(self._mean_override or self.config.mean)

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel (RGB) normalisation standard deviation, as :attr:`mean`."""
        return tuple(self._std_override or self.config.std)

    @property
    def config(self) -> JobConfig:
        """The dispatcher's job configuration (asks the dispatcher on first use)."""
        self._ensure_job()
        assert self._job is not None
        return self._job

    def close(self) -> None:
        """Release the shared-memory arena kept for the next epoch (an epoch that ended clean
        passes its arena on; it is released anyway when the loader is garbage-collected or
        the process exits). The loader stays usable: a later epoch makes a new arena."""
        spare, self._spare_arena = self._spare_arena, None
        if spare is not None:
            spare.close()

    def state_dict(self, pending: AugMixBatch | None = None) -> dict[str, Any]:
        """Progress in the current epoch: small and JSON-serialisable. Every batch yielded
        counts as consumed, except ``pending``: a batch yielded whose training step did not
        complete (a stop in the middle of a step), which a resume then streams again."""
        skip = self._epoch_skip()
        consumed = self._consumed if self._consumed_epoch == self.epoch else set()
        if pending is not None and pending.position in consumed:
            consumed = consumed - {pending.position}
        return {
            "epoch": self.epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "ordered": self.ordered,
            "consumed": to_ranges(consumed),
            "skip": base64.b64encode(skip).decode() if skip is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue an epoch from :meth:`state_dict`: consumed batches are not streamed again.

        ``state`` is this rank's state, or the list of the states of every rank of the run
        that saved it, whatever its world size was (elastic resume: 4 ranks to 2 after losing
        nodes, 2 to 3...). From such a list the rest of the epoch, what no old rank consumed,
        is dealt to the new ranks by the usual rule: each sample once over old and new ranks
        (bar the usual padding), the same number of batches on every new rank.
        """
        states = state if isinstance(state, list) else [state]
        for one in states:
            for key in ("epoch", "rank", "world_size", "consumed"):
                if key not in one:
                    raise ValueError(f"loader state has no {key!r}: {sorted(one)}")
        first = states[0]
        if isinstance(state, list) and (len(states) != first["world_size"] or sorted(
                s["rank"] for s in states) != list(range(len(states)))):
            raise ValueError(f"the states of all ranks are needed: got ranks "
                             f"{sorted(s['rank'] for s in states)} of {first['world_size']}")
        if len({s["epoch"] for s in states}) > 1 or len({s.get("skip") for s in states}) > 1:
            raise ValueError("the loader states are of different epochs (or resumes)")
        self.epoch = int(first["epoch"])
        self._consumed_epoch = self.epoch
        skip = base64.b64decode(first["skip"]) if first.get("skip") else None
        if (first["rank"], first["world_size"]) == (self.rank, self.world_size):
            mine = next(s for s in states if s["rank"] == self.rank)
            self._consumed = from_ranges(mine["consumed"])
            self._skip, self._skip_epoch = skip, self.epoch
            return
        if not isinstance(state, list):
            raise ValueError(
                f"loader state is for rank {state['rank']} of {state['world_size']}, "
                f"this loader is rank {self.rank} of {self.world_size}: pass the states of "
                "every rank to resume on another world size"
            )
        job = self.config
        assert self._dataset_len is not None
        old = [ShardPlan(job.seed, self.epoch, self._dataset_len, s["rank"], s["world_size"],
                         job.batch_size, job.drop_last, skip) for s in states]
        self._skip = served_mask(old, [from_ranges(s["consumed"]) for s in states])
        self._skip_epoch = self.epoch
        self._consumed = set()

    def __iter__(self) -> Iterator[Any]:
        """The batches of the current epoch not consumed yet: :class:`AugMixBatch` objects, or
        with ``as_tuples`` ``(images, targets)`` in timm's layout (:meth:`AugMixBatch.as_tuple`:
        the ``3B`` batch clean, aug1, aug2 and the labels repeated to ``3B``, as timm's
        ``fast_collate`` makes them of ``AugMixDataset(num_splits=3)`` samples). After a
        completed epoch (also one resumed at its very end) the next iteration is the next epoch,
        as plain ``for epoch in ...: for batch in loader`` loops
        and Lightning expect, unless :meth:`set_epoch` chose an epoch since; an epoch chosen
        that way and already consumed yields nothing."""
        chosen, self._chosen = self._chosen, False
        if self._consumed_epoch != self.epoch:
            self._consumed = set()
            self._consumed_epoch = self.epoch
        if len(self._consumed) >= self._plan().num_batches:
            if chosen:
                return  # set_epoch picked an epoch this loader has consumed (a resumed trainer)
            self.epoch += 1
            self._consumed, self._consumed_epoch = set(), self.epoch
        plan = self._plan()
        stream = _Stream(self, plan.num_batches)
        try:
            for batch in self._batches(stream, plan.num_batches - len(self._consumed)):
                yield batch.as_tuple() if self.as_tuples else batch
        finally:
            stream.stop()

    # ------------------------------------------------------------------ internals

    def _batches(self, stream: _Stream, remaining: int) -> Iterator[AugMixBatch]:
        pending: dict[int, _Received] = {}
        next_position = self._next_ordered_position(0)
        while remaining > 0:
            self._check_interrupted()
            if self.ordered and next_position in pending:
                item: Any = pending.pop(next_position)
            else:
                item = stream.get()
            if isinstance(item, _End):
                if pending or remaining > 0:
                    raise RemoteError(
                        f"stream ended with {remaining} batches missing (positions received "
                        "out of order are kept, so this is a dispatcher fault)"
                    )
                return
            if self.ordered and item.position != next_position:
                pending[item.position] = item
                continue
            remaining -= 1
            batch = self._to_batch(item) if len(item.labels) else None  # out of its slot
            stream.grant(1, item)
            try:
                self._consumed.add(item.position)
                if self.ordered:
                    next_position = self._next_ordered_position(item.position + 1)
                if batch is not None:
                    yield batch
            except GeneratorExit:  # closed after the consumer got the batch
                raise
            except BaseException:  # e.g. Ctrl-C before the batch reached the consumer
                self._consumed.discard(item.position)
                raise

    def _check_interrupted(self) -> None:
        """Raise :class:`LoaderInterrupted` once for each :meth:`interrupt`."""
        if self._interrupted:
            self._interrupted = False
            raise LoaderInterrupted("interrupted while waiting for a batch")

    def _next_ordered_position(self, start: int) -> int:
        position = start
        while position in self._consumed:
            position += 1
        return position

    def _to_batch(self, item: _Received) -> AugMixBatch:
        views = item.views
        if item.arena is not None:  # read its slot once, then release it
            assert item.slot is not None
            views = item.arena.view(item.slot, self.config.layout.views_shape(
                len(item.indices)))
            if self.device.type == "cuda":  # the one copy: into pinned memory
                views = torch.empty(views.shape, dtype=torch.uint8,
                                    pin_memory=True).copy_(views)
            elif self.channels_last and not self.normalize:  # nothing below copies
                views = self._host_buffers.copy(views)
        assert views is not None
        views = views.to(self.device, non_blocking=True)
        # (V, n, 3, H, W): channels_last keeps the NHWC memory; else made contiguous here, in
        # uint8, before the float conversion (4x fewer bytes to move)
        images = views.permute(0, 1, 4, 2, 3) if self.channels_last else _nchw(views)
        if self.normalize:
            scale, shift = self._normalization()
            images = images.float().mul_(scale).sub_(shift)  # keeps the memory layout
        if item.arena is not None:
            item.arena.release()  # what the batch holds is in memory of its own now
        # int64 on the wire (the dispatcher checks): views of the frames, no copies
        target = torch.from_numpy(item.labels).to(self.device, non_blocking=True)
        index = torch.from_numpy(item.indices)
        position = item.position
        if images.shape[0] == 3:
            return AugMixBatch(images[0], images[1], images[2], target, index, images, position)
        if self.config.augment == "none":
            return AugMixBatch(images[0], None, None, target, index, images, position)
        return AugMixBatch(None, images[0], None, target, index, images, position)

    def _normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scale is None:
            mean = torch.tensor(self.mean, dtype=torch.float32)
            std = torch.tensor(self.std, dtype=torch.float32)
            # (x / 255 - mean) / std == x * (1 / (255 std)) - mean / std
            self._scale = (1.0 / (255.0 * std)).view(3, 1, 1).to(self.device)
            self._shift = (mean / std).view(3, 1, 1).to(self.device)
        assert self._shift is not None
        return self._scale, self._shift

    def _epoch_skip(self) -> bytes | None:
        """What an elastic resume left out of the current epoch (None: nothing)."""
        return self._skip if self._skip_epoch == self.epoch else None

    def _plan(self) -> ShardPlan:
        job = self.config
        assert self._dataset_len is not None
        return ShardPlan(
            job.seed,
            self.epoch,
            self._dataset_len,
            self.rank,
            self.world_size,
            job.batch_size,
            job.drop_last,
            self._epoch_skip(),
        )

    def _ensure_job(self) -> None:
        if self._job is not None:
            return
        sock = session.dealer(zmq.Context.instance(), self.address, self._keys)
        try:
            welcome = self._handshake(sock, self.timeout)
        finally:
            sock.close(linger=0)
        self._accept_welcome(welcome)

    def _handshake(self, sock: zmq.Socket, timeout: float) -> protocol.Message:
        """hello -> welcome; waits for a dispatcher that is not up yet, up to ``timeout``."""
        welcome = session.handshake(
            sock, "client", f"{socket.gethostname()}:{threading.get_native_id()}",
            self.address, timeout, curve=self._keys is not None, names=session.ARGUMENTS,
            waiting=lambda waited: log.warning(
                "waiting for the augserver dispatcher at %s: no answer for %.0f s (gives up "
                "after %g s)", self.address, waited, timeout))
        assert welcome is not None  # never stopped
        return welcome

    def _accept_welcome(self, welcome: protocol.Message) -> None:
        job = config_from_dict(welcome["config"], source=self.address, check_paths=False)
        changed = job != self._job or welcome["dataset_len"] != self._dataset_len
        if self._job is not None and changed:
            raise RemoteError(
                f"the dispatcher at {self.address} now serves a different job "
                "(config or dataset changed); refusing to mix streams"
            )
        self._job = job
        self._dataset_len = welcome["dataset_len"]
        self._classes = welcome["classes"]


class _Stream:
    """The background thread of one epoch stream: socket I/O, reconnects, credits."""

    def __init__(self, loader: RemoteAugMixLoader, num_batches: int) -> None:
        self.loader = loader
        self.num_batches = num_batches
        self.stream_id = uuid.uuid4().hex
        self.items: queue.Queue[Any] = queue.Queue()
        self.received: set[int] = set(loader._consumed)
        self._context = zmq.Context.instance()
        self._wake_address = f"inproc://augserver-loader-{self.stream_id}"
        self._wake_recv = self._context.socket(zmq.PAIR)
        self._wake_recv.bind(self._wake_address)
        self._wake_send = self._context.socket(zmq.PAIR)
        self._wake_send.connect(self._wake_address)
        self._wake_lock = threading.Lock()
        self._stopping = threading.Event()
        self._progress = time.monotonic()
        self._receipt = 0  # of the latest message read, returned on each one sent
        self.arena: SessionArena | None = None  # this connection's, if shared memory works
        self._arenas: list[SessionArena] = []  # every connection's, closed at stop()
        self._clean: SessionArena | None = None  # ended with no slot lost: for the next stream
        self._ended = threading.Event()  # the dispatcher said end
        self._released: queue.SimpleQueue[tuple[SessionArena, int]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="augserver-loader", daemon=True)
        self._thread.start()

    def get(self) -> Any:
        """The next received batch, the end sentinel, or raise the stream's error."""
        while True:
            try:
                item = self.items.get(timeout=0.1)
            except queue.Empty:
                self.loader._check_interrupted()
                if not self._thread.is_alive():
                    raise RemoteError("the loader's receive thread stopped unexpectedly") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def grant(self, n: int, item: _Received | None = None) -> None:
        """Tell the I/O thread that ``n`` batches were consumed (credits to send), ``item``'s
        slot among them (copied out: it may be released)."""
        if item is not None and item.arena is not None and item.slot is not None:
            self._released.put((item.arena, item.slot))
        self._wake(n.to_bytes(4, "little"))

    def stop(self) -> None:
        if self.arena is not None and len(self.received) >= self.num_batches:
            self._ended.wait(_END_GRACE)  # its end says whether the arena can serve again
        self._stopping.set()
        self._wake(b"stop")
        self._thread.join(timeout=10)
        self._wake_send.close(linger=0)
        for arena in self._arenas:
            if arena is not self._clean:
                arena.close()
        if self._clean is not None and not self._thread.is_alive():
            self._clean.drop_holds()  # batches left unread in the queue go with the stream
            self.loader._spare_arena = self._clean

    def _wake(self, note: bytes) -> None:
        # Never blocks: once the I/O thread has finished there is nobody to tell.
        with self._wake_lock, contextlib.suppress(zmq.Again):
            self._wake_send.send(note, zmq.NOBLOCK)

    # ------------------------------------------------------------- the thread

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._session():
                    return
        except BaseException as exc:  # surfaced in the training thread
            self.items.put(exc)
        finally:
            self._wake_recv.close(linger=0)

    def _session(self) -> bool:
        """One connection to the dispatcher; True when the stream finished or was stopped."""
        loader = self.loader
        sock = session.dealer(self._context, loader.address, loader._keys)
        try:
            welcome = loader._handshake(sock, self._time_left())
            self._receipt = welcome.receipt
            loader._accept_welcome(welcome)
            self._new_arena()
            queued = len(self.received) - len(loader._consumed)
            credits = max(0, loader.prefetch - queued)
            sock.send_multipart(
                self._message(
                    "open",
                    stream=self.stream_id,
                    epoch=loader.epoch,
                    rank=loader.rank,
                    world_size=loader.world_size,
                    ordered=loader.ordered,
                    credits=credits,
                    done=to_ranges(self.received),
                    skip=loader._epoch_skip(),
                    shm=self.arena.arena.describe() if self.arena is not None else None,
                ),
                copy=False,
            )
            self._progress = time.monotonic()
            return self._serve(sock)
        finally:
            if self.arena is not None and self.arena is not self._clean:
                self.arena.retire()  # a new connection gets a new arena
            self.arena = None
            if self._stopping.is_set():
                _send_quietly(sock, self._message("close", stream=self.stream_id))
            sock.close(linger=100 if self._stopping.is_set() else 0)

    def _serve(self, sock: zmq.Socket) -> bool:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        last_heard = last_ping = time.monotonic()
        while True:
            events = dict(poller.poll(timeout=int(_PING_INTERVAL * 500)))
            now = time.monotonic()
            if self._wake_recv in events and self._on_wake(sock):
                return True
            if sock in events:
                last_heard = now
                outcome = self._on_message(sock.recv_multipart(copy=False))
                if outcome is not None:
                    return outcome
            if now - last_ping >= _PING_INTERVAL:
                _send_quietly(sock, self._message("ping"))
                last_ping = now
            if now - last_heard > self.loader.liveness:
                log.warning(
                    "dispatcher %s silent for %.1f s; reconnecting", self.loader.address,
                    now - last_heard,
                )
                return False
            if self._time_left() <= 0:
                raise TimeoutError(
                    f"no batch from {self.loader.address} for {self.loader.timeout:.0f} s"
                )

    def _on_wake(self, sock: zmq.Socket) -> bool:
        credits = 0
        while True:
            try:
                note = self._wake_recv.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if note == b"stop":
                return True
            credits += int.from_bytes(note, "little")
        free = []
        while not self._released.empty():
            arena, slot = self._released.get()
            if arena is self.arena:  # another connection's slots mean nothing to this one
                free.append(slot)
        if credits:
            _send_quietly(sock, self._message("credit", stream=self.stream_id, n=credits,
                                              free=free))
        return False

    def _on_message(self, frames: list[zmq.Frame]) -> bool | None:
        """Handle one message: None to go on, True when the stream is over, False to
        reconnect."""
        try:
            message = protocol.decode(frames)
        except protocol.ProtocolError as exc:
            log.warning("malformed message from the dispatcher ignored: %s", exc)
            return None
        self._receipt = message.receipt or self._receipt
        kind = message.type
        if kind == "batch" and message["stream"] == self.stream_id:
            self._on_batch(message)
        elif kind == "end" and message["stream"] == self.stream_id:
            if self.arena is not None and not message["lost"]:
                self._clean = self.arena  # nobody writes it: the next stream may use it
            self._ended.set()
            self.items.put(_End())
            return True
        elif kind == "error":
            if message["fatal"] and message["stream"] in (None, self.stream_id):
                raise RemoteError(f"dispatcher {self.loader.address}: {message['message']}")
            log.warning("dispatcher %s: %s", self.loader.address, message["message"])
        elif kind == "reset":
            log.warning("dispatcher asked to reconnect: %s", message["reason"])
            return False
        elif (
            kind == "opened"
            and message["stream"] == self.stream_id
            and message["num_batches"] != self.num_batches
        ):
            raise RemoteError(
                    f"dispatcher plans {message['num_batches']} batches, expected "
                    f"{self.num_batches}: the job changed under this loader"
                )
        return None

    def _on_batch(self, message: protocol.Message) -> None:
        position = message["position"]
        for index, path, error in message["failed"]:
            log.warning("sample %d (%s) could not be used; a substitute stands in its place: %s",
                        index, path, error)
        if position in self.received or position >= self.num_batches:
            return  # a duplicate after a reconnect: already delivered
        slot = message["slot"]
        problem = self.loader.config.layout.problem(message.specs, slot is not None)
        if problem is None and slot is not None and (
                self.arena is None or slot >= self.arena.arena.slots):
            problem = f"it names slot {slot}, which this loader's arena does not have"
        if problem is not None:  # the dispatcher checked it: a dispatcher fault
            raise RemoteError(f"batch {position} from {self.loader.address}: {problem}")
        self.received.add(position)
        self._progress = time.monotonic()
        if slot is not None:
            assert self.arena is not None
            labels, indices = message.arrays
            self.arena.hold()
            self.items.put(_Received(position, None, labels, indices, self.arena, slot))
            return
        views, labels, indices = message.arrays
        tensor = torch.from_numpy(views)  # a view of the ZeroMQ frame: no copy
        if self.loader.device.type == "cuda":
            tensor = tensor.pin_memory()
        self.items.put(_Received(position, tensor, labels, indices))

    def _new_arena(self) -> None:
        """This connection's arena: ``prefetch`` slots of a full batch's views, or None; the
        previous stream's when it ended clean (making one costs about 0.5 CPU-s per GB)."""
        loader = self.loader
        views = loader.config.layout.views_bytes(loader.config.batch_size)
        spare, loader._spare_arena = loader._spare_arena, None
        if spare is not None and spare.fits(loader.prefetch, views):
            self.arena = spare
        else:
            if spare is not None:
                spare.close()
            self.arena = SessionArena.create(loader.shm_dir, loader.prefetch, views,
                                             loader._shm_warned)
        if self.arena is not None:
            self._arenas.append(self.arena)

    def _time_left(self) -> float:
        return self.loader.timeout - (time.monotonic() - self._progress)

    def _message(self, mtype: str, **fields: Any) -> list[Any]:
        """A message to the dispatcher, returning the receipt of the latest one read (which
        lets the dispatcher free what it held for this loader: augserver.outbox)."""
        return protocol.encode(mtype, receipt=self._receipt, **fields)


def _nchw(views: torch.Tensor) -> torch.Tensor:
    """``(V, n, H, W, 3)`` uint8 pixels as a contiguous ``(V, n, 3, H, W)`` tensor."""
    if views.device.type == "cpu":  # numpy's strided copy: about 2x torch's for this at 32x32
        return torch.from_numpy(np.ascontiguousarray(views.numpy().transpose(0, 1, 4, 2, 3)))
    return views.permute(0, 1, 4, 2, 3).contiguous()


def _send_quietly(sock: zmq.Socket, frames: list[Any]) -> None:
    with contextlib.suppress(zmq.Again):
        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
