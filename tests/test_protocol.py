"""Pure tests of the wire format in `protocol.py`: hypothesis round trips of
every frame and message kind, garbage input (only `RemoteProtocolError` may
come out of a decoder), MAC checks, names, text limits and the size rules
that keep us from amplifying traffic."""

from __future__ import annotations

import dataclasses
import functools
import struct
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    BATCH_MAX,
    CRC,
    FRAME_CLASSES,
    FRAME_HEADER,
    HEADER,
    MAGIC,
    MAX_DATAGRAM,
    MAX_TEXT_BYTES,
    MESSAGE_CLASSES,
    MIN_PREAUTH_REQUEST,
    NO_SESSION,
    PREAUTH_FRAMES,
    TAG_SIZE,
    VERSION,
    Ack,
    BadTag,
    Deliver,
    ErrorCode,
    GroupDeliver,
    GroupEvent,
    Hello,
    LocalProtocolError,
    MsgId,
    Packet,
    Padding,
    Ping,
    Presence,
    RemoteProtocolError,
    Send,
    Stream,
    UnsupportedVersion,
    VersionFrame,
    check_text,
    decode_header,
    decode_message,
    decode_packet,
    encode_frame,
    encode_message,
    encode_packet,
    mac_tag,
    name_key,
    normalize_name,
    version_reply,
)
from tests.test_accounts import PINNED_ACCOUNT_MESSAGES
from tests.test_groups_protocol import PINNED_GROUP_MESSAGES

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SESSION = bytes(range(100, 116))


# --- strategies -------------------------------------------------------------

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)


def _ranges(max_ranges: int) -> st.SearchStrategy[tuple[tuple[int, int], ...]]:
    one = st.tuples(U64, U32).map(lambda sl: (sl[0], sl[0] + sl[1]))
    return st.lists(one, max_size=max_ranges).map(tuple)


def _kind_strategy(kind: str, text_size: int) -> st.SearchStrategy[Any]:
    """A value for one wire type of a SPEC (see `protocol._FIXED_FORMATS`)."""
    strategies: dict[str, st.SearchStrategy[Any]] = {
        "u8": st.integers(0, 0xFF),
        "u16": st.integers(0, 0xFFFF),
        "u32": U32,
        "u64": U64,
        **{f"b{n}": st.binary(min_size=n, max_size=n) for n in (8, 16, 32, 64, 256)},
        "bool": st.booleans(),
        "str": st.text(max_size=text_size),
        "text": st.text(max_size=text_size),
        "strs": st.lists(st.text(max_size=12), max_size=6).map(tuple),
        "msgid": st.builds(MsgId, U64, U64),
        "code": st.sampled_from(ErrorCode),
        "ranges": _ranges(16),
        # Batches: 1..BATCH_MAX items (other sizes: test_batch_sizes_outside_the_limits).
        "accepts": st.lists(
            st.tuples(st.builds(MsgId, U64, U64), U64), min_size=1, max_size=BATCH_MAX
        ).map(tuple),
        "msgids": st.lists(st.builds(MsgId, U64, U64), min_size=1, max_size=BATCH_MAX).map(tuple),
        "u64s": st.lists(U64, min_size=1, max_size=BATCH_MAX).map(tuple),
        # A GROUP_BATCH's entries (tests/test_fanout_chunk.py has more).
        "entries": st.lists(
            st.deferred(lambda: instances(GroupDeliver) | instances(GroupEvent)),
            min_size=1,
            max_size=4,
        ).map(tuple),
        "rest": st.binary(max_size=4 * text_size),
    }
    return strategies[kind]


@functools.cache  # made once per kind: building the strategies was most of the tests' CPU
def instances(cls: type, text_size: int = 24) -> st.SearchStrategy[Any]:
    """Any instance of a frame or message class, built from its SPEC, so a new
    kind is covered without touching this file."""
    spec: tuple[str, ...] = cls.SPEC  # type: ignore[attr-defined]
    return st.builds(cls, *[_kind_strategy(kind, text_size) for kind in spec])


ANY_FRAME = st.one_of(*[instances(cls) for cls in FRAME_CLASSES.values()])
PREAUTH_FRAME = st.one_of(*[instances(cls) for cls in PREAUTH_FRAMES])
FRAME_IDS = [cls.__name__ for cls in FRAME_CLASSES.values()]
MESSAGE_IDS = [cls.__name__ for cls in MESSAGE_CLASSES.values()]


def packet_size(packet: Packet, key: bytes | None) -> int:
    body = sum(len(encode_frame(f)) for f in packet.frames)
    return HEADER.size + body + (TAG_SIZE if key is not None else CRC.size)


def sample_datagram() -> bytes:
    """A valid MAC'd datagram with a few kinds of frame."""
    frames = (
        Ack(largest_pkt=7, delay_us=1234, una=3, ranges=((5, 6), (8, 10))),
        Stream(seq=3, stream=1, stream_seq=0, index=0, count=1, data="héllo 😀".encode()),
        Ping(),
    )
    return encode_packet(Packet(SESSION, 42, frames), KEY)


