"""A group copy at a steady rate, the last datagram (issue 14, seventh
session, steady2).

After tests/test_steady_copy.py a copy into a member at a steady 10 msg/s
was two datagrams: the copy out and the member's receipt in (carrying its
ack of the copy); the server's ack of the receipt rode on the next copy.
Now the server sends group entries with `lazy_ack` (chat_server
`_send_group`), so its timers let a member's ack of a datagram of group
entries alone come up to `reliability.RECEIPT_ACK_DELAY` late; the member's
client acks such a datagram that late (`client_core.group_entries_only`)
and holds its group receipts up to `GROUP_RECEIPT_HOLD`, or until its ack
leaves (the second datagram has it sent), so that the receipts and the ack
of two copies leave in one datagram (since lean, tests/test_steady_lean.py:
the chat client acks such datagrams up to `GROUP_ACK_DELAY` late or at the
third, three copies a datagram; the `Connection` tests here keep the rule
of the receipts' `RECEIPT_ACK_DELAY`, which clients of before use). Proved
here, on fake clocks:

- `ClientCore` members of a real group on a `Relay` (`Net`): at 10 msg/s a
  member sends one datagram per two copies, nothing resent; the relay's
  copies are sent for a late ack; a flat-out burst's receipts are not held
  (`GROUP_RECEIPT_BATCH`); a direct DELIVER's ack is as prompt as before;
- `Connection`, two sides: the server does not resend a copy while the
  member legitimately holds its ack; a lost copy is resent (later by the
  difference) and taken once; a lost receipt (with the ack it carried) is
  resent and both sides recover; anything but group entries in a datagram
  keeps the 25 ms ack.
"""

from __future__ import annotations

from typing import Any

import pytest

import chat_server
from client_core import (
    GROUP_RECEIPT_BATCH,
    GROUP_RECEIPT_DELAY,
    GROUP_RECEIPT_HOLD,
    GroupReceipts,
    MessageReceived,
    group_entries_only,
)
from protocol import (
    Deliver,
    GroupAction,
    GroupBatch,
    GroupEvent,
    Kind,
    Message,
    MsgId,
    Ping,
    Receipt,
    Stream,
    decode_packet,
    encode_message,
)
from reliability import MAX_ACK_DELAY, RECEIPT_ACK_DELAY, Connection, PayloadReceived
from tests.test_client_core import Net
from tests.test_fanout_batch import ReceiptsSeen, entry
from tests.test_groups_client import login, push

SID = bytes(range(16))
KEY = b"k" * 32
T0 = 1000.0


def pair(rto_min: float) -> tuple[Connection, Connection]:
    """A member's side and the server's side of one hop."""
    return (Connection(SID, KEY, T0, rto_min=rto_min),
            Connection(SID, KEY, T0, rto_min=rto_min))  # fmt: skip


def member_takes(member: Connection, datagram: bytes, now: float) -> bool:
    """The member takes a server datagram by the chat client's rule."""
    return member.receive_datagram(datagram, now, group_entries_only)


def server_takes(server: Connection, datagram: bytes, now: float) -> bool:
    """The server takes a member's datagram by the relay's rule."""
    packet = decode_packet(datagram, KEY)
    return server.receive_packet(packet, now, lazy_ack=chat_server._receipts_only(packet.frames))


def warm(member: Connection, server: Connection, now: float) -> float:
    """A round trip each way, so both sides have an RTT sample of ~1 ms."""
    member.send(b"hello", 0)
    (d,) = member.datagrams_to_send(now)
    server_takes(server, d, now + 0.0005)
    server.send(b"welcome", 0)
    (back,) = server.datagrams_to_send(now + 0.0005)
    member.receive_datagram(back, now + 0.001)
    (ack,) = member.datagrams_to_send(now + 0.001 + MAX_ACK_DELAY)
    server.receive_datagram(ack, now + 0.0015 + MAX_ACK_DELAY)
    member.take_events()
    server.take_events()
    return now + 0.1


def copy(seq: int = 1) -> bytes:
    return encode_message(entry(seq))


def received(conn: Connection) -> list[bytes]:
    return [e.payload for e in conn.take_events() if isinstance(e, PayloadReceived)]


# --- what a member acks late ---------------------------------------------------------


def test_only_datagrams_of_whole_group_entries_are_acked_late() -> None:
    member, server = pair(0.2)
    now = warm(member, server, T0)
    direct = Deliver(77, MsgId(5, 1), "alice", "hi", 7)
    event = GroupEvent(902, 2, "team", 1, "alice", ("carol",), 7)
    cases: list[tuple[list[Message], float]] = [
        ([entry(1)], RECEIPT_ACK_DELAY),
        ([GroupBatch((entry(2), entry(3)))], RECEIPT_ACK_DELAY),
        ([event], RECEIPT_ACK_DELAY),
        ([direct], MAX_ACK_DELAY),  # a direct DELIVER: the prompt ack
        ([entry(4), direct], MAX_ACK_DELAY),  # anything else beside the entries
        ([Receipt(9)], MAX_ACK_DELAY),  # not a kind the server sends lazily
    ]
    for messages, delay in cases:
        for message in messages:
            server.send(encode_message(message), 3)
        (d,) = server.datagrams_to_send(now)
        assert member_takes(member, d, now)
        assert member.ack_due == pytest.approx(now + delay), messages
        assert member.datagrams_to_send(now + delay - 0.001) == []
        (ack,) = member.datagrams_to_send(now + delay)
        assert member.ack_due is None
        server.receive_datagram(ack, now + delay)
        now += 1.0
    # A keepalive beside the entries, or an entry in fragments: not late.
    whole = Stream(1, 3, 0, 0, 1, copy(1))
    assert group_entries_only((whole,))
    assert not group_entries_only((whole, Ping()))
    assert not group_entries_only((Stream(1, 3, 0, 0, 2, copy(1)[:10]),))
    assert not group_entries_only(())


