"""The client's protocol logic without I/O: `ClientCore`, its events, and
the store interface it keeps its outbox and history in.

Shaped like aioquic's `QuicConnection` (and the server's `Relay`): the
owner hands it datagrams with `receive_datagram(data, now)`, sends what
`datagrams_to_send(now)` returns, calls `handle_timer(now)` once
`get_timer()` has passed, and reads what happened with `next_event()`.
The user's actions are method calls (`send`, `shown`, `who`, `watch`,
`typing`, `logout`). It reads no clock, opens no socket, starts no thread
and touches no disk: time comes in as `now`, randomness from the sources
it is given, persistence through a `CoreStore` (`client_store.ClientStore`
on disk; `MemoryStore` here when none is given). `chat_client.ChatSession`
is the thin driver around it (socket, thread, queues); the load generator
and the tests drive it directly, so the login exists once.

What it owns: the login (HELLO -> CHALLENGE -> LOGIN -> WELCOME, SCRAM
with the key exchange, the server's key pinned at the first login), the
re-login when the server forgets the session or stops answering, the
outbox (resent in order, with its ids, after each login), the receipts
(a received message is committed, then handed on as `MessageReceived`;
its receipt leaves only after the front end reports it shown with
`shown(id)`), presence, WHO paging, typing and the logout.
"""

from __future__ import annotations

import enum
import hmac
import logging
import random
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import protocol
from common import format_address
from protocol import (
    CONTROL_STREAM,
    FLAG_MAC,
    HELLO_SIZE,
    MIN_PREAUTH_REQUEST,
    NO_SESSION,
    PBKDF2_MIN_ITERATIONS,
    Accept,
    Accepts,
    Bye,
    Challenge,
    Deliver,
    Delivered,
    Delivereds,
    ErrorCode,
    Fail,
    Frame,
    Hello,
    LocalProtocolError,
    Login,
    Logout,
    Message,
    MsgId,
    Notice,
    Packet,
    Presence,
    ProtocolError,
    Receipt,
    Receipts,
    Refused,
    ScramKeys,
    Send,
    Ticket,
    TicketFrame,
    Typing,
    UnknownSession,
    Watch,
    Welcome,
    Who,
    WhoReply,
    batches,
    check_text,
    conversation_stream,
    decode_header,
    decode_message,
    decode_packet,
    encode_message,
    encode_packet,
    name_key,
    normalize_name,
    server_signature,
    session_keys,
)
from reliability import (
    RTO_MAX,
    RTO_MIN,
    Connection,
    PayloadAcked,
    PayloadReceived,
    PayloadResent,
    PeerUnreachable,
    ReassemblyExpired,
)

log = logging.getLogger("client_core")

KEEPALIVE = 15.0  # RFC 8085 3.5: not more often than every 15 s
KEEPALIVE_JITTER = 3.0  # upward only
LINK_TIMEOUT = 45.0  # nothing heard for this long while pinging: reconnect
LOGIN_TIMEOUT = 5.0  # the first login gives up after this
LOGOUT_ACK_WAIT = 2.0
RECONNECT_MAX = 30.0  # backoff cap between re-login attempts
FIRST_LOGIN_MAX = 2.0  # backoff cap while the first login has LOGIN_TIMEOUT to succeed
LOGIN_FIRST_INTERVAL = 0.25  # the first HELLO/LOGIN retransmission, doubled each time
RATE_LIMITED_WAIT = 10.0  # before logging in again after `rate_limited`
SHUTDOWN_WAIT = 0.5  # after a server's BYE(server_shutdown): give the next one a moment
LOGIN_STEP = 1.0  # a LOGIN unanswered for 3x this restarts from HELLO
PBKDF2_MAX_ITERATIONS = 10_000_000  # refuse a server that asks for absurd work
# At logout, how long to wait for the front end to show what it was handed
# last, so those receipts leave before the LOGOUT. A live front end takes
# milliseconds; one that is closing never will (its messages stay unshown
# and are shown at the next start), and must not hold it long.
SHOWN_WAIT = 1.0
# `link_stats` reports loss over about this long (the health view's figure
# is "now", not since login), from counts marked at most once per
# LOSS_MARK_EVERY: 61 marks at most, whatever the traffic.
LOSS_WINDOW = 60.0
LOSS_MARK_EVERY = 1.0

FATAL_LOGIN_ERRORS = frozenset(
    {
        ErrorCode.NAME_TAKEN,
        ErrorCode.INVALID_NAME,
        ErrorCode.BAD_PASSWORD,
        ErrorCode.PASSWORD_REQUIRED,
        ErrorCode.SERVER_UNREACHABLE,
        ErrorCode.LOGGED_IN_ELSEWHERE,
    }
)


class MessageState(enum.StrEnum):
    """Where a message we sent is; states only move forward (sending ->
    accepted -> delivered), or end in failed."""

    SENDING = "sending"  # in the outbox (on disk), not yet held by the server
    ACCEPTED = "accepted"  # the server holds it (committed)
    DELIVERED = "delivered"  # the recipient's front end showed it
    FAILED = "failed"  # given up; `reason` says why


class ClientError(LocalProtocolError):
    """Something the user asked for cannot be done; `code` says what to
    report (`ErrorEvent.code` is its label)."""

    code: ErrorCode  # never None here (`ProtocolError.code` may be)

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message, code=code)
        self.message = message


# --- events ---------------------------------------------------------------


@dataclass(frozen=True)
class LoggedIn:
    user: str
    server: str | None = None  # HOST:PORT logged in to (None: the owner did not say)

    def to_json(self) -> dict[str, Any]:
        out = {"event": "logged_in", "user": self.user}
        if self.server is not None:
            out["server"] = self.server
        return out


@dataclass(frozen=True)
class MessageReceived:
    sender: str
    text: str
    id: int  # the server's number for it in our mailbox
    sent_ms: int  # when the server accepted it (wall clock, ms)
    msg_id: str = ""  # the sender's message id, `instance-seq`

    def to_json(self) -> dict[str, Any]:
        return {"event": "message", "from": self.sender, "text": self.text, "id": self.id,
                "sent_ms": self.sent_ms}  # fmt: skip