# --- round trips --------------------------------------------------------------


def test_every_kind_is_covered() -> None:
    assert set(FRAME_CLASSES) == {cls.TYPE for cls in FRAME_CLASSES.values()}  # type: ignore[attr-defined]
    assert set(MESSAGE_CLASSES) == {cls.KIND for cls in MESSAGE_CLASSES.values()}  # type: ignore[attr-defined]
    assert len(FRAME_CLASSES) >= 9 and len(MESSAGE_CLASSES) >= 13


@pytest.mark.parametrize("cls", list(FRAME_CLASSES.values()), ids=FRAME_IDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_frame_round_trip(cls: type, data: st.DataObject) -> None:
    frame = data.draw(instances(cls))
    pkt_num = data.draw(U64)
    packet = Packet(SESSION, pkt_num, (frame,))
    wire = encode_packet(packet, KEY)
    assert len(wire) <= MAX_DATAGRAM
    assert decode_packet(wire, KEY) == packet
    if cls in PREAUTH_FRAMES:
        plain = Packet(NO_SESSION, pkt_num, (frame,))
        assert decode_packet(encode_packet(plain, None)) == plain
    else:
        # Post-login frames never count without a MAC.
        with pytest.raises(RemoteProtocolError):
            decode_packet(encode_packet(Packet(SESSION, pkt_num, (frame,)), None))


@pytest.mark.parametrize("cls", list(MESSAGE_CLASSES.values()), ids=MESSAGE_IDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_message_round_trip(cls: type, data: st.DataObject) -> None:
    message = data.draw(instances(cls, text_size=200))
    wire = encode_message(message)
    assert wire[0] == cls.KIND  # type: ignore[attr-defined]
    decoded = decode_message(wire)
    assert type(decoded) is cls
    assert decoded == message


@settings(max_examples=150, deadline=None)
@given(
    frames=st.lists(ANY_FRAME, min_size=1, max_size=6),
    pkt_num=U64,
    session=st.binary(min_size=16, max_size=16),
    pad_to=st.integers(0, MAX_DATAGRAM),
)
def test_packet_round_trip_with_key(
    frames: list[Any], pkt_num: int, session: bytes, pad_to: int
) -> None:
    packet = Packet(session, pkt_num, tuple(frames))
    size = packet_size(packet, KEY)
    padded = size if size >= pad_to else max(pad_to, size + FRAME_HEADER.size)
    if padded > MAX_DATAGRAM:
        with pytest.raises(LocalProtocolError):
            encode_packet(packet, KEY, pad_to=pad_to)
        return
    wire = encode_packet(packet, KEY, pad_to=pad_to)
    assert len(wire) == padded
    decoded = decode_packet(wire, KEY)
    if size >= pad_to:
        assert decoded == packet
    else:
        assert decoded.frames[:-1] == packet.frames
        assert isinstance(decoded.frames[-1], Padding)
    # The same datagram under another key, or read as pre-login, is refused.
    with pytest.raises(BadTag):
        decode_packet(wire, OTHER_KEY)
    with pytest.raises(RemoteProtocolError):
        decode_packet(wire)


@settings(max_examples=100, deadline=None)
@given(frames=st.lists(PREAUTH_FRAME, min_size=1, max_size=4), pkt_num=U64)
def test_packet_round_trip_without_key(frames: list[Any], pkt_num: int) -> None:
    packet = Packet(NO_SESSION, pkt_num, tuple(frames))
    if packet_size(packet, None) > MAX_DATAGRAM:
        with pytest.raises(LocalProtocolError):
            encode_packet(packet, None)
        return
    wire = encode_packet(packet, None)
    assert decode_packet(wire) == packet
    with pytest.raises(BadTag):  # a session expects a tag
        decode_packet(wire, KEY)


# --- garbage in: only RemoteProtocolError out --------------------------------


def _our_header(flags: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, flags, SESSION, 9)


#: Bytes of every shape: random, with our header, and with a valid tag over a
#: random body (so the frame parser behind the MAC gets fuzzed too).
GARBAGE = st.one_of(
    st.binary(max_size=MAX_DATAGRAM + 100),
    st.builds(lambda flags, body: _our_header(flags) + body, st.integers(0, 255), st.binary()),
    st.builds(lambda body: (h := _our_header(1) + body) + mac_tag(KEY, h), st.binary()),
    st.builds(
        lambda frame_type, body: _our_header(0) + FRAME_HEADER.pack(frame_type, len(body)) + body,
        st.integers(0, 255),
        st.binary(max_size=200),
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=GARBAGE)
def test_decoders_raise_only_remote_protocol_error(data: bytes) -> None:
    for decode in (
        lambda: decode_packet(data),
        lambda: decode_packet(data, KEY),
        lambda: decode_header(data),
        lambda: decode_message(data),
        lambda: decode_message(data[HEADER.size :]),
    ):
        try:
            decode()
        except RemoteProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(MESSAGE_CLASSES)), body=st.binary(max_size=120))
def test_decode_message_of_garbage_bodies(kind: int, body: bytes) -> None:
    try:
        message = decode_message(bytes([kind]) + body)
    except RemoteProtocolError:
        return
    # Whatever decodes re-encodes to the very same bytes (no silent slack).
    assert encode_message(message) == bytes([kind]) + body


def test_every_truncation_of_a_tagged_datagram_is_rejected() -> None:
    wire = sample_datagram()
    assert decode_packet(wire, KEY).pkt_num == 42
    for length in range(len(wire)):
        with pytest.raises(RemoteProtocolError):
            decode_packet(wire[:length], KEY)


def test_every_bit_flip_of_a_tagged_datagram_is_rejected() -> None:
    wire = sample_datagram()
    for bit in range(len(wire) * 8):
        flipped = bytearray(wire)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(RemoteProtocolError):
            decode_packet(bytes(flipped), KEY)


def test_a_flip_behind_the_header_is_caught_by_the_mac() -> None:
    wire = sample_datagram()
    for pos in range(HEADER.size, len(wire)):
        flipped = bytearray(wire)
        flipped[pos] ^= 0x80
        with pytest.raises(BadTag):
            decode_packet(bytes(flipped), KEY)


def test_oversized_datagram_is_refused() -> None:
    wire = sample_datagram()
    with pytest.raises(RemoteProtocolError):
        decode_header(wire + bytes(MAX_DATAGRAM))


# --- names ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["alice", "Bob_1", "a.b-c", "Zoë", "名前", "Ирина", "عمر", "٣٤٥", "x", "a" * 32, "é" * 32],
)
def test_normalize_name_accepts(name: str) -> None:
    shown = normalize_name(name)
    assert shown == unicodedata.normalize("NFKC", name)
    assert normalize_name(shown) == shown


