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
import itertools
import logging
import random
import re
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import protocol
from common import format_address, size_text
from protocol import (
    ACCOUNT_CHANGE,
    ACCOUNT_DELETE,
    ALREADY_MEMBERS,
    CONTROL_STREAM,
    FLAG_MAC,
    HELLO_SIZE,
    MIN_PREAUTH_REQUEST,
    NO_SESSION,
    PBKDF2_MIN_ITERATIONS,
    SALT_SIZE,
    Accept,
    Accepts,
    AccountResult,
    Bye,
    Challenge,
    ChangePassword,
    DeleteAccount,
    Deliver,
    Delivered,
    Delivereds,
    ErrorCode,
    Fail,
    Frame,
    GroupAccept,
    GroupAction,
    GroupBatch,
    GroupChange,
    GroupDeliver,
    GroupEvent,
    GroupInfo,
    GroupList,
    GroupReached,
    GroupRequest,
    GroupResult,
    Hello,
    Kind,
    LocalProtocolError,
    Login,
    Logout,
    Message,
    MsgId,
    Notice,
    Packet,
    Ping,
    Presence,
    ProtocolError,
    Receipt,
    Receipts,
    Refused,
    ScramKeys,
    Send,
    Stream,
    Ticket,
    TicketFrame,
    Typing,
    UnknownSession,
    Watch,
    Welcome,
    Who,
    WhoReply,
    account_message,
    account_wrap,
    batches,
    check_text,
    client_proof,
    conversation_stream,
    decode_header,
    decode_message,
    decode_packet,
    encode_message,
    encode_packet,
    group_address,
    is_group_address,
    name_key,
    normalize_name,
    quote_name,
    scram_keys,
    server_signature,
    session_keys,
)
from reliability import (
    GROUP_ENTRIES_LATE,
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
# With a list of servers (a cluster), one ping this long after the last
# message the server handed us: a receiver whose node died in the middle of
# a conversation learns it then (the ping meets the closed port), not at the
# next keepalive. Once per lull, so it adds at most one datagram per burst.
TRAFFIC_PROBE = 2.0
# With a list of servers an idle client must also notice a dead node within
# 5 s (issue 15; docs/CLUSTER.md "How long a move takes"), which the 15-18 s
# keepalive cannot do. So with a list it pings every 2-2.5 s; a ping with no
# answer is followed by another every 0.5 s (a ping is never retransmitted,
# so a lost one must not count as a dead node), and 4.5 s of silence ends
# the link: four to five unanswered pings, never a single loss. A node whose
# process died refuses the first ping (ICMP port unreachable: gone at once,
# within 2.5 s); one whose host is gone is left after 4.5 s. The price is
# the node's: 0.44 pings a second per idle client instead of 0.06, about
# 44,000 pings (and as many acks) a second for 100,000 idle users, 1.5
# cores at the measured 33 us each, where the 15-18 s keepalive costs 6,100
# and 0.2 core (docs/CLUSTER.md, "The client"). A single server keeps the
# 15-18 s keepalive: there is nowhere else to go.
LIST_KEEPALIVE = 2.0
LIST_KEEPALIVE_JITTER = 0.5
LIST_PING_RETRY = 0.5
LIST_LINK_TIMEOUT = 4.5
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
# A receipt of group entries waits this long after the datagram that brought
# the first of them (issue 14): a group receipt covers every entry of its
# group handed before it, so one receipt for a burst tells the server as much
# as one per entry, and each one it is spared saves it a datagram in, its ack
# out and a cursor move, for every member. Shorter than the connection's
# delayed ack (reliability.MAX_ACK_DELAY, 25 ms), so the receipt leaves first
# and carries that ack instead of following it in a second datagram. The
# sender's "delivered" comes up to this much later; a direct message's
# receipt never waits (the server holds a commit up to 2 ms for it).
GROUP_RECEIPT_DELAY = 0.020
# At a steady rate a member's receipt need not leave at GROUP_RECEIPT_DELAY
# (issue 14): the server sends group entries with `lazy_ack` (chat_server
# `_send_group`), so the member may hold its ack of a datagram of group
# entries alone up to reliability.GROUP_ACK_DELAY (`group_entries_only`,
# GROUP_ENTRIES_LATE), and holds the receipts up to this long after the
# first of them, or until that ack leaves (the third such datagram has it
# sent: GROUP_ACK_EVERY), when they ride on it. At 10 msg/s the ack and
# receipts of three copies leave in one datagram: about 1.36 datagrams a
# copy (120 ms and two copies before, 1.53; 2 before that). Under
# GROUP_ACK_DELAY, so the receipts leave first and carry the ack. A
# flat-out group is not held up: receipts leave with an ack once the oldest
# has waited GROUP_RECEIPT_DELAY (as often as before), and at once when
# GROUP_RECEIPT_BATCH are held. The sender's "delivered" comes up to this
# much later at a steady rate (docs/RELIABILITY.md, "Group entry ack delay").
GROUP_RECEIPT_HOLD = 0.220
# A quarter of the server's window of group entries per session
# (chat_server.MAILBOX_WINDOW, 256): receipts this many leave at once, so a
# member never holds back what the server needs to hand it more.
GROUP_RECEIPT_BATCH = 64

_GROUP_ENTRY_KINDS = frozenset(
    int(k) for k in (Kind.GROUP_DELIVER, Kind.GROUP_EVENT, Kind.GROUP_BATCH)
)


def group_entries_only(frames: tuple[Frame, ...]) -> bool:
    """Whether a datagram's chunks are all group entries, whole
    (GROUP_DELIVER, GROUP_EVENT or GROUP_BATCH, one chunk each), with no
    keepalive: what the server sends with `lazy_ack` (chat_server
    `_send_group`), whose ack may wait up to reliability.GROUP_ACK_DELAY
    for the receipts to carry it (GROUP_RECEIPT_HOLD). Anything else in it
    (a direct DELIVER, an answer) keeps the prompt ack."""
    found = False
    for f in frames:
        if isinstance(f, Stream):
            if f.count != 1 or not f.data or f.data[0] not in _GROUP_ENTRY_KINDS:
                return False
            found = True
        elif isinstance(f, Ping):
            return False
    return found


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
# (NAME_QUARANTINED comes only to a registration: a first login, which any
# refusal ends.)


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


def group_place_json(out: dict[str, Any], seq: int) -> dict[str, Any]:
    """A group event's place in the group's order, for a script (`--json`):
    its `seq`. A name's seqs only grow, across groups of the name too (one
    made again after the last ended goes on from it), so `seq` alone
    orders everything of a name."""
    if seq > 0:
        out["seq"] = seq
    return out


@dataclass(frozen=True)
class MessageReceived:
    sender: str
    text: str
    id: int  # the server's number for it in our mailbox
    sent_ms: int  # when the server accepted it (wall clock, ms)
    msg_id: str = ""  # the sender's message id, `instance-seq`
    group: str | None = None  # a group message: the group's name (no '#')
    seq: int = 0  # a group message: its place in the group's sequence
    life: int = 0  # a group message: which group of the name (`client_store.group_place`)

    @property
    def conversation(self) -> str:
        """Where it belongs and a reply goes: the sender, or `#group`."""
        return self.sender if self.group is None else group_address(self.group)

    def to_json(self) -> dict[str, Any]:
        if self.group is not None:
            out = {"event": "message", "from": self.sender, "group": self.group,
                   "text": self.text, "id": self.id, "sent_ms": self.sent_ms}  # fmt: skip
            return group_place_json(out, self.seq)
        return {"event": "message", "from": self.sender, "text": self.text, "id": self.id,
                "sent_ms": self.sent_ms}  # fmt: skip


@dataclass(frozen=True)
class StatusChanged:
    """A state of a message we sent: sending, accepted, delivered or failed.

    A group message (`to` is `#team`) is `delivered` once per member, each
    naming that member (`by`); its `accepted` says how many members other
    than us it went to (`recipients`: the N of "delivered 2 of N")."""

    id: str  # the message id, `instance-seq`
    state: MessageState
    to: str
    text: str
    reason: str | None = None
    by: str | None = None  # a group message's `delivered`: the member who has it
    recipients: int | None = None  # a group message's `accepted`: members it went to
    seq: int = 0  # a group message's `accepted`: its place in the group's sequence
    life: int = 0  # a group message's `accepted`: which group of the name it went to
    # A `failed` the server decided: its words (the `error` event that follows
    # carries them too; not in this event's JSON). "" for the client's own.
    detail: str = ""

    @property
    def group(self) -> str | None:
        """The group's name (no '#') for a group message, else None."""
        return self.to[1:] if is_group_address(self.to) else None

    @property
    def backlog(self) -> BacklogFull | None:
        """A group message refused `mailbox_full`: who holds the group back."""
        if self.reason != ErrorCode.MAILBOX_FULL.label:
            return None
        return BacklogFull.parse(self.detail)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": "status", "id": self.id, "state": str(self.state)}
        if self.state == MessageState.SENDING:
            out["to"] = self.to
            out["text"] = self.text
        if self.reason is not None:
            out["reason"] = self.reason
        if (group := self.group) is not None:
            out["group"] = group
            if self.by is not None:
                out["by"] = self.by
            if self.recipients is not None:
                out["recipients"] = self.recipients
            if self.state == MessageState.ACCEPTED:
                group_place_json(out, self.seq)
        return out


#: The server's words for a group message refused `mailbox_full`
#: (`server_groups.backlog_full_text`). A name has no space, colon or
#: apostrophe (`protocol.normalize_name`), so the holder is read back exactly.
#: The size is as a person reads it (`common.size_text`); a server before
#: session 8 said it in bytes (`10485758 bytes`), read the same.
_BACKLOG_FULL = re.compile(
    r"#(?P<group>[^\s:]+): (?P<holder>[^\s:']+)'s backlog is full "
    r"\((?P<entries>\d+) entries, (?P<size>\d+ bytes|\d+ KiB|\d+\.\d MiB) "
    r"wait for (?P=holder)\)"
)


@dataclass(frozen=True)
class BacklogFull:
    """Why a group message was refused `mailbox_full`: what waits in the
    group for `holder`, its member furthest behind, is at the mailbox
    limits, and nothing more goes in until that member reads, leaves or is
    removed. The wire carries the reason's code and the server's text
    only, so the front ends read the member's name from the text (the
    person needs the name to know whom to ask, or whom to remove)."""

    group: str  # no '#'
    holder: str
    entries: int  # what waits for the holder
    size: str  # its size as the server said it, for people (`10.0 MiB`)

    @classmethod
    def parse(cls, text: str) -> BacklogFull | None:
        """The reason in the server's words, or None for any other text
        (a direct recipient's mailbox, a server that named nobody)."""
        found = _BACKLOG_FULL.search(text)
        if found is None:
            return None
        size = found["size"]
        if size.endswith(" bytes"):  # an older server's count: said as the newer say it
            size = size_text(int(size.removesuffix(" bytes")))
        return cls(found["group"], found["holder"], int(found["entries"]), size)

    @property
    def short(self) -> str:
        """The reason in a few words, for the failed message's line."""
        return f"{self.holder}'s backlog is full"

    @property
    def explained(self) -> str:
        """The reason with what frees the group, for a hover or a terminal."""
        who = self.holder
        return (f"{self.entries:,} messages ({self.size}) wait for {who}, the "
                f"member furthest behind; it empties as {who} reads, leaves or is removed by "
                "the owner")  # fmt: skip


@dataclass(frozen=True)
class RecipientsChanged:
    """Member `gone` of the group will never have our message `id`: their
    account was deleted first. The message now goes to `recipients`
    members (its "of N"); delivered to all of them, nothing more is due."""

    id: str
    to: str
    recipients: int
    gone: str
    text: str = ""  # the message's, to name it for a person ("" if not known here)

    def to_json(self) -> dict[str, Any]:
        return {"event": "recipients", "id": self.id, "group": self.to[1:],
                "recipients": self.recipients, "gone": self.gone}  # fmt: skip


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
    # A refused group request: its group (no '#') and action, so a front end
    # can say it where it belongs (not in the JSON: `message` names the group).
    group: str | None = None
    action: GroupAction | None = None

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


@dataclass(frozen=True)
class Cancelled:
    """`cancel(to)`: the messages to `to` it ended (each also `failed` with
    reason `cancelled`; `ids` may be empty), and those the server had
    accepted before the cancel reached it (`accepted`: they go on and are
    delivered; reported `accepted` as usual)."""

    to: str
    ids: tuple[str, ...]
    accepted: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": "cancelled", "to": self.to, "ids": list(self.ids)}
        if self.accepted:
            out["accepted"] = list(self.accepted)
        return out


@dataclass(frozen=True)
class PasswordChanged:
    """The server stored the new password; this session goes on, others ended."""

    user: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "password_changed", "user": self.user}


