"""Reliable, ordered delivery over one hop: the sans-IO state of a session.

Split from `protocol.py` (which it builds on) because it is the one part of
the protocol with state. A `Connection` is one side of one session's hop
(client <-> server). It is shaped like aioquic's connection: the owner feeds
it datagrams with `receive_datagram(data, now)`, asks for
`datagrams_to_send(now)`, sleeps until `get_timer()`, calls
`handle_timer(now)`, and drains `next_event()`. It never reads the clock,
so the tests step time by hand.

How it works, with the numbers and their sources in docs/RELIABILITY.md:
- every datagram gets a new `pkt_num`; a reliable chunk keeps its hop `seq`
  across retransmissions, so RTT samples are never ambiguous (RFC 9002 4.1);
- the receiver acks with a cumulative `una` plus up to 16 ranges, after every
  second ack-eliciting datagram or within 25 ms (RFC 9000 13.2.2), and at
  once for anything out of order or duplicated, and for a keepalive (PING)
  that carries no data;
- RTO per RFC 6298 (SRTT/RTTVAR, initial 1 s, doubling backoff, a cap); a
  chunk is lost when 3 later packets were acked or it is 9/8 RTT older than
  the newest acked one (RFC 9002 6.1);
- at most `max_window` (64) chunks in flight, so the receiver never holds
  more; a congestion window of datagrams in flight (start 16, at most 64,
  halved on loss once per RTT, +1 per RTT, floor 4: RFC 8085 3.1);
- replay window of 64 packet numbers, moved only after the MAC verifies
  (RFC 4303), so a replayed or forged datagram changes nothing;
- chunks are delivered in order per stream (one conversation), and a gap in
  one stream never holds up another; long messages are fragments that are
  reassembled under hard caps that never trust a declared length, and one
  that takes no fragment for 30 s is dropped (`ReassemblyExpired`).
"""

from __future__ import annotations

import collections
import dataclasses
import struct
from collections.abc import Callable
from typing import NamedTuple

from protocol import (
    ACK_HEAD,
    FLAG_MAC,
    FRAME_HEADER,
    HEADER,
    MAGIC,
    MAX_FRAMES_SIZE,
    MAX_TEXT_BYTES,
    SESSION_ID_SIZE,
    STREAM_HEAD,
    VERSION,
    Ack,
    BadTag,
    Frame,
    FrameType,
    LocalProtocolError,
    Packet,
    PathChallenge,
    PathResponse,
    Ping,
    RemoteProtocolError,
    Stream,
    ack_frame,
    decode_packet,
    encode_frame,
    encode_packet,
    mac_tag,
    stream_frame,
)

# RFC 6298 section 2: alpha, beta and K.
RTT_ALPHA = 1 / 8
RTT_BETA = 1 / 4
RTT_K = 4
INITIAL_RTO = 1.0  # RFC 6298 (2.1)
RTO_MIN = 0.2  # KCP's 100 ms doubled: loopback tests pass 0.05
RTO_MAX = 60.0  # RFC 6298 (2.5) allows a cap of at least 60 s
TIMER_GRANULARITY = 0.001  # RFC 9002 kGranularity
MAX_ACK_DELAY = 0.025  # RFC 9000 13.2.1 default max_ack_delay
# A datagram whose chunks are all receipts (the sender marks them: `send(...,
# lazy_ack=True)`; the server knows them by their kind) needs no ack of its
# own at once: its peer's next datagram carries the ack (the next group copy
# or direct message, 100 ms later at a steady 10 msg/s), or it goes alone
# after this long. The server promises it (chat_server._receipts_only), and
# the sender's PTO for such a datagram counts it in place of MAX_ACK_DELAY
# (as RFC 9002 6.2.1 counts max_ack_delay), and takes an ack delay up to it
# off its RTT sample. The precedent is draft-ietf-quic-ack-frequency: a
# sender's ACK_FREQUENCY frame asks its peer to hold acks up to a "Requested
# Max Ack Delay" longer than max_ack_delay, and the sender then counts that
# delay in its PTO ("Computation of Probe Timeout Period"); here the delay
# is fixed, and applies to one kind of datagram, so nothing is negotiated
# and the bytes on the wire do not change. Over the 100 ms of the steady
# rate (with room for a late sender or pass); under RTO_MIN less a LAN
# round trip, so that a client of before this change, whose PTO does not
# count it, still gets the ack before its RTO floor runs out on paths under
# ~50 ms of round trip. What it costs: a receipt lost with nothing after it
# to show the gap is sent again 125 ms later than before
# (docs/RELIABILITY.md).
RECEIPT_ACK_DELAY = 0.15
ACK_EVERY = 2  # RFC 9000 13.2.2: ack every second ack-eliciting packet
# A datagram of group entries alone (the server sends them with `lazy_ack`;
# the member's client knows them: client_core `group_entries_only`) may be
# acked this late, and has its ack sent at once only at the third such
# datagram (GROUP_ACK_EVERY), not the second: at a steady 10 msg/s the
# member's ack and receipts (held up to client_core.GROUP_RECEIPT_HOLD, just
# under this) then cover three copies a datagram, not two (issue 14, lean:
# about 0.36 datagrams in per copy instead of 0.53). The server's PTO for
# such datagrams counts it (`Connection(peer_late_ack=...)`), as the
# ack-frequency draft's sender counts its Requested Max Ack Delay, and so
# does its RTT sample. Over two intervals of the steady rate (with room for
# a late copy); what it costs: a member's "delivered by" up to ~220 ms after
# the copy came (was ~120), a copy lost with nothing after it to show the
# gap resent 100 ms later than before (docs/RELIABILITY.md, "Group entry ack
# delay"). Receipts keep RECEIPT_ACK_DELAY and ACK_EVERY.
GROUP_ACK_DELAY = 0.25
GROUP_ACK_EVERY = 3


class LateAck(NamedTuple):
    """How late the ack of a datagram marked `lazy_ack` may go (what its
    peer counts in its PTO): within `delay`, or at once at the `every`-th
    ack-eliciting datagram not acked yet (the ack-frequency draft's
    Requested Max Ack Delay and Ack-Eliciting Threshold, fixed per kind of
    datagram, so nothing is negotiated)."""

    delay: float
    every: int