def test_normalize_name_returns_the_nfkc_form() -> None:
    assert normalize_name("ａｌｉｃｅ") == "alice"  # fullwidth
    assert normalize_name("e\u0301") == "é"  # combining accent composes


BIDI_CONTROLS = [chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))]


@pytest.mark.parametrize(
    "name",
    [
        "",
        " ",
        "\u3000",
        "a" * 33,
        "é" * 33,
        "al ice",
        "al\u00a0ice",
        "al\tice",
        "a\x00b",
        "a\nb",
        "a\x7fb",
        "a\u200bb",  # zero width space
        "bob!",
        "<script>",
        "a/b",
        "server",
        "SERVER",
        "Admin",
        "sYsTeM",
        "ｓｅｒｖｅｒ",
        "ſerver",  # long s folds to "server"
        *[f"ev{c}il" for c in BIDI_CONTROLS],
        *[f"{c}alice" for c in BIDI_CONTROLS],
    ],
)
def test_normalize_name_rejects(name: str) -> None:
    with pytest.raises(LocalProtocolError):
        normalize_name(name)


def test_normalize_name_rejects_non_text() -> None:
    with pytest.raises(LocalProtocolError):
        normalize_name(b"alice")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=40))
def test_normalize_name_only_lets_valid_names_through(name: str) -> None:
    try:
        shown = normalize_name(name)
    except LocalProtocolError:
        return
    assert 1 <= len(shown) <= 32
    for ch in shown:
        assert unicodedata.category(ch)[0] == "L" or unicodedata.category(ch) == "Nd" or ch in "_-."
    assert name_key(shown) not in {"server", "admin", "system"}
    assert normalize_name(shown) == shown


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("ALICE", "alice"),
        ("Alice", "aLiCe"),
        ("ａｌｉｃｅ", "alice"),  # fullwidth letters
        ("ＡＬＩＣＥ", "alice"),
        ("Straße", "STRASSE"),
        ("é", "e\u0301"),
        ("Ǆ", "dž"),
    ],
)
def test_name_key_is_case_insensitive_nfkc(one: str, other: str) -> None:
    assert name_key(one) == name_key(other)


def test_name_key_keeps_different_names_apart() -> None:
    assert name_key("alice") != name_key("alicf")
    assert name_key("bob") != name_key("bob.")


# --- text -------------------------------------------------------------------


