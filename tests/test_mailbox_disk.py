"""Mailboxes and queued receipts live on the disk; RAM holds a bounded
working set (issue 12, items 1, 3 and 7, the server's half).

In memory: a `Relay` with a real `ServerStore` (SQLite in tmp_path, its
thread running) and clients made of `reliability.Connection`s, on a fake
`now`. Each test says what it proves; together they take a few seconds."""

from __future__ import annotations

import functools
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chat_server import MAILBOX_WINDOW, NOTICE_WINDOW, Relay
from protocol import (
    CONTROL_STREAM,
    Accept,
    Accepts,
    Challenge,
    Deliver,
    Delivered,
    Delivereds,
    ErrorCode,
    Fail,
    Logout,
    Message,
    MsgId,
    Receipts,
    Send,
    Welcome,
    batches,
    conversation_stream,
    decode_header,
    decode_message,
    encode_message,
)
from reliability import Connection, PayloadReceived
from server_store import ServerStore, Sync
from tests.clients import ScriptedLogin, preauth_frame
from tests.conftest import PASSWORD, ROOT
from tests.conftest import test_config as server_config

Address = tuple[str, int]
WALL = 1_750_000_000.0  # the wall clock's reading, unless a test moves it


class World:
    """A relay on a data directory, and clients logged in by hand."""

    def __init__(
        self, data_dir: Path, *, wall: Callable[[], float] = lambda: WALL,
        clock: Callable[[], float] = time.monotonic, **config: Any,
    ) -> None:  # fmt: skip
        self.store = ServerStore(data_dir, clock=clock)
        # No rate limit gets in the way of filling mailboxes fast.
        for name in ("user_msg_rate", "user_msg_burst", "user_byte_rate", "user_byte_burst"):
            config.setdefault(name, 1e12)
        self.relay = Relay(server_config(data_dir, **config), store=self.store, wall_clock=wall)
        self.store.start()
        self.now = 1000.0
        self.conns: dict[str, Connection] = {}
        self.addrs: dict[str, Address] = {}
        self.inbox: dict[str, list[Message]] = {}
        self.receipting: dict[str, bool] = {}
        self.preauth: list[bytes] = []  # pre-login replies (CHALLENGE, WELCOME, ...)
        self.early: list[tuple[bytes, Address]] = []
        self.most_in_ram = 0  # the most entries the relay held for sessions at once

    def close(self) -> None:
        self.store.close()

    def settle(self) -> None:
        """Let the store thread commit and read what was submitted, and run
        the callbacks on the 'loop' (here)."""
        for _ in range(20):  # callbacks may submit more (the next page)
            marker: list[bool] = []
            self.store.submit(Sync(), functools.partial(marker.append, True))
            self.store.flush()
            deadline = time.monotonic() + 30
            while not marker:
                assert time.monotonic() < deadline, "the store thread did not answer"
                time.sleep(0.0005)
                self.relay.store_done(self.now)
            self.route(self.relay.datagrams_to_send(self.now))
            if not self.store._pending:
                return

    def route(self, out: list[tuple[bytes, Address]]) -> int:
        for data, addr in out:
            for name, a in self.addrs.items():
                conn = self.conns.get(name)
                if a != addr:
                    continue
                if conn is not None and decode_header(data).session_id == conn.session_id:
                    conn.receive_datagram(data, self.now)
                elif preauth_frame(data) is not None:
                    self.preauth.append(data)
                else:  # for a session whose WELCOME is being read
                    self.early.append((data, addr))
        return len(out)

    def login(self, name: str, instance_id: int = 9) -> None:
        addr = self.addrs.setdefault(name, ("198.51.100.1", 5000 + len(self.addrs)))
        self.conns.pop(name, None)
        login = ScriptedLogin(name, PASSWORD, instance_id, self.now)
        seen = len(self.preauth)
        self.route(self.relay.handle_datagram(login.hello, addr, self.now))
        assert isinstance(login.take(self.preauth[seen:], self.now), Challenge), login.answer
        seen = len(self.preauth)
        self.route(self.relay.handle_datagram(login.request, addr, self.now))
        self.settle()  # a registration's WELCOME waits for the disk
        assert isinstance(login.take(self.preauth[seen:], self.now), Welcome), login.answer
        assert login.conn is not None
        self.conns[name] = login.conn
        early, self.early = self.early, []
        self.route(early)
        self.inbox.setdefault(name, [])
        self.receipting.setdefault(name, True)
        self.pump()

    def logout(self, name: str) -> None:
        self.conns[name].send(encode_message(Logout()), CONTROL_STREAM)
        self.pump()
        del self.conns[name]

    def send(self, name: str, to: str, text: str, msg_id: MsgId) -> None:
        self.conns[name].send(encode_message(Send(msg_id, to, text)), conversation_stream(to))

    def pump(self, rounds: int = 400, *, quiet: bool = True) -> None:
        """Move datagrams both ways, commit, read, until nothing moves (or,
        with `quiet=False`, for a few rounds)."""
        for _ in range(rounds):
            moved = 0
            for name, conn in list(self.conns.items()):
                for data in conn.datagrams_to_send(self.now):
                    moved += 1
                    self.route(self.relay.handle_datagram(data, self.addrs[name], self.now))
            self.relay.handle_timer(self.now)
            moved += self.route(self.relay.datagrams_to_send(self.now))
            self.settle()
            for name, conn in self.conns.items():
                receipts: list[int] = []
                while (event := conn.next_event()) is not None:
                    if isinstance(event, PayloadReceived):
                        message = decode_message(event.payload)
                        self.inbox[name].append(message)
                        if isinstance(message, Deliver) and self.receipting[name]:
                            receipts.append(message.server_msg_id)
                for part in batches(receipts):
                    conn.send(encode_message(Receipts(tuple(part))))
            held = sum(len(s.mail.items) for s in self.relay.sessions.values() if s.mail)
            self.most_in_ram = max(self.most_in_ram, held)
            self.now += 0.03
            if not moved:
                return
        assert not quiet, "still moving after all those rounds"

    def delivers(self, name: str) -> list[Deliver]:
        return [m for m in self.inbox[name] if isinstance(m, Deliver)]

    def delivereds(self, name: str) -> list[MsgId]:
        out: list[MsgId] = []
        for m in self.inbox[name]:
            if isinstance(m, Delivered):
                out.append(m.msg_id)
            elif isinstance(m, Delivereds):
                out.extend(m.msg_ids)
        return out

    def answers(self, name: str) -> list[Accept | Fail]:
        out: list[Accept | Fail] = []
        for m in self.inbox[name]:
            if isinstance(m, (Accept, Fail)):
                out.append(m)
            elif isinstance(m, Accepts):
                out.extend(Accept(msg_id, sid) for msg_id, sid in m.items)
        return out