# --- one hop: the server's timers, loss ------------------------------------------------


def test_the_server_does_not_resend_a_copy_while_the_member_holds_its_ack() -> None:
    """With a 50 ms RTO floor (the loopback tests') a copy sent for a prompt
    ack is resent at ~50 ms; sent as the relay sends group entries, the
    server waits out the member's RECEIPT_ACK_DELAY, and the ack that then
    comes is taken without a resend or a bloated RTT."""
    member, server = pair(0.05)
    now = warm(member, server, T0)
    server.send(copy(), 3, lazy_ack=True)
    (d,) = server.datagrams_to_send(now)
    assert member_takes(member, d, now + 0.0005)
    assert member.ack_due == pytest.approx(now + 0.0005 + RECEIPT_ACK_DELAY)
    t = now
    while t < now + 0.0005 + RECEIPT_ACK_DELAY:  # the member holds its ack
        assert server.datagrams_to_send(t) == [], f"resent at {t - now:.3f} s"
        timer = server.get_timer()
        if timer is not None and timer <= t:
            server.handle_timer(t)
        t += 0.001
    (ack,) = member.datagrams_to_send(t)
    server.receive_datagram(ack, t + 0.0005)
    assert server.unacked == 0 and server.chunks_resent == 0
    assert server.srtt is not None and server.srtt < 0.01


def test_a_lost_copy_is_resent_and_taken_once() -> None:
    member, server = pair(0.2)
    now = warm(member, server, T0)
    server.send(copy(1), 3, lazy_ack=True)
    server.datagrams_to_send(now)  # lost
    timer = server.get_timer()
    assert timer is not None
    # Later than a prompt ack's RTO by the member's longer hold, no more.
    assert timer >= now + 0.2 + RECEIPT_ACK_DELAY - MAX_ACK_DELAY - 0.001
    assert timer <= now + 0.2 + RECEIPT_ACK_DELAY
    server.handle_timer(timer)
    (again,) = server.datagrams_to_send(timer)
    assert server.chunks_resent == 1
    assert member_takes(member, again, timer + 0.0005)
    assert received(member) == [copy(1)]
    # The member's receipt carries the ack; the server's next copy its ack.
    member.send(encode_message(Receipt(901)), 0, lazy_ack=True)
    (receipt,) = member.datagrams_to_send(timer + 0.1)
    assert server_takes(server, receipt, timer + 0.1005)
    assert server.unacked == 0
    assert [p[:1] for p in received(server)] == [encode_message(Receipt(901))[:1]]


def test_a_lost_receipt_and_the_ack_it_carried_are_both_recovered() -> None:
    """The member's receipt carried its ack of the copy: lost, both sides
    time out (each counting the other's late ack), resend, and each takes
    the other's payload once."""
    member, server = pair(0.2)
    now = warm(member, server, T0)
    server.send(copy(1), 3, lazy_ack=True)
    (d,) = server.datagrams_to_send(now)
    assert member_takes(member, d, now + 0.0005)
    assert received(member) == [copy(1)]
    member.send(encode_message(Receipt(901)), 0, lazy_ack=True)
    (lost,) = member.datagrams_to_send(now + 0.1)
    assert member.ack_due is None  # the ack went with it
    t = now + 0.1
    got_receipt: list[bytes] = []
    while (member.unacked or server.unacked) and t < now + 3.0:
        for conn in (member, server):
            timer = conn.get_timer()
            if timer is not None and timer <= t:
                conn.handle_timer(t)
        for datagram in server.datagrams_to_send(t):
            member_takes(member, datagram, t + 0.0005)
        for datagram in member.datagrams_to_send(t):
            server_takes(server, datagram, t + 0.0005)
        got_receipt += received(server)
        assert received(member) == [], "the copy again is not handed on twice"
        t += 0.001
    assert member.unacked == 0 and server.unacked == 0
    assert got_receipt == [encode_message(Receipt(901))]
    assert member.chunks_resent >= 1
    assert lost  # (it never reached the server)


# --- the chat client and the relay -------------------------------------------------------


def pump_fine(net: Net, seconds: float, step: float = 0.001) -> None:
    end = net.now + seconds
    while net.now < end:
        net.pump()
        net.now += step


