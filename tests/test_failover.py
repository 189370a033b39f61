"""Clients with a list of servers (issue 15): `--server A,B`, the window's
Server field, and failover without Redis.

Two single servers stand in for a cluster's nodes: the second starts from a
copy of the first one's data directory, so both have the accounts and the
server secret (the key the client pins at its first login) that a cluster's
nodes share through Redis. What they do not share is what they accepted;
these tests only need the client's side: it leaves a node that died, logs in
to the next by itself, resends its outbox there with the same ids, says on
`--json` which server it is on, and nothing is shown twice.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chat_client import (
    ChatSession,
    Disconnected,
    ErrorEvent,
    LinkChanged,
    LoggedIn,
    MessageReceived,
    event_to_text,
)
from client_core import ClientCore, MemoryStore
from client_store import store_dir
from client_window import Settings
from common import MAX_SERVERS, format_servers, parse_servers
from tests.conftest import (
    PASSWORD,
    RunningServer,
    ServerProcess,
    client_command,
    env_for_tests,
    make_session,
    spawn_server,
    stop_process,
    wait_for,
)
from tests.test_gui import Gui, open_gui, pump_until, type_text
from tests.xvfb import display  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


# --- the list ------------------------------------------------------------------


def test_parse_servers_reads_a_list_in_order_once_each() -> None:
    assert parse_servers("a:1") == [("a", 1)]
    assert parse_servers(" a:1, b ,[::1]:7,a:1") == [("a", 1), ("b", 5555), ("::1", 7)]
    assert format_servers(parse_servers("b , [::1]:7")) == "b:5555,[::1]:7"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "the server address is empty"),
        ("a:1,,b:2", "server 2 of 3 in the list is empty"),
        ("a:1,", "server 2 of 2 in the list is empty"),
        ("a:1,b:x", "server 2 of 2: 'x' is not a port number"),
        ("a:1,b:0", "server 2 of 2: port 0 is out of range: a port is 1 to 65535"),
        (",".join(f"h{i}:1" for i in range(MAX_SERVERS + 1)), f"at most {MAX_SERVERS}"),
    ],
)
def test_parse_servers_names_the_bad_entry(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("[", r"\[")):
        parse_servers(text)


def test_cli_refuses_a_bad_list_entry_by_number() -> None:
    result = subprocess.run(
        client_command("--server", "127.0.0.1:5555,nohost:99999", "--user", "alice", "--json"),
        capture_output=True, text=True, cwd=ROOT, env=env_for_tests(), timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    event = json.loads(result.stdout.splitlines()[0])
    assert event["code"] == "usage"
    assert "server 2 of 2: port 99999 is out of range: a port is 1 to 65535" in event["message"], (
        event
    )


def test_a_list_keeps_its_history_under_its_first_entry(tmp_path: Path) -> None:
    """The outbox and history of `A,B` are A's: the same store as A alone."""
    session = make_session(store_root=tmp_path)
    dead = _free_port()
    assert session.login(f"127.0.0.1:{dead},127.0.0.1:{_free_port()}", "alice",
                         password=PASSWORD)  # fmt: skip
    try:
        assert session.store is not None
        assert session.store.directory == store_dir(f"127.0.0.1:{dead}", "alice", tmp_path)
        assert session.servers == [("127.0.0.1", dead), ("127.0.0.1", session.servers[1][1])]
    finally:
        session.abort()


def test_unresolvable_entries_are_left_out_with_an_error(tmp_path: Path) -> None:
    session = make_session(persist=False, login_timeout=0.5)
    assert session.login(f"no-such-host.invalid:5555,127.0.0.1:{_free_port()}", "alice",
                         password=PASSWORD)  # fmt: skip
    try:
        first = session.events.get(timeout=5)
        assert isinstance(first, ErrorEvent) and not first.fatal, first
        assert "no-such-host.invalid:5555" in first.message
        assert first.message.endswith("trying the other servers")
    finally:
        session.abort()
    only_bad = make_session(persist=False)
    assert not only_bad.login("no-such-host.invalid:5555", "alice", password=PASSWORD)
    fatal = only_bad.events.get(timeout=5)
    assert isinstance(fatal, ErrorEvent) and fatal.fatal and fatal.code == "server_unreachable"


