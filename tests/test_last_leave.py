"""The last member's leaving hands them what they were owed before it
(issue 14, audit8 P1): the group's last member is treated like any leaver,
owed every entry up to and including their LEFT, in the group's order.
Before, `GroupTable.close` kept them only up to what their client had
receipted: an entry committed and not yet handed, in flight, or whose
receipt the client held back (GROUP_RECEIPT_HOLD) was neither handed nor
owed, so a message accepted for them ("recipients 1") never reached them,
the changes before their LEFT were skipped, and its sender never heard
"delivered by". Now the group is retired (its name free at once) until
they have their LEFT, then ends; a kill -9 between the leaving and the
hand-over loses nothing; the same in cluster mode."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from protocol import (
    CONTROL_STREAM,
    GroupAccept,
    GroupAction,
    GroupReached,
    GroupResult,
    Message,
    MsgId,
    Receipts,
)
from server_groups import is_retired
from server_store import MessageStore, ServerStore
from tests.redis_fixture import redis_server  # noqa: F401 (a fixture)
from tests.test_cluster_groups import Cluster, cluster_of  # noqa: F401 (a fixture)
from tests.test_cluster_groups2 import delete_account
from tests.test_durability import ServerRunner
from tests.test_groups_process import Member, create_team, pump_until
from tests.test_groups_relay import GroupWorld, created, entries, told_by


def two_leave_at_once(world: GroupWorld) -> tuple[MsgId, int, int]:
    """bob posts "bye" to #team (bob, carol), then leaves, and carol leaves
    in the same pass: her leaving comes before bob's entries are committed
    and handed to her. Answers (bye's id, bob's request, carol's)."""
    bob, carol = world.clients["bob"], world.clients["carol"]
    msg_id = world.post(bob, "team", "bye", 1)
    bob_leaves = world.request(bob, GroupAction.LEAVE, "team")
    carol_leaves = world.request(carol, GroupAction.LEAVE, "team")
    return msg_id, bob_leaves, carol_leaves


def held_then_left(world: GroupWorld) -> None:
    """bob posts "bye" to #team and leaves; carol's client (in `holding`)
    receipts none of it; carol leaves, the last member."""
    bob, carol = world.clients["bob"], world.clients["carol"]
    world.post(bob, "team", "bye", 1)
    assert world.result(bob, world.request(bob, GroupAction.LEAVE, "team")).code == 0
    assert world.result(carol, world.request(carol, GroupAction.LEAVE, "team")).code == 0


def test_the_last_leaver_gets_what_was_committed_before_her_leaving(store: MessageStore) -> None:
    """audit8 P1, repro A: bob posts and leaves, carol leaves in the same
    pass (which of the two is numbered last depends on the store: on disk,
    bob's message waits for its duplicate check and his leaving behind it).
    The last leaver gets every entry before their LEFT, then it, in order,
    as the other gets everything up to theirs; bob hears "delivered by
    carol"; then the retired group goes."""
    world = GroupWorld(store)
    bob, carol = world.login("bob"), world.login("carol")
    created(world, bob, "carol")
    world.settle_all()
    msg_id, bob_leaves, carol_leaves = two_leave_at_once(world)
    answers = [world.result(bob, bob_leaves), world.result(carol, carol_leaves)]
    assert [a.code for a in answers] == [0, 0]
    last, first = (carol, bob) if answers[1].message.endswith("it has ended") else (bob, carol)
    assert world.relay.groups.get("team") is None  # the name is free at once
    world.run_until(lambda: any(e[1:3] == ("left", last.name) for e in entries(last)), 200,
                    "the last leaver's LEFT")  # fmt: skip
    world.settle_all(60)
    by_seq = {e[0]: e for c in (bob, carol) for e in entries(c)}
    [accept] = bob.of(GroupAccept)
    by_seq.setdefault(accept.group_seq, (accept.group_seq, "message", "bob", "bye"))
    end = max(by_seq)
    assert sorted(by_seq) == list(range(1, end + 1))  # nothing lost between
    assert by_seq[end][1:3] == ("left", last.name)
    for client in (bob, carol):  # each: a run from 1 to their LEFT, their own message passed
        got = [e for e in entries(client)]
        upto = next(e[0] for e in got if e[1:3] == ("left", client.name))
        assert got == [by_seq[s] for s in range(1, upto + 1)
                       if by_seq[s][1:3] != ("message", client.name)], client.name  # fmt: skip
    had = [e for e in entries(carol) if e[1] == "message"]  # (none if she left before it)
    assert told_by(bob) == [("carol", msg_id) for _ in had]
    assert len(world.relay.groups) == 0  # had and told: the retired group is gone
    # A login later brings nothing twice.
    last.messages.clear()
    world.logout(last)
    last = world.login(last.name)
    world.settle_all(30)
    assert entries(last) == []


def test_a_held_receipt_still_tells_the_sender(store: MessageStore) -> None:
    """The message was handed to carol and her client holds its receipt
    (here: shows nothing) when she leaves last: her receipt of her LEFT
    covers it, and bob, who left before, hears "delivered by carol"."""
    world = GroupWorld(store)
    bob, carol = world.login("bob"), world.login("carol")
    created(world, bob, "carol")
    world.settle_all()
    world.holding.add("carol")
    msg_id = world.post(bob, "team", "bye", 1)
    world.run_until(lambda: len(entries(carol)) == 2, 200, "bye handed to carol")
    assert world.result(bob, world.request(bob, GroupAction.LEAVE, "team")).code == 0
    world.run_until(lambda: len(entries(carol)) == 4, 200, "bob's leaving handed to carol")
    world.holding.discard("carol")
    assert world.result(carol, world.request(carol, GroupAction.LEAVE, "team")).code == 0
    world.run_until(lambda: bool(told_by(bob)), 200, "bob told who has bye")
    world.settle_all()
    assert told_by(bob) == [("carol", msg_id)]
    assert [e[0] for e in entries(carol)] == [1, 2, 3, 4, 5]
    assert len(world.relay.groups) == 0


def test_two_leaving_last_together_each_get_every_change(store: MessageStore) -> None:
    """audit8 P1, repro B: alice leaves; bob and carol leave together (in
    one pass: carol's leaving is numbered before bob's entries are stored).
    bob gets everything up to his LEFT; carol, whose client receipts none
    of it and goes offline, gets at her next login bob's leaving, her
    ownership and her LEFT, none skipped (before, she was owed nothing)."""
    world = GroupWorld(store)
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    created(world, alice, "bob", "carol")
    world.settle_all()
    assert world.result(alice, world.request(alice, GroupAction.LEAVE, "team")).code == 0
    world.settle_all()
    world.holding.add("carol")
    bob_leaves = world.request(bob, GroupAction.LEAVE, "team")
    carol_leaves = world.request(carol, GroupAction.LEAVE, "team")
    assert world.result(bob, bob_leaves).code == 0
    assert world.result(carol, carol_leaves).message == "left #team; it has ended"
    world.settle_all()
    assert [(e[0], e[1], e[2]) for e in entries(bob)] == [
        (1, "created", "alice"), (2, "left", "alice"), (3, "owner", "alice"), (4, "left", "bob"),
    ]  # fmt: skip
    world.logout(carol)
    world.holding.discard("carol")
    carol = world.login("carol")
    world.settle_all(60)
    assert [(e[0], e[1], e[2]) for e in entries(carol)] == [
        (4, "left", "bob"), (5, "owner", "bob"), (6, "left", "carol"),
    ]  # fmt: skip
    world.settle_all(30)
    assert len(world.relay.groups) == 0


def test_the_last_leaver_logging_in_with_a_backlog_leaves_at_once(store: MessageStore) -> None:
    """audit8 P1, repro C: carol offline is owed alice's messages; alice
    leaves; carol logs in and leaves at once, before her receipts come:
    she still gets every message, then her LEFT, and alice hears
    "delivered by carol" for each."""
    world = GroupWorld(store)
    alice, carol = world.login("alice"), world.login("carol")
    created(world, alice, "carol")
    world.settle_all()
    world.logout(carol)
    ids = [world.post(alice, "team", f"L{i}", i + 1) for i in range(5)]
    world.settle_all()
    assert world.result(alice, world.request(alice, GroupAction.LEAVE, "team")).code == 0
    world.settle_all()
    world.holding.add("carol")
    carol = world.login("carol")
    leaving = world.request(carol, GroupAction.LEAVE, "team")
    world.holding.discard("carol")
    assert world.result(carol, leaving).code == 0
    world.run_until(lambda: any(e[1:3] == ("left", "carol") for e in entries(carol)), 200,
                    "carol's LEFT")  # fmt: skip
    world.run_until(lambda: len(told_by(alice)) == 5, 200, "alice told of each")
    world.settle_all()
    got = [e for e in entries(carol) if e[0] > 1]
    assert [(e[0], e[1], e[3]) for e in got] == [
        *((i + 2, "message", f"L{i}") for i in range(5)),
        (7, "left", ()), (8, "owner", ("carol",)), (9, "left", ()),
    ]  # fmt: skip
    assert sorted(told_by(alice)) == sorted(("carol", i) for i in ids)
    assert len(world.relay.groups) == 0


def test_a_group_made_again_while_the_last_leaver_is_owed(store: MessageStore) -> None:
    """The name is free at once: #team made again (carol in it) while the
    old one is retired and owed to carol; she gets the old one's entries up
    to her LEFT, then the new one's from its creation, the seqs going on."""
    world = GroupWorld(store)
    bob, carol = world.login("bob"), world.login("carol")
    created(world, bob, "carol")
    world.settle_all()
    world.holding.add("carol")  # her client shows nothing, so receipts nothing
    held_then_left(world)
    world.settle_all()
    assert [is_retired(k) for k in world.relay.groups.groups] == [True]
    created(world, bob, "carol")
    world.settle_all()
    world.holding.discard("carol")
    carol.messages.clear()
    world.logout(carol)
    carol = world.login("carol")
    world.settle_all(60)
    assert [(e[0], e[1]) for e in entries(carol)] == [
        (2, "message"), (3, "left"), (4, "owner"), (5, "left"), (6, "created"),
    ]  # fmt: skip
    world.settle_all(30)
    assert list(world.relay.groups.groups) == ["team"]


def test_a_restart_between_the_leaving_and_the_hand_over(tmp_path: Path) -> None:
    """The group's end is stored with the LEFT in its log (one write): the
    relay restarted before carol had them, she gets the rest at her next
    login, then her LEFT."""
    disk = ServerStore(tmp_path / "data")
    disk.start()
    world = GroupWorld(disk)
    bob, carol = world.login("bob"), world.login("carol")
    created(world, bob, "carol")
    world.settle_all()
    world.holding.add("carol")
    held_then_left(world)
    world.settle_all()
    disk.close()
    disk = ServerStore(tmp_path / "data")
    disk.start()
    try:
        world = GroupWorld(disk)
        assert [is_retired(k) for k in world.relay.groups.groups] == [True]
        carol = world.login("carol")
        world.settle_all(60)
        assert [(e[0], e[1], e[2]) for e in entries(carol)] == [
            (2, "message", "bob"), (3, "left", "bob"), (4, "owner", "bob"), (5, "left", "carol"),
        ]  # fmt: skip
        world.settle_all(30)
        # bob is still owed "delivered by carol": the retired group waits for his login.
        assert [is_retired(k) for k in world.relay.groups.groups] == [True]
        bob = world.login("bob")
        world.settle_all(30)
        assert told_by(bob) == [("carol", MsgId(9, 1))]
        assert len(world.relay.groups) == 0
    finally:
        disk.close()


def test_a_last_leaver_who_deletes_their_account_holds_nothing(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """carol, the last member, owed bob's message (her client receipted
    none of it), deletes her account: she leaves, the group is retired with
    her owed, and buried at once (she never will have it): bob, logging in
    again, hears so, and then the retired group goes."""
    world = GroupWorld(store)
    bob, carol = world.login("bob"), world.login("carol")
    created(world, bob, "carol")
    world.settle_all()
    world.holding.add("carol")
    msg_id = world.post(bob, "team", "bye", 1)
    assert world.result(bob, world.request(bob, GroupAction.LEAVE, "team")).code == 0
    world.run_until(lambda: len(entries(carol)) == 4, 200, "bye and bob's leaving at carol")
    world.logout(bob)
    delete_account(world, carol, monkeypatch)
    world.settle_all()
    assert [is_retired(k) for k in world.relay.groups.groups] == [True]
    bob = world.login("bob")
    world.run_until(lambda: any(m.gone for m in bob.of(GroupReached)), 200, "counted out")
    assert [(m.msg_id, m.gone) for m in bob.of(GroupReached) if m.gone] == [(msg_id, ("carol",))]
    world.settle_all()
    assert len(world.relay.groups) == 0


# --- real processes: a kill -9 between the leaving and the hand-over -------------


class Holder(Member):
    """A member whose client receipts nothing (its front end shows nothing
    yet: a receipt held back)."""

    def send(self, message: Message, stream: int = CONTROL_STREAM) -> None:
        if not isinstance(message, Receipts):
            super().send(message, stream)


def test_a_kill_between_the_leaving_and_the_hand_over_loses_nothing(tmp_path: Path) -> None:
    """bob posts and leaves; carol, whose client receipts none of it,
    leaves last ("it has ended"); the server is killed with SIGKILL and
    started again: at her next login carol gets everything from the group's
    creation (bob's message, his leaving, her ownership) to her LEFT, once,
    in order; bob, logging in again,
    hears "delivered by carol"."""
    runner = ServerRunner(tmp_path / "server-data")
    runner.start()
    bob = Member("bob", runner.address)
    carol: Member = Holder("carol", runner.address)
    members = [bob, carol]
    try:
        create_team(members)
        msg_id = bob.post("bye")
        request = bob.request(GroupAction.LEAVE)
        pump_until(members, lambda: any(r.request_id == request for r in bob.of(GroupResult)),
                   20, "bob's leaving")  # fmt: skip
        request = carol.request(GroupAction.LEAVE)
        pump_until(members, lambda: any(r.request_id == request for r in carol.of(GroupResult)),
                   20, "carol's leaving")  # fmt: skip
        assert carol.of(GroupResult)[-1].message == "left #team; it has ended"
        runner.restart()
        for member in members:
            member.close()
        carol = Member("carol", runner.address)
        members = [carol]
        pump_until(members, lambda: any(e[2:4] == ("left", "carol") for e in carol.entries()),
                   20, "carol's LEFT")  # fmt: skip
        bob = Member("bob", runner.address)
        members = [bob, carol]
        pump_until(members, lambda: bool(bob.of(GroupReached)), 20, "bob told")
        assert [(e[0], e[2], e[3]) for e in carol.entries()] == [
            (1, "created", "bob"), (2, "message", "bob"), (3, "left", "bob"), (4, "owner", "bob"),
            (5, "left", "carol"),
        ]  # fmt: skip
        assert [(m.msg_id, m.by) for m in bob.of(GroupReached)] == [(msg_id, ("carol",))]
    finally:
        for member in members:
            member.close()
        runner.close()


# --- cluster mode: the same in Redis (a real redis-server) ------------------------


def test_in_a_cluster_the_last_leaver_gets_the_rest_and_the_sender_is_told(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """bob on one node posts "bye" and leaves; carol on the other, whose
    client has receipted none of it (its receipts held), leaves last: the
    store logs her LEFT and retires the group; she is handed what she had
    not receipted and her LEFT, her receipt tells bob "delivered by carol",
    and then every key of the retired group goes."""
    cluster = cluster_of(2)
    bob, carol = cluster.login(0, "bob"), cluster.login(1, "carol")
    assert cluster.request(0, bob, GroupAction.CREATE, "team", "carol").code == 0
    cluster.settle()
    cluster.nodes[1].holding.add("carol")
    msg_id = cluster.post(0, bob, "team", "bye", 1)
    assert cluster.request(0, bob, GroupAction.LEAVE, "team").code == 0
    cluster.run_until(lambda: len(entries(carol)) == 4, 300, "bye and bob's leaving at carol")
    cluster.nodes[1].holding.discard("carol")  # (nothing more comes before her leaving)
    answer = cluster.request(1, carol, GroupAction.LEAVE, "team")
    assert (answer.code, answer.message) == (0, "left #team; it has ended")
    cluster.run_until(lambda: any(e[1:3] == ("left", "carol") for e in entries(carol)), 300,
                      "carol's LEFT")  # fmt: skip
    cluster.run_until(lambda: bool(told_by(bob)), 300, "bob told")
    cluster.settle(30)
    assert told_by(bob) == [("carol", msg_id)]
    # Every entry up to her LEFT, which comes last. (What was handed before
    # her leaving goes on under the retired key if her node still has it
    # then; if the group's end was heard first, the retired group's copy
    # hands it again from the store's cursor, and her client, which has
    # it, takes it once.)
    got = [(e[0], e[1], e[2]) for e in entries(carol)]
    assert sorted(set(got)) == [
        (1, "created", "bob"), (2, "message", "bob"), (3, "left", "bob"), (4, "owner", "bob"),
        (5, "left", "carol"),
    ]  # fmt: skip
    assert got[-1] == (5, "left", "carol")
    redis_client = cluster.nodes[0].node.store.client
    assert not redis_client.smembers("chat:groups")
    assert not redis_client.keys("chat:g*!*")  # the retired keys, every one gone
    assert [list(w.relay.groups.groups) for w in cluster.nodes] == [[], []]


def test_in_a_cluster_a_last_leaver_who_deletes_their_account_holds_nothing(
    cluster_of: Callable[..., Cluster],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """carol, the last member, owed bob's message (her client receipted
    none of it), deletes her account: she leaves, the group is retired with
    her owed, then buried (she never will have it): bob, logging in again,
    hears so, and every key of the retired group goes."""
    cluster = cluster_of(2)
    bob, carol = cluster.login(0, "bob"), cluster.login(1, "carol")
    assert cluster.request(0, bob, GroupAction.CREATE, "team", "carol").code == 0
    cluster.settle()
    cluster.nodes[1].holding.add("carol")
    msg_id = cluster.post(0, bob, "team", "bye", 1)
    assert cluster.request(0, bob, GroupAction.LEAVE, "team").code == 0
    cluster.run_until(lambda: len(entries(carol)) == 4, 300, "bye and bob's leaving at carol")
    cluster.nodes[0].logout(bob)
    delete_account(cluster.nodes[1], carol, monkeypatch)
    cluster.settle(30)
    redis_client = cluster.nodes[0].node.store.client
    [retired] = redis_client.smembers("chat:groups")
    assert is_retired(retired)
    bob = cluster.login(0, "bob")
    cluster.run_until(lambda: any(m.gone for m in bob.of(GroupReached)), 300, "counted out")
    assert [(m.msg_id, m.gone) for m in bob.of(GroupReached) if m.gone] == [(msg_id, ("carol",))]
    cluster.settle(30)
    assert not redis_client.smembers("chat:groups")
    assert not redis_client.keys("chat:g*!*")
