"""Same-host batches through shared memory: a trainer's arena of slots, and a sweep that leaves
nothing behind in the shared-memory directory.

A trainer (:class:`client.loader.RemoteAugMixLoader`) creates one :class:`Arena` per
connection to the dispatcher: a file ``augserver-<32 hex>.shm`` in the shared-memory directory
(:func:`shm_dir`: ``AUGSERVER_SHM_DIR``, else ``/dev/shm``). It is allocated in full when it is
made (``posix_fallocate``), so a shared-memory mount too small for it fails there, with a
reason, and never as a ``SIGBUS`` in a worker writing a slot. It holds a header page (magic,
a random token, the slot count and size) and then ``slots`` slots of ``slot_bytes``, each
room for one batch's views (:mod:`augserver.batch`).

A worker on the same host :func:`attach`-es to it by name (a name of any other form is refused,
so a dispatcher cannot point a worker at another file), checks the token and keeps the file
open; it makes a task's views in memory of its own and writes them into the slot the
dispatcher chose with one ``pwrite``. A worker never maps a trainer's arena: a peer that
shrinks or replaces its file, or closes its arena while a worker writes, cannot fault the
worker (see :class:`Attached`). A worker elsewhere, or in a container that does not share the
directory, finds no such file (or another token) and sends its pixels over TCP instead: that is
the automatic fallback.

No segment outlives its owner. The owner holds a shared ``flock`` on its arena for as long as
it lives, and the kernel drops that lock when the process dies, however it dies. A file on
which an exclusive lock can be taken therefore has no living owner: :func:`sweep` unlinks it.
Workers sweep every :data:`SWEEP_SECONDS` and the trainer whenever it makes an arena, so after
a SIGKILL of a trainer the survivors remove its arena within seconds; workers and the
dispatcher own no segment at all, so their deaths leave nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import secrets
import stat
import struct
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ENV = "AUGSERVER_SHM_DIR"
"""Environment variable naming the shared-memory directory; ``off`` turns the path off."""
DEFAULT_DIR = "/dev/shm"
PAGE = 4096
HEADER_BYTES = PAGE
"""The header page: :data:`MAGIC`, the token, the slot count and the slot size."""
MAGIC = b"AUGSHM01"
TOKEN_BYTES = 16
MAX_SLOTS = 1024
MAX_SLOT_BYTES = 1 << 32
"""Largest slot a worker writes (4 GiB: far above any batch of views)."""
SLOT_ALIGN = PAGE
SWEEP_SECONDS = 2.0
"""How often a worker sweeps the directory for arenas whose owner is dead."""
NAME = re.compile(r"augserver-[0-9a-f]{32}\.shm")
_HEAD = struct.Struct("<8s16sQQ")


class ShmError(OSError):
    """An arena that cannot be made or used here; the message says why."""


def shm_dir(value: str | os.PathLike[str] | None = None) -> Path | None:
    """The shared-memory directory: ``value``, else ``$AUGSERVER_SHM_DIR``, else ``/dev/shm``;
    None when it is ``off`` (or empty)."""
    chosen = os.fspath(value) if value is not None else os.environ.get(ENV, DEFAULT_DIR)
    if chosen.strip().lower() in ("", "off", "0", "false", "no"):
        return None
    return Path(chosen)


def slot_bytes(views_bytes: int) -> int:
    """The size of a slot holding ``views_bytes`` of views, rounded up to a page."""
    return -(-views_bytes // SLOT_ALIGN) * SLOT_ALIGN


def arena_bytes(slots: int, slot_size: int) -> int:
    """The size of an arena of ``slots`` slots of ``slot_size`` bytes: its shared memory."""
    return HEADER_BYTES + slots * slot_size


@dataclass(frozen=True)
class Slot:
    """Where one task's views go: slot ``index`` of arena ``name`` (with its ``token``)."""

    name: str
    token: bytes
    index: int

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Slot:
        """A task's valid ``slot`` field (see :mod:`augserver.protocol`)."""
        return cls(wire["arena"], wire["token"], wire["slot"])

    def to_wire(self) -> dict[str, Any]:
        return {"arena": self.name, "token": self.token, "slot": self.index}


