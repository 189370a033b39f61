"""The last member's `left` reaches their client however the link behaves
(issue 14, audit8 P7). When the group's last member left and their client
already had every entry before it, the group ended at once and their LEFT
was handed once, outside the log (`Relay._group_ended`,
`Relay._cluster_group_ended`): lost with the link, it never came. After a
re-login the request sent again was answered from the remembered answer,
code 0 ("left #solo; it has ended"), which `ClientCore` drops like every
code-0 result (its event follows), but none followed: a `--json` script
waited for ever for its `left`, the window kept the ended group as joined.
Now the last leaver is like any leaver (as audit8 P1 made them when their
client was behind): their LEFT goes into the group's log, retired under
another key, until their client has it; then the retired group goes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from client_core import GroupChanged, LinkChanged
from protocol import GroupAction, GroupRequest, GroupResult, Message, conversation_stream
from server_groups import is_retired
from server_store import MessageStore
from tests.clients import RawClient
from tests.lossy_proxy import DOWN, LossyProxy
from tests.redis_fixture import redis_server  # noqa: F401 (a fixture)
from tests.test_bounds import Client
from tests.test_client_core import Net
from tests.test_cluster_groups import Cluster, cluster_of  # noqa: F401 (a fixture)
from tests.test_durability import ServerRunner
from tests.test_groups_client import login
from tests.test_groups_process import TEAM, Member, create_team, pump_until
from tests.test_groups_relay import GroupWorld, created, entries

ENDED = (0, "left #team; it has ended")


class DeafWorld(GroupWorld):
    """`GroupWorld` whose datagrams to the clients named in `deaf` are lost
    (the link from the server to them is down; theirs to it still works)."""

    def __init__(self, store: MessageStore) -> None:
        super().__init__(store)
        self.deaf: set[str] = set()

    def _to_clients(self, out: list[tuple[bytes, Any]]) -> None:
        heard = []
        for data, addr in out:
            client = self._by_addr.get(addr)
            if client is None or client.name not in self.deaf:
                heard.append((data, addr))
        super()._to_clients(heard)


def again(request_id: int) -> GroupRequest:
    """The LEAVE request sent again after the re-login (the same id)."""
    return GroupRequest(request_id, GroupAction.LEAVE, "team", ())


def leave_unheard(world: DeafWorld, carol: Client) -> int:
    """carol, alone in #team, leaves while nothing reaches her: neither
    her LEFT nor the answer. Answers the request's id."""
    created(world, carol)
    world.settle_all()
    world.deaf.add("carol")
    request_id = world.request(carol, GroupAction.LEAVE, "team")
    world.settle_all(50)
    world.deaf.clear()
    assert entries(carol) == [(1, "created", "carol", ("carol",))]
    assert not [r for r in carol.of(GroupResult) if r.request_id == request_id]
    return request_id


def test_a_last_leavers_left_lost_with_the_link_comes_after_a_relogin(
    store: MessageStore,
) -> None:
    """audit8 P7 (its probe): the same client instance logs in again and
    sends its request again: answered code 0 as before, and its LEFT
    follows, once; its receipt ends the retired group (nothing kept)."""
    world = DeafWorld(store)
    carol = world.login("carol")
    request_id = leave_unheard(world, carol)
    assert world.relay.groups.get("team") is None  # the name is free at once
    assert [is_retired(k) for k in world.relay.groups.groups] == [True]  # her LEFT, kept
    carol = world.login("carol")  # the same instance again
    carol.send(again(request_id), conversation_stream("#team"))
    answer = world.result(carol, request_id)
    assert (answer.code, answer.message) == ENDED
    world.run_until(lambda: bool(entries(carol)), 200, "carol's LEFT")
    world.settle_all(60)
    assert entries(carol) == [(2, "left", "carol", ())]
    assert len(world.relay.groups) == 0  # she has it: the retired group is gone


def test_a_last_leaver_whose_session_ended_gets_their_left_at_the_next_login(
    store: MessageStore,
) -> None:
    """The server ends the silent session (its client heard nothing); the
    LEFT waits in the retired group's log, bounded to that one group, and
    comes at the next login as any entry owed; a new #team made meanwhile
    is another group."""
    world = DeafWorld(store)
    carol, bob = world.login("carol"), world.login("bob")
    leave_unheard(world, carol)
    session = next(s for s in world.relay.sessions.values() if s.user.name == "carol")
    world.relay._end_session(session, world.now, quiet=True)
    world.clients.pop("carol")
    world.settle_all()
    created(world, bob)  # the name is free: a new group, its seqs after the old one's
    world.settle_all()
    assert sorted(is_retired(k) for k in world.relay.groups.groups) == [False, True]
    carol = world.login("carol")
    world.run_until(lambda: bool(entries(carol)), 200, "carol's LEFT at her login")
    world.settle_all(60)
    assert entries(carol) == [(2, "left", "carol", ())]  # never bob's group
    assert [is_retired(k) for k in world.relay.groups.groups] == [False]


