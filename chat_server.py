"""The relay server: sessions, routing, presence, and the socket loop.

`Relay` holds all of the server's state and logic with no socket, shaped
like aioquic's `QuicConnection`: inputs return nothing
(`receive_datagram(data, addr, now)`, `receive_datagrams(batch, now)`,
`handle_timer(now)`, and the completions `store_done(now)` and
`key_exchange_done(now)`), output comes only from `datagrams_to_send(now)`,
and the loop sleeps until `get_timer()`. `ChatServer` is the thin shell that
owns the UDP socket and runs that loop on one thread, so the registry has
exactly one owner. Message text is never looked at, only moved.

Behind the relay, two seams: a `MessageStore` (server_store: SQLite, or memory
without a data directory) takes typed operations and hands their callbacks
back when durable; a `Router` (server_router) says where a user's session
is. Registrations' key exchanges go to `server_keyx.KeyExchanges`.

Who is who: a user is a name (compared by `protocol.name_key`); a session is
one login of a user from one client instance, named on the wire by its
`session_id` and proved on every datagram by an HMAC with its key. The
sender of a message is always the session's user, never a field a client
could fill in.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import concurrent.futures
import contextlib
import ctypes
import errno
import functools
import gc
import heapq
import itertools
import logging
import math
import os
import secrets
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType as _StackFrame
from typing import TYPE_CHECKING

from common import DEFAULT_PORT, __version__, at_least, format_address, positive
from protocol import (
    ACCOUNT_CHANGE,
    ACCOUNT_DELETE,
    ALREADY_MEMBERS,
    CONTROL_STREAM,
    FLAG_MAC,
    GROUP_BATCH_ENTRY_OVERHEAD,
    GROUP_PAGE_MAX,
    HEADER,
    MAGIC,
    MAX_DATAGRAM,
    MAX_FRAMES_SIZE,
    MAX_TEXT_BYTES,
    MIN_PREAUTH_REQUEST,
    NO_SESSION,
    PBKDF2_ITERATIONS,
    PBKDF2_MIN_ITERATIONS,
    TAG_SIZE,
    VERSION,
    WHO_PAGE_MAX,
    Accept,
    Accepts,
    AccountResult,
    Bye,
    ChangePassword,
    DeleteAccount,
    Delivered,
    Delivereds,
    ErrorCode,
    Fail,
    Frame,
    GroupAccept,
    GroupAction,
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
    PathChallenge,
    Ping,
    Presence,
    Receipt,
    Receipts,
    Refused,
    RemoteProtocolError,
    Send,
    Stream,
    Ticket,
    TicketFrame,
    Typing,
    UnsupportedVersion,
    Watch,
    Welcome,
    Who,
    WhoReply,
    account_message,
    account_wrap,
    batches,
    conversation_stream,
    decode_header,
    decode_message,
    decode_packet,
    decode_tagged,
    encode_deliver,
    encode_message,
    encode_packet,
    group_address,
    group_batch,
    is_group_address,
    name_key,
    normalize_name,
    server_signature,
    session_keys,
    unknown_session_reply,
    version_reply,
)
from reliability import (
    CHUNK_SIZE,
    GROUP_ACK_DELAY,
    REASSEMBLY_TIMEOUT,
    RTO_MAX,
    RTO_MIN,
    Connection,
    Event,
    PathResponded,
    PayloadAcked,
    PayloadReceived,
    ReassemblyExpired,
    ReceiveBudget,
)
from server_groups import (
    TOMBSTONE,
    Group,
    GroupRefused,
    GroupTable,
    Member,
    backlog_full_text,
    group_name,
    is_retired,
    retired_key,
)
from server_guard import (
    BucketTable,
    TokenBucket,
)
from server_keyx import KeyExchanges, KeyExchangeWorkers
from server_login import Answered, LoginDesk, Unwrap, Verified, valid_iterations
from server_metrics import (
    Family,
    MetricsServer,
    counter,
    gauge,
    histogram,
    label_value,
    labelled,
)
from server_records import (
    Address,
    DropLog,
    Entry,
    GroupEntry,
    GroupMail,
    GroupNotices,
    GroupPages,
    Pager,
    Probe,
    ServerConfig,
    Session,
    User,
)
from server_router import LocalRouter, Router
from server_store import (
    WITHDRAWN,
    Account,
    BuryMember,
    ChangeGroup,
    DropMember,
    EndGroup,
    EraseAccount,
    FindDedup,
    FindGroupItem,
    GroupItem,
    GroupReceipt,
    GroupTold,
    Loaded,
    LoadedGroup,
    LoadedMember,
    MarkDelivered,
    MarkDelivereds,
    MemoryStore,
    MessageStore,
    NoticeDone,
    NoticeRow,
    PostGroupMessage,
    Read,
    ReadGroupCursors,
    ReadGroupLog,
    ReadGroupMark,
    ReadGroupSent,
    ReadGroupState,
    ReadMailbox,
    ReadNotices,
    RequestKey,
    ServerStore,
    StoreAccount,
    StoreDedup,
    StoredMessage,
    StoreError,
    StoreGroupItem,
    StoreLocked,
    StoreMessage,
    Sync,
    TellReached,
    TrimGroup,
    UpdateAccount,
    content_digest,
    default_data_dir,
)

if TYPE_CHECKING:  # imported for real only in cluster mode: it needs the redis package
    from server_cluster import RedisRouter, RedisStore

__all__ = [
    "ChatServer", "ListenError", "Relay", "ServerConfig", "StoreError", "StoreLocked", "main",
]  # fmt: skip

log = logging.getLogger("chat_server")

Outgoing = list[tuple[bytes, Address]]
#: A NamedTuple (`Entry`) made without its Python-level `__new__`.
_new_tuple = tuple.__new__
RECEIVE_BUFFER = 4 * 1024 * 1024
MAX_AWAITED = 10_000  # unregistered names watched, at most; least recently watched evicted
MAX_AWAITED_PER_NAME = 100
# Unregistered names one user may await at once: a client WATCHes the people
# it has conversations open with, a handful; beyond, its oldest is forgotten.
MAX_AWAITED_PER_WATCHER = 100
# Users told of one user's comings and goings, at most (the oldest added is
# forgotten first): a person keeps far fewer conversations, and each entry
# costs a PRESENCE at every login and logout. A contact forgotten is added
# again, presence and all, by its next message or WATCH (clients re-WATCH at
# every login).
MAX_CONTACTS = 1000
MAX_RECIPIENT_KEYS = 4096  # cleared when full
MAX_CLIENT_SEQ = 1 << 63  # SQLite stores signed 64-bit integers
#: Requests on the control stream that count as messages against the user's
#: rate limits: each makes the server send something (RECEIPT and LOGOUT
#: only finish what was sent).
COUNTED_REQUESTS = frozenset(
    int(kind)
    for kind in (
        Kind.WHO, Kind.WATCH, Kind.TYPING, Kind.GROUP_REQUEST, Kind.CHANGE_PASSWORD,
        Kind.DELETE_ACCOUNT,
    )
)  # fmt: skip
#: The handle of a deleted account's last ACCOUNT_RESULT: once its client
#: acks it, the session ends.
ACCOUNT_GONE = "\0account deleted"
#: The request ids under which a deleted account leaves its groups (its
#: client counts its own ids up from 1, so these never meet them).
DELETION_REQUEST = (1 << 64) - 1
MAX_TYPING_PAIRS = 4096  # (sender, recipient) typing limiters kept, least recent evicted
MEMORY_SAMPLE_INTERVAL = 0.5  # seconds between two reads of the resident memory
#: Sessions' expiry checks fall on multiples of this many seconds, at most
#: (`Relay._schedule`).
EXPIRY_GRID = 1.0
SHUTDOWN_COMMIT_WAIT = 2.0  # seconds a stopping server waits for its last commit
SHORT_OF_MEMORY = "the server is short of memory; your messages wait"
#: The first 6 bytes of every datagram of a session: magic, version, MAC flag.
SESSION_PREFIX = MAGIC + bytes((VERSION, FLAG_MAC))
#: The smallest datagram a session's can be: its header and its MAC tag.
_TAGGED_MIN = HEADER.size + TAG_SIZE
# What a session is handed from its mailbox and has not receipted yet, at
# most; the rest waits on the disk and comes a page at a time as receipts
# make room, so RAM holds a bounded working set whatever the mailboxes hold.
# 256 messages keep a client's reliable window (64 datagrams of several
# messages each) fed across a receipt's round trip; 192 KiB stays under the
# 256 KiB of unacknowledged output a session may have (docs/RELIABILITY.md 1.4),
# so handing a mailbox over never stalls the session's own input.
MAILBOX_WINDOW = 256
MAILBOX_WINDOW_BYTES = 192 * 1024
# The next page is read once this many messages / bytes of the window are
# free (or it is empty): fewer, larger reads than one per receipt.
PAGE_MIN = MAILBOX_WINDOW // 4
PAGE_MIN_BYTES = MAILBOX_WINDOW_BYTES // 4
# Receipts (DELIVERED, ~30 bytes each) handed to a sender and not yet acked.
NOTICE_WINDOW = 1024
NOTICE_PAGE_MIN = NOTICE_WINDOW // 4
# Cluster mode: queued "delivered by" receipts handed to a sender and not yet
# acked: a message to a group of 1,000 has 999, so a window of direct
# receipts would send a sender at 10 messages/s to the store for them at once.
GROUP_NOTICE_WINDOW = 8192
GROUP_NOTICE_PAGE_MIN = GROUP_NOTICE_WINDOW // 4
# A sender's messages whose "delivered by" are told again from the log after
# a login, per read: each is one GROUP_REACHED per 256 members who have it;
# the next page is read once the sender's client acked the last one.
GROUP_SENT_PAGE = 64
# How often (in a group's entries) the relay works out how far its log can
# be trimmed: that walks the members' cursors, so not at every receipt.
GROUP_TRIM_EVERY = 64
MAX_WAITING_RETRIES = 64  # SENDs of one id waiting for its dedup lookup on the disk
# What one session's group holds keep (`Relay._hold_group`, `_wait_for_budget`),
# at most: past either, its datagrams with SENDs or requests (on any stream) are
# withheld (not acked: the client sends them again later) until a hold is released.
MAX_GROUP_HELD = 64
MAX_GROUP_HELD_BYTES = 256 * 1024
# The request key of a hold that waits for the fan-out budget, not for an
# answer (`Relay._wait_for_budget`): no user key is empty.
BUDGET_HOLD: RequestKey = ("", 0, 0)
# The group requests that make entries (copies for every member).
CHANGE_ACTIONS = (GroupAction.CREATE, GroupAction.ADD, GroupAction.REMOVE, GroupAction.LEAVE)
# How long the relay holds the store's next commit for the receipts of the
# messages it has just handed to online recipients (issue 18). A receipt
# that comes back within it joins the message's commit: no mailbox row is
# written at all (nor deleted in a second commit, a second fsync), and the
# DELIVERED leaves with the ACCEPT, in one datagram. On loopback a receipt
# takes 0.2-0.5 ms; the ACCEPT waits this much more at most (the group
# commits of docs/RELIABILITY.md 1.3 may take up to 10 ms). The DELIVER
# itself never waits (see `_take`).
COMMIT_WAIT = 0.002
# A message the recipient's client receipted before the server wrote it
# (within COMMIT_WAIT, or while its batch waited for the store thread) is
# never written (issue 18): the recipient's client holds it durably (it
# commits a message before its receipt), so its sender is told DELIVERED
# and ACCEPT at once, in that order on one stream, and its write is
# withdrawn (`ServerStore.withdraw`). Its dedup key, content digest and
# recipient's name are written lazily instead (`StoreDedup`, LAZY_HOLD: on
# the next commit, or alone after 0.1 s; nobody waits for it): a resend
# is then answered DELIVERED and ACCEPT with the same server_msg_id, a
# reuse of its id for other content DUPLICATE_ID, in any later life of the
# server too. Until that write commits, an entry in memory answers them
# (dropped by the write's callback). These entries are capped for safety
# (a store that cannot commit keeps them): past either cap a message takes
# the written path, nothing is evicted. Only a crash within the lazy
# window loses the key (docs/RELIABILITY.md 1.3.2).
MAX_EARLY = 65_536
MAX_EARLY_BYTES = 16 << 20  # of their texts' UTF-8 (a text is kept for the duplicate_id check)
# A group's messages committed within this long of its last fan-out wait for
# the end of it and go to each member together, in one datagram where they
# fit (issue 14): the cost of a copy is mostly its member's datagram (a MAC,
# a sendto, the receipt that comes back and its ack), so a burst of k
# messages costs each member one datagram instead of k. A message after a
# quiet spell goes at once; in a burst one waits this much at most (the
# 10 msg/s target at 1,000 members allows 200 ms to the last member). Single
# server only: a cluster node's fan-out follows the shared log's announcements.
FANOUT_HOLD = 0.010
# The entries a pass hands one member of a group (a hold's messages, a page
# of the log) go in GROUP_BATCHes of at most this many bytes (issue 14): one
# chunk each, so a burst costs the member one `send`, one chunk and one ack
# instead of one per entry. An entry too big for it goes alone, as ever.
GROUP_BATCH_BYTES = CHUNK_SIZE
# Members behind read the group's log in pages; members at the same place
# share the work (issue 14, seventh session): one store read of a page
# serves every pager at its place, and a cache of the groups' recent
# entries (filled by the fan-out and by those reads; `GroupPages`) gives
# each entry one `GroupEntry` and one encoding, and each run of entries one
# joined GROUP_BATCH, for every member who pages through it. Bounded over
# all groups, the oldest going first: this many entries (and as many runs),
# and this many bytes of their payloads (200 bytes more each for the records).
GROUP_PAGE_CACHE_ENTRIES = 65_536
GROUP_PAGE_CACHE_BYTES = 32 << 20
#: The RATE_LIMITED notice to a sender whose group messages wait for the
#: fan-out budget, withheld before they are taken or held after (`Relay._may_take`,
#: `Relay._wait_for_budget`).
FANOUT_LIMITED = "your group messages exceed the server's fan-out budget; messages are delayed"
#: Why the relay drops (or, for the limits, withholds) a datagram: `DropLog`'s
#: categories, each a fixed phrase (never text a sender chose). The metrics
#: report every one of them, at 0 until it happens, so an alert on one can
#: be written before it ever fires; a test keeps this list equal to the
#: phrases the relay uses.
DROP_REASONS = (
    "pre-login budget", "pre-login rate limit", "user rate limit",
    "output cap: input waits for acks", "short of memory: messages wait",
    "fan-out budget: messages wait", "group hold: input waits for answers", "malformed",
    "internal error", "unsupported version", "unknown session", "bad tag or frame",
    "replayed or refused", "bad message", "unpadded pre-login datagram",
    "pre-login datagram without one HELLO or LOGIN", "login with a stale or forged cookie",
    "reply would be larger than the request", "message not for the server",
)  # fmt: skip
#: Those that are limits the server enforces: logged as warnings ("limit
#: hit"), at most once per `ServerConfig.log_interval` each.
LIMIT_REASONS = frozenset(DROP_REASONS[:7])
#: Answers of group requests kept in memory (loaded from the store, which
#: keeps each client instance's latest): a request sent again is answered
#: again, not done twice.
MAX_GROUP_ANSWERS = 100_000
# Cluster mode: a group's log is read into a node's copy a page at a time
# (entries past what the copy has; the members' own pages are separate).
GROUP_REPLAY_PAGE = 256
GROUP_REPLAY_BYTES = 1 << 20
#: The last seq a log read may reach: "everything there is".
GROUP_LOG_END = 1 << 62
#: Times a node plans a membership change again after another node's change
#: came first (each time its copy has caught up): then it asks the client to
#: send it again. Changes are rare; two in a row on one group rarer still.
GROUP_CHANGE_ATTEMPTS = 8
#: A deleted sender's mark in the shared store: told everything (nobody is
#: left to tell; the mark must not hold the log's trim).
TOLD_ALL = 1 << 52
DUPLICATE_ID_TEXT = (
    "this message id was already used for another message; your client's store was "
    "probably copied or restored"
)


class _GroupNotices:
    """The handle of a GROUP_REACHED: the group it tells about, whose frames
    in flight to the sender's session it counts down once acked."""

    __slots__ = ("group_key",)

    def __init__(self, group_key: str) -> None:
        self.group_key = group_key


class _GroupHolds:
    """What one session sent to groups and the relay keeps back, in order:
    in cluster mode what came after a change request to each not answered
    yet (`Relay._hold_group`); in both modes a group message its user's
    fan-out budget cannot pay for yet, and what came after it to that group
    (`Relay._wait_for_budget`, the key BUDGET_HOLD). Group key -> (the
    request's key, the SENDs and requests held behind it, in order, with a
    SEND's recipient key); and how many they are, and their bytes (`held_size`)."""

    __slots__ = ("by_group", "count", "size")

    def __init__(self) -> None:
        self.by_group: dict[
            str, tuple[RequestKey, collections.deque[tuple[Send | GroupRequest, str]]]
        ] = {}
        self.count = 0
        self.size = 0


_SEND_KIND = bytes((Kind.SEND,))  # a SEND's first chunk starts with it
_GROUP_REQUEST_KIND = bytes((Kind.GROUP_REQUEST,))
#: A GROUP_REQUEST's action byte (after its kind and u64 request id) for
#: the actions that make entries in a group's log (`chunk_cost`).
_ENTRY_ACTIONS = frozenset(
    bytes((action,))
    for action in (GroupAction.CREATE, GroupAction.ADD, GroupAction.REMOVE, GroupAction.LEAVE)
)


def _requests_only(chunks: list[Stream]) -> bool:
    """Whether the chunks off the control stream are all whole membership
    requests (first chunks of GROUP_REQUESTs): no message of a group, so
    nothing for the fan-out budget at admission (`Relay._may_take`). A
    later fragment counts as a message's: it may wait, never overspend."""
    return all(
        f.stream == CONTROL_STREAM or (f.index == 0 and f.data[:1] == _GROUP_REQUEST_KIND)
        for f in chunks
    )


_RECEIPT_KINDS = (bytes((Kind.RECEIPT,)), bytes((Kind.RECEIPTS,)))


def _receipts_only(frames: tuple[Frame, ...]) -> bool:
    """Whether a datagram's chunks are all receipts, whole (RECEIPT or
    RECEIPTS, one chunk each), with no keepalive: the datagram the client
    marks `lazy_ack` (client_core `_queue_receipts`), whose ack the server
    may hold up to `reliability.RECEIPT_ACK_DELAY` for a datagram of its
    own to carry it (issue 14: at a steady rate a member's receipt is
    otherwise acked by a datagram of its own, a third per group copy)."""
    found = False
    for f in frames:
        cls = f.__class__
        if cls is Stream:
            if f.count != 1 or f.data[:1] not in _RECEIPT_KINDS:  # type: ignore[union-attr]
                return False
            found = True
        elif cls is Ping:
            return False
    return found


#: `chunk_cost`: (messages, requests, bytes, any of a SEND).
ChunkCost = tuple[int, int, int, bool]
_NO_COST: ChunkCost = (0, 0, 0, False)


def held_size(what: Send | GroupRequest) -> int:
    """The bytes a SEND or a membership request keeps in a session's group
    holds (`MAX_GROUP_HELD_BYTES`): its text, or its group's and users' names."""
    if isinstance(what, Send):
        return len(what.text.encode("utf-8"))
    return len(what.group.encode("utf-8")) + sum(len(u.encode("utf-8")) for u in what.users)


def chunk_cost(chunks: list[Stream]) -> ChunkCost:
    """What new chunks cost against a user's budgets: the messages that
    start among them (a SEND's first fragment), the counted requests, their
    bytes, and whether any belongs to a SEND."""
    messages = requests = size = 0
    sends = False
    for frame in chunks:
        size += len(frame.data)
        if frame.stream != CONTROL_STREAM:  # a SEND, or a later fragment of one
            sends = True
            messages += frame.index == 0
        elif frame.index == 0 and frame.data and frame.data[0] in COUNTED_REQUESTS:
            if frame.data[:1] == _GROUP_REQUEST_KIND and frame.data[9:10] in _ENTRY_ACTIONS:
                # A membership change sent on the control stream (our client
                # sends it on its group's) makes entries all the same: it is
                # the send it would be there, so the memory check sees it.
                sends = True
                messages += 1
            else:
                requests += 1
    return messages, requests, size, sends