# --- the core: told the server is gone -------------------------------------------


def test_server_gone_only_ends_a_live_session() -> None:
    core = ClientCore("alice", "pw", store=MemoryStore(), server=("127.0.0.1", 1))
    core.connect(0.0)
    assert core.datagrams_to_send(0.0)  # the HELLO
    core.server_gone(0.1)  # while logging in: the login's own retries go on
    assert core.login_phase == "hello"
    assert core.next_event() is None


def test_events_name_the_server_only_when_known() -> None:
    assert LoggedIn("alice").to_json() == {"event": "logged_in", "user": "alice"}
    assert LoggedIn("alice", "[::1]:7").to_json() == {
        "event": "logged_in", "user": "alice", "server": "[::1]:7"
    }  # fmt: skip
    assert LinkChanged(True, "b:1").to_json() == {"event": "link", "state": "up", "server": "b:1"}
    assert LinkChanged(False, "b:1").to_json() == {"event": "link", "state": "down"}
    assert event_to_text(LinkChanged(True, "b:1")) == ("* reconnected to b:1", True)
    text = event_to_text(LoggedIn("alice", "b:1"))
    assert text is not None and text[0].startswith("logged in as alice on b:1; ")


def test_none_answering_names_every_server() -> None:
    core = ClientCore("alice", "pw", server=("a", 1), servers=(("a", 1), ("b", 2)))
    core.connect(0.0)
    core.handle_timer(100.0)
    errors = [e for e in iter(core.next_event, None) if isinstance(e, ErrorEvent)]
    assert errors and errors[0].fatal
    assert errors[0].message == "none of the servers a:1, b:2 answers; are they running?"


# --- two servers, the first killed ---------------------------------------------------


def _free_port() -> int:
    """A UDP port nothing listens on (bound, then let go)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _register(addr: str, *names: str) -> None:
    for name in names:
        session = make_session(persist=False)
        session.login(addr, name, password=PASSWORD)
        wait_for(session, lambda e: isinstance(e, LoggedIn))
        session.close(5.0)


@pytest.fixture
def twins(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two servers with the same accounts and secret (one data directory,
    copied while stopped), as a cluster's nodes appear to a client."""
    first_dir, second_dir = tmp_path / "node-a", tmp_path / "node-b"
    seed = spawn_server(data_dir=first_dir)
    try:
        _register(seed.addr_text, "alice", "bob")
    finally:
        stop_process(seed)
    shutil.copytree(first_dir, second_dir)
    first = spawn_server(data_dir=first_dir)
    second = spawn_server(data_dir=second_dir)
    try:
        yield first, second
    finally:
        stop_process(first)
        stop_process(second)


def _kill(server: ServerProcess) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(5)


