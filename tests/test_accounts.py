"""Accounts (issue 16, item 4): change the password, delete the account.

- In memory, `ClientCore` against `Relay` on a fake clock (the `Net` pump of
  test_client_core): the old password's proof is checked, a wrong one
  changes nothing, the session goes on with the new password (and a new
  login ticket), a new login needs the new password.
- On the disk (`ServerStore`, SQLite): a deletion erases the account's
  mailbox, queued receipts, dedup keys and counts; its name is quarantined,
  durably (a restart keeps it), until `name_quarantine` has passed.
- With real processes: a real server and real clients (`ChatSession`, the
  terminal's `/passwd` and `/delete-account` reading from stdin)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import protocol
from chat_server import Relay, ServerConfig
from client_core import (
    AccountDeleted,
    ClientError,
    Disconnected,
    ErrorEvent,
    MessageReceived,
    MessageState,
    PasswordChanged,
    StatusChanged,
)
from protocol import ErrorCode
from server_records import User
from server_router import LocalRouter, Route
from server_store import (
    Account,
    EraseAccount,
    MarkDelivered,
    ServerStore,
    StoreAccount,
    StoredMessage,
    StoreMessage,
    Sync,
)
from tests.conftest import (
    PASSWORD,
    ROOT,
    client_command,
    env_for_tests,
    make_session,
    spawn_server,
    stop_process,
    wait_for,
)
from tests.test_client_core import Client, Net, delivered

#: The account kinds' bytes, pinned (tests/test_protocol.py takes them in).
PINNED_ACCOUNT_MESSAGES: list[tuple[Any, str]] = [
    (
        protocol.ChangePassword(
            bytes(range(16)), bytes(range(32)), bytes(range(16, 32)), 4096, bytes(range(64))
        ),  # fmt: skip
        "1b000102030405060708090a0b0c0d0e0f000102030405060708090a0b0c0d0e0f101112131415161718191a"
        "1b1c1d1e1f101112131415161718191a1b1c1d1e1f00001000000102030405060708090a0b0c0d0e0f10111213"
        "1415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f",
    ),
    (
        protocol.DeleteAccount(bytes(range(16)), bytes(range(32))),
        "1c000102030405060708090a0b0c0d0e0f000102030405060708090a0b0c0d0e0f101112131415161718191a"
        "1b1c1d1e1f",
    ),
    (
        protocol.AccountResult(bytes(range(16)), ErrorCode.PASSWORD_CHANGED, "password changed"),
        "1d000102030405060708090a0b0c0d0e0f1a001070617373776f7264206368616e676564",
    ),
]


def of_code(client: Client, code: str) -> list[ErrorEvent]:
    return [e for e in client.of(ErrorEvent) if e.code == code]


def login_outcome(net: Net, name: str, password: str) -> Client:
    """A new client instance's first login, run to its end (in or out)."""
    client = net.add(name, password)
    net.run(lambda: client.logged_in or bool(client.of(Disconnected)), f"{name}'s login")
    return client


# --- change of password, in memory -----------------------------------------------


def test_change_password_keeps_the_session_and_a_new_login_needs_the_new_one() -> None:
    net = Net()
    alice, bob = net.login("alice", "bob")
    old_account = net.relay.users["alice"].account
    old_ticket = alice.core.ticket
    alice.core.change_password("alice-pw", "a new secret")
    net.run(lambda: bool(alice.of(PasswordChanged)), "password changed")
    assert alice.of(PasswordChanged)[0].to_json() == {"event": "password_changed", "user": "alice"}
    account = net.relay.users["alice"].account
    assert account.salt != old_account.salt and account.stored_key != old_account.stored_key
    # The current session goes on, with a new ticket (the old named the old key).
    net.run(lambda: alice.core.ticket != old_ticket, "a new login ticket")
    msg = alice.core.send("still here", net.now, to="bob")
    net.run(delivered(alice, msg), "delivered after the change")
    assert not alice.of(Disconnected) and not of_code(alice, "bad_password")
    # Another instance: the old password is refused, the new one logs in.
    old = login_outcome(net, "alice", "alice-pw")
    assert [e.code for e in old.of(ErrorEvent) if e.fatal] == ["bad_password"]
    new = login_outcome(net, "alice", "a new secret")
    assert new.logged_in
    # (which takes over: alice's first client is told, as for any login elsewhere)
    net.run(lambda: bool(alice.of(Disconnected)), "taken over")
    assert bob.core.conn is not None


