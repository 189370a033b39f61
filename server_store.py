"""The server's store seam and its implementations: accounts, mailboxes,
receipts and dedup keys in SQLite (WAL, `synchronous=FULL`), owned by one
thread (`ServerStore`), or in memory for a relay without a data directory
(`MemoryStore`). The relay sees only `MessageStore`, a `typing.Protocol`,
and talks to it in typed operations, one frozen dataclass each.

Split from `chat_server.py` (which it serves). The server's loop never
waits on the disk: it hands write operations to `ServerStore.submit`, the
store thread applies them in groups (one transaction for everything
queued while the previous commit waited for the disk), and after each commit puts the callbacks of
the committed operations on `done` and calls `notify()` so the loop runs
them. That is how an ACCEPT waits for the disk while forwarding does not.
A message whose recipient's client receipted it before it was written can
be withdrawn (`ServerStore.withdraw`) until the store thread takes its
batch: it is then never written (issue 18; the relay tells its sender at
once, `chat_server.Relay._receipted_unwritten`), but its dedup key still is,
lazily (`StoreDedup`).

Mailboxes and queued receipts stay on the disk: the loop asks for them a
page at a time with a `Read` operation, which the store thread runs after
everything submitted before it has committed (so a page never misses a
message the loop accepted before asking) and whose answer comes back on
`done` like a commit's. At start-up, before the loop runs, `load()` reads
only what is small: accounts, the secret, the id block, dedup high-water
marks and per-user counts (`summary`, kept in the same transactions as the
rows they count); never a mailbox. The directory is locked so that two
servers never share it. Whatever keeps the store from opening (a data
directory that is a file, not writable or on a read-only mount, a damaged or
foreign chat.db, a full disk) is raised as a `StoreError` whose message
names the path, the cause and what to do.

Ages (of dedup keys) are measured in "server time": milliseconds the server
has run, advanced by the monotonic clock and persisted with the commits (at
most once a second), so a wall clock stepped forward cannot expire anything
early.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import logging
import os
import queue
import secrets
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from common import LockHeld, data_dir, lock_file
from common import i64 as _i64
from common import u64 as _u64
from server_metrics import COMMIT_BUCKETS, Histogram

log = logging.getLogger("server_store")

MAX_BATCH = 5000  # operations in one transaction at most
DEDUP_KEEP_S = 7 * 24 * 3600  # keep dedup keys >= 7 days of server time (docs/RELIABILITY.md 1.3)
# Server time is written with a commit at most this often (a crash loses
# less than this much of a dedup key's age: it is kept a little longer).
TIME_SAVE_MS = 1000
DIGEST_BYTES = 16  # of SHA-256 over recipient and text: tells a retry from a reused message id
RETRY_S = 1.0  # between attempts at a batch whose commit failed (a full disk)
FAILURE_LOG_S = 10.0  # one log line per this many seconds while commits keep failing
# Free bytes below which a failed write (that SQLite reports only as an I/O
# error or a file it cannot open) is put down to a full disk.
LOW_SPACE = 64 * 1024
ID_BLOCK = 10_000  # server_msg_ids reserved per durable write, never reused after a crash
# Writes nothing waits for, whose loss in a crash harms nothing (issue 18):
# a receipt taken off a mailbox, a receipt the sender's client acked. Lost,
# the message or the receipt is handed over again at the next login and the
# client, which dedups by message id, shows nothing twice and states move
# only forward. So they do not start a commit (an fsync) of their own: they
# ride on the next write something waits for (a message's, whose ACCEPT
# waits), or go after LAZY_HOLD seconds at most when none comes. A lone
# message then costs one commit, not three (message; receipt; receipt acked).
# A group member's cursor move (GroupReceipt) too (issue 14, seventh session):
# lost, the entries after the cursor on the disk are handed again at the
# next login, which the client dedups (by group seq) and receipts again. At
# a steady rate the members' receipts of one message come over several
# passes, each of which committed its cursor moves alone (4.5 commits per
# message into 100 members); now they ride together. A write that depends
# on a cursor (a trim of the log below it) is urgent and submitted after it:
# it takes the cursor moves held before it into its own commit, in order.
# A sender's "told" mark (GroupTold) too (issue 14, eighth session, lean): at
# a steady rate one in three messages moved it in a commit of its own (1.5
# commits per message into 100 members, the message's own one of them);
# lost, the notices above the mark on the disk are worked out again from the
# cursors at the next start and told again, which the client takes once
# (`CoreStore.add_group_receipt`). What depends on a mark (a trim of the
# log, a former member dropped) is urgent and submitted after it, as above.
# Only without a callback: a MarkDelivered whose DELIVERED waits for it is not.
# At an ordinary load a commit comes every few ms; the hold only bounds how
# long an idle server keeps them in memory (`flush_due` wakes its loop).
LAZY_HOLD = 0.1

TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    name_key TEXT PRIMARY KEY, name TEXT NOT NULL, salt BLOB NOT NULL,
    iterations INTEGER NOT NULL, stored_key BLOB NOT NULL, server_key BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS mailbox (
    server_msg_id INTEGER PRIMARY KEY, recipient_key TEXT NOT NULL, sender_key TEXT NOT NULL,
    sender TEXT NOT NULL, instance_id INTEGER NOT NULL, client_seq INTEGER NOT NULL,
    text TEXT NOT NULL, sent_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dedup (
    sender_key TEXT NOT NULL, instance_id INTEGER NOT NULL, client_seq INTEGER NOT NULL,
    server_msg_id INTEGER NOT NULL, accepted_ms INTEGER NOT NULL,
    digest BLOB, server_ms INTEGER NOT NULL DEFAULT 0, delivered_to TEXT,
    PRIMARY KEY (sender_key, instance_id, client_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS notices (
    sender_key TEXT NOT NULL, instance_id INTEGER NOT NULL, client_seq INTEGER NOT NULL,
    recipient TEXT NOT NULL, seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (sender_key, instance_id, client_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (name_key TEXT PRIMARY KEY, until_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS summary (
    user_key TEXT PRIMARY KEY, messages INTEGER NOT NULL, bytes INTEGER NOT NULL,
    notices INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups (
    group_key TEXT PRIMARY KEY, name TEXT NOT NULL, owner_key TEXT NOT NULL,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_members (
    group_key TEXT NOT NULL, member_key TEXT NOT NULL, name TEXT NOT NULL,
    joined_seq INTEGER NOT NULL, rank INTEGER NOT NULL, left_seq INTEGER,
    cursor INTEGER NOT NULL, earlier TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (group_key, member_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_log (
    group_key TEXT NOT NULL, group_seq INTEGER NOT NULL, server_msg_id INTEGER NOT NULL,
    change INTEGER NOT NULL, sender_key TEXT NOT NULL, sender TEXT NOT NULL,
    instance_id INTEGER NOT NULL, client_seq INTEGER NOT NULL, text TEXT NOT NULL,
    users TEXT NOT NULL, sent_ms INTEGER NOT NULL, recipients INTEGER NOT NULL,
    PRIMARY KEY (group_key, group_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_told (
    sender_key TEXT NOT NULL, group_key TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (sender_key, group_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_names (
    group_key TEXT PRIMARY KEY, last_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_requests (
    user_key TEXT NOT NULL, instance_id INTEGER NOT NULL, request_id INTEGER NOT NULL,
    code INTEGER NOT NULL, message TEXT NOT NULL,
    PRIMARY KEY (user_key, instance_id, request_id)
) WITHOUT ROWID;
"""
# After the tables (and `_migrate`, which adds the columns they use).
INDEXES = """
CREATE INDEX IF NOT EXISTS mailbox_recipient ON mailbox (recipient_key, server_msg_id);
CREATE INDEX IF NOT EXISTS notices_order ON notices (sender_key, seq);
CREATE INDEX IF NOT EXISTS dedup_age ON dedup (server_ms);
CREATE INDEX IF NOT EXISTS group_log_id ON group_log (server_msg_id);
"""
# `quarantine` has a row per name whose account was deleted: nobody may
# register it before `until_ms` (wall clock; `--name-quarantine`).
# `summary` has a row per user with messages or receipts waiting: message
# count and UTF-8 bytes of their mailbox (for the caps), and receipts queued
# for them as a sender. Start-up reads it instead of the mailboxes.
#
# Groups (issue 14; the rules are server_groups.py's): `groups` and
# `group_members` are read at start-up (small: names and numbers); a member's
# delivery state is one row, its `cursor` (the highest group_seq their client
# receipted), never a row per member per message. `group_log` holds each
# message and membership change once, in the group's sequence; members page
# it from their cursor, and entries everyone has are trimmed (`TrimGroup`).
# A sender's "delivered by" receipts are not rows: who has a message follows
# from the cursors (a receipt of seq k covers everything up to k), and
# `group_told` keeps one number per (sender, group): the sender's client was
# told every delivery of its messages up to that seq; a login recomputes the
# rest from the log and the cursors (`ReadGroupSent`). `group_requests` keeps
# the answers of a client instance's last requests, so one sent again is
# answered again and not done twice.
#: Answers of one client instance's group requests kept (the latest).
GROUP_REQUESTS_KEPT = 256


class StoreError(Exception):
    """The data directory or its database cannot be used. The message names
    the path and the cause and says what to do; the server prints it as its
    one line and exits with status 2."""


class StoreLocked(StoreError):
    """Another server holds this data directory."""


# What went wrong with the store's files, in the words both the start-up
# error and the log of a failing commit use.
DISK_FULL = "disk full"
READ_ONLY = "read-only file system"
NOT_WRITABLE = "permission denied"
NOT_A_DIRECTORY = "not a directory"
NOT_A_DATABASE = "not a database"
IS_A_DIRECTORY = "is a directory"
DAMAGED = "damaged"


def failure_cause(exc: BaseException, directory: Path) -> tuple[str, str]:
    """(kind, detail) of a failed operation on the store's files: kind is one
    of the constants above or "" when it is none of them; detail is what the
    system or SQLite said. SQLite reports some failures only as "disk I/O
    error" or "unable to open database file", so for those the directory is
    looked at: a read-only mount, no write permission, no space left."""
    detail = str(exc)
    if isinstance(exc, OSError):
        detail = exc.strerror or detail
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return DISK_FULL, detail
        if exc.errno == errno.EROFS:
            return READ_ONLY, detail
        if exc.errno in (errno.EACCES, errno.EPERM):
            return NOT_WRITABLE, detail
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            return NOT_A_DIRECTORY, detail
        if exc.errno == errno.EISDIR:
            return IS_A_DIRECTORY, detail
        return "", detail
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary result code
    if code == sqlite3.SQLITE_FULL:
        return DISK_FULL, detail
    if code == sqlite3.SQLITE_NOTADB:
        return NOT_A_DATABASE, detail
    if code == sqlite3.SQLITE_ERROR and detail.startswith(("no such column", "table ")):
        return NOT_A_DATABASE, detail  # SQLite, but tables of another program
    if code == sqlite3.SQLITE_CORRUPT:
        return DAMAGED, detail
    if code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY):
        return _directory_state(directory), detail
    return "", detail


