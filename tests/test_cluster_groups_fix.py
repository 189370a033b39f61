"""Cluster mode: a membership request is not refused, nor answered "nothing
to do", on a node's stale copy of the group (issues 14 and 15, a reviewer's
finding). Each node plans a change on its copy; a copy may lack a change
still in flight from the same node (requests typed back to back) or one
made on another node and not heard of yet. A refusal or a no-op verdict is
checked against Redis's head first (the copy catches up to it, the request
is planned again), so the answers are those of one server. In-process
nodes on a real redis-server, as in test_cluster_groups.py."""

from __future__ import annotations

from collections.abc import Callable

from protocol import ErrorCode, GroupAction, GroupResult
from tests.redis_fixture import redis_server  # noqa: F401 (a fixture)
from tests.test_cluster_groups import Cluster, cluster_of  # noqa: F401 (a fixture)
from tests.test_groups_relay import entries


def deaf_to_group_notices(cluster: Cluster, node: int) -> None:
    """Node `node` hears no "group G has entries up to S" notice: its copy
    stays behind until it asks the store itself."""
    store = cluster.nodes[node].node.store
    deaf = store._on_notices
    store._on_notices = lambda notices: deaf([n for n in notices if n[:2] != "g\t"])


def answers(client: object, *request_ids: int) -> list[tuple[int, str]]:
    found = {r.request_id: (r.code, r.message) for r in client.of(GroupResult)}  # type: ignore[attr-defined]
    return [found[i] for i in request_ids]


def test_create_add_leave_sent_together_on_one_node_are_all_done(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """/create #team bob, /add #team erin, /leave #team in one pass: the add
    and the leave were refused (no_such_group) on the copy that had not yet
    taken the create still in flight."""
    cluster = cluster_of(2)
    alice, bob = cluster.login(0, "alice"), cluster.login(1, "bob")
    erin = cluster.login(1, "erin")
    a = cluster.nodes[0]
    ids = (a.request(alice, GroupAction.CREATE, "team", "bob"),
           a.request(alice, GroupAction.ADD, "team", "erin"),
           a.request(alice, GroupAction.LEAVE, "team"))  # fmt: skip
    cluster.run_until(lambda: len(alice.of(GroupResult)) >= 3, 400, "three answers")
    assert answers(alice, *ids) == [(0, "created #team"), (0, "added to #team"), (0, "left #team")]
    cluster.settle(30)
    changes = [(e[1], e[2]) for e in entries(bob)]
    assert changes[:3] == [("created", "alice"), ("added", "alice"), ("left", "alice")], changes
    assert [e[:2] for e in entries(erin)][:1] == [(2, "added")]
    assert cluster.copies("team") == [(4, "bob", ["bob", "erin"])] * 2  # (4: the OWNER entry)


def test_an_add_then_a_remove_sent_together_on_one_node_are_both_done(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """The remove was refused ('erin' is not a member) on the copy without
    the add still in flight; erin stayed."""
    cluster = cluster_of(2)
    alice, _ = cluster.login(0, "alice"), cluster.login(1, "bob")
    cluster.login(1, "erin")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob").code == 0
    cluster.settle()
    a = cluster.nodes[0]
    first = a.request(alice, GroupAction.ADD, "team", "erin")
    second = a.request(alice, GroupAction.REMOVE, "team", "erin")
    cluster.run_until(lambda: len(alice.of(GroupResult)) >= 3, 300, "both answers")
    assert answers(alice, first, second) == [(0, "added to #team"), (0, "removed from #team")]
    cluster.settle(20)
    assert [c[2] for c in cluster.copies("team")] == [["alice", "bob"]] * 2


def test_a_remove_then_an_add_sent_together_on_one_node_are_both_done(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """The add was answered code 0 "already members" on the copy without the
    remove still in flight; erin stayed out."""
    cluster = cluster_of(2)
    alice, _ = cluster.login(0, "alice"), cluster.login(1, "bob")
    cluster.login(1, "erin")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "erin").code == 0
    cluster.settle()
    a = cluster.nodes[0]
    first = a.request(alice, GroupAction.REMOVE, "team", "erin")
    second = a.request(alice, GroupAction.ADD, "team", "erin")
    cluster.run_until(lambda: len(alice.of(GroupResult)) >= 3, 300, "both answers")
    assert answers(alice, first, second) == [(0, "removed from #team"), (0, "added to #team")]
    cluster.settle(20)
    assert [c[2] for c in cluster.copies("team")] == [["alice", "bob", "erin"]] * 2


def test_a_member_added_on_another_node_may_add_at_once(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """carol was added on A; her node B has not heard yet; her /add was
    refused by B's stale copy (not_a_member)."""
    cluster = cluster_of(2)
    alice = cluster.login(0, "alice")
    carol, _ = cluster.login(1, "carol"), cluster.login(1, "dave")
    cluster.login(0, "bob")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "dave").code == 0
    cluster.settle()
    deaf_to_group_notices(cluster, 1)
    assert cluster.request(0, alice, GroupAction.ADD, "team", "carol").code == 0
    assert "carol" not in cluster.nodes[1].relay.groups.groups["team"].members  # B has not heard
    answer = cluster.request(1, carol, GroupAction.ADD, "team", "bob")
    assert (answer.code, answer.message) == (0, "added to #team")


def test_an_add_of_a_member_who_just_left_on_another_node_is_done(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """erin left on B; A has not heard yet; alice's /add #team erin on A was
    answered code 0 "already members" and erin stayed out."""
    cluster = cluster_of(2)
    alice = cluster.login(0, "alice")
    erin = cluster.login(1, "erin")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "erin").code == 0
    cluster.settle()
    deaf_to_group_notices(cluster, 0)
    assert cluster.request(1, erin, GroupAction.LEAVE, "team").code == 0
    assert "erin" in cluster.nodes[0].relay.groups.groups["team"].members  # A has not heard
    answer = cluster.request(0, alice, GroupAction.ADD, "team", "erin")
    assert (answer.code, answer.message) == (0, "added to #team")
    cluster.settle(20)
    assert [c[2] for c in cluster.copies("team")] == [["alice", "erin"]] * 2


def test_a_refusal_or_a_no_op_the_store_agrees_with_stands(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """Checked against the store, a verdict that was right is answered as
    on one server: once, with its code."""
    cluster = cluster_of(2)
    alice, bob = cluster.login(0, "alice"), cluster.login(1, "bob")
    cluster.login(1, "erin")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob").code == 0
    cluster.settle()
    answer = cluster.request(0, alice, GroupAction.ADD, "team", "bob")
    assert (answer.code, answer.message) == (0, "already members")
    answer = cluster.request(0, alice, GroupAction.REMOVE, "team", "erin")
    assert answer.code == ErrorCode.NOT_A_MEMBER
    answer = cluster.request(1, bob, GroupAction.REMOVE, "team", "alice")
    assert answer.code == ErrorCode.NOT_OWNER
    answer = cluster.request(1, bob, GroupAction.ADD, "nope", "erin")
    assert answer.code == ErrorCode.NO_SUCH_GROUP
    cluster.settle(20)
    assert len(alice.of(GroupResult)) == 3 and len(bob.of(GroupResult)) == 2
    # Each refusal counted once, where it was answered (not at each plan).
    assert [w.relay.stats["group_refused"] for w in cluster.nodes] == [1, 2]