def _text_of_64_kib(unit: str) -> str:
    size = len(unit.encode())
    return unit * (MAX_TEXT_BYTES // size) + "a" * (MAX_TEXT_BYTES % size)


@pytest.mark.parametrize("unit", ["a", "é", "漢", "😀"])
def test_check_text_accepts_exactly_64_kib(unit: str) -> None:
    text = _text_of_64_kib(unit)
    assert len(text.encode()) == MAX_TEXT_BYTES == 64 * 1024
    assert check_text(text) == text.encode()


@pytest.mark.parametrize("extra", ["a", "é", "漢", "😀"])
@pytest.mark.parametrize("unit", ["a", "é", "漢", "😀"])
def test_check_text_refuses_more_than_64_kib(unit: str, extra: str) -> None:
    text = _text_of_64_kib(unit) + extra
    with pytest.raises(LocalProtocolError):
        check_text(text)


def test_check_text_refuses_lone_surrogates() -> None:
    with pytest.raises(LocalProtocolError):
        check_text("a\ud800b")


def test_largest_allowed_text_fits_in_send_and_deliver() -> None:
    """A message `check_text` accepts must be encodable: 64 KiB of UTF-8 is
    allowed (README, "Limits"), so SEND and DELIVER must carry 65,536 bytes of text."""
    text = "é漢😀" * 7281 + "漢😀"
    assert check_text(text) and len(text.encode()) == MAX_TEXT_BYTES
    refused = []
    for message in (
        Send(MsgId(1, 2), "bob", text),
        Deliver(7, MsgId(1, 2), "alice", text, 1_700_000_000_000),
    ):
        try:
            wire = encode_message(message)
        except LocalProtocolError as exc:  # keep the 64 KiB repr out of the report
            refused.append(f"{type(message).__name__}: {str(exc)[-50:]}")
            continue
        assert decode_message(wire) == message
    assert not refused, f"64 KiB of text (allowed by check_text) cannot be encoded: {refused}"


# --- sizes: no amplification, at most 1200 bytes ---------------------------------


def test_version_reply_is_never_larger_than_the_request() -> None:
    smallest = version_reply(MAX_DATAGRAM)
    assert smallest is not None
    seen_none = seen_reply = False
    for size in range(len(MAGIC) + 1, MAX_DATAGRAM + 1):
        request = MAGIC + bytes([VERSION + 1]) + bytes(size - len(MAGIC) - 1)
        with pytest.raises(UnsupportedVersion) as info:
            decode_header(request)
        assert info.value.version == VERSION + 1
        reply = version_reply(len(request))
        if size < len(smallest):
            assert reply is None
            seen_none = True
        else:
            assert reply is not None and len(reply) <= len(request)
            assert decode_packet(reply).frames == (VersionFrame(VERSION),)
            seen_reply = True
    assert seen_none and seen_reply


@pytest.mark.parametrize("version", [0, 1, VERSION + 1, 255])
def test_other_versions_are_unsupported(version: int) -> None:
    request = encode_packet(Packet(NO_SESSION, 1, (Padding(bytes(300)),)), None)
    request = request[:4] + bytes([version]) + request[5:]
    with pytest.raises(UnsupportedVersion):
        decode_packet(request)


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "tagged"])
def test_encode_packet_never_exceeds_1200_bytes(key: bytes | None) -> None:
    overhead = HEADER.size + FRAME_HEADER.size + (TAG_SIZE if key else CRC.size)
    fits = Packet(SESSION, 1, (Padding(bytes(MAX_DATAGRAM - overhead)),))
    assert len(encode_packet(fits, key)) == MAX_DATAGRAM
    too_big = Packet(SESSION, 1, (Padding(bytes(MAX_DATAGRAM - overhead + 1)),))
    with pytest.raises(LocalProtocolError):
        encode_packet(too_big, key)
    with pytest.raises(LocalProtocolError):
        encode_packet(Packet(SESSION, 1, (Padding(bytes(70_000)),)), key)
    with pytest.raises(LocalProtocolError):
        encode_packet(Packet(SESSION, 1, (Ping(),)), key, pad_to=MAX_DATAGRAM + 1)


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(ANY_FRAME, min_size=1, max_size=12), pad_to=st.integers(0, 2000))
def test_encode_packet_output_is_bounded(frames: list[Any], pad_to: int) -> None:
    try:
        wire = encode_packet(Packet(SESSION, 5, tuple(frames)), KEY, pad_to=pad_to)
    except LocalProtocolError:
        return
    assert pad_to <= len(wire) <= MAX_DATAGRAM


def test_encode_refuses_bad_fields() -> None:
    with pytest.raises(LocalProtocolError):
        encode_packet(Packet(b"short", 1, (Ping(),)), KEY)
    with pytest.raises(LocalProtocolError):
        encode_packet(Packet(SESSION, -1, (Ping(),)), KEY)
    with pytest.raises(LocalProtocolError):
        encode_packet(Packet(SESSION, 1, (Stream(0, 0, 0, 0, 256, b""),)), KEY)
    with pytest.raises(LocalProtocolError):
        encode_message(Presence("x" * 70_000, True))


def test_preauth_padding_reaches_256_bytes() -> None:
    login = Hello("alice", 7, bytes(16))
    wire = encode_packet(Packet(NO_SESSION, 1, (login,)), None, pad_to=MIN_PREAUTH_REQUEST)
    assert len(wire) >= MIN_PREAUTH_REQUEST
    decoded = decode_packet(wire)
    assert decoded.frames[0] == login
    assert isinstance(decoded.frames[-1], Padding)


@settings(max_examples=150, deadline=None)
@given(frame=PREAUTH_FRAME)
def test_preauth_padding_for_any_request(frame: Any) -> None:
    packet = Packet(NO_SESSION, 1, (frame,))
    try:
        wire = encode_packet(packet, None, pad_to=MIN_PREAUTH_REQUEST)
    except LocalProtocolError:
        assert packet_size(packet, None) > MAX_DATAGRAM
        return
    assert len(wire) >= MIN_PREAUTH_REQUEST
    assert decode_packet(wire).frames[0] == frame


