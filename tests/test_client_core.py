"""`client_core.ClientCore` against the real `Relay`, in memory: no socket,
no thread, a fake clock. Client behaviour that was only tested through
sockets (login outcomes, take-over, mailbox full, WHO paging, presence,
reconnection) is tested here in milliseconds; the socket driver around the
core (`ChatSession`) keeps its loopback tests elsewhere.

`Net` is the pump of issue 13's contract: every datagram each side has, to
the other; then every timer that is due; `now` moves on only when nothing
moved. A test may drop what one address sends or receives (an outage)."""

from __future__ import annotations

import ast
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chat_client import ChatSession
from chat_server import Relay, ServerConfig
from client_core import (
    LINK_TIMEOUT,
    ClientCore,
    ClientError,
    Disconnected,
    ErrorEvent,
    Event,
    LinkChanged,
    LoggedIn,
    MemoryStore,
    MessageReceived,
    MessageState,
    PresenceChanged,
    StatusChanged,
    TypingNotice,
    WhoList,
)
from protocol import ErrorCode

ROOT = Path(__file__).resolve().parent.parent
Address = tuple[str, int]


class Client:
    """A core plus its front end's part: it reads every event and (unless
    told not to) reports each received message shown, as a window would."""

    def __init__(self, core: ClientCore, addr: Address) -> None:
        self.core = core
        self.addr = addr
        self.events: list[Event] = []
        self.shows = True
        self.unshown: list[MessageReceived] = []

    def take_events(self) -> bool:
        got = False
        while (event := self.core.next_event()) is not None:
            got = True
            self.events.append(event)
            if isinstance(event, MessageReceived):
                if self.shows:
                    self.core.shown(event.id)
                else:
                    self.unshown.append(event)
        return got

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def states(self, msg_id: str) -> list[str]:
        return [e.state for e in self.of(StatusChanged) if e.id == msg_id]

    def json(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.events]

    @property
    def logged_in(self) -> bool:
        return bool(self.of(LoggedIn))


class Net:
    """The relay and its clients on a fake clock, pumped as the contract does."""

    def __init__(self, config: ServerConfig | None = None, now: float = 1000.0) -> None:
        self.now = now
        self.config = config or ServerConfig(iterations=4096, key_workers=0)
        self.relay = Relay(self.config, wall_clock=lambda: 1_700_000_000.0 + self.now)
        self.clients: dict[Address, Client] = {}
        self.cut: set[Address] = set()  # addresses whose datagrams are lost both ways
        self.rng = random.Random(13)

    def add(self, name: str, password: str = "pw-of-test", **kwargs: Any) -> Client:
        """A client whose front end reports what it shows (as ChatSession's do)."""
        kwargs.setdefault("rng", random.Random(len(self.clients)))
        kwargs.setdefault("wait_for_shown", True)
        core = ClientCore(name, password, **kwargs)
        addr = (f"10.0.0.{len(self.clients) + 1}", 40000 + len(self.clients))
        client = self.clients[addr] = Client(core, addr)
        core.connect(self.now)
        return client

    def pump(self) -> bool:
        moved = False
        for addr, client in list(self.clients.items()):
            for datagram in client.core.datagrams_to_send(self.now):
                moved = True
                if addr not in self.cut:
                    self.relay.receive_datagram(datagram, addr, self.now)
        for datagram, addr in self.relay.datagrams_to_send(self.now):
            moved = True
            if addr not in self.cut and addr in self.clients:
                self.clients[addr].core.receive_datagram(datagram, self.now)
        timers: list[Any] = [self.relay] + [c.core for c in self.clients.values()]
        for x in timers:
            timer = x.get_timer()
            if timer is not None and timer <= self.now:
                x.handle_timer(self.now)
        for client in self.clients.values():
            moved = client.take_events() or moved
        return moved

    def run(self, condition: Callable[[], bool], what: str, limit: float = 600.0) -> None:
        """Pump until `condition()`; `now` advances by small steps (up to
        the next timer) only when nothing moved; fail after `limit` fake seconds."""
        start = self.now
        for _ in range(100_000):
            if condition():
                return
            if not self.pump():
                self.now += 0.05
            if self.now - start > limit:
                break
        raise AssertionError(f"{what}: not reached in {limit} fake seconds")

    def settle(self, seconds: float) -> None:
        """Let `seconds` of fake time pass, pumping."""
        end = self.now + seconds
        while self.now < end:
            if not self.pump():
                self.now += 0.05

    def login(self, *names: str, **kwargs: Any) -> list[Client]:
        clients = [self.add(name, f"{name}-pw", **kwargs) for name in names]
        self.run(lambda: all(c.logged_in for c in clients), f"{names} logged in")
        return clients


