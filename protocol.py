"""The chat's wire format: pure, no sockets, threads or clocks.

A datagram is a fixed header (one `struct.Struct`), one or more frames, and,
once a session exists, a 16-byte HMAC-SHA-256 tag over everything before it:

    magic(4) version(1) flags(1) session_id(16) pkt_num(8) | frames... | tag(16)

Each frame is `type(1) length(2) body`. Transport frames (ACK, PING, STREAM,
the login handshake) live in this module; the chat messages themselves
(SEND, DELIVER, RECEIPT, ...) travel inside STREAM frames and are encoded by
`encode_message` / `decode_message`. The reliability state machine that
drives STREAM and ACK frames lives in `reliability.py`.

Errors follow h11: `ProtocolError` is the root; `RemoteProtocolError` means
the peer sent something we refuse (decode lets nothing else out) and
`LocalProtocolError` means our own caller asked for something impossible.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import secrets
import struct
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import ClassVar, NamedTuple, TypeVar

# --- limits ---------------------------------------------------------------

#: Largest datagram we send or accept: the QUIC minimum path MTU payload
#: (RFC 9000 section 14), safe through VPNs and tunnels.
MAX_DATAGRAM = 1200
#: Largest chat message, in UTF-8 bytes; longer ones are refused before sending.
MAX_TEXT_BYTES = 64 * 1024
#: Pre-login requests are padded to this size so that no reply to an
#: address that has not proved itself is larger than what it sent.
MIN_PREAUTH_REQUEST = 256
#: A HELLO is padded further: its CHALLENGE carries a 256-byte DH key.
HELLO_SIZE = 400
NAME_MIN, NAME_MAX = 1, 32
#: Names nobody may take: they would impersonate the service itself.
RESERVED_NAMES = frozenset({"server", "admin", "system"})
#: At most this many users in one WHO reply page (fits one datagram).
WHO_PAGE_MAX = 50

MAGIC = b"UCHT"
VERSION = 2  # 2: the batch messages ACCEPTS, RECEIPTS, DELIVEREDS (kinds 15-17)
FLAG_MAC = 0x01
#: Datagrams without a MAC (the login exchange and its hints) end in a CRC-32
#: instead, so a flipped bit is dropped rather than taken for a wrong password.
CRC = struct.Struct("!I")
SESSION_ID_SIZE = 16
TAG_SIZE = 16
KEY_SIZE = 32
NONCE_SIZE = 16
NO_SESSION = bytes(SESSION_ID_SIZE)

HEADER = struct.Struct("!4sBB16sQ")
FRAME_HEADER = struct.Struct("!BH")
#: Room left for frames in a datagram that carries a MAC tag.
MAX_FRAMES_SIZE = MAX_DATAGRAM - HEADER.size - TAG_SIZE


# --- errors ---------------------------------------------------------------


class ProtocolError(Exception):
    """Root of every protocol error."""


class LocalProtocolError(ProtocolError):
    """Our caller asked for something the protocol cannot express."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes we refuse; drop them and count."""


class UnsupportedVersion(RemoteProtocolError):
    """Our magic with a version we do not speak: answer with VERSION."""

    def __init__(self, version: int) -> None:
        super().__init__(f"unsupported protocol version {version}")
        self.version = version


class BadTag(RemoteProtocolError):
    """The MAC does not verify: forged, corrupted or for another session."""


class ErrorCode(enum.IntEnum):
    """Stable error codes; `.label` is the JSON spelling (README, "Terminal client")."""

    NAME_TAKEN = 1
    INVALID_NAME = 2
    BAD_PASSWORD = 3
    NO_SUCH_USER = 4
    SERVER_UNREACHABLE = 5
    TOO_LONG = 6
    RATE_LIMITED = 7
    LOGGED_IN_ELSEWHERE = 8
    SERVER_SHUTDOWN = 9
    USER_OFFLINE = 10
    MAILBOX_FULL = 11
    NO_PEER = 12
    PASSWORD_REQUIRED = 13
    LOGGED_OUT = 14
    SERVER_ERROR = 15  # the server could not serve the request; try again
    # A SEND reuses a message id the server accepted for other content: the
    # client's store was copied or restored (a silent ACCEPT would lose it).
    DUPLICATE_ID = 16

    @property
    def label(self) -> str:
        return self.name.lower()


# --- names ----------------------------------------------------------------

_NAME_PUNCTUATION = frozenset("_-.")


def normalize_name(name: str) -> str:
    """The display form of a name: NFKC, or `LocalProtocolError` with the reason."""
    if not isinstance(name, str):
        raise LocalProtocolError("a name must be text")
    shown = unicodedata.normalize("NFKC", name.strip())
    if not NAME_MIN <= len(shown) <= NAME_MAX:
        raise LocalProtocolError(
            f"a name has {NAME_MIN} to {NAME_MAX} characters; {shown!r} has {len(shown)}"
        )
    for ch in shown:
        category = unicodedata.category(ch)
        if not (category.startswith("L") or category == "Nd" or ch in _NAME_PUNCTUATION):
            raise LocalProtocolError(
                f"{shown!r} contains {ch!r} (U+{ord(ch):04X}); use letters, digits, '_', '-' or '.'"
            )
    if name_key(shown) in RESERVED_NAMES:
        raise LocalProtocolError(f"the name {shown!r} is reserved; pick another")
    return shown


@functools.lru_cache(maxsize=1 << 12)  # the names of a busy server's active users
def name_key(name: str) -> str:
    """The comparison form of a name (RFC 8265 style: NFKC, casefold, NFKC)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def check_text(text: str) -> bytes:
    """The UTF-8 of a chat message, or `LocalProtocolError` if it may not be sent."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"the message is not valid text: {exc.reason}") from None
    if len(data) > MAX_TEXT_BYTES:
        raise LocalProtocolError(
            f"the message is {len(data)} bytes of UTF-8; the limit is {MAX_TEXT_BYTES}"
        )
    return data