def _directory_state(directory: Path) -> str:
    """Why writing in `directory` may fail, as far as can be seen from outside."""
    try:
        stat = os.statvfs(directory)
    except (OSError, AttributeError):  # gone, or Windows (no statvfs)
        return ""
    if stat.f_flag & os.ST_RDONLY:
        return READ_ONLY
    if not os.access(directory, os.W_OK):
        return NOT_WRITABLE
    if stat.f_bavail * stat.f_frsize < LOW_SPACE:
        return DISK_FULL
    return ""


def start_up_message(exc: BaseException, directory: Path, path: Path) -> str:
    """The one line saying why the store in `directory` cannot be used, after
    `exc` while working on `path` (the directory, its lock or its database)."""
    kind, detail = failure_cause(exc, directory)
    if kind == IS_A_DIRECTORY or (path != directory and path.is_dir()):
        # SQLite says only "unable to open database file" for a directory.
        return (f"{path} is a directory, not a database file; move it away or pick another "
                "--data-dir")  # fmt: skip
    if kind == DISK_FULL:
        return f"no space left on device writing {path} (disk full); free some space"
    if kind == READ_ONLY:
        return (f"cannot write in {directory}: it is on a read-only file system; "
                "mount it read-write or pick another --data-dir")  # fmt: skip
    if kind == NOT_WRITABLE:
        return (f"cannot write in {directory}: permission denied; make it writable for this "
                "user or pick another --data-dir")  # fmt: skip
    if kind == NOT_A_DIRECTORY:
        if directory.exists():
            return f"--data-dir {directory} is not a directory; pass --data-dir a directory"
        return (f"--data-dir {directory} cannot be made: a part of its path is a file, not a "
                "directory; pass --data-dir a directory")  # fmt: skip
    if kind == NOT_A_DATABASE:
        return (f"{path} is not a chat-server database ({detail}); move it away or pick "
                "another --data-dir")  # fmt: skip
    if kind == DAMAGED:
        return (f"{path} is damaged ({detail}); restore it from a backup, or move it away "
                "to start with an empty store")  # fmt: skip
    return f"cannot use {path}: {detail}; check it or pick another --data-dir"


# The file header: magic, page size, change counter, page count, the counter
# the page count is valid for (sqlite.org/fileformat.html, 1.3).
SQLITE_HEADER = struct.Struct(">16sH6xII60xI4x")


def _truncation(path: Path) -> str:
    """What shows that the database file at `path` was cut short, or "".
    SQLite itself reads a missing tail as zeros: a part page gives NULLs
    where none can be, not an error. Looked at only when there is no
    write-ahead log to replay: after a crash during a checkpoint, the log
    still holds the pages a short file lacks."""
    wal = path.with_name(path.name + "-wal")
    try:
        if wal.exists() and wal.stat().st_size > 0:
            return ""
        with open(path, "rb") as file:
            head = file.read(SQLITE_HEADER.size)
            size = os.fstat(file.fileno()).st_size
    except OSError:
        return ""  # missing or unreadable: connecting says which
    if len(head) < SQLITE_HEADER.size or not head.startswith(b"SQLite format 3\0"):
        return ""  # new and empty, or not SQLite at all (SQLite says so)
    _, page_size, counter, pages, valid_for = SQLITE_HEADER.unpack(head)
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or size % page_size:
        return f"{size} bytes is not a whole number of {page_size}-byte pages"
    # The page count in the header is valid only when its counter matches.
    if counter == valid_for and size < pages * page_size:
        return f"{size} bytes is less than its {pages} pages of {page_size} bytes"
    return ""


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _start_up(method: _Method) -> _Method:
    """Raise what goes wrong in a start-up step of `ServerStore` as a `StoreError`."""

    @functools.wraps(method)
    def wrapper(self: ServerStore, *args: Any, **kwargs: Any) -> Any:
        with self._explained(self.path):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class Account:
    name: str
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


@dataclass
class StoredMessage:
    server_msg_id: int
    recipient_key: str
    sender_key: str
    sender: str
    instance_id: int
    client_seq: int
    text: str
    sent_ms: int


@dataclass
class Loaded:
    """What start-up reads: small, whatever the mailboxes hold."""

    secret: bytes
    next_msg_id: int
    accounts: dict[str, Account] = field(default_factory=dict)
    # user key -> (messages waiting, their UTF-8 bytes, receipts waiting for them)
    summary: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # name key of a deleted account -> until when (wall clock, ms) nobody may register it
    quarantine: dict[str, int] = field(default_factory=dict)
    groups: list[LoadedGroup] = field(default_factory=list)
    group_requests: dict[RequestKey, tuple[int, str]] = field(default_factory=dict)
    # (sender key, group key) -> the sender's client was told every delivery
    # of its messages in the group up to this seq
    group_told: dict[tuple[str, str], int] = field(default_factory=dict)
    # (group key, sender key) -> the highest seq of a message of theirs in the log
    group_sent: dict[tuple[str, str], int] = field(default_factory=dict)


# A notice row: (seq, instance_id, client_seq, recipient's display name).
NoticeRow = tuple[int, int, int, str]
# A sender's group message in the log: (group_seq, instance_id, client_seq).
GroupSentRow = tuple[int, int, int]
# A group request's answer: (user key, instance id, request id) -> (code, message).
RequestKey = tuple[str, int, int]


@dataclass(slots=True)
class GroupItem:
    """One entry of a group's log, in its sequence: a message (`change` 0,
    `text`) or a membership change (`change` a `protocol.GroupChange`,
    `users`; `sender` is who made it)."""

    group_key: str
    group_seq: int
    server_msg_id: int
    change: int
    sender_key: str
    sender: str
    instance_id: int  # a message's id (0, 0 for a change)
    client_seq: int
    text: str
    users: tuple[str, ...]
    sent_ms: int
    recipients: int  # members other than the sender at this entry (a message's N)


@dataclass(slots=True)
class LoadedMember:
    key: str
    name: str
    joined_seq: int
    rank: int
    left_seq: int | None
    cursor: int
    # (first, last) of earlier memberships still theirs (`server_groups.Member`)
    earlier: tuple[tuple[int, int], ...] = ()


@dataclass(slots=True)
class LoadedGroup:
    key: str
    name: str
    owner_key: str
    seq: int
    members: list[LoadedMember]  # current and former, in joining order
    epoch: int = 0  # cluster mode: `server_groups.Group.epoch`
    changed: int = 0  # cluster mode: `server_groups.Group.changed`
    # One server: (group_seq, UTF-8 bytes of its text) of each entry the log
    # holds, in order, for the backlog's running totals (`Group.ends`).
    sizes: list[tuple[int, int]] = field(default_factory=list)


# --- the operations: one dataclass each, what the loop asks of a store ---
# Values: nobody changes one once made. They are not `frozen=True` because
# a frozen dataclass's `__init__` sets each field through
# `object.__setattr__`: 1.0 us for MarkDelivered's 8 fields against 0.15 us,
# and the loop makes three of them per relayed message.


@dataclass(slots=True)
class StoreMessage:
    """Keep an accepted message in its recipient's mailbox, and its dedup key.

    `state` and `handoff` are `ServerStore`'s: whether the store thread took
    it (TAKEN) or the loop withdrew it first (WITHDRAWN: its recipient's
    client receipted it before it was written, see `ServerStore.withdraw`),
    and which hand-over (`flush`) carries it."""

    message: StoredMessage
    state: int = 0
    handoff: int = 0


@dataclass(slots=True)
class StoreDedup:
    """Keep the dedup keys (and content digests) of messages that are never
    written (`StoreMessage` withdrawn: their recipient's client receipted
    them first, `chat_server.Relay._receipted_unwritten`), each with the
    name of the recipient who has it: a resend of one is answered ACCEPT
    with its id and DELIVERED, a reuse of its id for other content
    DUPLICATE_ID, in any later life of the server too. A lazy write
    (LAZY_WRITES): their senders were answered already and wait for
    nothing. One for all the messages of a batch of receipts: one operation
    and one callback, not one per message (issue 18, round 3)."""

    items: list[tuple[StoredMessage, str]]  # (the message, the recipient's name)


#: `StoreMessage.state`: the store thread has it (applying or applied: too
#: late to withdraw), or the loop withdrew it (the thread skips it).
TAKEN = 1
WITHDRAWN = 2


@dataclass(slots=True)
class MarkDelivered:
    """The recipient receipted a message: out of its mailbox; the sender's
    receipt queued under `seq` (its place in the sender's queue), unless
    `told`: the sender's client has it already (it acked the DELIVERED
    before this was written), so there is nothing to queue."""

    server_msg_id: int
    sender_key: str
    instance_id: int
    client_seq: int
    recipient: str  # the recipient's display name, as the sender is told it
    recipient_key: str
    size: int  # UTF-8 bytes of the text, off the recipient's mailbox count
    seq: int
    told: bool = False


@dataclass(slots=True)
class MarkDelivereds:
    """`MarkDelivered`s (each `told`) in one operation: the receipts whose
    DELIVEREDs a sender's client acked in one datagram
    (`chat_server.Relay._receipts_acked`), one operation for all of them
    (issue 18, round 3). A lazy write, as each of them is."""

    items: list[MarkDelivered]


@dataclass(slots=True)
class NoticeDone:
    """The sender's client holds this receipt: drop it from its queue."""

    sender_key: str
    instance_id: int
    client_seq: int


@dataclass(slots=True)
class StoreAccount:
    key: str
    account: Account


@dataclass(slots=True)
class UpdateAccount:
    """A changed password: the account's new salt, iterations and keys."""

    key: str
    account: Account


@dataclass(slots=True)
class EraseAccount:
    """A deleted account: its row, its mailbox, the receipts queued for it,
    its dedup keys and its counts go; its name is quarantined until
    `until_ms` (wall clock) so that nobody inherits a conversation at once."""

    key: str
    until_ms: int


@dataclass(slots=True)
class Reserve:
    """Server message ids below `upto` may be given out (a crash never reuses one)."""

    upto: int


@dataclass(slots=True)
class Sync:
    """A barrier: its callback runs once everything submitted before it is durable."""


@dataclass(slots=True)
class ReadMailbox:
    """A recipient's next messages past `after`: at most `limit`, about
    `max_bytes` of text (always one, if any waits). Answer: (messages, more)."""

    recipient_key: str
    after: int
    limit: int
    max_bytes: int


@dataclass(slots=True)
class ReadNotices:
    """Receipts queued for a sender past seq `after`, at most `limit`.
    Answer: (notice rows, more)."""

    sender_key: str
    after: int
    limit: int


