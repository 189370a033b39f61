"""A group that ends keeps what a former member is still owed (issue 14, a
reviewer's finding): erin, offline, is counted in "of N" for alice's
message (accepted: stored for her), then removed; alice leaves and the
group ends. Before, the group's rows went with it and erin's next login
brought neither the message nor her removal. Now the group goes on under
another key (`server_groups.retired_key`), its name free at once and a new
group of that name never mixed with it, until she has what she is owed;
then its rows go. On memory and SQLite (also across a restart)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from chat_server import ServerConfig
from client_core import AccountDeleted, GroupChanged, RecipientsChanged
from protocol import GroupAction, GroupReached
from server_groups import is_retired
from server_store import MessageStore, ServerStore
from tests.redis_fixture import redis_server  # noqa: F401 (a fixture)
from tests.test_bounds import Client
from tests.test_client_core import Net
from tests.test_cluster_groups import Cluster, cluster_of  # noqa: F401 (a fixture)
from tests.test_groups_client import login
from tests.test_groups_relay import GroupWorld, created, entries


def removed_then_ended(world: GroupWorld) -> Client:
    """alice and erin in #team; erin offline gets a message and her removal
    owed; alice leaves: the group ends. Answers alice's client."""
    alice, erin = world.login("alice"), world.login("erin")
    created(world, alice, "erin")
    world.settle_all()
    world.logout(erin)
    world.post(alice, "team", "before removal", 1)
    world.settle_all()
    assert world.result(alice, world.request(alice, GroupAction.REMOVE, "team", "erin")).code == 0
    answer = world.result(alice, world.request(alice, GroupAction.LEAVE, "team"))
    assert (answer.code, answer.message) == (0, "left #team; it has ended")
    world.settle_all()
    return alice


