"""What a group copy costs (issue 14), counted on the sans-IO relay with a
fake clock, not timed: the sender hears who has a message in one
GROUP_REACHED per message per pass (not a frame per member), nothing is
stored per copy for it (who has a message follows from the members'
cursors; one number per sender and group says what its client was told),
a batch of receipts moves a member's cursor once, what a sender was not
told is worked out again from the cursors at its login (after a restart
too) and what it was told is not told again, and the fan-out budget pays
for every copy of a datagram's messages before taking them."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

import server_store
from protocol import GroupAccept, GroupDeliver, GroupReached, MsgId, Receipt, Receipts
from server_store import GroupReceipt, MessageStore, ServerStore
from tests.test_bounds import Client
from tests.test_groups_relay import GroupWorld, created, texts


def told_by(client: Client) -> list[tuple[str, MsgId]]:
    """Every (member, message id) the sender was told, as often as told."""
    return [(by, m.msg_id) for m in client.of(GroupReached) for by in m.by]


def group_of(world: GroupWorld, size: int, *names: str) -> tuple[Client, list[Client]]:
    """alice and `size` - 1 other members (`names`, or m0, m1...), all
    logged in, the group made."""
    names = names or tuple(f"m{n}" for n in range(size - 1))
    alice = world.login("alice")
    members = [world.login(n) for n in names]
    created(world, alice, *names)
    world.settle_all()
    return alice, members


def count_ops(store: MessageStore, kind: type) -> list[Any]:
    """Record every operation of `kind` the relay submits from now on."""
    seen: list[Any] = []
    submit = store.submit

    def counting(op: Any, then: Any = None) -> None:
        if isinstance(op, kind):
            seen.append(op)
        submit(op, then)

    store.submit = counting  # type: ignore[method-assign]
    return seen


def test_the_sender_hears_of_every_member_in_one_frame_per_message(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice, members = group_of(world, 10)
    msg_id = world.post(alice, "team", "to nine", 1)
    world.run_until(lambda: len(told_by(alice)) == 9, 200, "every member's receipt")
    world.settle_all()
    assert sorted(told_by(alice)) == sorted((m.name, msg_id) for m in members)
    # The nine receipts came in one pass: one frame names them all (it was
    # a GROUP_DELIVEREDS per member, each a frame for the sender to ack).
    assert len(alice.of(GroupReached)) == 1


def test_no_row_is_stored_per_copy_for_the_sender(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five messages to five others, all receipted while the sender is
    away: the database gains no row for their 25 "delivered by" (it gained
    one per copy, then deleted it when the sender's client acked it)."""
    disk = ServerStore(tmp_path / "data")
    disk.start()
    try:
        world = GroupWorld(disk)
        alice, members = group_of(world, 6)
        world.holding.update(m.name for m in members)
        ids = [world.post(alice, "team", f"t{n}", n + 1) for n in range(5)]
        world.run_until(lambda: len(alice.of(GroupAccept)) == 5, 200, "accepts")
        world.logout(alice)
        world.settle_all()
        before = rows(disk.path)
        # The store saves its clock in `meta` once TIME_SAVE_MS of wall
        # clock has passed (a slow machine gets there mid-test): here at
        # every commit from now on, which must not count as a row per copy.
        monkeypatch.setattr(server_store, "TIME_SAVE_MS", 0)
        world.holding.clear()
        for member in members:
            member.send(Receipts(tuple(d.server_msg_id for d in member.of(GroupDeliver))))
        world.settle_all()
        group = world.relay.groups.get("team")
        assert group is not None and all(group.members[m.name].cursor == 6 for m in members)
        assert rows(disk.path) == before  # cursors moved in place; nothing per copy
        alice = world.login("alice")
        world.run_until(lambda: len(told_by(alice)) == 25, 300, "the deliveries worked out")
        world.settle_all()
        assert sorted(told_by(alice)) == sorted((m.name, i) for m in members for i in ids)
    finally:
        disk.close()


def rows(path: Path) -> dict[str, int]:
    """The rows of each table, but for the saved clock (`meta`'s
    `server_ms`): written when enough wall clock has passed, whatever the
    relay did."""
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        counts = {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}
        counts["meta"] = db.execute(
            "SELECT COUNT(*) FROM meta WHERE key != 'server_ms'"
        ).fetchone()[0]
        return counts


