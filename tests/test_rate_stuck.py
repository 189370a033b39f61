"""A sender under the per-user rate limits is delayed, never stuck for good
(over a limit the server withholds acks and the sender's retransmission delivers
later). On the sans-IO `Relay` with a fake clock (`tests.test_bounds.World`).

The budgets pay for what the connection takes, after the fact: a chunk it
refuses for a receive cap, or a replayed datagram, comes again and must not
be paid for each time (the budget drained with nothing taken and, with a
slow refill, the sender waited for ever); both budgets are checked before
either is spent; and a datagram that costs more than a whole burst is taken
from a full bucket, which owes the rest (before, it was never taken). The
budgets still bound the rates on average."""

from __future__ import annotations

import pytest

from chat_server import release_free_memory, resident_memory
from protocol import (
    Accept,
    Accepts,
    MsgId,
    Send,
    Stream,
    conversation_stream,
    encode_message,
)
from server_guard import TokenBucket
from tests.clients import wait_until
from tests.conftest import start_server, stop_server
from tests.conftest import test_config as server_config
from tests.test_bounds import Client, World


def accepted(client: Client) -> list[MsgId]:
    """The ids of the client's messages the server accepted, in order."""
    ids: list[MsgId] = []
    for message in client.messages:
        if isinstance(message, Accept):
            ids.append(message.msg_id)
        elif isinstance(message, Accepts):
            ids.extend(msg_id for msg_id, _ in message.items)
    return ids


def send(client: Client, seq: int, to: str, text: str) -> int:
    """Queue a SEND; its payload's size (what the byte budget pays for it)."""
    payload = encode_message(Send(MsgId(7, seq), to, text))
    client.conn.send(payload, conversation_stream(to))
    return len(payload)


def spent(world: World, name: str) -> float:
    """What the user's byte budget paid (its refill is negligible here)."""
    bucket = world.relay.users[name].byte_bucket
    assert bucket is not None
    return bucket.burst - bucket.tokens


def test_chunks_the_connection_refuses_cost_the_sender_nothing() -> None:
    """A gap in the sender's stream (one fragment lost again and again)
    makes the relay's connection refuse first fragments that come early
    (it holds at most 4 partial messages); it acks at once, and the sender
    resends them on every round. The old relay paid for them each time:
    the byte budget drained with nothing taken, as fast as the rounds go,
    which can be faster than any refill (here there is none to speak of,
    so the sender was stuck for good). Now it pays for each byte taken,
    once."""
    text = "x" * 4096  # 4 fragments, as bench/memory_mailbox sends them
    messages = 12
    world = World(user_byte_rate=1e-6, user_byte_burst=64 * 1024, user_msg_rate=1e6,
                  user_msg_burst=1e6)  # fmt: skip
    world.login("r")
    s = world.login("s")
    lost = {"seq": -1, "left": 80}

    def keep(frame: Stream) -> bool:
        # The first fragment of the second message is lost 80 times.
        if lost["seq"] < 0 and frame.stream != 0 and frame.stream_seq == 4:
            lost["seq"] = frame.seq
        if frame.seq == lost["seq"] and lost["left"] > 0:
            lost["left"] -= 1
            return False
        return True

    s.keep = keep
    size = sum(send(s, seq, "r", text) for seq in range(1, messages + 1))
    assert size < 64 * 1024  # the burst pays for all of it, once
    world.run_until(lambda: lost["left"] == 0, 20_000, "the gap resent 80 times")
    world.run_until(lambda: len(accepted(s)) == messages, 5_000, "every message accepted")
    assert sorted(m.client_seq for m in accepted(s)) == list(range(1, messages + 1))
    assert world.relay.stats["rate_limited"] == 0
    assert abs(spent(world, "s") - size) < 1


def test_a_replayed_withheld_datagram_costs_the_sender_nothing() -> None:
    """Someone on the path replays a datagram the relay withheld: the copy
    fails the replay check, after the budgets were asked. The old relay
    paid for it all the same, so replays could drain a user's budget and
    keep them from ever sending."""
    world = World(user_byte_rate=1e-6, user_byte_burst=8 * 1024, max_memory=100 << 20)
    world.login("r")
    s = world.login("s")
    captured: list[bytes] = []
    to_relay = world._to_relay

    def capture(client: Client, data: bytes) -> None:
        if client is s:
            captured.append(data)
        to_relay(client, data)

    world._to_relay = capture  # type: ignore[method-assign]
    world.relay.set_memory(200 << 20, world.now)  # new messages wait
    size = send(s, 1, "r", "held back while the server is short of memory")
    world.step()
    assert captured and not accepted(s)
    world.relay.set_memory(50 << 20, world.now)
    for _ in range(50):  # 50 copies of each: the budget holds about 70 such datagrams
        for data in captured:
            world.relay.receive_datagram(data, s.addr, world.now)
    assert spent(world, "s") == 0
    world.run_until(lambda: len(accepted(s)) == 1, 500, "the message accepted")
    assert abs(spent(world, "s") - size) < 1


