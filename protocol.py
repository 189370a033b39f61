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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from itertools import starmap
from typing import Any, ClassVar, NamedTuple, TypeVar

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
#: 2: the batch messages ACCEPTS, RECEIPTS, DELIVEREDS (kinds 15-17);
#: 3: GROUP_BATCH (kind 31), which a client of version 2 could not read.
VERSION = 3
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
    """Root of every protocol error. `code` is the `ErrorCode` to report for
    it when one fits (`INVALID_NAME`, `TOO_LONG`), so that a caller reads
    `exc.code` instead of guessing from the message; None otherwise."""

    def __init__(self, message: str = "", *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = code


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
    # A terminal `/command` the client does not know (never on the wire: the
    # client reports it and sends nothing).
    UNKNOWN_COMMAND = 17
    # A command-line argument the client cannot use, reported as JSON with
    # `--json` (never on the wire: the program ends before it starts).
    USAGE = 18
    # Accounts (issue 16): 24-27.
    # A message waiting for a name with no account, dropped by the user
    # (`/cancel NAME`); a `failed` reason only, never on the wire.
    CANCELLED = 24
    # A registration of a name whose account was deleted less than
    # `--name-quarantine` days ago: nobody inherits a conversation at once.
    NAME_QUARANTINED = 25
    # The account's password was changed (the answer to a CHANGE_PASSWORD;
    # to the user's other sessions, the BYE that ends them).
    PASSWORD_CHANGED = 26
    # The account was deleted (the answer to a DELETE_ACCOUNT; the BYE to the
    # user's other sessions; the final `failed` reason of a message to it).
    ACCOUNT_DELETED = 27
    # Groups (issue 14): see `GroupRequest` and the README's "Groups".
    NO_SUCH_GROUP = 19  # no group of that name (it never existed or has ended)
    NOT_A_MEMBER = 20  # the user is not a member of the group it posted to or asked about
    GROUP_EXISTS = 21  # a group of that name exists already; pick another
    GROUP_FULL = 22  # the group has its most members (--max-group-members)
    NOT_OWNER = 23  # only the group's owner removes members

    @property
    def label(self) -> str:
        return self.name.lower()


# --- names ----------------------------------------------------------------

_NAME_PUNCTUATION = frozenset("_-.")


#: Characters of a bad name quoted in its error at most: a name of 100,000
#: characters is told by its start and its length, not echoed whole.
QUOTE_MAX = 40


def quote_name(text: str) -> str:
    """`text` quoted for an error: whole if short, else its first
    `QUOTE_MAX` characters and how long it is (`'xxx…' (100000 characters)`)."""
    if len(text) <= QUOTE_MAX:
        return repr(text)
    return f"{text[:QUOTE_MAX] + '…'!r} ({len(text)} characters)"


def normalize_name(name: str) -> str:
    """The display form of a name: NFKC, or `LocalProtocolError` with the reason."""
    if not isinstance(name, str):
        raise LocalProtocolError("a name must be text", code=ErrorCode.INVALID_NAME)
    shown = unicodedata.normalize("NFKC", name.strip())
    if not NAME_MIN <= len(shown) <= NAME_MAX:
        quoted = repr(shown) if len(shown) <= QUOTE_MAX else f"{shown[:QUOTE_MAX] + '…'!r}"
        raise LocalProtocolError(
            f"a name has {NAME_MIN} to {NAME_MAX} characters; {quoted} has {len(shown)}",
            code=ErrorCode.INVALID_NAME,
        )
    for ch in shown:
        category = unicodedata.category(ch)
        if not (category.startswith("L") or category == "Nd" or ch in _NAME_PUNCTUATION):
            raise LocalProtocolError(
                f"{quote_name(shown)} contains {ch!r} (U+{ord(ch):04X}); "
                "use letters, digits, '_', '-' or '.'",
                code=ErrorCode.INVALID_NAME,
            )
    if name_key(shown) in RESERVED_NAMES:
        raise LocalProtocolError(
            f"the name {shown!r} is reserved; pick another", code=ErrorCode.INVALID_NAME
        )
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
            f"the message is {len(data)} bytes of UTF-8; the limit is {MAX_TEXT_BYTES}",
            code=ErrorCode.TOO_LONG,
        )
    return data


# --- field codec ----------------------------------------------------------
#
# Every frame and message is a dataclass (frozen, or for the hot ones see
# above `Padding`) whose fields are listed in `SPEC` with a wire type. At
# import, `_compile` turns each declaration into an encoder and a decoder
# (Python source, compiled once, like `dataclasses` builds `__init__`): the
# fixed-size fields in a row, with the type byte in front and the length
# prefix of the variable field that follows, are one precompiled
# `struct.Struct`, so a record of fixed fields is one `pack` or `unpack_from`
# call; a variable field (text, bytes, a batch) is a step or two of its own.
# A new message is one class, hypothesis round-trips every kind, and no kind
# needs a codec written by hand to be fast (bench/codec_micro.py).

_T = TypeVar("_T")

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


#: The wire types of a fixed size: their `struct` format.
_FIXED_FORMATS = {
    "u8": "B", "u16": "H", "u32": "I", "u64": "Q",
    "b8": "8s", "b16": "16s", "b32": "32s", "b64": "64s", "b256": "256s",
    "bool": "B",  # 0 or 1
    "code": "B",  # an ErrorCode
    "msgid": "QQ",  # instance_id, client_seq
}  # fmt: skip
_INT_LIMITS = {"u8": 0xFF, "u16": 0xFFFF, "u32": 0xFFFF_FFFF, "u64": 0xFFFF_FFFF_FFFF_FFFF}
_BYTES_SIZES = {"b8": 8, "b16": 16, "b32": 32, "b64": 64, "b256": 256}
#: The variable wire types: the format of their length or count prefix, and
#: the most bytes (str, text) or items (the others) they hold.
_PREFIXED = {
    "str": ("H", 0xFFFF),  # UTF-8 with a u16 length
    "text": ("I", MAX_TEXT_BYTES),  # chat text: up to 64 KiB, so a u32 length
    "strs": ("H", 0xFFFF),  # a u16 count of strs
    "ranges": ("B", 0xFF),  # (start, end) pairs, each sent as start u64, end - start u32
    "accepts": ("B", BATCH_MAX),  # (msg_id, server_msg_id) pairs
    "msgids": ("B", BATCH_MAX),
    "u64s": ("B", BATCH_MAX),
    "entries": ("H", 0xFFFF),  # a GROUP_BATCH's entries: see `GroupBatch`
}
#: "rest": bytes up to the end of the frame (no prefix).

#: Items of the batches and ACK ranges, and the u64s of a batch by count.
_ACCEPTS_ITEM = struct.Struct("!QQQ")
_MSGIDS_ITEM = struct.Struct("!QQ")
_RANGE = struct.Struct("!QI")
_U16 = struct.Struct("!H")
_U64S = [struct.Struct(f"!{count}Q") for count in range(BATCH_MAX + 1)]
_ITEM_SIZES = {"ranges": _RANGE.size, "accepts": _ACCEPTS_ITEM.size,
               "msgids": _MSGIDS_ITEM.size, "u64s": 8}  # fmt: skip
