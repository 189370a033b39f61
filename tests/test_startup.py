"""Start-up problems and a full disk (issue 12, item 6).

Every problem found at start-up is one line on stderr naming the path or the
argument and the cause, and exit status 2: never a traceback, never the
"is another server running there?" hint for anything but a port in use.
Each case runs the real `chat_server.py` (it exits at once, so they are
quick). Out-of-range arguments are argparse's own "error: argument --x".

A full disk while the server runs: nothing is reported `accepted` before it
is on disk, the server keeps answering, one log line says what is wrong, and
once there is space again every message is accepted and shown once. The
disk is a small tmpfs: the tests that mount one need root (CI runs as root)
and skip elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import chat_client
from chat_server import ChatServer, ListenError, build_parser, parse_arguments
from server_store import (
    Account,
    ServerStore,
    StoreAccount,
    StoredMessage,
    StoreError,
    StoreMessage,
    Write,
)
from tests.clients import RecordingClient, wait_all, wait_until
from tests.conftest import (
    ROOT,
    TEST_ITERATIONS,
    env_for_tests,
    spawn_server,
    start_server,
    stop_process,
    stop_server,
)
from tests.conftest import (
    test_config as server_config,
)

LISTEN_HINT = "is another server running there?"
NOBODY = 65534  # the owner of a directory root (without its privileges) may not write in


def without(*capabilities: str) -> tuple[str, ...]:
    """A command prefix that runs a program without root's `capabilities`
    (as another user it could not run this venv's Python, under /root);
    nothing when the tests do not run as root."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root writes anywhere, and setpriv (util-linux) to drop that is missing")
    return (setpriv, "--bounding-set", ",".join(f"-{c}" for c in capabilities))


# Root without these writes only where the permission bits let it.
NO_OVERRIDE = ("dac_override", "dac_read_search", "fowner")


def start(*args: str, data_dir: Path | None, prefix: tuple[str, ...] = ()) -> str:
    """Run `chat_server.py` with `args` (after the command `prefix`); it must
    exit with status 2 and one line of stderr, which is returned."""
    # At the default log level: nothing but that line either.
    command = [*prefix, sys.executable, str(ROOT / "chat_server.py"),
               "--pbkdf2-iterations", str(TEST_ITERATIONS)]  # fmt: skip
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
    if "--port" not in args:
        command += ["--port", "0"]
    result = subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=30, cwd=ROOT,
        env=env_for_tests(),
    )  # fmt: skip
    print(f"exit {result.returncode}: {result.stderr!r}")
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""  # no "listening on" line
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("chat-server: ")
    return lines[0]


def a_store(data_dir: Path, accounts: int = 0) -> None:
    """A data directory with a real chat.db (`accounts` accounts and a
    message to each), closed cleanly."""
    store = ServerStore(data_dir)
    try:
        store.load()
        store.start()
        for i in range(accounts):
            account = Account(f"user{i}", b"s" * 16, TEST_ITERATIONS, b"k" * 32, b"k" * 32)
            store.submit(StoreAccount(f"user{i}", account))
            message = StoredMessage(i + 1, f"user{i}", "user0", "user0", 7, i + 1, "x" * 300, 0)
            store.submit(StoreMessage(message))
        store.flush()
    finally:
        store.close()