def delivered(client: Client, msg_id: str) -> Callable[[], bool]:
    return lambda: MessageState.DELIVERED in client.states(msg_id)


# --- the contract ---------------------------------------------------------------


def test_issue_13_contract_to_delivered() -> None:
    """Issue 13's contract, pumped exactly as it is written: cores with
    their defaults, so bob's `next_event()` is his front end's read of the
    message (its receipt follows; `ChatSession` waits for `shown` instead)."""
    relay = Relay(ServerConfig(iterations=4096, key_workers=0))  # no data_dir: memory
    alice = ClientCore("alice", "alice-pw", connect_to="bob")
    bob = ClientCore("bob", "bob-pw")
    peers = {("10.0.0.1", 40001): alice, ("10.0.0.2", 40002): bob}
    now = 1000.0
    alice.connect(now)
    bob.connect(now)
    events: dict[str, list[Event]] = {"alice": [], "bob": []}
    cores = {"alice": alice, "bob": bob}

    def pump() -> bool:
        moved = False
        for addr, c in peers.items():
            for d in c.datagrams_to_send(now):
                relay.receive_datagram(d, addr, now)
                moved = True
        for d, addr in relay.datagrams_to_send(now):
            peers[addr].receive_datagram(d, now)
            moved = True
        for x in (relay, alice, bob):
            t = x.get_timer()
            if t is not None and t <= now:
                x.handle_timer(now)
        return moved

    def pump_until(condition: Callable[[], bool], read: tuple[str, ...]) -> None:
        nonlocal now
        for _ in range(2000):
            for name in read:
                while (event := cores[name].next_event()) is not None:
                    events[name].append(event)
            if condition():
                return
            if not pump():
                now += 0.05
        raise AssertionError(f"not reached; events {events}")

    def logged_in(name: str) -> bool:
        return any(e.to_json()["event"] == "logged_in" for e in events[name])

    pump_until(lambda: logged_in("alice") and logged_in("bob"), ("alice", "bob"))
    msg_id = alice.send("hi bob", now)
    assert isinstance(msg_id, str)
    message: list[Event] = []

    def bob_has_it() -> bool:
        pump()
        while (event := bob.next_event()) is not None:
            message.append(event)
        return any(isinstance(e, MessageReceived) for e in message)

    pump_until(bob_has_it, ("alice",))
    (received,) = [e.to_json() for e in message if isinstance(e, MessageReceived)]
    assert {k: received[k] for k in ("event", "from", "text")} == {
        "event": "message", "from": "alice", "text": "hi bob"
    }  # fmt: skip
    delivered_json = {"event": "status", "id": msg_id, "state": "delivered"}
    pump_until(lambda: delivered_json in [e.to_json() for e in events["alice"]], ("alice",))
    assert alice.next_event() is None and bob.next_event() is None


def test_by_default_a_message_read_with_next_event_counts_as_shown() -> None:
    """Without `wait_for_shown` the receipt follows `next_event()`; with it
    (`ChatSession`'s way), only `shown(id)`."""
    net = Net()
    reader = net.add("bob", "bob-pw", wait_for_shown=False)
    (alice,) = net.login("alice")
    net.run(lambda: reader.logged_in, "bob logged in")
    reader.shows = False  # the test's front end never calls shown(): the core does
    msg = alice.core.send("read is shown", net.now, to="bob")
    net.run(delivered(alice, msg), "delivered")
    assert [m.text for m in reader.unshown] == ["read is shown"]