@dataclass(frozen=True)
class StatusChanged:
    """A state of a message we sent: sending, accepted, delivered or failed."""

    id: str  # the message id, `instance-seq`
    state: MessageState
    to: str
    text: str
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": "status", "id": self.id, "state": str(self.state)}
        if self.state == MessageState.SENDING:
            out["to"] = self.to
            out["text"] = self.text
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class PresenceChanged:
    user: str
    online: bool

    def to_json(self) -> dict[str, Any]:
        return {"event": "presence", "user": self.user, "online": self.online}


@dataclass(frozen=True)
class WhoList:
    users: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"event": "who", "users": list(self.users)}


@dataclass(frozen=True)
class ErrorEvent:
    code: str  # an ErrorCode label
    message: str
    fatal: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"event": "error", "code": self.code, "message": self.message}


@dataclass(frozen=True)
class LinkChanged:
    """The server stopped answering (`up=False`, we keep trying) or answers again."""

    up: bool
    server: str | None = None  # with up: HOST:PORT logged in to (after failover, another node)

    def to_json(self) -> dict[str, Any]:
        out = {"event": "link", "state": "up" if self.up else "down"}
        if self.up and self.server is not None:
            out["server"] = self.server
        return out


@dataclass(frozen=True)
class LinkStats:
    """The link to the server as measured now (`ClientCore.link_stats`): not
    an event, a snapshot the front end asks for (`/stats`, the window's
    health view polls it)."""

    link: Literal["up", "down", "connecting"]  # down: lost, reconnecting (or ended)
    rtt_ms: float | None  # smoothed RTT (RFC 6298 SRTT); None before a sample
    rttvar_ms: float | None  # its variation (RTTVAR)
    loss_pct: float  # resent share of the data sent over the last LOSS_WINDOW s
    retransmits: int  # data pieces sent again, since the start
    sent: int  # data pieces sent (first sends and resends), since the start
    in_flight: int  # pieces sent and not acked yet
    outbox: int  # our messages the server has not accepted yet

    def to_json(self) -> dict[str, Any]:
        return {"event": "stats", "link": self.link, "rtt_ms": self.rtt_ms,
                "rttvar_ms": self.rttvar_ms, "loss_pct": self.loss_pct,
                "retransmits": self.retransmits, "in_flight": self.in_flight,
                "outbox": self.outbox}  # fmt: skip

    def to_text(self) -> str:
        """One line for a person (the terminal's /stats, the window's status bar)."""
        rtt = "RTT \u2013" if self.rtt_ms is None else f"RTT {self.rtt_ms:.0f} ms"
        if self.rttvar_ms is not None:
            rtt += f" (\u00b1{self.rttvar_ms:.0f})"
        return (f"link {self.link} \u00b7 {rtt} \u00b7 loss {self.loss_pct:.0f} % \u00b7 "
                f"{self.retransmits} resent \u00b7 {self.in_flight} in flight \u00b7 "
                f"{self.outbox} queued")  # fmt: skip


@dataclass(frozen=True)
class TypingNotice:
    user: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "typing", "user": self.user}


@dataclass(frozen=True)
class Disconnected:
    reason: str  # an ErrorCode label; `logged_out` after a clean logout

    def to_json(self) -> dict[str, Any]:
        return {"event": "disconnected", "reason": self.reason}


Event = (
    LoggedIn
    | MessageReceived
    | StatusChanged
    | PresenceChanged
    | WhoList
    | ErrorEvent
    | LinkChanged
    | TypingNotice
    | Disconnected
)


# --- the store --------------------------------------------------------------

#: What `add_incoming` found: a new message (show it), one stored but not
#: shown yet (it is on its way to the screen), or one already shown.
Arrival = Literal["new", "unshown", "shown"]


@dataclass(frozen=True)
class StoredMessage:
    """A received message committed to the history but not shown yet."""

    sender: str
    msg_id: MsgId
    text: str
    sent_ms: int
    server_msg_id: int


class CoreStore(Protocol):
    """What `ClientCore` keeps: the outbox, the received messages and
    whether each was shown, the pinned server key, and the numbering of
    our messages. Writes gather until `commit()`, which the core calls
    before anything that promises them (a receipt, a handed-on message)."""

    @property
    def instance_id(self) -> int: ...

    @property
    def next_seq(self) -> int: ...

    @property
    def directory(self) -> Path | None:
        """Where it lives on disk (None: in memory, gone when the process ends)."""
        ...

    def commit(self) -> None: ...

    def add_outgoing(self, msg_id: MsgId, to: str, text: str) -> None: ...

    def add_resends(self, msg_id: MsgId, count: int) -> None:
        """`count` more transmissions of one of our messages (the health view's
        "resent N times"); its sent, accepted and delivered times the store
        stamps itself when it records them."""
        ...

    def state_of(self, msg_id: MsgId) -> str | None: ...

    def set_state(self, msg_id: MsgId, state: str) -> None: ...

    def add_incoming(
        self, sender: str, msg_id: MsgId, text: str, sent_ms: int, server_msg_id: int
    ) -> Arrival: ...

    def mark_shown(self, server_msg_id: int) -> bool: ...

    def unshown(self) -> list[StoredMessage]: ...

    def pending(self) -> list[tuple[MsgId, str, str]]: ...

    def server_key(self) -> bytes | None: ...

    def pin_server_key(self, dh_public: bytes) -> None: ...

    def ticket(self) -> bytes | None:
        """The server's login ticket for this instance, if it gave one."""
        ...

    def keep_ticket(self, ticket: bytes) -> None: ...


