"""The dispatcher's state machine driven directly: no sockets, no clock, milliseconds a test."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from augserver import protocol
from augserver.config import JobConfig, config_from_dict
from augserver.dispatcher_state import (
    CLIENT_TIMEOUT,
    DUPLICATE,
    FAILED,
    LATE,
    REJECTED,
    RELAY,
    DispatcherState,
    Peer,
    Task,
)

pytestmark = pytest.mark.unit

N = 20  # samples; batch 2: 10 positions per single-rank epoch


def config(**keys: object) -> JobConfig:
    data = {"dataset": {"format": "npz", "path": "/nowhere.npz"}, "preprocess": "cifar",
            "batch_size": 2, "limits": {"heartbeat_interval": 1.0, "heartbeat_misses": 3,
                                        "worker_slots": 2}, **keys}
    return config_from_dict(data, check_paths=False)


def open_fields(sid: str = "s", credits: int = 4, done: list[list[int]] | None = None,
                rank: int = 0, world_size: int = 1, slots: int = 0) -> dict[str, object]:
    """An ``open``'s fields; ``slots``: offer an arena of that many slots."""
    shm = {"arena": f"augserver-{sid.encode().hex():0>32}.shm", "token": b"t" * 16,
           "slots": slots, "slot_bytes": 4096 * 8} if slots else None
    return {"stream": sid, "epoch": 0, "rank": rank, "world_size": world_size,
            "ordered": False, "credits": credits, "done": done or [], "skip": None, "shm": shm}


def result(state: DispatcherState, task: Task, indices: list[int] | None = None,
           failed: list[list[object]] | None = None, side: int = 32,
           slot: str | None = None) -> protocol.Message:
    """A worker's result for ``task`` as it arrives off the wire; ``slot`` (the result's
    slot status) defaults to ``written`` when the task has a slot, else ``none``."""
    made = task.batch.tolist() if indices is None else indices
    slot = slot or (protocol.SLOT_WRITTEN if task.slot is not None else protocol.SLOT_NONE)
    views = np.zeros(state.layout.views_shape(len(made)), np.uint8)
    if side != 32:
        views = np.zeros((3, len(made), side, side, 3), np.uint8)
    arrays = [views, np.zeros(len(made), np.int64), np.array(made, np.int64)]
    if slot == protocol.SLOT_WRITTEN:
        arrays = arrays[1:]
    frames = protocol.encode("result", arrays, task=task.id, failed=failed or [], slot=slot)
    return protocol.decode([zmq.Frame(bytes(f)) for f in frames])


def setup(workers: int = 1, credits: int = 4, **keys: object):
    state = DispatcherState(config(**keys), N, 10)
    ws = [state.join(f"w{i}".encode(), "worker", f"w{i}", 0.0) for i in range(workers)]
    for w in ws:
        state.ready(w, 2)
    client = state.join(b"c", "client", "c", 0.0)
    opened = state.open(client, open_fields(credits=credits), 0.0)
    return state, ws, client, opened


def check_invariants(state: DispatcherState) -> None:
    """What must hold between any two events."""
    for stream in state.streams.values():
        assert len(stream.in_flight) <= stream.credits <= stream.cap
        pending, flying = set(stream.pending), set(stream.in_flight)
        assert not pending & flying and not pending & stream.delivered
        assert not flying & stream.delivered
        assert len(pending) + len(flying) == stream.remaining
    for task in state.tasks.values():
        assert task.stream.alive and task.stream.in_flight[task.position] == task.id
        assert task.id in state.peers[task.worker].tasks
    for peer in state.peers.values():
        if peer.role == "worker":
            assert peer.free >= 0 and len(peer.tasks) + peer.free <= state.limits.worker_slots
            assert all(t in state.tasks for t in peer.tasks)
    for stream in state.streams.values():
        pool = stream.shm
        if pool is None:
            continue
        # every slot is in exactly one state, and those out are the tasks'
        states = [set(pool.free), pool.out, pool.delivered, pool.quarantined]
        assert sum(map(len, states)) == pool.slots == len(set().union(*states))
        assert pool.out == {state.tasks[t].slot for t in stream.in_flight.values()} - {None}
    inline = [t for t in state.tasks.values() if t.slot is None]
    assert state.inline_tasks == len(inline)


