"""Memory caps (issue 12, docs/RELIABILITY.md 1.4), on the sans-IO `Relay` with a
fake clock: a session's unacknowledged output, WHO/WATCH/TYPING against the
rate limits, typing notices per pair, reassembly across all sessions, and the
whole server's memory budget. Over each cap the server withholds acks and
loses nothing: what waited is taken once the client drains. One test runs
the real loop, for the memory sampling, and one the command line."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from chat_server import SHORT_OF_MEMORY, Relay, build_parser
from protocol import (
    CONTROL_STREAM,
    MAX_FRAMES_SIZE,
    Accept,
    Ack,
    Deliver,
    Delivered,
    ErrorCode,
    Logout,
    Message,
    MsgId,
    Notice,
    Packet,
    Presence,
    Receipt,
    Receipts,
    Send,
    Stream,
    Typing,
    Watch,
    Welcome,
    Who,
    WhoReply,
    conversation_stream,
    decode_message,
    decode_packet,
    encode_message,
    encode_packet,
    unbatch,
)
from reliability import (
    MAX_ROOM,
    STREAM_OVERHEAD,
    Connection,
    PayloadReceived,
    ReceiveBudget,
    charge_all,
)
from tests.clients import ScriptedLogin, preauth_frame, wait_until
from tests.conftest import PASSWORD, start_server, stop_server
from tests.conftest import test_config as server_config

Address = tuple[str, int]
STEP = 0.01  # seconds of fake time per step


@dataclass
class Client:
    """One logged-in client of the in-memory world: its own Connection, and
    every message the server sent it. With `acks` False, the ACK frames are
    cut from everything it sends: a client that never acknowledges."""

    name: str
    addr: Address
    conn: Connection
    acks: bool = True
    keep: Callable[[Stream], bool] = lambda frame: True  # which chunks leave at all
    messages: list[Message] = field(default_factory=list)

    def send(self, message: Message, stream: int = CONTROL_STREAM) -> None:
        # Receipts as the chat client sends them (`ClientCore._queue_receipts`):
        # the server may ack a datagram of them alone late (RECEIPT_ACK_DELAY).
        lazy = isinstance(message, Receipt | Receipts)
        self.conn.send(encode_message(message), stream, lazy_ack=lazy)

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.messages if isinstance(m, kind)]


class World:
    """A relay with clients logged in by hand, and a fake clock."""

    def __init__(self, **overrides: Any) -> None:
        self.relay = Relay(server_config(None, **overrides))
        self.now = 1000.0
        self.clients: dict[str, Client] = {}
        self._by_addr: dict[Address, Client] = {}
        self.session_output: list[int] = []  # after every datagram: see `watch_output`
        self.watched: bytes | None = None

    def login(self, name: str) -> Client:
        addr = (f"198.51.100.{len(self.clients) + 1}", 5000)
        login = ScriptedLogin(name, PASSWORD, 9, self.now)
        login.take(
            [d for d, _ in self.relay.handle_datagram(login.hello, addr, self.now)], self.now
        )
        out = self.relay.handle_datagram(login.request, addr, self.now)
        assert isinstance(login.take([d for d, _ in out], self.now), Welcome), login.answer
        conn = login.conn
        assert conn is not None
        client = self.clients[name] = self._by_addr[addr] = Client(name, addr, conn)
        # What the session sent beside its WELCOME (its login ticket) is the
        # first chunk of its control stream: without it the rest would wait.
        self._to_clients([(d, a) for d, a in out if preauth_frame(d) is None])
        self.step()
        return client

    def session_of(self, client: Client) -> Any:
        return self.relay.sessions[client.conn.session_id]

    def watch_output(self, client: Client) -> None:
        """Record the relay's unacknowledged output to `client` after every
        datagram the relay takes from anyone."""
        self.watched = client.conn.session_id

    def _to_relay(self, client: Client, data: bytes) -> None:
        if not client.acks or client.keep is not Client.keep:
            packet = decode_packet(data, client.conn.key)
            frames = tuple(
                f for f in packet.frames
                if not (isinstance(f, Ack) and not client.acks)
                and not (isinstance(f, Stream) and not client.keep(f))
            )  # fmt: skip
            if not frames:
                return
            data = encode_packet(Packet(packet.session_id, packet.pkt_num, frames), client.conn.key)
        self.relay.receive_datagram(data, client.addr, self.now)
        if self.watched is not None and self.watched in self.relay.sessions:
            self.session_output.append(self.relay.sessions[self.watched].conn.unacked_bytes)

    def _to_clients(self, out: list[tuple[bytes, Address]]) -> None:
        for data, addr in out:
            client = self._by_addr.get(addr)
            if client is None or not client.conn.receive_datagram(data, self.now):
                continue
            for event in client.conn.take_events():
                if isinstance(event, PayloadReceived):
                    for message in unbatch(decode_message(event.payload)):
                        client.messages.append(message)
                        if isinstance(message, Deliver):  # a client shows it, then receipts it
                            client.send(Receipt(message.server_msg_id))

    def step(self, dt: float = STEP) -> None:
        """Every client sends what is due, the relay answers, time moves on."""
        for client in list(self.clients.values()):
            timer = client.conn.get_timer()
            if timer is not None and timer <= self.now:
                client.conn.handle_timer(self.now)
            for data in client.conn.datagrams_to_send(self.now):
                self._to_relay(client, data)
        self._to_clients(self.relay.datagrams_to_send(self.now))
        self.relay.handle_timer(self.now)
        self._to_clients(self.relay.datagrams_to_send(self.now))
        self.now += dt

    def run_until(self, condition: Callable[[], bool], steps: int, what: str) -> None:
        for _ in range(steps):
            if condition():
                return
            self.step()
        assert condition(), f"not after {steps} steps: {what}"


def replies_per_datagram(request: bytes, reply: bytes) -> int:
    """The most reply bytes one datagram of `request`s can ask for: the
    output cap is checked per datagram, so it can be passed by this much."""
    return MAX_FRAMES_SIZE // (STREAM_OVERHEAD + len(request)) * len(reply)


# --- a session's unacknowledged output --------------------------------------------


def test_a_session_flooding_who_without_acking_cannot_grow_its_output() -> None:
    """The issue's attack: WHO after WHO, never an ack (2.3 GiB in 15 s).
    The relay's output to that session stays at the cap (plus the replies
    to the one datagram that crossed it); its requests wait, and once it
    acks, every one of them is answered: nothing was lost."""
    cap = 8 * 1024
    world = World(max_unacked_output=cap)
    world.login("alice")
    mallory = world.login("mallory")
    mallory.acks = False
    world.watch_output(mallory)
    requests = 3000
    for _ in range(requests):
        mallory.send(Who())
    for _ in range(300):
        world.step()
    reply = encode_message(WhoReply(("alice", "mallory"), ""))
    bound = cap + replies_per_datagram(encode_message(Who()), reply)
    assert requests * len(reply) > 4 * bound  # the old code's output, far over
    assert max(world.session_output) <= bound
    assert world.relay.stats["withheld_output"] > 0
    answered = len(mallory.of(WhoReply))
    assert answered < requests // 2, answered  # the rest wait for acks

    mallory.acks = True
    world.run_until(lambda: len(mallory.of(WhoReply)) == requests, 5000, "every WHO answered")
    assert len(mallory.of(WhoReply)) == requests
    assert world.session_of(mallory).conn.unacked_bytes <= bound


def test_a_send_while_over_the_output_cap_waits_and_is_accepted_after_the_drain() -> None:
    world = World(max_unacked_output=4 * 1024)
    bob = world.login("bob")
    mallory = world.login("mallory")
    mallory.acks = False
    for _ in range(1000):
        mallory.send(Who())
    world.run_until(lambda: world.relay.stats["withheld_output"] > 0, 500, "over the cap")
    send = Send(MsgId(7, 1), "bob", "sent while over the cap")
    mallory.send(send, conversation_stream("bob"))
    for _ in range(200):
        world.step()
    assert not mallory.of(Accept) and not bob.of(Deliver)
    assert world.relay.stats["messages"] == 0  # not taken: its chunk was not acked
    assert world.relay.users["bob"].mailbox_count == 0

    mallory.acks = True
    world.run_until(lambda: bool(mallory.of(Accept)), 5000, "the ACCEPT")
    assert [a.msg_id for a in mallory.of(Accept)] == [send.msg_id]
    world.run_until(lambda: bool(bob.of(Deliver)), 500, "the delivery")
    assert [d.text for d in bob.of(Deliver)] == [send.text]
    assert len(mallory.of(WhoReply)) == 1000


def test_receipts_and_a_logout_pass_the_output_cap() -> None:
    """They make no output for the session (a receipt's DELIVERED goes to
    its sender): over the cap they are still taken, so output can only
    fall, and a client can leave (unless a request waits ahead of them:
    the control stream is in order)."""
    cap = 256
    world = World(max_unacked_output=cap)
    bob = world.login("bob")
    mallory = world.login("mallory")
    mallory.acks = False
    for _ in range(30):
        mallory.send(Who())
    world.step()
    assert world.session_of(mallory).conn.unacked_bytes >= cap
    bob.send(Send(MsgId(8, 1), "mallory", "for mallory"), conversation_stream("mallory"))
    world.run_until(lambda: bool(bob.of(Delivered)), 100, "mallory's receipt")
    assert world.session_of(mallory).conn.unacked_bytes >= cap
    mallory.send(Logout())
    world.run_until(lambda: mallory.conn.session_id not in world.relay.sessions, 100, "logout")


# --- rate limits ---------------------------------------------------------------------


def test_who_and_watch_count_against_the_message_rate_limit() -> None:
    world = World(user_msg_rate=5.0, user_msg_burst=10.0)
    world.login("bob")
    alice = world.login("alice")
    for _ in range(15):  # one a datagram, all at the same instant
        alice.send(Who())
        world.step(dt=0.0)
        alice.send(Watch("bob"))
        world.step(dt=0.0)
    replies = alice.of(WhoReply) + alice.of(Presence)
    assert len(replies) == 10  # the burst; the old code answered all 30 at once
    notices = alice.of(Notice)
    assert [n.code for n in notices] == [ErrorCode.RATE_LIMITED]
    # The rest were withheld, not dropped: they come at the refill rate.
    world.run_until(lambda: len(alice.of(WhoReply)) == 15, 2000, "every WHO answered")
    # Presence is state: a WATCH while one PRESENCE of bob is unacked is
    # folded into the next one (the latest state), so every WATCH was taken
    # when it was sent or folded, and alice ends knowing bob is online.
    relay = world.relay
    world.run_until(
        lambda: len(alice.of(Presence)) + relay.stats["presence_coalesced"] >= 15, 200,
        "every WATCH answered",
    )  # fmt: skip
    world.run_until(lambda: not world.session_of(alice).presence_due, 200, "presence sent")
    assert alice.of(Presence)[-1] == Presence("bob", True)


def test_typing_notices_are_limited_to_three_a_second_per_pair() -> None:
    world = World()
    alice = world.login("alice")
    bob = world.login("bob")
    carol = world.login("carol")
    alice.send(Watch("bob"))  # typing goes only to those who have alice as a contact
    alice.send(Watch("carol"))
    world.step()
    for burst in range(2):
        for _ in range(20):
            alice.send(Typing("bob"))
            alice.send(Typing("carol"))
        for _ in range(5):
            world.step(dt=0.0)
        assert len(bob.of(Typing)) == 3 * (burst + 1)  # per pair: carol's do not count
        assert len(carol.of(Typing)) == 3 * (burst + 1)
        world.now += 1.0
    assert world.relay.stats["typing_dropped"] == 2 * 2 * 17


def test_typing_notices_to_a_client_over_its_output_cap_are_dropped() -> None:
    world = World(max_unacked_output=2 * 1024)
    alice = world.login("alice")
    mallory = world.login("mallory")
    alice.send(Watch("mallory"))
    world.step()
    mallory.acks = False
    for _ in range(1000):
        mallory.send(Who())
    world.run_until(lambda: world.relay.stats["withheld_output"] > 0, 500, "over the cap")
    before = world.session_of(mallory).conn.unacked_bytes
    for _ in range(50):
        alice.send(Typing("mallory"))
        world.step()
        world.now += 1.0  # under the per-pair rate: only the cap drops them
    assert world.session_of(mallory).conn.unacked_bytes == before
    assert world.relay.stats["typing_dropped"] == 50


# --- reassembly ----------------------------------------------------------------------


def fragments(count: int, stop: int, stream: int = 1, size: int = 1000) -> list[Stream]:
    """The first `stop` fragments of a message of `count` on a new stream."""
    return [Stream(n, stream, n, n, count, bytes([n]) * size) for n in range(stop)]


def feed(conn: Connection, frames: list[Stream]) -> None:
    for frame in frames:
        conn.next_pkt += 1  # a fresh packet number each (the receive side does not care)
        conn.receive_packet(Packet(conn.session_id, conn.next_pkt, (frame,)), 1.0)


def test_partial_messages_are_capped_in_total_across_connections() -> None:
    """Each connection keeps its own 256 KiB; together they keep the shared
    budget. A message's first fragment reserves room for all of it, so one
    started always finishes; what does not fit is not taken (not acked:
    resent later), and fragments that came before their first fragment take
    at most half the budget."""
    room = charge_all(fragments(60, 1)[0])
    budget = ReceiveBudget(2 * room + room // 2)
    key = b"k" * 32
    conns = [Connection(bytes([i]) * 16, key, 0.0, budget=budget) for i in range(8)]
    for conn in conns:
        feed(conn, fragments(60, 40))  # 40 of 60, the rest to come
        assert sum(c.buffered for c in conns) <= budget.used <= budget.limit
        assert budget.loose <= budget.limit // 2
    held = [c.buffered for c in conns]
    assert held[:2] == [40_000, 40_000] and held[3:] == [0] * 5  # the old code: all 8
    # The third's first fragment did not fit: some of the rest wait, loose.
    assert 0 < held[2] == budget.loose and budget.used == 2 * room + budget.loose
    # Out-of-order chunks count while they wait: refused now.
    feed(conns[3], [Stream(0, 5, 1, 0, 1, b"z" * 1000)])
    assert conns[3].buffered == 0
    # A whole message next in order is never held: always taken.
    feed(conns[3], [Stream(0, 2, 0, 0, 1, b"hi")])
    assert PayloadReceived(2, b"hi") in conns[3].take_events()
    # A message started finishes even with the budget full, and frees its room.
    feed(conns[1], [Stream(n, 1, n, n, 60, bytes([n]) * 1000) for n in range(40, 60)])
    whole = [e for e in conns[1].take_events() if isinstance(e, PayloadReceived)]
    assert [len(e.payload) for e in whole] == [60_000]
    assert conns[1].buffered == 0 and budget.used == room + budget.loose
    # The third's first fragment is taken now; its early fragments move into its room.
    feed(conns[2], fragments(60, 1))
    assert budget.loose == 0 and budget.used == 2 * room
    feed(conns[2], [Stream(n, 1, n, n, 60, bytes([n]) * 1000) for n in range(1, 60)])
    whole = [e for e in conns[2].take_events() if isinstance(e, PayloadReceived)]
    assert [len(e.payload) for e in whole] == [60_000]
    assert budget.used == room
    # A session that ends gives its room back.
    conns[0].close()
    assert budget.used == 0


def test_the_relay_caps_reassembly_across_sessions_and_every_long_message_arrives() -> None:
    """Six 60 KB messages at once with room for two: they take turns (the
    old code held all six; a cap without reservations could leave six
    halves waiting for room for ever)."""
    cap = 2 * MAX_ROOM  # the least it can be
    world = World(max_reassembly=cap)
    bob = world.login("bob")
    senders = [world.login(f"sender{i}") for i in range(6)]
    text = "y" * 60_000
    for i, sender in enumerate(senders):
        sender.send(Send(MsgId(7, i + 1), "bob", text), conversation_stream("bob"))
    held: list[int] = []
    for _ in range(3000):
        world.step()
        held.append(world.relay.reassembly_bytes)
        if len(bob.of(Deliver)) == len(senders):
            break
    assert sorted(d.sender for d in bob.of(Deliver)) == [s.name for s in senders]
    assert {d.text for d in bob.of(Deliver)} == {text}
    assert 0 < max(held) <= cap
    assert world.relay.reassembly_bytes == 0


def test_a_session_that_ends_gives_its_reassembly_room_back() -> None:
    world = World()
    world.login("bob")
    mallory = world.login("mallory")
    # Every fragment but the last one leaves: the message never completes.
    mallory.keep = lambda f: f.count == 1 or f.index < f.count - 1
    mallory.send(Send(MsgId(7, 1), "bob", "y" * 40_000), conversation_stream("bob"))
    for _ in range(100):
        world.step()
    assert world.relay.reassembly_bytes > 40_000
    mallory.send(Logout())
    world.run_until(lambda: not world.relay.sessions.get(mallory.conn.session_id), 100, "logout")
    assert world.relay.reassembly_bytes == 0


# --- the whole server's memory ---------------------------------------------------------


def test_over_max_memory_sends_wait_and_are_accepted_once_it_falls() -> None:
    world = World(max_memory=100 * 1024 * 1024)
    bob = world.login("bob")
    alice = world.login("alice")
    world.relay.set_memory(150 * 1024 * 1024, world.now)
    assert world.relay.short_of_memory
    send = Send(MsgId(7, 1), "bob", "while the server is short of memory")
    alice.send(send, conversation_stream("bob"))
    for _ in range(50):
        world.step()
    alice.send(Who())  # everything but new messages still flows
    for _ in range(50):
        world.step()
    assert not alice.of(Accept) and world.relay.stats["messages"] == 0
    assert len(alice.of(WhoReply)) == 1
    assert [n.message for n in alice.of(Notice)] == [SHORT_OF_MEMORY]  # at most once a second
    assert world.relay.stats["withheld_memory"] > 1
    world.relay.set_memory(90 * 1024 * 1024, world.now)
    assert not world.relay.short_of_memory
    world.run_until(lambda: bool(bob.of(Deliver)), 500, "the delivery")
    assert [d.text for d in bob.of(Deliver)] == [send.text]
    assert [a.msg_id for a in alice.of(Accept)] == [send.msg_id]


def test_the_server_loop_samples_its_memory() -> None:
    """The real loop reads the resident memory and tells the relay: with a
    budget of 1 MiB, any Python process is over it."""
    running = start_server(server_config(None, max_memory=1024 * 1024))
    try:
        wait_until(lambda: running.relay.short_of_memory, 5.0, "the relay to hear of memory")
        assert running.relay.stats["resident_bytes"] > 1024 * 1024
    finally:
        stop_server(running)


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "lots"])
def test_max_memory_must_be_a_positive_number_of_mib(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--max-memory", value])
    assert exited.value.code == 2
    assert "--max-memory" in capsys.readouterr().err
    assert build_parser().parse_args([]).max_memory == 512
    assert build_parser().parse_args(["--max-memory", "64"]).max_memory == 64


def sender_plan(rng: random.Random, chunks: int, malformed: float) -> list[Stream]:
    """What a sender would send on one stream: messages of 1 to 64
    fragments, with a `malformed` share of fragments given a wrong index or
    count."""
    frames: list[Stream] = []
    while len(frames) < chunks:
        count = rng.choice([1, 1, 2, 3, 8, 20, 64])
        for index in range(count):
            seq = len(frames)
            data = bytes([seq % 256]) * rng.randrange(1, 1100)
            if rng.random() < malformed:
                wrong = rng.choice([1, 2, 3, 8, 20, 64])
                frames.append(Stream(seq, 1, seq, rng.randrange(wrong), wrong, data))
            else:
                frames.append(Stream(seq, 1, seq, index, count, data))
    return frames


@pytest.mark.parametrize("seed", range(12))
def test_the_reassembly_budget_never_counts_less_than_is_held(seed: int) -> None:
    """Six senders into connections sharing a budget that holds two of the
    longest messages: chunks mostly in order, some early, and for half the
    seeds some malformed. The budget stays under its limit, never below
    what is held, and comes back to zero when they close; well-formed
    senders all get everything through (nothing waits for room for ever)."""
    rng = random.Random(seed)
    budget = ReceiveBudget(2 * MAX_ROOM)  # the least it can be: two of the longest messages
    conns = [Connection(bytes([i]) * 16, b"k" * 32, 0.0, budget=budget) for i in range(6)]
    well_formed = seed < 6
    plans = [sender_plan(rng, 400, 0.0 if well_formed else 0.03) for _ in conns]

    una = [0] * len(conns)  # the first chunk each has not taken
    for _ in range(40_000 if well_formed else 5_000):
        open_ = [i for i in range(len(conns)) if una[i] < len(plans[i])]
        if not open_:
            break
        i = rng.choice(open_)
        seq = una[i] + rng.choice([0, 0, 1, 3, 10, 30, 60, 100])  # many come early
        if seq < len(plans[i]):
            feed(conns[i], [plans[i][seq]])
        conns[i].take_events()
        while conns[i].seen(una[i]):
            una[i] += 1
        assert sum(c.buffered for c in conns) <= budget.used <= budget.limit
    if well_formed:
        assert una == [len(plan) for plan in plans]
        assert budget.used == budget.loose == 0
    for conn in conns:
        conn.close()
    assert budget.used == budget.loose == 0


def test_a_first_fragment_next_in_order_is_taken_with_four_early_ones_held() -> None:
    """Four fragmented messages whose first fragments came before the one
    next in order (the sender's first datagram was lost): the one next in
    order is still taken. Before, it was refused for good (at most 4
    partial messages, counting the early ones), and the stream stalled."""
    conn = Connection(b"s" * 16, b"k" * 32, 0.0)
    early = [Stream(2 * n, 1, 2 * n, 0, 2, b"h") for n in range(1, 5)]
    feed(conn, early)
    feed(conn, [Stream(0, 1, 0, 0, 2, b"a"), Stream(1, 1, 1, 1, 2, b"b")])
    assert PayloadReceived(1, b"ab") in conn.take_events()
    feed(conn, [Stream(2 * n + 1, 1, 2 * n + 1, 1, 2, b"t") for n in range(1, 5)])
    assert [e for e in conn.take_events() if isinstance(e, PayloadReceived)] == [
        PayloadReceived(1, b"ht")
    ] * 4