def test_unknown_session_reply_is_not_larger_than_the_request() -> None:
    assert protocol.unknown_session_reply(SESSION, 10) is None
    reply = protocol.unknown_session_reply(SESSION, 100)
    assert reply is not None and len(reply) <= 100
    assert decode_packet(reply).session_id == SESSION


@pytest.mark.parametrize("size", [0, BATCH_MAX + 1, 255])
def test_batch_sizes_outside_the_limits(size: int) -> None:
    """A batch message carries 1..BATCH_MAX items: none is refused on the
    way out and on the way in (a count byte can say up to 255)."""
    msg = MsgId(1, 2)
    for message in (
        protocol.Accepts(tuple((msg, i) for i in range(size))),
        protocol.Receipts(tuple(range(size))),
        protocol.Delivereds("bob", (msg,) * size),
    ):
        with pytest.raises(LocalProtocolError):
            encode_message(message)
    body = struct.pack("!QQQ", 1, 2, 3) * size
    with pytest.raises(RemoteProtocolError):
        decode_message(bytes([protocol.Kind.ACCEPTS, size]) + body)


# --- the wire format, pinned -------------------------------------------------
#
# The bytes of a sample of every kind, written down from the codec before the
# codecs were generated from the declarations (issue 13): the generated ones
# must never change a byte of what is on the wire.

PINNED_MESSAGES: list[tuple[Any, str]] = [
    (
        protocol.Send(protocol.MsgId(0x0123456789ABCDEF, 42), "bob", "héllo 😀"),
        "010123456789abcdef000000000000002a0003626f620000000b68c3a96c6c6f20f09f9880",
    ),
    (
        protocol.Send(protocol.MsgId(1, 2), "", ""),
        "0100000000000000010000000000000002000000000000",
    ),
    (
        protocol.Accept(protocol.MsgId(0x0123456789ABCDEF, 42), 77),
        "020123456789abcdef000000000000002a000000000000004d",
    ),
    (
        protocol.Fail(protocol.MsgId(1, 2), protocol.ErrorCode.USER_OFFLINE, "bob is offline"),
        "03000000000000000100000000000000020a000e626f62206973206f66666c696e65",
    ),
    (
        protocol.Deliver(
            77, protocol.MsgId(0x0123456789ABCDEF, 42), "Zoë", "hi", 1_700_000_000_000
        ),
        (
            "04000000000000004d0123456789abcdef000000000000002a00045a6fc3ab0000000268690000018bcf"
            "e56800"
        ),
    ),
    (
        protocol.Receipt(2**64 - 1),
        "05ffffffffffffffff",
    ),
    (
        protocol.Delivered(protocol.MsgId(1, 2), "bob"),
        "06000000000000000100000000000000020003626f62",
    ),
    (
        protocol.Accepts(((protocol.MsgId(1, 2), 3), (protocol.MsgId(4, 5), 6))),
        (
            "0f0200000000000000010000000000000002000000000000000300000000000000040000000000000005"
            "0000000000000006"
        ),
    ),
    (
        protocol.Receipts((7, 8, 9)),
        "1003000000000000000700000000000000080000000000000009",
    ),
    (
        protocol.Delivereds("bob", (protocol.MsgId(1, 2), protocol.MsgId(3, 4))),
        "110003626f62020000000000000001000000000000000200000000000000030000000000000004",
    ),
    (
        protocol.Who("carol", 50),
        "0700056361726f6c0032",
    ),
    (
        protocol.Who(),
        "0700000032",
    ),
    (
        protocol.WhoReply(("alice", "bob"), "bob"),
        "0800020005616c6963650003626f620003626f62",
    ),
    (
        protocol.WhoReply((), ""),
        "0800000000",
    ),
    (
        protocol.Presence("bob", True),
        "090003626f6201",
    ),
    (
        protocol.Presence("bob", False),
        "090003626f6200",
    ),
    (
        protocol.Notice(protocol.ErrorCode.RATE_LIMITED, "slow down"),
        "0a070009736c6f7720646f776e",
    ),
    (
        protocol.Logout(),
        "0b",
    ),
    (
        protocol.Bye(protocol.ErrorCode.LOGGED_IN_ELSEWHERE, "taken over"),
        "0c08000a74616b656e206f766572",
    ),
    (
        protocol.Typing("bob"),
        "0d0003626f62",
    ),
    (
        protocol.Watch("名前"),
        "0e0006e5908de5898d",
    ),
    (protocol.Ticket(bytes(range(16, 32))), "12101112131415161718191a1b1c1d1e1f"),
    *PINNED_ACCOUNT_MESSAGES,  # the account kinds' (issue 16), pinned in their own file
    *PINNED_GROUP_MESSAGES,  # the group kinds' (issue 14), pinned in their own file
]
PINNED_FRAMES: list[tuple[Any, str]] = [
    (
        protocol.Padding(bytes(3)),
        "000003000000",
    ),
    (
        protocol.Padding(),
        "000000",
    ),
    (
        protocol.Ack(1000, 1500, 990, ((992, 995), (997, 999))),
        (
            "01002d00000000000003e8000005dc00000000000003de0200000000000003e000000003000000000000"
            "03e500000002"
        ),
    ),
    (
        protocol.Ack(0, 0, 0),
        "010015000000000000000000000000000000000000000000",
    ),
    (
        protocol.Ping(),
        "020000",
    ),
    (
        protocol.Stream(1000, 7, 500, 0, 1, b"payload"),
        "03001900000000000003e800000007000001f400017061796c6f6164",
    ),
    (
        protocol.Stream(2**64 - 1, 2**32 - 1, 0, 255, 255, b""),
        "030012ffffffffffffffffffffffff00000000ffff",
    ),
    (
        protocol.Hello("alice", 0x0123456789ABCDEF, bytes(range(16))),
        "04001f0005616c6963650123456789abcdef000102030405060708090a0b0c0d0e0f",
    ),
    (
        protocol.Challenge(
            bytes(range(16)), bytes(range(16, 32)), bytes(range(32, 48)), 4096, bytes(range(256))
        ),
        (
            "050134000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526"
            "2728292a2b2c2d2e2f00001000000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c"
            "1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40414243444546"
            "4748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f606162636465666768696a6b6c6d6e6f70"
            "7172737475767778797a7b7c7d7e7f808182838485868788898a8b8c8d8e8f909192939495969798999a"
            "9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4"
            "c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedee"
            "eff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"
        ),
    ),
    (
        protocol.Login(
            "alice",
            7,
            bytes(range(16)),
            bytes(range(16, 32)),
            bytes(range(32)),
            bytes(range(256)),
            bytes(range(64)),
        ),
        (
            "06018f0005616c6963650000000000000007000102030405060708090a0b0c0d0e0f1011121314151617"
            "18191a1b1c1d1e1f000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f0001"
            "02030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b"
            "2c2d2e2f303132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f505152535455"
            "565758595a5b5c5d5e5f606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
            "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9fa0a1a2a3a4a5a6a7a8a9"
            "aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3"
            "d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfd"
            "feff000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f2021222324252627"
            "28292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
        ),
    ),
    (
        protocol.Welcome(bytes(range(16)), bytes(range(16, 32)), bytes(range(32)), "alice"),
        (
            "070047000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f00010203040506"
            "0708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f0005616c696365"
        ),
    ),
    (
        protocol.Refused(bytes(range(16)), protocol.ErrorCode.BAD_PASSWORD, "wrong password"),
        "080021000102030405060708090a0b0c0d0e0f03000e77726f6e672070617373776f7264",
    ),
    (
        protocol.VersionFrame(),
        "09000103",
    ),
    (
        protocol.UnknownSession(),
        "0a0000",
    ),
    (
        protocol.PathChallenge(bytes(range(8))),
        "0b00080001020304050607",
    ),
    (
        protocol.PathResponse(bytes(range(8, 16))),
        "0c000808090a0b0c0d0e0f",
    ),
    (protocol.TicketFrame(bytes(range(16))), "0d0010000102030405060708090a0b0c0d0e0f"),
]