class Relay:
    """The server's state and logic, without a socket (see the module doc)."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        store: MessageStore | None = None,
        router: Router | None = None,
        wall_clock: Callable[[], float] = time.time,
        unwrapper: concurrent.futures.Executor | None = None,
        wake: Callable[[], None] = lambda: None,
        shared_store: bool = False,
    ) -> None:
        self.config = config or ServerConfig()
        # A store shared by the nodes of a cluster (server_cluster): every
        # copy of a message or receipt is handed over from it, in its order,
        # when it says something waits (`mail_waiting`, `receipts_waiting`),
        # never straight from the sender's session, which may be elsewhere.
        self.shared_store = shared_store
        # Without a data directory, a store in memory: the same operations,
        # callbacks and pages as on the disk, so one code path serves both.
        self.store: MessageStore = store if store is not None else MemoryStore()
        self.router: Router = router if router is not None else LocalRouter()
        # One node: a user's route is `User.session` (`LocalRouter.locate`),
        # read in line on the paths every message takes.
        self._local_routes = type(self.router) is LocalRouter
        self._wall_clock = wall_clock
        self.users: dict[str, User] = {}
        self.sessions: dict[bytes, Session] = {}
        self._online: list[str] = []  # sorted name keys, for paged WHO
        # Dedup, message id -> (server id, recipient key, text), in memory
        # only until the message is committed; older retries are looked up
        # in the store, off the loop: those at or below the high-water mark
        # of their client instance, and all of an instance without a mark.
        # Marks are kept for live sessions' own instances only (made by their
        # first new message, dropped with the session): a sender cannot
        # choose the keys of this map, and start-up reads none of it.
        self._accepted: dict[tuple[str, int, int], tuple[int, str, str]] = {}
        # Of those, the ones receipted already: the DELIVERED to tell with
        # the ACCEPT (message id, recipient's name, the receipt's seq).
        self._tell_at_accept: dict[tuple[str, int, int], tuple[MsgId, str, int]] = {}
        self._hwm: dict[tuple[str, int], int] = {}
        # Messages told DELIVERED and ACCEPT before any write whose dedup key
        # is not committed yet (MAX_EARLY): dedup key -> (the message, its
        # recipient's name), the item of its `StoreDedup`; and the UTF-8
        # bytes of their texts.
        self._early: dict[tuple[str, int, int], tuple[StoredMessage, str]] = {}
        self._early_bytes = 0
        # The writes of messages handed to an online recipient and not yet
        # committed, by server id: withdrawn if their receipt comes first.
        self._unwritten: dict[int, StoreMessage] = {}
        # Receipts told to their senders' sessions and not written yet, by
        # sender session: written once the DELIVERED is acked (`_tell_and_hold`).
        self._held: dict[bytes, dict[MsgId, MarkDelivered]] = {}
        self._held_ids: set[int] = set()  # their messages' server ids (still in a mailbox)
        self._withdraw: Callable[[list[StoreMessage]], None] | None = None
        # Dedup keys being looked up on the disk -> the SENDs waiting for the answer.
        self._looking_up: dict[tuple[str, int, int], list[tuple[Send, str]]] = {}
        # Lookups in flight per (user, instance): while any is, that
        # instance's later SENDs queue behind it (the store answers in
        # order), so a new message never overtakes an earlier one.
        self._lookups: collections.Counter[tuple[str, int]] = collections.Counter()
        self._dirty: dict[bytes, Session] = {}
        # ACCEPTs and DELIVEREDs due this pass, by session: sent at the flush,
        # several to one session as one ACCEPTS / DELIVEREDS message.
        self._accepts: dict[bytes, tuple[Session, list[tuple[MsgId, int]]]] = {}
        self._delivereds: dict[bytes, tuple[Session, dict[str, list[MsgId]]]] = {}
        # A SEND's `to` as typed -> its name key: normalizing it is most of
        # the cost of routing, and senders name the same few people.
        self._recipient_keys: dict[str, str] = {}
        # Sessions' connection timers (retransmissions, delayed acks): an
        # entry per session, at most one live (`Session.scheduled`), moved in
        # place (`_schedule`).
        self._timers: list[tuple[float, int, bytes]] = []
        # Sessions (their ids) by the step of the expiry grid on which their
        # expiry is looked at (`_expire`), each in one (a list: a session
        # that ends is skipped when its step comes, not looked for), and
        # those steps in a heap, each once: a step's list stays until it
        # comes due (they are never more than session_timeout / grid + 2), so
        # a step is never pushed twice.
        self._expiries: dict[int, list[bytes]] = {}
        self._expiry_steps: list[int] = []
        # Messages handed to online recipients since the store's last flush,
        # whose receipts have not come yet, and until when the flush waits
        # for them (COMMIT_WAIT).
        self._expecting: set[int] = set()
        self._hold_until: float | None = None
        # Sessions' expiry checks fall on multiples of this (`_schedule`).
        self._expiry_grid = min(EXPIRY_GRID, self.config.session_timeout / 16)
        self._tiebreak = itertools.count()
        self._out: Outgoing = []
        self.drops = DropLog(self.config.log_interval, LIMIT_REASONS)
        # UTF-8 bytes of the messages taken (a plain int: one add per message,
        # no look-up; the metrics read it).
        self.message_bytes = 0
        self.stats: collections.Counter[str] = collections.Counter()
        cfg = self.config
        self._preauth = BucketTable(cfg.preauth_rate, cfg.preauth_burst)
        # Everything without a live session, from all addresses together:
        # spoofed or many-address floods pass the per-address buckets.
        self._preauth_total = TokenBucket(cfg.preauth_total_rate, cfg.preauth_total_burst, 0.0)
        # LOGIN nonces whose account is being unwrapped or stored.
        self._registering: set[bytes] = set()
        self._unstored: set[str] = set()  # name keys registered, not yet committed
        # Registrations' Diffie-Hellman secrets are computed in `unwrapper`
        # when given (a process pool: 3.7 ms each would stall every session
        # on the loop); the LOGIN waits, with its address and size.
        self.key_exchanges: KeyExchanges[tuple[Unwrap, Address, int, float]] = KeyExchanges(
            unwrapper, wake
        )
        self._now = 0.0  # `now` of the call being handled, for store callbacks
        # Unregistered names someone watches -> who (told when the name arrives).
        # Least recently watched first; `_awaiting` is the reverse (watcher
        # key -> the names it awaits, oldest first), dropped with its session.
        self._awaited: dict[str, set[str]] = {}
        self._awaiting: dict[str, dict[str, None]] = {}
        # Memory caps: reassembly shared by all sessions, typing notices per
        # pair, and the loop's measure of the whole process (`set_memory`).
        self._reassembly = ReceiveBudget(cfg.max_reassembly)
        self._typing = BucketTable(cfg.typing_rate, cfg.typing_burst, MAX_TYPING_PAIRS)
        self.short_of_memory = False
        self._memory_logged = -1e18
        self._full_logged = -1e18  # the last "server is full" line
        # Groups: the table of groups and members (server_groups), the
        # answers of requests made, group messages taken and not committed
        # yet (dedup key -> (group_seq, recipients)), and the pass's
        # "delivered by" notices: sender key -> message id -> (group, names
        # of the members who newly have it).
        self.groups = GroupTable(cfg.max_group_members, cfg.max_user_groups)
        self._group_answers: dict[RequestKey, tuple[int, str]] = {}
        self._group_pending: dict[tuple[str, int, int], tuple[int, int]] = {}
        # Cluster mode (`shared_store`): this node's copy of each group is the
        # shared log's prefix, read on as entries are announced. The seq each
        # group's log is known to reach, the groups being read or loaded, and
        # what waits for a group to reach (epoch, seq).
        self._group_wanted: dict[str, int] = {}
        # Groups whose state is being read: the (epoch, seq) the latest
        # notice heard meanwhile says their log reaches.
        self._group_load_wanted: dict[str, tuple[int, int]] = {}
        self._group_reading: set[str] = set()
        self._group_loading: set[str] = set()
        self._group_waiters: dict[str, list[tuple[int, int, Callable[[], None]]]] = {}
        self._group_reached: dict[str, dict[MsgId, tuple[Group, list[str]]]] = {}
        self._group_streams: dict[str, int] = {}  # group key -> its stream on every hop
        self._group_lows: dict[str, int] = {}  # group key -> its low-water mark, this pass
        # Cluster mode: session id -> what that session sent to groups after
        # a change request to each not answered yet; (the request's key, its
        # group's key) -> the session whose hold it is (`_hold_group`).
        self._group_holds: dict[bytes, _GroupHolds] = {}
        self._holds_by_request: dict[tuple[RequestKey, str], bytes] = {}
        # Sessions with group messages waiting for the fan-out budget
        # (`_wait_for_budget`) -> when it can pay the first; the earliest.
        self._budget_waits: dict[bytes, float] = {}
        self._budget_due: float | None = None
        # Cluster mode: accounts deleted on another node while this node's
        # copies of some of their groups still had them as members -> those
        # groups: their LEFT entries bury them here too (`_bury_copy`).
        self._erased_members: dict[str, set[str]] = {}
        # Cluster mode: user key -> the creates and adds planned here that
        # would put them in a group, not answered by the store yet: they
        # count against `--max-user-groups` here (the store counts exactly,
        # for every node: `ChangeGroup.max_user_groups`; audit7 N2).
        self._joining: dict[str, int] = {}
        # Group messages committed and held for their group's next fan-out
        # (FANOUT_HOLD): group key -> (the group, its entries in order, when
        # they go); when its last fan-out went; the earliest of those due.
        self._fanout_held: dict[str, tuple[Group, list[GroupItem], float]] = {}
        self._fanout_last: dict[str, float] = {}
        self._fanout_due: float | None = None
        # The groups' recent entries encoded once for every member reading
        # the log in pages (GROUP_PAGE_CACHE_*), and the store reads of a
        # group's log under way: (group key, after) -> the group, and the
        # sessions (with their pagers) the read is for.
        self._group_pages = GroupPages(GROUP_PAGE_CACHE_ENTRIES, GROUP_PAGE_CACHE_BYTES)
        self._group_reads: dict[
            tuple[str, int], tuple[Group, list[tuple[Session, Pager[int, GroupEntry]]]]
        ] = {}
        self._load(self.store.load())
        if not shared_store:  # (a cluster hands a message over only once it is in Redis)
            self._withdraw = getattr(self.store, "withdraw", None)
        self._reserve_at = self.store.reserve_ids(self._next_msg_id)  # when to ask again
        # The wall clock is only for timestamps people see (`sent_ms`): what
        # expires (cookies, the login record, failure windows, sessions)
        # runs on the `now` the loop passes in, the monotonic clock.
        self.desk = LoginDesk(cfg, self._secret, self._account_of, self.stats, self._quarantined)

    def _account_of(self, key: str) -> Account | None:
        user = self.users.get(key)
        return user.account if user is not None else None

    def _quarantined(self, key: str) -> int | None:
        """Until when (wall clock, ms) nobody may register the name `key`
        (its account was deleted), or None."""
        until = self.quarantine.get(key)
        if until is not None and until <= self._wall_clock() * 1000:
            del self.quarantine[key]  # its row goes at the next start or registration
            return None
        return until

    def _load(self, loaded: Loaded) -> None:
        self._secret = loaded.secret
        # Names of deleted accounts -> until when they stay unregistrable
        # (one per deletion in the last --name-quarantine days).
        self.quarantine: dict[str, int] = dict(loaded.quarantine)
        self._next_msg_id = loaded.next_msg_id
        for key, account in loaded.accounts.items():
            self.users[key] = User(account.name, key, account)
        messages = notices = 0
        for key, (count, size, waiting) in loaded.summary.items():
            user = self.users.get(key)
            if user is not None:
                # (never below zero, whatever an older bug may have left on the disk)
                user.mailbox_count, user.mailbox_bytes = max(0, count), max(0, size)
                user.notice_count = max(0, waiting)
                messages += count
                notices += waiting
        # A cluster node's store is Redis (`RedisStore` names where it is).
        redis = getattr(self.store, "address", None)
        log.info("loaded %d accounts; %d messages and %d receipts wait %s",
                 len(loaded.accounts), messages, notices,
                 "on the disk" if redis is None else f"in Redis at {redis}")  # fmt: skip
        self._load_groups(loaded)

    # --- the loop's API ---------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Take one datagram; what it causes waits for `datagrams_to_send`
        (so replies to a pass's datagrams are batched)."""
        self._now = now
        self.stats["datagrams_in"] += 1
        self.stats["bytes_in"] += len(data)
        if not self._for_session(data):
            # Not for a live session: first within its address's allowance,
            # then within the budget for all such traffic, both before any
            # parsing, HMAC or allocation, so a flood costs little. In this
            # order one flooding address spends its own allowance only and
            # leaves the shared budget to everyone else's logins.
            if not self._preauth.take(addr[0], 1, now):
                self.drops("pre-login rate limit", addr, now)
                return
            if not self._preauth_total.take(1, now):
                self.drops("pre-login budget", addr, now)
                return
        try:
            self._receive(data, addr, now)
        except RemoteProtocolError as exc:
            self.drops("malformed", addr, now, exc)
        except Exception:  # the loop must never die on input
            log.exception("bug while handling a datagram from %s", format_address(*addr))
            self.drops("internal error", addr, now)

    def _for_session(self, data: bytes) -> bool:
        """Whether a datagram looks like one of a live session's: our magic
        and version, a MAC, and the id (bytes 6..22) of a session we have.
        Cheap, and only a first sort: its MAC is checked later."""
        return data[:6] == SESSION_PREFIX and data[6:22] in self.sessions

    def receive_datagrams(self, datagrams: list[tuple[bytes, Address]], now: float) -> None:
        """Take what the loop read in one pass: datagrams of live sessions
        first, then the rest (pre-login, unknown sessions, garbage), which
        the pre-login budget may drop. A pre-login flood then delays no
        session's datagram of the same pass."""
        self._now = now
        stats, sessions = self.stats, self.sessions
        later: list[tuple[bytes, Address]] = []
        for data, addr in datagrams:
            # `_for_session`, and then `receive_datagram` without asking it
            # again: a live session's datagram of a plausible size goes
            # straight to its session (no `Header` record, `decode_tagged`).
            if data[:6] == SESSION_PREFIX and (session := sessions.get(data[6:22])) is not None:
                size = len(data)
                if _TAGGED_MIN <= size <= MAX_DATAGRAM:
                    stats["datagrams_in"] += 1
                    stats["bytes_in"] += size
                    try:
                        try:
                            packet = decode_tagged(data, session.conn.peer_key)
                        except RemoteProtocolError as exc:
                            self.drops("bad tag or frame", addr, now, exc)
                            continue
                        self._receive_packet(session, packet, data, addr, now)
                    except RemoteProtocolError as exc:
                        self.drops("malformed", addr, now, exc)
                    except Exception:  # the loop must never die on input
                        log.exception("bug while handling a datagram from %s",
                                      format_address(*addr))  # fmt: skip
                        self.drops("internal error", addr, now)
                    continue
                self.receive_datagram(data, addr, now)
            else:
                later.append((data, addr))
        for data, addr in later:
            self.receive_datagram(data, addr, now)

    def handle_datagram(self, data: bytes, addr: Address, now: float) -> Outgoing:
        """A test convenience: `receive_datagram`, then `datagrams_to_send`."""
        self.receive_datagram(data, addr, now)
        return self.datagrams_to_send(now)

    def store_done(self, now: float) -> None:
        """The store has completed operations: run what waited for them
        (ACCEPTs after their commit, registrations, pages of mailboxes)."""
        self._now = now  # store callbacks take no arguments: they read it here
        for callback in self.store.completed():
            try:  # (`_run_callback` in line: one call per ACCEPT fewer)
                callback()
            except Exception:  # the loop must never die
                log.exception("bug in a deferred step (after a commit or a key exchange)")
                self.stats["callback_errors"] += 1

    def key_exchange_done(self, now: float) -> None:
        """Registrations' Diffie-Hellman secrets are back from the pool: give
        their verdicts."""
        self._now = now
        done = self.key_exchanges.completed()
        for (pending, addr, size, arrived), secret in done:
            self._run_callback(
                functools.partial(self._unwrapped, pending, secret, addr, size, now, arrived)
            )
        if done:
            self.stats["key_exchanges_pooled"] = self.key_exchanges.pooled

    def _run_callback(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:  # the loop must never die
            log.exception("bug in a deferred step (after a commit or a key exchange)")
            self.stats["callback_errors"] += 1

    def datagrams_to_send(self, now: float) -> Outgoing:
        """Everything due to be sent now, as (datagram, address) pairs. Runs
        the completions that came back meanwhile first (`store_done`,
        `key_exchange_done`), so an owner that only pumps the four aioquic
        methods loses none; the socket loop also calls those when woken."""
        self.store_done(now)
        if self.key_exchanges.waiting:  # (`key_exchange_done` when it has something)
            self.key_exchange_done(now)
        if self._fanout_due is not None and now >= self._fanout_due:
            self._fan_out_due(now)  # what the pass committed to groups (`_fan_out_soon`)
        self._send_batches()
        out, self._out = self._out, []
        size = sum([len(d) for d, _ in out]) if out else 0
        sessions = self.sessions
        append = out.append
        # What the walk itself sends (a session that ends tells its watchers
        # it went offline) goes in this pass too: nothing waits for whatever
        # wakes the loop next, which may be a keepalive away now that timers
        # with nothing due no longer wake it (tests/test_pass_leaves_nothing.py).
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            for session in dirty.values():
                if sessions.get(session.session_id) is not session:
                    continue
                if session.closing:
                    session.conn.ack_now()  # the LOGOUT's ack goes out before the session ends
                datagrams = session.conn.datagrams_to_send(now)
                if datagrams:
                    addr = session.addr
                    for datagram in datagrams:
                        append((datagram, addr))
                        size += len(datagram)
                if session.closing:
                    self._end_session(session, now)
                else:
                    self._schedule(session, now)
        if self._out:  # (raw datagrams the walk made: answers before a session's)
            more, self._out = self._out, []
            out += more
            size += sum([len(d) for d, _ in more])
        if out:
            stats = self.stats
            stats["datagrams_out"] += len(out)
            stats["bytes_out"] += size
        return out

    def get_timer(self) -> float | None:
        """When `handle_timer` (or `flush_store`) is next due (None: nothing
        is scheduled)."""
        timers = self._timers
        sessions = self.sessions
        while timers:
            # An entry whose session ended or moved its deadline earlier
            # would wake the loop for nothing (`handle_timer` skips it): drop
            # it here. A live one whose session's deadline moved later (the
            # chunks it was set for were acked, the ack it was set for rode
            # on data: `_schedule`) is moved there, or dropped if nothing is
            # left to time, and the loop sleeps on.
            deadline, _, session_id = timers[0]
            session = sessions.get(session_id)
            if session is None or session.scheduled != deadline:
                heapq.heappop(timers)
                continue
            later = session.deadline
            if later is not None and later <= deadline:
                break
            self.stats["timers_moved"] += 1
            session.scheduled = later
            if later is None:
                heapq.heappop(timers)
            else:
                heapq.heapreplace(timers, (later, next(self._tiebreak), session_id))
        timer = timers[0][0] if timers else None
        steps = self._expiry_steps
        if steps:
            expiry = steps[0] * self._expiry_grid
            if timer is None or expiry < timer:
                timer = expiry
        hold = self._hold_until
        if hold is not None and (timer is None or hold < timer):
            timer = hold
        fanout = self._fanout_due
        if fanout is not None and (timer is None or fanout < timer):
            timer = fanout
        budget = self._budget_due
        if budget is not None and (timer is None or budget < timer):
            timer = budget
        return timer

    def flush_store(self, now: float) -> None:
        """End of a loop pass, after the sends: hand the store what the pass
        submitted (`MessageStore.flush`), unless receipts of messages just
        handed over may still join it (COMMIT_WAIT; `get_timer` says when
        the wait ends: `handle_timer` ends it)."""
        if self._expecting:
            if self._hold_until is not None and now < self._hold_until:
                return
            self._expecting.clear()
        self._hold_until = None
        self.store.flush()

    def handle_timer(self, now: float) -> None:
        """Run every timer that is due (retransmissions, acks, expiry, the
        end of a commit's wait for receipts)."""
        self._now = now
        if self._hold_until is not None and now >= self._hold_until:
            self._expecting.clear()  # the pass's `flush_store` hands the store its batch
            self._hold_until = None
        if self._fanout_due is not None and now >= self._fanout_due:
            self._fan_out_due(now)
        if self._budget_due is not None and now >= self._budget_due:
            self._budget_paid(now)
        steps = self._expiry_steps
        if steps and steps[0] * self._expiry_grid <= now:
            self._expire(now)
        timers = self._timers
        sessions = self.sessions
        while timers and timers[0][0] <= now:
            deadline, _, session_id = heapq.heappop(timers)
            session = sessions.get(session_id)
            if session is None or session.scheduled != deadline:
                continue  # stale entry; the live one is elsewhere in the heap
            later = session.deadline
            if later is None or later > now:
                # Its deadline moved later since the entry was set (as in
                # `get_timer`; here for an entry that came due in a pass woken
                # by something else): move it there, nothing to look at.
                self.stats["timers_moved"] += 1
                session.scheduled = later
                if later is not None:
                    heapq.heappush(timers, (later, next(self._tiebreak), session_id))
                continue
            session.scheduled = None
            conn = session.conn
            timer = conn.get_timer()
            if timer is None or timer > now:
                # Nothing of the connection's is due after all: its deadline
                # moved later by a path that did not pass `_schedule` (none is
                # known: every change to a connection marks its session dirty
                # and `datagrams_to_send` schedules it). Set the next entry, no
                # more (`tests/test_timer_wakeups.py` counts these: `timers_idle`).
                self.stats["timers_idle"] += 1
                self._schedule(session, now)
                continue
            self.stats["timers_run"] += 1
            conn.handle_timer(now)
            self._collect(session, session.addr, now)
            self._dirty[session_id] = session

    def _expire(self, now: float) -> None:
        """Look at the sessions whose step of the expiry grid has come: end
        those not heard since they were put there, move the others to the
        step their last datagram sets (`_place_expiry`; a session is first
        placed when it opens). A session heard all the time is so moved once
        a session_timeout, not per datagram: no heap entry, no work per datagram."""
        steps, grid, sessions = self._expiry_steps, self._expiry_grid, self.sessions
        timeout = self.config.session_timeout
        while steps and steps[0] * grid <= now:
            step = heapq.heappop(steps)
            for session_id in self._expiries.pop(step, ()):
                session = sessions.get(session_id)
                if session is None:
                    continue  # it ended meanwhile
                if int((session.last_heard + timeout) // grid) + 1 > step:
                    self._place_expiry(session)
                    continue
                log.info("session of %s expired after %.0f s of silence", session.user.name,
                         now - session.last_heard)  # fmt: skip
                self._end_session(session, now)

    def _place_expiry(self, session: Session) -> None:
        """Put the session in the step of the expiry grid its last datagram
        sets: the next multiple of the grid after last_heard + session_timeout.
        The idle sessions' checks share a pass instead of waking the loop one
        by one (10,000 idle sessions: one pass a second, not ~170); a session
        ends at most a grid step (EXPIRY_GRID, or a sixteenth of a shorter
        timeout) later than session_timeout."""
        grid = self._expiry_grid
        step = int((session.last_heard + self.config.session_timeout) // grid) + 1
        slot = self._expiries.get(step)
        if slot is None:
            slot = self._expiries[step] = []
            heapq.heappush(self._expiry_steps, step)
        slot.append(session.session_id)

    def send_shutdown(self, now: float) -> None:
        """A BYE to every session: the server is going away (then `datagrams_to_send`)."""
        self._now = now
        for session in list(self.sessions.values()):
            self._send(session, Bye(ErrorCode.SERVER_SHUTDOWN, "the server is shutting down"))
            if self._held:  # written with the last commit, for the next logins
                self._write_held(session)

    def online_count(self) -> int:
        return len(self._online)

    @property
    def reassembly_bytes(self) -> int:
        """What all sessions hold for reassembly together (<= `max_reassembly`)."""
        return self._reassembly.used

    def set_memory(self, resident: int, now: float) -> None:
        """The loop's latest measure of the process's resident memory, in
        bytes. While it is over `max_memory`, new messages wait (their acks
        are withheld); acks, receipts and logouts still flow, so it drains."""
        self.stats["resident_bytes"] = resident
        over = resident > self.config.max_memory
        if over == self.short_of_memory:
            return
        self.short_of_memory = over
        if over and now - self._memory_logged >= self.config.log_interval:
            self._memory_logged = now
            log.warning("resident memory %d MiB is over --max-memory %d MiB: new messages wait "
                        "until it falls", resident >> 20, self.config.max_memory >> 20)  # fmt: skip
        elif not over:
            log.info("resident memory %d MiB is under --max-memory again", resident >> 20)

    # --- a cluster's inputs (server_cluster calls them on the loop) -------

    def _session_here(self, key: str) -> Session | None:
        """User `key`'s session if it is on this node."""
        user = self.users.get(key)
        session = self.router.locate(user) if user is not None else None
        return session if isinstance(session, Session) else None

    def mail_waiting(self, key: str, server_msg_id: int, now: float) -> None:
        """The shared store holds message `server_msg_id` for user `key`: if
        their session is here, it is handed over in the mailbox's order
        (pages read past what the session holds)."""
        self._now = now
        session = self._session_here(key)
        if session is None:
            return  # not here: their node, or their next login, reads it
        if session.mail is None:
            session.mail = Pager(behind=True)
        if session.mail.fall_behind(server_msg_id):
            self._page_mail(session)

    def receipts_waiting(self, key: str, seq: int, now: float) -> None:
        """The shared store queued receipt `seq` for sender `key`: if their
        session is here, it is handed over like a page of receipts."""
        self._now = now
        session = self._session_here(key)
        if session is None:
            return
        if session.receipts is None:
            session.receipts = Pager(behind=True)
        if session.receipts.fall_behind(seq):
            self._page_receipts(session)

    def resync(self, now: float) -> None:
        """The cluster may have missed notices (its link to the shared store
        was down): every session here reads its mailbox and receipts again."""
        self._now = now
        for session in list(self.sessions.values()):
            for pager in (session.mail, session.receipts):
                if pager is not None:
                    pager.behind = True
                    pager.missed = max(pager.missed, pager.cursor + 1)
            if session.mail is None:
                session.mail = Pager(behind=True)
            if session.receipts is None:
                session.receipts = Pager(behind=True)
            self._page_mail(session)
            self._page_receipts(session)

    def logged_in_on(self, key: str, instance_id: int, now: float) -> None:
        """User `key` logged in on another node from client `instance_id`:
        their session here is taken over as by a login here (a BYE
        `logged_in_elsewhere`, or silently for the same client)."""
        self._now = now
        user = self.users.get(key)
        route = self.router.locate(user) if user is not None else None
        if isinstance(route, Session):
            self._take_over(route, instance_id, now)

    def presence_elsewhere(self, key: str, online: bool, now: float) -> None:
        """User `key` came or went on another node: WHO lists them, and
        their contacts here are told (as for a login here)."""
        self._now = now
        user = self.users.get(key)
        if user is None or isinstance(user.session, Session):
            return  # unknown here yet, or their session is here (it decides)
        index = bisect.bisect_left(self._online, key)
        listed = index < len(self._online) and self._online[index] == key
        if online and not listed:
            self._online.insert(index, key)
        elif not online and listed:
            del self._online[index]
        self._announce(user, online=online)

    def account_changed(self, key: str, account: Account, now: float) -> None:
        """A user changed their password on another node: logins here check
        the new verifier, and a session of theirs here ends (as the other
        sessions of a user do when the password changes)."""
        self._now = now
        user = self.users.get(key)
        if user is None:
            return
        user.account = account
        for session in self._sessions_of(user):
            text = "your password was changed elsewhere; log in with the new one"
            self._bye(session, ErrorCode.PASSWORD_CHANGED, text, now)

    def account_erased(self, key: str, until: int, now: float) -> None:
        """A user deleted their account on another node: it goes from here
        too (WHO, logins, registrations of the name until `until`), and a
        session of theirs here ends with ACCOUNT_DELETED."""
        self._now = now
        user = self.users.get(key)
        if user is not None:
            self._forget_account(user, until if self.config.name_quarantine > 0 else None, now)
            # This node's copies of the groups follow (the node where it was
            # deleted told the shared store): nobody owed, former memberships
            # under tombstones, and the senders here told at once. Where the
            # copy has not yet taken its leaving from the log, that entry
            # buries it when it comes (`_apply_entry`).
            member_of = list(self.groups.of_user.get(key, ()))
            if member_of:
                self._erased_members[key] = set(member_of)
            self._bury_copy(key)
        elif self.config.name_quarantine > 0:
            self.quarantine[key] = until

    def mailbox_size(self, key: str, count: int, size: int, now: float) -> None:
        """The shared store's size of user `key`'s mailbox (messages, UTF-8
        bytes) after a write of this node: the mailbox caps go by it (and
        by what this node takes until its next write is applied)."""
        user = self.users.get(key)
        if user is not None:
            user.mailbox_count, user.mailbox_bytes = max(0, count), max(0, size)

    def account_added(self, key: str, account: Account, now: float) -> None:
        """An account registered on another node (or one that won a race
        with a registration here): known here from now on."""
        self._now = now
        self._unstored.discard(key)
        user = self.users.get(key)
        if user is None:
            user = self.users[key] = User(account.name, key, account)
            for watcher in self._awaited.pop(key, ()):
                self._awaiting.get(watcher, {}).pop(key, None)
                self._add_contact(user, watcher)
        elif user.account != account:
            # Registered on two nodes at once (the one stored first holds),
            # or changed while this node's link to the others was down.
            log.info("account %s as the cluster stores it replaces this node's copy",
                     account.name)  # fmt: skip
            user.account = account

    # --- datagrams --------------------------------------------------------

    def _receive(self, data: bytes, addr: Address, now: float) -> None:
        try:
            header = decode_header(data)
        except UnsupportedVersion as exc:
            # (Within its address's pre-login allowance: `receive_datagram`.)
            reply = version_reply(len(data))
            if reply is not None:
                self._out.append((reply, addr))
            self.drops("unsupported version", addr, now, exc)
            return
        if header.session_id == NO_SESSION:
            self._receive_preauth(data, addr, now)
            return
        session = self.sessions.get(header.session_id)
        if session is None:
            # Most likely a client of a previous run of this server: tell it
            # to log in again (a reply smaller than the datagram, no MAC).
            reply = unknown_session_reply(header.session_id, len(data))
            if reply is not None:
                self._out.append((reply, addr))
            self.drops("unknown session", addr, now)
            return
        try:
            packet = decode_packet(data, session.conn.peer_key, header)
        except RemoteProtocolError as exc:
            self.drops("bad tag or frame", addr, now, exc)
            return
        self._receive_packet(session, packet, data, addr, now)

    def _receive_packet(
        self, session: Session, packet: Packet, data: bytes, addr: Address, now: float
    ) -> None:
        """A datagram of `session` (`data`), verified and decoded (`packet`)."""
        # Over a limit, the datagram's chunks are not recorded or acked (the
        # client resends them later); its acks are taken all the same.
        conn = session.conn
        new = conn.unseen(packet.frames)
        if not new:  # acks, pings, copies: nothing to pay for or withhold
            take = True
            cost: ChunkCost = _NO_COST
        else:
            cost = chunk_cost(new)
            take = self._may_take(session, new, cost, now)
        taken_before = conn.chunks_taken
        fresh = conn.receive_packet(
            packet, now, data=take, lazy_ack=bool(new) and _receipts_only(packet.frames)
        )
        if take and new:
            # The budgets pay for the chunks the connection took, after the
            # fact: one it refused (a receive cap) or a replayed datagram
            # comes again and must not be paid for each time, or the budget
            # drains with nothing taken and the sender waits for ever. It
            # took them all, as a rule: then they cost what was reckoned.
            if conn.chunks_taken - taken_before != len(new):
                cost = chunk_cost([f for f in new if conn.seen(f.seq)])
            self._charge(session, cost)
        if not fresh:
            self.drops("replayed or refused", addr, now)
            self._dirty[session.session_id] = session  # it may owe a re-ack
            return
        session.last_heard = now
        if addr != session.addr:
            self._probe_path(session, addr, len(data))
        self._dirty[session.session_id] = session
        self._collect(session, addr, now)
        if session.presence_due:  # acks may have made room under the output cap
            self._send_due_presence(session)

    def _may_take(self, session: Session, new: list[Stream], cost: ChunkCost, now: float) -> bool:
        """Whether to take the new chunks of a datagram (those not taken
        before: a copy costs nothing, `new`), which cost `cost` (`chunk_cost`): not
        requests or messages while the session's unacknowledged output is
        over its cap (their answers would grow it; receipts and a logout do
        not), not new messages while the server is short of memory, and
        within the user's budgets."""
        messages, requests, size, sends = cost
        if not size:
            return True
        conn = session.conn
        if (sends or requests) and conn.unacked_bytes >= self.config.max_unacked_output:
            # No notice either: it would add to the very output that is over.
            self.stats["withheld_output"] += 1
            self.drops("output cap: input waits for acks", session.addr, now, session.user.name)
            return False
        if (sends or requests) and self._group_holds:
            holds = self._group_holds.get(session.session_id)
            if holds is not None and (
                holds.count >= MAX_GROUP_HELD or holds.size >= MAX_GROUP_HELD_BYTES
            ):
                # What waits behind its requests is bounded: more of it
                # waits with its sender until an answer releases a hold,
                # whatever stream it comes on (a membership request may
                # come on the control stream and be held all the same).
                self.stats["withheld_group_hold"] += 1
                self.drops("group hold: input waits for answers", session.addr, now,
                           session.user.name)  # fmt: skip
                return False
        fanout = session.user.fanout_bucket
        copies = self._fanout_cost(session.user, new) if sends else 0
        if copies and fanout is None:
            cfg = self.config
            fanout = TokenBucket(cfg.max_fanout_rate, cfg.max_fanout_burst, now)
            session.user.fanout_bucket = fanout
        if (
            sends and fanout is not None and not fanout.ready(max(1, copies), now)
            and not _requests_only(new)
        ):  # fmt: skip
            # The fan-out budget holds every copy of the datagram's group
            # messages, or they all wait (one datagram's acks are one):
            # only a datagram costing more than the whole burst goes into
            # debt, from a full bucket. In debt, any new message waits.
            # Membership requests alone do not: what their entries cost is
            # known only where they are numbered, and paid there
            # (`_change_cost`; one that changes nothing costs nothing).
            self.stats["withheld_fanout"] += 1
            self.drops("fan-out budget: messages wait", session.addr, now, session.user.name)
            self._tell_limited(session, FANOUT_LIMITED, now)
            return False
        if sends and self.short_of_memory:
            self.stats["withheld_memory"] += 1
            self.drops("short of memory: messages wait", session.addr, now, session.user.name)
            self._tell_limited(session, SHORT_OF_MEMORY, now)
            return False
        return self._within_limits(session, messages + requests, size, now)

    def _fanout_cost(self, user: User, new: list[Stream]) -> int:
        """The copies of the group messages that start among `new` chunks:
        a SEND's first chunk on one of the user's groups' streams costs that
        group's other members (a direct message sharing the stream, one in
        4,095, is counted as if it were the group's: it may wait, never
        overspend). A membership request on the stream is no message: its
        entries are reckoned where it is numbered (`_change_cost`)."""
        # Only the streams in the datagram are looked up (`GroupTable.on_stream`):
        # walking all the user's groups cost 4 ms a message in 5,000 (audit7 N13).
        if user.key not in self.groups.streams_of:
            return 0
        copies = 0
        for f in new:
            if f.index != 0 or f.data[:1] != _SEND_KIND:
                continue
            most = 0
            for group_key in self.groups.on_stream(user.key, f.stream):
                group = self.groups.get(group_key)
                if group is not None:
                    most = max(most, len(group.members) - 1)
            copies += most
        return copies

    def _within_limits(self, session: Session, messages: int, size: int, now: float) -> bool:
        """Whether the user's message and byte budgets hold this much now
        (WHO, WATCH and TYPING count as messages); `_charge` spends them for
        what is then taken. Beyond them the datagram's chunks are withheld,
        and the user hears at most once a second."""
        user, cfg = session.user, self.config
        if user.msg_bucket is None or user.byte_bucket is None:
            user.msg_bucket = TokenBucket(cfg.user_msg_rate, cfg.user_msg_burst, now)
            user.byte_bucket = TokenBucket(cfg.user_byte_rate, cfg.user_byte_burst, now)
        # Both or neither: a message budget spent on a datagram the byte
        # budget then withholds would be paid again by every retransmission.
        if user.msg_bucket.ready(messages, now) and user.byte_bucket.ready(size, now):
            return True
        self.stats["rate_limited"] += 1
        self.drops("user rate limit", session.addr, now, user.name)
        self._tell_limited(session, "you are sending too fast; messages are delayed", now)
        return False

    def _charge(self, session: Session, cost: ChunkCost) -> None:
        """Spend the user's budgets on the chunks just taken, which cost
        `cost` (`_within_limits` said they fit, at the same `now`)."""
        messages, requests, size, _ = cost
        user = session.user
        if size and user.msg_bucket is not None and user.byte_bucket is not None:
            user.msg_bucket.spend(messages + requests)
            user.byte_bucket.spend(size)

    def _tell_limited(self, session: Session, text: str, now: float) -> None:
        """A RATE_LIMITED notice, at most one a second per user."""
        user = session.user
        if now - user.limited_at >= 1.0:
            user.limited_at = now
            self._send(session, Notice(ErrorCode.RATE_LIMITED, text))

    def _probe_path(self, session: Session, addr: Address, size: int) -> None:
        """A verified, fresh datagram from a new address: the client's NAT may
        have moved it, or someone replays from elsewhere. Ask that address to
        prove it holds the session key before any route moves (RFC 9000 9)."""
        probe = session.probe
        if probe is None or probe.addr != addr:
            probe = session.probe = Probe(addr)
        probe.received += size
        datagram = session.conn.make_probe((PathChallenge(probe.data),))
        if probe.sent + len(datagram) <= 3 * probe.received:
            probe.sent += len(datagram)
            self._out.append((datagram, addr))

    def _collect(self, session: Session, addr: Address, now: float) -> None:
        """Act on what the session's connection has delivered or had acked."""
        conn = session.conn
        while events := conn.take_events():
            for event in events:
                try:
                    if event.__class__ is PayloadReceived:  # nearly every event: in short
                        try:
                            message = decode_message(event.payload)
                        except RemoteProtocolError as exc:
                            self.drops("bad message", session.addr, now, exc)
                            continue
                        if event.stream == CONTROL_STREAM and message.__class__ is Send:
                            # A SEND belongs on its conversation's stream (the
                            # client sends it there; DESIGN: a stream is one
                            # conversation): the budgets reckon its cost by
                            # stream (`chunk_cost`, `_may_take`), so one on
                            # the control stream would pass them unpaid.
                            self.drops("bad message", session.addr, now,
                                       "a SEND on the control stream")  # fmt: skip
                            continue
                        self._dispatch(session, message, now)
                        continue
                    self._on_event(session, addr, event, now)
                except Exception:  # one bad message must not take the rest of the datagram
                    log.exception("bug while handling a message from %s", session.user.name)
                    self.drops("internal error", session.addr, now)
                if isinstance(event, ReassemblyExpired):
                    return  # the session ended: what else it had goes with it

    def _on_event(self, session: Session, addr: Address, event: Event, now: float) -> None:
        """Any event but `PayloadReceived` (`_collect` takes those itself)."""
        if isinstance(event, PayloadAcked):
            # The sender's client holds the receipts (a DELIVERED's handle is
            # its message id, a DELIVEREDS' the list of them): forget them.
            handle = event.handle
            if isinstance(handle, str) and handle != ACCOUNT_GONE:  # a PRESENCE: its user's key
                sent = session.presence_sent
                if sent is not None:
                    sent.discard(handle)
                    if not sent:
                        session.presence_sent = None
                if session.presence_due:
                    self._send_due_presence(session)
                return
            if handle == ACCOUNT_GONE:
                session.closing = True  # its client knows: ended after this flush
                self._dirty[session.session_id] = session
                return
            if isinstance(handle, _GroupNotices):
                self._group_reached_acked(session, handle)
                return
            done = [handle] if isinstance(handle, MsgId) else handle
            if isinstance(done, list):
                if session.receipts is not None:
                    self._receipts_acked(session, done)
        elif isinstance(event, ReassemblyExpired):
            self._reassembly_expired(session, now)
        elif isinstance(event, PathResponded):
            probe = session.probe
            if probe is not None and probe.addr == addr and probe.data == event.data:
                log.info("session of %s moved from %s to %s", session.user.name,
                         format_address(*session.addr), format_address(*addr))  # fmt: skip
                session.addr = addr
                session.probe = None
                session.conn.send_ping()  # resume at once on the new path

    def _reassembly_expired(self, session: Session, now: float) -> None:
        """A long message the session started took no fragment for
        REASSEMBLY_TIMEOUT s: its connection dropped it and gave its room
        back (a sender that never finishes its messages would otherwise
        hold the shared reassembly budget from everyone). Its fragments were
        acked, so the client would never send them again: the session ends
        instead, and the client is told at once (UNKNOWN_SESSION). It logs
        in again and resends its outbox in order under the same ids (the
        dedup makes that safe), so nothing is lost; nothing behind the
        message on its stream was taken yet, so the order holds too."""
        log.info("a message from %s took no fragment for %.0f s: session ended, its client "
                 "logs in again and resends it", session.user.name, REASSEMBLY_TIMEOUT)  # fmt: skip
        self.stats["reassembly_expired"] += 1
        reply = unknown_session_reply(session.session_id, MAX_FRAMES_SIZE)
        if reply is not None:
            self._out.append((reply, session.addr))
        self._end_session(session, now)

    # --- login --------------------------------------------------------------

    def _receive_preauth(self, data: bytes, addr: Address, now: float) -> None:
        if len(data) < MIN_PREAUTH_REQUEST:
            self.drops("unpadded pre-login datagram", addr, now)
            return
        packet = decode_packet(data, None)
        frames = [f for f in packet.frames if isinstance(f, (Hello, Login))]
        if len(frames) != 1:
            self.drops("pre-login datagram without one HELLO or LOGIN", addr, now)
            return
        frame = frames[0]
        size = len(data)
        if isinstance(frame, Hello):
            self._reply(self.desk.challenge(frame, addr, now), size, addr, now)
            return
        if frame.nonce in self._registering:
            return  # its account is on the way to the disk; the WELCOME follows
        tickets = [f.ticket for f in packet.frames if isinstance(f, TicketFrame)]
        verdict = self.desk.check(frame, addr, now, ticket=tickets[0] if tickets else None,
                                  defer_dh=self.key_exchanges.deferred)  # fmt: skip
        if verdict is None:
            self.drops("login with a stale or forged cookie", addr, now)
        elif isinstance(verdict, Answered):
            # A retransmitted LOGIN (or a replay): the same answer, no new work.
            if verdict.datagram is not None and len(verdict.datagram) <= size:
                self._out.append((verdict.datagram, addr))
        elif isinstance(verdict, Unwrap):
            self._unwrap(verdict, addr, size, now)
        else:
            self._on_verdict(frame, verdict, addr, size, now)

    def _on_verdict(
        self, frame: Login, verdict: Verified | Refused, addr: Address, size: int, now: float,
        arrived: float | None = None,
    ) -> None:  # fmt: skip
        """Open the session of a verified LOGIN (or answer its refusal);
        `arrived`: when the LOGIN came, if its verdict waited (a registration)."""
        arrived = now if arrived is None else arrived
        if isinstance(verdict, Refused):
            self._answer(frame, verdict, size, addr, now)
            return
        user = self.users.get(verdict.key)
        if len(self.sessions) >= self.config.max_sessions and (
            user is None or not isinstance(self.router.locate(user), Session)
        ):
            self.stats["login_server_full"] += 1
            if now - self._full_logged >= self.config.log_interval:
                self._full_logged = now
                log.warning("limit hit: the server is full (--max-sessions %d): logins wait",
                            self.config.max_sessions)  # fmt: skip
            self._answer(frame, Refused(frame.nonce, ErrorCode.SERVER_ERROR, "the server is full; "
                                        "try later"), size, addr, now)  # fmt: skip
            return
        if user is None:
            user = self.users[verdict.key] = User(verdict.name, verdict.key, verdict.account)
            for watcher in self._awaited.pop(verdict.key, ()):
                self._awaiting.get(watcher, {}).pop(verdict.key, None)
                self._add_contact(user, watcher)
            log.info("registered %s", verdict.name)
            self.stats["registrations"] += 1
            # The WELCOME waits until the account is on the disk: a name,
            # once given, stays bound to its password.
            self._registering.add(frame.nonce)
            self._unstored.add(verdict.key)

            def registered(user: User = user, login: Login = frame) -> None:
                self._registering.discard(login.nonce)
                self._unstored.discard(user.key)
                self._open_session(user, login, verdict, addr, size, self._now, arrived)

            self.store.submit(StoreAccount(verdict.key, verdict.account), registered)
            return
        if verdict.key in self._unstored:
            # A second login to an account still on its way to the disk (two
            # clients registering one name at once): it waits for it too.
            self._registering.add(frame.nonce)

            def stored(user: User = user, login: Login = frame) -> None:
                self._registering.discard(login.nonce)
                self._open_session(user, login, verdict, addr, size, self._now, arrived)

            self.store.submit(Sync(), stored)
            return
        self._open_session(user, frame, verdict, addr, size, now, arrived)

    def _unwrap(self, pending: Unwrap, addr: Address, size: int, now: float) -> None:
        """Have the pool compute a registration's DH secret; the verdict
        follows on the loop (`key_exchange_done`). Retransmissions of the
        LOGIN wait for it; beyond what `KeyExchanges` holds (bounded), the
        client hears the server is busy."""
        login = pending.login
        if not self.key_exchanges.request(pending.job, (pending, addr, size, now)):
            self.stats["registrations_busy"] += 1
            text = "the server is busy registering new accounts; try again in a few seconds"
            self._answer(login, Refused(login.nonce, ErrorCode.RATE_LIMITED, text), size, addr, now)
            return
        self._registering.add(login.nonce)
        # A pool that is shut down or broken fails the request at once: the
        # secret is then computed here, and the verdict given now.
        self.key_exchange_done(now)

    def _unwrapped(
        self, pending: Unwrap, secret: bytes | None, addr: Address, size: int, now: float,
        arrived: float,
    ) -> None:  # fmt: skip
        """On the loop: a registration's DH secret is back (its LOGIN came at `arrived`)."""
        login = pending.login
        self._registering.discard(login.nonce)
        verdict = self.desk.finish(pending, secret, addr, now)
        self._on_verdict(login, verdict, addr, size, now, arrived)

    def _answer(self, login: Login, frame: Frame, limit: int, addr: Address, now: float) -> None:
        """Answer a verified LOGIN, and record the answer for its retransmissions."""
        datagram = self._reply(frame, limit, addr, now)
        if datagram is not None:
            self.desk.answered(login, datagram)

    def _reply(self, frame: Frame, limit: int, addr: Address, now: float) -> bytes | None:
        datagram = encode_packet(Packet(NO_SESSION, 0, (frame,)), None)
        if len(datagram) > limit:  # never amplify
            self.drops("reply would be larger than the request", addr, now)
            return None
        self._out.append((datagram, addr))
        return datagram

    def _open_session(self, user: User, login: Login, verdict: Verified, addr: Address, size: int,
                      now: float, arrived: float | None = None) -> None:  # fmt: skip
        arrived = now if arrived is None else arrived
        old = self.router.locate(user)
        if isinstance(old, Session):
            if old.instance_id == login.instance_id and old.login_at > arrived:
                # A stale attempt of the client that holds `old`: it started
                # over from HELLO (its LOGIN went unanswered for 3 s) and took
                # the newer attempt's WELCOME, but this one's verdict came
                # back later (the key-exchange pool returns secrets in the
                # order they are done). Replacing `old` would leave the client
                # on a session the server forgot and its mail on one nobody
                # reads. No answer: the client waits for no WELCOME of it.
                self.stats["login_stale"] += 1
                log.info("%s: a stale login attempt of the client ignored (it is logged in "
                         "with a newer one)", user.name)  # fmt: skip
                return
            self._take_over(old, login.instance_id, now)
        session_id = secrets.token_bytes(16)
        to_server, to_client = session_keys(verdict.client_key, verdict.message)
        conn = Connection(
            session_id, to_client, now, peer_key=to_server,
            rto_min=self.config.rto_min, rto_max=self.config.rto_max, budget=self._reassembly,
            peer_late_ack=GROUP_ACK_DELAY,  # its lazy chunks are group entries (`_send_group`)
        )  # fmt: skip
        session = Session(session_id, user, addr, conn, login.instance_id, now, arrived)
        self.sessions[session_id] = session
        self._place_expiry(session)
        self.router.bind(user, session, now)
        bisect.insort(self._online, user.key)
        self.stats["logins"] += 1
        log.info("%s logged in from %s", user.name, format_address(*addr))
        signature = server_signature(user.account.server_key, verdict.message)
        self._answer(login, Welcome(login.nonce, session_id, signature, user.name), size, addr,
                     now)  # fmt: skip
        if not verdict.ticketed:
            # The owner's proof for later logins (skips the per-name failure
            # budget strangers can fill), inside the MAC'd session.
            self._send(session, Ticket(self.desk.ticket(user.key, login.instance_id,
                                                        user.account)))  # fmt: skip
        # What waited for this user, read from the disk a page at a time:
        # messages in order, and receipts. Anything accepted before this
        # point is older than the reads asked for here, so they find it.
        # A shared store may hold what other nodes accepted: always read it.
        if user.mailbox_count or self.shared_store:
            session.mail = Pager(behind=True, missed=self._next_msg_id - 1)
            self._page_mail(session)
        if user.notice_count or self.shared_store:
            session.receipts = Pager(behind=True, missed=self._next_msg_id - 1)
            self._page_receipts(session)
        self._start_groups(session)
        self._announce(user, online=True)
        self._dirty[session_id] = session

    def _take_over(self, old: Session, instance_id: int, now: float) -> None:
        """A new login of `old`'s user (here or on another node) by client
        `instance_id`: the same client replaces its session silently; another
        one ends it with a BYE `logged_in_elsewhere`."""
        user = old.user
        if old.instance_id == instance_id:
            log.info("%s logged in again from the same client; old session replaced", user.name)
            self._end_session(old, now, quiet=True)
            return
        log.info("%s logged in elsewhere; old session told and closed", user.name)
        self._bye(old, ErrorCode.LOGGED_IN_ELSEWHERE, "you logged in from another place", now)

    def _end_session(self, session: Session, now: float, *, quiet: bool = False) -> None:
        if self.sessions.pop(session.session_id, None) is None:
            return
        session.conn.close()  # what it held for reassembly goes back to the shared budget
        self._dirty.pop(session.session_id, None)
        user = session.user
        if self.router.locate(user) is session:
            self.router.unbind(user, session, now)
            index = bisect.bisect_left(self._online, user.key)
            if index < len(self._online) and self._online[index] == user.key:
                del self._online[index]
            if not quiet:
                self._announce(user, online=False)
            # Its client WATCHes them again at its next login.
            self._forget_awaited(user.key)
        # Its mark: the next session of this instance asks the disk first.
        self._hwm.pop((user.key, session.instance_id), None)
        # What it was handed and did not acknowledge stays on the disk for
        # the next login; the memory goes with the session.
        if self._held:
            self._write_held(session)
        session.mail = session.receipts = None
        session.group_mail = session.group_notices = None
        if self._group_holds:
            # What it sent behind its requests: its client sends it again
            # at its next login (the requests' answers, if any, go there).
            self._drop_holds(session.session_id)

    # --- chat ---------------------------------------------------------------

    def _dispatch(self, session: Session, message: Message, now: float) -> None:
        if isinstance(message, Send):
            self._on_send(session, message)
        elif isinstance(message, Receipt):
            self._on_receipts(session, (message.server_msg_id,))
        elif isinstance(message, Receipts):
            ids: Iterable[int] = message.server_msg_ids
            if session.group_mail is not None:
                ids = self._on_group_receipts(session, ids)
            self._on_receipts(session, ids)
        elif isinstance(message, Who):
            self._on_who(session, message)
        elif isinstance(message, Typing):
            self._on_typing(session, message, now)
        elif isinstance(message, Watch):
            self._on_watch(session, message)
        elif isinstance(message, ChangePassword):
            self._on_change_password(session, message, now)
        elif isinstance(message, DeleteAccount):
            self._on_delete_account(session, message, now)
        elif isinstance(message, GroupRequest):
            self._on_group_request(session, message)
        elif isinstance(message, Logout):
            log.info("%s logged out", session.user.name)
            session.closing = True  # ended after this flush, which acks the LOGOUT
        else:
            self.drops("message not for the server", session.addr, now, type(message).__name__)

    def _on_send(self, session: Session, send: Send) -> None:
        user = session.user
        instance_id, client_seq = send.msg_id
        if client_seq >= MAX_CLIENT_SEQ:
            # Clients count from 1; SQLite integers stop at 2**63 - 1.
            self._fail(session, send.msg_id, ErrorCode.SERVER_ERROR,
                       "message id out of range: client_seq must be below 2**63")  # fmt: skip
            return
        to_key = self._recipient_keys.get(send.to)
        if to_key is None:
            try:
                if is_group_address(send.to):  # '#' and the group's key: its own namespace
                    to_key = "#" + name_key(normalize_name(send.to[1:]))
                else:
                    to_key = name_key(normalize_name(send.to))
            except LocalProtocolError as exc:
                self._fail(session, send.msg_id, ErrorCode.INVALID_NAME, str(exc))
                return
            if len(self._recipient_keys) >= MAX_RECIPIENT_KEYS:
                self._recipient_keys.clear()
            self._recipient_keys[send.to] = to_key
        dedup = (user.key, instance_id, client_seq)
        if self._looking_up:
            waiting = self._looking_up.get(dedup)
            if waiting is not None:  # the disk is being asked about this id already
                if len(waiting) < MAX_WAITING_RETRIES:  # beyond: the client resends at login
                    waiting.append((send, to_key))
                return
        # Without a mark for its instance (the session's first messages, or
        # a copied profile's outbox resent with its old instance's ids), a
        # SEND may be an old retry: the disk is asked.
        mark = self._hwm.get((user.key, instance_id))
        if dedup in self._accepted or (self._early and dedup in self._early):
            self._take_or_answer(session, send, to_key)
        elif (
            mark is None
            or client_seq <= mark
            or (self._lookups and (user.key, instance_id) in self._lookups)
        ):
            # Maybe an older retry: the store looks it up (the loop never
            # waits on the disk) and the answer follows.
            self._looking_up[dedup] = [(send, to_key)]
            self._lookups[(user.key, instance_id)] += 1
            read = Read(FindDedup(*dedup))
            self.store.submit(read, functools.partial(self._dedup_found, user, dedup, read))
        else:
            self._take(session, send, to_key, dedup, mark)

    def _take_or_answer(self, session: Session, send: Send, to_key: str) -> None:
        """A SEND whose id is not on the disk: a retry of one accepted and
        not yet committed, or a new message."""
        user = session.user
        known = self._accepted.get((user.key, *send.msg_id))
        if known is None:
            early = self._early.get((user.key, *send.msg_id)) if self._early else None
            if early is None:
                self._take(session, send, to_key)
            elif early[0].recipient_key != to_key or early[0].text != send.text:
                self._fail(session, send.msg_id, ErrorCode.DUPLICATE_ID, DUPLICATE_ID_TEXT)
            else:  # told before any write: the same answers again, at once
                self._queue_delivered(session, send.msg_id, early[1])
                self._queue_accept(session, send.msg_id, early[0].server_msg_id)
            return
        server_msg_id, known_to, known_text = known
        if known_to != to_key or known_text != send.text:
            self._fail(session, send.msg_id, ErrorCode.DUPLICATE_ID, DUPLICATE_ID_TEXT)
            return
        # A retry of a message we already hold: the same answer, no second
        # copy; it is still on its way to the disk, so the answer waits too.
        msg_id = send.msg_id
        if to_key[0] == "#":
            self._group_accept_again(user, msg_id, server_msg_id)
            return
        self.store.submit(Sync(), lambda: self._accept(user, msg_id, server_msg_id, None))

    def _dedup_found(self, user: User, dedup: tuple[str, int, int], read: Read) -> None:
        """The store's answer for SENDs at or below their instance's
        high-water mark: a retry (the same ACCEPT), a reused id (FAIL), or a
        new message."""
        sends = self._looking_up.pop(dedup, [])
        instance = dedup[:2]
        self._lookups[instance] -= 1
        if self._lookups[instance] <= 0:
            del self._lookups[instance]
        session = self.router.locate(user)
        if not isinstance(session, Session) or not read.ok:
            return  # its client resends them at its next login
        for send, to_key in sends:
            if read.result is None:  # below the mark but never accepted
                self._take_or_answer(session, send, to_key)
                continue
            server_msg_id, digest, delivered_to = read.result
            # Keys stored before digests were kept take any content, as before.
            if digest is None or digest == content_digest(to_key, send.text):
                if to_key[0] == "#":
                    self._group_accept_again(user, send.msg_id, server_msg_id)
                    continue
                if delivered_to is not None:  # never written: no receipt queued either
                    self._queue_delivered(session, send.msg_id, delivered_to)
                self._queue_accept(session, send.msg_id, server_msg_id)
            else:
                self._fail(session, send.msg_id, ErrorCode.DUPLICATE_ID, DUPLICATE_ID_TEXT)

    def _take(
        self, session: Session, send: Send, to_key: str,
        dedup: tuple[str, int, int] | None = None, mark: int | None = None,
    ) -> None:  # fmt: skip
        """A new message (`dedup`: its key, if the caller has it; `mark`: its
        instance's high-water mark, below this message, if known): check it,
        number it, store it, offer it."""
        if to_key[0] == "#":
            self._take_group(session, send, to_key)
            return
        user = session.user
        text = send.text
        data = text.encode("utf-8")  # (its size; the DELIVER carries these bytes)
        size = len(data)
        if size > MAX_TEXT_BYTES:
            self._fail(
                session,
                send.msg_id,
                ErrorCode.TOO_LONG,
                f"{size} bytes is over the limit",
            )
            return
        recipient = self.users.get(to_key)
        if recipient is None:
            self._no_recipient(session, send, to_key)
            return
        if (
            recipient.mailbox_count >= self.config.mailbox_messages
            or recipient.mailbox_bytes + size > self.config.mailbox_bytes
        ):
            self._fail(
                session,
                send.msg_id,
                ErrorCode.MAILBOX_FULL,
                f"{recipient.name}'s mailbox is full",
            )
            return
        server_msg_id = self._next_msg_id
        self._next_msg_id = server_msg_id + 1
        if server_msg_id + 1 >= self._reserve_at:
            self._reserve_at = self.store.reserve_ids(server_msg_id + 1)
        msg_id = send.msg_id
        instance_id, client_seq = msg_id
        if dedup is None:
            dedup = (user.key, instance_id, client_seq)
        self._accepted[dedup] = (server_msg_id, to_key, text)
        if instance_id == session.instance_id:  # no mark for other instances: see __init__
            if mark is not None:  # (below client_seq: see `_on_send`)
                self._hwm[(user.key, instance_id)] = client_seq
            elif client_seq > self._hwm.get((user.key, instance_id), -1):
                self._hwm[(user.key, instance_id)] = client_seq
        sender, sent_ms = user.name, int(self._wall_clock() * 1000)
        stored = StoredMessage(server_msg_id, to_key, user.key, sender, instance_id, client_seq,
                               text, sent_ms)  # fmt: skip
        recipient.mailbox_count += 1
        recipient.mailbox_bytes += size
        self.stats["messages"] += 1
        self.message_bytes += size
        # ACCEPT waits for the commit; forwarding does not.
        # (a partial, not a lambda: a closure would make `user` and the rest
        # cell variables, slower at every use in this function)
        write = StoreMessage(stored)
        self.store.submit(
            write, functools.partial(self._accept, user, msg_id, server_msg_id, dedup)
        )
        route = recipient.session if self._local_routes else self.router.locate(recipient)
        if isinstance(route, Session) and not self.shared_store:
            pager = route.mail
            if (
                pager is not None
                and not pager.behind
                and len(pager.items) < MAILBOX_WINDOW
                and pager.bytes + size <= MAILBOX_WINDOW_BYTES
            ):
                # The usual case, in short: `_hand_over` in line, its DELIVER
                # packed from the fields (no `Deliver` record).
                pager.items[server_msg_id] = _new_tuple(
                    Entry, (server_msg_id, msg_id, user.key, sender, text, sent_ms, size)
                )
                pager.bytes += size
                if server_msg_id > pager.cursor:
                    pager.cursor = server_msg_id
                deliver = encode_deliver(server_msg_id, instance_id, client_seq, sender, data,
                                         sent_ms)  # fmt: skip
                route.conn.send(deliver, conversation_stream(sender), None)
                self._dirty[route.session_id] = route
            else:
                self._offer_mail(route, stored, size, msg_id)
            # Its receipt may come back before the commit: wait for it a
            # little; then it needs no write at all (`_receipted_unwritten`).
            if self._withdraw is not None:
                self._unwritten[server_msg_id] = write
            self._expecting.add(server_msg_id)
            if self._hold_until is None:
                self._hold_until = self._now + COMMIT_WAIT
        elif self.shared_store:
            # A cluster: the recipient's node hands it over from the shared
            # mailbox once it is there (`mail_waiting`), in the mailbox's one
            # order, wherever the recipient is by then.
            if not isinstance(route, Session):
                self.stats["routed_elsewhere"] += 1
        elif isinstance(route, str):
            # On another node: the message waits in the store, which that
            # node reads (the cluster's forwarding is issue 15).
            self.stats["routed_elsewhere"] += 1
        # (None: offline; it waits in the mailbox for the next login)
        if recipient.key not in user.contacts:
            self._add_contact(user, recipient.key)
            self._add_contact(recipient, user.key)
            self._tell_presence(session, recipient, route is not None)
            if isinstance(route, Session):
                self._tell_presence(route, user, True)

    def _no_recipient(self, session: Session, send: Send, to_key: str) -> None:
        """A SEND to a name with no account. Deleted lately: a final FAIL
        (nobody may take the name yet, and whoever does later must not get
        what was meant for the old owner). Never registered: NO_SUCH_USER,
        which a client keeps in its outbox, and the sender awaits the name
        (bounded: `_await`), so it hears, as a PRESENCE, when the name is
        registered and sends it then."""
        name = normalize_name(send.to)
        if self._quarantined(to_key) is not None:
            self._fail(session, send.msg_id, ErrorCode.ACCOUNT_DELETED,
                       f"{name} deleted their account")  # fmt: skip
            return
        self._await(session.user.key, to_key)
        self._fail(session, send.msg_id, ErrorCode.NO_SUCH_USER,
                   f"there is no user {name!r} yet; the message waits in your outbox and goes "
                   f"when {name} registers")  # fmt: skip

    def _new_id(self) -> int:
        """The next server_msg_id (also a receipt's seq): never reused."""
        new = self._next_msg_id
        self._next_msg_id += 1
        if self._next_msg_id >= self._reserve_at:
            self._reserve_at = self.store.reserve_ids(self._next_msg_id)
        return new

    def _accept(
        self, sender: User, msg_id: MsgId, server_msg_id: int, dedup: tuple[str, int, int] | None
    ) -> None:
        """After the commit: tell the sender, on whatever session it has now
        (if none, its client resends and gets the same answer). Committed,
        the message's dedup key is the disk's to remember."""
        if dedup is not None:
            self._accepted.pop(dedup, None)
            if self._unwritten:
                self._unwritten.pop(server_msg_id, None)
        session = sender.session if self._local_routes else self.router.locate(sender)
        if isinstance(session, Session):
            # (`_queue_accept` in line: this runs for every message written)
            queued = self._accepts.get(session.session_id)
            if queued is None:
                queued = self._accepts[session.session_id] = (session, [])
            queued[1].append((msg_id, server_msg_id))
        if dedup is not None and self._tell_at_accept:
            told = self._tell_at_accept.pop(dedup, None)
            if told is not None:  # receipted before this commit: DELIVERED follows the ACCEPT
                self._tell_sender(dedup[0], *told)

    def _queue_accept(self, session: Session, msg_id: MsgId, server_msg_id: int) -> None:
        """Queue an ACCEPT for the pass's batch (ids, not an `Accept`: one
        object fewer per message)."""
        entry = self._accepts.get(session.session_id)
        if entry is None:
            entry = self._accepts[session.session_id] = (session, [])
        entry[1].append((msg_id, server_msg_id))

    def _queue_delivered(self, session: Session, msg_id: MsgId, to: str) -> None:
        entry = self._delivereds.get(session.session_id)
        if entry is None:
            entry = self._delivereds[session.session_id] = (session, {})
        entry[1].setdefault(to, []).append(msg_id)

    def _send_batches(self) -> None:
        """The pass's ACCEPTs and DELIVEREDs: one message per session (per
        recipient for DELIVEREDs) and up to BATCH_MAX of them, instead of one
        each. A DELIVERED is acked by its message id, a batch by the list of
        its ids (see `_collect`). A session that ended meanwhile gets none:
        its client resends the SEND, and receipts wait for the next login.
        DELIVEREDs go first: on the one control stream, in order, a client
        never has the ACCEPT of a message told both in this pass without its
        DELIVERED (`_receipted_unwritten` depends on it; a DELIVERED implies the
        ACCEPT to a client, which reports both)."""
        delivereds, self._delivereds = self._delivereds, {}
        for session, by_recipient in delivereds.values():
            if self.sessions.get(session.session_id) is not session:
                continue
            for to, msg_ids in by_recipient.items():
                if len(msg_ids) == 1:
                    self._send(session, Delivered(msg_ids[0], to), handle=msg_ids[0])
                    continue
                for ids in batches(msg_ids):
                    self._send(session, Delivereds(to, tuple(ids)), handle=ids)
        accepts, self._accepts = self._accepts, {}
        for session, items in accepts.values():
            if self.sessions.get(session.session_id) is not session:
                continue
            if len(items) == 1:
                self._send(session, Accept(*items[0]))
                continue
            for part in batches(items):
                self._send(session, Accepts(tuple(part)))
        self._group_lows.clear()
        if self._group_reached:
            self._send_group_reached()

    # --- mailboxes and receipts: on the disk, handed over a window at a time ---

    def _offer_mail(self, session: Session, m: StoredMessage, size: int, msg_id: MsgId) -> None:
        """A message accepted for an online recipient: hand it over now if
        nothing waits before it and the window has room; else it waits on
        the disk for a later page."""
        pager = session.mail
        if pager is None:
            pager = session.mail = Pager(behind=False)
        if not pager.behind and (
            not pager.items
            or (len(pager.items) < MAILBOX_WINDOW and pager.bytes + size <= MAILBOX_WINDOW_BYTES)
        ):
            self._hand_over(session, pager, m, size, msg_id)
            return
        pager.behind = True
        pager.missed = max(pager.missed, m.server_msg_id)
        self._page_mail(session)

    def _hand_over(
        self, session: Session, pager: Pager[int, Entry], m: StoredMessage, size: int,
        msg_id: MsgId,
    ) -> None:  # fmt: skip
        entry = _new_tuple(Entry, (m.server_msg_id, msg_id, m.sender_key, m.sender, m.text,
                                   m.sent_ms, size))  # fmt: skip
        pager.items[m.server_msg_id] = entry
        pager.bytes += size
        if m.server_msg_id > pager.cursor:
            pager.cursor = m.server_msg_id
        deliver = encode_deliver(m.server_msg_id, msg_id.instance_id, msg_id.client_seq, m.sender,
                                 m.text.encode("utf-8"), m.sent_ms)  # fmt: skip
        session.conn.send(deliver, conversation_stream(m.sender), None)
        self._dirty[session.session_id] = session

    def _page_mail(self, session: Session) -> None:
        """Read the next page of the session's mailbox if something waits
        there and the window has room enough."""
        pager = session.mail
        if pager is None or not pager.behind or pager.reading:
            return
        free = MAILBOX_WINDOW - len(pager.items)
        free_bytes = MAILBOX_WINDOW_BYTES - pager.bytes
        if pager.items and (free < PAGE_MIN or free_bytes < PAGE_MIN_BYTES):
            return
        pager.reading = True
        read = Read(ReadMailbox(session.user.key, pager.cursor, free, free_bytes))
        upto = self._next_msg_id - 1  # everything accepted so far is older than the read
        if self.shared_store:
            # What the shared store said waits is there before it says so:
            # a read that starts now finds it (or finds it receipted).
            upto = max(upto, pager.missed)
        self.store.submit(read, functools.partial(self._mail_paged, session, pager, read, upto))

    def _mail_paged(self, session: Session, pager: Pager[int, Entry], read: Read,
                    upto: int) -> None:  # fmt: skip
        pager.reading = False
        if session.mail is not pager or not read.ok:
            return  # the session ended (the next login reads again), or the read failed
        rows: list[StoredMessage]
        rows, more = read.result
        for m in rows:
            if self._held_ids and m.server_msg_id in self._held_ids:
                # Receipted (by an earlier session), its write held until its
                # sender acks the DELIVERED (`_tell_and_hold`): not again.
                pager.cursor = max(pager.cursor, m.server_msg_id)
                continue
            if m.server_msg_id > pager.cursor and m.server_msg_id not in pager.items:
                msg_id = MsgId(m.instance_id, m.client_seq)
                self._hand_over(session, pager, m, len(m.text.encode("utf-8")), msg_id)
        # A short page had everything accepted before the read; what was
        # accepted since and waits too is newer than `upto`.
        if not more and pager.missed <= max(pager.cursor, upto):
            pager.behind = False
        else:
            self._page_mail(session)

    def _on_receipts(self, session: Session, ids: Iterable[int]) -> None:
        """The recipient's client has these messages (a RECEIPTS' ids, or a
        RECEIPT's one): one pass over them (issue 18, round 3). A message
        whose write may still be withdrawn, of a sender whose session is
        here, may need no write at all (`_receipted_unwritten`, for the
        batch's such messages at once); the others take the durable path
        (`_receipt_written`). The mailbox is paged once, after the batch."""
        pager = session.mail
        if pager is None:
            # Group entries', repeated receipts, or for messages handed to an
            # earlier session: those stay on the disk, come again and are
            # receipted again.
            for server_msg_id in ids:
                self._on_group_receipt(session, server_msg_id)
            return
        items = pager.items
        user = session.user
        unwritten = self._unwritten
        expecting = self._expecting
        early: list[tuple[Entry, StoreMessage, Session]] | None = None
        early_room = early_bytes = 0  # what MAX_EARLY and MAX_EARLY_BYTES leave
        sender_key: str | None = None  # the last unwritten message's sender ...
        route: Session | None = None  # ... and its session, if it can be told now
        count = total = 0  # messages out of the mailbox, their bytes
        for server_msg_id in ids:
            entry = items.pop(server_msg_id, None)
            if entry is None:
                self._on_group_receipt(session, server_msg_id)
                continue
            if expecting:
                expecting.discard(server_msg_id)
            size = entry.size
            count += 1
            total += size
            write = unwritten.get(server_msg_id) if unwritten else None
            if write is not None:
                if entry.sender_key != sender_key:
                    sender_key = entry.sender_key
                    route = self._early_route(sender_key)
                if early is None:
                    early = []
                    early_room = MAX_EARLY - len(self._early)
                    early_bytes = MAX_EARLY_BYTES - self._early_bytes
                if (
                    route is not None
                    and route.instance_id == entry.msg_id.instance_id
                    and len(early) < early_room
                    and size <= early_bytes
                ):
                    early.append((entry, write, route))
                    early_bytes -= size
                    continue
            self._receipt_written(session, entry)
        pager.bytes -= total
        user.mailbox_count -= count
        user.mailbox_bytes -= total
        if early:
            self._receipted_unwritten(session, early)
        if pager.behind:  # else `_page_mail` has nothing to read: saves a call
            self._page_mail(session)

    def _early_route(self, sender_key: str) -> Session | None:
        """The session of a sender here that may be told DELIVERED and ACCEPT
        of a message never written (`_receipted_unwritten`), or None."""
        sender = self.users.get(sender_key)
        if sender is None or self._withdraw is None:
            return None
        route = sender.session if self._local_routes else self.router.locate(sender)
        if not isinstance(route, Session) or route.closing:
            return None
        return route

    def _receipted_unwritten(
        self, session: Session, receipted: list[tuple[Entry, StoreMessage, Session]]
    ) -> None:
        """The recipient's client (of `session`) receipted these messages
        before the server wrote them: it holds them durably (it commits
        before it receipts), so they need no write (MAX_EARLY says what
        stands in for one). Their senders' sessions (the client instances
        that sent them) are here: of each message whose write can still be
        withdrawn (`ServerStore.withdraw`, for all of them at once), the
        sender is told DELIVERED, then ACCEPT, now: one stream, in order, so
        a client that has the ACCEPT has the DELIVERED (with no queued
        receipt on the disk, a DELIVERED lost after an ACCEPT would never
        come again); one that has neither sends the message again. A write
        the store thread has taken already takes the durable path: it goes
        on, the receipt is queued, DELIVERED follows the ACCEPT. The dedup
        keys go to the disk in one lazy write (`StoreDedup`), whose callback
        drops what stood in for them in memory."""
        assert self._withdraw is not None  # (`_early_route` found one)
        self._withdraw([write for _, write, _ in receipted])
        unwritten, accepted, early = self._unwritten, self._accepted, self._early
        to = session.user.name
        keys: list[tuple[str, int, int]] = []
        dedups: list[tuple[StoredMessage, str]] = []
        lists: tuple[Session, list[MsgId], list[tuple[MsgId, int]]] | None = None
        size = 0
        for entry, write, route in receipted:
            if write.state != WITHDRAWN:
                self._receipt_written(session, entry)
                continue
            server_msg_id = entry.server_msg_id
            del unwritten[server_msg_id]
            msg_id = entry.msg_id
            dedup = (entry.sender_key, msg_id[0], msg_id[1])
            del accepted[dedup]
            early[dedup] = item = (write.message, to)
            dedups.append(item)
            keys.append(dedup)
            size += entry.size
            if lists is None or lists[0] is not route:
                lists = self._notice_lists(route, to)
            lists[1].append(msg_id)
            lists[2].append((msg_id, server_msg_id))
        if keys:
            self._early_bytes += size
            self.stats["messages_unwritten"] += len(keys)
            # The dedup keys go to the disk lazily; until they are there, the entries answer.
            written = functools.partial(self._early_written, keys, size)
            self.store.submit(StoreDedup(dedups), written)

    def _notice_lists(self, session: Session, to: str
                      ) -> tuple[Session, list[MsgId], list[tuple[MsgId, int]]]:  # fmt: skip
        """The pass's DELIVEREDs of `to`'s receipts and its ACCEPTs, queued
        for `session` (as `_queue_delivered` and `_queue_accept` queue them)."""
        delivereds = self._delivereds.get(session.session_id)
        if delivereds is None:
            delivereds = self._delivereds[session.session_id] = (session, {})
        accepts = self._accepts.get(session.session_id)
        if accepts is None:
            accepts = self._accepts[session.session_id] = (session, [])
        return session, delivereds[1].setdefault(to, []), accepts[1]

    def _receipt_written(self, session: Session, entry: Entry) -> None:
        """A receipt of a message that is written (or will be: its write
        was taken by the store thread), its mailbox counts taken off already."""
        user = session.user
        seq = self._next_msg_id  # the receipt's place in the sender's queue (`_new_id`)
        self._next_msg_id = seq + 1
        if seq + 1 >= self._reserve_at:
            self._reserve_at = self.store.reserve_ids(seq + 1)
        sender = self.users.get(entry.sender_key)
        # The receipt's write is lazy (server_store.LAZY_HOLD): nothing waits
        # for it. A crash that loses it hands the message over again at the
        # next login, under the same message id (the client's dedup key),
        # and the sender hears DELIVERED again (states only move forward).
        # Received before its message's commit: the sender hears of it,
        # which implies its ACCEPT, with the ACCEPT, once the message is on
        # disk (`_accept`), in the same datagram; not after a commit of its
        # own.
        instance_id, client_seq = entry.msg_id
        delivered = MarkDelivered(entry.server_msg_id, entry.sender_key, instance_id, client_seq,
                                  user.name, user.key, entry.size, seq)  # fmt: skip
        if self.shared_store:
            # The sender's node hands the receipt over from the shared
            # queue once it is there (`receipts_waiting`).
            self.store.submit(delivered)
        elif (dedup := (entry.sender_key, instance_id, client_seq)) in self._accepted:
            self.store.submit(delivered)
            self._tell_at_accept[dedup] = (entry.msg_id, user.name, seq)
        else:
            if sender is None:
                route = None
            else:
                route = sender.session if self._local_routes else self.router.locate(sender)
            if isinstance(route, Session) and self._tell_and_hold(route, delivered, entry.msg_id):
                sender = None  # nothing queued for it (yet)
            else:
                self.store.submit(delivered)
                self._tell_sender(entry.sender_key, entry.msg_id, user.name, seq)
        if sender is not None:
            sender.notice_count += 1

    def _tell_and_hold(self, session: Session, delivered: MarkDelivered, msg_id: MsgId) -> bool:
        """A receipt of a written message whose sender's session is here and
        takes its DELIVERED now: the receipt's write waits in memory until
        the sender's client acks the DELIVERED, and is then written without
        a queued receipt (`MarkDelivered.told`): no notices row to insert
        and delete again (`_receipts_acked`). If the session ends first, it
        is written as it would have been (`_write_held`). Lost in a crash
        (it was never written), the mailbox still holds the message: its
        recipient is handed it again under the same message id, dedups it
        and receipts it again, as with any lazy write. False if the sender's
        receipts wait on the disk (its pager is behind or full). (`msg_id`:
        the message's, which `delivered` names.)"""
        pager = session.receipts
        if pager is None:
            pager = session.receipts = Pager(behind=False)
        items = pager.items
        if pager.behind or msg_id in items or len(items) >= NOTICE_WINDOW:
            return False
        seq = items[msg_id] = delivered.seq
        if seq > pager.cursor:
            pager.cursor = seq
        # (`_queue_delivered` in line: this runs for every message written)
        queued = self._delivereds.get(session.session_id)
        if queued is None:
            queued = self._delivereds[session.session_id] = (session, {})
        queued[1].setdefault(delivered.recipient, []).append(msg_id)
        held = self._held.get(session.session_id)
        if held is None:
            held = self._held[session.session_id] = {}
        held[msg_id] = delivered
        self._held_ids.add(delivered.server_msg_id)
        return True

    def _write_held(self, session: Session) -> None:
        """The session ends (or its account goes) with DELIVEREDs not acked
        whose receipts were held (`_tell_and_hold`): written now, queued for
        the sender's next login."""
        held = self._held.pop(session.session_id, None)
        if held is None:
            return
        for delivered in held.values():
            self.store.submit(delivered)
            self._held_ids.discard(delivered.server_msg_id)
        session.user.notice_count += len(held)
        current = self.router.locate(session.user)
        if isinstance(current, Session) and current is not session:  # taken over by another client
            for msg_id, delivered in held.items():
                self._offer_receipt(current, msg_id, delivered.recipient, delivered.seq)

    def _early_written(self, keys: list[tuple[str, int, int]], size: int) -> None:
        """The dedup keys of messages told before any write, of UTF-8 texts
        of `size` bytes together, are committed (`StoreDedup`): the disk
        answers a resend or a reuse of their ids now. (Each key is in one
        such write, and only its callback takes it out.)"""
        early = self._early
        for dedup in keys:
            del early[dedup]
        self._early_bytes -= size

    def _tell_sender(self, sender_key: str, msg_id: MsgId, to: str, seq: int) -> None:
        """Tell the sender that `to` has its message (now, or from the disk
        at its next login)."""
        sender = self.users.get(sender_key)
        if sender is None:
            return
        match self.router.locate(sender):
            case Session() as session:
                self._offer_receipt(session, msg_id, to, seq)
            case str() | None:
                pass  # queued in the store: its node, or its next login, reads it

    def _offer_receipt(self, session: Session, msg_id: MsgId, to: str, seq: int) -> None:
        pager = session.receipts
        if pager is None:
            pager = session.receipts = Pager(behind=False)
        if msg_id in pager.items:
            return
        # A receipt told late (it waited for its message's commit) may be
        # older than what pages have read: it would not come with one.
        late = seq < pager.cursor
        if late or (not pager.behind and len(pager.items) < NOTICE_WINDOW):
            pager.items[msg_id] = seq
            pager.cursor = max(pager.cursor, seq)
            self._queue_delivered(session, msg_id, to)
            return
        pager.behind = True
        pager.missed = max(pager.missed, seq)
        self._page_receipts(session)

    def _receipts_acked(self, session: Session, done: list[MsgId]) -> None:
        """The sender's client holds these receipts: off the disk they go."""
        pager = session.receipts
        assert pager is not None
        user = session.user
        held = self._held.get(session.session_id) if self._held else None
        told: list[MarkDelivered] = []  # written in one operation (`MarkDelivereds`)
        items = pager.items
        for msg_id in done:
            seq = items.pop(msg_id, None)
            if seq is None:
                continue
            if held is not None and (delivered := held.pop(msg_id, None)) is not None:
                delivered.told = True  # nothing queued, nothing to drop
                told.append(delivered)
                self._held_ids.discard(delivered.server_msg_id)
                continue
            user.notice_count -= 1
            self.store.submit(NoticeDone(user.key, msg_id.instance_id, msg_id.client_seq))
        if told:
            self.store.submit(told[0] if len(told) == 1 else MarkDelivereds(told))
        if held is not None and not held:
            del self._held[session.session_id]
        self._page_receipts(session)

    def _page_receipts(self, session: Session) -> None:
        pager = session.receipts
        if pager is None or not pager.behind or pager.reading:
            return
        free = NOTICE_WINDOW - len(pager.items)
        if pager.items and free < NOTICE_PAGE_MIN:
            return
        pager.reading = True
        read = Read(ReadNotices(session.user.key, pager.cursor, free))
        upto = self._next_msg_id - 1
        if self.shared_store:
            upto = max(upto, pager.missed)  # as in `_page_mail`
        self.store.submit(read, functools.partial(self._receipts_paged, session, pager, read, upto))

    def _receipts_paged(self, session: Session, pager: Pager[MsgId, int], read: Read,
                        upto: int) -> None:  # fmt: skip
        pager.reading = False
        if session.receipts is not pager or not read.ok:
            return
        rows: list[NoticeRow]
        rows, more = read.result
        for seq, instance_id, client_seq, to in rows:
            msg_id = MsgId(instance_id, client_seq)
            if seq > pager.cursor and msg_id not in pager.items:
                pager.items[msg_id] = seq
                pager.cursor = seq
                self._queue_delivered(session, msg_id, to)
        if not more and pager.missed <= max(pager.cursor, upto):
            pager.behind = False
        else:
            self._page_receipts(session)

    def _on_who(self, session: Session, who: Who) -> None:
        limit = max(1, min(who.limit, WHO_PAGE_MAX))
        start = bisect.bisect_right(self._online, who.after) if who.after else 0
        keys = self._online[start : start + limit]
        more = start + limit < len(self._online)
        names = tuple(self.users[k].name for k in keys)
        self._send(session, WhoReply(names, keys[-1] if more and keys else ""))

    def _on_watch(self, session: Session, watch: Watch) -> None:
        """The client has a conversation open with this user: tell it when
        they come and go, starting with now."""
        try:
            key = name_key(normalize_name(watch.user))
        except LocalProtocolError:
            self.stats["watch_invalid_name"] += 1  # nobody can ever have it
            return
        peer = self.users.get(key)
        if peer is None:
            self._await(session.user.key, key)
            return
        if peer is session.user:
            return
        self._add_contact(peer, session.user.key)
        self._tell_presence(session, peer, self.router.locate(peer) is not None)

    def _await(self, watcher: str, key: str) -> None:
        """Remember that `watcher` waits for the unregistered name `key`, so
        they hear when it is registered and logs in. Bounded per watcher,
        per name and in all; the least recently watched go first, so a full
        table never refuses a new watch (a user cannot turn the feature off
        for everyone) and nobody can hold more than their share."""
        mine = self._awaiting.setdefault(watcher, {})
        mine.pop(key, None)
        mine[key] = None
        if len(mine) > MAX_AWAITED_PER_WATCHER:
            oldest = next(iter(mine))
            del mine[oldest]
            self._unawait(watcher, oldest)
        waiting = self._awaited.pop(key, None)  # re-inserted: now the most recent
        if waiting is None:
            waiting = set()
            if len(self._awaited) >= MAX_AWAITED:
                oldest = next(iter(self._awaited))
                for other in self._awaited.pop(oldest):
                    self._awaiting.get(other, {}).pop(oldest, None)
                self.stats["awaited_evicted"] += 1
        self._awaited[key] = waiting
        if len(waiting) < MAX_AWAITED_PER_NAME:
            waiting.add(watcher)
        else:
            mine.pop(key, None)

    def _unawait(self, watcher: str, key: str) -> None:
        waiting = self._awaited.get(key)
        if waiting is not None:
            waiting.discard(watcher)
            if not waiting:
                del self._awaited[key]

    def _forget_awaited(self, watcher: str) -> None:
        """A session ended: what its user awaited goes (its client sends the
        WATCHes again at its next login)."""
        for key in self._awaiting.pop(watcher, ()):
            self._unawait(watcher, key)

    def _add_contact(self, user: User, key: str) -> None:
        """`key` hears when `user` comes and goes (at most MAX_CONTACTS: the
        oldest added is forgotten)."""
        contacts = user.contacts
        contacts.pop(key, None)
        contacts[key] = None
        if len(contacts) > MAX_CONTACTS:
            del contacts[next(iter(contacts))]
            self.stats["contacts_evicted"] += 1

    def _on_typing(self, session: Session, typing: Typing, now: float) -> None:
        peer = self.users.get(name_key(typing.user))
        if peer is None or session.user.key not in peer.contacts:
            return
        to = self.router.locate(peer)
        if not isinstance(to, Session):
            return  # offline, or on another node: typing notices are not forwarded
        # Fire and forget (QoS 0): beyond a few a second per pair, or to a
        # client that does not ack what it was sent, a notice is dropped.
        if (
            not self._typing.take(f"{session.user.key}\0{peer.key}", 1, now)
            or to.conn.unacked_bytes >= self.config.max_unacked_output
        ):
            self.stats["typing_dropped"] += 1
            return
        self._send(to, Typing(session.user.name))

    # --- accounts: a new password, a deletion ---------------------------------

    def _sessions_of(self, user: User) -> list[Session]:
        """Every live session of `user` (one, unless the router lags: a scan
        over all sessions, for the rare account change)."""
        return [s for s in self.sessions.values() if s.user is user]

    def _bye(self, session: Session, code: ErrorCode, text: str, now: float) -> None:
        """End `session` with a BYE, sent once now (its client ends too)."""
        self._send(session, Bye(code, text))
        for datagram in session.conn.datagrams_to_send(now):
            self._out.append((datagram, session.addr))
        self._end_session(session, now, quiet=True)

    def _prove(self, session: Session, message: bytes, proof: bytes, nonce: bytes,
               now: float) -> bytes | None:  # fmt: skip
        """The ClientKey behind the password asked again, or None once the
        session was told why not (an ACCOUNT_RESULT)."""
        user = session.user
        if self.users.get(user.key) is not user:  # deleted meanwhile
            return None
        verdict = self.desk.prove(user.key, session.instance_id, user.account, message, proof,
                                  now)  # fmt: skip
        if isinstance(verdict, tuple):
            log.info("%s gave a wrong password to change their account", user.name)
            self._send(session, AccountResult(nonce, *verdict))
            return None
        return verdict

    def _on_change_password(self, session: Session, request: ChangePassword, now: float) -> None:
        """A new password, proved by the old one: the new verifier is stored,
        then the session is told (with a new login ticket: the old one named
        the old StoredKey) and the user's other sessions end."""
        user = session.user
        if not valid_iterations(request.iterations):
            self._send(session, AccountResult(request.nonce, ErrorCode.SERVER_ERROR,
                                              f"{request.iterations} PBKDF2 iterations cannot "
                                              "be stored; nothing was changed"))  # fmt: skip
            return
        message = account_message(ACCOUNT_CHANGE, user.name, session.session_id, request.nonce,
                                  request.salt, request.iterations)  # fmt: skip
        client_key = self._prove(session, message, request.proof, request.nonce, now)
        if client_key is None:
            return
        keys = account_wrap(client_key, session.conn.peer_key, message, request.wrapped_keys)
        account = Account(user.account.name, request.salt, request.iterations, keys[:32],
                          keys[32:])  # fmt: skip

        def stored() -> None:
            if self.users.get(user.key) is not user:
                return  # deleted while the change was on its way to the disk
            # Logins check the new verifier only once it is on the disk.
            user.account = account
            self.stats["passwords_changed"] += 1
            log.info("%s changed their password", user.name)
            for other in self._sessions_of(user):
                if other is not session:
                    text = "your password was changed elsewhere; log in with the new one"
                    self._bye(other, ErrorCode.PASSWORD_CHANGED, text, self._now)
            if self.sessions.get(session.session_id) is session:
                self._send(session, AccountResult(request.nonce, ErrorCode.PASSWORD_CHANGED,
                                                  "password changed"))  # fmt: skip
                self._send(session, Ticket(self.desk.ticket(user.key, session.instance_id,
                                                            account)))  # fmt: skip

        self.store.submit(UpdateAccount(user.key, account), stored)

    def _on_delete_account(self, session: Session, request: DeleteAccount, now: float) -> None:
        """The account goes, proved by its password: at once from memory (no
        message is accepted for it from here on, and its name cannot be
        registered: quarantined), from the disk with everything kept for it;
        then the session is told and ends once its client has the answer,
        and the user's other sessions end."""
        user = session.user
        message = account_message(ACCOUNT_DELETE, user.name, session.session_id, request.nonce)
        if self._prove(session, message, request.proof, request.nonce, now) is None:
            return
        until = int(self._wall_clock() * 1000 + self.config.name_quarantine * 1000)
        self._leave_all_groups(session)
        self._forget_account(user, until if self.config.name_quarantine > 0 else None, now,
                             keep=session)  # fmt: skip
        self.stats["accounts_deleted"] += 1
        log.info("%s deleted their account; the name is quarantined until %s UTC", user.name,
                 time.strftime("%Y-%m-%d %H:%M", time.gmtime(until / 1000)))  # fmt: skip
        # Nothing more is handed to it; what it was handed goes with the mailbox.
        if self._held:
            self._write_held(session)  # (before the erasure, which drops their queue)
        session.mail = session.receipts = None

        def erased() -> None:
            if self.sessions.get(session.session_id) is session:
                self._send(session, AccountResult(request.nonce, ErrorCode.ACCOUNT_DELETED,
                                                  f"account {user.name} deleted"),
                           handle=ACCOUNT_GONE)  # fmt: skip

        self.store.submit(EraseAccount(user.key, until), erased)

    def _leave_all_groups(self, session: Session) -> None:
        """A deleted account leaves every group it is in, as by `/leave`
        (its members see it leave, ownership passes on, a group it was the
        last member of ends), and stops being a former member anywhere: no
        group counts it in "delivered 2 of N", and the name's next owner
        inherits no group and no backlog. Its requests' answers go to
        request ids no client uses (`DELETION_REQUEST` down)."""
        user = session.user
        for index, group in enumerate(self.groups.user_groups(user.key)):
            self._group_leave(
                group, user, (user.key, session.instance_id, DELETION_REQUEST - index)
            )
        session.group_mail = None
        self._bury(user.key)

    def _bury(self, user_key: str) -> None:
        """A deleted account is no former member of any group any more: one
        that had everything is dropped; one that had not is kept under a
        tombstone, counted out of "of N" for the senders. (In cluster mode
        its leaving is applied later, by the shared store: `_group_changed`
        buries it again once this node's copy has it.)"""
        owed = self.groups.owed_groups(user_key)
        buried = self.groups.bury(user_key)
        for group, member, key in buried:
            if not member.gone:
                self.store.submit(DropMember(group.key, key))
                self._end_retired(group)
                continue
            # Its senders are told it never will have what it had not: those
            # online now (from their marks on), the others at their logins.
            self.store.submit(BuryMember(group.key, key, member.key))
            for sender_key in list(group.owed):
                sender = self.users.get(sender_key)
                route = self.router.locate(sender) if sender is not None else None
                if isinstance(route, Session):
                    self._tell_again(route, group)
            self._end_retired(group)
        for group in owed:  # nobody to tell there any more
            if self.shared_store:
                # (its mark in the shared store, which every node reads, and
                # which holds its log's trim: one server's goes with the account)
                self.store.submit(GroupTold(user_key, group.key, TOLD_ALL))
            self._end_retired(group)
        for group in [*(g for g, _, _ in buried), *owed]:
            self._trim_now(group)  # (what was held for it goes)

    def _forget_account(self, user: User, until: int | None, now: float, *,
                        keep: Session | None = None) -> None:  # fmt: skip
        """A deleted account goes from memory: out of WHO, its name
        quarantined until `until` (wall clock, ms; None: free at once), its
        sessions but `keep` (which deleted it) ended with ACCOUNT_DELETED."""
        del self.users[user.key]
        index = bisect.bisect_left(self._online, user.key)  # out of WHO at once
        if index < len(self._online) and self._online[index] == user.key:
            del self._online[index]
        if until is not None:
            self.quarantine[user.key] = until
        for other in self._sessions_of(user):
            if other is not keep:
                self._bye(other, ErrorCode.ACCOUNT_DELETED, "this account was deleted", now)
        self._forget_awaited(user.key)
        # Its contacts go too: those who heard of it stop hearing of it, and a
        # later owner of the name does not hear of them (contacts made by a
        # message are mutual; at most MAX_CONTACTS each).
        for key in user.contacts:
            contact = self.users.get(key)
            if contact is not None:
                contact.contacts.pop(user.key, None)

    def _fail(self, session: Session, msg_id: MsgId, code: ErrorCode, text: str) -> None:
        self._send(session, Fail(msg_id, code, text))

    def _announce(self, user: User, *, online: bool) -> None:
        for key in user.contacts:
            contact = self.users.get(key)
            if contact is not None:
                to = self.router.locate(contact)
                if isinstance(to, Session):
                    self._tell_presence(to, user, online)

    def _tell_presence(self, to: Session, user: User, online: bool) -> None:
        """Tell `to` that `user` is online or not. Presence is state: while
        one PRESENCE of `user` is unacked, or the session's output is over
        its cap, the latest state waits in `presence_due` (one entry per
        user, replaced by each change) and goes once the client acks: the
        output stays bounded and the client still ends with the last state."""
        key = user.key
        sent = to.presence_sent
        if (sent is not None and key in sent) or (
            to.conn.unacked_bytes >= self.config.max_unacked_output
        ):
            to.presence_due[key] = (user.name, online)
            self.stats["presence_coalesced"] += 1
            return
        to.presence_due.pop(key, None)
        if sent is None:
            sent = to.presence_sent = set()
        sent.add(key)
        self._send(to, Presence(user.name, online), handle=key)

    def _send_due_presence(self, session: Session) -> None:
        """Send the presence states that waited, as far as the cap allows."""
        due = session.presence_due
        sent = session.presence_sent
        for key in [k for k in due if sent is None or k not in sent]:
            if session.conn.unacked_bytes >= self.config.max_unacked_output:
                return
            name, online = due.pop(key)
            if sent is None:
                sent = session.presence_sent = set()
            sent.add(key)
            self._send(session, Presence(name, online), handle=key)

    def _send(
        self, session: Session, message: Message, *, stream: int = CONTROL_STREAM,
        handle: object = None,
    ) -> None:  # fmt: skip
        session.conn.send(encode_message(message), stream, handle)
        self._dirty[session.session_id] = session

    def _schedule(self, session: Session, now: float) -> None:
        """Set when the session's connection timers are next looked at (its
        expiry is `_expire`'s: docs/RELIABILITY.md, "Server timers")."""
        # The connection's deadline moves in place: the heap gets an entry
        # only when it moves earlier than the live one (issue 18: a push per
        # move would grow the heap by an entry per datagram). A live entry
        # left earlier than the deadline (its chunks acked since, its delayed
        # ack gone out on data: about one per copy at a steady rate into a
        # group, issue 14) is moved to the deadline when it reaches the
        # heap's front (`get_timer`, `handle_timer`), or dropped if there is
        # none: it never wakes the loop. So the entries left behind by an
        # earlier move are all a connection's deadlines (a retransmission
        # timeout away at most, as a rule), never an expiry a minute away.
        timer = session.conn.get_timer()
        if timer is None:
            session.deadline = None
            return
        if timer < now:
            timer = now
        session.deadline = timer
        if session.scheduled is None or timer < session.scheduled:
            session.scheduled = timer
            heapq.heappush(self._timers, (timer, next(self._tiebreak), session.session_id))

    # --- groups (issue 14; the rules and the sequence are server_groups.py's) ---
    #
    # An entry (a message or a membership change) takes its place in its
    # group's sequence on the loop (`GroupTable.next_seq`), is stored once
    # (`StoreGroupItem`), and only once that commit is durable is it handed
    # to the members online (`_fan_out`) and the sender told (GROUP_ACCEPT,
    # GROUP_RESULT): no member ever sees an entry a crash could renumber.
    # Members offline, or behind, page the log from their cursor at login,
    # like a mailbox. A member's receipt of seq k moves their cursor to k
    # and queues "delivered by" receipts for the senders of the messages.

    def _load_groups(self, loaded: Loaded) -> None:
        for stored in loaded.groups:
            group = self._group_from(stored)
            GroupTable.count_from(group, stored.sizes)
            if group.members or group.former:  # (a retired group: former members only)
                self.groups.restore(group)
        for (group_key, sender_key), last in loaded.group_sent.items():
            found = self.groups.get(group_key)
            if found is not None and sender_key in self.users:  # (a deleted one: nobody to tell)
                told = loaded.group_told.get((sender_key, group_key), 0)
                self.groups.restore_owed(found, sender_key, told, last)
        for group in list(self.groups.groups.values()):  # caught up and told: not needed
            for member in [m for m in group.former.values() if m.caught_up]:
                self.groups.forget_former(group, member)
            self._end_retired(group)
            # What a receipt's trim had not taken yet (a group nobody
            # receipts in would keep it), and what those dropped held.
            self._trim_now(group)
        for key, answer in loaded.group_requests.items():
            self._remember_answer(key, answer)
        if loaded.groups:
            log.info("loaded %d groups", len(self.groups))

    @staticmethod
    def _group_from(stored: LoadedGroup) -> Group:
        """A group as the store holds it. Former members who have caught up
        are kept too, until every sender was told what they had
        (`forget_former`)."""
        group = Group(stored.key, stored.name, stored.owner_key, stored.seq)
        group.epoch, group.changed = stored.epoch, stored.changed
        for m in stored.members:
            member = Member(m.key, m.name, m.joined_seq, m.rank, m.left_seq, m.cursor, m.earlier)
            if m.left_seq is None:
                group.members[m.key] = member
            else:
                group.former[m.key] = member
        return group

    def _remember_answer(self, key: RequestKey, answer: tuple[int, str]) -> None:
        answers = self._group_answers
        answers[key] = answer
        if len(answers) > MAX_GROUP_ANSWERS:
            del answers[next(iter(answers))]

    def _group_stream(self, group: Group) -> int:
        stream = self._group_streams.get(group.key)
        if stream is None:
            stream = self._group_streams[group.key] = conversation_stream(group_address(group.name))
        return stream

    def _on_group_request(self, session: Session, request: GroupRequest) -> None:
        user = session.user
        instance = (user.key, session.instance_id)
        if self._lookups and any(key == user.key for key, _ in self._lookups):
            # A SEND before it waits for the disk (its dedup lookup): the
            # request waits behind it, as the client sent them (a message,
            # then leaving the group), and later SENDs wait behind the request.
            self._lookups[instance] += 1
            self.store.submit(Sync(), functools.partial(self._deferred_request, session, request))
            return
        self._group_request(session, request)

    def _deferred_request(self, session: Session, request: GroupRequest) -> None:
        instance = (session.user.key, session.instance_id)
        self._lookups[instance] -= 1
        if self._lookups[instance] <= 0:
            del self._lookups[instance]
        if self.sessions.get(session.session_id) is session:
            self._group_request(session, request)

    def _group_request(self, session: Session, request: GroupRequest) -> None:
        user = session.user
        key = (user.key, session.instance_id, request.request_id)
        stream = CONTROL_STREAM
        if request.action != GroupAction.LIST:
            stream = conversation_stream(group_address(request.group.removeprefix("#")))
        known = self._group_answers.get(key)
        if known is not None:
            # Asked again (a new session of the same client): the same
            # answer, once what it changed is durable; nothing done twice.
            code, text = known
            self.store.submit(Sync(), functools.partial(
                self._group_result, user, key, code, text, stream))  # fmt: skip
            return
        if request.action in CHANGE_ACTIONS and not self._holding(session, request.group):
            # A change's entries are copies too, one for each member: they
            # wait for the fan-out budget like messages (what is behind a
            # hold asks when it goes on).
            copies = self._change_cost(user, request)
            if not self._fanout_affords(user, copies):
                self._wait_for_budget(session, request, group_name(request.group)[1], copies)
                return
        if request.action != GroupAction.LIST and (self.shared_store or self._group_holds):
            # (Behind a hold of the session on its group: one server holds
            # only for the fan-out budget, `_wait_for_budget`.)
            if self._hold_group(session, request, key):
                return
            if self.shared_store and request.action in (
                GroupAction.CREATE, GroupAction.ADD, GroupAction.REMOVE, GroupAction.LEAVE,
            ):  # fmt: skip
                # A cluster: planned here, applied by the shared store in the
                # group's one sequence (`_cluster_change`).
                self._cluster_change(user, session.instance_id, request, key)
                return
        try:
            match request.action:
                case GroupAction.CREATE:
                    self._group_create(session, request, key)
                case GroupAction.ADD:
                    self._group_add(session, request, key)
                case GroupAction.REMOVE:
                    self._group_remove(session, request, key)
                case GroupAction.LEAVE:
                    group = self.groups.member_of(request.group, user.key)
                    self._group_leave(group, user, key)
                case GroupAction.MEMBERS:
                    self._group_members(session, request)
                case GroupAction.LIST:
                    self._group_list(session, request)
                case _:
                    raise GroupRefused(ErrorCode.SERVER_ERROR,
                                       f"unknown group action {request.action}")  # fmt: skip
        except GroupRefused as exc:
            self.stats["group_refused"] += 1
            self._send(session, GroupResult(request.request_id, int(exc.code), exc.message),
                       stream=stream)  # fmt: skip

    def _holding(self, session: Session, group_text: str) -> bool:
        """Whether the session's traffic to the group `group_text` names is
        held (False too for a name no group may have: refused at once)."""
        holds = self._group_holds.get(session.session_id) if self._group_holds else None
        if holds is None:
            return False
        try:
            return group_name(group_text)[1] in holds.by_group
        except GroupRefused:
            return False

    def _change_cost(self, user: User, request: GroupRequest) -> int:
        """The copies a membership request's entries would make, as far as
        this node's copy tells (each entry goes to every member it is for,
        the one asking too): paid for when they are made (`_store_change`,
        `_group_changed`), by what they cost then. A request refused costs
        nothing; a group this node has not yet heard of counts as none."""
        try:
            group_key = group_name(request.group)[1]
        except GroupRefused:
            return 0
        if request.action == GroupAction.CREATE:
            return 0 if group_key in self.groups.groups else 1 + len(request.users)
        group = self.groups.get(group_key)
        if group is None or user.key not in group.members:
            return 0
        if request.action == GroupAction.ADD:
            # Only names not yet members join (an add of members alone is
            # answered "already members" and makes no entry at all).
            joining = 0
            for text in request.users:
                try:
                    joining += name_key(normalize_name(text)) not in group.members
                except LocalProtocolError:
                    return 0  # refused (`_resolve`): nothing made
            return len(group.members) + joining if joining else 0
        return len(group.members)  # REMOVE, LEAVE

    def _group_result(self, user: User, key: RequestKey, code: int, text: str, stream: int,
                      group_key: str = "") -> None:  # fmt: skip
        """Answer a request, to the client instance that asked (a later
        session of it, if it logged in again meanwhile); what its session
        sent to the group (`group_key`) after it goes on (`_hold_group`)."""
        session = self.router.locate(user)
        if isinstance(session, Session) and session.instance_id == key[1]:
            self._send(session, GroupResult(key[2], code, text), stream=stream)
        if self._holds_by_request:
            session_id = self._holds_by_request.pop((key, group_key), None)
            if session_id is not None:
                self._release_group(session_id, group_key, key)

    def _hold_group(self, session: Session, what: Send | GroupRequest, key: RequestKey | None,
                    to_key: str = "") -> bool:  # fmt: skip
        """Cluster mode: a membership request's verdict may take several
        round trips to the shared store (a refusal on this node's copy is
        checked there first), while a SEND is numbered in one; so what the
        session sends to a group after a request to it waits until the
        request is answered, and the shared store numbers them in the order
        sent, as one server does. True: `what` waits (a SEND, or a request
        behind another). A request that may change the group starts a hold.
        A hold ends with its request's answer (`_group_result`: every
        request is answered, done, refused or "send it again", once the
        store is reachable) or with its session (`_drop_holds`: its client
        sends what was held again at its next login), whichever comes
        first; what a session's holds keep is bounded (`MAX_GROUP_HELD`,
        `_may_take`)."""
        if isinstance(what, Send):
            group_key = to_key[1:]
        else:
            try:
                group_key = group_name(what.group)[1]
            except GroupRefused:
                return False  # answered at once
        holds = self._group_holds.get(session.session_id)
        hold = holds.by_group.get(group_key) if holds is not None else None
        if holds is not None and hold is not None:
            hold[1].append((what, to_key))
            holds.count += 1
            holds.size += held_size(what)
            return True
        if self.shared_store and key is not None and isinstance(what, GroupRequest) and (
            what.action in (GroupAction.CREATE, GroupAction.ADD, GroupAction.REMOVE,
                            GroupAction.LEAVE)
        ):  # fmt: skip
            if holds is None:
                holds = self._group_holds[session.session_id] = _GroupHolds()
            holds.by_group[group_key] = (key, collections.deque())
            # Keyed by the group too: a request id a client used for two
            # groups at once must not release the other group's hold.
            self._holds_by_request[(key, group_key)] = session.session_id
        return False

    def _release_group(self, session_id: bytes, group_key: str, key: RequestKey) -> None:
        """The request `key` holding a session's traffic to a group was
        answered: what waited goes on in order, until a request among it
        holds the rest in turn."""
        holds = self._group_holds.get(session_id)
        hold = holds.by_group.get(group_key) if holds is not None else None
        if holds is None or hold is None or hold[0] != key:
            return  # ended with its session; or another request's
        del holds.by_group[group_key]
        queue = hold[1]
        session = self.sessions.get(session_id)
        if session is None:  # (its end dropped its holds: `_end_session`)
            self._drop_holds(session_id)
            return
        while queue:
            what, to_key = queue.popleft()
            holds.count -= 1
            holds.size -= held_size(what)
            if isinstance(what, Send):
                if to_key:
                    self._take_group(session, what, to_key, released=True)
                else:  # a repeat of a SEND before it (`_held_repeat`): answered as one
                    self._on_send(session, what)
            else:
                self._group_request(session, what)
            again = holds.by_group.get(group_key)
            if again is not None:  # that request holds the rest
                again[1].extend(queue)
                return
        if not holds.by_group and self._group_holds.get(session_id) is holds:
            del self._group_holds[session_id]

    def _held_repeat(self, session: Session, send: Send, to_key: str) -> bool:
        """Whether `send` repeats the id of a SEND the session's holds keep
        (`_on_send` found it in neither `_accepted` nor the disk: the first
        is not numbered yet). It gets what it would once the first is: the
        same text to the same group waits behind it (the key "" marks it a
        repeat) and is answered as one when released (`_release_group`:
        the same GROUP_ACCEPT, nothing numbered twice); another text or
        group is refused DUPLICATE_ID, as it would be then. True: handled."""
        holds = self._group_holds.get(session.session_id)
        if holds is None:
            return False
        msg_id = send.msg_id
        for group_key, (_, queue) in holds.by_group.items():
            for what, _key in queue:
                if not isinstance(what, Send) or what.msg_id != msg_id:
                    continue
                if group_key != to_key[1:] or what.text != send.text:
                    self._fail(session, msg_id, ErrorCode.DUPLICATE_ID, DUPLICATE_ID_TEXT)
                    return True
                queue.append((send, ""))
                holds.count += 1
                holds.size += held_size(send)
                return True
        return False

    def _drop_holds(self, session_id: bytes) -> None:
        """A session ended: what its holds kept goes with it."""
        self._budget_waits.pop(session_id, None)
        holds = self._group_holds.pop(session_id, None)
        if holds is None:
            return
        for group_key, (key, _) in holds.by_group.items():
            if self._holds_by_request.get((key, group_key)) == session_id:
                del self._holds_by_request[(key, group_key)]

    def _resolve(self, names: tuple[str, ...], skip: str) -> list[tuple[str, str]]:
        """The accounts named in a request as (key, name), each once, in
        order, without `skip` (the one asking)."""
        self.groups.check_users(names)
        found: dict[str, str] = {}
        for text in names:
            try:
                key = name_key(normalize_name(text))
            except LocalProtocolError as exc:
                raise GroupRefused(ErrorCode.INVALID_NAME, str(exc)) from None
            user = self.users.get(key)
            if user is None:
                raise GroupRefused(ErrorCode.NO_SUCH_USER, f"there is no user {text!r}")
            if key != skip:
                found.setdefault(key, user.name)
        return list(found.items())

    def _group_item(self, group: Group, seq: int, change: GroupChange, by: User,
                    users: tuple[str, ...]) -> GroupItem:  # fmt: skip
        return GroupItem(group.key, seq, self._new_id(), int(change), by.key, by.name, 0, 0, "",
                         users, int(self._wall_clock() * 1000), len(group.members))  # fmt: skip

    def _group_create(self, session: Session, request: GroupRequest, key: RequestKey) -> None:
        """Checked here; made once the store has said where the name's seqs
        go on (`ReadGroupMark`: a group of the name may have ended). What
        the session sends meanwhile waits behind it (`_lookups`), as after
        a SEND that waits for the disk."""
        user = session.user
        group_key = self.groups.check_create(request.group)[1]
        others = self._resolve(request.users, user.key)
        self.groups.check_room(1, len(others))
        self.groups.check_memberships([(user.key, user.name), *others])
        instance = (user.key, session.instance_id)
        self._lookups[instance] += 1
        read = Read(ReadGroupMark(group_key))
        self.store.submit(read, functools.partial(self._group_mark_read, session, request, key,
                                                  read))  # fmt: skip

    def _group_mark_read(self, session: Session, request: GroupRequest, key: RequestKey,
                         read: Read) -> None:  # fmt: skip
        instance = (session.user.key, session.instance_id)
        self._lookups[instance] -= 1
        if self._lookups[instance] <= 0:
            del self._lookups[instance]
        if self.sessions.get(session.session_id) is not session:
            return  # the session ended: its client asks again at its next login
        stream = conversation_stream(group_address(request.group.removeprefix("#")))
        try:
            if not read.ok:
                raise GroupRefused(ErrorCode.SERVER_ERROR, "the server could not read its "
                                   "store; send the request again")  # fmt: skip
            self._make_group(session, request, key, int(read.result))
        except GroupRefused as exc:  # (checked again: another may have taken the name)
            self.stats["group_refused"] += 1
            self._send(session, GroupResult(request.request_id, int(exc.code), exc.message),
                       stream=stream)  # fmt: skip

    def _make_group(self, session: Session, request: GroupRequest, key: RequestKey,
                    after: int) -> None:  # fmt: skip
        user = session.user
        name, group_key = self.groups.check_create(request.group)
        others = self._resolve(request.users, user.key)
        self.groups.check_room(1, len(others))
        self.groups.check_memberships([(user.key, user.name), *others])
        group, seq = self.groups.create(name, group_key, (user.key, user.name), others, after)
        names = tuple(m.name for m in group.members.values())
        item = self._group_item(group, seq, GroupChange.CREATED, user, names)
        joined = tuple((m.key, m.name, m.rank) for m in group.members.values())
        log.info("%s created group #%s with %d members", user.name, name, len(names))
        self._store_change(group, [(item, joined, ())], key, f"created #{name}")

    def _group_add(self, session: Session, request: GroupRequest, key: RequestKey) -> None:
        user = session.user
        group = self.groups.member_of(request.group, user.key)
        new = [(k, n) for k, n in self._resolve(request.users, user.key)
               if k not in group.members]  # fmt: skip
        if not new:
            self._send(session, GroupResult(request.request_id, 0, ALREADY_MEMBERS),
                       stream=self._group_stream(group))  # fmt: skip
            return
        self.groups.check_room(len(group.members), len(new))
        self.groups.check_memberships(new)
        seq, again = self.groups.add(group, new)
        item = self._group_item(group, seq, GroupChange.ADDED, user, tuple(n for _, n in new))
        going_on = {m.key for m in again}
        joined = tuple((k, n, group.members[k].rank) for k, n in new if k not in going_on)
        rows = tuple(member_row(m) for m in again)
        self._store_change(group, [(item, joined, ())], key, f"added to #{group.name}", rows)

    def _group_remove(self, session: Session, request: GroupRequest, key: RequestKey) -> None:
        user = session.user
        group = self.groups.member_of(request.group, user.key)
        keys = self._removing(group, user, request)
        if keys == [user.key]:  # removing yourself alone is leaving
            self._group_leave(group, user, key)
            return
        names = tuple(group.members[k].name for k in keys)
        seq = self.groups.remove(group, keys)
        item = self._group_item(group, seq, GroupChange.REMOVED, user, names)
        item.recipients = len(group.members) + len(keys)  # those who see it: they too
        changes: list[tuple[GroupItem, tuple[tuple[str, str, int], ...], tuple[str, ...]]]
        changes = [(item, (), tuple(keys))]
        self._store_change(group, changes, key, f"removed from #{group.name}")

    def _group_leave(self, group: Group, user: User, key: RequestKey) -> None:
        if self.shared_store:  # (a deleted account's leaving, in a cluster)
            request = GroupRequest(key[2], GroupAction.LEAVE, group.name, ())
            self._cluster_change(user, key[1], request, key)
            return
        changes = self._leave_items(group, user)
        if changes:
            self._store_change(group, changes, key, f"left #{group.name}")
            return
        # The last member left: the group ends, its name free at once. The
        # leaver is told (a GROUP_EVENT) and its rows go; but what a former
        # member is still owed (removed while offline), and what a sender
        # is (who had their messages), stays, under another key, until they
        # have it (`GroupTable.close`). So does what the leaver is owed: as
        # any leaver, they get what their client had not (committed and not
        # yet handed, in flight, its receipt held back: audit8 P1), then
        # their LEFT, in the group's order, from the log, kept until their
        # client has it: handed once outside it, a dropped link lost it for
        # good (audit8 P7: the request sent again is answered code 0, and
        # no event followed).
        self._release_fanout(group)  # its last messages first
        # Trimmed first, while its last member is one (their place bounds
        # the hole) and their notices are told under its key: once it has
        # ended, only what its former members and senders are owed stays.
        self._trim_now(group)
        seq = self.groups.next_seq(group)
        item = self._group_item(group, seq, GroupChange.LEFT, user, ())
        old_key = group.key
        owner = group.owner
        stream = self._group_stream(group)
        keep_as = retired_key(group.key, item.server_msg_id)
        leaver = self.groups.close(group, seq, keep_as)
        assert leaver is not None  # (the leaver is owed their LEFT: it is retired)
        kept = tuple(member_row(m) for m in leaver)
        logged = StoreGroupItem(item, group.name, owner, (), (user.key,))
        self._rekey_pagers(group, old_key)
        log.info("group #%s ended: its last member left", group.name)
        self.stats["groups_ended"] += 1
        self._remember_answer(key, (0, f"left #{group.name}; it has ended"))
        self._group_streams.pop(old_key, None)  # the cache holds live groups only
        answer = (key, 0, f"left #{group.name}; it has ended")
        ended = functools.partial(self._group_ended, group, user, item, key, stream)
        self.store.submit(EndGroup(old_key, answer, keep_as, kept, seq, logged), ended)
        # (after the rename: their reads are of the log under its new key)
        self._rekey_notices(group, old_key)

    def _rekey_pagers(self, group: Group, old_key: str) -> None:
        """A retired group's former members online page it under its new key."""
        for member in group.former.values():
            session = self._session_here(member.key)
            mail = session.group_mail if session is not None else None
            pager = mail.pagers.pop(old_key, None) if mail is not None else None
            if mail is None or pager is None:
                continue
            mail.pagers[group.key] = pager
            for entry in pager.items.values():
                mail.ids[entry.server_msg_id] = (group.key, entry.seq)

    def _rekey_notices(self, group: Group, old_key: str) -> None:
        """A retired group's senders online are told again under its new
        key, from their marks (what was in flight under the old one is
        forgotten: the client ignores a notice it had)."""
        for sender_key in list(group.owed):
            session = self._session_here(sender_key)
            if session is None:
                continue
            notices = session.group_notices
            if notices is not None:
                notices.inflight.pop(old_key, None)
                notices.catching.pop(old_key, None)
                notices.reading.discard(old_key)
                notices.again.discard(old_key)
            self._tell_again(session, group)

    def _end_retired(self, group: Group) -> None:
        """A retired group whose former members have all they were owed
        (or whose accounts were deleted), and whose senders were told who
        had their messages, goes: its rows too."""
        if (
            is_retired(group.key)
            and self.groups.get(group.key) is group
            and not group.members
            and not self.groups.owes(group)
            and not (group.owed and group.former)  # (no former member: nobody to name)
        ):
            self._release_fanout(group)
            self.groups.end(group)
            self._group_streams.pop(group.key, None)
            if not self.shared_store:  # (a shared store's DropMember ended it there)
                self.store.submit(EndGroup(group.key))

    def _group_ended(self, group: Group, user: User, item: GroupItem, key: RequestKey,
                     stream: int) -> None:  # fmt: skip
        """The group's end is stored: its last member is handed their LEFT
        from the retired group's log, in its order (after what they were
        owed before it), and answered."""
        self._fan_out(group, item)
        self._group_result(user, key, 0, f"left #{group.name}; it has ended", stream)

    def _leave_items(
        self, group: Group, user: User
    ) -> list[tuple[GroupItem, tuple[tuple[str, str, int], ...], tuple[str, ...]]]:
        """`user` leaves `group`: the LEFT entry, and the OWNER entry if
        ownership passes; [] (nothing done) if they are its last member."""
        if len(group.members) == 1:
            return []
        seq, new_owner = self.groups.leave(group, user.key)
        item = self._group_item(group, seq, GroupChange.LEFT, user, ())
        item.recipients = len(group.members) + 1
        changes: list[tuple[GroupItem, tuple[tuple[str, str, int], ...], tuple[str, ...]]]
        changes = [(item, (), (user.key,))]
        if new_owner is not None:
            heir = group.members[new_owner]
            seq = self.groups.next_seq(group)
            changes.append((self._group_item(group, seq, GroupChange.OWNER, user, (heir.name,)),
                            (), ()))  # fmt: skip
            log.info("#%s: %s left; %s owns it now", group.name, user.name, heir.name)
        return changes

    def _store_change(
        self, group: Group,
        changes: list[tuple[GroupItem, tuple[tuple[str, str, int], ...], tuple[str, ...]]],
        key: RequestKey, text: str,
        rows: tuple[LoadedMember, ...] = (),
    ) -> None:  # fmt: skip
        """Store a request's entries (the answer with the last), then hand
        them out and answer it. `rows`: members written whole (an ADDED of
        one who goes on from an earlier membership)."""
        self._remember_answer(key, (0, text))
        self.stats["group_changes"] += len(changes)
        requester = self.users.get(key[0])
        if requester is not None:  # (the copies: `_change_cost`)
            self._spend_fanout(requester, sum(item.recipients for item, _, _ in changes))
        stream = self._group_stream(group)
        for index, (item, joined, left) in enumerate(changes):
            last = index == len(changes) - 1
            user = self.users[item.sender_key]
            op = StoreGroupItem(item, group.name, group.owner, joined, left,
                                (key, 0, text) if last else None, rows)  # fmt: skip
            then = functools.partial(self._change_committed, group, item, user, key, text, stream,
                                     last)  # fmt: skip
            self.store.submit(op, then)

    def _change_committed(self, group: Group, item: GroupItem, user: User, key: RequestKey,
                          text: str, stream: int, answer: bool) -> None:  # fmt: skip
        self._fan_out(group, item)
        if item.change in (GroupChange.REMOVED, GroupChange.LEFT):
            self._trim_now(group)  # (the lowest place may have moved)
        if answer:
            self._group_result(user, key, 0, text, stream)

    def _group_members(self, session: Session, request: GroupRequest) -> None:
        if self.shared_store:
            # A cluster: from the shared store's state, not this node's copy
            # (up to a beat behind a change made on another node).
            op = ReadGroupState(group_name(request.group)[1])
            self.store.submit(op, functools.partial(self._members_read, session, request, op))
            return
        # Judged now, in the group's order; answered once what the store
        # has before it is committed, so after the events of the changes
        # before it (a `/create` then `/members`: `created` first).
        try:
            group = self.groups.member_of(request.group, session.user.key)
        except GroupRefused as exc:
            self.stats["group_refused"] += 1
            stream = conversation_stream(group_address(request.group.removeprefix("#")))
            refusal = GroupResult(request.request_id, int(exc.code), exc.message)
            self.store.submit(Sync(), functools.partial(self._answer_live, session, refusal,
                                                        stream))  # fmt: skip
            return
        names = [m.name for m in group.members.values()]
        self.store.submit(Sync(), functools.partial(
            self._send_members_live, session, request, group.name, group.owner_name(), names,
            self._group_stream(group)))  # fmt: skip

    def _answer_live(self, session: Session, answer: GroupResult, stream: int) -> None:
        if self.sessions.get(session.session_id) is session:
            self._send(session, answer, stream=stream)

    def _send_members_live(self, session: Session, request: GroupRequest, name: str, owner: str,
                           names: list[str], stream: int) -> None:  # fmt: skip
        if self.sessions.get(session.session_id) is session:
            self._send_members(session, request, name, owner, names, stream)

    def _send_members(self, session: Session, request: GroupRequest, name: str, owner: str,
                      names: list[str], stream: int) -> None:  # fmt: skip
        pages = [names[i : i + GROUP_PAGE_MAX] for i in range(0, len(names), GROUP_PAGE_MAX)]
        for index, page in enumerate(pages):
            more = index < len(pages) - 1
            self._send(session, GroupInfo(request.request_id, name, owner, tuple(page), more),
                       stream=stream)  # fmt: skip

    def _members_read(self, session: Session, request: GroupRequest, op: ReadGroupState) -> None:
        """Cluster mode: `/members` answered from the group as the shared
        store holds it (members in joining order), with one server's errors."""
        if self.sessions.get(session.session_id) is not session:
            return  # its client asks again at its next login
        stored = op.result
        name = stored.name if stored is not None else request.group.removeprefix("#")
        stream = conversation_stream(group_address(name))
        current = [m for m in stored.members if m.left_seq is None] if stored is not None else []
        answer: tuple[ErrorCode, str] | None = None
        if not op.ok:
            answer = (
                ErrorCode.SERVER_ERROR,
                f"the cluster's store could not be read; ask for #{name}'s members again",
            )
        elif stored is None:
            answer = (ErrorCode.NO_SUCH_GROUP, f"there is no group #{name}")
        elif all(m.key != session.user.key for m in current):
            answer = (ErrorCode.NOT_A_MEMBER, f"you are not a member of #{name}")
        if answer is not None or stored is None:
            code, text = answer or (ErrorCode.SERVER_ERROR, "")
            self.stats["group_refused"] += 1
            self._send(session, GroupResult(request.request_id, int(code), text), stream=stream)
            return
        owner = next((m.name for m in current if m.key == stored.owner_key), "")
        self._send_members(session, request, stored.name, owner, [m.name for m in current], stream)

    def _group_list(self, session: Session, request: GroupRequest) -> None:
        names = [g.name for g in self.groups.user_groups(session.user.key)]
        pages = [names[i : i + GROUP_PAGE_MAX] for i in range(0, len(names), GROUP_PAGE_MAX)]
        for index, page in enumerate(pages or [[]]):
            more = index < len(pages) - 1
            self._send(session, GroupList(request.request_id, tuple(page), more))

    # --- group messages -------------------------------------------------------

    def _take_group(self, session: Session, send: Send, to_key: str, *,
                    released: bool = False) -> None:  # fmt: skip
        """A new message to a group (`to_key` is '#' + the group's key);
        `released`: one that waited in the session's holds and goes on."""
        user = session.user
        size = len(send.text.encode("utf-8"))
        if size > MAX_TEXT_BYTES:
            self._fail(session, send.msg_id, ErrorCode.TOO_LONG, f"{size} bytes is over the limit")
            return
        if self._group_holds and not released and self._held_repeat(session, send, to_key):
            return
        if self.shared_store:
            # A cluster: the shared store numbers it, and judges whether its
            # sender is a member (this node may not have heard of a change yet).
            self._post_group(session, send, to_key)
            return
        if self._group_holds and self._hold_group(session, send, None, to_key):
            return  # behind another of its messages waiting for the fan-out budget
        group = self.groups.get(to_key[1:])
        if group is None:
            self._fail(session, send.msg_id, ErrorCode.NO_SUCH_GROUP,
                       f"there is no group {send.to}")  # fmt: skip
            return
        if user.key not in group.members:
            self._fail(session, send.msg_id, ErrorCode.NOT_A_MEMBER,
                       f"you are not a member of #{group.name}")  # fmt: skip
            return
        count, waiting = group.backlog()
        if count >= self.config.mailbox_messages or waiting + size > self.config.mailbox_bytes:
            full = self._backlog_full(group, size, user.key)
            if full:
                self._fail(session, send.msg_id, ErrorCode.MAILBOX_FULL, full)
                return
        recipients = len(group.members) - 1
        if not self._fanout_affords(user, recipients):
            self._wait_for_budget(session, send, to_key[1:], recipients)
            return
        msg_id = send.msg_id
        instance_id, client_seq = msg_id
        dedup = (user.key, instance_id, client_seq)
        server_msg_id = self._new_id()
        seq = self.groups.next_seq(group, size)
        self._accepted[dedup] = (server_msg_id, to_key, send.text)
        self._group_pending[dedup] = (seq, recipients)
        if instance_id == session.instance_id:
            instance = (user.key, instance_id)
            if client_seq > self._hwm.get(instance, -1):
                self._hwm[instance] = client_seq
        self._spend_fanout(user, recipients)
        self.stats["group_messages"] += 1
        item = GroupItem(group.key, seq, server_msg_id, 0, user.key, user.name, instance_id,
                         client_seq, send.text, (), int(self._wall_clock() * 1000),
                         recipients)  # fmt: skip
        self.store.submit(
            StoreGroupItem(item, group.name, group.owner),
            functools.partial(self._group_message_committed, group, item, dedup),
        )

    def _backlog_full(self, group: Group, size: int, sender_key: str) -> str:
        """Whether a message of `size` bytes would take what waits in
        `group`'s log for its member furthest behind over the limits of a
        mailbox (audit14 L2: nothing bounded a group's log before): the
        FAIL's text naming that member, or "" if it fits. The running
        totals count from the lowest cursor as last worked out, never above
        the real one; it is worked out again (a walk of the members) only if
        the member who had it is gone or has moved since, so posts refused
        in a row cost a dict lookup each. The same limits as a direct
        mailbox, not a pair of their own: what waits in a group for one
        member is, for them, one more mailbox (and it is read and paged like
        one); a member who cannot take more holds up the group until they
        read, leave or are removed (membership changes are always taken, so
        the owner can remove them)."""
        holder = group.members.get(group.low_key) if group.low_key is not None else None
        if holder is None or holder.cursor != group.low:
            group.lowest_member()
            holder = group.members.get(group.low_key) if group.low_key is not None else None
        count, waiting = group.backlog()
        cfg = self.config
        if count < cfg.mailbox_messages and waiting + size <= cfg.mailbox_bytes:
            return ""
        if holder is not None and (
            holder.key == sender_key or self._session_here(holder.key) is not None
        ):
            # Of members equally far behind (only when refusing: a walk), one
            # offline, else the one whose client has gone longest without a
            # receipt (the others are likely only a held receipt behind:
            # fresh8 1), and not the sender unless nobody else is.
            low = holder.cursor
            behind = [m for m in group.members.values() if m.cursor == low and m.key != sender_key]
            if behind:
                holder = min(behind, key=self._receipted_at)
        return backlog_full_text(group.name, holder.name if holder is not None else "", count,
                                 waiting)  # fmt: skip

    def _receipted_at(self, member: Member) -> float:
        """When `member`'s client here last receipted a group entry: -1 if
        they are not online here (they hold a group back the most surely),
        0 if never."""
        session = self._session_here(member.key)
        if session is None:
            return -1.0
        mail = session.group_mail
        return mail.receipted_at if mail is not None else 0.0

    def _group_message_committed(self, group: Group, item: GroupItem,
                                 dedup: tuple[str, int, int]) -> None:  # fmt: skip
        self._accepted.pop(dedup, None)
        self._group_pending.pop(dedup, None)
        sender = self.users.get(item.sender_key)
        if sender is not None:
            session = self.router.locate(sender)
            if isinstance(session, Session):
                msg_id = MsgId(item.instance_id, item.client_seq)
                self._send(session, GroupAccept(msg_id, item.server_msg_id, item.group_seq,
                                                item.recipients))  # fmt: skip
        if self.groups.get(group.key) is group:
            self.groups.sent(group, item.sender_key, item.group_seq)
        self._fan_out_soon(group, item)

    def _group_accept_again(self, user: User, msg_id: MsgId, server_msg_id: int) -> None:
        """A group message sent again after it was accepted: the same
        GROUP_ACCEPT, its place and count read back from the log."""
        pending = self._group_pending.get((user.key, *msg_id))
        if pending is not None:
            seq, recipients = pending
            self.store.submit(Sync(), functools.partial(
                self._send_group_accept, user, msg_id, server_msg_id, seq, recipients))  # fmt: skip
            return
        read = Read(FindGroupItem(server_msg_id))

        def found() -> None:
            seq, recipients = read.result if read.ok and read.result is not None else (0, 0)
            if self.shared_store and read.result is None:
                return  # not stored: refused (its FAIL went to the client)
            if read.ok:  # (0, 0): its group has ended since; it was accepted all the same
                self._send_group_accept(user, msg_id, server_msg_id, seq, recipients)

        self.store.submit(read, found)

    def _send_group_accept(self, user: User, msg_id: MsgId, server_msg_id: int, seq: int,
                           recipients: int) -> None:  # fmt: skip
        session = self.router.locate(user)
        if isinstance(session, Session):
            self._send(session, GroupAccept(msg_id, server_msg_id, seq, recipients))

    def _group_message(self, group: Group, item: GroupItem) -> GroupDeliver | GroupEvent:
        if item.change:
            return GroupEvent(item.server_msg_id, item.group_seq, group.name, item.change,
                              item.sender, item.users, item.sent_ms)  # fmt: skip
        return GroupDeliver(item.server_msg_id, item.group_seq,
                            MsgId(item.instance_id, item.client_seq), group.name, item.sender,
                            item.text, item.sent_ms)  # fmt: skip

    def _fan_out_soon(self, group: Group, item: GroupItem) -> None:
        """A committed message to the members online: at the end of this
        pass (`datagrams_to_send`), with the others the pass commits to the
        group, if its last fan-out was FANOUT_HOLD ago or more (or in this
        pass), else with the others committed until then, at the end of the
        hold (`_fan_out_due`). Each member gets them together, in GROUP_BATCHes
        (`_group_payloads`)."""
        key = group.key
        held = self._fanout_held.get(key)
        if held is not None and held[0] is group:
            held[1].append(item)
            return
        if self.shared_store:
            self._fan_out(group, item)
            return
        now = self._now
        last = self._fanout_last.get(key)
        # (The same pass as the last fan-out: its datagrams have not left
        # yet, so this one goes with this pass too.)
        if last is None or now >= last + FANOUT_HOLD or now == last:
            due = now
        else:
            due = last + FANOUT_HOLD
        self._fanout_held[key] = (group, [item], due)
        if self._fanout_due is None or due < self._fanout_due:
            self._fanout_due = due

    def _fan_out_due(self, now: float) -> None:
        """The holds that have ended: their groups' messages go out."""
        due: float | None = None
        for key, (group, _, at) in list(self._fanout_held.items()):
            if at <= now:
                self._fanout_last[key] = now
                self._run_callback(functools.partial(self._release_fanout, group))
            elif due is None or at < due:
                due = at
        self._fanout_due = due
        # One time per group that fanned out lately; the rest are stale.
        stale = [key for key, last in self._fanout_last.items() if last + FANOUT_HOLD <= now]
        for key in stale:
            del self._fanout_last[key]

    def _release_fanout(self, group: Group) -> None:
        """The group's held messages go out now: before anything else of
        it (an entry not held, its end), so every member has them in order."""
        held = self._fanout_held.pop(group.key, None)
        if held is not None:
            self._hand_out(held[0], held[1])

    def _fan_out(self, group: Group, item: GroupItem) -> None:
        """A committed entry to every member online it is for, after the
        group's held messages (`_fan_out_soon`)."""
        if self._fanout_held:
            self._release_fanout(group)
        self._hand_out(group, [item])

    def _hand_out(self, group: Group, items: list[GroupItem]) -> None:
        """Committed entries, in the group's order, to every member online
        each is for (one encoding of each for all of them); the others get
        them from the log later. Several at once are a hold's messages:
        each member's session is looked up once for all of them."""
        if self.groups.get(group.key) is not group:
            return  # ended meanwhile
        stream = self._group_stream(group)
        # One record of each entry for every member's pager (never changed
        # once made): per copy only the dict slots that point to it.
        handed = [(item, self._group_entry(group, item),
                   encode_message(self._group_message(group, item))) for item in items]  # fmt: skip
        # The same records for the members behind, who page through them next.
        cache = self._group_pages
        for _, entry, payload in handed:
            cache.add(group, group.key, entry, payload)
        copies = 0
        # What most members are handed is the same (all of `handed`): its
        # batches are joined once (key: the indexes handed).
        joined: dict[tuple[int, ...], list[bytes]] = {}
        # No membership change lies between held messages (a change takes
        # them out first), so the first one's audience is everyone's; `sees`
        # still decides per entry.
        for member in group.audience(items[0].group_seq):
            user = self.users.get(member.key)
            if user is None:
                continue
            route = self.router.locate(user)
            session = route if isinstance(route, Session) else None
            took: list[int] = []
            refused = False
            for index, (item, entry, _) in enumerate(handed):
                seq = item.group_seq
                if not member.sees(seq):
                    continue
                if not item.change and member.key == item.sender_key:
                    # The sender's own message: passed over by the session that
                    # sent it (in a cluster, so by the sender's node only: the
                    # others' copies of the cursor follow from the store at a
                    # login there); another client instance of theirs (a second
                    # device) gets it like any copy, one logging in later from
                    # the log, which also keeps it while the sender is offline.
                    if session is None:
                        continue
                    if session.instance_id == item.instance_id:
                        self._pass_own(group, member, seq)
                        continue
                if session is not None:
                    if self._offer_group(session, group, member, entry):
                        took.append(index)
                    else:
                        refused = True
            if took and session is not None:
                key = tuple(took)
                payloads = joined.get(key)
                if payloads is None:
                    payloads = joined[key] = self._group_payloads([handed[i][2] for i in took])
                self._send_group(session, payloads, stream)
                copies += len(took)
            if refused and session is not None:
                # After what it took (order on the stream): a page of what
                # waits, from the cache at once if it has it.
                self._page_group(session, group)
        self.stats["group_copies"] += copies

    @staticmethod
    def _group_entry(group: Group, item: GroupItem) -> GroupEntry:
        msg_id = None if item.change else MsgId(item.instance_id, item.client_seq)
        size = len(item.text.encode("utf-8")) if item.text else 0
        return GroupEntry(item.group_seq, item.server_msg_id, item.sender_key, msg_id, size,
                          (group.key, item.group_seq))  # fmt: skip

    def _group_pager(self, session: Session, group: Group,
                     member: Member) -> tuple[GroupMail, Pager[int, GroupEntry]]:  # fmt: skip
        mail = session.group_mail
        if mail is None:
            mail = session.group_mail = GroupMail()
        pager = mail.pagers.get(group.key)
        if pager is None:
            pager = mail.pagers[group.key] = Pager(behind=False)
            pager.cursor = member.cursor
        return mail, pager

    def _offer_group(self, session: Session, group: Group, member: Member,
                     entry: GroupEntry) -> bool:  # fmt: skip
        """Take an entry into the session's window now if nothing of the
        group waits before it and the window has room (True: the caller
        sends it, `_send_group`); else it waits in the log (False: the
        caller pages, `_page_group`, once it has sent what the member took)."""
        mail = session.group_mail
        pager = mail.pagers.get(group.key) if mail is not None else None
        if mail is None or pager is None:
            mail, pager = self._group_pager(session, group, member)
        seq = entry.seq
        size = entry.size
        if seq <= pager.cursor:
            return False  # a page has handed it already
        if not pager.behind and seq > pager.cursor + 1 and member.cursor < seq - 1:
            # Entries between what it had and this one are in the log.
            pager.behind = True
        if not pager.behind and (
            not mail.count
            or (mail.count < MAILBOX_WINDOW and mail.bytes + size <= MAILBOX_WINDOW_BYTES)
        ):
            self._hand_group(mail, pager, entry)
            return True
        pager.behind = True
        pager.missed = max(pager.missed, seq)
        return False  # (`_hand_out` pages it after what the member took)

    @staticmethod
    def _hand_group(mail: GroupMail, pager: Pager[int, GroupEntry], entry: GroupEntry) -> None:
        """An entry into the session's window (the caller sends it)."""
        pager.items[entry.seq] = entry
        pager.cursor = entry.seq
        mail.ids[entry.server_msg_id] = entry.where
        mail.count += 1
        mail.bytes += entry.size

    @staticmethod
    def _group_payloads(payloads: list[bytes]) -> list[bytes]:
        """Entries handed to a member together, in order, as the payloads
        that carry them: consecutive ones joined in GROUP_BATCHes of at most
        GROUP_BATCH_BYTES, one that fits in none of them alone as it is."""
        if len(payloads) == 1:
            return payloads
        out: list[bytes] = []
        batch: list[bytes] = []
        size = 3  # the batch's kind and count
        for payload in payloads:
            cost = len(payload) + GROUP_BATCH_ENTRY_OVERHEAD
            if batch and size + cost > GROUP_BATCH_BYTES:
                out.append(batch[0] if len(batch) == 1 else group_batch(batch))
                batch, size = [], 3
            batch.append(payload)
            size += cost
        out.append(batch[0] if len(batch) == 1 else group_batch(batch))
        return out

    def _send_group(self, session: Session, payloads: list[bytes], stream: int) -> None:
        """`_group_payloads`' output to the session, on the group's stream,
        with `lazy_ack`: a member may ack a datagram of group entries alone
        up to `reliability.GROUP_ACK_DELAY` late (or at the third such
        datagram), so that its ack rides on its receipts (client_core
        `GROUP_RECEIPT_HOLD`; issue 14), and our timers for such a datagram
        wait that much longer (the session's `peer_late_ack`). Clients from
        before ack at RECEIPT_ACK_DELAY or MAX_ACK_DELAY: they are only
        allowed more."""
        send = session.conn.send
        for payload in payloads:
            send(payload, stream, lazy_ack=True)
        self._dirty[session.session_id] = session

    def _pass_own(self, group: Group, member: Member, seq: int) -> None:
        """The sender's own message: nothing to hand them, but their cursor
        may pass it (when they have everything before it), so that a login
        does not read it again."""
        if member.cursor == seq - 1:
            member.cursor = seq
            self.store.submit(GroupReceipt(group.key, member.key, seq))
        session = self._session_here(member.key)
        if session is not None and session.group_mail is not None:
            pager = session.group_mail.pagers.get(group.key)
            if pager is not None and not pager.behind and pager.cursor == seq - 1:
                pager.cursor = seq

    def _page_group(self, session: Session, group: Group) -> None:
        """Hand the session the next page of a group's log if it is behind
        there and the window has room enough: from the cache of the group's
        recent entries (`_page_cached`) where it has them, else from one
        store read shared with every other pager at the same place."""
        mail = session.group_mail
        pager = mail.pagers.get(group.key) if mail is not None else None
        if mail is None or pager is None or not pager.behind or pager.reading:
            return
        member = group.member(session.user.key)
        if member is None:
            self._drop_pager(mail, group.key)
            return
        if self.groups.former_of and self.groups.owed_before(group, session.user.key):
            return  # an ended group of its name first (`_on_group_receipt` goes on here)
        free = MAILBOX_WINDOW - mail.count
        free_bytes = MAILBOX_WINDOW_BYTES - mail.bytes
        if mail.count and (free < PAGE_MIN or free_bytes < PAGE_MIN_BYTES):
            return
        if self._page_cached(session, group, member, mail, pager):
            return
        pager.reading = True
        after = max(pager.cursor, member.cursor)
        key = (group.key, after)
        shared = self._group_reads.get(key)
        if shared is not None and shared[0] is group:
            shared[1].append((session, pager))
            return
        reading = self._group_reads[key] = (group, [(session, pager)])
        # A whole window's worth (each pager takes what its own window
        # has room for), up to the last entry numbered: every entry
        # numbered so far was submitted before the read.
        upto = group.seq
        read = Read(ReadGroupLog(group.key, after, upto, MAILBOX_WINDOW, MAILBOX_WINDOW_BYTES))
        self.store.submit(read, functools.partial(self._group_read, key, reading, read, upto))

    def _page_cached(self, session: Session, group: Group, member: Member, mail: GroupMail,
                     pager: Pager[int, GroupEntry]) -> bool:  # fmt: skip
        """A page from the cache of the group's recent entries: whole runs
        (one joined payload for every member at their start) while they fit
        the window and hold nothing the member must not get or is passed
        over; entry by entry where not. False: what the session needs next
        is not cached (the caller reads the store)."""
        cache = self._group_pages
        key = group.key
        user_key = session.user.key
        last = member.left_seq if member.left_seq is not None else group.seq
        seq = max(pager.cursor, member.cursor) + 1
        room = MAILBOX_WINDOW - mail.count
        room_bytes = MAILBOX_WINDOW_BYTES - mail.bytes
        handed = 0
        out: list[bytes] = []  # the payloads, in order
        single: list[bytes] = []  # entries handed one by one, joined before the next run
        hand = self._hand_group
        cached = True
        while seq <= last and room > 0:
            run = cache.run(group, key, seq, GROUP_BATCH_BYTES, GROUP_BATCH_ENTRY_OVERHEAD,
                            group_batch)  # fmt: skip
            if run is None:
                cached = False
                break
            entries = run.entries
            if (
                len(entries) <= room
                and run.size <= room_bytes
                and user_key not in run.senders
                and member.joined_seq <= seq
                and (member.left_seq is None or run.next - 1 <= member.left_seq)
            ):
                if single:
                    out.extend(self._group_payloads(single))
                    single = []
                for entry in entries:
                    hand(mail, pager, entry)
                out.append(run.payload)
                count = len(entries)
                handed += count
                room -= count
                room_bytes -= run.size
                seq = run.next
                continue
            # The run's first entry alone.
            entry = entries[0]
            if not member.sees(seq):
                seq += 1
                continue
            msg_id = entry.msg_id
            if (
                msg_id is not None
                and entry.sender_key == user_key
                and msg_id.instance_id == session.instance_id
            ):
                pager.cursor = seq  # passed: nothing to hand its sender
                if not pager.items:
                    self._pass_own(group, member, seq)
                seq += 1
                continue
            if handed and entry.size > room_bytes:
                room = 0  # full (the first of a page goes whatever its size, as from the store)
                break
            found = cache.get(group, key, seq)
            assert found is not None  # (the run's first entry)
            hand(mail, pager, entry)
            single.append(found[1])
            handed += 1
            room -= 1
            room_bytes -= entry.size
            seq += 1
        if single:
            out.extend(self._group_payloads(single))
        if out:
            self._send_group(session, out, self._group_stream(group))
            cache.stats["served"] += handed
        if cached and seq <= last:
            return True  # the window is full: more when receipts make room
        if seq > last or seq > pager.missed:
            # Everything numbered is handed (what is not committed yet is
            # not cached), or nothing it was refused waits at `seq` or past
            # it: the rest comes live from the fan-out.
            pager.behind = False
            return True
        return False  # the store has what comes next

    def _group_read(self, key: tuple[str, int],
                    waiting: tuple[Group, list[tuple[Session, Pager[int, GroupEntry]]]],
                    read: Read, upto: int) -> None:  # fmt: skip
        """A page of the group's log read from the store: encoded once (and
        cached), then handed to every pager that waited for it."""
        if self._group_reads.get(key) is waiting:
            del self._group_reads[key]
        group = waiting[0]
        page: list[tuple[GroupItem, GroupEntry, bytes]] = []
        more = False
        if read.ok and self.groups.get(group.key) is group:
            items: list[GroupItem]
            items, more = read.result
            cache = self._group_pages
            for item in items:
                found = cache.get(group, group.key, item.group_seq)
                if found is None:
                    entry = self._group_entry(group, item)
                    payload = encode_message(self._group_message(group, item))
                    cache.add(group, group.key, entry, payload)
                else:
                    entry, payload = found
                page.append((item, entry, payload))
        joined: dict[tuple[int, ...], list[bytes]] = {}
        for session, pager in waiting[1]:
            paged = functools.partial(self._group_paged, session, group, pager, read.ok, page,
                                      more, upto, joined)  # fmt: skip
            self._run_callback(paged)

    def _group_paged(self, session: Session, group: Group, pager: Pager[int, GroupEntry],
                     ok: bool, page: list[tuple[GroupItem, GroupEntry, bytes]], more: bool,
                     upto: int, joined: dict[tuple[int, ...], list[bytes]]) -> None:  # fmt: skip
        """A page read from the store, to one of the sessions it was read
        for: what its window has room for (the payloads of the same entries
        joined once for all of them, `joined`)."""
        pager.reading = False
        mail = session.group_mail
        if mail is None or mail.pagers.get(group.key) is not pager or not ok:
            return  # the session ended (the next login reads again), or the read failed
        member = group.member(session.user.key)
        if self.groups.get(group.key) is not group or member is None:
            self._drop_pager(mail, group.key)
            return
        room = MAILBOX_WINDOW - mail.count
        room_bytes = MAILBOX_WINDOW_BYTES - mail.bytes
        took: list[int] = []
        full = False
        for index, (item, entry, _) in enumerate(page):
            seq = item.group_seq
            if seq <= pager.cursor or not member.sees(seq):
                continue
            if (
                not item.change
                and item.sender_key == member.key
                and item.instance_id == session.instance_id
            ):
                pager.cursor = seq  # passed: nothing to hand its sender
                if not pager.items:
                    self._pass_own(group, member, seq)
                continue
            if room <= 0 or (took and entry.size > room_bytes):
                full = True
                break
            self._hand_group(mail, pager, entry)
            took.append(index)
            room -= 1
            room_bytes -= entry.size
        if took:
            key = tuple(took)
            payloads = joined.get(key)
            if payloads is None:
                payloads = joined[key] = self._group_payloads([page[i][2] for i in took])
            self._send_group(session, payloads, self._group_stream(group))
        if full:
            return  # more when receipts make room
        if not more and pager.missed <= max(pager.cursor, upto):
            pager.behind = False
        else:
            self._page_group(session, group)

    def _drop_pager(self, mail: GroupMail, group_key: str) -> None:
        pager = mail.pagers.pop(group_key, None)
        if pager is None:
            return
        for entry in pager.items.values():
            mail.ids.pop(entry.server_msg_id, None)
            mail.count -= 1
            mail.bytes -= entry.size

    def _on_group_receipts(self, session: Session, ids: Iterable[int]) -> list[int]:
        """A batch of receipts: of each group's entries among them only the
        latest counts (it covers everything of the group before it), so a
        batch moves a cursor once, not once per entry. The ids that are not
        group entries' come back for the mailbox."""
        mail = session.group_mail
        assert mail is not None
        where = mail.ids
        others: list[int] = []
        latest: dict[str, tuple[int, int]] = {}  # group key -> (seq, server_msg_id)
        for server_msg_id in ids:
            found = where.get(server_msg_id)
            if found is None:
                others.append(server_msg_id)
                continue
            group_key, seq = found
            if seq > latest.get(group_key, (0, 0))[0]:
                latest[group_key] = (seq, server_msg_id)
        for _, server_msg_id in latest.values():
            self._on_group_receipt(session, server_msg_id)
        return others

    def _on_group_receipt(self, session: Session, server_msg_id: int) -> bool:
        """A member's client has a group entry, and so everything of that
        group handed before it: its cursor moves, and the senders of the
        messages among them hear who has them. False: not a group entry."""
        mail = session.group_mail
        where = mail.ids.get(server_msg_id) if mail is not None else None
        if mail is None or where is None:
            return False
        group_key, seq = where
        mail.receipted_at = self._now
        pager = mail.pagers[group_key]
        done: list[GroupEntry] = []
        items = pager.items
        while items:  # in seq order (handed in order): the oldest first, up to `seq`
            entry = items[next(iter(items))]
            if entry.seq > seq:
                break
            del items[entry.seq]
            mail.ids.pop(entry.server_msg_id, None)
            mail.count -= 1
            mail.bytes -= entry.size
            done.append(entry)
        group = self.groups.get(group_key)
        member = group.member(session.user.key) if group is not None else None
        if group is None or member is None:
            self._drop_pager(mail, group_key)
            return True
        user = session.user
        reached = self._group_reached
        for entry in done:
            msg_id = entry.msg_id
            if msg_id is not None and entry.sender_key != user.key:
                # The sender hears of it this pass, if online; else its next
                # login works it out from the cursor moved here.
                by_message = reached.get(entry.sender_key)
                if by_message is None:
                    by_message = reached[entry.sender_key] = {}
                told = by_message.get(msg_id)
                if told is None:
                    by_message[msg_id] = (group, [user.name])
                else:
                    told[1].append(user.name)
        before = member.cursor
        if seq > member.cursor:
            member.cursor = seq
        self.store.submit(GroupReceipt(group_key, user.key, seq))
        if member.caught_up and is_retired(group_key):
            # What was owed of a group that ended is had: a new group of
            # its name, held back until now (`_page_group`), goes on.
            live = self.groups.get(group_key[1:].rsplit(TOMBSTONE, 1)[0])
            if live is not None:
                self._catch_up_member(session, live)
        owed = group.owed.get(user.key)
        if owed is not None and before <= owed[0]:
            # A sender's own cursor held their mark (it often does: their
            # client passes over their own messages): it may move now.
            self._group_lows.pop(group_key, None)
            self._group_told(session, group)
        self._maybe_trim(group, user.key)
        if member.caught_up and self.groups.forget_former(group, member):
            self.store.submit(DropMember(group_key, user.key))
            self._drop_pager(mail, group_key)
            self._end_retired(group)
            return True
        if pager.behind or len(mail.pagers) > 1:  # the window has room again
            for other_key, other in list(mail.pagers.items()):
                if other.behind and not other.reading:
                    other_group = self.groups.get(other_key)
                    if other_group is not None:
                        self._page_group(session, other_group)
        return True

    def _send_group_reached(self) -> None:
        """The pass's "delivered by" notices: one GROUP_REACHED per message
        naming the members whose receipts came (256 names a frame), to the
        sender's session if it has one (if not, its next login works them
        out from the cursors)."""
        reached, self._group_reached = self._group_reached, {}
        for sender_key, by_message in reached.items():
            sender = self.users.get(sender_key)
            session = self.router.locate(sender) if sender is not None else None
            if not isinstance(session, Session):
                if self.shared_store and session is not None:  # on another node
                    self._tell_elsewhere(sender_key, by_message)
                continue
            for msg_id, (group, names) in by_message.items():
                self._send_reached(session, group, msg_id, names)

    def _tell_elsewhere(self, sender_key: str,
                        by_message: dict[MsgId, tuple[Group, list[str]]]) -> None:  # fmt: skip
        """Cluster mode: the pass's "delivered by" notices for a sender
        whose session is on another node: to that node, through the store
        (`TellReached`), with the cursors of the members named (that node's
        copy of the group learns how far they are: its low-water mark)."""
        by_group: dict[str, tuple[Group, list[tuple[int, int, list[str]]]]] = {}
        for msg_id, (group, names) in by_message.items():
            entry = by_group.get(group.key)
            if entry is None:
                entry = by_group[group.key] = (group, [])
            entry[1].append((msg_id.instance_id, msg_id.client_seq, names))
        for group_key, (group, reached) in by_group.items():
            cursors: dict[str, int] = {}
            for _, _, names in reached:
                for name in names:
                    member = group.member(name_key(name))
                    if member is not None:
                        cursors[member.key] = member.cursor
            self.store.submit(TellReached(sender_key, group_key, reached, list(cursors.items())))

    def _send_reached(self, session: Session, group: Group, msg_id: MsgId, names: list[str],
                      gone: list[str] | None = None) -> None:  # fmt: skip
        """GROUP_REACHED frames of at most GROUP_PAGE_MAX names each: who
        has the message, then who never will."""
        notices = session.group_notices
        if notices is None:
            notices = session.group_notices = GroupNotices()
        frames = [GroupReached(group.name, msg_id, tuple(names[i : i + GROUP_PAGE_MAX]))
                  for i in range(0, len(names), GROUP_PAGE_MAX)]  # fmt: skip
        if gone:
            frames.extend(GroupReached(group.name, msg_id, (), tuple(gone[i : i + GROUP_PAGE_MAX]))
                          for i in range(0, len(gone), GROUP_PAGE_MAX))  # fmt: skip
        for frame in frames:
            notices.inflight[group.key] = notices.inflight.get(group.key, 0) + 1
            self._send(session, frame, handle=_GroupNotices(group.key))

    def _group_reached_acked(self, session: Session, handle: _GroupNotices) -> None:
        """The sender's client holds a GROUP_REACHED: once a group has none
        in flight, its mark may move (or the next page of its catch-up go)."""
        notices = session.group_notices
        if notices is None:
            return
        key = handle.group_key
        left = notices.inflight.get(key, 0) - 1
        if left > 0:
            notices.inflight[key] = left
            return
        notices.inflight.pop(key, None)
        group = self.groups.get(key)
        if group is None:
            return
        if key in notices.catching:
            self._read_sent(session, group)
        else:
            self._group_told(session, group)

    def _group_told(self, session: Session, group: Group) -> None:
        """Nothing of `group` in flight to the sender's session, nothing
        queued, no catch-up under way: its client has been told every
        delivery up to the group's low-water mark (every receipt below it
        made a notice, sent to this session or worked out at its login).
        That mark is durable; a sender owed nothing more is dropped."""
        user = session.user
        notices = session.group_notices
        if (
            user.key not in group.owed
            or (notices is not None and notices.busy(group.key))
            or any(g is group for g, _ in self._group_reached.get(user.key, {}).values())
        ):
            return
        # The low-water mark only rises (a member added starts at the end),
        # so one worked out earlier in the pass is safe, if low: walking a
        # thousand members at every sender's ack would cost more than a copy.
        low = self._group_lows.get(group.key)
        if low is None:
            low = self._group_lows[group.key] = group.low_water()
        if not self.groups.told(group, user.key, low):
            # (held by another's place, often a former member's: she may
            # still be exempt from the log's hole up to here)
            if self.shared_store:
                self._maybe_trim(group, user.key)
            return
        self.store.submit(GroupTold(user.key, group.key, low))
        dropped = False
        for member in [m for m in group.former.values() if m.caught_up]:
            if self.groups.forget_former(group, member):
                self.store.submit(DropMember(group.key, member.key))
                dropped = True
        if is_retired(group.key):
            self._end_retired(group)
            if dropped:
                self._trim_now(group)
            return
        if dropped:
            self._trim_now(group)  # (a former member no longer holds the trim)
            return
        self._maybe_trim(group, user.key)

    def _maybe_trim(self, group: Group, moved: str) -> None:
        """`moved`'s cursor or mark moved: trim the log if GROUP_TRIM_EVERY
        entries could go and `moved` was what held it back (or that many
        entries came since the last look): working the bound out walks the
        members, so not at every receipt. (A cluster trims in the shared
        store, by every node's cursors and marks there: `_share_trim`.)"""
        if self.shared_store:
            self._share_trim(group)
            return
        if group.seq - group.trimmed < GROUP_TRIM_EVERY:
            return
        if (
            group.trim_blocker is not None
            and moved != group.trim_blocker
            and group.seq - group.trim_checked < GROUP_TRIM_EVERY
        ):
            return
        self._trim_group(group)

    def _trim_now(self, group: Group) -> None:
        """One server: what the log holds for someone may have shrunk
        without a receipt (a member removed or gone, the group's end, a
        former member dropped or buried, the start): trim it now, however
        few entries could go (a receipt's trim waits for GROUP_TRIM_EVERY,
        and a group nobody receipts in any more would keep them for good).
        These are rare, so the walk of the members is too."""
        if (
            not self.shared_store
            and self.groups.get(group.key) is group
            and group.seq > group.trimmed
        ):
            checked = group.trim_checked
            self._trim_group(group)
            group.trim_checked = checked  # (the receipts' own cadence goes on as it was)

    def _share_trim(self, group: Group, *, at_once: bool = False) -> None:
        """Cluster mode: the senders here with nothing of `group` in flight or
        queued were told every delivery of their messages up to where this
        copy's current members have everything: the shared store is told
        (`TrimGroup.exempt`), and trims the log, whose hole may take their
        messages up to there (review7 F3: one server's `_trim_group` has
        `online`; here the store keeps each sender's mark, as her node last
        named it, for every node's trim, and every node trims at its beat).
        Worked out every GROUP_TRIM_EVERY entries (it walks the members),
        or `at_once`: a member removed or gone, or a beat (`group_heads`)."""
        if group.seq - group.trim_checked < GROUP_TRIM_EVERY and not at_once:
            return
        group.trim_checked = group.seq
        quiet = [key for key in group.owed if self._quiet_sender(key, group)]
        if not quiet:
            return
        marks = group.exempt
        low = group.lowest_member()[0]
        exempt = tuple((key, low) for key in quiet if marks.get(key, -1) < low)
        if not exempt:
            return
        for key in [key for key in marks if key not in group.owed]:
            del marks[key]  # (owed nothing more here)
        marks.update(exempt)
        self.store.submit(TrimGroup(group.key, 0, 0, exempt))

    def _quiet_sender(self, sender_key: str, group: Group) -> bool:
        """Whether `sender_key` has a session here with nothing of `group`
        in flight to it, being worked out, or queued (`_share_trim`)."""
        session = self._session_here(sender_key)
        if session is None:
            return False
        notices = session.group_notices
        if notices is not None and notices.busy(group.key):
            return False
        return not any(g is group for g, _ in self._group_reached.get(sender_key, {}).values())

    def _trim_group(self, group: Group) -> None:
        """Delete the log's entries everyone has and every sender was told
        of; first the marks of the senders online with nothing under way
        move up to the low-water mark (a receipt of another's entry moves
        it without a notice to them)."""
        group.trim_checked = group.seq
        self._group_lows.pop(group.key, None)
        online: set[str] = set()
        for sender_key in list(group.owed):
            sender = self.users.get(sender_key)
            route = self.router.locate(sender) if sender is not None else None
            if isinstance(route, Session):
                self._group_told(route, group)
                # Exempt from the hole only with no notice of the group
                # unacked (or a catch-up under way): a session that stopped
                # hearing us lives until its timeout, and her next login
                # reads what she was not told from the log (review7 F3); so
                # she holds to her last message like a sender offline.
                # (Notices queued in this pass are not counted: a sender
                # posting steadily always has some, and the hole would never
                # be cut; they go out at the end of the step, and only a
                # session ended before it acks them loses one of them.)
                notices = route.group_notices
                if notices is None or not notices.busy(group.key):
                    online.add(sender_key)
        bound, group.trim_blocker, first, last = group.trim_plan(online)
        if bound > group.trimmed:
            self.store.submit(TrimGroup(group.key, bound))
            self.stats["group_trims"] += 1
        self.groups.trim(group, bound, last)
        first = max(first, bound + 1)
        if first <= last:
            # What former members and senders are still owed lies below
            # `first`; the current members have everything up to `last`:
            # nobody reads what lies between again (`Group.trim_plan`).
            group.holed = last
            self.store.submit(TrimGroup(group.key, last, first))
            self.stats["group_trims"] += 1

    def _tell_again(self, session: Session, group: Group) -> None:
        """Tell the sender's session again, from its mark on, who has its
        messages in `group` and who never will."""
        entry = group.owed.get(session.user.key)
        if entry is None:
            return
        notices = session.group_notices
        if notices is None:
            notices = session.group_notices = GroupNotices()
        notices.catching[group.key] = entry[0]
        if group.key in notices.reading:
            notices.again.add(group.key)  # the page under way was worked out before
        else:
            self._read_sent(session, group)

    def _read_sent(self, session: Session, group: Group) -> None:
        """After a login: the next page of the sender's messages in `group`
        past its mark, to tell again who has each (its client ignores what
        it knew)."""
        notices = session.group_notices
        if notices is None or group.key in notices.reading:
            return
        after = notices.catching.get(group.key)
        if after is None:
            return
        notices.reading.add(group.key)
        read = Read(ReadGroupSent(group.key, session.user.key, after, GROUP_SENT_PAGE))
        self.store.submit(read, functools.partial(self._sent_paged, session, group, read))

    def _sent_paged(self, session: Session, group: Group, read: Read) -> None:
        notices = session.group_notices
        if notices is None or self.sessions.get(session.session_id) is not session:
            return
        notices.reading.discard(group.key)
        if not read.ok or self.groups.get(group.key) is not group:
            # Left in `catching`: the mark does not move in this session; the
            # next login reads again.
            return
        if group.key in notices.again:  # start over from the mark
            notices.again.discard(group.key)
            self._read_sent(session, group)
            return
        rows: list[tuple[int, int, int]]
        rows, more = read.result
        user_key = session.user.key
        for seq, instance_id, client_seq in rows:
            have: list[str] = []
            gone: list[str] = []
            for m in group.audience(seq):
                if m.cursor >= seq:
                    if m.key != user_key:
                        have.append(m.name)
                elif m.gone:
                    gone.append(m.name)
            if have or gone:
                self._send_reached(session, group, MsgId(instance_id, client_seq), have, gone)
        if more and rows:
            notices.catching[group.key] = rows[-1][0]
            if not notices.inflight.get(group.key):
                self._read_sent(session, group)
            return
        notices.catching.pop(group.key, None)
        self._group_told(session, group)

    def _start_groups(self, session: Session) -> None:
        """At login: page what waits in the user's groups since their
        cursor, and tell again who has their messages past their marks."""
        user = session.user
        if self.shared_store:
            # A cluster: the cursors as the store has them first (the user's
            # client may have receipted on another node since this one heard).
            keys = tuple(group.key for group in self.groups.catching_up(user.key))
            op = ReadGroupCursors(user.key, keys)
            self.store.submit(op, functools.partial(self._group_cursors_read, session, op))
        else:
            for group in self.groups.catching_up(user.key):
                member = group.member(user.key)
                if member is not None and not member.caught_up:
                    self._catch_up_member(session, group)
        owed = self.groups.owed_groups(user.key)
        if owed:
            notices = session.group_notices = GroupNotices()
            for group in owed:
                notices.catching[group.key] = group.owed[user.key][0]
                if self.shared_store:
                    # A cluster: who has what by the store's cursors (members on
                    # other nodes receipted there), and the sender's mark there.
                    state = ReadGroupState(group.key)
                    self.store.submit(state, functools.partial(self._owed_refreshed, session,
                                                               group, state))  # fmt: skip
                else:
                    self._read_sent(session, group)

    # --- groups in cluster mode (`shared_store`) ----------------------------
    # The shared store gives every entry its seq (server_cluster: a message's
    # script checks its sender is a member there and then; a membership
    # change, planned here on this node's copy, is applied only if no other
    # change came first). This node's copy of a group only ever takes the
    # log's entries in order, whoever made them, so it is a prefix of the one
    # log, and members on every node are handed the same sequence.

    def _post_group(self, session: Session, send: Send, to_key: str) -> None:
        """A new message to a group, numbered by the shared store (once a
        request to the group sent before it is answered: `_hold_group`)."""
        if self._group_holds and self._hold_group(session, send, None, to_key):
            return
        user = session.user
        group = self.groups.get(to_key[1:])
        # The fan-out budget, by this node's count of the members (the
        # store's may differ by a change not heard of yet).
        copies = len(group.members) - 1 if group is not None else 0
        if not self._fanout_affords(user, copies):
            self._wait_for_budget(session, send, to_key[1:], copies)
            return
        instance_id, client_seq = send.msg_id
        dedup = (user.key, instance_id, client_seq)
        server_msg_id = self._new_id()
        self._accepted[dedup] = (server_msg_id, to_key, send.text)
        if instance_id == session.instance_id:
            instance = (user.key, instance_id)
            if client_seq > self._hwm.get(instance, -1):
                self._hwm[instance] = client_seq
        self._spend_fanout(user, copies)
        self.stats["group_messages"] += 1
        item = GroupItem(to_key[1:], 0, server_msg_id, 0, user.key, user.name, instance_id,
                         client_seq, send.text, (), int(self._wall_clock() * 1000), 0)  # fmt: skip
        cfg = self.config  # (the shared store judges the backlog: `GROUP_POST`)
        post = PostGroupMessage(item, cfg.mailbox_messages, cfg.mailbox_bytes)
        self.store.submit(post, functools.partial(self._group_posted, user, post, dedup, send.to))

    def _fanout_bucket(self, user: User) -> TokenBucket:
        bucket = user.fanout_bucket
        if bucket is None:
            cfg = self.config
            bucket = user.fanout_bucket = TokenBucket(cfg.max_fanout_rate, cfg.max_fanout_burst,
                                                      self._now)  # fmt: skip
        return bucket

    def _fanout_affords(self, user: User, copies: int) -> bool:
        """Whether the user's fan-out budget pays for a message of `copies`
        now (one costing more than the whole burst: from a full bucket).
        `_may_take` asked before the datagram was taken; a message may have
        waited since (behind a request, a lookup on the disk) or cost more
        than was reckoned then (a group made or grown in the same datagram),
        so it is asked again where the message is numbered."""
        return not copies or self._fanout_bucket(user).ready(copies, self._now)

    def _spend_fanout(self, user: User, copies: int) -> None:
        """The fan-out budget: the copies are paid now (`_fanout_affords`
        said they may be); a user in debt has their next messages wait
        (`_may_take`)."""
        bucket = self._fanout_bucket(user)
        bucket.ready(0, self._now)  # brings it up to date
        bucket.spend(copies)

    def _wait_for_budget(self, session: Session, what: Send | GroupRequest, group_key: str,
                         copies: int) -> None:  # fmt: skip
        """A group message or membership request taken (its datagram acked)
        that the fan-out budget cannot pay for yet: it waits in the
        session's holds, and what the session sends to its group after it
        waits behind it (`_hold_group`), until the budget can
        (`_budget_paid`), so that no sender makes the server emit more
        copies a second than the budget, whatever waited where. Bounded like
        the other holds (`MAX_GROUP_HELD`, `_may_take`); if the session ends
        first, its client sends it again at its next login (it was never
        accepted or answered)."""
        holds = self._group_holds.get(session.session_id)
        if holds is None:
            holds = self._group_holds[session.session_id] = _GroupHolds()
        to_key = "#" + group_key if isinstance(what, Send) else ""
        holds.by_group[group_key] = (BUDGET_HOLD, collections.deque([(what, to_key)]))
        holds.count += 1
        holds.size += held_size(what)
        self.stats["held_fanout"] += 1
        # Its sender hears why its lines stay "sending" (the same notice as
        # a datagram withheld for the budget, `_may_take`): a message that
        # still cannot be paid for when released waits here again, so the
        # notice comes again while the hold lasts, at most once a second
        # (`_tell_limited`; audit8 P8).
        self._tell_limited(session, FANOUT_LIMITED, self._now)
        bucket = self._fanout_bucket(session.user)
        short = min(copies, bucket.burst) - bucket.tokens
        at = self._now + max(0.0, short) / bucket.rate
        sid = session.session_id
        self._budget_waits[sid] = min(at, self._budget_waits.get(sid, at))
        if self._budget_due is None or at < self._budget_due:
            self._budget_due = at

    def _budget_paid(self, now: float) -> None:
        """The fan-out budget of sessions whose group messages wait for it
        can pay for the first of them: they go on, in order (one the budget
        still cannot pay waits again, with what is behind it)."""
        for sid, at in list(self._budget_waits.items()):
            if at > now:
                continue
            del self._budget_waits[sid]
            holds = self._group_holds.get(sid)
            if holds is None:
                continue
            for group_key, (key, _) in list(holds.by_group.items()):
                if key == BUDGET_HOLD:
                    self._run_callback(
                        functools.partial(self._release_group, sid, group_key, BUDGET_HOLD)
                    )
        self._budget_due = min(self._budget_waits.values(), default=None)

    def _group_posted(self, user: User, post: PostGroupMessage, dedup: tuple[str, int, int],
                      to: str) -> None:  # fmt: skip
        """The store has numbered the message (or refused it: its sender was
        not a member there)."""
        self._accepted.pop(dedup, None)
        item = post.item
        msg_id = MsgId(item.instance_id, item.client_seq)
        session = self.router.locate(user)
        if post.refused:
            self.stats["group_refused"] += 1
            if isinstance(session, Session):
                code = ErrorCode(post.refused)
                if code == ErrorCode.MAILBOX_FULL:
                    holder = self.users.get(post.held_by)
                    who = holder.name if holder is not None else post.held_by
                    text = backlog_full_text(to.removeprefix("#"), who, *post.backlog)
                else:
                    text = {ErrorCode.NO_SUCH_GROUP: f"there is no group {to}",
                            ErrorCode.NOT_A_MEMBER: f"you are not a member of {to}"}.get(
                                code, DUPLICATE_ID_TEXT)  # fmt: skip
                self._fail(session, msg_id, code, text)
            return
        if isinstance(session, Session):
            self._send(session, GroupAccept(msg_id, item.server_msg_id, item.group_seq,
                                            item.recipients))  # fmt: skip
        self._group_arrived(item.group_key, post.epoch, [item])

    def _group_arrived(self, key: str, epoch: int, items: list[GroupItem]) -> None:
        """Entries this node had stored (in hand, numbered): made in the copy
        at once if they are the next ones, else read from the log in turn."""
        group = self.groups.get(key)
        if group is not None and group.epoch == epoch and items[0].group_seq == group.seq + 1:
            for item in items:
                self._apply_entry(group, item)
            self._run_group_waiters(key)
        else:
            self._group_behind(key, epoch, items[-1].group_seq)

    def _apply_entry(self, group: Group, item: GroupItem) -> None:
        """The log's next entry into this node's copy, then to the members here."""
        self.groups.apply(group, group.key, group.name, item.group_seq, item.server_msg_id,
                          item.change, item.sender_key, item.users)  # fmt: skip
        if not item.change and self.groups.get(group.key) is group:
            # Every node's copy knows who is owed "delivered by" notices (its
            # former members are kept for them: `forget_former`).
            self.groups.sent(group, item.sender_key, item.group_seq)
        self._fan_out(group, item)
        if item.change in (GroupChange.REMOVED, GroupChange.LEFT):
            self._share_trim(group, at_once=True)  # (the lowest place may have moved)
        if item.change == GroupChange.LEFT and self._erased_members:
            pending = self._erased_members.get(item.sender_key)
            if pending is not None and group.key in pending:
                # A deleted account's leaving (deleted on another node).
                pending.discard(group.key)
                if not pending:
                    del self._erased_members[item.sender_key]
                self._bury_copy(item.sender_key)

    def _bury_copy(self, user_key: str) -> None:
        """Cluster mode: an account deleted on another node, in this node's
        copies of its groups: a former member that had everything is
        dropped, one that had not goes under a tombstone (the node where it
        was deleted keeps that in the shared store: `_bury`), and the
        senders with a session here are told at once that it never will
        have what it had not (before, only at their next login)."""
        for group, member, _ in self.groups.bury(user_key):
            if not member.gone:
                continue
            for sender_key in list(group.owed):
                sender = self.users.get(sender_key)
                route = self.router.locate(sender) if sender is not None else None
                if isinstance(route, Session):
                    self._tell_again(route, group)

    def _group_behind(self, key: str, epoch: int, seq: int) -> None:
        """The shared log of group `key` (the one of `epoch`) reaches `seq`:
        bring this node's copy there (its state read afresh if it does not
        have that group)."""
        group = self.groups.get(key)
        if group is None or group.epoch != epoch:
            # Remembered: a notice that comes while the state is being read
            # may name an entry stored after that read (`_group_loaded`
            # reads the log on to it; before, it waited for the next entry
            # or the beat, up to ROUTE_RENEW).
            want = self._group_load_wanted.get(key)
            if want is None or want[0] != epoch or want[1] < seq:
                self._group_load_wanted[key] = (epoch, seq)
            self._load_group(key)
            return
        if seq <= group.seq:
            return
        self._group_wanted[key] = max(self._group_wanted.get(key, 0), seq)
        self._read_group_log(group)

    def _read_group_log(self, group: Group) -> None:
        if group.key in self._group_reading:
            return  # the read in flight goes on when it is back
        self._group_reading.add(group.key)
        read = Read(ReadGroupLog(group.key, group.seq, GROUP_LOG_END, GROUP_REPLAY_PAGE,
                                 GROUP_REPLAY_BYTES))  # fmt: skip
        self.store.submit(read, functools.partial(self._group_log_read, group, read))

    def _group_log_read(self, group: Group, read: Read) -> None:
        self._group_reading.discard(group.key)
        if self.groups.get(group.key) is not group or not read.ok:
            return  # ended or replaced meanwhile; or failed: the next notice or beat reads
        items: list[GroupItem]
        items, more = read.result
        for item in items:
            if item.group_seq <= group.seq:
                continue  # made here meanwhile (`_group_arrived`)
            if item.group_seq != group.seq + 1:
                # Not the next one (the log was trimmed past this copy): the
                # group's state instead, and the members here page from there.
                self._load_group(group.key, replace=True)
                return
            self._apply_entry(group, item)
        self._run_group_waiters(group.key)
        wanted = self._group_wanted.get(group.key, 0)
        if wanted > group.seq and (more or items):
            self._read_group_log(group)
        elif wanted > group.seq:
            # Announced and not in the log: its state instead.
            self._load_group(group.key, replace=True)
        else:
            self._group_wanted.pop(group.key, None)

    def _load_group(self, key: str, *, replace: bool = False) -> None:
        """Read group `key`'s state from the shared store (this node has
        another group of that name, or none; with `replace`, this node's
        copy cannot follow the log to it: it is replaced)."""
        if key in self._group_loading:
            return
        self._group_loading.add(key)
        op = ReadGroupState(key)
        self.store.submit(op, functools.partial(self._group_loaded, op, replace))

    def _group_loaded(self, op: ReadGroupState, replace: bool = False) -> None:
        key = op.group_key
        self._group_loading.discard(key)
        if not op.ok:
            return  # the next notice or beat asks again
        stored, cached = op.result, self.groups.get(key)
        want = self._group_load_wanted.pop(key, None)
        if stored is None:  # no such group (any more)
            if cached is not None:
                self._end_copy(cached)
            self._run_group_waiters(key, gone=True)
            return
        # Where a notice heard during the read says this group's log reaches
        # (one of another epoch is of an older group: the state is newer).
        reach = max(stored.seq, want[1]) if want is not None and want[0] == stored.epoch else 0
        if (
            cached is not None
            and cached.epoch == stored.epoch
            and (not replace or cached.seq >= stored.seq)
        ):
            self._group_behind(key, stored.epoch, max(stored.seq, reach))  # the same group: read on
            return
        if cached is not None:
            self._end_copy(cached)
        group = self._group_from(stored)
        self._group_wanted.pop(key, None)
        if group.members or group.former:  # (a retired group: former members only)
            self.groups.restore(group)
            for sender_key, last in op.sent.items():
                if sender_key in self.users:  # (a deleted one: nobody to tell)
                    self.groups.restore_owed(group, sender_key, op.told.get(sender_key, 0), last)
            # The members here page what is theirs from the log, from their cursors.
            for member_key in [*group.members, *group.former]:
                user = self.users.get(member_key)
                route = self.router.locate(user) if user is not None else None
                if isinstance(route, Session):
                    self._catch_up_member(route, group)
        self._run_group_waiters(key, gone_except=stored.epoch)
        if reach > group.seq and self.groups.get(key) is group:
            self._group_behind(key, group.epoch, reach)  # stored after the read: read on

    def _end_copy(self, group: Group) -> None:
        """This node's copy of a group that has ended (its members here are
        handed nothing more of it)."""
        if self.groups.get(group.key) is not group:
            return
        keys = [*group.members, *group.former]
        self.groups.end(group)
        for erased in [k for k in keys if k in self._erased_members]:
            pending = self._erased_members[erased]
            pending.discard(group.key)
            if not pending:
                del self._erased_members[erased]
        self._group_streams.pop(group.key, None)
        self._group_wanted.pop(group.key, None)
        for member_key in keys:
            user = self.users.get(member_key)
            route = self.router.locate(user) if user is not None else None
            if isinstance(route, Session) and route.group_mail is not None:
                self._drop_pager(route.group_mail, group.key)

    def _after_group(self, key: str, epoch: int, seq: int, then: Callable[[], None]) -> None:
        """Run `then` once this node's copy of group `key` (of `epoch`) has
        its entries up to `seq`, or once that group is known to be gone."""
        self._group_waiters.setdefault(key, []).append((epoch, seq, then))
        self._run_group_waiters(key)

    def _run_group_waiters(self, key: str, *, gone: bool = False,
                           gone_except: int | None = None) -> None:  # fmt: skip
        """Run what waits for group `key`: those whose place this node's copy
        has reached; with `gone`, all (no such group); with `gone_except`,
        those waiting for another group of that name (the store has that one)."""
        waiting = self._group_waiters.get(key)
        if not waiting:
            return
        group = self.groups.get(key)
        ready: list[Callable[[], None]] = []
        left: list[tuple[int, int, Callable[[], None]]] = []
        for epoch, seq, then in waiting:
            reached = group is not None and group.epoch == epoch and group.seq >= seq
            dead = gone or (gone_except is not None and epoch != gone_except)
            if reached or dead:
                ready.append(then)
            else:
                left.append((epoch, seq, then))
        if left:
            self._group_waiters[key] = left
        else:
            del self._group_waiters[key]
        for then in ready:
            self._run_callback(then)

    def group_waiting(self, key: str, epoch: int, seq: int, now: float) -> None:
        """Another node (or this one) stored entries of group `key` up to `seq`."""
        self._now = now
        self._group_behind(key, epoch, seq)

    def group_ended(self, key: str, epoch: int, now: float) -> None:
        """The group `key` of `epoch` ended (its last member left)."""
        self._now = now
        group = self.groups.get(key)
        if group is not None and group.epoch == epoch:
            self._end_copy(group)
        self._run_group_waiters(key, gone_except=-1)  # (no group has epoch -1)

    def group_heads(self, heads: dict[str, tuple[int, int]], now: float) -> None:
        """Every group's (epoch, last seq), read at each beat and after a
        broken pub/sub link: what a lost notice left behind is caught up
        here, so nothing waits for ever on one."""
        self._now = now
        for key, (epoch, seq) in heads.items():
            self._group_behind(key, epoch, seq)
        for key in [*self.groups.groups, *self._group_waiters]:
            if key not in heads:
                self._load_group(key)  # ended, or made since the heads were read: ask
        for group in list(self.groups.groups.values()):
            # A sender here who went quiet (a burst's end) may let the log's
            # hole take her last messages (not only every GROUP_TRIM_EVERY).
            marks = group.exempt
            if group.owed and any(marks.get(key, -1) < group.seq and self._quiet_sender(key, group)
                                  for key in group.owed):  # fmt: skip
                self._share_trim(group, at_once=True)

    def group_reached(self, sender_key: str, group_key: str,
                      reached: list[tuple[int, int, list[str]]], cursors: list[tuple[str, int]],
                      now: float) -> None:  # fmt: skip
        """Members on another node newly have these messages of a sender
        whose session is here: told as if the receipts came here (not kept:
        a notice lost on the way is worked out again at the sender's next
        login, from the cursors), and this copy of the group learns their
        cursors."""
        self._now = now
        group = self.groups.get(group_key)
        if group is None:
            return
        for member_key, cursor in cursors:
            member = group.member(member_key)
            if member is not None and cursor > member.cursor:
                member.cursor = cursor
        self._group_lows.pop(group_key, None)
        session = self._session_here(sender_key)
        if session is None:
            return
        for instance_id, client_seq, names in reached:
            self._send_reached(session, group, MsgId(instance_id, client_seq), names)

    def _cluster_change(self, user: User, instance_id: int, request: GroupRequest,
                        key: RequestKey, attempt: int = 0,
                        checked: bool = False) -> None:  # fmt: skip
        """A membership change in cluster mode: planned on this node's copy
        (the rules' verdict, as on one server), then applied by the store
        only if the copy was current (`ChangeGroup`). A refusal, or "nothing
        to do", is final only once `checked`: judged on a copy that has the
        store's state as it was after the request came (the copy may lack a
        change still in flight from this node, or one made on another node
        and not heard of yet: the store says, not the copy)."""
        stream = conversation_stream(group_address(request.group.removeprefix("#")))
        try:
            plan = self._plan_change(user, request)
        except GroupRefused as exc:
            answer = (int(exc.code), exc.message)
        else:
            if not isinstance(plan, str):
                group, op, text = plan
                op.request = (key, 0, text)
                op.max_user_groups = self.groups.max_user_groups
                for _, joined, _ in op.entries:
                    for member_key, _, _ in joined:
                        self._joining[member_key] = self._joining.get(member_key, 0) + 1
                then = functools.partial(self._group_changed, user, instance_id, request, key,
                                         op, attempt, group)  # fmt: skip
                self.store.submit(op, then)
                return
            answer = (0, plan)  # nothing to change
        try:
            group_key = group_name(request.group)[1]
        except GroupRefused:
            group_key = ""
            checked = True  # not a group name: nothing to ask the store
        if checked:
            if answer[0]:
                self.stats["group_refused"] += 1
            self._group_result(user, key, *answer, stream, group_key)
            return
        # The store answers what it answered if the request was done before
        # (sent again to this node after another did it, and that node died
        # before answering), else the group's head there: this copy reaches
        # it, and the request is planned again (`_group_changed`).
        lookup = ChangeGroup(group_key, request.group.removeprefix("#"), -1, 0, [], "",
                             False, (key, *answer))  # fmt: skip
        then = functools.partial(self._group_changed, user, instance_id, request, key,
                                 lookup, attempt, None)  # fmt: skip
        self.store.submit(lookup, then)

    def _plan_change(
        self, user: User, request: GroupRequest
    ) -> tuple[Group | None, ChangeGroup, str] | str:
        """The entries a request makes, by the rules, on this node's copy
        (nothing changed here yet); a str: the answer, nothing to do."""
        wall = int(self._wall_clock() * 1000)

        def entry(group_key: str, change: GroupChange, users: tuple[str, ...],
                  recipients: int) -> GroupItem:  # fmt: skip
            return GroupItem(group_key, 0, self._new_id(), int(change), user.key, user.name, 0, 0,
                             "", users, wall, recipients)  # fmt: skip

        entries: list[tuple[GroupItem, tuple[tuple[str, str, int], ...], tuple[str, ...]]] = []
        if request.action == GroupAction.CREATE:
            name, group_key = self.groups.check_create(request.group)
            others = self._resolve(request.users, user.key)
            self.groups.check_room(1, len(others))
            self.groups.check_memberships([(user.key, user.name), *others], self._joining)
            users = (user.name, *(n for _, n in others))
            joined = ((user.key, user.name, 0),
                      *((k, n, rank) for rank, (k, n) in enumerate(others, 1)))  # fmt: skip
            entries.append((entry(group_key, GroupChange.CREATED, users, len(users)), joined, ()))
            return None, ChangeGroup(group_key, name, 0, 0, entries, user.key, False,
                                     ((user.key, 0, 0), 0, "")), f"created #{name}"  # fmt: skip
        group = self.groups.member_of(request.group, user.key)
        owner, end = group.owner, False
        if request.action == GroupAction.ADD:
            new = [(k, n) for k, n in self._resolve(request.users, user.key)
                   if k not in group.members]  # fmt: skip
            if not new:
                return ALREADY_MEMBERS
            self.groups.check_room(len(group.members), len(new))
            self.groups.check_memberships(new, self._joining)
            item = entry(group.key, GroupChange.ADDED, tuple(n for _, n in new),
                         len(group.members) + len(new))  # fmt: skip
            entries.append((item, tuple((k, n, rank) for rank, (k, n) in enumerate(new)), ()))
            text = f"added to #{group.name}"
        else:
            leaving = [user.key]
            if request.action == GroupAction.REMOVE:
                leaving = self._removing(group, user, request)
            if leaving == [user.key]:  # leaving (removing yourself alone is leaving)
                text = f"left #{group.name}"
                item = entry(group.key, GroupChange.LEFT, (), len(group.members))
                entries.append((item, (), (user.key,)))
                end = len(group.members) == 1
                if end:
                    text = f"left #{group.name}; it has ended"
                elif group.owner == user.key:
                    owner = next(k for k in group.members if k != user.key)
                    heir = group.members[owner].name
                    entries.append((entry(group.key, GroupChange.OWNER, (heir,),
                                          len(group.members) - 1), (), ()))  # fmt: skip
            else:
                names = tuple(group.members[k].name for k in leaving)
                item = entry(group.key, GroupChange.REMOVED, names, len(group.members))
                entries.append((item, (), tuple(leaving)))
                text = f"removed from #{group.name}"
        op = ChangeGroup(group.key, group.name, group.epoch, group.changed, entries, owner, end,
                         ((user.key, 0, 0), 0, ""))  # fmt: skip
        return group, op, text

    def _removing(self, group: Group, user: User, request: GroupRequest) -> list[str]:
        """The members a REMOVE names, by the rules (only the owner removes;
        naming yourself beside others removes only them)."""
        if group.owner != user.key:
            raise GroupRefused(ErrorCode.NOT_OWNER, f"only the owner of #{group.name}, "
                               f"{group.owner_name()}, removes members")  # fmt: skip
        self.groups.check_users(request.users)
        keys: list[str] = []
        for text in request.users:
            try:
                member_key = name_key(normalize_name(text))
            except LocalProtocolError as exc:
                raise GroupRefused(ErrorCode.INVALID_NAME, str(exc)) from None
            if member_key not in group.members:
                raise GroupRefused(ErrorCode.NOT_A_MEMBER,
                                   f"{text!r} is not a member of #{group.name}")  # fmt: skip
            if member_key not in keys:
                keys.append(member_key)
        if user.key in keys and len(keys) > 1:
            keys.remove(user.key)
        return keys

    def _group_changed(self, user: User, instance_id: int, request: GroupRequest,
                       key: RequestKey, op: ChangeGroup, attempt: int,
                       group: Group | None) -> None:  # fmt: skip
        """The store's verdict on a planned change."""
        stream = conversation_stream(group_address(op.name))
        for _, joined, _ in op.entries:  # answered: no longer planned (`_joining`)
            for member_key, _, _ in joined:
                left = self._joining.pop(member_key, 0) - 1
                if left > 0:
                    self._joining[member_key] = left
        if op.outcome == "full":  # the store counted the user's groups: final
            self.stats["group_refused"] += 1
            self._group_result(user, key, int(ErrorCode.GROUP_FULL),
                               f"{op.full} is in {op.max_user_groups} groups, the most one "
                               "user may be in", stream, op.group_key)  # fmt: skip
            return
        if op.outcome == "done":  # asked before (on another node, or before a crash)
            code, text = op.answer or (0, "")
            self._remember_answer(key, (code, text))
            self._group_result(user, key, code, text, stream, op.group_key)
            return
        if op.outcome in ("conflict", "none"):
            # conflict: another change came first; none: refused (or nothing
            # to do) on this copy, and never done anywhere. Either way: catch
            # up to the store's state, then plan again (the rules may now say
            # no; or yes, after a refusal; the verdict on a refusal planned
            # again is final: the copy has what the store had when asked).
            checked = op.outcome == "none"
            if not checked:
                self.stats["group_conflicts"] += 1
            if attempt + 1 >= GROUP_CHANGE_ATTEMPTS:
                self._group_result(user, key, int(ErrorCode.SERVER_ERROR),
                                   f"#{op.name} is changing fast; send the request again",
                                   stream, op.group_key)  # fmt: skip
                return
            epoch, seq = op.current
            again = functools.partial(self._cluster_change, user, instance_id, request, key,
                                      attempt + 1, checked)  # fmt: skip
            if epoch == 0:
                cached = self.groups.get(op.group_key)
                if cached is not None:
                    self._end_copy(cached)
                again()
                return
            self._after_group(op.group_key, epoch, seq, again)
            self._group_behind(op.group_key, epoch, seq)
            return
        _, code, text = op.request
        self._remember_answer(key, (code, text))
        self.stats["group_changes"] += len(op.entries)
        items = [item for item, _, _ in op.entries]
        self._spend_fanout(user, sum(item.recipients for item in items))  # (`_change_cost`)
        for offset, item in enumerate(items):
            item.group_seq = op.first_seq + offset
        if op.end:
            self._cluster_group_ended(user, key, op, text, stream)
            return
        epoch = op.epoch or items[0].server_msg_id
        if op.epoch == 0 and self.groups.get(op.group_key) is None:
            # A new group: made here from the plan in hand (its name is not in the log).
            first = items[0]
            made = self.groups.apply(None, op.group_key, op.name, first.group_seq,
                                     first.server_msg_id, first.change, first.sender_key,
                                     first.users)  # fmt: skip
            if made is not None:
                self._fan_out(made, first)
                log.info("%s created group #%s with %d members", user.name, op.name,
                         len(first.users))  # fmt: skip
        else:
            self._group_arrived(op.group_key, epoch, items)
        answer = functools.partial(self._group_result, user, key, 0, text, stream, op.group_key)
        self._after_group(op.group_key, epoch, items[-1].group_seq, answer)
        if self.users.get(user.key) is not user:  # a deleted account's leaving
            bury = functools.partial(self._bury, user.key)
            self._after_group(op.group_key, epoch, items[-1].group_seq, bury)

    def _cluster_group_ended(self, user: User, key: RequestKey, op: ChangeGroup, text: str,
                             stream: int) -> None:  # fmt: skip
        """The last member left: the store has retired the group's keys.
        Their LEFT, which the store logs (`ChangeGroup.logged`; `CHANGE_GROUP`
        always does since audit8 P7: a LEFT handed outside the log was lost
        with the link), comes from the retired group's log after what they
        are owed before it, as every node's copy of that group has it (read
        here at once: the leaver's node need not wait for its notice)."""
        item = op.entries[0][0]
        session = self.router.locate(user)
        retired = retired_key(op.group_key, item.server_msg_id)
        mail = session.group_mail if isinstance(session, Session) else None
        if op.logged and mail is not None and op.group_key in mail.pagers:
            # What was handed to them of it goes on under the retired key:
            # its receipts count there, and the retired group's copy pages
            # on after it (not all again from the store's cursor).
            pager = mail.pagers[retired] = mail.pagers.pop(op.group_key)
            for entry in pager.items.values():
                mail.ids[entry.server_msg_id] = (retired, entry.seq)
        cached = self.groups.get(op.group_key)
        if cached is not None and cached.epoch == op.epoch:
            self._end_copy(cached)
        self._run_group_waiters(op.group_key, gone_except=-1)
        log.info("group #%s ended: its last member left", op.name)
        self.stats["groups_ended"] += 1
        if op.logged:
            self._load_group(retired)
            if self.users.get(user.key) is not user:
                # A deleted account's leaving: it never will have what it
                # is owed; buried once this node's copy has it (`_bury`).
                bury = functools.partial(self._bury, user.key)
                self._after_group(retired, op.epoch, op.first_seq, bury)
        self._group_result(user, key, 0, text, stream, op.group_key)

    def _catch_up_member(self, session: Session, group: Group) -> None:
        """The session pages what waits for it in `group` since its cursor."""
        member = group.member(session.user.key)
        if member is None or member.cursor >= group.seq:
            return
        mail, pager = self._group_pager(session, group, member)
        pager.behind = True
        pager.missed = max(pager.missed, group.seq)
        self._page_group(session, group)

    def _owed_refreshed(self, session: Session, group: Group, op: ReadGroupState) -> None:
        """A sender's login on a node of a cluster: the cursors of `group`'s
        members and the sender's mark as the store has them, then who has
        its messages past the mark is told again (`_read_sent`)."""
        notices = session.group_notices
        stored = op.result
        if (
            notices is None or self.sessions.get(session.session_id) is not session
            or not op.ok or stored is None or self.groups.get(group.key) is not group
            or stored.epoch != group.epoch
        ):  # fmt: skip
            return  # the next login asks again
        for m in stored.members:
            member = group.member(m.key)
            if member is None and m.left_seq is not None:
                # Kept in the store for the senders (one this copy forgot):
                # it names them.
                self.groups.take_former(group, Member(m.key, m.name, m.joined_seq, m.rank,
                                                      m.left_seq, m.cursor, m.earlier))  # fmt: skip
            elif member is not None and m.cursor > member.cursor:
                member.cursor = m.cursor
        self._group_lows.pop(group.key, None)
        told = op.told.get(session.user.key, 0)
        if told > notices.catching.get(group.key, told):
            notices.catching[group.key] = told
        self._read_sent(session, group)

    def _group_cursors_read(self, session: Session, op: ReadGroupCursors) -> None:
        """At login on a node of a cluster: the user's cursors as the store
        has them (their client may have receipted on another node), then
        what waits since."""
        if self.sessions.get(session.session_id) is not session:
            return
        user = session.user
        for group_key, cursor in op.result.items():
            group = self.groups.get(group_key)
            member = group.member(user.key) if group is not None else None
            if member is not None and cursor > member.cursor:
                member.cursor = cursor
        for group in self.groups.catching_up(user.key):
            self._catch_up_member(session, group)


# --- the socket loop ----------------------------------------------------------


def member_row(member: Member) -> LoadedMember:
    """A member as the store writes it whole."""
    return LoadedMember(member.key, member.name, member.joined_seq, member.rank, member.left_seq,
                        member.cursor, member.earlier)  # fmt: skip


def resident_memory() -> int | None:
    """This process's resident memory in bytes, from /proc/self/statm (one
    small read). None where there is no /proc: `resource`'s ru_maxrss is the
    peak, which never falls, so a budget on it would hold messages back for
    good once reached; there `--max-memory` is not enforced."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def release_free_memory() -> bool:
    """Hand the free pages of the C heap back to the system (glibc's
    `malloc_trim`); False where the C library cannot. Memory Python freed
    stays resident otherwise, for good wherever one live block sits above
    it: after a peak the resident memory would stay over `--max-memory`
    and new messages wait for ever with nothing left to drain."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def join_cluster(
    url: str, node_id: str, notify: Callable[[], None]
) -> tuple[RedisStore, RedisRouter]:
    """The store and router of a cluster node (`server_cluster`, imported
    only here: the single-node server needs no redis package)."""
    try:
        from server_cluster import open_cluster
    except ModuleNotFoundError as exc:
        if exc.name != "redis":
            raise
        raise StoreError("--cluster needs the redis package; install it with "
                         "pip install 'udp-chat[cluster]'") from None  # fmt: skip
    return open_cluster(url, node_id, notify)


class ListenError(OSError):
    """The socket could not be bound to the server's address. `errno` and
    `strerror` are the system's; `__cause__` is the original error (a
    `socket.gaierror` when the host could not be resolved)."""


class MetricsListenError(ListenError):
    """The metrics' HTTP socket could not be bound to `--metrics HOST:PORT`."""


#: `Relay.stats` keys counting refused logins -> the `reason` label of
#: `chat_login_failures_total`.
LOGIN_FAILURES = (
    ("login_failures", "bad_password"),
    ("login_invalid_name", "invalid_name"),
    ("login_throttled", "too_many_failures"),
    ("registrations_throttled", "registrations_throttled"),
    ("registrations_busy", "registrations_busy"),
    ("login_server_full", "server_full"),
    ("registrations_quarantined", "name_quarantined"),
)


def _waiter(*fds: int) -> Callable[[float], list[tuple[int, int]]]:
    """The loop's sleep: wait up to `timeout` milliseconds for any of `fds`
    (the server's socket, the wake socket) to be readable; (file
    descriptor, events) for the ready ones. `select.poll`'s own `poll` where
    there is one: a system call and one C call a pass (`selectors` adds ~8
    Python calls to each, issue 18); `select.select` elsewhere (Windows).
    Timeouts round up to the millisecond either way, as `selectors`' did, so
    the loop never wakes before a deadline to find nothing due."""
    if hasattr(select, "poll"):
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        return poller.poll
    watched = list(fds)

    def select_wait(timeout: float) -> list[tuple[int, int]]:
        ready, _, _ = select.select(watched, [], [], math.ceil(timeout) / 1000)
        return [(fd, 1) for fd in ready]

    return select_wait


class ChatServer:
    """A relay bound to a UDP address (port 0 picks a free one; `.address` is
    the real one). `serve_forever()` runs the loop on the calling thread until
    `shutdown()`; use it as a context manager to close the socket."""

    #: Datagrams read per pass before flushing, so replies batch into fewer datagrams.
    READ_BATCH = 256
    #: A `select` that took longer than this slept: the loop had caught up,
    #: and reads one datagram in that pass (see `serve_forever`)...
    SLEPT = 50e-6
    #: ...for this many passes in a row at most; then a pass reads until the
    #: socket is empty (a select that only seemed to sleep: a wait for the GIL).
    SINGLE_READS = 8

    def __init__(
        self, address: Address = ("127.0.0.1", 5555), config: ServerConfig | None = None, *,
        metrics: Address | None = None,
    ) -> None:  # fmt: skip
        config = config or ServerConfig()
        self.started = time.monotonic()
        self.started_wall = time.time()
        # The address first: a wrong --host or a taken port is found before
        # the store is opened and read (and nothing is logged before the
        # one line that says what is wrong).
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        try:
            self.socket = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:  # no IPv6 here
            raise ListenError(exc.errno, exc.strerror) from exc
        try:
            self.socket.bind(address)
        except OSError as exc:  # a gaierror too: the host was looked up here
            self.socket.close()
            raise ListenError(exc.errno, exc.strerror) from exc
        self.metrics_server: MetricsServer | None = None
        if metrics is not None:
            # Bound here too, before the store: a taken metrics port is found
            # at start-up, in one line, like a taken UDP port.
            try:
                self.metrics_server = MetricsServer(metrics, self.metrics)
            except OSError as exc:
                self.socket.close()
                raise MetricsListenError(exc.errno, exc.strerror) from exc
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        # `_wake`'s handshake with the loop (set before any thread that may
        # call it starts): the loop is in, or about to enter, select; there
        # are completions it has not looked for yet.
        self._sleeping = True
        self._woken = False
        self.store: ServerStore | None = None
        # Cluster mode: the node's store on Redis instead (server_cluster).
        self.cluster_store: RedisStore | None = None
        self._unwrapper: KeyExchangeWorkers | None = None
        try:
            router: RedisRouter | None = None
            if config.cluster is not None:
                node_id = config.node_id or format_address(*self.socket.getsockname()[:2])
                self.cluster_store, router = join_cluster(config.cluster, node_id, self._wake)
            elif config.data_dir is not None:
                self.store = ServerStore(config.data_dir, notify=self._wake)
            # Registrations' key exchanges run in worker processes (server_keyx).
            if config.key_workers:
                self._unwrapper = KeyExchangeWorkers(config.key_workers)
            self.relay = Relay(
                config, store=self.cluster_store or self.store, router=router,
                unwrapper=self._unwrapper, wake=self._wake, shared_store=router is not None,
            )  # fmt: skip
            if self.cluster_store is not None and router is not None:
                self.cluster_store.attach(self.relay, router)
        except BaseException:  # a StoreError from opening or loading the store
            self.close()
            raise
        self.socket.setblocking(False)
        # A deep receive queue rides out bursts instead of dropping them
        # (the kernel caps it at net.core.rmem_max).
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self.address: Address = self.socket.getsockname()[:2]
        if self.store is not None:
            self.store.start()
        if self.metrics_server is not None:
            self.metrics_server.start()
        if self.cluster_store is not None:
            self.cluster_store.start()
        self._stopping = False
        self._stopped = False
        self._memory_due = 0.0  # when to read the resident memory next
        if resident_memory() is None:
            log.warning("cannot read this process's memory (no /proc/self/statm): "
                        "--max-memory is not enforced")  # fmt: skip

    def __enter__(self) -> ChatServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.close()

    def close(self) -> None:
        """Close the socket and the store (committing what is queued)."""
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self._unwrapper is not None:
            self._unwrapper.shutdown()
        self.socket.close()
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.cluster_store is not None:
            self.cluster_store.close()
            self.cluster_store = None
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        """From another thread (the store's, the key exchanges' pool): there
        are completions for the loop. The byte that wakes it is written only
        while it sleeps (or is about to) in `select`; a loop that is awake
        sees `_woken` before it sleeps again and does not wait (issue 18: a
        write, a wake-up and a read per completion the loop would have
        picked up anyway). Both flags are read and written under the GIL:
        the loop sets `_sleeping` before it reads `_woken`, this sets
        `_woken` before it reads `_sleeping`, so one of them sees the other."""
        self._woken = True
        if self._sleeping:
            self._wake_now()

    def _wake_now(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def shutdown(self) -> None:
        """Ask `serve_forever` to send its shutdown notices and return. Safe
        from another thread or a signal handler."""
        self._stopping = True
        self._wake_now()

    def serve_forever(self) -> None:
        relay = self.relay
        stats = relay.stats
        sock_fd = self.socket.fileno()
        wait = _waiter(sock_fd, self._wake_r.fileno())
        more = _waiter(sock_fd)  # (with a zero timeout: is another datagram there?)
        recvfrom = self.socket.recvfrom
        sendto = self.socket.sendto
        single = 0  # passes in a row that read one datagram (below)
        try:
            while not self._stopping:
                # The store's batch is handed over last, just before the
                # loop sleeps: the store thread it wakes then finds the GIL
                # free instead of waiting for it (a futex round trip and a
                # context switch per commit, issue 18).
                before = time.monotonic()
                relay.flush_store(before)  # after the sends: see ServerStore.flush
                timeout = self._timeout(before)
                self._sleeping = True
                if self._woken:  # completions came while this pass ran
                    timeout = 0.0
                # The sleep is measured from here: time lost to a thread
                # that took the GIL during the flush is not a sleep (it
                # would make the pass read one datagram: SINGLE_READS).
                before = time.monotonic()
                ready = wait(timeout * 1000.0)  # (in milliseconds)
                self._sleeping = self._woken = False
                now = time.monotonic()
                stats["loop_passes"] += 1
                if not ready:
                    stats["loop_timeouts"] += 1  # woken by its timeout: a timer (or the second)
                # Only what select found ready is read: at an ordinary load a
                # pass has one thing to do, and every read that finds
                # nothing costs a system call and a raised BlockingIOError.
                socket_ready = False
                for fd, _ in ready:
                    if fd == sock_fd:
                        socket_ready = True
                    else:
                        stats["loop_wakeups"] += 1
                        try:
                            self._wake_r.recv(4096)  # (more than that: select says so again)
                        except (BlockingIOError, InterruptedError):
                            pass
                batch: list[tuple[bytes, Address]] = []
                if socket_ready:
                    # How many datagrams to read before the pass works on
                    # them: each read that finds the socket empty is a system
                    # call and a raised BlockingIOError, and select reports
                    # whatever is left. A select that slept found the one
                    # datagram a light load brings: read it alone. One that
                    # returned at once found datagrams queued while the loop
                    # was busy (or preempted by the client it had just sent
                    # to): read until the socket is empty, up to READ_BATCH,
                    # their replies batched (flat out a pass reads hundreds).
                    # A select can look as if it slept when it was the GIL
                    # the loop waited for after it (another thread of this
                    # process ran Python): so after SINGLE_READS passes of
                    # one read, one reads on, and while such reads find
                    # more than one datagram, every pass does.
                    # Before the second read, one look: a lone datagram's
                    # pass often did not sleep (the reply to what it had just
                    # sent came while it finished), and a read that finds
                    # nothing costs a raised BlockingIOError besides its
                    # system call (issue 18: ~1.8 of them per lone message).
                    slept = now - before > self.SLEPT
                    reads = 1 if slept and single < self.SINGLE_READS else self.READ_BATCH
                    for i in range(reads):
                        if i == 1 and not more(0.0):
                            break
                        try:
                            data, addr = recvfrom(65535)
                        except (BlockingIOError, InterruptedError):
                            stats["loop_empty_reads"] += 1
                            break
                        except OSError as exc:  # e.g. ICMP port unreachable on some systems
                            log.debug("recvfrom: %s", exc)
                            continue
                        batch.append((data, addr[:2]))
                    if reads == 1:
                        single += 1
                    else:
                        single = 0 if len(batch) <= 1 else self.SINGLE_READS
                if batch:
                    relay.receive_datagrams(batch, now)  # sessions' datagrams first
                if now >= self._memory_due:
                    self._sample_memory(now)
                # (the store's and the key exchanges' completions: in datagrams_to_send)
                relay.handle_timer(now)
                for datagram, addr in relay.datagrams_to_send(now):  # `_send_all`, in line
                    try:
                        sendto(datagram, addr)
                    except OSError as exc:  # a full buffer or an unreachable peer: the
                        log.debug("sendto %s: %s", addr, exc)  # protocol resends
            self._sleeping = True  # from here on every completion writes its wake
            self._commit_before_leaving(wait)
            now = time.monotonic()
            relay.send_shutdown(now)
            self._send_all(relay.datagrams_to_send(now))
        finally:
            self._stopped = True

    def _timeout(self, now: float) -> float:
        """How long the loop may sleep, right after `flush_store(now)`: until
        the relay's next timer (`get_timer`: retransmissions, acks, expiry,
        the end of a commit's wait for receipts) or the store's lazy writes
        fall due, at most a second. Lazy writes already due that the flush
        kept are held by the relay's wait for receipts, which ends at its own
        timer: counting them again made the loop spin with no timeout until
        that wait was over (up to COMMIT_WAIT, each LAZY_HOLD)."""
        deadline = self.relay.get_timer()
        if self.store is not None and (due := self.store.flush_due) is not None and due > now:
            if deadline is None or due < deadline:
                deadline = due
        if deadline is None:
            return 1.0
        timeout = deadline - now  # (in [0, 1]: min and max written out, once a pass)
        return 1.0 if timeout > 1.0 else timeout if timeout > 0.0 else 0.0

    def _commit_before_leaving(self, wait: Callable[[float], list[tuple[int, int]]]) -> None:
        """On the way out, before the BYE: let the store commit what the
        loop queued (up to SHUTDOWN_COMMIT_WAIT) and send its ACCEPTs. A
        client told BYE with a message still unaccepted keeps it and waits
        to resend it, though the message is safe on the disk."""
        relay = self.relay
        committed: list[bool] = []  # its callback runs on this thread, in store_done
        relay.store.submit(Sync(), lambda: committed.append(True))  # after all queued before
        relay.flush_store(float("inf"))  # no more waiting for receipts
        deadline = time.monotonic() + SHUTDOWN_COMMIT_WAIT
        while True:
            now = time.monotonic()
            relay.store_done(now)
            relay.handle_timer(now)
            self._send_all(relay.datagrams_to_send(now))
            if committed:
                return
            if now >= deadline:
                log.warning("stopping with writes not committed yet: their ACCEPTs are not sent")
                return
            wait(min(50.0, (deadline - now) * 1000.0))  # the store's notify() wakes it
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

    def _sample_memory(self, now: float) -> None:
        """Tell the relay how much memory the process holds, every
        MEMORY_SAMPLE_INTERVAL seconds (not per datagram: it is a file read)."""
        if now < self._memory_due:
            return
        self._memory_due = now + MEMORY_SAMPLE_INTERVAL
        resident = resident_memory()
        if resident is not None and resident > self.relay.config.max_memory:
            # Over it: what is free may still be resident; give it back first.
            if release_free_memory():
                resident = resident_memory()
        if resident is not None:
            self.relay.set_memory(resident, now)

    def _send_all(self, out: Iterable[tuple[bytes, Address]]) -> None:
        for datagram, addr in out:
            try:
                self.socket.sendto(datagram, addr)
            except OSError as exc:  # a full buffer or an unreachable peer: the
                log.debug("sendto %s: %s", addr, exc)  # protocol resends

    @property
    def metrics_address(self) -> Address | None:
        """Where `/metrics` is served (the real port when 0 was asked), or None."""
        return self.metrics_server.address if self.metrics_server is not None else None

    def metrics(self) -> list[Family]:
        """The server's metrics (`gather_metrics`), on the metrics thread."""
        return gather_metrics(self.relay, self.store, self.started, self.started_wall)


def gather_metrics(
    relay: Relay, store: ServerStore | None, started: float, started_wall: float
) -> list[Family]:
    """A relay's metrics (and its store's), gathered on the metrics thread
    while the loop runs: it only reads (plain ints, `len` of dicts, copies
    of counters, the store's histogram snapshot), each read atomic under the
    GIL, and takes no lock the loop could wait for. Figures read a moment
    apart may disagree by what happened in between, as any scrape's.
    `started`: when the server started, on the monotonic clock; `started_wall`:
    the same in Unix time."""
    stats = relay.stats.copy()  # one C-level copy: the loop may add keys meanwhile
    drops = dict.fromkeys(DROP_REASONS, 0)
    drops.update(relay.drops.counts.copy())
    resident = resident_memory()
    families = [
        Family("chat_build_info", "gauge", "The running version (the value is always 1).",
               [({"version": __version__}, 1)]),  # fmt: skip
        gauge("chat_uptime_seconds", "Seconds since the server started.",
              time.monotonic() - started),  # fmt: skip
        gauge("process_start_time_seconds", "When the server started, in Unix time.",
              started_wall),  # fmt: skip
        gauge("chat_sessions", "Logged-in sessions (users online).", len(relay.sessions)),
        gauge("chat_max_sessions", "Sessions allowed at most (--max-sessions).",
              relay.config.max_sessions),  # fmt: skip
        gauge("chat_accounts", "Accounts registered.", len(relay.users)),
        counter("chat_logins_total", "Logins that opened a session.", stats["logins"]),
        labelled("chat_login_failures_total", "counter",
                 "Logins refused, by reason (bad_password: wrong password; "
                 "too_many_failures: held back after failed ones).", "reason",
                 [(reason, stats[key]) for key, reason in LOGIN_FAILURES]),  # fmt: skip
        counter("chat_registrations_total", "New accounts registered.",
                stats["registrations"]),  # fmt: skip
        counter("chat_passwords_changed_total", "Passwords changed (/passwd).",
                stats["passwords_changed"]),  # fmt: skip
        counter("chat_accounts_deleted_total", "Accounts deleted (/delete-account).",
                stats["accounts_deleted"]),  # fmt: skip
        counter("chat_account_proof_failures_total", "Wrong passwords given to change a "
                "password or delete an account.", stats["account_proof_failures"]),
        counter("chat_messages_relayed_total", "Messages taken to relay (each stored "
                "durably before it is acknowledged).", stats["messages"]),  # fmt: skip
        counter("chat_messages_unwritten_total", "Of those, messages never written: the "
                "recipient's client receipted (held) them before the server's commit.",
                stats["messages_unwritten"]),  # fmt: skip
        counter("chat_message_bytes_relayed_total", "UTF-8 bytes of the text of those "
                "messages.", relay.message_bytes),  # fmt: skip
        counter("chat_messages_routed_elsewhere_total", "Of those, messages whose recipient "
                "was on another node of the cluster (--cluster), left in the shared store for "
                "that node.", stats["routed_elsewhere"]),  # fmt: skip
        counter("chat_datagrams_received_total", "UDP datagrams received.",
                stats["datagrams_in"]),  # fmt: skip
        counter("chat_datagrams_sent_total", "UDP datagrams sent.", stats["datagrams_out"]),
        counter("chat_received_bytes_total", "Bytes of UDP datagrams received.",
                stats["bytes_in"]),  # fmt: skip
        counter("chat_sent_bytes_total", "Bytes of UDP datagrams sent.", stats["bytes_out"]),
        counter("chat_loop_passes_total", "Passes of the socket loop (each one select, "
                "then what it found ready).", stats["loop_passes"]),  # fmt: skip
        counter("chat_loop_wakeups_total", "Passes woken by another thread of the server "
                "(the store's commits, key exchanges) rather than by a datagram or a "
                "timer.", stats["loop_wakeups"]),  # fmt: skip
        counter("chat_loop_timeouts_total", "Passes woken by their timeout (a timer came "
                "due, or a second went by) rather than by a datagram or another thread.",
                stats["loop_timeouts"]),  # fmt: skip
        labelled("chat_session_timers_total", "counter",
                 "Sessions' timer-heap entries that came due, by outcome (ran: its "
                 "retransmissions or acks were due; idle: nothing was; moved: its "
                 "deadline had moved later and the entry went there without a look).",
                 "outcome", [("ran", stats["timers_run"]), ("idle", stats["timers_idle"]),
                             ("moved", stats["timers_moved"])]),  # fmt: skip
        counter("chat_loop_empty_reads_total", "Reads of the UDP socket that found it "
                "empty (the loop had read everything select reported).",
                stats["loop_empty_reads"]),  # fmt: skip
        labelled("chat_datagrams_dropped_total", "counter",
                 "Datagrams dropped, by reason; for the limits (pre_login_budget, "
                 "pre_login_rate_limit, user_rate_limit, output_cap_..., short_of_memory_..., "
                 "fan_out_budget_...) withheld unacknowledged: their clients send them again.",
                 "reason",
                 [(label_value(reason), count) for reason, count in drops.items()]),
        gauge("chat_reassembly_bytes", "Bytes of long messages held for reassembly, all "
              "sessions together.", relay.reassembly_bytes),  # fmt: skip
        gauge("chat_key_exchange_backlog", "Registrations waiting for their key exchange "
              "(in the worker pool or its backlog).", relay.key_exchanges.waiting),
        gauge("chat_short_of_memory", "1 while resident memory is over --max-memory (new "
              "messages wait), else 0.", int(relay.short_of_memory)),  # fmt: skip
        gauge("chat_max_memory_bytes", "--max-memory, in bytes.", relay.config.max_memory),
        gauge("chat_groups", "Groups (issue 14) that exist.", len(relay.groups)),
        counter("chat_group_messages_total", "Messages to groups taken (each stored once).",
                stats["group_messages"]),  # fmt: skip
        counter("chat_group_copies_total", "Group messages and membership changes handed to "
                "members online (copies of the fan-out).", stats["group_copies"]),  # fmt: skip
    ]  # fmt: skip
    if resident is not None:
        families.append(gauge("process_resident_memory_bytes", "Resident memory of the "
                              "server process.", resident))  # fmt: skip
    if store is not None:
        families.append(gauge("chat_store_queue_depth", "Store operations submitted and "
                              "not yet committed.", store.queue_depth))  # fmt: skip
        families.append(histogram("chat_store_commit_seconds", "Time of each commit of the "
                                  "store (one per batch of operations), retries included.",
                                  store.commit_seconds))  # fmt: skip
    return families


# --- command line ---------------------------------------------------------------


def _address(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: a port is 0..65535")
    return port


#: The least `--max-memory` taken, in MiB: a server at rest is about 30 MiB
#: resident (interpreter, modules, SQLite, the key-exchange pool), so below
#: twice that every SEND would wait for good from the start.
MIN_MAX_MEMORY = 64


def _mebibytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB") from None
    if value < MIN_MAX_MEMORY:
        raise argparse.ArgumentTypeError(
            f"{value} MiB is too little: it must be at least {MIN_MAX_MEMORY} (MiB; a server "
            "at rest uses about 30, and over the limit every new message waits)"
        )
    return value


SERVER_EXAMPLES = """\
examples:
  chat-server                             on 127.0.0.1:5555, for this machine only
  chat-server --host 0.0.0.0              for your LAN or the Internet (IPv4; open UDP 5555)
  chat-server --host :: --port 6000       IPv6 (and IPv4 where the system maps it)
  chat-server --data-dir /srv/chat        keep accounts and mailboxes in /srv/chat
  chat-server --metrics 127.0.0.1:9555    Prometheus metrics at http://127.0.0.1:9555/metrics
  chat-server --port 0 --log-level warning   a free port (printed), warnings only

Clients connect with: chat-client --server HOST:PORT (IPv6: [2001:db8::1]:5555).
Operating it (firewall, NAT, systemd, containers): README.md and docs/deploy/README.md.
"""


def _metrics_address(text: str) -> Address:
    """--metrics HOST:PORT (an IPv6 host in brackets, `[::1]:9555`); port 0
    picks a free one (the start-up log line says which)."""
    example = "give HOST:PORT, e.g. 127.0.0.1:9555 or [::1]:9555"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise argparse.ArgumentTypeError(f"{text!r}: put an IPv6 address in brackets; "
                                             f"{example}")  # fmt: skip
    if not host or not port_text:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT; {example}")
    return host, _address(port_text)


def _days(text: str) -> float:
    """An argparse type: a finite number of days, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not 0 <= value < 100 * 365:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text} days: give 0 or more (and under a century)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat-server", description="Run the UDP chat relay server.",
        epilog=SERVER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=_address,
        default=DEFAULT_PORT,
        help="UDP port; 0 picks a free one (default %(default)s)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="how much to log on stderr (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--session-timeout", type=positive, default=60.0, metavar="SECONDS",
        help="silence after which a session expires; above 0 (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--data-dir", type=Path, default=None, metavar="DIR",
        help=f"where accounts and waiting messages are kept (default {default_data_dir()})",
    )  # fmt: skip
    parser.add_argument(
        "--pbkdf2-iterations", type=at_least(PBKDF2_MIN_ITERATIONS), default=PBKDF2_ITERATIONS,
        metavar="N", help="PBKDF2 iterations for new accounts, done by clients; at least "
        f"{PBKDF2_MIN_ITERATIONS} (default %(default)s; tests and benchmarks lower it)",
    )  # fmt: skip
    parser.add_argument(
        "--preauth-rate", type=positive, default=500.0, metavar="N",
        help="datagrams/s per address before login; above 0 (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--preauth-total-rate", type=positive, default=ServerConfig().preauth_total_rate,
        metavar="N", help="datagrams/s before login from all addresses together; beyond it "
        "they are dropped unread; above 0 (default %(default)s; burst 2x)",
    )  # fmt: skip
    parser.add_argument(
        "--registration-rate", type=positive, default=10.0, metavar="N",
        help="new accounts/s per address; above 0 (default %(default)s; burst 20x)",
    )  # fmt: skip
    parser.add_argument(
        "--user-msg-rate", type=positive, default=200.0, metavar="N",
        help="new messages/s per user; above 0 (default %(default)s; burst 2.5x)",
    )  # fmt: skip
    parser.add_argument(
        "--key-workers", type=at_least(0), default=ServerConfig().key_workers, metavar="N",
        help="processes for the registrations' key exchange; 0: on the main loop "
        "(default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-sessions", type=at_least(1), default=20_000, metavar="N",
        help="logged-in sessions at most; 1 or more (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--rto-min", type=positive, default=RTO_MIN, metavar="SECONDS",
        help="smallest retransmission timeout; above 0 (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--rto-max", type=positive, default=RTO_MAX, metavar="SECONDS",
        help="largest retransmission timeout; at least --rto-min (default %(default)s)",
    )  # fmt: skip
    # Memory caps (issue 12).
    parser.add_argument(
        "--max-memory", type=_mebibytes, default=ServerConfig().max_memory >> 20, metavar="MIB",
        help="resident memory of the whole server; past it new messages wait, unacknowledged, "
        f"until it falls; at least {MIN_MAX_MEMORY} (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--metrics", type=_metrics_address, default=None, metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics (default: off; "
        "keep it on a private address)",
    )  # fmt: skip
    # Accounts (issue 16).
    parser.add_argument(
        "--name-quarantine", type=_days, default=ServerConfig().name_quarantine / 86400,
        metavar="DAYS", help="after an account is deleted, nobody may register its name for "
        "this many days, so nobody inherits its conversations at once; 0: free at once "
        "(default %(default)g)",
    )  # fmt: skip
    # Groups (issue 14).
    parser.add_argument(
        "--max-group-members", type=at_least(2), default=ServerConfig().max_group_members,
        metavar="N", help="members of one group at most; 2 or more (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-user-groups", type=at_least(1), default=ServerConfig().max_user_groups,
        metavar="N", help="groups one user may be in at most (a create or add past it is "
        "refused: group_full; in a cluster counted in Redis, so give every node the same N); "
        "1 or more (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-fanout-rate", type=positive, default=ServerConfig().max_fanout_rate,
        metavar="N", help="copies of group messages and membership changes per second one "
        "user may make the server send (a message to N members is N - 1 copies, a change one "
        "per member it is for); past it their messages and requests wait; above 0 (default "
        "%(default)s; burst 2x)",
    )  # fmt: skip
    # Cluster mode (issue 15).
    parser.add_argument(
        "--cluster", default=os.environ.get("CHAT_CLUSTER_URL"),
        metavar="redis://[USER:PASS@]HOST:PORT[/DB]",
        help="run as a node of the cluster whose state is in this Redis (accounts, mailboxes, "
        "routes; --data-dir is then unused); default: $CHAT_CLUSTER_URL, which keeps a "
        "password off the command line; unset: a single server",
    )  # fmt: skip
    parser.add_argument(
        "--node-id", default=None, metavar="NAME",
        help="this node's name in the cluster (default: its listening address HOST:PORT)",
    )  # fmt: skip
    return parser


def listen_problem(host: str, port: int, exc: ListenError) -> str:
    """The one line saying why the server cannot listen on host:port; the
    hint about another server only where the port is taken."""
    if isinstance(exc.__cause__, socket.gaierror):
        return (f"cannot resolve --host {host}: {exc.strerror}; give an address of this "
                "machine (e.g. 127.0.0.1, or 0.0.0.0 for all)")  # fmt: skip
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"--host {host} is not an address of this machine; give one of its "
                "addresses (e.g. 127.0.0.1, or 0.0.0.0 for all)")  # fmt: skip
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot listen on {format_address(host, port)}: {exc.strerror}; is another "
                "server running there? Try --port 0.")  # fmt: skip
    if exc.errno == errno.EACCES and 0 < port < 1024:
        return (f"permission denied for port {port} (ports below 1024 need root); "
                "pick --port 1024 or above")  # fmt: skip
    if exc.errno == errno.EAFNOSUPPORT:
        return f"cannot listen on {host}: {exc.strerror} (is IPv6 off on this machine?)"
    return f"cannot listen on {format_address(host, port)}: {exc.strerror}"


def metrics_problem(host: str, port: int, exc: ListenError) -> str:
    """The one line saying why `--metrics HOST:PORT` cannot be served."""
    where = format_address(host, port)
    if isinstance(exc.__cause__, socket.gaierror):
        return (f"--metrics: cannot resolve {host}: {exc.strerror}; give an address of this "
                "machine, e.g. 127.0.0.1:9555")  # fmt: skip
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"--metrics: {host} is not an address of this machine; give one of its "
                "addresses, e.g. 127.0.0.1:9555")  # fmt: skip
    if exc.errno == errno.EADDRINUSE:
        return (f"--metrics: cannot listen on {where}: {exc.strerror}; is another program "
                "using that port? Pick another --metrics port.")  # fmt: skip
    if exc.errno == errno.EACCES and 0 < port < 1024:
        return (f"--metrics: permission denied for port {port} (ports below 1024 need root); "
                "pick a port of 1024 or above")  # fmt: skip
    return f"--metrics: cannot serve on {where}: {exc.strerror}"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, each value in its range (else argparse's "error:
    argument --x: ..." and exit status 2), including the ranges that
    depend on another argument."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rto_max < args.rto_min:
        parser.error(f"argument --rto-max: {args.rto_max} is below --rto-min ({args.rto_min})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = ServerConfig(
        session_timeout=args.session_timeout, rto_min=args.rto_min, rto_max=args.rto_max,
        data_dir=args.data_dir or default_data_dir(), iterations=args.pbkdf2_iterations,
        preauth_rate=args.preauth_rate, preauth_burst=2 * args.preauth_rate,
        registration_rate=args.registration_rate, registration_burst=20 * args.registration_rate,
        user_msg_rate=args.user_msg_rate, user_msg_burst=2.5 * args.user_msg_rate,
        max_sessions=args.max_sessions, key_workers=args.key_workers,
    )  # fmt: skip
    config.max_memory = args.max_memory << 20
    config.name_quarantine = args.name_quarantine * 86400
    config.max_group_members = args.max_group_members
    config.max_user_groups = args.max_user_groups
    config.max_fanout_rate = args.max_fanout_rate
    config.max_fanout_burst = 2 * args.max_fanout_rate
    config.preauth_total_rate = args.preauth_total_rate
    config.preauth_total_burst = 2 * args.preauth_total_rate
    config.cluster = args.cluster or None
    config.node_id = args.node_id
    # Every problem found at start-up is one line naming what is wrong and
    # exit status 2 (a usage error, as argparse's own).
    try:
        server = ChatServer((args.host, args.port), config, metrics=args.metrics)
    except StoreError as exc:  # the data directory or its database
        print(f"chat-server: {exc}", file=sys.stderr)
        return 2
    except MetricsListenError as exc:
        metrics_host, metrics_port = args.metrics
        print(f"chat-server: {metrics_problem(metrics_host, metrics_port, exc)}", file=sys.stderr)
        return 2
    except ListenError as exc:
        print(f"chat-server: {listen_problem(args.host, args.port, exc)}", file=sys.stderr)
        return 2
    stopped_by: list[str] = []

    def stop(signum: int, frame: _StackFrame | None) -> None:
        # Only a flag here: logging from a signal handler can deadlock on
        # the logging lock the interrupted code holds. The line comes later.
        stopped_by.append(signal.Signals(signum).name)
        server.shutdown()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    # The loop allocates a few dozen short-lived objects per message and
    # makes almost no cycles: collect the young generation every 10,000
    # allocations instead of 700 (GC time under load 7 % -> under 1 % of the
    # loop), and leave what start-up loaded (accounts, mailboxes) out of
    # every collection. Here, not in ChatServer: both settings are global.
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    host, port = server.address
    # The ready line starts the same way always (scripts and tests read the
    # address from it); where the data lives follows in parentheses.
    where = f"data in {config.data_dir}"
    if config.cluster is not None:
        where = f"node {config.node_id or format_address(host, port)} of the cluster at " + str(
            getattr(server.cluster_store, "address", "")
        )
    print(f"chat-server listening on {format_address(host, port)} ({where})", flush=True)
    log.info(start_line(server, config))
    with server:
        server.serve_forever()
        online = len(server.relay.sessions)
        log.info("stopping%s: told %d session%s the server is shutting down",
                 f" on {stopped_by[0]}" if stopped_by else "", online,
                 "" if online == 1 else "s")  # fmt: skip
    log.info("stopped after %s", _duration(time.monotonic() - server.started))
    return 0


def start_line(server: ChatServer, config: ServerConfig) -> str:
    """The operator's first log line: what runs, where, on which data, with
    which limits (the ones a busy server meets first)."""
    host, port = server.address
    metrics = server.metrics_address
    where = f"data in {config.data_dir}"
    if server.cluster_store is not None:
        cluster = server.cluster_store
        where = (f"node {cluster.node_id} of the cluster at {cluster.address}, accounts and "
                 "messages in Redis")  # fmt: skip
    return (
        f"chat-server {__version__} started: UDP {format_address(host, port)}, {where}, "
        + (f"metrics at http://{format_address(*metrics)}/metrics; " if metrics else "no metrics; ")
        + f"limits: {config.max_sessions} sessions, --max-memory {config.max_memory >> 20} MiB, "
        f"{config.user_msg_rate:g} messages/s per user, "
        f"--max-fanout-rate {config.max_fanout_rate:g} group copies/s per user, "
        f"--max-group-members {config.max_group_members}, "
        f"--max-user-groups {config.max_user_groups}, "
        f"{config.preauth_rate:g} datagrams/s per address before login "
        f"({config.preauth_total_rate:g}/s from all), "
        f"{config.registration_rate:g} new accounts/s per address, "
        f"session timeout {config.session_timeout:g} s, "
        f"{config.key_workers} key-exchange workers"
    )


def _duration(seconds: float) -> str:
    """3725.2 -> '1h02m05s'; under a minute, '42.1 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


if __name__ == "__main__":
    sys.exit(main())