class MemoryStore:
    """A `CoreStore` in memory: for a client without a disk, and for tests.
    What it holds ends with the process (`directory` is None)."""

    directory: Path | None = None

    def __init__(self, instance_id: int | None = None) -> None:
        self.instance_id = instance_id if instance_id is not None else secrets.randbits(64)
        self.next_seq = 1
        self._outbox: dict[MsgId, tuple[str, str]] = {}  # in the order written
        self._states: dict[MsgId, str] = {}
        # (sender key, msg id) -> [the message, shown?]
        self._incoming: dict[tuple[str, MsgId], tuple[StoredMessage, bool]] = {}
        self._by_server_id: dict[int, tuple[str, MsgId]] = {}
        self._server_key: bytes | None = None
        self._ticket: bytes | None = None
        self.resends: dict[MsgId, int] = {}

    def commit(self) -> None:
        pass  # nothing to make durable

    def add_resends(self, msg_id: MsgId, count: int) -> None:
        self.resends[msg_id] = self.resends.get(msg_id, 0) + count

    def add_outgoing(self, msg_id: MsgId, to: str, text: str) -> None:
        self._outbox.setdefault(msg_id, (to, text))
        self._states.setdefault(msg_id, MessageState.SENDING)
        self.next_seq = max(self.next_seq, msg_id.client_seq + 1)

    def state_of(self, msg_id: MsgId) -> str | None:
        return self._states.get(msg_id)

    def set_state(self, msg_id: MsgId, state: str) -> None:
        if msg_id in self._states:
            self._states[msg_id] = state
        if state != MessageState.SENDING:
            self._outbox.pop(msg_id, None)

    def add_incoming(
        self, sender: str, msg_id: MsgId, text: str, sent_ms: int, server_msg_id: int
    ) -> Arrival:
        key = (name_key(sender), msg_id)
        known = self._incoming.get(key)
        if known is not None:
            return "shown" if known[1] else "unshown"
        self._incoming[key] = (StoredMessage(sender, msg_id, text, sent_ms, server_msg_id), False)
        self._by_server_id[server_msg_id] = key
        return "new"

    def mark_shown(self, server_msg_id: int) -> bool:
        key = self._by_server_id.get(server_msg_id)
        if key is None:
            return False
        self._incoming[key] = (self._incoming[key][0], True)
        return True

    def unshown(self) -> list[StoredMessage]:
        waiting = [m for m, shown in self._incoming.values() if not shown]
        return sorted(waiting, key=lambda m: m.server_msg_id)

    def pending(self) -> list[tuple[MsgId, str, str]]:
        return [(msg_id, to, text) for msg_id, (to, text) in self._outbox.items()]

    def server_key(self) -> bytes | None:
        return self._server_key

    def pin_server_key(self, dh_public: bytes) -> None:
        if self._server_key is None:
            self._server_key = dh_public

    def ticket(self) -> bytes | None:
        return self._ticket

    def keep_ticket(self, ticket: bytes) -> None:
        self._ticket = ticket


# --- the core -----------------------------------------------------------------


class _Outgoing:
    __slots__ = ("msg_id", "to", "text", "state", "transmitted")

    def __init__(self, msg_id: MsgId, to: str, text: str) -> None:
        self.msg_id = msg_id
        self.to = to
        self.text = text
        self.state = MessageState.SENDING
        self.transmitted = False  # given to a connection: after a re-login it is a resend


def check_outgoing(text: str, to: str) -> str:
    """The recipient's display name, or `ClientError` saying why `text`
    cannot go to `to` (the name and the text are checked apart, so each
    gets its own code)."""
    try:
        target = normalize_name(to)
    except LocalProtocolError as exc:
        raise ClientError(ErrorCode.INVALID_NAME, f"cannot send to {to!r}: {exc}") from None
    try:
        check_text(text)
    except LocalProtocolError as exc:
        raise ClientError(ErrorCode.TOO_LONG, str(exc)) from None
    return target


LoginPhase = Literal["hello", "login", "wait"]
#: `protocol.salted_password`'s shape: (password, salt, iterations) -> PBKDF2.
SaltedPassword = Callable[[str, bytes, int], bytes]
#: `protocol.build_login`'s shape: the LOGIN, the SCRAM auth message, the keys.
BuildLogin = Callable[[str, int, bytes, Challenge, bytes], tuple[Login, bytes, ScramKeys]]