class StaleRouter(LocalRouter):
    """A router that, while `stale`, says a user's session is on another
    node (a cluster's route lagging by its TTL): a second login then opens a
    session beside the first instead of taking it over."""

    stale = False

    def locate(self, user: User) -> Route:
        return "node-b" if self.stale else super().locate(user)


def test_the_users_other_sessions_end_when_the_password_changes() -> None:
    net = Net()
    router = StaleRouter()
    net.relay = Relay(net.config, router=router, wall_clock=lambda: 1_700_000_000.0 + net.now)
    (first,) = net.login("alice")
    router.stale = True
    second = net.add("alice", "alice-pw")
    net.run(lambda: second.logged_in, "a second session beside the first")
    router.stale = False
    assert len([s for s in net.relay.sessions.values() if s.user.key == "alice"]) == 2
    second.core.change_password("alice-pw", "mine now")
    net.run(lambda: bool(second.of(PasswordChanged)), "changed")
    net.run(lambda: bool(first.of(Disconnected)), "the other session ended")
    (error,) = [e for e in first.of(ErrorEvent) if e.fatal]
    assert error.code == "password_changed" and "new one" in error.message
    assert first.of(Disconnected)[-1].reason == "password_changed"
    assert not second.of(Disconnected)
    assert [s.instance_id for s in net.relay.sessions.values() if s.user.key == "alice"] == [
        second.core.instance_id
    ]


def test_the_users_other_sessions_end_when_the_account_is_deleted() -> None:
    net = Net()
    router = StaleRouter()
    net.relay = Relay(net.config, router=router, wall_clock=lambda: 1_700_000_000.0 + net.now)
    (first,) = net.login("alice")
    router.stale = True
    second = net.add("alice", "alice-pw")
    net.run(lambda: second.logged_in, "a second session beside the first")
    router.stale = False
    second.core.delete_account("alice-pw")
    net.run(lambda: bool(first.of(Disconnected)) and bool(second.of(Disconnected)), "both end")
    assert first.of(Disconnected)[-1].reason == "account_deleted"
    assert [e.code for e in first.of(ErrorEvent) if e.fatal] == ["account_deleted"]
    assert second.of(AccountDeleted)
    net.settle(2.0)
    assert not net.relay.sessions


def test_a_reconnect_after_the_change_uses_the_new_password() -> None:
    net = Net()
    (alice,) = net.login("alice")
    alice.core.change_password("alice-pw", "second")
    net.run(lambda: bool(alice.of(PasswordChanged)), "password changed")
    net.cut.add(alice.addr)  # the link goes; the core logs in again by itself
    net.settle(60.0)
    net.cut.clear()
    net.run(lambda: alice.core.login_phase == "online" and alice.core.link_up, "back online")
    assert not alice.of(Disconnected)


def test_a_wrong_old_password_changes_nothing() -> None:
    net = Net()
    (alice,) = net.login("alice")
    before = net.relay.users["alice"].account
    alice.core.change_password("not my password", "whatever")
    net.run(lambda: bool(of_code(alice, "bad_password")), "refused")
    (error,) = of_code(alice, "bad_password")
    assert not error.fatal and "nothing was changed" in error.message
    assert net.relay.users["alice"].account is before
    assert not alice.of(PasswordChanged) and not alice.of(Disconnected)
    # The old password still logs in (another instance takes the session over).
    assert login_outcome(net, "alice", "alice-pw").logged_in


def test_wrong_passwords_in_a_session_are_limited_like_logins() -> None:
    net = Net()
    (alice,) = net.login("alice")
    for n in range(net.config.login_failures):
        alice.core.change_password(f"guess {n}", "x")
    net.run(lambda: len(of_code(alice, "bad_password")) == net.config.login_failures, "guesses")
    alice.core.change_password("alice-pw", "right but too soon")
    net.run(lambda: bool(of_code(alice, "rate_limited")), "limited")
    assert not alice.of(PasswordChanged)
    net.settle(net.config.login_failure_period + 1)
    alice.core.change_password("alice-pw", "right, later")
    net.run(lambda: bool(alice.of(PasswordChanged)), "changed once the window passed")


