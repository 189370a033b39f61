"""The relay's seams (issue 13, item 2), on the sans-IO `Relay` with a fake
clock: its aioquic-shaped API (inputs return nothing, output only from
`datagrams_to_send`, `get_timer`/`handle_timer`, completions that carry
`now`), the store seam (the same scenario on `MemoryStore` and on SQLite
gives the same outcomes; reads never run on the loop), the router seam
(`LocalRouter`, and what the relay does with a session on another node),
and `KeyExchanges`, which runs registrations' key exchanges for it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chat_server import Relay
from protocol import (
    Accept,
    Accepts,
    Challenge,
    Deliver,
    Delivered,
    Delivereds,
    ErrorCode,
    Fail,
    Logout,
    Message,
    MsgId,
    Presence,
    Send,
    Welcome,
    conversation_stream,
    dh_public,
    dh_secret,
)
from server_keyx import KeyExchanges
from server_records import Session, User
from server_router import LocalRouter, Route
from server_store import (
    FindDedup,
    Loaded,
    MemoryStore,
    MessageStore,
    Op,
    Read,
    ServerStore,
    StoreMessage,
    Sync,
)
from tests.clients import ScriptedLogin, preauth_frame
from tests.conftest import PASSWORD
from tests.conftest import test_config as server_config
from tests.test_bounds import Client, World
from tests.test_security import HeldExecutor, register

WALL = 1_700_000_000.0  # the relay's wall clock, fixed: `sent_ms` is then the same everywhere


class SeamWorld(World):
    """`test_bounds.World` on a relay given its store (and router): with a
    SQLite store, every step hands the pass's operations to the store
    thread, waits for them to commit and runs their callbacks, as the
    server's loop does when the store wakes it."""

    def __init__(self, store: MessageStore, router: Any = None, **overrides: Any) -> None:
        super().__init__(**overrides)
        self.store = store
        self.relay = Relay(server_config(None, **overrides), store=store, router=router,
                           wall_clock=lambda: WALL)  # fmt: skip

    def sync(self) -> None:
        """Wait until what the relay submitted is durable and run its callbacks."""
        if not isinstance(self.store, ServerStore):
            return
        synced = threading.Event()
        self.store.submit(Sync(), synced.set)
        self.store.flush()
        deadline = time.monotonic() + 30
        while not synced.is_set():
            assert time.monotonic() < deadline, "the store thread did not answer"
            time.sleep(0.0005)
            self.relay.store_done(self.now)
        self.relay.store_done(self.now)

    def settle(self) -> None:
        for _ in range(20):  # callbacks may submit more (the next page)
            self.sync()
            self._to_clients(self.relay.datagrams_to_send(self.now))
            if not isinstance(self.store, ServerStore) or not self.store._pending:
                return

    def login(self, name: str) -> Client:
        """As `World.login`, the WELCOME of a registration waiting for its commit."""
        addr = (f"198.51.100.{len(self._by_addr) + 1}", 5000)
        login = ScriptedLogin(name, PASSWORD, 9, self.now)
        hello = self.relay.handle_datagram(login.hello, addr, self.now)
        login.take([d for d, _ in hello], self.now)
        self.relay.receive_datagram(login.request, addr, self.now)
        if isinstance(self.store, DeferredStore):
            self.store.commit()  # the account's commit, and nothing else is waiting
        self.sync()
        out = self.relay.datagrams_to_send(self.now)
        assert isinstance(login.take([d for d, _ in out], self.now), Welcome), login.answer
        conn = login.conn
        assert conn is not None
        client = self.clients[name] = self._by_addr[addr] = Client(name, addr, conn)
        self._to_clients([(d, a) for d, a in out if preauth_frame(d) is None])
        self.step()
        return client

    def step(self, dt: float = 0.01) -> None:
        super().step(dt)
        self.settle()

    def send(self, client: Client, to: str, text: str, seq: int, instance: int = 77) -> MsgId:
        msg_id = MsgId(instance, seq)
        client.send(Send(msg_id, to, text), conversation_stream(to))
        return msg_id


def flat(messages: list[Message]) -> list[tuple[Any, ...]]:
    """What a client was told, batches spread out, in a comparable form."""
    told: list[tuple[Any, ...]] = []
    for m in messages:
        if isinstance(m, Accepts):
            told += [("accept", tuple(msg_id), server_id) for msg_id, server_id in m.items]
        elif isinstance(m, Accept):
            told.append(("accept", tuple(m.msg_id), m.server_msg_id))
        elif isinstance(m, Delivereds):
            told += [("delivered", tuple(msg_id), m.to) for msg_id in m.msg_ids]
        elif isinstance(m, Delivered):
            told.append(("delivered", tuple(m.msg_id), m.to))
        elif isinstance(m, Deliver):
            told.append(("deliver", m.server_msg_id, tuple(m.msg_id), m.sender, m.text, m.sent_ms))
        elif isinstance(m, Fail):
            told.append(("fail", tuple(m.msg_id), m.reason))
        elif isinstance(m, Presence):
            told.append(("presence", m.user, m.online))
    return told


