"""Cluster mode's group holds (issue 14; `Relay._hold_group`): what a session
sends to a group after a membership request to it waits for the request's
answer. In-process nodes on a real redis-server (test_cluster_groups.py),
with the store's membership changes kept back where a test needs a request
to stay unanswered (as while Redis is slow or unreachable). A hold ends
with its session or with its own request's answer, never another's (a
request id a client used for two groups, or sent again by its next
session), and what a session's holds keep is bounded: past the bound its
datagrams wait with the client (not acked) and nothing is lost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from chat_server import MAX_GROUP_HELD, MAX_GROUP_HELD_BYTES
from protocol import (
    MAX_DATAGRAM,
    GroupAccept,
    GroupAction,
    GroupDeliver,
    GroupReached,
    GroupResult,
    Receipts,
)
from reliability import MAX_PARTIAL_MESSAGES, RECV_WINDOW
from server_store import ChangeGroup, MemoryStore
from tests.redis_fixture import redis_server  # noqa: F401 (a fixture)
from tests.test_cluster_groups import Cluster, NodeWorld, cluster_of  # noqa: F401 (a fixture)
from tests.test_groups_relay import GroupWorld, entries

Stash = list[tuple[Any, Any]]


def keep_changes_back(world: NodeWorld) -> Stash:
    """The node's store takes no membership change (`ChangeGroup`) until
    `let_through`: its requests stay unanswered, as while Redis is away."""
    stash: Stash = []
    store: Any = world.node.store
    submit = store.submit

    def kept(op: Any, then: Any = None) -> None:
        if isinstance(op, ChangeGroup) and store.keeping:
            stash.append((op, then))
        else:
            submit(op, then)

    store.keeping, store.own_submit = True, submit
    store.submit = kept
    return stash


def let_through(world: NodeWorld, stash: Stash, count: int | None = None) -> None:
    """The first `count` changes kept back (all, with None) go on; with all,
    the store takes changes at once again."""
    store: Any = world.node.store
    go = stash[:count] if count is not None else list(stash)
    del stash[: len(go)]
    if count is None:
        store.keeping = False
    for op, then in go:
        store.own_submit(op, then)


def three(cluster: Cluster) -> tuple[Any, Any, Any]:
    alice = cluster.login(0, "alice")
    cluster.login(0, "bob")
    erin = cluster.login(0, "erin")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob").code == 0
    cluster.settle()
    return alice, erin, cluster.nodes[0]


def test_a_request_sent_again_by_a_new_session_leaves_no_hold_behind(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """alice's add is unanswered when her client logs in again and sends it
    and her post again: the first session's hold ends with it (before, the
    new one's replaced it in the request's index and it stayed for ever,
    with its session and post, and every later post went through the
    holds); the add's answer releases the new one's."""
    cluster = cluster_of(1)
    alice, erin, a = three(cluster)
    kept = keep_changes_back(a)
    added = a.request(alice, GroupAction.ADD, "team", "erin")
    a.post(alice, "team", "p1", 5)
    cluster.settle(5)
    first = alice.conn.session_id
    assert a.relay._group_holds  # the post waits for the add
    alice = a.login("alice")  # the same client instance (9), a new session
    assert first not in a.relay.sessions and a.relay._group_holds == {}
    assert a.relay._holds_by_request == {}
    a._request_ids = added - 1
    assert a.request(alice, GroupAction.ADD, "team", "erin") == added
    a.post(alice, "team", "p1", 5)
    cluster.settle(5)
    assert list(a.relay._group_holds) == [alice.conn.session_id]
    let_through(a, kept)
    cluster.run_until(lambda: len(alice.of(GroupAccept)) == 1, 400, "the post accepted")
    cluster.settle(30)
    assert [e[:2] for e in entries(erin)] == [(2, "added"), (3, "message")]
    assert a.relay._group_holds == {} and a.relay._holds_by_request == {}


def test_a_request_id_used_for_two_groups_releases_each_hold_with_its_own_answer(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """A (buggy or hostile) client sends /add #x erin and /add #y erin under
    one request id, and posts to both: #x's answer releases #x's posts and
    not #y's, #y's answer #y's (before, the index kept only #y's hold under
    that id: #x's answer released #y's posts early and #x's were held for
    the life of the process, however many came)."""
    cluster = cluster_of(1)
    alice = cluster.login(0, "alice")
    cluster.login(0, "bob")
    cluster.login(0, "erin")
    a = cluster.nodes[0]
    for group in ("x", "y"):
        assert cluster.request(0, alice, GroupAction.CREATE, group, "bob").code == 0
    cluster.settle()
    kept = keep_changes_back(a)
    same = a.request(alice, GroupAction.ADD, "x", "erin")
    a._request_ids = same - 1
    a.request(alice, GroupAction.ADD, "y", "erin")
    a.post(alice, "x", "to x", 10)
    a.post(alice, "y", "to y", 11)
    cluster.settle(10)
    assert len(kept) == 2 and alice.of(GroupAccept) == []
    let_through(a, kept, 1)  # #x's add is answered; #y's is not yet
    cluster.run_until(lambda: len(alice.of(GroupAccept)) == 1, 400, "#x's post accepted")
    cluster.settle(20)
    assert [m.msg_id.client_seq for m in alice.of(GroupAccept)] == [10]
    let_through(a, kept)
    cluster.run_until(lambda: len(alice.of(GroupAccept)) == 2, 400, "#y's post accepted")
    for i in range(100):  # nothing of #x is held any more
        a.post(alice, "x", f"x {i}", 20 + i)
    cluster.run_until(lambda: len(alice.of(GroupAccept)) == 102, 2000, "every post accepted")
    assert [r.request_id for r in alice.of(GroupResult)][-2:] == [same, same]
    assert a.relay._group_holds == {} and a.relay._holds_by_request == {}


@pytest.mark.parametrize("size", [10, 8000], ids=["by count", "by bytes"])
def test_what_a_hold_keeps_is_bounded_and_the_rest_waits_with_its_sender(
    cluster_of: Callable[..., Cluster],  # noqa: F811
    size: int,
) -> None:
    """alice's add stays unanswered (the store is away for changes) while
    she posts 250 messages behind it: the hold keeps at most
    `MAX_GROUP_HELD` of them, or `MAX_GROUP_HELD_BYTES` of text; the rest
    are withheld (not acked: her client sends them again), none accepted or
    lost (before, the hold took all of them, and anything more, however
    long the request took). Once answered, every post is accepted once, in
    the order sent, after the add: erin has each."""
    cluster = cluster_of(1)
    alice, erin, a = three(cluster)
    kept = keep_changes_back(a)
    a.request(alice, GroupAction.ADD, "team", "erin")
    count = 250
    for i in range(count):
        a.post(alice, "team", f"{i:04d}".ljust(size, "."), 10 + i)
    cluster.settle(400)
    assert a.relay.stats["withheld_group_hold"] > 0 and alice.of(GroupAccept) == []
    holds = a.relay._group_holds[alice.conn.session_id]
    # (Past the bound by what one datagram completes at most: its chunks, up
    # to the receive window, and messages whose earlier fragments were in.)
    assert holds.count <= MAX_GROUP_HELD + RECV_WINDOW
    assert holds.size <= MAX_GROUP_HELD_BYTES + MAX_PARTIAL_MESSAGES * size + MAX_DATAGRAM
    assert holds.count < count
    let_through(a, kept)
    cluster.run_until(lambda: len(alice.of(GroupAccept)) == count, 4000, "every post accepted")
    cluster.settle(30)
    got = entries(erin)
    assert got[0][:2] == (2, "added")
    assert [e[3][:4] for e in got[1:]] == [f"{i:04d}" for i in range(count)]
    assert [e[0] for e in got] == list(range(2, 3 + count))
    assert a.relay._group_holds == {} and a.relay._holds_by_request == {}


def test_a_hold_ends_with_its_session_while_its_request_is_unanswered(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """alice logs out while her add waits for the store (Redis away): what
    her hold kept goes with her session at once, not when the store comes
    back; the add, done then, is answered at her next login."""
    cluster = cluster_of(1)
    alice, erin, a = three(cluster)
    kept = keep_changes_back(a)
    added = a.request(alice, GroupAction.ADD, "team", "erin")
    a.post(alice, "team", "p1", 5)
    cluster.settle(5)
    a.logout(alice)
    assert a.relay._group_holds == {} and a.relay._holds_by_request == {}
    let_through(a, kept)
    cluster.settle(20)
    assert [e[:2] for e in entries(erin)] == [(2, "added")]
    alice = a.login("alice")
    a._request_ids = added - 1
    a.request(alice, GroupAction.ADD, "team", "erin")  # sent again
    a.post(alice, "team", "p1", 5)
    cluster.run_until(lambda: len(alice.of(GroupAccept)) == 1, 400, "the post accepted")
    cluster.settle(20)
    assert [(r.request_id, r.code) for r in alice.of(GroupResult)] == [(added, 0)]
    assert [e[:2] for e in entries(erin)] == [(2, "added"), (3, "message")]


def test_delivered_by_told_again_at_the_next_login_as_on_one_server(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """alice was told bob has m1; erin, who has not shown it, is removed and
    added again while alice is away, then has it: at alice's next login (on
    the other node) she is told bob and erin, once each, exactly as one
    server tells her (docs/CLUSTER.md: the mark is one number per sender
    and group; the review saw bob twice against one server's client
    events, which are deduplicated)."""

    def reached(client: Any) -> list[tuple[int, str]]:
        return [(m.msg_id.client_seq, by) for m in client.of(GroupReached) for by in m.by]

    def script(world: Any, on: Callable[[int, str], Any], request: Any, settle: Any) -> Any:
        alice, bob, erin = on(0, "alice"), on(0, "bob"), on(-1, "erin")
        assert request(bob, GroupAction.CREATE, "alice", "erin") == 0
        settle(10)
        world(-1).holding.add("erin")
        world(0).post(alice, "team", "m1", 1)
        for _ in range(300):
            if ("bob" in [b for _, b in reached(alice)]) and erin.of(GroupDeliver):
                break
            settle(1)
        settle(40)
        first = reached(alice)
        world(0).logout(alice)
        assert request(bob, GroupAction.REMOVE, "erin") == 0
        assert request(bob, GroupAction.ADD, "erin") == 0
        settle(20)
        world(-1).holding.clear()
        erin.send(Receipts(tuple(d.server_msg_id for d in erin.of(GroupDeliver))))
        settle(20)
        alice = on(-1, "alice")
        settle(60)
        return first, reached(alice)

    one = GroupWorld(MemoryStore())
    alone = script(
        lambda _: one,
        lambda _, name: one.login(name),
        lambda c, action, *users: one.result(c, one.request(c, action, "team", *users)).code,
        one.settle_all,
    )
    cluster = cluster_of(2)
    together = script(
        lambda node: cluster.nodes[node],
        cluster.login,
        lambda c, action, *users: cluster.request(0, c, action, "team", *users).code,
        cluster.settle,
    )
    assert alone == together == ([(1, "bob")], [(1, "bob"), (1, "erin")])
