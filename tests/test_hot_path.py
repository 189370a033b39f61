"""The hot path (issue 18 item 3): the shortcuts on the way from `recvfrom`
to `sendto` give exactly what the long way gives.

- `mac_tag` keeps each key's padded HMAC states and copies them: it must
  be HMAC-SHA-256 (cut to TAG_SIZE) for every key and message, and never
  hand the GIL away (the one-shot `hmac.digest` does, on every datagram);
- a chunk's STREAM frame is packed once when it is queued
  (`stream_frame`) and datagrams are sealed from frame bytes (`seal`):
  byte for byte what `encode_frame` / `encode_packet` make of the records,
  on a lossy, duplicating link where chunks go again;
- `Connection.unseen` is the chunks `seen` says are new, and the relay
  charges a datagram's new chunks once, as it did, when the connection
  took them all (the shortcut), and only those it took when it refused any.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import sys
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    MAX_DATAGRAM,
    TAG_SIZE,
    Ack,
    Frame,
    LocalProtocolError,
    MsgId,
    Packet,
    PathResponse,
    Ping,
    Send,
    Stream,
    conversation_stream,
    decode_packet,
    encode_frame,
    encode_message,
    encode_packet,
    mac_tag,
    seal,
    stream_frame,
)
from reliability import CHUNK_SIZE, MAX_WINDOW
from tests.test_bounds import World
from tests.test_reliability import KEY, SESSION, Peer, Sim, connection

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
U8 = st.integers(0, 255)


# --- the MAC ------------------------------------------------------------------------


@settings(max_examples=300)
@given(key=st.binary(max_size=130), data=st.binary(max_size=MAX_DATAGRAM + 100))
def test_mac_tag_is_hmac_sha256_cut_to_the_tag_size(key: bytes, data: bytes) -> None:
    # Keys longer than SHA-256's block are hashed first (RFC 2104): 65+ bytes.
    expected = hmac.new(key, data, hashlib.sha256).digest()[:TAG_SIZE]
    assert mac_tag(key, data) == expected
    assert mac_tag(key, data) == expected  # again, from the kept states


def test_mac_tag_keeps_no_state_between_messages() -> None:
    """The kept states are copied, never updated: a tag depends on its own
    message only, whatever was tagged before under the same key."""
    first = mac_tag(KEY, b"first")
    mac_tag(KEY, b"x" * 5000)
    assert mac_tag(KEY, b"first") == first


def test_mac_tag_does_not_release_the_gil() -> None:
    """`hmac.digest` releases the GIL around OpenSSL's one-shot HMAC, for a
    datagram too: on the server the store thread takes it there, and the
    loop waits to get it back, datagram after datagram. Here the switch
    interval is an hour, so the other thread, which gives the GIL back at
    once (`sleep(0)`) and then wants it again, gets it only when this one
    releases it: its counter must not move while tags are computed."""
    data = bytes(MAX_DATAGRAM)
    mac_tag(KEY, data)  # the key's states made before the race starts
    ticks = [0]
    stop = threading.Event()

    def other() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(3600.0)
    thread = threading.Thread(target=other)
    try:
        thread.start()
        time.sleep(0.01)  # it runs, and then waits for the GIL
        before = ticks[0]
        for _ in range(200):
            mac_tag(KEY, data)
        after = ticks[0]
    finally:
        stop.set()
        thread.join(10)
        sys.setswitchinterval(interval)
    assert before > 0
    assert after == before


# --- frames packed once, datagrams sealed from bytes --------------------------------


@given(
    seq=U64,
    stream=U32,
    stream_seq=U32,
    count=st.integers(1, 255),
    data=st.binary(max_size=CHUNK_SIZE),
)
def test_stream_frame_is_the_records_encoding(
    seq: int, stream: int, stream_seq: int, count: int, data: bytes
) -> None:
    for index in {0, count - 1}:
        record = Stream(seq, stream, stream_seq, index, count, data)
        assert stream_frame(seq, stream, stream_seq, index, count, data) == encode_frame(record)


@pytest.mark.parametrize(
    "fields",
    [(-1, 0, 0, 0, 1), (2**64, 0, 0, 0, 1), (0, 2**32, 0, 0, 1), (0, 0, 0, 256, 1)],
)
def test_stream_frame_refuses_what_does_not_fit_like_encode_frame(
    fields: tuple[int, int, int, int, int],
) -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(Stream(*fields, b"x"))
    with pytest.raises(LocalProtocolError):
        stream_frame(*fields, b"x")


FRAMES = st.lists(
    st.one_of(
        st.builds(Ack, U64, U32, U64, st.just(())),
        st.just(Ping()),
        st.builds(PathResponse, st.binary(min_size=8, max_size=8)),
        st.builds(Stream, U64, U32, U32, st.just(0), st.just(1), st.binary(max_size=200)),
    ),
    min_size=1,
    max_size=4,
)


@given(frames=FRAMES, pkt=U64, tagged=st.booleans())
def test_seal_gives_encode_packets_bytes(frames: list[Frame], pkt: int, tagged: bool) -> None:
    key = KEY if tagged else None
    packet = Packet(SESSION, pkt, tuple(frames))
    body = b"".join(encode_frame(f) for f in frames)
    assert seal(SESSION, pkt, body, key) == encode_packet(packet, key)


def test_seal_refuses_a_datagram_over_the_limit_and_a_bad_session_id() -> None:
    with pytest.raises(LocalProtocolError, match="exceeds"):
        seal(SESSION, 1, bytes(MAX_DATAGRAM), KEY)
    with pytest.raises(LocalProtocolError, match="16 bytes"):
        seal(SESSION[:8], 1, b"", KEY)


@pytest.mark.parametrize("seed", range(4))
def test_every_datagram_a_connection_sends_is_its_records_encoding(seed: int) -> None:
    """On a lossy, duplicating, reordering link (so chunks are resent, acks
    carry ranges, and long messages go as fragments), each datagram either
    side sends is what `encode_packet` makes of the frames it decodes to,
    and every message arrives."""
    sim = Sim(seed, loss=0.2, dup=0.1, delay=(0.005, 0.03))
    seen: list[bytes] = []
    sim.on_send = lambda side, datagram: seen.append(datagram)
    rng = random.Random(seed)
    sent = []
    for i in range(60):
        payload = bytes([i]) * rng.choice([1, 50, 900, CHUNK_SIZE + 1, 3 * CHUNK_SIZE])
        sent.append(payload)
        sim.send(i % 2, payload, stream=rng.randrange(3))
        sim.run_until(sim.now + 0.002)
    sim.run_until(sim.now + 120, lambda: sum(map(len, sim.received)) == len(sent))
    assert sorted(e.payload for side in sim.received for e in side) == sorted(sent)
    assert len(seen) > 100
    for datagram in seen:
        packet = decode_packet(datagram, KEY)
        assert encode_packet(packet, KEY) == datagram


# --- new chunks, reckoned once ------------------------------------------------------


@settings(max_examples=50)
@given(arrived=st.lists(st.integers(0, 40), max_size=30), asked=st.lists(U8, max_size=12))
def test_unseen_is_the_chunks_seen_calls_new(arrived: list[int], asked: list[int]) -> None:
    conn = connection()
    peer = Peer()
    for seq in arrived:  # out of order and repeated: `_una` and the set above it
        conn.receive_datagram(peer.packet(Stream(seq, 1, seq, 0, 1, b"x")), 0.0)
    frames: tuple[Frame, ...] = tuple(
        Stream(seq % 50, 1, seq % 50, 0, 1, b"y") if seq % 3 else Ping() for seq in asked
    )
    expected = [f for f in frames if isinstance(f, Stream) and not conn.seen(f.seq)]
    assert conn.unseen(frames) == expected


def test_chunks_taken_counts_new_chunks_only() -> None:
    conn = connection()
    peer = Peer()
    conn.receive_datagram(
        peer.packet(Stream(0, 1, 0, 0, 1, b"a"), Stream(2, 1, 2, 0, 1, b"c")), 0.0
    )
    assert conn.chunks_taken == 2
    # A copy of one taken, and the gap's chunk: one new.
    conn.receive_datagram(
        peer.packet(Stream(2, 1, 2, 0, 1, b"c"), Stream(1, 1, 1, 0, 1, b"b")), 0.0
    )
    assert conn.chunks_taken == 3


def _send_frames(world: World, name: str, texts: list[str]) -> tuple[bytes, int]:
    """One datagram from `name` carrying a SEND per text, and its payload bytes."""
    client = world.clients[name]
    size = 0
    for i, text in enumerate(texts):
        payload = encode_message(Send(MsgId(7, i + 1), "r", text))
        client.conn.send(payload, conversation_stream("r"))
        size += len(payload)
    (datagram,) = client.conn.datagrams_to_send(world.now)
    return datagram, size


def spent(world: World, name: str) -> tuple[float, float]:
    user = world.relay.users[name]
    assert user.msg_bucket is not None and user.byte_bucket is not None
    return (
        user.msg_bucket.burst - user.msg_bucket.tokens,
        user.byte_bucket.burst - user.byte_bucket.tokens,
    )


def test_a_datagram_of_new_chunks_is_charged_once_for_all_of_them() -> None:
    world = World(user_byte_rate=1e-6, user_msg_rate=1e-6, user_byte_burst=64 * 1024,
                  user_msg_burst=100)  # fmt: skip
    world.login("r")
    s = world.login("s")
    datagram, size = _send_frames(world, "s", ["one", "two", "three"])
    world.relay.receive_datagram(datagram, s.addr, world.now)
    messages, paid = spent(world, "s")
    assert messages == pytest.approx(3, abs=1e-3)
    assert paid == pytest.approx(size, abs=1e-3)
    # The same datagram again (a replay): nothing new, nothing paid.
    world.relay.receive_datagram(datagram, s.addr, world.now)
    assert spent(world, "s") == pytest.approx((messages, paid), abs=1e-3)


def test_a_datagram_whose_chunks_are_partly_refused_pays_for_those_taken() -> None:
    """Chunks beyond the receive window are refused (not acked: resent
    later); the budgets pay for the one the connection took, not for all
    three that were new."""
    world = World(user_byte_rate=1e-6, user_msg_rate=1e-6, user_byte_burst=64 * 1024,
                  user_msg_burst=100)  # fmt: skip
    world.login("r")
    s = world.login("s")
    session: Any = world.session_of(s)
    base = session.conn._una
    window = 2 * MAX_WINDOW
    stream = conversation_stream("r")
    payload = encode_message(Send(MsgId(7, 1), "r", "taken"))
    far = encode_message(Send(MsgId(7, 2), "r", "too far"))
    peer = Peer(s.conn.session_id, s.conn.key)
    peer.next_pkt = s.conn.next_pkt + 10
    datagram = peer.packet(
        Stream(base, stream, 0, 0, 1, payload),
        Stream(base + window + 10, stream, 1, 0, 1, far),
        Stream(base + window + 11, stream, 2, 0, 1, far),
    )
    world.relay.receive_datagram(datagram, s.addr, world.now)
    assert session.conn.seen(base) and not session.conn.seen(base + window + 10)
    messages, paid = spent(world, "s")
    assert messages == pytest.approx(1, abs=1e-3)
    assert paid == pytest.approx(len(payload), abs=1e-3)


def test_the_protocol_module_still_tags_with_hmac_sha256() -> None:
    """A datagram tagged by `encode_packet` verifies under the standard
    HMAC (what any other implementation of the protocol computes)."""
    data = encode_packet(Packet(SESSION, 5, (Ping(),)), KEY)
    body, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
    assert tag == hmac.new(KEY, body, hashlib.sha256).digest()[:TAG_SIZE]
    assert protocol.decode_packet(data, KEY).frames == (Ping(),)