_CODES = {int(code): code for code in ErrorCode}
#: What a generated encoder's steps raise for a value that does not fit its
#: declaration; `_encode_error` then says which field and why.
_MISFITS = (
    struct.error, TypeError, ValueError, AttributeError, IndexError, OverflowError,
)  # fmt: skip


def _encode_strs(items: tuple[str, ...]) -> bytes:
    out = []
    for item in items:
        data = item.encode("utf-8")
        out.append(_U16.pack(len(data)))
        out.append(data)
    return b"".join(out)


def _decode_strs(data: bytes, pos: int, end: int, count: int) -> tuple[tuple[str, ...], int]:
    items = []
    for _ in range(count):
        if pos + 2 > end:
            raise RemoteProtocolError("truncated")
        (size,) = _U16.unpack_from(data, pos)
        pos += 2
        if pos + size > end:
            raise RemoteProtocolError("truncated")
        items.append(data[pos : pos + size].decode("utf-8"))
        pos += size
    return tuple(items), pos


def _encode_ranges(items: tuple[tuple[int, int], ...]) -> bytes:
    return b"".join([_RANGE.pack(start, end - start) for start, end in items])


def _decode_ranges(data: bytes, pos: int, count: int) -> tuple[tuple[int, int], ...]:
    body = data[pos : pos + count * _RANGE.size]
    return tuple([(start, start + length) for start, length in _RANGE.iter_unpack(body)])


#: `MsgId(a, b)` without the Python-level `__new__` that NamedTuple adds:
#: half the time, and the decoders build one or more per message.
_tuple_new = tuple.__new__
_msgid_of = functools.partial(_tuple_new, MsgId)


def _encode_accepts(items: tuple[tuple[MsgId, int], ...]) -> bytes:
    # Each item's (instance_id, client_seq, server_msg_id), packed in C: no
    # Python step per item (issue 18, round 3; `_ACCEPTS_ITEM` is QQ + Q).
    if not items:
        return b""
    msg_ids, server_ids = zip(*items, strict=True)
    return b"".join(map(bytes.__add__, starmap(_MSGIDS_ITEM.pack, msg_ids),
                        map(_U64S[1].pack, server_ids)))  # fmt: skip


def _decode_accepts(data: bytes, pos: int, count: int) -> tuple[tuple[MsgId, int], ...]:
    body = data[pos : pos + count * _ACCEPTS_ITEM.size]
    items = _ACCEPTS_ITEM.iter_unpack(body)
    return tuple([(_tuple_new(MsgId, (i, s)), server_id) for i, s, server_id in items])


def _encode_msgids(items: tuple[MsgId, ...]) -> bytes:
    return b"".join(starmap(_MSGIDS_ITEM.pack, items))  # (in C: no Python step per item)


def _decode_msgids(data: bytes, pos: int, count: int) -> tuple[MsgId, ...]:
    body = data[pos : pos + count * _MSGIDS_ITEM.size]
    return tuple(map(_msgid_of, _MSGIDS_ITEM.iter_unpack(body)))


_U32 = struct.Struct("!I")
#: The message kinds a GROUP_BATCH carries (`GroupBatch`): numbers, since
#: the classes come later in the module.
_ENTRY_KINDS = (19, 20)  # Kind.GROUP_DELIVER, Kind.GROUP_EVENT


def _encode_entries(items: tuple[Any, ...]) -> bytes:
    """A GROUP_BATCH's entries: each a u32 length and the entry's own
    message bytes (kind first), as `group_batch` joins them."""
    out = []
    for item in items:
        if item.KIND not in _ENTRY_KINDS:
            raise TypeError
        data = _MESSAGE_ENCODERS[item.__class__](item)
        out.append(_U32.pack(len(data)))
        out.append(data)
    body = b"".join(out)
    if len(body) + 3 > GROUP_BATCH_MAX_BYTES:
        raise ValueError
    return body


def _decode_entries(data: bytes, pos: int, end: int, count: int) -> tuple[tuple[Any, ...], int]:
    items = []
    for _ in range(count):
        if pos + 4 > end:
            raise RemoteProtocolError("GroupBatch: truncated")
        (size,) = _U32.unpack_from(data, pos)
        pos += 4
        if size < 1 or pos + size > end:
            raise RemoteProtocolError("GroupBatch: truncated")
        kind = data[pos]
        if kind not in _ENTRY_KINDS:
            raise RemoteProtocolError(f"GroupBatch: an entry of kind {kind}; it carries only "
                                      f"GROUP_DELIVER and GROUP_EVENT")  # fmt: skip
        items.append(_MESSAGE_DECODERS[kind](data, pos + 1, pos + size))
        pos += size
    return tuple(items), pos


def _encode_u64s(items: tuple[int, ...]) -> bytes:
    return _U64S[len(items)].pack(*items)


def _decode_u64s(data: bytes, pos: int, count: int) -> tuple[int, ...]:
    return _U64S[count].unpack_from(data, pos)


# --- declared values: what fits, and the error that says what does not ----


def _misfit(kind: str, value: object) -> tuple[str, ErrorCode | None] | None:
    """Why `value` cannot be sent as wire type `kind` (and the error code
    that fits, if one does), or None when it can."""
    if kind in _INT_LIMITS:
        if not isinstance(value, int):
            return f"is {type(value).__name__}, not an integer", None
        if not 0 <= value <= _INT_LIMITS[kind]:
            return f"is {value}; a {kind} holds 0 to {_INT_LIMITS[kind]}", None
    elif kind in _BYTES_SIZES:
        if not isinstance(value, bytes):
            return f"is {type(value).__name__}, not bytes", None
        if len(value) != _BYTES_SIZES[kind]:
            return f"is {len(value)} bytes; it must be exactly {_BYTES_SIZES[kind]}", None
    elif kind == "bool":
        if not isinstance(value, bool):
            return f"is {type(value).__name__}, not True or False", None
    elif kind == "code":
        if not isinstance(value, ErrorCode):
            return f"is {_short(value)}, not an ErrorCode", None
    elif kind == "msgid":
        if not (isinstance(value, tuple) and len(value) == 2):
            return f"is {_short(value)}, not a MsgId", None
        for part in value:
            if (why := _misfit("u64", part)) is not None:
                return f"has a part that {why[0]}", None
    elif kind in ("str", "text"):
        if not isinstance(value, str):
            return f"is {type(value).__name__}, not str", None
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:
            return f"is not valid text: {exc.reason}", None
        limit = _PREFIXED[kind][1]
        if size > limit:
            return f"is {size} bytes of UTF-8; at most {limit} fit", ErrorCode.TOO_LONG
    elif kind == "rest":
        if not isinstance(value, bytes):
            return f"is {type(value).__name__}, not bytes", None
    elif kind in _PREFIXED:
        return _misfit_items(kind, value)
    else:  # pragma: no cover - a SPEC typo is caught at import, by _compile
        raise AssertionError(kind)
    return None


