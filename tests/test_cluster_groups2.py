"""Groups in cluster mode, second round (issues 14 and 15), in-process nodes
on a real redis-server as in test_cluster_groups.py: a message sent right
after a group request is numbered after it, as on one server, also while
the request is being checked against Redis (before, `/create #team`, `/add
#team erin` and a post typed back to back put the post before the add: erin
missed it)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from protocol import (
    DeleteAccount,
    ErrorCode,
    GroupAccept,
    GroupAction,
    GroupDeliver,
    GroupInfo,
    GroupReached,
    GroupResult,
    MsgId,
    Receipts,
)
from server_groups import is_retired
from tests.redis_fixture import redis_server  # noqa: F401 (a fixture)
from tests.test_bounds import Client
from tests.test_cluster_groups import Cluster, cluster_of  # noqa: F401 (a fixture)
from tests.test_cluster_groups_fix import answers, deaf_to_group_notices
from tests.test_cluster_node import cluster_module
from tests.test_groups_relay import entries, texts


def test_a_post_right_after_an_add_being_checked_comes_after_it(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """The add is planned on a copy without the create still in flight, so
    it is checked against Redis; the post waits for its answer."""
    cluster = cluster_of(2)
    alice, bob = cluster.login(0, "alice"), cluster.login(1, "bob")
    erin = cluster.login(1, "erin")
    a = cluster.nodes[0]
    a.send(alice, "bob", "a message first: the session's ids are known", 1, instance=9)
    cluster.settle()
    made = a.request(alice, GroupAction.CREATE, "team", "bob")
    added = a.request(alice, GroupAction.ADD, "team", "erin")
    a.post(alice, "team", "hello all", 2)
    cluster.run_until(lambda: len(alice.of(GroupAccept)) == 1, 400, "the post accepted")
    cluster.settle(30)
    assert answers(alice, made, added) == [(0, "created #team"), (0, "added to #team")]
    expected = [(1, "created"), (2, "added"), (3, "message")]
    assert [e[:2] for e in entries(bob)] == expected
    assert [e[:2] for e in entries(erin)] == expected[1:]  # she has the post
    assert [a.group_seq for a in alice.of(GroupAccept)] == [3]


def test_posts_after_a_refused_request_are_not_held_for_ever(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """A request refused after the check (a REMOVE of someone not in the
    group) releases what waited behind it, in order."""
    cluster = cluster_of(2)
    alice, bob = cluster.login(0, "alice"), cluster.login(1, "bob")
    cluster.login(1, "erin")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob").code == 0
    cluster.settle()
    a = cluster.nodes[0]
    refused = a.request(alice, GroupAction.REMOVE, "team", "erin")
    for i in range(1, 4):
        a.post(alice, "team", f"post {i}", i)
    cluster.run_until(lambda: len(alice.of(GroupAccept)) == 3, 400, "the posts accepted")
    cluster.settle(20)
    assert [r.request_id for r in alice.of(GroupResult)][-1] == refused
    assert [e[3] for e in entries(bob) if e[1] == "message"] == ["post 1", "post 2", "post 3"]


def test_a_session_that_ends_while_its_post_waits_drops_it_and_the_next_takes_it(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """alice logs out while her add and post wait behind her create:
    nothing of them is done or accepted (her client keeps both and sends
    them again at its next login), nothing stays held; sent again, they
    are taken once, in order: erin has the post."""
    cluster = cluster_of(2)
    alice, bob = cluster.login(0, "alice"), cluster.login(1, "bob")
    erin = cluster.login(1, "erin")
    a = cluster.nodes[0]
    a.send(alice, "bob", "a message first: the session's ids are known", 1, instance=9)
    cluster.settle()
    a.request(alice, GroupAction.CREATE, "team", "bob")
    a.request(alice, GroupAction.ADD, "team", "erin")
    a.post(alice, "team", "hello all", 2)
    a.logout(alice)
    cluster.settle(30)
    assert alice.of(GroupAccept) == [] and alice.of(GroupResult) == []
    assert a.relay._group_holds == {} and a.relay._holds_by_request == {}
    assert [e[:2] for e in entries(bob)] == [(1, "created")] and entries(erin) == []
    alice = cluster.login(0, "alice")
    a._request_ids -= 2  # the same requests, sent again
    made = a.request(alice, GroupAction.CREATE, "team", "bob")
    added = a.request(alice, GroupAction.ADD, "team", "erin")
    a.post(alice, "team", "hello all", 2)
    cluster.run_until(lambda: len(alice.of(GroupAccept)) == 1, 400, "the post accepted")
    cluster.settle(20)
    # The create was done before: its answer is Redis's, not done twice.
    assert answers(alice, made, added) == [(0, "created #team"), (0, "added to #team")]
    assert [e[:2] for e in entries(erin)] == [(2, "added"), (3, "message")]
    assert [e[:2] for e in entries(bob)] == [(1, "created"), (2, "added"), (3, "message")]


def test_members_are_answered_from_redis_not_a_stale_copy(
    cluster_of: Callable[..., Cluster],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Node B has not heard of carol's add nor of dave's removal (made on
    A): /members on B answers Redis's members all the same, and dave,
    removed, is told he is not a member, as one server would."""
    cluster = cluster_of(2)
    alice = cluster.login(0, "alice")
    bob, dave = cluster.login(1, "bob"), cluster.login(1, "dave")
    cluster.login(0, "carol")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "dave").code == 0
    cluster.settle()
    deaf_to_group_notices(cluster, 1)
    # (nor reads the groups' heads at its beats: a slow run would catch up)
    monkeypatch.setattr(cluster.nodes[1].relay, "group_heads", lambda heads, now: None)
    assert cluster.request(0, alice, GroupAction.ADD, "team", "carol").code == 0
    assert cluster.request(0, alice, GroupAction.REMOVE, "team", "dave").code == 0
    stale = cluster.nodes[1].relay.groups.groups["team"]
    assert list(stale.members) == ["alice", "bob", "dave"]  # B has not heard
    b = cluster.nodes[1]
    asked = b.request(bob, GroupAction.MEMBERS, "team")
    cluster.run_until(lambda: any(i.request_id == asked for i in bob.of(GroupInfo)), 300,
                      "bob's members")  # fmt: skip
    [info] = [i for i in bob.of(GroupInfo) if i.request_id == asked]
    assert (info.group, info.owner, info.members) == ("team", "alice", ("alice", "bob", "carol"))
    refused = cluster.request(1, dave, GroupAction.MEMBERS, "team")
    assert refused.code == ErrorCode.NOT_A_MEMBER
    assert cluster.request(1, bob, GroupAction.MEMBERS, "nope").code == ErrorCode.NO_SUCH_GROUP