@dataclass(frozen=True)
class AccountDeleted:
    """The server erased the account; `Disconnected('account_deleted')` follows."""

    user: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "account_deleted", "user": self.user}


@dataclass(frozen=True)
class GroupChanged:
    """A membership change of a group we are (or were, until this change)
    in, in the group's one order. Committed and shown like a received
    message: the front end calls `shown(id)`, and only then is it receipted."""

    group: str  # the group's name, no '#'
    change: str  # a `GroupChange` label: created, added, removed, left, owner
    by: str  # who made the change (for `owner`: who left)
    users: tuple[str, ...]  # created: the members; added/removed: who; owner: the new owner
    id: int  # the server's number for it, like a message's
    sent_ms: int
    seq: int = 0  # its place in the group's sequence
    life: int = 0  # which group of the name (`client_store.group_place`)

    @property
    def conversation(self) -> str:
        return group_address(self.group)

    @property
    def user(self) -> str:
        """Whom it is about: the one added, removed, who left, the new owner."""
        return self.users[0] if self.users else self.by

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": "group", "group": self.group, "change": self.change,
                               "by": self.by}  # fmt: skip
        if self.change == GroupChange.CREATED.label:
            out["members"] = list(self.users)
        else:
            out["user"] = self.user
            if len(self.users) > 1:
                out["users"] = list(self.users)
        return group_place_json(out, self.seq)

    def describe(self) -> str:
        """The change in words, for a person (terminal line, transcript)."""
        what = {
            "created": f"{self.by} created the group with {', '.join(self.users)}",
            "added": f"{self.by} added {', '.join(self.users)}",
            "removed": f"{self.by} removed {', '.join(self.users)}",
            "left": f"{self.user} left",
            "owner": f"{self.user} is the owner now",
        }
        return what.get(self.change, f"{self.by}: {self.change} {', '.join(self.users)}")


@dataclass(frozen=True)
class MembersListed:
    """The answer to `/members #team`: the owner and the members in joining order."""

    group: str
    owner: str
    members: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"event": "members", "group": self.group, "owner": self.owner,
                "members": list(self.members)}  # fmt: skip


@dataclass(frozen=True)
class GroupUnchanged:
    """The answer to a request that changed nothing (`/add #team carol`
    when carol is a member already): no `GroupChanged` follows, so a script
    waiting for an answer to each request gets this one."""

    group: str
    users: tuple[str, ...]
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "unchanged", "group": self.group, "users": list(self.users),
                "message": self.message}  # fmt: skip


@dataclass(frozen=True)
class GroupsListed:
    """The answer to `/groups`: the groups we are in."""

    groups: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"event": "groups", "groups": list(self.groups)}


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
    | Cancelled
    | PasswordChanged
    | AccountDeleted
    | GroupChanged
    | MembersListed
    | GroupsListed
    | GroupUnchanged
    | RecipientsChanged
)


