"""Groups' loose ends, second round (issue 14), on one server with the
clients' real cores and a fake clock, memory and SQLite (across a restart
too): "delivered by" is worked out from the members' cursors when its
sender logs in, so what a member had must still be there then. Before:
(1) a member removed and added again before her deliveries were told lost
her earlier membership, and the sender was never told she had the message;
one added again before she had everything of it never got the rest (a
message accepted for her, lost); (2) a group that ended dropped what its
senders were owed, and a sender away when a member had their message was
never told."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from chat_server import ServerConfig
from client_core import AccountDeleted, GroupChanged, MessageReceived, StatusChanged
from client_store import ClientStore
from protocol import GroupAction
from server_groups import is_retired
from tests.test_accounts import DiskNet
from tests.test_client_core import Net
from tests.test_groups_client import Member, add, login

CONFIG = ServerConfig(iterations=4096, key_workers=0, name_quarantine=0.0)


@pytest.fixture(params=["memory", "sqlite"])
def net(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Net]:
    if request.param == "memory":
        yield Net(CONFIG)
        return
    disk = DiskNet(tmp_path / "data", CONFIG)
    try:
        yield disk
    finally:
        disk.store.close()


def states(member: Member, msg: str) -> list[tuple[str, str | None]]:
    return [(e.state, e.by) for e in member.of(StatusChanged) if e.id == msg]


def away(net: Net, member: Member) -> None:
    """The member's client stops (its session ends on the server later)."""
    member.core.abort()
    del net.clients[member.addr]


def restart_if_disk(net: Net) -> None:
    if isinstance(net, DiskNet):
        net.restart()


def show_all(member: Member) -> None:
    """The member's window shows what it held back: it receipts them now."""
    member.shows = True
    for event in member.unshown:
        member.core.shown(event.id)
    member.unshown.clear()


@pytest.fixture
def alice_store(tmp_path: Path) -> Iterator[ClientStore]:
    """alice's client profile: her next client knows what she sent."""
    store = ClientStore(tmp_path / "alice", "alice")
    try:
        yield store
    finally:
        store.close()


def three(net: Net, alice_store: ClientStore) -> tuple[Member, Member, Member]:
    alice = add(net, "alice", store=alice_store)
    bob, erin = login(net, "bob", "erin")
    net.run(lambda: alice.logged_in, "alice in")
    return alice, bob, erin


def sent_then_away(
    net: Net, owner: str, alice_store: ClientStore
) -> tuple[Member, Member, Member, str]:
    """`owner` made #team of alice, bob, erin; erin's window shows nothing
    (no receipts); alice posts, bob has it, alice goes away."""
    alice, bob, erin = three(net, alice_store)
    maker, others = {"alice": (alice, ("bob", "erin")), "bob": (bob, ("alice", "erin"))}[owner]
    maker.core.group_request(GroupAction.CREATE, "team", others)
    net.run(lambda: all(len(m.of(GroupChanged)) == 1 for m in (alice, bob, erin)), "#team made")
    erin.shows = False
    msg = alice.core.send("for all of you", net.now, to="#team")
    net.run(lambda: ("delivered", "bob") in states(alice, msg), "bob has it")
    net.run(lambda: len(erin.unshown) == 1, "erin holds it unshown")
    away(net, alice)
    return alice, bob, erin, msg


def test_a_member_removed_and_added_again_is_still_told_as_having_the_message(
    net: Net, alice_store: ClientStore
) -> None:
    """erin has alice's message while alice is away; bob (the owner)
    removes erin and adds her again before alice is back: alice's login
    tells her erin has it (her earlier membership is kept until told)."""
    _, bob, erin, msg = sent_then_away(net, "bob", alice_store)
    show_all(erin)
    net.settle(1.0)
    bob.core.group_request(GroupAction.REMOVE, "team", ("erin",))
    net.run(lambda: len(erin.of(GroupChanged)) == 2, "erin removed")
    bob.core.group_request(GroupAction.ADD, "team", ("erin",))
    net.run(lambda: len(erin.of(GroupChanged)) == 3, "erin added again")
    net.settle(1.0)
    restart_if_disk(net)
    alice = add(net, "alice", store=alice_store)
    net.run(lambda: ("delivered", "erin") in states(alice, msg), "alice told erin has it")
    net.settle(2.0)
    assert [by for state, by in states(alice, msg) if state == "delivered"] == ["erin"]
    # Told: the earlier membership goes (in memory, and from the store at a restart).
    group = net.relay.groups.get("team")
    assert group is not None and group.owed == {} and group.former == {}
    assert list(group.members) == ["bob", "alice", "erin"]
    restart_if_disk(net)
    group = net.relay.groups.get("team")
    assert group is not None and group.former == {}