# --- "delivered by" from the cursors in cluster mode too (no row per copy) ------------


def told(client: Client) -> set[tuple[str, MsgId]]:
    return {(by, m.msg_id) for m in client.of(GroupReached) for by in m.by}


def redis_of(cluster: Cluster) -> Any:
    return cluster.nodes[0].node.store.client


def until_trimmed(cluster: Cluster, below: int, seconds: float = 60.0) -> None:
    """Step the nodes until a beat (a thread on the wall clock) trimmed
    #team's log below `below` entries: a busy machine runs beats late."""
    redis_client = redis_of(cluster)
    deadline = time.monotonic() + seconds
    while redis_client.xlen("chat:glog:{#team}") >= below:
        assert time.monotonic() < deadline, "the log was not trimmed"
        cluster.step()
        time.sleep(0.01)


def test_delivered_by_keeps_no_row_per_copy_in_redis(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """Members on both nodes: alice (on A) hears who has each message, from
    B's members through a notice to her node; Redis holds cursors and one
    mark per sender, never a queued row per copy."""
    cluster = cluster_of(2)
    alice, _ = cluster.login(0, "alice"), cluster.login(0, "bob")
    cluster.login(1, "carol"), cluster.login(1, "dave")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "carol", "dave").code == 0
    ids = [cluster.post(0, alice, "team", f"m{i}", i) for i in range(1, 6)]
    cluster.run_until(lambda: len(told(alice)) == 15, 400, "alice told of every copy")
    cluster.settle(20)
    assert told(alice) == {(by, i) for by in ("bob", "carol", "dave") for i in ids}
    redis_client = redis_of(cluster)
    assert redis_client.keys("chat:gnote*") == []  # (the old per-copy queue)
    assert redis_client.hgetall("chat:gsent:{#team}") == {"alice": "6"}
    assert int(redis_client.hget("chat:gtold:{#team}", "alice")) == 6  # told, durably