def scenario(world: SeamWorld) -> dict[str, list[tuple[Any, ...]]]:
    """Messages to an online user, to one who logged out (kept, handed over
    at the next login, receipted), retries of a committed message (the same
    ACCEPT, from the store's dedup keys) and a reused id (FAIL): what every
    client was told."""
    alice, bob = world.login("alice"), world.login("bob")
    carol = world.login("carol")
    carol.send(Logout())
    world.run_until(lambda: not any(s.user.name == "carol" for s in world.relay.sessions.values()),
                    100, "carol logged out")  # fmt: skip
    for seq in (1, 2, 3):
        world.send(alice, "bob", f"hello bob {seq}", seq)
    for seq in (4, 5):
        world.send(alice, "carol", f"hello carol {seq}", seq)
    world.run_until(lambda: len(flat(alice.messages)) >= 6, 200, "alice's accepts and receipts")
    # Retries of committed ids: the relay asks the store (off the loop).
    world.send(alice, "bob", "hello bob 2", 2)
    world.send(alice, "bob", "not what message 2 said", 3)
    world.run_until(lambda: any(m[0] == "fail" for m in flat(alice.messages)), 200, "the FAIL")
    carol_again = world.login("carol")
    world.run_until(lambda: sum(m[0] == "delivered" for m in flat(alice.messages)) >= 5, 300,
                    "carol's receipts")  # fmt: skip
    for _ in range(20):
        world.step()
    return {
        "alice": flat(alice.messages), "bob": flat(bob.messages),
        "carol": flat(carol_again.messages),
    }  # fmt: skip


def test_the_same_scenario_has_the_same_outcome_on_every_store(store: MessageStore) -> None:
    """Each store gives the relay what it expects: messages are numbered
    and accepted once, a logged-out user's messages wait and come at the
    next login, receipts reach the sender, a retry of a committed message
    gets its ACCEPT again and a reused id a FAIL."""
    told = scenario(SeamWorld(store))
    alice = told["alice"]
    accepts = sorted({m for m in alice if m[0] == "accept"})
    assert accepts == [("accept", (77, seq), seq) for seq in (1, 2, 3, 4, 5)]
    assert ("fail", (77, 3), ErrorCode.DUPLICATE_ID) in alice
    # The retry of message 2 was accepted again (not numbered anew).
    assert [m for m in alice if m[0] == "accept" and m[1] == (77, 2)] == [
        ("accept", (77, 2), 2), ("accept", (77, 2), 2)
    ]  # fmt: skip
    delivered = sorted(m for m in alice if m[0] == "delivered")
    assert delivered == [("delivered", (77, s), "bob") for s in (1, 2, 3)] + [
        ("delivered", (77, s), "carol") for s in (4, 5)
    ]
    ms = int(WALL * 1000)
    assert [m for m in told["bob"] if m[0] == "deliver"] == [
        ("deliver", s, (77, s), "alice", f"hello bob {s}", ms) for s in (1, 2, 3)
    ]
    assert [m for m in told["carol"] if m[0] == "deliver"] == [
        ("deliver", s, (77, s), "alice", f"hello carol {s}", ms) for s in (4, 5)
    ]


def test_memory_and_sqlite_stores_tell_every_client_exactly_the_same(tmp_path: Path) -> None:
    """The whole transcript, not only what the other test checks: the
    memory store is the disk's stand-in, message for message (in the order
    each kind came; only the interleaving differs, as the disk's commits
    take their time)."""
    memory = scenario(SeamWorld(MemoryStore()))
    disk = ServerStore(tmp_path / "data")
    disk.start()
    try:
        on_disk = scenario(SeamWorld(disk))
    finally:
        disk.close()
    for name in ("alice", "bob", "carol"):
        for kind in ("accept", "delivered", "deliver", "fail", "presence"):
            assert [m for m in memory[name] if m[0] == kind] == [
                m for m in on_disk[name] if m[0] == kind
            ], (name, kind)
        assert sorted(memory[name], key=repr) == sorted(on_disk[name], key=repr)
    assert len(memory["alice"]) > 10


