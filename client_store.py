"""The client's durable store: outbox, history and instance id of one
(server, username), in SQLite in the user's data directory.

Split from `chat_client.py` by responsibility. The session's network thread
is the only writer: a message goes into the outbox (committed with
`synchronous=FULL`) before it is first sent, and an incoming message is
committed to the history before its receipt goes out, which is what lets
the server forget it. A window reads the history through its own
connection (`read_history`), which WAL allows beside the writer.

The store is locked by the process that opened it. A second process for
the same user gets `locked=True`: it uses a fresh instance id and leaves the
outbox alone, so two processes never send the same message ids.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from chat_store import StoreLocked, lock_file
from protocol import MsgId, name_key

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    instance_id INTEGER NOT NULL, client_seq INTEGER NOT NULL, to_name TEXT NOT NULL,
    text TEXT NOT NULL, created_ms INTEGER NOT NULL, PRIMARY KEY (instance_id, client_seq)
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, peer_key TEXT NOT NULL, peer TEXT NOT NULL,
    outgoing INTEGER NOT NULL, text TEXT NOT NULL, ts_ms INTEGER NOT NULL,
    sender_key TEXT NOT NULL, instance_id INTEGER NOT NULL, client_seq INTEGER NOT NULL,
    state TEXT, UNIQUE (outgoing, sender_key, instance_id, client_seq)
);
CREATE INDEX IF NOT EXISTS history_peer ON history (peer_key, id);
CREATE TABLE IF NOT EXISTS server_key (id INTEGER PRIMARY KEY CHECK (id = 1), dh_public BLOB);
"""


def data_dir() -> Path:
    """The user's data directory for this app (XDG, %LOCALAPPDATA%, macOS)."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "udp-chat"


def store_dir(server: str, username: str, root: Path | None = None) -> Path:
    """Where one (server, username) keeps its outbox and history."""

    def safe(text: str) -> str:
        return re.sub(r"[^\w.-]", "_", text)

    return (root or data_dir() / "client") / safe(server) / safe(name_key(username))


@dataclass(frozen=True)
class HistoryLine:
    peer: str
    outgoing: bool
    text: str
    ts_ms: int
    msg_id: str
    state: str | None


def _i64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _u64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


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
        except StoreLocked:
            self._lock = None
            self.locked = True  # another process is this user here: stay out of its outbox
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        row = self.db.execute("SELECT value FROM meta WHERE key='instance_id'").fetchone()
        if row is None or self.locked:
            self.instance_id = secrets.randbits(64)
            if not self.locked:
                self.db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('instance_id', ?)",
                    (_i64(self.instance_id),),
                )
            self.next_seq = 1
        else:
            self.instance_id = _u64(row[0])
            row = self.db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
            self.next_seq = int(row[0]) if row else 1
        self._in_tx = False
        # History up to here is from earlier runs; what comes later reaches
        # the window as events, so it must not be read back twice.
        row = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM history").fetchone()
        self.history_mark = int(row[0])

    # --- writes (network thread) ------------------------------------------

    def begin(self) -> None:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True

    def commit(self) -> None:
        """One fsync for everything since `begin` (group commit per loop pass)."""
        if self._in_tx:
            self.db.execute("COMMIT")
            self._in_tx = False

    def add_outgoing(self, msg_id: MsgId, to: str, text: str) -> None:
        self.begin()
        now_ms = int(time.time() * 1000)
        if not self.locked:
            self.db.execute(
                "INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, ?, ?)",
                (_i64(msg_id.instance_id), msg_id.client_seq, to, text, now_ms),
            )
            self.db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (msg_id.client_seq + 1,)
            )
        self.db.execute(
            "INSERT OR IGNORE INTO history (peer_key, peer, outgoing, text, ts_ms, sender_key,"
            " instance_id, client_seq, state) VALUES (?, ?, 1, ?, ?, ?, ?, ?, 'sending')",
            (name_key(to), to, text, now_ms, name_key(self.username),
             _i64(msg_id.instance_id), msg_id.client_seq),
        )  # fmt: skip

    def state_of(self, msg_id: MsgId) -> str | None:
        """The state recorded for one of our messages (None: not here)."""
        row = self.db.execute(
            "SELECT state FROM history WHERE outgoing=1 AND sender_key=? AND instance_id=? "
            "AND client_seq=?",
            (name_key(self.username), _i64(msg_id.instance_id), msg_id.client_seq),
        ).fetchone()
        return None if row is None else row[0]

    def set_state(self, msg_id: MsgId, state: str) -> None:
        """Record a later state; the outbox lets go once the server holds it."""
        self.begin()
        self.db.execute(
            "UPDATE history SET state=? WHERE sender_key=? AND instance_id=? AND client_seq=?",
            (state, name_key(self.username), _i64(msg_id.instance_id), msg_id.client_seq),
        )
        if state in ("accepted", "delivered", "failed"):
            self.db.execute(
                "DELETE FROM outbox WHERE instance_id=? AND client_seq=?",
                (_i64(msg_id.instance_id), msg_id.client_seq),
            )

    def add_incoming(self, sender: str, msg_id: MsgId, text: str, sent_ms: int) -> bool:
        """Store a received message; False if it was already here (a duplicate)."""
        self.begin()
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO history (peer_key, peer, outgoing, text, ts_ms, sender_key,"
            " instance_id, client_seq, state) VALUES (?, ?, 0, ?, ?, ?, ?, ?, NULL)",
            (name_key(sender), sender, text, sent_ms, name_key(sender),
             _i64(msg_id.instance_id), msg_id.client_seq),
        )  # fmt: skip
        return cursor.rowcount == 1

    def pending(self) -> list[tuple[MsgId, str, str]]:
        """What this instance sent that the server has not accepted, in order."""
        if self.locked:
            return []
        rows = self.db.execute(
            "SELECT instance_id, client_seq, to_name, text FROM outbox WHERE instance_id=? "
            "ORDER BY client_seq",
            (_i64(self.instance_id),),
        ).fetchall()
        return [(MsgId(_u64(i), s), to, text) for i, s, to, text in rows]

    def server_key(self) -> bytes | None:
        """The server's key this user saw at its first login here (pinned)."""
        row = self.db.execute("SELECT dh_public FROM server_key WHERE id=1").fetchone()
        return bytes(row[0]) if row is not None else None

    def pin_server_key(self, dh_public: bytes) -> None:
        self.begin()
        self.db.execute("INSERT OR IGNORE INTO server_key VALUES (1, ?)", (dh_public,))

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.commit()
        self.db.close()
        if self._lock is not None:
            self._lock.close()


def read_history(
    path: Path, peer: str, limit: int = 500, upto: int | None = None
) -> list[HistoryLine]:
    """The last `limit` lines of the conversation with `peer` (stored up to
    row `upto`, if given), oldest first. Its own read connection: safe from
    any thread."""
    if not path.exists():
        return []
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA busy_timeout=2000")
        rows = db.execute(
            "SELECT peer, outgoing, text, ts_ms, instance_id, client_seq, state FROM history "
            "WHERE peer_key=? AND id<=? ORDER BY id DESC LIMIT ?",
            (name_key(peer), upto if upto is not None else 2**63 - 1, limit),
        ).fetchall()
    except sqlite3.Error:
        return []
    finally:
        db.close()
    return [
        HistoryLine(p, bool(o), t, ts, MsgId(_u64(i), s).label(), st)
        for p, o, t, ts, i, s, st in reversed(rows)
    ]