def test_added_again_she_gets_the_new_entries_and_none_twice(
    net: Net, alice_store: ClientStore
) -> None:
    """The earlier membership kept aside changes nothing for erin: she is
    handed what comes after her new ADDED entry, once."""
    _, bob, erin, _ = sent_then_away(net, "bob", alice_store)
    show_all(erin)
    bob.core.group_request(GroupAction.REMOVE, "team", ("erin",))
    bob.core.group_request(GroupAction.ADD, "team", ("erin",))
    net.run(lambda: erin.of(GroupChanged)[-1].change == "added", "erin added again")
    bob.core.send("after her return", net.now, to="#team")
    net.settle(2.0)
    got = [e.text for e in erin.of(MessageReceived)]
    assert got == ["for all of you", "after her return"]


def test_a_member_added_again_before_she_had_it_gets_it_in_order(
    net: Net, alice_store: ClientStore
) -> None:
    """erin, away, is counted in alice's message ("of 2"); bob removes her
    and adds her again: at her next login she gets the message and her
    removal, then her add, in the group's order, and alice hears erin has
    it (before: she started afresh at the add, and never had either)."""
    alice, bob, erin = three(net, alice_store)
    bob.core.group_request(GroupAction.CREATE, "team", ("alice", "erin"))
    net.run(lambda: all(len(m.of(GroupChanged)) == 1 for m in (alice, bob, erin)), "#team made")
    away(net, erin)
    msg = alice.core.send("while erin is away", net.now, to="#team")
    net.run(lambda: ("delivered", "bob") in states(alice, msg), "bob has it")
    away(net, alice)
    bob.core.group_request(GroupAction.REMOVE, "team", ("erin",))
    bob.core.group_request(GroupAction.ADD, "team", ("erin",))
    net.run(lambda: len(bob.of(GroupChanged)) == 3, "erin removed and added again")
    net.settle(1.0)
    restart_if_disk(net)
    erin = add(net, "erin")
    net.run(lambda: len(erin.of(GroupChanged)) >= 2, "erin's entries")
    net.settle(1.0)
    alice = add(net, "alice", store=alice_store)
    net.run(lambda: ("delivered", "erin") in states(alice, msg), "alice told erin has it")
    got = [(e.seq, e.text) for e in erin.of(MessageReceived)]
    assert got == [(2, "while erin is away")]
    changes = [(e.seq, e.change) for e in erin.of(GroupChanged)]
    assert changes[-2:] == [(3, "removed"), (4, "added")] and changes[:-2] in ([], [(1, "created")])