def test_the_message_budget_is_not_spent_on_a_datagram_the_byte_budget_withholds() -> None:
    """Both budgets are asked before either pays. The old relay took a
    message token and then let the byte budget refuse: every retransmission
    took another, so the message budget drained with nothing taken (here
    it does not refill: the sender was stuck for good)."""
    world = World(user_msg_rate=1e-6, user_msg_burst=2.0, user_byte_rate=100.0,
                  user_byte_burst=1100.0)  # fmt: skip
    world.login("r")
    s = world.login("s")
    send(s, 1, "r", "a" * 900)
    world.run_until(lambda: len(accepted(s)) == 1, 100, "the first message")
    send(s, 2, "r", "b" * 900)  # its bytes come back in about 8 s
    world.run_until(lambda: world.relay.stats["rate_limited"] > 0, 100, "the byte limit")
    world.run_until(lambda: len(accepted(s)) == 2, 3_000, "the second message")


def test_a_datagram_costing_more_than_the_burst_is_taken_from_a_full_bucket() -> None:
    """Six short messages queued at once leave in one datagram, and its
    retransmissions bundle the same six: with a message burst of 2 the old
    relay never took that datagram (`--user-msg-rate 1` gives a burst of
    2.5). Only the client's resend of its oldest chunk alone, on each
    RATE_LIMITED notice, got one message through at a time. Now a full
    bucket takes it and owes the rest, so what comes next waits until the
    debt is paid: the rate holds on average."""
    world = World(user_msg_rate=1.0, user_msg_burst=2.0)
    world.login("r")
    s = world.login("s")
    for seq in range(1, 7):
        send(s, seq, "r", f"short {seq}")
    world.run_until(lambda: len(accepted(s)) == 6, 20, "the six messages, at once")
    assert world.relay.stats["rate_limited"] == 0
    taken_at = world.now
    send(s, 7, "r", "after the debt")
    world.run_until(lambda: len(accepted(s)) == 7, 2_000, "the seventh message")
    # 6 - 2 owed, and 1 for the seventh: about 5 s at 1 a second.
    assert world.now - taken_at >= 4.5


def test_the_budgets_still_bound_the_rate_on_average() -> None:
    """A sender with far more to say than its budget: over 10 s of the
    fake clock the relay takes the burst and the refill, not more, and
    keeps taking (no stall)."""
    world = World(user_msg_rate=20.0, user_msg_burst=40.0)
    world.login("r")
    s = world.login("s")
    for seq in range(1, 601):
        send(s, seq, "r", f"message {seq}")
    start = world.now
    world.run_until(lambda: world.now - start >= 10.0, 2_000, "10 s")
    taken = world.relay.stats["messages"]
    # At most burst + rate * t (plus a datagram's worth owed). Withheld
    # senders back off, so they get less than the refill, but they get on.
    assert 40 + 20 * 5 <= taken <= 40 + 20 * 10 + 30
    world.run_until(lambda: len(accepted(s)) == 600, 10_000, "every message in the end")


def test_a_token_bucket_takes_more_than_its_burst_when_full_and_owes_it() -> None:
    bucket = TokenBucket(rate=10.0, burst=5.0, now=0.0)
    assert bucket.take(6, 0.0)  # the old bucket: never, however long it waited
    assert bucket.tokens == -1.0
    assert not bucket.take(1, 0.125)  # 0.25: the debt is paid first
    assert bucket.take(1, 0.25)
    assert not bucket.ready(6, 0.5)  # 3 of 5: more than is there only from a full bucket
    assert bucket.ready(6, 1.0) and bucket.take(6, 1.0)
    assert bucket.tokens == -1.0


@pytest.mark.skipif(resident_memory() is None or not release_free_memory(),
                    reason="needs /proc/self/statm and glibc's malloc_trim")  # fmt: skip
def test_after_a_peak_of_freed_memory_new_messages_are_taken_again() -> None:
    """Memory Python frees stays resident while a live block sits above it
    in the C heap: the old loop read that as memory in use, so after one
    peak over `--max-memory` new messages waited for good. The loop now
    hands the free pages back before it decides (real loop, in process)."""
    release_free_memory()
    base = resident_memory()
    assert base is not None
    running = start_server(server_config(None, max_memory=base + 64 * 1024 * 1024))
    try:
        # 160 MiB of blocks from the C heap, written, and among them a small
        # one that lives on every 64: a heap that holds objects of all ages.
        peak, pins = [], []
        for i in range(40_000):
            peak.append(bytes([i % 251]) * 4096)
            if i % 64 == 63:
                pins.append(bytes([i % 251]) * 600)
        wait_until(lambda: running.relay.short_of_memory, 5.0, "over --max-memory")
        del peak
        wait_until(lambda: not running.relay.short_of_memory, 5.0, "under it again")
        del pins
    finally:
        stop_server(running)