#: Receipts alone (at the server) and group entries alone (at a member's client).
RECEIPTS_LATE = LateAck(RECEIPT_ACK_DELAY, ACK_EVERY)
GROUP_ENTRIES_LATE = LateAck(GROUP_ACK_DELAY, GROUP_ACK_EVERY)
PACKET_THRESHOLD = 3  # RFC 9002 kPacketThreshold
TIME_THRESHOLD = 9 / 8  # RFC 9002 kTimeThreshold
MAX_WINDOW = 64  # chunks in flight per peer (KCP 32, mosquitto 20)
INITIAL_CWND = 16  # datagrams; QUIC starts at 10 (RFC 9002 7.2)
MAX_CWND = 64  # datagrams in flight per peer
MIN_CWND = 4
REPLAY_WINDOW = 64  # RFC 4303 recommends 64
_REPLAY_MASK = (1 << REPLAY_WINDOW) - 1
MAX_ACK_RANGES = 16
UNREACHABLE_AFTER = 30.0  # ENet TIMEOUT_MAXIMUM: no ack for this long ...
UNREACHABLE_RTOS = 10  # ... or this many timeouts in a row (KCP IKCP_DEADLINK 20)
#: Receive caps: never allocate from what a sender declares.
MAX_FRAGMENTS = 64
MAX_PARTIAL_MESSAGES = 4
MAX_BUFFERED_BYTES = 256 * 1024
MAX_STREAMS = 4096
#: A partial message that takes no new fragment for this long is dropped and
#: its room given back (docs/RELIABILITY.md 1.1: "a 30 s reassembly
#: timeout"). Its fragments were acked, so the sender will not resend them:
#: the owner must make the sender send the whole message again (the server
#: ends the session; the client logs in again and resends its outbox).
REASSEMBLY_TIMEOUT = 30.0
#: Across every session of a server (a `ReceiveBudget`): 20,000 sessions at
#: MAX_BUFFERED_BYTES each would be 5 GiB (docs/RELIABILITY.md 1.4: 32 MiB).
MAX_BUFFERED_TOTAL = 32 * 1024 * 1024
#: The most room one message reserves in that budget (see ReceiveBudget).
MAX_ROOM = MAX_FRAGMENTS * MAX_FRAMES_SIZE
#: How far ahead of `una` a chunk may be: twice the sender's window.
RECV_WINDOW = 2 * MAX_WINDOW
#: Chunks held for a gap in their stream, at most (docs/RELIABILITY.md: <= 256).
MAX_HELD = 256

STREAM_OVERHEAD = FRAME_HEADER.size + 18
_STREAM_HEAD = STREAM_HEAD  # (`send` packs a one-chunk message's frame itself)
_STREAM_TYPE = int(FrameType.STREAM)  # (an int: an Enum class's attribute costs ~0.2 us on 3.11)
_STREAM_BODY = STREAM_HEAD.size - FRAME_HEADER.size  # a STREAM frame's length before its data
#: An ACK frame with no ranges, packed in line (`protocol.ack_frame`'s bytes).
_ACK_HEAD = ACK_HEAD
_HEADER = HEADER
_ACK_TYPE = int(FrameType.ACK)
_ACK_BODY = ACK_HEAD.size - FRAME_HEADER.size
#: An ACK riding on data carries at most this many ranges, so that a full
#: fragment and its ACK fit one datagram; an ACK alone carries all 16.
DATA_ACK_RANGES = 4
ACK_ROOM = FRAME_HEADER.size + 21 + 12 * DATA_ACK_RANGES
_PING = encode_frame(Ping())  # a keepalive's frame, the same bytes every time
#: Payload bytes per fragment: a full datagram with room for an ACK.
CHUNK_SIZE = MAX_FRAMES_SIZE - ACK_ROOM - STREAM_OVERHEAD
assert (MAX_TEXT_BYTES + 1024) // CHUNK_SIZE + 1 <= MAX_FRAGMENTS


@dataclasses.dataclass(unsafe_hash=True, slots=True)  # built per message: see protocol.Padding
class PayloadReceived:
    """A whole payload arrived, in order within its stream."""

    stream: int
    payload: bytes


@dataclasses.dataclass(frozen=True)
class PayloadAcked:
    """The peer holds every chunk of the payload sent with this handle."""

    handle: object


@dataclasses.dataclass(frozen=True)
class PayloadResent:
    """A piece of the payload sent with this handle went out again (it was
    lost, or its ack was). Only from a connection made with
    `track_resends=True` (the client counts them per message)."""

    handle: object


@dataclasses.dataclass(frozen=True)
class PeerUnreachable:
    """Nothing has been acked for UNREACHABLE_AFTER s; chunks are kept and resent."""


@dataclasses.dataclass(frozen=True)
class PeerReachable:
    """Acks flow again after PeerUnreachable."""


@dataclasses.dataclass(frozen=True)
class ReassemblyExpired:
    """A partial message on `stream` took no fragment for REASSEMBLY_TIMEOUT s
    and was dropped, though its fragments were acked: the sender must send
    the whole message again (the owner sees to it)."""

    stream: int


@dataclasses.dataclass(frozen=True)
class PathResponded:
    """A PATH_RESPONSE arrived (the owner knows from which address)."""

    data: bytes


Event = (
    PayloadReceived | PayloadAcked | PayloadResent | PeerUnreachable | PeerReachable
    | PathResponded | ReassemblyExpired
)  # fmt: skip


class ReceiveBudget:
    """Bytes held for reassembly (out-of-order chunks and partial messages)
    by every connection that shares this object: a server gives one to all
    its sessions so the total is capped, not only each session's share.

    A fragmented message's first fragment reserves room for all of it, so a
    message once started always finishes. What waits for a gap (chunks out
    of order that no reservation covers, and the room of a first fragment
    that came early) is `loose`: it may take half the budget at most, so a
    first fragment next in order always gets room again as started messages
    finish, and nothing waits for room for ever."""

    __slots__ = ("limit", "used", "loose")

    def __init__(self, limit: int = MAX_BUFFERED_TOTAL) -> None:
        if limit < 2 * MAX_ROOM:
            # Half of it must hold the longest message, whatever waits loose.
            raise ValueError(f"a reassembly budget of {limit} bytes is too small: "
                             f"it must be at least {2 * MAX_ROOM}")  # fmt: skip
        self.limit = limit
        self.used = 0  # reservations plus loose chunks, <= limit
        self.loose = 0  # <= limit // 2


def charge_all(frame: Stream) -> int:
    """The room a fragmented message reserves in a `ReceiveBudget`: as if
    each of its fragments were a full frame."""
    return frame.count * MAX_FRAMES_SIZE


class _Partial:
    """A fragmented message being reassembled: the stream_seq and count of
    its first fragment, the parts so far, and when it last took a fragment."""

    __slots__ = ("head_seq", "count", "parts", "moved")

    def __init__(self, head_seq: int, count: int, now: float) -> None:
        self.head_seq = head_seq
        self.count = count
        self.parts: list[bytes] = []
        self.moved = now


class _Chunk:
    """A reliable chunk on its way: kept until acked, whatever happens. It
    holds its STREAM frame as bytes, packed once when queued: every send
    of it (first or again) puts the same bytes in a datagram, and no
    `Stream` record is built on the sending side."""

    __slots__ = (
        "seq", "wire", "size", "handle", "last", "pkt_num", "sent_at", "lost", "lazy", "late",
    )  # fmt: skip

    def __init__(
        self, seq: int, wire: bytes, size: int, handle: object, last: bool, lazy: bool = False
    ) -> None:
        self.seq = seq
        self.wire = wire  # the STREAM frame's bytes (`protocol.stream_frame`)
        self.size = size  # of its payload piece
        self.handle = handle  # the payload's (PayloadAcked comes from the last chunk only)
        self.last = last
        self.pkt_num = -1
        self.sent_at = 0.0
        self.lost = False
        self.lazy = lazy  # a receipt: a datagram of nothing else may be acked late
        self.late = False  # its last send was in such a datagram (`peer_late_ack`)


