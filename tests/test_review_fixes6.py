"""Reviewers' findings of the sixth session, each pinned: a client of the
previous protocol version is answered with VERSION rather than sent a
GROUP_BATCH it cannot read; the cluster's store applies a `MarkDelivereds`
(it was never applied nor acknowledged there); a membership request that
changes nothing does not wait for the fan-out budget (it was reckoned a
post to every member)."""

from __future__ import annotations

import zlib
from collections.abc import Callable

from protocol import VERSION, GroupAction, GroupResult, VersionFrame, decode_packet
from server_store import (
    MarkDelivered,
    MarkDelivereds,
    MemoryStore,
    ReadMailbox,
    ReadNotices,
    StoreMessage,
)
from tests.clients import ScriptedLogin
from tests.redis_fixture import redis_server  # noqa: F401
from tests.test_bounds import Client, World
from tests.test_cluster_node import Node, message, nodes  # noqa: F401
from tests.test_groups_relay import GroupWorld, entries, texts

# --- the protocol version of GROUP_BATCH ------------------------------------------


def test_a_client_of_version_2_gets_the_version_reply() -> None:
    """GROUP_BATCH (kind 31) came after version 2: a client of version 2
    would take it for an unknown kind, so its HELLO is answered with the
    VERSION frame (as version 1's was when the batch kinds 15-17 came)."""
    assert VERSION == 3
    world = World()
    hello = bytearray(ScriptedLogin("alice", now=world.now).hello)
    hello[4] = 2  # the version byte, as the previous release sends it
    hello[-4:] = zlib.crc32(hello[:-4]).to_bytes(4, "big")
    out = world.relay.handle_datagram(bytes(hello), ("198.51.100.1", 5000), world.now)
    assert [decode_packet(data).frames for data, _ in out] == [(VersionFrame(VERSION),)]
    assert world.relay.drops.counts["unsupported version"] == 1
    assert world.login("alice").name == "alice"  # this version's client logs in


# --- MarkDelivereds in cluster mode (review4 #2) ---------------------------------


def test_the_cluster_store_applies_mark_delivereds(nodes: Callable[[str], Node]) -> None:  # noqa: F811
    """Receipts whose DELIVEREDs the sender's client acked together
    (`Relay._receipts_acked`) are one `MarkDelivereds`: RedisStore applies
    each item as its `MarkDelivered` (out of the mailbox, its size down),
    queues no receipt for a sender already told, and acknowledges it."""
    a = nodes("A")
    for seq, text in enumerate(("m1", "m2", "m3"), 1):
        a.run(StoreMessage(message(text, seq, 6 + seq)))
    rows, _ = a.read(ReadMailbox("bob", -1, 10, 1 << 20))
    marks = [MarkDelivered(m.server_msg_id, "alice", 42, m.client_seq, "Bob", "bob", 2, 0, True)
             for m in rows[:2]]  # fmt: skip
    a.run(MarkDelivereds(marks))  # waits for its callback: acknowledged
    left, _ = a.read(ReadMailbox("bob", -1, 10, 1 << 20))
    assert [m.text for m in left] == ["m3"]
    assert a.events.of("size")[-1] == ("size", "bob", 1, 2)
    assert a.read(ReadNotices("alice", -1, 10)) == ([], False)  # told: nothing queued
    a.run(MarkDelivered(left[0].server_msg_id, "alice", 42, 3, "Bob", "bob", 2, 0))
    notices, _ = a.read(ReadNotices("alice", -1, 10))
    assert [row[1:] for row in notices] == [(42, 3, "Bob")]  # not told: queued as before


# --- a membership request and the fan-out budget (review3 #4) ---------------------


def in_debt() -> tuple[GroupWorld, Client]:
    """alice and 30 others in #team, a budget of 10 copies/s (burst 20),
    and a post of 30 copies just made: her budget is 10 in debt."""
    world = GroupWorld(MemoryStore(), max_fanout_rate=10.0, max_fanout_burst=20.0)
    alice = world.login("alice")
    names = [f"m{n}" for n in range(30)]
    for name in [*names, "dave"]:
        world.login(name)
    assert world.result(alice, world.request(alice, GroupAction.CREATE, "team", *names)).code == 0
    for _ in range(400):
        world.step(0.01)  # 4 s: the budget is full again
    world.post(alice, "team", "hello", 1)
    world.step(0.01)
    return world, alice


def answered_after(world: GroupWorld, alice: Client, request_id: int) -> tuple[float, str]:
    start = world.now
    world.run_until(lambda: any(r.request_id == request_id for r in alice.of(GroupResult)),
                    1000, "the answer")  # fmt: skip
    answer = [r for r in alice.of(GroupResult) if r.request_id == request_id][-1]
    return world.now - start, answer.message


def test_an_add_that_changes_nothing_is_answered_at_once_in_debt() -> None:
    """Adding a member again makes no copy: answered in the pass it comes
    (it waited 3.2 s of fake time, reckoned as a post to all 31), and the
    budget is still owed: the next post waits for it."""
    world, alice = in_debt()
    waited, text = answered_after(world, alice, world.request(alice, GroupAction.ADD, "team", "m0"))
    assert text == "already members" and waited <= 0.02
    assert not world.relay.stats.get("held_fanout")
    withheld = world.relay.stats["withheld_fanout"]
    world.post(alice, "team", "again", 2)
    world.step(0.01)
    assert world.relay.stats["withheld_fanout"] > withheld
    member = world.clients["m1"]
    world.run_until(lambda: texts(member)[-1:] == ["again"], 1000, "the next post")


def test_an_add_that_changes_something_still_waits_for_the_budget() -> None:
    """An add of someone new makes an entry for every member: it waits
    for the budget where it is numbered (`_change_cost`), as before."""
    world, alice = in_debt()
    waited, text = answered_after(
        world, alice, world.request(alice, GroupAction.ADD, "team", "dave")
    )
    assert text != "already members" and waited >= 1.0
    assert world.relay.stats["held_fanout"] == 1  # where it is numbered, as a hold
    dave = world.clients["dave"]
    world.run_until(lambda: any(e[1] == "added" for e in entries(dave)), 300, "dave's entry")
