"""Partial messages expire (issue 12's review, finding F1). A session that
starts long messages and never finishes them held the shared reassembly
budget for as long as it stayed logged in (no reassembly timeout), so
everyone's long messages waited. Now a partial message that takes no
fragment for REASSEMBLY_TIMEOUT s (30 s, docs/RELIABILITY.md 1.1) is dropped
and its room given back. Its fragments were acked, so the sender would never
send them again: the relay ends the session, and the client logs in again
and resends its outbox under the same ids. Tested on `Connection` and the
sans-IO `Relay` with a fake clock."""

from __future__ import annotations

from collections.abc import Callable

from client_core import MessageReceived, MessageState
from protocol import (
    FLAG_MAC,
    Accept,
    Accepts,
    Deliver,
    MsgId,
    Packet,
    ProtocolError,
    Send,
    Stream,
    UnknownSession,
    conversation_stream,
    decode_header,
    decode_packet,
)
from reliability import (
    MAX_ROOM,
    REASSEMBLY_TIMEOUT,
    Connection,
    PayloadReceived,
    ReassemblyExpired,
    ReceiveBudget,
)
from tests.test_bounds import Client, World
from tests.test_client_core import Net

KEY = b"k" * 32


def fragments(count: int, indexes: range, stream: int = 1) -> list[Stream]:
    """Fragments `indexes` of a message of `count` (1000 bytes each) that
    starts the stream."""
    return [Stream(n, stream, n, n, count, bytes([n]) * 1000) for n in indexes]


def feed(conn: Connection, frames: list[Stream], now: float) -> None:
    for frame in frames:
        conn.next_pkt += 1  # a fresh packet number each (the receive side does not care)
        assert conn.receive_packet(Packet(conn.session_id, conn.next_pkt, (frame,)), now)


def expired(conn: Connection) -> list[ReassemblyExpired]:
    return [e for e in conn.take_events() if isinstance(e, ReassemblyExpired)]


# --- F1: on one connection ----------------------------------------------------------------


def test_a_stalled_partial_message_expires_and_gives_its_room_back() -> None:
    """40 of 60 fragments, then nothing: the message reserved its room in
    the shared budget. Each new fragment puts its expiry off; 30 s after the
    last one it is dropped, its room is free, and the owner hears of it.
    (The old code held it until the session ended.) Its late fragments are
    taken and delivered to nothing: the sender resends the message whole."""
    budget = ReceiveBudget(2 * MAX_ROOM)
    conn = Connection(b"s" * 16, KEY, 0.0, budget=budget)
    feed(conn, fragments(60, range(40)), 0.0)
    feed(conn, fragments(60, range(40, 41)), 20.0)  # progress at 20 s
    assert conn.buffered == 41_000 and budget.used >= 41_000
    conn.take_events()
    timer = conn.get_timer()
    assert timer is not None and timer <= 20.0 + REASSEMBLY_TIMEOUT
    conn.handle_timer(20.0 + REASSEMBLY_TIMEOUT - 0.001)
    assert not expired(conn) and conn.buffered == 41_000
    conn.handle_timer(20.0 + REASSEMBLY_TIMEOUT)
    assert expired(conn) == [ReassemblyExpired(1)]
    assert conn.buffered == 0 and budget.used == 0 and budget.loose == 0
    timer = conn.get_timer()  # no expiry is due any more (its ack may be)
    assert timer is None or timer < 20.0 + REASSEMBLY_TIMEOUT
    # The rest comes late: taken (acked), but no message is made of it.
    feed(conn, fragments(60, range(41, 60)), 60.0)
    assert not [e for e in conn.take_events() if isinstance(e, PayloadReceived)]
    assert conn.buffered == 0 and budget.used == 0
    # The stream goes on: the next message on it arrives whole.
    feed(conn, [Stream(60, 1, 60, 0, 1, b"next")], 61.0)
    assert conn.take_events() == [PayloadReceived(1, b"next")]


