"""Groups in cluster mode (issues 14 and 15), in-process: relays as nodes of
one cluster on a real redis-server (tests/redis_fixture.py), each with its
clients logged in by hand and a fake clock, stepped together. Members on
different nodes see one sequence (concurrent posts from two nodes,
membership changes from two nodes at once), the shared store judges a post
from a member a node has not yet heard was removed, a member who moves to
another node catches up exactly once, the errors hold across nodes, a lost
notice is caught up at the next beat, and a group that ended and was made
again is a new group everywhere. Real processes and a SIGKILL are in
test_cluster_groups_process.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import protocol
from chat_server import Relay
from protocol import (
    ErrorCode,
    Fail,
    GroupAccept,
    GroupAction,
    GroupReached,
    GroupResult,
    Logout,
    MsgId,
)
from server_store import ChangeGroup, GroupItem, PostGroupMessage, ReadGroupLog, ServerStore
from tests.conftest import test_config as server_config
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401 (a fixture)
from tests.test_bounds import Client, World
from tests.test_cluster_node import (  # noqa: F401 (`nodes` is a fixture)
    ClusterGroupWorld,
    Node,
    cluster_module,
    nodes,
)
from tests.test_groups_loose_ends import DevicesWorld
from tests.test_groups_relay import created, entries, texts
from tests.test_seams import WALL


class NodeWorld(ClusterGroupWorld):
    """One node's relay and its clients (`ClusterGroupWorld`), with config overrides."""

    def __init__(self, node: Node, **overrides: Any) -> None:
        World.__init__(self)
        self.node = node
        self.store = node.store
        self.holding: set[str] = set()
        self._request_ids = 0
        self.relay = Relay(server_config(None, **overrides), store=node.store,
                           router=node.router, wall_clock=lambda: WALL,
                           shared_store=True)  # fmt: skip
        node.store.attach(self.relay, node.router)


class Cluster:
    """Nodes stepped together (one fake clock each, kept equal)."""

    def __init__(self, make: Callable[[str], Node], count: int, **overrides: Any) -> None:
        self.nodes = [NodeWorld(make(chr(ord("A") + i)), **overrides) for i in range(count)]

    def login(self, node: int, name: str) -> Client:
        client = self.nodes[node].login(name)
        self.settle()  # every node hears of the account
        return client

    def step(self) -> None:
        for world in self.nodes:
            world.step()

    def settle(self, steps: int = 10) -> None:
        for _ in range(steps):
            self.step()

    def run_until(self, condition: Callable[[], bool], steps: int, what: str) -> None:
        for _ in range(steps):
            if condition():
                return
            self.step()
        raise AssertionError(f"timed out waiting for {what}")

    def request(self, node: int, client: Client, action: GroupAction, group: str,
                *users: str) -> GroupResult:  # fmt: skip
        world = self.nodes[node]
        request_id = world.request(client, action, group, *users)
        self.run_until(lambda: any(r.request_id == request_id for r in client.of(GroupResult)),
                       300, f"{client.name}'s answer to request {request_id}")  # fmt: skip
        answer: GroupResult = [r for r in client.of(GroupResult) if r.request_id == request_id][-1]
        return answer

    def post(self, node: int, client: Client, group: str, text: str, seq: int) -> MsgId:
        return self.nodes[node].post(client, group, text, seq)

    def copies(self, key: str) -> list[Any]:
        """Each node's copy of group `key`: (seq, owner, members in order)."""
        found = []
        for world in self.nodes:
            group = world.relay.groups.get(key)
            found.append(None if group is None else
                         (group.seq, group.owner, list(group.members)))  # fmt: skip
        return found


@pytest.fixture
def cluster_of(redis_server: RedisServer) -> Iterator[Callable[..., Cluster]]:  # noqa: F811
    """Clusters of in-process nodes on one redis-server."""
    cluster_module()
    made: list[Node] = []

    def node(node_id: str) -> Node:
        made.append(Node(redis_server.url, node_id))
        return made[-1]

    yield lambda count, **overrides: Cluster(node, count, **overrides)
    for each in made:
        each.close()