def test_every_kind_has_pinned_bytes() -> None:
    assert {type(m) for m, _ in PINNED_MESSAGES} == set(MESSAGE_CLASSES.values())
    assert {type(f) for f, _ in PINNED_FRAMES} == set(FRAME_CLASSES.values())


@pytest.mark.parametrize(("message", "wire"), PINNED_MESSAGES, ids=repr)
def test_message_bytes_are_pinned(message: Any, wire: str) -> None:
    assert encode_message(message).hex() == wire
    assert decode_message(bytes.fromhex(wire)) == message


@pytest.mark.parametrize(("frame", "wire"), PINNED_FRAMES, ids=repr)
def test_frame_bytes_are_pinned(frame: Any, wire: str) -> None:
    assert encode_frame(frame).hex() == wire
    datagram = encode_packet(Packet(SESSION, 1, (frame,)), KEY)
    assert datagram[HEADER.size : -TAG_SIZE].hex() == wire
    assert decode_packet(datagram, KEY).frames == (frame,)


# --- every kind held to its declaration ------------------------------------------


def declared_field(kind: str, value: Any) -> bytes:
    """One field as its SPEC declares it, written the plain way: the
    reference the generated codecs are held to."""
    ints = {"u8": "!B", "u16": "!H", "u32": "!I", "u64": "!Q"}
    if kind in ints:
        return struct.pack(ints[kind], value)
    if kind in ("b8", "b16", "b32", "b64", "b256"):
        assert len(value) == int(kind[1:])
        return bytes(value)
    if kind in ("bool", "code"):
        return bytes([int(value)])
    if kind == "msgid":
        return struct.pack("!QQ", *value)
    if kind in ("str", "text"):
        data: bytes = value.encode("utf-8")
        return struct.pack("!H" if kind == "str" else "!I", len(data)) + data
    if kind == "strs":
        return struct.pack("!H", len(value)) + b"".join(declared_field("str", v) for v in value)
    if kind == "ranges":
        return bytes([len(value)]) + b"".join(struct.pack("!QI", s, e - s) for s, e in value)
    if kind == "accepts":
        return bytes([len(value)]) + b"".join(struct.pack("!QQQ", *m, s) for m, s in value)
    if kind == "msgids":
        return bytes([len(value)]) + b"".join(struct.pack("!QQ", *m) for m in value)
    if kind == "u64s":
        return bytes([len(value)]) + b"".join(struct.pack("!Q", n) for n in value)
    if kind == "entries":
        entries = [encode_message(entry) for entry in value]
        return struct.pack("!H", len(value)) + b"".join(
            struct.pack("!I", len(e)) + e for e in entries
        )
    assert kind == "rest", kind
    return bytes(value)


