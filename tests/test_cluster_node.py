"""Cluster mode (issue 15), one layer at a time, against a real redis-server
(tests/redis_fixture.py): the URL and the ids (no Redis); `RedisStore`'s
operations, their idempotency, and acknowledgements that wait for Redis;
`RedisRouter` and the notices between nodes; then nodes as `ChatServer`
threads of this process sharing one Redis, with real clients: direct
messages across nodes, a login on another node, a recipient who moves.
Real processes, SIGKILLs and a cut link are in test_cluster_process.py."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from chat_server import Relay
from protocol import Deliver
from server_store import (
    Account,
    EraseAccount,
    FindDedup,
    MarkDelivered,
    MemoryStore,
    NoticeDone,
    Read,
    ReadMailbox,
    ReadNotices,
    StoreAccount,
    StoredMessage,
    StoreMessage,
    Sync,
    UpdateAccount,
    content_digest,
)
from tests.clients import RecordingClient, close_all, wait_all
from tests.conftest import PASSWORD, RunningServer, start_server, stop_server
from tests.conftest import test_config as server_config
from tests.redis_fixture import RedisServer, need_redis, redis_server  # noqa: F401 (a fixture)
from tests.test_bounds import World
from tests.test_groups_relay import GroupWorld
from tests.test_seams import WALL, SeamWorld, scenario


def cluster_module() -> Any:
    """server_cluster (it imports the redis package: skipped without it, outside CI)."""
    need_redis(server=False)
    import server_cluster

    return server_cluster


# --- no Redis needed ----------------------------------------------------------


def test_cluster_url_is_parsed_and_its_password_never_shown() -> None:
    sc = cluster_module()
    address = sc.parse_cluster_url("redis://chat:s3cret@10.0.0.5:6380/2")
    assert (address.host, address.port, address.db) == ("10.0.0.5", 6380, 2)
    assert (address.username, address.password) == ("chat", "s3cret")
    assert "s3cret" not in str(address) and str(address) == "redis://chat:***@10.0.0.5:6380/2"
    assert str(sc.parse_cluster_url("redis://localhost")) == "redis://localhost:6379/0"
    for bad, says in [
        ("http://localhost:6379", "not a redis:// URL"),
        ("redis://:6379", "names no host"),
        ("redis://localhost:99999", "out of range"),
        ("redis://localhost:6379/zero", "not a number"),
        ("redis://u:hunter2@localhost:port", "***"),
    ]:
        with pytest.raises(sc.ClusterError) as caught:
            sc.parse_cluster_url(bad)
        assert says in str(caught.value) and "hunter2" not in str(caught.value)


def test_entry_numbers_keep_the_stream_order_and_come_back() -> None:
    sc = cluster_module()
    ids = ["1733400000000-0", "1733400000000-1", "1733400000000-999", "1733400000001-0"]
    numbers = [sc.entry_number(i) for i in ids]
    assert numbers == sorted(numbers) and len(set(numbers)) == 4
    assert [sc.entry_id(n) for n in numbers] == ids
    # Far above any server message id a node gives out (the relay's pagers compare them).
    assert numbers[0] > 1_000_000 * sc.ID_BLOCK
    assert numbers[-1] < 1 << 63  # a signed 64-bit integer in the clients' SQLite


def test_routes_of_a_silent_node_are_dropped() -> None:
    sc = cluster_module()
    router = sc.RedisRouter(SimpleNamespace(node_id="B"), {"alice": "A", "carol": "C"})
    assert router.node_alive("A", 0.0) == []
    assert router.node_alive("C", 1.0) == []
    # A keeps beating, C is silent for longer than a route lives.
    assert router.node_alive("A", sc.ROUTE_TTL + 5.0) == ["carol"]
    assert router.remote == {"alice": "A"}
    # The node's own beat times the others out too (the last other node died).
    assert router.node_alive("B", 3 * sc.ROUTE_TTL) == ["alice"]
    assert router.remote == {}


# --- RedisStore against a real Redis --------------------------------------------


class Events:
    """A `ClusterEvents` that records what a node is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def mail_waiting(self, key: str, server_msg_id: int, now: float) -> None:
        self.calls.append(("mail", key, server_msg_id))

    def receipts_waiting(self, key: str, seq: int, now: float) -> None:
        self.calls.append(("receipts", key, seq))

    def resync(self, now: float) -> None:
        self.calls.append(("resync",))

    def logged_in_on(self, key: str, instance_id: int, now: float) -> None:
        self.calls.append(("elsewhere", key, instance_id))

    def presence_elsewhere(self, key: str, online: bool, now: float) -> None:
        self.calls.append(("presence", key, online))

    def account_added(self, key: str, account: Account, now: float) -> None:
        self.calls.append(("account", key, account))

    def mailbox_size(self, key: str, count: int, size: int, now: float) -> None:
        self.calls.append(("size", key, count, size))

    def account_changed(self, key: str, account: Account, now: float) -> None:
        self.calls.append(("changed", key, account))

    def account_erased(self, key: str, until: int, now: float) -> None:
        self.calls.append(("erased", key, until))

    def group_waiting(self, key: str, epoch: int, seq: int, now: float) -> None:
        self.calls.append(("group", key, epoch, seq))

    def group_ended(self, key: str, epoch: int, now: float) -> None:
        self.calls.append(("group_ended", key, epoch))

    def group_heads(self, heads: dict[str, tuple[int, int]], now: float) -> None:
        self.calls.append(("heads", heads))

    def group_reached(self, sender_key: str, group_key: str,
                      reached: list[tuple[int, int, list[str]]], cursors: list[tuple[str, int]],
                      now: float) -> None:  # fmt: skip
        self.calls.append(("group_reached", sender_key, group_key, reached, cursors))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == kind]