def test_a_batch_of_receipts_moves_a_cursor_once(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice, (bob, carol) = group_of(world, 3, "bob", "carol")
    world.holding.add("bob")
    ids = [world.post(alice, "team", f"t{n}", n + 1) for n in range(6)]
    world.run_until(lambda: len(texts(bob)) == 6 and len(texts(carol)) == 6, 200, "fan-out")
    world.settle_all()
    moves = count_ops(store, GroupReceipt)
    bob.send(Receipts(tuple(d.server_msg_id for d in bob.of(GroupDeliver))))
    world.settle_all()
    assert [(op.member_key, op.seq) for op in moves] == [("bob", 7)]
    assert sorted(i for by, i in told_by(alice) if by == "bob") == sorted(ids)  # each, once


def test_the_deliveries_a_sender_missed_are_worked_out_after_a_restart(tmp_path: Path) -> None:
    """The sender is away while the members receipt, and the server
    restarts: at its login the sender is told who has each of its messages
    (from the cursors on the disk), once; told and acked, a later login
    hears nothing again."""
    disk = ServerStore(tmp_path / "data")
    disk.start()
    world = GroupWorld(disk)
    alice, (bob, carol) = group_of(world, 3, "bob", "carol")
    world.holding.add("carol")
    ids = [world.post(alice, "team", f"t{n}", n + 1) for n in range(3)]
    world.run_until(lambda: len(told_by(alice)) == 3, 200, "bob's receipts")
    world.settle_all()
    world.logout(alice)
    world.holding.clear()
    carol.send(Receipts(tuple(d.server_msg_id for d in carol.of(GroupDeliver))))
    world.settle_all()
    disk.close()

    disk = ServerStore(tmp_path / "data")
    disk.start()
    try:
        world = GroupWorld(disk)
        alice = world.login("alice")
        world.run_until(lambda: any(by == "carol" for by, _ in told_by(alice)), 300, "carol")
        world.settle_all()
        carols = sorted(i for by, i in told_by(alice) if by == "carol")
        assert carols == sorted(ids)  # bob's may come again: the client knows them
        assert world.relay.groups.get("team").owed == {}  # type: ignore[union-attr]
        world.logout(alice)
        alice = world.login("alice")
        world.settle_all()
        assert alice.of(GroupReached) == []
    finally:
        disk.close()


def test_a_member_who_receipts_one_at_a_time_is_told_one_by_one(store: MessageStore) -> None:
    """Receipts of single entries (a client showing each as it comes): the
    sender hears of each once, whatever the passes."""
    world = GroupWorld(store)
    alice, (bob,) = group_of(world, 2, "bob")
    world.holding.add("bob")
    ids = [world.post(alice, "team", f"t{n}", n + 1) for n in range(4)]
    world.run_until(lambda: len(texts(bob)) == 4, 200, "fan-out")
    for deliver in bob.of(GroupDeliver):
        bob.send(Receipt(deliver.server_msg_id))
        world.step()
    world.settle_all()
    assert told_by(alice) == [("bob", i) for i in ids]


def test_the_fan_out_budget_pays_for_a_whole_datagram_before_taking_it(
    store: MessageStore,
) -> None:
    """Several group messages in one datagram: the budget must hold all of
    their copies, or the datagram waits (its acks withheld); it never goes
    into debt for them (it did: it only asked not to be in debt already)."""
    world = GroupWorld(store, max_fanout_rate=20.0, max_fanout_burst=50.0)
    alice, members = group_of(world, 11)  # ten copies a message
    lowest = 50.0
    sent = 0
    for _ in range(8):  # three messages a datagram: 30 copies
        for _ in range(3):
            sent += 1
            world.post(alice, "team", f"m{sent}", sent)
        for _ in range(40):
            world.step()
            bucket = alice_bucket(world)
            if bucket is not None:
                lowest = min(lowest, bucket.tokens)
    world.run_until(lambda: all(len(texts(m)) == sent for m in members), 5000, "every copy")
    assert world.relay.stats["withheld_fanout"] > 0
    assert lowest >= 0, f"the budget went into debt: {lowest}"
    assert all(texts(m) == [f"m{n}" for n in range(1, sent + 1)] for m in members)


def alice_bucket(world: GroupWorld) -> Any:
    user = world.relay.users.get("alice")
    return None if user is None else user.fanout_bucket