def test_without_a_data_directory_a_message_to_an_offline_user_waits() -> None:
    """A relay built without a store gets a `MemoryStore`: an offline user's
    messages are kept and handed over at the login, as on the disk (the old
    in-memory mode refused them with `user_offline`)."""
    world = World()
    assert isinstance(world.relay.store, MemoryStore)
    alice = world.login("alice")
    world.login("bob").send(Logout())
    world.run_until(lambda: len(world.relay.sessions) == 1, 100, "bob logged out")
    alice.send(Send(MsgId(5, 1), "bob", "while you were away"), conversation_stream("bob"))
    world.run_until(lambda: bool(alice.of(Accept)), 100, "the ACCEPT")
    assert not alice.of(Fail)
    bob = world.login("bob")
    world.run_until(lambda: bool(bob.of(Deliver)), 100, "the message at bob's login")
    assert [d.text for d in bob.of(Deliver)] == ["while you were away"]


class DeferredStore(MemoryStore):
    """A `MemoryStore` whose operations complete only at `commit()`, like a
    slow disk: what the relay submitted is recorded, and nothing is read
    inside `submit`."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[Op] = []
        self._held: list[tuple[Op, Callable[[], None] | None]] = []
        self._done: list[Callable[[], None]] = []

    def submit(self, op: Op, then: Callable[[], None] | None = None) -> None:
        self.submitted.append(op)
        self._held.append((op, then))

    def commit(self) -> None:
        held, self._held = self._held, []
        for op, then in held:
            super().submit(op, None)
            if then is not None:
                self._done.append(then)

    def completed(self) -> list[Callable[[], None]]:
        done, self._done = self._done, []
        return done


def test_a_retry_is_looked_up_through_the_store_and_answered_at_its_completion() -> None:
    """No disk read on the loop: a SEND whose id may be a committed one is
    a `Read(FindDedup)` submitted to the store, and the ACCEPT comes only
    when the store completes it (`store_done(now)`)."""
    store = DeferredStore()
    world = SeamWorld(store)
    alice, _ = world.login("alice"), world.login("bob")
    world.send(alice, "bob", "once", 1)
    world.step()
    assert not alice.of(Accept)  # the ACCEPT waits for the commit
    # The session's first message: its instance has no high-water mark in
    # memory yet, so the store is asked first whether it is a retry; then
    # it is stored, and the ACCEPT follows that commit.
    assert FindDedup("alice", 77, 1) in [op.query for op in store.submitted if isinstance(op, Read)]
    for _ in range(2):
        store.commit()
        world.relay.store_done(world.now)
        world.step()
    assert [a.server_msg_id for a in alice.of(Accept)] == [1]
    first = len(store.submitted)
    world.send(alice, "bob", "once", 1)  # the same message again: its client retried
    world.step()
    reads = [op.query for op in store.submitted[first:] if isinstance(op, Read)]
    assert FindDedup("alice", 77, 1) in reads
    assert len(alice.of(Accept)) == 1  # nothing until the store answers
    store.commit()
    world.relay.store_done(world.now)
    world.step()
    assert [a.server_msg_id for a in alice.of(Accept)] == [1, 1]
    assert sum(isinstance(op, StoreMessage) for op in store.submitted) == 1


# --- the aioquic-shaped API ---------------------------------------------------------


def test_inputs_return_nothing_and_output_comes_only_from_datagrams_to_send() -> None:
    relay = Relay(server_config(None))
    addr = ("192.0.2.40", 4000)
    now = 1000.0
    assert relay.get_timer() is None
    hello = ScriptedLogin("alice", PASSWORD, 1, now).hello
    assert relay.receive_datagram(hello, addr, now) is None  # type: ignore[func-returns-value]
    assert relay.store_done(now) is None  # type: ignore[func-returns-value]
    assert relay.key_exchange_done(now) is None  # type: ignore[func-returns-value]
    assert relay.handle_timer(now) is None  # type: ignore[func-returns-value]
    out = relay.datagrams_to_send(now)
    assert [to for _, to in out] == [addr] and isinstance(preauth_frame(out[0][0]), Challenge)
    assert relay.datagrams_to_send(now) == []  # handed out once
    batch = [(ScriptedLogin(n, PASSWORD, 1, now).hello, addr) for n in ("bob", "carol")]
    assert relay.receive_datagrams(batch, now) is None  # type: ignore[func-returns-value]
    assert len(relay.datagrams_to_send(now)) == 2


def test_get_timer_says_when_handle_timer_is_due() -> None:
    """A session schedules the relay's timer; `handle_timer` before it is
    due changes nothing, at it the session's silence ends the session."""
    world = World(session_timeout=30.0)
    world.login("alice")
    relay = world.relay
    timer = relay.get_timer()
    assert timer is not None and timer > world.now
    relay.handle_timer(timer - 0.001)
    assert relay.datagrams_to_send(timer - 0.001) == [] and relay.sessions
    expiry = world.now + 31
    while (timer := relay.get_timer()) is not None and timer <= expiry:
        relay.handle_timer(timer)
        relay.datagrams_to_send(timer)
    assert not relay.sessions and relay.get_timer() is None


