"""A message its recipient's client receipted before the server wrote it
needs no write (issue 18, the store's work per message): its store
operation is withdrawn, its sender is told DELIVERED and ACCEPT at once,
and a resend in the same server life gets the same answers from memory.

In memory first: a `Relay` with a real `ServerStore` (SQLite in tmp_path,
its thread running) and clients made of `reliability.Connection`s on a
fake `now` (test_ordinary_load's helpers), stepped by hand. Counts, never
durations: commits, operations withdrawn and skipped, datagrams, rows.
Last, real processes: the server SIGKILLed while such messages flow."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import chat_server
from chat_server import COMMIT_WAIT
from protocol import (
    Accept,
    Delivered,
    ErrorCode,
    Fail,
    Message,
    MsgId,
    Receipt,
    encode_message,
)
from server_records import Session
from server_store import MarkDelivered, NoticeDone, StoreDedup
from tests.test_durability import ServerRunner, Watcher, check_state_sequences, query, wait_all
from tests.test_mailbox_disk import World, rows
from tests.test_ordinary_load import (
    FakeClock,
    alice_datagrams,
    drain,
    send_one,
    wait_for_store,
    warm_up,
)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "data", clock=FakeClock())
    w.login("alice")
    w.login("bob")
    warm_up(w)
    yield w
    w.close()


@pytest.fixture
def watchers() -> Iterator[Callable[..., Watcher]]:
    """Make `Watcher`s (test_durability's); every one is stopped at the end."""
    made: list[Watcher] = []

    def make(name: str, **kwargs: Any) -> Watcher:
        made.append(Watcher(name, **kwargs))
        return made[-1]

    yield make
    for watcher in made:
        watcher.dispose()


def receipt_pass(world: World, server_msg_id: int) -> tuple[int, list[Message]]:
    """Bob's receipt reaches the relay; the pass's sends and end. Returns
    how many datagrams went to alice in that pass and what they held, in
    order (alice's connection does not answer: nothing is acked)."""
    relay = world.relay
    bob = world.conns["bob"]
    bob.send(encode_message(Receipt(server_msg_id)))
    for data in bob.datagrams_to_send(world.now):
        relay.receive_datagram(data, world.addrs["bob"], world.now)
    out = relay.datagrams_to_send(world.now)
    world.route(out)
    relay.flush_store(world.now)
    return sum(addr == world.addrs["alice"] for _, addr in out), drain(world, "alice")


def hold_the_store_thread(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Event, threading.Event]:
    """Make the store thread stop inside its next commit (`_apply`): the
    first event is set once it is there, and it goes on once the second is."""
    applying, go_on = threading.Event(), threading.Event()
    apply = world.store._apply

    def held_apply(ops: list[Any]) -> None:
        applying.set()
        go_on.wait(30)
        apply(ops)

    monkeypatch.setattr(world.store, "_apply", held_apply)
    return applying, go_on


def end_the_wait(world: World) -> None:
    """COMMIT_WAIT passes without receipts: the relay hands the store its batch."""
    world.now += COMMIT_WAIT
    world.relay.handle_timer(world.now)
    world.relay.flush_store(world.now)


def test_a_message_receipted_within_the_wait_is_never_written(world: World) -> None:
    """Bob receipts 0.3 ms after the DELIVER: alice is told DELIVERED, then
    ACCEPT, in one datagram of the receipt's pass, before any commit; the
    message's write is withdrawn from the pass's writes (the last one: it
    leaves the list, so nothing is handed to the store thread at all): no
    commit for it; only its dedup key is written, lazily (with the next
    commit: no row of any other kind, counts unchanged)."""
    store, relay = world.store, world.relay
    commits, handed = store.commits, store.handed
    got = send_one(world, "hello bob", MsgId(9, 2))
    world.now += 0.0003
    datagrams, told = receipt_pass(world, got[0].server_msg_id)
    assert datagrams == 1
    assert [type(m) for m in told] == [Delivered, Accept]
    assert told[0].msg_id == MsgId(9, 2) and told[0].to == "bob"  # type: ignore[union-attr]
    assert told[1] == Accept(MsgId(9, 2), got[0].server_msg_id)
    assert (store.commits, store.handed) == (commits, handed), "it waited for the store"
    assert (store.withdrawn_pending, store.withdrawn_queued) == (1, 0)
    assert [type(op) for op, _ in store._pending] == [StoreDedup] and not store._urgent, (
        "a hand-over (a wake-up of the store thread) for nothing"
    )
    store.flush(force=True)
    wait_for_store(store)
    assert store.commits == commits + 1, "more than the lazy dedup key's commit"
    data = store.data_dir
    assert rows(data, "SELECT COUNT(*) FROM mailbox") == [(0,)]
    assert rows(data, "SELECT COUNT(*) FROM dedup WHERE client_seq=2") == [(1,)]
    assert rows(data, "SELECT COUNT(*) FROM notices") == [(0,)]
    assert rows(data, "SELECT COUNT(*) FROM summary") == [(0,)]
    assert relay.users["bob"].mailbox_count == 0 and relay.users["bob"].mailbox_bytes == 0
    assert relay.users["alice"].notice_count == 0
    assert not relay._unwritten and not relay._accepted


def test_a_receipt_after_the_hand_over_has_the_store_thread_skip_the_write(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store thread is busy with an earlier batch (message 2, nobody
    receipted it) when message 3's wait ends: its batch is handed over and
    waits in the queue. Its receipt comes then: withdrawn, alice is told at
    once (before message 2's commit), and the thread skips the write when
    it gets to that batch; message 2 is written and accepted as before."""
    store = world.store
    applying, go_on = hold_the_store_thread(world, monkeypatch)
    first = send_one(world, "nobody receipts me", MsgId(9, 2))
    end_the_wait(world)
    assert applying.wait(30)
    second = send_one(world, "receipted late", MsgId(9, 3))
    end_the_wait(world)
    handed = store.handed
    world.now += 0.0001
    datagrams, told = receipt_pass(world, second[0].server_msg_id)
    assert store.handed == handed
    assert datagrams == 1
    assert [type(m) for m in told] == [Delivered, Accept]
    assert told[1] == Accept(MsgId(9, 3), second[0].server_msg_id)
    assert (store.withdrawn_pending, store.withdrawn_queued) == (0, 1)
    go_on.set()
    alice_datagrams(world)
    assert Accept(MsgId(9, 2), first[0].server_msg_id) in world.answers("alice")
    wait_for_store(store)
    assert store.skipped == 1
    data = store.data_dir
    assert rows(data, "SELECT client_seq FROM mailbox") == [(2,)]
    assert rows(data, "SELECT client_seq FROM dedup WHERE client_seq>1") == [(2,)]
    assert world.relay.users["bob"].mailbox_count == 1


def test_a_message_not_receipted_in_time_still_waits_for_its_commit(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No receipt within the wait: the write goes to the store thread, and
    a receipt that comes once the thread has taken it is too late to
    withdraw it. Nothing reaches alice before the commit (neither ACCEPT nor
    DELIVERED); then both, in one datagram; the message and its dedup key
    are on the disk, and the receipt is queued for her."""
    store = world.store
    applying, go_on = hold_the_store_thread(world, monkeypatch)
    got = send_one(world, "slow", MsgId(9, 2))
    end_the_wait(world)
    assert applying.wait(30)
    world.now += 0.0001
    datagrams, told = receipt_pass(world, got[0].server_msg_id)
    assert (datagrams, told) == (0, [])
    world.relay.store_done(world.now)
    assert not world.relay.datagrams_to_send(world.now)
    assert store.withdrawn_pending + store.withdrawn_queued == 0
    go_on.set()
    assert len(alice_datagrams(world)) == 1
    assert world.answers("alice") == [Accept(MsgId(9, 2), got[0].server_msg_id)]
    assert world.delivereds("alice") == [MsgId(9, 2)]
    store.flush(force=True)  # the receipt's lazy write
    wait_for_store(store)
    data = store.data_dir
    assert rows(data, "SELECT client_seq FROM dedup WHERE client_seq=2") == [(2,)]
    assert rows(data, "SELECT client_seq FROM notices") == [(2,)]


def test_a_sender_whose_session_is_ending_gets_the_durable_path(world: World) -> None:
    """Alice's session is closing (her LOGOUT came in the same pass) when
    bob's receipt comes before the commit: nothing is withdrawn; the message
    and her receipt are written, for her next login."""
    store, relay = world.store, world.relay
    got = send_one(world, "bye", MsgId(9, 2))
    alice = relay.router.locate(relay.users["alice"])
    assert isinstance(alice, Session)
    alice.closing = True
    world.now += 0.0003
    receipt_pass(world, got[0].server_msg_id)
    assert store.withdrawn_pending + store.withdrawn_queued == 0
    store.flush(force=True)
    wait_for_store(store)
    data = store.data_dir
    assert rows(data, "SELECT client_seq FROM dedup WHERE client_seq=2") == [(2,)]
    assert rows(data, "SELECT client_seq FROM notices") == [(2,)]


def test_a_resend_in_the_same_server_life_gets_the_same_answers_and_no_copy(
    world: World,
) -> None:
    """Alice's client never acked the DELIVERED and ACCEPT (her session was
    replaced by a new login of the same client): her resend is answered
    from memory with the same server_msg_id and DELIVERED again, bob gets
    no second copy, and the same id with other content is `duplicate_id`.
    Once its dedup key is committed (lazily), the entry goes."""
    store, relay = world.store, world.relay
    got = send_one(world, "just once", MsgId(9, 2))
    world.now += 0.0003
    _, told = receipt_pass(world, got[0].server_msg_id)
    assert Accept(MsgId(9, 2), got[0].server_msg_id) in told
    world.login("alice")  # the same instance again: the old session is gone
    world.inbox["alice"].clear()
    world.send("alice", "bob", "something else", MsgId(9, 2))
    world.send("alice", "bob", "just once", MsgId(9, 2))
    world.pump()
    answers = world.answers("alice")
    assert [type(a) for a in answers] == [Fail, Accept]
    assert isinstance(answers[0], Fail) and answers[0].reason == ErrorCode.DUPLICATE_ID
    assert answers[1] == Accept(MsgId(9, 2), got[0].server_msg_id)
    assert world.delivereds("alice") == [MsgId(9, 2)]
    assert [d.msg_id for d in world.delivers("bob")].count(MsgId(9, 2)) == 1
    assert not relay._early and relay._early_bytes == 0, "kept after its dedup key's commit"
    wait_for_store(store)
    assert rows(store.data_dir, "SELECT COUNT(*) FROM dedup WHERE client_seq=2") == [(1,)]


def test_past_max_early_a_message_is_written_as_usual(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_EARLY no entry is evicted (that reopened a reused id and a
    resend judged as new): the next receipted message takes the written
    path, its receipt queued, DELIVERED after its ACCEPT."""
    monkeypatch.setattr(chat_server, "MAX_EARLY", 1)
    relay = world.relay
    first = send_one(world, "first", MsgId(9, 2))
    world.now += 0.0003
    receipt_pass(world, first[0].server_msg_id)
    second = send_one(world, "second", MsgId(9, 3))
    world.now += 0.0003
    receipt_pass(world, second[0].server_msg_id)
    assert list(relay._early) == [("alice", 9, 2)]
    world.pump()
    assert not relay._early
    assert Accept(MsgId(9, 3), second[0].server_msg_id) in world.answers("alice")
    assert world.delivereds("alice") == [MsgId(9, 2), MsgId(9, 3)]
    assert rows(world.store.data_dir, "SELECT COUNT(*) FROM dedup WHERE client_seq>1") == [(2,)]


def record_writes(world: World, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every operation the relay submits to the store from now on."""
    ops: list[object] = []
    submit = world.store.submit

    def recording(op: Any, then: Any = None) -> None:
        ops.append(op)
        submit(op, then)

    monkeypatch.setattr(world.store, "submit", recording)
    return ops


def written_and_accepted(world: World, text: str, msg_id: MsgId) -> int:
    """A message to bob nobody receipts in time: written, accepted; its server id."""
    got = send_one(world, text, msg_id)
    end_the_wait(world)
    alice_datagrams(world)
    assert world.answers("alice")[-1] == Accept(msg_id, got[0].server_msg_id)
    return got[0].server_msg_id


def test_a_receipt_told_at_once_is_written_without_a_queued_receipt(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob receipts a message already written; alice is online: she is told
    DELIVERED at once and the receipt's write waits until her client acks
    it, then goes without a queued receipt (before: a `notices` row
    inserted, then deleted by a `NoticeDone` after her ack, and her count
    of receipts moved up and down)."""
    store, relay = world.store, world.relay
    server_msg_id = written_and_accepted(world, "on the disk", MsgId(9, 2))
    ops = record_writes(world, monkeypatch)
    world.now += 0.001
    _, told = receipt_pass(world, server_msg_id)
    assert told == [Delivered(MsgId(9, 2), "bob")]
    assert not [op for op in ops if isinstance(op, MarkDelivered)], "written before the ack"
    assert relay.users["alice"].notice_count == 0
    world.pump()  # alice's client acks the DELIVERED
    marks = [op for op in ops if isinstance(op, MarkDelivered)]
    assert len(marks) == 1 and marks[0].told
    assert not [op for op in ops if isinstance(op, NoticeDone)]
    store.flush(force=True)
    wait_for_store(store)
    data = store.data_dir
    assert rows(data, "SELECT COUNT(*) FROM mailbox") == [(0,)]
    assert rows(data, "SELECT COUNT(*) FROM notices") == [(0,)]
    assert rows(data, "SELECT COUNT(*) FROM summary") == [(0,)]
    assert relay.users["alice"].notice_count == 0 and relay.users["bob"].mailbox_count == 0
    assert not relay._held and not relay._held_ids


def test_a_held_receipt_is_queued_when_the_senders_session_ends_first(world: World) -> None:
    """Alice's session ends before her client acked the DELIVERED (she logs
    in again from the same client): the held receipt is written as a queued
    one, and her new session is told DELIVERED from the queue; once acked,
    the queue is empty."""
    store, relay = world.store, world.relay
    server_msg_id = written_and_accepted(world, "told, not acked", MsgId(9, 2))
    world.now += 0.001
    receipt_pass(world, server_msg_id)
    assert relay._held
    world.inbox["alice"].clear()
    world.login("alice")
    assert world.delivereds("alice") == [MsgId(9, 2)]
    assert not relay._held and not relay._held_ids
    store.flush(force=True)
    wait_for_store(store)
    data = store.data_dir
    assert rows(data, "SELECT COUNT(*) FROM mailbox") == [(0,)]
    assert rows(data, "SELECT COUNT(*) FROM notices") == [(0,)]
    assert relay.users["alice"].notice_count == 0


def test_held_receipts_are_written_queued_when_the_server_stops(world: World) -> None:
    """A server told to stop (SIGTERM) writes the receipts it held with its
    last commit, queued for their senders' next logins: none is left to be
    worked out again from the mailbox."""
    store, relay = world.store, world.relay
    server_msg_id = written_and_accepted(world, "held at the stop", MsgId(9, 2))
    world.now += 0.001
    receipt_pass(world, server_msg_id)
    relay.send_shutdown(world.now)
    assert not relay._held
    store.flush(force=True)
    wait_for_store(store)
    data = store.data_dir
    assert rows(data, "SELECT COUNT(*) FROM mailbox") == [(0,)]
    assert rows(data, "SELECT client_seq FROM notices") == [(2,)]


def test_a_held_receipts_message_is_not_handed_to_the_recipients_next_session(
    world: World,
) -> None:
    """Bob logs in again while his receipt's write is held (alice has not
    acked her DELIVERED): the message is still in his mailbox on the disk,
    but his new session is not handed it again, and his counts stay right."""
    relay = world.relay
    server_msg_id = written_and_accepted(world, "read once", MsgId(9, 2))
    written_and_accepted(world, "not receipted yet", MsgId(9, 3))  # bob's login reads a page
    world.now += 0.001
    receipt_pass(world, server_msg_id)
    assert relay._held_ids == {server_msg_id}
    assert rows(world.store.data_dir, "SELECT COUNT(*) FROM mailbox") == [(2,)]
    world.inbox["bob"].clear()
    world.login("bob")
    assert [d.msg_id for d in world.delivers("bob")] == [MsgId(9, 3)]
    world.pump()
    assert relay.users["bob"].mailbox_count == 0
    world.store.flush(force=True)
    wait_for_store(world.store)
    assert rows(world.store.data_dir, "SELECT COUNT(*) FROM mailbox") == [(0,)]
    assert rows(world.store.data_dir, "SELECT COUNT(*) FROM summary") == [(0,)]


# --- real processes: kill -9 right after such answers went out -------------------------


def test_kill9_after_unwritten_accepts_loses_nothing_and_shows_nothing_twice(
    tmp_path: Path, watchers: Callable[..., Watcher]
) -> None:
    """Alice sends to bob, online, 20 messages a second; the server is
    SIGKILLed right after alice was told some of them DELIVERED (with the
    next ones in flight) and started again on its data. Those told before
    the kill have no mailbox or notices row on the disk (they were never
    written; their dedup keys are, lazily, if the kill came late enough),
    and yet: every message shown exactly once at bob, in order, and all of
    alice's states end `delivered`, each reached once, in order."""
    # Whether a message takes the path without a write depends on the
    # timing of the kill (on a loaded machine the lazy writes may all have
    # gone by then): what is promised is checked in every round; a round
    # only counts as proof of the path if it took it, so up to three go.
    for round_no in range(3):
        if _kill9_round(tmp_path / f"server-data{round_no}", watchers, round_no):
            return
    raise AssertionError("no message took the path without a write in three rounds")


def _kill9_round(data_dir: Path, watchers: Callable[..., Watcher], round_no: int) -> int:
    """One round of the test above; returns how many messages told DELIVERED
    before the kill were never written (all else is asserted here)."""
    runner = ServerRunner(data_dir)
    runner.start()
    try:
        alice = watchers(f"alice{round_no}", keepalive=1.0)
        bob = watchers(f"bob{round_no}", keepalive=1.0)
        bob.login(runner.address)
        alice.login(runner.address, f"bob{round_no}")
        wait_all([alice, bob], lambda: alice.logins == bob.logins == 1, 30, "two logins")
        sent: list[tuple[str, str]] = []

        def top_up(upto: int) -> None:
            while len(sent) < upto:
                text = f"m{len(sent):03d}"
                sent.append((alice.send(text), text))
                alice.pump()

        started = time.monotonic()
        while not sum(alice.reached(i, "delivered") for i, _ in sent) >= 10:
            top_up(min(60, int((time.monotonic() - started) * 20) + 1))
            bob.pump(0.005)
            alice.pump(0.005)
            assert time.monotonic() - started < 30, "nothing delivered"
        top_up(len(sent) + 3)  # in flight as the server dies
        runner.kill()
        told = [i for i, _ in sent if alice.reached(i, "delivered")]
        runner.restarts += 1
        runner.start()
        top_up(60)
        everyone = [alice, bob]
        wait_all(everyone, lambda: all(alice.reached(i, "delivered") for i, _ in sent), 60,
                 "every message delivered")  # fmt: skip
        time.sleep(0.3)
        for watcher in everyone:
            watcher.pump()
        texts = bob.texts()
        assert [t for t, n in Counter(texts).items() if n > 1] == []
        assert texts == [text for _, text in sent]
        check_state_sequences(alice)
        db = runner.data_dir / "chat.db"
        # A message never written keeps its dedup key alone, lazily, with
        # the name of the recipient who had it (or none yet at the kill).
        stored = {
            seq for (seq,) in query(db, "SELECT client_seq FROM dedup WHERE delivered_to IS NULL")
        }
        stored |= {seq for (seq,) in query(db, "SELECT client_seq FROM notices")}
        stored |= {seq for (seq,) in query(db, "SELECT client_seq FROM mailbox")}
        never_written = [i for i in told if int(i.rsplit("-", 1)[-1]) not in stored]
        print(f"\n{len(told)} delivered before the kill, {len(never_written)} of them never "
              f"written; {len(sent)} sent in all")  # fmt: skip
        return len(never_written)
    finally:
        runner.close()