#: What the server sends about groups (`ClientCore._on_group_message`).
GroupMessage = (
    GroupDeliver | GroupEvent | GroupBatch | GroupAccept | GroupReached | GroupResult | GroupInfo
    | GroupList
)  # fmt: skip
GROUP_MESSAGES = (
    GroupDeliver, GroupEvent, GroupBatch, GroupAccept, GroupReached, GroupResult, GroupInfo,
    GroupList,
)  # fmt: skip


class GroupReceipts:
    """Receipts of group entries shown, held up to GROUP_RECEIPT_HOLD after
    the first of them (`due`), or until an ack leaves with which they may
    go (`ready`), then sent together. The load generator's members hold
    theirs by the same rule (bench/fanout.py)."""

    __slots__ = ("ids", "due", "first")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.due: float | None = None  # when the oldest held must leave
        self.first = 0.0  # when the oldest held arrived

    def add(self, server_msg_id: int, arrived: float) -> None:
        """Hold the receipt of an entry that came in a datagram at `arrived`."""
        self.ids.append(server_msg_id)
        if self.due is None:
            self.first = arrived
            self.due = arrived + GROUP_RECEIPT_HOLD

    def ready(self, now: float, ack_due: float | None) -> bool:
        """Whether what is held leaves now: it is due, or GROUP_RECEIPT_BATCH
        are held, or the connection's ack (`ack_due`) leaves now and the
        oldest has waited GROUP_RECEIPT_DELAY (the receipts ride on it)."""
        due = self.due
        return due is not None and (
            now >= due
            or len(self.ids) >= GROUP_RECEIPT_BATCH
            or (ack_due is not None and ack_due <= now and now >= self.first + GROUP_RECEIPT_DELAY)
        )

    def take(self) -> list[int]:
        """Everything held, which is no longer held."""
        ids, self.ids, self.due = self.ids, [], None
        return ids


# --- the store --------------------------------------------------------------

#: What `add_incoming` found: a new message (show it), one stored but not
#: shown yet (it is on its way to the screen), or one already shown.
Arrival = Literal["new", "unshown", "shown"]


@dataclass(frozen=True)
class StoredMessage:
    """A received message committed to the history but not shown yet: a
    direct one, a group message (`group`), or a group's membership change
    (`change`, with `sender` the one who made it)."""

    sender: str
    msg_id: MsgId
    text: str
    sent_ms: int
    server_msg_id: int
    group: str | None = None
    group_seq: int = 0
    change: str | None = None  # a membership change: its `GroupChange` label
    users: tuple[str, ...] = ()
    life: int = 0  # a group's: which group of the name (`client_store.group_place`)


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

    def set_failure(self, msg_id: MsgId, reason: str, detail: str) -> None:
        """Why one of our messages failed (its reason's code, and the
        server's words for a refusal): for its line after a restart."""
        ...

    def add_incoming(
        self, sender: str, msg_id: MsgId, text: str, sent_ms: int, server_msg_id: int
    ) -> Arrival: ...

    def mark_shown(self, server_msg_id: int) -> bool: ...

    def unshown(self) -> list[StoredMessage]: ...

    def pending(self) -> list[tuple[MsgId, str, str]]: ...

    def set_waiting(self, msg_id: MsgId, waiting: bool) -> None:
        """Record whether an outbox message waits for its recipient's account."""
        ...

    def waiting(self) -> set[MsgId]:
        """The outbox messages that wait for their recipient's account."""
        ...

    def server_key(self) -> bytes | None: ...

    def pin_server_key(self, dh_public: bytes) -> None: ...

    def ticket(self) -> bytes | None:
        """The server's login ticket for this instance, if it gave one."""
        ...

    def keep_ticket(self, ticket: bytes) -> None: ...

    # Groups: a group's messages and membership changes are kept like
    # received messages (shown once, receipted after), in the group's order.
    # A group that ended and was made again under its name is another life
    # of it (numbered from 1 again): `last_life` is the life the entry
    # stored last, or our message accepted last, went in (0 without a
    # history to tell them apart).

    last_life: int

    def add_group_message(
        self, group: str, sender: str, msg_id: MsgId, text: str, sent_ms: int,
        server_msg_id: int, group_seq: int,
    ) -> Arrival: ...  # fmt: skip

    def add_group_event(
        self, group: str, change: str, by: str, users: tuple[str, ...], sent_ms: int,
        server_msg_id: int, group_seq: int,
    ) -> Arrival: ...  # fmt: skip

    def set_recipients(self, msg_id: MsgId, recipients: int, group_seq: int) -> None:
        """One of our group messages was accepted for `recipients` members."""
        ...

    def add_group_receipt(self, msg_id: MsgId, by: str) -> bool:
        """Member `by` has our group message; False if that was known already."""
        ...

    def count_out(self, msg_id: MsgId, by: str) -> int | None:
        """Member `by` never will have our group message: one recipient
        fewer; its recipients now, or None if known already (or they had it)."""
        ...

    def take_request_id(self) -> int:
        """A group request id never used by this instance, even before a restart."""
        ...


class MemoryStore:
    """A `CoreStore` in memory: for a client without a disk, and for tests.
    What it holds ends with the process (`directory` is None)."""

    directory: Path | None = None

    def __init__(self, instance_id: int | None = None) -> None:
        self.instance_id = instance_id if instance_id is not None else secrets.randbits(64)
        self.next_seq = 1
        self._outbox: dict[MsgId, tuple[str, str]] = {}  # in the order written
        self._waiting: set[MsgId] = set()
        self._states: dict[MsgId, str] = {}
        # (sender key, msg id) -> [the message, shown?]
        self._incoming: dict[tuple[str, MsgId], tuple[StoredMessage, bool]] = {}
        self._by_server_id: dict[int, tuple[str, MsgId]] = {}
        self._server_key: bytes | None = None
        self._ticket: bytes | None = None
        self._group_receipts: set[tuple[MsgId, str]] = set()  # (msg id, member key)
        self.recipients: dict[MsgId, int] = {}
        self._next_request = 1
        self.resends: dict[MsgId, int] = {}
        self.last_life = 0  # (no history: every group's entries one life)

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

    def set_failure(self, msg_id: MsgId, reason: str, detail: str) -> None:
        pass  # nothing outlives the process here: the event said it

    def set_state(self, msg_id: MsgId, state: str) -> None:
        if msg_id in self._states:
            self._states[msg_id] = state
        if state != MessageState.SENDING:
            self._outbox.pop(msg_id, None)
            self._waiting.discard(msg_id)

    def set_waiting(self, msg_id: MsgId, waiting: bool) -> None:
        if waiting and msg_id in self._outbox:
            self._waiting.add(msg_id)
        else:
            self._waiting.discard(msg_id)

    def waiting(self) -> set[MsgId]:
        return set(self._waiting)

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

    def _add(self, key: tuple[str, MsgId], message: StoredMessage) -> Arrival:
        known = self._incoming.get(key)
        if known is not None:
            return "shown" if known[1] else "unshown"
        self._incoming[key] = (message, False)
        self._by_server_id[message.server_msg_id] = key
        return "new"

    def add_group_message(
        self, group: str, sender: str, msg_id: MsgId, text: str, sent_ms: int,
        server_msg_id: int, group_seq: int,
    ) -> Arrival:  # fmt: skip
        stored = StoredMessage(sender, msg_id, text, sent_ms, server_msg_id, group, group_seq)
        return self._add((name_key(sender), msg_id), stored)

    def add_group_event(
        self, group: str, change: str, by: str, users: tuple[str, ...], sent_ms: int,
        server_msg_id: int, group_seq: int,
    ) -> Arrival:  # fmt: skip
        # A change has no message id: the server's number names it.
        msg_id = MsgId(0, server_msg_id)
        stored = StoredMessage(by, msg_id, "", sent_ms, server_msg_id, group, group_seq,
                               change, users)  # fmt: skip
        return self._add((group_address(name_key(group)), msg_id), stored)

    def set_recipients(self, msg_id: MsgId, recipients: int, group_seq: int) -> None:
        self.recipients[msg_id] = recipients

    def add_group_receipt(self, msg_id: MsgId, by: str) -> bool:
        key = (msg_id, name_key(by))
        if key in self._group_receipts:
            return False
        self._group_receipts.add(key)
        return True

    def count_out(self, msg_id: MsgId, by: str) -> int | None:
        key = (msg_id, name_key(by))
        gone = (msg_id, "!" + name_key(by))
        if key in self._group_receipts or gone in self._group_receipts:
            return None
        self._group_receipts.add(gone)
        recipients = max(0, self.recipients.get(msg_id, 1) - 1)
        self.recipients[msg_id] = recipients
        return recipients

    def take_request_id(self) -> int:
        request_id = self._next_request
        self._next_request += 1
        return request_id