def _misfit_items(kind: str, value: object) -> tuple[str, ErrorCode | None] | None:
    if not isinstance(value, tuple):
        return f"is {type(value).__name__}, not a tuple", None
    low = 1 if kind in ("accepts", "msgids", "u64s", "entries") else 0
    high = _PREFIXED[kind][1]
    if not low <= len(value) <= high:
        return f"has {len(value)} items; it holds {low} to {high}", None
    if kind == "entries":
        return _misfit_entries(value)
    for index, item in enumerate(value):
        if kind == "strs":
            why = _misfit("str", item)
        elif kind == "u64s":
            why = _misfit("u64", item)
        elif kind == "msgids":
            why = _misfit("msgid", item)
        elif not (isinstance(item, tuple) and len(item) == 2):
            why = f"is {_short(item)}, not a pair", None
        elif kind == "accepts":
            why = _misfit("msgid", item[0]) or _misfit("u64", item[1])
        else:  # ranges: start, end
            why = _misfit("u64", item[0])
            if why is None and not (
                isinstance(item[1], int) and 0 <= item[1] - item[0] <= _INT_LIMITS["u32"]
            ):
                why = f"is {_short(item)}; a range is (start, end), end - start a u32", None
        if why is not None:
            return f"has an item {index} that {why[0]}", why[1]
    return None


def _misfit_entries(value: tuple[Any, ...]) -> tuple[str, ErrorCode | None] | None:
    size = 3
    for index, item in enumerate(value):
        if getattr(item, "KIND", None) not in _ENTRY_KINDS:
            return (
                f"has an item {index} that is {_short(item)}, not a GroupDeliver or GroupEvent",
                None,
            )
        try:
            size += 4 + len(encode_message(item))
        except LocalProtocolError as exc:
            return f"has an item {index} that does not fit: {exc}", exc.code
    if size > GROUP_BATCH_MAX_BYTES:
        return f"is {size} bytes; a GROUP_BATCH holds at most {GROUP_BATCH_MAX_BYTES}", None
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _encode_error(record: object, exc: Exception) -> LocalProtocolError:
    """The error for a record a generated encoder could not encode: which
    field does not fit its declaration and why."""
    cls = type(record)
    for name, kind in zip(_field_names(cls), cls.SPEC, strict=True):  # type: ignore[attr-defined]
        why = _misfit(kind, getattr(record, name))
        if why is not None:
            return LocalProtocolError(f"{cls.__name__}.{name} {why[0]}", code=why[1])
    if hasattr(cls, "TYPE"):  # every field fits, but not in one frame together
        return LocalProtocolError(f"a {cls.__name__} frame holds at most 65535 bytes; "
                                  f"send less in one frame")  # fmt: skip
    return LocalProtocolError(f"cannot encode {cls.__name__}: {exc}")  # pragma: no cover


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


# --- the codec compiler -----------------------------------------------------

#: A generated encoder: record -> its bytes, type and (frames) length first.
_Encoder = Callable[[Any], bytes]
#: A generated decoder: (data, start, end) -> the record in data[start:end]
#: (the bytes after the type byte, or after the frame header).
_Decoder = Callable[[bytes, int, int], Any]


def _compile(cls: type, tag: int, *, frame: bool) -> tuple[_Encoder, _Decoder]:
    """The encoder and decoder of `cls` (a frame when `frame`, else a chat
    message), generated from its SPEC."""
    names = _field_names(cls)
    spec: tuple[str, ...] = cls.SPEC  # type: ignore[attr-defined]
    if len(names) != len(spec):
        raise TypeError(f"{cls.__name__}: {len(names)} fields but {len(spec)} wire types")
    for kind in spec:
        if kind not in _FIXED_FORMATS and kind not in _PREFIXED and kind != "rest":
            raise TypeError(f"{cls.__name__}: unknown wire type {kind!r}")
    env: dict[str, Any] = {
        "_cls": cls, "_error": _encode_error, "_MISFITS": _MISFITS, "_ErrorCode": ErrorCode,
        "_CODES": _CODES, "_MsgId": MsgId, "_new": _tuple_new, "_Remote": RemoteProtocolError,
        "_decode_strs": _decode_strs, "_encode_strs": _encode_strs,
    }  # fmt: skip
    for kind in ("ranges", "accepts", "msgids", "u64s", "entries"):
        env[f"_encode_{kind}"] = globals()[f"_encode_{kind}"]
        env[f"_decode_{kind}"] = globals()[f"_decode_{kind}"]
    encoder = _encoder_source(cls.__name__, tag, names, spec, frame, env)
    decoder = _decoder_source(cls.__name__, names, spec, env)
    # Named so that a traceback or a profile says whose codec it is.
    exec(compile(encoder + decoder, f"<protocol codec of {cls.__name__}>", "exec"), env)
    return env[f"encode_{cls.__name__}"], env[f"decode_{cls.__name__}"]


def _add_struct(env: dict[str, Any], fmt: str) -> tuple[str, int]:
    """A new `struct.Struct` for the generated code: its name there, its size."""
    structs: list[struct.Struct] = env.setdefault("_structs", [])
    structs.append(struct.Struct("!" + fmt))
    name = f"_S{len(structs) - 1}"
    env[name] = structs[-1]
    return name, structs[-1].size


def _encoder_source(
    name: str, tag: int, names: tuple[str, ...], spec: tuple[str, ...], frame: bool,
    env: dict[str, Any],
) -> str:  # fmt: skip
    steps: list[str] = []  # checks and the encoding of variable fields
    pieces: list[str] = []  # the expressions joined into the result
    sizes: list[str] = []  # the lengths of the variable pieces (a frame's length)
    fmt, args = ("BH", [str(tag), "{size}"]) if frame else ("B", [str(tag)])
    fixed = 0

    def close() -> None:
        nonlocal fmt, args, fixed
        if args:
            struct_name, size = _add_struct(env, fmt)
            pieces.append(f"{struct_name}.pack({', '.join(args)})")
            fixed += size
        fmt, args = "", []

    for i, (field, kind) in enumerate(zip(names, spec, strict=True)):
        v = f"v{i}"
        steps.append(f"{v} = record.{field}")
        if kind in _BYTES_SIZES:  # struct would pad or cut a wrong length
            steps.append(f"if len({v}) != {_BYTES_SIZES[kind]}: raise ValueError")
        elif kind == "bool":
            steps.append(f"if {v} is not True and {v} is not False: raise TypeError")
        elif kind == "code":
            steps.append(f"if {v}.__class__ is not _ErrorCode: raise TypeError")
        if kind == "msgid":
            steps.append(f"{v}a, {v}b = {v}")
            fmt += "QQ"
            args += [f"{v}a", f"{v}b"]
        elif kind in _FIXED_FORMATS:
            fmt += _FIXED_FORMATS[kind]
            args.append(v)
        elif kind == "rest":
            steps.append(f"if not isinstance({v}, bytes): raise TypeError")
            close()
            pieces.append(v)
            sizes.append(f"len({v})")
        else:
            prefix, limit = _PREFIXED[kind]
            d = f"d{i}"
            if kind in ("str", "text"):
                steps.append(f"{d} = {v}.encode('utf-8')")
                if kind == "text":  # the u32 prefix would take more
                    steps.append(f"if len({d}) > {limit}: raise ValueError")
                fmt += prefix
                args.append(f"len({d})")
            else:
                low = 1 if kind in ("accepts", "msgids", "u64s", "entries") else 0
                steps.append(f"if {v}.__class__ is not tuple or not {low} <= len({v}) <= {limit}:"
                             f" raise ValueError")  # fmt: skip
                steps.append(f"{d} = _encode_{kind}({v})")
                fmt += prefix
                args.append(f"len({v})")
            close()
            pieces.append(d)
            sizes.append(f"len({d})")
    close()
    result = " + ".join(pieces) if len(pieces) <= 2 else f"b''.join(({', '.join(pieces)}))"
    result = result.replace("{size}", " + ".join([str(fixed - 3), *sizes]))
    body = "\n".join(f"        {step}" for step in steps)
    return (
        f"def encode_{name}(record):\n"
        f"    try:\n{body}\n"
        f"        return {result}\n"
        f"    except _MISFITS as exc:\n"
        f"        raise _error(record, exc) from None\n"
    )