# --- field codec ----------------------------------------------------------
#
# Every frame and message is a dataclass (frozen, or for the hot ones see
# above `Padding`) whose fields are listed in `SPEC` with a wire type. One
# generic codec reads and writes them all, so a new message is one class,
# and hypothesis can round-trip every kind.

_INTS = {
    "u8": struct.Struct("!B"),
    "u16": struct.Struct("!H"),
    "u32": struct.Struct("!I"),
    "u64": struct.Struct("!Q"),
}
_FIXED = {"b8": 8, "b16": 16, "b32": 32, "b64": 64, "b256": 256}
_T = TypeVar("_T")

#: Batches of fixed-size items, a u8 count first.
_LISTS = {
    "accepts": struct.Struct("!QQQ"),  # msg_id, server_msg_id
    "msgids": struct.Struct("!QQ"),
    "u64s": struct.Struct("!Q"),
}
#: Items in one batch message at most: it stays one chunk of one datagram.
BATCH_MAX = 40


def batches(items: list[_T]) -> Iterator[list[_T]]:
    """`items` in consecutive slices of at most BATCH_MAX, one per message."""
    for start in range(0, len(items), BATCH_MAX):
        yield items[start : start + BATCH_MAX]


class MsgId(NamedTuple):
    """A message's end-to-end id, chosen by the sending client."""

    instance_id: int
    client_seq: int

    def label(self) -> str:
        return f"{self.instance_id:016x}-{self.client_seq}"


