"""Reviewers' findings of the sixth session, each pinned: a client of the
previous protocol version is answered with VERSION rather than sent a
GROUP_BATCH it cannot read."""

from __future__ import annotations

import zlib

from protocol import VERSION, VersionFrame, decode_packet
from tests.clients import ScriptedLogin
from tests.test_bounds import World

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
