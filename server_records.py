"""The server's registry: its configuration, and the records the relay
keeps for users, sessions, queued messages and address probes.

Split from `chat_server.py` (which owns and mutates all of these on its one
thread) so that file can stay about routing. Records use `__slots__`:
there may be tens of thousands of idle sessions.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar

from common import format_address
from protocol import PBKDF2_ITERATIONS, MsgId
from reliability import MAX_BUFFERED_TOTAL, RTO_MAX, RTO_MIN, Connection
from server_guard import TokenBucket
from server_store import Account

log = logging.getLogger("chat_server")

Address = tuple[str, int]


@dataclass
class ServerConfig:
    """Every limit and timer of the server, with the defaults of docs/RELIABILITY.md.
    The benchmark raises some of them with documented flags."""

    session_timeout: float = 60.0  # silence after which a session expires
    rto_min: float = RTO_MIN
    rto_max: float = RTO_MAX
    max_sessions: int = 20_000
    mailbox_messages: int = 10_000  # per recipient
    mailbox_bytes: int = 10 * 1024 * 1024
    log_interval: float = 10.0  # at most one log line per reason this often
    data_dir: Path | None = None  # None: keep everything in memory (tests of the routing)
    iterations: int = PBKDF2_ITERATIONS  # for new accounts; the client does the work
    preauth_rate: float = 500.0  # per source IP, datagrams/s before login ...
    preauth_burst: float = 1000.0  # ... many users may share one NAT address
    login_failures: int = 5  # failed logins allowed per user (per IP: x ADDRESS_NAMES) ...
    login_failure_period: float = 30.0  # ... in this many seconds
    # New accounts per source IP: each costs one 2048-bit modexp (~4 ms) to
    # unwrap its keys, so a flood of new names must not eat the server.
    registration_rate: float = 10.0
    registration_burst: float = 200.0
    # Worker processes for that modexp (server_keyx), so it never stalls the
    # loop; 0: on the loop (the in-process demo and tests: one process).
    key_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    user_msg_rate: float = 200.0  # new messages/s per user after login ...
    user_msg_burst: float = 500.0
    user_byte_rate: float = 1024 * 1024  # ... and bytes/s
    user_byte_burst: float = 2 * 1024 * 1024
    # Before login, from all addresses together (datagrams/s): a flood from
    # many addresses passes the per-address buckets, and each HELLO costs a
    # CHALLENGE (about 25 us). Beyond it datagrams without a live session are
    # dropped unread; 5,000/s still logs in 2,500 clients a second.
    preauth_total_rate: float = 5000.0
    preauth_total_burst: float = 10_000.0

    # Memory caps (docs/RELIABILITY.md 1.4; issue 12). Past the output cap a
    # session's input waits (acks withheld) until its client acks what it
    # was sent; so do new messages while the process is over `max_memory`.
    max_unacked_output: int = 256 * 1024  # bytes queued + in flight to one session
    max_reassembly: int = MAX_BUFFERED_TOTAL  # bytes of partial messages, all sessions
    max_memory: int = 512 * 1024 * 1024  # resident bytes of the whole server
    typing_rate: float = 3.0  # typing notices/s per (sender, recipient) ...
    typing_burst: float = 3.0
    # Seconds a deleted account's name stays unregistrable (`--name-quarantine`,
    # in days): nobody inherits its conversations at once.
    name_quarantine: float = 30 * 24 * 3600.0

    # Groups (issue 14). A group's members at most (Signal's hard limit),
    # and the copies of group messages one user may make the server send a
    # second: a message to a group of N costs N - 1 copies, and past the
    # budget the user's new messages wait (acks withheld), like the other
    # limits. 10,000/s carries 10 messages/s into a group of 1,000.
    max_group_members: int = 1000
    # The groups one user may be a member of: each costs the server memory
    # for as long as it lives (every group is kept in memory, and read at
    # start), and nothing else bounds how many a user makes, or is put in.
    max_user_groups: int = 5000
    max_fanout_rate: float = 10_000.0
    max_fanout_burst: float = 20_000.0

    # Cluster mode (issue 15; server_cluster): the Redis URL of the cluster
    # this node joins (None: one process on its own store) and its name.
    cluster: str | None = None
    node_id: str | None = None  # None: its listening address


class Entry(NamedTuple):
    """A message handed to a recipient's session and not yet receipted by
    their client (the mailbox itself is on the disk). A tuple: the relay
    makes one per message, with `tuple.__new__` (no Python-level `__init__`
    or `__new__` call: issue 18, round 3), and nothing changes it once made."""

    server_msg_id: int
    msg_id: MsgId
    sender_key: str
    sender: str
    text: str
    sent_ms: int
    size: int  # bytes of UTF-8


K = TypeVar("K")
V = TypeVar("V")


class Pager(Generic[K, V]):
    """One session's view of a queue kept on the disk (its mailbox, or the
    receipts waiting for it as a sender): what it was handed and has not
    acknowledged yet (`items`, at most a window), how far it has read, and
    whether more waits on the disk. Ids (server_msg_ids, receipt seqs) grow
    in acceptance order, so "handed everything up to `cursor`" says it all."""

    __slots__ = ("items", "bytes", "cursor", "behind", "missed", "reading")

    def __init__(self, *, behind: bool, missed: int = -1) -> None:
        self.items: dict[K, V] = {}
        self.bytes = 0  # of the items' text
        self.cursor = -(1 << 63)  # the highest id handed over in this session
        # True: something may wait on the disk that was not handed over, so
        # nothing new is handed before it (per-conversation order).
        self.behind = behind
        self.missed = missed  # the highest id known to wait, not handed over
        self.reading = False  # a page is being read

    def fall_behind(self, number: int) -> bool:
        """The queue on the disk holds `number`: unless it was handed over
        already, the session is behind up to it. Whether it must page."""
        if number <= self.cursor:
            return False
        self.behind = True
        self.missed = max(self.missed, number)
        return True


class GroupEntry:
    """A group's entry handed to members' sessions, not yet receipted: one
    record per entry that every member's pager shares (a fan-out makes it
    once), so nothing in it changes once made."""

    __slots__ = ("seq", "server_msg_id", "sender_key", "msg_id", "size", "where")

    def __init__(self, seq: int, server_msg_id: int, sender_key: str, msg_id: MsgId | None,
                 size: int, where: tuple[str, int]) -> None:  # fmt: skip
        self.seq = seq
        self.server_msg_id = server_msg_id
        self.sender_key = sender_key
        self.msg_id = msg_id  # a message's (its sender hears who has it); None: a change
        self.size = size  # bytes of text
        self.where = where  # (group key, seq): `GroupMail.ids`'s value for it


class PageRun:
    """Consecutive entries of a group's log as one payload (a GROUP_BATCH of
    at most a chunk, or an entry alone), joined once for every member who
    pages through them from `entries[0]` (`GroupPages`). Never changed once
    made."""

    __slots__ = ("group", "entries", "payload", "next", "size", "senders")

    def __init__(self, group: object, entries: tuple[GroupEntry, ...], payload: bytes,
                 senders: frozenset[str]) -> None:  # fmt: skip
        self.group = group  # the `server_groups.Group` whose log this is
        self.entries = entries
        self.payload = payload
        self.next = entries[-1].seq + 1  # where the next run starts
        self.size = sum(entry.size for entry in entries)  # bytes of text
        self.senders = senders  # keys of the senders of its messages (not changes)


class GroupPages:
    """The groups' recent log entries, each encoded once, and the runs
    joined from them, shared by every member who reads a group's log in
    pages (`Relay._page_group`): members at the same place cost one store
    read, one `GroupEntry` and one encoding of each entry and one joined
    payload per run, not one each. Filled by the live fan-out (what members
    behind will page next) and by the store reads. Bounded over all groups
    (`max_entries` entries and as many runs, `max_bytes` of both counted
    with `RECORD_BYTES` for each entry, a run's too: `run_cost`): the
    oldest go first. Keyed by (group key,
    seq); a value names its group, so a new group of an old name never
    gets the old one's entries."""

    #: What a cached entry costs besides its payload (the tuple, the
    #: `GroupEntry` with its `MsgId` and `where`, the dict slot: ~450 bytes
    #: traced with tracemalloc, review7 F4), counted against `max_bytes`.
    RECORD_BYTES = 450

    __slots__ = ("max_entries", "max_bytes", "entries", "runs", "bytes", "runs_bytes", "stats")

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # (group key, seq) -> (group, its entry, its encoded GROUP_DELIVER or GROUP_EVENT)
        self.entries: dict[tuple[str, int], tuple[object, GroupEntry, bytes]] = {}
        self.runs: dict[tuple[str, int], PageRun] = {}  # (group key, first seq) -> run
        self.bytes = 0  # of both, `RECORD_BYTES` each included
        self.runs_bytes = 0
        # Counters (the relay's metrics): entries added, runs joined, and the
        # entries pagers took from the cache.
        self.stats = {"added": 0, "joined": 0, "served": 0}

    def get(self, group: object, group_key: str, seq: int) -> tuple[GroupEntry, bytes] | None:
        """The group's entry `seq` and its payload, if cached."""
        found = self.entries.get((group_key, seq))
        if found is None or found[0] is not group:
            return None
        return found[1], found[2]

    def add(self, group: object, group_key: str, entry: GroupEntry, payload: bytes) -> None:
        """A committed entry of the group, encoded (its place taken already:
        nothing)."""
        key = (group_key, entry.seq)
        old = self.entries.get(key)
        if old is not None:
            if old[0] is group:
                return
            self._drop_entry(key)
        self.entries[key] = (group, entry, payload)
        self.bytes += len(payload) + self.RECORD_BYTES
        self.stats["added"] += 1
        self._evict()

    def run(self, group: object, group_key: str, seq: int, batch_bytes: int,
            overhead: int, join: Callable[[list[bytes]], bytes]) -> PageRun | None:  # fmt: skip
        """The run of the group's cached entries from `seq`: made once (as
        `Relay._group_payloads` would join them: at most `batch_bytes`, each
        entry `overhead` more, one too big alone), then the same for every
        member. None: `seq` is not cached."""
        key = (group_key, seq)
        run = self.runs.get(key)
        if run is not None and run.group is group:
            return run
        first = self.entries.get(key)
        if first is None or first[0] is not group:
            return None
        entries = [first[1]]
        payloads = [first[2]]
        size = 3 + len(first[2]) + overhead  # the batch's kind and count, then the entry
        if size <= batch_bytes:
            while True:
                found = self.entries.get((group_key, seq + len(entries)))
                if found is None or found[0] is not group:
                    break
                cost = len(found[2]) + overhead
                if size + cost > batch_bytes:
                    break
                size += cost
                entries.append(found[1])
                payloads.append(found[2])
        payload = payloads[0] if len(payloads) == 1 else join(payloads)
        senders = frozenset(e.sender_key for e in entries if e.msg_id is not None)
        if run is not None:
            self._drop_run(key)
        run = self.runs[key] = PageRun(group, tuple(entries), payload, senders)
        cost = self.run_cost(run)
        self.bytes += cost
        self.runs_bytes += cost
        self.stats["joined"] += 1
        self._evict()
        return run

    def _drop_entry(self, key: tuple[str, int]) -> None:
        _, _, payload = self.entries.pop(key)
        self.bytes -= len(payload) + self.RECORD_BYTES

    @classmethod
    def run_cost(cls, run: PageRun) -> int:
        """What a run counts against `max_bytes`: its payload, and
        `RECORD_BYTES` for each of its entries (its tuple keeps them alive
        after `entries` lets them go: review7 F4 found a run counted as one
        record made the cache hold ~1.8x its cap; one still cached alone
        is counted twice, so the cache holds less than its cap, never
        more)."""
        return len(run.payload) + cls.RECORD_BYTES * len(run.entries)

    def _drop_run(self, key: tuple[str, int]) -> None:
        run = self.runs.pop(key)
        cost = self.run_cost(run)
        self.bytes -= cost
        self.runs_bytes -= cost

    def _evict(self) -> None:
        """The oldest records go while over a cap: runs while they hold more
        than the entries, else entries."""
        while self.bytes > self.max_bytes or len(self.entries) > self.max_entries:
            if self.runs and self.runs_bytes * 2 >= self.bytes:
                self._drop_run(next(iter(self.runs)))
            elif self.entries:
                self._drop_entry(next(iter(self.entries)))
            else:
                break
        while len(self.runs) > self.max_entries:
            self._drop_run(next(iter(self.runs)))


class GroupMail:
    """One session's view of its groups' logs (kept on the disk): a `Pager`
    per group, keyed by group_seq, and one window over all of them, like
    the mailbox's (`MAILBOX_WINDOW`): what was handed and not receipted."""

    __slots__ = ("pagers", "ids", "count", "bytes", "receipted_at")

    def __init__(self) -> None:
        self.pagers: dict[str, Pager[int, GroupEntry]] = {}  # group key -> its pager
        self.ids: dict[int, tuple[str, int]] = {}  # server_msg_id -> (group key, group_seq)
        self.count = 0  # entries handed, not receipted, over all groups
        self.bytes = 0
        # When the client last receipted a group entry (0: never): of members
        # equally far behind, the one longest without a receipt is named as
        # holding a group back (`Relay._backlog_full`), not one whose client
        # merely holds its receipts a moment (GROUP_RECEIPT_HOLD).
        self.receipted_at = 0.0


class User:
    __slots__ = (
        "name", "key", "account", "session", "mailbox_count", "mailbox_bytes", "notice_count",
        "contacts", "msg_bucket", "byte_bucket", "limited_at", "fanout_bucket",
    )  # fmt: skip

    def __init__(self, name: str, key: str, account: Account) -> None:
        self.name = name
        self.key = key
        self.account = account
        self.session: Session | None = None
        # Messages accepted for this user and not yet receipted (on the disk
        # or on their way to it), for the mailbox caps without reading it.
        self.mailbox_count = 0
        self.mailbox_bytes = 0
        self.notice_count = 0  # receipts for messages this user sent, not yet acked by them
        # Name keys of those told when this user comes and goes, least
        # recently used first (a dict as an ordered set; see MAX_CONTACTS).
        self.contacts: dict[str, None] = {}
        self.msg_bucket: TokenBucket | None = None  # made at the first message
        self.byte_bucket: TokenBucket | None = None
        self.limited_at = -1e18  # when we last told them they were rate limited
        self.fanout_bucket: TokenBucket | None = None  # made at the first group message


class GroupNotices:
    """One session's "delivered by" notices as a sender, per group key: the
    GROUP_REACHED frames in flight (not acked yet), the groups whose
    deliveries it is being told again from the log after a login (the seq
    the next page reads after), and the reads under way. The sender's mark
    (`Group.owed`) moves only while a group has none of these."""

    __slots__ = ("inflight", "catching", "reading", "again")

    def __init__(self) -> None:
        self.inflight: dict[str, int] = {}
        self.catching: dict[str, int] = {}
        self.reading: set[str] = set()
        self.again: set[str] = set()  # a read under way is out of date: read again

    def busy(self, group_key: str) -> bool:
        return bool(self.inflight.get(group_key)) or group_key in self.catching


class Session:
    __slots__ = (
        "session_id", "user", "addr", "conn", "instance_id", "last_heard", "scheduled",
        "deadline", "closing", "probe", "mail", "receipts", "presence_sent",
        "presence_due", "group_mail", "group_notices", "login_at",
    )  # fmt: skip

    def __init__(
        self, session_id: bytes, user: User, addr: Address, conn: Connection, instance_id: int,
        now: float, login_at: float | None = None,
    ) -> None:  # fmt: skip
        self.session_id = session_id
        self.user = user
        self.addr = addr
        self.conn = conn
        self.instance_id = instance_id
        self.last_heard = now
        # When its LOGIN first came (a registration's waits for its secret and
        # its commit after): which of one client's login attempts is newer.
        self.login_at = now if login_at is None else login_at
        self.scheduled: float | None = None  # deadline of its live timer-heap entry
        # Its connection's next deadline, as `Relay._schedule` last found it
        # (None: none): never before `scheduled`. A later one moves the live
        # entry there when it comes up, without a wake-up (`Relay.get_timer`).
        self.deadline: float | None = None
        self.closing = False
        self.probe: Probe | None = None  # an address change being validated
        # What it was handed from its mailbox / its queued receipts (made when used).
        self.mail: Pager[int, Entry] | None = None
        self.receipts: Pager[MsgId, int] | None = None  # message id -> receipt seq
        # Presence is state, not a stream of events: at most one PRESENCE per
        # user in flight to this session (name keys, until acked; None when
        # none is: an empty set alone is 216 bytes per session); a change
        # meanwhile, or while the output is over its cap, replaces the one
        # due (name key -> (name, online)), sent once the client acks.
        self.presence_sent: set[str] | None = None
        self.presence_due: dict[str, tuple[str, bool]] = {}
        # Groups (made when used): their entries handed to this session, and
        # what it is told as a sender ("delivered by").
        self.group_mail: GroupMail | None = None
        self.group_notices: GroupNotices | None = None


class Probe:
    """A new address a session's datagrams came from, not yet validated."""

    __slots__ = ("addr", "data", "received", "sent")

    def __init__(self, addr: Address) -> None:
        self.addr = addr
        self.data = secrets.token_bytes(8)
        self.received = 0  # bytes from the new address
        self.sent = 0  # bytes to it: at most 3x received (RFC 9000 8.1)


class DropLog:
    """Counts dropped datagrams by reason and logs each reason at most once
    per interval, so a flood cannot fill the disk. The reasons in `limits`
    are limits the server enforces (what they hold back is sent again by
    its client): a warning, "limit hit", for the operator's eyes; the rest
    (garbage, stale sessions) is the internet's noise, logged as info."""

    def __init__(self, interval: float, limits: frozenset[str] = frozenset()) -> None:
        self.interval = interval
        self.limits = limits
        self.counts: collections.Counter[str] = collections.Counter()
        self._logged: dict[str, tuple[float, int]] = {}

    def __call__(self, category: str, addr: Address, now: float, detail: object = "") -> None:
        """Count a drop under a fixed `category` (never text the sender
        chose, which could make every line new); `detail` only goes in the log."""
        self.counts[category] += 1
        last, count_then = self._logged.get(category, (-1e18, 0))
        if now - last >= self.interval:
            since = self.counts[category] - count_then
            if category in self.limits:
                log.warning("limit hit: %s, from %s%s (%d times since last report)", category,
                            format_address(*addr), f" ({detail})" if detail else "",
                            since)  # fmt: skip
            else:
                log.info("dropped datagram from %s: %s%s (%d since last report)",
                         format_address(*addr), category,
                         f" ({detail})" if detail else "", since)  # fmt: skip
            self._logged[category] = (now, self.counts[category])
