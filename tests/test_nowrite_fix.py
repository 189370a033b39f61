"""A message told DELIVERED and ACCEPT before any write (issue 18, the
no-write path) keeps its dedup key: written lazily (`StoreDedup`), with
its content digest and the name of the recipient who has it. A reuse of
its id for other content is refused with DUPLICATE_ID, a resend answered
with the same server_msg_id (and DELIVERED), once the in-memory entry is
gone and after a restart, as for a written message; the entries' cap never
evicts one (past it a message takes the written path). And an ACK cannot
cover a chunk that was never sent (reliability.Connection)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import chat_server
from protocol import Accept, Ack, Delivered, ErrorCode, Fail, MsgId, encode_frame, seal
from reliability import Connection, PayloadAcked
from tests.test_mailbox_disk import World, rows
from tests.test_nowrite import receipt_pass
from tests.test_ordinary_load import FakeClock, send_one, wait_for_store, warm_up


def make_world(data: Path, *, restarted: bool = False, **config: Any) -> World:
    """Alice and bob logged in; a first message sent (`warm_up`) unless this
    is a restart on the same data directory."""
    w = World(data, clock=FakeClock(), **config)
    w.login("alice")
    w.login("bob")
    if not restarted:
        warm_up(w)
    return w


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path / "data")
    yield w
    w.close()


def told_early(world: World, text: str, msg_id: MsgId) -> int:
    """Alice sends, bob receipts within the wait: she is told DELIVERED and
    ACCEPT at once, nothing is written yet. Returns the server_msg_id."""
    got = send_one(world, text, msg_id)
    world.now += 0.0003
    _, told = receipt_pass(world, got[0].server_msg_id)
    assert [type(m) for m in told] == [Delivered, Accept]
    assert world.relay.stats["messages_unwritten"] >= 1
    return got[0].server_msg_id


def resend(world: World, text: str, msg_id: MsgId) -> tuple[list[Accept | Fail], list[str]]:
    """Alice's client sends `msg_id` again: her answers, and what bob is handed."""
    world.inbox["alice"].clear()
    world.inbox["bob"].clear()
    world.send("alice", "bob", text, msg_id)
    world.pump()
    return world.answers("alice"), [d.text for d in world.delivers("bob")]


def refused(answers: list[Accept | Fail]) -> bool:
    return [type(a) for a in answers] == [Fail] and answers[0].reason == ErrorCode.DUPLICATE_ID  # type: ignore[union-attr]


def test_the_dedup_key_is_written_lazily_and_then_the_entry_goes(world: World) -> None:
    """The early answer leaves before any commit; the dedup key waits in
    the pending writes (nothing handed to the store thread for it), goes
    with the next commit, and then the in-memory entry goes."""
    store, relay = world.store, world.relay
    handed = store.handed
    server_msg_id = told_early(world, "hello bob", MsgId(9, 2))
    assert store.handed == handed and store._urgent == 0, "the answer waited for a write"
    assert ("alice", 9, 2) in relay._early
    world.pump()  # the next commit (`settle` submits one) carries it
    wait_for_store(store)
    assert not relay._early and relay._early_bytes == 0
    data = store.data_dir
    assert rows(data, "SELECT server_msg_id, delivered_to FROM dedup WHERE client_seq=2") == [
        (server_msg_id, "bob")
    ]
    assert rows(data, "SELECT COUNT(*) FROM mailbox") == [(0,)]
    assert rows(data, "SELECT COUNT(*) FROM notices") == [(0,)]


def test_a_reused_id_is_refused_after_the_entry_is_gone(world: World) -> None:
    """Review finding 1: once the entry was gone, the same id with new text
    was taken as new and handed to bob under the old message id (which his
    client ignores and receipts), and alice told `delivered`."""
    told_early(world, "original", MsgId(9, 2))
    world.login("alice")  # her client resends; it is answered and acks
    world.send("alice", "bob", "original", MsgId(9, 2))
    world.pump()
    assert not world.relay._early
    answers, handed = resend(world, "a different message", MsgId(9, 2))
    assert refused(answers), answers
    assert handed == [] and world.delivereds("alice") == []


