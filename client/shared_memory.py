"""The trainer's side of the shared-memory path: its arena per connection, and the one copy.

The loader makes an :class:`SessionArena` for each connection to the dispatcher
(:mod:`augserver.shm`: ``prefetch`` slots of one full batch's views). Batches that arrive
through it name a slot; the training thread reads the slot once and releases it, which the
receive thread passes on to the dispatcher with the next credit. The one read is a copy into
pinned memory for a CUDA loader (the copy to the device is then asynchronous); on the CPU it
is the layout or dtype conversion the batch needs anyway, or, when it needs none, a copy
into a :class:`HostBuffers` buffer. When the connection ends the arena's name is removed at
once (no worker may attach any more), and its memory is unmapped once the batches it still
holds are consumed or the stream stops; but a stream whose ``end`` names no slot that someone
may still write passes its arena to the loader's next stream (making one costs about 0.5 CPU-s
per GB of arena).
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

from augserver.shm import PAGE, Arena, ShmError, slot_bytes

log = logging.getLogger("augserver.client")


class SessionArena:
    """One connection's arena, counting the batches in it not yet copied out."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self._lock = threading.Lock()
        self._held = 0
        self._retired = False

    @classmethod
    def create(cls, directory: Path | None, slots: int, views_bytes: int,
               warned: list[str]) -> SessionArena | None:
        """An arena in ``directory``, or None (TCP) with the reason logged once (``warned``
        keeps the reasons already logged)."""
        if directory is None:
            return None
        try:
            return cls(Arena.create(directory, slots, views_bytes))
        except ShmError as exc:
            if str(exc) not in warned:
                warned.append(str(exc))
                log.warning("batches come over TCP: %s", exc)
            return None

    def fits(self, slots: int, views_bytes: int) -> bool:
        """Whether it can serve a stream of ``slots`` slots of ``views_bytes``, and is open."""
        return (not self._retired and self.arena.slots == slots
                and self.arena.slot_bytes == slot_bytes(views_bytes))

    def hold(self) -> None:
        """A batch arrived in one of the slots."""
        with self._lock:
            self._held += 1

    def view(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The views in ``slot``, in the shared memory: read them before :meth:`release`."""
        return torch.from_numpy(self.arena.view(slot, shape))

    def release(self) -> None:
        """A batch's slot was read (the loader tells the dispatcher it is free)."""
        with self._lock:
            self._held -= 1
            done = self._retired and self._held == 0
        if done:
            self.arena.close()

    def drop_holds(self) -> None:
        """The batches received into it and not read are dropped (their stream is over)."""
        with self._lock:
            self._held = 0

    def retire(self) -> None:
        """The connection is over: unlink now, unmap once nothing is held."""
        self.arena.unlink()
        with self._lock:
            self._retired = True
            done = self._held == 0
        if done:
            self.arena.close()

    def close(self) -> None:
        """The stream is over: whatever it still held is dropped."""
        self._retired = True
        self.arena.close()


class HostBuffers:
    """Host memory for the copies out of the slots, reused: a buffer returns to the pool once
    the last tensor over it is gone, so that a batch is not copied into freshly mapped pages
    (their page faults cost as much as the copy). At most ``keep`` idle buffers are kept."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._idle: list[np.ndarray] = []
        self._lock = threading.Lock()

    def copy(self, source: torch.Tensor) -> torch.Tensor:
        """``source`` (uint8) copied into a pooled buffer."""
        nbytes = source.numel()
        with self._lock:
            backing = next((b for b in self._idle if len(b) >= nbytes), None)
            if backing is not None:
                self._idle.remove(backing)
        if backing is None:
            backing = _page_aligned(nbytes)
        array = backing[:nbytes].reshape(tuple(source.shape))
        weakref.finalize(array, self._give_back, backing)  # when torch lets go of it
        views = torch.from_numpy(array)
        views.copy_(source)
        return views

    def _give_back(self, backing: np.ndarray) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(backing)


def _page_aligned(nbytes: int) -> np.ndarray:
    """An uninitialised buffer starting on a page (copies into a misaligned one run slower)."""
    raw = np.empty(nbytes + PAGE, np.uint8)
    start = -raw.ctypes.data % PAGE
    return raw[start:start + nbytes]
