"""Fewer datagrams per group copy (issue 14), counted, not timed: the relay
hands a group's messages committed within FANOUT_HOLD of its last fan-out
to each member together, in one datagram, and only those (a message after
a quiet spell goes at once, a membership change takes the held ones with
it, in the group's order); a member's client holds its receipts of group
entries (up to GROUP_RECEIPT_HOLD) and sends one for the burst (a direct
message's receipt is never held); the fan-out budget still bounds the
copies; and through the lossy proxy, with receipts held as the client
holds them, every member gets every entry once and in one order."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import chat_server
from chat_server import FANOUT_HOLD
from client_core import (
    GROUP_RECEIPT_DELAY,
    GROUP_RECEIPT_HOLD,
    GroupChanged,
    GroupReceipts,
    MessageReceived,
)
from protocol import (
    CONTROL_STREAM,
    GroupAccept,
    GroupAction,
    GroupDeliver,
    GroupEvent,
    GroupReached,
    Message,
    MsgId,
    Receipt,
    Receipts,
    batches,
    decode_header,
    decode_message,
    unbatch,
)
from reliability import GROUP_ACK_DELAY, MAX_ACK_DELAY, PayloadReceived
from server_store import MemoryStore
from tests.lossy_proxy import LossyProxy
from tests.test_client_core import Net
from tests.test_durability import ServerRunner
from tests.test_groups_client import login, push
from tests.test_groups_cost import group_of
from tests.test_groups_process import Member, create_team, pump_until
from tests.test_groups_relay import GroupWorld, entries, texts

# --- the relay: a burst's messages in one datagram per member -----------------------


class CountingWorld(GroupWorld):
    """A `GroupWorld` that counts, per member, the group messages in each
    datagram the relay sent it (datagrams with none are not counted)."""

    def __init__(self, **overrides: Any) -> None:
        super().__init__(MemoryStore(), **overrides)
        self.copies_per_datagram: dict[str, list[int]] = {}

    def _to_clients(self, out: list[tuple[bytes, Any]]) -> None:
        for data, addr in out:
            client = self._by_addr.get(addr)
            before = len(client.of(GroupDeliver)) if client is not None else 0
            super()._to_clients([(data, addr)])
            if client is not None and (got := len(client.of(GroupDeliver)) - before):
                self.copies_per_datagram.setdefault(client.name, []).append(got)


STEP = 0.001  # well inside the hold


def test_messages_committed_within_the_hold_reach_each_member_in_one_datagram() -> None:
    world = CountingWorld()
    alice, members = group_of(world, 4)
    for _ in range(30):  # a quiet spell: the group's last fan-out is long past
        world.step()
    world.copies_per_datagram.clear()
    world.post(alice, "team", "first", 1)
    world.step(STEP)
    # After a quiet spell a message is not held: it reached everyone in the
    # pass that committed it.
    assert all(texts(m) == ["first"] for m in members)
    for seq in (2, 3, 4):  # three more, each committed in a pass of its own
        world.post(alice, "team", f"m{seq}", seq)
        world.step(STEP)
    assert all(texts(m) == ["first"] for m in members), "held until the hold ends"
    world.run_until(lambda: all(len(texts(m)) == 4 for m in members),
                    round(2 * FANOUT_HOLD / STEP), "the held messages")  # fmt: skip
    for member in members:
        assert texts(member) == ["first", "m2", "m3", "m4"]
        # One datagram for the first, one for the three held (the old relay
        # sent each in a datagram of its own: [1, 1, 1, 1]).
        assert world.copies_per_datagram[member.name] == [1, 3], member.name


def test_messages_committed_in_one_pass_go_together_at_once() -> None:
    """The hold is for what comes after a fan-out, not for what comes with
    it: messages committed in the same pass are not split (the first at
    once, the rest at the hold's end)."""
    world = CountingWorld()
    alice, members = group_of(world, 4)
    for _ in range(30):
        world.step()
    world.copies_per_datagram.clear()
    for seq in (1, 2, 3):
        world.post(alice, "team", f"m{seq}", seq)
    world.step(STEP)
    for member in members:
        assert texts(member) == ["m1", "m2", "m3"]
        assert world.copies_per_datagram[member.name] == [3], member.name


def test_a_change_takes_the_held_messages_with_it_in_the_groups_order() -> None:
    world = CountingWorld()
    alice, members = group_of(world, 3)
    dave = world.login("dave")
    for _ in range(30):
        world.step()
    world.post(alice, "team", "first", 1)
    world.step(STEP)
    world.post(alice, "team", "held", 2)
    world.step(STEP)
    assert all(texts(m) == ["first"] for m in members)
    world.request(alice, GroupAction.ADD, "team", "dave")
    world.step(STEP)
    # The change is not held, and the message before it in the sequence goes
    # first, in the same datagram: no member waits for the hold's end.
    for member in members:
        got = entries(member)
        assert [e[1] for e in got[-3:]] == ["message", "message", "added"], got
        seqs = [e[0] for e in got]
        assert seqs == sorted(set(seqs)), f"{member.name}: out of order or twice"
    assert [e[1] for e in entries(dave)] == ["added"]  # nothing from before he joined
    world.settle_all()
    assert all(texts(m) == ["first", "held"] for m in members)


def test_the_fan_out_budget_still_bounds_the_copies_when_messages_are_held() -> None:
    """The budget is paid when a message is taken, before the hold: a burst
    held and released together hands out no more copies than it allows."""
    rate, burst = 40.0, 60.0
    world = CountingWorld(max_fanout_rate=rate, max_fanout_burst=burst)
    alice, members = group_of(world, 5)  # four copies a message
    for _ in range(30):
        world.step()
    copies_before = world.relay.stats["group_copies"]
    start = world.now
    seen: list[tuple[float, int]] = []
    for step in range(round(1.0 / STEP)):
        if step < 60:  # a message a pass: one a datagram
            world.post(alice, "team", f"m{step + 1}", step + 1)
        world.step(STEP)
        seen.append((world.now - start, world.relay.stats["group_copies"] - copies_before))
    assert world.relay.stats["withheld_fanout"] > 0
    for elapsed, copies in seen:
        assert copies <= burst + rate * elapsed, (elapsed, copies)
    world.run_until(lambda: all(len(texts(m)) == 60 for m in members), 20_000, "every copy")
    assert all(texts(m) == [f"m{n}" for n in range(1, 61)] for m in members)


# --- the client: one receipt for a burst of group entries --------------------------


class ReceiptsSeen:
    """The receipt messages (RECEIPT / RECEIPTS) the relay takes from each
    user, one list of ids per message, before it handles them."""

    def __init__(self, relay: chat_server.Relay, monkeypatch: pytest.MonkeyPatch) -> None:
        self.messages: list[tuple[str, list[int]]] = []
        self.order: list[tuple[str, str]] = []  # (user, kind) of every message taken
        dispatch = relay._dispatch

        def recording(session: Any, message: Message, now: float) -> None:
            self.order.append((session.user.name, type(message).__name__))
            if isinstance(message, Receipt):
                self.messages.append((session.user.name, [message.server_msg_id]))
            elif isinstance(message, Receipts):
                self.messages.append((session.user.name, list(message.server_msg_ids)))
            dispatch(session, message, now)

        monkeypatch.setattr(relay, "_dispatch", recording)

    def of(self, name: str) -> list[list[int]]:
        return [ids for who, ids in self.messages if who == name]


@pytest.fixture
def net() -> Net:
    return Net()


def entry(seq: int) -> GroupDeliver:
    return GroupDeliver(900 + seq, seq, MsgId(5, seq), "team", "alice", f"line {seq}", 7)


def pump_for(net: Net, seconds: float, step: float = 0.001) -> None:
    """Pump while fake time moves by `step` (the net's own steps are 50 ms)."""
    end = net.now + seconds
    while net.now < end:
        net.pump()
        net.now += step


def test_a_member_receipts_a_burst_of_group_entries_once(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = ReceiptsSeen(net.relay, monkeypatch)
    (bob,) = login(net, "bob")
    net.settle(1.0)
    for seq in range(1, 6):  # five entries, a millisecond apart
        push(net, "bob", entry(seq))
        net.pump()
        net.now += 0.001
    shown = [e.id for e in bob.events if isinstance(e, MessageReceived)]
    assert shown == [901, 902, 903, 904, 905]
    assert seen.of("bob") == [], "held: the receipt waits for the rest of the burst"
    # The last datagram's ack may wait (entries alone: GROUP_ACK_DELAY),
    # so the receipts wait their longest hold, then carry it.
    pump_for(net, GROUP_RECEIPT_HOLD + 0.002)
    # One receipt message for the five (the old client sent one per pass).
    assert seen.of("bob") == [[901, 902, 903, 904, 905]]
    pump_for(net, 0.2)
    assert seen.of("bob") == [[901, 902, 903, 904, 905]], "nothing more"


def test_the_held_receipt_leaves_before_the_connections_delayed_ack() -> None:
    """It leaves first and carries that ack, instead of following it in a
    datagram of its own: before the 25 ms ack once it has waited
    GROUP_RECEIPT_DELAY, and at the latest before the late ack a datagram
    of group entries alone may have (RECEIPT_ACK_DELAY; steady2 changed
    this test from a hold of GROUP_RECEIPT_DELAY; GROUP_ACK_DELAY since
    lean, tests/test_steady_lean.py)."""
    assert GROUP_RECEIPT_DELAY < MAX_ACK_DELAY
    assert GROUP_RECEIPT_HOLD < GROUP_ACK_DELAY
    held = GroupReceipts()
    held.add(901, 10.0)
    held.add(902, 10.015)  # a later entry does not put the receipt off
    assert held.due == 10.0 + GROUP_RECEIPT_HOLD
    assert held.ready(10.0 + MAX_ACK_DELAY, 10.0 + MAX_ACK_DELAY)
    assert held.take() == [901, 902] and held.due is None and held.take() == []


def test_a_direct_receipt_is_not_held_and_takes_the_held_ones_along(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = ReceiptsSeen(net.relay, monkeypatch)
    alice, bob = login(net, "alice", "bob")
    net.settle(1.0)
    push(net, "bob", entry(1))
    net.pump()
    assert seen.of("bob") == []  # the group entry's receipt waits
    alice.core.send("a direct line", net.now, "bob")
    for _ in range(6):  # no time passes: the direct receipt is never held
        net.pump()
    assert any(isinstance(e, MessageReceived) and e.group is None for e in bob.events)
    receipts = seen.of("bob")
    assert len(receipts) == 1 and 901 in receipts[0] and len(receipts[0]) == 2, receipts


def test_held_group_receipts_leave_before_the_logout(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = ReceiptsSeen(net.relay, monkeypatch)
    (bob,) = login(net, "bob")
    net.settle(1.0)
    push(net, "bob", GroupEvent(900, 1, "team", 1, "alice", ("alice", "bob"), 7), entry(2))
    net.pump()
    assert [e.id for e in bob.events if isinstance(e, MessageReceived | GroupChanged)] == [900, 902]
    bob.core.logout(net.now)
    net.run(lambda: bob.core.ended, "bob logged out")
    assert seen.of("bob") == [[900, 902]]
    kinds = [kind for who, kind in seen.order if who == "bob"]
    assert kinds.index("Receipts") < kinds.index("Logout")


# --- real processes: receipts held as the client holds them, through loss ----------


class LazyMember(Member):
    """A raw member that receipts group entries as the chat client does:
    held up to GROUP_RECEIPT_HOLD after the first, then in one message."""

    def __init__(self, name: str, server: tuple[str, int]) -> None:
        super().__init__(name, server)
        self.held = GroupReceipts()
        self.receipt_messages = 0

    def pump(self) -> bool:
        conn = self.raw.conn
        assert conn is not None
        now = time.monotonic()
        timer = conn.get_timer()
        if timer is not None and timer <= now:
            conn.handle_timer(now)
        got = False
        while (data := self.raw.recv_one(0)) is not None:
            got = True
            if decode_header(data).session_id != conn.session_id:
                continue
            if conn.receive_datagram(data, now):
                while (event := conn.next_event()) is not None:
                    if isinstance(event, PayloadReceived):
                        for message in unbatch(decode_message(event.payload)):
                            self.messages.append(message)
                            if isinstance(message, GroupDeliver | GroupEvent):
                                self.held.add(message.server_msg_id, now)
        if self.held.due is not None and time.monotonic() >= self.held.due:
            for batch in batches(self.held.take()):
                self.receipt_messages += 1
                self.send(Receipts(tuple(batch)), CONTROL_STREAM)
        for datagram in conn.datagrams_to_send(time.monotonic()):
            self.raw.send(datagram)
        return got


@pytest.fixture
def runner(tmp_path: Path) -> Any:
    server = ServerRunner(tmp_path / "server-data")
    server.start()
    yield server
    server.close()


def test_held_receipts_through_loss_every_entry_once_in_one_order(runner: ServerRunner) -> None:
    """Two members post bursts through 10 % loss, duplication and reordering
    both ways while every member holds its receipts: each gets each entry
    once, all in one order, and each sender hears once from each member."""
    with LossyProxy(runner.address, seed=31, loss=0.1, duplicate=0.05, reorder=0.1) as proxy:
        members: list[Member] = [LazyMember(n, proxy.address) for n in ("alice", "bob", "carol")]
        try:
            create_team(members)
            sent: dict[str, list[MsgId]] = {m.name: [] for m in members}
            for burst in range(6):
                for member in members[:2]:
                    for n in range(4):
                        sent[member.name].append(member.post(f"{member.name} {burst}.{n}"))
                for _ in range(5):
                    for member in members:
                        member.pump()
                    time.sleep(0.002)
            total = sum(len(ids) for ids in sent.values())
            pump_until(members, lambda: sum(len(m.of(GroupAccept)) for m in members) >= total,
                       60, "every GROUP_ACCEPT")  # fmt: skip
            last = max(a.group_seq for m in members for a in m.of(GroupAccept))

            def has_all(m: Member) -> bool:
                own = {a.group_seq for a in m.of(GroupAccept)}
                seqs = {e[0] for e in m.entries()}
                return all(s in seqs for s in range(1, last + 1) if s not in own)

            pump_until(members, lambda: all(has_all(m) for m in members), 60, "every entry")

            def told(m: Member) -> int:
                return sum(len(d.by) for d in m.of(GroupReached))

            pump_until(members, lambda: all(told(m) >= 2 * len(sent[m.name]) for m in members),
                       60, "every delivered-by")  # fmt: skip
            for _ in range(30):
                for member in members:
                    member.pump()
                time.sleep(0.005)
        finally:
            for member in members:
                member.close()
    assert proxy.stats("up")["dropped"] > 0 and proxy.stats("down")["dropped"] > 0
    by_seq: dict[int, tuple[Any, ...]] = {}
    for member in members:
        got = member.entries()
        seqs = [e[0] for e in got]
        assert len(seqs) == len(set(seqs)), f"{member.name} got an entry twice"
        assert seqs == sorted(seqs), f"{member.name} got entries out of order"
        for item in got:
            assert by_seq.setdefault(item[0], item) == item  # one entry per seq, for all
        own = {a.group_seq for a in member.of(GroupAccept)}
        assert seqs == [s for s in range(1, last + 1) if s not in own], member.name
    for member in members[:2]:
        heard = [(by, d.msg_id) for d in member.of(GroupReached) for by in d.by]
        assert len(heard) == len(set(heard)), f"{member.name} heard a receipt twice"
        assert sorted({i for _, i in heard}) == sorted(sent[member.name])
        assert len(heard) == 2 * len(sent[member.name])
    # Held receipts: fewer receipt messages than entries (a raw member that
    # receipted at once sent about one per datagram).
    entries_got = sum(len(m.entries()) for m in members)
    assert sum(m.receipt_messages for m in members if isinstance(m, LazyMember)) < entries_got
