"""One chunk per member per burst (issue 14): the group entries a pass hands
one member (a burst committed together or released by the fan-out hold, a
page of the log) go in GROUP_BATCHes (kind 31) of at most one chunk each
(`chat_server.GROUP_BATCH_BYTES`), instead of a chunk per entry; an entry
too big for one goes alone, as before. The wire form round-trips and its
decoder refuses what no server sends; the client handles a batch exactly as
its entries one by one (events, store, receipts); and the guarantees hold:
one order per group for every member, exactly once, nothing for a member
after her removal, the window's bounds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import chat_server
from chat_server import GROUP_BATCH_BYTES, MAILBOX_WINDOW
from client_core import GROUP_RECEIPT_HOLD, GroupChanged, MessageReceived
from protocol import (
    GROUP_BATCH_MAX_BYTES,
    MAX_TEXT_BYTES,
    GroupAccept,
    GroupAction,
    GroupBatch,
    GroupChange,
    GroupDeliver,
    GroupEvent,
    LocalProtocolError,
    Message,
    MsgId,
    Receipt,
    Receipts,
    RemoteProtocolError,
    batches,
    decode_header,
    decode_message,
    encode_message,
    group_batch,
    unbatch,
)
from reliability import CHUNK_SIZE, PayloadReceived
from server_store import MemoryStore
from tests.lossy_proxy import LossyProxy
from tests.test_client_core import Net
from tests.test_durability import ServerRunner
from tests.test_fanout_batch import ReceiptsSeen, pump_for
from tests.test_groups_client import login, push
from tests.test_groups_cost import group_of
from tests.test_groups_process import Member, create_team, pump_until
from tests.test_groups_relay import GroupWorld, entries, texts

# --- the wire form -----------------------------------------------------------------

names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=32)
u64 = st.integers(0, 2**64 - 1)
delivers = st.builds(GroupDeliver, u64, u64, st.builds(MsgId, u64, u64), names, names,
                     st.text(max_size=300), u64)  # fmt: skip
events = st.builds(GroupEvent, u64, u64, names, st.integers(1, 5), names,
                   st.lists(names, max_size=5).map(tuple), u64)  # fmt: skip
batches_of_entries = st.lists(delivers | events, min_size=1, max_size=12).map(tuple)


@given(batches_of_entries)
def test_a_group_batch_round_trips_and_the_servers_joining_gives_the_same_bytes(
    items: tuple[Any, ...],
) -> None:
    batch = GroupBatch(items)
    data = encode_message(batch)
    assert decode_message(data) == batch
    assert unbatch(decode_message(data)) == items
    # The server joins entries it encoded once for every member.
    assert group_batch([encode_message(item) for item in items]) == data


def test_unbatch_gives_any_other_message_alone() -> None:
    receipt = Receipt(5)
    assert unbatch(receipt) == (receipt,)


def sample(seq: int, text: str = "hi") -> GroupDeliver:
    return GroupDeliver(900 + seq, seq, MsgId(5, seq), "team", "alice", text, 7)


def test_the_decoder_refuses_what_no_server_sends() -> None:
    good = encode_message(GroupBatch((sample(1), sample(2))))
    with pytest.raises(RemoteProtocolError, match="at least 1 entry"):
        decode_message(bytes([31, 0, 0]))
    with pytest.raises(RemoteProtocolError, match="truncated"):
        decode_message(good[:-1])
    with pytest.raises(RemoteProtocolError, match="trailing"):
        decode_message(good + b"\0")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        decode_message(good[:3] + b"\xff\xff\xff\xff" + good[7:])  # a length past the end
    # Only GROUP_DELIVERs and GROUP_EVENTs: not another batch, not a receipt.
    for inner in (good, encode_message(Receipt(7))):
        nested = group_batch([inner])
        with pytest.raises(RemoteProtocolError, match="GROUP_DELIVER and GROUP_EVENT"):
            decode_message(nested)
    # A bad entry inside is refused like the entry alone.
    with pytest.raises(RemoteProtocolError, match="GroupDeliver"):
        decode_message(group_batch([encode_message(sample(1))[:-1]]))


def test_the_encoder_refuses_a_batch_over_one_message_or_of_other_kinds() -> None:
    """A batch is never more than one message may be (the longest text with
    its fields: what `reliability.Connection.send` takes)."""
    long = sample(1, "x" * MAX_TEXT_BYTES)
    assert len(encode_message(GroupBatch((long,)))) <= GROUP_BATCH_MAX_BYTES
    half = MAX_TEXT_BYTES // 2 + 1024
    with pytest.raises(LocalProtocolError, match="at most"):
        encode_message(GroupBatch((sample(1, "x" * half), sample(2, "x" * half))))
    with pytest.raises(LocalProtocolError, match="not a GroupDeliver or GroupEvent"):
        encode_message(GroupBatch((Receipt(1),)))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="1 to"):
        encode_message(GroupBatch(()))


@given(st.lists(delivers | events, min_size=1, max_size=60),
       st.lists(st.integers(0, 3000), min_size=60, max_size=60))  # fmt: skip
def test_the_relay_joins_entries_in_order_into_batches_of_one_chunk_at_most(
    items: list[Any], pads: list[int]
) -> None:
    """`Relay._group_payloads`: the entries in order, each exactly once; a
    batch at most GROUP_BATCH_BYTES; only an entry that fits no batch alone
    is over it; never two entries alone in a row that would fit one batch."""
    items = [  # some of them long
        i if not isinstance(i, GroupDeliver) or not pad else
        GroupDeliver(i.server_msg_id, i.group_seq, i.msg_id, i.group, i.sender, "x" * pad,
                     i.sent_ms)
        for i, pad in zip(items, pads, strict=False)
    ]  # fmt: skip
    encoded = [encode_message(i) for i in items]
    out = chat_server.Relay._group_payloads(encoded)
    assert [e for p in out for e in unbatch(decode_message(p))] == items
    for payload in out:
        if decode_message(payload).__class__ is GroupBatch:
            assert len(payload) <= GROUP_BATCH_BYTES
        else:
            assert payload in encoded
    for first, second in zip(out, out[1:], strict=False):  # two alone: they did not fit one
        if first in encoded and second in encoded:
            assert 3 + len(first) + len(second) + 8 > GROUP_BATCH_BYTES
    if len(items) == 1:
        assert out == encoded


# --- the relay: one chunk per member per burst ----------------------------------------


class PayloadWorld(GroupWorld):
    """A `GroupWorld` that keeps, per client, every payload the relay sent
    it as it came (a batch as a batch), besides the entries."""

    def __init__(self, **overrides: Any) -> None:
        super().__init__(MemoryStore(), **overrides)
        self.payloads: dict[str, list[Message]] = {}
        self.sizes: dict[str, list[int]] = {}

    def _to_clients(self, out: list[tuple[bytes, Any]]) -> None:
        # `GroupWorld._to_clients`, keeping each payload as it came.
        for data, addr in out:
            client = self._by_addr.get(addr)
            if client is None or not client.conn.receive_datagram(data, self.now):
                continue
            for event in client.conn.take_events():
                if not isinstance(event, PayloadReceived):
                    continue
                payload = decode_message(event.payload)
                self.payloads.setdefault(client.name, []).append(payload)
                self.sizes.setdefault(client.name, []).append(len(event.payload))
                for message in unbatch(payload):
                    client.messages.append(message)
                    if (
                        isinstance(message, GroupDeliver | GroupEvent)
                        and client.name not in self.holding
                    ):
                        client.send(Receipt(message.server_msg_id))

    def group_payloads(self, name: str) -> list[Message]:
        return [m for m in self.payloads.get(name, []) if isinstance(m, GroupBatch | GroupDeliver)]


def quiet(world: GroupWorld) -> None:
    for _ in range(30):  # the group's last fan-out is long past
        world.step()


def test_a_burst_committed_in_one_pass_reaches_each_member_in_one_payload() -> None:
    world = PayloadWorld()
    alice, members = group_of(world, 4)
    quiet(world)
    world.payloads.clear()
    for seq in (1, 2, 3):
        world.post(alice, "team", f"m{seq}", seq)
    world.step(0.001)
    for member in members:
        # The old relay sent three GROUP_DELIVERs (three chunks).
        (payload,) = world.group_payloads(member.name)
        assert isinstance(payload, GroupBatch)
        assert [e.text for e in payload.entries if isinstance(e, GroupDeliver)] == [
            "m1",
            "m2",
            "m3",
        ]
        assert texts(member) == ["m1", "m2", "m3"]
    # Alone, a message goes as it always did.
    quiet(world)
    world.payloads.clear()
    world.post(alice, "team", "alone", 4)
    world.step(0.001)
    for member in members:
        assert [type(m) for m in world.group_payloads(member.name)] == [GroupDeliver]


def test_the_held_messages_go_in_one_payload_and_a_burst_in_chunks_in_order() -> None:
    """Messages held by FANOUT_HOLD go together; more than one chunk holds
    go in several batches of at most GROUP_BATCH_BYTES, in the group's
    order; a message too big for a batch goes alone between them."""
    assert GROUP_BATCH_BYTES <= CHUNK_SIZE
    world = PayloadWorld()
    alice, members = group_of(world, 3)
    quiet(world)
    world.payloads.clear()
    world.sizes.clear()
    sent = []
    for seq in range(1, 41):
        text = ("y" * 3000) if seq == 20 else f"line {seq} " + "z" * 60
        sent.append(text)
        world.post(alice, "team", text, seq)
    world.settle_all(60)
    for member in members:
        assert texts(member) == sent
        payloads = world.group_payloads(member.name)
        assert 3 <= len(payloads) < 20, [type(p).__name__ for p in payloads]
        big = [p for p in payloads if isinstance(p, GroupDeliver)]
        assert [p.text for p in big] == [sent[19]], "the big one alone"
        sizes = [s for s, m in zip(world.sizes[member.name], world.payloads[member.name],
                                   strict=True) if isinstance(m, GroupBatch)]  # fmt: skip
        assert sizes and max(sizes) <= GROUP_BATCH_BYTES
        seqs = [e[0] for e in entries(member)]
        assert seqs == sorted(set(seqs))


def test_a_change_in_the_same_pass_keeps_the_order_and_a_removed_member_gets_nothing_after(
) -> None:  # fmt: skip
    world = PayloadWorld()
    alice, (bob, carol) = group_of(world, 3, "bob", "carol")
    quiet(world)
    world.post(alice, "team", "before", 1)
    world.request(alice, GroupAction.REMOVE, "team", "bob")
    world.step(0.001)
    world.post(alice, "team", "after", 2)
    world.post(alice, "team", "after too", 3)
    world.settle_all(60)
    assert texts(carol) == ["before", "after", "after too"]
    assert texts(bob) == ["before"]
    assert entries(bob)[-1][1] == GroupChange.REMOVED.label
    for member in (bob, carol):
        seqs = [e[0] for e in entries(member)]
        assert seqs == sorted(set(seqs)), member.name


def test_a_member_behind_gets_the_log_in_batches_within_her_window() -> None:
    """Pages of the log (a login after being away, a window that was full)
    are batched too, and still take at most the session's window."""
    world = PayloadWorld()
    alice, (bob,) = group_of(world, 2, "bob")
    world.holding.add("bob")  # bob's client shows nothing: no receipts
    quiet(world)
    count = MAILBOX_WINDOW + 40
    for seq in range(1, count + 1):
        world.post(alice, "team", f"n{seq}", seq)
        if seq % 50 == 0:
            world.step(0.001)
    world.settle_all(200)
    session = next(s for s in world.relay.sessions.values() if s.user.name == "bob")
    assert session.group_mail is not None and session.group_mail.count == MAILBOX_WINDOW
    assert len(texts(bob)) == MAILBOX_WINDOW, "the window bounds what waits for receipts"
    batched = [p for p in world.group_payloads("bob") if isinstance(p, GroupBatch)]
    assert len(batched) >= 2
    world.holding.discard("bob")
    for message in list(bob.messages):  # bob's client shows them now: receipts
        if isinstance(message, GroupDeliver):
            bob.send(Receipt(message.server_msg_id))
    world.run_until(lambda: len(texts(bob)) == count, 2000, "the rest of the log")
    assert texts(bob) == [f"n{seq}" for seq in range(1, count + 1)]