def test_account_requests_need_a_session_and_a_new_password() -> None:
    net = Net()
    alice = net.add("alice", "alice-pw")  # not logged in yet
    with pytest.raises(ClientError) as refused:
        alice.core.change_password("alice-pw", "new")
    assert refused.value.code == ErrorCode.SERVER_UNREACHABLE
    net.run(lambda: alice.logged_in, "logged in")
    with pytest.raises(ClientError) as empty:
        alice.core.change_password("alice-pw", "")
    assert empty.value.code == ErrorCode.PASSWORD_REQUIRED


def test_the_new_keys_never_cross_the_wire_in_the_clear() -> None:
    """What goes over the network is a proof and wrapped keys: neither the
    new password's StoredKey nor its ServerKey appears in any datagram."""
    net = Net()
    (alice,) = net.login("alice")
    seen: list[bytes] = []
    original = net.relay.receive_datagram

    def tap(data: bytes, addr: Any, now: float) -> None:
        seen.append(data)
        original(data, addr, now)

    net.relay.receive_datagram = tap  # type: ignore[method-assign]
    alice.core.change_password("alice-pw", "fresh password")
    net.run(lambda: bool(alice.of(PasswordChanged)), "changed")
    account = net.relay.users["alice"].account
    wire = b"".join(seen)
    assert account.stored_key not in wire and account.server_key not in wire
    assert b"fresh password" not in wire and b"alice-pw" not in wire


# --- deletion, on the disk ----------------------------------------------------------------


class DiskNet(Net):
    """`Net` on a relay with a SQLite store: each pass hands its operations
    to the store thread, waits for the commit and runs the callbacks, as the
    server's loop does when the store wakes it. `wall` is the relay's clock."""

    def __init__(self, data_dir: Path, config: ServerConfig | None = None) -> None:
        super().__init__(config)
        self.data_dir = data_dir
        self.store = ServerStore(data_dir)
        self.store.start()
        self.relay = Relay(self.config, store=self.store,
                           wall_clock=lambda: 1_700_000_000.0 + self.now)  # fmt: skip

    def pump(self) -> bool:
        moved = super().pump()
        if self.store._pending:
            done = threading.Event()
            self.store.submit(Sync(), done.set)
            self.store.flush()
            deadline = time.monotonic() + 30
            while not done.is_set():
                assert time.monotonic() < deadline, "the store thread did not answer"
                time.sleep(0.0005)
                self.relay.store_done(self.now)
            moved = True
        return moved

    def restart(self) -> None:
        """The server stops and starts again on the same data directory."""
        self.store.close()
        for client in self.clients.values():
            client.core.abort()
        self.clients.clear()
        self.store = ServerStore(self.data_dir)
        self.store.start()
        self.relay = Relay(self.config, store=self.store,
                           wall_clock=lambda: 1_700_000_000.0 + self.now)  # fmt: skip

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(self.data_dir / "chat.db")
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()


@pytest.fixture
def disk(tmp_path: Path) -> Any:
    net = DiskNet(tmp_path / "data", ServerConfig(iterations=4096, key_workers=0,
                                                  name_quarantine=3600.0))  # fmt: skip
    yield net
    net.store.close()


def what_is_kept_of(net: DiskNet, key: str) -> dict[str, int]:
    counts = {}
    for table, column in (("accounts", "name_key"), ("mailbox", "recipient_key"),
                          ("notices", "sender_key"), ("dedup", "sender_key"),
                          ("summary", "user_key")):  # fmt: skip
        counts[table] = net.rows(f"SELECT COUNT(*) FROM {table} WHERE {column}=?", key)[0][0]
    return counts