@dataclass(slots=True)
class FindDedup:
    """A committed message id: answer (server_msg_id, content digest or
    None for keys older than digests, the recipient's name if the message
    was delivered without a write (`StoreDedup`) or None) or None when
    unknown."""

    sender_key: str
    instance_id: int
    client_seq: int


@dataclass(slots=True)
class StoreGroupItem:
    """Append an entry to a group's log and apply what it changes: the
    group's seq, name and owner (the row is made by the first entry),
    members `joined` (key, name, rank: from this entry on) and `left`
    (their last entry is this one). A message's dedup key is kept too;
    `request` records the answer of the request that made a change. `kept`:
    members written whole (one added again who goes on from an earlier
    membership, `server_groups.GroupTable._join`)."""

    item: GroupItem
    name: str
    owner_key: str
    joined: tuple[tuple[str, str, int], ...] = ()
    left: tuple[str, ...] = ()
    request: tuple[RequestKey, int, str] | None = None
    kept: tuple[LoadedMember, ...] = ()


@dataclass(slots=True)
class EndGroup:
    """The group's last member left: its rows go, its name is free. With
    `keep_as`, what former members are still owed stays under that key (a
    retired group: the group's row, its former members' rows, its log and
    the senders' marks; not the current members') until they have it
    (then an `EndGroup` of `keep_as`): a group made again under the name
    never mixes with it."""

    group_key: str
    request: tuple[RequestKey, int, str] | None = None
    keep_as: str = ""
    # The leaver, kept as a former member for senders owed notices of what
    # they had (`server_groups.GroupTable.close`), under `keep_as` with the rest.
    kept: tuple[LoadedMember, ...] = ()
    # The name's last seq (the LEFT that ended it; 0: a retired group's
    # end, which frees no name): a group made again under the name goes on
    # from there (`ReadGroupMark`), so a name's seqs only grow.
    last_seq: int = 0
    # The last member's LEFT, owed to them like any leaver's (audit8 P1,
    # P7; `Relay._group_leave` always gives it): appended to
    # the log, and their row ended there, in the same write as the rest,
    # before the rows go under `keep_as` (a kill -9 between the two would
    # leave a group of no member under its name).
    left: StoreGroupItem | None = None


@dataclass(slots=True)
class GroupReceipt:
    """A member's client has the group's entries up to `seq` (the cursor
    only moves forward). No row per message for their senders: who has a
    message follows from the cursors (in cluster mode too)."""

    group_key: str
    member_key: str
    seq: int


@dataclass(slots=True)
class DropMember:
    """A former member's client has everything up to their removal."""

    group_key: str
    member_key: str


@dataclass(slots=True)
class BuryMember:
    """A deleted account's former membership, which it had not had all of,
    is kept under `tomb_key` (a key no user has) until its senders were
    told it never will (then `DropMember` of `tomb_key`)."""

    group_key: str
    member_key: str
    tomb_key: str


@dataclass(slots=True)
class GroupTold:
    """The sender's client was told every delivery of its messages in the
    group up to `seq` (only moves forward)."""

    sender_key: str
    group_key: str
    seq: int


@dataclass(slots=True)
class TrimGroup:
    """The group's log entries up to `upto` are had by everyone they are
    for, and their senders were told: they go. With `first`, only those
    from `first` on (a hole: what lies below it is still owed to a former
    member or a sender, what lies in it to nobody; `Relay._trim_group`).
    Cluster mode works both out in Redis (`server_cluster.TRIM_GROUP`);
    `exempt` are (sender key, seq) of senders on the node who were told
    every delivery of their messages up to seq: a hole may take those."""

    group_key: str
    upto: int
    first: int = 0
    exempt: tuple[tuple[str, int], ...] = ()


@dataclass(slots=True)
class ReadGroupLog:
    """A group's entries with `after` < group_seq <= `last`, in order: at
    most `limit`, about `max_bytes` of text (always one, if any).
    Answer: (items, more)."""

    group_key: str
    after: int
    last: int
    limit: int
    max_bytes: int


@dataclass(slots=True)
class ReadGroupSent:
    """A sender's messages in a group's log past seq `after`, at most
    `limit`, in order. Answer: (group sent rows, more)."""

    group_key: str
    sender_key: str
    after: int
    limit: int


@dataclass(slots=True)
class ReadGroupMark:
    """The last seq a group of this name had before (0: none ended): where a
    group made again under it goes on (`EndGroup.last_seq`). One server
    only (a cluster's script keeps the mark in the shared store).
    Answer: int."""

    group_key: str


@dataclass(slots=True)
class FindGroupItem:
    """A committed group message by its server_msg_id (for a SEND sent
    again): answer (group_seq, recipients) or None."""

    server_msg_id: int


# --- cluster mode only (server_cluster.RedisStore): a group's entries are
# numbered by the shared store, in one sequence for every node, not by the
# node that makes them (docs/CLUSTER.md, "Groups"). Each carries its answer,
# set by the store before the callback runs. The SQLite and memory stores
# never get them (a relay uses them only with `shared_store`).


@dataclass(slots=True)
class PostGroupMessage:
    """Append a message to its group's log if its sender is a member there
    (the store checks), with its dedup key: the store numbers it, setting
    `item.group_seq` and `item.recipients` (the members but the sender at
    that place) and `epoch` (which group of that name), or `refused`
    (NO_SUCH_GROUP, NOT_A_MEMBER, or MAILBOX_FULL: what waits for the
    member furthest behind, `held_by`, would pass `max_entries` or
    `max_bytes`; `backlog`: the entries and bytes waiting for them)."""

    item: GroupItem
    max_entries: int = 0
    max_bytes: int = 0
    epoch: int = 0
    refused: int = 0
    held_by: str = ""
    backlog: tuple[int, int] = (0, 0)


@dataclass(slots=True)
class ChangeGroup:
    """A request's entries (`entries`: each with the members it adds, as
    (key, name, rank), and those it removes), planned by a node against its
    copy of the group: applied only if the group is still that one (`epoch`,
    0 for a new group) with no membership change since `changed`; numbered
    by the store from the group's next seq on. `owner_key` is the owner
    after them; `end`: the last member left (the group's keys go). The store
    sets `outcome`: "ok" (with `first_seq`), "conflict" (with `current`, the
    store's (epoch, seq)) or "done" (asked before: `answer`), or "full"
    (`full`: the name of a user it would put in more than `max_user_groups`
    groups, counted by the store; 0: not checked there). With `epoch`
    -1 and no entries, only the answer is looked up: "done" or "none" (with
    `current`: the node catches up to it and plans the request again)."""

    group_key: str
    name: str
    epoch: int
    changed: int
    entries: list[tuple[GroupItem, tuple[tuple[str, str, int], ...], tuple[str, ...]]]
    owner_key: str
    end: bool
    request: tuple[RequestKey, int, str]
    outcome: str = ""
    first_seq: int = 0
    current: tuple[int, int] = (0, 0)
    answer: tuple[int, str] | None = None
    max_user_groups: int = 0
    full: str = ""
    # With `end`: the last member's LEFT went into the log of the group
    # retired under its tombstone key (owed up to it, like any leaver's,
    # until their client has it; `CHANGE_GROUP` always logs it: audit8 P1, P7).
    logged: bool = False


@dataclass(slots=True)
class ReadGroupState:
    """The group as the store holds it now (`result`: a `LoadedGroup`, or
    None: no such group), with its senders' marks (`told`: sender key ->
    seq, `GroupTold`) and last messages (`sent`: sender key -> seq); `ok`
    False if it could not be read."""

    group_key: str
    result: LoadedGroup | None = None
    ok: bool = False
    told: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class ReadGroupCursors:
    """`member_key`'s cursor in each of `group_keys` (`result`: group key ->
    cursor, for those where they are a member or a former one)."""

    member_key: str
    group_keys: tuple[str, ...]
    result: dict[str, int] = field(default_factory=dict)
    ok: bool = False


@dataclass(slots=True)
class TellReached:
    """Cluster mode: "delivered by" notices for a sender whose session is
    on another node, handed to that node (pub/sub, not kept: what is lost
    is worked out again at the sender's next login, from the cursors).
    `reached`: (instance id, client seq, members' names) per message;
    `cursors`: those members' cursors (key, seq), so that node's copy of
    the group knows how far they are (its low-water mark)."""

    sender_key: str
    group_key: str
    reached: list[tuple[int, int, list[str]]]
    cursors: list[tuple[str, int]]


ClusterGroupOp = (
    PostGroupMessage | ChangeGroup | ReadGroupState | ReadGroupCursors | TellReached
)  # fmt: skip
GroupWrite = (
    StoreGroupItem | EndGroup | GroupReceipt | DropMember | BuryMember | GroupTold | TrimGroup
)  # fmt: skip
Write = (
    StoreMessage | StoreDedup | MarkDelivered | MarkDelivereds | NoticeDone | StoreAccount
    | UpdateAccount | EraseAccount | Reserve | Sync | GroupWrite
)  # fmt: skip
Query = (
    ReadMailbox | ReadNotices | FindDedup | ReadGroupLog | ReadGroupSent | FindGroupItem
    | ReadGroupMark
)  # fmt: skip
MailPage = tuple[list[StoredMessage], bool]
NoticePage = tuple[list[NoticeRow], bool]
DedupFound = tuple[int, bytes | None, str | None] | None
GroupPage = tuple[list[GroupItem], bool]
GroupSentPage = tuple[list[GroupSentRow], bool]
GroupItemFound = tuple[int, int] | None
Answer = MailPage | NoticePage | DedupFound | GroupPage | GroupSentPage | GroupItemFound | int


class Read:
    """A query for the loop and, once run, its answer: a store runs it after
    everything submitted before it has committed (so a page never misses a
    message accepted before it was asked for); `ok` and `result` are set
    before the callback given with it to `submit` runs on the loop."""

    __slots__ = ("query", "ok", "result")

    def __init__(self, query: Query) -> None:
        self.query = query
        self.ok = False  # False: not run, or it failed (logged); the loop asks again later
        self.result: Any = None  # MailPage, NoticePage or DedupFound, by the query

    def run(self, answer: Callable[[Query], object]) -> None:
        try:
            self.result = answer(self.query)
            self.ok = True
        except Exception:
            log.exception("store read failed (%s); the loop will ask again",
                          type(self.query).__name__)  # fmt: skip


Op = Write | Read | ClusterGroupOp
_CLUSTER_OPS = frozenset((PostGroupMessage, ChangeGroup, ReadGroupState, ReadGroupCursors))
Then = Callable[[], None]
#: Writes held back when nothing waits for them (see LAZY_HOLD).
LAZY_WRITES = (MarkDelivered, MarkDelivereds, NoticeDone, StoreDedup, GroupReceipt, GroupTold)


