"""The client's durable store: outbox, history and instance id of one
(server, username), in SQLite in the user's data directory.

Split from `chat_client.py` by responsibility. The session's network thread
is the only writer: a message goes into the outbox (committed with
`synchronous=FULL`) before it is first sent. An incoming message is
committed to the history with `shown=0` before the front end sees it; the
front end shows it and says so, the history records `shown=1`, and only then
does its receipt go out, which is what lets the server forget it (and the
sender see `delivered`). What a crash left committed but not shown is shown
at the next start (`unshown`). A window reads the history through its own
connection (`read_history` and its neighbours), which WAL allows beside the
writer.

Histories of any length: the window reads pages (`read_history` with
`before`, `read_around`), the contact list (`read_contacts`), and searches
the whole history (`search_history`) through an FTS5 table, `history_fts`,
kept in step with `history` by triggers and built for an older store when it
is opened. Its tokenizer is `trigram` (case-insensitive): Find looks for a
piece of text anywhere, not for whole words, so "eed" finds "Needle".

The store is locked by the process that opened it. A second process for
the same user gets `locked=True`: it uses a fresh instance id and leaves the
outbox alone, so two processes never send the same message ids. A store
that was copied or restored (its database is not the file it was created
as) also takes a fresh instance id: see `_check_identity`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from client_core import Arrival, GroupChanged, MessageState, StoredMessage
from common import LockHeld, data_dir, i64, lock_file, u64
from protocol import MsgId, group_address, is_group_address, name_key

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    instance_id INTEGER NOT NULL, client_seq INTEGER NOT NULL, to_name TEXT NOT NULL,
    text TEXT NOT NULL, created_ms INTEGER NOT NULL, waiting INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (instance_id, client_seq)
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, peer_key TEXT NOT NULL, peer TEXT NOT NULL,
    outgoing INTEGER NOT NULL, text TEXT NOT NULL, ts_ms INTEGER NOT NULL,
    sender_key TEXT NOT NULL, instance_id INTEGER NOT NULL, client_seq INTEGER NOT NULL,
    state TEXT, server_msg_id INTEGER, shown INTEGER NOT NULL DEFAULT 1,
    UNIQUE (outgoing, sender_key, instance_id, client_seq)
);
CREATE INDEX IF NOT EXISTS history_peer ON history (peer_key, id);
CREATE TABLE IF NOT EXISTS server_key (id INTEGER PRIMARY KEY CHECK (id = 1), dh_public BLOB);
CREATE TABLE IF NOT EXISTS identity (
    id INTEGER PRIMARY KEY CHECK (id = 1), dev INTEGER NOT NULL, ino INTEGER NOT NULL,
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS login_ticket (instance_id INTEGER PRIMARY KEY, ticket BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS group_lives (
    peer_key TEXT NOT NULL, life INTEGER NOT NULL, received INTEGER NOT NULL,
    last_received INTEGER NOT NULL, joined_seq INTEGER, exit_seq INTEGER,
    PRIMARY KEY (peer_key, life)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_receipts (
    instance_id INTEGER NOT NULL, client_seq INTEGER NOT NULL, by_key TEXT NOT NULL,
    by_name TEXT NOT NULL, PRIMARY KEY (instance_id, client_seq, by_key)
);
"""
# Added after the first release: stores made before get them on open. Rows
# from then were shown when they arrived (DEFAULT 1).
HISTORY_COLUMNS = {
    "server_msg_id": "ALTER TABLE history ADD COLUMN server_msg_id INTEGER",
    "shown": "ALTER TABLE history ADD COLUMN shown INTEGER NOT NULL DEFAULT 1",
    # Groups (issue 14). A group's rows have `peer` '#team' and `grp` 'team';
    # `grp_seq` is the row's place in the group's one order. A membership
    # change is a row of its own (`grp_change`, `grp_users` as JSON, `text`
    # in words), keyed by the server's id (`instance_id` 0, `client_seq` the
    # server's id). Our group messages get `grp_recipients` (the N of
    # "delivered 2 of N") when accepted; who has them is `group_receipts`.
    "grp": "ALTER TABLE history ADD COLUMN grp TEXT",
    "grp_seq": "ALTER TABLE history ADD COLUMN grp_seq INTEGER",
    "grp_sender": "ALTER TABLE history ADD COLUMN grp_sender TEXT",
    "grp_change": "ALTER TABLE history ADD COLUMN grp_change TEXT",
    "grp_users": "ALTER TABLE history ADD COLUMN grp_users TEXT",
    "grp_recipients": "ALTER TABLE history ADD COLUMN grp_recipients INTEGER",
    # Which life of the group's name the row is of (see `group_place`): 0
    # for the first this store saw, rows from before included.
    "grp_life": "ALTER TABLE history ADD COLUMN grp_life INTEGER NOT NULL DEFAULT 0",
    # Our messages' timeline for the window's health view (`read_timeline`):
    # when the server accepted it, when it was delivered, how often it went
    # out again. NULL/0 on rows from before.
    "accepted_ms": "ALTER TABLE history ADD COLUMN accepted_ms INTEGER",
    "delivered_ms": "ALTER TABLE history ADD COLUMN delivered_ms INTEGER",
    "resends": "ALTER TABLE history ADD COLUMN resends INTEGER NOT NULL DEFAULT 0",
    # Why our message failed (`set_failure`): its reason's code and the
    # server's words, so a failed line says why after a restart too ("✗
    # failed" alone before). NULL on rows from before, and for other states.
    "fail_reason": "ALTER TABLE history ADD COLUMN fail_reason TEXT",
    "fail_detail": "ALTER TABLE history ADD COLUMN fail_detail TEXT",
}
# `waiting`: the server has no account of the recipient's name yet (the
# message goes once it has); stores from before wait for nothing.
OUTBOX_COLUMNS = {
    "waiting": "ALTER TABLE outbox ADD COLUMN waiting INTEGER NOT NULL DEFAULT 0",
}
# After the columns exist: `mark_shown` finds a row by the server's id, and
# `_taken` whether a life of a group has a row at a seq.
INDEXES = """
CREATE INDEX IF NOT EXISTS history_server_id ON history (server_msg_id);
CREATE INDEX IF NOT EXISTS history_group_place ON history (peer_key, grp_life, grp_seq)
WHERE grp_seq > 0;
"""
# The search index over every stored text (an external-content FTS5 table:
# the text is kept once, in `history`). The triggers keep it in step; a
# store from before it gets it built on open (`rebuild`).
FTS_TABLE = (
    "CREATE VIRTUAL TABLE history_fts USING fts5(text, content='history', content_rowid='id',"
    " tokenize='trigram case_sensitive 0')"
)
FTS_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS history_fts_insert AFTER INSERT ON history BEGIN
    INSERT INTO history_fts (rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS history_fts_delete AFTER DELETE ON history BEGIN
    INSERT INTO history_fts (history_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TRIGGER IF NOT EXISTS history_fts_update AFTER UPDATE OF text ON history BEGIN
    INSERT INTO history_fts (history_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO history_fts (rowid, text) VALUES (new.id, new.text);
END;
"""
# The contact list at login: one row per peer with its last line, kept by a
# trigger, so reading it costs the number of contacts, not of messages
# (a GROUP BY over 100,000 rows took 340 ms cold). Filled on open for a
# store made before it.
PEERS_TABLE = """
CREATE TABLE IF NOT EXISTS history_peers (
    peer_key TEXT PRIMARY KEY, peer TEXT NOT NULL, last_id INTEGER NOT NULL,
    last_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS history_peers_last ON history_peers (last_id);
CREATE TRIGGER IF NOT EXISTS history_peers_insert AFTER INSERT ON history BEGIN
    INSERT INTO history_peers VALUES (new.peer_key, new.peer, new.id, new.ts_ms)
    ON CONFLICT (peer_key) DO UPDATE SET peer=excluded.peer, last_id=excluded.last_id,
        last_ms=excluded.last_ms WHERE excluded.last_id > history_peers.last_id;
END;
CREATE TRIGGER IF NOT EXISTS history_peers_delete AFTER DELETE ON history BEGIN
    DELETE FROM history_peers WHERE peer_key = old.peer_key;
    INSERT INTO history_peers SELECT peer_key, peer, id, ts_ms FROM history
    WHERE peer_key = old.peer_key ORDER BY id DESC LIMIT 1;
END;
"""
PEERS_FILL = """
INSERT OR REPLACE INTO history_peers
SELECT h.peer_key, h.peer, h.id, h.ts_ms
FROM (SELECT MAX(id) AS last FROM history GROUP BY peer_key) AS m JOIN history AS h ON h.id = m.last
"""
#: The trigram tokenizer indexes runs of 3 characters: a shorter needle is
#: looked for by reading the conversation's rows.
FTS_MIN_NEEDLE = 3
#: Rows shown per page of a conversation (the window loads more on scrolling up).
PAGE = 200


def store_dir(server: str, username: str, root: Path | None = None) -> Path:
    """Where one (server, username) keeps its outbox and history."""

    def safe(text: str) -> str:
        return re.sub(r"[^\w.-]", "_", text)

    return (root or data_dir() / "client") / safe(server) / safe(name_key(username))


def profile_dir(
    server: str, spelled: str, username: str, root: Path | None = None
) -> tuple[Path, bool]:
    """Where one (server, username) keeps its outbox and history, and whether
    it is new: named by `server`, the canonical form of the address the
    client resolved (`common.canonical_address`), so `localhost:5555` and
    `127.0.0.1:5555` share it. A profile an earlier version made under the
    address as typed (`spelled`) is moved there, unless a process holds it
    (then it is used where it is); the canonical one wins if both exist."""
    directory = store_dir(server, username, root)
    if directory.exists():
        return directory, False
    legacy = store_dir(spelled, username, root)
    if legacy == directory or not legacy.exists():
        return directory, True
    try:
        lock = lock_file(legacy / "client.lock")
    except (LockHeld, OSError):
        return legacy, False  # in use by another process: look it up there
    try:
        directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        legacy.rename(directory)
    except OSError:
        return legacy, False
    finally:
        lock.close()
    with contextlib.suppress(OSError):
        legacy.parent.rmdir()  # the old server folder, if that was its only user
    # Moved, not copied (same file): record its new path, or it would take
    # itself for a copy and a fresh instance id (see `_check_identity`).
    path = directory / "client.db"
    if path.exists():
        db = sqlite3.connect(path, isolation_level=None)
        try:
            with contextlib.suppress(sqlite3.Error):
                db.execute("UPDATE identity SET path=? WHERE id=1", (str(path.resolve()),))
        finally:
            db.close()
    return directory, False


@dataclass(frozen=True)
class Timeline:
    """One of our messages through time (`read_timeline`): wall-clock ms,
    None for a state not reached (or not recorded: rows from before)."""

    state: str | None
    sent_ms: int  # written to the outbox (the moment Send was pressed)
    accepted_ms: int | None
    delivered_ms: int | None
    resends: int  # pieces of it sent again (lost, or their ack was)


@dataclass(slots=True)
class _Life:
    """One life of a group's name as this store knows it (`group_lives`)."""

    received: bool  # an entry of it came (else: only our messages are of it)
    last: int  # the seq of the last entry that came (they come in order)
    joined: int | None  # the entry that added us, if one came
    exit: int | None  # the entry that removed us or said we left, if one came
    ours: set[int] | None = None  # our messages' seqs above `last` (`_ours_above`)


@dataclass(frozen=True)
class HistoryLine:
    peer: str
    outgoing: bool
    text: str
    ts_ms: int
    msg_id: str
    state: str | None
    row_id: int = 0  # its row in the store: where earlier pages and search hits start
    sender: str | None = None  # a group's line: who sent it, or made the change
    change: str | None = None  # a group's membership change (`text` says it in words)
    seq: int = 0  # a group's line: its place in the group's order (0: ours, not accepted yet)
    life: int = 0  # a group's line: which group of the name (`group_place`)
    reason: str | None = None  # ours, failed: its reason's code (None: not recorded)
    detail: str = ""  # ours, failed: the server's words for why


def group_place(life: int, seq: int) -> int:
    """A group line's place across the lives of its name, for `goes_before`
    and `goes_above`: a group that ended and was made again (anyone may
    create the name then) numbers from 1 again, so a client that holds rows
    of both orders them by life first (the later life below), then by seq.
    0 for ours not numbered yet (`sending`)."""
    return (life << 64) | seq if seq > 0 else 0


def goes_before(seq: int, later: list[int]) -> int:
    """How many of the lines after our group message (their group seqs,
    oldest first; 0 for one not numbered yet: ours still `sending`) go
    before it now that the server put it at `seq`: up to and with the last
    one numbered below it. 0: it stays where it is. (Across lives, `seq`
    and `later` are `group_place`s.)"""
    ahead = 0
    for index, other in enumerate(later):
        if 0 < other < seq:
            ahead = index + 1
    return ahead


def goes_above(seq: int, earlier: Iterable[tuple[bool, int]]) -> int:
    """How many of the lines before a group's entry just come (newest first:
    whether each is ours, and its group seq, 0 for ours not numbered yet)
    go after it, numbered `seq`: our messages the server numbered after it
    (it accepted them before this entry reached us) and the lines after the
    first of them. Only the run of our own lines at the end is looked at:
    another's line, or ours numbered before it, ends it. 0: it stays last."""
    behind = 0
    for index, (ours, other) in enumerate(earlier):
        if not ours or 0 < other < seq:
            break
        if other > seq:
            behind = index + 1
    return behind


def ensure_search_index(db: sqlite3.Connection) -> bool:
    """Create the FTS5 table and its triggers if missing (building the index
    over the rows already stored); False if this SQLite has no FTS5, when
    search reads the rows instead."""
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='history_fts'"
    ).fetchone()
    try:
        if exists is None:
            db.execute("BEGIN")
            db.execute(FTS_TABLE)
            db.execute("INSERT INTO history_fts (history_fts) VALUES ('rebuild')")
            db.execute("COMMIT")
        db.executescript(FTS_TRIGGERS)
    except sqlite3.OperationalError:
        if db.in_transaction:
            db.execute("ROLLBACK")
        return False  # "no such module: fts5"
    return True


def fold(text: str) -> str:
    """Text for a case-insensitive comparison (Python's, never Tk's)."""
    return text.casefold()


def find_folded(haystack: str, needle: str) -> list[tuple[int, int]]:
    """Where `needle` occurs in `haystack` ignoring case, as (start, end)
    indexes into `haystack`. Folding may change a string's length (German
    sharp s folds to "ss"), so the folded text keeps a map back to the
    original characters."""
    target = fold(needle)
    if not target:
        return []
    if haystack.isascii():  # folding keeps every position: search in C
        flat, found = fold(haystack), []
        start = flat.find(target)
        while start >= 0:
            found.append((start, start + len(target)))
            start = flat.find(target, start + len(target))
        return found
    folded: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(haystack):
        part = fold(ch)
        folded.append(part)
        origin.extend([i] * len(part))
    flat = "".join(folded)
    found = []
    start = flat.find(target)
    while start >= 0:
        end = start + len(target)
        found.append((origin[start], origin[end - 1] + 1))
        start = flat.find(target, end)
    return found


class ClientStore:
    """Opened by `ChatSession.login`; written only by its network thread."""

    def __init__(self, directory: Path, username: str) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = directory
        self.username = username
        self.path = directory / "client.db"
        self._lock: IO[bytes] | None
        try:
            self._lock = lock_file(directory / "client.lock")
            self.locked = False
        except LockHeld:
            self._lock = None
            self.locked = True  # another process is this user here: stay out of its outbox
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        lives_made = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE name='group_lives'"
        ).fetchone()
        self.db.executescript(SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(history)")}
        for name, statement in HISTORY_COLUMNS.items():
            if name not in columns:
                self.db.execute(statement)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(outbox)")}
        for name, statement in OUTBOX_COLUMNS.items():
            if name not in columns:
                self.db.execute(statement)
        self.db.executescript(INDEXES)
        self.searchable = ensure_search_index(self.db)
        peers_made = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE name='history_peers'"
        ).fetchone()
        self.db.executescript(PEERS_TABLE)
        if peers_made is None:
            self.db.execute(PEERS_FILL)
        self._lives: dict[str, dict[int, _Life]] = {}  # by group (peer key): `_lives_of`
        if lives_made is None:
            self._fill_lives()
        # The life of a group the entry stored or the message accepted last
        # went in (`group_place`); the core hands it on in the event.
        self.last_life = 0
        copied = not self.locked and self._check_identity()
        row = self.db.execute("SELECT value FROM meta WHERE key='instance_id'").fetchone()
        if row is None or self.locked or copied:
            self.instance_id = secrets.randbits(64)
            if not self.locked:
                self.db.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [("instance_id", i64(self.instance_id)), ("next_seq", 1)],
                )
            self.next_seq = 1
        else:
            self.instance_id = u64(row[0])
            row = self.db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
            self.next_seq = int(row[0]) if row else 1
        self._in_tx = False
        row = self.db.execute("SELECT value FROM meta WHERE key='next_request'").fetchone()
        self._next_request = int(row[0]) if row is not None and not self.locked else 1
        # History up to here is from earlier runs; what comes later reaches
        # the window as events, so it must not be read back twice.
        row = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM history").fetchone()
        self.history_mark = int(row[0])

    def _check_identity(self) -> bool:
        """True if this database was copied or restored: it is not the file
        (device, inode, path) it recorded when it was made. Then it takes a
        fresh instance id, because its `next_seq` is the original's: the
        original (or, after a restore, the run before the backup was lost)
        goes on numbering from the same point, and the server's dedup key
        (user, instance, seq) would take each new message here for one it
        already holds and drop it. A fresh id is always safe; the only cost
        of a false alarm is a new instance.

        The outbox keeps its rows under their old ids: each was written
        before the copy, so under that id the server holds either nothing
        or this very text. Sent again, it is accepted once, or recognised as
        the retry it is (given new ids, a message the original had already
        sent would be delivered twice). A restore that puts back the same
        inode at the same path (a file-system snapshot) is not seen here; the
        server's content check on the dedup key is the net for that."""
        stat = os.stat(self.path)
        path = str(self.path.resolve())
        row = self.db.execute("SELECT dev, ino, path FROM identity WHERE id=1").fetchone()
        if row is not None and tuple(row) == (i64(stat.st_dev), i64(stat.st_ino), path):
            return False
        self.db.execute(
            "INSERT OR REPLACE INTO identity VALUES (1, ?, ?, ?)",
            (i64(stat.st_dev), i64(stat.st_ino), path),
        )
        # A store from before this check has no record: take it as the original.
        return row is not None

    # --- writes (network thread) ------------------------------------------

    def begin(self) -> None:
        if not self._in_tx:
            # IMMEDIATE: the write lock now, waited for (busy_timeout) while
            # another session of this user holds it. A deferred transaction
            # that reads before it writes is refused its write at once,
            # unwaited ("database is locked"), if that other session
            # committed in between (tests/test_store_two_writers.py).
            self.db.execute("BEGIN IMMEDIATE")
            self._in_tx = True

    def commit(self) -> None:
        """One fsync for everything since `begin` (group commit per loop pass)."""
        if self._in_tx:
            self.db.execute("COMMIT")
            self._in_tx = False

    def add_outgoing(self, msg_id: MsgId, to: str, text: str) -> None:
        self.begin()
        now_ms = int(time.time() * 1000)
        # A group message is typed into the group's latest life (where it is
        # accepted may be a later one: `_accept_life`).
        life = self._latest_life(name_key(to)) if is_group_address(to) else 0
        if not self.locked:
            self.db.execute(
                "INSERT OR IGNORE INTO outbox (instance_id, client_seq, to_name, text, created_ms)"
                " VALUES (?, ?, ?, ?, ?)",
                (i64(msg_id.instance_id), msg_id.client_seq, to, text, now_ms),
            )
            self.db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (msg_id.client_seq + 1,)
            )
        self.db.execute(
            "INSERT OR IGNORE INTO history (peer_key, peer, outgoing, text, ts_ms, sender_key,"
            " instance_id, client_seq, state, grp_life) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?)",
            (name_key(to), to, text, now_ms, name_key(self.username),
             i64(msg_id.instance_id), msg_id.client_seq, MessageState.SENDING.value, life),
        )  # fmt: skip

    def state_of(self, msg_id: MsgId) -> str | None:
        """The state recorded for one of our messages (None: not here)."""
        row = self.db.execute(
            "SELECT state FROM history WHERE outgoing=1 AND sender_key=? AND instance_id=? "
            "AND client_seq=?",
            (name_key(self.username), i64(msg_id.instance_id), msg_id.client_seq),
        ).fetchone()
        return None if row is None else row[0]

    def set_state(self, msg_id: MsgId, state: str) -> None:
        """Record a later state, stamped with the time (the health view's
        timeline); the outbox lets go once the server holds it. `delivered`
        without `accepted` before it stamps both (the receipt came first)."""
        self.begin()
        now_ms = int(time.time() * 1000)
        accepted = now_ms if state in (MessageState.ACCEPTED, MessageState.DELIVERED) else None
        delivered = now_ms if state == MessageState.DELIVERED else None
        self.db.execute(
            "UPDATE history SET state=?, accepted_ms=COALESCE(accepted_ms, ?),"
            " delivered_ms=COALESCE(delivered_ms, ?)"
            " WHERE sender_key=? AND instance_id=? AND client_seq=?",
            (str(state), accepted, delivered, name_key(self.username),
             i64(msg_id.instance_id), msg_id.client_seq),
        )  # fmt: skip
        if state != MessageState.SENDING:
            self.db.execute(
                "DELETE FROM outbox WHERE instance_id=? AND client_seq=?",
                (i64(msg_id.instance_id), msg_id.client_seq),
            )

    def set_failure(self, msg_id: MsgId, reason: str, detail: str) -> None:
        """Why our message failed (with its `failed` state): kept for the
        line's words and hover after a restart."""
        self.begin()
        self.db.execute(
            "UPDATE history SET fail_reason=?, fail_detail=?"
            " WHERE sender_key=? AND instance_id=? AND client_seq=?",
            (reason, detail, name_key(self.username), i64(msg_id.instance_id),
             msg_id.client_seq),
        )  # fmt: skip

    def add_resends(self, msg_id: MsgId, count: int) -> None:
        self.begin()
        self.db.execute(
            "UPDATE history SET resends=resends+? WHERE outgoing=1 AND sender_key=?"
            " AND instance_id=? AND client_seq=?",
            (count, name_key(self.username), i64(msg_id.instance_id), msg_id.client_seq),
        )

    def _arrival(self, inserted: bool, sender: str, msg_id: MsgId) -> Arrival:
        """What became of a received message just offered to the history:
        new, or the copy already here, shown or not."""
        if inserted:
            return "new"
        row = self.db.execute(
            "SELECT shown FROM history WHERE outgoing=0 AND sender_key=? AND instance_id=? "
            "AND client_seq=?",
            (name_key(sender), i64(msg_id.instance_id), msg_id.client_seq),
        ).fetchone()
        return "shown" if row is not None and row[0] else "unshown"

    def add_incoming(
        self, sender: str, msg_id: MsgId, text: str, sent_ms: int, server_msg_id: int
    ) -> Arrival:
        """Store a received message, not shown yet; or say what became of
        the copy already here (a retransmission, or a delivery again after
        a crash)."""
        self.begin()
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO history (peer_key, peer, outgoing, text, ts_ms, sender_key,"
            " instance_id, client_seq, state, server_msg_id, shown)"
            " VALUES (?, ?, 0, ?, ?, ?, ?, ?, NULL, ?, 0)",
            (name_key(sender), sender, text, sent_ms, name_key(sender),
             i64(msg_id.instance_id), msg_id.client_seq, server_msg_id),
        )  # fmt: skip
        return self._arrival(cursor.rowcount == 1, sender, msg_id)

    def mark_shown(self, server_msg_id: int) -> bool:
        """Record that the front end showed this message; False if it is not here.

        Outside the pass's transaction this commits at once without an
        fsync (`synchronous=NORMAL`: it survives the process dying, not a
        power cut). The terminal waits for each mark before it prints the
        next message: with an fsync per mark a backlog of 1,000 took 1.5 s
        to print, without 0.2-0.35 s (0.06 s when nothing was marked).
        Losing a mark only shows the message once more at the next start."""
        sql = "UPDATE history SET shown=1 WHERE server_msg_id=? AND outgoing=0"
        if self._in_tx:
            return self.db.execute(sql, (server_msg_id,)).rowcount > 0
        self.db.execute("PRAGMA synchronous=NORMAL")  # not allowed inside a transaction
        try:
            return self.db.execute(sql, (server_msg_id,)).rowcount > 0
        finally:
            self.db.execute("PRAGMA synchronous=FULL")

    def unshown(self) -> list[StoredMessage]:
        """What was committed but never shown (the process ended between
        the two), per conversation in the server's order. A second process
        (`locked`) leaves these to the one that holds the store."""
        if self.locked:
            return []
        rows = self.db.execute(
            "SELECT peer, instance_id, client_seq, text, ts_ms, server_msg_id, grp, grp_seq,"
            " grp_sender, grp_change, grp_users, grp_life FROM history"
            " WHERE outgoing=0 AND shown=0 ORDER BY server_msg_id, id"
        ).fetchall()
        return [
            StoredMessage(peer if group is None else sender, MsgId(u64(i), s), text, ts,
                          server_id, group, seq or 0, change, tuple(json.loads(users or "[]")),
                          life)
            for peer, i, s, text, ts, server_id, group, seq, sender, change, users, life in rows
        ]  # fmt: skip

    def pending(self) -> list[tuple[MsgId, str, str]]:
        """What was sent from this store that the server has not accepted,
        in the order it was written (after a copy, some rows carry the
        original's instance id: see `_check_identity`)."""
        if self.locked:
            return []
        rows = self.db.execute(
            "SELECT instance_id, client_seq, to_name, text FROM outbox ORDER BY rowid"
        ).fetchall()
        return [(MsgId(u64(i), s), to, text) for i, s, to, text in rows]

    def set_waiting(self, msg_id: MsgId, waiting: bool) -> None:
        """Record whether an outbox message waits for its recipient's account."""
        if self.locked:
            return
        self.begin()
        self.db.execute(
            "UPDATE outbox SET waiting=? WHERE instance_id=? AND client_seq=?",
            (int(waiting), i64(msg_id.instance_id), msg_id.client_seq),
        )

    def waiting(self) -> set[MsgId]:
        """The outbox messages that wait for their recipient's account."""
        if self.locked:
            return set()
        rows = self.db.execute("SELECT instance_id, client_seq FROM outbox WHERE waiting=1")
        return {MsgId(u64(i), s) for i, s in rows}

    def server_key(self) -> bytes | None:
        """The server's key this user saw at its first login here (pinned)."""
        row = self.db.execute("SELECT dh_public FROM server_key WHERE id=1").fetchone()
        return bytes(row[0]) if row is not None else None

    def pin_server_key(self, dh_public: bytes) -> None:
        self.begin()
        self.db.execute("INSERT OR IGNORE INTO server_key VALUES (1, ?)", (dh_public,))

    def ticket(self) -> bytes | None:
        """The server's login ticket for this instance id, if it gave one."""
        row = self.db.execute(
            "SELECT ticket FROM login_ticket WHERE instance_id=?", (i64(self.instance_id),)
        ).fetchone()
        return bytes(row[0]) if row is not None else None

    def keep_ticket(self, ticket: bytes) -> None:
        if self.locked:  # a one-off instance (another process holds the store)
            return
        self.begin()
        self.db.execute(
            "INSERT OR REPLACE INTO login_ticket VALUES (?, ?)", (i64(self.instance_id), ticket)
        )

    # --- groups (network thread) --------------------------------------------

    def add_group_message(
        self, group: str, sender: str, msg_id: MsgId, text: str, sent_ms: int,
        server_msg_id: int, group_seq: int,
    ) -> Arrival:  # fmt: skip
        """Store a group message, not shown yet (see `add_incoming`), in
        the life of the group it is of (`_arrival_life`, `last_life`)."""
        self.begin()
        peer = group_address(group)
        peer_key = name_key(peer)
        life = self.last_life = self._arrival_life(peer_key, group_seq, None, sender, ())
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO history (peer_key, peer, outgoing, text, ts_ms, sender_key,"
            " instance_id, client_seq, state, server_msg_id, shown, grp, grp_seq, grp_sender,"
            " grp_life) VALUES (?, ?, 0, ?, ?, ?, ?, ?, NULL, ?, 0, ?, ?, ?, ?)",
            (peer_key, peer, text, sent_ms, name_key(sender), i64(msg_id.instance_id),
             msg_id.client_seq, server_msg_id, group, group_seq, sender, life),
        )  # fmt: skip
        if cursor.rowcount == 1 and cursor.lastrowid is not None:
            self._note_entry(peer_key, life, group_seq, None, sender, ())
            self._place_arrival(cursor.lastrowid, peer_key, group_place(life, group_seq))
        return self._arrival(cursor.rowcount == 1, sender, msg_id)

    def add_group_event(
        self, group: str, change: str, by: str, users: tuple[str, ...], sent_ms: int,
        server_msg_id: int, group_seq: int,
    ) -> Arrival:  # fmt: skip
        """Store a membership change, not shown yet; its words go in `text`
        (what a search of the history finds)."""
        self.begin()
        peer = group_address(group)
        peer_key = name_key(peer)
        words = GroupChanged(group, change, by, users, server_msg_id, sent_ms).describe()
        life = self.last_life = self._arrival_life(peer_key, group_seq, change, by, users)
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO history (peer_key, peer, outgoing, text, ts_ms, sender_key,"
            " instance_id, client_seq, state, server_msg_id, shown, grp, grp_seq, grp_sender,"
            " grp_change, grp_users, grp_life)"
            " VALUES (?, ?, 0, ?, ?, ?, 0, ?, NULL, ?, 0, ?, ?, ?, ?, ?, ?)",
            (peer_key, peer, words, sent_ms, name_key(by), i64(server_msg_id),
             server_msg_id, group, group_seq, by, change, json.dumps(list(users)), life),
        )  # fmt: skip
        if cursor.rowcount == 1:
            self._note_entry(peer_key, life, group_seq, change, by, users)
            if cursor.lastrowid is not None:
                self._place_arrival(cursor.lastrowid, peer_key, group_place(life, group_seq))
            return "new"
        row = self.db.execute(
            "SELECT shown FROM history WHERE outgoing=0 AND sender_key=? AND instance_id=0 "
            "AND client_seq=?",
            (name_key(by), i64(server_msg_id)),
        ).fetchone()
        return "shown" if row is not None and row[0] else "unshown"

    def set_recipients(self, msg_id: MsgId, recipients: int, group_seq: int) -> None:
        """Our group message was accepted at `group_seq`: its "of N", and its
        row moves to its place in the group's order (`_place_in_group`), in
        the life of the group it was accepted in (`_accept_life`, `last_life`)."""
        self.begin()
        key = (name_key(self.username), i64(msg_id.instance_id), msg_id.client_seq)
        row = self.db.execute(
            "SELECT id, peer_key, grp_life FROM history WHERE outgoing=1 AND sender_key=?"
            " AND instance_id=? AND client_seq=?",
            key,
        ).fetchone()
        self.last_life = 0
        if row is None or group_seq <= 0:
            self.db.execute(
                "UPDATE history SET grp_recipients=?, grp_seq=? WHERE outgoing=1 AND sender_key=?"
                " AND instance_id=? AND client_seq=?",
                (recipients, group_seq, *key),
            )
            return
        row_id, peer_key = int(row[0]), str(row[1])
        life = self.last_life = self._accept_life(peer_key, int(row[2] or 0), group_seq)
        self.db.execute(
            "UPDATE history SET grp_recipients=?, grp_seq=?, grp_life=? WHERE id=?",
            (recipients, group_seq, life, row_id),
        )
        self._place_in_group(row_id, peer_key, group_place(life, group_seq))

    # --- the lives of a group's name ----------------------------------------------
    #
    # A group ends with its last member; anyone may then create one of the
    # same name, numbered from 1 again, and the wire does not say which
    # group an entry is of. What the client knows (`group_lives`: a row per
    # life of each group it has rows of): a group's entries reach it in
    # their order (the group's stream; a removed member's rest of an old
    # group before anything of a new one), each seq once in a life; a group
    # begins with its CREATED; a member's part of it ends with the entry that
    # removes her or says she left, and begins with the one that adds her.
    # So an entry is of a new life when it is a CREATED, when it comes after
    # her ending, when it adds her while she is in, or when its seq is one
    # the life has (at or below the last entry that came, or one of her own
    # messages'). A new life is a run of rows below the old one, which keeps
    # its order (`group_place`).

    def _lives_of(self, peer_key: str) -> dict[int, _Life]:
        """A group's lives as `group_lives` has them, read once and kept in
        step (this store is their only writer)."""
        lives = self._lives.get(peer_key)
        if lives is None:
            rows = self.db.execute(
                "SELECT life, received, last_received, joined_seq, exit_seq FROM group_lives"
                " WHERE peer_key=?",
                (peer_key,),
            ).fetchall()
            lives = self._lives[peer_key] = {
                int(life): _Life(bool(received), int(last), joined, exit_seq)
                for life, received, last, joined, exit_seq in rows
            }
        return lives

    def _latest_life(self, peer_key: str) -> int:
        return max(self._lives_of(peer_key), default=0)

    def _taken(self, peer_key: str, life: int, seq: int) -> bool:
        """Whether a row of the life is numbered `seq` (seqs are one a life)."""
        row = self.db.execute(
            "SELECT 1 FROM history WHERE peer_key=? AND grp_life=? AND grp_seq=? AND grp_seq > 0"
            " LIMIT 1",
            (peer_key, life, seq),
        ).fetchone()
        return row is not None

    def _ours_above(self, peer_key: str, life: int, state: _Life) -> set[int]:
        """The seqs of our messages in the life numbered after its last
        entry that came (the only rows above it), read once and kept."""
        if state.ours is None:
            rows = self.db.execute(
                "SELECT grp_seq FROM history WHERE peer_key=? AND grp_life=? AND grp_seq > ?"
                " AND outgoing=1",
                (peer_key, life, state.last),
            ).fetchall()
            state.ours = {int(seq) for (seq,) in rows}
        return state.ours

    def _about_me(self, change: str | None, by: str, users: tuple[str, ...]) -> str | None:
        """Whether an entry makes us a member ("in") or ends it ("out")."""
        if change is None:
            return None
        me = name_key(self.username)
        if change in ("created", "added") and any(name_key(u) == me for u in users):
            return "in"
        if (change == "removed" and any(name_key(u) == me for u in users)) or (
            change == "left" and name_key(users[0] if users else by) == me
        ):
            return "out"
        return None

    def _fits(self, peer_key: str, life: int, seq: int, change: str | None, by: str,
              users: tuple[str, ...]) -> bool:  # fmt: skip
        """Whether a group entry just come, numbered `seq`, can be of `life`."""
        state = self._lives_of(peer_key).get(life)
        if state is None or not state.received:
            return True  # nothing came of it yet: ours only, or nothing
        return not (
            change == "created"
            or state.exit is not None
            or seq <= state.last
            or self._about_me(change, by, users) == "in"
            or seq in self._ours_above(peer_key, life, state)
        )

    def _arrival_life(self, peer_key: str, seq: int, change: str | None, by: str,
                      users: tuple[str, ...]) -> int:  # fmt: skip
        """The life of a group entry just come: the latest, or a new one
        after it. A latest life of our messages only (accepted in a group
        this client had no entry of yet: `_accept_life`) is looked through:
        the entry may be the rest of the life before it."""
        lives = self._lives_of(peer_key)
        latest = max(lives, default=0)
        state = lives.get(latest)
        if state is not None and not state.received and latest > 0:
            if self._fits(peer_key, latest - 1, seq, change, by, users):
                return latest - 1
            return latest
        if self._fits(peer_key, latest, seq, change, by, users):
            return latest
        return latest + 1

    def _note_entry(self, peer_key: str, life: int, seq: int, change: str | None, by: str,
                    users: tuple[str, ...]) -> None:  # fmt: skip
        """An entry of `life` was stored: what the life now knows of us."""
        lives = self._lives_of(peer_key)
        state = lives.get(life)
        if state is None:
            state = lives[life] = _Life(True, seq, None, None)
        state.received = True
        if seq > state.last:
            state.last = seq
            if state.ours:
                state.ours = {s for s in state.ours if s > seq}
        about = self._about_me(change, by, users)
        if about == "in":
            state.joined = seq if state.joined is None else state.joined
            state.exit = None
        elif about == "out":
            state.exit = seq
        self.db.execute(
            "INSERT OR REPLACE INTO group_lives VALUES (?, ?, 1, ?, ?, ?)",
            (peer_key, life, state.last, state.joined, state.exit),
        )

    def _accept_life(self, peer_key: str, typed_in: int, seq: int) -> int:
        """The life our message, typed into life `typed_in`, was accepted
        in at `seq`: the latest it fits (the seq free there, after our
        joining and before our leaving it), else a new life of its own (the
        server has a group of the name this client got nothing of yet; the
        entries that come next may be of it: `_arrival_life`)."""
        lives = self._lives_of(peer_key)
        latest = max(lives, default=0)
        for life in range(latest, typed_in - 1, -1):
            state = lives.get(life)
            if (
                (state is None or state.exit is None or seq < state.exit)
                and (state is None or state.joined is None or seq > state.joined)
                and not self._taken(peer_key, life, seq)
            ):
                if state is not None and state.ours is not None and seq > state.last:
                    state.ours.add(seq)
                return life
        lives[latest + 1] = _Life(False, 0, None, None, {seq})
        self.db.execute(
            "INSERT OR IGNORE INTO group_lives VALUES (?, ?, 0, 0, NULL, NULL)",
            (peer_key, latest + 1),
        )
        return latest + 1

    def _fill_lives(self) -> None:
        """A store from before lives were told apart: each group's rows are
        one life (0), as they were read, and what they say of us."""
        self.db.execute("BEGIN")
        self.db.execute(
            "INSERT OR IGNORE INTO group_lives SELECT peer_key, 0, 1, MAX(grp_seq), NULL, NULL"
            " FROM history WHERE outgoing=0 AND grp IS NOT NULL AND grp_seq > 0 GROUP BY peer_key"
        )
        rows = self.db.execute(
            "SELECT peer_key, grp_seq, grp_change, grp_sender, grp_users FROM history"
            " WHERE outgoing=0 AND grp_change IS NOT NULL AND grp_seq > 0 ORDER BY id"
        ).fetchall()
        for peer_key, seq, change, by, users in rows:
            self._note_entry(str(peer_key), 0, int(seq), change, str(by or ""),
                             tuple(json.loads(users or "[]")))  # fmt: skip
        self.db.execute("COMMIT")
        self._lives.clear()

    def _place_in_group(self, row_id: int, peer_key: str, seq: int) -> None:
        """Our row `row_id` was stored where it was typed; the server put it
        at `seq`. Lines stored after it with a lower seq (others' messages
        and changes the server numbered first, which came while ours was on
        its way) go before it: the row, and the rows that follow it in the
        group's order, are stored again at the end (new ids, the same
        content), so every reading of the history (`ORDER BY id`, pages,
        search) has the group's one order. Only rows stored since ours are
        looked at: they came while it was in flight. `seq` and theirs are
        `group_place`s: a row of an older life of the name goes before it."""
        later = self.db.execute(
            "SELECT id, grp_life, grp_seq FROM history WHERE peer_key=? AND id>? ORDER BY id",
            (peer_key, row_id),
        ).fetchall()
        ahead = goes_before(seq, [group_place(int(lf or 0), int(s or 0)) for _, lf, s in later])
        if ahead == 0:
            return
        self._store_again([row_id] + [int(r) for r, _, _ in later[ahead:]])

    def _place_arrival(self, row_id: int, peer_key: str, seq: int) -> None:
        """A group's entry just stored at the end as `row_id` (numbered
        `seq`) may have been numbered before messages of ours the server
        has accepted already (GROUP_ACCEPT and the group's stream are not
        ordered with each other; the fan-out hold and the window hold an
        entry back, our accept never): it goes above them. The rows from
        the first of ours numbered after it to the end are stored again
        after it (new ids, the same content; `_place_in_group`'s way).
        Only the run of our own rows at the end is read (`goes_above`);
        `seq` and theirs are `group_place`s (ours of an older life end it)."""
        rows = self.db.execute(
            "SELECT id, outgoing, grp_life, grp_seq FROM history WHERE peer_key=? AND id<?"
            " ORDER BY id DESC",
            (peer_key, row_id),
        )
        read: list[int] = []

        def earlier() -> Iterator[tuple[bool, int]]:
            for other, outgoing, life, other_seq in rows:  # read only as far as needed
                read.append(int(other))
                yield bool(outgoing), group_place(int(life or 0), int(other_seq or 0))

        behind = goes_above(seq, earlier())
        rows.close()
        if behind:
            self._store_again(read[:behind][::-1])

    def _store_again(self, row_ids: list[int]) -> None:
        """The rows `row_ids` stored again at the end, in this order (new
        ids, the same content): how a row moves down the history."""
        columns = self._history_columns()
        names = ", ".join(columns)
        marks = ", ".join("?" * len(columns))
        for moved in row_ids:
            values = self.db.execute(f"SELECT {names} FROM history WHERE id=?", (moved,)).fetchone()
            self.db.execute("DELETE FROM history WHERE id=?", (moved,))
            self.db.execute(f"INSERT INTO history ({names}) VALUES ({marks})", values)

    def _history_columns(self) -> list[str]:
        """The history table's columns but its id (those of stores from
        before included: see HISTORY_COLUMNS)."""
        rows = self.db.execute("PRAGMA table_info(history)").fetchall()
        return [str(r[1]) for r in rows if r[1] != "id"]

    def add_group_receipt(self, msg_id: MsgId, by: str) -> bool:
        self.begin()
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO group_receipts VALUES (?, ?, ?, ?)",
            (i64(msg_id.instance_id), msg_id.client_seq, name_key(by), by),
        )
        return cursor.rowcount == 1

    def count_out(self, msg_id: MsgId, by: str) -> int | None:
        """A member who never will have it is kept in `group_receipts` under
        '!' and their key (no name has a '!'), and the row's N goes down."""
        self.begin()
        instance, seq, key = i64(msg_id.instance_id), msg_id.client_seq, name_key(by)
        had = self.db.execute(
            "SELECT 1 FROM group_receipts WHERE instance_id=? AND client_seq=? AND by_key=?",
            (instance, seq, key),
        ).fetchone()
        if had is not None:
            return None
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO group_receipts VALUES (?, ?, ?, ?)",
            (instance, seq, "!" + key, by),
        )
        if cursor.rowcount != 1:
            return None
        self.db.execute(
            "UPDATE history SET grp_recipients=MAX(0, grp_recipients-1) WHERE outgoing=1 AND "
            "sender_key=? AND instance_id=? AND client_seq=?",
            (name_key(self.username), instance, seq),
        )
        row = self.db.execute(
            "SELECT grp_recipients FROM history WHERE outgoing=1 AND sender_key=? AND "
            "instance_id=? AND client_seq=?",
            (name_key(self.username), instance, seq),
        ).fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    def take_request_id(self) -> int:
        request_id = self._next_request
        self._next_request += 1
        if not self.locked:  # a one-off instance numbers in memory
            self.begin()
            self.db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('next_request', ?)", (self._next_request,)
            )
        return request_id

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.commit()
        self.db.close()
        if self._lock is not None:
            self._lock.close()


