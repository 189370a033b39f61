"""The floor relay (`bench/floor.py`, issue 18) does a relay's whole work.

Its figure is only a floor if it skips nothing the protocol needs: these
tests drive it with the benchmark's real load clients (their `Connection`
checks every datagram's MAC, order and content) and hold it to what the real
`Relay` does with the same clients: every message handed over once, every
sender told DELIVERED and ACCEPT, the same datagrams per message; MACs,
the replay window, message-id dedup and retransmission all at work.
"""

from __future__ import annotations

import collections
from typing import Any

import pytest

from bench.floor import DeferredStore, FloorRelay, World, live, store_costs, syscall_costs
from protocol import MsgId, Send, encode_message

Kinds = collections.Counter[str]


def record_kinds(world: World) -> Kinds:
    """Count the messages the clients take from the relay, by kind."""
    kinds: Kinds = collections.Counter()
    for peer in world.peers:
        original = peer.on_message

        def on_message(message: Any, now_ns: int, original: Any = original) -> None:
            kinds[type(message).__name__] += 1
            original(message, now_ns)

        peer.on_message = on_message  # type: ignore[method-assign]
    return kinds


def everything_arrived(world: World, count: int) -> None:
    for sender in world.senders:
        assert sender.sent == count
        assert sender.completed == count  # accepted and delivered, each
        assert not sender.outstanding and sender.failed == 0
    for receiver in world.receivers:
        assert receiver.received == count
        assert receiver.duplicates == 0 and receiver.damaged == 0


def test_the_floor_relays_every_message_as_the_real_relay_does_flat_out() -> None:
    results = {}
    for kind in ("real", "floor"):
        world = World(kind, 2, 16)
        kinds = record_kinds(world)
        world.flat_out(60, 16)
        everything_arrived(world, 60)
        results[kind] = (world.result(120), kinds)
    (real, real_kinds), (floor, floor_kinds) = results["real"], results["floor"]
    # The same messages reach the clients: DELIVERs one each, the senders'
    # DELIVEREDs and ACCEPTs (batched alike), and nothing else.
    assert floor_kinds["Deliver"] == real_kinds["Deliver"] == 120
    for kind in ("Delivered", "Delivereds", "Accept", "Accepts"):
        assert floor_kinds[kind] == real_kinds[kind], kind
    assert set(floor_kinds) <= set(real_kinds)
    # The same traffic, within a datagram or two.
    for key in ("datagrams_in_per_msg", "datagrams_out_per_msg"):
        assert floor[key] == pytest.approx(real[key], abs=0.05), key
    assert floor["dedup_rows_per_msg"] == 1.0


def test_a_lone_message_costs_the_floor_the_real_relays_datagrams_and_passes() -> None:
    results = {}
    for kind in ("real", "floor"):
        world = World(kind, 1, 1)
        kinds = record_kinds(world)
        world.one_at_a_time(20, cold=False)
        everything_arrived(world, 20)
        results[kind] = (world.result(20), kinds)
    (real, real_kinds), (floor, floor_kinds) = results["real"], results["floor"]
    # DELIVERED and ACCEPT once each per message, one datagram for both
    # (and the real relay's PRESENCE at a first contact, which the floor,
    # taking established conversations only, leaves out).
    assert real_kinds.pop("Presence") == 2
    assert floor_kinds == real_kinds
    assert real_kinds["Delivered"] == real_kinds["Accept"] == 20
    for key in ("datagrams_in_per_msg", "datagrams_out_per_msg"):
        assert floor[key] == pytest.approx(real[key], abs=0.1), key
    # Two passes a message (its SEND, its RECEIPT), and the drain's few.
    assert floor["passes_per_msg"] == pytest.approx(real["passes_per_msg"], abs=0.3)


def test_the_floor_verifies_macs_and_refuses_replays() -> None:
    world = World("floor", 1, 4)
    floor = world.floor
    assert floor is not None
    world.flat_out(3, 4)
    sender, receiver = world.senders[0], world.receivers[0]
    sender.fill(1)  # a fourth message, caught on its way
    sender.pump(world.now)
    (datagram,) = sender.sock.out  # type: ignore[attr-defined]
    sender.sock.out.clear()  # type: ignore[attr-defined]
    addr = world.addrs[id(sender)]
    forged = bytearray(datagram)
    forged[-30] ^= 1  # a bit of the SEND, under the MAC
    dropped = floor.counts["dropped"]
    floor.receive_datagram(bytes(forged), addr, world.now)
    assert floor.counts["dropped"] == dropped + 1 and floor.counts["messages"] == 3
    floor.receive_datagram(datagram, addr, world.now)
    assert floor.counts["messages"] == 4
    floor.receive_datagram(datagram, addr, world.now)  # the same datagram again
    assert floor.counts["dropped"] == dropped + 2 and floor.counts["messages"] == 4
    for _ in range(20):
        world.step(False)
    assert receiver.received == 4 and receiver.duplicates == 0
    assert sender.completed == 4