def _decoder_source(
    name: str, names: tuple[str, ...], spec: tuple[str, ...], env: dict[str, Any]
) -> str:
    lines: list[str] = []
    values: list[str] = []  # the expressions passed to the class, in field order
    fmt, targets, checks = "", list[str](), list[str]()
    has_text = any(kind in ("str", "text", "strs") for kind in spec)
    all_fixed = all(kind in _FIXED_FORMATS for kind in spec)

    def close() -> None:
        nonlocal fmt, targets, checks
        if targets:
            struct_name, size = _add_struct(env, fmt)
            if all_fixed:  # one check covers truncated and trailing bytes
                lines.append(f"if end - pos != {size}: raise _Remote('wrong size')")
            else:
                lines.append(f"if pos + {size} > end: raise _Remote('truncated')")
            lines.append(f"{', '.join(targets)}, = {struct_name}.unpack_from(data, pos)")
            if not all_fixed:
                lines.append(f"pos += {size}")
            lines.extend(checks)
        fmt, targets, checks = "", [], []

    for i, kind in enumerate(spec):
        v = f"v{i}"
        if kind == "msgid":
            fmt += "QQ"
            targets += [f"{v}a", f"{v}b"]
            values.append(f"_new(_MsgId, ({v}a, {v}b))")
        elif kind == "bool":
            fmt += "B"
            targets.append(v)
            checks.append(f"if {v} > 1: raise _Remote('a flag is 0 or 1')")
            values.append(f"{v} == 1")
        elif kind == "code":
            fmt += "B"
            targets.append(f"{v}n")
            checks.append(f"{v} = _CODES.get({v}n)")
            checks.append(f"if {v} is None: raise _Remote(f'unknown error code {{{v}n}}')")
            values.append(v)
        elif kind in _FIXED_FORMATS:
            fmt += _FIXED_FORMATS[kind]
            targets.append(v)
            values.append(v)
        elif kind == "rest":
            close()
            lines.append(f"{v} = data[pos:end]")
            lines.append("pos = end")
            values.append(v)
        else:
            prefix, limit = _PREFIXED[kind]
            fmt += prefix
            targets.append(f"{v}n")
            close()
            values.append(v)
            if kind in ("str", "text"):
                if kind == "text":  # never trust a declared length
                    lines.append(f"if {v}n > {limit}: raise _Remote('text over the limit')")
                lines.append(f"if pos + {v}n > end: raise _Remote('truncated')")
                lines.append(f"{v} = data[pos:pos + {v}n].decode('utf-8')")
                lines.append(f"pos += {v}n")
            elif kind == "strs":
                lines.append(f"{v}, pos = _decode_strs(data, pos, end, {v}n)")
            elif kind == "entries":
                lines.append(f"if {v}n < 1: raise _Remote('a batch has at least 1 entry')")
                lines.append(f"{v}, pos = _decode_entries(data, pos, end, {v}n)")
            else:
                if kind != "ranges":
                    refusal = f"f'a batch has 1 to {limit} items, not {{{v}n}}'"
                    lines.append(f"if not 1 <= {v}n <= {limit}: raise _Remote({refusal})")
                size = f"{v}n * {_ITEM_SIZES[kind]}"
                lines.append(f"if pos + {size} > end: raise _Remote('truncated')")
                lines.append(f"{v} = _decode_{kind}(data, pos, {v}n)")
                lines.append(f"pos += {size}")
    close()
    if not spec or (not all_fixed and spec[-1] != "rest"):
        lines.append("if pos != end: raise _Remote('trailing bytes')")
    lines.append(f"return _cls({', '.join(values)})")
    indent = "        " if has_text else "    "
    # Every refusal names the record: "Send: truncated".
    lines = [line.replace("_Remote('", f"_Remote('{name}: ") for line in lines]
    lines = [line.replace("_Remote(f'", f"_Remote(f'{name}: ") for line in lines]
    body = "\n".join(indent + line for line in lines)
    if has_text:
        body = (f"    try:\n{body}\n    except UnicodeDecodeError:\n"
                f"        raise _Remote('{name}: text is not UTF-8') from None")  # fmt: skip
    return f"def decode_{name}(data, pos, end):\n{body}\n"


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
# Delivered) are `@dataclass(unsafe_hash=True, slots=True)`: value equality
# and a hash like the frozen ones, but built in a quarter of the time (a
# frozen dataclass sets each field through `object.__setattr__`: 1.0 us for
# a STREAM frame, 0.3 us here), and with slots a little faster still and
# smaller (no instance dict: a STREAM frame held for a gap is 80 bytes
# without its data, not 350). Nothing assigns to them after construction.


@dataclass(frozen=True)
class Padding:
    TYPE: ClassVar[FrameType] = FrameType.PADDING
    SPEC: ClassVar[tuple[str, ...]] = ("rest",)
    data: bytes = b""


@dataclass(unsafe_hash=True, slots=True)  # hot: see above
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


@dataclass(unsafe_hash=True, slots=True)  # hot: see above
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


#: Each frame type's generated codec: see `_compile`.
_FRAME_ENCODERS: dict[type, _Encoder] = {}
#: Frame type -> (decoder, allowed without a MAC, class name).
_FRAME_DECODERS: dict[int, tuple[_Decoder, bool, str]] = {}
for _frame_cls in _FRAMES:
    _encode, _decode = _compile(_frame_cls, _frame_cls.TYPE, frame=True)
    _FRAME_ENCODERS[_frame_cls] = _encode
    _FRAME_DECODERS[_frame_cls.TYPE] = (_decode, _frame_cls in PREAUTH_FRAMES, _frame_cls.__name__)