def test_schedule_returns_tasks_lowest_position_first_within_credits() -> None:
    state, _, _, opened = setup(workers=2, credits=3)
    assert opened.error is None and opened.num_batches == 10
    tasks = state.schedule()
    assert [t.position for t in tasks] == [0, 1, 2]  # 4 free slots, 3 credits
    assert state.schedule() == []
    stream = opened.stream
    np.testing.assert_array_equal(tasks[0].batch, stream.plan.batch(0))
    check_invariants(state)


def test_a_relayed_result_spends_a_credit_and_the_last_one_ends_the_stream() -> None:
    state, (w,), client, opened = setup(credits=10)
    stream = opened.stream
    delivered = []
    while True:
        tasks = state.schedule()
        if not tasks:
            break
        for task in tasks:
            outcome = state.result(w, result(state, task), 1.0)
            assert outcome.kind == RELAY
            delivered.append(task.position)
            state.credit(client, "s", 1, 1.0)
            check_invariants(state)
    assert sorted(delivered) == list(range(10))
    assert outcome.end and not stream.alive and state.streams == {}


def test_a_dead_workers_tasks_are_reissued_and_its_late_result_is_dropped() -> None:
    state, (w0, w1), client, _ = setup(workers=2, credits=4)
    tasks = state.schedule()
    lost = [t for t in tasks if t.worker == w0.ident]
    kept = [t for t in tasks if t.worker == w1.ident]
    assert len(lost) == len(kept) == 2
    assert [(p, s) for p, s in state.expired(3.5) if p.role == "worker"] == [(w0, 3.5), (w1, 3.5)]
    w1.last_seen = 3.0  # w1 heartbeats, w0 stays silent
    assert [p for p, _ in state.expired(3.5) if p.role == "worker"] == [w0]
    state.forget(w0.ident)
    assert state.counters.tasks_reissued == len(lost)
    check_invariants(state)
    assert state.schedule() == []  # w1's slots are full
    for task in kept:
        assert state.result(w1, result(state, task), 4.0).kind == RELAY
    state.credit(client, "s", 2, 4.0)
    again = state.schedule()
    assert [t.position for t in again] == sorted(t.position for t in lost)
    assert all(t.worker == w1.ident for t in again)
    late = state.result(w0, result(state, lost[0]), 4.0)
    assert late.kind == DUPLICATE and state.counters.duplicates_dropped == 1
    check_invariants(state)


def test_a_result_that_does_not_match_its_task_is_rejected_and_reissued() -> None:
    state, (w,), _, _ = setup(credits=1)
    [task] = state.schedule()
    outcome = state.result(w, result(state, task, indices=[task.batch[0] ^ 1, task.batch[1]]),
                           1.0)
    assert outcome.kind == REJECTED and "do not match" in outcome.problem
    [again] = state.schedule()
    assert again.position == task.position and again.id != task.id
    outcome = state.result(w, result(state, again, side=16), 1.0)
    assert outcome.kind == REJECTED and "views are" in outcome.problem
    assert state.counters.tasks_reissued == 2
    check_invariants(state)


def test_failed_samples_relay_with_substitutes_under_skip_and_fail_the_stream_otherwise() -> None:
    cases = [  # (policy, made in the failed sample's place, outcome, words of the error)
        ("skip", "substitute", RELAY, None),
        ("skip", "missing", FAILED, "stand in for it"),
        ("fail", "substitute", FAILED, "error_policy is fail"),
    ]
    for policy, made, kind, words in cases:
        state, (w,), _, opened = setup(credits=1, error_policy=policy)
        [task] = state.schedule()
        bad, good = (int(i) for i in task.batch)
        indices = [(bad + 1) % N, good] if made == "substitute" else [good]
        outcome = state.result(w, result(state, task, indices=indices,
                                         failed=[[bad, "x.png", "broken"]]), 1.0)
        assert outcome.kind == kind and state.counters.samples_failed == 1
        assert state.failures[-1].path == "x.png"
        assert opened.stream.alive == (kind == RELAY)
        if words is not None:
            assert "x.png" in outcome.problem and words in outcome.problem and state.tasks == {}