def test_the_floor_dedups_a_message_id_sent_twice() -> None:
    world = World("floor", 1, 4)
    floor = world.floor
    assert floor is not None
    world.flat_out(2, 4)
    sender, receiver = world.senders[0], world.receivers[0]
    again = encode_message(Send(MsgId(sender.instance_id, sender.next_seq), "r0", "twice"))
    sender.next_seq += 1
    sender.conn.send(again, sender.stream)
    sender.conn.send(again, sender.stream)  # its client's resend, before any answer
    sender.dirty = True
    delivereds: list[MsgId] = []
    original = sender.on_message

    def on_message(message: Any, now_ns: int) -> None:
        if type(message).__name__ == "Delivered":
            delivereds.append(message.msg_id)
        original(message, now_ns)

    sender.on_message = on_message  # type: ignore[method-assign]
    for _ in range(20):
        world.step(False)
    assert receiver.received == 3 and receiver.duplicates == 0
    assert floor.counts["messages"] == 3 and floor.counts["duplicates"] == 1
    assert delivereds == [MsgId(sender.instance_id, sender.next_seq - 1)]


def test_the_floor_resends_what_is_lost_and_acks_what_arrives() -> None:
    world = World("floor", 2, 8)
    floor = world.floor
    assert floor is not None
    seen = collections.Counter[bool]()

    def lose(data: bytes, inbound: bool) -> bool:
        seen[inbound] += 1
        return seen[inbound] % (5 if inbound else 3) == 0  # every fifth in, every third out

    world.lose = lose
    for _ in range(4000):  # 20 s: the clients' and the floor's timeouts (0.2 s and up)
        for sender in world.senders:
            sender.fill(min(8, 30 - sender.sent))
        world.step(False, 0.005)
        if all(s.completed == 30 for s in world.senders):
            break
    everything_arrived(world, 30)
    assert floor.counts["resent"] > 0
    assert floor.counts["messages"] == floor.counts["receipts"] == 60


def test_the_floor_owes_a_durable_dedup_row_per_message() -> None:
    world = World("floor", 1, 4)
    floor = world.floor
    assert floor is not None
    rows: list[tuple[Any, ...]] = []
    flush = floor.flush

    def keep() -> list[tuple[Any, ...]]:
        done = flush()
        rows.extend(done)
        return done

    floor.flush = keep  # type: ignore[method-assign]
    world.flat_out(5, 4)
    sender = world.senders[0]
    assert [(r[0].key, r[1], r[2], r[5], r[7]) for r in rows] == [
        ("s0", sender.instance_id, seq, "r0", b"r0") for seq in range(1, 6)
    ]
    assert len({r[3] for r in rows}) == 5  # each its own server_msg_id
    assert all(r[6].decode().isprintable() and len(r[6]) == 64 for r in rows)  # the text


def test_the_deferred_store_withdraws_only_what_it_has_not_committed() -> None:
    world = World("real", 1, 4)
    store = world.store
    assert isinstance(store, DeferredStore)
    world.one_at_a_time(5, cold=False)
    assert store.withdrawn == 5 and store.written == 0  # receipted before any commit
    relay = world.relay
    relay_hold = relay.flush_store

    def flush_now(now: float) -> None:  # a commit at once: the receipts come too late
        relay._expecting.clear()
        relay._hold_until = None
        relay_hold(now)

    relay.flush_store = flush_now  # type: ignore[method-assign]
    world.reset()
    world.one_at_a_time(10, cold=False)
    assert store.written == 5 and store.withdrawn == 0
    everything_arrived(world, 10)


def test_the_side_measurements_give_figures() -> None:
    costs = syscall_costs(100, 200, cold=False, rounds=16)
    assert costs["recvfrom_us"] > 0 and costs["sendto_us"] > 0
    store = store_costs(batch=16, reps=2)
    assert set(store) == {"dedup_row_us", "written_us", "commit_us", "log_row_us", "log_commit_us"}
    assert store["commit_us"] > 0  # (per row, a small batch's figures are noise)
    assert FloorRelay.store is None


def test_the_floor_relays_on_real_sockets_in_a_process_of_its_own() -> None:
    run = live("floor", "lone", 0.3)
    assert run["messages"] > 10
    # A lone message: its SEND and its RECEIPT in, the DELIVER and the
    # DELIVERED + ACCEPT out, each datagram a pass of its own.
    assert run["datagrams_in_per_msg"] == pytest.approx(2.0, abs=0.1)
    assert run["datagrams_out_per_msg"] == pytest.approx(2.0, abs=0.1)
    assert run["cpu_us_per_msg"] > 0