def test_in_a_cluster_the_last_leavers_left_comes_after_a_relogin(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """The same in cluster mode (a real redis-server): the store logs the
    LEFT in the retired group; the request sent again after the re-login is
    answered code 0 and the LEFT follows; then every retired key goes."""
    cluster = cluster_of(2)
    carol = cluster.login(1, "carol")
    assert cluster.request(1, carol, GroupAction.CREATE, "team").code == 0
    cluster.settle(30)
    node = cluster.nodes[1]
    hand_on = node._to_clients
    deaf = {"carol"}

    def unheard(out: list[tuple[bytes, Any]]) -> None:
        hand_on([(d, a) for d, a in out
                 if node._by_addr.get(a) is None or node._by_addr[a].name not in deaf])  # fmt: skip

    node._to_clients = unheard  # type: ignore[method-assign]
    request_id = node.request(carol, GroupAction.LEAVE, "team")
    cluster.settle(60)
    deaf.clear()
    assert entries(carol) == [(1, "created", "carol", ("carol",))]
    carol = cluster.login(1, "carol")
    carol.send(again(request_id), conversation_stream("#team"))
    cluster.run_until(lambda: any(e[1] == "left" for e in entries(carol)), 300, "carol's LEFT")
    cluster.settle(60)
    answers = [(r.code, r.message) for r in carol.of(GroupResult) if r.request_id == request_id]
    assert answers and set(answers) == {ENDED}
    assert entries(carol) == [(2, "left", "carol", ())]
    redis_client = cluster.nodes[0].node.store.client
    assert not redis_client.smembers("chat:groups")
    assert not redis_client.keys("chat:g*!*")  # the retired keys, every one gone
    assert [list(w.relay.groups.groups) for w in cluster.nodes] == [[], []]


def test_the_client_shows_the_left_after_the_reconnection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real `ClientCore` and `Relay`: alice alone in #solo types
    `/leave #solo` while the server's datagrams to her are lost; her link
    goes down, comes up again (a re-login), and the front end is handed the
    `left` (the window's "left" line, the group shown as left; a script's
    JSON event) and the request is answered, not waited on for ever."""
    net = Net()
    (alice,) = login(net, "alice")
    alice.core.group_request(GroupAction.CREATE, "#solo", [])
    net.run(lambda: any(e.change == "created" for e in alice.of(GroupChanged)), "created")
    net.settle(1.0)
    deaf = {alice.addr}
    datagrams_to_send = net.relay.datagrams_to_send

    def heard(now: float) -> list[tuple[bytes, Any]]:
        return [(d, a) for d, a in datagrams_to_send(now) if a not in deaf]

    monkeypatch.setattr(net.relay, "datagrams_to_send", heard)
    leave = alice.core.group_request(GroupAction.LEAVE, "#solo", [])
    net.run(lambda: net.relay.groups.get("solo") is None, "the group ended on the server")
    net.run(lambda: any(not e.up for e in alice.of(LinkChanged)), "alice's link down", limit=300)
    assert not any(e.change == "left" for e in alice.of(GroupChanged))
    deaf.clear()
    net.run(lambda: any(e.change == "left" for e in alice.of(GroupChanged)), "her left", limit=300)
    net.settle(2.0)
    assert any(e.up for e in alice.of(LinkChanged))
    [left] = [e.to_json() for e in alice.of(GroupChanged) if e.change == "left"]
    assert (left["group"], left["by"]) == ("solo", "alice")
    assert leave not in alice.core.group_requests  # answered
    assert len(net.relay.groups) == 0  # shown, receipted: nothing kept


# --- real processes: a server -> client blackhole (tests/lossy_proxy.py) ------------


class SameInstance(Member):
    """A member logging in again with an instance id it had (its client
    restarted, or its link came back: its requests are sent again)."""

    def __init__(self, name: str, server: tuple[str, int], instance_id: int) -> None:
        self.name = name
        self.raw = RawClient(server)
        self.login = self.raw.login_retrying(name, instance_id=instance_id, timeout=30.0)
        self.messages: list[Message] = []
        self.next_seq = 0
        self.next_request = 0


def test_through_a_blackhole_the_last_leavers_left_comes_after_the_relogin(
    tmp_path: Path,
) -> None:
    """audit8 P7's repro, real processes: carol, alone in #team, leaves while
    the proxy drops everything the server sends her; bob, direct, sees the
    name free (the server did it). Her client logs in again (the same
    instance) once the link heals and sends the request again: answered
    "it has ended", and her `left` follows."""
    runner = ServerRunner(tmp_path / "server-data")
    runner.start()
    with LossyProxy(runner.address, seed=7) as proxy:
        carol = Member("carol", proxy.address)
        bob = Member("bob", runner.address)
        members = [carol, bob]
        try:
            create_team([carol])
            proxy.set(DOWN, blackhole=True)
            leave = carol.request(GroupAction.LEAVE)

            def name_free() -> bool:
                asked = bob.request(GroupAction.CREATE)
                pump_until(members, lambda: any(r.request_id == asked for r in bob.of(GroupResult)),
                           10, "bob's answer")  # fmt: skip
                answers: list[GroupResult] = bob.of(GroupResult)
                return answers[-1].code == 0

            pump_until(members, name_free, 10, "carol's leaving done (#team free)")
            assert not [e for e in carol.entries() if e[2] == "left"]
            proxy.set(DOWN, blackhole=False)
            carol.close()
            carol = SameInstance("carol", proxy.address, carol.instance_id)
            members = [carol, bob]
            carol.send(again(leave), TEAM)
            pump_until(members, lambda: any(e[2] == "left" for e in carol.entries()), 10,
                       "carol's left")  # fmt: skip
            pump_until(members, lambda: any(r.request_id == leave for r in carol.of(GroupResult)),
                       10, "the answer")  # fmt: skip
            assert [(e[0], e[2], e[3]) for e in carol.entries()] == [(2, "left", "carol")]
            assert {(r.code, r.message) for r in carol.of(GroupResult)} == {ENDED}
        finally:
            for member in members:
                member.close()
            runner.close()
