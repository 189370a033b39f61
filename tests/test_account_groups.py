"""A deleted account and its groups (issues 14 and 16 together), in memory
and on SQLite: the account leaves every group it was in, as by `/leave`
(its members see it go, ownership passes on, a group it was the last of
ends); nobody counts it in "delivered 2 of N" any more; and whoever
registers the name next inherits no group, no backlog and no receipts."""

from __future__ import annotations

from pathlib import Path

from chat_server import ServerConfig
from client_core import AccountDeleted, GroupChanged, MembersListed, MessageReceived, StatusChanged
from protocol import GroupAction
from tests.test_accounts import DiskNet
from tests.test_client_core import Net
from tests.test_groups_client import Member, add, login


def changes(member: Member) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(e.change, e.by, e.users) for e in member.of(GroupChanged)]


def members_of(net: Net, member: Member, group: str) -> MembersListed:
    before = len(member.of(MembersListed))
    member.core.group_request(GroupAction.MEMBERS, group)
    net.run(lambda: len(member.of(MembersListed)) > before, f"{member.core.username}'s /members")
    answer: MembersListed = member.of(MembersListed)[-1]
    return answer


def run_deletion(net: Net) -> None:
    alice, bob, carol = login(net, "alice", "bob", "carol")
    alice.core.group_request(GroupAction.CREATE, "team", ("bob", "carol"))
    bob.core.group_request(GroupAction.CREATE, "solo")  # bob alone: ends with him
    net.run(lambda: len(carol.of(GroupChanged)) == 1, "carol told of #team")
    bob.core.send("before I go", net.now, to="#team")
    net.run(lambda: bool(carol.of(MessageReceived)), "bob's message reached carol")
    bob.core.delete_account("bob-pw")
    net.run(lambda: bool(bob.of(AccountDeleted)), "bob's account deleted")
    net.run(lambda: ("left", "bob", ()) in changes(carol), "carol saw bob leave")
    assert ("left", "bob", ()) in changes(alice)
    assert members_of(net, alice, "team") == MembersListed("team", "alice", ("alice", "carol"))
    assert net.relay.groups.get("solo") is None, "bob's group of one ended with him"

    # A message after it counts the members there are: "of 1", and it is
    # delivered to all of them.
    msg_id = alice.core.send("after bob", net.now, to="#team")
    net.run(lambda: any(isinstance(e, StatusChanged) and e.id == msg_id and e.state == "delivered"
                        for e in alice.events), "delivered to carol")  # fmt: skip
    accepted = [e for e in alice.of(StatusChanged) if e.id == msg_id and e.state == "accepted"]
    assert accepted and accepted[0].recipients == 1

    # Whoever takes the name next (no quarantine here) inherits nothing.
    heir = add(net, "bob")  # a new registration of the name
    net.run(lambda: heir.logged_in, "the name's next owner logged in")
    alice.core.send("to the team again", net.now, to="#team")
    net.run(lambda: sum(isinstance(e, MessageReceived) for e in carol.events) == 3, "carol")
    net.settle(5.0)
    assert not heir.of(GroupChanged) and not heir.of(MessageReceived)
    assert not heir.of(StatusChanged)
    assert net.relay.groups.user_groups("bob") == []
    assert "bob" not in net.relay.groups.former_of


def test_a_deleted_member_leaves_its_groups_and_its_heir_inherits_none() -> None:
    run_deletion(Net(ServerConfig(iterations=4096, key_workers=0, name_quarantine=0.0)))


def test_the_same_on_disk_and_after_a_restart(tmp_path: Path) -> None:
    net = DiskNet(tmp_path / "data", ServerConfig(iterations=4096, key_workers=0,
                                                  name_quarantine=0.0))  # fmt: skip
    try:
        run_deletion(net)
        net.restart()
        group = net.relay.groups.get("team")
        assert group is not None and list(group.members) == ["alice", "carol"]
        assert net.relay.groups.get("solo") is None
        rows = net.rows("SELECT COUNT(*) FROM group_members WHERE member_key='bob'")
        assert rows == [(0,)]
    finally:
        net.store.close()


def test_a_deleted_owner_hands_the_group_on() -> None:
    net = Net(ServerConfig(iterations=4096, key_workers=0))
    alice, bob, carol = login(net, "alice", "bob", "carol")
    alice.core.group_request(GroupAction.CREATE, "team", ("bob", "carol"))
    net.run(lambda: len(carol.of(GroupChanged)) == 1, "carol told of #team")
    alice.core.delete_account("alice-pw")
    net.run(lambda: ("owner", "alice", ("bob",)) in changes(carol), "ownership passed to bob")
    assert changes(bob)[-2:] == [("left", "alice", ()), ("owner", "alice", ("bob",))]
    assert members_of(net, carol, "team") == MembersListed("team", "bob", ("bob", "carol"))