# --- the router ----------------------------------------------------------------------


def test_the_local_router_answers_here_or_nowhere() -> None:
    world = World()
    router = world.relay.router
    assert isinstance(router, LocalRouter)
    alice = world.login("alice")
    user = world.relay.users["alice"]
    session: Session = world.session_of(alice)
    assert router.locate(user) is session
    alice.send(Logout())
    world.run_until(lambda: not world.relay.sessions, 100, "alice logged out")
    assert router.locate(user) is None
    # Unbinding a session that is no longer the route changes nothing.
    again = world.login("alice")
    router.unbind(user, session, world.now)
    assert router.locate(user) is world.session_of(again)


class ElsewhereRouter(LocalRouter):
    """One user is logged in on another node of a cluster."""

    def __init__(self, remote: str, node: str) -> None:
        self.remote, self.node = remote, node

    def locate(self, user: User) -> Route:
        if user.key == self.remote:
            return self.node
        return super().locate(user)


def test_a_message_to_a_user_on_another_node_is_accepted_and_kept_not_delivered_here() -> None:
    """The router says bob is on node-2: alice's message is accepted and
    kept in the store for that node, nothing is sent to a session here, and
    alice is told bob is online."""
    store = MemoryStore()
    router = ElsewhereRouter("bob", "node-2")
    world = SeamWorld(store, router)
    alice = world.login("alice")
    bob = world.login("bob")  # bound here too: the router still points elsewhere
    world.send(alice, "bob", "to the other node", 1)
    world.run_until(lambda: bool(alice.of(Accept)), 100, "the ACCEPT")
    for _ in range(10):
        world.step()
    assert not bob.of(Deliver)
    assert [m.text for m in store.mail["bob"].values()] == ["to the other node"]
    assert world.relay.stats["routed_elsewhere"] == 1
    assert Presence("bob", True) in alice.of(Presence)


def test_a_routed_session_takes_over_an_older_one() -> None:
    """`_open_session` asks the router for the old session: a second login
    of the same user from another client ends the first one."""
    world = World()
    first = world.login("alice")
    old: Session = world.session_of(first)
    second = world.login("alice")
    assert old.session_id not in world.relay.sessions
    assert world.relay.router.locate(world.relay.users["alice"]) is world.session_of(second)


# --- key exchanges ---------------------------------------------------------------------


def test_key_exchanges_are_bounded_and_come_back_on_the_loop() -> None:
    """Requests beyond the limit are refused (the relay answers busy); the
    pool's results come back through `completed()` with their tags; a
    broken pool's request is computed there, on the loop."""
    pool = HeldExecutor()
    woken: list[bool] = []
    exchanges: KeyExchanges[str] = KeyExchanges(pool, lambda: woken.append(True), limit=2)
    private, peer = 12345, dh_public(678)
    assert exchanges.deferred
    assert exchanges.request((private, peer), "first") and exchanges.request((private, peer), "b")
    assert not exchanges.request((private, peer), "over the limit")
    assert exchanges.completed() == []
    pool.release()
    assert woken and sorted(exchanges.completed()) == [
        ("b", dh_secret(private, peer)), ("first", dh_secret(private, peer))
    ]  # fmt: skip
    assert exchanges.waiting == 0 and exchanges.pooled == 2
    broken: KeyExchanges[int] = KeyExchanges(HeldExecutor(broken=True))
    assert broken.request((private, peer), 7)
    assert broken.completed() == [(7, dh_secret(private, peer))] and broken.pooled == 0
    assert not KeyExchanges[int](None).deferred


def test_a_registration_waits_for_key_exchange_done() -> None:
    """The relay hands the request over and gives the verdict when called
    back with `key_exchange_done(now)`, on the loop."""
    pool = HeldExecutor()
    relay = Relay(server_config(None), unwrapper=pool)
    addr, now = ("192.0.2.41", 4000), 1000.0
    relay.receive_datagram(register(relay, "dora", PASSWORD, addr, now), addr, now)
    assert relay.datagrams_to_send(now) == [] and relay.key_exchanges.waiting == 1
    pool.release()
    assert not relay.sessions  # not until the completion is called
    relay.key_exchange_done(now)
    assert [s.user.name for s in relay.sessions.values()] == ["dora"]
    assert any(isinstance(preauth_frame(d), Welcome) for d, _ in relay.datagrams_to_send(now))


def test_memory_store_loads_empty_and_keeps_nothing_between_relays() -> None:
    loaded = MemoryStore().load()
    assert isinstance(loaded, Loaded) and loaded.next_msg_id == 1 and not loaded.accounts
    assert MemoryStore().load().secret != loaded.secret