def rows(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(data_dir / "chat.db")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def fill(world: World, sender: str, to: str, count: int, instance_id: int = 9) -> list[MsgId]:
    ids = [MsgId(instance_id, i) for i in range(1, count + 1)]
    for msg_id in ids:
        world.send(sender, to, f"{sender} #{msg_id.client_seq}", msg_id)
        if msg_id.client_seq % 200 == 0:
            world.pump()
    world.pump()
    return ids


@pytest.fixture
def world(tmp_path: Path) -> Any:
    w = World(tmp_path / "data")
    yield w
    w.close()


def test_backlog_larger_than_the_window_arrives_once_in_order_at_login(world: World) -> None:
    """Bob is offline while alice sends him four windows' worth: nothing
    of it is kept in RAM, and at his login it all arrives, each message
    once, in order, a window at a time; then alice gets every receipt."""
    count = 4 * MAILBOX_WINDOW + 17
    world.login("bob")
    world.logout("bob")
    world.login("alice")
    ids = fill(world, "alice", "bob", count)
    assert [a.msg_id for a in world.answers("alice")] == ids
    assert all(isinstance(a, Accept) for a in world.answers("alice"))
    assert world.relay.users["bob"].mailbox_count == count
    assert not world.relay._accepted, "committed dedup keys are the disk's to remember"
    assert world.most_in_ram == 0

    world.login("bob")
    got = world.delivers("bob")
    assert [d.msg_id for d in got] == ids, "each once, in order"
    assert [d.text for d in got] == [f"alice #{i}" for i in range(1, count + 1)]
    assert world.most_in_ram <= MAILBOX_WINDOW
    assert sorted(world.delivereds("alice")) == ids
    assert rows(world.store.data_dir, "SELECT COUNT(*) FROM mailbox") == [(0,)]
    assert world.relay.users["bob"].mailbox_count == 0


def test_an_online_recipient_that_does_not_receipt_holds_only_a_window(world: World) -> None:
    """Bob is online but his client receipts nothing: he is handed one
    window, the rest waits on the disk. Messages keep coming while pages are
    read and receipts come in (some accepted but not yet committed when a
    page is read): still each once, in order."""
    world.login("bob")
    world.login("alice")
    world.receipting["bob"] = False
    first = fill(world, "alice", "bob", 3 * MAILBOX_WINDOW)
    assert [d.msg_id for d in world.delivers("bob")] == first[:MAILBOX_WINDOW]
    assert world.most_in_ram == MAILBOX_WINDOW
    world.receipting["bob"] = True
    later = [MsgId(9, i) for i in range(len(first) + 1, len(first) + 401)]
    for i, msg_id in enumerate(later):
        world.send("alice", "bob", f"alice #{msg_id.client_seq}", msg_id)
        if i == 0:  # the window's receipts now, so pages are read as these arrive
            conn = world.conns["bob"]
            for part in batches([d.server_msg_id for d in world.delivers("bob")]):
                conn.send(encode_message(Receipts(tuple(part))))
        if i % 37 == 0:
            world.pump(rounds=2, quiet=False)
    world.pump()
    got = [d.msg_id for d in world.delivers("bob")]
    assert got == first + later
    assert world.most_in_ram <= MAILBOX_WINDOW


def test_start_up_reads_no_mailbox(tmp_path: Path) -> None:
    """A restart over a full mailbox reads counts, not rows: the new relay
    holds no message until bob logs in, and then reads his mailbox a page at
    a time, on the store thread."""
    data = tmp_path / "data"
    world = World(data)
    world.login("bob")
    world.logout("bob")
    world.login("alice")
    ids = fill(world, "alice", "bob", 600)
    world.close()

    store = ServerStore(data)
    loaded = store.load()
    assert loaded.summary["bob"][0] == 600
    assert not hasattr(loaded, "mailbox") and not hasattr(loaded, "notices")
    store.close()

    again = World(data)
    pages: list[tuple[Any, ...]] = []
    real = again.store.read_mailbox

    def counted(*args: Any) -> Any:
        pages.append(args)
        return real(*args)

    again.store.read_mailbox = counted  # type: ignore[method-assign,assignment]
    try:
        assert again.relay.users["bob"].mailbox_count == 600
        assert again.relay.users["bob"].mailbox_bytes == sum(len(f"alice #{i}") for i in
                                                             range(1, 601))  # fmt: skip
        again.login("alice")
        assert not pages, "nobody asked for bob's mailbox yet"
        again.login("bob")
        assert [d.msg_id for d in again.delivers("bob")] == ids
        assert len(pages) >= 600 // MAILBOX_WINDOW and all(p[2] <= MAILBOX_WINDOW for p in pages)
    finally:
        again.close()


def test_a_full_mailbox_stays_full_across_a_restart(tmp_path: Path) -> None:
    """The per-recipient caps count what is on the disk: after a restart
    (no mailbox read) the next message is still refused with mailbox_full,
    and one receipt makes room for exactly one."""
    data = tmp_path / "data"
    world = World(data, mailbox_messages=5)
    world.login("bob")
    world.logout("bob")
    world.login("alice")
    fill(world, "alice", "bob", 5)
    world.close()
    again = World(data, mailbox_messages=5)
    try:
        again.login("alice", instance_id=10)
        fill(again, "alice", "bob", 1, instance_id=10)
        (answer,) = again.answers("alice")
        assert isinstance(answer, Fail) and answer.reason == ErrorCode.MAILBOX_FULL
    finally:
        again.close()


def test_receipts_for_an_offline_sender_wait_on_disk_and_come_paged(world: World) -> None:
    """Alice sends more messages than a receipt window and leaves; bob
    reads them all. The receipts wait on the disk (not in RAM) and reach
    alice at her next login, each once, a window at a time."""
    count = NOTICE_WINDOW + 300
    world.login("bob")
    world.logout("bob")
    world.login("alice")
    ids = fill(world, "alice", "bob", count)
    world.logout("alice")
    world.login("bob")
    assert len(world.delivers("bob")) == count
    assert world.relay.users["alice"].notice_count == count
    assert rows(world.store.data_dir, "SELECT COUNT(*) FROM notices") == [(count,)]

    world.inbox["alice"] = []
    world.login("alice")
    got = world.delivereds("alice")
    assert sorted(got) == ids and len(got) == count, "each receipt once"
    assert rows(world.store.data_dir, "SELECT COUNT(*) FROM notices") == [(0,)]
    assert world.relay.users["alice"].notice_count == 0


def test_a_copied_profile_reusing_a_message_id_is_refused_not_swallowed(tmp_path: Path) -> None:
    """A restored client reuses (instance, seq) with new text. Same id and
    same text is a retry (same server_msg_id, one copy); same id and other
    text gets FAIL duplicate_id, never an ACCEPT, before the commit, after
    it, and after a restart."""
    data = tmp_path / "data"
    world = World(data)
    world.login("bob")
    world.logout("bob")
    world.login("alice")
    first = MsgId(9, 1)
    world.send("alice", "bob", "the original", first)
    world.send("alice", "bob", "a copy's new text", first)  # before the commit
    world.pump()
    world.send("alice", "bob", "the original", first)  # after it: from the disk
    world.send("alice", "bob", "another new text", first)
    world.pump()
    answers = world.answers("alice")
    # (a FAIL goes at once, an ACCEPT once committed: their order may differ)
    assert sorted(type(a).__name__ for a in answers) == ["Accept", "Accept", "Fail", "Fail"]
    accepts = [a for a in answers if isinstance(a, Accept)]
    assert accepts[0].server_msg_id == accepts[1].server_msg_id
    fails = [a for a in answers if isinstance(a, Fail)]
    assert all(f.reason == ErrorCode.DUPLICATE_ID and "copied or restored" in f.message
               for f in fails)  # fmt: skip
    world.close()

    again = World(data)
    try:
        again.login("alice")
        again.send("alice", "bob", "new text after a restart", first)
        again.send("alice", "bob", "the original", first)
        again.pump()
        answers = again.answers("alice")
        assert sorted(type(a).__name__ for a in answers) == ["Accept", "Fail"]
        (accept,) = [a for a in answers if isinstance(a, Accept)]
        assert accept.server_msg_id == accepts[0].server_msg_id
        again.login("bob")
        assert [d.text for d in again.delivers("bob")] == ["the original"]
    finally:
        again.close()


def test_a_wall_clock_jump_does_not_prune_dedup_keys(tmp_path: Path) -> None:
    """Dedup keys are kept 7 days of server time (the monotonic clock, kept
    across restarts), not wall time: a wall clock stepped 30 days forward
    prunes nothing, so a retry still gets its first answer and no second
    copy; 8 days of the server running do prune."""
    data = tmp_path / "data"
    wall = [WALL]
    world = World(data, wall=lambda: wall[0])
    world.login("bob")
    world.logout("bob")
    world.login("alice")
    msg_id = MsgId(9, 1)
    world.send("alice", "bob", "once", msg_id)
    world.pump()
    (accept,) = world.answers("alice")
    world.close()

    wall[0] += 30 * 24 * 3600
    again = World(data, wall=lambda: wall[0])
    try:
        again.login("alice")
        again.send("alice", "bob", "once", msg_id)
        again.pump()
        assert again.answers("alice") == [accept]
        assert rows(data, "SELECT COUNT(*) FROM mailbox") == [(1,)]
    finally:
        again.close()

    running = [0.0]
    store = ServerStore(data, clock=lambda: running[0])
    store.load()
    store.start()
    running[0] += 8 * 24 * 3600  # the server ran for 8 days ...
    store.submit(Sync())
    store.close()  # ... and committed, which persists its server time
    store = ServerStore(data)
    try:
        store.load()
        assert store.find_dedup("alice", 9, 1) is None
    finally:
        store.close()


def test_duplicate_id_is_a_documented_error_code() -> None:
    """The client reports any FAIL as `failed` with the code's label; the
    new code has one and the README's table lists it."""
    assert ErrorCode.DUPLICATE_ID.label == "duplicate_id"
    assert "`duplicate_id`" in (ROOT / "README.md").read_text(encoding="utf-8")


OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE accounts (
    name_key TEXT PRIMARY KEY, name TEXT NOT NULL, salt BLOB NOT NULL,
    iterations INTEGER NOT NULL, stored_key BLOB NOT NULL, server_key BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE mailbox (
    server_msg_id INTEGER PRIMARY KEY, recipient_key TEXT NOT NULL, sender_key TEXT NOT NULL,
    sender TEXT NOT NULL, instance_id INTEGER NOT NULL, client_seq INTEGER NOT NULL,
    text TEXT NOT NULL, sent_ms INTEGER NOT NULL
);
CREATE INDEX mailbox_recipient ON mailbox (recipient_key, server_msg_id);
CREATE TABLE dedup (
    sender_key TEXT NOT NULL, instance_id INTEGER NOT NULL, client_seq INTEGER NOT NULL,
    server_msg_id INTEGER NOT NULL, accepted_ms INTEGER NOT NULL,
    PRIMARY KEY (sender_key, instance_id, client_seq)
) WITHOUT ROWID;
CREATE TABLE notices (
    sender_key TEXT NOT NULL, instance_id INTEGER NOT NULL, client_seq INTEGER NOT NULL,
    recipient TEXT NOT NULL, PRIMARY KEY (sender_key, instance_id, client_seq)
) WITHOUT ROWID;
"""


def test_a_data_directory_of_the_previous_version_is_brought_up_to_date(tmp_path: Path) -> None:
    """A chat.db written before mailboxes were paged: its waiting messages
    are counted into the summary once, its queued receipts numbered for
    paging, its dedup keys kept (any content counts as a retry, as before)."""
    data = tmp_path / "data"
    data.mkdir()
    db = sqlite3.connect(data / "chat.db")
    db.executescript(OLD_SCHEMA)
    waiting = [(i, "bob", "alice", "Alice", 7, i, "héllo", 0) for i in range(1, 6)]
    db.executemany("INSERT INTO mailbox VALUES (?,?,?,?,?,?,?,?)", waiting)
    db.executemany("INSERT INTO dedup VALUES (?,?,?,?,?)",
                   [("alice", 7, i, i, 0) for i in range(1, 6)])  # fmt: skip
    db.executemany("INSERT INTO notices VALUES (?,?,?,?)",
                   [("bob", 8, i, "Alice") for i in range(1, 4)])  # fmt: skip
    db.commit()
    db.close()
    store = ServerStore(data)
    try:
        loaded = store.load()
        assert loaded.summary == {"bob": (5, 5 * len("héllo".encode()), 3)}
        assert store.find_dedup("alice", 7, 5) == (5, None, None)
        first, more = store.read_notices("bob", -(1 << 63), 2)
        rest, _ = store.read_notices("bob", first[-1][0], 10)
        assert [row[2] for row in first + rest] == [1, 2, 3] and more
        assert [m.server_msg_id for m in store.read_mailbox("bob", 0, 10, 10**6)[0]] == [
            *range(1, 6)
        ]
        assert store.find_dedup("alice", 7, 3) == (3, None, None)
    finally:
        store.close()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_the_memory_benchmark_runs(tmp_path: Path) -> None:
    """bench/memory_mailbox.py, tiny, so it never rots: a real server
    process fills offline mailboxes (every message on disk), then starts
    over a database built in the store's schema."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory_mailbox", "--senders", "3", "--messages", "4",
         "--text-size", "100", "--gib", "0.0005", "--timeout", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "on disk: 12 messages (all 12 accepted)" in done.stdout, done.stdout
    assert "ready line after" in done.stdout