def test_fragments_held_behind_a_gap_count_as_progress() -> None:
    """A slow sender on a lossy link: fragment 10 is lost, 11-19 come and
    wait behind the gap. They are progress: the message expires 30 s after
    the last of them, not after fragment 9; and once the gap fills in time,
    it arrives whole."""
    budget = ReceiveBudget(2 * MAX_ROOM)
    conn = Connection(b"s" * 16, KEY, 0.0, budget=budget)
    feed(conn, fragments(20, range(10)), 0.0)
    feed(conn, fragments(20, range(11, 20)), 25.0)
    conn.handle_timer(REASSEMBLY_TIMEOUT + 10.0)
    assert not expired(conn)
    feed(conn, fragments(20, range(10, 11)), 50.0)  # the gap, resent after 50 s
    whole = [e.payload for e in conn.take_events() if isinstance(e, PayloadReceived)]
    assert whole == [b"".join(bytes([n]) * 1000 for n in range(20))]
    assert budget.used == 0 and conn.get_timer() is not None  # (its ack is due)


# --- F1: on the relay -----------------------------------------------------------------------


def accepted_ids(client: Client) -> list[MsgId]:
    """The ids of the client's messages the relay accepted, in order."""
    ids: list[MsgId] = []
    for message in client.messages:
        if isinstance(message, Accept):
            ids.append(message.msg_id)
        elif isinstance(message, Accepts):
            ids.extend(msg_id for msg_id, _ in message.items)
    return ids


def accepted(world: World, name: str) -> list[MsgId]:
    return accepted_ids(world.clients[name])


def test_sessions_holding_partial_messages_do_not_starve_a_long_message() -> None:
    """The review's attack, scaled down: six sessions start 60 KB messages
    and never send their last fragments (pinging to stay alive), filling a
    1 MiB reassembly budget. An honest 5 KB message waits for room; once
    the attackers' partial messages are 30 s without progress they expire,
    their room is given back and the honest message is accepted. (The old
    relay kept it waiting for as long as the attackers stayed.)"""
    world = World(max_reassembly=4 * MAX_ROOM)
    world.login("bob")
    alice = world.login("alice")
    attackers = [world.login(f"mallory{i}") for i in range(6)]
    for attacker in attackers:
        attacker.keep = lambda f: f.count == 1 or f.index < f.count - 1
        for k in range(4):
            to = f"nobody{k}"
            attacker.send(Send(MsgId(9, k + 1), to, "f" * 60_000), conversation_stream(to))
    start = world.now
    for _ in range(200):
        world.step(0.05)
    cap = 4 * MAX_ROOM
    assert world.relay.reassembly_bytes > cap - MAX_ROOM  # full: no room for a long message
    alice.send(Send(MsgId(7, 1), "bob", "L" * 5000), conversation_stream("bob"))
    pinged = world.now
    while world.now < start + REASSEMBLY_TIMEOUT / 2:
        world.step(0.05)
        if world.now - pinged > 5:  # the attackers' keepalives
            pinged = world.now
            for attacker in attackers:
                attacker.conn.send_ping()
    assert not accepted(world, "alice")  # still waiting for room
    world.run_until(lambda: bool(accepted(world, "alice")), 4000, "the long message accepted")
    # Within the attackers' 30 s and some of alice's backed-off retransmissions.
    assert world.now - start < REASSEMBLY_TIMEOUT + 2 * 32 + 10
    assert accepted(world, "alice") == [MsgId(7, 1)]
    # The attackers that held room lost it with their sessions.
    assert world.relay.stats["reassembly_expired"] >= 1
    assert world.relay.reassembly_bytes < cap - MAX_ROOM
    deliver = world.clients["bob"].of(Deliver)
    assert [d.text for d in deliver] == ["L" * 5000]