def team(net: Net, *members: str) -> tuple[Any, list[Any]]:
    """alice and `members` logged in, alice's group "team" of them made."""
    alice, *others = login(net, "alice", *members)
    alice.core.group_request(GroupAction.CREATE, "team", tuple(members))
    pump_fine(net, 1.0, 0.01)
    return alice, others


def test_at_10_msg_s_a_member_sends_one_datagram_per_three_copies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = Net()
    alice, (bob, carol) = team(net, "bob", "carol")
    sent_by: dict[Any, int] = {}
    receive = net.relay.receive_datagram

    def counting(data: bytes, addr: Any, now: float) -> None:
        sent_by[addr] = sent_by.get(addr, 0) + 1
        receive(data, addr, now)

    monkeypatch.setattr(net.relay, "receive_datagram", counting)
    member_addr = {c.core.username: a for a, c in net.clients.items()}
    lazy_seen = False
    for n in range(20):
        alice.core.send(f"steady {n}", net.now, to="#team")
        for _ in range(100):  # 100 ms in 1 ms steps
            net.pump()
            net.now += 0.001
            conn = bob.core.conn
            assert conn is not None
            due = conn.ack_due
            lazy_seen = lazy_seen or (due is not None and due > net.now + MAX_ACK_DELAY)
    pump_fine(net, 0.5)
    for member in (bob, carol):
        texts = [e.text for e in member.of(MessageReceived)]
        assert texts == [f"steady {n}" for n in range(20)]
        conn = member.core.conn
        assert conn is not None and conn.unacked == 0 and conn.chunks_resent == 0
        # The code before: a receipt datagram per copy (20); then one per two
        # (9-12); now one per three (lean: GROUP_ACK_DELAY, GROUP_ACK_EVERY).
        datagrams = sent_by[member_addr[member.core.username]]
        assert 6 <= datagrams <= 8, datagrams
    assert lazy_seen, "bob held an ack of a copy past the 25 ms"
    for session in net.relay.sessions.values():
        assert session.conn.chunks_resent == 0


def test_the_relay_sends_group_entries_for_a_late_ack() -> None:
    net = Net()
    alice, (bob,) = team(net, "bob")
    session = next(s for s in net.relay.sessions.values() if s.user.name == "bob")
    alice.core.send("one", net.now, to="#team")
    for _ in range(200):
        net.pump()
        if any(c.late for c in session.conn._inflight.values()):
            break
        net.now += 0.0005
    assert any(c.late for c in session.conn._inflight.values()), "the copy is for a late ack"


def test_a_flat_out_bursts_receipts_are_not_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """GROUP_RECEIPT_BATCH entries shown: their receipts leave at once, not
    after GROUP_RECEIPT_DELAY (the code before) or GROUP_RECEIPT_HOLD."""
    held = GroupReceipts()
    for i in range(GROUP_RECEIPT_BATCH - 1):
        held.add(i, 10.0)
    assert not held.ready(10.0, None)
    held.add(GROUP_RECEIPT_BATCH, 10.0)
    assert held.ready(10.0, None)
    net = Net()
    seen = ReceiptsSeen(net.relay, monkeypatch)
    (bob,) = login(net, "bob")
    net.settle(1.0)
    start = net.now
    push(net, "bob", *(entry(seq) for seq in range(1, GROUP_RECEIPT_BATCH + 1)))
    while not seen.of("bob"):
        net.pump()
        net.now += 0.0005
        assert net.now - start < GROUP_RECEIPT_HOLD
    assert net.now - start < GROUP_RECEIPT_DELAY / 2
    assert sum(len(ids) for ids in seen.of("bob")) == GROUP_RECEIPT_BATCH


def test_a_direct_delivers_ack_is_still_prompt() -> None:
    net = Net()
    alice, bob = login(net, "alice", "bob")
    net.settle(1.0)
    conn = bob.core.conn
    assert conn is not None
    alice.core.send("direct", net.now, "bob")
    while not bob.of(MessageReceived):
        net.pump()
        net.now += 0.0005
    # Its receipt leaves at once with the ack; nothing is owed after 25 ms.
    pump_fine(net, MAX_ACK_DELAY + 0.002, 0.0005)
    assert conn.ack_due is None


def test_a_group_entry_with_a_direct_deliver_keeps_the_prompt_ack() -> None:
    """bob gets a group entry (held receipt) and a direct DELIVER in one
    datagram: acked within 25 ms, not RECEIPT_ACK_DELAY."""
    net = Net()
    alice, bob = login(net, "alice", "bob")
    net.settle(1.0)
    conn = bob.core.conn
    assert conn is not None
    push(net, "bob", entry(1), Deliver(77, MsgId(5, 1), "alice", "hi", 7))
    (together,) = [d for d, addr in net.relay.datagrams_to_send(net.now) if addr == bob.addr]
    kinds = [f.data[0] for f in decode_packet(together, conn.peer_key).frames
             if isinstance(f, Stream)]  # fmt: skip
    assert sorted(kinds) == sorted([Kind.GROUP_DELIVER, Kind.DELIVER])
    bob.core.receive_datagram(together, net.now)
    assert conn.ack_due is not None and conn.ack_due <= net.now + MAX_ACK_DELAY