def test_delete_account_erases_what_the_server_keeps_and_quarantines_the_name(
    disk: DiskNet,
) -> None:
    alice, bob = disk.login("alice", "bob")
    # alice's message to bob (a dedup key of hers), and bob's to her, which
    # her front end does not show: it stays in her mailbox.
    msg = alice.core.send("for bob", disk.now, to="bob")
    disk.run(delivered(alice, msg), "delivered")
    alice.shows = False
    bob.core.send("for alice", disk.now, to="alice")
    disk.run(lambda: bool(alice.unshown), "alice was handed bob's message")
    kept = what_is_kept_of(disk, "alice")
    assert kept["accounts"] == kept["mailbox"] == kept["dedup"] == kept["summary"] == 1

    alice.core.delete_account("alice-pw")
    disk.run(lambda: bool(alice.of(Disconnected)), "deleted")
    assert alice.of(AccountDeleted)[0].to_json() == {"event": "account_deleted", "user": "alice"}
    assert alice.of(Disconnected)[-1].reason == "account_deleted"
    assert not [e for e in alice.of(ErrorEvent) if e.fatal]
    assert set(what_is_kept_of(disk, "alice").values()) == {0}
    assert disk.rows("SELECT COUNT(*) FROM quarantine WHERE name_key='alice'") == [(1,)]
    assert "alice" not in disk.relay.users
    assert "alice" not in disk.relay.users["bob"].contacts  # bob no longer hears of her
    disk.settle(2.0)
    assert not [s for s in disk.relay.sessions.values() if s.user.key == "alice"]
    # bob's next message to her is a final failure, not a wait for a new alice.
    late = bob.core.send("are you gone?", disk.now, to="alice")
    disk.run(lambda: MessageState.FAILED in bob.states(late), "failed")
    assert [e.reason for e in bob.of(StatusChanged) if e.id == late][-1] == "account_deleted"
    # Nobody registers the name, not even after a restart of the server.
    taker = login_outcome(disk, "alice", "someone else")
    assert [e.code for e in taker.of(ErrorEvent) if e.fatal] == ["name_quarantined"]
    assert disk.relay.stats["registrations_quarantined"] == 1  # chat_login_failures_total
    disk.restart()
    again = login_outcome(disk, "Alice", "someone else")
    (refusal,) = [e for e in again.of(ErrorEvent) if e.fatal]
    assert refusal.code == "name_quarantined" and "free again after" in refusal.message
    # Once the quarantine has passed the name is free, and its new owner
    # inherits nothing.
    disk.now += 3600.0
    new = login_outcome(disk, "alice", "someone else")
    assert new.logged_in
    disk.settle(5.0)
    assert not new.of(MessageReceived) and not new.of(StatusChanged)
    assert disk.rows("SELECT COUNT(*) FROM quarantine") == [(0,)]


def test_the_store_erases_every_row_of_a_deleted_account(tmp_path: Path) -> None:
    """`EraseAccount` on SQLite: the account, its mailbox, the receipts
    queued for it as a sender, its dedup keys and its counts; the other
    user's rows stay; the quarantine row is written. A new account of the
    name (`StoreAccount`) drops the quarantine row."""
    store = ServerStore(tmp_path / "data")
    store.start()
    try:
        account = Account("alice", bytes(16), 4096, bytes(32), bytes(32))
        ops: list[Any] = [
            StoreAccount("alice", account),
            StoreAccount("bob", Account("bob", bytes(16), 4096, bytes(32), bytes(32))),
            StoreMessage(StoredMessage(1, "alice", "bob", "bob", 7, 1, "to alice", 0)),
            StoreMessage(StoredMessage(2, "bob", "alice", "alice", 9, 1, "to bob", 0)),
            StoreMessage(StoredMessage(3, "bob", "alice", "alice", 9, 2, "to bob too", 0)),
            MarkDelivered(2, "alice", 9, 1, "bob", "bob", 6, 100),  # a receipt queued for alice
        ]
        for op in ops:
            store.submit(op)
        sync(store)
        db = tmp_path / "data" / "chat.db"
        assert count(db, "notices", "sender_key", "alice") == 1
        assert count(db, "summary", "user_key", "alice") == 1
        store.submit(EraseAccount("alice", 123))
        sync(store)
        for table, column in (("accounts", "name_key"), ("mailbox", "recipient_key"),
                              ("notices", "sender_key"), ("dedup", "sender_key"),
                              ("summary", "user_key")):  # fmt: skip
            assert count(db, table, column, "alice") == 0, table
        assert count(db, "mailbox", "recipient_key", "bob") == 1  # bob's mail stays his
        assert count(db, "accounts", "name_key", "bob") == 1
        assert count(db, "quarantine", "name_key", "alice") == 1
        assert store.load().quarantine == {"alice": 123}
        store.submit(StoreAccount("alice", account))
        sync(store)
        assert count(db, "quarantine", "name_key", "alice") == 0
        assert count(db, "accounts", "name_key", "alice") == 1
    finally:
        store.close()