def rows(path: Path) -> list[tuple[str, int]]:
    """(group key, rows) of each group table in a data directory."""
    db = sqlite3.connect(path / "chat.db")
    try:
        return [
            (table, db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            for table in ("groups", "group_members", "group_log", "group_told")
        ]
    finally:
        db.close()


def test_a_removed_offline_member_gets_what_is_owed_after_the_group_ends(
    store: MessageStore,  # noqa: F811
) -> None:
    world = GroupWorld(store)
    removed_then_ended(world)
    assert world.relay.groups.get("team") is None  # the name is free
    [retired] = world.relay.groups.groups.values()
    assert is_retired(retired.key) and not retired.members and list(retired.former) == ["erin"]
    erin = world.login("erin")
    world.settle_all(60)
    assert entries(erin)[-2:] == [(2, "message", "alice", "before removal"),
                                  (3, "removed", "alice", ("erin",))]  # fmt: skip
    # Received: the rest goes, in memory and in the store.
    assert len(world.relay.groups) == 0
    erin.messages.clear()
    world.logout(erin)
    erin = world.login("erin")
    world.settle_all(30)
    assert entries(erin) == []  # nothing twice


def test_the_offline_member_who_was_last_gets_the_message(store: MessageStore) -> None:  # noqa: F811
    """The reviewer's first case (it held already): erin, the last member,
    is offline; the group does not end while she is in it."""
    world = GroupWorld(store)
    alice, bob, erin = world.login("alice"), world.login("bob"), world.login("erin")
    created(world, alice, "bob", "erin")
    world.settle_all()
    world.logout(erin)
    world.post(alice, "team", "for erin too", 1)
    world.settle_all()
    assert world.result(bob, world.request(bob, GroupAction.LEAVE, "team")).code == 0
    assert world.result(alice, world.request(alice, GroupAction.LEAVE, "team")).code == 0
    erin = world.login("erin")
    world.settle_all(60)
    assert [e[1:] for e in entries(erin)] == [
        ("message", "alice", "for erin too"),
        ("left", "bob", ()),
        ("left", "alice", ()),
        ("owner", "alice", ("erin",)),
    ]


def test_a_new_group_of_the_name_never_mixes_with_what_is_owed(
    store: MessageStore,  # noqa: F811
) -> None:
    """#team made again (erin in it too) while erin is owed the old one's
    entries: she gets the old entries once and the new group's from its
    creation; bob, in the new one only, nothing of the old."""
    world = GroupWorld(store)
    alice = removed_then_ended(world)
    bob = world.login("bob")
    created(world, alice, "bob", "erin")
    world.post(alice, "team", "new team", 2)
    world.settle_all()
    assert [e[1] for e in entries(bob)] == ["created", "message"]
    assert texts_of(bob) == ["new team"]
    group = world.relay.groups.get("team")
    assert group is not None and group.seq == 6 and list(group.members) == ["alice", "bob", "erin"]
    erin = world.login("erin")
    world.settle_all(80)
    got = [(e[0], e[1], e[3]) for e in entries(erin)]
    old = [(2, "message", "before removal"), (3, "removed", ("erin",))]
    new = [(5, "created", ("alice", "bob", "erin")), (6, "message", "new team")]  # (after 4)
    assert sorted(got[-4:], key=str) == sorted(old + new, key=str), got
    assert [g for g in got[-4:] if g in old] == old and [g for g in got[-4:] if g in new] == new
    world.settle_all(30)
    assert list(world.relay.groups.groups) == ["team"]  # the retired one is gone


def texts_of(client: Client) -> list[str]:
    return [e[3] for e in entries(client) if e[1] == "message"]


def test_what_is_owed_after_the_end_survives_a_restart(tmp_path: Path) -> None:
    disk = ServerStore(tmp_path / "data")
    disk.start()
    world = GroupWorld(disk)
    alice = removed_then_ended(world)
    created(world, alice, "alice")  # (a new #team of alice alone, meanwhile)
    world.settle_all()
    disk.close()

    disk = ServerStore(tmp_path / "data")
    disk.start()
    try:
        world = GroupWorld(disk)
        assert sorted(is_retired(k) for k in world.relay.groups.groups) == [False, True]
        erin = world.login("erin")
        world.settle_all(60)
        assert [(e[0], e[1]) for e in entries(erin)] == [(2, "message"), (3, "removed")]
        world.settle_all(30)
        # alice is still owed "delivered by erin": the retired group waits
        # for her login (it dropped what senders were owed before).
        assert sorted(is_retired(k) for k in world.relay.groups.groups) == [False, True]
        alice = world.login("alice")
        world.settle_all(30)
        assert [m.by for m in alice.of(GroupReached)] == [("erin",)]
        assert list(world.relay.groups.groups) == ["team"]
    finally:
        disk.close()
    # (the new #team's CREATED, which alice has, went at the restart's trim)
    assert rows(tmp_path / "data") == [("groups", 1), ("group_members", 1), ("group_log", 0),
                                       ("group_told", 0)]  # fmt: skip


def test_an_owed_member_who_deletes_their_account_lets_the_retired_group_go() -> None:
    """erin, owed the ended group's entries (her client shows nothing, so
    receipts nothing), deletes her account: nobody is owed, the rest goes."""
    net = Net(ServerConfig(iterations=4096, key_workers=0, name_quarantine=0.0))
    alice, erin = login(net, "alice", "erin")
    alice.core.group_request(GroupAction.CREATE, "team", ("erin",))
    net.run(lambda: len(erin.of(GroupChanged)) == 1, "erin told of #team")
    erin.shows = False
    alice.core.send("before removal", net.now, to="#team")
    alice.core.group_request(GroupAction.REMOVE, "team", ("erin",))
    alice.core.group_request(GroupAction.LEAVE, "team")
    net.run(lambda: net.relay.groups.get("team") is None, "#team ended")
    assert [is_retired(k) for k in net.relay.groups.groups] == [True]
    erin.core.delete_account("erin-pw")
    net.run(lambda: bool(erin.of(AccountDeleted)), "erin's account deleted")
    # alice is told erin never will have it; then the rest goes.
    net.run(lambda: len(net.relay.groups) == 0, "the retired group gone")
    assert [e.gone for e in alice.of(RecipientsChanged)] == ["erin"]


# --- cluster mode: the same in Redis (a real redis-server) ------------------------


def test_in_a_cluster_what_is_owed_stays_when_the_group_ends(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """The same on two nodes: the group's keys go on under the retired key
    (same hash tag) in one script, a new #team made meanwhile on the other
    node is another group, erin logs in on the node she was not on and gets
    the old entries once and the new group's; then the retired keys go."""
    cluster = cluster_of(2)
    alice, bob, erin = cluster.login(0, "alice"), cluster.login(1, "bob"), cluster.login(1, "erin")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "erin").code == 0
    cluster.settle()
    cluster.nodes[1].logout(erin)
    cluster.settle()
    cluster.post(0, alice, "team", "before removal", 1)
    cluster.settle()
    assert cluster.request(0, alice, GroupAction.REMOVE, "team", "erin").code == 0
    answer = cluster.request(0, alice, GroupAction.LEAVE, "team")
    assert (answer.code, answer.message) == (0, "left #team; it has ended")
    cluster.settle(20)
    assert cluster.copies("team") == [None, None]
    redis_client = cluster.nodes[0].node.store.client
    [retired] = [k for k in redis_client.smembers("chat:groups") if k != "team"]
    assert is_retired(retired)
    assert cluster.request(1, bob, GroupAction.CREATE, "team", "erin").code == 0
    cluster.post(1, bob, "team", "new team", 1)
    cluster.settle(20)
    erin = cluster.nodes[0].login("erin")
    cluster.run_until(lambda: len(entries(erin)) >= 4, 300, "erin's four entries")
    cluster.settle(30)
    got = [(e[0], e[1], e[3]) for e in entries(erin)]
    old = [(2, "message", "before removal"), (3, "removed", ("erin",))]
    new = [(5, "created", ("bob", "erin")), (6, "message", "new team")]  # (after 4)
    assert len(got) == 4 and [g for g in got if g in old] == old, got
    assert [g for g in got if g in new] == new, got
    assert redis_client.smembers("chat:groups") == {"team"}
    assert not redis_client.keys("chat:g*!*")  # the retired keys, every one gone
    assert [list(w.relay.groups.groups) for w in cluster.nodes] == [["team"], ["team"]]