def test_a_sender_away_is_told_at_login_on_another_node_from_redis_cursors(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """carol (on B) has alice's messages only after alice logged out of A;
    alice logs in on B: told carol has each, worked out from the cursors in
    Redis; once told, a later login hears nothing again."""
    cluster = cluster_of(2)
    alice, _ = cluster.login(0, "alice"), cluster.login(0, "bob")
    carol = cluster.login(1, "carol")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "carol").code == 0
    cluster.settle()
    cluster.nodes[1].holding.add("carol")
    ids = [cluster.post(0, alice, "team", f"m{i}", i) for i in range(1, 4)]
    cluster.run_until(lambda: len(told(alice)) == 3 and len(texts(carol)) == 3, 300, "bob's")
    cluster.settle()
    cluster.nodes[0].logout(alice)
    cluster.settle()
    cluster.nodes[1].holding.clear()
    carol.send(Receipts(tuple(d.server_msg_id for d in carol.of(GroupDeliver))))
    cluster.settle(20)
    alice = cluster.login(1, "alice")
    cluster.run_until(lambda: {i for by, i in told(alice) if by == "carol"} == set(ids), 300,
                      "alice told at her login")  # fmt: skip
    cluster.settle(20)
    assert cluster.nodes[1].relay.groups.get("team").owed == {}  # type: ignore[union-attr]
    cluster.nodes[1].logout(alice)
    alice = cluster.login(0, "alice")
    cluster.settle(20)
    assert alice.of(GroupReached) == []


