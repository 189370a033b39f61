"""Groups in cluster mode, second round (issues 14 and 15), in-process nodes
on a real redis-server as in test_cluster_groups.py: a message sent right
after a group request is numbered after it, as on one server, also while
the request is being checked against Redis (before, `/create #team`, `/add
#team erin` and a post typed back to back put the post before the add: erin
missed it)."""

from __future__ import annotations

from collections.abc import Callable

from protocol import ErrorCode, GroupAccept, GroupAction, GroupInfo, GroupResult
from tests.redis_fixture import redis_server  # noqa: F401 (a fixture)
from tests.test_cluster_groups import Cluster, cluster_of  # noqa: F401 (a fixture)
from tests.test_cluster_groups_fix import answers, deaf_to_group_notices
from tests.test_groups_relay import entries


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
