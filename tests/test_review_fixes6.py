"""Reviewers' findings of the sixth session, each pinned: a client of the
previous protocol version is answered with VERSION rather than sent a
GROUP_BATCH it cannot read; the cluster's store applies a `MarkDelivereds`
(it was never applied nor acknowledged there)."""

from __future__ import annotations

import zlib
from collections.abc import Callable

from protocol import VERSION, VersionFrame, decode_packet
from server_store import MarkDelivered, MarkDelivereds, ReadMailbox, ReadNotices, StoreMessage
from tests.clients import ScriptedLogin
from tests.redis_fixture import redis_server  # noqa: F401
from tests.test_bounds import World
from tests.test_cluster_node import Node, message, nodes  # noqa: F401

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