def encode_frame(frame: Frame) -> bytes:
    """A frame's bytes (header and body), or `LocalProtocolError` naming the
    field that does not fit its declaration."""
    try:
        encode = _FRAME_ENCODERS[frame.__class__]
    except KeyError:
        raise LocalProtocolError(f"{type(frame).__name__} is not a frame") from None
    return encode(frame)


# --- packets --------------------------------------------------------------


@dataclass(unsafe_hash=True, slots=True)  # hot: see above
class Packet:
    session_id: bytes
    pkt_num: int
    frames: tuple[Frame, ...]


#: Session keys whose HMAC states `_mac_states` keeps, the most recently
#: used: a busy server's active sessions. A few hundred bytes each (two
#: hash states; 200 B of RSS measured); a key not kept costs what a plain
#: `hmac.new` did (its states made again, ~1 us).
MAC_KEYS_CACHED = 1024
_SHA256_BLOCK = 64
_IPAD = bytes(x ^ 0x36 for x in range(256))  # RFC 2104's ipad, as a translation table
_OPAD = bytes(x ^ 0x5C for x in range(256))


@functools.lru_cache(maxsize=MAC_KEYS_CACHED)
def _mac_states(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """SHA-256 after the key's inner and outer pads: what HMAC hashes first
    for every message under `key` (RFC 2104 section 4 suggests keeping it)."""
    if len(key) > _SHA256_BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_SHA256_BLOCK, b"\0")
    return hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD))