class MessageStore(Protocol):
    """What the relay needs of a store (`ServerStore`: SQLite; `MemoryStore`:
    nothing survives the process; a Redis store next). The loop never waits
    on it: it submits operations with an optional callback; a store applies
    them in submission order and hands back the callbacks of those that are
    durable (and the answers of reads, which see every write submitted
    before them) through `completed()`, which the loop drains when woken
    (`Relay.store_done(now)`). A store may also complete an operation at
    once, inside `submit`: the relay makes no assumption either way."""

    def load(self) -> Loaded:
        """What the relay starts from (before the loop runs)."""
        ...

    def submit(self, op: Op, then: Then | None = None) -> None:
        """Apply `op` after everything submitted before it; then `then` on the loop."""
        ...

    def reserve_ids(self, next_msg_id: int) -> int:
        """The loop gives out server message ids from `next_msg_id` on:
        reserve the next block durably when it comes near the end of this
        one. Returns the id at which to call again (the loop checks that
        inline: no call per message)."""
        ...

    def completed(self) -> list[Then]:
        """The callbacks of the operations completed since the last call, in order."""
        ...

    def flush(self) -> None:
        """End of a loop pass: hand the pass's operations over."""
        ...

    def close(self) -> None: ...

    # A store may also offer `withdraw(ops: list[StoreMessage]) -> None` (the
    # relay looks for it): `ServerStore` does, the others apply a message
    # at once or keep it elsewhere (Redis) and do not need to.
    #
    # Which operations a store must apply: every one the relay may submit to
    # it. An operation a store does not know is never applied and never
    # acknowledged (`server_cluster.RedisStore._unsupported` logs it once),
    # so its callback never runs: a new operation the relay submits goes
    # into every store that can meet it, in the same change. Every store:
    # `StoreMessage`, `MarkDelivered`, `MarkDelivereds` (its items, in one
    # transaction with the rest of the batch), `NoticeDone`, `StoreAccount`,
    # `UpdateAccount`, `EraseAccount`, `Reserve`, `Sync`, `GroupReceipt`,
    # `GroupTold`, `DropMember`, `BuryMember` and `Read` of every `Query`
    # but `ReadGroupMark`. A store of one server only (`Relay.shared_store`
    # False: the relay numbers groups itself): `StoreDedup` (if it offers
    # `withdraw`), `StoreGroupItem`, `EndGroup`, `TrimGroup`, `Read` of
    # `ReadGroupMark`. A shared store only:
    # `PostGroupMessage`, `ChangeGroup`, `ReadGroupState`,
    # `ReadGroupCursors`, `TellReached`.


class MemoryStore:
    """A `MessageStore` in RAM, for a relay without a data directory (tests
    of the routing, benchmarks of the loop): the same operations and reads
    as SQLite, applied at once inside `submit`, whose callback runs there
    too. Nothing survives the process."""

    def __init__(self) -> None:
        self.secret = secrets.token_bytes(32)
        self.accounts: dict[str, Account] = {}
        # recipient key -> server_msg_id -> message, in id order (ids only grow)
        self.mail: dict[str, dict[int, StoredMessage]] = {}
        # sender key -> (instance id, client seq) -> notice row (put in seq
        # order when read: reads are rare, receipts are per message)
        self.notices: dict[str, dict[tuple[int, int], NoticeRow]] = {}
        # (sender key, instance id, client seq) -> (server_msg_id, recipient
        # key, text): the digest is computed when looked up, which is rare.
        # Tuples of strings and ints, which the garbage collector stops
        # tracking: a dict of millions of objects would slow every collection.
        self.dedup: dict[tuple[str, int, int], tuple[int, str, str, str | None]] = {}
        self.quarantine: dict[str, int] = {}  # name key -> until (wall clock, ms)
        # Groups, as in SQLite: the group's row [name, owner, seq], its
        # members, its log by seq, log entries by server_msg_id, what each
        # sender was told of its messages' deliveries, and the requests' answers.
        self.groups: dict[str, list[Any]] = {}
        self.members: dict[str, dict[str, LoadedMember]] = {}
        self.log: dict[str, dict[int, GroupItem]] = {}
        self.log_ids: dict[int, GroupItem] = {}
        self.group_told: dict[tuple[str, str], int] = {}  # (sender key, group key) -> seq
        self.group_requests: dict[RequestKey, tuple[int, str]] = {}
        self.group_marks: dict[str, int] = {}  # name key -> last seq of its ended groups

    def load(self) -> Loaded:
        loaded = Loaded(self.secret, 1, quarantine=dict(self.quarantine))
        for key, (name, owner, seq) in self.groups.items():
            members = sorted(self.members.get(key, {}).values(),
                             key=lambda m: (m.joined_seq, m.rank))  # fmt: skip
            sizes = [(s, len(item.text.encode("utf-8")))
                     for s, item in sorted(self.log.get(key, {}).items())]  # fmt: skip
            loaded.groups.append(LoadedGroup(key, name, owner, seq, members, sizes=sizes))
        loaded.group_requests = dict(self.group_requests)
        loaded.group_told = dict(self.group_told)
        for key, log in self.log.items():
            for item in log.values():
                if not item.change:
                    sent = (key, item.sender_key)
                    loaded.group_sent[sent] = max(loaded.group_sent.get(sent, 0), item.group_seq)
        return loaded

    def _erase(self, key: str) -> None:
        """What the store keeps of user `key`: its mailbox, the receipts
        queued for it, its dedup keys, its quarantine (a new owner)."""
        self.mail.pop(key, None)
        self.notices.pop(key, None)
        self.quarantine.pop(key, None)
        for dedup in [d for d in self.dedup if d[0] == key]:  # rare: a deletion
            del self.dedup[dedup]
        for told in [t for t in self.group_told if t[0] == key]:
            del self.group_told[told]
        for request in [r for r in self.group_requests if r[0] == key]:
            del self.group_requests[request]

    def submit(self, op: Op, then: Then | None = None) -> None:
        # The three kinds made per message first, tested with `isinstance`
        # and applied here: a `match` class pattern with positional fields
        # costs 0.2-0.3 us, a method call per kind another 0.1.
        if isinstance(op, StoreMessage):
            m = op.message
            waiting = self.mail.get(m.recipient_key)
            if waiting is None:
                waiting = self.mail[m.recipient_key] = {}
            waiting[m.server_msg_id] = m
            self.dedup[(m.sender_key, m.instance_id, m.client_seq)] = (
                m.server_msg_id, m.recipient_key, m.text, None)  # fmt: skip
        elif isinstance(op, MarkDelivered):
            self._mark_delivered(op)
        elif isinstance(op, MarkDelivereds):
            for mark in op.items:
                self._mark_delivered(mark)
        elif isinstance(op, NoticeDone):
            queued = self.notices.get(op.sender_key)
            if queued is not None:
                queued.pop((op.instance_id, op.client_seq), None)
                if not queued:
                    del self.notices[op.sender_key]
        else:
            match op:
                case StoreDedup(items):
                    for m, delivered_to in items:
                        self.dedup[(m.sender_key, m.instance_id, m.client_seq)] = (
                            m.server_msg_id, m.recipient_key, m.text, delivered_to)  # fmt: skip
                case StoreAccount(key, account):
                    if key not in self.accounts:
                        self._erase(key)  # what a deleted account of that name left
                        self.accounts[key] = account
                case UpdateAccount(key, account):
                    if key in self.accounts:
                        self.accounts[key] = account
                case EraseAccount(key, until_ms):
                    self.accounts.pop(key, None)
                    self._erase(key)
                    self.quarantine[key] = until_ms
                case Reserve() | Sync():
                    pass  # nothing to reserve or to wait for in memory
                case Read():
                    op.run(self._answer)
                case _:
                    self._group_write(op)
        if then is not None:
            then()

    def _mark_delivered(self, op: MarkDelivered) -> None:
        waiting = self.mail.get(op.recipient_key)
        if waiting is not None:
            waiting.pop(op.server_msg_id, None)
            if not waiting:
                del self.mail[op.recipient_key]
        if not op.told:
            row = (op.seq, op.instance_id, op.client_seq, op.recipient)
            queued = self.notices.get(op.sender_key)
            if queued is None:
                queued = self.notices[op.sender_key] = {}
            queued.setdefault((op.instance_id, op.client_seq), row)  # INSERT OR IGNORE

    def _group_write(self, op: Op) -> None:
        match op:
            case StoreGroupItem(item, name, owner_key, joined, left, request, whole_rows):
                row = self.groups.setdefault(item.group_key, [name, owner_key, 0])
                row[1] = owner_key
                row[2] = max(row[2], item.group_seq)
                self.log.setdefault(item.group_key, {})[item.group_seq] = item
                self.log_ids[item.server_msg_id] = item
                if not item.change:
                    to_key = GROUP_DEDUP_PREFIX + item.group_key
                    self.dedup[(item.sender_key, item.instance_id, item.client_seq)] = (
                        item.server_msg_id, to_key, item.text, None)  # fmt: skip
                members = self.members.setdefault(item.group_key, {})
                for whole in whole_rows:
                    members[whole.key] = dataclasses.replace(whole)
                for key, member_name, rank in joined:
                    members[key] = LoadedMember(key, member_name, item.group_seq, rank, None,
                                                item.group_seq - 1)  # fmt: skip
                for key in left:
                    if key in members and members[key].joined_seq < item.group_seq:
                        members[key].left_seq = item.group_seq
                if request is not None:
                    self._record_request(request)
            case EndGroup(group_key, request, keep_as, whole_rows, last_seq, left):
                if left is not None:
                    self._group_write(left)
                if last_seq:
                    self.group_marks[group_key] = max(last_seq, self.group_marks.get(group_key, 0))
                row = self.groups.pop(group_key, [])
                members = self.members.pop(group_key, {})
                log = self.log.pop(group_key, {})
                for item in log.values():
                    self.log_ids.pop(item.server_msg_id, None)
                for told in [t for t in self.group_told if t[1] == group_key]:
                    seq = self.group_told.pop(told)
                    if keep_as and row:
                        self.group_told[(told[0], keep_as)] = seq
                if keep_as and row:
                    self.groups[keep_as] = row
                    self.members[keep_as] = {k: m for k, m in members.items()
                                             if m.left_seq is not None}  # fmt: skip
                    for whole in whole_rows:
                        self.members[keep_as][whole.key] = dataclasses.replace(whole)
                    kept = self.log[keep_as] = {}
                    for seq, item in log.items():
                        item = kept[seq] = dataclasses.replace(item, group_key=keep_as)
                        self.log_ids[item.server_msg_id] = item
                if request is not None:
                    self._record_request(request)
            case GroupReceipt(group_key, member_key, seq):
                member = self.members.get(group_key, {}).get(member_key)
                if member is not None:
                    member.cursor = max(member.cursor, seq)
            case DropMember(group_key, member_key):
                members = self.members.get(group_key, {})
                if member_key in members and members[member_key].left_seq is not None:
                    del members[member_key]
            case BuryMember(group_key, member_key, tomb_key):
                members = self.members.get(group_key, {})
                found = members.get(member_key)
                if found is not None and found.left_seq is not None:
                    del members[member_key]
                    found.key = tomb_key
                    members[tomb_key] = found
            case GroupTold(sender_key, group_key, seq):
                if group_key in self.groups:
                    told = (sender_key, group_key)
                    self.group_told[told] = max(seq, self.group_told.get(told, 0))
            case TrimGroup(group_key, upto, first):
                log = self.log.get(group_key, {})
                for seq in [s for s in log if first <= s <= upto]:
                    self.log_ids.pop(log.pop(seq).server_msg_id, None)

    def _record_request(self, request: tuple[RequestKey, int, str]) -> None:
        (user_key, instance_id, request_id), code, message = request
        self.group_requests[(user_key, instance_id, request_id)] = (code, message)
        for key in [k for k in self.group_requests
                    if k[:2] == (user_key, instance_id)
                    and k[2] <= request_id - GROUP_REQUESTS_KEPT]:  # fmt: skip
            del self.group_requests[key]

    def _answer(self, query: Query) -> Answer:
        match query:
            case ReadMailbox(key, after, limit, max_bytes):
                rows: list[StoredMessage] = []
                size = 0
                for m in self.mail.get(key, {}).values():
                    if m.server_msg_id <= after:
                        continue
                    if len(rows) >= limit:
                        return rows, True
                    size += len(m.text.encode("utf-8"))
                    if rows and size > max_bytes:
                        return rows, True
                    rows.append(m)
                return rows, False
            case ReadNotices(key, after, limit):
                queued = self.notices.get(key, {}).values()
                notices = sorted(row for row in queued if row[0] > after)
                return notices[:limit], len(notices) > limit
            case FindDedup(key, instance_id, client_seq):
                found = self.dedup.get((key, instance_id, client_seq))
                if found is None:
                    return None
                server_msg_id, recipient_key, text, delivered_to = found
                return server_msg_id, content_digest(recipient_key, text), delivered_to
            case ReadGroupMark(key):
                return self.group_marks.get(key, 0)
            case ReadGroupLog(key, after, last, limit, max_bytes):
                entries: list[GroupItem] = []
                size = 0
                for seq in sorted(self.log.get(key, {})):
                    if not after < seq <= last:
                        continue
                    if len(entries) >= limit:
                        return entries, True
                    item = self.log[key][seq]
                    size += len(item.text.encode("utf-8"))
                    if entries and size > max_bytes:
                        return entries, True
                    entries.append(item)
                return entries, False
            case ReadGroupSent(key, sender_key, after, limit):
                log = self.log.get(key, {})
                sent = [(seq, log[seq].instance_id, log[seq].client_seq) for seq in sorted(log)
                        if seq > after and not log[seq].change
                        and log[seq].sender_key == sender_key]  # fmt: skip
                return sent[:limit], len(sent) > limit
            case FindGroupItem(server_msg_id):
                entry = self.log_ids.get(server_msg_id)
                return None if entry is None else (entry.group_seq, entry.recipients)

    def reserve_ids(self, next_msg_id: int) -> int:
        return 1 << 63  # nothing survives a restart: no id can be reused after one

    def completed(self) -> list[Then]:
        return []  # every callback ran inside `submit`

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