def test_redis_keeps_the_log_a_sender_is_still_owed(
    cluster_of: Callable[..., Cluster],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Everyone has alice's messages but alice, away, was not told: the
    beat's trim keeps them (her login reads them); once she is told, they
    go."""
    monkeypatch.setattr(cluster_module(), "ROUTE_RENEW", 0.2)
    cluster = cluster_of(1)
    alice, bob = cluster.login(0, "alice"), cluster.login(0, "bob")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob").code == 0
    cluster.settle()
    cluster.nodes[0].holding.add("bob")
    for i in range(1, 21):
        cluster.post(0, alice, "team", f"m{i}", i)
    cluster.run_until(lambda: len(texts(bob)) == 20, 300, "bob has them")
    cluster.nodes[0].logout(alice)
    cluster.nodes[0].holding.clear()
    bob.send(Receipts(tuple(d.server_msg_id for d in bob.of(GroupDeliver))))
    redis_client = redis_of(cluster)
    cluster.run_until(lambda: redis_client.hget("chat:gcur:{#team}", "bob") == "21", 300, "bob")
    time.sleep(0.5)  # beats: trims
    cluster.settle(20)
    assert redis_client.xlen("chat:glog:{#team}") >= 20  # kept for alice
    alice = cluster.login(0, "alice")
    cluster.run_until(lambda: len(told(alice)) == 20, 300, "alice told")
    until_trimmed(cluster, 5)


# --- items 1 and 2 of this round, in cluster mode ----------------------------------


def test_in_a_cluster_a_member_added_again_is_still_told_as_having_it(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """As on one server: erin (on B) has alice's message while alice is
    away; bob removes and adds erin again; alice's login tells her erin
    has it (erin's membership goes on from the earlier one in Redis)."""
    cluster = cluster_of(2)
    alice, bob = cluster.login(0, "alice"), cluster.login(0, "bob")
    erin = cluster.login(1, "erin")
    assert cluster.request(0, bob, GroupAction.CREATE, "team", "alice", "erin").code == 0
    cluster.settle()
    cluster.nodes[1].holding.add("erin")
    msg = cluster.post(0, alice, "team", "for all of you", 1)
    cluster.run_until(lambda: ("bob", msg) in told(alice) and len(texts(erin)) == 1, 300, "bob")
    cluster.nodes[0].logout(alice)
    cluster.nodes[1].holding.clear()
    erin.send(Receipts(tuple(d.server_msg_id for d in erin.of(GroupDeliver))))
    cluster.settle(20)
    assert cluster.request(0, bob, GroupAction.REMOVE, "team", "erin").code == 0
    cluster.settle(20)
    assert cluster.request(0, bob, GroupAction.ADD, "team", "erin").code == 0
    cluster.settle(20)
    stored = json.loads(redis_of(cluster).hget("chat:gmem:{#team}", "erin"))
    assert stored[1:] == [4, 0, [[1, 3]]]  # added at 4; 1-3 stay hers
    alice = cluster.login(1, "alice")
    cluster.run_until(lambda: ("erin", msg) in told(alice), 300, "alice told erin has it")
    cluster.settle(20)
    assert redis_of(cluster).hkeys("chat:gformer:{#team}") == []


def test_in_a_cluster_a_member_added_again_before_she_had_it_gets_it(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """erin, away, is counted in alice's message; bob removes her and adds
    her again: she gets the message and her removal at her next login
    (before, she started afresh at the add and never had either), then
    the add, in order; alice is told erin has it."""
    cluster = cluster_of(2)
    alice, bob = cluster.login(0, "alice"), cluster.login(0, "bob")
    erin = cluster.login(1, "erin")
    assert cluster.request(0, bob, GroupAction.CREATE, "team", "alice", "erin").code == 0
    cluster.settle()
    cluster.nodes[1].logout(erin)
    msg = cluster.post(0, alice, "team", "while erin is away", 1)
    cluster.run_until(lambda: ("bob", msg) in told(alice), 300, "bob has it")
    assert cluster.request(0, bob, GroupAction.REMOVE, "team", "erin").code == 0
    assert cluster.request(0, bob, GroupAction.ADD, "team", "erin").code == 0
    cluster.settle(20)
    erin = cluster.login(1, "erin")
    cluster.run_until(lambda: len(entries(erin)) >= 3, 300, "erin's entries")
    cluster.settle(20)
    assert [e[:2] for e in entries(erin)] == [(2, "message"), (3, "removed"), (4, "added")]
    cluster.run_until(lambda: ("erin", msg) in told(alice), 300, "alice told erin has it")


def test_in_a_cluster_a_sender_away_when_the_group_ended_is_told(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """As on one server: alice posts and leaves; erin has it after alice
    went away, then leaves last: #team ends, retired in Redis with alice's
    mark and erin's membership; alice's login (on the other node) tells her
    erin has it, and the retired keys go."""
    cluster = cluster_of(2)
    alice, erin = cluster.login(0, "alice"), cluster.login(1, "erin")
    bob = cluster.login(1, "bob")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "erin").code == 0
    cluster.settle()
    cluster.nodes[1].holding.add("erin")
    msg = cluster.post(0, alice, "team", "before the end", 1)
    cluster.run_until(lambda: ("bob", msg) in told(alice) and len(texts(erin)) == 1, 300, "bob")
    assert cluster.request(0, alice, GroupAction.LEAVE, "team").code == 0
    cluster.settle(20)
    cluster.nodes[0].logout(alice)
    assert cluster.request(1, bob, GroupAction.LEAVE, "team").code == 0
    cluster.nodes[1].holding.clear()
    erin.send(Receipts(tuple(d.server_msg_id for d in erin.of(GroupDeliver))))
    cluster.settle(20)
    answer = cluster.request(1, erin, GroupAction.LEAVE, "team")
    assert (answer.code, answer.message) == (0, "left #team; it has ended")
    cluster.settle(20)
    redis_client = redis_of(cluster)
    [retired] = [k for k in redis_client.smembers("chat:groups")]
    assert is_retired(retired)
    alice = cluster.login(1, "alice")
    cluster.run_until(lambda: ("erin", msg) in told(alice), 300, "alice told erin had it")
    cluster.settle(30)
    assert redis_client.smembers("chat:groups") == set()
    assert not redis_client.keys("chat:g*!*")  # the retired keys, every one gone


# --- a deleted member's tombstone is kept in Redis too -----------------------------


def delete_account(world: Any, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """`client` deletes their account on `world`'s node (the password's
    proof is tested elsewhere: accepted here)."""
    relay = world.relay
    session = next(s for s in relay.sessions.values() if s.user.name == client.name)
    monkeypatch.setattr(relay, "_prove", lambda *args: b"ok")
    relay._on_delete_account(session, DeleteAccount(b"n" * 16, b"p" * 32), world.now)


def test_in_a_cluster_a_member_deleted_before_having_it_is_counted_out(
    cluster_of: Callable[..., Cluster],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """carol (on B) deletes her account without having alice's message:
    Redis keeps her membership under a tombstone (it dropped it at once
    before, and alice was never told), so alice's next login hears carol
    never will; then the tombstone goes."""
    cluster = cluster_of(2)
    alice, _ = cluster.login(0, "alice"), cluster.login(0, "bob")
    carol = cluster.login(1, "carol")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "carol").code == 0
    cluster.settle()
    cluster.nodes[1].holding.add("carol")
    msg = cluster.post(0, alice, "team", "before carol goes", 1)
    cluster.run_until(lambda: ("bob", msg) in told(alice) and len(texts(carol)) == 1, 300, "bob")
    cluster.nodes[0].logout(alice)
    delete_account(cluster.nodes[1], carol, monkeypatch)
    cluster.settle(30)
    redis_client = redis_of(cluster)
    assert redis_client.hkeys("chat:gformer:{#team}") == ["!carol!3"]
    alice = cluster.login(1, "alice")
    cluster.run_until(lambda: any(m.gone for m in alice.of(GroupReached)), 300, "counted out")
    assert [(m.msg_id, m.gone) for m in alice.of(GroupReached) if m.gone] == [(msg, ("carol",))]
    cluster.settle(30)
    assert redis_client.hkeys("chat:gformer:{#team}") == []


def test_a_deleted_senders_mark_does_not_hold_the_trim_in_redis(
    cluster_of: Callable[..., Cluster],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """carol posts, bob has none of it yet, carol deletes her account: her
    mark in Redis no longer holds the log (nobody is left to tell), so once
    bob has everything the beat trims it."""
    monkeypatch.setattr(cluster_module(), "ROUTE_RENEW", 0.2)
    cluster = cluster_of(1)
    alice, bob = cluster.login(0, "alice"), cluster.login(0, "bob")
    carol = cluster.login(0, "carol")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "carol").code == 0
    cluster.settle()
    cluster.nodes[0].holding.update({"alice", "bob"})
    for i in range(1, 21):
        cluster.post(0, carol, "team", f"m{i}", i)
    cluster.run_until(lambda: len(texts(bob)) == 20 and len(texts(alice)) == 20, 300, "fan-out")
    delete_account(cluster.nodes[0], carol, monkeypatch)
    cluster.settle(20)
    cluster.nodes[0].holding.clear()
    for member in (alice, bob):
        member.send(Receipts(tuple(d.server_msg_id for d in member.of(GroupDeliver))))
    until_trimmed(cluster, 5)
