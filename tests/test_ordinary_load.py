"""Ordinary load is cheap (issue 18, items 2 and 4): what a message costs
when nothing batches.

In memory: a `Relay` with a real `ServerStore` (SQLite in tmp_path, its
thread running) and clients made of `reliability.Connection`s on a fake
`now` (the `World` of test_mailbox_disk), stepped by hand so that each test
sees every flush, commit and datagram. Counts, never durations: commits
(`ServerStore.commits`), operations handed to the store thread, datagrams,
rows on the disk, calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import reliability
from chat_server import COMMIT_WAIT, Relay
from protocol import (
    Accept,
    Ack,
    Deliver,
    Frame,
    Message,
    MsgId,
    Packet,
    Ping,
    Receipt,
    Stream,
    decode_message,
    decode_packet,
    encode_message,
    encode_packet,
)
from reliability import MAX_ACK_DELAY, Connection, PayloadReceived
from server_store import (
    LAZY_HOLD,
    MarkDelivered,
    NoticeDone,
    ServerStore,
    StoredMessage,
    StoreMessage,
)
from tests.test_mailbox_disk import World, rows


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    # The store's clock stands still: lazy writes go with the next commit
    # only, however slowly a loaded machine runs the test.
    w = World(tmp_path / "data", clock=FakeClock())
    w.login("alice")
    w.login("bob")
    warm_up(w)
    yield w
    w.close()


def warm_up(world: World) -> None:
    """A first message, all the way: a session's first SEND of its client
    instance is looked up on the disk (it may be an old retry); the later
    ones are known new at once, as in a conversation."""
    world.send("alice", "bob", "warm-up", MsgId(9, 1))
    world.pump()
    assert world.delivereds("alice") == [MsgId(9, 1)]
    world.inbox["alice"].clear()
    # (`World.pump` flushes the store itself: end the relay's wait as the loop would)
    world.relay.flush_store(world.now)


def wait_for_store(store: ServerStore) -> None:
    """Until the store thread has committed everything handed to it."""
    deadline = time.monotonic() + 30
    while store.finished < store.handed:
        assert time.monotonic() < deadline, "the store thread did not answer"
        time.sleep(0.0005)


def send_one(world: World, text: str, msg_id: MsgId) -> list[Deliver]:
    """Alice's SEND reaches the relay at `world.now`, which hands the DELIVER
    to bob at once; then the loop's end of pass (`flush_store`). Returns what
    bob got."""
    relay = world.relay
    world.send("alice", "bob", text, msg_id)
    for data in world.conns["alice"].datagrams_to_send(world.now):
        relay.receive_datagram(data, world.addrs["alice"], world.now)
    world.route(relay.datagrams_to_send(world.now))
    relay.flush_store(world.now)
    return [m for m in drain(world, "bob") if isinstance(m, Deliver)]


def drain(world: World, name: str) -> list[Message]:
    """The messages `name`'s connection has received, also kept in its inbox."""
    conn = world.conns[name]
    got = []
    while (event := conn.next_event()) is not None:
        if isinstance(event, PayloadReceived):
            got.append(decode_message(event.payload))
    world.inbox[name].extend(got)
    return got


def receipt(world: World, server_msg_id: int) -> None:
    """Bob's receipt reaches the relay at `world.now`; end of pass."""
    relay = world.relay
    bob = world.conns["bob"]
    bob.send(encode_message(Receipt(server_msg_id)))
    for data in bob.datagrams_to_send(world.now):
        relay.receive_datagram(data, world.addrs["bob"], world.now)
    world.route(relay.datagrams_to_send(world.now))
    relay.flush_store(world.now)
    drain(world, "alice")


def alice_datagrams(world: World) -> list[bytes]:
    """What the relay sends now, once the store is done; only alice's."""
    wait_for_store(world.store)
    world.relay.store_done(world.now)
    out = world.relay.datagrams_to_send(world.now)
    world.route(out)
    drain(world, "alice")
    return [d for d, addr in out if addr == world.addrs["alice"]]