def mac_tag(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA-256 of `data` under `key`, cut to TAG_SIZE bytes.

    From the key's padded states (`_mac_states`), copied: 1.1 us for a full
    datagram instead of 1.9 with `hmac.new(...)` or `hmac.digest`, which
    set the key up again each time. And `hmac.digest` releases the GIL
    around its OpenSSL call whatever the size: the store thread takes it,
    and the loop waits for it back, on every datagram (hashlib releases it
    only from 2 KiB up, more than a datagram)."""
    inner, outer = _mac_states(key)
    inner = inner.copy()
    inner.update(data)
    outer = outer.copy()
    outer.update(inner.digest())
    return outer.digest()[:TAG_SIZE]


#: The frame types the hot path packs and reads, as plain ints: on Python
#: 3.11 every attribute read on an Enum class (`FrameType.STREAM`) goes
#: through `EnumType.__getattr__`'s hook, ~0.2 us each, per message here.
_STREAM_TYPE = int(FrameType.STREAM)
_ACK_TYPE = int(FrameType.ACK)

#: A STREAM frame's header and fixed fields (`Stream.SPEC` up to its data):
#: `stream_frame` packs a chunk with it once, when the chunk is queued.
STREAM_HEAD = struct.Struct("!BHQIIBB")


def stream_frame(seq: int, stream: int, stream_seq: int, index: int, count: int,
                 data: bytes) -> bytes:  # fmt: skip
    """The bytes of `Stream(seq, stream, stream_seq, index, count, data)`,
    the same as `encode_frame` gives, without building the record: the
    sender keeps these bytes for the first send and every resend."""
    try:
        head = STREAM_HEAD.pack(_STREAM_TYPE, STREAM_HEAD.size - FRAME_HEADER.size + len(data),
                                seq, stream, stream_seq, index, count)  # fmt: skip
    except struct.error as exc:
        raise LocalProtocolError(f"Stream: {exc}") from None
    return head + data


#: An ACK frame's header, fixed fields and range count (`Ack.SPEC`): `ack_frame`.
ACK_HEAD = struct.Struct("!BHQIQB")


def ack_frame(largest_pkt: int, delay_us: int, una: int, ranges: list[tuple[int, int]]) -> bytes:
    """The bytes of `Ack(largest_pkt, delay_us, una, tuple(ranges))`, the same
    as `encode_frame` gives, without building the record: the connection
    makes one for nearly every datagram it sends."""
    try:
        head = ACK_HEAD.pack(_ACK_TYPE, ACK_HEAD.size - FRAME_HEADER.size + len(ranges)
                             * _RANGE.size, largest_pkt, delay_us, una, len(ranges))  # fmt: skip
        if not ranges:
            return head
        return head + b"".join([_RANGE.pack(start, end - start) for start, end in ranges])
    except struct.error as exc:
        raise LocalProtocolError(f"Ack: {exc}") from None


def seal(session_id: bytes, pkt_num: int, body: bytes, key: bytes | None) -> bytes:
    """The datagram for frames already encoded (`body`): header, body, and
    the tag (with `key`) or the checksum."""
    try:
        header = HEADER.pack(MAGIC, VERSION, FLAG_MAC if key is not None else 0, session_id,
                             pkt_num)  # fmt: skip
    except struct.error as exc:
        raise LocalProtocolError(f"bad header field: {exc}") from None
    if len(session_id) != SESSION_ID_SIZE:
        raise LocalProtocolError("a session id is 16 bytes")
    data = header + body
    if key is not None:
        data += mac_tag(key, data)
    else:
        data += CRC.pack(zlib.crc32(data))
    if len(data) > MAX_DATAGRAM:
        raise LocalProtocolError(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    return data


def encode_packet(packet: Packet, key: bytes | None, *, pad_to: int = 0) -> bytes:
    """The datagram for `packet`, tagged with `key` when given, padded with a
    PADDING frame up to `pad_to` bytes."""
    encoders = _FRAME_ENCODERS
    try:
        body = b"".join([encoders[f.__class__](f) for f in packet.frames])
    except KeyError:
        body = b"".join([encode_frame(f) for f in packet.frames])  # names the stranger
    size = HEADER.size + len(body) + (TAG_SIZE if key is not None else CRC.size)
    if size < pad_to:
        body += encode_frame(Padding(bytes(max(0, pad_to - size - FRAME_HEADER.size))))
    return seal(packet.session_id, packet.pkt_num, body, key)


@dataclass(unsafe_hash=True, slots=True)  # hot: see above
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
    frames = _decode_frames(data, HEADER.size, end, key is not None)
    return Packet(header.session_id, header.pkt_num, tuple(frames))


#: A STREAM frame's fixed fields after its frame header (`Stream.SPEC` up to
#: its data): `_decode_frames` reads them itself, nearly every frame is one.
_STREAM_FIXED = struct.Struct("!QIIBB")
#: An ACK frame's fixed fields and its range count (`Ack.SPEC`), likewise.
_ACK_FIXED = struct.Struct("!QIQB")
assert (FRAME_HEADER.size, _STREAM_FIXED.size, _ACK_FIXED.size) == (3, 18, 21)  # (`_decode_frames`)


def decode_tagged(data: bytes, key: bytes) -> Packet:
    """`decode_packet(data, key)` for a datagram whose header is known to be
    a session's (our magic, version and flags FLAG_MAC) and whose
    size is within HEADER.size + TAG_SIZE and MAX_DATAGRAM, as the server
    sorts a live session's datagrams: none of the header's checks can fail,
    and no `Header` record is built (issue 18: a lone message's datagrams
    pay the per-datagram path in full)."""
    end = len(data) - TAG_SIZE
    if not hmac.compare_digest(mac_tag(key, data[:end]), data[end:]):
        raise BadTag("tag does not verify")
    _magic, _version, _flags, session_id, pkt_num = HEADER.unpack_from(data)
    return Packet(session_id, pkt_num, tuple(_decode_frames(data, HEADER.size, end, True)))


def _decode_frames(data: bytes, pos: int, end: int, tagged: bool) -> list[Frame]:
    """The frames in `data[pos:end]` (a datagram's body, its MAC or checksum
    already checked; `tagged`: it had a MAC, so any frame may come).

    The hot path of every datagram: a STREAM frame (nearly all of them) is
    read here in line, the same record and the same refusals as its
    generated decoder's (`_decoder_source`; tests/test_hot_path2.py holds
    the two together), without a dict lookup and a call per frame."""
    # (Globals, not locals bound at the top: a datagram has one to three
    # frames, and the binding cost more than it saved; issue 18.)
    frames: list[Frame] = []
    while pos < end:
        if pos + 3 > end:  # FRAME_HEADER.size
            raise RemoteProtocolError("truncated frame header")
        ftype, size = FRAME_HEADER.unpack_from(data, pos)
        pos += 3
        stop = pos + size
        if stop > end:
            raise RemoteProtocolError("frame longer than the datagram")
        if tagged:
            if ftype == _STREAM_TYPE and size >= 18:  # _STREAM_FIXED.size
                seq, stream, stream_seq, index, count = _STREAM_FIXED.unpack_from(data, pos)
                frames.append(Stream(seq, stream, stream_seq, index, count, data[pos + 18 : stop]))
                pos = stop
                continue
            if ftype == _ACK_TYPE and size == 21:  # _ACK_FIXED.size
                # An ACK with no ranges (nearly every one) in line too; one
                # with ranges, or any refusal, is its decoder's.
                largest_pkt, delay_us, una, ranges = _ACK_FIXED.unpack_from(data, pos)
                if not ranges:
                    frames.append(Ack(largest_pkt, delay_us, una, ()))
                    pos = stop
                    continue
        entry = _FRAME_DECODERS.get(ftype)
        if entry is None:
            raise RemoteProtocolError(f"unknown frame type {ftype}")
        decode, preauth, name = entry
        if not tagged and not preauth:
            raise RemoteProtocolError(f"{name} needs a session")
        frames.append(decode(data, pos, stop))
        pos = stop
    if not frames:
        raise RemoteProtocolError("a datagram carries at least one frame")
    return frames


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
    # Accounts (issue 16): 27-29.
    CHANGE_PASSWORD = 27  # client -> server: proof of the old password, the new verifier
    DELETE_ACCOUNT = 28  # client -> server: proof of the password; erase the account
    ACCOUNT_RESULT = 29  # server -> client: how a CHANGE_PASSWORD / DELETE_ACCOUNT ended
    # Groups: one sequence per group (`group_seq`) orders its messages and its
    # membership changes alike, for every member.
    GROUP_DELIVER = 19  # server -> member: a message to a group (receipted like a DELIVER)
    GROUP_EVENT = 20  # server -> member: a membership change, in the group's order
    GROUP_REQUEST = 21  # client -> server: create, add, remove, leave, members, list
    GROUP_RESULT = 22  # server -> client: how a GROUP_REQUEST ended (0 or an ErrorCode)
    GROUP_INFO = 23  # server -> client: a page of a group's owner and members
    GROUP_LIST = 24  # server -> client: a page of the groups the user is in
    # 25 was GROUP_DELIVEREDS (one member has these messages: a frame per
    # member per pass for the sender to ack); retired for GROUP_REACHED.
    GROUP_ACCEPT = 26  # server -> sender: a group message is stored for every member
    GROUP_REACHED = 30  # server -> sender: these members have one of its group messages
    GROUP_BATCH = 31  # server -> member: several GROUP_DELIVERs / GROUP_EVENTs in one payload


@dataclass(unsafe_hash=True, slots=True)  # hot: see above
class Send:
    KIND: ClassVar[Kind] = Kind.SEND
    SPEC: ClassVar[tuple[str, ...]] = ("msgid", "str", "text")
    msg_id: MsgId
    to: str
    text: str


@dataclass(unsafe_hash=True, slots=True)  # hot: see above
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


@dataclass(unsafe_hash=True, slots=True)  # hot: see above
class Deliver:
    KIND: ClassVar[Kind] = Kind.DELIVER
    SPEC: ClassVar[tuple[str, ...]] = ("u64", "msgid", "str", "text", "u64")
    server_msg_id: int
    msg_id: MsgId
    sender: str
    text: str
    sent_ms: int  # server's wall clock when it accepted the message


@dataclass(unsafe_hash=True, slots=True)  # hot: see above
class Receipt:
    KIND: ClassVar[Kind] = Kind.RECEIPT
    SPEC: ClassVar[tuple[str, ...]] = ("u64",)
    server_msg_id: int


@dataclass(unsafe_hash=True, slots=True)  # hot: see above
class Delivered:
    KIND: ClassVar[Kind] = Kind.DELIVERED
    SPEC: ClassVar[tuple[str, ...]] = ("msgid", "str")
    msg_id: MsgId
    to: str


@dataclass(unsafe_hash=True, slots=True)  # hot: see above
class Accepts:
    """ACCEPTs for several messages of one sender: (msg_id, server_msg_id)."""

    KIND: ClassVar[Kind] = Kind.ACCEPTS
    SPEC: ClassVar[tuple[str, ...]] = ("accepts",)
    items: tuple[tuple[MsgId, int], ...]


@dataclass(unsafe_hash=True, slots=True)  # hot: see above
class Receipts:
    """RECEIPTs for several delivered messages."""

    KIND: ClassVar[Kind] = Kind.RECEIPTS
    SPEC: ClassVar[tuple[str, ...]] = ("u64s",)
    server_msg_ids: tuple[int, ...]


@dataclass(unsafe_hash=True, slots=True)  # hot: see above
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


@dataclass(frozen=True)
class ChangePassword:
    """Change the account's password, inside the session: a SCRAM proof of
    the old password over `account_message` (which binds this session, the
    nonce and the new salt and iterations), and the new StoredKey and
    ServerKey XORed with a key stream only the old password's ClientKey and
    the session's key give (`account_wrap`). No password crosses the wire."""

    KIND: ClassVar[Kind] = Kind.CHANGE_PASSWORD
    SPEC: ClassVar[tuple[str, ...]] = ("b16", "b32", "b16", "u32", "b64")
    nonce: bytes  # names the request; the ACCOUNT_RESULT carries it back
    proof: bytes
    salt: bytes  # the new password's
    iterations: int
    wrapped_keys: bytes  # new StoredKey + ServerKey, wrapped