#: A group message's dedup key names its group as `#` + the group's key in
#: place of a recipient (a group and a user of the same name never meet).
GROUP_DEDUP_PREFIX = "#"


def content_digest(recipient_key: str, text: str) -> bytes:
    """What a dedup key remembers of its message: a SEND that reuses the id
    with another recipient or text is not a retry (a copied client profile)."""
    return hashlib.sha256(f"{recipient_key}\0{text}".encode()).digest()[:DIGEST_BYTES]


def default_data_dir() -> Path:
    """The platform's user data directory for the server."""
    return data_dir() / "server"


class ServerStore:
    """A `MessageStore` in SQLite behind one writer thread. `submit` from the
    loop; `load` once before. Callbacks passed to `submit` come back on
    `done` after commit (drained by `completed()`)."""

    def __init__(
        self, data_dir: Path, *, notify: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.data_dir = data_dir
        self.path = data_dir / "chat.db"
        with self._explained(data_dir):
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):
            data_dir.chmod(0o700)
        try:
            # The first file written: a directory that is not writable, on a
            # read-only mount or a file is found out here.
            with self._explained(data_dir):
                self._lock = lock_file(data_dir / "server.lock")
        except LockHeld:
            raise StoreLocked(
                f"another chat-server is using {data_dir}; stop it or pick another --data-dir"
            ) from None
        self.notify = notify
        self.done: queue.SimpleQueue[Then] = queue.SimpleQueue()
        # Writes queued by the loop during one pass, handed over together by
        # `flush()`: one queue operation and one wake-up of this thread per
        # pass, after the pass's datagrams have gone out.
        self._pending: list[tuple[Op, Then | None]] = []
        # How many writes in `_pending` something waits for (not lazy, see
        # LAZY_HOLD, nor withdrawn), and since when it has held any.
        self._urgent = 0
        self._pending_since = 0.0
        # Hand-overs so far (`flush`): a message whose `handoff` is this one
        # is still in `_pending`. The lock orders a withdrawal against the
        # store thread's taking of a batch (`withdraw`, `_commit_next`).
        self._handoffs = 0
        self._withdrawing = threading.Lock()
        # Messages withdrawn (`withdraw`) before their hand-over and after it
        # (written by the loop), and those the store thread skipped (all of
        # them, once handed over; written by it). For tests and benchmarks.
        self.withdrawn_pending = 0
        self.withdrawn_queued = 0
        self.skipped = 0
        self._ops: queue.SimpleQueue[list[tuple[Op, Then | None]] | None] = queue.SimpleQueue()
        try:
            self._db = self._connect()
        except BaseException:
            self._lock.close()
            raise
        # Bound parameters per statement (SQLite's default is 32,766; older ones 999).
        self._max_variables = self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._next_block = 0
        # Server time (see the module doc): what was persisted, and when this run began.
        self._clock = clock
        self._time_base = 0
        self._time_start = clock()
        self._time_saved = 0  # the server time last written to `meta`
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self.commits = 0
        # For the metrics (read from their thread, each written by one thread
        # only): how long each commit took, retries included, and the
        # operations handed to the store thread (by the loop) and done (by it).
        self.commit_seconds = Histogram(COMMIT_BUCKETS)
        self.handed = 0
        self.finished = 0

    @contextlib.contextmanager
    def _explained(self, path: Path) -> Iterator[None]:
        """Raise a failure of the store's files as a `StoreError` that says
        what is wrong with `path` and what to do."""
        try:
            yield
        except StoreError:
            raise
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(start_up_message(exc, self.data_dir, path)) from exc

    @_start_up
    def _connect(self) -> sqlite3.Connection:
        truncated = _truncation(self.path)
        if truncated:
            raise StoreError(
                f"{self.path} is damaged ({truncated}: the file was cut short); restore it "
                "from a backup, or move it away to start with an empty store"
            )
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an ACCEPT means it is on the disk
            existed = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            db.executescript(TABLES)
            if "mailbox" in existed:
                _migrate(db, new_summary="summary" not in existed)
            db.executescript(INDEXES)
        except BaseException:
            db.close()
            raise
        return db

    def server_ms(self) -> int:
        """Milliseconds this server has run, over all its runs (never jumps)."""
        return self._time_base + int((self._clock() - self._time_start) * 1000)

    # --- start-up (before the loop runs; on the caller's thread) -------------

    @_start_up
    def load(self) -> Loaded:
        db = self._db
        row = db.execute("SELECT value FROM meta WHERE key='secret'").fetchone()
        if row is None:
            secret = secrets.token_bytes(32)
            db.execute("INSERT INTO meta VALUES ('secret', ?)", (secret,))
        else:
            secret = bytes(row[0])
        row = db.execute("SELECT value FROM meta WHERE key='next_block'").fetchone()
        next_id = int(row[0]) if row is not None else 1
        # Reserve a block durably: ids below next_block may have been used
        # before a crash, so this run starts past them.
        self._next_block = next_id + ID_BLOCK
        db.execute("INSERT OR REPLACE INTO meta VALUES ('next_block', ?)", (self._next_block,))
        row = db.execute("SELECT value FROM meta WHERE key='server_ms'").fetchone()
        self._time_base = int(row[0]) if row is not None else 0
        self._time_start = self._clock()
        self._time_saved = self._time_base
        db.execute(
            "DELETE FROM dedup WHERE server_ms < ?", (self._time_base - DEDUP_KEEP_S * 1000,)
        )
        loaded = Loaded(secret, next_id)
        # (The relay ignores the quarantines that have run out, by its wall
        # clock; a row goes when its name is registered again.)
        for name_key, until_ms in db.execute("SELECT name_key, until_ms FROM quarantine"):
            loaded.quarantine[name_key] = int(until_ms)
        for name_key, name, salt, iterations, stored, server in db.execute(
            "SELECT name_key, name, salt, iterations, stored_key, server_key FROM accounts"
        ):
            loaded.accounts[name_key] = Account(name, salt, iterations, stored, server)
        for user_key, messages, size, notices in db.execute(
            "SELECT user_key, messages, bytes, notices FROM summary"
        ):
            loaded.summary[user_key] = (messages, size, notices)
        groups: dict[str, LoadedGroup] = {}
        for key, name, owner, seq in db.execute(
            "SELECT group_key, name, owner_key, seq FROM groups"
        ):
            groups[key] = LoadedGroup(key, name, owner, seq, [])
        for key, member_key, name, joined, rank, left, cursor, earlier in db.execute(
            "SELECT group_key, member_key, name, joined_seq, rank, left_seq, cursor, earlier "
            "FROM group_members ORDER BY group_key, joined_seq, rank"
        ):
            if key in groups:
                member = LoadedMember(member_key, name, joined, rank, left, cursor,
                                      unpack_ranges(earlier))  # fmt: skip
                groups[key].members.append(member)
        # The entries' sizes, for the backlog's running totals (the log is
        # bounded by them: at most `mailbox_messages` past the lowest member).
        for key, seq, size in db.execute(
            "SELECT group_key, group_seq, length(CAST(text AS BLOB)) FROM group_log "
            "ORDER BY group_key, group_seq"
        ):
            if key in groups:
                groups[key].sizes.append((seq, size))
        loaded.groups = list(groups.values())
        for user_key, instance_id, request_id, code, message in db.execute(
            "SELECT user_key, instance_id, request_id, code, message FROM group_requests"
        ):
            loaded.group_requests[(user_key, _u64(instance_id), _u64(request_id))] = (code, message)
        for sender_key, group_key, seq in db.execute(
            "SELECT sender_key, group_key, seq FROM group_told"
        ):
            loaded.group_told[(sender_key, group_key)] = seq
        for group_key, sender_key, seq in db.execute(
            "SELECT group_key, sender_key, MAX(group_seq) FROM group_log WHERE change=0 "
            "GROUP BY group_key, sender_key"
        ):
            loaded.group_sent[(group_key, sender_key)] = seq
        return loaded

    # --- reads: run on the store thread through `Read` (or before `start`) ---

    def read_mailbox(
        self, recipient_key: str, after: int, limit: int, max_bytes: int
    ) -> tuple[list[StoredMessage], bool]:
        """The recipient's next messages past server_msg_id `after`, in order:
        at most `limit` of them and about `max_bytes` of text (always one, if
        any waits). Also says whether more may wait."""
        rows: list[StoredMessage] = []
        size = 0
        for values in self._db.execute(
            "SELECT server_msg_id, recipient_key, sender_key, sender, instance_id, client_seq, "
            "text, sent_ms FROM mailbox WHERE recipient_key=? AND server_msg_id>? "
            "ORDER BY server_msg_id LIMIT ?",
            (recipient_key, after, limit),
        ):
            message = StoredMessage(*values)
            message.instance_id = _u64(message.instance_id)
            size += len(message.text.encode("utf-8"))
            if rows and size > max_bytes:
                return rows, True
            rows.append(message)
        return rows, len(rows) >= limit

    def read_notices(self, sender_key: str, after: int, limit: int) -> tuple[list[NoticeRow], bool]:
        """Receipts queued for `sender_key` past `after` (their seq), in order."""
        rows = [
            (seq, _u64(instance_id), client_seq, recipient)
            for seq, instance_id, client_seq, recipient in self._db.execute(
                "SELECT seq, instance_id, client_seq, recipient FROM notices "
                "WHERE sender_key=? AND seq>? ORDER BY seq LIMIT ?",
                (sender_key, after, limit),
            )
        ]
        return rows, len(rows) >= limit

    def find_dedup(self, sender_key: str, instance_id: int, client_seq: int) -> DedupFound:
        """For a SEND whose id was accepted and committed before: its
        server_msg_id, the digest of its content (`content_digest`; None
        for keys stored before digests were kept) and the name of the
        recipient who had it before any write (`StoreDedup`; else None).
        None if unknown."""
        row = self._db.execute(
            "SELECT server_msg_id, digest, delivered_to FROM dedup "
            "WHERE sender_key=? AND instance_id=? AND client_seq=?",
            (sender_key, _i64(instance_id), client_seq),
        ).fetchone()
        if row is None:
            return None
        return int(row[0]), None if row[1] is None else bytes(row[1]), row[2]

    def read_group_log(self, query: ReadGroupLog) -> GroupPage:
        """A group's entries in (after, last], in order, a page at a time."""
        entries: list[GroupItem] = []
        size = 0
        for values in self._db.execute(
            "SELECT group_key, group_seq, server_msg_id, change, sender_key, sender, instance_id, "
            "client_seq, text, users, sent_ms, recipients FROM group_log "
            "WHERE group_key=? AND group_seq>? AND group_seq<=? ORDER BY group_seq LIMIT ?",
            (query.group_key, query.after, query.last, query.limit),
        ):
            key, seq, server_msg_id, change, sender_key, sender, instance, client_seq = values[:8]
            text, users, sent_ms, recipients = values[8:]
            item = GroupItem(key, seq, server_msg_id, change, sender_key, sender, _u64(instance),
                             client_seq, text, tuple(users.split("\n")) if users else (), sent_ms,
                             recipients)  # fmt: skip
            size += len(item.text.encode("utf-8"))
            if entries and size > query.max_bytes:
                return entries, True
            entries.append(item)
        return entries, len(entries) >= query.limit

    def read_group_sent(self, query: ReadGroupSent) -> GroupSentPage:
        """A sender's messages in a group's log past `after` (the log is
        trimmed, so the scan of the group's part of it is short)."""
        rows = [
            (seq, _u64(instance_id), client_seq)
            for seq, instance_id, client_seq in self._db.execute(
                "SELECT group_seq, instance_id, client_seq FROM group_log WHERE group_key=? "
                "AND group_seq>? AND change=0 AND sender_key=? ORDER BY group_seq LIMIT ?",
                (query.group_key, query.after, query.sender_key, query.limit + 1),
            )
        ]
        return rows[: query.limit], len(rows) > query.limit

    def _answer(self, query: Query) -> Answer:
        match query:
            case ReadMailbox(key, after, limit, max_bytes):
                return self.read_mailbox(key, after, limit, max_bytes)
            case ReadNotices(key, after, limit):
                return self.read_notices(key, after, limit)
            case FindDedup(key, instance_id, client_seq):
                return self.find_dedup(key, instance_id, client_seq)
            case ReadGroupLog():
                return self.read_group_log(query)
            case ReadGroupSent():
                return self.read_group_sent(query)
            case FindGroupItem(server_msg_id):
                row = self._db.execute(
                    "SELECT group_seq, recipients FROM group_log WHERE server_msg_id=?",
                    (server_msg_id,),
                ).fetchone()
                return None if row is None else (int(row[0]), int(row[1]))
            case ReadGroupMark(key):
                row = self._db.execute(
                    "SELECT last_seq FROM group_names WHERE group_key=?", (key,)
                ).fetchone()
                return 0 if row is None else int(row[0])

    def reserve_ids(self, next_msg_id: int) -> int:
        """Reserve the next block of ids when the loop is half-way through this one."""
        if next_msg_id + ID_BLOCK // 2 >= self._next_block:
            self._next_block += ID_BLOCK
            self.submit(Reserve(self._next_block))
        return self._next_block - ID_BLOCK // 2

    # --- the writer thread ---------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chat-store", daemon=True)
        self._thread.start()

    def submit(self, op: Op, then: Then | None = None) -> None:
        """Queue a write or a read; `then` runs on the loop after it has
        committed (been answered). Nothing reaches the store thread before
        the next `flush()` that hands it over."""
        pending = self._pending
        if not pending:
            self._pending_since = self._clock()
        pending.append((op, then))
        if op.__class__ is StoreMessage:  # the usual case: one per message
            self._urgent += 1
            op.handoff = self._handoffs
        # A lazy write with a callback waits for a commit, but for a
        # StoreDedup's, which only drops what stood in for it in memory.
        elif (then is not None and op.__class__ is not StoreDedup) or not isinstance(
            op, LAZY_WRITES
        ):
            self._urgent += 1

    def withdraw(self, ops: list[StoreMessage]) -> None:
        """The loop no longer needs these written (submitted with callbacks,
        which then never run): their recipient's client has the messages
        and receipted them, so their senders are told at once
        (`Relay._receipted_unwritten`). Each whose `state` is WITHDRAWN
        after this will not be written: it was still in this pass's writes,
        or handed to the store thread but not taken yet (the thread skips
        it); one the thread has (TAKEN) is committed, and its callback
        follows. One lock for all of them."""
        withdrawn: list[StoreMessage] = []
        with self._withdrawing:
            for op in ops:
                if not op.state:
                    op.state = WITHDRAWN
                    withdrawn.append(op)
        handoff = self._handoffs
        for op in withdrawn:
            if op.handoff == handoff:  # not handed over yet: nothing waits for it now
                self._urgent -= 1
                self.withdrawn_pending += 1
            else:
                self.withdrawn_queued += 1
        # The pass's last writes withdrawn (a lone message's): they leave the
        # list, and with nothing else urgent no hand-over (no wake-up) is made.
        pending = self._pending
        while pending and (last := pending[-1][0]).__class__ is StoreMessage:
            if last.state != WITHDRAWN or last.handoff != handoff:
                break
            pending.pop()

    def completed(self) -> list[Then]:
        done: list[Then] = []
        if self.done.empty():  # most passes: no exception raised to learn it
            return done
        while True:
            try:
                done.append(self.done.get_nowait())
            except queue.Empty:
                return done

    def flush(self, *, force: bool = False) -> None:
        """Hand the writes submitted since the last flush to the store thread.
        The loop calls it once per pass, after sending: waking the writer
        earlier would have it compete for the GIL with the sends. Lazy
        writes alone (LAZY_HOLD) stay until something waits for a commit,
        or LAZY_HOLD s; `force` hands everything over."""
        if not self._pending:
            return
        if not force and not self._urgent and self._clock() - self._pending_since < LAZY_HOLD:
            return
        self.handed += len(self._pending)
        self._ops.put(self._pending)
        self._pending = []
        self._urgent = 0
        self._handoffs += 1

    @property
    def flush_due(self) -> float | None:
        """When (on the store's clock, the loop's monotonic one) `flush` will
        hand over the lazy writes it holds, if it holds nothing else."""
        if not self._pending or self._urgent:
            return None
        return self._pending_since + LAZY_HOLD

    @property
    def queue_depth(self) -> int:
        """Operations submitted and not yet committed (or answered); safe
        to read from another thread."""
        return max(0, self.handed + len(self._pending) - self.finished)

    def close(self) -> None:
        """Commit what is queued and stop the thread."""
        self.flush(force=True)
        if self._thread is not None:
            self._closing.set()  # a batch that keeps failing is given up
            self._ops.put(None)
            self._thread.join(10)
            self._thread = None
        self._db.close()
        self._lock.close()

    def _run(self) -> None:
        while self._commit_next():
            pass

    def _commit_next(self) -> bool:
        """Take the next batch, commit it, answer its reads and hand its
        callbacks to the loop; False once the thread stops. Its locals (the
        batch's ops, their texts and callbacks) go when it returns, not
        when the next batch comes: an idle server keeps none of them."""
        first = self._ops.get()
        if first is None:
            return False
        stopping = False
        # Group commit without a timer: take everything queued by now. While
        # one commit waits for the disk the next batch gathers, so batches
        # grow with the load and a lone message is committed at once.
        batch = list(first)
        while len(batch) < MAX_BATCH:
            try:
                more = self._ops.get_nowait()
            except queue.Empty:
                break
            if more is None:
                stopping = True
                break
            batch.extend(more)
        # One pass sorts the batch: the writes to apply, the reads to answer
        # after them, the callbacks to hand back. From here on no message of
        # the batch can be withdrawn; one withdrawn before is skipped, with
        # its callback.
        ops: list[Write] = []
        reads: list[Read] = []
        thens: list[Then] = []
        skipped = 0
        with self._withdrawing:
            for op, then in batch:
                if type(op) is StoreMessage:
                    if op.state:
                        skipped += 1
                        continue
                    op.state = TAKEN
                    ops.append(op)
                elif type(op) is Read:
                    reads.append(op)
                elif type(op) not in _CLUSTER_OPS:
                    ops.append(op)  # type: ignore[arg-type]
                if then is not None:
                    thens.append(then)
        self.skipped += skipped
        failures = 0
        failing_since = next_log = 0.0
        started = time.monotonic()
        while ops:
            try:
                self._apply(ops)
                self.commit_seconds.observe(time.monotonic() - started)
                break
            except Exception as exc:
                # Nothing of this batch may be reported durable (and no
                # later batch may commit before it, or a retried SEND's
                # barrier would pass): try the same batch again. One
                # line per FAILURE_LOG_S, not a traceback per attempt:
                # a disk stays full for hours.
                now = time.monotonic()
                if not failures:
                    failing_since = now
                failures += 1
                if now >= next_log:
                    next_log = now + FAILURE_LOG_S
                    self._log_failure(exc, len(ops), now - failing_since)
                if self._closing.wait(RETRY_S):
                    log.error("store closed with %d writes never committed (none of "
                              "them was acknowledged)", len(ops))  # fmt: skip
                    return False
        if failures:
            log.warning("writes to %s commit again after %.1f s and %d failed attempts",
                        self.path, time.monotonic() - failing_since, failures)  # fmt: skip
        # Reads after the commit: each sees every write submitted before it.
        for read in reads:
            read.run(self._answer)
        for then in thens:
            self.done.put(then)
        self.finished += len(batch)
        if thens:  # a batch of lazy writes wakes nobody: nothing waits for it
            self.notify()
        return not stopping

    def _log_failure(self, exc: Exception, waiting: int, failing_for: float) -> None:
        kind, detail = failure_cause(exc, self.data_dir)
        if not kind and not isinstance(exc, (OSError, sqlite3.Error)):
            # Not the disk: a bug, whose traceback is worth a line per interval.
            log.exception("store write failed with %d writes waiting; retrying every %g s",
                          waiting, RETRY_S)  # fmt: skip
            return
        since = f" (for {failing_for:.0f} s)" if failing_for else ""
        log.error("cannot commit to %s%s: %s (%s); %d writes wait, none acknowledged until "
                  "they commit; retrying every %g s", self.path, since, kind or "error",
                  detail, waiting, RETRY_S)  # fmt: skip

    def _apply(self, ops: list[Write]) -> None:
        """One transaction for the batch, one `executemany` per statement.
        Statements run kind by kind in the order the loop's operations depend
        on each other (a message is stored before its receipt deletes it, a
        notice before its acknowledgement drops it), so grouping keeps the
        outcome of applying them one by one. `summary` moves with the rows."""
        accounts: list[tuple[Any, ...]] = []
        messages: list[tuple[Any, ...]] = []
        dedup: list[tuple[Any, ...]] = []
        delivered: list[int] = []
        notices: list[tuple[Any, ...]] = []
        notices_done: list[tuple[Any, ...]] = []
        # user key -> [messages, bytes, notices] to add to its summary row
        counts: dict[str, list[int]] = {}
        reserve: int | None = None
        # Account changes are rare: a new account first drops whatever a
        # deleted one of that name left (before this batch's messages to
        # it); a deletion goes last, after this batch's messages to it.
        fresh: list[str] = []
        updated: list[tuple[Any, ...]] = []
        erased: list[tuple[str, int]] = []
        stamp = self.server_ms()
        groups = _GroupRows()
        for op in ops:
            # The kinds made per message first, by their exact class: a
            # `match` class pattern costs an isinstance and attribute reads
            # per case tried.
            if type(op) is StoreMessage:
                m = op.message
                instance = _i64(m.instance_id)
                messages.append((m.server_msg_id, m.recipient_key, m.sender_key, m.sender,
                                 instance, m.client_seq, m.text, m.sent_ms))  # fmt: skip
                dedup.append((m.sender_key, instance, m.client_seq, m.server_msg_id,
                              m.sent_ms, content_digest(m.recipient_key, m.text),
                              stamp, None))  # fmt: skip
                count = counts.get(m.recipient_key)
                if count is None:
                    count = counts[m.recipient_key] = [0, 0, 0]
                count[0] += 1
                count[1] += len(m.text.encode("utf-8"))
                continue
            if type(op) is StoreDedup:
                for m, delivered_to in op.items:
                    dedup.append((m.sender_key, _i64(m.instance_id), m.client_seq,
                                  m.server_msg_id, m.sent_ms,
                                  content_digest(m.recipient_key, m.text), stamp,
                                  delivered_to))  # fmt: skip
                continue
            if type(op) is MarkDelivered or type(op) is MarkDelivereds:
                marks: Iterable[MarkDelivered] = (
                    op.items if isinstance(op, MarkDelivereds) else (op,)
                )
                for mark in marks:
                    delivered.append(mark.server_msg_id)
                    count = counts.get(mark.recipient_key)
                    if count is None:
                        count = counts[mark.recipient_key] = [0, 0, 0]
                    count[0] -= 1
                    count[1] -= mark.size
                    if not mark.told:
                        notices.append((mark.sender_key, _i64(mark.instance_id),
                                        mark.client_seq, mark.recipient, mark.seq))  # fmt: skip
                        counts.setdefault(mark.sender_key, [0, 0, 0])[2] += 1
                continue
            match op:
                case NoticeDone(sender_key, instance_id, client_seq):
                    notices_done.append((sender_key, _i64(instance_id), client_seq))
                    counts.setdefault(sender_key, [0, 0, 0])[2] -= 1
                case StoreAccount(key, a):
                    fresh.append(key)
                    accounts.append((key, a.name, a.salt, a.iterations, a.stored_key,
                                     a.server_key, int(time.time() * 1000)))  # fmt: skip
                case UpdateAccount(key, a):
                    updated.append((a.salt, a.iterations, a.stored_key, a.server_key, key))
                case EraseAccount(key, until_ms):
                    erased.append((key, until_ms))
                case Reserve(upto):
                    reserve = upto if reserve is None else max(reserve, upto)
                case Sync():
                    pass  # a barrier: its callback runs once everything before it is durable
                case StoreGroupItem():
                    groups.add(op, stamp, dedup)
                case EndGroup(left=StoreGroupItem() as left):  # (its LEFT first, `EndGroup.left`)
                    groups.add(left, stamp, dedup)
                    groups.other(op)
                case _:
                    groups.other(op)
        if delivered and messages:
            # Received before the commit: the mailbox row would be written and
            # deleted in the same transaction; skip both (the dedup row stays).
            gone = set(delivered)
            new = {row[0] for row in messages}
            if not gone.isdisjoint(new):
                messages = [row for row in messages if row[0] not in gone]
                delivered = [i for i in delivered if i not in new]
        save_time = stamp - self._time_saved >= TIME_SAVE_MS or self._closing.is_set()
        db = self._db
        db.execute("BEGIN")
        try:
            if reserve is not None:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('next_block', ?)", (reserve,))
            if save_time:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('server_ms', ?)", (stamp,))
            for key in fresh:
                self._erase_rows(key)
            self._insert("accounts", accounts)
            self._insert("mailbox", messages)
            self._insert("dedup", dedup)
            for part in _chunks(delivered, self._max_rows(1)):
                db.execute(f"DELETE FROM mailbox WHERE server_msg_id IN ({_marks(len(part))})",
                           part)  # fmt: skip
            self._insert("notices", notices)
            # An OR of primary-key lookups (SQLite plans each as an index
            # search); kept short because the parser nests ORs.
            for part in _chunks(notices_done, 100):
                where = " OR ".join(
                    ["(sender_key=? AND instance_id=? AND client_seq=?)"] * len(part)
                )
                db.execute(f"DELETE FROM notices WHERE {where}", _flat(part))
            self._count(counts)
            if updated:
                db.executemany(
                    "UPDATE accounts SET salt=?, iterations=?, stored_key=?, server_key=? "
                    "WHERE name_key=?",
                    updated,
                )
            for key, until_ms in erased:
                db.execute("DELETE FROM accounts WHERE name_key=?", (key,))
                self._erase_rows(key)
                db.execute("INSERT INTO quarantine VALUES (?, ?)", (key, until_ms))
            if groups:
                groups.write(self)
            db.execute("COMMIT")
            self.commits += 1
            if save_time:
                self._time_saved = stamp
        except BaseException:
            # SQLite may have rolled back already (it does on a full disk):
            # a second ROLLBACK would fail and hide why the first one came.
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    def _erase_rows(self, key: str) -> None:
        """Everything kept for user `key` but the account: its mailbox, the
        receipts queued for it, its dedup keys, its counts, its quarantine."""
        for table, column in (("mailbox", "recipient_key"), ("notices", "sender_key"),
                              ("dedup", "sender_key"), ("summary", "user_key"),
                              ("quarantine", "name_key"), ("group_told", "sender_key"),
                              ("group_requests", "user_key")):  # fmt: skip
            self._db.execute(f"DELETE FROM {table} WHERE {column}=?", (key,))

    def _count(self, counts: dict[str, list[int]]) -> None:
        """Add the batch's changes to `summary`; drop rows back to nothing."""
        rows = [(key, *c) for key, c in counts.items() if any(c)]
        for part in _chunks(rows, self._max_rows(4)):
            self._db.execute(
                "INSERT INTO summary VALUES "
                + ",".join(["(?,?,?,?)"] * len(part))
                + " ON CONFLICT (user_key) DO UPDATE SET messages=messages+excluded.messages, "
                "bytes=bytes+excluded.bytes, notices=notices+excluded.notices",
                _flat(part),
            )
        keys = [row[0] for row in rows]
        for part in _chunks(keys, self._max_rows(1)):
            self._db.execute(
                f"DELETE FROM summary WHERE user_key IN ({_marks(len(part))}) "
                "AND messages<=0 AND notices<=0",
                part,
            )

    def _max_rows(self, columns: int) -> int:
        return max(1, min(1000, self._max_variables // columns))

    def _insert(self, table: str, rows: list[tuple[Any, ...]]) -> None:
        """`INSERT OR IGNORE` of many rows in few statements. One statement
        per row (`executemany`) would hand the GIL back and forth with the
        loop thread at every row, and each time the loop is busy this thread
        waits a switch interval (5 ms) for it: commits of a few hundred rows
        took 40 ms. A multi-row VALUES takes it once per statement."""
        if not rows:
            return
        columns = len(rows[0])
        row_marks = f"({_marks(columns)})"
        for part in _chunks(rows, self._max_rows(columns)):
            self._db.execute(
                f"INSERT OR IGNORE INTO {table} VALUES {','.join([row_marks] * len(part))}",
                _flat(part),
            )


class _GroupRows:
    """One batch's group operations as rows, written in the batch's
    transaction (`ServerStore._apply`), a statement per kind of row. The
    order of the statements keeps the outcome of applying the operations
    one by one: a group's row before its members and log, joins before
    leaves (a leave only ends a membership older than itself), cursors
    only grow. An `EndGroup` closes a segment: what came before it is
    written, then the group's rows are deleted, then the rest (a name may
    be taken again at once)."""

    def __init__(self) -> None:
        self.segments: list[_GroupSegment] = [_GroupSegment()]
        self.any = False

    def __bool__(self) -> bool:
        return self.any

    def add(self, op: StoreGroupItem, stamp: int, dedup: list[tuple[Any, ...]]) -> None:
        self.any = True
        self.segments[-1].add(op, stamp, dedup)

    def other(self, op: Op) -> None:
        self.any = True
        if isinstance(op, EndGroup):
            self.segments[-1].end = op
            self.segments.append(_GroupSegment())
        else:
            self.segments[-1].other(op)

    def write(self, store: ServerStore) -> None:
        for segment in self.segments:
            segment.write(store)


class _GroupSegment:
    def __init__(self) -> None:
        self.groups: dict[str, tuple[str, str, int]] = {}  # key -> (name, owner, seq), last wins
        self.log: list[tuple[Any, ...]] = []
        self.joined: list[tuple[Any, ...]] = []
        self.left: list[tuple[Any, ...]] = []
        self.cursors: dict[tuple[str, str], int] = {}
        self.told: dict[tuple[str, str], int] = {}
        self.trims: dict[str, int] = {}
        self.holes: list[tuple[str, int, int]] = []  # (group key, first, upto)
        self.dropped: list[tuple[str, str]] = []
        self.buried: list[tuple[str, str, str]] = []
        self.requests: list[tuple[Any, ...]] = []
        self.end: EndGroup | None = None  # written last

    def add(self, op: StoreGroupItem, stamp: int, dedup: list[tuple[Any, ...]]) -> None:
        item = op.item
        self.groups[item.group_key] = (op.name, op.owner_key, item.group_seq)
        instance = _i64(item.instance_id)
        self.log.append((item.group_key, item.group_seq, item.server_msg_id, item.change,
                         item.sender_key, item.sender, instance, item.client_seq, item.text,
                         "\n".join(item.users), item.sent_ms, item.recipients))  # fmt: skip
        if not item.change:
            digest = content_digest(GROUP_DEDUP_PREFIX + item.group_key, item.text)
            dedup.append((item.sender_key, instance, item.client_seq, item.server_msg_id,
                          item.sent_ms, digest, stamp, None))  # fmt: skip
        for row in op.kept:
            self.joined.append(member_values(item.group_key, row))
        for key, name, rank in op.joined:
            self.joined.append((item.group_key, key, name, item.group_seq, rank, None,
                                item.group_seq - 1, ""))  # fmt: skip
        for key in op.left:
            self.left.append((item.group_seq, item.group_key, key, item.group_seq))
        if op.request is not None:
            self.request(op.request)

    def request(self, request: tuple[RequestKey, int, str]) -> None:
        (user_key, instance_id, request_id), code, message = request
        self.requests.append((user_key, _i64(instance_id), _i64(request_id), code, message))

    def other(self, op: Op) -> None:
        match op:
            case GroupReceipt(group_key, member_key, seq):
                key = (group_key, member_key)
                self.cursors[key] = max(seq, self.cursors.get(key, seq))
            case GroupTold(sender_key, group_key, seq):
                key = (sender_key, group_key)
                self.told[key] = max(seq, self.told.get(key, seq))
            case TrimGroup(group_key, upto, first):
                if first:
                    self.holes.append((group_key, first, upto))
                else:
                    self.trims[group_key] = max(upto, self.trims.get(group_key, upto))
            case DropMember(group_key, member_key):
                self.dropped.append((group_key, member_key))
            case BuryMember(group_key, member_key, tomb_key):
                self.buried.append((tomb_key, group_key, member_key))

    def write(self, store: ServerStore) -> None:
        db = store._db
        if self.groups:
            db.executemany(
                "INSERT INTO groups VALUES (?,?,?,?) ON CONFLICT (group_key) DO UPDATE SET "
                "owner_key=excluded.owner_key, seq=MAX(seq, excluded.seq)",
                [(key, *row) for key, row in self.groups.items()],
            )
        store._insert("group_log", self.log)
        if self.joined:  # one added again after a removal: a new membership
            db.executemany("INSERT OR REPLACE INTO group_members VALUES (?,?,?,?,?,?,?,?)",
                           self.joined)  # fmt: skip
        if self.left:
            db.executemany("UPDATE group_members SET left_seq=? WHERE group_key=? AND "
                           "member_key=? AND joined_seq<?", self.left)  # fmt: skip
        # Multi-row statements, not `executemany` (see `ServerStore._insert`:
        # a statement per row hands the GIL to the loop at every row): a
        # message to a group of 1,000 moves 999 cursors.
        by_group: dict[str, list[tuple[str, int]]] = {}
        for (group_key, member_key), seq in self.cursors.items():
            by_group.setdefault(group_key, []).append((member_key, seq))
        for group_key, moves in by_group.items():
            for part in _chunks(moves, store._max_rows(3)):
                cases = " ".join(["WHEN ? THEN ?"] * len(part))
                db.execute(
                    f"UPDATE group_members SET cursor=MAX(cursor, CASE member_key {cases} END) "
                    f"WHERE group_key=? AND member_key IN ({_marks(len(part))})",
                    [*_flat(part), group_key, *(member for member, _ in part)],
                )
        if self.told:  # only for a group that exists (one ended in this batch has none)
            db.executemany(
                "INSERT INTO group_told SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM groups WHERE "
                "group_key=?2) ON CONFLICT (sender_key, group_key) DO UPDATE SET "
                "seq=MAX(seq, excluded.seq)",
                [(sender, group, seq) for (sender, group), seq in self.told.items()],
            )
        for group_key, upto in self.trims.items():
            db.execute("DELETE FROM group_log WHERE group_key=? AND group_seq<=?",
                       (group_key, upto))  # fmt: skip
        if self.holes:
            db.executemany("DELETE FROM group_log WHERE group_key=? AND group_seq BETWEEN ? AND ?",
                           self.holes)  # fmt: skip
        if self.buried:
            db.executemany("UPDATE group_members SET member_key=? WHERE group_key=? AND "
                           "member_key=? AND left_seq IS NOT NULL", self.buried)  # fmt: skip
        if self.dropped:
            db.executemany("DELETE FROM group_members WHERE group_key=? AND member_key=? AND "
                           "left_seq IS NOT NULL", self.dropped)  # fmt: skip
        if self.end is not None:
            old, keep_as = self.end.group_key, self.end.keep_as
            if keep_as:  # retired: former members' rows, the log, the marks stay, re-keyed
                db.execute("DELETE FROM group_members WHERE group_key=? AND left_seq IS NULL",
                           (old,))  # fmt: skip
                db.executemany("INSERT OR REPLACE INTO group_members VALUES (?,?,?,?,?,?,?,?)",
                               [member_values(old, row) for row in self.end.kept])  # fmt: skip
                for table in ("groups", "group_members", "group_log", "group_told"):
                    db.execute(f"UPDATE {table} SET group_key=? WHERE group_key=?", (keep_as, old))
            for table in ("groups", "group_members", "group_log", "group_told"):
                db.execute(f"DELETE FROM {table} WHERE group_key=?", (old,))
            if self.end.last_seq:  # the name's mark, for a group made again under it
                db.execute(
                    "INSERT INTO group_names VALUES (?, ?) ON CONFLICT (group_key) DO UPDATE"
                    " SET last_seq=MAX(last_seq, excluded.last_seq)",
                    (old, self.end.last_seq),
                )
            if self.end.request is not None:
                self.request(self.end.request)
        if self.requests:
            store._insert("group_requests", self.requests)
            db.executemany(
                "DELETE FROM group_requests WHERE user_key=? AND instance_id=? AND request_id<=?",
                [(u, i, r - GROUP_REQUESTS_KEPT) for u, i, r, _, _ in self.requests],
            )


def pack_ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    """A member's earlier memberships as stored ("first-last,first-last")."""
    return ",".join(f"{first}-{last}" for first, last in ranges)


def unpack_ranges(text: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    for part in text.split(",") if text else ():
        first, _, last = part.partition("-")
        ranges.append((int(first), int(last)))
    return tuple(ranges)


def member_values(group_key: str, row: LoadedMember) -> tuple[Any, ...]:
    """A `group_members` row of a member written whole."""
    return (group_key, row.key, row.name, row.joined_seq, row.rank, row.left_seq, row.cursor,
            pack_ranges(row.earlier))  # fmt: skip


def _migrate(db: sqlite3.Connection, *, new_summary: bool) -> None:
    """Bring a data directory of an earlier version up to this schema (once)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(group_members)")}
    if "earlier" not in columns:
        db.execute("ALTER TABLE group_members ADD COLUMN earlier TEXT NOT NULL DEFAULT ''")
    columns = {row[1] for row in db.execute("PRAGMA table_info(dedup)")}
    if "digest" not in columns:
        # Old keys get no digest (any content counts as a retry, as before)
        # and age from this run on.
        db.execute("ALTER TABLE dedup ADD COLUMN digest BLOB")
        db.execute("ALTER TABLE dedup ADD COLUMN server_ms INTEGER NOT NULL DEFAULT 0")
    if "delivered_to" not in columns:  # (after the two above: columns in the table's order)
        db.execute("ALTER TABLE dedup ADD COLUMN delivered_to TEXT")
    columns = {row[1] for row in db.execute("PRAGMA table_info(notices)")}
    if "seq" not in columns:
        db.execute("ALTER TABLE notices ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")
        # Old receipts are paged by seq too: number them, below any new one.
        keys = db.execute("SELECT sender_key, instance_id, client_seq FROM notices").fetchall()
        db.execute("BEGIN")
        db.executemany(
            "UPDATE notices SET seq=? WHERE sender_key=? AND instance_id=? AND client_seq=?",
            [(i - len(keys), *key) for i, key in enumerate(keys)],
        )
        db.execute("COMMIT")
    if new_summary:
        db.execute(
            "INSERT INTO summary SELECT user_key, SUM(m), SUM(b), SUM(n) FROM ("
            "SELECT recipient_key AS user_key, COUNT(*) AS m, SUM(LENGTH(CAST(text AS BLOB))) AS b,"
            " 0 AS n FROM mailbox GROUP BY recipient_key UNION ALL "
            "SELECT sender_key, 0, 0, COUNT(*) FROM notices GROUP BY sender_key) GROUP BY user_key"
        )


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _flat(rows: list[tuple[Any, ...]]) -> list[Any]:
    return [value for row in rows for value in row]