# --- the core -----------------------------------------------------------------


class _Outgoing:
    __slots__ = (
        "msg_id", "to", "text", "state", "waiting", "order", "recipients", "delivered",
        "transmitted", "cancelling",
    )  # fmt: skip

    def __init__(self, msg_id: MsgId, to: str, text: str, order: int = 0) -> None:
        self.msg_id = msg_id
        self.to = to
        self.text = text
        self.state = MessageState.SENDING
        # The server has no account of that name yet: kept, `sending`, and
        # sent again once a PRESENCE says the name exists (see `_on_message`).
        self.waiting = False
        self.order = order  # among what is resent after a login (with group requests)
        self.recipients: int | None = None  # a group message: members it went to
        self.delivered = 0  # a group message: members who have it
        self.transmitted = False  # given to a connection: after a re-login it is a resend
        # `cancel` was asked while it was in flight: the server's answer
        # decides (refused for want of an account: ended; accepted: too late).
        self.cancelling = False


@dataclass
class _CancelAnswer:
    """A `cancel(to)` waiting for the server's answer to the messages that
    were in flight when it was asked (`pending`); `Cancelled` once it has
    them all."""

    to: str
    ended: list[str]
    accepted: list[str]
    pending: set[MsgId]

    def event(self) -> Cancelled:
        return Cancelled(self.to, tuple(self.ended), tuple(self.accepted))


def normalize_peer(name: str) -> str:
    """The display form of a peer: a user's name, or a group's as `#team`
    (`LocalProtocolError` with the reason if it is neither)."""
    name = name.strip()
    if is_group_address(name):
        return group_address(normalize_name(name[1:]))
    return normalize_name(name)


def check_group_name(group: str) -> str:
    """A group's name without the '#' (typed with or without it), or
    `ClientError(INVALID_NAME)`."""
    bare = group.strip()
    bare = bare[1:] if is_group_address(bare) else bare
    try:
        return normalize_name(bare)
    except LocalProtocolError as exc:
        raise ClientError(ErrorCode.INVALID_NAME, f"no group can be called {quote_name(group)}: "
                          f"{exc}; a group is named like #team") from None  # fmt: skip


def check_group_request(
    action: GroupAction, group: str = "", users: tuple[str, ...] | list[str] = ()
) -> tuple[str, tuple[str, ...]]:
    """The group's name (no '#') and the users' display names for a group
    request, or `ClientError` saying what is wrong with them."""
    if action == GroupAction.LIST:
        return "", ()
    name = check_group_name(group)
    shown: list[str] = []
    for user in users:
        try:
            shown.append(normalize_name(user))
        except LocalProtocolError as exc:
            raise ClientError(
                ErrorCode.INVALID_NAME, f"{quote_name(user)} is no user name: {exc}"
            ) from None
    if action in (GroupAction.ADD, GroupAction.REMOVE) and not shown:
        verb = "add" if action == GroupAction.ADD else "remove"
        raise ClientError(ErrorCode.INVALID_NAME,
                          f"name whom to {verb}: /{verb} #{name} NAME")  # fmt: skip
    return name, tuple(shown)