def test_an_expired_message_is_resent_whole_after_login_and_accepted_once() -> None:
    """The relay's side of a stalled honest message: its fragment 2 is lost
    for 40 s, and a short message follows on the same stream. After 30 s
    without progress the relay ends the session and says so at once
    (UNKNOWN_SESSION); nothing behind the stalled message was taken. The
    client logs in again and sends both again under the same ids: each is
    accepted once, in order."""
    world = World()
    bob = world.login("bob")
    alice = world.login("alice")
    first = world.now

    def keep(frame: Stream) -> bool:
        return not (frame.count > 1 and frame.index == 2 and world.now < first + 40)

    alice.keep = keep
    long_send = Send(MsgId(7, 1), "bob", "L" * 5000)
    short_send = Send(MsgId(7, 2), "bob", "after it")
    for send in (long_send, short_send):
        alice.send(send, conversation_stream("bob"))
    session_id = alice.conn.session_id
    hints: list[UnknownSession] = []
    to_clients = world._to_clients

    def watch(out: list[tuple[bytes, tuple[str, int]]]) -> None:
        for data, addr in out:
            if addr == alice.addr and not decode_header(data).flags & FLAG_MAC:
                hints.extend(f for f in decode_packet(data).frames if isinstance(f, UnknownSession))
        to_clients(out)

    world._to_clients = watch  # type: ignore[method-assign]
    world.run_until(lambda: session_id not in world.relay.sessions, 5000, "the session ended")
    assert REASSEMBLY_TIMEOUT <= world.now - first < REASSEMBLY_TIMEOUT + 5
    assert world.relay.stats["reassembly_expired"] == 1
    assert hints  # UNKNOWN_SESSION, at once: the client need not wait for a retransmission
    assert not accepted_ids(alice) and not bob.of(Deliver)
    world.run_until(lambda: world.now >= first + 40, 5000, "the loss is over")
    again = world.login("alice")
    for send in (long_send, short_send):
        again.send(send, conversation_stream("bob"))
    world.run_until(lambda: len(bob.of(Deliver)) == 2, 5000, "both delivered")
    assert accepted_ids(again) == [MsgId(7, 1), MsgId(7, 2)]
    assert [d.text for d in bob.of(Deliver)] == ["L" * 5000, "after it"]


def test_a_client_on_a_lossy_link_gets_a_long_message_through_in_order() -> None:
    """The whole story with the real client: alice's long message loses its
    fragment 2 for 45 s, a short one follows. The relay drops the stalled
    message and ends the session (or alice's client gives the link up
    first); either way she logs in again and resends her outbox. Bob gets
    each message once, in order; alice sees both delivered."""
    net = Net()
    alice, bob = net.login("alice", "bob")
    start = net.now
    relay_receive = net.relay.receive_datagram

    def lossy(data: bytes, addr: tuple[str, int], now: float) -> None:
        conn = alice.core.conn
        if addr == alice.addr and conn is not None and now < start + 45:
            try:
                packet = decode_packet(data, conn.key)
            except ProtocolError:
                packet = None
            if packet is not None and any(
                isinstance(f, Stream) and f.count > 1 and f.index == 2 for f in packet.frames
            ):
                return
        relay_receive(data, addr, now)

    net.relay.receive_datagram = lossy  # type: ignore[method-assign]
    long_id = alice.core.send("L" * 5000, net.now, to="bob")
    short_id = alice.core.send("after it", net.now, to="bob")

    def delivered(msg_id: str) -> Callable[[], bool]:
        return lambda: MessageState.DELIVERED in alice.states(msg_id)

    net.run(lambda: delivered(long_id)() and delivered(short_id)(), "both delivered", 300)
    assert net.now - start >= 45  # it did wait out the loss
    assert [m.text for m in bob.of(MessageReceived)] == ["L" * 5000, "after it"]


def test_a_client_whose_incoming_long_message_stalls_logs_in_again() -> None:
    """The client's side: a long message from the relay to bob loses its
    fragment 2 for 45 s. Bob's connection drops the stalled message after
    30 s (its fragments were acked) and his client logs in again; the relay
    offers what he has not receipted once more: he gets it once."""
    net = Net()
    alice, bob = net.login("alice", "bob")
    start = net.now
    bob_receive = bob.core.receive_datagram

    def lossy(data: bytes, now: float) -> None:
        conn = bob.core.conn
        if conn is not None and now < start + 45:
            try:
                packet = decode_packet(data, conn.peer_key)
            except ProtocolError:
                packet = None
            if packet is not None and any(
                isinstance(f, Stream) and f.count > 1 and f.index == 2 for f in packet.frames
            ):
                return
        bob_receive(data, now)

    bob.core.receive_datagram = lossy  # type: ignore[method-assign]
    conn = bob.core.conn
    msg = alice.core.send("L" * 5000, net.now, to="bob")
    net.run(lambda: MessageState.DELIVERED in alice.states(msg), "delivered", 300)
    assert bob.core.conn is not conn  # he logged in again
    assert [m.text for m in bob.of(MessageReceived)] == ["L" * 5000]