SHOWN_ROWS = "(outgoing=1 OR shown=1)"  # a received message not shown yet is the session's
LINE_COLUMNS = (
    "peer, outgoing, text, ts_ms, instance_id, client_seq, state, id, grp_sender, grp_change,"
    " grp_seq, grp_life, fail_reason, fail_detail"
)


def _reader(path: Path) -> sqlite3.Connection | None:
    """A read connection of its own (safe from any thread), or None."""
    if not path.exists():
        return None
    db = sqlite3.connect(path)
    db.execute("PRAGMA busy_timeout=2000")
    return db


def _lines(rows: list[Any]) -> list[HistoryLine]:
    return [
        HistoryLine(p, bool(o), t, ts, MsgId(u64(i), s).label(), st, row, sender, change,
                    seq or 0, life or 0, why, detail or "")
        for p, o, t, ts, i, s, st, row, sender, change, seq, life, why, detail in rows
    ]  # fmt: skip


def read_history(
    path: Path,
    peer: str,
    limit: int = 500,
    upto: int | None = None,
    *,
    before: int | None = None,
) -> list[HistoryLine]:
    """The last `limit` lines of the conversation with `peer` (stored up to
    row `upto`, and before row `before`, if given), oldest first; a received
    message not shown yet is left out (the session hands it on as an event
    at start). Its own read connection: safe from any thread."""
    db = _reader(path)
    if db is None:
        return []
    last = upto if upto is not None else 2**63 - 1
    if before is not None:
        last = min(last, before - 1)
    try:
        rows = db.execute(
            f"SELECT {LINE_COLUMNS} FROM history WHERE peer_key=? AND id<=? AND {SHOWN_ROWS}"
            " ORDER BY id DESC LIMIT ?",
            (name_key(peer), last, limit),
        ).fetchall()
    except sqlite3.Error:
        return []
    finally:
        db.close()
    return _lines(rows[::-1])


