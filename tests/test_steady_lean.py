"""The rest of a steady copy's cost at 100 members (issue 14, eighth session, lean).

After steady2 (tests/test_steady_copy2.py) a member acked a datagram of
group entries alone up to `RECEIPT_ACK_DELAY` (150 ms) late, or at once at
the second, and held its group receipts up to 120 ms: at 10 msg/s its ack
and receipts covered two copies a datagram (0.53 datagrams in per copy at
100 members). Now the chat client acks such a datagram up to
`GROUP_ACK_DELAY` (250 ms) late or at once at the third (`GROUP_ACK_EVERY`,
`GROUP_ENTRIES_LATE`) and holds its receipts up to `GROUP_RECEIPT_HOLD`
(220 ms): three copies a datagram. The server's timers for the group
entries it sends count the longer delay (`Connection(peer_late_ack=...)`,
given by the relay at login), in its PTO and in its RTT sample. Receipts
keep their rule in both directions. docs/RELIABILITY.md ("Group entry ack
delay") says what it costs. Proved here, on fake clocks:

- `ClientCore` members of a real group on a `Relay`: one datagram per three
  copies at 10 msg/s (20 copies: 6-8, 9-12 before), nothing resent; the
  sender is told of every member within the hold; the relay's sessions
  count 250 ms in their timers for a lone copy;
- `Connection`, two sides: the third datagram has the ack sent, not the
  second; the server waits out the member's 250 ms without a resend or a
  bloated RTT; a lost copy is resent (later by the difference, no more) and
  taken once; clients of before (150 ms, 25 ms) on the new server, and the
  new client on a server of before at a LAN's round trip, resend nothing;
  receipts (the other direction) keep 150 ms and the second datagram;
- `ServerStore`: a sender's "told" mark (GroupTold) is a lazy write, as a
  cursor move is: it rides on the next commit or goes after LAZY_HOLD (at
  10 msg/s into 100 members one message in three moved it in a commit of
  its own: 1.5 commits per message, now ~1.06); a trim submitted after it
  commits it first, in the same commit. (A kill -9 that loses it: the
  notices are told again and shown once, tests/test_steady_copy.py
  `test_cursor_moves_lost_in_a_kill_are_handed_again_and_shown_once`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from client_core import (
    GROUP_RECEIPT_HOLD,
    MessageReceived,
    MessageState,
    StatusChanged,
    group_entries_only,
)
from protocol import GroupAction, Receipt, encode_message
from reliability import (
    ACK_EVERY,
    GROUP_ACK_DELAY,
    GROUP_ACK_EVERY,
    GROUP_ENTRIES_LATE,
    MAX_ACK_DELAY,
    RECEIPT_ACK_DELAY,
    RECEIPTS_LATE,
    Connection,
    LateAck,
)
from server_store import LAZY_HOLD, GroupReceipt, GroupTold, ServerStore, TrimGroup
from tests.test_client_core import Net
from tests.test_groups_client import login
from tests.test_ordinary_load import FakeClock, wait_for_store
from tests.test_steady_copy2 import copy, received, server_takes, warm

SID = bytes(range(16))
KEY = b"k" * 32
T0 = 1000.0


def pair(rto_min: float, server_late: float = GROUP_ACK_DELAY) -> tuple[Connection, Connection]:
    """A member's side and the server's side of one hop (the server's as the
    relay makes it: its peer acks group entries `server_late` late)."""
    return (Connection(SID, KEY, T0, rto_min=rto_min),
            Connection(SID, KEY, T0, rto_min=rto_min, peer_late_ack=server_late))  # fmt: skip


def member_takes(member: Connection, datagram: bytes, now: float,
                 late: LateAck | None = GROUP_ENTRIES_LATE) -> bool:  # fmt: skip
    """The member takes a server datagram by the chat client's rule (`late`;
    None: a client from before steady2, which acks at MAX_ACK_DELAY)."""
    if late is None:
        return member.receive_datagram(datagram, now)
    return member.receive_datagram(datagram, now, group_entries_only, late)


def hold_through(member: Connection, server: Connection, start: float, until: float) -> None:
    """The member holds its ack from `start` to `until`: the server sends
    nothing (no resend) meanwhile, its timers run as the loop runs them."""
    t = start
    while t < until:
        assert server.datagrams_to_send(t) == [], f"resent at {t - start:.3f} s"
        timer = server.get_timer()
        if timer is not None and timer <= t:
            server.handle_timer(t)
        t += 0.001


# --- one hop -------------------------------------------------------------------------


def test_the_rules_numbers() -> None:
    """Receipts held just under the ack delay (they leave first and carry
    the ack), both over two intervals of 10 msg/s; receipts keep theirs."""
    assert GROUP_ENTRIES_LATE == LateAck(GROUP_ACK_DELAY, GROUP_ACK_EVERY) == (0.25, 3)
    assert RECEIPTS_LATE == LateAck(RECEIPT_ACK_DELAY, ACK_EVERY) == (0.15, 2)
    assert 0.2 < GROUP_RECEIPT_HOLD < GROUP_ACK_DELAY


def test_the_third_datagram_of_group_entries_has_the_ack_sent_not_the_second() -> None:
    member, server = pair(0.2)
    now = warm(member, server, T0)
    for n in range(3):
        server.send(copy(n + 1), 3, lazy_ack=True)
        (d,) = server.datagrams_to_send(now + 0.1 * n)
        assert member_takes(member, d, now + 0.1 * n + 0.0005)
        if n < 2:  # steady2: the second had it sent at once
            assert member.ack_due == pytest.approx(now + 0.0005 + GROUP_ACK_DELAY)
            assert member.datagrams_to_send(now + 0.1 * n + 0.001) == []
    assert member.ack_due == pytest.approx(now + 0.2005)
    (ack,) = member.datagrams_to_send(now + 0.2005)
    server.receive_datagram(ack, now + 0.201)
    assert server.unacked == 0 and server.chunks_resent == 0
    assert received(member) == [copy(1), copy(2), copy(3)]


def test_the_server_waits_out_the_members_hold_without_a_resend_or_a_bloated_rtt() -> None:
    """With a 50 ms RTO floor (the loopback tests') a lone copy would be
    resent at ~50 ms, and at ~175 ms by steady2's allowance: the member
    holds its ack 250 ms, and the ack that then comes is taken without a
    resend, its delay taken off the RTT sample."""
    member, server = pair(0.05)
    now = warm(member, server, T0)
    server.send(copy(), 3, lazy_ack=True)
    (d,) = server.datagrams_to_send(now)
    assert member_takes(member, d, now + 0.0005)
    assert member.ack_due == pytest.approx(now + 0.0005 + GROUP_ACK_DELAY)
    hold_through(member, server, now, now + 0.0005 + GROUP_ACK_DELAY)
    (ack,) = member.datagrams_to_send(now + 0.0005 + GROUP_ACK_DELAY)
    server.receive_datagram(ack, now + 0.001 + GROUP_ACK_DELAY)
    assert server.unacked == 0 and server.chunks_resent == 0
    assert server.srtt is not None and server.srtt < 0.01


def test_a_lost_copy_is_resent_later_by_the_difference_and_taken_once() -> None:
    member, server = pair(0.2)
    now = warm(member, server, T0)
    server.send(copy(1), 3, lazy_ack=True)
    server.datagrams_to_send(now)  # lost
    timer = server.get_timer()
    assert timer is not None
    # Later than a prompt ack's RTO by the member's longer hold, no more.
    assert timer >= now + 0.2 + GROUP_ACK_DELAY - MAX_ACK_DELAY - 0.001
    assert timer <= now + 0.2 + GROUP_ACK_DELAY
    server.handle_timer(timer)
    (again,) = server.datagrams_to_send(timer)
    assert server.chunks_resent == 1
    assert member_takes(member, again, timer + 0.0005)
    assert received(member) == [copy(1)]
    member.send(encode_message(Receipt(901)), 0, lazy_ack=True)
    (receipt,) = member.datagrams_to_send(timer + 0.2)
    assert server_takes(server, receipt, timer + 0.2005)
    assert server.unacked == 0


@pytest.mark.parametrize("late", [RECEIPTS_LATE, None], ids=["steady2 client", "older client"])
def test_clients_of_before_resend_nothing_and_their_acks_are_taken(late: LateAck | None) -> None:
    """A client of steady2 acks group entries at 150 ms (the second
    datagram at once), one before at 25 ms: the server only allows more."""
    member, server = pair(0.05)
    now = warm(member, server, T0)
    server.send(copy(), 3, lazy_ack=True)
    (d,) = server.datagrams_to_send(now)
    assert member_takes(member, d, now + 0.0005, late)
    due = member.ack_due
    assert due is not None
    assert due == pytest.approx(now + 0.0005 + (late.delay if late else MAX_ACK_DELAY))
    hold_through(member, server, now, due)
    (ack,) = member.datagrams_to_send(due)
    server.receive_datagram(ack, due + 0.0005)
    assert server.unacked == 0 and server.chunks_resent == 0


def test_the_new_client_on_a_server_of_before_at_a_lans_round_trip() -> None:
    """A server of before counts 150 ms for the member's ack: over its 200 ms
    RTO floor that is 325 ms, more than the 250 ms hold plus a LAN's round
    trip, so nothing is resent (docs/RELIABILITY.md: over ~75 ms of round
    trip a lone copy may be resent once, and the client drops the copy)."""
    member, server = pair(0.2, server_late=RECEIPT_ACK_DELAY)
    now = warm(member, server, T0)
    server.send(copy(), 3, lazy_ack=True)
    (d,) = server.datagrams_to_send(now)
    assert member_takes(member, d, now + 0.0005)
    hold_through(member, server, now, now + 0.0005 + GROUP_ACK_DELAY)
    (ack,) = member.datagrams_to_send(now + 0.0005 + GROUP_ACK_DELAY)
    server.receive_datagram(ack, now + 0.001 + GROUP_ACK_DELAY)
    assert server.unacked == 0 and server.chunks_resent == 0


def test_receipts_keep_their_rule_the_other_way() -> None:
    """The member's receipts alone: the server acks them within 150 ms or
    at the second datagram, and the member's timer counts 150 ms (a direct
    message's receipts, the reference of the steady benchmark, unchanged)."""
    member, server = pair(0.2)
    now = warm(member, server, T0)
    member.send(encode_message(Receipt(1)), 0, lazy_ack=True)
    (first,) = member.datagrams_to_send(now)
    timer = member.get_timer()
    assert timer is not None and timer <= now + 0.2 + RECEIPT_ACK_DELAY
    assert server_takes(server, first, now + 0.0005)
    assert server.ack_due == pytest.approx(now + 0.0005 + RECEIPT_ACK_DELAY)
    member.send(encode_message(Receipt(2)), 0, lazy_ack=True)
    (second,) = member.datagrams_to_send(now + 0.1)
    assert server_takes(server, second, now + 0.1005)
    assert server.ack_due == pytest.approx(now + 0.1005)


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
    """Counted at the relay: each member's datagrams over 20 copies 100 ms
    apart (20 before steady, 9-12 with steady2, 6-8 now); every copy shown
    in order, nothing resent either way; the sender told of each member for
    each message no later than the hold after the copy left."""
    net = Net()
    alice, (bob, carol) = team(net, "bob", "carol")
    sent_by: dict[Any, int] = {}
    receive = net.relay.receive_datagram

    def counting(data: bytes, addr: Any, now: float) -> None:
        sent_by[addr] = sent_by.get(addr, 0) + 1
        receive(data, addr, now)

    monkeypatch.setattr(net.relay, "receive_datagram", counting)
    member_addr = {c.core.username: a for a, c in net.clients.items()}
    sent_at: dict[str, float] = {}
    told: dict[tuple[str, str | None], float] = {}
    seen = len(alice.events)

    def note_told() -> None:
        nonlocal seen
        for event in alice.events[seen:]:
            if isinstance(event, StatusChanged) and event.state == MessageState.DELIVERED:
                told.setdefault((event.id, event.by), net.now)
        seen = len(alice.events)

    for n in range(20):
        sent_at[alice.core.send(f"steady {n}", net.now, to="#team")] = net.now
        for _ in range(100):  # 100 ms in 1 ms steps
            net.pump()
            note_told()
            net.now += 0.001
    for _ in range(500):
        net.pump()
        note_told()
        net.now += 0.001
    for member in (bob, carol):
        texts = [e.text for e in member.of(MessageReceived)]
        assert texts == [f"steady {n}" for n in range(20)]
        conn = member.core.conn
        assert conn is not None and conn.unacked == 0 and conn.chunks_resent == 0
        datagrams = sent_by[member_addr[member.core.username]]
        assert 6 <= datagrams <= 8, datagrams
    for session in net.relay.sessions.values():
        assert session.conn.chunks_resent == 0
    assert len(told) == 2 * 20
    late = max(when - sent_at[label] for (label, _), when in told.items())
    assert GROUP_RECEIPT_HOLD - 0.05 < late <= GROUP_RECEIPT_HOLD + 0.02


def test_the_relays_sessions_count_the_longer_hold_for_a_lone_copy() -> None:
    """The relay makes its sessions' connections with `peer_late_ack`: a
    lone copy's timer is the RTO plus 225 ms (steady2: plus 125 ms)."""
    net = Net()
    alice, (bob,) = team(net, "bob")
    session = next(s for s in net.relay.sessions.values() if s.user.name == "bob")
    conn = session.conn
    alice.core.send("one", net.now, to="#team")
    for _ in range(200):
        net.pump()
        if any(c.late for c in conn._inflight.values()):
            break
        net.now += 0.0005
    late = [c for c in conn._inflight.values() if c.late]
    assert late, "the copy is for a late ack"
    timer = conn.get_timer()
    assert timer is not None
    assert timer == pytest.approx(late[0].sent_at + conn.rto + GROUP_ACK_DELAY - MAX_ACK_DELAY)


# --- the store: the sender's told mark ---------------------------------------------------


def test_a_senders_told_mark_rides_on_the_next_commit_or_goes_after_the_hold(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    store = ServerStore(tmp_path / "data", clock=clock)
    store.load()
    store.start()
    try:
        store.submit(GroupTold("alice", "team", 3))
        store.flush()
        assert store.handed == 0  # held: nothing waits for it (main: a commit of its own)
        store.submit(GroupReceipt("team", "bob", 3))
        store.flush()
        assert store.handed == 0
        clock.now += LAZY_HOLD + 0.001
        store.flush()
        assert store.handed == 2  # both, in one batch
        wait_for_store(store)
        assert store.commits == 1
    finally:
        store.close()


def test_a_trim_after_a_told_mark_takes_it_into_its_commit(tmp_path: Path) -> None:
    """What depends on the mark (the log trimmed below it) is urgent and
    submitted after it: the mark is on the disk no later than the trim."""
    clock = FakeClock()
    store = ServerStore(tmp_path / "data", clock=clock)
    store.load()
    store.start()
    try:
        store.submit(GroupTold("alice", "team", 5))
        store.submit(TrimGroup("team", 5))
        store.flush()
        assert store.handed == 2  # in order: the mark, then the trim
        wait_for_store(store)
        assert store.commits == 1  # one transaction
    finally:
        store.close()