def test_a_substitute_must_stand_where_a_failed_sample_was_and_labels_in_the_classes() -> None:
    state, (w,), _, _ = setup(credits=4)
    [task, *_] = state.schedule()
    bad, good = (int(i) for i in task.batch)
    swapped = result(state, task, indices=[(bad + 1) % N, good], failed=[])  # no failure named
    assert state.result(w, swapped, 1.0).kind == REJECTED
    [again, *_] = [t for t in state.schedule() if t.position == task.position]
    outside = result(state, again, indices=[N + 5, good], failed=[[bad, "x", "e"]])
    assert state.result(w, outside, 1.0).kind == REJECTED
    [third] = [t for t in state.schedule() if t.position == task.position]
    frames = protocol.encode("result", [np.zeros(state.layout.views_shape(2), np.uint8),
                                        np.array([3, 10]), third.batch], task=third.id,
                             failed=[])
    outcome = state.result(w, protocol.decode([zmq.Frame(bytes(f)) for f in frames]), 1.0)
    assert outcome.kind == REJECTED and "0..9" in outcome.problem  # 10 classes


def test_credits_are_capped_in_bytes_and_late_grants_are_ignored() -> None:
    state = DispatcherState(config(limits={"max_prefetch_bytes": 1}), N, 10)
    client = state.join(b"c", "client", "c", 0.0)
    stream = state.open(client, open_fields(credits=1000), 0.0).stream
    assert stream.cap == 1 and stream.credits == 1
    state.credit(client, "s", 50, 0.0)
    assert stream.credits == 1
    state.credit(client, "gone", 5, 0.0)  # a stream that ended already: nothing happens


def test_open_skips_what_the_client_has_and_refuses_what_it_cannot_plan() -> None:
    state, _, client, _ = setup()
    assert state.open(client, open_fields("t", done=[[0, 10]]), 0.0).stream is None
    partial = state.open(client, open_fields("u", done=[[0, 4], [6, 1 << 40]]), 0.0)
    assert sorted(partial.stream.pending) == [4, 5]
    bad = state.open(client, open_fields("v", rank=3, world_size=2), 0.0)
    assert bad.error is not None and "cannot open stream v" in bad.error


def test_silent_clients_expire_and_take_their_streams_with_them() -> None:
    state, (w,), client, _ = setup()
    tasks = state.schedule()
    assert [p for p, _ in state.expired(CLIENT_TIMEOUT + 1)] == [w, client]
    state.forget(client.ident)
    assert state.streams == {} and state.tasks == {} and w.tasks == set()
    assert state.result(w, result(state, tasks[0]), 40.0).kind == LATE  # its stream ended
    assert state.result(w, result(state, tasks[0]), 40.0).kind == DUPLICATE  # and again


def test_streams_take_turns() -> None:
    state, _, client, _ = setup(workers=2, credits=1)
    state.open(client, open_fields("t", credits=1), 0.0)
    tasks = state.schedule()
    assert sorted(t.stream.id for t in tasks) == ["s", "t"]