def test_without_the_hold_a_pass_still_goes_in_one_payload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(chat_server, "FANOUT_HOLD", 0.0)
    world = PayloadWorld()
    alice, members = group_of(world, 3)
    quiet(world)
    world.payloads.clear()
    for seq in (1, 2):
        world.post(alice, "team", f"m{seq}", seq)
    world.step(0.001)
    world.post(alice, "team", "m3", 3)
    world.step(0.001)
    for member in members:
        kinds = [type(p) for p in world.group_payloads(member.name)]
        assert kinds == [GroupBatch, GroupDeliver], kinds
        assert texts(member) == ["m1", "m2", "m3"]


# --- the client: a batch is its entries one by one ---------------------------------------


@pytest.fixture
def net() -> Net:
    return Net()


def burst() -> list[GroupDeliver | GroupEvent]:
    return [
        sample(1),
        GroupEvent(902, 2, "team", GroupChange.ADDED, "alice", ("dave",), 7),
        sample(3),
        sample(4),
    ]


def seen_by_client(net: Net, monkeypatch: pytest.MonkeyPatch,
                   *payloads: Message) -> tuple[list[Any], list[list[int]]]:  # fmt: skip
    seen = ReceiptsSeen(net.relay, monkeypatch)
    (bob,) = login(net, "bob")
    net.settle(1.0)
    push(net, "bob", *payloads)
    pump_for(net, GROUP_RECEIPT_HOLD + 0.01)  # the receipts' longest hold
    shown = [(type(e).__name__, e.id) for e in bob.events
             if isinstance(e, MessageReceived | GroupChanged)]  # fmt: skip
    return shown, seen.of("bob")