class ClientCore:
    """One user's side of the protocol, without I/O (see the module doc).

    `username` must be a valid name (`ClientError(INVALID_NAME)` if not) and
    `password` non-empty (`ClientError(PASSWORD_REQUIRED)`); the first login
    with a new name registers it. `connect_to` is the peer plain sends go to.
    `server` names the server in messages for the user and in `LoggedIn` and
    `LinkChanged`; the core never chooses one. An owner given a cluster's
    list (`chat_client`'s network thread) picks where each login datagram
    goes, sets `server` to it, and passes the whole list as `servers`, which
    only names them in the error when none answers. `token_bytes`
    and `rng` are the randomness (nonces; retransmission and keepalive
    jitter), replaceable for tests. `salted_password` and `build_login` are
    protocol.py's; the load generator gives cached ones (one process stands
    in for thousands of clients, whose PBKDF2 and DH work it cannot afford).

    Receipts: a receipt tells the sender `delivered`, so it should leave only
    once the message is in front of the user. By default the owner's
    `next_event()` is that moment (a received message handed out counts as
    shown). A front end that shows messages later, on another thread, and
    must not lose one to a crash in between (`ChatSession`: the terminal
    prints and flushes, the window inserts) passes `wait_for_shown=True`
    and calls `shown(id)` once it is on the screen; until then no receipt."""

    def __init__(
        self,
        username: str,
        password: str,
        connect_to: str | None = None,
        *,
        store: CoreStore | None = None,
        server: tuple[str, int] | None = None,
        servers: tuple[tuple[str, int], ...] = (),
        rto_min: float = RTO_MIN,
        rto_max: float = RTO_MAX,
        login_timeout: float = LOGIN_TIMEOUT,
        keepalive: float = KEEPALIVE,
        link_timeout: float = LINK_TIMEOUT,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
        rng: random.Random | None = None,
        salted_password: SaltedPassword = protocol.salted_password,
        build_login: BuildLogin = protocol.build_login,
        wait_for_shown: bool = False,
    ) -> None:
        try:
            self.username = normalize_name(username)
        except LocalProtocolError as exc:
            raise ClientError(ErrorCode.INVALID_NAME, f"invalid username: {exc}") from None
        if not password:
            raise ClientError(ErrorCode.PASSWORD_REQUIRED, "a password is required")
        self.store: CoreStore = store if store is not None else MemoryStore()
        self.instance_id = self.store.instance_id
        self._next_seq = self.store.next_seq
        self.server = server
        self.servers = servers
        self.rto_min = rto_min
        self.rto_max = rto_max
        self.login_timeout = login_timeout
        self.keepalive = keepalive
        self.link_timeout = link_timeout
        self._token_bytes = token_bytes
        self._rng = rng if rng is not None else random.Random()
        self._salted_password = salted_password
        self._build_login = build_login
        self.wait_for_shown = wait_for_shown
        self.login_sends = 0  # HELLO and LOGIN datagrams handed out (first sends and resends)
        # Kept for the re-logins; the salted form is cached so a reconnect
        # does not pay PBKDF2 again.
        self._password = password
        self._salted: dict[tuple[bytes, int], bytes] = {}
        self.conn: Connection | None = None
        self.outbox: dict[MsgId, _Outgoing] = {}
        self._events: deque[Event] = deque()  # ready for next_event()
        # Due once the store has committed what they promise: `sending`
        # (the message is in the outbox) and received messages (in the history).
        self._staged: list[Event] = []
        self.awaiting: set[int] = set()  # handed on, not yet `shown` (server ids)
        self.receipts: list[int] = []  # server ids shown, receipted after the commit
        self.who_pages: list[str] = []
        self.ended = False  # logged out, or gave up: nothing more happens
        self.first_login = True
        self.link_up = False
        self._peer: str | None = None  # chosen by the user: connect-to or set_peer
        self._reply_to: str | None = None  # who wrote last
        # login state
        self._nonce = b""
        self._login_datagram = b""  # the HELLO, then the LOGIN, resent until answered
        self._login_phase: LoginPhase = "hello"
        self._login_started: float | None = None  # when the LOGIN first left
        self._login_at: float | None = None  # next (re)send; None: not connecting
        self._login_interval = LOGIN_FIRST_INTERVAL
        self._login_deadline: float | None = None
        # (auth message, keys, server DH key) of this attempt
        self._auth: tuple[bytes, ScramKeys, bytes] | None = None
        # The server's DH key seen at the first login with this store (pinned).
        self.pinned = self.store.server_key()
        # The server's login ticket for this instance: sent with each LOGIN,
        # it gets the owner past failures strangers cause under this name.
        self.ticket = self.store.ticket()
        self.presence: dict[str, bool] = {}  # last reported, by name key
        self.watched: set[str] = set()  # presence wanted; asked again after each login
        # What an earlier run sent and the server never accepted goes out
        # again, with its original ids, after login.
        for msg_id, to, text in self.store.pending():
            self.outbox[msg_id] = _Outgoing(msg_id, to, text)
        # online state
        self._last_heard = 0.0
        self._next_ping = 0.0
        # logout state
        self._closing_deadline: float | None = None
        self._closing_shown_wait = True
        self._shown_deadline: float | None = None
        self._logout_sent_at: float | None = None
        self._final_flush = False  # the ack for what the server sent last, then stop
        # link statistics: the counts of connections gone by (each login
        # makes a new one), and marks (now, sent, resent) for the loss window
        self._stats_conn: Connection | None = None
        self._sent_before = 0
        self._resent_before = 0
        self._loss_marks: deque[tuple[float, int, int]] = deque()
        if connect_to:
            self.set_peer(connect_to)

    # --- the owner's API: I/O and time ----------------------------------------

    def connect(self, now: float) -> None:
        """Start the first login; it gives up (`server_unreachable`) after
        `login_timeout` without an answer."""
        self._loss_marks.append((now, 0, 0))
        self._start_login(now, deadline=now + self.login_timeout)

    def receive_datagram(self, data: bytes, now: float) -> None:
        """Take one datagram from the server; garbage is dropped (logged)."""
        if self.ended:
            return
        try:
            self._on_datagram(data, now)
        except ProtocolError as exc:
            log.debug("dropped a datagram: %s", exc)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Everything to send now. Commits the store first: what a receipt
        or a handed-on message promises is on disk before either goes."""
        self._run_closing(now)
        self.commit()
        out: list[bytes] = []
        if self.conn is None:
            if not self.ended:
                self._run_login_timer(now)  # a restart or a deadline due now comes first
            if (
                not self.ended
                and self._login_phase != "wait"
                and self._login_at is not None
                and now >= self._login_at
            ):
                out.append(self._login_datagram)
                self.login_sends += 1
                if self._login_phase == "login" and self._login_started is None:
                    self._login_started = now  # PBKDF2 may have taken a while
                cap = FIRST_LOGIN_MAX if self.first_login else RECONNECT_MAX
                self._login_at = now + self._login_interval * self._rng.uniform(1.0, 1.5)
                self._login_interval = min(cap, self._login_interval * 2)
            return out
        if self.ended and not self._final_flush:
            return out
        self._final_flush = False
        self._queue_receipts()
        out.extend(self.conn.datagrams_to_send(now))
        if not self._loss_marks or now - self._loss_marks[-1][0] >= LOSS_MARK_EVERY:
            self._mark_loss(now)
        return out

    def get_timer(self) -> float | None:
        """When `handle_timer` is next due (None: nothing will happen by itself)."""
        if self.ended:
            return None
        deadlines: list[float] = []
        if self.conn is None:
            if self._login_at is not None:
                deadlines.append(self._login_at)
            if self._login_deadline is not None:
                deadlines.append(self._login_deadline)
            if self._login_phase == "login" and self._login_started is not None:
                deadlines.append(self._login_started + 3 * LOGIN_STEP)
        else:
            timer = self.conn.get_timer()
            if timer is not None:
                deadlines.append(timer)
            deadlines.append(self._next_ping)
            deadlines.append(self._last_heard + self.link_timeout)
        if self._closing_deadline is not None:
            deadlines.append(self._closing_deadline)
        if self._shown_deadline is not None:
            deadlines.append(self._shown_deadline)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        """Run what is due: retransmissions, keepalives, login retries and
        deadlines, the logout's waits. Harmless when nothing is due."""
        if self.ended:
            return
        if self.conn is None:
            self._run_login_timer(now)
        else:
            timer = self.conn.get_timer()
            if timer is not None and timer <= now:
                self.conn.handle_timer(now)
                self._collect(now)
            if self.conn is not None and now >= self._next_ping:
                self.conn.send_ping()
                self._schedule_ping(now)
            if self.conn is not None and now - self._last_heard >= self.link_timeout:
                self._link_lost(now, notify=True)
        self._run_closing(now)

    def next_event(self) -> Event | None:
        """The next thing that happened, or None. Without `wait_for_shown`,
        a received message handed out here counts as shown (its receipt
        leaves with the next datagrams)."""
        if self._staged:
            self.commit()
        if not self._events:
            return None
        event = self._events.popleft()
        if isinstance(event, MessageReceived) and not self.wait_for_shown:
            self.shown(event.id)
        return event

    def commit(self) -> None:
        """Make what was stored durable, then release the events that
        promise it (`sending`, received messages)."""
        self.store.commit()
        if self._staged:
            self._events.extend(self._staged)
            self._staged.clear()

    @property
    def login_phase(self) -> LoginPhase | Literal["online", "ended"]:
        """Where the login is: `hello` (HELLO sent), `login` (LOGIN sent),
        `wait` (told to wait), `online` (a session), or `ended`."""
        if self.ended:
            return "ended"
        return "online" if self.conn is not None else self._login_phase

    @property
    def login_nonce(self) -> bytes:
        """The nonce of the login attempt in progress: the server's replies
        carry it (an owner with many cores on one socket routes by it)."""
        return self._nonce

    def link_stats(self, now: float) -> LinkStats:
        """The link as measured now: RTT and its variation, loss over the
        last LOSS_WINDOW s (resent pieces / pieces sent), resends since the
        start, pieces in flight, messages not yet accepted."""
        if not self._loss_marks or now - self._loss_marks[-1][0] >= LOSS_MARK_EVERY:
            self._mark_loss(now)
        sent, resent = self._link_counts()
        _, sent0, resent0 = self._loss_marks[0]
        loss = 100.0 * (resent - resent0) / (sent - sent0) if sent > sent0 else 0.0
        conn = self.conn
        srtt = conn.srtt if conn is not None else None
        rttvar = conn.rttvar if conn is not None else None
        link: Literal["up", "down", "connecting"]
        if conn is not None and self.link_up and not self.ended:
            link = "up"
        else:
            link = "connecting" if self.first_login and not self.ended else "down"
        return LinkStats(
            link=link,
            rtt_ms=None if srtt is None else round(srtt * 1000, 1),
            rttvar_ms=None if rttvar is None else round(rttvar * 1000, 1),
            loss_pct=round(loss, 1),
            retransmits=resent,
            sent=sent,
            in_flight=conn.in_flight if conn is not None else 0,
            outbox=sum(out.state == MessageState.SENDING for out in self.outbox.values()),
        )

    def _link_counts(self) -> tuple[int, int]:
        """(pieces sent, pieces resent) since the start, over every connection."""
        conn = self.conn
        if conn is not self._stats_conn:  # a new login: bank the old connection's counts
            if self._stats_conn is not None:
                self._sent_before += self._stats_conn.chunks_sent
                self._resent_before += self._stats_conn.chunks_resent
            self._stats_conn = conn
        if conn is None:
            return self._sent_before, self._resent_before
        return self._sent_before + conn.chunks_sent, self._resent_before + conn.chunks_resent

    def _mark_loss(self, now: float) -> None:
        """Note the counts now; keep the newest mark at least LOSS_WINDOW old
        (the window's start) and the ones after it."""
        sent, resent = self._link_counts()
        marks = self._loss_marks
        marks.append((now, sent, resent))
        while len(marks) >= 2 and marks[1][0] <= now - LOSS_WINDOW:
            marks.popleft()

    # --- the owner's API: the user's actions ------------------------------------

    @property
    def peer(self) -> str | None:
        """Who a plain send goes to: the chosen peer, else whoever wrote last."""
        return self._peer or self._reply_to

    def set_peer(self, name: str) -> str:
        """Make `name` the person plain sends go to, and follow their
        presence; its display form, or `ClientError(INVALID_NAME)`."""
        try:
            shown = normalize_name(name)
        except LocalProtocolError as exc:
            raise ClientError(ErrorCode.INVALID_NAME, f"cannot talk to {name!r}: {exc}") from None
        self._peer = shown
        self.watch(shown)
        return shown

    def send(self, text: str, now: float, to: str | None = None) -> str:
        """Send `text` to `to` (default: `peer`); its message id (the JSON
        status id). It leaves with the next `datagrams_to_send` (after a
        login, if there is no session now). `ClientError` (NO_PEER,
        INVALID_NAME, TOO_LONG) if it cannot be sent at all."""
        target = to or self.peer
        if not target:
            reason = "nobody to send to yet; name someone with /to NAME"
            raise ClientError(ErrorCode.NO_PEER, reason)
        target = check_outgoing(text, target)
        msg_id = self.new_message_id()
        self.queue_message(msg_id, target, text)
        return msg_id.label()

    def new_message_id(self) -> MsgId:
        msg_id = MsgId(self.instance_id, self._next_seq)
        self._next_seq += 1
        return msg_id

    def queue_message(self, msg_id: MsgId, to: str, text: str) -> None:
        """Put a checked message (`check_outgoing`) with its id in the outbox
        and send it; `sending` is reported once the outbox is committed."""
        try:
            payload = encode_message(Send(msg_id, to, text))
        except LocalProtocolError as exc:  # checked before; never lose it silently
            self._emit(StatusChanged(msg_id.label(), MessageState.FAILED, to, text,
                                     ErrorCode.TOO_LONG.label))  # fmt: skip
            self._emit(ErrorEvent(ErrorCode.TOO_LONG.label, str(exc)))
            return
        self._next_seq = max(self._next_seq, msg_id.client_seq + 1)
        out = self.outbox[msg_id] = _Outgoing(msg_id, to, text)
        self.store.add_outgoing(msg_id, to, text)
        self._staged.append(StatusChanged(msg_id.label(), MessageState.SENDING, out.to, out.text))
        if self.conn is not None:
            # The id as handle: the connection names it when it resends a piece.
            self.conn.send(payload, conversation_stream(to), msg_id)
            out.transmitted = True

    def shown(self, server_msg_id: int) -> None:
        """The front end showed the received message `server_msg_id` (a
        `MessageReceived.id`): record it; its receipt follows the commit."""
        self.awaiting.discard(server_msg_id)
        if self.store.mark_shown(server_msg_id):
            self.receipts.append(server_msg_id)

    def who(self) -> None:
        """Ask who is online; `WhoList` follows (all pages)."""
        self.who_pages = []
        self._send_message(Who())

    def watch(self, name: str) -> None:
        """Follow `name`'s presence (now and when it changes)."""
        self.watched.add(name)
        self._send_message(Watch(name))

    def typing(self, to: str) -> None:
        self._send_message(Typing(to))

    def logout(self, now: float, timeout: float = 10.0, *, wait_shown: bool = True) -> None:
        """Wait (up to `timeout`) until everything sent is accepted (and,
        with `wait_shown`, briefly until what was handed on is `shown`),
        then log out; `Disconnected('logged_out')` follows."""
        if self._closing_deadline is None and not self.ended:
            self._closing_deadline = now + timeout
            self._closing_shown_wait = wait_shown
            self._run_closing(now)

    def abort(self) -> None:
        """Stop at once: no logout, nothing more sent."""
        self.ended = True

    def server_gone(self, now: float) -> None:
        """The owner learned that the server of this session is not there
        (an ICMP port unreachable for it: the process died; or host unreachable).
        Log in again at once, keeping the outbox, instead of waiting for the
        link timeout; an owner with a list of servers sends that login to
        the next one. Nothing happens while not logged in (the login's own
        retries go on)."""
        if self.conn is None or self.ended:
            return
        log.info("the server %s is gone; logging in again", self._server_text("in use"))
        self._link_lost(now, notify=True)

    # --- helpers ---------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _fatal(self, code: ErrorCode, message: str) -> None:
        self._emit(ErrorEvent(code.label, message, fatal=True))
        self._emit(Disconnected(code.label))
        self.ended = True

    def _server_text(self, fallback: str) -> str:
        return format_address(*self.server) if self.server is not None else fallback

    def _server_label(self) -> str | None:
        return format_address(*self.server) if self.server is not None else None

    def _send_message(
        self, message: Message, stream: int = CONTROL_STREAM, handle: object = None
    ) -> None:
        if self.conn is not None:
            self.conn.send(encode_message(message), stream, handle)

    # --- datagrams -----------------------------------------------------------

    def _on_datagram(self, data: bytes, now: float) -> None:
        header = decode_header(data)
        if self.conn is not None and header.session_id == self.conn.session_id:
            if header.flags & FLAG_MAC:
                if self.conn.receive_datagram(data, now):
                    self._last_heard = now
                    self._collect(now)
                return
            # No MAC: only an UNKNOWN_SESSION hint (below) can name our session.
        packet = decode_packet(data, None)
        for frame in packet.frames:
            if (
                isinstance(frame, (Challenge, Welcome, Refused))
                and self.conn is None
                and frame.nonce == self._nonce
            ):
                self._on_login_reply(frame, now)
            elif isinstance(frame, UnknownSession) and self.conn is not None:
                if header.session_id != self.conn.session_id:
                    continue
                if self._closing_deadline is not None:
                    self._finish(ErrorCode.LOGGED_OUT)  # the server already let us go
                    return
                log.info("the server does not know our session (it restarted?); logging in again")
                self._link_lost(now, notify=True)

    # --- login ------------------------------------------------------------------

    def _start_login(self, now: float, deadline: float | None) -> None:
        """Begin a login: HELLO -> CHALLENGE -> LOGIN -> WELCOME (SCRAM)."""
        self._nonce = self._token_bytes(16)
        hello = Hello(self.username, self.instance_id, self._nonce)
        self._login_datagram = encode_packet(
            Packet(NO_SESSION, 0, (hello,)), None, pad_to=HELLO_SIZE
        )
        self._login_phase = "hello"
        self._login_started = None
        self._login_at = now
        self._login_interval = LOGIN_FIRST_INTERVAL
        self._login_deadline = deadline
        self._auth = None

    def _run_login_timer(self, now: float) -> None:
        if self._login_deadline is not None and now >= self._login_deadline:
            if len(self.servers) > 1:
                names = ", ".join(format_address(*server) for server in self.servers)
                text = f"none of the servers {names} answers; are they running?"
            else:
                where = f"server {self._server_text('')}" if self.server else "the server"
                text = f"{where} does not answer; is it running?"
            self._fatal(ErrorCode.SERVER_UNREACHABLE, text)
            return
        if (
            self._login_phase == "login"
            and self._login_started is not None
            and now - self._login_started > 3 * LOGIN_STEP
        ):
            # The cookie may have gone stale, or the server restarted: start over.
            self._start_login(now, self._login_deadline)
        if self._login_phase == "wait" and self._login_at is not None and now >= self._login_at:
            self._start_login(now, None)  # a fresh attempt after being told to wait

    def _on_login_reply(self, frame: Challenge | Welcome | Refused, now: float) -> None:
        if isinstance(frame, Refused):
            if frame.code == ErrorCode.RATE_LIMITED:
                # Too many failed logins (or new accounts): a clear error, then
                # try again later. A server that answers is not unreachable.
                self._emit(ErrorEvent(frame.code.label, frame.message))
                self._login_phase = "wait"
                self._login_at = now + RATE_LIMITED_WAIT
                self._login_deadline = None
                return
            if frame.code in FATAL_LOGIN_ERRORS or self.first_login:
                self._fatal(frame.code, frame.message)
            else:  # e.g. a busy server: keep trying
                self._emit(ErrorEvent(frame.code.label, frame.message))
            return
        if isinstance(frame, Challenge):
            if self._login_phase != "hello":
                return  # a duplicate
            self._send_proof(frame, now)
            return
        if self._auth is None or self._login_phase != "login":
            return
        message, keys, server_dh = self._auth
        if not hmac.compare_digest(frame.signature, server_signature(keys.server_key, message)):
            # Someone answered who does not know our account: not our server.
            text = "the server could not prove it knows this account; not logging in"
            self._fatal(ErrorCode.SERVER_UNREACHABLE, text)
            return
        to_server, to_client = session_keys(keys.client_key, message)
        self._link_counts()  # bank the last connection's counts before it is replaced
        self.conn = Connection(
            frame.session_id, to_server, now, peer_key=to_client,
            rto_min=self.rto_min, rto_max=self.rto_max, track_resends=True,
        )  # fmt: skip
        self._login_at = None
        if self.pinned is None:  # trust on first use, like SSH's known_hosts
            self.pinned = server_dh
            self.store.pin_server_key(server_dh)
        self._last_heard = now
        self._schedule_ping(now)
        if self.first_login:
            self.first_login = False
            self.username = frame.username
            self._emit(LoggedIn(frame.username, self._server_label()))
            self._hand_on_unshown()
        else:
            self._emit(LinkChanged(up=True, server=self._server_label()))
        self.link_up = True
        for name in sorted(self.watched):
            self._send_message(Watch(name))
        # Resend, in order and with their ids, what the server has not accepted.
        for out in self.outbox.values():
            if out.state == MessageState.SENDING:
                if out.transmitted:  # it went to the last session: this is a resend
                    self.store.add_resends(out.msg_id, 1)
                self.conn.send(encode_message(Send(out.msg_id, out.to, out.text)),
                               conversation_stream(out.to), out.msg_id)  # fmt: skip
                out.transmitted = True

    def _hand_on_unshown(self) -> None:
        """What an earlier run committed but never showed (it died between
        the two): handed on once, before anything new arrives. The server
        delivers these again (they were never receipted); `add_incoming`
        then finds them here, not shown, and leaves them to this."""
        for stored in self.store.unshown():
            self.awaiting.add(stored.server_msg_id)
            self._reply_to = stored.sender
            self._emit(MessageReceived(stored.sender, stored.text, stored.server_msg_id,
                                       stored.sent_ms, stored.msg_id.label()))  # fmt: skip

    def _send_proof(self, challenge: Challenge, now: float) -> None:
        """SCRAM client-final: stretch the password (cached per salt), prove it."""
        if not PBKDF2_MIN_ITERATIONS <= challenge.iterations <= PBKDF2_MAX_ITERATIONS:
            log.warning("ignoring a challenge with %d iterations", challenge.iterations)
            return
        if self.pinned is not None and challenge.dh_public != self.pinned:
            # Not the server this account was used with here: an attacker in
            # the middle, or a server whose data was reset. Never hand it keys.
            where = self.store.directory or "this client data"
            text = (f"the server at {self._server_text('this address')} is not the one you "
                    "logged in to before (its key changed); not logging in. If it was reset "
                    f"on purpose, remove {where}")  # fmt: skip
            self._fatal(ErrorCode.SERVER_UNREACHABLE, text)
            return
        cache_key = (challenge.salt, challenge.iterations)
        salted = self._salted.get(cache_key)
        if salted is None:
            salted = self._salted_password(self._password, challenge.salt, challenge.iterations)
            self._salted = {cache_key: salted}
        try:
            login, message, keys = self._build_login(
                self.username, self.instance_id, self._nonce, challenge, salted
            )
        except ProtocolError as exc:
            log.warning("ignoring a challenge: %s", exc)
            return
        self._auth = (message, keys, challenge.dh_public)
        frames: tuple[Frame, ...] = (login,)
        if self.ticket is not None:
            frames += (TicketFrame(self.ticket),)
        self._login_datagram = encode_packet(
            Packet(NO_SESSION, 0, frames), None, pad_to=MIN_PREAUTH_REQUEST
        )
        self._login_phase = "login"
        self._login_started = None  # set when it leaves (PBKDF2 took a while)
        self._login_interval = LOGIN_FIRST_INTERVAL
        self._login_at = now

    def _link_lost(self, now: float, *, notify: bool) -> None:
        """The server is gone or forgot us: log in again, keeping the outbox."""
        self.conn = None
        if self.link_up and notify:
            self._emit(ErrorEvent(ErrorCode.SERVER_UNREACHABLE.label,
                                  "the server stopped answering; reconnecting"))  # fmt: skip
            self._emit(LinkChanged(up=False))
        self.link_up = False
        self._start_login(now, deadline=None)

    # --- online ------------------------------------------------------------------

    def _schedule_ping(self, now: float) -> None:
        self._next_ping = now + self.keepalive + self._rng.uniform(0, KEEPALIVE_JITTER)

    def _queue_receipts(self) -> None:
        """The receipts for what was shown, batched, once the store has
        committed it (a receipt promises the message is kept and was shown)."""
        if not self.receipts or self.conn is None:
            return
        self.store.commit()
        receipts, self.receipts = self.receipts, []
        for part in batches(receipts):
            self._send_message(Receipt(part[0]) if len(part) == 1 else Receipts(tuple(part)))

    def _collect(self, now: float) -> None:
        conn = self.conn
        while conn is not None and (event := conn.next_event()) is not None:
            if isinstance(event, PayloadReceived):
                try:
                    message = decode_message(event.payload)
                except ProtocolError as exc:
                    log.warning("dropped a message from the server: %s", exc)
                    continue
                self._on_message(message, now)
                if self.conn is not conn:  # the message ended the session
                    return
            elif isinstance(event, PayloadAcked) and event.handle == "logout":
                self._finish(ErrorCode.LOGGED_OUT)
            elif isinstance(event, PayloadResent) and isinstance(event.handle, MsgId):
                out = self.outbox.get(event.handle)
                if out is not None:  # (gone from the outbox once delivered)
                    self.store.add_resends(out.msg_id, 1)
            elif isinstance(event, PeerUnreachable):
                self._link_lost(now, notify=True)
                return
            elif isinstance(event, ReassemblyExpired):
                # A long message from the server stalled for 30 s and was
                # dropped, though acked: log in again, and the server offers
                # what we have not receipted once more (nothing is lost).
                log.info("a message from the server stalled; logging in again")
                self._link_lost(now, notify=False)
                return

    def _accepted(self, msg_id: MsgId) -> None:
        out = self.outbox.get(msg_id)
        if out is not None and out.state == MessageState.SENDING:
            out.state = MessageState.ACCEPTED
            self.store.set_state(msg_id, MessageState.ACCEPTED)
            self._emit(StatusChanged(out.msg_id.label(), MessageState.ACCEPTED, out.to, out.text))

    def _delivered(self, msg_id: MsgId, to: str) -> None:
        out = self.outbox.pop(msg_id, None)
        if out is None:
            # Accepted before a restart of this client (only the store knew
            # it), or a receipt sent again: report `delivered` once.
            if self.store.state_of(msg_id) not in (None, MessageState.DELIVERED):
                self.store.set_state(msg_id, MessageState.DELIVERED)
                self._emit(StatusChanged(msg_id.label(), MessageState.DELIVERED, to, ""))
        else:
            self.store.set_state(msg_id, MessageState.DELIVERED)
            label = out.msg_id.label()
            if out.state == MessageState.SENDING:
                self._emit(StatusChanged(label, MessageState.ACCEPTED, out.to, out.text))
            self._emit(StatusChanged(label, MessageState.DELIVERED, out.to, out.text))

    def _on_message(self, message: Message, now: float) -> None:
        if isinstance(message, Deliver):
            # Committed, then handed on (after the commit), then shown by the
            # front end, which says so (`shown`), then receipted; each
            # message is shown once, however often it arrives.
            arrival = self.store.add_incoming(
                message.sender, message.msg_id, message.text, message.sent_ms,
                message.server_msg_id,
            )  # fmt: skip
            if arrival == "new":
                self.awaiting.add(message.server_msg_id)
                self._reply_to = message.sender
                self._staged.append(MessageReceived(message.sender, message.text,
                                                    message.server_msg_id, message.sent_ms,
                                                    message.msg_id.label()))  # fmt: skip
            elif arrival == "shown":
                self.receipts.append(message.server_msg_id)  # its receipt was lost: again
            # "unshown": on its way to the screen; the receipt follows `shown`.
        elif isinstance(message, Accept):
            self._accepted(message.msg_id)
        elif isinstance(message, Accepts):
            for msg_id, _ in message.items:
                self._accepted(msg_id)
        elif isinstance(message, Delivered):
            self._delivered(message.msg_id, message.to)
        elif isinstance(message, Delivereds):
            for msg_id in message.msg_ids:
                self._delivered(msg_id, message.to)
        elif isinstance(message, Fail):
            out = self.outbox.pop(message.msg_id, None)
            self.store.set_state(message.msg_id, MessageState.FAILED)
            if out is not None:
                self._emit(StatusChanged(out.msg_id.label(), MessageState.FAILED, out.to,
                                         out.text, message.reason.label))  # fmt: skip
                self._emit(ErrorEvent(message.reason.label, message.message))
        elif isinstance(message, Presence):
            user_key = name_key(message.user)
            if self.presence.get(user_key) != message.online:  # report changes only
                self.presence[user_key] = message.online
                self._emit(PresenceChanged(message.user, message.online))
        elif isinstance(message, WhoReply):
            self.who_pages.extend(message.users)
            if message.next_after:
                self._send_message(Who(message.next_after))
            else:
                self._emit(WhoList(tuple(self.who_pages)))
                self.who_pages = []
        elif isinstance(message, Notice):
            self._emit(ErrorEvent(message.code.label, message.message))
        elif isinstance(message, Typing):
            self._emit(TypingNotice(message.user))
        elif isinstance(message, Ticket):
            self.ticket = message.ticket
            self.store.keep_ticket(message.ticket)
        elif isinstance(message, Bye):
            if message.code == ErrorCode.SERVER_SHUTDOWN:
                self._emit(ErrorEvent(message.code.label, message.message))
                if self.link_up:
                    self._emit(LinkChanged(up=False))
                self._link_lost(now, notify=False)
                self._login_at = now + SHUTDOWN_WAIT  # give the next server a moment to start
            else:
                self.conn = None
                self._fatal(message.code, message.message)

    # --- logout -----------------------------------------------------------------

    def _run_closing(self, now: float) -> None:
        if self._closing_deadline is None or self.ended:
            return
        waiting = any(out.state == MessageState.SENDING for out in self.outbox.values())
        if self.conn is None:
            # Not logged in: a login would only be for what is left to send
            # (or to receipt); with nothing, waiting for one only delays the end.
            if now >= self._closing_deadline or not (waiting or self.receipts):
                self._warn_unsent()
                self._finish(ErrorCode.LOGGED_OUT)
            return
        if self._logout_sent_at is None and (not waiting or now >= self._closing_deadline):
            if self.awaiting and self._closing_shown_wait:
                # The receipts of what the front end is showing now should
                # leave before the LOGOUT; not for long (see SHOWN_WAIT).
                if self._shown_deadline is None:
                    self._shown_deadline = min(now + SHOWN_WAIT, self._closing_deadline)
                if now < self._shown_deadline:
                    return
            self._warn_unsent()
            self._queue_receipts()  # before the LOGOUT, which ends the session
            self._send_message(Logout(), handle="logout")
            self._logout_sent_at = now
            self._closing_deadline = now + LOGOUT_ACK_WAIT
        elif self._logout_sent_at is not None and now >= self._closing_deadline:
            self._finish(ErrorCode.LOGGED_OUT)

    def _warn_unsent(self) -> None:
        """Logging out with messages the server has not accepted: say so."""
        unsent = sum(out.state == MessageState.SENDING for out in self.outbox.values())
        if unsent:
            kept = "kept in the outbox for the next login" if self.store.directory else "not sent"
            text = f"{unsent} message(s) not accepted by the server yet: {kept}"
            self._emit(ErrorEvent(ErrorCode.SERVER_UNREACHABLE.label, text))

    def _finish(self, reason: ErrorCode) -> None:
        self._final_flush = self.conn is not None  # the ack for anything the server sent last
        self._emit(Disconnected(reason.label))
        self.ended = True