def declared_body(record: Any) -> bytes:
    names = [f.name for f in dataclasses.fields(record)]
    return b"".join(
        declared_field(k, getattr(record, n)) for n, k in zip(names, record.SPEC, strict=True)
    )


ALL_KINDS = [*FRAME_CLASSES.values(), *MESSAGE_CLASSES.values()]
ALL_IDS = [cls.__name__ for cls in ALL_KINDS]


def encode_any(record: Any) -> bytes:
    """A frame or a message, encoded."""
    return encode_frame(record) if hasattr(record, "TYPE") else encode_message(record)


def decode_any(cls: type, wire: bytes) -> Any:
    """What `encode_any` made of an instance of `cls`, decoded; a frame goes
    through a tagged datagram (so a frame read past its end would show)."""
    if not hasattr(cls, "TYPE"):
        return decode_message(wire)
    header = HEADER.pack(MAGIC, VERSION, 1, SESSION, 9) + wire
    (frame,) = decode_packet(header + mac_tag(KEY, header), KEY).frames
    return frame


@pytest.mark.parametrize("cls", ALL_KINDS, ids=ALL_IDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_kind_is_encoded_as_declared(cls: type, data: st.DataObject) -> None:
    """Every frame (STREAM and ACK included: they had codecs of their own)
    and every message: the generated codec writes exactly what the SPEC
    declares, reads it back, and never misreads a truncation."""
    record = data.draw(instances(cls, text_size=60))
    body = declared_body(record)
    if hasattr(cls, "TYPE"):
        head = FRAME_HEADER.pack(cls.TYPE, len(body))
    else:
        head = bytes([cls.KIND])  # type: ignore[attr-defined]
    wire = encode_any(record)
    assert wire == head + body
    assert decode_any(cls, wire) == record
    for cut in range(len(body)):  # a shorter body is refused, or is that shorter record
        if hasattr(cls, "TYPE"):
            truncated = FRAME_HEADER.pack(cls.TYPE, cut) + body[:cut]
        else:
            truncated = head + body[:cut]
        try:
            decoded = decode_any(cls, truncated)
        except RemoteProtocolError:
            continue
        assert cls.SPEC[-1] == "rest"  # type: ignore[attr-defined]
        assert encode_any(decoded) == truncated


# --- explicit errors: what does not fit its declaration is refused -------------

MID = MsgId(1, 2)
NONCE = bytes(16)


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (Hello("alice", 7, b"12345"), "Hello.nonce"),  # struct would pad it to 16
        (Hello("alice", 7, bytes(17)), "Hello.nonce"),  # ... or cut it
        (Hello("alice", 7, "0123456789abcdef"), "Hello.nonce"),  # type: ignore[arg-type]
        (Hello("alice", -1, NONCE), "Hello.instance_id"),
        (Hello("alice", 2**64, NONCE), "Hello.instance_id"),
        (Hello("alice", 1.5, NONCE), "Hello.instance_id"),  # type: ignore[arg-type]
        (Hello(b"alice", 7, NONCE), "Hello.username"),  # type: ignore[arg-type]
        (Hello("a\ud800", 7, NONCE), "Hello.username"),
        (protocol.Challenge(NONCE, NONCE, NONCE, 2**32, bytes(256)), "Challenge.iterations"),
        (protocol.Challenge(NONCE, NONCE, NONCE, 4096, bytes(255)), "Challenge.dh_public"),
        (Presence("bob", 1), "Presence.online"),  # type: ignore[arg-type]
        (Presence("x" * 70_000, True), "Presence.user"),
        (protocol.Notice(7, "slow down"), "Notice.code"),  # type: ignore[arg-type]
        (Send(MID, "bob", "x" * (MAX_TEXT_BYTES + 1)), "Send.text"),
        (Send((1, 2, 3), "bob", "hi"), "Send.msg_id"),  # type: ignore[arg-type]
        (Send(MsgId(-1, 2), "bob", "hi"), "Send.msg_id"),
        (Send(MID, None, "hi"), "Send.to"),  # type: ignore[arg-type]
        (protocol.WhoReply(["alice"], ""), "WhoReply.users"),  # type: ignore[arg-type]
        (protocol.WhoReply(("alice", 5), ""), "WhoReply.users"),  # type: ignore[arg-type]
        (Ack(1, 2**32, 1), "Ack.delay_us"),
        (Ack(1, 1, 1, ((5, 3),)), "Ack.ranges"),  # end before start
        (Ack(1, 1, 1, ((0, 1),) * 256), "Ack.ranges"),
        (Stream(0, 0, 0, 0, 256, b""), "Stream.count"),
        (Stream(0, 0, 0, 0, 1, "text"), "Stream.data"),  # type: ignore[arg-type]
        (protocol.Receipts(()), "Receipts.server_msg_ids"),
        (protocol.Accepts(((MID, -1),)), "Accepts.items"),
        (protocol.Delivereds("bob", (MID,) * (BATCH_MAX + 1)), "Delivereds.msg_ids"),
        (protocol.PathChallenge(bytes(7)), "PathChallenge.data"),
        (Padding(bytes(70_000)), "Padding frame holds at most 65535 bytes"),
    ],
    ids=repr,
)
def test_a_value_that_does_not_fit_its_declaration_is_refused(record: Any, field: str) -> None:
    """Never a malformed record on the wire: the error names the field."""
    with pytest.raises(LocalProtocolError, match=field):
        encode_any(record)