def test_the_client_handles_a_batch_as_its_entries_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alone = seen_by_client(Net(), monkeypatch, *burst())
    together = seen_by_client(Net(), monkeypatch, GroupBatch(tuple(burst())))
    assert alone[0] == [("MessageReceived", 901), ("GroupChanged", 902),
                        ("MessageReceived", 903), ("MessageReceived", 904)]  # fmt: skip
    assert together == alone
    assert together[1] == [[901, 902, 903, 904]], "one receipt for the burst"


def test_an_entry_of_a_batch_seen_before_is_receipted_again_not_shown_twice(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = ReceiptsSeen(net.relay, monkeypatch)
    (bob,) = login(net, "bob")
    net.settle(1.0)
    push(net, "bob", sample(1))
    pump_for(net, 0.1)
    push(net, "bob", GroupBatch((sample(1), sample(2))))  # 1 again (its receipt was lost)
    pump_for(net, 0.2)  # (held up to GROUP_RECEIPT_HOLD, 220 ms since lean: was 0.1 s)
    shown = [e.id for e in bob.events if isinstance(e, MessageReceived)]
    assert shown == [901, 902]
    assert sorted(i for ids in seen.of("bob") for i in ids) == [901, 901, 902]


# --- real processes: batches through loss and a kill -9 ------------------------------------


class BatchCountingMember(Member):
    """A raw member (receipting every entry at once) that counts the group
    payloads it got: batches, and entries alone."""

    def __init__(self, name: str, server: tuple[str, int]) -> None:
        super().__init__(name, server)
        self.batches = 0
        self.alone = 0

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
                receipts = []
                while (event := conn.next_event()) is not None:
                    if not isinstance(event, PayloadReceived):
                        continue
                    payload = decode_message(event.payload)
                    if isinstance(payload, GroupBatch):
                        self.batches += 1
                    elif isinstance(payload, GroupDeliver | GroupEvent):
                        self.alone += 1
                    for message in unbatch(payload):
                        self.messages.append(message)
                        if isinstance(message, GroupDeliver | GroupEvent):
                            receipts.append(message.server_msg_id)
                for part in batches(receipts):
                    self.send(Receipts(tuple(part)))
        for datagram in conn.datagrams_to_send(time.monotonic()):
            self.raw.send(datagram)
        return got


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[ServerRunner]:
    server = ServerRunner(tmp_path / "server-data")
    server.start()
    yield server
    server.close()


def test_through_loss_and_a_kill_every_member_gets_each_entry_once_in_batches(
    runner: ServerRunner,
) -> None:
    """Through 10 % loss, duplication and reordering, alice posts bursts
    while carol is online and bob is away; once carol has them the server is
    killed with SIGKILL and started again; bob logs in and catches up from
    the log. Both get every entry once, in the group's order, bob's in
    batches."""
    with LossyProxy(runner.address, seed=7, loss=0.1, duplicate=0.05, reorder=0.1) as proxy:
        members: list[Member] = [BatchCountingMember(n, proxy.address)
                                 for n in ("alice", "bob", "carol")]  # fmt: skip
        alice, bob, carol = members
        try:
            create_team(members)
            bob.close()
            online: list[Member] = [alice, carol]
            posted = []
            for burst in range(8):
                posted += [alice.post(f"m{burst}.{n}") for n in range(10)]
                for _ in range(3):
                    for member in online:
                        member.pump()
                    time.sleep(0.002)
            want = [f"m{burst}.{n}" for burst in range(8) for n in range(10)]
            pump_until(online, lambda: len(alice.of(GroupAccept)) == len(posted)
                       and len(carol.of(GroupDeliver)) >= len(want), 60,
                       "accepts, carol's copies")  # fmt: skip
            for _ in range(30):  # carol's last receipts
                for member in online:
                    member.pump()
                time.sleep(0.005)
            runner.restart()  # (the old sessions end with it: only bob is pumped now)
            bob = BatchCountingMember("bob", proxy.address)
            members = [alice, bob, carol]
            pump_until([bob], lambda: len(bob.of(GroupDeliver)) >= len(want), 60,
                       "bob's catching up")  # fmt: skip
            for _ in range(30):
                bob.pump()
                time.sleep(0.005)
        finally:
            for member in members:
                member.close()
    assert proxy.stats("up")["dropped"] > 0 and proxy.stats("down")["dropped"] > 0
    for member in (bob, carol):
        assert [d.text for d in member.of(GroupDeliver)] == want, member.name
        seqs = [e[0] for e in member.entries()]
        assert seqs == sorted(set(seqs)), f"{member.name}: out of order or twice"
    assert isinstance(bob, BatchCountingMember)
    # bob's catching up came in pages, batched (a chunk holds about a dozen).
    assert bob.batches > 0 and bob.batches + bob.alone < len(want), (bob.batches, bob.alone)