def _write(kind: str, value: object, out: list[bytes]) -> None:
    try:
        if kind in _INTS:
            out.append(_INTS[kind].pack(value))
        elif kind in _FIXED:
            assert isinstance(value, bytes) and len(value) == _FIXED[kind]
            out.append(value)
        elif kind == "bool":
            out.append(b"\x01" if value else b"\x00")
        elif kind == "str":
            assert isinstance(value, str)
            data = value.encode("utf-8")
            out.append(_INTS["u16"].pack(len(data)))
            out.append(data)
        elif kind == "text":  # chat text: up to 64 KiB, so a u32 length
            assert isinstance(value, str)
            data = value.encode("utf-8")
            if len(data) > MAX_TEXT_BYTES:
                raise ValueError(f"text of {len(data)} bytes is over {MAX_TEXT_BYTES}")
            out.append(_INTS["u32"].pack(len(data)))
            out.append(data)
        elif kind == "strs":
            assert isinstance(value, tuple)
            out.append(_INTS["u16"].pack(len(value)))
            for item in value:
                _write("str", item, out)
        elif kind == "msgid":
            assert isinstance(value, tuple)
            out.append(struct.pack("!QQ", value[0], value[1]))
        elif kind == "code":
            out.append(_INTS["u8"].pack(int(value)))  # type: ignore[call-overload]
        elif kind in _LISTS:
            assert isinstance(value, tuple)
            if not 1 <= len(value) <= BATCH_MAX:
                raise ValueError(f"a batch has 1 to {BATCH_MAX} items, not {len(value)}")
            out.append(_INTS["u8"].pack(len(value)))
            item = _LISTS[kind]
            if kind == "accepts":  # (msg_id, server_msg_id) pairs
                out.extend(item.pack(*msg_id, server_id) for msg_id, server_id in value)
            elif kind == "msgids":
                out.extend(item.pack(*msg_id) for msg_id in value)
            else:
                out.extend(item.pack(number) for number in value)
        elif kind == "ranges":
            assert isinstance(value, tuple)
            out.append(_INTS["u8"].pack(len(value)))
            for start, end in value:
                out.append(struct.pack("!QI", start, end - start))
        elif kind == "rest":
            assert isinstance(value, bytes)
            out.append(value)
        else:  # pragma: no cover - a SPEC typo
            raise AssertionError(kind)
    except (struct.error, AssertionError, UnicodeEncodeError, TypeError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode {value!r} as {kind}: {exc}") from None


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise RemoteProtocolError("truncated")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def read(self, kind: str) -> object:
        if kind in _INTS:
            fmt = _INTS[kind]
            return fmt.unpack(self.take(fmt.size))[0]
        if kind in _FIXED:
            return self.take(_FIXED[kind])
        if kind == "bool":
            flag = self.take(1)[0]
            if flag > 1:
                raise RemoteProtocolError("a flag is 0 or 1")
            return flag == 1
        if kind == "str":
            (size,) = _INTS["u16"].unpack(self.take(2))
            try:
                return self.take(size).decode("utf-8")
            except UnicodeDecodeError:
                raise RemoteProtocolError("text is not UTF-8") from None
        if kind == "text":
            (size,) = _INTS["u32"].unpack(self.take(4))
            if size > MAX_TEXT_BYTES:
                raise RemoteProtocolError(f"text of {size} bytes is over the limit")
            try:
                return self.take(size).decode("utf-8")
            except UnicodeDecodeError:
                raise RemoteProtocolError("text is not UTF-8") from None
        if kind == "strs":
            (count,) = _INTS["u16"].unpack(self.take(2))
            return tuple(self.read("str") for _ in range(count))
        if kind == "msgid":
            return MsgId(*struct.unpack("!QQ", self.take(16)))
        if kind == "code":
            raw = self.take(1)[0]
            try:
                return ErrorCode(raw)
            except ValueError:
                raise RemoteProtocolError(f"unknown error code {raw}") from None
        if kind in _LISTS:
            count = self.take(1)[0]
            if not 1 <= count <= BATCH_MAX:
                raise RemoteProtocolError(f"a batch has 1 to {BATCH_MAX} items, not {count}")
            item = _LISTS[kind]
            body = self.take(item.size * count)
            values = list(item.iter_unpack(body))
            if kind == "accepts":
                return tuple((MsgId(i, s), server_id) for i, s, server_id in values)
            if kind == "msgids":
                return tuple(MsgId(i, s) for i, s in values)
            return tuple(v for (v,) in values)
        if kind == "ranges":
            count = self.take(1)[0]
            ranges = []
            for _ in range(count):
                start, length = struct.unpack("!QI", self.take(12))
                ranges.append((start, start + length))
            return tuple(ranges)
        if kind == "rest":
            return self.take(len(self.data) - self.pos)
        raise AssertionError(kind)  # pragma: no cover

    def done(self) -> None:
        if self.pos != len(self.data):
            raise RemoteProtocolError("trailing bytes")


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def _encode_fields(obj: object, spec: tuple[str, ...]) -> bytes:
    out: list[bytes] = []
    for name, kind in zip(_field_names(type(obj)), spec, strict=True):
        _write(kind, getattr(obj, name), out)
    return b"".join(out)


def _decode_fields(cls: type, spec: tuple[str, ...], body: bytes) -> object:
    reader = _Reader(body)
    values = [reader.read(kind) for kind in spec]
    reader.done()
    return cls(*values)


# --- transport frames -----------------------------------------------------


class FrameType(enum.IntEnum):
    PADDING = 0  # filler: pre-login requests are padded to MIN_PREAUTH_REQUEST
    ACK = 1  # what this side has received (never acked itself)
    PING = 2  # keepalive; ack-eliciting, never retransmitted
    STREAM = 3  # one reliable, ordered chunk of a chat message
    HELLO = 4  # pre-auth: a client names itself and asks for a challenge
    CHALLENGE = 5  # pre-auth reply: SCRAM salt, iterations and the stateless cookie
    LOGIN = 6  # pre-auth: the SCRAM proof (and keys, when registering)
    WELCOME = 7  # pre-auth reply: the session and the server's signature
    REFUSED = 8  # pre-auth reply: login refused, with a code
    VERSION = 9  # reply to our magic with a version we do not speak
    UNKNOWN_SESSION = 10  # reply: no such session here (the server restarted); log in again
    PATH_CHALLENGE = 11  # "is this really you at this address?" (RFC 9000 8.2)
    PATH_RESPONSE = 12  # the answer, from the new address
    TICKET = 13  # pre-auth, beside a LOGIN: the login ticket of an earlier session (optional)


# The records built for every relayed message (a dozen per message on the
# server: Stream, Ack, Packet, Header, Send, Accept, Deliver, Receipt,
# Delivered) are `@dataclass(unsafe_hash=True)`: value equality and a hash
# like the frozen ones, but built in a quarter of the time (a frozen
# dataclass sets each field through `object.__setattr__`: 1.0 us for a
# STREAM frame, 0.3 us here). Nothing assigns to them after construction.


@dataclass(frozen=True)
class Padding:
    TYPE: ClassVar[FrameType] = FrameType.PADDING
    SPEC: ClassVar[tuple[str, ...]] = ("rest",)
    data: bytes = b""


@dataclass(unsafe_hash=True)  # hot: see above
class Ack:
    """Everything below `una` arrived, and so did the `ranges` [start, end)
    above it. `largest_pkt` is the highest packet number received and
    `delay_us` how long it waited here: together an RTT sample (RFC 9002)."""

    TYPE: ClassVar[FrameType] = FrameType.ACK
    SPEC: ClassVar[tuple[str, ...]] = ("u64", "u32", "u64", "ranges")
    largest_pkt: int
    delay_us: int
    una: int
    ranges: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Ping:
    TYPE: ClassVar[FrameType] = FrameType.PING
    SPEC: ClassVar[tuple[str, ...]] = ()


@dataclass(unsafe_hash=True)  # hot: see above
class Stream:
    """A reliable chunk. `seq` numbers chunks on this hop (dedup, acks,
    window); `stream`/`stream_seq` order one conversation without holding up
    the others; a message longer than a datagram is `count` fragments."""

    TYPE: ClassVar[FrameType] = FrameType.STREAM
    SPEC: ClassVar[tuple[str, ...]] = ("u64", "u32", "u32", "u8", "u8", "rest")
    seq: int
    stream: int
    stream_seq: int
    index: int
    count: int
    data: bytes


@dataclass(frozen=True)
class Hello:
    """The first datagram of a login (padded to 256 bytes). `nonce` names the
    attempt; retransmissions repeat it."""

    TYPE: ClassVar[FrameType] = FrameType.HELLO
    SPEC: ClassVar[tuple[str, ...]] = ("str", "u64", "b16")
    username: str
    instance_id: int
    nonce: bytes


@dataclass(frozen=True)
class Challenge:
    """SCRAM's server-first message. `cookie` is the server nonce: an HMAC of
    the client's address and nonce under a secret that rotates every 120 s,
    so the server keeps no state until the client proves it can receive."""

    TYPE: ClassVar[FrameType] = FrameType.CHALLENGE
    SPEC: ClassVar[tuple[str, ...]] = ("b16", "b16", "b16", "u32", "b256")
    nonce: bytes
    cookie: bytes
    salt: bytes
    iterations: int
    dh_public: bytes  # the server's static FFDHE2048 key, for wrapping registrations


@dataclass(frozen=True)
class Login:
    """SCRAM's client-final message: the proof, and the keys to store if this
    name is new (ignored when it is not), wrapped under a Diffie-Hellman
    secret so that no eavesdropper ever sees them."""

    TYPE: ClassVar[FrameType] = FrameType.LOGIN
    SPEC: ClassVar[tuple[str, ...]] = ("str", "u64", "b16", "b16", "b32", "b256", "b64")
    username: str
    instance_id: int
    nonce: bytes
    cookie: bytes
    proof: bytes
    dh_public: bytes  # the client's ephemeral FFDHE2048 key
    wrapped_keys: bytes  # StoredKey + ServerKey, XORed with a key stream from the DH secret


@dataclass(frozen=True)
class TicketFrame:
    """Optional, in the same datagram as a LOGIN: the ticket (`Ticket`) this
    client instance got in an earlier session, its proof that it logged in
    before. It lets the LOGIN past the per-name failure budget that strangers'
    wrong passwords can fill; it proves nothing else (the password is still
    checked). Sent only to a server that gave the ticket, so it understands it."""

    TYPE: ClassVar[FrameType] = FrameType.TICKET
    SPEC: ClassVar[tuple[str, ...]] = ("b16",)
    ticket: bytes


@dataclass(frozen=True)
class Welcome:
    """Logged in. The session key is never sent: both sides derive it."""

    TYPE: ClassVar[FrameType] = FrameType.WELCOME
    SPEC: ClassVar[tuple[str, ...]] = ("b16", "b16", "b32", "str")
    nonce: bytes
    session_id: bytes
    signature: bytes  # SCRAM ServerSignature: the server knows the account
    username: str  # the display form the server registered


@dataclass(frozen=True)
class Refused:
    TYPE: ClassVar[FrameType] = FrameType.REFUSED
    SPEC: ClassVar[tuple[str, ...]] = ("b16", "code", "str")
    nonce: bytes
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class VersionFrame:
    TYPE: ClassVar[FrameType] = FrameType.VERSION
    SPEC: ClassVar[tuple[str, ...]] = ("u8",)
    supported: int = VERSION


@dataclass(frozen=True)
class PathChallenge:
    TYPE: ClassVar[FrameType] = FrameType.PATH_CHALLENGE
    SPEC: ClassVar[tuple[str, ...]] = ("b8",)
    data: bytes


@dataclass(frozen=True)
class PathResponse:
    TYPE: ClassVar[FrameType] = FrameType.PATH_RESPONSE
    SPEC: ClassVar[tuple[str, ...]] = ("b8",)
    data: bytes


@dataclass(frozen=True)
class UnknownSession:
    """A hint, not a proof (it carries no MAC): the client answers it only by
    logging in again, which the real server must accept."""

    TYPE: ClassVar[FrameType] = FrameType.UNKNOWN_SESSION
    SPEC: ClassVar[tuple[str, ...]] = ()


_FRAMES = (
    Padding, Ack, Ping, Stream, Hello, Challenge, Login, Welcome, Refused, VersionFrame,
    UnknownSession, PathChallenge, PathResponse, TicketFrame,
)  # fmt: skip
Frame = (
    Padding | Ack | Ping | Stream | Hello | Challenge | Login | Welcome | Refused | VersionFrame
    | UnknownSession | PathChallenge | PathResponse | TicketFrame
)  # fmt: skip
FRAME_CLASSES: dict[int, type] = {cls.TYPE: cls for cls in _FRAMES}
#: Frames that may arrive without a MAC: the login exchange and its hints.
PREAUTH_FRAMES = (
    Padding, Hello, Challenge, Login, Welcome, Refused, VersionFrame, UnknownSession, TicketFrame,
)  # fmt: skip


#: STREAM frames are most of the traffic: their fixed part has its own struct.
_STREAM_FIXED = struct.Struct("!QIIBB")


#: ACK frames ride in nearly every datagram: a struct for them too.
_ACK_FIXED = struct.Struct("!QIQB")
_ACK_RANGE = struct.Struct("!QI")


def _fast_ack(frame: Ack) -> bytes | None:
    """The body of an ACK frame, or None for the generic codec to refuse."""
    try:
        return b"".join((
            _ACK_FIXED.pack(frame.largest_pkt, frame.delay_us, frame.una, len(frame.ranges)),
            *(_ACK_RANGE.pack(start, end - start) for start, end in frame.ranges),
        ))  # fmt: skip
    except (struct.error, TypeError, ValueError):
        return None


def _decode_ack(body: bytes) -> Ack | None:
    """An ACK frame's body decoded, or None for the generic codec (which
    names what is wrong)."""
    if len(body) < _ACK_FIXED.size:
        return None
    largest, delay, una, count = _ACK_FIXED.unpack_from(body)
    if len(body) != _ACK_FIXED.size + _ACK_RANGE.size * count:
        return None
    ranges = []
    for pos in range(_ACK_FIXED.size, len(body), _ACK_RANGE.size):
        start, length = _ACK_RANGE.unpack_from(body, pos)
        ranges.append((start, start + length))
    return Ack(largest, delay, una, tuple(ranges))


def encode_frame(frame: Frame) -> bytes:
    if type(frame) is Ack:
        body = _fast_ack(frame)
        if body is not None:
            return FRAME_HEADER.pack(FrameType.ACK, len(body)) + body
    if type(frame) is Stream:
        try:
            fixed = _STREAM_FIXED.pack(
                frame.seq, frame.stream, frame.stream_seq, frame.index, frame.count
            )
        except struct.error as exc:
            raise LocalProtocolError(f"bad STREAM field: {exc}") from None
        size = _STREAM_FIXED.size + len(frame.data)
        if size > 0xFFFF:
            raise LocalProtocolError("frame too large")
        return FRAME_HEADER.pack(FrameType.STREAM, size) + fixed + frame.data
    body = _encode_fields(frame, frame.SPEC)
    if len(body) > 0xFFFF:
        raise LocalProtocolError("frame too large")
    return FRAME_HEADER.pack(frame.TYPE, len(body)) + body


# --- packets --------------------------------------------------------------


@dataclass(unsafe_hash=True)  # hot: see above
class Packet:
    session_id: bytes
    pkt_num: int
    frames: tuple[Frame, ...]


def mac_tag(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:TAG_SIZE]


def encode_packet(packet: Packet, key: bytes | None, *, pad_to: int = 0) -> bytes:
    """The datagram for `packet`, tagged with `key` when given, padded with a
    PADDING frame up to `pad_to` bytes."""
    flags = FLAG_MAC if key is not None else 0
    try:
        header = HEADER.pack(MAGIC, VERSION, flags, packet.session_id, packet.pkt_num)
    except struct.error as exc:
        raise LocalProtocolError(f"bad header field: {exc}") from None
    if len(packet.session_id) != SESSION_ID_SIZE:
        raise LocalProtocolError("a session id is 16 bytes")
    body = b"".join(encode_frame(f) for f in packet.frames)
    size = HEADER.size + len(body) + (TAG_SIZE if key is not None else CRC.size)
    if size < pad_to:
        body += encode_frame(Padding(bytes(max(0, pad_to - size - FRAME_HEADER.size))))
    data = header + body
    if key is not None:
        data += mac_tag(key, data)
    else:
        data += CRC.pack(zlib.crc32(data))
    if len(data) > MAX_DATAGRAM:
        raise LocalProtocolError(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    return data


@dataclass(unsafe_hash=True)  # hot: see above
class Header:
    version: int
    flags: int
    session_id: bytes
    pkt_num: int


def decode_header(data: bytes) -> Header:
    """The header of a datagram; raises `UnsupportedVersion` for our magic with
    another version and `RemoteProtocolError` for anything else not ours."""
    if len(data) > MAX_DATAGRAM:
        raise RemoteProtocolError(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    if len(data) < len(MAGIC) + 1 or data[: len(MAGIC)] != MAGIC:
        raise RemoteProtocolError("not a chat datagram")
    if data[len(MAGIC)] != VERSION:
        raise UnsupportedVersion(data[len(MAGIC)])
    if len(data) < HEADER.size:
        raise RemoteProtocolError("truncated header")
    _magic, version, flags, session_id, pkt_num = HEADER.unpack_from(data)
    if flags & ~FLAG_MAC:
        raise RemoteProtocolError(f"unknown flags {flags:#x}")
    return Header(version, flags, session_id, pkt_num)


def decode_packet(data: bytes, key: bytes | None = None, header: Header | None = None) -> Packet:
    """Decode a whole datagram. With `key`, the datagram must carry a tag that
    verifies (checked before any frame is parsed); without, it must carry none
    and only pre-login frames. `header`: `decode_header(data)`, if the caller
    already has it."""
    if header is None:
        header = decode_header(data)
    end = len(data)
    if key is not None:
        if not header.flags & FLAG_MAC or end < HEADER.size + TAG_SIZE:
            raise BadTag("missing tag")
        end -= TAG_SIZE
        if not hmac.compare_digest(mac_tag(key, data[:end]), data[end:]):
            raise BadTag("tag does not verify")
    elif header.flags & FLAG_MAC:
        raise RemoteProtocolError("tagged datagram without a session")
    else:
        end -= CRC.size
        if end < HEADER.size or CRC.unpack_from(data, end)[0] != zlib.crc32(data[:end]):
            raise RemoteProtocolError("bad checksum")
    frames: list[Frame] = []
    pos = HEADER.size
    while pos < end:
        if pos + FRAME_HEADER.size > end:
            raise RemoteProtocolError("truncated frame header")
        ftype, size = FRAME_HEADER.unpack_from(data, pos)
        pos += FRAME_HEADER.size
        if pos + size > end:
            raise RemoteProtocolError("frame longer than the datagram")
        cls = FRAME_CLASSES.get(ftype)
        if cls is None:
            raise RemoteProtocolError(f"unknown frame type {ftype}")
        if key is None and cls not in PREAUTH_FRAMES:
            raise RemoteProtocolError(f"{cls.__name__} needs a session")
        if ftype == FrameType.STREAM:
            if size < _STREAM_FIXED.size:
                raise RemoteProtocolError("truncated")
            seq, stream, stream_seq, index, count = _STREAM_FIXED.unpack_from(data, pos)
            start = pos + _STREAM_FIXED.size
            frames.append(Stream(seq, stream, stream_seq, index, count, data[start : pos + size]))
        elif ftype == FrameType.ACK and (ack := _decode_ack(data[pos : pos + size])) is not None:
            frames.append(ack)
        else:
            frame = _decode_fields(cls, cls.SPEC, data[pos : pos + size])  # type: ignore[attr-defined]
            frames.append(frame)  # type: ignore[arg-type]
        pos += size
    if not frames:
        raise RemoteProtocolError("a datagram carries at least one frame")
    return Packet(header.session_id, header.pkt_num, tuple(frames))


def version_reply(request_size: int) -> bytes | None:
    """The VERSION answer to a datagram of another version, or None when even
    that would be larger than the request (no amplification)."""
    reply = encode_packet(Packet(NO_SESSION, 0, (VersionFrame(),)), None)
    return reply if len(reply) <= request_size else None


def unknown_session_reply(session_id: bytes, request_size: int) -> bytes | None:
    """The hint for a datagram naming a session we do not have, if not larger."""
    reply = encode_packet(Packet(session_id, 0, (UnknownSession(),)), None)
    return reply if len(reply) <= request_size else None


# --- chat messages (inside STREAM frames) ---------------------------------

#: Stream 0 carries control messages (accepts, receipts, presence, who);
#: each conversation rides its own stream so a gap in one never holds up
#: another. Conversations map onto this many streams per hop; two that
#: share one are merely ordered together.
CONTROL_STREAM = 0
CONVERSATION_STREAMS = 4095


@functools.lru_cache(maxsize=1 << 12)
def conversation_stream(peer: str) -> int:
    """The stream of the conversation with `peer` on one hop (never 0)."""
    return 1 + zlib.crc32(name_key(peer).encode("utf-8")) % CONVERSATION_STREAMS


class Kind(enum.IntEnum):
    SEND = 1  # client -> server: a chat message for a named user
    ACCEPT = 2  # server -> sender: the server holds the message
    FAIL = 3  # server -> sender: definite refusal, with a reason
    DELIVER = 4  # server -> recipient: a message from someone
    RECEIPT = 5  # recipient -> server: handed to display/store, in order
    DELIVERED = 6  # server -> sender: the recipient's client has it
    WHO = 7  # client -> server: a page of who is online
    WHO_REPLY = 8  # server -> client: that page
    PRESENCE = 9  # server -> client: a contact came online or went offline
    NOTICE = 10  # server -> client: a non-fatal error (rate_limited, ...)
    LOGOUT = 11  # client -> server: end this session
    BYE = 12  # server -> client: your session ends (shutdown, taken over)
    TYPING = 13  # either way: someone is typing to someone
    WATCH = 14  # client -> server: tell me when this user comes and goes
    # Batches: what one pass has for the same peer in one message instead of
    # one each (a commit accepts hundreds of messages at once).
    ACCEPTS = 15  # server -> sender: several ACCEPTs
    RECEIPTS = 16  # client -> server: several RECEIPTs
    DELIVEREDS = 17  # server -> sender: several DELIVEREDs, to one recipient
    TICKET = 18  # server -> client: a login ticket for this client instance (see TicketFrame)


@dataclass(unsafe_hash=True)  # hot: see above
class Send:
    KIND: ClassVar[Kind] = Kind.SEND
    SPEC: ClassVar[tuple[str, ...]] = ("msgid", "str", "text")
    msg_id: MsgId
    to: str
    text: str


@dataclass(unsafe_hash=True)  # hot: see above
class Accept:
    KIND: ClassVar[Kind] = Kind.ACCEPT
    SPEC: ClassVar[tuple[str, ...]] = ("msgid", "u64")
    msg_id: MsgId
    server_msg_id: int


@dataclass(frozen=True)
class Fail:
    KIND: ClassVar[Kind] = Kind.FAIL
    SPEC: ClassVar[tuple[str, ...]] = ("msgid", "code", "str")
    msg_id: MsgId
    reason: ErrorCode
    message: str


@dataclass(unsafe_hash=True)  # hot: see above
class Deliver:
    KIND: ClassVar[Kind] = Kind.DELIVER
    SPEC: ClassVar[tuple[str, ...]] = ("u64", "msgid", "str", "text", "u64")
    server_msg_id: int
    msg_id: MsgId
    sender: str
    text: str
    sent_ms: int  # server's wall clock when it accepted the message


@dataclass(unsafe_hash=True)  # hot: see above
class Receipt:
    KIND: ClassVar[Kind] = Kind.RECEIPT
    SPEC: ClassVar[tuple[str, ...]] = ("u64",)
    server_msg_id: int


@dataclass(unsafe_hash=True)  # hot: see above
class Delivered:
    KIND: ClassVar[Kind] = Kind.DELIVERED
    SPEC: ClassVar[tuple[str, ...]] = ("msgid", "str")
    msg_id: MsgId
    to: str


@dataclass(unsafe_hash=True)  # hot: see above
class Accepts:
    """ACCEPTs for several messages of one sender: (msg_id, server_msg_id)."""

    KIND: ClassVar[Kind] = Kind.ACCEPTS
    SPEC: ClassVar[tuple[str, ...]] = ("accepts",)
    items: tuple[tuple[MsgId, int], ...]


@dataclass(unsafe_hash=True)  # hot: see above
class Receipts:
    """RECEIPTs for several delivered messages."""

    KIND: ClassVar[Kind] = Kind.RECEIPTS
    SPEC: ClassVar[tuple[str, ...]] = ("u64s",)
    server_msg_ids: tuple[int, ...]


@dataclass(unsafe_hash=True)  # hot: see above
class Delivereds:
    """DELIVEREDs for several messages of one sender to one recipient."""

    KIND: ClassVar[Kind] = Kind.DELIVEREDS
    SPEC: ClassVar[tuple[str, ...]] = ("str", "msgids")
    to: str
    msg_ids: tuple[MsgId, ...]


@dataclass(frozen=True)
class Who:
    KIND: ClassVar[Kind] = Kind.WHO
    SPEC: ClassVar[tuple[str, ...]] = ("str", "u16")
    after: str = ""  # name key to start after; "" for the first page
    limit: int = WHO_PAGE_MAX


@dataclass(frozen=True)
class WhoReply:
    KIND: ClassVar[Kind] = Kind.WHO_REPLY
    SPEC: ClassVar[tuple[str, ...]] = ("strs", "str")
    users: tuple[str, ...]
    next_after: str  # "" when this is the last page


@dataclass(frozen=True)
class Presence:
    KIND: ClassVar[Kind] = Kind.PRESENCE
    SPEC: ClassVar[tuple[str, ...]] = ("str", "bool")
    user: str
    online: bool


@dataclass(frozen=True)
class Notice:
    KIND: ClassVar[Kind] = Kind.NOTICE
    SPEC: ClassVar[tuple[str, ...]] = ("code", "str")
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Logout:
    KIND: ClassVar[Kind] = Kind.LOGOUT
    SPEC: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class Bye:
    KIND: ClassVar[Kind] = Kind.BYE
    SPEC: ClassVar[tuple[str, ...]] = ("code", "str")
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Typing:
    KIND: ClassVar[Kind] = Kind.TYPING
    SPEC: ClassVar[tuple[str, ...]] = ("str",)
    user: str  # to the server: the peer; from the server: who is typing


@dataclass(frozen=True)
class Watch:
    KIND: ClassVar[Kind] = Kind.WATCH
    SPEC: ClassVar[tuple[str, ...]] = ("str",)
    user: str


@dataclass(frozen=True)
class Ticket:
    """The server's login ticket for this user and client instance, sent
    inside the session after a login that did not carry a valid one. The
    client keeps it and sends it back (`TicketFrame`) with later LOGINs."""

    KIND: ClassVar[Kind] = Kind.TICKET
    SPEC: ClassVar[tuple[str, ...]] = ("b16",)
    ticket: bytes


Message = (
    Send
    | Accept
    | Fail
    | Deliver
    | Receipt
    | Delivered
    | Accepts
    | Receipts
    | Delivereds
    | Who
    | WhoReply
    | Presence
    | Notice
    | Logout
    | Bye
    | Typing
    | Watch
    | Ticket
)
MESSAGE_CLASSES: dict[int, type] = {
    cls.KIND: cls
    for cls in (
        Send,
        Accept,
        Fail,
        Deliver,
        Receipt,
        Delivered,
        Accepts,
        Receipts,
        Delivereds,
        Who,
        WhoReply,
        Presence,
        Notice,
        Logout,
        Bye,
        Typing,
        Watch,
        Ticket,
    )
}


# The messages on the server's hot path (every chat message is one SEND in,
# one ACCEPT and one DELIVER out, one RECEIPT in, one DELIVERED out) have
# hand-written codecs; the tests hold them to the generic one byte for byte.
_ACCEPT = struct.Struct("!BQQQ")
_RECEIPT = struct.Struct("!BQ")
_DELIVER_HEAD = struct.Struct("!BQQQ")
_MSGID = struct.Struct("!BQQ")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


def _fast_encode(message: Message) -> bytes | None:
    kind = type(message)
    if kind is Accept:
        return _ACCEPT.pack(Kind.ACCEPT, *message.msg_id, message.server_msg_id)  # type: ignore[union-attr]
    if kind is Receipt:
        return _RECEIPT.pack(Kind.RECEIPT, message.server_msg_id)  # type: ignore[union-attr]
    if kind is Deliver:
        assert isinstance(message, Deliver)
        sender = message.sender.encode("utf-8")
        text = message.text.encode("utf-8")
        if len(sender) > 0xFFFF or len(text) > MAX_TEXT_BYTES:
            return None  # the generic codec says what is wrong
        return b"".join((
            _DELIVER_HEAD.pack(Kind.DELIVER, message.server_msg_id, *message.msg_id),
            _U16.pack(len(sender)), sender, _U32.pack(len(text)), text,
            _U64.pack(message.sent_ms),
        ))  # fmt: skip
    if kind is Delivered:
        assert isinstance(message, Delivered)
        to = message.to.encode("utf-8")
        if len(to) > 0xFFFF:
            return None
        return _MSGID.pack(Kind.DELIVERED, *message.msg_id) + _U16.pack(len(to)) + to
    return None


def encode_message(message: Message) -> bytes:
    try:
        fast = _fast_encode(message)
    except (struct.error, UnicodeEncodeError, TypeError):
        fast = None  # let the generic codec raise its LocalProtocolError
    if fast is not None:
        return fast
    return bytes([message.KIND]) + _encode_fields(message, message.SPEC)


def _fast_decode(data: bytes) -> Message | None:
    """SEND and RECEIPT, the server's hot inbound messages; None: use the
    generic codec (which also produces the errors)."""
    kind = data[0]
    try:
        if kind == Kind.RECEIPT and len(data) == _RECEIPT.size:
            return Receipt(_RECEIPT.unpack(data)[1])
        if kind == Kind.SEND and len(data) >= _MSGID.size + 2:
            _, instance_id, client_seq = _MSGID.unpack_from(data)
            (size,) = _U16.unpack_from(data, _MSGID.size)
            end = _MSGID.size + 2 + size
            if end + 4 > len(data):
                return None
            to = data[_MSGID.size + 2 : end].decode("utf-8")
            (size,) = _U32.unpack_from(data, end)
            start = end + 4
            if size > MAX_TEXT_BYTES or start + size != len(data):
                return None
            return Send(MsgId(instance_id, client_seq), to, data[start:].decode("utf-8"))
    except (struct.error, UnicodeDecodeError):
        return None
    return None


def decode_message(data: bytes) -> Message:
    """A chat message, or `RemoteProtocolError`."""
    if not data:
        raise RemoteProtocolError("empty message")
    fast = _fast_decode(data)
    if fast is not None:
        return fast
    cls = MESSAGE_CLASSES.get(data[0])
    if cls is None:
        raise RemoteProtocolError(f"unknown message kind {data[0]}")
    return _decode_fields(cls, cls.SPEC, data[1:])  # type: ignore[attr-defined,return-value]


# --- SCRAM-SHA-256 (RFC 5802 / RFC 7677) -----------------------------------
#
# The password never crosses the network. The client stretches it with
# PBKDF2 (the expensive part, on the client); the server stores only the
# salt, the iteration count, StoredKey and ServerKey, and checks a proof
# with two HMACs. Both sides then derive the session's MAC key from the
# exchange, and the client checks the server's signature (mutual auth).

#: OWASP's figure for PBKDF2-HMAC-SHA256 (about 0.15 s on the client).
PBKDF2_ITERATIONS = 600_000
#: RFC 7677's minimum; only tests and benchmarks configure this low.
PBKDF2_MIN_ITERATIONS = 4096
SALT_SIZE = 16


@dataclass(frozen=True)
class ScramKeys:
    client_key: bytes
    stored_key: bytes
    server_key: bytes


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """PBKDF2-HMAC-SHA-256 of the NFKC form of the password (SASLprep's core)."""
    data = unicodedata.normalize("NFKC", password).encode("utf-8")
    return hashlib.pbkdf2_hmac("sha256", data, salt, iterations)


def scram_keys(salted: bytes) -> ScramKeys:
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return ScramKeys(client_key, hashlib.sha256(client_key).digest(), server_key)


def auth_message(
    username: str, instance_id: int, client_nonce: bytes, server_nonce: bytes, salt: bytes,
    iterations: int, client_dh: bytes = b"", server_dh: bytes = b"",
) -> bytes:  # fmt: skip
    """Everything both sides saw of one login, bound into every proof and
    signature (the DH keys too, so neither can be swapped unnoticed)."""
    return b"|".join((
        b"udp-chat-login-v1", name_key(username).encode("utf-8"), instance_id.to_bytes(8, "big"),
        client_nonce, server_nonce, salt, iterations.to_bytes(4, "big"), client_dh, server_dh,
    ))  # fmt: skip


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def client_proof(keys: ScramKeys, message: bytes) -> bytes:
    signature = _hmac(keys.stored_key, message)
    return bytes(a ^ b for a, b in zip(keys.client_key, signature, strict=True))


def server_signature(server_key: bytes, message: bytes) -> bytes:
    return _hmac(server_key, message)


def verify_proof(stored_key: bytes, message: bytes, proof: bytes) -> bytes | None:
    """The client key behind a valid proof, or None. Constant-time compare."""
    if len(proof) != 32:
        return None
    signature = _hmac(stored_key, message)
    client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    if hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key):
        return client_key
    return None


def session_keys(client_key: bytes, message: bytes) -> tuple[bytes, bytes]:
    """The session's MAC keys (client->server, server->client): known to both
    ends, never sent; one per direction so nothing can be reflected."""
    return _hmac(client_key, b"c2s key|" + message), _hmac(client_key, b"s2c key|" + message)


# --- registration keys under Diffie-Hellman (RFC 7919 ffdhe2048) -----------
#
# A new account's StoredKey and ServerKey must reach the server, but anyone
# who saw a StoredKey and a later proof could log in as that user. So they
# travel XORed with a key stream derived from an ephemeral-static DH secret:
# the server's static key comes in the CHALLENGE, the client's ephemeral one
# in the LOGIN. The server computes the secret only for names being
# registered. (An active man in the middle at registration time is not
# stopped: registration is trust on first use.)

FFDHE2048_P = int(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695A9E13641146433FBCC93"
    "9DCE249B3EF97D2FE363630C75D8F681B202AEC4617AD3DF1ED5D5FD65612433F51F5F066ED085636555"
    "3DED1AF3B557135E7F57C935984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A"
    "797ABC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4AE56EDE76372BB19"
    "0B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F619172FE9CE98583FF8E4F1232EEF28183C3FE"
    "3B1B4C6FAD733BB5FCBC2EC22005C58EF1837D1683B2C6F34A26C1B2EFFA886B423861285C97FFFFFFFF"
    "FFFFFFFF",
    16,
)
DH_SIZE = 256
DH_PRIVATE_BITS = 256  # RFC 7919 section 5.2: at least twice the security level


def dh_public(private: int) -> bytes:
    return pow(2, private, FFDHE2048_P).to_bytes(DH_SIZE, "big")


def dh_secret(private: int, peer_public: bytes) -> bytes | None:
    """The shared secret, or None for a public value outside (1, p-1)."""
    value = int.from_bytes(peer_public, "big")
    if not 1 < value < FFDHE2048_P - 1:
        return None
    return hashlib.sha256(pow(value, private, FFDHE2048_P).to_bytes(DH_SIZE, "big")).digest()


def wrap_keys(secret: bytes, message: bytes, keys: bytes) -> bytes:
    """XOR 64 bytes of keys with a key stream bound to this login (its own inverse)."""
    stream = _hmac(secret, b"wrap 1|" + message) + _hmac(secret, b"wrap 2|" + message)
    return bytes(a ^ b for a, b in zip(keys, stream, strict=True))


def build_login(
    username: str, instance_id: int, nonce: bytes, challenge: Challenge, salted: bytes
) -> tuple[Login, bytes, ScramKeys]:
    """SCRAM client-final for `challenge`, given the salted password: the
    LOGIN frame, the auth message and the keys (for the session keys and to
    check the server's signature). None of the DH work is reused."""
    keys = scram_keys(salted)
    private = secrets.randbits(DH_PRIVATE_BITS)
    public = dh_public(private)
    secret = dh_secret(private, challenge.dh_public)
    if secret is None:
        raise RemoteProtocolError("the server's Diffie-Hellman key is out of range")
    message = auth_message(username, instance_id, nonce, challenge.cookie, challenge.salt,
                           challenge.iterations, public, challenge.dh_public)  # fmt: skip
    wrapped = wrap_keys(secret, message, keys.stored_key + keys.server_key)
    proof = client_proof(keys, message)
    login = Login(username, instance_id, nonce, challenge.cookie, proof, public, wrapped)
    return login, message, keys