@dataclass(frozen=True)
class DeleteAccount:
    """Delete the account, inside the session: a SCRAM proof of the password
    over `account_message` (with no new salt)."""

    KIND: ClassVar[Kind] = Kind.DELETE_ACCOUNT
    SPEC: ClassVar[tuple[str, ...]] = ("b16", "b32")
    nonce: bytes
    proof: bytes


@dataclass(frozen=True)
class AccountResult:
    """How a CHANGE_PASSWORD or DELETE_ACCOUNT ended: `PASSWORD_CHANGED` or
    `ACCOUNT_DELETED` when done (and durable), else why not (`BAD_PASSWORD`,
    `RATE_LIMITED`, `SERVER_ERROR`)."""

    KIND: ClassVar[Kind] = Kind.ACCOUNT_RESULT
    SPEC: ClassVar[tuple[str, ...]] = ("b16", "code", "str")
    nonce: bytes
    code: ErrorCode
    message: str


#: A group is written with this in front wherever a peer's name goes (`#team`),
#: so a group and a user of the same name never collide; on the wire, in
#: the group fields of the group messages, the name goes without it.
GROUP_PREFIX = "#"
#: Users named in one GROUP_REQUEST (create, add) at most: with names of up
#: to 32 characters of 4 UTF-8 bytes each, the GROUP_EVENT that repeats them
#: stays far inside one message (`reliability`'s 65 KiB). More are added in
#: several requests.
GROUP_REQUEST_USERS_MAX = 256
#: Names in one GROUP_INFO or GROUP_LIST page at most, for the same reason:
#: a group of 1,000 members is told in four pages.
GROUP_PAGE_MAX = 256


class GroupChange(enum.IntEnum):
    """What a GROUP_EVENT reports; `.label` is its JSON spelling."""

    CREATED = 1  # `by` created the group with `users` (the members, `by` first)
    ADDED = 2  # `by` added `users`
    REMOVED = 3  # `by` (the owner) removed `users`
    LEFT = 4  # `by` left
    OWNER = 5  # ownership passed to `users[0]` (the owner left)

    @property
    def label(self) -> str:
        return self.name.lower()


class GroupAction(enum.IntEnum):
    """What a GROUP_REQUEST asks for."""

    CREATE = 1  # a new group named `group`, with the sender and `users` as members
    ADD = 2  # add `users` (any member may)
    REMOVE = 3  # remove `users` (the owner only)
    LEAVE = 4  # the sender leaves
    MEMBERS = 5  # answered with GROUP_INFO pages
    LIST = 6  # answered with GROUP_LIST pages (`group` is "")


def group_address(group: str) -> str:
    """`team` as a peer name: `#team`."""
    return GROUP_PREFIX + group


def is_group_address(peer: str) -> bool:
    """Whether a peer name (a SEND's `to`) names a group."""
    return peer.startswith(GROUP_PREFIX)


@dataclass(frozen=True)
class GroupDeliver:
    """A group message for one member. `server_msg_id` is in the same id
    space as a DELIVER's and receipted the same way; `group_seq` is its place
    in the group's one sequence."""

    KIND: ClassVar[Kind] = Kind.GROUP_DELIVER
    SPEC: ClassVar[tuple[str, ...]] = ("u64", "u64", "msgid", "str", "str", "text", "u64")
    server_msg_id: int
    group_seq: int
    msg_id: MsgId
    group: str  # without the '#'
    sender: str
    text: str
    sent_ms: int  # server's wall clock when it accepted the message


@dataclass(frozen=True)
class GroupEvent:
    """A membership change, in the group's sequence like a message and
    receipted like one (`server_msg_id`). `change` is a `GroupChange`."""

    KIND: ClassVar[Kind] = Kind.GROUP_EVENT
    SPEC: ClassVar[tuple[str, ...]] = ("u64", "u64", "str", "u8", "str", "strs", "u64")
    server_msg_id: int
    group_seq: int
    group: str
    change: int
    by: str
    users: tuple[str, ...]
    sent_ms: int


@dataclass(frozen=True)
class GroupRequest:
    """A request about groups. `request_id` is new for each request of one
    client instance; a request sent again with the same id (after a
    re-login) is answered again and acted on once. `action` is a
    `GroupAction`. Sent on the group's stream (LIST: the control stream)."""

    KIND: ClassVar[Kind] = Kind.GROUP_REQUEST
    SPEC: ClassVar[tuple[str, ...]] = ("u64", "u8", "str", "strs")
    request_id: int
    action: int
    group: str  # without the '#'; "" for LIST
    users: tuple[str, ...] = ()


#: A GROUP_RESULT's text, code 0, for an add that changed nothing (everyone
#: named is a member already): no GROUP_EVENT follows it.
ALREADY_MEMBERS = "already members"


@dataclass(frozen=True)
class GroupResult:
    """How a GROUP_REQUEST ended: `code` 0 (done) or an `ErrorCode` number,
    with a sentence for a person. A change that was made also arrives as a
    GROUP_EVENT, in the group's order; one that changed nothing says so
    (`ALREADY_MEMBERS`)."""

    KIND: ClassVar[Kind] = Kind.GROUP_RESULT
    SPEC: ClassVar[tuple[str, ...]] = ("u64", "u8", "str")
    request_id: int
    code: int
    message: str = ""


@dataclass(frozen=True)
class GroupInfo:
    """A page of the answer to MEMBERS: the owner and members in joining
    order; `more` says further pages of this answer follow."""

    KIND: ClassVar[Kind] = Kind.GROUP_INFO
    SPEC: ClassVar[tuple[str, ...]] = ("u64", "str", "str", "strs", "bool")
    request_id: int
    group: str
    owner: str
    members: tuple[str, ...]
    more: bool = False


@dataclass(frozen=True)
class GroupList:
    """A page of the answer to LIST: the groups the user is in."""

    KIND: ClassVar[Kind] = Kind.GROUP_LIST
    SPEC: ClassVar[tuple[str, ...]] = ("u64", "strs", "bool")
    request_id: int
    groups: tuple[str, ...]
    more: bool = False


@dataclass(frozen=True)
class GroupAccept:
    """Instead of an ACCEPT for a group message: it is stored for every
    member. `recipients` counts the members other than the sender at its
    place in the sequence (the N of "delivered 2 of N")."""

    KIND: ClassVar[Kind] = Kind.GROUP_ACCEPT
    SPEC: ClassVar[tuple[str, ...]] = ("msgid", "u64", "u64", "u32")
    msg_id: MsgId
    server_msg_id: int
    group_seq: int
    recipients: int


