"""Group traffic in cluster mode (issues 14 and 15) when Redis itself fails,
with real processes: `python chat_server.py --cluster redis://...` nodes on
a real redis-server (tests/redis_fixture.py) and real clients. What
tests/test_cluster_process.py proves for direct messages, for a group's one
order:

- redis-server SIGKILLed in the middle of a sender's burst into a group and
  started again on the same port and AOF: every post the sender saw
  `accepted` reaches every member exactly once, at the same seq for all;
  what was sent while Redis was away is accepted only after it is back, in
  the order sent; nothing lost, nothing twice.
- A node cut off from Redis (the TCP gate) while a member on it posts to
  the group: the posts stay `sending` (no ACCEPT), the node says so once,
  and once the link is back they are accepted and reach every member once,
  in order.

The fixtures and helpers are those of the direct-message and group process
tests, imported."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from client_core import MessageReceived
from protocol import GroupAction
from tests.clients import RecordingClient, close_all, wait_all
from tests.conftest import ServerProcess
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401 (a fixture)
from tests.test_cluster_groups_process import seen
from tests.test_cluster_process import TcpGate, spawn_node, stderr_of  # noqa: F401 (a fixture)


def create_team(creator: RecordingClient, members: list[RecordingClient]) -> None:
    """`creator` makes #team with `members`; every one of them has seen it."""
    everyone = [creator, *members]
    creator.session.group(GroupAction.CREATE, "team", [m.name for m in members])
    wait_all(everyone, lambda: all(seen(x) for x in everyone), 30, "#team at every member")


def one_sequence(clients: list[RecordingClient]) -> dict[int, tuple[Any, ...]]:
    """The group's sequence as the members showed it, checked to be one:
    each member's seqs rising with no repeat, the same entry at a seq for
    every member, no gap, and every member shown every entry but their own
    messages. Returns seq -> (seq, what, by, text or users)."""
    full: dict[int, tuple[Any, ...]] = {}
    for client in clients:
        seqs = [e[0] for e in seen(client)]
        assert seqs == sorted(set(seqs)), (client.name, "a duplicate or out of order", seqs)
        for entry in seen(client):
            assert full.setdefault(entry[0], entry) == entry, (client.name, entry, full[entry[0]])
    assert sorted(full) == list(range(1, len(full) + 1)), ("a gap", sorted(full))
    for client in clients:
        mine = {s for s, e in full.items() if e[1] == "message" and e[2] == client.name}
        assert [e[0] for e in seen(client)] == [s for s in sorted(full) if s not in mine], (
            client.name,
            "missed an entry",
        )
    return full


def posts_by(full: dict[int, tuple[Any, ...]], poster: str) -> list[str]:
    """`poster`'s messages in the group's order."""
    return [e[3] for _, e in sorted(full.items()) if e[1:3] == ("message", poster)]


def group_texts(client: RecordingClient) -> list[str]:
    """The group messages `client` was shown, in the order shown."""
    return [e.text for e in client.events if isinstance(e, MessageReceived) and e.group == "team"]