def _json_client(servers: str, *stdin_lines: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        client_command("--server", servers, "--user", "alice", "--connect-to", "bob", "--json"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT, env=env_for_tests(),
    )  # fmt: skip
    return proc


def _read_until(
    proc: subprocess.Popen[str], lines: queue.Queue[dict[str, Any]], seen: list[dict[str, Any]],
    predicate: Any, timeout: float,
) -> dict[str, Any]:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            event = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        seen.append(event)
        if predicate(event):
            return event
    raise AssertionError(f"timed out; saw {seen}")


def _pump_json(proc: subprocess.Popen[str]) -> queue.Queue[dict[str, Any]]:
    import threading

    out: queue.Queue[dict[str, Any]] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                out.put(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    return out


def test_killed_node_terminal_client_moves_on_and_sends_its_outbox(
    twins: tuple[ServerProcess, ServerProcess],
) -> None:
    """alice (a terminal, `--server A,B`) is on A with messages in flight to
    bob (on B) when A is frozen, then SIGKILLed: the retransmissions meet
    the closed port, she logs in to B, which `--json` says, and her outbox
    goes there with the same ids: bob gets each message once, she sees
    each one delivered."""
    first, second = twins
    bob = make_session()
    bob.seen_events = []  # type: ignore[attr-defined]
    bob.login(f"{second.addr_text},{first.addr_text}", "bob", password=PASSWORD)
    logged = wait_for(bob, lambda e: isinstance(e, LoggedIn))
    assert logged.server == second.addr_text
    alice = _json_client(f"{first.addr_text},{second.addr_text}")
    lines = _pump_json(alice)
    seen: list[dict[str, Any]] = []
    assert alice.stdin is not None
    try:
        event = _read_until(alice, lines, seen, lambda e: e["event"] == "logged_in", 30)
        assert event == {"event": "logged_in", "user": "alice", "server": first.addr_text}
        first.proc.send_signal(signal.SIGSTOP)  # in flight: sent, never answered
        texts = [f"m{i}" for i in range(5)]
        alice.stdin.write("".join(f"{text}\n" for text in texts))
        alice.stdin.flush()
        ids = [
            _read_until(alice, lines, seen, lambda e: e.get("state") == "sending", 10)["id"]
            for _ in texts
        ]
        time.sleep(0.3)  # a retransmission or two into a stopped process
        killed_at = time.monotonic()
        _kill(first)
        up = _read_until(alice, lines, seen, lambda e: e["event"] == "link" and
                         e["state"] == "up", 10)  # fmt: skip
        moved_in = time.monotonic() - killed_at
        assert up == {"event": "link", "state": "up", "server": second.addr_text}
        received: list[str] = []
        deadline = time.monotonic() + 5
        while len(received) < len(texts) and time.monotonic() < deadline:
            try:
                event = bob.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(event, MessageReceived):
                received.append(event.text)
                bob.shown(event.id)
        for msg_id in ids:
            _read_until(alice, lines, seen, lambda e, m=msg_id: e.get("id") == m and
                        e.get("state") == "delivered", 10)  # fmt: skip
        time.sleep(0.3)  # room for a duplicate to show
        while not bob.events.empty():
            event = bob.events.get()
            if isinstance(event, MessageReceived):
                received.append(event.text)
        assert received == texts, received
        assert not [e for e in seen if e["event"] == "error" and e["code"] != "server_unreachable"]
        # The move took the ICMP's round trip and a login, not a link timeout.
        assert moved_in < 5.0, moved_in
        alice.stdin.write("/quit\n")
        alice.stdin.flush()
        assert alice.wait(30) == 0, alice.stderr.read() if alice.stderr else ""
    finally:
        if alice.poll() is None:
            alice.kill()
            alice.wait(5)
        for stream in (alice.stdin, alice.stdout, alice.stderr):
            if stream is not None:
                stream.close()
        bob.close(2.0)


def test_idle_client_leaves_a_killed_node_at_its_next_keepalive(
    twins: tuple[ServerProcess, ServerProcess],
) -> None:
    """Nothing in flight: the keepalive meets the closed port, and the
    session moves to the second server without waiting for the link timeout."""
    first, second = twins
    alice = make_session(keepalive=0.5, link_timeout=60.0)
    alice.login([(first.host, first.port), (second.host, second.port)], "alice",
                password=PASSWORD)  # fmt: skip
    try:
        logged = wait_for(alice, lambda e: isinstance(e, LoggedIn))
        assert logged.server == first.addr_text
        _kill(first)
        alice.seen_events = []  # type: ignore[attr-defined]
        up = wait_for(alice, lambda e: isinstance(e, LinkChanged) and e.up, timeout=10)
        assert up == LinkChanged(True, second.addr_text)
        assert LinkChanged(False) in alice.seen_events  # type: ignore[attr-defined]
    finally:
        alice.close(2.0)


def test_receiver_leaves_a_node_killed_after_a_burst_without_waiting_for_the_keepalive(
    twins: tuple[ServerProcess, ServerProcess],
) -> None:
    """bob only receives: once his node dies nothing comes and he sends
    nothing. With a list of servers he pings `TRAFFIC_PROBE` (2 s) after
    the last message, meets the closed port and moves on, well before his
    next keepalive (15-18 s, the default here)."""
    first, second = twins
    both = [(first.host, first.port), (second.host, second.port)]
    alice, bob = make_session(), make_session()
    alice.login(both, "alice", password=PASSWORD)
    bob.login(both, "bob", password=PASSWORD)
    try:
        for session in (alice, bob):
            assert wait_for(session, lambda e: isinstance(e, LoggedIn)).server == first.addr_text
        alice.send("the last word", to="bob")
        got = wait_for(bob, lambda e: isinstance(e, MessageReceived))
        assert got.text == "the last word"
        time.sleep(0.3)  # the receipt and the acks have gone: bob has nothing to send
        _kill(first)
        killed_at = time.monotonic()
        up = wait_for(bob, lambda e: isinstance(e, LinkChanged) and e.up, timeout=10)
        assert up == LinkChanged(True, second.addr_text)
        assert time.monotonic() - killed_at < 5.0
    finally:
        alice.close(2.0)
        bob.close(2.0)


def test_first_login_skips_a_dead_server_in_the_list(
    twins: tuple[ServerProcess, ServerProcess],
) -> None:
    first, second = twins
    _kill(first)
    alice = make_session(persist=False)
    alice.login(f"{first.addr_text},{second.addr_text}", "alice", password=PASSWORD)
    try:
        logged = wait_for(alice, lambda e: isinstance(e, LoggedIn), timeout=10)
        assert logged.server == second.addr_text
    finally:
        alice.close(2.0)


def test_none_answering_is_fatal_naming_them_all() -> None:
    ports = [_free_port(), _free_port()]
    servers = ",".join(f"127.0.0.1:{port}" for port in ports)
    session = make_session(persist=False, login_timeout=1.0)
    session.login(servers, "alice", password=PASSWORD)
    error = wait_for(session, lambda e: isinstance(e, ErrorEvent))
    assert error.fatal and error.code == "server_unreachable"
    assert error.message == (
        f"none of the servers 127.0.0.1:{ports[0]}, 127.0.0.1:{ports[1]} answers; are they running?"
    )
    assert isinstance(wait_for(session, lambda e: isinstance(e, Disconnected)), Disconnected)


def test_single_server_ignores_icmp_and_keeps_retransmitting(tmp_path: Path) -> None:
    """With one server there is nowhere to go: a refused port is not a lost
    link (the session is kept until the server answers again or the link
    times out), as before the list existed."""
    running = spawn_server(data_dir=tmp_path / "data")
    session = make_session(persist=False, keepalive=0.3)
    session.login(running.addr_text, "alice", password=PASSWORD)
    try:
        wait_for(session, lambda e: isinstance(e, LoggedIn))
        _kill(running)
        time.sleep(1.5)  # several keepalives into the closed port
        events = []
        while not session.events.empty():
            events.append(session.events.get())
        assert not [e for e in events if isinstance(e, LinkChanged)], events
    finally:
        stop_process(running)
        session.abort()


# --- the window's Server field ---------------------------------------------------


@pytest.fixture
def gui(
    display: str,  # noqa: F811
    server: RunningServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Gui]:
    yield from open_gui(server, monkeypatch)


@pytest.fixture
def gui_without_server(display: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gui]:  # noqa: F811
    yield from open_gui(None, monkeypatch)


def test_window_server_field_takes_a_list_and_keeps_it(
    gui: Gui, server: RunningServer, tmp_path: Path
) -> None:
    """A bad entry is named inline; a list whose first node is down logs in
    to the next, and the saved "last server" is the whole list."""
    dead = _free_port()
    window = gui.window(server=f"127.0.0.1:{dead},nohost:99999")
    window.settings.path = tmp_path / "settings.json"
    type_text(window.username_entry, "alice")
    type_text(window.password_entry, PASSWORD)
    window.login_button.invoke()
    error = str(window.login_error.cget("text"))
    assert error == "Server: server 2 of 2: port 99999 is out of range: a port is 1 to 65535", error
    assert window.session is None
    listed = f"127.0.0.1:{dead},{server.addr_text}"
    window.server_var.set(listed.replace(",", ", "))
    window.login_button.invoke()
    assert pump_until(gui.root, lambda: window.username is not None, 10), window.login_error.cget(
        "text"
    )
    assert Settings.load(tmp_path / "settings.json").server == listed


def test_window_names_every_server_when_none_answers(gui_without_server: Gui) -> None:
    app = gui_without_server
    listed = f"127.0.0.1:{_free_port()},127.0.0.1:{_free_port()}"
    window = app.window(server=listed, login_timeout=1.0)
    type_text(window.username_entry, "alice")
    type_text(window.password_entry, PASSWORD)
    window.login_button.invoke()
    assert pump_until(app.root, lambda: window.login_error.cget("text") != "", 30)
    error = str(window.login_error.cget("text"))
    names = listed.replace(",", ", ")
    assert error == f"None of the servers {names} answers. Are they running?", error


@pytest.mark.skipif(sys.platform != "linux", reason="the ICMP error queue (IP_RECVERR) is Linux's")
def test_icmp_for_a_server_left_before_is_ignored() -> None:
    """The socket's error queue says which destination refused: a late ICMP
    about another server of the list does not move the session; one about
    the server in use does, once."""
    from chat_client import _Server, _Worker

    class Core:
        server: tuple[str, int] | None = None
        login_phase = "online"

        def __init__(self) -> None:
            self.gone: list[float] = []

        def server_gone(self, now: float) -> None:
            self.gone.append(now)

    ports = [_free_port(), _free_port()]
    servers = [_Server(("127.0.0.1", p), ("127.0.0.1", p), socket.AF_INET) for p in ports]
    session = ChatSession(persist=False)
    core = Core()
    worker = _Worker(session, core, servers)  # type: ignore[arg-type]
    sock = worker.sockets[socket.AF_INET]
    try:
        sock.sendto(b"x" * 64, servers[1].address)  # not the server in use
        time.sleep(0.1)
        worker.read_datagrams(1.0)
        assert core.gone == []
        sock.sendto(b"x" * 64, servers[0].address)  # the server in use
        time.sleep(0.1)
        worker.read_datagrams(2.0)
        assert core.gone == [2.0]
        worker.read_datagrams(3.0)  # the queue was drained: nothing more
        assert core.gone == [2.0]
    finally:
        sock.close()
        session.discard()


def test_window_says_which_entry_is_left_out_and_goes_on(gui_without_server: Gui) -> None:
    """An entry that does not resolve is named while the login goes on with
    the others (the button still says it is connecting); when none answers,
    the error names them all."""
    app = gui_without_server
    dead = _free_port()
    window = app.window(server=f"no-such-host.invalid:5555,127.0.0.1:{dead}", login_timeout=1.5)
    type_text(window.username_entry, "alice")
    type_text(window.password_entry, PASSWORD)
    window.login_button.invoke()
    assert pump_until(app.root, lambda: window.login_error.cget("text") != "", 10)
    error = str(window.login_error.cget("text"))
    assert error.startswith("server no-such-host.invalid:5555: "), error
    assert error.endswith("; trying the other servers"), error
    assert str(window.login_button.cget("text")) != "Login", "still connecting"
    assert pump_until(app.root, lambda: "None of" in str(window.login_error.cget("text")), 30)
    assert str(window.login_button.cget("text")) == "Login"