@dataclass(frozen=True)
class GroupReached:
    """Members `by` of `group` newly have the sender's message `msg_id` on
    screen: one frame per message per pass, naming every member whose
    receipt came in that pass (at most `GROUP_PAGE_MAX` names a frame),
    instead of one frame per member. Members `gone` never will: their
    accounts were deleted first, so the message's N counts them out. Sent on
    the control stream, after the message's GROUP_ACCEPT."""

    KIND: ClassVar[Kind] = Kind.GROUP_REACHED
    SPEC: ClassVar[tuple[str, ...]] = ("str", "msgid", "strs", "strs")
    group: str
    msg_id: MsgId
    by: tuple[str, ...]
    gone: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroupBatch:
    """Several group entries for one member in one payload (issue 14): the
    GROUP_DELIVERs and GROUP_EVENTs a pass hands a member of one group, in
    the group's order, so that a burst costs each member one chunk, one
    ack and one datagram where it fits. A client handles it exactly as its
    entries one by one, in turn (each receipted by its `server_msg_id`).
    Each entry is a u32 length and the entry's own message bytes; the whole
    stays within one message (GROUP_BATCH_MAX_BYTES). The server joins
    entries it has encoded once for every member (`group_batch`)."""

    KIND: ClassVar[Kind] = Kind.GROUP_BATCH
    SPEC: ClassVar[tuple[str, ...]] = ("entries",)
    entries: tuple[GroupDeliver | GroupEvent, ...]


def group_batch(payloads: Sequence[bytes]) -> bytes:
    """The GROUP_BATCH of entries already encoded (`encode_message` of each
    GROUP_DELIVER or GROUP_EVENT), the same bytes as `encode_message` of
    their `GroupBatch`; the caller keeps it within GROUP_BATCH_MAX_BYTES."""
    pack = _U32.pack
    parts = [_GROUP_BATCH_HEAD.pack(Kind.GROUP_BATCH, len(payloads))]
    for payload in payloads:
        parts.append(pack(len(payload)))
        parts.append(payload)
    return b"".join(parts)


def unbatch(message: Message) -> tuple[Message, ...]:
    """What a receiver handles in turn: a GROUP_BATCH's entries, any other
    message alone."""
    if isinstance(message, GroupBatch):
        return message.entries
    return (message,)


_GROUP_BATCH_HEAD = struct.Struct("!BH")
#: Bytes per entry in a GROUP_BATCH besides the entry's own (its length).
GROUP_BATCH_ENTRY_OVERHEAD = _U32.size
#: A GROUP_BATCH's bytes at most: what one message may be (the longest text
#: with its fields; `reliability.Connection.send` refuses more).
GROUP_BATCH_MAX_BYTES = MAX_TEXT_BYTES + 1024


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
    | ChangePassword
    | DeleteAccount
    | AccountResult
    | GroupDeliver
    | GroupEvent
    | GroupRequest
    | GroupResult
    | GroupInfo
    | GroupList
    | GroupAccept
    | GroupReached
    | GroupBatch
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
        ChangePassword,
        DeleteAccount,
        AccountResult,
        GroupDeliver,
        GroupEvent,
        GroupRequest,
        GroupResult,
        GroupInfo,
        GroupList,
        GroupAccept,
        GroupReached,
        GroupBatch,
    )
}


#: Each message kind's generated codec: see `_compile`.
_MESSAGE_ENCODERS: dict[type, _Encoder] = {}
_MESSAGE_DECODERS: dict[int, _Decoder] = {}
for _kind, _message_cls in MESSAGE_CLASSES.items():
    _encode, _decode = _compile(_message_cls, _kind, frame=False)
    _MESSAGE_ENCODERS[_message_cls] = _encode
    _MESSAGE_DECODERS[_kind] = _decode
del _frame_cls, _kind, _message_cls, _encode, _decode


def encode_message(message: Message) -> bytes:
    """A chat message's bytes (kind first), or `LocalProtocolError` naming
    the field that does not fit its declaration."""
    try:
        encode = _MESSAGE_ENCODERS[message.__class__]
    except KeyError:
        raise LocalProtocolError(f"{type(message).__name__} is not a chat message") from None
    return encode(message)


# The DELIVER's parts as its generated encoder packs them: kind, ids and
# the sender's length; the text's length; the time stamp.
_DELIVER_HEAD, _DELIVER_TEXT_SIZE, _DELIVER_SENT = (
    _MESSAGE_ENCODERS[Deliver].__globals__[name] for name in ("_S0", "_S1", "_S2")
)
_DELIVER_KIND = int(Kind.DELIVER)  # (an Enum class's attribute costs a hook call to read)


def encode_deliver(server_msg_id: int, instance_id: int, client_seq: int, sender: str,
                   text: bytes, sent_ms: int) -> bytes:  # fmt: skip
    """`encode_message(Deliver(...))`, byte for byte, from the fields, with
    the text already in UTF-8 (`text`): the relay's hot path hands over
    every direct message this way, without a `Deliver` record (issue 18,
    round 3). What does not fit is refused as the record's encoder refuses
    it (`LocalProtocolError`, naming the field)."""
    try:
        name = sender.encode("utf-8")
        if len(text) > MAX_TEXT_BYTES:
            raise ValueError
        return b"".join((
            _DELIVER_HEAD.pack(_DELIVER_KIND, server_msg_id, instance_id, client_seq, len(name)),
            name, _DELIVER_TEXT_SIZE.pack(len(text)), text, _DELIVER_SENT.pack(sent_ms),
        ))  # fmt: skip
    except _MISFITS:
        message = Deliver(server_msg_id, MsgId(instance_id, client_seq), sender,
                          text.decode("utf-8", "replace"), sent_ms)  # fmt: skip
        return encode_message(message)  # raises the record's error


def decode_message(data: bytes) -> Message:
    """A chat message, or `RemoteProtocolError`."""
    if not data:
        raise RemoteProtocolError("empty message")
    decode = _MESSAGE_DECODERS.get(data[0])
    if decode is None:
        raise RemoteProtocolError(f"unknown message kind {data[0]}")
    return decode(data, 1, len(data))  # type: ignore[no-any-return]


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


# --- account changes inside a session (issue 16) ---------------------------
#
# Changing the password or deleting the account asks for the password again:
# a SCRAM proof over an auth message of its own, which binds the action, the
# user, this session and a fresh nonce (so a proof is good for one request,
# in one session), and for a change the new salt and iterations. The server
# checks it against the stored verifier exactly as a login's. The new keys
# travel wrapped under a key stream from the old ClientKey (which only the
# password's holder and, from the proof, the server know) and the session's
# key (which nobody watching the network has).

ACCOUNT_CHANGE = b"passwd"
ACCOUNT_DELETE = b"delete"


def account_message(
    action: bytes, username: str, session_id: bytes, nonce: bytes, salt: bytes = b"",
    iterations: int = 0,
) -> bytes:  # fmt: skip
    """What a CHANGE_PASSWORD's or DELETE_ACCOUNT's proof signs."""
    return b"|".join((
        b"udp-chat-account-v1", action, name_key(username).encode("utf-8"), session_id, nonce,
        salt, iterations.to_bytes(4, "big"),
    ))  # fmt: skip


def account_wrap(client_key: bytes, session_key: bytes, message: bytes, keys: bytes) -> bytes:
    """XOR 64 bytes of new keys with a key stream from the old ClientKey and
    the session's client-to-server key, bound to `message` (its own inverse)."""
    secret = _hmac(client_key, b"account keys|" + session_key)
    return wrap_keys(secret, message, keys)