def read_around(
    path: Path, peer: str, row_id: int, limit: int = PAGE, upto: int | None = None
) -> list[HistoryLine]:
    """About `limit` lines of the conversation with `peer` around row
    `row_id` (half before it, it, and the rest after), oldest first: the
    page a search hit is shown in."""
    db = _reader(path)
    if db is None:
        return []
    last = upto if upto is not None else 2**63 - 1
    key = name_key(peer)
    try:
        older = db.execute(
            f"SELECT {LINE_COLUMNS} FROM history WHERE peer_key=? AND id<? AND {SHOWN_ROWS}"
            " ORDER BY id DESC LIMIT ?",
            (key, row_id, limit // 2),
        ).fetchall()
        newer = db.execute(
            f"SELECT {LINE_COLUMNS} FROM history WHERE peer_key=? AND id>=? AND id<=? AND"
            f" {SHOWN_ROWS} ORDER BY id LIMIT ?",
            (key, row_id, last, limit - len(older)),
        ).fetchall()
    except sqlite3.Error:
        return []
    finally:
        db.close()
    return _lines(older[::-1] + newer)


def search_history(
    path: Path, peer: str, needle: str, before: int | None = None, upto: int | None = None
) -> int | None:
    """The row of the newest line with `peer` before row `before` (and up to
    row `upto`) whose text holds `needle`, ignoring case; None if there is
    none. The whole stored history is searched: through the FTS5 index when
    the store has one and the needle is long enough for its trigrams (each
    candidate is checked again with Python's case folding), else by reading
    the conversation's rows, newest first."""
    if not fold(needle):
        return None
    db = _reader(path)
    if db is None:
        return None
    last = upto if upto is not None else 2**63 - 1
    if before is not None:
        last = min(last, before - 1)
    key = name_key(peer)
    indexed = (
        len(needle) >= FTS_MIN_NEEDLE
        and db.execute("SELECT 1 FROM sqlite_master WHERE name='history_fts'").fetchone()
    )
    try:
        if indexed:
            phrase = '"' + needle.replace('"', '""') + '"'
            rows = db.execute(
                "SELECT h.id, h.text FROM history_fts f JOIN history h ON h.id = f.rowid"
                f" WHERE history_fts MATCH ? AND f.rowid <= ? AND h.peer_key = ? AND {SHOWN_ROWS}"
                " ORDER BY f.rowid DESC",
                (phrase, last, key),
            )
        else:
            rows = db.execute(
                f"SELECT id, text FROM history WHERE peer_key=? AND id<=? AND {SHOWN_ROWS}"
                " ORDER BY id DESC",
                (key, last),
            )
        for row_id, text in rows:
            if find_folded(text, needle):
                return int(row_id)
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return None


@dataclass(frozen=True)
class Contact:
    """A peer with history, for the contact list."""

    name: str
    last_ms: int  # when the last line with them was written (the order of the list)
    last_row: int


def read_contacts(path: Path, limit: int = 100_000) -> list[Contact]:
    """Everyone with stored history, the most recently active first: the
    contact list at login."""
    db = _reader(path)
    if db is None:
        return []
    try:
        rows = db.execute(
            "SELECT peer, last_ms, last_id FROM history_peers ORDER BY last_id DESC LIMIT ?",
            (limit,),
        ).fetchall()
    except sqlite3.Error:
        return []  # a store no ClientStore has opened since it was made
    finally:
        db.close()
    return [Contact(peer, int(ts), int(row)) for peer, ts, row in rows]


def row_of(path: Path, outgoing: bool, sender: str, msg_id: str) -> int | None:
    """The store's row of a message the window got as an event (ours, or
    received from `sender`), by its message id `instance-seq`."""
    try:
        instance, seq = msg_id.split("-")
        key = (1 if outgoing else 0, name_key(sender), i64(int(instance, 16)), int(seq))
    except ValueError:
        return None
    db = _reader(path)
    if db is None:
        return None
    try:
        row = db.execute(
            "SELECT id FROM history WHERE outgoing=? AND sender_key=? AND instance_id=?"
            " AND client_seq=?",
            key,
        ).fetchone()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return None if row is None else int(row[0])


def read_timeline(path: Path, username: str, msg_id: str) -> Timeline | None:
    """The timeline of our message `msg_id` (a `StatusChanged.id`), or None
    if it is not in the store. Its own read connection: safe from any thread
    (the window asks on hover)."""
    try:
        instance, _, seq = msg_id.partition("-")
        key = (name_key(username), i64(int(instance, 16)), int(seq))
    except (ValueError, OverflowError):
        return None
    if not path.exists():
        return None
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA busy_timeout=2000")
        row = db.execute(
            "SELECT state, ts_ms, accepted_ms, delivered_ms, resends FROM history"
            " WHERE outgoing=1 AND sender_key=? AND instance_id=? AND client_seq=?",
            key,
        ).fetchone()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return None if row is None else Timeline(*row)


def mark_shown(path: Path, server_msg_ids: list[int]) -> None:
    """Record shown messages after the session's network thread (the
    store's writer) has ended: the front end may still be printing what the
    thread handed on last. Their receipts go out at the next login, when
    the server delivers them again and finds them shown."""
    if not server_msg_ids or not path.exists():
        return
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA synchronous=FULL")
        with contextlib.suppress(sqlite3.Error):  # at worst shown once more, at the next start
            db.execute("BEGIN")
            db.executemany(
                "UPDATE history SET shown=1 WHERE server_msg_id=? AND outgoing=0",
                [(i,) for i in server_msg_ids],
            )
            db.execute("COMMIT")
    finally:
        db.close()


def read_group_receipts(
    path: Path, username: str, msg_ids: list[str]
) -> dict[str, tuple[int | None, tuple[str, ...]]]:
    """For `username`'s group messages among `msg_ids` (`instance-seq`):
    how many members each went to (None: not accepted yet) and who has it,
    in the order they were told. Other ids are left out."""
    wanted: dict[tuple[int, int], str] = {}
    for label in msg_ids:
        try:
            instance_hex, seq_text = label.split("-")
            wanted[(i64(int(instance_hex, 16)), int(seq_text))] = label
        except ValueError:
            continue
    db = _reader(path) if wanted else None
    if db is None:
        return {}
    found: dict[str, tuple[int | None, tuple[str, ...]]] = {}
    try:
        for (instance_id, seq), label in wanted.items():
            row = db.execute(
                "SELECT grp_recipients FROM history WHERE outgoing=1 AND sender_key=?"
                " AND instance_id=? AND client_seq=? AND peer_key LIKE '#%'",
                (name_key(username), instance_id, seq),
            ).fetchone()
            if row is None:
                continue
            by = db.execute(
                "SELECT by_name FROM group_receipts WHERE instance_id=? AND client_seq=?"
                " AND by_key NOT LIKE '!%' ORDER BY rowid",
                (instance_id, seq),
            ).fetchall()
            found[label] = (row[0], tuple(r[0] for r in by))
    except sqlite3.Error:
        return found
    finally:
        db.close()
    return found
