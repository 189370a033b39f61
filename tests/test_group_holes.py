"""One server: a group's log is trimmed where what it holds for someone
shrank without a receipt (issue 14, "the log's trim runs on receipts
only"): after a member is removed or leaves, at the group's end (only what
its former members and senders are owed stays), and at start; and F3's rule
(review7) for the log's hole: a sender online with nothing in flight is
exempt, one whose notices are unacked holds to her last message. On the
sans-IO relay with a fake clock, on each store (a restart on a real SQLite
file). The same in a cluster: tests/test_cluster_holes.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chat_server import GROUP_TRIM_EVERY
from protocol import ErrorCode, GroupAction
from server_store import MemoryStore, MessageStore, ServerStore
from tests.test_bounds import Client
from tests.test_group_backlog import accepted, fails, offline_carol
from tests.test_groups_relay import GroupWorld, created, entries, texts, told_by
from tests.test_groups_trim import log_seqs

FEW = 10  # messages: far fewer than GROUP_TRIM_EVERY, which a receipt's trim waits for


def everyone_has(world: GroupWorld, sender: Client, members: list[Client], count: int) -> None:
    """`count` messages of `sender` posted, every member has them, and
    `sender` was told of each copy."""
    for n in range(1, count + 1):
        world.post(sender, "team", f"m{n}", n)
    world.run_until(lambda: all(len(texts(m)) == count for m in members), 500, "every copy")
    world.run_until(lambda: len(told_by(sender)) == count * len(members), 500, "delivered by")
    world.settle_all()


def test_the_log_is_trimmed_after_a_removal_without_any_receipt(store: MessageStore) -> None:
    """Everyone has the few messages (a receipt's trim waits for more), then
    everyone's client stops receipting and dave, away, is removed: all but
    the removal (which nobody has yet) goes; before, it stayed for good."""
    world = GroupWorld(store)
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    dave = world.login("dave")
    created(world, alice, "bob", "carol", "dave")
    world.settle_all()
    everyone_has(world, alice, [bob, carol, dave], FEW)
    world.post(bob, "team", "from bob", 1)  # (alice's cursor passes her own messages)
    world.run_until(lambda: texts(alice) == ["from bob"], 200, "bob's message")
    world.settle_all()
    seq = FEW + 2
    assert log_seqs(store) == list(range(1, seq + 1))  # all of it, nobody receipting more
    world.logout(dave)
    world.holding.update({"alice", "bob", "carol"})
    assert world.result(alice, world.request(alice, GroupAction.REMOVE, "team", "dave")).code == 0
    world.settle_all()
    assert log_seqs(store) == [seq + 1]  # the removal, which dave (and everyone) has not had


def test_the_log_is_trimmed_after_a_member_leaves_without_any_receipt(
    store: MessageStore,
) -> None:
    world = GroupWorld(store)
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    created(world, alice, "bob", "carol")
    world.settle_all()
    everyone_has(world, alice, [bob, carol], FEW)
    world.post(bob, "team", "from bob", 1)
    world.run_until(lambda: texts(alice) == ["from bob"], 200, "bob's message")
    world.settle_all()
    world.holding.update({"alice", "bob", "carol"})
    assert world.result(carol, world.request(carol, GroupAction.LEAVE, "team")).code == 0
    world.settle_all()
    assert log_seqs(store) == [FEW + 3]  # her LEFT


def test_at_the_groups_end_only_what_a_former_member_is_owed_stays(store: MessageStore) -> None:
    """carol, away, is removed; alice, alone, posts on (nobody receipts
    them: nothing trimmed them before) and leaves: the group ends, and its
    log keeps only what carol is owed (it kept everything before, until
    carol came back); carol then gets exactly that."""
    world, alice, bob = offline_carol(store)
    world.post(alice, "team", "for carol", 1)
    world.settle_all()
    assert world.result(alice, world.request(alice, GroupAction.REMOVE, "team", "carol")).code == 0
    assert world.result(bob, world.request(bob, GroupAction.LEAVE, "team")).code == 0
    world.logout(bob)
    count = GROUP_TRIM_EVERY + 6
    for n in range(2, count + 2):
        world.post(alice, "team", f"alone {n}", n)
        if n % 8 == 0:
            world.step()
    world.run_until(lambda: accepted(alice) == count + 1, 500, "alice's accepts")
    world.settle_all()
    removal = 3  # CREATED, "for carol", REMOVED
    assert len(log_seqs(store)) > count  # (nobody receipts: nothing was trimmed)
    assert world.result(alice, world.request(alice, GroupAction.LEAVE, "team")).code == 0
    world.settle_all()
    logs = store.log if isinstance(store, MemoryStore) else None
    retired = [key for key in (logs or {}) if key.startswith("!team!")]
    kept = log_seqs(store, retired[0]) if logs is not None else retired_seqs(store)
    assert kept == list(range(2, removal + 1)), kept
    carol = world.login("carol")
    world.run_until(lambda: any(e[1] == "removed" for e in entries(carol)), 500, "her removal")
    assert [e[:2] for e in entries(carol)] == [(2, "message"), (3, "removed")]


def retired_seqs(store: MessageStore) -> list[int]:
    """The seqs of a retired #team's log in SQLite."""
    import sqlite3

    assert isinstance(store, ServerStore)
    with sqlite3.connect(store.path) as db:
        rows = db.execute("SELECT group_seq FROM group_log WHERE group_key LIKE '!team!%' "
                          "ORDER BY group_seq").fetchall()  # fmt: skip
    return [int(row[0]) for row in rows]


def test_the_log_is_trimmed_at_start(tmp_path: Path) -> None:
    """A few messages everyone has (and their sender was told of) stay in
    the log while nobody receipts more; a restart trims them."""
    disk = ServerStore(tmp_path / "data")
    disk.start()
    try:
        world = GroupWorld(disk)
        alice, bob = world.login("alice"), world.login("bob")
        created(world, alice, "bob")
        world.settle_all()
        everyone_has(world, alice, [bob], FEW)
        world.post(bob, "team", "from bob", 1)
        world.run_until(lambda: texts(alice) == ["from bob"], 200, "bob's message")
        world.run_until(lambda: len(told_by(bob)) == 1, 200, "bob told")
        world.settle_all()
        assert log_seqs(disk) == list(range(1, FEW + 3))
    finally:
        disk.close()
    disk = ServerStore(tmp_path / "data")
    disk.start()
    try:
        world = GroupWorld(disk)
        world.settle_all()
        assert log_seqs(disk) == []
        group = world.relay.groups.get("team")
        assert group is not None and group.trimmed == FEW + 2 and group.backlog() == (0, 0)
        bob = world.login("bob")
        world.post(world.login("alice"), "team", "after", FEW + 1)
        world.run_until(lambda: texts(bob) == ["after"], 200, "a message after the restart")
    finally:
        disk.close()


def deaf(world: GroupWorld, client: Client) -> None:
    """`client`'s client stops hearing the server (its session lives on)."""
    original = world._to_clients

    def to_clients(out: list[tuple[bytes, Any]]) -> None:
        original([(d, a) for d, a in out if a != client.addr])

    world._to_clients = to_clients  # type: ignore[method-assign]


def test_f3_a_hole_takes_a_quiet_senders_messages_and_spares_a_deaf_ones() -> None:
    """carol, away, removed, holds the log from her place; alice (online,
    told of every copy) posts: the hole takes her messages. Then erin, whose
    client stopped hearing us, posts: her notices stay unacked and the hole
    stops before her messages; her next login is told bob had each."""
    store = MemoryStore()
    world, alice, bob = offline_carol(store)
    erin = world.login("erin")
    assert world.result(alice, world.request(alice, GroupAction.ADD, "team", "erin")).code == 0
    assert world.result(alice, world.request(alice, GroupAction.REMOVE, "team", "carol")).code == 0
    world.settle_all()
    removal = 3  # CREATED, ADDED, REMOVED
    quiet = 2 * GROUP_TRIM_EVERY
    for n in range(1, quiet + 1):
        world.post(alice, "team", f"a{n}", n)
        if n % 8 == 0:
            world.step()
    world.run_until(lambda: len(texts(bob)) == quiet, 1000, "bob has alice's")
    world.settle_all()
    assert log_seqs(store)[: removal - 1] == [2, 3]  # carol's
    assert len(log_seqs(store)) < removal + GROUP_TRIM_EVERY  # alice's went in holes
    deaf(world, erin)
    loud = 2 * GROUP_TRIM_EVERY
    for n in range(1, loud + 1):
        world.post(erin, "team", f"e{n}", n)
        if n % 8 == 0:
            world.step()
    world.settle_all(300)
    had = [t for t in texts(bob) if t.startswith("e")]
    assert len(had) >= GROUP_TRIM_EVERY  # (as many as her window let out unacked)
    kept = set(log_seqs(store))
    erins = [seq for seq, what, by, _ in entries(bob) if what == "message" and by == "erin"]
    assert set(erins) <= kept  # every one of hers, held for her notices
    world.clients.pop("erin", None)
    erin = world.login("erin")
    world.run_until(lambda: len({m for by, m in told_by(erin) if by == "bob"}) == len(had),
                    1000, "erin told bob had each")  # fmt: skip


def test_the_member_who_holds_the_group_back_leaving_frees_it(store: MessageStore) -> None:
    """One server as a cluster (tests/test_cluster_holes.py; so it was here
    before): carol stops reading; past the cap alice's posts fail naming
    her; she leaves (her client still shows nothing): posts go in again,
    and what comes after her leaving is cut out of the log while she still
    is owed hers."""
    cap = 5
    world = GroupWorld(store, mailbox_messages=cap)
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    created(world, alice, "bob", "carol")
    world.settle_all()
    world.holding.add("carol")
    for n in range(1, cap + 2):
        world.post(alice, "team", f"a{n}", n)
        world.settle_all(5)
    (fail,) = fails(alice)
    assert fail.reason == ErrorCode.MAILBOX_FULL and "carol" in fail.message
    assert world.result(carol, world.request(carol, GroupAction.LEAVE, "team")).code == 0
    world.settle_all()
    left = cap + 2  # CREATED, the messages, LEFT
    count = GROUP_TRIM_EVERY + 8
    for n in range(100, 100 + count):
        world.post(alice, "team", f"a{n}", n)
        world.settle_all(2)
    world.run_until(lambda: len(texts(bob)) == cap + count, 2000, "bob has them")
    assert len(fails(alice)) == 1
    kept = log_seqs(store)
    assert kept[: cap + 1] == list(range(2, left + 1)), kept  # carol's
    assert len(kept) < cap + 1 + GROUP_TRIM_EVERY, kept