def test_receipt_within_the_wait_needs_no_write_one_datagram(world: World) -> None:
    """Bob is online and receipts the message 0.3 ms after its DELIVER went
    out (before any commit): the relay held the store's flush for it, and
    with the receipt in, the message needs no write anyone waits for (issue
    18, the `nowrite` change: before it, one commit held the message's dedup
    key and its queued receipt): alice gets DELIVERED and ACCEPT at once, in
    one datagram, and only the dedup key is written, lazily (`StoreDedup`:
    no mailbox or notices row; tests/test_nowrite.py has the rest)."""
    store, relay = world.store, world.relay
    commits, handed = store.commits, store.handed
    got = send_one(world, "hello bob", MsgId(9, 2))
    assert [m.text for m in got] == ["hello bob"]  # the DELIVER did not wait for the disk
    assert store.handed == handed, "flushed before the receipt could join"
    timer = relay.get_timer()
    assert timer is not None and timer <= world.now + COMMIT_WAIT
    world.now += 0.0003
    receipt(world, got[0].server_msg_id)
    assert store.handed == handed, "nothing is left that waits for a commit"
    inbox = world.inbox["alice"]
    assert any(isinstance(m, Accept) and m.msg_id == MsgId(9, 2) for m in inbox)
    assert world.delivereds("alice") == [MsgId(9, 2)]
    store.flush(force=True)
    wait_for_store(store)
    assert store.commits == commits + 1  # the lazy dedup key's
    data = world.store.data_dir
    assert rows(data, "SELECT COUNT(*) FROM mailbox") == [(0,)]
    assert rows(data, "SELECT delivered_to FROM dedup WHERE client_seq=2") == [("bob",)]
    assert rows(data, "SELECT client_seq FROM notices") == []


def test_without_a_receipt_the_commit_waits_commit_wait_at_most(world: World) -> None:
    """No receipt comes: the flush waits until COMMIT_WAIT after the DELIVER
    (the loop's timer says when), not longer; the ACCEPT follows that commit."""
    store, relay = world.store, world.relay
    handed = store.handed
    got = send_one(world, "anyone?", MsgId(9, 2))
    assert len(got) == 1 and store.handed == handed
    world.now += COMMIT_WAIT / 2
    relay.flush_store(world.now)
    assert store.handed == handed
    world.now = relay.get_timer() or 0.0
    relay.flush_store(world.now)
    assert store.handed > handed
    assert len(alice_datagrams(world)) == 1
    assert [m.msg_id for m in world.answers("alice")] == [MsgId(9, 2)]
    assert rows(world.store.data_dir, "SELECT COUNT(*) FROM mailbox") == [(1,)]


