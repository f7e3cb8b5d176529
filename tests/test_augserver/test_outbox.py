"""augserver.outbox: what was sent and not yet shown read, bounded."""

from __future__ import annotations

import pytest

from augserver.outbox import DATA, REPLY, Outbox, Outboxes

pytestmark = pytest.mark.unit


def reply(boxes: Outboxes, ident: bytes, nbytes: int) -> int | None:
    """Send a reply of ``nbytes`` to ``ident`` through ``boxes``; its receipt, or None."""
    stamped: list[int] = []

    def pack(receipt: int) -> list[bytes]:
        stamped.append(receipt)
        return [bytes(nbytes)]

    return stamped[0] if boxes.reply(ident, pack) is not None else None


def test_a_receipt_releases_everything_sent_up_to_it_and_nothing_after() -> None:
    box = Outbox()
    first = box.add(100, DATA)
    box.add(10, REPLY)
    third = box.add(200, DATA)
    fourth = box.add(5, REPLY)
    assert (box.data_bytes, box.replies, box.reply_bytes) == (300, 2, 15)
    assert box.seen(third) == 300
    assert (box.data_bytes, box.replies, box.reply_bytes) == (0, 1, 5)
    assert box.seen(first) == 0  # already released: nothing happens
    assert box.seen(fourth) == 0 and box.replies == 0 and not box.entries


def test_receipts_are_distinct_and_unguessable_in_practice() -> None:
    box = Outbox()
    receipts = [box.add(1, DATA) for _ in range(1000)]
    assert len(set(receipts)) == 1000 and all(0 < r < 1 << 63 for r in receipts)
    assert box.seen(max(receipts) + 1) == 0 and box.data_bytes == 1000


def test_replies_beyond_the_cap_are_refused_until_the_peer_reads() -> None:
    boxes = Outboxes(max_replies=3)
    receipts = [reply(boxes, b"p", 50) for _ in range(3)]
    assert all(receipts)
    assert reply(boxes, b"p", 50) is None and reply(boxes, b"p", 50) is None
    assert boxes.dropping(b"p") == 2 and boxes.unread_replies(b"p") == 3
    assert boxes.boxes[b"p"].reply_bytes == 150  # each reply counted at its packed size
    assert reply(boxes, b"q", 50) is not None  # another peer is not affected
    boxes.seen(b"p", receipts[1])
    assert boxes.dropping(b"p") == 0 and boxes.unread_replies(b"p") == 1
    assert reply(boxes, b"p", 50) is not None


def test_data_is_never_refused_and_is_counted_over_all_peers() -> None:
    boxes = Outboxes(max_replies=1)
    a = [boxes.data(b"a", 1000) for _ in range(5)]
    boxes.data(b"b", 500)
    assert boxes.data_bytes == 5500 and boxes.unread_data(b"a") == 5000
    boxes.seen(b"a", a[1])
    assert boxes.data_bytes == 3500
    assert boxes.holding() == [b"a", b"b"]
    boxes.release(b"b")  # its connection is gone
    assert boxes.data_bytes == 3000 and boxes.holding() == [b"a"]


def test_idle_outboxes_beyond_the_bound_are_forgotten_but_never_one_holding_data() -> None:
    boxes = Outboxes(max_replies=2, max_idle=3)
    boxes.data(b"holder", 10)
    for i in range(10):
        reply(boxes, f"stranger{i}".encode(), 10)
    assert len(boxes.boxes) <= 4 and b"holder" in boxes.boxes
    assert boxes.data_bytes == 10


def test_tasks_are_neither_refused_nor_counted_as_batches() -> None:
    """Tasks are bounded by the worker's slots; their receipts still release what came before."""
    boxes = Outboxes(max_replies=1)
    reply(boxes, b"w", 10)
    task = boxes.task(b"w", 100)
    assert boxes.data_bytes == 0 and boxes.holding() == []
    assert reply(boxes, b"w", 10) is None  # the heartbeat reply before it is still unread
    boxes.seen(b"w", task)
    assert boxes.unread_replies(b"w") == 0 and not boxes.boxes[b"w"].entries
