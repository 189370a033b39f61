"""The group log is trimmed (issue 14): entries that every member they are
for has, and whose senders were told who has them, are deleted, in memory
and in SQLite; an entry a member offline, or a former member still owed,
has not got yet stays until they have it, and a sender still owed its
"delivered by" keeps its messages in the log until told. On the sans-IO
relay with a fake clock, on each store."""

from __future__ import annotations

import sqlite3

from chat_server import GROUP_TRIM_EVERY
from protocol import GroupAccept, GroupAction, GroupDeliver, GroupEvent, GroupReached, Receipt
from server_store import MemoryStore, MessageStore, ServerStore
from tests.test_bounds import Client
from tests.test_groups_relay import GroupWorld, created, entries, texts

MESSAGES = GROUP_TRIM_EVERY + 10


def log_seqs(store: MessageStore, group: str = "team") -> list[int]:
    """The group_seqs the store's log holds, in order."""
    if isinstance(store, MemoryStore):
        return sorted(store.log.get(group, {}))
    assert isinstance(store, ServerStore)
    with sqlite3.connect(store.path) as db:
        found = db.execute(
            "SELECT group_seq FROM group_log WHERE group_key=? ORDER BY group_seq", (group,)
        )
        return [row[0] for row in found]


def receipt_all(client: Client) -> None:
    """What a client held back, shown: a receipt for each entry it got."""
    for message in client.messages:
        if isinstance(message, GroupDeliver | GroupEvent):
            client.send(Receipt(message.server_msg_id))


def post_all(world: GroupWorld, count: int, start: int = 1) -> None:
    for n in range(start, start + count):
        world.post(world.clients["alice"], "team", f"t{n}", n)
        if n % 8 == 0:
            world.step()
    world.settle_all()


def test_what_everyone_has_and_every_sender_was_told_is_deleted(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    dave = world.login("dave")
    created(world, alice, "bob", "carol")
    post_all(world, MESSAGES)
    world.run_until(lambda: len(texts(bob)) == MESSAGES and len(texts(carol)) == MESSAGES,
                    500, "every message")  # fmt: skip
    world.run_until(lambda: sum(len(m.by) for m in alice.of(GroupReached)) == 2 * MESSAGES,
                    500, "every delivered by")  # fmt: skip
    world.settle_all()
    kept = log_seqs(store)
    last = MESSAGES + 1  # the CREATED entry, then the messages
    assert len(kept) < GROUP_TRIM_EVERY, kept  # was all of them, for ever
    assert kept == list(range(last - len(kept) + 1, last + 1))  # the oldest went
    # The log's end is intact: a member added now starts after it.
    assert world.result(alice, world.request(alice, GroupAction.ADD, "team", "dave")).code == 0
    post_all(world, 1, start=MESSAGES + 1)
    world.run_until(lambda: len(entries(dave)) == 2, 200, "dave's entries")
    assert [e[:2] for e in entries(dave)] == [(last + 1, "added"), (last + 2, "message")]


def test_an_offline_member_keeps_what_they_have_not_got(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice, bob, _ = world.login("alice"), world.login("bob"), world.login("carol")
    created(world, alice, "bob", "carol")
    world.settle_all()
    post_all(world, 4)
    world.logout(bob)
    post_all(world, MESSAGES, start=5)
    world.run_until(lambda: len(alice.of(GroupAccept)) == MESSAGES + 4, 500, "accepts")
    world.settle_all()
    kept = log_seqs(store)
    assert kept[0] <= 6  # bob had up to the 4th message (seq 5): nothing after went
    bob = world.login("bob")
    world.run_until(lambda: len(texts(bob)) == MESSAGES, 2000, "bob's catch-up")
    world.settle_all()
    assert [e[0] for e in entries(bob)] == list(range(6, MESSAGES + 6))  # each once, in order
    assert len(log_seqs(store)) < GROUP_TRIM_EVERY  # then it goes


def test_a_sender_still_owed_keeps_its_messages_until_told(store: MessageStore) -> None:
    """Alice is away while the members receipt: her messages stay (her next
    login works out who has them from the log); told, they go."""
    world = GroupWorld(store)
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    created(world, alice, "bob", "carol")
    world.settle_all()
    world.holding.update({"bob", "carol"})
    post_all(world, MESSAGES)
    world.run_until(lambda: len(alice.of(GroupAccept)) == MESSAGES, 500, "accepts")
    world.logout(alice)
    world.holding.clear()
    for member in (bob, carol):
        receipt_all(member)
    world.settle_all()
    # Everyone has them (the CREATED entry went), but alice was not told.
    assert log_seqs(store) == list(range(2, MESSAGES + 2))
    alice = world.login("alice")
    world.run_until(lambda: sum(len(m.by) for m in alice.of(GroupReached)) == 2 * MESSAGES,
                    1000, "alice told")  # fmt: skip
    world.settle_all()
    assert len(log_seqs(store)) < GROUP_TRIM_EVERY


def test_a_former_member_still_owed_keeps_what_they_have_not_got(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    created(world, alice, "bob", "carol")
    world.settle_all()
    world.holding.add("carol")  # carol has nothing past the CREATED entry
    post_all(world, 3)
    removed = world.request(alice, GroupAction.REMOVE, "team", "carol")
    assert world.result(alice, removed).code == 0
    post_all(world, MESSAGES, start=4)
    world.settle_all()
    assert log_seqs(store)[0] <= 2  # carol is owed seqs 2 to 5
    world.holding.clear()
    receipt_all(carol)
    world.settle_all()
    assert [e[0] for e in entries(carol)] == [1, 2, 3, 4, 5]
    assert entries(carol)[-1][1] == "removed"
    post_all(world, GROUP_TRIM_EVERY, start=MESSAGES + 4)  # a while later
    world.run_until(lambda: len(texts(bob)) == MESSAGES + GROUP_TRIM_EVERY + 3, 1000, "bob")
    world.settle_all()
    assert log_seqs(store)[0] > 5
