"""Pure tests of the wire format in `protocol.py`: hypothesis round trips of
every frame and message kind, garbage input (only `RemoteProtocolError` may
come out of a decoder), MAC checks, names, text limits and the size rules
that keep us from amplifying traffic."""

from __future__ import annotations

import struct
import unicodedata
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
    Accept,
    Ack,
    BadTag,
    Deliver,
    Delivered,
    ErrorCode,
    Hello,
    LocalProtocolError,
    MsgId,
    Packet,
    Padding,
    Ping,
    Presence,
    Receipt,
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
    """A value for one wire type of a SPEC (see `protocol._write`)."""
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
        "rest": st.binary(max_size=4 * text_size),
    }
    return strategies[kind]


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


@settings(max_examples=300, deadline=None)
@given(
    message=st.one_of(
        *[instances(cls, text_size=40) for cls in (Accept, Receipt, Deliver, Delivered, Send)]
    )
)
def test_hot_path_codecs_match_the_generic_one(message: Any) -> None:
    """SEND, ACCEPT, DELIVER, RECEIPT and DELIVERED have hand-written codecs
    for speed; they must produce and accept exactly the generic bytes."""
    try:
        generic = bytes([message.KIND]) + protocol._encode_fields(message, message.SPEC)
    except LocalProtocolError:
        with pytest.raises(LocalProtocolError):
            encode_message(message)
        return
    assert encode_message(message) == generic
    assert decode_message(generic) == message
    for cut in range(len(generic)):  # every truncation is refused, never misread
        with pytest.raises(RemoteProtocolError):
            decode_message(generic[:cut])


@settings(max_examples=300, deadline=None)
@given(ack=instances(Ack), key=st.sampled_from([None, b"k" * 32]))
def test_ack_fast_codec_matches_the_generic_one(ack: Ack, key: bytes | None) -> None:
    """ACK frames have a hand-written codec too (one rides in nearly every
    datagram): the same bytes as the generic one, decoded back alike, and a
    frame the generic codec refuses is refused the same way."""
    try:
        generic = protocol._encode_fields(ack, Ack.SPEC)
    except LocalProtocolError:
        with pytest.raises(LocalProtocolError):
            protocol.encode_frame(ack)
        return
    wire = protocol.encode_frame(ack)
    assert wire[protocol.FRAME_HEADER.size :] == generic
    assert protocol._decode_ack(generic) == ack
    for cut in range(len(generic)):  # a truncated body is never misread
        assert protocol._decode_ack(generic[:cut]) is None
    if key is not None:
        packet = Packet(SESSION, 9, (ack, Ping()))
        assert decode_packet(encode_packet(packet, key), key) == packet


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