EVENTS = st.lists(
    st.tuples(st.sampled_from(["schedule", "answer", "credit", "kill", "join", "ready", "dup"]),
              st.integers(0, 7)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(events=EVENTS, credits=st.integers(0, 5), world_size=st.integers(1, 3),
       slots=st.sampled_from([0, 1, 3]))
def test_any_sequence_of_events_keeps_the_invariants_and_delivers_each_position_once(
    events: list[tuple[str, int]], credits: int, world_size: int, slots: int
) -> None:
    """Also through shared memory (``slots``): workers write slots, cannot see the arena, or
    leave a slot dirty, and the client releases the slots it was delivered as it consumes."""
    state = DispatcherState(config(), N, 10)
    client = state.join(b"c", "client", "c", 0.0)
    streams = [state.open(client, open_fields(f"r{r}", credits, rank=r, world_size=world_size,
                                              slots=slots), 0.0).stream
               for r in range(world_size)]
    workers: list[Peer] = []
    out: list[Task] = []  # tasks handed out and not answered yet, as the workers see them
    delivered: Counter[tuple[str, int]] = Counter()
    answered: list[tuple[Peer, Task]] = []
    held: dict[str, list[int]] = {s.id: [] for s in streams}  # slots the client holds
    statuses = [protocol.SLOT_WRITTEN] * 4 + [protocol.SLOT_UNUSABLE, protocol.SLOT_DIRTY]

    def join() -> None:
        worker = state.join(f"w{len(workers)}".encode(), "worker", "w", 0.0)
        state.ready(worker, 2)
        workers.append(worker)

    def answer(task: Task, k: int = 0) -> None:
        worker = state.peers.get(task.worker)
        if worker is None:
            return
        status = statuses[k % len(statuses)] if task.slot is not None else None
        outcome = state.result(worker, result(state, task, slot=status), 0.0)
        answered.append((worker, task))
        if outcome.kind == RELAY:
            delivered[(task.stream.id, task.position)] += 1
            if outcome.slot is not None:
                held[task.stream.id].append(outcome.slot)

    join()
    for event, k in events:
        if event == "schedule":
            out += state.schedule()
        elif event == "answer" and out:
            answer(out.pop(k % len(out)), k)
        elif event == "credit":
            sid = streams[k % world_size].id
            n = 1 + k % 3
            state.credit(client, sid, n, 0.0, [*held[sid][:n], k])  # and one it never had
            del held[sid][:n]
        elif event == "kill" and workers:
            victim = workers.pop(k % len(workers))
            state.forget(victim.ident)
        elif event == "join":
            join()
        elif event == "ready" and workers:
            state.ready(workers[k % len(workers)], 1 + k % 2)
        elif event == "dup" and answered:
            worker, task = answered[k % len(answered)]
            if worker.ident in state.peers:
                assert state.result(worker, result(state, task), 0.0).kind == DUPLICATE
        check_invariants(state)
    # Drain: the workers answer what they hold; a fresh worker and plenty of credits finish
    # every stream.
    for task in out:
        answer(task)
    join()
    for stream in streams:
        state.credit(client, stream.id, 100, 0.0)
    for _ in range(200):
        out = state.schedule()
        if not out:
            break
        for task in out:
            answer(task)
            state.credit(client, task.stream.id, 1, 0.0, held[task.stream.id])
            held[task.stream.id] = []
        check_invariants(state)
    assert state.streams == {} and state.tasks == {}
    for stream in streams:
        positions = [p for (sid, p), n in delivered.items() if sid == stream.id]
        assert sorted(positions) == list(range(stream.plan.num_batches))
    assert set(delivered.values()) == {1}


@pytest.mark.parametrize("slots", [0, 1, 5])
def test_a_worker_never_holds_more_than_its_slots(slots: int) -> None:
    state, (w,), _, _ = setup(credits=10)
    state.ready(w, slots)
    assert len(state.schedule()) == 2 and w.free == 0
    check_invariants(state)


def test_a_worker_is_warming_and_gets_nothing_until_it_says_ready() -> None:
    state = DispatcherState(config(), N, 10)
    worker = state.join(b"w", "worker", "w", 0.0)
    client = state.join(b"c", "client", "c", 0.0)
    state.open(client, open_fields(credits=4), 0.0)
    assert worker.warming and state.schedule() == []
    assert [w.state for w in state.stats(0.0, uptime=0, address="a", summary={}).workers] == [
        "warming"]
    state.ready(worker, 2)
    assert not worker.warming and len(state.schedule()) == 2
    assert state.stats(0.0, uptime=0, address="a", summary={}).workers[0].state == "ready"


def test_results_for_an_ended_stream_are_late_not_duplicates() -> None:
    state, (w,), _, _ = setup(credits=2, error_policy="fail")
    first, second = state.schedule()
    bad = int(first.batch[0])
    failed = state.result(w, result(state, first, indices=[int(first.batch[1])],
                                    failed=[[bad, "x.png", "broken"]]), 1.0)
    assert failed.kind == FAILED
    assert state.result(w, result(state, second), 1.0).kind == LATE
    assert (state.counters.late_results, state.counters.duplicates_dropped) == (1, 0)
    assert state.ended == {} and w.free == 2  # forgotten once answered; the slots are back


def test_a_task_held_far_longer_than_tasks_take_is_reissued_and_its_late_result_dropped() -> None:
    state, (rogue, honest), client, _ = setup(workers=2, credits=4, limits={
        "heartbeat_interval": 1.0, "heartbeat_misses": 3, "worker_slots": 2,
        "task_seconds": 5.0})
    tasks = state.schedule(0.0)
    for task in [t for t in tasks if t.worker == honest.ident]:  # 1 s each
        assert state.result(honest, result(state, task), 1.0).kind == RELAY
    state.credit(client, "s", 2, 1.0)
    assert state.stall_limit() == 10.0  # 10 x the median of 1 s, above the 5 s floor
    assert state.stalled(9.0) == []
    held = [t for t in tasks if t.worker == rogue.ident]
    assert sorted(t.id for t in state.stalled(10.5)) == sorted(t.id for t in held)
    assert state.counters.tasks_stalled == 2 and rogue.tasks == set()
    check_invariants(state)
    again = state.schedule(10.5)  # to the honest worker: the rogue's slots stay taken
    assert {t.position for t in again} >= {t.position for t in held}
    assert all(t.worker == honest.ident for t in again)
    assert state.result(rogue, result(state, held[0]), 11.0).kind == DUPLICATE


# ---------------------------------------------------------------------------- memory budgets


def relay_all(state: DispatcherState, worker: Peer) -> list:
    """Schedule and answer until nothing more is assigned; the outcomes relayed."""
    relayed = []
    while tasks := state.schedule():
        for task in tasks:
            outcome = state.result(worker, result(state, task), 1.0)
            assert outcome.kind == RELAY
            relayed.append(outcome)
    return relayed


def test_a_client_that_does_not_read_holds_at_most_its_budget_whatever_it_grants() -> None:
    """Credits are the client's word; receipts are proof. A client that grants without
    reading (it cannot return a receipt it never read) gets no more than its byte budget."""
    probe = DispatcherState(config(), N, 10)
    budget = 3 * probe.batch_bytes
    state, (w,), client, opened = setup(credits=1000, limits={
        "max_prefetch_bytes": budget, "worker_slots": 2, "heartbeat_interval": 1.0})
    assert opened.stream.cap == 3
    relayed = relay_all(state, w)
    for _ in range(5):  # lying grants: credits come back, the budget does not
        state.credit(client, "s", 100, 1.0)
        relayed += relay_all(state, w)
    assert len(relayed) == 3
    assert state.client_bytes(client.ident) <= budget
    state.outboxes.seen(client.ident, 12345)  # a guess is not a receipt
    assert relay_all(state, w) == []
    state.outboxes.seen(client.ident, relayed[-1].receipt)  # it read them all
    state.credit(client, "s", 3, 1.0)
    assert len(relay_all(state, w)) == 3
    check_invariants(state)


def test_all_clients_together_stay_within_max_held_bytes() -> None:
    probe = DispatcherState(config(), N, 10)
    limits = {"max_held_bytes": 4 * probe.batch_bytes, "max_prefetch_bytes": 1 << 30,
              "worker_slots": 2, "heartbeat_interval": 1.0}
    state, (w,), _, _ = setup(credits=100, limits=limits)
    second = state.join(b"d", "client", "d", 0.0)
    state.open(second, open_fields("t", credits=100), 0.0)
    relayed = relay_all(state, w)
    assert len(relayed) == 4 and state.held_bytes() <= limits["max_held_bytes"]
    assert {o.task.stream.id for o in relayed} == {"s", "t"}  # they took turns
    last = {o.task.stream.client: o.receipt for o in relayed}
    state.outboxes.seen(b"d", last[b"d"])
    state.credit(second, "t", 2, 1.0)
    more = relay_all(state, w)
    assert more and state.held_bytes() <= limits["max_held_bytes"]


def test_a_peer_holding_nothing_may_always_take_one_batch() -> None:
    """A budget smaller than one batch still lets the job move, one batch at a time."""
    state, (w,), client, _ = setup(credits=100, limits={
        "max_prefetch_bytes": 1, "max_held_bytes": 1, "heartbeat_interval": 1.0})
    (outcome,) = relay_all(state, w)
    state.outboxes.seen(client.ident, outcome.receipt)
    state.credit(client, "s", 1, 1.0)
    assert len(relay_all(state, w)) == 1


def test_streams_per_client_are_capped_by_the_limit() -> None:
    state = DispatcherState(config(limits={"max_streams_per_client": 2}), N, 10)
    client = state.join(b"c", "client", "c", 0.0)
    assert state.open(client, open_fields("a"), 0.0).error is None
    assert state.open(client, open_fields("b"), 0.0).error is None
    third = state.open(client, open_fields("c"), 0.0)
    assert "already has 2 open streams (limits.max_streams_per_client)" in third.error
    assert state.open(client, open_fields("a"), 0.0).error is None  # reopening replaces


def setup_shm(slots: int = 3, credits: int = 3, workers: int = 2, **keys: object):
    """A stream whose client offered an arena of ``slots`` slots, and ready workers."""
    state = DispatcherState(config(**keys), N, 10)
    ws = [state.join(f"w{i}".encode(), "worker", f"w{i}", 0.0) for i in range(workers)]
    for w in ws:
        state.ready(w, 2)
    client = state.join(b"c", "client", "c", 0.0)
    stream = state.open(client, open_fields(credits=credits, slots=slots), 0.0).stream
    return state, ws, client, stream


def test_shared_memory_tasks_carry_free_slots_held_until_the_client_releases_them() -> None:
    state, _ws, client, stream = setup_shm()
    tasks = state.schedule()
    assert len(tasks) == 3 and sorted(t.slot for t in tasks) == [0, 1, 2]
    outcomes = [state.result(state.peers[t.worker], result(state, t), 1.0) for t in tasks]
    assert [o.kind for o in outcomes] == [RELAY] * 3
    assert sorted(o.slot for o in outcomes) == [0, 1, 2] and stream.shm.delivered == {0, 1, 2}
    assert stream.shm.unsafe() == []  # delivered slots are the client's: nobody writes them
    state.credit(client, "s", 1, 1.0, [1, 1, 7])  # a slot named twice, one it never had
    (task,) = state.schedule()
    assert task.slot == 1 and stream.shm.free == []
    assert stream.path() == "shm" and state.counters.batches_shm == 3
    sent = state.outboxes.data_bytes  # three batch messages: labels and indices alone
    assert sent < 512 and state.held_bytes() == sent  # the pixels never pass through here
    state.credit(client, "s", 1, 1.0)  # a credit without a slot: over TCP, no waiting
    (inline,) = state.schedule()
    assert inline.slot is None and state.held_bytes() == sent + state.batch_bytes
    check_invariants(state)


def test_a_worker_that_cannot_see_the_arena_sends_over_tcp_and_gets_no_slot_again() -> None:
    state, (w0, _w1), client, stream = setup_shm(slots=4, credits=4)
    tasks = state.schedule()
    blind = next(t for t in tasks if t.worker == w0.ident)
    slot = blind.slot
    outcome = state.result(w0, result(state, blind, slot=protocol.SLOT_UNUSABLE), 1.0)
    assert outcome.kind == RELAY and outcome.slot is None
    assert slot in stream.shm.free and w0.ident in stream.shm.blind
    assert stream.path() == "tcp"  # so far
    state.credit(client, "s", 1, 1.0)
    again = [t for t in state.schedule() if t.worker == w0.ident]
    assert again and all(t.slot is None for t in again)
    for t in tasks:
        if t is not blind:
            state.result(state.peers[t.worker], result(state, t), 1.0)
    assert stream.path() == "shm+tcp" and state.counters.batches_tcp == 1
    check_invariants(state)


def test_a_slot_its_writer_may_still_write_is_never_handed_out_again() -> None:
    state, (w0, w1), client, stream = setup_shm(slots=3, credits=3)
    tasks = state.schedule()
    lost = [t.slot for t in tasks if t.worker == w0.ident]
    state.forget(w0.ident)  # dead or frozen: it might still be writing
    assert set(lost) <= stream.shm.quarantined
    task = next(t for t in tasks if t.worker == w1.ident)
    slot = task.slot
    outcome = state.result(w1, result(state, task, slot=protocol.SLOT_DIRTY), 1.0)
    assert outcome.kind == RELAY and outcome.slot is None  # its views came over TCP
    assert slot in stream.shm.quarantined
    assert stream.shm.unsafe() == sorted(stream.shm.quarantined)  # what `end` will list
    # no slot left: the stream goes on over TCP, within the dispatcher's byte budget
    state.credit(client, "s", 1, 1.0)
    rest = state.schedule()
    assert rest and all(t.slot is None for t in rest)
    assert state.held_bytes() == state.outboxes.data_bytes + state.batch_bytes * len(rest)
    check_invariants(state)


def test_a_result_claiming_a_slot_it_was_not_given_is_rejected() -> None:
    state, (w,), _, _ = setup()
    task = state.schedule()[0]
    outcome = state.result(w, result(state, task, slot=protocol.SLOT_WRITTEN), 1.0)
    assert outcome.kind == REJECTED and "given none" in outcome.problem
    check_invariants(state)


def test_a_shared_memory_stream_is_capped_by_its_slots_not_the_dispatchers_budget() -> None:
    probe = DispatcherState(config(), N, 10)
    limits = {"max_prefetch_bytes": probe.batch_bytes, "heartbeat_interval": 1.0,
              "worker_slots": 4}
    state, _ws, client, stream = setup_shm(slots=6, credits=6, limits=limits)
    assert stream.cap == 6 and len(state.schedule()) == 4  # 2 workers x 2 slots
    tcp = state.open(client, open_fields("t", credits=6), 0.0).stream
    assert tcp.cap == 1
    check_invariants(state)


def test_peers_that_never_read_cannot_starve_a_client_that_reads() -> None:
    """Two peers take batches with huge credits and never read (no receipts); they fill the
    shared part of max_held_bytes, and a third client that reads still gets batches, its
    reserved share every time it reads."""
    probe = DispatcherState(config(), N, 10)
    limits = {"max_held_bytes": 8 * probe.batch_bytes, "max_prefetch_bytes": 1 << 30,
              "worker_slots": 2, "heartbeat_interval": 1.0}
    state, (w,), _, _ = setup(credits=1000, limits=limits)
    hog = state.join(b"h", "client", "h", 0.0)
    state.open(hog, open_fields("h", credits=1000), 0.0)
    relay_all(state, w)
    assert state.held_bytes() >= limits["max_held_bytes"] // 2  # the hogs hold their fill
    reader = state.join(b"r", "client", "r", 0.0)
    state.open(reader, open_fields("r", credits=4), 0.0)
    received = 0
    for _ in range(3):
        mine = [o for o in relay_all(state, w) if o.task.stream.client == b"r"]
        assert mine, "the reading client got nothing"
        received += len(mine)
        state.outboxes.seen(b"r", mine[-1].receipt)  # it reads what it got
        state.credit(reader, "r", len(mine), 1.0)
    assert received >= 3
    assert state.held_bytes() <= limits["max_held_bytes"] + probe.batch_bytes
    check_invariants(state)
