"""What the dispatcher has sent to each peer and not yet seen read, in bytes and replies.

ZeroMQ keeps what a peer does not read in the sending process, without limit: a peer that asks
and never reads would grow the dispatcher for ever. So every message the dispatcher sends
carries a fresh random receipt (the envelope's ``r``, see :mod:`augserver.protocol`), and every
peer returns, on the messages it sends, the receipt of the latest message it has read. One
peer's messages arrive in the order sent, so a receipt proves that everything sent to that peer
up to it has left the dispatcher. What was sent after the last receipt returned may still sit
in the dispatcher's memory: an :class:`Outbox` counts it, and :class:`Outboxes` keeps one per
peer with the total over all of them.

A receipt cannot be guessed (63 random bits), so a peer that does not read cannot pretend it
did. Three kinds of message are counted:

- :data:`REPLY`: answers to ``ping``, ``heartbeat`` and ``hello``, errors, ``opened``/``end``;
  refused once a peer has ``max_replies`` of them unread (the dispatcher drops them);
- :data:`DATA`: batches; never refused here, the scheduler keeps them within its byte budgets;
- :data:`TASK`: tasks to workers; never refused, bounded by the worker's slots.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from augserver.protocol import MAX_RECEIPT, size

RECEIPT_BITS = MAX_RECEIPT.bit_length()
DATA, REPLY, TASK = 0, 1, 2
MAX_IDLE_OUTBOXES = 4096
"""Outboxes holding no data kept for peers that are gone or never joined (status requests,
strangers); the least recently used beyond this are forgotten."""

_draw = random.Random().getrandbits  # seeded from os.urandom; receipts decide no pixel


@dataclass
class Outbox:
    """One peer's messages sent and not yet shown read, oldest first."""

    entries: deque[tuple[int, int, int]] = field(default_factory=deque)  # receipt, bytes, kind
    receipts: set[int] = field(default_factory=set)
    data_bytes: int = 0
    reply_bytes: int = 0
    replies: int = 0
    task_bytes: int = 0
    dropped: int = 0  # replies refused since the peer last showed it reads

    def add(self, nbytes: int, kind: int) -> int:
        """Record one message of ``nbytes`` and ``kind``; returns the receipt to stamp on it."""
        receipt = _draw(RECEIPT_BITS) or 1
        while receipt in self.receipts:
            receipt = _draw(RECEIPT_BITS) or 1
        self.entries.append((receipt, nbytes, kind))
        self.receipts.add(receipt)
        self._count(nbytes, kind, 1)
        return receipt

    def resize_last(self, nbytes: int) -> None:
        """Set the size of the message recorded last (known once it is packed)."""
        receipt, old, kind = self.entries[-1]
        self.entries[-1] = (receipt, nbytes, kind)
        self._count(nbytes - old, kind, 0)

    def _count(self, nbytes: int, kind: int, messages: int) -> None:
        """Add ``nbytes`` (negative to take away) and ``messages`` to ``kind``'s totals."""
        if kind == DATA:
            self.data_bytes += nbytes
        elif kind == REPLY:
            self.replies += messages
            self.reply_bytes += nbytes
        else:
            self.task_bytes += nbytes

    def seen(self, receipt: int) -> int:
        """The peer has read up to the message stamped ``receipt``: forget it and all before
        it. Returns the data bytes released (0 for a receipt this outbox never gave)."""
        if receipt not in self.receipts:
            return 0
        self.dropped = 0
        released = 0
        while True:
            stamped, nbytes, kind = self.entries.popleft()
            self.receipts.discard(stamped)
            self._count(-nbytes, kind, -1)
            if kind == DATA:
                released += nbytes
            if stamped == receipt:
                return released


class Outboxes:
    """The outbox of every peer the dispatcher sends to, and the data unread over all of them.

    Outboxes outlive the peer's session (a peer that says ``hello`` again keeps what it has not
    read); one is dropped only when its peer's connection is gone (:meth:`release`), or, holding
    no data, when it is among the least recently used beyond :data:`MAX_IDLE_OUTBOXES`.
    """

    def __init__(self, max_replies: int, max_idle: int = MAX_IDLE_OUTBOXES) -> None:
        self.max_replies = max_replies
        self.max_idle = max_idle
        self.boxes: OrderedDict[bytes, Outbox] = OrderedDict()
        self.data_bytes = 0  # data unread, over all outboxes

    def _box(self, ident: bytes) -> Outbox:
        box = self.boxes.get(ident)
        if box is None:
            box = self.boxes[ident] = Outbox()
            self._trim()
        else:
            self.boxes.move_to_end(ident)
        return box

    def _trim(self) -> None:
        """Forget the least recently used outboxes holding no data, down to the bound."""
        excess = len(self.boxes) - self.max_idle
        if excess <= 0:
            return
        idle = []
        for ident, box in self.boxes.items():  # least recently used first
            if not box.data_bytes:
                idle.append(ident)
                if len(idle) == excess:
                    break
        for ident in idle:
            del self.boxes[ident]

    def reply(self, ident: bytes, pack: Callable[[int], list[Any]]) -> list[Any] | None:
        """The frames of a reply to ``ident``, ``pack(receipt)``, recorded; None when it must
        be dropped (``max_replies`` unread already), and then it is not packed at all."""
        box = self._box(ident)
        if box.replies >= self.max_replies:
            box.dropped += 1
            return None
        receipt = box.add(0, REPLY)
        frames = pack(receipt)
        box.resize_last(size(frames))
        return frames

    def data(self, ident: bytes, nbytes: int) -> int:
        """The receipt for a batch of ``nbytes`` to ``ident``; never refused."""
        self.data_bytes += nbytes
        return self._box(ident).add(nbytes, DATA)

    def task(self, ident: bytes, nbytes: int) -> int:
        """The receipt for a task of ``nbytes`` to worker ``ident``; never refused."""
        return self._box(ident).add(nbytes, TASK)

    def seen(self, ident: bytes, receipt: int) -> None:
        """``ident`` returned ``receipt`` (0: none)."""
        if receipt:
            box = self.boxes.get(ident)
            if box is not None:
                self.data_bytes -= box.seen(receipt)

    def unread_data(self, ident: bytes) -> int:
        """Data bytes sent to ``ident`` and not yet shown read."""
        box = self.boxes.get(ident)
        return box.data_bytes if box is not None else 0

    def unread_replies(self, ident: bytes) -> int:
        """Replies sent to ``ident`` and not yet shown read."""
        box = self.boxes.get(ident)
        return box.replies if box is not None else 0

    def dropping(self, ident: bytes) -> int:
        """Replies to ``ident`` dropped since it last showed it reads."""
        box = self.boxes.get(ident)
        return box.dropped if box is not None else 0

    def unread_reply_bytes(self) -> int:
        """Bytes of replies not yet shown read, over all outboxes."""
        return sum(box.reply_bytes for box in self.boxes.values())

    def holding(self) -> list[bytes]:
        """The peers with data unread."""
        return [ident for ident, box in self.boxes.items() if box.data_bytes]

    def release(self, ident: bytes) -> None:
        """``ident``'s connection is gone, and with it what ZeroMQ held for it."""
        box = self.boxes.pop(ident, None)
        if box is not None:
            self.data_bytes -= box.data_bytes
