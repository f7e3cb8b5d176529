"""The slots of one stream's shared-memory arena as the dispatcher hands them out (no I/O).

A client offers its arena in ``open`` (:mod:`augserver.shm`); the dispatcher then gives each
task for that stream a free slot, unless the worker is known not to see the arena. A slot is
free, out (its task is with a worker), delivered (the client has the batch and not yet
released it: ``credit``'s ``free``), or quarantined: its writer was lost (declared dead,
stalled, or a thread it abandoned may still write), and a slot that someone may still write is
never handed out again. A stream out of free slots sends over TCP: the path falls back, it
never waits. A new connection of the client brings a new arena, with every slot free; a
stream that ended with no slot quarantined (``end``'s ``lost`` is empty) lets the client offer
the same arena for its next stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from augserver.shm import Slot


@dataclass(eq=False)
class SlotPool:
    """One arena's slots: ``free`` (taken last first), ``delivered`` and ``quarantined``;
    ``blind``: the workers that cannot see the arena."""

    arena: str
    token: bytes
    slots: int
    free: list[int] = field(default_factory=list)
    out: set[int] = field(default_factory=set)
    delivered: set[int] = field(default_factory=set)
    quarantined: set[int] = field(default_factory=set)
    blind: set[bytes] = field(default_factory=set)

    @classmethod
    def offered(cls, shm: dict[str, Any]) -> SlotPool:
        """The pool of an ``open``'s valid ``shm`` field, every slot free."""
        return cls(shm["arena"], shm["token"], shm["slots"],
                   list(range(shm["slots"] - 1, -1, -1)))

    def can_take(self, worker: bytes) -> bool:
        return bool(self.free) and worker not in self.blind

    def take(self, worker: bytes) -> int | None:
        """A slot for a task to ``worker``, or None (it goes over TCP)."""
        if not self.can_take(worker):
            return None
        slot = self.free.pop()
        self.out.add(slot)
        return slot

    def wire(self, slot: int) -> dict[str, Any]:
        """``task.slot`` for ``slot``."""
        return Slot(self.arena, self.token, slot).to_wire()

    def untouched(self, slot: int, worker: bytes | None = None) -> None:
        """The task's result came over TCP and nobody writes the slot; ``worker`` given: it
        cannot see the arena (no more slots for it)."""
        if worker is not None:
            self.blind.add(worker)
        self.out.discard(slot)
        self.free.append(slot)

    def deliver(self, slot: int) -> None:
        """The batch in ``slot`` goes to the client, which holds the slot until it releases it."""
        self.out.discard(slot)
        self.delivered.add(slot)

    def lost(self, slot: int) -> None:
        """Someone may still write ``slot``: never hand it out again."""
        self.out.discard(slot)
        self.quarantined.add(slot)

    def unsafe(self) -> list[int]:
        """The slots someone may still write (quarantined or out), sorted: an arena with none
        can serve its client's next stream."""
        return sorted(self.quarantined | self.out)

    def released(self, slots: list[int]) -> None:
        """The client copied these slots out; only delivered ones are freed (a slot named
        twice, or never delivered, is ignored)."""
        for slot in slots:
            if slot in self.delivered:
                self.delivered.discard(slot)
                self.free.append(slot)