class Arena:
    """A trainer's arena, owned (and locked) by this process; :meth:`close` unlinks it.

    Use :meth:`create`. :meth:`view` is slot ``index`` as a uint8 array of ``shape`` (a view
    of the shared memory: copy what must outlive the slot's release).
    """

    def __init__(self, path: Path, fd: int, token: bytes, slots: int, slot_bytes: int) -> None:
        self.path = path
        self.name = path.name
        self.token = token
        self.slots = slots
        self.slot_bytes = slot_bytes
        self._fd = fd
        self._map = mmap.mmap(fd, arena_bytes(slots, slot_bytes), mmap.MAP_SHARED)
        self._unlink = weakref.finalize(self, _unlink_quietly, path)  # also at exit

    @classmethod
    def create(cls, directory: Path, slots: int, views_bytes: int) -> Arena:
        """A new arena of ``slots`` slots for views of up to ``views_bytes`` in ``directory``,
        allocated in full; :class:`ShmError` naming the reason when that cannot be done."""
        if not 1 <= slots <= MAX_SLOTS:
            raise ShmError(f"an arena has 1 to {MAX_SLOTS} slots, not {slots}")
        size = slot_bytes(views_bytes)
        total = arena_bytes(slots, size)
        sweep(directory)  # what dead trainers left
        for _ in range(8):
            path = directory / f"augserver-{uuid.uuid4().hex}.shm"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                             | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                raise ShmError(f"cannot create a shared-memory arena in {directory}: "
                               f"{exc.strerror or exc}") from None
            fcntl.flock(fd, fcntl.LOCK_SH)  # ours while we live; see sweep()
            if _same_file(path, fd):
                break
            os.close(fd)  # a sweep took it between create and lock: try another name
        else:
            raise ShmError(f"cannot create a shared-memory arena in {directory}: it keeps "
                           "disappearing")
        try:
            os.posix_fallocate(fd, 0, total)
            token = secrets.token_bytes(TOKEN_BYTES)
            os.pwrite(fd, _HEAD.pack(MAGIC, token, slots, size), 0)
            return cls(path, fd, token, slots, size)
        except OSError as exc:
            os.close(fd)
            _unlink_quietly(path)
            reason = ("not enough shared memory" if exc.errno == errno.ENOSPC
                      else exc.strerror or str(exc))
            raise ShmError(f"cannot allocate a {total / 2**20:.1f} MiB shared-memory arena in "
                           f"{directory}: {reason}") from None

    def describe(self) -> dict[str, object]:
        """What ``open`` tells the dispatcher (see :mod:`augserver.protocol`)."""
        return {"arena": self.name, "token": self.token, "slots": self.slots,
                "slot_bytes": self.slot_bytes}

    def view(self, index: int, shape: tuple[int, ...]) -> np.ndarray:
        """Slot ``index`` as a uint8 array of ``shape``."""
        return _slot_view(self._map, self.slots, self.slot_bytes, index, shape)

    def unlink(self) -> None:
        """Remove the name (nobody new can attach); the mapping stays usable until close."""
        self._unlink()

    def close(self) -> None:
        """Unlink, release the lock and unmap (arrays still viewing it keep it mapped)."""
        self._unlink()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(BufferError):
            self._map.close()


class Attached:
    """A worker's handle on a trainer's arena: an open file descriptor, never a mapping.

    A worker writes a slot with ``pwrite`` (:meth:`writer`), not through a memory mapping, so
    nothing the arena's owner does to its file can fault the worker: a mapping of a file that
    its owner shrinks (``ftruncate``) raises ``SIGBUS`` on the next write, and a mapping that
    is unmapped while a thread still writes through it raises ``SIGSEGV``; a ``pwrite`` to a
    shrunk file only extends it again, and each writer owns a descriptor of its own. It holds
    no lock: the owner's alone decides the arena's life.
    """

    def __init__(self, path: Path, fd: int, token: bytes, slots: int, slot_bytes: int) -> None:
        self.path = path
        self.token = token
        self.slots = slots
        self.slot_bytes = slot_bytes
        self._fd = fd
        self._ino = os.fstat(fd).st_ino

    def writer(self, index: int, nbytes: int) -> SlotWriter:
        """A writer of ``nbytes`` into slot ``index`` with a descriptor of its own (closing this
        handle, or pruning it, never disturbs a write in progress on another thread)."""
        if self._fd < 0:
            raise ShmError(f"arena {self.path.name} is closed here")
        if not 0 <= index < self.slots or nbytes > self.slot_bytes:
            raise ShmError(f"slot {index} of {nbytes} bytes does not fit an arena of "
                           f"{self.slots} slots of {self.slot_bytes} bytes")
        return SlotWriter(self.path.name, os.dup(self._fd),
                          HEADER_BYTES + index * self.slot_bytes, nbytes)

    def retired(self) -> bool:
        """Whether the arena's name is gone (its owner closed it, or a sweep removed it)."""
        try:
            return os.stat(self.path).st_ino != self._ino
        except OSError:
            return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SlotWriter:
    """Writes one task's views into its slot with ``pwrite``; owns its descriptor until
    :meth:`close` (also when the write fails)."""

    def __init__(self, arena: str, fd: int, offset: int, nbytes: int) -> None:
        self.arena = arena
        self.offset = offset
        self.nbytes = nbytes
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)

    def write(self, views: np.ndarray) -> None:
        """Write ``views`` (C-contiguous uint8 of :attr:`nbytes`) at the slot's offset;
        :class:`ShmError` saying why it could not (the trainer then gets them over TCP)."""
        data = memoryview(np.ascontiguousarray(views)).cast("B")
        if len(data) != self.nbytes:
            raise ShmError(f"{len(data)} bytes of views for a slot write of {self.nbytes}")
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self._fd, data[done:], self.offset + done)
        except OSError as exc:
            raise ShmError(f"cannot write arena {self.arena}: {exc.strerror or exc}") from None

    def close(self) -> None:
        self._close()