class Node:
    """A RedisStore and RedisRouter with their threads, pumped by the test
    as the loop would (`pump` runs the callbacks that came back)."""

    def __init__(self, url: str, node_id: str) -> None:
        sc = cluster_module()
        self.store = sc.RedisStore(sc.parse_cluster_url(url), node_id)
        self.router = sc.RedisRouter(self.store, self.store.remote_routes())
        self.events = Events()
        self.store.attach(self.events, self.router)
        self.loaded = self.store.load()
        self.store.start()

    def pump(self) -> None:
        for callback in self.store.completed():
            callback()

    def run(self, op: Any, timeout: float = 5.0) -> None:
        """Submit `op` and wait for its callback."""
        done: list[bool] = []
        self.store.submit(op, lambda: done.append(True))
        self.store.flush()
        self.until(lambda: bool(done), timeout, f"{op}")

    def until(self, condition: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            if condition():
                return
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    def read(self, query: Any) -> Any:
        read = Read(query)
        self.run(read)
        assert read.ok
        return read.result

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def nodes(redis_server: RedisServer) -> Iterator[Callable[[str], Node]]:  # noqa: F811
    made: list[Node] = []

    def make(node_id: str) -> Node:
        made.append(Node(redis_server.url, node_id))
        return made[-1]

    yield make
    for node in made:
        node.close()


def message(text: str, seq: int, server_msg_id: int = 7) -> StoredMessage:
    return StoredMessage(server_msg_id, "bob", "alice", "Alice", 42, seq, text, 1_700_000_000_000)


def test_a_message_its_receipt_and_its_dedup_key_go_through_redis(
    nodes: Callable[[str], Node],
) -> None:
    a = nodes("A")
    a.run(StoreMessage(message("hello", 1)))
    # The sender's id answers a retry, with the digest that tells a reused id.
    assert a.read(FindDedup("alice", 42, 1)) == (7, content_digest("bob", "hello"), None)
    assert a.read(FindDedup("alice", 42, 2)) is None
    rows, more = a.read(ReadMailbox("bob", -1, 10, 1 << 20))
    assert [(m.text, m.sender, m.instance_id, m.client_seq) for m in rows] == [
        ("hello", "Alice", 42, 1)
    ] and not more
    number = rows[0].server_msg_id
    assert a.events.of("size")[-1] == ("size", "bob", 1, 5)
    delivered = MarkDelivered(number, "alice", 42, 1, "Bob", "bob", 5, 0)
    a.run(delivered)
    a.run(delivered)  # a receipt repeated: the sender is told once
    assert a.read(ReadMailbox("bob", -1, 10, 1 << 20)) == ([], False)
    notices, _ = a.read(ReadNotices("alice", -1, 10))
    assert [row[1:] for row in notices] == [(42, 1, "Bob")]
    assert a.events.of("size")[-1] == ("size", "bob", 0, 0)
    a.run(NoticeDone("alice", 42, 1))
    assert a.read(ReadNotices("alice", -1, 10)) == ([], False)


def test_a_batch_applied_twice_stores_everything_once(nodes: Callable[[str], Node]) -> None:
    """EXEC ran but its reply was lost (Redis or the link died): the store
    applies the same batch again. Every script is idempotent."""
    a = nodes("A")
    batch: list[Any] = [(StoreMessage(message(f"m{i}", i)), None) for i in range(1, 4)]
    a.store._apply(batch)
    a.store._apply(batch)
    rows, _ = a.read(ReadMailbox("bob", -1, 10, 1 << 20))
    assert [m.text for m in rows] == ["m1", "m2", "m3"]
    receipt = [(MarkDelivered(rows[0].server_msg_id, "alice", 42, 1, "Bob", "bob", 2, 0), None)]
    a.store._apply(receipt)
    a.store._apply(receipt)
    notices, _ = a.read(ReadNotices("alice", -1, 10))
    assert len(notices) == 1
    assert a.store.client.hgetall("chat:msize:{bob}") == {"n": "2", "b": "4"}


def test_the_mailbox_order_is_one_across_nodes(nodes: Callable[[str], Node]) -> None:
    """Two nodes write to one mailbox with ids from their own blocks; the
    recipient reads one order, the order Redis applied them in."""
    a, b = nodes("A"), nodes("B")
    assert b.loaded.next_msg_id > a.loaded.next_msg_id  # each start reserves its own block
    for i in range(1, 7):
        node = a if i % 2 else b
        node.run(StoreMessage(message(f"m{i}", i, server_msg_id=node.loaded.next_msg_id + i)))
    rows, _ = a.read(ReadMailbox("bob", -1, 10, 1 << 20))
    assert [m.text for m in rows] == [f"m{i}" for i in range(1, 7)]
    numbers = [m.server_msg_id for m in rows]
    assert numbers == sorted(numbers)
    # Paging from a cursor reads on from there.
    rest, _ = a.read(ReadMailbox("bob", numbers[2], 10, 1 << 20))
    assert [m.text for m in rest] == ["m4", "m5", "m6"]


def test_nodes_share_the_secret_and_accounts_and_a_registration_race_has_one_winner(
    nodes: Callable[[str], Node],
) -> None:
    a, b = nodes("A"), nodes("B")
    assert a.loaded.secret == b.loaded.secret and len(a.loaded.secret) == 32
    first = Account("Carol", b"s" * 16, 4096, b"k" * 32, b"v" * 32)
    second = Account("Carol", b"t" * 16, 4096, b"x" * 32, b"y" * 32)
    a.run(StoreAccount("carol", first))
    # B learns of it by a notice (and would read it at its next start).
    b.until(lambda: ("account", "carol", first) in b.events.calls, what="account notice")
    # B registered the same name at the same moment: the one stored first holds,
    # and B is told that instead of its registration's callback.
    answered: list[bool] = []
    b.store.submit(StoreAccount("carol", second), lambda: answered.append(True))
    b.store.flush()
    b.until(lambda: len(b.events.of("account")) >= 2, what="the winner")
    assert b.events.of("account")[-1] == ("account", "carol", first) and not answered
    assert nodes("C").loaded.accounts == {"carol": first}


def test_routes_logins_and_logouts_reach_the_other_nodes(
    nodes: Callable[[str], Node],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    sc = cluster_module()
    a, b = nodes("A"), nodes("B")
    a.store.submit_route(sc.BindRoute("alice", 99))
    a.store.flush()
    b.until(lambda: b.router.remote.get("alice") == "A", what="alice's route on B")
    assert ("elsewhere", "alice", 99) in b.events.calls  # a session of hers on B ends
    assert ("presence", "alice", True) in b.events.calls
    ttl = a.store.client.ttl("chat:route:{alice}")
    assert 0 < ttl <= sc.ROUTE_TTL
    # A node that starts later reads the routes there are.
    assert nodes("C").router.remote == {"alice": "A"}
    a.store.submit_route(sc.UnbindRoute("alice"))
    a.store.flush()
    b.until(lambda: "alice" not in b.router.remote, what="alice gone from B's cache")
    assert ("presence", "alice", False) in b.events.calls
    assert a.store.client.get("chat:route:{alice}") is None
    # A message for a user routed to B wakes B, with the mailbox number.
    b.store.submit_route(sc.BindRoute("bob", 1))
    b.store.flush()
    a.until(lambda: a.router.remote.get("bob") == "B", what="bob's route on A")
    a.run(StoreMessage(message("wake up", 1)))
    b.until(lambda: bool(b.events.of("mail")), what="B woken")
    rows, _ = b.read(ReadMailbox("bob", -1, 10, 1 << 20))
    assert b.events.of("mail") == [("mail", "bob", rows[0].server_msg_id)]


def test_acks_wait_while_redis_is_gone_and_nothing_acked_is_lost(
    nodes: Callable[[str], Node],
    redis_server: RedisServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="server_cluster")
    a = nodes("A")
    a.run(StoreMessage(message("before", 1)))
    redis_server.kill()
    acked: list[int] = []
    for seq in (2, 3):
        a.store.submit(StoreMessage(message(f"during {seq}", seq)), lambda s=seq: acked.append(s))
    a.store.flush()
    time.sleep(1.5)
    a.pump()
    assert acked == []  # not acknowledged while Redis cannot confirm the write
    redis_server.start()  # from its AOF
    a.until(lambda: acked == [2, 3], timeout=10, what="the acks after Redis came back")
    rows, _ = a.read(ReadMailbox("bob", -1, 10, 1 << 20))
    assert [m.text for m in rows] == ["before", "during 2", "during 3"]
    lost = [r for r in caplog.records if "lost Redis" in r.getMessage()]
    back = [r for r in caplog.records if "is back after" in r.getMessage()]
    assert len(lost) == 1 and len(back) == 1  # said once each, not per attempt


# --- nodes as ChatServer threads, with real clients ------------------------------


@pytest.fixture
def cluster(redis_server: RedisServer) -> Iterator[Callable[[str], RunningServer]]:  # noqa: F811
    """Nodes (ChatServer threads) of one cluster, on free ports."""
    running: list[RunningServer] = []

    def node(name: str) -> RunningServer:
        running.append(start_server(server_config(None, cluster=redis_server.url, node_id=name)))
        return running[-1]

    yield node
    for server in running:
        stop_server(server)


def login(client: RecordingClient, server: RunningServer, peer: str | None = None) -> None:
    before = client.logins
    client.login(server.address, peer)
    client.wait(lambda: client.logins > before, what=f"{client.name} logged in")


def test_direct_messages_across_nodes_both_ways_in_order(
    cluster: Callable[[str], RunningServer],
) -> None:
    a, b = cluster("A"), cluster("B")
    alice, bob = RecordingClient("alice"), RecordingClient("bob")
    try:
        login(alice, a, "bob")
        login(bob, b)
        sent = [alice.send(f"to bob {i}") for i in range(30)]
        replies = [bob.send(f"to alice {i}", "alice") for i in range(10)]
        wait_all([alice, bob], lambda: alice.delivered(sent) == 30 and bob.delivered(replies) == 10,
                 15, "every message delivered")  # fmt: skip
        assert bob.texts() == [f"to bob {i}" for i in range(30)]
        assert alice.texts() == [f"to alice {i}" for i in range(10)]
        assert all(alice.states[i] == ["sending", "accepted", "delivered"] for i in sent)
        assert a.relay.stats["routed_elsewhere"] == 30
        # Who is online: the users of both nodes.
        bob.session.who()
        bob.wait(lambda: bool(bob.who_lists), what="WHO")
        assert {"alice", "bob"} <= {n.lower() for n in bob.who_lists[-1].users}
    finally:
        close_all([alice, bob])


def test_a_login_on_another_node_ends_the_session_here(
    cluster: Callable[[str], RunningServer],
) -> None:
    a, b = cluster("A"), cluster("B")
    first, second, bob = RecordingClient("alice"), RecordingClient("alice"), RecordingClient("bob")
    try:
        login(first, a)
        login(bob, a, "alice")
        login(second, b)
        first.wait(lambda: first.disconnected is not None, what="the first session ended")
        assert first.disconnected == "logged_in_elsewhere"
        msg = bob.send("to the new session")
        bob.wait(lambda: bob.reached(msg, "delivered"), what="delivered")
        assert second.texts() == ["to the new session"] and first.texts() == []
    finally:
        close_all([first, second, bob])


def test_messages_wait_for_an_offline_user_who_logs_in_on_any_node(
    cluster: Callable[[str], RunningServer],
) -> None:
    a, b = cluster("A"), cluster("B")
    alice, bob = RecordingClient("alice"), RecordingClient("bob")
    try:
        login(bob, b)
        bob.close()
        login(alice, a, "bob")
        sent = [alice.send(f"while you were away {i}") for i in range(5)]
        alice.wait(lambda: all(alice.reached(i, "accepted") for i in sent), what="accepted")
        later = RecordingClient("bob")
        login(later, b)
        alice.wait(lambda: alice.delivered(sent) == 5, what="delivered")
        assert later.texts() == [f"while you were away {i}" for i in range(5)]
        close_all([later])
    finally:
        close_all([alice, bob])


def test_a_recipient_who_moves_gets_what_was_pending_exactly_once(
    cluster: Callable[[str], RunningServer],
) -> None:
    """bob's client on B took 5 messages and died before showing (and
    receipting) them; he logs in on A: they come again from his mailbox,
    each once, and alice hears `delivered` once for each."""
    a, b = cluster("A"), cluster("B")
    alice, bob = RecordingClient("alice"), RecordingClient("bob")
    bob.shows = False
    moved = RecordingClient("bob")
    try:
        login(alice, a, "bob")
        login(bob, b)
        sent = [alice.send(f"pending {i}") for i in range(5)]
        bob.wait(lambda: len(bob.received) == 5, what="handed to bob on B")
        assert alice.delivered(sent) == 0
        bob.session.abort()  # the client dies: no logout, no receipts
        login(moved, a)
        alice.wait(lambda: alice.delivered(sent) == 5, what="delivered after the move")
        time.sleep(0.5)
        moved.pump()
        assert moved.texts() == [f"pending {i}" for i in range(5)]
        assert all(alice.states[i].count("delivered") == 1 for i in sent)
    finally:
        close_all([alice, moved])
        bob.dispose()


# --- the relay on a RedisStore, with a fake clock: the seams' scenario -----------


class NoticeFence:
    """Waits until the node's pub/sub listener has handed the loop every
    notice published so far. Redis sends a subscriber its channels'
    messages in the order they were published, so a fence published on the
    node's own channel comes after them; the listener is wrapped to take
    the fence out and report it once the notices before it (in the same
    burst) are on the store's `done` queue. No sleep stands in for the
    notices: on a loaded machine the listener may take any time."""

    PREFIX = "test-fence"

    def __init__(self, store: Any) -> None:
        self.store = store
        self.channel = cluster_module().NODE_CHANNEL + store.node_id
        self.passed: set[str] = set()
        self.count = 0
        self._arrived = threading.Condition()
        handle = store._on_notices

        def on_notices(notices: list[str]) -> None:
            fences = [n for n in notices if n.startswith(self.PREFIX)]
            rest = [n for n in notices if not n.startswith(self.PREFIX)]
            if rest:
                handle(rest)
            with self._arrived:
                self.passed.update(fences)
                self._arrived.notify_all()

        store._on_notices = on_notices

    def wait(self, timeout: float = 10.0) -> None:
        self.count += 1
        fence = f"{self.PREFIX}\t{self.count}"
        self.store.client.publish(self.channel, fence)
        with self._arrived:
            assert self._arrived.wait_for(lambda: fence in self.passed, timeout), (
                "the pub/sub listener did not pass the fence"
            )


class ClusterWorld(SeamWorld):
    """test_seams' world on a relay that is a cluster node: its store and
    router on Redis, `shared_store` on. Every step hands the pass's
    operations to the store thread, waits for them to be applied and runs
    what came back (callbacks and the notices of Redis pub/sub)."""

    def __init__(self, node: Node) -> None:
        World.__init__(self)
        self.node = node
        self.store = node.store
        self.relay = Relay(server_config(None), store=node.store, router=node.router,
                           wall_clock=lambda: WALL, shared_store=True)  # fmt: skip
        node.store.attach(self.relay, node.router)

    @functools.cached_property
    def fences(self) -> NoticeFence:
        # Made at the first sync (worlds built on this one set `node` and
        # skip this __init__): notices before it are handled as ever.
        return NoticeFence(self.node.store)

    def sync(self) -> None:
        synced = threading.Event()
        self.store.submit(Sync(), synced.set)
        self.store.flush()
        deadline = time.monotonic() + 10
        while not synced.is_set():
            assert time.monotonic() < deadline, "the store thread did not answer"
            time.sleep(0.001)
            self.relay.store_done(self.now)
        # What was applied published its notices before the Sync's callback
        # came: a fence published now reaches the listener after them.
        self.fences.wait()
        self.relay.store_done(self.now)

    def settle(self) -> None:
        for _ in range(20):
            self.sync()
            self._to_clients(self.relay.datagrams_to_send(self.now))
            if not self.node.store._pending:
                return


def normalized(told: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """A transcript with each server id replaced by its rank: accepted ids
    among all of them, delivered ones within each recipient's mailbox (a
    cluster numbers from its id block and from each mailbox's stream)."""
    accepted = sorted({m[2] for messages in told.values() for m in messages if m[0] == "accept"})
    accept_rank = {n: i for i, n in enumerate(accepted)}
    out: dict[str, list[tuple[Any, ...]]] = {}
    for name, messages in told.items():
        mailbox = sorted({m[1] for m in messages if m[0] == "deliver"})
        rank = {n: i for i, n in enumerate(mailbox)}
        out[name] = [
            (m[0], m[1], accept_rank[m[2]]) if m[0] == "accept"
            else (m[0], rank[m[1]], *m[2:]) if m[0] == "deliver" else m
            for m in messages
        ]  # fmt: skip
    return out


def test_the_seams_scenario_on_a_cluster_node_tells_every_client_the_same(
    nodes: Callable[[str], Node],
) -> None:
    """The relay on Redis, with its `shared_store` ways (every copy handed
    over from the mailbox, after the store said it waits), tells every
    client what the memory store's relay does, server ids aside."""
    on_redis = normalized(scenario(ClusterWorld(nodes("A"))))
    in_memory = normalized(scenario(SeamWorld(MemoryStore())))
    for name in ("alice", "bob", "carol"):
        for kind in ("accept", "delivered", "deliver", "fail", "presence"):
            assert [m for m in on_redis[name] if m[0] == kind] == [
                m for m in in_memory[name] if m[0] == kind
            ], (name, kind)


def test_the_seams_scenario_waits_for_the_notices_of_a_slow_listener(
    nodes: Callable[[str], Node],
) -> None:
    """The same, with the pub/sub listener 50 ms late with every burst of
    notices (a loaded machine): the world waits for the notices themselves
    (`NoticeFence`), so the transcript is the same. A 5 ms sleep in their
    place failed here, and now and then at load average 20-30."""
    node = nodes("A")
    handle = node.store._on_notices

    def late(notices: list[str]) -> None:
        time.sleep(0.05)
        handle(notices)

    node.store._on_notices = late
    on_redis = normalized(scenario(ClusterWorld(node)))
    in_memory = normalized(scenario(SeamWorld(MemoryStore())))
    for name in ("alice", "bob", "carol"):
        for kind in ("accept", "delivered", "deliver", "fail", "presence"):
            assert [m for m in on_redis[name] if m[0] == kind] == [
                m for m in in_memory[name] if m[0] == kind
            ], (name, kind)


def test_reading_again_after_a_broken_link_reads_once(nodes: Callable[[str], Node]) -> None:
    """`Relay.resync` (the pub/sub link came back) has each session read
    its queues once more; with nothing new there, the reading stops (it once
    read for ever: the pager waited for a number past its cursor)."""
    world = ClusterWorld(nodes("A"))
    alice, bob = world.login("alice"), world.login("bob")
    for seq in (1, 2):
        world.send(alice, "bob", f"hello {seq}", seq)
    world.run_until(lambda: len([m for m in bob.messages if isinstance(m, Deliver)]) == 2, 200,
                    "bob's messages")  # fmt: skip
    world.relay.resync(world.now)
    for _ in range(5):
        world.step()
    before = world.node.store.batches
    for _ in range(10):
        world.step()
    # Each step applies its one Sync batch, and nothing more is read.
    assert world.node.store.batches - before <= 10
    for session in world.relay.sessions.values():
        assert session.mail is not None and not session.mail.behind
        assert session.receipts is not None and not session.receipts.behind


def test_a_route_taken_while_the_notice_was_missed_ends_the_session_here(
    nodes: Callable[[str], Node],
) -> None:
    sc = cluster_module()
    a = nodes("A")
    a.run(Sync())
    a.store.submit_route(sc.BindRoute("alice", 5))
    a.run(Sync())
    a.store.client.set("chat:route:{alice}", "B", ex=sc.ROUTE_TTL)  # B's login; A missed it
    for callback in a.store._renew():
        callback()
    assert a.events.of("elsewhere") == [("elsewhere", "alice", -1)]
    assert a.store.client.get("chat:route:{alice}") == "B"  # left to B


def test_scripts_are_loaded_again_when_redis_forgot_them(nodes: Callable[[str], Node]) -> None:
    """A Redis restarted from its AOF has an empty script cache: the batch
    meets NOSCRIPT, the scripts are loaded and the batch applied."""
    a = nodes("A")
    a.store.client.script_flush()
    a.run(StoreMessage(message("after a flush", 1)))
    rows, _ = a.read(ReadMailbox("bob", -1, 10, 1 << 20))
    assert [m.text for m in rows] == ["after a flush"]


def test_a_node_started_later_lists_the_users_of_the_others(
    cluster: Callable[[str], RunningServer],
) -> None:
    a = cluster("A")
    alice = RecordingClient("alice")
    bob = RecordingClient("bob")
    try:
        login(alice, a)
        b = cluster("B")
        login(bob, b)
        bob.session.who()
        bob.wait(lambda: bool(bob.who_lists), what="WHO")
        assert {n.lower() for n in bob.who_lists[-1].users} == {"alice", "bob"}
    finally:
        close_all([alice, bob])


def test_after_an_outage_routes_are_renewed_at_once_and_queues_read_again(
    nodes: Callable[[str], Node],
    redis_server: RedisServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis was away longer than a route lives: its routes expired, so a
    message stored for one of its users right after Redis came back woke
    nobody. The node renews its routes as soon as Redis answers again (not
    at the next beat) and has its sessions read their queues."""
    sc = cluster_module()
    monkeypatch.setattr(sc, "ROUTE_TTL", 1)
    monkeypatch.setattr(sc, "ROUTE_RENEW", 3600.0)  # only the recovery renews here
    a = nodes("A")
    a.store.submit_route(sc.BindRoute("bob", 5))
    a.run(Sync())
    redis_server.kill()
    time.sleep(1.5)
    acked: list[bool] = []
    a.store.submit(StoreMessage(message("during", 1)), lambda: acked.append(True))
    a.store.flush()
    time.sleep(0.6)
    redis_server.start()  # the route, stored with a 1 s TTL, has expired
    a.until(lambda: bool(acked), timeout=10, what="the batch after the outage")
    assert a.store.client.get("chat:route:{bob}") == "A"
    a.until(lambda: bool(a.events.of("resync")), what="the sessions told to read again")


def test_a_link_lost_again_right_after_it_came_back_is_one_outage_in_the_log(
    nodes: Callable[[str], Node],
    redis_server: RedisServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="server_cluster")
    a = nodes("A")
    acked: list[int] = []
    for round_ in (1, 2):
        redis_server.kill()
        a.store.submit(StoreMessage(message(f"round {round_}", round_)),
                       functools.partial(acked.append, round_))  # fmt: skip
        a.store.flush()
        time.sleep(0.8)
        redis_server.start()
        a.until(functools.partial(acked.__contains__, round_), 10, f"round {round_} acked")
    lost = [r for r in caplog.records if "lost Redis" in r.getMessage()]
    back = [r for r in caplog.records if "is back after" in r.getMessage()]
    assert len(lost) == 1 and len(back) == 1, caplog.text


def test_the_operators_start_line_names_the_node_and_the_cluster(
    cluster: Callable[[str], RunningServer],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    from chat_server import start_line

    node = cluster("A")
    line = start_line(node.server, node.relay.config)
    assert f"node A of the cluster at {redis_server.url}, " in line and "data in" not in line


def test_a_burst_of_notices_wakes_the_loop_once_with_the_newest_per_queue(
    nodes: Callable[[str], Node],
) -> None:
    sc = cluster_module()
    a = nodes("A")
    a.pump()
    woken: list[bool] = []
    a.store.notify = lambda: woken.append(True)
    a.store._on_notices(["m\tbob\t5-0", "m\tbob\t7-1", "m\tbob\t6-0", "n\tbob\t9-0",
                         "m\tcarol\t1-0", "off\tbob\tB"])  # fmt: skip
    a.pump()
    assert woken == [True]
    assert a.events.of("mail") == [("mail", "bob", sc.entry_number("7-1")),
                                   ("mail", "carol", sc.entry_number("1-0"))]  # fmt: skip
    assert a.events.of("receipts") == [("receipts", "bob", sc.entry_number("9-0"))]


def test_an_operation_the_store_does_not_know_is_never_acknowledged(
    nodes: Callable[[str], Node], caplog: pytest.LogCaptureFixture
) -> None:
    """A feature built for the single server only must not wedge a node or
    have its writes acknowledged: the operation is left out (logged once),
    the rest of its batch is applied, a read it cannot answer stays not ok."""

    @dataclass
    class Unknown:
        value: int

    @dataclass
    class UnknownQuery:
        value: int

    a = nodes("A")
    done: list[str] = []
    a.store.submit(Unknown(1), lambda: done.append("unknown 1"))
    a.store.submit(StoreMessage(message("kept", 1)), lambda: done.append("message"))
    a.store.submit(Unknown(2), lambda: done.append("unknown 2"))
    read = Read(UnknownQuery(3))  # type: ignore[arg-type]
    a.store.submit(read, lambda: done.append("read"))
    a.run(Sync())
    assert done == ["message", "read"] and not read.ok
    assert [m.text for m in a.read(ReadMailbox("bob", -1, 10, 1 << 20))[0]] == ["kept"]
    assert caplog.text.count("Unknown is not supported in cluster mode") == 1


def test_a_changed_password_and_a_deleted_account_reach_every_node(
    nodes: Callable[[str], Node],
) -> None:
    a, b = nodes("A"), nodes("B")
    first = Account("Dora", b"s" * 16, 4096, b"k" * 32, b"v" * 32)
    changed = Account("Dora", b"t" * 16, 4096, b"K" * 32, b"V" * 32)
    a.run(StoreAccount("dora", first))
    a.run(StoreMessage(StoredMessage(5, "dora", "bob", "Bob", 1, 1, "for dora", 0)))
    a.run(UpdateAccount("dora", changed))
    b.until(lambda: ("changed", "dora", changed) in b.events.calls, what="the new password")
    assert nodes("C").loaded.accounts["dora"] == changed
    a.run(EraseAccount("dora", 1_900_000_000_000))
    b.until(lambda: ("erased", "dora", 1_900_000_000_000) in b.events.calls, what="deleted")
    later = nodes("D").loaded
    assert "dora" not in later.accounts and later.quarantine == {"dora": 1_900_000_000_000}
    assert a.read(ReadMailbox("dora", -1, 10, 1 << 20)) == ([], False)
    # The name registered again (after its quarantine): free, and nothing left over.
    a.run(StoreAccount("dora", first))
    assert nodes("E").loaded.quarantine == {}


def test_an_account_deleted_on_one_node_is_gone_on_the_others(
    cluster: Callable[[str], RunningServer],
) -> None:
    a, b = cluster("A"), cluster("B")
    dora, bob = RecordingClient("dora"), RecordingClient("bob")
    try:
        login(dora, a)
        login(bob, b, "dora")
        assert "dora" in b.relay.users
        dora.session.delete_account(PASSWORD)
        dora.wait(lambda: dora.disconnected is not None, what="dora's account deleted")
        assert dora.disconnected == "account_deleted"
        bob.wait(lambda: "dora" not in b.relay.users, what="B forgot dora")
        assert "dora" in b.relay.quarantine
        msg = bob.send("anyone there?")
        bob.wait(lambda: bool(bob.errors) or msg in bob.reasons, what="no such user")
    finally:
        close_all([dora, bob])


def test_a_message_waiting_for_an_account_goes_when_it_appears_on_another_node(
    cluster: Callable[[str], RunningServer],
) -> None:
    a, b = cluster("A"), cluster("B")
    alice, zed = RecordingClient("alice"), RecordingClient("zed")
    try:
        login(alice, a)
        msg = alice.send("welcome, zed", "zed")
        alice.wait(lambda: any(e.code == "no_such_user" for e in alice.errors), what="waits")
        login(zed, b)
        alice.wait(lambda: alice.reached(msg, "delivered"), timeout=20, what="delivered")
        assert zed.texts() == ["welcome, zed"]
    finally:
        close_all([alice, zed])


class ClusterGroupWorld(ClusterWorld, GroupWorld):
    """A cluster node's relay (`ClusterWorld`) with test_groups_relay's
    group requests (`GroupWorld`)."""

    def __init__(self, node: Node) -> None:
        ClusterWorld.__init__(self, node)
        self.holding: set[str] = set()
        self._request_ids = 0


def test_every_module_is_packaged() -> None:
    """`pip install 'udp-chat[cluster]'` (not editable) installs pyproject's
    `py-modules` only: a module missing there makes chat-server fail at
    import on such an install (server_cluster is imported by --cluster)."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = tomllib.loads((root / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"][
        "py-modules"
    ]
    present = {path.stem for path in root.glob("*.py")}
    assert present - set(listed) == set(), "add these to [tool.setuptools] py-modules"
    assert set(listed) - present == set(), "py-modules names modules that do not exist"