# --- mounts (root only) -----------------------------------------------------------------------


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=10)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` for the block; unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the suite as root)")
    path.mkdir(parents=True, exist_ok=True)
    mounted = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # still busy: detach


def fill(path: Path) -> int:
    """Write `path` until the file system is full; the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    written = 0
    try:
        for chunk in (1 << 20, 1 << 16, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    written += os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as full:
        with open(path.with_name("probe"), "wb") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    assert full.value.errno == errno.ENOSPC
    return written


# --- the data directory ---------------------------------------------------------------------------


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_text("not a directory")
    line = start(data_dir=data)
    assert str(data) in line and "not a directory" in line and LISTEN_HINT not in line


def test_data_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    data = tmp_path / "file" / "data"
    line = start(data_dir=data)
    assert str(data) in line and "not a directory" in line and LISTEN_HINT not in line


def test_data_dir_that_cannot_be_made(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.mkdir(mode=0o555)
    data = parent / "data"
    line = start(data_dir=data, prefix=without(*NO_OVERRIDE))
    assert str(data) in line and "permission denied" in line and LISTEN_HINT not in line


def test_data_dir_not_writable_with_its_store_in_it(tmp_path: Path) -> None:
    """The store of an earlier run, in a directory of another user: found
    out at the first file the server opens to write."""
    if os.geteuid() != 0:
        pytest.skip("needs a directory of another user, made by root")
    data = tmp_path / "data"
    a_store(data, accounts=2)
    for path in [data, *data.iterdir()]:
        os.chown(path, NOBODY, NOBODY)
    data.chmod(0o755)
    line = start(data_dir=data, prefix=without(*NO_OVERRIDE))
    assert str(data) in line and "permission denied" in line and LISTEN_HINT not in line


def test_data_dir_on_a_read_only_file_system(tmp_path: Path) -> None:
    """A store from an earlier run on a file system since mounted read-only."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        data = disk / "data"
        a_store(data, accounts=2)
        remounted = _mount("-o", "remount,ro", str(disk))
        assert remounted.returncode == 0, remounted.stderr
        line = start(data_dir=data)
        assert str(data) in line and "read-only file system" in line
        assert LISTEN_HINT not in line
        # A new data directory there cannot even be made.
        line = start(data_dir=disk / "new")
        assert str(disk / "new") in line and "read-only file system" in line


def test_random_bytes_as_chat_db(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "chat.db").write_bytes(os.urandom(20_000))
    line = start(data_dir=data)
    assert str(data / "chat.db") in line and "not a chat-server database" in line
    assert "move it away" in line


def test_database_of_another_program_as_chat_db(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    other = sqlite3.connect(data / "chat.db")
    other.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, email TEXT)")
    other.commit()
    other.close()
    line = start(data_dir=data)
    assert str(data / "chat.db") in line and "not a chat-server database" in line


def test_in_process_server_raises_and_leaves_nothing_open(tmp_path: Path) -> None:
    """`ChatServer` itself raises `StoreError` and `ListenError` (an
    OSError, as before) and closes what it had opened: a socket or a
    database left open would warn, which is an error in this suite."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "chat.db").write_bytes(os.urandom(5000))
    with pytest.raises(StoreError, match="not a chat-server database"):
        ChatServer(("127.0.0.1", 0), server_config(data))
    with pytest.raises(ListenError) as raised:
        ChatServer(("192.0.2.1", 0), server_config(tmp_path / "other"))
    assert isinstance(raised.value, OSError) and raised.value.errno == errno.EADDRNOTAVAIL
    assert not (tmp_path / "other").exists()  # the address is tried first
    gc.collect()


@pytest.mark.parametrize("cut", ["mid-page", "whole pages", "header"])
def test_truncated_chat_db(tmp_path: Path, cut: str) -> None:
    """Cut in a page SQLite reads the missing tail as zeros (NULLs where
    there are none, and a TypeError in load on the old code); cut at a page
    boundary or in the header it finds its pages missing."""
    data = tmp_path / "data"
    a_store(data, accounts=200)
    db = data / "chat.db"
    size = db.stat().st_size
    assert not (data / "chat.db-wal").exists()  # checkpointed at close
    os.truncate(db, {"mid-page": size - 100, "whole pages": 4096, "header": 50}[cut])
    line = start(data_dir=data)
    assert str(db) in line and "damaged" in line and "move it away" in line


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_disk_full_at_start_up(tmp_path: Path, existing: bool) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        data = disk / "data"
        if existing:
            a_store(data, accounts=2)
        fill(disk / "filler")
        line = start(data_dir=data)
        assert str(data) in line and "no space left on device" in line
        assert "disk full" in line and LISTEN_HINT not in line


# --- the address ---------------------------------------------------------------------------------


def test_host_that_does_not_resolve(tmp_path: Path) -> None:
    host = "no-such-host.invalid"  # RFC 6761: never resolves
    line = start("--host", host, data_dir=tmp_path / "data")
    assert f"cannot resolve --host {host}" in line and LISTEN_HINT not in line


def test_host_that_is_not_an_address_of_this_machine(tmp_path: Path) -> None:
    host = "192.0.2.1"  # RFC 5737 TEST-NET-1: documentation only
    line = start("--host", host, data_dir=tmp_path / "data")
    assert f"--host {host} is not an address of this machine" in line
    assert LISTEN_HINT not in line


def test_port_in_use_keeps_the_hint(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        line = start("--port", str(port), data_dir=tmp_path / "data")
    assert f"127.0.0.1:{port}" in line and LISTEN_HINT in line


def test_low_port_without_root(tmp_path: Path) -> None:
    unprivileged_from = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if unprivileged_from.exists() and int(unprivileged_from.read_text()) <= 1:
        pytest.skip("every port is open to every user on this machine")
    line = start("--port", "1", data_dir=tmp_path / "data", prefix=without("net_bind_service"))
    assert "permission denied for port 1" in line and "below 1024" in line
    assert LISTEN_HINT not in line


# --- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--port", "65536"], "--port"),
        (["--port", "-1"], "--port"),
        (["--port", "x"], "--port"),
        (["--session-timeout", "-5"], "--session-timeout"),
        (["--session-timeout", "0"], "--session-timeout"),
        (["--session-timeout", "nan"], "--session-timeout"),
        (["--max-sessions", "0"], "--max-sessions"),
        (["--rto-min", "0"], "--rto-min"),
        (["--rto-max", "-1"], "--rto-max"),
        (["--rto-min", "2", "--rto-max", "1"], "--rto-max"),
        (["--pbkdf2-iterations", "4095"], "--pbkdf2-iterations"),
        (["--key-workers", "-1"], "--key-workers"),
        (["--preauth-rate", "0"], "--preauth-rate"),
        (["--preauth-total-rate", "-5"], "--preauth-total-rate"),
        (["--registration-rate", "-1"], "--registration-rate"),
        (["--user-msg-rate", "inf"], "--user-msg-rate"),
    ],
)
def test_out_of_range_argument_is_refused_by_the_parser(
    args: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        parse_arguments(args)
    assert raised.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(f"chat-server: error: argument {flag}: "), error


@pytest.mark.parametrize("args", [["--session-timeout", "-5"], ["--max-sessions", "0"]])
def test_out_of_range_argument_stops_the_real_server(tmp_path: Path, args: list[str]) -> None:
    """The two the issue found accepted: the process stops before it listens."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "chat_server.py"), "--port", "0", "--data-dir",
         str(tmp_path / "data"), *args],
        capture_output=True, text=True, timeout=10, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert f"error: argument {args[0]}: " in result.stderr.splitlines()[-1]
    assert not (tmp_path / "data").exists()  # refused before anything was made


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--server", "host:port"], "--server"),
        (["--server", "host:70000"], "--server"),
        (["--server", ":5555"], "--server"),
        (["--rto-min", "0"], "--rto-min"),
        (["--rto-min", "-1"], "--rto-min"),
        (["--rto-max", "nan"], "--rto-max"),
        (["--login-timeout", "-1"], "--login-timeout"),
    ],
)
def test_client_refuses_out_of_range_arguments(
    args: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        chat_client.build_parser().parse_args(["--no-gui", "--user", "alice", *args])
    assert raised.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(f"chat-client: error: argument {flag}: "), error


def test_client_refuses_rto_max_below_rto_min() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "chat_client.py"), "--no-gui", "--user", "alice",
         "--rto-min", "2", "--rto-max", "1"],
        capture_output=True, text=True, timeout=10, cwd=ROOT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2
    assert "error: argument --rto-max: " in result.stderr.splitlines()[-1]


# --- a full disk while running --------------------------------------------------------------------


class Lines:
    """The lines of a stream, read by a thread as they come."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def join(self) -> None:
        """After the process ended: the rest of its output."""
        self._thread.join(5)

    def with_(self, text: str) -> list[str]:
        return [line for line in list(self.lines) if text in line]


def test_full_disk_while_running_withholds_acceptance_and_recovers(tmp_path: Path) -> None:
    """A real server on a 2 MiB tmpfs, filled to the last byte while alice
    and bob are logged in: her messages stay `sending` (bob may see them:
    forwarding does not wait for the disk; he does not receipt them yet:
    a message its recipient's client holds needs no write, so a receipt
    would have it accepted at once, see tests/test_nowrite.py), the server
    answers a WHO and a login, and says once what is wrong. With space again
    every message is accepted, then delivered, and shown once."""
    with tmpfs(tmp_path / "disk", "2m") as disk:
        data = disk / "data"
        server = spawn_server(data_dir=data)
        assert server.proc.stderr is not None
        log = Lines(server.proc.stderr)
        alice = RecordingClient("alice")
        bob = RecordingClient("bob")
        carol = RecordingClient("carol")
        try:
            both = [alice, bob]
            assert alice.login(server.addr_text, "bob") and bob.login(server.addr_text, "alice")
            assert carol.login(server.addr_text)
            wait_all([*both, carol], lambda: alice.logged_in and bob.logged_in and carol.logged_in,
                     15, "all three logged in")  # fmt: skip
            carol.close()  # registered: she comes back while the disk is full
            first = alice.send("before the disk filled", "bob")
            wait_all(both, lambda: alice.reached(first, "delivered"), 15, "the first delivered")

            bob.shows = False  # (his front end shows nothing for now: no receipts)
            filler = disk / "filler"
            fill(filler)
            texts = [f"while the disk is full {n}" for n in range(3)]
            ids = [alice.send(text, "bob") for text in texts]
            wait_all(both, lambda: bool(log.with_("disk full")), 15, "the disk-full log line")
            # The server keeps serving: bob's WHO is answered, carol logs in
            # again. Meanwhile at least one more attempt at the commit fails
            # (one per second).
            failing_since = time.monotonic()
            bob.session.who()
            wait_all(both, lambda: bool(bob.who_lists), 15, "the WHO reply")
            carol = RecordingClient("carol")
            assert carol.login(server.addr_text)
            wait_all([carol], lambda: carol.logged_in, 15, "carol's second login")
            wait_all(both, lambda: time.monotonic() - failing_since > 1.5, 15, "a retry")
            assert not any(alice.reached(i, "accepted") for i in ids), alice.states
            assert not any(alice.reached(i, "delivered") for i in ids), alice.states
            assert server.proc.poll() is None
            full = log.with_("disk full")
            assert len(full) == 1, full  # one line per interval, not one per attempt
            assert str(data) in full[0] and "cannot commit" in full[0]
            assert not log.with_("Traceback")

            filler.unlink()
            wait_all(both, lambda: all(alice.reached(i, "accepted") for i in ids), 15,
                     "the messages accepted once there is space")  # fmt: skip
            wait_all(both, lambda: len(bob.received) == 4, 15, "bob has them all")
            bob.shows = True
            for event in bob.received[1:]:
                bob.session.shown(event.id)
            wait_all(both, lambda: all(alice.reached(i, "delivered") for i in ids), 15,
                     "the messages accepted and delivered once there is space")  # fmt: skip
            for msg_id in [first, *ids]:
                assert alice.states[msg_id] == ["sending", "accepted", "delivered"], alice.states
            assert bob.texts() == ["before the disk filled", *texts]  # each shown once
            # The line is written before the acks go, but read by the log's
            # thread: at load average 38 it came after the checks above.
            wait_until(lambda: bool(log.with_("commit again")), 15, "the recovery's line")
            recovered = log.with_("commit again")
            assert len(recovered) == 1 and str(data) in recovered[0], log.lines
            attempts = int(recovered[0].split(" and ")[-1].split()[0])
            assert attempts >= 2  # so the single line above stood for several
            assert not log.with_("Traceback"), log.lines
            for client in (alice, bob, carol):
                client.close()
        finally:
            for client in (alice, bob, carol):
                client.dispose()
            server.proc.terminate()
            server.proc.wait(10)
            log.join()  # before stop_process closes the stream under the reader
            stop_process(server)


def test_receipt_before_the_commit_reaches_the_sender_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same rule without root: commits fail (as on a full disk) while
    bob, online, receives alice's message and sends its receipt; alice sees
    neither `accepted` nor `delivered` until the commit, then both in order."""
    import server_store

    monkeypatch.setattr(server_store, "RETRY_S", 0.05)
    running = start_server(server_config(tmp_path / "data"))
    store = running.server.store
    assert store is not None
    real_apply = store._apply
    disk_full = threading.Event()

    def apply(ops: list[Write]) -> None:
        if disk_full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        real_apply(ops)

    monkeypatch.setattr(store, "_apply", apply)
    alice = RecordingClient("alice")
    bob = RecordingClient("bob")
    both = [alice, bob]
    try:
        assert alice.login(running.address, "bob") and bob.login(running.address, "alice")
        wait_all(both, lambda: alice.logged_in and bob.logged_in, 15, "both logged in")
        disk_full.set()
        msg_id = alice.send("while commits fail", "bob")
        wait_all(both, lambda: bob.texts() == ["while commits fail"], 15, "bob has it")
        relay = running.relay
        wait_all(both, lambda: relay.users["alice"].notice_count == 1, 15,
                 "bob's receipt at the server")  # fmt: skip
        until = time.monotonic() + 0.3  # time for a DELIVERED sent at once to arrive
        wait_all(both, lambda: time.monotonic() > until, 5, "a moment")
        assert alice.states[msg_id] == ["sending"], alice.states
        disk_full.clear()
        wait_all(both, lambda: alice.reached(msg_id, "delivered"), 15, "delivered")
        assert alice.states[msg_id] == ["sending", "accepted", "delivered"]
        assert bob.texts() == ["while commits fail"]
        alice.close()
        bob.close()
    finally:
        alice.dispose()
        bob.dispose()
        stop_server(running)


# --- --max-memory below a server at rest (review F7) -------------------------------------


@pytest.mark.parametrize("value", ["1", "30", "63"])
def test_max_memory_below_a_server_at_rest_is_refused(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--max-memory 1` used to start a server that held back every SEND for
    good (it rests at about 30 MiB)."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--max-memory", value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--max-memory" in err and "at least 64" in err
    assert build_parser().parse_args(["--max-memory", "64"]).max_memory == 64


# --- chat.db is a directory (review F8) --------------------------------------------------


def test_a_chat_db_that_is_a_directory_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "chat.db").mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "chat_server.py"), "--pbkdf2-iterations",
         str(TEST_ITERATIONS), "--port", "0", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30, cwd=ROOT, env=env_for_tests(),
    )  # fmt: skip
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("chat-server: ")
    assert str(tmp_path / "chat.db") in lines[0]
    assert "is a directory, not a database file" in lines[0]
    assert "--data-dir" in lines[0]