def one_sequence(clients: dict[str, Client], group: str = "team") -> dict[int, tuple[Any, ...]]:
    """The entries every member got, checked to be one sequence: at each seq
    the same entry for all, each member's rising with no repeat and no gap
    within what they may see (their own messages aside). Answers them by seq."""
    full: dict[int, tuple[Any, ...]] = {}
    for name, client in clients.items():
        got = entries(client, group)
        seqs = [e[0] for e in got]
        assert seqs == sorted(set(seqs)), (name, seqs)
        for entry in got:
            assert full.setdefault(entry[0], entry) == entry, (name, entry, full[entry[0]])
    for name, client in clients.items():
        seen = [e[0] for e in entries(client, group)]
        own = {s for s, e in full.items() if e[1] == "message" and e[2] == name}
        assert seen == [s for s in range(seen[0], seen[-1] + 1) if s not in own], (name, seen)
    return full


def test_posts_from_two_nodes_at_once_make_one_sequence_for_members_on_both(
    cluster_of: Callable[..., Cluster],
) -> None:
    cluster = cluster_of(2)
    alice, carol = cluster.login(0, "alice"), cluster.login(0, "carol")
    bob, dave = cluster.login(1, "bob"), cluster.login(1, "dave")
    members = {"alice": alice, "bob": bob, "carol": carol, "dave": dave}
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "carol", "dave").code == 0
    sent: dict[str, list[MsgId]] = {"alice": [], "bob": []}
    for round_ in range(8):
        for i in range(3):  # several in one pass on each node, none waiting for the other
            seq = round_ * 3 + i + 1
            sent["alice"].append(cluster.post(0, alice, "team", f"alice {seq}", seq))
            sent["bob"].append(cluster.post(1, bob, "team", f"bob {seq}", seq))
        cluster.step()
    cluster.run_until(lambda: all(len(texts(c)) == 24 for c in (alice, bob))
                      and all(len(texts(c)) == 48 for c in (carol, dave)), 300,
                      "every message at every member")  # fmt: skip
    cluster.settle()
    full = one_sequence(members)
    assert sorted(full) == list(range(1, 50))  # CREATED, then the 48 messages
    # Each sender's own messages in its order, interleaved with the other's.
    for name in ("alice", "bob"):
        mine = [e[3] for s, e in sorted(full.items()) if e[1] == "message" and e[2] == name]
        assert mine == [f"{name} {i}" for i in range(1, 25)]
    # Their GROUP_ACCEPTs name the places the members saw, "of 3" each.
    for client, name in ((alice, "alice"), (bob, "bob")):
        placed = {a.msg_id: (a.group_seq, a.recipients) for a in client.of(GroupAccept)}
        for msg_id in sent[name]:
            seq, recipients = placed[msg_id]
            assert full[seq][1:3] == ("message", name) and recipients == 3
    # "Delivered by" reaches each sender from members on either node.
    cluster.run_until(lambda: {b for m in alice.of(GroupReached) for b in m.by}
                      == {"bob", "carol", "dave"}, 300, "alice's receipts")  # fmt: skip
    by = {(b, m.msg_id) for m in alice.of(GroupReached) for b in m.by}
    assert by == {(who, i) for who in ("bob", "carol", "dave") for i in sent["alice"]}
    # Every node's copy of the group is the same.
    copies = cluster.copies("team")
    assert copies[0] == copies[1] == (49, "alice", ["alice", "bob", "carol", "dave"])