def test_errors_carry_their_error_code() -> None:
    """Callers read `exc.code` instead of guessing it from the message
    (`send("hi", to="bob!")` reported too_long)."""
    for name in ("bob!", "", "a" * 33, "server", b"bob"):
        with pytest.raises(LocalProtocolError) as info:
            normalize_name(name)  # type: ignore[arg-type]
        assert info.value.code is ErrorCode.INVALID_NAME, name
    with pytest.raises(LocalProtocolError) as info:
        check_text("x" * (MAX_TEXT_BYTES + 1))
    assert info.value.code is ErrorCode.TOO_LONG
    with pytest.raises(LocalProtocolError) as info:
        encode_message(Send(MID, "bob", "x" * (MAX_TEXT_BYTES + 1)))
    assert info.value.code is ErrorCode.TOO_LONG
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(Hello("alice", 7, b"12345"))
    assert info.value.code is None  # nothing the user could do about it
    assert RemoteProtocolError("truncated").code is None
    assert str(LocalProtocolError("why", code=ErrorCode.NO_PEER)) == "why"


def test_encoding_refuses_misfits_under_python_O() -> None:
    """The checks are not `assert`s: under `python -O` a HELLO with a 5-byte
    nonce is still refused, not sent as a malformed datagram."""
    script = (
        "import protocol\n"
        "assert False, 'asserts are on'\n"  # skipped under -O: proves the flag took
        "for make in (lambda: protocol.Hello('alice', 7, b'12345'),\n"
        "             lambda: protocol.Presence('bob', 2),\n"
        "             lambda: protocol.Ack(1, 1, 1, ((5, 3),))):\n"
        "    try:\n"
        "        protocol.encode_frame(make()) if hasattr(make(), 'TYPE')"
        " else protocol.encode_message(make())\n"
        "    except protocol.LocalProtocolError as exc:\n"
        "        print('refused:', exc)\n"
        "    else:\n"
        "        print('ENCODED', make())\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-O", "-c", script],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("refused:") == 3 and "ENCODED" not in done.stdout, done.stdout
    assert "Hello.nonce is 5 bytes" in done.stdout


#: Values of every shape, for fields declared otherwise.
ODD_VALUES: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.just("\ud800"),
    st.binary(max_size=300),
    st.binary(max_size=300).map(bytearray),
    st.lists(st.integers(-1, 2**65), max_size=3).map(tuple),
    st.lists(st.integers(0, 3), max_size=3),
    st.tuples(st.integers(-1, 3), st.integers(-1, 3)),
    st.lists(st.tuples(st.integers(-1, 5), st.integers(-1, 5)), max_size=3).map(tuple),
    st.lists(st.text(max_size=3), max_size=3).map(tuple),
    st.sampled_from(ErrorCode),
    st.builds(MsgId, U64, U64),
)


WITH_FIELDS = [cls for cls in ALL_KINDS if cls.SPEC]  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", WITH_FIELDS, ids=[cls.__name__ for cls in WITH_FIELDS])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_encoders_raise_only_local_protocol_error(cls: type, data: st.DataObject) -> None:
    """Any value in any field: either `LocalProtocolError`, or bytes that
    decode to a record that encodes to the very same bytes."""
    record = data.draw(instances(cls))
    values = [getattr(record, f.name) for f in dataclasses.fields(record)]
    values[data.draw(st.integers(0, len(values) - 1))] = data.draw(ODD_VALUES)
    record = cls(*values)
    try:
        wire = encode_any(record)
    except LocalProtocolError:
        return
    assert encode_any(decode_any(cls, wire)) == wire


def test_the_codec_benchmark_times_every_kind() -> None:
    """bench/codec_micro.py keeps a sample of every kind (a new one is timed
    too, or the benchmark says which sample is missing)."""
    from bench import codec_micro

    figures = codec_micro.measure(number=8, repeat=1)
    names = {name.split()[1] for name in figures}
    assert names == {cls.__name__ for cls in ALL_KINDS}