def test_a_sender_away_when_the_group_ended_is_told_at_the_next_login(
    net: Net, alice_store: ClientStore
) -> None:
    """alice posts and leaves #team; erin has the message only after alice
    went away; erin leaves last: #team ends. alice's next login tells her
    erin had it (the group went on retired until she was told); then the
    retired group goes, its rows too."""
    alice, bob, erin = three(net, alice_store)
    alice.core.group_request(GroupAction.CREATE, "team", ("bob", "erin"))
    net.run(lambda: all(len(m.of(GroupChanged)) == 1 for m in (alice, bob, erin)), "#team made")
    erin.shows = False
    msg = alice.core.send("before the end", net.now, to="#team")
    net.run(lambda: ("delivered", "bob") in states(alice, msg), "bob has it")
    alice.core.group_request(GroupAction.LEAVE, "team")
    net.run(lambda: len(bob.of(GroupChanged)) >= 2, "alice left")
    net.settle(1.0)
    away(net, alice)
    bob.core.group_request(GroupAction.LEAVE, "team")
    net.run(lambda: len(erin.unshown) == 1 and len(erin.of(GroupChanged)) >= 3, "bob left")
    show_all(erin)  # erin has it now, alice away
    net.settle(1.0)
    erin.core.group_request(GroupAction.LEAVE, "team")
    net.run(lambda: net.relay.groups.get("team") is None, "#team ended")
    net.settle(1.0)
    [retired] = net.relay.groups.groups.values()
    assert is_retired(retired.key) and list(retired.owed) == ["alice"]
    restart_if_disk(net)
    alice = add(net, "alice", store=alice_store)
    net.run(lambda: ("delivered", "erin") in states(alice, msg), "alice told erin has it")
    net.settle(2.0)
    assert [by for state, by in states(alice, msg) if state == "delivered"] == ["erin"]
    assert len(net.relay.groups) == 0  # told: the retired group is gone
    restart_if_disk(net)
    assert len(net.relay.groups) == 0


def test_a_group_that_ends_with_nothing_owed_goes_at_once(net: Net) -> None:
    """Every sender told (online, or nothing to tell): nothing is retired."""
    alice, bob = login(net, "alice", "bob")
    alice.core.group_request(GroupAction.CREATE, "team", ("bob",))
    net.run(lambda: len(bob.of(GroupChanged)) == 1, "#team made")
    msg = alice.core.send("hello", net.now, to="#team")
    net.run(lambda: ("delivered", "bob") in states(alice, msg), "bob has it")
    net.settle(1.0)
    alice.core.group_request(GroupAction.LEAVE, "team")
    bob.core.group_request(GroupAction.LEAVE, "team")
    net.run(lambda: net.relay.groups.get("team") is None, "#team ended")
    net.settle(2.0)
    assert len(net.relay.groups) == 0


def test_a_data_directory_from_before_earlier_memberships_loads(tmp_path: Path) -> None:
    """group_members had no `earlier` column: it is added at start, and the
    members load as they were, with none."""
    from server_store import ServerStore

    data = tmp_path / "data"
    disk = DiskNet(data, CONFIG)
    alice, bob = login(disk, "alice", "bob")
    alice.core.group_request(GroupAction.CREATE, "team", ("bob",))
    disk.run(lambda: len(bob.of(GroupChanged)) == 1, "#team made")
    disk.store.close()
    db = sqlite3.connect(data / "chat.db")
    db.execute("ALTER TABLE group_members DROP COLUMN earlier")
    db.commit()
    db.close()
    store = ServerStore(data)
    store.start()
    try:
        [group] = store.load().groups
        assert [(m.key, m.earlier) for m in group.members] == [("alice", ()), ("bob", ())]
    finally:
        store.close()


def test_a_deleted_sender_is_owed_nothing_after_a_restart(tmp_path: Path) -> None:
    """carol's messages are still in the log when she deletes her account;
    after a restart she is not owed "delivered by" again (her mark would
    hold the log's trim for ever: nobody is left to tell)."""
    disk = DiskNet(tmp_path / "data", CONFIG)
    try:
        alice, bob, carol = login(disk, "alice", "bob", "carol")
        alice.core.group_request(GroupAction.CREATE, "team", ("bob", "carol"))
        disk.run(lambda: len(carol.of(GroupChanged)) == 1, "#team made")
        bob.shows = False
        carol.core.send("before I go", disk.now, to="#team")
        disk.run(lambda: len(bob.unshown) == 1, "bob holds it unshown")
        carol.core.delete_account("carol-pw")
        disk.run(lambda: bool(carol.of(AccountDeleted)), "carol's account deleted")
        group = disk.relay.groups.get("team")
        assert group is not None and "carol" not in group.owed
        disk.restart()
        group = disk.relay.groups.get("team")
        assert group is not None and "carol" not in group.owed
    finally:
        disk.store.close()