def test_membership_changes_from_two_nodes_interleave_in_one_order(
    cluster_of: Callable[..., Cluster],
) -> None:
    """Two nodes change the same group in the same pass: one change goes
    first, the other is planned again on the changed group (and may then be
    refused by the rules), and every member sees one sequence."""
    cluster = cluster_of(2)
    names = ("alice", "bob", "carol", "dave", "erin", "frank")
    clients = {n: cluster.login(i % 2, n) for i, n in enumerate(names)}
    alice, bob, carol, dave = (clients[n] for n in ("alice", "bob", "carol", "dave"))
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "carol", "dave").code == 0
    first = cluster.nodes[0].request(alice, GroupAction.ADD, "team", "erin")
    second = cluster.nodes[1].request(bob, GroupAction.ADD, "team", "frank")
    leave = cluster.nodes[1].request(dave, GroupAction.LEAVE, "team")
    for i in range(1, 6):
        cluster.post(0, carol, "team", f"carol {i}", i)
        cluster.post(1, bob, "team", f"bob {i}", i)
    cluster.run_until(
        lambda: all(any(r.request_id == rid for r in c.of(GroupResult))
                    for c, rid in ((alice, first), (bob, second), (dave, leave))),
        300, "the three answers",
    )  # fmt: skip
    for client, rid in ((alice, first), (bob, second), (dave, leave)):
        assert [r.code for r in client.of(GroupResult) if r.request_id == rid] == [0]
    cluster.settle(30)
    full = one_sequence(clients)
    assert sorted(full) == list(range(1, len(full) + 1))
    kinds = [e[1] for _, e in sorted(full.items())]
    assert kinds.count("added") == 2 and kinds.count("left") == 1 and kinds.count("message") == 10
    # erin and frank each see from their ADDED on; dave nothing after his LEFT.
    for name, by in (("erin", "alice"), ("frank", "bob")):
        assert entries(clients[name])[0][1:3] == ("added", by)
    assert entries(dave)[-1][1:3] == ("left", "dave")
    copies = cluster.copies("team")
    assert copies[0] == copies[1]
    assert copies[0] is not None and set(copies[0][2]) == {"alice", "bob", "carol", "erin",
                                                           "frank"}  # fmt: skip
    assert sum(w.relay.stats["group_conflicts"] for w in cluster.nodes) >= 1


def test_the_store_refuses_a_post_from_a_member_removed_on_another_node(
    cluster_of: Callable[..., Cluster],
) -> None:
    """bob's node has not heard yet that alice removed him: his post is
    refused by the shared store (`not_a_member`), not given a seq."""
    cluster = cluster_of(2)
    alice, carol = cluster.login(0, "alice"), cluster.login(0, "carol")
    bob = cluster.login(1, "bob")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "carol").code == 0
    cluster.settle()
    b = cluster.nodes[1]
    deaf = b.node.store._on_notices
    b.node.store._on_notices = lambda notices: deaf([n for n in notices if n[:2] != "g\t"])
    assert cluster.request(0, alice, GroupAction.REMOVE, "team", "bob").code == 0
    assert "bob" in b.relay.groups.groups["team"].members  # B has not heard
    msg_id = cluster.post(1, bob, "team", "am I still in?", 1)
    cluster.run_until(lambda: bool(bob.of(Fail)), 200, "bob's FAIL")
    assert [(f.msg_id, f.reason) for f in bob.of(Fail)] == [(msg_id, ErrorCode.NOT_A_MEMBER)]
    assert not bob.of(GroupAccept)
    cluster.settle()
    assert texts(carol) == [] and texts(alice) == []


def test_group_errors_hold_across_nodes(cluster_of: Callable[..., Cluster]) -> None:
    cluster = cluster_of(2, max_group_members=3)
    alice, erin = cluster.login(0, "alice"), cluster.login(0, "erin")
    bob, carol = cluster.login(1, "bob"), cluster.login(1, "carol")
    cluster.login(1, "dave")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob").code == 0
    cluster.settle()
    answers = {
        "group_exists": cluster.request(1, carol, GroupAction.CREATE, "Team", "bob"),
        "not_owner": cluster.request(1, bob, GroupAction.REMOVE, "team", "alice"),
        "no_such_group": cluster.request(1, bob, GroupAction.ADD, "nope", "carol"),
        "not_a_member": cluster.request(1, carol, GroupAction.ADD, "team", "dave"),
    }
    for code, answer in answers.items():
        assert answer.code == ErrorCode[code.upper()], (code, answer)
    assert cluster.request(1, bob, GroupAction.ADD, "team", "carol").code == 0
    cluster.settle()
    full = cluster.request(0, alice, GroupAction.ADD, "team", "erin")
    assert full.code == ErrorCode.GROUP_FULL
    cluster.post(1, carol, "team", "hi", 1)
    not_member = cluster.post(0, erin, "team", "let me in", 1)
    no_group = cluster.post(1, carol, "nope", "anyone?", 2)
    cluster.run_until(lambda: len(erin.of(Fail)) == 1 and len(carol.of(Fail)) == 1, 200,
                      "the FAILs")  # fmt: skip
    assert [(f.msg_id, f.reason) for f in erin.of(Fail)] == [(not_member, ErrorCode.NOT_A_MEMBER)]
    assert [(f.msg_id, f.reason) for f in carol.of(Fail)] == [(no_group, ErrorCode.NO_SUCH_GROUP)]
    cluster.run_until(lambda: texts(alice) == ["hi"], 200, "carol's message at alice")