class Connection:
    """One side of a session's hop. Not thread-safe: one thread owns it."""

    __slots__ = (
        "session_id",
        "key",
        "peer_key",
        "rto_min",
        "rto_max",
        "max_window",
        "next_pkt",
        "sent_count",
        "chunks_sent",
        "chunks_resent",
        "chunks_taken",
        "track_resends",
        # sending
        "_next_seq",
        "_unacked_bytes",
        "_stream_seqs",
        "_waiting",
        "_inflight",
        "_cwnd",
        "_recovery_pkt",
        "_largest_acked",
        "_sent_times",
        "_late_pkts",
        "_peer_late_ack",
        "_srtt",
        "_rttvar",
        "_latest_rtt",
        "_backoff",
        "_last_progress",
        "_unreachable",
        "_ping",
        # receiving
        "_replay_top",
        "_replay_bits",
        "_largest_recv",
        "_largest_recv_at",
        "_una",
        "_above",
        "_ack_due",
        "_ack_count",
        "_streams",
        "_held",
        "_partial",
        "_now",
        "_buffered",
        "_budget",
        "_counted",
        "_events",
        "_path_responses",
    )

    def __init__(
        self,
        session_id: bytes,
        key: bytes,
        now: float,
        *,
        peer_key: bytes | None = None,
        rto_min: float = RTO_MIN,
        rto_max: float = RTO_MAX,
        max_window: int = MAX_WINDOW,
        budget: ReceiveBudget | None = None,
        track_resends: bool = False,
        peer_late_ack: float = RECEIPT_ACK_DELAY,
    ) -> None:
        if len(session_id) != SESSION_ID_SIZE:
            raise LocalProtocolError("a session id is 16 bytes")
        self.session_id = session_id
        self.key = key  # tags what we send
        # Tags what we receive: a key per direction, so a datagram of ours
        # reflected back at us never verifies (default: the same key).
        self.peer_key = peer_key if peer_key is not None else key
        self.rto_min = rto_min
        self.rto_max = rto_max
        self.max_window = max_window
        self.next_pkt = 1
        self.sent_count = 0  # datagrams produced, for the owner's statistics
        # Data chunks put in datagrams (first sends and resends) and resends
        # alone: the link's loss as the sender sees it (the client's /stats).
        self.chunks_sent = 0
        self.chunks_resent = 0
        # Chunks received and recorded (new ones only): the owner compares
        # it before and after a datagram to learn whether all were taken.
        self.chunks_taken = 0
        self.track_resends = track_resends  # PayloadResent events (the server needs none)
        self._next_seq = 0
        self._unacked_bytes = 0  # payload bytes queued or in flight, not yet acked
        self._stream_seqs: dict[int, int] = {}
        # Allocated only while in use: tens of thousands of sessions sit idle
        # (an empty deque alone is 760 bytes).
        self._waiting: collections.deque[_Chunk] | None = None
        self._inflight: dict[int, _Chunk] = {}  # seq -> chunk, in seq order
        self._cwnd = float(INITIAL_CWND)
        self._recovery_pkt = 0
        self._largest_acked = 0
        self._sent_times: dict[int, float] = {}
        # Of `_sent_times`, the datagrams of receipts alone (acked up to
        # RECEIPT_ACK_DELAY late); None while there are none (most sessions).
        self._late_pkts: set[int] | None = None
        # How late the peer may ack those (`send(..., lazy_ack=True)`): the
        # server's peers hold their acks of group entries GROUP_ACK_DELAY,
        # the clients' hold theirs of receipts RECEIPT_ACK_DELAY.
        self._peer_late_ack = peer_late_ack
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._latest_rtt = 0.0
        self._backoff = 0
        self._last_progress = now
        self._unreachable = False
        self._ping = False
        self._replay_top = 0
        self._replay_bits = 0
        self._largest_recv = 0
        self._largest_recv_at = now
        self._una = 0
        # Seqs taken above `_una`; made when one arrives out of order, dropped
        # when the gap closes (an empty set alone is 216 bytes per session).
        self._above: set[int] | None = None
        self._ack_due: float | None = None
        self._ack_count = 0
        self._streams: dict[int, int] = {}  # stream -> next stream_seq expected
        self._held: dict[tuple[int, int], Stream] = {}  # (stream, stream_seq) -> chunk
        self._partial: dict[int, _Partial] = {}  # stream -> its message being reassembled
        self._now = now  # of the datagram being taken (for `_Partial.moved`)
        self._buffered = 0
        self._budget = budget  # shared with other connections; None: this one's cap only
        # What this connection counts in the budget, by held or first
        # fragment's (stream, stream_seq): (room, loose). A first fragment
        # has the room of its message (loose too while it waits for a gap);
        # a chunk that no room covers, (0, its size). Made at the first use:
        # most sessions never hold anything.
        self._counted: dict[tuple[int, int], tuple[int, int]] | None = None
        self._events: list[Event] = []
        self._path_responses: list[bytes] = []

    # --- the owner's API --------------------------------------------------

    def send(
        self, payload: bytes, stream: int = 0, handle: object = None, *, lazy_ack: bool = False
    ) -> None:
        """Queue a payload for reliable, in-order delivery on `stream`. When
        the peer holds all of it, `PayloadAcked(handle)` comes out (if given).
        `lazy_ack`: the payload is a receipt or a group entry (one chunk),
        which the peer may ack up to `peer_late_ack` late (RECEIPT_ACK_DELAY
        or GROUP_ACK_DELAY) when a datagram carries nothing else: its
        retransmission timer waits that much longer."""
        size = len(payload)
        if size > MAX_TEXT_BYTES + 1024:
            raise LocalProtocolError(f"payload of {size} bytes is too long")
        stream_seq = self._stream_seqs.get(stream, 0)
        seq = self._next_seq
        if size <= CHUNK_SIZE:  # nearly every message: one chunk
            # `stream_frame(seq, stream, stream_seq, 0, 1, payload)`, in line.
            try:
                head = _STREAM_HEAD.pack(_STREAM_TYPE, _STREAM_BODY + size, seq, stream,
                                         stream_seq, 0, 1)  # fmt: skip
            except struct.error as exc:
                raise LocalProtocolError(f"Stream: {exc}") from None
            self._unacked_bytes += size
            self._stream_seqs[stream] = (stream_seq + 1) & 0xFFFFFFFF
            self._next_seq = seq + 1
            chunk = _Chunk(seq, head + payload, size, handle, True, lazy_ack)
            inflight = self._inflight
            if self._waiting is None and (
                not inflight or seq < next(iter(inflight)) + self.max_window
            ):
                # Nothing waits and the window has room: straight into flight,
                # due, as `_admit_waiting` would move it before the next send.
                chunk.lost = True
                inflight[seq] = chunk
            else:
                if self._waiting is None:
                    self._waiting = collections.deque()
                self._waiting.append(chunk)
            return
        waiting = self._waiting
        if waiting is None:
            waiting = self._waiting = collections.deque()
        self._unacked_bytes += size
        pieces = [payload[i : i + CHUNK_SIZE] for i in range(0, len(payload), CHUNK_SIZE)]
        count = len(pieces)
        for index, piece in enumerate(pieces):
            wire = stream_frame(self._next_seq, stream, stream_seq, index, count, piece)
            # Every piece carries the handle (PayloadResent names any of
            # them); PayloadAcked comes from the last one only.
            waiting.append(_Chunk(self._next_seq, wire, len(piece), handle, index == count - 1))
            stream_seq = (stream_seq + 1) & 0xFFFFFFFF
            self._next_seq += 1
        self._stream_seqs[stream] = stream_seq

    @property
    def ack_due(self) -> float | None:
        """When the delayed ack we owe leaves (None: none owed): the client
        sends its held group receipts with it (client_core `GroupReceipts`)."""
        return self._ack_due

    def ack_now(self) -> None:
        """Send the pending ACK on the next `datagrams_to_send`, not 25 ms later
        (the session is about to end and will not get another chance)."""
        if self._largest_recv:
            self._ack_due = 0.0

    def send_ping(self) -> None:
        """Ask for one ack-eliciting datagram (a keepalive) on the next send."""
        self._ping = True

    @property
    def unacked(self) -> int:
        """Chunks queued or in flight that the peer has not acked."""
        return len(self._waiting or ()) + len(self._inflight)

    @property
    def unacked_bytes(self) -> int:
        """Payload bytes queued or in flight that the peer has not acked: what
        a peer that never acks makes us hold (the server caps it per session)."""
        return self._unacked_bytes

    @property
    def buffered(self) -> int:
        """Bytes held for reassembly (out of order, or parts of a message)."""
        return self._buffered

    def close(self) -> None:
        """The session is over: give what it counted in the shared budget
        back (the connection is not used again)."""
        if self._budget is not None and self._counted:
            for room, loose in self._counted.values():
                self._budget.used -= room or loose
                self._budget.loose -= loose
        self._counted = None
        self._held.clear()
        self._partial.clear()
        self._buffered = 0

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._inflight

    @property
    def rto(self) -> float:
        # min(rto_max, max(rto_min, srtt + max(K * rttvar, G) + max_ack_delay)),
        # written out: this is asked for every timer a session sets.
        srtt = self._srtt
        if srtt is None:
            base = INITIAL_RTO
        else:
            spread = RTT_K * self._rttvar
            base = srtt + (spread if spread > 0.001 else 0.001) + MAX_ACK_DELAY
        if base < self.rto_min:
            base = self.rto_min
        return self.rto_max if base > self.rto_max else base

    @property
    def srtt(self) -> float | None:
        return self._srtt

    @property
    def rttvar(self) -> float | None:
        """RFC 6298's RTTVAR (None before the first RTT sample)."""
        return None if self._srtt is None else self._rttvar

    @property
    def in_flight(self) -> int:
        """Chunks sent and not acked yet (not those still waiting to go)."""
        return sum(1 for c in self._inflight.values() if c.pkt_num >= 0)

    @property
    def window(self) -> int:
        return int(self._cwnd)

    def make_probe(self, frames: tuple[Frame, ...]) -> bytes:
        """A datagram of this session with just `frames` (a PATH_CHALLENGE to a
        new address), outside the reliability machinery."""
        pkt = self.next_pkt
        self.next_pkt += 1
        self.sent_count += 1
        return encode_packet(Packet(self.session_id, pkt, frames), self.key)

    def unseen(self, frames: tuple[Frame, ...]) -> list[Stream]:
        """The STREAM frames among `frames` whose chunks were not taken
        before (`seen`): what a datagram would add."""
        una, above = self._una, self._above
        if above is None:  # nothing taken out of order: the usual case
            return [f for f in frames if f.__class__ is Stream and f.seq >= una]
        return [f for f in frames if f.__class__ is Stream and f.seq >= una and f.seq not in above]

    def seen(self, seq: int) -> bool:
        """Whether the chunk numbered `seq` was taken already (so a copy of it
        adds nothing: the owner's budgets count only new chunks)."""
        return seq < self._una or (self._above is not None and seq in self._above)

    def next_event(self) -> Event | None:
        return self._events.pop(0) if self._events else None

    def take_events(self) -> list[Event]:
        """Every pending event at once, oldest first (`next_event` one by one)."""
        events, self._events = self._events, []
        return events

    def receive_datagram(
        self,
        data: bytes,
        now: float,
        lazy_ack: Callable[[tuple[Frame, ...]], bool] | None = None,
        late: LateAck = RECEIPTS_LATE,
    ) -> bool:
        """Take in a datagram for this session. False (and nothing changed) if
        it does not verify, is a replay, or breaks a limit. `lazy_ack`, if
        given, is asked whether the datagram's frames may be acked `late`
        (`receive_packet`'s `lazy_ack`): the client asks it of datagrams of
        group entries alone (client_core `group_entries_only`, with
        GROUP_ENTRIES_LATE)."""
        try:
            packet = decode_packet(data, self.peer_key)
        except BadTag:
            return False
        except RemoteProtocolError:
            return False
        if packet.session_id != self.session_id:
            return False
        if lazy_ack is not None:
            return self.receive_packet(packet, now, lazy_ack=lazy_ack(packet.frames), late=late)
        return self.receive_packet(packet, now)

    def receive_packet(
        self,
        packet: Packet,
        now: float,
        *,
        data: bool = True,
        lazy_ack: bool = False,
        late: LateAck = RECEIPTS_LATE,
    ) -> bool:
        """Like `receive_datagram` for a packet already decoded and verified.
        With `data=False` the owner withholds the packet's chunks (it is over
        a limit): they are neither recorded nor acked, so the peer resends
        them later, but everything else is taken. Its ACKs above all: a peer
        whose input waits for our output to drain must still be able to drain
        it. No ack is sent for such a packet (acks ride on our next datagram),
        so a withheld peer's retransmissions follow our sends, not a loop.
        With `lazy_ack` (the owner found its chunks all receipts, or, at a
        client, all group entries: the kinds its peer sends lazily) the ack may
        wait `late.delay` for a datagram of ours to ride on, not
        MAX_ACK_DELAY; a chunk out of order or the `late.every`-th
        ack-eliciting datagram (ACK_EVERY after one not lazy) still has it
        sent at once."""
        pkt = packet.pkt_num
        self._now = now
        # `_replay_check` and `_replay_mark`, in line (every datagram).
        top = self._replay_top
        if pkt > top:
            shift = pkt - top
            if shift >= REPLAY_WINDOW:
                self._replay_bits = 1
            else:
                self._replay_bits = ((self._replay_bits << shift) | 1) & _REPLAY_MASK
            self._replay_top = pkt
        else:
            offset = top - pkt
            if offset >= REPLAY_WINDOW or (self._replay_bits >> offset) & 1:
                # A duplicate or a replay: change nothing, but re-ack (the
                # first ack may have been lost).
                if any(isinstance(f, (Stream, Ping) if data else Ping) for f in packet.frames):
                    self._ack_due = now
                return False
            self._replay_bits |= 1 << offset
        if self._backoff:
            # The peer is back: stop backing off and resend the oldest at once.
            self._backoff = 0
            oldest = next(iter(self._inflight.values()), None)
            if oldest is not None:
                oldest.lost = True
        if pkt > self._largest_recv:
            self._largest_recv = pkt
            self._largest_recv_at = now
        out_of_order = eliciting = chunks = False
        streams, events = self._streams, self._events
        # The in-order case below works on locals: the next seq expected,
        # the chunks taken, and whether nothing is held (no gap anywhere) with
        # the room left under the cap; written back before `_on_stream` and
        # read again after it, and at the end.
        una, taken = self._una, 0
        room = MAX_BUFFERED_BYTES - self._buffered if not self._above and not self._held else -1
        for frame in packet.frames:
            cls = frame.__class__  # (frames are final classes: `is`, not isinstance)
            if cls is Stream:
                chunks = True
                # A chunk refused for a cap is simply not acked: resent later.
                if not data:
                    continue
                eliciting = True
                chunk: Stream = frame  # type: ignore[assignment]
                if (
                    chunk.seq == una
                    and chunk.count == 1
                    and chunk.index == 0
                    and chunk.stream_seq == streams.get(chunk.stream, -1)
                    and len(chunk.data) <= room
                ):
                    # Nearly every chunk: the next one, a whole message, next on
                    # a stream already open, nothing held. `_on_stream`'s first
                    # case, in line (a call less per message).
                    una += 1
                    taken += 1
                    streams[chunk.stream] = (chunk.stream_seq + 1) & 0xFFFFFFFF
                    events.append(PayloadReceived(chunk.stream, chunk.data))
                    continue
                self._una = una
                self.chunks_taken += taken
                if self._on_stream(chunk):
                    out_of_order = True
                una, taken = self._una, 0
                if not self._above and not self._held:
                    room = MAX_BUFFERED_BYTES - self._buffered
                else:
                    room = -1
            elif cls is Ack:
                self._on_ack(frame, now)  # type: ignore[arg-type]
            elif cls is Ping:
                eliciting = True
            elif cls is PathChallenge:
                self._path_responses.append(frame.data)  # type: ignore[union-attr]
            elif cls is PathResponse:
                events.append(PathResponded(frame.data))  # type: ignore[union-attr]
        self._una = una
        self.chunks_taken += taken
        if eliciting:
            self._ack_count += 1
            # A PING alone (a keepalive) is acked at once: no data of ours
            # follows it to carry the ack, so waiting MAX_ACK_DELAY would only
            # cost the owner a second wake-up for the same ACK (issue 18; RFC
            # 9000 13.2.1 allows acking sooner than max_ack_delay).
            if (
                out_of_order
                or not chunks
                or self._ack_count >= (late.every if lazy_ack else ACK_EVERY)
            ):
                self._ack_due = now
            elif self._ack_due is None:
                self._ack_due = now + (late.delay if lazy_ack else MAX_ACK_DELAY)
        return True

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Every datagram due now: retransmissions first, then new chunks as
        far as the windows allow, each with the current ACK riding along."""
        if self._waiting:
            self._admit_waiting()
        inflight = self._inflight
        if not inflight:
            # Nothing of ours is outstanding: the unreachable clock starts now,
            # not at the last ack before an idle spell.
            self._last_progress = now
            ack_due = self._ack_due
            if (ack_due is None or ack_due > now) and not self._ping and not self._path_responses:
                # Nothing due: most calls when traffic is light (the side
                # that only took a datagram, its ack delayed), at the cost
                # of a few tests instead of the walk below (issue 18).
                return []
        out: list[bytes] = []
        # One pass for what is due (in seq order), whether any chunk is
        # outstanding (sent, not lost) and whether anything was sent before
        # (chunks just admitted were not: their pkt_num is -1).
        queue: list[_Chunk] = []
        outstanding = resends = False
        for c in inflight.values():
            if c.lost:
                queue.append(c)
                if c.pkt_num >= 0:
                    resends = True
            else:
                outstanding = True
        if not outstanding and not resends:
            self._last_progress = now  # (as above)
        queued = len(queue)
        at = 0  # queue[at:] is still to go
        # The congestion window's room: datagrams with chunks in flight
        # (`_packet_budget`), counted only when there is something to send.
        budget = int(self._cwnd)
        if queued and outstanding:
            budget -= len({c.pkt_num for c in inflight.values() if not c.lost})
        while (
            (at < queued and budget > 0)
            or (self._ack_due is not None and self._ack_due <= now)  # `_ack_is_due`
            or self._ping or self._path_responses
        ):  # fmt: skip
            # The frames' bytes, in the order `encode_packet` would put the
            # records: the chunks' were packed when they were queued.
            if self._path_responses:
                parts = [encode_frame(PathResponse(d)) for d in self._path_responses[:4]]
                del self._path_responses[:4]
                room = MAX_FRAMES_SIZE - 11 * len(parts)
            else:
                parts, room = [], MAX_FRAMES_SIZE
            if self._largest_recv:
                if self._above:
                    ack = self._ack_frame(now, DATA_ACK_RANGES if at < queued else MAX_ACK_RANGES)
                else:
                    # `_ack_frame` with no ranges (nothing taken out of
                    # order: nearly always), in line.
                    delay_us = int((now - self._largest_recv_at) * 1e6)
                    if delay_us < 0:
                        delay_us = 0
                    elif delay_us > 0xFFFFFFFF:
                        delay_us = 0xFFFFFFFF
                    ack = _ACK_HEAD.pack(_ACK_TYPE, _ACK_BODY, self._largest_recv, delay_us,
                                         self._una, 0)  # fmt: skip
                parts.append(ack)
                room -= len(ack)
            pkt = self.next_pkt
            self.next_pkt = pkt + 1
            first = at
            lazy = True  # every chunk packed a receipt (the peer may ack it late)
            while at < queued and budget > 0:
                chunk = queue[at]
                wire = chunk.wire
                size = len(wire)
                if size > room:
                    break
                parts.append(wire)
                room -= size
                if chunk.pkt_num >= 0:  # it went out before: a resend
                    self.chunks_resent += 1
                    if self.track_resends and chunk.handle is not None:
                        self._events.append(PayloadResent(chunk.handle))
                chunk.pkt_num = pkt  # (marked sent as it is packed: one pass)
                chunk.sent_at = now
                chunk.lost = False
                chunk.late = False
                if not chunk.lazy:
                    lazy = False
                at += 1
            carried = at - first
            if carried:
                budget -= 1
                if lazy:
                    # Receipts (or group entries) alone: the peer acks them
                    # with its next datagram or within `peer_late_ack`.
                    for chunk in queue[first:at]:
                        chunk.late = True
                    if self._late_pkts is None:
                        self._late_pkts = set()
                    self._late_pkts.add(pkt)
            elif self._ping:
                parts.append(_PING)
            if carried or self._ping:  # ack-eliciting: an RTT sample when acked
                self._sent_times[pkt] = now
            self._ping = False
            self._ack_due = None
            self._ack_count = 0
            self.chunks_sent += carried
            # `seal(self.session_id, pkt, body, self.key)`, in line: the
            # session id's size was checked once (`__init__`) and the body
            # fits by construction (`room`).
            data = _HEADER.pack(MAGIC, VERSION, FLAG_MAC, self.session_id, pkt) + b"".join(parts)
            out.append(data + mac_tag(self.key, data))
        self.sent_count += len(out)
        return out

    def get_timer(self) -> float | None:
        """When `handle_timer` or `datagrams_to_send` must run next (None:
        nothing pending; a time in the past: at once)."""
        inflight = self._inflight
        if self._ping or self._path_responses:
            return 0.0  # at once: nothing is earlier
        timer = self._ack_due
        if not inflight and not self._waiting and not self._partial:
            return timer  # nothing of ours on its way: the delayed ack, if any
        # One pass for the oldest chunk outstanding (and the oldest of those
        # sent in datagrams of receipts alone, which have a later timer) and
        # whether any chunk is due (this is asked after every datagram).
        oldest_sent = oldest_late = None
        due = outstanding = False
        for c in inflight.values():
            if c.lost:
                due = True
            else:
                outstanding = True
                if c.late:  # acked up to RECEIPT_ACK_DELAY late: a timer of its own
                    if oldest_late is None or c.sent_at < oldest_late:
                        oldest_late = c.sent_at
                elif oldest_sent is None or c.sent_at < oldest_sent:
                    oldest_sent = c.sent_at
        if oldest_sent is not None:
            deadline = oldest_sent + self._backed_off_rto()
            if timer is None or deadline < timer:
                timer = deadline
        if oldest_late is not None:
            deadline = oldest_late + self._backed_off_rto(late=True)
            if timer is None or deadline < timer:
                timer = deadline
        if due or self._waiting:
            # Due chunks go (the timer is now) only if the congestion window
            # has room (`_packet_budget`).
            budget = int(self._cwnd)
            if outstanding:
                budget -= len({c.pkt_num for c in inflight.values() if not c.lost})
            if budget > 0:
                if self._waiting:
                    self._admit_waiting()  # chunks it moves into flight are due
                    due = due or any(c.lost for c in self._inflight.values())
                if due:
                    return 0.0
        if self._inflight and not self._unreachable:
            deadline = self._last_progress + UNREACHABLE_AFTER
            if timer is None or deadline < timer:
                timer = deadline
        for partial in self._partial.values():
            deadline = partial.moved + REASSEMBLY_TIMEOUT
            if timer is None or deadline < timer:
                timer = deadline
        return timer

    def handle_timer(self, now: float) -> None:
        if self._partial:
            self._expire_partials(now)
        rto = self._backed_off_rto()
        late_rto = self._backed_off_rto(late=True)
        if any(
            not c.lost and c.sent_at + (late_rto if c.late else rto) <= now
            for c in self._inflight.values()
        ):
            # Retransmission timeout: everything sent that long ago is lost.
            # (The same sum as the timer's: `now - rto` can round below the
            # oldest's send time and then nothing would ever be resent.)
            for chunk in self._inflight.values():
                if not chunk.lost and chunk.sent_at + (late_rto if chunk.late else rto) <= now:
                    chunk.lost = True
            self._backoff += 1
            self._cwnd = max(MIN_CWND, self._cwnd / 2)
            self._recovery_pkt = self.next_pkt
        if (
            self._inflight
            and not self._unreachable
            and (
                now - self._last_progress >= UNREACHABLE_AFTER or self._backoff >= UNREACHABLE_RTOS
            )
        ):
            self._unreachable = True
            self._events.append(PeerUnreachable())

    # --- receiving --------------------------------------------------------

    def _replay_check(self, pkt: int) -> bool:
        if pkt > self._replay_top:
            return True
        offset = self._replay_top - pkt
        if offset >= REPLAY_WINDOW:
            return False
        return not (self._replay_bits >> offset) & 1

    def _replay_mark(self, pkt: int) -> None:
        if pkt > self._replay_top:
            shift = pkt - self._replay_top
            if shift >= REPLAY_WINDOW:
                self._replay_bits = 1
            else:
                self._replay_bits = ((self._replay_bits << shift) | 1) & _REPLAY_MASK
            self._replay_top = pkt
        else:
            self._replay_bits |= 1 << (self._replay_top - pkt)

    def _admit(self, frame: Stream) -> int | None:
        """Would taking this chunk keep every receive cap? None if not (a
        refused chunk is not recorded or acked, so the sender resends it
        later), else what it adds to the shared budget."""
        if frame.seq >= self._una + RECV_WINDOW:
            return None
        if not 1 <= frame.count <= MAX_FRAGMENTS or frame.index >= frame.count:
            return None
        if frame.stream not in self._streams and len(self._streams) >= MAX_STREAMS:
            return None
        if self._buffered + len(frame.data) > MAX_BUFFERED_BYTES:
            return None
        expected = self._streams.get(frame.stream, 0)
        ahead = (frame.stream_seq - expected) & 0xFFFFFFFF
        if ahead >= RECV_WINDOW or (frame.stream, frame.stream_seq) in self._held:
            return None  # beyond any honest sender's window, or a conflicting copy
        if ahead and len(self._held) >= MAX_HELD:
            return None
        if frame.count > 1 and frame.index == 0 and frame.stream not in self._partial:
            # First fragments that came early wait with the partial messages;
            # one next in order never waits for them (they may wait for it).
            heads = sum(
                1 for held in self._held.values()
                if held.count > 1 and held.index == 0 and held.stream not in self._partial
            ) if ahead else 0  # fmt: skip
            if len(self._partial) + heads >= MAX_PARTIAL_MESSAGES:
                return None
        budget = self._budget
        if budget is None:
            return 0
        # The shared budget (see ReceiveBudget); what is counted is never
        # allocated, and never less than is held: a first fragment reserves
        # its message's room as if every fragment were a full frame.
        if frame.count > 1 and frame.index == 0:
            early = sum(len(c.data) for _, c in self._early(frame))
            charge = charge_all(frame) - early
            if budget.used + charge > budget.limit:
                return None
            if ahead and budget.loose - early + charge_all(frame) > budget.limit // 2:
                return None  # it waits for a gap: loose
            return charge
        if not ahead:
            return 0  # delivered at once (a fragment: into its message's room, or dropped)
        if frame.count > 1 and self._room(self._head(frame)) == charge_all(frame):
            return 0  # its message's room (the same count: a fragment cannot claim more)
        size = len(frame.data)
        if budget.loose + size > budget.limit // 2 or budget.used + size > budget.limit:
            return None
        return size

    def _early(self, head: Stream) -> list[tuple[tuple[int, int], Stream]]:
        """Fragments of `head`'s message held loose because they came first."""
        counted = self._counted
        if not counted:
            return []
        early = []
        for index in range(1, head.count):
            key = (head.stream, (head.stream_seq + index) & 0xFFFFFFFF)
            if counted.get(key, (1, 0))[0] == 0:
                chunk = self._held[key]
                if chunk.count == head.count and chunk.index == index:
                    early.append((key, chunk))
        return early

    def _room(self, key: tuple[int, int]) -> int:
        """The room reserved for the message whose first fragment is `key`."""
        return self._counted.get(key, (0, 0))[0] if self._counted else 0

    @staticmethod
    def _head(frame: Stream) -> tuple[int, int]:
        """The key of the first fragment of `frame`'s message."""
        return frame.stream, (frame.stream_seq - frame.index) & 0xFFFFFFFF

    def _on_stream(self, frame: Stream) -> bool:
        """Record one chunk; True if the sender should hear at once (the chunk
        came out of order, twice, or was refused)."""
        stream = frame.stream
        if (
            frame.seq == self._una
            and frame.count == 1
            and frame.index == 0
            and frame.stream_seq == self._streams.get(stream, -1)
            and self._buffered + len(frame.data) <= MAX_BUFFERED_BYTES
        ):
            # The common case, kept short: the next chunk, a whole message,
            # next on a stream already open. Same outcome as the general path.
            self.chunks_taken += 1
            self._una += 1
            if self._above:
                while self._una in self._above:
                    self._above.discard(self._una)
                    self._una += 1
                if not self._above:
                    self._above = None
            expected = (frame.stream_seq + 1) & 0xFFFFFFFF
            self._streams[stream] = expected
            self._events.append(PayloadReceived(stream, frame.data))
            if self._held:
                self._release(stream, expected)
            return False
        if self.seen(frame.seq):
            return True
        charge = self._admit(frame)
        if charge is None:
            return True
        self.chunks_taken += 1
        out_of_order = frame.seq != self._una
        above = self._above
        if above is None:
            above = self._above = set()
        above.add(frame.seq)
        while self._una in above:
            above.discard(self._una)
            self._una += 1
        if not above:
            self._above = None
        key = (stream, frame.stream_seq)
        self._held[key] = frame
        self._buffered += len(frame.data)
        partial = self._partial.get(stream) if self._partial else None
        if partial is not None and self._head(frame)[1] == partial.head_seq:
            partial.moved = self._now  # a later fragment of it, held for a gap: progress
        budget = self._budget
        if budget is not None and (charge or (frame.count > 1 and frame.index == 0)):
            if self._counted is None:
                self._counted = {}
            budget.used += charge
            if frame.count > 1 and frame.index == 0:
                for early_key, early in self._early(frame):  # now within the reservation
                    del self._counted[early_key]
                    budget.loose -= len(early.data)
                room = charge_all(frame)
                # Until the gap before it fills, its room is loose.
                loose = room if frame.stream_seq != self._streams.get(stream, 0) else 0
                self._counted[key] = (room, loose)
            else:
                self._counted[key] = (0, charge)
                loose = charge
            budget.loose += loose
        self._release(stream, self._streams.setdefault(stream, 0))
        return out_of_order

    def _release(self, stream: int, expected: int) -> None:
        """Deliver the held chunks of `stream` that are next in order."""
        while (stream, expected) in self._held:
            key = (stream, expected)
            chunk = self._held.pop(key)
            self._buffered -= len(chunk.data)
            if self._counted and key in self._counted:
                self._unhold(key)
            expected = (expected + 1) & 0xFFFFFFFF
            self._deliver(chunk)
        self._streams[stream] = expected

    def _deliver(self, chunk: Stream) -> None:
        if chunk.count == 1:
            if chunk.index == 0:
                self._events.append(PayloadReceived(chunk.stream, chunk.data))
            return
        stream = chunk.stream
        partial = self._partial.get(stream)
        if partial is not None and (
            chunk.index != len(partial.parts) or chunk.count != partial.count
        ):
            # A malformed sequence of fragments: start again at the next index 0.
            self._drop_partial(stream, partial)
            partial = None
        if partial is None:
            if chunk.index != 0:
                return  # the rest of a message dropped (malformed or expired)
            partial = self._partial[stream] = _Partial(chunk.stream_seq, chunk.count, self._now)
        parts = partial.parts
        parts.append(chunk.data)
        partial.moved = self._now
        self._buffered += len(chunk.data)
        if len(parts) == chunk.count:
            del self._partial[stream]
            self._buffered -= sum(len(p) for p in parts)
            self._unreserve(stream, partial.head_seq)
            self._events.append(PayloadReceived(stream, b"".join(parts)))

    def _drop_partial(self, stream: int, partial: _Partial) -> None:
        """Forget a partial message and give its room back."""
        self._buffered -= sum(len(p) for p in partial.parts)
        del self._partial[stream]
        self._unreserve(stream, partial.head_seq)

    def _expire_partials(self, now: float) -> None:
        """Drop the partial messages that took no fragment for
        REASSEMBLY_TIMEOUT s (docs/RELIABILITY.md 1.1), so that a sender
        that never finishes its messages cannot keep their room from
        everyone else. Their fragments were acked: `ReassemblyExpired`
        tells the owner, which makes the sender send them again whole."""
        for stream, partial in list(self._partial.items()):
            if partial.moved + REASSEMBLY_TIMEOUT <= now:
                self._drop_partial(stream, partial)
                self._events.append(ReassemblyExpired(stream))

    def _unhold(self, key: tuple[int, int]) -> None:
        """A counted chunk leaves the held ones: a first fragment keeps its
        room (no longer loose), any other chunk is counted no more."""
        assert self._counted is not None and self._budget is not None
        room, loose = self._counted[key]
        self._budget.loose -= loose
        if room:
            self._counted[key] = (room, 0)
        else:
            del self._counted[key]
            self._budget.used -= loose

    def _unreserve(self, stream: int, head_seq: int) -> None:
        """A fragmented message is complete or abandoned: free its room.
        Fragments of it still held (abandoned by a malformed sequence) count
        loose from now on, so the budget never counts less than is held."""
        budget, counted = self._budget, self._counted
        if budget is None or not counted:
            return
        room = counted.pop((stream, head_seq), (0, 0))[0]
        budget.used -= room
        count = room // MAX_FRAMES_SIZE
        for index in range(1, count):
            key = (stream, (head_seq + index) & 0xFFFFFFFF)
            chunk = self._held.get(key)
            if chunk is not None and key not in counted:
                if chunk.count == count and chunk.index == index:
                    counted[key] = (0, len(chunk.data))
                    budget.used += len(chunk.data)
                    budget.loose += len(chunk.data)

    def _ack_frame(self, now: float, max_ranges: int) -> bytes:
        """What we have received, as an ACK frame's bytes (`protocol.ack_frame`:
        packed without the `Ack` record, one for nearly every datagram)."""
        ranges = self._ack_ranges(max_ranges) if self._above else []
        delay_us = min(0xFFFFFFFF, max(0, int((now - self._largest_recv_at) * 1e6)))
        return ack_frame(self._largest_recv, delay_us, self._una, ranges)

    def _ack_ranges(self, max_ranges: int) -> list[tuple[int, int]]:
        """The seqs taken above `_una` as [start, end) ranges, lowest first,
        at most `max_ranges` of them."""
        ranges: list[tuple[int, int]] = []
        for seq in sorted(self._above or ()):
            if ranges and ranges[-1][1] == seq:
                ranges[-1] = (ranges[-1][0], seq + 1)
            elif len(ranges) < max_ranges:
                ranges.append((seq, seq + 1))
            else:
                break
        return ranges

    # --- sending ----------------------------------------------------------

    def _admit_waiting(self) -> None:
        """Move waiting chunks into flight (marked due) while the span from
        the oldest unacked chunk stays under `max_window`: the receiver never
        has to hold more than that."""
        waiting = self._waiting
        if not waiting:
            return
        base = next(iter(self._inflight)) if self._inflight else waiting[0].seq
        limit = base + self.max_window
        while waiting and waiting[0].seq < limit:
            chunk = waiting.popleft()
            chunk.lost = True  # due for its first transmission
            self._inflight[chunk.seq] = chunk
        if not waiting:
            self._waiting = None

    def _packet_budget(self) -> int:
        """How many more datagrams with chunks the congestion window allows."""
        flying = {c.pkt_num for c in self._inflight.values() if not c.lost}
        return int(self._cwnd) - len(flying)

    def _ack_is_due(self, now: float) -> bool:
        return self._ack_due is not None and self._ack_due <= now

    def _backed_off_rto(self, late: bool = False) -> float:
        """The RTO with the backoff; `late`: for chunks of a datagram of
        receipts (or group entries) alone, which the peer may ack
        `peer_late_ack` late instead of MAX_ACK_DELAY: the difference added
        (RFC 9002 6.2.1 counts the peer's max_ack_delay in the PTO), on top
        of the floor, so that such an ack has the same slack as any other (a
        pass of the peer's loop that comes late, a test's clock that moves
        in steps)."""
        rto = self.rto
        if late:
            rto += self._peer_late_ack - MAX_ACK_DELAY
            if rto > self.rto_max:
                rto = self.rto_max
        if not self._backoff:
            return rto  # (never above rto_max)
        return min(self.rto_max, rto * float(2 ** min(self._backoff, 30)))

    def _on_ack(self, ack: Ack, now: float) -> None:
        progressed = False
        # RTT sample from the newest packet, if this ack is the first to cover it.
        newest = ack.largest_pkt
        if newest > self._largest_acked and newest < self.next_pkt:
            sent_times = self._sent_times
            sent = sent_times.get(newest)
            self._largest_acked = newest
            if sent is not None:
                delay = ack.delay_us / 1e6
                # The peer may hold the ack of receipts alone longer: up to
                # what it promised for that datagram (RFC 9002 5.3).
                cap = MAX_ACK_DELAY
                late = self._late_pkts
                if late is not None and newest in late:
                    cap = self._peer_late_ack
                if delay > cap:
                    delay = cap
                sample = now - sent
                if sample - delay >= 0.0001:
                    sample -= delay
                self._update_rtt(sample if sample > 0.0 else 0.0)
            if newest < self.next_pkt - 1:
                for pkt in [p for p in sent_times if p <= newest]:
                    del sent_times[pkt]
                if not sent_times:
                    self._sent_times = {}  # a dict keeps its table when emptied: free it
                late = self._late_pkts
                if late is not None:
                    late.difference_update([p for p in late if p <= newest])
                    if not late:
                        self._late_pkts = None
            else:
                if sent_times:
                    self._sent_times = {}  # it covers every packet sent (a lone message's ack)
                self._late_pkts = None
        inflight = self._inflight
        acked_pkts = 0  # datagrams newly acked, for the congestion window
        if inflight:
            if ack.ranges:
                seqs = self._acked_seqs(ack)
            else:  # `_acked_seqs` when the ack has no ranges: nearly always
                una = ack.una
                seqs = []
                for seq in inflight:
                    if seq >= una:
                        break
                    seqs.append(seq)
            first_pkt = -1
            pkts: set[int] | None = None  # made when a second datagram shows up
            for seq in seqs:
                chunk = inflight[seq]
                pkt = chunk.pkt_num
                if pkt < 0:
                    # Admitted but never sent (`send` puts a chunk in the flight
                    # at once): an ack cannot cover it, whatever its `una` says.
                    continue
                del inflight[seq]
                self._unacked_bytes -= chunk.size
                progressed = True
                if not acked_pkts:
                    first_pkt, acked_pkts = pkt, 1
                elif pkt != first_pkt:
                    if pkts is None:
                        pkts = {first_pkt}
                    if pkt not in pkts:
                        pkts.add(pkt)
                        acked_pkts += 1
                if chunk.last and chunk.handle is not None:
                    self._events.append(PayloadAcked(chunk.handle))
            if progressed and not inflight:
                # All acked (an idle session's usual state): a dict keeps its
                # table when emptied, ~160 bytes per session; a fresh one has none.
                self._inflight = inflight = {}
        if acked_pkts:
            # Congestion avoidance: +1 datagram per window of datagrams acked.
            cwnd = self._cwnd + acked_pkts / self._cwnd
            self._cwnd = cwnd if cwnd < MAX_CWND else float(MAX_CWND)
        if progressed:
            self._backoff = 0
            self._last_progress = now
            if self._unreachable:
                self._unreachable = False
                self._events.append(PeerReachable())
        if not inflight:
            return  # nothing left that could be lost
        # Loss detection (RFC 9002 6.1): packet and time thresholds.
        rtt = max(self._srtt or INITIAL_RTO, self._latest_rtt, TIMER_GRANULARITY)
        lost_pkt = 0
        # (Per ack, over every chunk in flight: the bounds are worked out once.)
        largest = self._largest_acked
        by_count = largest - PACKET_THRESHOLD  # pkt_num + PACKET_THRESHOLD <= largest
        by_time = now - TIME_THRESHOLD * rtt
        for chunk in inflight.values():
            pkt = chunk.pkt_num
            if chunk.lost or pkt >= largest:
                continue
            if pkt <= by_count or chunk.sent_at <= by_time:
                chunk.lost = True
                if pkt > lost_pkt:
                    lost_pkt = pkt
        if lost_pkt >= self._recovery_pkt and lost_pkt:
            # One reduction per round trip (RFC 9002 7.3.2).
            self._cwnd = max(MIN_CWND, self._cwnd / 2)
            self._recovery_pkt = self.next_pkt

    def _acked_seqs(self, ack: Ack) -> list[int]:
        """The in-flight seqs this ACK covers, in seq order, without testing
        every chunk against every range (the flight is kept in seq order)."""
        inflight = self._inflight
        if not inflight:
            return []
        acked = []
        for seq in inflight:
            if seq >= ack.una:
                break
            acked.append(seq)
        floor = max(ack.una, next(iter(inflight)))
        top = self._next_seq
        for start, end in sorted(ack.ranges):
            start, end = max(start, floor), min(end, top)
            if end - start > len(inflight):  # wide: look at the flight instead
                acked.extend(s for s in inflight if start <= s < end)
            else:
                acked.extend(s for s in range(start, end) if s in inflight)
            floor = max(floor, end)
        return acked

    def _update_rtt(self, sample: float) -> None:
        self._latest_rtt = sample
        if self._srtt is None:
            self._srtt = sample
            self._rttvar = sample / 2
        else:
            self._rttvar = (1 - RTT_BETA) * self._rttvar + RTT_BETA * abs(self._srtt - sample)
            self._srtt = (1 - RTT_ALPHA) * self._srtt + RTT_ALPHA * sample