def test_a_receipt_after_the_wait_but_before_the_commit_needs_no_commit_of_its_own(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receipt comes after the wait ended and the store thread has taken
    the message's batch (its commit is under way: too late to withdraw the
    write, see tests/test_nowrite.py for a batch not yet taken) but before
    that commit is done: DELIVERED leaves with the ACCEPT, in one datagram,
    as soon as the message is on disk, and the receipt's own write waits
    for the next commit something needs (it starts none)."""
    store, relay = world.store, world.relay
    commits = store.commits
    applying, go_on = threading.Event(), threading.Event()
    apply = store._apply

    def held_apply(ops: list[Any]) -> None:
        applying.set()
        go_on.wait(30)
        apply(ops)

    monkeypatch.setattr(store, "_apply", held_apply)
    got = send_one(world, "slow disk", MsgId(9, 2))
    world.now += COMMIT_WAIT
    relay.handle_timer(world.now)
    relay.flush_store(world.now)  # the wait is over: the message goes to the disk
    assert applying.wait(30)
    handed = store.handed
    world.now += 0.0001
    bob = world.conns["bob"]  # its receipt, taken before the commit's answer is
    bob.send(encode_message(Receipt(got[0].server_msg_id)))
    for data in bob.datagrams_to_send(world.now):
        relay.receive_datagram(data, world.addrs["bob"], world.now)
    relay.flush_store(world.now)
    assert store.handed == handed, "the receipt's write started a commit"
    go_on.set()
    datagrams = alice_datagrams(world)
    assert len(datagrams) == 1
    assert [m.msg_id for m in world.answers("alice")] == [MsgId(9, 2)]
    assert world.delivereds("alice") == [MsgId(9, 2)]
    assert store.commits - commits == 1


def test_messages_within_the_wait_share_one_commit(world: World) -> None:
    """Three messages 0.2 ms apart to an online recipient, receipted as they
    come: no commit for the three (and their receipts), not six (before
    the `nowrite` change of issue 18: one)."""
    store = world.store
    commits = store.commits
    ids = [MsgId(9, i) for i in (2, 3, 4)]
    for msg_id in ids:
        got = send_one(world, f"m{msg_id.client_seq}", msg_id)
        world.now += 0.0001
        receipt(world, got[0].server_msg_id)
        world.now += 0.0001
    # (the last receipt ended the wait: nothing more was expected)
    alice_datagrams(world)
    assert store.commits - commits == 0
    assert [m.msg_id for m in world.answers("alice")] == ids
    assert world.delivereds("alice") == ids


def test_lazy_writes_ride_on_the_next_commit_or_go_after_the_hold(tmp_path: Path) -> None:
    """A receipt off a committed message and a receipt acked (nothing waits
    for either) start no commit of their own: they go with the next write
    something waits for, in order, or after LAZY_HOLD."""
    clock = FakeClock()
    store = ServerStore(tmp_path / "data", clock=clock)
    store.load()
    store.start()
    try:
        store.submit(NoticeDone("alice", 9, 1))
        store.flush()
        assert store.handed == 0  # held: nothing waits for it
        done: list[int] = []
        message = StoredMessage(1, "bob", "alice", "Alice", 9, 2, "hi", 0)
        store.submit(StoreMessage(message), lambda: done.append(1))
        store.flush()
        assert store.handed == 2  # both, in one batch
        wait_for_store(store)
        assert store.commits == 1
        store.submit(MarkDelivered(1, "alice", 9, 2, "Bob", "bob", 2, 5))
        store.flush()
        clock.now += LAZY_HOLD / 2
        store.flush()
        assert store.handed == 2
        clock.now += LAZY_HOLD
        store.flush()
        assert store.handed == 3
        wait_for_store(store)
        assert store.commits == 2
        assert rows(store.data_dir, "SELECT COUNT(*) FROM mailbox") == [(0,)]
        # A MarkDelivered whose DELIVERED waits for it is not lazy.
        store.submit(MarkDelivered(1, "alice", 9, 3, "Bob", "bob", 2, 6), lambda: None)
        store.flush()
        assert store.handed == 4
    finally:
        store.close()


def test_a_lazy_receipt_lost_in_a_crash_is_delivered_again_under_the_same_id(
    tmp_path: Path,
) -> None:
    """kill -9 after the receipt of a committed message was taken but before
    its lazy write was: after the restart bob is handed the message again
    with the same message id (his client's dedup key, so it shows nothing
    twice) and alice gets its DELIVERED again (states only move forward):
    nothing lost, nothing new."""
    data = tmp_path / "data"
    world = World(data, clock=FakeClock())
    world.login("alice")
    world.login("bob")
    warm_up(world)
    got = send_one(world, "once", MsgId(9, 2))
    world.now += COMMIT_WAIT
    world.relay.flush_store(world.now)  # no receipt in time: the message is committed
    alice_datagrams(world)
    handed = world.store.handed
    receipt(world, got[0].server_msg_id)
    assert world.store.handed == handed  # the receipt's write waits (lazy)
    assert world.delivereds("alice") == [MsgId(9, 2)]  # told at once all the same
    # kill -9: what was not handed to the store thread is gone with the process.
    world.store._pending.clear()
    world.store.close()
    again = World(data, clock=FakeClock())
    try:
        again.login("alice")
        again.login("bob", instance_id=9)
        redelivered = again.delivers("bob")
        assert [(m.msg_id, m.text) for m in redelivered] == [(MsgId(9, 2), "once")]
        assert again.delivereds("alice") == [MsgId(9, 2)]
    finally:
        again.close()


def test_a_pass_does_no_work_per_idle_session(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 40 idle sessions beside the pair, a message's passes touch the
    two sessions involved only: no per-pass walk over all sessions (calls
    counted, not timed)."""
    for i in range(40):
        world.login(f"idle{i}")
    calls = {"datagrams_to_send": 0, "get_timer": 0, "handle_timer": 0}
    for name in calls:
        real = getattr(Connection, name)

        def counted(self: Connection, *args: object, _real: object = real,
                    _name: str = name) -> object:  # fmt: skip
            calls[_name] += 1
            return _real(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(reliability.Connection, name, counted)
    relay: Relay = world.relay
    got = send_one(world, "busy", MsgId(9, 2))
    world.now += 0.0003
    receipt(world, got[0].server_msg_id)
    alice_datagrams(world)
    relay.handle_timer(world.now)
    assert calls["handle_timer"] == 0  # no session's timer is due
    # alice and bob, a few passes each: far below one call per idle session.
    assert calls["datagrams_to_send"] <= 12
    assert calls["get_timer"] <= 12


# --- when acks leave (reliability.Connection) ----------------------------------------

SESSION = bytes(range(16))
KEY = bytes(range(32, 64))


def peer_packet(pkt: int, *frames: Frame) -> bytes:
    return encode_packet(Packet(SESSION, pkt, frames), KEY)


def acks_in(datagrams: list[bytes]) -> list[Ack]:
    return [f for d in datagrams for f in decode_packet(d, KEY).frames if isinstance(f, Ack)]


def chunk(seq: int, data: bytes = b"x") -> Stream:
    return Stream(seq, 0, seq, 0, 1, data)


def test_a_keepalive_is_acked_at_once_data_within_max_ack_delay() -> None:
    """A PING alone is acked in the same pass (no data of ours would carry
    the ack; waiting would only cost a second wake-up); one datagram of data
    waits MAX_ACK_DELAY at most for something to ride on; the second is acked
    at once (RFC 9000 13.2.2), and so is one that leaves a gap."""
    conn = Connection(SESSION, KEY, 0.0)
    conn.receive_datagram(peer_packet(1, Ping()), 1.0)
    assert conn.get_timer() == 1.0
    assert [a.largest_pkt for a in acks_in(conn.datagrams_to_send(1.0))] == [1]

    conn.receive_datagram(peer_packet(2, chunk(0)), 2.0)
    assert conn.get_timer() == pytest.approx(2.0 + MAX_ACK_DELAY)
    assert conn.datagrams_to_send(2.0 + MAX_ACK_DELAY / 2) == []
    assert [a.una for a in acks_in(conn.datagrams_to_send(2.0 + MAX_ACK_DELAY))] == [1]

    conn.receive_datagram(peer_packet(3, chunk(1)), 3.0)
    conn.receive_datagram(peer_packet(4, chunk(2)), 3.001)
    assert conn.get_timer() == 3.001  # every second one: at once
    assert [a.una for a in acks_in(conn.datagrams_to_send(3.001))] == [3]

    conn.receive_datagram(peer_packet(5, chunk(5)), 4.0)  # 3 and 4 missing
    assert conn.get_timer() == 4.0
    (ack,) = acks_in(conn.datagrams_to_send(4.0))
    assert ack.una == 3 and ack.ranges == ((5, 6),)


def test_a_keepalive_costs_the_relay_one_pass(world: World) -> None:
    """An idle session's keepalive: the relay's ACK leaves in the pass that
    took the PING, and no timer is left for it (before, a second wake-up
    25 ms later sent that ACK alone)."""
    relay = world.relay
    session = next(s for s in relay.sessions.values() if s.user.key == "bob")
    world.now += 10
    relay.handle_timer(world.now)
    world.route(relay.datagrams_to_send(world.now))  # whatever was due
    bob = world.conns["bob"]
    bob.send_ping()
    (ping,) = bob.datagrams_to_send(world.now)
    relay.receive_datagram(ping, world.addrs["bob"], world.now)
    out = relay.datagrams_to_send(world.now)
    assert [a for d, a in out] == [world.addrs["bob"]]
    assert session.conn.get_timer() is None  # nothing left to do for it but expire