def test_a_member_who_moves_to_another_node_catches_up_exactly_once(
    cluster_of: Callable[..., Cluster],
) -> None:
    """bob receipted some entries on B; more came while he was offline; he
    logs in on A: A reads his cursor from the store and hands him what is
    his since, each once."""
    cluster = cluster_of(2)
    alice = cluster.login(0, "alice")
    bob = cluster.login(1, "bob")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob").code == 0
    for i in range(1, 6):
        cluster.post(0, alice, "team", f"before {i}", i)
    cluster.run_until(lambda: len(texts(bob)) == 5, 200, "bob has the first five")
    cluster.settle()
    cluster.nodes[1].logout(bob)
    for i in range(6, 11):
        cluster.post(0, alice, "team", f"while away {i}", i)
    cluster.settle()
    moved = cluster.nodes[0].login("bob")
    cluster.run_until(lambda: len(texts(moved)) == 5, 200, "bob's backlog on A")
    cluster.settle(20)
    assert texts(moved) == [f"while away {i}" for i in range(6, 11)]
    assert [e[0] for e in entries(moved)] == list(range(7, 12))


def test_a_lost_notice_is_caught_up_at_the_next_beat(
    cluster_of: Callable[..., Cluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pub/sub keeps nothing: a node that missed the last entry's notice
    (and no entry follows) reads the groups' heads at its next beat and
    catches up; nothing waits for ever."""
    sc = cluster_module()
    monkeypatch.setattr(sc, "ROUTE_RENEW", 0.3)
    cluster = cluster_of(2)
    alice, bob = cluster.login(0, "alice"), cluster.login(1, "bob")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob").code == 0
    cluster.run_until(lambda: len(entries(bob)) == 1, 100, "bob has CREATED")
    b = cluster.nodes[1]
    deaf = b.node.store._on_notices
    dropped: list[str] = []

    def drop_group_notices(notices: list[str]) -> None:
        dropped.extend(n for n in notices if n.startswith("g\t"))
        deaf([n for n in notices if not n.startswith("g\t")])

    b.node.store._on_notices = drop_group_notices
    cluster.post(0, alice, "team", "did you hear?", 1)
    cluster.run_until(lambda: bool(dropped), 100, "the notice dropped")
    cluster.run_until(lambda: texts(bob) == ["did you hear?"], 300, "the beat's catch-up")


def test_a_group_ended_and_made_again_is_a_new_group_on_every_node(
    cluster_of: Callable[..., Cluster],
) -> None:
    cluster = cluster_of(2)
    alice, bob = cluster.login(0, "alice"), cluster.login(1, "bob")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob").code == 0
    cluster.post(1, bob, "team", "old", 1)
    cluster.run_until(lambda: texts(alice) == ["old"], 200, "the old group's message")
    assert cluster.request(0, alice, GroupAction.LEAVE, "team").code == 0
    answer = cluster.request(1, bob, GroupAction.LEAVE, "team")
    assert answer.code == 0 and "ended" in answer.message
    cluster.settle()
    assert cluster.copies("team") == [None, None]
    assert cluster.request(1, bob, GroupAction.CREATE, "team", "alice").code == 0
    cluster.post(0, alice, "team", "new", 2)
    cluster.run_until(lambda: texts(bob) == ["new"], 200, "the new group's message")
    cluster.settle()
    copies = cluster.copies("team")
    # Its seqs go on after the old group's last (bob's LEFT, 5, after alice's
    # LEFT and OWNER): 6 and 7.
    assert copies[0] == copies[1] == (7, "bob", ["bob", "alice"])
    epochs = {w.relay.groups.groups["team"].epoch for w in cluster.nodes}
    assert len(epochs) == 1


def test_a_request_sent_again_to_another_node_is_answered_not_done_twice(
    cluster_of: Callable[..., Cluster],
) -> None:
    """alice's node died before its answer reached her: her client logs in
    on another node and sends the same request again (same client, same
    request id). That node's copy says the group exists; the answer is the
    one the store kept, and the group was made once."""
    cluster = cluster_of(2)
    alice, bob = cluster.login(0, "alice"), cluster.login(1, "bob")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob").code == 0
    cluster.settle()
    again = cluster.nodes[1].login("alice")  # the same client instance, on B
    answer = cluster.request(1, again, GroupAction.CREATE, "team", "bob")
    assert (answer.code, answer.message) == (0, "created #team")
    cluster.settle()
    assert [e[1] for e in entries(bob)] == ["created"]
    # A request that was never made is refused as usual.
    refused = cluster.request(1, again, GroupAction.CREATE, "team", "bob")
    assert refused.code == ErrorCode.GROUP_EXISTS


def test_a_group_batch_applied_twice_numbers_each_entry_once(
    nodes: Callable[[str], Node],  # noqa: F811
) -> None:
    """EXEC ran but its reply was lost: the store applies the batch again.
    A change is answered from the request's kept answer, a post from its
    dedup key (with the seq and server id it got), and the log holds each
    entry once. A SEND that reached a second node is numbered as the first."""
    a = nodes("A")
    kind = int(protocol.GroupChange.CREATED)
    created = GroupItem("team", 0, 501, kind, "alice", "Alice", 0, 0, "", ("Alice", "Bob"), 0, 2)

    def create() -> ChangeGroup:
        return ChangeGroup("team", "team", 0, 0,
                           [(created, (("alice", "Alice", 0), ("bob", "Bob", 1)), ())],
                           "alice", False, (("alice", 9, 1), 0, "created #team"))  # fmt: skip

    first, again = create(), create()
    a.store._apply([(first, None)])
    a.store._apply([(again, None)])
    assert (first.outcome, first.first_seq) == ("ok", 1)
    assert (again.outcome, again.answer) == ("done", (0, "created #team"))
    posts = [PostGroupMessage(GroupItem("team", 0, server_id, 0, "bob", "Bob", 9, 1, "hi", (),
                                        0, 0)) for server_id in (502, 502, 777)]  # fmt: skip
    for post in posts:
        a.store._apply([(post, None)])
    assert [(p.item.group_seq, p.item.server_msg_id, p.item.recipients, p.epoch, p.refused)
            for p in posts] == [(2, 502, 1, 501, 0)] * 3  # fmt: skip
    items, more = a.read(ReadGroupLog("team", 0, 1 << 62, 10, 1 << 20))
    assert [(i.group_seq, i.server_msg_id, i.change) for i in items] == [
        (1, 501, int(protocol.GroupChange.CREATED)),
        (2, 502, 0),
    ] and not more
    # A post from someone who is not a member, and to no group, gets no seq.
    stranger = PostGroupMessage(GroupItem("team", 0, 503, 0, "carol", "Carol", 9, 1, "hi", (),
                                          0, 0))  # fmt: skip
    nowhere = PostGroupMessage(GroupItem("nope", 0, 504, 0, "bob", "Bob", 9, 2, "hi", (), 0, 0))
    a.store._apply([(stranger, None), (nowhere, None)])
    assert (stranger.refused, nowhere.refused) == (ErrorCode.NOT_A_MEMBER, ErrorCode.NO_SUCH_GROUP)
    assert stranger.item.group_seq == nowhere.item.group_seq == 0


def test_the_group_log_is_trimmed_in_redis_once_everyone_has_it(
    cluster_of: Callable[..., Cluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At each beat a node trims a group's log below its members' lowest
    cursor; the group goes on as before."""
    monkeypatch.setattr(cluster_module(), "ROUTE_RENEW", 0.2)
    cluster = cluster_of(1)
    alice, bob = cluster.login(0, "alice"), cluster.login(0, "bob")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob").code == 0
    for i in range(1, 101):
        cluster.post(0, alice, "team", f"m{i}", i)
        if i % 10 == 0:
            cluster.step()
    cluster.run_until(lambda: len(texts(bob)) == 100, 300, "bob has all")
    client = cluster.nodes[0].node.store.client
    cluster.run_until(lambda: client.xlen("chat:glog:{#team}") < 10, 300, "the log trimmed")
    assert client.hget("chat:group:{#team}", "seq") == "101"
    cluster.post(0, alice, "team", "after the trim", 101)
    cluster.run_until(lambda: texts(bob)[-1:] == ["after the trim"], 200, "a message after it")


def test_a_node_whose_copy_fell_behind_a_trimmed_log_reads_the_groups_state(
    cluster_of: Callable[..., Cluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    """B heard nothing while the log moved on and was trimmed past its copy:
    at the next notice it cannot follow the log (an entry is missing), so
    it reads the group's state instead (it once read the log and the state
    in turn for ever); a member who moves there is served."""
    monkeypatch.setattr(cluster_module(), "ROUTE_RENEW", 0.2)
    cluster = cluster_of(2)
    alice, bob = cluster.login(0, "alice"), cluster.login(0, "bob")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob").code == 0
    cluster.settle()
    b = cluster.nodes[1]
    hearing, heads = b.node.store._on_notices, b.relay.group_heads
    monkeypatch.setattr(
        b.node.store, "_on_notices", lambda notices: hearing([n for n in notices if n[:2] != "g\t"])
    )
    monkeypatch.setattr(b.relay, "group_heads", lambda found, now: None)  # fmt: skip
    for i in range(1, 101):
        cluster.post(0, alice, "team", f"m{i}", i)
        if i % 10 == 0:
            cluster.step()
    cluster.run_until(lambda: len(texts(bob)) == 100, 300, "bob has all")
    client = cluster.nodes[0].node.store.client
    cluster.run_until(lambda: client.xlen("chat:glog:{#team}") < 10, 300, "the log trimmed")
    assert b.relay.groups.groups["team"].seq == 1  # B's copy: CREATED only
    monkeypatch.setattr(b.node.store, "_on_notices", hearing)
    monkeypatch.setattr(b.relay, "group_heads", heads)
    cluster.post(0, alice, "team", "after", 101)
    cluster.run_until(lambda: b.relay.groups.groups["team"].seq == 102, 200, "B caught up")
    cluster.run_until(lambda: texts(bob)[-1:] == ["after"], 200, "bob has it on A")
    cluster.settle()
    moved = b.login("bob")
    cluster.post(0, alice, "team", "on B now", 102)
    cluster.run_until(lambda: "on B now" in texts(moved), 200, "bob served on B")
    cluster.settle()
    assert texts(moved) == ["on B now"], entries(moved)


def test_an_own_message_committed_after_its_senders_logout_waits_for_another_device(
    tmp_path: Path,
) -> None:
    """One server: alice posts and logs out before the post is committed;
    her laptop (another client instance) logging in later gets it from the
    log. The cluster's first version passed a sender's own message over
    wherever the sender was (the merge with the second-device work kept that
    block ahead of it): the laptop never saw it."""
    store = ServerStore(tmp_path / "data")
    store.start()
    try:
        world = DevicesWorld(store)
        alice, bob = world.login("alice"), world.login("bob")
        created(world, alice, "bob")
        world.settle_all()
        world.post(alice, "team", "seen by the phone", 1)  # (its id's mark is made here)
        world.settle_all()
        # The next post reaches the relay, then the logout, before the store
        # is handed the pass's operations (`settle` does that): the post's
        # commit comes after the session ended.
        world.post(alice, "team", "posted, then gone", 2)
        for message in (None, Logout()):
            if message is not None:
                alice.send(message)
            for data in alice.conn.datagrams_to_send(world.now):
                world.relay.receive_datagram(data, alice.addr, world.now)
            world._to_clients(world.relay.datagrams_to_send(world.now))
        assert alice.conn.session_id not in world.relay.sessions
        world.settle_all()
        laptop = world.login_instance("alice", 10)
        world.run_until(lambda: bool(entries(laptop)), 300, "the laptop's catch-up")
        assert [(e[0], e[2], e[3]) for e in entries(laptop)] == [(3, "alice", "posted, then gone")]
        assert texts(bob) == ["seen by the phone", "posted, then gone"]
    finally:
        store.close()