def attach(directory: Path, name: str, token: bytes) -> Attached:
    """Open arena ``name`` of ``directory`` if it is there with ``token``; else
    :class:`ShmError` saying why (the usual one on another host: no such arena here)."""
    if not NAME.fullmatch(name):
        raise ShmError(f"{name!r:.80} is not an augserver arena name")
    path = directory / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ShmError(f"no arena {name} in {directory} (the trainer is on another host, or "
                       "does not share this shared-memory directory)") from None
    except OSError as exc:
        raise ShmError(f"cannot open arena {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ShmError(f"arena {path} is not a regular file")
        head = os.pread(fd, _HEAD.size, 0)
        magic, found, slots, size = _HEAD.unpack(head) if len(head) == _HEAD.size else (b"",) * 4
        if magic != MAGIC or found != token:
            raise ShmError(f"arena {path} is not the trainer's (its token differs)")
        if not 1 <= slots <= MAX_SLOTS or size % SLOT_ALIGN or not 0 < size <= MAX_SLOT_BYTES \
                or info.st_size < arena_bytes(slots, size):
            raise ShmError(f"arena {path} has a damaged header")
        return Attached(path, fd, token, slots, size)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


class Attachments:
    """A worker's arenas by name: opened on first use, the reason kept when one cannot be,
    dropped once retired (:meth:`prune`)."""

    MAX = 64

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.mapped: OrderedDict[str, Attached] = OrderedDict()
        self.unusable: OrderedDict[str, str] = OrderedDict()  # name -> why

    def writer(self, slot: Slot, nbytes: int) -> SlotWriter:
        """A writer of ``nbytes`` into ``slot``; :class:`ShmError` if this worker cannot."""
        if self.directory is None:
            self._remember(self.unusable, slot.name, f"shared memory is off here ({ENV}=off)")
        why = self.unusable.get(slot.name)
        if why is not None:
            raise ShmError(why)
        arena = self.mapped.get(slot.name)
        if arena is None or arena.token != slot.token:
            try:
                arena = attach(self.directory, slot.name, slot.token)
            except ShmError as exc:
                self._remember(self.unusable, slot.name, str(exc))
                raise
            self._remember(self.mapped, slot.name, arena)
        return arena.writer(slot.index, nbytes)

    def _remember(self, table: OrderedDict, name: str, value: object) -> None:
        table[name] = value
        table.move_to_end(name)
        while len(table) > self.MAX:
            _, old = table.popitem(last=False)
            if isinstance(old, Attached):
                old.close()

    def prune(self) -> None:
        """Sweep the directory, and close the arenas whose name is gone."""
        if self.directory is None:
            return
        sweep(self.directory)
        for name in [n for n, a in self.mapped.items() if a.retired()]:
            self.mapped.pop(name).close()

    def close(self) -> None:
        for arena in self.mapped.values():
            arena.close()
        self.mapped.clear()


def sweep(directory: Path) -> list[str]:
    """Unlink the arenas in ``directory`` whose owner is dead (an exclusive lock can be taken
    on them); returns their names. Costs one ``open`` and ``flock`` per arena there."""
    try:
        names = [n for n in os.listdir(directory) if NAME.fullmatch(n)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # its owner lives
            continue
        try:
            if _same_file(path, fd):
                os.unlink(path)
                removed.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _slot_view(buffer: mmap.mmap, slots: int, size: int, index: int,
               shape: tuple[int, ...]) -> np.ndarray:
    nbytes = int(np.prod(shape))
    if not 0 <= index < slots or nbytes > size:
        raise ShmError(f"slot {index} of {shape} does not fit an arena of {slots} slots of "
                       f"{size} bytes")
    return np.ndarray(shape, np.uint8, buffer, HEADER_BYTES + index * size)