def test_client_core_imports_no_io() -> None:
    """The core reads no clock and opens no socket, thread, selector or
    database: its imports say so."""
    tree = ast.parse((ROOT / "client_core.py").read_text("utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    forbidden = {"socket", "threading", "time", "select", "selectors", "sqlite3"}
    assert not imported & forbidden, imported & forbidden
    # Nor through the project's modules that do I/O.
    assert not imported & {"chat_client", "client_store", "server_store", "client_window"}


def test_events_json_is_todays_json_line() -> None:
    """`to_json()` gives exactly the `--json` line of before (what
    `chat_client.event_to_json` built), a state as its plain string."""
    cases: list[tuple[Event, str]] = [
        (LoggedIn("alice"), '{"event": "logged_in", "user": "alice"}'),
        (MessageReceived("bob", "hi", 7, 123, "ab-1"),
         '{"event": "message", "from": "bob", "text": "hi", "id": 7, "sent_ms": 123}'),
        (StatusChanged("ab-1", MessageState.SENDING, "bob", "hi"),
         '{"event": "status", "id": "ab-1", "state": "sending", "to": "bob", "text": "hi"}'),
        (StatusChanged("ab-1", MessageState.ACCEPTED, "bob", "hi"),
         '{"event": "status", "id": "ab-1", "state": "accepted"}'),
        (StatusChanged("ab-1", MessageState.FAILED, "bob", "hi", "mailbox_full"),
         '{"event": "status", "id": "ab-1", "state": "failed", "reason": "mailbox_full"}'),
        (PresenceChanged("bob", False), '{"event": "presence", "user": "bob", "online": false}'),
        (WhoList(("a", "b")), '{"event": "who", "users": ["a", "b"]}'),
        (ErrorEvent("too_long", "x", True),
         '{"event": "error", "code": "too_long", "message": "x"}'),
        (LinkChanged(False), '{"event": "link", "state": "down"}'),
        (LinkChanged(True), '{"event": "link", "state": "up"}'),
        (TypingNotice("bob"), '{"event": "typing", "user": "bob"}'),
        (Disconnected("logged_out"), '{"event": "disconnected", "reason": "logged_out"}'),
    ]  # fmt: skip
    for event, line in cases:
        assert json.dumps(event.to_json()) == line
    assert type(StatusChanged("a", MessageState.DELIVERED, "b", "").to_json()["state"]) is str


# --- messages -------------------------------------------------------------------


def test_send_accepted_then_delivered_only_after_shown() -> None:
    net = Net()
    alice, bob = net.login("alice", "bob")
    bob.shows = False  # bob's front end has not shown anything yet
    msg = alice.core.send("hello", net.now, to="bob")
    net.run(lambda: bool(bob.unshown), "bob handed the message")
    net.settle(5.0)
    assert alice.states(msg) == ["sending", "accepted"]  # no receipt before it is shown
    event = bob.unshown[0]
    assert (event.sender, event.text, event.msg_id) == ("alice", "hello", msg)
    bob.core.shown(event.id)
    net.run(delivered(alice, msg), "delivered")
    assert alice.states(msg) == ["sending", "accepted", "delivered"]
    assert all(isinstance(s, MessageState) for s in alice.states(msg))


def test_send_to_peer_and_reply_to_whoever_wrote_last() -> None:
    net = Net()
    alice, bob = net.login("alice", "bob")
    with pytest.raises(ClientError) as caught:
        bob.core.send("hi", net.now)
    assert caught.value.code == ErrorCode.NO_PEER
    alice.core.set_peer("Bob")
    first = alice.core.send("to my peer", net.now)
    net.run(delivered(alice, first), "first delivered")
    assert bob.core.peer == "alice"  # who wrote last
    reply = bob.core.send("back", net.now)
    net.run(delivered(bob, reply), "reply delivered")
    assert [m.text for m in alice.of(MessageReceived)] == ["back"]


def test_invalid_recipient_is_invalid_name_not_too_long() -> None:
    """Issue 13: `send("hi", to="bob!")` reported `too_long` (the code was
    guessed from the exception's text); the name and the text are checked
    apart now, in the core and in the session."""
    core = ClientCore("alice", "pw")
    with pytest.raises(ClientError) as caught:
        core.send("hi", 0.0, to="bob!")
    assert caught.value.code == ErrorCode.INVALID_NAME
    with pytest.raises(ClientError) as caught:
        core.send("x" * 100_000, 0.0, to="bob")
    assert caught.value.code == ErrorCode.TOO_LONG
    session = ChatSession(persist=False)
    try:
        assert session.send("hi", to="bob!") is None
        error = session.events.get_nowait()
        assert isinstance(error, ErrorEvent) and error.code == "invalid_name", error
    finally:
        session.discard()


def test_mailbox_full_fails_the_message_with_its_reason() -> None:
    net = Net(ServerConfig(iterations=4096, key_workers=0, mailbox_messages=3))
    alice, bob = net.login("alice", "bob")
    bob.shows = False  # nothing is receipted: bob's mailbox keeps all of them
    ids = [alice.core.send(f"m{i}", net.now, to="bob") for i in range(4)]
    net.run(lambda: MessageState.FAILED in alice.states(ids[3]), "the fourth failed")
    assert [alice.states(i)[-1] for i in ids[:3]] == ["accepted"] * 3
    assert alice.states(ids[3]) == ["sending", "failed"]
    failed = [e for e in alice.of(StatusChanged) if e.state == MessageState.FAILED]
    assert failed[0].reason == "mailbox_full"
    assert failed[0].to_json()["reason"] == "mailbox_full"
    assert [e.code for e in alice.of(ErrorEvent)] == ["mailbox_full"]


def test_who_pages_come_back_as_one_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three pages (the relay's page made small, so few logins make many)."""
    monkeypatch.setattr("chat_server.WHO_PAGE_MAX", 3)
    names = [f"user{i:03d}" for i in range(3 * 2 + 2)]
    net = Net()
    clients = net.login(*names)
    clients[0].core.who()
    net.run(lambda: bool(clients[0].of(WhoList)), "the WHO list")
    (who,) = clients[0].of(WhoList)
    assert sorted(who.users) == sorted(names)


def test_presence_of_a_watched_user() -> None:
    net = Net()
    (alice,) = net.login("alice")
    (bob,) = net.login("bob")
    alice.core.watch("bob")
    net.run(lambda: bool(alice.of(PresenceChanged)), "bob's presence")
    bob.core.logout(net.now)
    net.run(lambda: len(alice.of(PresenceChanged)) == 2, "bob went offline")
    assert [(p.user, p.online) for p in alice.of(PresenceChanged)] == [
        ("bob", True), ("bob", False)
    ]  # fmt: skip
    assert bob.events[-1] == Disconnected("logged_out") and bob.core.ended


def test_connect_to_watches_the_peer_from_the_first_login() -> None:
    net = Net()
    (bob,) = net.login("bob")
    alice = net.add("alice", "alice-pw", connect_to="bob")
    net.run(lambda: bool(alice.of(PresenceChanged)), "bob's presence")
    assert alice.of(PresenceChanged) == [PresenceChanged("bob", True)]
    assert alice.core.peer == "bob"


# --- login outcomes ------------------------------------------------------------------


def test_bad_password_is_fatal() -> None:
    net = Net()
    (alice,) = net.login("alice")
    alice.core.logout(net.now)
    net.run(lambda: alice.core.ended, "logged out")
    intruder = net.add("alice", "not-the-password")
    net.run(lambda: intruder.core.ended, "refused")
    error, gone = intruder.events
    assert isinstance(error, ErrorEvent) and error.fatal
    assert (error.code, gone) == ("bad_password", Disconnected("bad_password"))
    assert intruder.core.get_timer() is None and intruder.core.datagrams_to_send(net.now) == []


def test_invalid_name_or_no_password_refused_before_anything_is_sent() -> None:
    with pytest.raises(ClientError) as caught:
        ClientCore("no spaces allowed", "pw")
    assert caught.value.code == ErrorCode.INVALID_NAME
    with pytest.raises(ClientError) as caught:
        ClientCore("alice", "")
    assert caught.value.code == ErrorCode.PASSWORD_REQUIRED


def test_no_server_gives_up_after_the_login_timeout() -> None:
    net = Net()
    alice = net.add("alice", server=("10.9.9.9", 5555), login_timeout=5.0)
    net.cut.add(alice.addr)
    start = net.now
    net.run(lambda: alice.core.ended, "gave up", limit=30)
    assert 5.0 <= net.now - start < 6.0
    error, gone = alice.events
    assert isinstance(error, ErrorEvent) and error.fatal
    assert error.message == "server 10.9.9.9:5555 does not answer; is it running?"
    assert gone == Disconnected("server_unreachable")


def test_login_elsewhere_takes_over_the_session() -> None:
    net = Net()
    (first,) = net.login("alice")
    (second,) = net.login("alice")  # another instance, the same password
    net.run(lambda: first.core.ended, "the first told")
    assert [e.code for e in first.of(ErrorEvent)] == ["logged_in_elsewhere"]
    assert first.of(ErrorEvent)[0].fatal
    assert first.events[-1] == Disconnected("logged_in_elsewhere")
    assert not second.core.ended


def test_a_changed_server_key_is_refused() -> None:
    """The key pinned at the first login (in the store) must match later."""
    store = MemoryStore()
    net = Net()
    (alice,) = net.login("alice", store=store)
    assert store.server_key() is not None
    other = Net()  # another server (its data reset): another key
    again = other.add("alice", "alice-pw", store=store)
    other.run(lambda: again.core.ended, "refused")
    assert again.of(ErrorEvent)[0].code == "server_unreachable"
    assert "its key changed" in again.of(ErrorEvent)[0].message


# --- reconnection ------------------------------------------------------------------


def forget_session(relay: Relay, name: str, now: float) -> None:
    """The relay forgets `name`'s session (as after a restart that kept its accounts)."""
    for session in list(relay.sessions.values()):
        if session.user.name == name:
            relay._end_session(session, now, quiet=True)


def test_relogin_after_the_relay_forgets_the_session_keeps_the_outbox() -> None:
    net = Net()
    alice, bob = net.login("alice", "bob")
    forget_session(net.relay, "alice", net.now)
    ids = [alice.core.send(f"after {i}", net.now, to="bob") for i in range(3)]
    net.run(lambda: all(delivered(alice, i)() for i in ids), "all delivered")
    assert [m.text for m in bob.of(MessageReceived)] == ["after 0", "after 1", "after 2"]
    assert alice.of(LinkChanged) == [LinkChanged(False), LinkChanged(True)]
    assert not alice.of(Disconnected) and not bob.of(Disconnected)
    for msg in ids:
        assert alice.states(msg) == ["sending", "accepted", "delivered"]


def test_outage_longer_than_the_link_timeout_then_back() -> None:
    net = Net()
    alice, bob = net.login("alice", "bob")
    net.cut.add(alice.addr)
    msg = alice.core.send("during the outage", net.now, to="bob")
    net.run(lambda: LinkChanged(False) in alice.events, "link down", limit=LINK_TIMEOUT + 30)
    net.settle(40.0)  # re-login attempts back off; the message waits in the outbox
    assert alice.states(msg) == ["sending"]
    net.cut.clear()
    net.run(delivered(alice, msg), "delivered after the outage", limit=120)
    assert alice.events.count(LinkChanged(True)) == 1
    assert [m.text for m in bob.of(MessageReceived)] == ["during the outage"]


def test_outbox_and_unshown_messages_survive_a_restart_of_the_client() -> None:
    """A store given to the next core: what was never accepted is resent
    with its ids; what was committed but never shown is handed on once."""
    net = Net()
    alice_store, bob_store = MemoryStore(), MemoryStore()
    alice = net.add("alice", "alice-pw", store=alice_store)
    bob = net.add("bob", "bob-pw", store=bob_store)
    net.run(lambda: alice.logged_in and bob.logged_in, "logged in")
    bob.shows = False
    shown_later = alice.core.send("shown after the restart", net.now, to="bob")
    net.run(lambda: bool(bob.unshown), "bob got it, never showed it")
    net.cut.add(alice.addr)
    unsent = alice.core.send("never accepted", net.now, to="bob")
    net.settle(1.0)
    # Both processes die: no logout, nothing more sent.
    alice.core.abort()
    bob.core.abort()
    del net.clients[alice.addr], net.clients[bob.addr]
    assert [m for m, _, _ in alice_store.pending()] and unsent.endswith("-2")
    net.cut.clear()
    bob2 = net.add("bob", "bob-pw", store=bob_store)
    net.run(lambda: bob2.logged_in, "bob back")
    alice2 = net.add("alice", "alice-pw", store=alice_store)
    net.run(lambda: delivered(alice2, shown_later)() and delivered(alice2, unsent)(), "both")
    handed = [(m.text, m.msg_id) for m in bob2.of(MessageReceived)]
    assert handed == [("shown after the restart", shown_later), ("never accepted", unsent)]
    assert alice2.core.new_message_id().client_seq == 3  # numbering goes on


# --- the relay's aioquic-shaped loop ------------------------------------------------


def test_relay_timer_output_comes_out_of_datagrams_to_send_once() -> None:
    """A retransmission made by `handle_timer` is handed out by the next
    `datagrams_to_send`, once."""
    net = Net()
    alice, bob = net.login("alice", "bob")
    relay = net.relay
    net.cut.add(bob.addr)
    alice.core.send("lost once", net.now, to="bob")
    for _ in range(5):
        net.pump()
    to_bob: list[bytes] = []
    for _ in range(20):  # timer by timer until the relay resends to bob
        deadline = relay.get_timer()
        assert deadline is not None
        net.now = max(net.now, deadline)
        relay.handle_timer(net.now)
        out = relay.datagrams_to_send(net.now)
        assert relay.datagrams_to_send(net.now) == []  # handed out once
        to_bob = [d for d, a in out if a == bob.addr]
        if to_bob:
            break
    assert to_bob, "the retransmission to bob"


def test_the_login_ticket_is_kept_in_the_store_and_sent_with_the_next_login() -> None:
    """The relay's TICKET (after a login without one) goes into the core's
    store; the next core on that store sends it with its LOGIN."""
    net = Net()
    store = MemoryStore()
    (bob,) = net.login("bob", store=store)
    net.run(lambda: store.ticket() is not None, "the ticket kept")
    assert bob.core.ticket == store.ticket()
    bob.core.logout(net.now)
    net.run(lambda: bob.core.ended, "logged out")
    again = net.add("bob", "bob-pw", store=store)
    net.run(lambda: again.logged_in, "logged in again")
    assert net.relay.stats["logins_with_ticket"] == 1


def test_a_message_id_reused_for_other_content_fails_with_duplicate_id() -> None:
    """A copied store numbering on from the same point (same instance, same
    seq, another text): the relay refuses the second as `duplicate_id`,
    which the core reports as that message's `failed`."""
    net = Net()
    (bob,) = net.login("bob")
    original = net.add("alice", "alice-pw", store=MemoryStore(instance_id=77))
    net.run(lambda: original.logged_in, "alice logged in")
    first = original.core.send("the original", net.now, to="bob")
    net.run(delivered(original, first), "the original delivered")
    original.core.abort()
    del net.clients[original.addr]
    copy = net.add("alice", "alice-pw", store=MemoryStore(instance_id=77))
    net.run(lambda: copy.logged_in, "the copy logged in")
    second = copy.core.send("the copy's own", net.now, to="bob")
    assert second == first  # the same id, for another text
    net.run(lambda: MessageState.FAILED in copy.states(second), "refused")
    assert copy.states(second) == ["sending", "failed"]
    assert [e.reason for e in copy.of(StatusChanged) if e.state == "failed"] == ["duplicate_id"]
    assert [m.text for m in bob.of(MessageReceived)] == ["the original"]


def test_closing_after_the_server_went_away_ends_at_once_with_nothing_to_send() -> None:
    """Not logged in and nothing left to send or receipt: a logout has no
    session to end and nothing to wait for, so it ends at once (it used to
    wait out its whole timeout for a login it did not need: the 9 s teardown
    of three test peers closed after their server). With a message still
    unsent, it waits for the login that carries it."""
    net = Net()
    alice, bob = net.login("alice", "bob")
    net.relay.send_shutdown(net.now)
    net.run(lambda: LinkChanged(False) in alice.events, "alice told of the shutdown")
    alice.core.logout(net.now, timeout=10.0)
    alice.take_events()
    assert alice.core.ended and alice.events[-1] == Disconnected("logged_out")

    net.run(lambda: LinkChanged(False) in bob.events, "bob told of the shutdown")
    msg = bob.core.send("still to go", net.now, to="alice")
    bob.core.logout(net.now, timeout=10.0)
    assert not bob.core.ended  # waits for the login that sends it
    net.run(lambda: bob.core.ended, "bob logged out")
    bob.take_events()
    assert bob.states(msg)[:2] == ["sending", "accepted"]
    assert bob.events[-1] == Disconnected("logged_out")
