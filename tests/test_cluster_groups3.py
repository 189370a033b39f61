"""Groups in cluster mode, third round (issue 14), in-process nodes on a
real redis-server as in test_cluster_groups.py: posts held behind a
/create (`Relay._hold_group`) pay the fan-out budget before they are
numbered, not all at once when the create is answered; and a member whose
account is deleted on another node is counted out of a sender's "of N"
while the sender is online (before, only at its next login); and a node
that hears of a new entry while it reads a group's state reads the log on
to it (before, the entry waited for the next one or the beat, 5 s)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from protocol import GroupAccept, GroupAction, GroupReached
from server_store import ReadGroupState
from tests.redis_fixture import redis_server  # noqa: F401 (a fixture)
from tests.test_cluster_group_holds import keep_changes_back, let_through
from tests.test_cluster_groups import Cluster, cluster_of  # noqa: F401 (a fixture)
from tests.test_cluster_groups2 import delete_account, told
from tests.test_cluster_groups_fix import deaf_to_group_notices
from tests.test_cluster_node import cluster_module
from tests.test_groups_relay import entries, texts


def test_posts_held_behind_a_create_pay_the_fan_out_budget_before_they_go_on(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """/create #team with six members, 15 posts behind it, the create slow
    to be answered (Redis away for changes): the posts were taken with no
    copies reckoned (the group was not in the node's copy), and the old
    node numbered all of them when the answer came, 90 copies at once
    against a burst of 20. Now each waits until the budget pays for it."""
    rate, burst = 100.0, 20.0
    cluster = cluster_of(1, max_fanout_rate=rate, max_fanout_burst=burst)
    a = cluster.nodes[0]
    # The store's events carry the world's clock (the budget's, as in a
    # real node, where both are the monotonic clock).
    a.node.store.clock = lambda: a.now
    alice = cluster.login(0, "alice")
    names = [f"m{n}" for n in range(6)]
    members = [cluster.login(0, n) for n in names]
    kept = keep_changes_back(a)
    a.request(alice, GroupAction.CREATE, "team", *names)
    for i in range(15):
        a.post(alice, "team", f"p{i:02d}", i + 1)
    cluster.settle(5)
    assert len(kept) == 1 and alice.of(GroupAccept) == []
    let_through(a, kept)
    start = a.now
    for _ in range(600):
        got = sum(len(texts(m)) for m in members)
        assert got <= burst + rate * (a.now - start), (a.now - start, got)
        if got == 6 * 15:
            break
        cluster.step()
    assert all(texts(m) == [f"p{i:02d}" for i in range(15)] for m in members)
    assert a.relay.stats["held_fanout"] > 0
    cluster.settle(10)
    assert a.relay._group_holds == {} and a.relay._budget_waits == {}


def test_membership_changes_pay_the_fan_out_budget_in_a_cluster_too(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """The owner removes and adds dave ten times in a burst: each change is
    a copy for every member; they wait for the budget, in order, and are
    paid when Redis has applied them."""
    rate, burst = 100.0, 20.0
    cluster = cluster_of(1, max_fanout_rate=rate, max_fanout_burst=burst)
    a = cluster.nodes[0]
    a.node.store.clock = lambda: a.now
    alice = cluster.login(0, "alice")
    names = [f"m{n}" for n in range(5)]
    members = [cluster.login(0, n) for n in names]
    cluster.login(0, "dave")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", *names, "dave").code == 0
    cluster.settle(50)  # the budget is full again
    start, before = a.now, sum(len(entries(m)) for m in members)
    for _ in range(10):
        a.request(alice, GroupAction.REMOVE, "team", "dave")
        a.request(alice, GroupAction.ADD, "team", "dave")
    for _ in range(600):
        got = sum(len(entries(m)) for m in members) - before
        assert got <= burst + rate * (a.now - start), (a.now - start, got)
        if got == 5 * 20:
            break
        cluster.step()
    assert [[e[1] for e in entries(m)] for m in members] == [
        ["created"] + ["removed", "added"] * 10
    ] * 5
    assert a.relay.stats["held_fanout"] > 0


@pytest.mark.parametrize("heard", ["erased first", "left first"])
def test_a_member_deleted_on_another_node_is_counted_out_while_the_sender_is_online(
    cluster_of: Callable[..., Cluster],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    heard: str,
) -> None:
    """carol (on B) deletes her account without having alice's message;
    alice stays logged in on A: she hears carol never will, once (before,
    A's copy took carol's leaving as an ordinary one and alice heard it
    only at her next login). A may hear of the deletion before or after
    it applies carol's leaving from the log: either way."""
    cluster = cluster_of(2)
    alice, _ = cluster.login(0, "alice"), cluster.login(0, "bob")
    carol = cluster.login(1, "carol")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "carol").code == 0
    cluster.settle()
    cluster.nodes[1].holding.add("carol")
    msg = cluster.post(0, alice, "team", "before carol goes", 1)
    cluster.run_until(lambda: ("bob", msg) in told(alice) and len(texts(carol)) == 1, 300, "bob")
    a = cluster.nodes[0]
    if heard == "left first":
        # A hears nothing of accounts for a while: it applies carol's
        # leaving from the log first, then hears she was deleted.
        store = a.node.store
        deaf = store._on_notices
        late: list[str] = []

        def deferring(notices: list[str]) -> None:
            late.extend(n for n in notices if n.startswith("x\t"))
            deaf([n for n in notices if not n.startswith("x\t")])

        monkeypatch.setattr(store, "_on_notices", deferring)
    delete_account(cluster.nodes[1], carol, monkeypatch)
    cluster.settle(30)
    if heard == "left first":
        group = a.relay.groups.get("team")
        assert group is not None and "carol" in group.former  # left, not yet known as deleted
        assert late, "the deletion's notice"
        monkeypatch.undo()
        a.node.store._on_notices(late)
    cluster.run_until(lambda: any(m.gone for m in alice.of(GroupReached)), 300, "counted out")
    cluster.settle(30)
    assert [(m.msg_id, m.gone) for m in alice.of(GroupReached) if m.gone] == [(msg, ("carol",))]
    redis_client = a.node.store.client
    assert redis_client.hkeys("chat:gformer:{#team}") == []  # told: the tombstone went