def sync(store: ServerStore) -> None:
    done = threading.Event()
    store.submit(Sync(), done.set)
    store.flush()
    deadline = time.monotonic() + 30
    while not done.is_set():
        assert time.monotonic() < deadline
        for callback in store.completed():
            callback()
        time.sleep(0.001)


def count(db: Path, table: str, column: str, key: str) -> int:
    connection = sqlite3.connect(db)
    try:
        return int(
            connection.execute(f"SELECT COUNT(*) FROM {table} WHERE {column}=?", (key,)).fetchone()[
                0
            ]
        )
    finally:
        connection.close()


def test_a_wrong_password_deletes_nothing(disk: DiskNet) -> None:
    (alice,) = disk.login("alice")
    alice.core.delete_account("guess")
    disk.run(lambda: bool(of_code(alice, "bad_password")), "refused")
    disk.settle(2.0)
    assert not alice.of(AccountDeleted) and not alice.of(Disconnected)
    assert what_is_kept_of(disk, "alice")["accounts"] == 1
    assert "alice" in disk.relay.users


def test_a_password_change_is_durable(disk: DiskNet) -> None:
    (alice,) = disk.login("alice")
    alice.core.change_password("alice-pw", "after the restart")
    disk.run(lambda: bool(alice.of(PasswordChanged)), "changed")
    disk.restart()
    assert not login_outcome(disk, "alice", "alice-pw").logged_in
    assert login_outcome(disk, "alice", "after the restart").logged_in


# --- real processes ------------------------------------------------------------------------


def test_change_password_with_a_real_server_and_clients(tmp_path: Path) -> None:
    running = spawn_server(data_dir=tmp_path / "server-data")
    sessions = []
    try:
        alice = make_session()
        sessions.append(alice)
        alice.login(running.addr_text, "alice", password=PASSWORD)
        wait_for(alice, lambda e: e.__class__.__name__ == "LoggedIn")
        alice.change_password(PASSWORD, "brand new password")
        wait_for(alice, lambda e: isinstance(e, PasswordChanged), 20.0)
        alice.close()
        old = make_session()
        sessions.append(old)
        old.login(running.addr_text, "alice", password=PASSWORD)
        refused = wait_for(old, lambda e: isinstance(e, ErrorEvent), 20.0)
        assert (refused.code, refused.fatal) == ("bad_password", True)
        new = make_session()
        sessions.append(new)
        new.login(running.addr_text, "alice", password="brand new password")
        wait_for(new, lambda e: e.__class__.__name__ == "LoggedIn", 20.0)
    finally:
        for session in sessions:
            session.close(2.0)
        stop_process(running)


def terminal(addr: str, lines: str, password: str = PASSWORD) -> tuple[int, list[dict[str, Any]]]:
    env = env_for_tests()
    env["CHAT_PASSWORD"] = password
    done = subprocess.run(
        client_command("--server", addr, "--user", "alice", "--json", "--quit-wait", "3"),
        input=lines, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
    )  # fmt: skip
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def test_terminal_passwd_and_delete_account_read_their_lines(tmp_path: Path) -> None:
    """--json: `/passwd` takes the old and the new password from the next two
    lines, `/delete-account` the password and `yes`; a refusal is a
    non-fatal error. Then the account is gone and the terminal exits 0."""
    running = spawn_server(data_dir=tmp_path / "server-data")
    try:
        status, events = terminal(
            running.addr_text, f"/passwd\nwrong\nx\n/passwd\n{PASSWORD}\nnew pw\n"
        )
        assert status == 0, events
        kinds = [e["event"] for e in events]
        assert kinds.count("password_changed") == 1, events
        assert [e["code"] for e in events if e["event"] == "error"] == ["bad_password"]
        status, events = terminal(running.addr_text, "/delete-account\nnew pw\nno\n", "new pw")
        assert status == 0
        assert [e["code"] for e in events if e["event"] == "error"] == ["cancelled"]
        status, events = terminal(running.addr_text, "/delete-account\nnew pw\nyes\n", "new pw")
        assert status == 0, events
        assert {"event": "account_deleted", "user": "alice"} in events
        assert events[-1] == {"event": "disconnected", "reason": "account_deleted"}
        status, events = terminal(running.addr_text, "", "new pw")
        assert status == 2
        assert [e["code"] for e in events if e["event"] == "error"] == ["name_quarantined"]
    finally:
        stop_process(running)