def test_after_a_restart_a_resend_gets_the_same_id_and_a_reuse_is_refused(
    tmp_path: Path,
) -> None:
    """Review findings 1 and 2 across a restart: the resend of a message bob
    showed is answered DELIVERED and ACCEPT with its id (not handed to bob
    again, not refused), the same id with other text DUPLICATE_ID."""
    data = tmp_path / "data"
    world = make_world(data)
    try:
        server_msg_id = told_early(world, "shown once", MsgId(9, 2))
        world.pump()
    finally:
        world.close()
    world = make_world(data, restarted=True)
    try:
        answers, handed = resend(world, "shown once", MsgId(9, 2))
        assert answers == [Accept(MsgId(9, 2), server_msg_id)]
        assert world.delivereds("alice") == [MsgId(9, 2)]
        assert handed == []
        answers, handed = resend(world, "other text", MsgId(9, 2))
        assert refused(answers), answers
        assert handed == []
    finally:
        world.close()


def test_a_resend_into_a_full_mailbox_after_a_restart_is_not_failed(tmp_path: Path) -> None:
    """Review finding 2: bob showed the message; the server restarted; his
    mailbox filled while he was away; alice's client resends it. It must
    not be judged as new (MAILBOX_FULL: `failed` for a message bob has)."""
    data = tmp_path / "data"
    world = make_world(data, mailbox_messages=2)
    try:
        server_msg_id = told_early(world, "first", MsgId(9, 2))
        world.pump()
    finally:
        world.close()
    world = make_world(data, restarted=True, mailbox_messages=2)
    try:
        world.login("carol")
        world.logout("bob")
        world.send("carol", "bob", "c1", MsgId(77, 1))
        world.send("carol", "bob", "c2", MsgId(77, 2))
        world.pump()
        assert [type(a) for a in world.answers("carol")] == [Accept, Accept]
        world.inbox["alice"].clear()
        world.send("alice", "bob", "first", MsgId(9, 2))
        world.pump()
        assert world.answers("alice") == [Accept(MsgId(9, 2), server_msg_id)]
    finally:
        world.close()


def test_past_the_cap_nothing_is_evicted(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding 3: with a full table of entries (a hostile pair can
    fill it), the next message takes the written path instead of evicting
    someone's entry: a reuse of the first id is refused even before its
    lazy write commits, and after."""
    monkeypatch.setattr(chat_server, "MAX_EARLY", 1)
    relay = world.relay
    told_early(world, "first", MsgId(9, 2))
    unwritten = relay.stats["messages_unwritten"]
    second = send_one(world, "second", MsgId(9, 3))
    world.now += 0.0003
    receipt_pass(world, second[0].server_msg_id)
    assert relay.stats["messages_unwritten"] == unwritten, "over the cap, yet not written"
    assert list(relay._early) == [("alice", 9, 2)]
    world.login("alice")
    answers, handed = resend(world, "NOT first", MsgId(9, 2))
    assert refused(answers) and handed == []
    answers, handed = resend(world, "NOT first again", MsgId(9, 2))
    assert refused(answers) and handed == []


def test_the_cap_counts_utf8_bytes(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_EARLY_BYTES counts a text's UTF-8 bytes, not its characters."""
    monkeypatch.setattr(chat_server, "MAX_EARLY_BYTES", 5)
    unwritten = world.relay.stats["messages_unwritten"]
    got = send_one(world, "ééé", MsgId(9, 2))  # 3 characters, 6 bytes
    world.now += 0.0003
    _, told = receipt_pass(world, got[0].server_msg_id)
    assert Delivered not in [type(m) for m in told]
    assert world.relay.stats["messages_unwritten"] == unwritten


def test_an_ack_of_a_chunk_never_sent_is_ignored() -> None:
    """Review finding 4: `send` puts a chunk in the flight before it is
    sent; a peer's ACK whose `una` passes it must not count it acked (it
    would never be transmitted)."""
    sid, key = b"s" * 16, b"k" * 32
    conn = Connection(sid, key, 0.0)
    conn.send(b"queued between passes", 0, handle="h")
    conn.receive_datagram(seal(sid, 1, encode_frame(Ack(0, 0, 1, ())), key), 0.01)
    assert not any(isinstance(e, PayloadAcked) for e in conn.take_events())
    out = conn.datagrams_to_send(0.02)
    assert sum(b"queued between passes" in d for d in out) == 1