def test_group_burst_across_a_redis_kill_and_restart_loses_nothing_accepted(
    redis_server: RedisServer,  # noqa: F811
    spawn_node: Callable[..., ServerProcess],  # noqa: F811
) -> None:
    a, b = spawn_node(redis_server.url, "A"), spawn_node(redis_server.url, "B")
    # alice posts from A; bob is on A with her, carol on B.
    alice, bob, carol = (RecordingClient(name) for name in ("alice", "bob", "carol"))
    members = [alice, bob, carol]
    try:
        for client, node in ((alice, a), (bob, a), (carol, b)):
            client.login((node.host, node.port))
        wait_all(members, lambda: all(x.logged_in for x in members), 20, "logins")
        create_team(alice, [bob, carol])
        count, kill_at, restart_at = 60, 20, 35
        sent: list[str] = []
        during: list[str] = []  # sent while redis-server was down
        for i in range(count):
            sent.append(alice.send(f"alice {i:02}", "#team"))
            if kill_at < i < restart_at:
                during.append(sent[-1])
            if i == kill_at:
                # Mid-burst: some posts accepted and handed out, some in flight.
                alice.wait(lambda: any(alice.reached(m, "accepted") for m in sent), 20)
                redis_server.kill()
            if i == restart_at:
                for client in members:
                    client.pump()
                # Nothing sent after the kill was acknowledged without Redis.
                assert not any(alice.reached(m, "accepted") for m in during)
                redis_server.start()  # the same port and directory: its AOF is read back
            for client in members:
                client.pump()
            time.sleep(0.02)
        accepted_before_restart = [m for m in sent[:kill_at] if alice.reached(m, "accepted")]
        assert accepted_before_restart  # the kill came with some posts already accepted

        def complete() -> bool:
            return all(alice.reached(m, "accepted") for m in sent) and all(
                len(group_texts(x)) >= count for x in (bob, carol)
            )

        wait_all(members, complete, 45, "every post accepted and at every member")
        time.sleep(0.5)  # room for a late duplicate to show
        for client in members:
            client.pump()
        full = one_sequence(members)
        expected = [f"alice {i:02}" for i in range(count)]
        assert posts_by(full, "alice") == expected  # in the order sent, each once
        assert len(full) == count + 1  # CREATED and every post, nothing else
        for member in (bob, carol):
            assert group_texts(member) == expected, member.name
        assert all(alice.states[m].count("accepted") == 1 for m in sent)
        assert not alice.reasons, alice.reasons  # none failed
    finally:
        close_all(members)
    log = stderr_of(a)
    assert log.count("lost Redis") == 1 and log.count("is back after") == 1, log


def test_a_node_cut_off_from_redis_withholds_group_posts_and_recovers(
    redis_server: RedisServer,  # noqa: F811
    spawn_node: Callable[..., ServerProcess],  # noqa: F811
) -> None:
    gate = TcpGate(redis_server.port)
    a = spawn_node(f"redis://127.0.0.1:{gate.port}/0", "A")
    b = spawn_node(redis_server.url, "B")
    # alice posts from A, the node that will be cut off; carol is on A too, bob on B.
    alice, bob, carol = (RecordingClient(name) for name in ("alice", "bob", "carol"))
    members = [alice, bob, carol]
    try:
        for client, node in ((alice, a), (carol, a), (bob, b)):
            client.login((node.host, node.port))
        wait_all(members, lambda: all(x.logged_in for x in members), 20, "logins")
        create_team(alice, [bob, carol])
        before = alice.send("before the cut", "#team")
        # Alice's `accepted` and the members' copies leave on different
        # streams (hers from A, bob's from B), so either may come first.
        wait_all(
            members,
            lambda: (
                all(group_texts(x) == ["before the cut"] for x in (bob, carol))
                and alice.reached(before, "accepted")
            ),
            20,
            "the first post at every member, accepted for alice",
        )
        gate.cut()
        cut = [alice.send(f"cut off {i}", "#team") for i in range(5)]
        time.sleep(1.5)
        for client in members:
            client.pump()
        assert all(alice.states[m] == ["sending"] for m in cut), dict(alice.states)  # withheld
        assert all(group_texts(x) == ["before the cut"] for x in (bob, carol))
        gate.heal()
        expected = ["before the cut"] + [f"cut off {i}" for i in range(5)]
        wait_all(
            members,
            lambda: (
                all(alice.reached(m, "accepted") for m in cut)
                and all(len(group_texts(x)) >= len(expected) for x in (bob, carol))
            ),
            20,
            "the posts accepted and at every member after the link is back",
        )
        time.sleep(0.5)  # room for a late duplicate to show
        for client in members:
            client.pump()
        full = one_sequence(members)
        assert posts_by(full, "alice") == expected
        assert len(full) == len(expected) + 1  # CREATED and every post
        for member in (bob, carol):
            assert group_texts(member) == expected, member.name
        assert all(alice.states[m].count("accepted") == 1 for m in [before, *cut])
        assert not alice.reasons, alice.reasons
    finally:
        close_all(members)
        gate.close()
    log = stderr_of(a)
    assert log.count("lost Redis") == 1 and log.count("is back after") == 1, log
