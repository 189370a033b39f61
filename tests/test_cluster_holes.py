"""Cluster mode: holes in a group's Redis log (issue 14, review7 F6), as one
server cuts them (tests/test_group_holes.py, tests/test_group_backlog.py):
a removed member who never returns keeps only what is theirs in the log
(`TRIM_GROUP` cuts the rest out with XDEL, the bytes of the holes kept for
`GROUP_POST`'s count), a post no longer walks the members' cursors once the
log is over the limits, F3's rule holds (a sender whose notices are unacked
keeps her messages; one told of every copy does not), the member who holds
the group back leaving frees it, a group made again starts with none of the
old one's bookkeeping, and a node's store SIGKILLed while it trims loses
nothing. In-process nodes on a real redis-server (tests/redis_fixture.py);
the kill with a real process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chat_server import GROUP_TRIM_EVERY
from protocol import ErrorCode, Fail, GroupAccept, GroupAction, GroupDeliver
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401 (a fixture)
from tests.test_bounds import Client
from tests.test_cluster_groups import Cluster, cluster_of  # noqa: F401 (a fixture)
from tests.test_cluster_node import cluster_module
from tests.test_groups_relay import entries, texts, told_by

LOG = "chat:glog:{#team}"
HEAD = "chat:group:{#team}"
ROOT = Path(__file__).resolve().parent.parent


def redis_of(cluster: Cluster) -> Any:
    return cluster.nodes[0].node.store.client


def log_seqs(client: Any, key: str = LOG) -> list[int]:
    return [int(entry.partition("-")[0]) for entry, _ in client.xrange(key)]


def check_bytes(client: Any, head: str = HEAD, log: str = LOG) -> None:
    """What `GROUP_POST` counts as the log's bytes (the running total less
    the first entry's `p` and the holes' bytes past it) is the UTF-8 of the
    texts the log holds."""
    rows = client.xrange(log)
    held = sum(len(json.loads(fields["m"])[6].encode("utf-8")) for _, fields in rows)
    total, hbytes = (int(v or 0) for v in client.hmget(head, "bytes", "hbytes"))
    first = int(rows[0][1]["p"]) if rows else total
    assert total - first - hbytes == held, (total, first, hbytes, held)


def until(cluster: Cluster, condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    """Step the nodes until `condition` (beats run on the wall clock, late
    on a busy machine)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        cluster.step()
        time.sleep(0.01)


def fails(client: Client) -> list[Fail]:
    found: list[Fail] = client.of(Fail)
    return found


def carol_removed(cluster: Cluster) -> tuple[Client, Client]:
    """alice (on A), bob and carol (on B) in #team; carol, away (she had its
    CREATED), is removed after one message: seqs 1 CREATED, 2 "for carol",
    3 REMOVED are hers."""
    alice, bob = cluster.login(0, "alice"), cluster.login(1, "bob")
    carol = cluster.login(1, "carol")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "carol").code == 0
    cluster.run_until(lambda: bool(entries(carol)), 200, "carol has the CREATED")
    cluster.settle()
    cluster.nodes[1].logout(carol)
    cluster.post(0, alice, "team", "for carol", 1)
    cluster.run_until(lambda: texts(bob) == ["for carol"], 200, "bob has it")
    assert cluster.request(0, alice, GroupAction.REMOVE, "team", "carol").code == 0
    return alice, bob


def burst(cluster: Cluster, node: int, client: Client, count: int, start: int = 2) -> None:
    for n in range(start, start + count):
        cluster.post(node, client, "team", f"{client.name} {n}", n)
        if n % 8 == 0:
            cluster.step()