def check_outgoing(text: str, to: str) -> str:
    """The recipient's display name (`#team` for a group), or `ClientError`
    saying why `text` cannot go to `to` (the name and the text are checked
    apart, so each gets its own code)."""
    try:
        target = normalize_peer(to)
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
        probe_after: float | None = None,
        rto_min: float = RTO_MIN,
        rto_max: float = RTO_MAX,
        login_timeout: float = LOGIN_TIMEOUT,
        keepalive: float = KEEPALIVE,
        keepalive_jitter: float = KEEPALIVE_JITTER,
        ping_retry: float | None = None,
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
        # A ping this long after the last message received (`TRAFFIC_PROBE`);
        # None: only the keepalives.
        self.probe_after = probe_after
        self._probe_at: float | None = None
        self.rto_min = rto_min
        self.rto_max = rto_max
        self.login_timeout = login_timeout
        self.keepalive = keepalive
        self.keepalive_jitter = keepalive_jitter
        # A ping unanswered this long is followed by another (`LIST_PING_RETRY`);
        # None: the next is the next keepalive.
        self.ping_retry = ping_retry
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
        # Group entries: handed on, not shown yet (server ids), and the
        # receipts of those shown, which wait a little (`GroupReceipts.ready`).
        self._group_unshown: set[int] = set()
        self.group_receipts = GroupReceipts()
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
        # Name keys whose waiting messages were reported (`no_such_user`,
        # once per name until one of them goes).
        self._reported_waiting: set[str] = set()
        self._cancels: list[_CancelAnswer] = []  # asked, not answered yet (in order)
        # The account request under way: (nonce, action, new password and
        # its salted form and salt, for a change), answered by ACCOUNT_RESULT.
        self._account_request: tuple[bytes, bytes, str, bytes, bytes] | None = None
        # Those asked for meanwhile: (action, password, new password).
        self._account_queue: deque[tuple[bytes, str, str]] = deque()
        # A new password the server may have stored though its answer was
        # lost with the link: tried once if the old one is refused.
        self._maybe_password: tuple[str, bytes, bytes] | None = None
        self._tried_maybe = False  # logging in with it
        self._account_params: tuple[bytes, int] | None = None  # salt, iterations (last login)
        # Group requests not answered yet, by request id: (order, request),
        # sent again after each login until answered.
        self.group_requests: dict[int, tuple[int, GroupRequest]] = {}
        self._member_pages: dict[int, list[str]] = {}  # MEMBERS answers in pages
        self._group_pages: dict[int, list[str]] = {}  # LIST answers in pages
        self.presence: dict[str, bool] = {}  # last reported, by name key
        self.watched: set[str] = set()  # presence wanted; asked again after each login
        # What an earlier run sent and the server never accepted goes out
        # again, with its original ids, after login.
        waiting = self.store.waiting()
        self._order = itertools.count()  # of outbox entries and group requests
        for msg_id, to, text in self.store.pending():
            out = self.outbox[msg_id] = _Outgoing(msg_id, to, text, next(self._order))
            if msg_id in waiting:
                # No account then: cancellable before the login; sent again
                # at the login all the same (the name may have one now).
                out.waiting = True
                self.watched.add(to)
                self._reported_waiting.add(name_key(to))
        # online state
        self._last_heard = 0.0
        self._next_ping = 0.0
        self._pinged_at = float("-inf")  # the last keepalive or probe
        # logout state
        self._closing_deadline: float | None = None
        self._closing_shown_wait = True
        self._shown_deadline: float | None = None
        self._logout_sent_at: float | None = None
        self._final_flush = False  # the ack for what the server sent last, then stop
        # A server may hold a session of ours: from each WELCOME until the
        # server lets it go (our LOGOUT acked, its BYE, or it says it has
        # none). A logout that ends while this holds reached no server.
        self._session_open = False
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
        self._queue_receipts(now)
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
            deadlines.append(self._ping_due())
            deadlines.append(self._last_heard + self.link_timeout)
            if self._probe_at is not None:
                deadlines.append(self._probe_at)
            if self.group_receipts.due is not None:
                deadlines.append(self.group_receipts.due)
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
            probe = self._probe_at is not None and now >= self._probe_at
            if self.conn is not None and (now >= self._ping_due() or probe):
                self._probe_at = None
                self.conn.send_ping()
                self._pinged_at = now
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
        if isinstance(event, MessageReceived | GroupChanged) and not self.wait_for_shown:
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
            shown = normalize_peer(name)
        except LocalProtocolError as exc:
            raise ClientError(ErrorCode.INVALID_NAME, f"cannot talk to {name!r}: {exc}") from None
        self._peer = shown
        if not is_group_address(shown):  # a group has members, not a presence
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
        out = self.outbox[msg_id] = _Outgoing(msg_id, to, text, next(self._order))
        self.store.add_outgoing(msg_id, to, text)
        self._staged.append(StatusChanged(msg_id.label(), MessageState.SENDING, out.to, out.text))
        if self._waiting_for(to):
            out.waiting = True  # behind the others to that name, in order
            self.store.set_waiting(msg_id, True)
        elif self.conn is not None:
            # The id as handle: the connection names it when it resends a piece.
            self.conn.send(payload, conversation_stream(to), msg_id)
            out.transmitted = True

    def _waiting_for(self, to: str) -> bool:
        key = name_key(to)
        return any(out.waiting and name_key(out.to) == key for out in self.outbox.values())

    def cancel(self, to: str) -> list[str]:
        """End every message to `to` the server has not accepted: those
        waiting for its account and those not sent yet at once (each
        `failed` with reason `cancelled`); one in flight when the server
        answers it (refused for want of an account: ended; accepted: too
        late, and `Cancelled.accepted` says so). Then `Cancelled`. The ids
        ended at once (none: nothing was waiting or unsent)."""
        try:
            peer = normalize_peer(to)  # a person, or a group (`#team`)
        except LocalProtocolError as exc:
            raise ClientError(ErrorCode.INVALID_NAME, f"cannot cancel for {to!r}: {exc}") from None
        key = name_key(peer)
        answer = _CancelAnswer(peer, [], [], set())
        for out in list(self.outbox.values()):
            if name_key(out.to) != key or out.state != MessageState.SENDING or out.cancelling:
                continue
            answer.to = out.to
            if out.waiting or not out.transmitted:
                # Refused by the server (it holds none), or never left here.
                self._end_cancelled(out)
                answer.ended.append(out.msg_id.label())
            else:
                # Out of our hands until the server answers. Marked failed in
                # the store now, so no later run sends it again.
                out.cancelling = True
                self.store.set_state(out.msg_id, MessageState.FAILED)
                answer.pending.add(out.msg_id)
        self._reported_waiting.discard(key)
        self._cancels.append(answer)
        self._answer_cancels()
        return list(answer.ended)

    def _end_cancelled(self, out: _Outgoing) -> None:
        del self.outbox[out.msg_id]
        self.store.set_state(out.msg_id, MessageState.FAILED)
        self.store.set_failure(out.msg_id, ErrorCode.CANCELLED.label, "")
        self._staged.append(StatusChanged(out.msg_id.label(), MessageState.FAILED, out.to,
                                          out.text, ErrorCode.CANCELLED.label))  # fmt: skip

    def _cancel_answered(self, out: _Outgoing, *, ended: bool | None) -> None:
        """The server answered a message `cancel` left in flight: ended
        (`_end_cancelled` was called), accepted (False), or refused for
        another reason (None: its own `failed` says so); the cancel's answer
        goes once it has them all."""
        out.cancelling = False
        for answer in self._cancels:
            if out.msg_id in answer.pending:
                answer.pending.discard(out.msg_id)
                if ended is not None:
                    (answer.ended if ended else answer.accepted).append(out.msg_id.label())
                break
        self._answer_cancels()

    def _answer_cancels(self) -> None:
        """`Cancelled` for each cancel whose messages are all answered, in
        the order they were asked (a second `/cancel bob` right after the
        first answers after it, though it found nothing new to end)."""
        while self._cancels and not self._cancels[0].pending:
            self._staged.append(self._cancels.pop(0).event())

    def _settle_cancels(self) -> None:
        """The session ends with cancelled messages unanswered: they are not
        sent again (the store has them failed), so they end here."""
        for out in [out for out in self.outbox.values() if out.cancelling]:
            self._end_cancelled(out)
            self._cancel_answered(out, ended=True)
        self.commit()  # their events before the end's

    def change_password(self, old: str, new: str) -> None:
        """Ask the server to change the password to `new`, proving `old`;
        `PasswordChanged` follows (or an `ErrorEvent`: `bad_password`, ...).
        The password never crosses the wire: a SCRAM proof of `old`, and the
        new verifier wrapped (see protocol.account_message)."""
        if not new:
            raise ClientError(ErrorCode.PASSWORD_REQUIRED, "the new password is empty")
        if self._account_ready((ACCOUNT_CHANGE, old, new)):
            self._request_change(old, new)

    def _request_change(self, old: str, new: str) -> None:
        assert self.conn is not None and self._account_params is not None
        conn = self.conn
        salt, iterations = self._account_params
        nonce = self._token_bytes(16)
        new_salt = self._token_bytes(SALT_SIZE)
        message = account_message(ACCOUNT_CHANGE, self.username, conn.session_id, nonce,
                                  new_salt, iterations)  # fmt: skip
        old_keys = scram_keys(self._salted_for(old, salt, iterations))
        new_salted = self._salted_password(new, new_salt, iterations)
        new_keys = scram_keys(new_salted)
        wrapped = account_wrap(old_keys.client_key, conn.key, message,
                               new_keys.stored_key + new_keys.server_key)  # fmt: skip
        proof = client_proof(old_keys, message)
        self._account_request = (nonce, ACCOUNT_CHANGE, new, new_salted, new_salt)
        self._send_message(ChangePassword(nonce, proof, new_salt, iterations, wrapped))

    def delete_account(self, password: str) -> None:
        """Ask the server to delete this account, proving `password`;
        `AccountDeleted` and `Disconnected('account_deleted')` follow (or an
        `ErrorEvent`: `bad_password`, ...)."""
        if self._account_ready((ACCOUNT_DELETE, password, "")):
            self._request_delete(password)

    def _request_delete(self, password: str) -> None:
        assert self.conn is not None and self._account_params is not None
        conn = self.conn
        salt, iterations = self._account_params
        nonce = self._token_bytes(16)
        message = account_message(ACCOUNT_DELETE, self.username, conn.session_id, nonce)
        proof = client_proof(scram_keys(self._salted_for(password, salt, iterations)), message)
        self._account_request = (nonce, ACCOUNT_DELETE, "", b"", b"")
        self._send_message(DeleteAccount(nonce, proof))

    def _account_ready(self, request: tuple[bytes, str, str]) -> bool:
        """Whether `request` may go now: `ClientError` without a session;
        False (queued) while another is under way (one at a time: each
        answer may change the password the next one proves)."""
        if self.conn is None or self._account_params is None:
            raise ClientError(
                ErrorCode.SERVER_UNREACHABLE,
                "not connected to the server; try again once the link is up",
            )
        if self._account_request is not None:
            self._account_queue.append(request)
            return False
        return True

    def _next_account_request(self) -> None:
        if self._account_queue and self.conn is not None and not self.ended:
            action, first, second = self._account_queue.popleft()
            if action == ACCOUNT_CHANGE:
                self._request_change(first, second)
            else:
                self._request_delete(first)

    def _salted_for(self, password: str, salt: bytes, iterations: int) -> bytes:
        if password == self._password and (salt, iterations) in self._salted:
            return self._salted[(salt, iterations)]  # PBKDF2 done at the login
        return self._salted_password(password, salt, iterations)

    def _on_account_result(self, result: AccountResult) -> None:
        request = self._account_request
        if request is None or request[0] != result.nonce:
            return  # an answer to a request of an earlier session
        self._account_request = None
        _, action, new, new_salted, new_salt = request
        if action == ACCOUNT_CHANGE and result.code == ErrorCode.PASSWORD_CHANGED:
            self._use_password(new, new_salted, new_salt)
            self._emit(PasswordChanged(self.username))
        elif action == ACCOUNT_DELETE and result.code == ErrorCode.ACCOUNT_DELETED:
            self._emit(AccountDeleted(self.username))
            if self.conn is not None:
                self.conn.ack_now()  # the server ends the session once it has the ack
            self._finish(ErrorCode.ACCOUNT_DELETED)
            return
        else:
            self._emit(ErrorEvent(result.code.label, result.message))
        self._next_account_request()

    def _use_password(self, password: str, salted: bytes, salt: bytes) -> None:
        """From now on log in with `password` (reconnects need no PBKDF2)."""
        assert self._account_params is not None
        iterations = self._account_params[1]
        self._password = password
        self._salted = {(salt, iterations): salted}
        self._account_params = (salt, iterations)

    def shown(self, server_msg_id: int) -> None:
        """The front end showed the received message `server_msg_id` (a
        `MessageReceived.id`): record it; its receipt follows the commit."""
        self.awaiting.discard(server_msg_id)
        if self.store.mark_shown(server_msg_id):
            if server_msg_id in self._group_unshown:
                self._group_unshown.discard(server_msg_id)
                # Held from the datagram it came in (the last heard): a
                # front end slow to show it only shortens the wait.
                self.group_receipts.add(server_msg_id, self._last_heard)
            else:
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
        if not is_group_address(to):  # typing notices are between two people
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

    def group_request(
        self, action: GroupAction, group: str = "", users: tuple[str, ...] | list[str] = ()
    ) -> int:
        """Ask the server to create a group (with `users`), add or remove
        `users`, leave it, list its members, or list our groups; returns the
        request id. The answer comes as events: a change as `GroupChanged`
        (to every member, in the group's order), `MembersListed`,
        `GroupsListed`, or an `ErrorEvent` (no_such_group, not_a_member,
        group_exists, group_full, not_owner, no_such_user). Kept and sent
        again after each re-login until answered (the server acts once).
        `ClientError(INVALID_NAME)` for a bad group or user name."""
        name, shown = check_group_request(action, group, users)
        request = GroupRequest(self.store.take_request_id(), int(action), name, shown)
        self.group_requests[request.request_id] = (next(self._order), request)
        stream = CONTROL_STREAM if action == GroupAction.LIST else self._group_stream(name)
        self._send_message(request, stream)
        return request.request_id

    @staticmethod
    def _group_stream(group: str) -> int:
        """One group's traffic keeps one order on the hop: its stream."""
        return conversation_stream(group_address(group))

    # --- helpers ---------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        # Behind anything staged (a group change or message waiting for the
        # commit): events leave in the order they happened, so a `members`
        # answer or an `accepted` never overtakes the `created` before it.
        if self._staged:
            self._staged.append(event)
        else:
            self._events.append(event)

    def _fatal(self, code: ErrorCode, message: str) -> None:
        self._settle_cancels()
        self._emit(ErrorEvent(code.label, message, fatal=True))
        self._emit(Disconnected(code.label))
        self.ended = True

    def _server_text(self, fallback: str) -> str:
        return format_address(*self.server) if self.server is not None else fallback

    def _server_label(self) -> str | None:
        return format_address(*self.server) if self.server is not None else None

    def _send_message(
        self,
        message: Message,
        stream: int = CONTROL_STREAM,
        handle: object = None,
        *,
        lazy_ack: bool = False,
    ) -> None:
        if self.conn is not None:
            self.conn.send(encode_message(message), stream, handle, lazy_ack=lazy_ack)

    # --- datagrams -----------------------------------------------------------

    def _on_datagram(self, data: bytes, now: float) -> None:
        header = decode_header(data)
        if self.conn is not None and header.session_id == self.conn.session_id:
            if header.flags & FLAG_MAC:
                if self.conn.receive_datagram(data, now, group_entries_only, GROUP_ENTRIES_LATE):
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
                self._session_open = False
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
            if frame.code == ErrorCode.BAD_PASSWORD and self._maybe_password is not None:
                # The link went while a new password was on its way: the
                # server may have stored it. Try it once.
                self._use_password(*self._maybe_password)
                self._maybe_password = None
                self._tried_maybe = True
                self._start_login(now, self._login_deadline)
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
        self._session_open = True
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
        if self._maybe_password is not None:
            self._maybe_password = None  # the old password still works: it did not change
        elif self._tried_maybe:
            self._emit(PasswordChanged(self.username))  # it did change, answer lost or not
        self._tried_maybe = False
        self.link_up = True
        for name in sorted(self.watched):
            self._send_message(Watch(name))
        # Resend, in order and with their ids, what the server has not
        # accepted, and the group requests it has not answered (in the order
        # they were made: `/add #team dave` before a message to #team).
        # Those that waited for an account too: the name may have one now
        # (if not, the server says so again within a round trip, and they
        # wait again, unreported: `_reported_waiting`), and a logout waits for
        # that answer as for any message in flight.
        again: list[tuple[int, Message, str]] = []
        for out in [out for out in self.outbox.values() if out.cancelling]:
            # Cancelled while in flight and unanswered on the lost link: not
            # sent again (it must not be delivered after a cancel).
            self._end_cancelled(out)
            self._cancel_answered(out, ended=True)
        for out in self.outbox.values():
            if out.state == MessageState.SENDING:
                out.waiting = False
                if out.transmitted:  # it went to the last session: this is a resend
                    self.store.add_resends(out.msg_id, 1)
                out.transmitted = True
                again.append((out.order, Send(out.msg_id, out.to, out.text), out.to))
        again.extend(self._unanswered_requests())
        for _, resent, peer in sorted(again, key=lambda item: item[0]):
            # A message's id as handle: the connection names it when it
            # resends a piece (the health view's resend count).
            handle = resent.msg_id if isinstance(resent, Send) else None
            self.conn.send(encode_message(resent),
                           conversation_stream(peer) if peer else CONTROL_STREAM,
                           handle)  # fmt: skip

    def _hand_on_unshown(self) -> None:
        """What an earlier run committed but never showed (it died between
        the two): handed on once, before anything new arrives. The server
        delivers these again (they were never receipted); `add_incoming`
        then finds them here, not shown, and leaves them to this."""
        for stored in self.store.unshown():
            self.awaiting.add(stored.server_msg_id)
            if stored.group is not None:
                self._group_unshown.add(stored.server_msg_id)
            if stored.change is not None and stored.group is not None:
                change = GroupChanged(stored.group, stored.change, stored.sender, stored.users,
                                      stored.server_msg_id, stored.sent_ms,
                                      stored.group_seq, stored.life)  # fmt: skip
                self._emit(change)
                continue
            received = MessageReceived(stored.sender, stored.text, stored.server_msg_id,
                                       stored.sent_ms, stored.msg_id.label(), stored.group,
                                       stored.group_seq, stored.life)  # fmt: skip
            self._reply_to = received.conversation
            self._emit(received)

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
        self._account_params = (challenge.salt, challenge.iterations)
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
        self._probe_at = None
        request, self._account_request = self._account_request, None
        if self._account_queue:
            self._account_queue.clear()
            self._emit(ErrorEvent(ErrorCode.SERVER_UNREACHABLE.label, "the link was lost; the "
                                  "changes of the account asked for were not sent"))  # fmt: skip
        if request is not None and request[1] == ACCOUNT_DELETE:
            # Maybe deleted, maybe not: logging in again could register the
            # name anew. The user logs in again to find out.
            self._fatal(ErrorCode.SERVER_UNREACHABLE, "the link was lost while the account was "
                        "being deleted; log in again to see whether it was")  # fmt: skip
            return
        if request is not None:
            self._maybe_password = (request[2], request[3], request[4])
            self._emit(ErrorEvent(ErrorCode.SERVER_UNREACHABLE.label, "the link was lost before "
                                  "the server answered the change of password"))  # fmt: skip
        if self.link_up and notify:
            self._emit(ErrorEvent(ErrorCode.SERVER_UNREACHABLE.label,
                                  "the server stopped answering; reconnecting"))  # fmt: skip
            self._emit(LinkChanged(up=False))
        self.link_up = False
        self._start_login(now, deadline=None)

    # --- online ------------------------------------------------------------------

    def _schedule_ping(self, now: float) -> None:
        self._next_ping = now + self.keepalive + self._rng.uniform(0, self.keepalive_jitter)

    def _ping_due(self) -> float:
        """When the next ping leaves: at the keepalive, or with `ping_retry`
        sooner while the last ping has heard nothing back."""
        if self.ping_retry is not None and self._pinged_at > self._last_heard:
            return min(self._next_ping, self._pinged_at + self.ping_retry)
        return self._next_ping

    def _queue_receipts(self, now: float | None = None) -> None:
        """The receipts for what was shown, batched, once the store has
        committed it (a receipt promises the message is kept and was shown).
        Group entries' receipts wait until they are ready (`GroupReceipts.ready`:
        due, enough of them, or an ack to ride on) unless other receipts leave
        now, or `now` is None (the logout)."""
        if self.conn is None:
            return
        held = self.group_receipts
        if held.due is not None and (
            now is None
            or held.ready(now, self.conn.ack_due)
            or self.receipts
            or self._closing_deadline is not None
        ):
            self.receipts.extend(held.take())
        if not self.receipts:
            return
        self.store.commit()
        receipts, self.receipts = self.receipts, []
        for part in batches(receipts):
            # The server acks a datagram of receipts alone with its next
            # datagram to us, or within reliability.RECEIPT_ACK_DELAY: no
            # ack of its own for each (issue 14; the connection's timers
            # for them wait that much longer, so the wait is not a loss).
            message = Receipt(part[0]) if len(part) == 1 else Receipts(tuple(part))
            self._send_message(message, lazy_ack=True)

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
                if self.probe_after is not None:
                    self._probe_at = now + self.probe_after
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
            if out.cancelling:  # the cancel came too late: it is held for its recipient
                self._cancel_answered(out, ended=False)

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
            if out.cancelling:
                self._cancel_answered(out, ended=False)

    def _on_message(self, message: Message, now: float) -> None:
        if isinstance(message, GROUP_MESSAGES):
            self._on_group_message(message)
        elif isinstance(message, Deliver):
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
        elif isinstance(message, Fail) and message.reason == ErrorCode.NO_SUCH_USER:
            self._no_account_yet(message)
        elif isinstance(message, Fail):
            out = self.outbox.pop(message.msg_id, None)
            self.store.set_state(message.msg_id, MessageState.FAILED)
            self.store.set_failure(message.msg_id, message.reason.label, message.message)
            if out is not None:
                self._emit(StatusChanged(out.msg_id.label(), MessageState.FAILED, out.to,
                                         out.text, message.reason.label,
                                         detail=message.message))  # fmt: skip
                self._emit(ErrorEvent(message.reason.label, message.message))
                if out.cancelling:
                    self._cancel_answered(out, ended=None)
        elif isinstance(message, AccountResult):
            self._on_account_result(message)
        elif isinstance(message, Presence):
            user_key = name_key(message.user)
            self._account_exists(user_key)
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
                self._session_open = False  # the server ended it
                self._emit(ErrorEvent(message.code.label, message.message))
                if self.link_up:
                    self._emit(LinkChanged(up=False))
                self._link_lost(now, notify=False)
                self._login_at = now + SHUTDOWN_WAIT  # give the next server a moment to start
            else:
                self.conn = None
                self._fatal(message.code, message.message)

    def _no_account_yet(self, fail: Fail) -> None:
        """The server has no account of that name: the message waits in the
        outbox (still `sending`), and we watch the name; a PRESENCE comes
        once it is registered (`_account_exists`). Reported once per name."""
        out = self.outbox.get(fail.msg_id)
        if out is None or out.state != MessageState.SENDING:
            return
        if out.cancelling:  # refused: the cancel ends it, it does not wait
            self._end_cancelled(out)
            self._cancel_answered(out, ended=True)
            return
        out.waiting = True
        self.store.set_waiting(out.msg_id, True)
        key = name_key(out.to)
        if out.to not in self.watched:
            self.watch(out.to)
        if key not in self._reported_waiting:
            self._reported_waiting.add(key)
            self._emit(ErrorEvent(ErrorCode.NO_SUCH_USER.label, fail.message))

    def _account_exists(self, key: str) -> None:
        """A PRESENCE names only users with an account: what waited for this
        one goes now, in order, with its ids."""
        for out in self.outbox.values():
            if out.waiting and name_key(out.to) == key:
                out.waiting = False
                self.store.set_waiting(out.msg_id, False)
                self._reported_waiting.discard(key)
                if out.transmitted:  # refused once (no account then): this is a resend
                    self.store.add_resends(out.msg_id, 1)
                # The id as handle, as for any message: its resent pieces are counted.
                self._send_message(Send(out.msg_id, out.to, out.text), conversation_stream(out.to),
                                   out.msg_id)  # fmt: skip
                out.transmitted = self.conn is not None

    # --- groups -----------------------------------------------------------------

    def _unanswered_requests(self) -> list[tuple[int, Message, str]]:
        """The group requests to send again after a login: (order, request,
        the peer whose stream it takes, "" for the control stream)."""
        return [
            (order, request, group_address(request.group) if request.group else "")
            for order, request in self.group_requests.values()
        ]

    def _on_group_message(self, message: GroupMessage) -> None:
        if isinstance(message, GroupBatch):
            # Several entries of one group in one payload: each exactly as
            # if it had come alone, in turn (its receipt by the same rule).
            for part in message.entries:
                self._on_group_message(part)
        elif isinstance(message, GroupDeliver):
            # Like a DELIVER: committed, handed on, shown, then receipted;
            # the hop's group stream keeps the group's order.
            arrival = self.store.add_group_message(
                message.group, message.sender, message.msg_id, message.text, message.sent_ms,
                message.server_msg_id, message.group_seq,
            )  # fmt: skip
            received = MessageReceived(message.sender, message.text, message.server_msg_id,
                                       message.sent_ms, message.msg_id.label(), message.group,
                                       message.group_seq, self.store.last_life)  # fmt: skip
            self._arrived(arrival, received)
        elif isinstance(message, GroupEvent):
            try:
                change = GroupChange(message.change).label
            except ValueError:
                change = str(message.change)  # a newer server's change: shown as a number
            arrival = self.store.add_group_event(
                message.group, change, message.by, message.users, message.sent_ms,
                message.server_msg_id, message.group_seq,
            )  # fmt: skip
            event = GroupChanged(message.group, change, message.by, message.users,
                                 message.server_msg_id, message.sent_ms,
                                 message.group_seq, self.store.last_life)  # fmt: skip
            self._arrived(arrival, event)
        elif isinstance(message, GroupAccept):
            self._group_accepted(message)
        elif isinstance(message, GroupReached):
            for by in message.by:
                self._group_delivered(message.msg_id, message.group, by)
            for gone in message.gone:
                self._group_gone(message.msg_id, message.group, gone)
        elif isinstance(message, GroupResult):
            entry = self.group_requests.pop(message.request_id, None)
            self._member_pages.pop(message.request_id, None)
            self._group_pages.pop(message.request_id, None)
            if entry is None:
                return  # answered before (a re-sent request)
            if message.code == 0:
                if message.message == ALREADY_MEMBERS:  # no event follows: this is the answer
                    request = entry[1]
                    self._emit(GroupUnchanged(request.group, request.users, message.message))
                return  # done: its event follows
            try:
                code = ErrorCode(message.code)
            except ValueError:
                code = ErrorCode.SERVER_ERROR
            request = entry[1]
            text = message.message or f"#{request.group}: {code.label}"
            self._emit(ErrorEvent(code.label, text, group=request.group or None,
                                  action=GroupAction(request.action)))  # fmt: skip
        elif isinstance(message, GroupInfo):
            if message.request_id not in self.group_requests:
                return  # an answer sent again
            pages = self._member_pages.setdefault(message.request_id, [])
            pages.extend(message.members)
            if not message.more:
                del self._member_pages[message.request_id]
                del self.group_requests[message.request_id]
                self._emit(MembersListed(message.group, message.owner, tuple(pages)))
        elif isinstance(message, GroupList):
            if message.request_id not in self.group_requests:
                return
            pages = self._group_pages.setdefault(message.request_id, [])
            pages.extend(message.groups)
            if not message.more:
                del self._group_pages[message.request_id]
                del self.group_requests[message.request_id]
                self._emit(GroupsListed(tuple(pages)))

    def _arrived(self, arrival: Arrival, event: MessageReceived | GroupChanged) -> None:
        """A group message or change was stored: hand it on once (after the
        commit), or receipt again what was shown before."""
        if arrival == "new":
            self.awaiting.add(event.id)
            self._group_unshown.add(event.id)
            if isinstance(event, MessageReceived):
                self._reply_to = event.conversation
            self._staged.append(event)
        elif arrival == "shown":
            self.group_receipts.add(event.id, self._last_heard)  # its receipt was lost: again
        # "unshown": on its way to the screen; the receipt follows `shown`.

    def _group_accepted(self, message: GroupAccept) -> None:
        out = self.outbox.get(message.msg_id)
        if out is None or out.state != MessageState.SENDING:
            return
        out.state = MessageState.ACCEPTED
        out.recipients = message.recipients
        self.store.set_state(message.msg_id, MessageState.ACCEPTED)
        self.store.set_recipients(message.msg_id, message.recipients, message.group_seq)
        self._emit(StatusChanged(out.msg_id.label(), MessageState.ACCEPTED, out.to, out.text,
                                 recipients=message.recipients, seq=message.group_seq,
                                 life=self.store.last_life))  # fmt: skip
        if out.cancelling:  # the cancel came too late: it is stored for every member
            self._cancel_answered(out, ended=False)
        if out.recipients == 0:
            self.outbox.pop(message.msg_id)  # nobody else to deliver it to

    def _group_delivered(self, msg_id: MsgId, group: str, by: str) -> None:
        """Member `by` has our message: one `delivered` per member, once."""
        out = self.outbox.get(msg_id)
        if out is None and self.store.state_of(msg_id) not in (
            MessageState.ACCEPTED,
            MessageState.DELIVERED,
        ):
            return  # not ours (another instance of this user sent it), or failed: final
        if not self.store.add_group_receipt(msg_id, by):
            return  # told before (a receipt relayed again)
        self.store.set_state(msg_id, MessageState.DELIVERED)
        label = msg_id.label()
        if out is None:  # accepted before a restart of this client: only the store knew it
            self._emit(StatusChanged(label, MessageState.DELIVERED, group_address(group), "",
                                     by=by))  # fmt: skip
            return
        if out.state == MessageState.SENDING:
            self._emit(StatusChanged(label, MessageState.ACCEPTED, out.to, out.text))
            out.state = MessageState.ACCEPTED
            if out.cancelling:
                self._cancel_answered(out, ended=False)
        out.delivered += 1
        self._emit(StatusChanged(label, MessageState.DELIVERED, out.to, out.text, by=by))
        if out.recipients is not None and out.delivered >= out.recipients:
            self.outbox.pop(msg_id)

    def _group_gone(self, msg_id: MsgId, group: str, gone: str) -> None:
        """Member `gone` never will have our message (their account was
        deleted first): the message's N counts them out, once."""
        out = self.outbox.get(msg_id)
        if out is None and self.store.state_of(msg_id) not in (
            MessageState.ACCEPTED,
            MessageState.DELIVERED,
        ):
            return  # not ours, or failed
        recipients = self.store.count_out(msg_id, gone)
        if recipients is None:
            return  # told before
        to = group_address(group)
        text = ""
        if out is not None:
            out.recipients = recipients
            to, text = out.to, out.text
            if out.state != MessageState.SENDING and out.delivered >= recipients:
                self.outbox.pop(msg_id)  # every member left to have it has it
        self._emit(RecipientsChanged(msg_id.label(), to, recipients, gone, text))

    # --- logout -----------------------------------------------------------------

    def _run_closing(self, now: float) -> None:
        if self._closing_deadline is None or self.ended:
            return
        # Messages waiting for an account are not waited for: they stay in
        # the outbox for the next login (exit status 3). Group requests not
        # answered yet are waited for: a LOGOUT on the control stream could
        # overtake one on its group's stream, and a request is not kept for
        # the next run.
        waiting = (
            self._account_request is not None
            or bool(self._account_queue)
            or bool(self.group_requests)
            or any(
                out.state == MessageState.SENDING and not out.waiting
                for out in self.outbox.values()
            )
        )
        if self.conn is None:
            # Not logged in: a login would only be for what is left to send
            # (or to receipt); with nothing, waiting for one only delays the end.
            if now >= self._closing_deadline or not (
                waiting or self.receipts or self.group_receipts.ids
            ):
                self._warn_unsent()
                self._end_unconfirmed()
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
            self._end_unconfirmed()

    def _end_unconfirmed(self) -> None:
        """End a logout no server acknowledged. If a server may still hold
        our session (the link was lost, the node died: not ended by the
        server), say so and end with `server_unreachable`, not `logged_out`:
        the server ends that session itself at its timeout, and until then
        shows us online."""
        if not self._session_open:
            self._finish(ErrorCode.LOGGED_OUT)  # nothing to log out of
            return
        if len(self.servers) > 1:
            names = ", ".join(format_address(*server) for server in self.servers)
            where = f"none of the servers {names} answers"
        else:
            where = (f"server {self._server_text('')} does not answer" if self.server
                     else "the server does not answer")  # fmt: skip
        self._emit(ErrorEvent(ErrorCode.SERVER_UNREACHABLE.label,
                              f"the logout reached no server ({where}); the server ends the "
                              "session itself when it times out, and shows you online until "
                              "then"))  # fmt: skip
        self._finish(ErrorCode.SERVER_UNREACHABLE)

    def _warn_unsent(self) -> None:
        """Logging out with messages the server has not accepted: say so."""
        unsent = sum(
            out.state == MessageState.SENDING and not out.waiting and not out.cancelling
            for out in self.outbox.values()
        )
        # (Those waiting for an account were reported when they began to.)
        if unsent:
            kept = "kept in the outbox for the next login" if self.store.directory else "not sent"
            text = f"{unsent} message(s) not accepted by the server yet: {kept}"
            self._emit(ErrorEvent(ErrorCode.SERVER_UNREACHABLE.label, text))
        if self.group_requests:
            asked = len(self.group_requests)
            text = f"{asked} group request(s) not answered by the server: not sent again"
            self._emit(ErrorEvent(ErrorCode.SERVER_UNREACHABLE.label, text))

    def _finish(self, reason: ErrorCode) -> None:
        self._settle_cancels()
        self._final_flush = self.conn is not None  # the ack for anything the server sent last
        self._emit(Disconnected(reason.label))
        self.ended = True