def test_an_entry_announced_while_a_node_reads_the_groups_state_is_not_late(
    cluster_of: Callable[..., Cluster],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """B has no copy of #team: the CREATED entry's notice makes it read the
    group's state; alice's first message is stored and announced while that
    read is under way, and the state read is from before it. B used to
    drop that notice (a read was in flight), so bob had the message only
    at the next entry or at the beat (up to 5 s, the audit's 1.6-3.3 s).
    Now B reads the log on to it when the state is back."""
    monkeypatch.setattr(cluster_module(), "ROUTE_RENEW", 3600.0)  # no beat catches it up
    cluster = cluster_of(2)
    alice, bob = cluster.login(0, "alice"), cluster.login(1, "bob")
    a, b = cluster.nodes
    deaf_to_group_notices(cluster, 1)  # B hears of #team when the test says
    held: list[Any] = []
    submit = b.node.store.submit

    def holding_state(op: Any, then: Any = None) -> None:
        if isinstance(op, ReadGroupState) and then is not None and not held:
            submit(op, lambda: held.append(then))  # read now, answered later
        else:
            submit(op, then)

    monkeypatch.setattr(b.node.store, "submit", holding_state)
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob").code == 0
    group = a.relay.groups.get("team")
    assert group is not None
    b.relay.group_waiting("team", group.epoch, 1, b.now)
    cluster.run_until(lambda: bool(held), 200, "B's read of the state, done")
    cluster.post(0, alice, "team", "first in #team", 1)
    cluster.run_until(lambda: len(alice.of(GroupAccept)) == 1, 200, "the post stored")
    b.relay.group_waiting("team", group.epoch, 2, b.now)  # while the state's answer waits
    held.pop()()
    cluster.run_until(lambda: texts(bob) == ["first in #team"], 50, "bob has it at once")


def test_what_an_ended_group_owes_comes_first_in_a_cluster_too(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """audit14 G1 on a node: carol, away, removed from #team, which then
    ends while she is owed its rest; dave makes a new #team with her. At
    her login the old group's rest comes before the new group's entries
    (before: the new group's creation first, then "alice removed carol")."""
    cluster = cluster_of(1)
    a = cluster.nodes[0]
    alice, bob = cluster.login(0, "alice"), cluster.login(0, "bob")
    carol, dave = cluster.login(0, "carol"), cluster.login(0, "dave")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "carol").code == 0
    cluster.settle()
    a.logout(carol)
    cluster.post(0, alice, "team", "old 1", 1)
    cluster.settle()
    assert cluster.request(0, alice, GroupAction.REMOVE, "team", "carol").code == 0
    assert cluster.request(0, alice, GroupAction.LEAVE, "team").code == 0
    assert cluster.request(0, bob, GroupAction.LEAVE, "team").code == 0
    cluster.settle()
    assert cluster.request(0, dave, GroupAction.CREATE, "team", "carol").code == 0
    cluster.post(0, dave, "team", "new 1", 1)
    cluster.settle()
    carol = cluster.login(0, "carol")
    cluster.run_until(lambda: len(entries(carol)) == 4, 300, "carol's four entries")
    cluster.settle()
    got = [(e[1], e[2]) for e in entries(carol)]
    assert got == [("message", "alice"), ("removed", "alice"), ("created", "dave"),
                   ("message", "dave")], got  # fmt: skip