def test_the_terminal_reads_secrets_without_echo_from_a_terminal() -> None:
    """On a terminal, `/passwd` and `/delete-account` ask with `getpass`
    (here a stand-in), the new password twice; `yes` is typed as a line.
    What they read never comes back as a chat line."""
    import io
    import queue

    from chat_client import _Line, _read_lines, _Secrets

    answers = iter(["old", "new", "new", "old", "new", "typo", "pw"])
    prompts: list[str] = []

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        return next(answers)

    inbox: queue.Queue[Any] = queue.Queue()
    stream = io.StringIO("/passwd\n/passwd\n/delete-account\nyes\nhello\n")
    _read_lines(stream, inbox, tty=True, ask=ask)
    items = [inbox.get_nowait() for _ in range(inbox.qsize())]
    assert [type(i) for i in items] == [_Secrets, _Secrets, _Secrets, _Line, _Line]
    assert (items[0].command, items[0].values, items[0].problem) == (
        "/passwd",
        ("old", "new"),
        None,
    )
    assert items[1].problem is not None and "differ" in items[1].problem
    assert (items[2].command, items[2].values) == ("/delete-account", ("pw",))
    assert [i.text for i in items[3:]] == ["hello", None]
    assert prompts == ["current password: ", "new password: ", "new password again: "] * 2 + [
        "password: "
    ]
    assert "_Secrets" in repr(items[0]) and "old" not in repr(items[0])  # no passwords in logs


def test_without_a_quarantine_the_name_is_free_at_once_and_inherits_nothing(
    tmp_path: Path,
) -> None:
    net = DiskNet(tmp_path / "data", ServerConfig(iterations=4096, key_workers=0,
                                                  name_quarantine=0.0))  # fmt: skip
    try:
        alice, bob = net.login("alice", "bob")
        alice.shows = False
        bob.core.send("for the first alice", net.now, to="alice")
        net.run(lambda: bool(alice.unshown), "handed, never shown")
        alice.core.delete_account("alice-pw")
        net.run(lambda: bool(alice.of(AccountDeleted)), "deleted")
        new = login_outcome(net, "alice", "a stranger")
        assert new.logged_in
        net.settle(5.0)
        assert not new.of(MessageReceived)
    finally:
        net.store.close()


def test_name_quarantine_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from chat_server import build_parser, parse_arguments

    assert parse_arguments([]).name_quarantine == 30
    assert parse_arguments(["--name-quarantine", "0.5"]).name_quarantine == 0.5
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            parse_arguments(["--name-quarantine", bad])
        assert "argument --name-quarantine" in capsys.readouterr().err
    assert "--name-quarantine DAYS" in build_parser().format_help()


def test_a_change_whose_answer_was_lost_is_found_at_the_next_login() -> None:
    """The link goes after the server stored the new password but before
    its answer arrived: the old password is refused at the re-login, so the
    client tries the new one, and says the password changed."""
    net = Net()
    (alice,) = net.login("alice")
    before = net.relay.users["alice"].account
    alice.core.change_password("alice-pw", "changed in the dark")
    for datagram in alice.core.datagrams_to_send(net.now):
        net.relay.receive_datagram(datagram, alice.addr, net.now)
    net.cut.add(alice.addr)  # the answer is lost, and the link with it
    net.settle(60.0)
    assert net.relay.users["alice"].account is not before  # stored on the server
    assert [e.code for e in alice.of(ErrorEvent)][-2:] == ["server_unreachable"] * 2
    net.cut.clear()
    net.run(lambda: bool(alice.of(PasswordChanged)), "the new password found")
    assert alice.core.login_phase == "online" and not alice.of(Disconnected)


def test_a_change_that_never_reached_the_server_keeps_the_old_password() -> None:
    net = Net()
    (alice,) = net.login("alice")
    net.cut.add(alice.addr)
    alice.core.change_password("alice-pw", "never sent")
    net.settle(60.0)
    net.cut.clear()
    net.run(lambda: alice.core.login_phase == "online" and alice.core.link_up, "back")
    assert not alice.of(PasswordChanged) and not alice.of(Disconnected)
    assert login_outcome(net, "alice", "alice-pw").logged_in