def test_a_removed_member_who_never_returns_keeps_only_what_is_theirs_in_redis(
    cluster_of: Callable[..., Cluster],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The log kept everything from carol's place on, for good (review7 F6);
    now the entries after her removal, which every member has, are cut out
    (alice was told of each copy: hers go too), and the bytes still add up;
    carol, back, gets exactly what is hers, once."""
    monkeypatch.setattr(cluster_module(), "ROUTE_RENEW", 0.2)
    cluster = cluster_of(2)
    alice, bob = carol_removed(cluster)
    count = 3 * GROUP_TRIM_EVERY
    burst(cluster, 0, alice, count)
    cluster.run_until(lambda: len(texts(bob)) == count + 1, 2000, "bob has them all")
    redis = redis_of(cluster)
    until(cluster, lambda: redis.xlen(LOG) < 2 * GROUP_TRIM_EVERY, "the holes")
    kept = log_seqs(redis)
    assert kept[:2] == [2, 3], kept  # carol's (the CREATED she had)
    assert int(redis.hget(HEAD, "hbytes")) > 0
    check_bytes(redis)
    carol = cluster.login(0, "carol")
    cluster.run_until(lambda: any(e[1] == "removed" for e in entries(carol)), 500, "her removal")
    cluster.settle(20)
    assert [e[:2] for e in entries(carol)] == [(2, "message"), (3, "removed")]
    cluster.post(1, bob, "team", "after", 1)
    cluster.run_until(lambda: texts(alice)[-1:] == ["after"], 300, "the group goes on")


def counting(text: str) -> str:
    """A script that counts its Redis calls in the key `test:calls`."""
    body = text.replace("redis.call(", "call(")
    return ("local function call(...)\n  redis.call('INCR', 'test:calls')\n"
            "  return redis.call(...)\nend\n" + body)  # fmt: skip


def test_a_post_no_longer_walks_every_members_cursor(
    cluster_of: Callable[..., Cluster],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """carol, away, is removed with a backlog as long as the cap: what is
    hers keeps the log over the limits (no hole can take it), and each
    post walked every member's cursor in `GROUP_POST` (one HGET each: ~1,000
    Redis calls a post at 1,000 members). Now a post costs the same few
    calls whatever the group's size."""
    sc = cluster_module()
    monkeypatch.setitem(sc.SCRIPTS, "group_post", counting(sc.GROUP_POST))
    cap = 8
    cluster = cluster_of(2, mailbox_messages=cap)
    alice, bob = cluster.login(0, "alice"), cluster.login(1, "bob")
    carol = cluster.login(1, "carol")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "carol").code == 0
    cluster.run_until(lambda: bool(entries(carol)), 200, "carol has the CREATED")
    cluster.settle()
    cluster.nodes[1].logout(carol)
    for n in range(1, cap):
        cluster.post(0, alice, "team", f"for carol {n}", n)
    cluster.run_until(lambda: len(texts(bob)) == cap - 1, 300, "bob has them")
    assert cluster.request(0, alice, GroupAction.REMOVE, "team", "carol").code == 0
    members = 24
    others = [f"m{i:02}" for i in range(members)]
    for i, name in enumerate(others):
        cluster.login(i % 2, name)
    assert cluster.request(0, alice, GroupAction.ADD, "team", *others).code == 0
    cluster.settle(20)
    redis = redis_of(cluster)
    calls = []

    def accepted(count: int) -> Callable[[], bool]:
        return lambda: len(alice.of(GroupAccept)) == count

    for n in range(cap, 3 * cap):
        redis.set("test:calls", 0)
        cluster.post(0, alice, "team", f"a{n}", n)
        cluster.run_until(accepted(n), 300, "the accept")
        calls.append(int(redis.get("test:calls")))
        cluster.settle(5)
    assert not fails(alice)
    assert redis.xlen(LOG) >= cap  # (carol's entries alone)
    # A walk when what it found last may no longer hold (after the change,
    # then each time the log moved on by the cap); each other post a few calls.
    assert sum(c > members for c in calls) <= 3, calls
    assert sorted(calls)[len(calls) // 2] < members, calls


def test_f3_a_deaf_senders_messages_stay_and_a_quiet_ones_go(
    cluster_of: Callable[..., Cluster],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """F3's rule in Redis: bob (on B) is told of every copy: the holes take
    his messages. alice's client (on A) stops hearing us (her session lives
    on) while bob reads her posts: her notices stay unacked, so hers stay
    in the log; her next login is told bob had each."""
    monkeypatch.setattr(cluster_module(), "ROUTE_RENEW", 0.2)
    cluster = cluster_of(2)
    alice, bob = carol_removed(cluster)
    count = 2 * GROUP_TRIM_EVERY
    burst(cluster, 1, bob, count)
    cluster.run_until(lambda: len(texts(alice)) == count, 2000, "alice has bob's")
    redis = redis_of(cluster)
    until(cluster, lambda: redis.xlen(LOG) < GROUP_TRIM_EVERY + 4, "bob's messages cut")
    world = cluster.nodes[0]
    original = world._to_clients

    def to_clients(out: list[tuple[bytes, Any]]) -> None:
        original([(d, a) for d, a in out if a != alice.addr])

    world._to_clients = to_clients  # type: ignore[method-assign]
    burst(cluster, 0, alice, count, start=1000)
    cluster.settle(300)
    had = [t for t in texts(bob) if t.startswith("alice")]
    assert len(had) >= GROUP_TRIM_EVERY // 2  # (as many as her window let out unacked)
    time.sleep(1.0)  # beats: trims
    cluster.settle(20)
    kept = set(log_seqs(redis))
    hers = [seq for seq, what, by, _ in entries(bob) if what == "message" and by == "alice"]
    assert set(hers) <= kept, sorted(set(hers) - kept)
    check_bytes(redis)
    world._to_clients = original  # type: ignore[method-assign]
    world.clients.pop("alice", None)  # her client is gone, never told
    alice = cluster.login(1, "alice")
    bobs = {m.msg_id for m in bob.of(GroupDeliver) if m.sender == "alice"}  # ("for carol" too)
    cluster.run_until(lambda: {m for by, m in told_by(alice) if by == "bob"} == bobs,
                      2000, "alice told bob had each")  # fmt: skip


def test_the_member_who_holds_the_group_back_leaving_frees_it(
    cluster_of: Callable[..., Cluster],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """carol (on B) stops reading; past the cap alice's posts fail naming
    her. She leaves (her client still shows nothing): posts go in again,
    and the entries after her leaving are cut out of the log while she
    still is owed hers."""
    monkeypatch.setattr(cluster_module(), "ROUTE_RENEW", 0.2)
    cap = 5
    cluster = cluster_of(2, mailbox_messages=cap)
    alice, bob = cluster.login(0, "alice"), cluster.login(1, "bob")
    carol = cluster.login(1, "carol")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "carol").code == 0
    cluster.run_until(lambda: bool(entries(carol)), 200, "carol has the CREATED")
    cluster.settle()
    cluster.nodes[1].holding.add("carol")
    for n in range(1, cap + 2):
        cluster.post(0, alice, "team", f"a{n}", n)
        cluster.settle(3)
    cluster.run_until(lambda: len(fails(alice)) == 1, 300, "the refusal")
    assert fails(alice)[0].reason == ErrorCode.MAILBOX_FULL and "carol" in fails(alice)[0].message
    assert cluster.request(1, carol, GroupAction.LEAVE, "team").code == 0
    cluster.settle(10)  # (alice has the LEFT: her cursor passes her own messages after it)
    left = cap + 2  # CREATED, the messages, LEFT
    count = GROUP_TRIM_EVERY + 8
    for n in range(100, 100 + count):  # (bob reads as they come: within the cap)
        cluster.post(0, alice, "team", f"a{n}", n)
        cluster.settle(2)
    cluster.run_until(lambda: len(texts(bob)) == cap + count, 2000, "bob has them")
    assert len(fails(alice)) == 1
    redis = redis_of(cluster)
    until(cluster, lambda: redis.xlen(LOG) < cap + 1 + GROUP_TRIM_EVERY, "the holes")
    assert log_seqs(redis)[: cap + 1] == list(range(2, left + 1))  # carol's
    check_bytes(redis)


def test_a_group_made_again_keeps_none_of_the_old_ones_bookkeeping(
    cluster_of: Callable[..., Cluster],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The group with holes ends while carol is owed (it is retired, its
    holes with it) and is made again under its name: the new one's seqs go
    on, it has no holes, no cached lowest member and counts its own bytes;
    the retired log keeps carol's entries only; carol gets the old group's
    then the new one's."""
    monkeypatch.setattr(cluster_module(), "ROUTE_RENEW", 0.2)
    cluster = cluster_of(2, mailbox_messages=GROUP_TRIM_EVERY)
    alice, bob = carol_removed(cluster)
    count = 2 * GROUP_TRIM_EVERY
    burst(cluster, 0, alice, count)
    cluster.run_until(lambda: len(texts(bob)) == count + 1, 2000, "bob has them")
    redis = redis_of(cluster)
    until(cluster, lambda: redis.xlen(LOG) < GROUP_TRIM_EVERY + 2, "the holes")
    for node, client in ((1, bob), (0, alice)):
        assert cluster.request(node, client, GroupAction.LEAVE, "team").code == 0
    cluster.settle()
    (retired,) = [k for k in redis.keys("chat:glog:{#team}!*")]
    until(cluster, lambda: log_seqs(redis, retired) == [2, 3], "the retired log: carol's")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "carol").code == 0
    head = redis.hgetall(HEAD)
    assert int(head["seq"]) > count + 3 and not {"holes", "hbytes", "low", "lowkey"} & set(head)
    cluster.post(1, bob, "team", "new life", 1)
    cluster.run_until(lambda: texts(alice)[-1:] == ["new life"], 300, "the new group")
    check_bytes(redis)
    carol = cluster.login(1, "carol")
    cluster.run_until(lambda: texts(carol)[-1:] == ["new life"], 1000, "carol's catch-up")
    assert texts(carol) == ["for carol", "new life"]


KILLED_TRIMMER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import server_cluster as sc
store = sc.RedisStore(sc.parse_cluster_url(sys.argv[2]), "trimmer")
store.load()
print("trimming", flush=True)
while True:
    store._group_heads(trim=True)
"""


def test_a_node_killed_while_it_trims_loses_nothing(
    cluster_of: Callable[..., Cluster],  # noqa: F811
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """A node's store process trims every group's log in a loop (the beat's
    `TRIM_GROUP`, holes included) and is SIGKILLed in the middle: the
    script is atomic in Redis, so the log is as one call left it, its
    bytes add up, carol gets everything that is hers and the group goes on."""
    cluster = cluster_of(2)
    alice, bob = carol_removed(cluster)
    count = 2 * GROUP_TRIM_EVERY
    burst(cluster, 0, alice, count)
    cluster.run_until(lambda: len(texts(bob)) == count + 1, 2000, "bob has them")
    cluster.settle(20)
    trimmer = subprocess.Popen(
        [sys.executable, "-c", KILLED_TRIMMER, str(ROOT), redis_server.url],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert trimmer.stdout is not None and trimmer.stdout.readline().strip() == "trimming"
        time.sleep(0.3)
        trimmer.send_signal(signal.SIGKILL)
        trimmer.wait(10)
    finally:
        trimmer.kill()
        if trimmer.stdout is not None:
            trimmer.stdout.close()
    redis = redis_of(cluster)
    kept = log_seqs(redis)
    assert {2, 3} <= set(kept) and len(kept) < count, kept  # carol's, and holes
    check_bytes(redis)
    carol = cluster.login(0, "carol")
    cluster.run_until(lambda: any(e[1] == "removed" for e in entries(carol)), 500, "her removal")
    assert [e[:2] for e in entries(carol)] == [(2, "message"), (3, "removed")]
    cluster.post(1, bob, "team", "after", 1)
    cluster.run_until(lambda: texts(alice)[-1:] == ["after"], 300, "the group goes on")
