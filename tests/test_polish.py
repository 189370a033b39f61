"""What a new user of the programs tripped over (the polish brief), each
pinned where a person meets it:

1. `/cancel NAME` ends every message to NAME the server has not accepted:
   those waiting for the account, those not sent yet, and the one in
   flight (ended when the server refuses it, never sent again after a lost
   link; if the server had accepted it, the answer says so). Its answer
   counts what it ended.
2. A terminal that quits with messages waiting for a name says so, with the
   way out (`/cancel NAME`), before it exits 3.
3. A logout that reaches no server (every node of the list dead) is not
   `logged_out`: an error says so, `disconnected` has `server_unreachable`,
   exit status 2 (3 if messages stay in the outbox).
4. `--json`: `logged_in` comes first; the `sending` of a line typed during
   the login follows it.
6. A cluster node says its messages are in Redis, not "on the disk".

(5, the login card's labels, is in tests/test_window_login.py.)

In memory (`ClientCore` against `Relay` on a fake clock: the `Net` of
test_client_core) for the rules, real processes for what a person sees."""

from __future__ import annotations

import fcntl
import json
import logging
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from chat_client import event_to_text
from client_core import (
    Cancelled,
    Disconnected,
    ErrorEvent,
    LoggedIn,
    MemoryStore,
    MessageReceived,
    StatusChanged,
)
from tests.conftest import (
    PASSWORD,
    ROOT,
    RunningServer,
    ServerProcess,
    client_command,
    env_for_tests,
    make_session,
    spawn_server,
    start_server,
    stop_process,
    stop_server,
    wait_for,
)
from tests.conftest import test_config as server_config
from tests.lossy_proxy import UP, LossyProxy
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401 (a fixture)
from tests.test_client_core import Client, Net


def received(client: Client) -> list[str]:
    return [m.text for m in client.of(MessageReceived)]


def failed_reasons(client: Client, msg_id: str) -> list[str | None]:
    return [e.reason for e in client.of(StatusChanged) if e.id == msg_id and e.state == "failed"]


# --- 1. /cancel NAME ---------------------------------------------------------------------


def test_cancel_right_after_sending_ends_the_message_in_flight() -> None:
    """The message has left (the server has not refused it yet) when the
    cancel comes: the answer waits for the refusal, then counts it; it is
    `failed` (`cancelled`), never waits, and is not sent when the name
    registers. The store lets go of it at once (no later run sends it)."""
    net = Net()
    store = MemoryStore()
    alice = net.add("alice", "alice-pw", store=store)
    net.run(lambda: alice.logged_in, "alice logged in")
    msg = alice.core.send("hello carol", net.now, to="carol")
    assert alice.core.outbox[next(iter(alice.core.outbox))].transmitted  # in flight
    assert alice.core.cancel("Carol") == []  # nothing ended yet: the server has it
    assert store.pending() == []
    net.run(lambda: bool(alice.of(Cancelled)), "the cancel's answer")
    assert alice.of(Cancelled) == [Cancelled("carol", (msg,))]
    assert alice.states(msg) == ["sending", "failed"] and failed_reasons(alice, msg) == [
        "cancelled"
    ]
    assert not [e for e in alice.of(ErrorEvent) if e.code == "no_such_user"], "it never waited"
    assert alice.core.outbox == {}
    carol = net.add("carol", "carol-pw")
    net.run(lambda: carol.logged_in, "carol registered")
    net.settle(5.0)
    assert received(carol) == []


def test_a_second_cancel_right_after_the_first_answers_after_it() -> None:
    """The first cancel waits for the server's answer; the second finds
    nothing new to end, and its answer (none) comes after the first's."""
    net = Net()
    (alice,) = net.login("alice")
    msg = alice.core.send("hello erin", net.now, to="erin")
    alice.core.cancel("erin")
    alice.core.cancel("erin")
    net.run(lambda: len(alice.of(Cancelled)) == 2, "both answers")
    assert alice.of(Cancelled) == [Cancelled("erin", (msg,)), Cancelled("erin", ())]


def test_a_cancel_too_late_says_the_server_had_accepted_it() -> None:
    """bob has an account (offline): the server accepts the message before
    the cancel could matter. The answer says so, honestly; it is delivered."""
    net = Net()
    (bob,) = net.login("bob")
    bob.core.logout(net.now)
    net.run(lambda: bool(bob.of(Disconnected)), "bob logged out")
    (alice,) = net.login("alice")
    msg = alice.core.send("too late to take back", net.now, to="bob")
    alice.core.cancel("bob")
    net.run(lambda: bool(alice.of(Cancelled)), "the cancel's answer")
    (answer,) = alice.of(Cancelled)
    assert answer == Cancelled("bob", (), (msg,))
    assert answer.to_json() == {"event": "cancelled", "to": "bob", "ids": [], "accepted": [msg]}
    assert alice.states(msg) == ["sending", "accepted"]
    line, _ = event_to_text(answer) or ("", True)
    assert line.startswith("too late to cancel: 1 message(s) to bob had been accepted")


def test_cancel_before_the_login_ends_what_has_not_left_yet() -> None:
    """Typed before the login completed: still here, so it ends at once."""
    net = Net()
    alice = net.add("alice", "alice-pw")
    msg = alice.core.send("never goes", net.now, to="carol")
    assert alice.core.cancel("carol") == [msg]
    net.run(lambda: alice.logged_in, "alice logged in")
    assert alice.of(Cancelled) == [Cancelled("carol", (msg,))]
    carol = net.add("carol", "carol-pw")
    net.run(lambda: carol.logged_in, "carol registered")
    net.settle(5.0)
    assert received(carol) == [] and alice.states(msg) == ["sending", "failed"]


def test_a_cancelled_message_is_not_sent_again_after_a_lost_link() -> None:
    """The link goes before the server answers the cancelled message: at the
    next login it is ended, not resent, so a name registered meanwhile never
    gets it."""
    net = Net()
    (alice,) = net.login("alice")
    net.cut.add(alice.addr)
    msg = alice.core.send("lost in the outage", net.now, to="carol")
    alice.core.cancel("carol")
    net.settle(50.0)  # the link timeout: alice logs in again once it is back
    carol = net.add("carol", "carol-pw")
    net.run(lambda: carol.logged_in, "carol registered")
    net.cut.clear()
    net.run(lambda: bool(alice.of(Cancelled)), "the cancel's answer")
    assert alice.of(Cancelled) == [Cancelled("carol", (msg,))]
    net.settle(5.0)
    assert received(carol) == []


def test_the_cancels_answer_in_words() -> None:
    def text(event: Cancelled) -> str:
        line = event_to_text(event)
        assert line is not None and not line[1]
        return line[0]

    assert text(Cancelled("dora", ("i-1", "i-2"))) == "cancelled 2 message(s) to dora"
    assert text(Cancelled("dora", ())) == (
        "nothing to cancel: no message to dora is waiting or unsent"
    )
    assert text(Cancelled("dora", ("i-1",), ("i-2",))) == (
        "cancelled 1 message(s) to dora; 1 message(s) to dora had been accepted by the server "
        "before the cancel reached it: they will be delivered"
    )


def test_the_session_publishes_which_messages_wait_for_an_account() -> None:
    """`ChatSession.waiting_ids` (the window's note "no account of that
    name yet", tests/test_window_login.py), over a real server thread."""
    running = start_server()
    session = make_session(persist=False)
    try:
        session.login(running.addr_text, "alice", password=PASSWORD)
        wait_for(session, lambda e: isinstance(e, LoggedIn))
        waits = session.send("hello?", to="nobody")
        wait_for(session, lambda e: isinstance(e, ErrorEvent) and e.code == "no_such_user")
        deadline = time.monotonic() + 10
        while waits not in session.waiting_ids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert session.waiting_ids() == {waits}
        session.cancel("nobody")
        wait_for(session, lambda e: isinstance(e, Cancelled))
        deadline = time.monotonic() + 10
        while session.waiting_ids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert session.waiting_ids() == frozenset()
    finally:
        session.close(3.0)
        stop_server(running)


# --- real terminals ---------------------------------------------------------------------


def terminal(
    addr: str, user: str, lines: str, *extra: str, json_mode: bool = True, timeout: float = 60
) -> tuple[int, str, str]:
    done = subprocess.run(
        client_command("--server", addr, "--user", user, "--quit-wait", "3",
                       *(["--json"] if json_mode else []), *extra),
        input=lines, capture_output=True, text=True, cwd=ROOT, env=env_for_tests(),
        timeout=timeout,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def unread(pipe: IO[str]) -> int:
    """Bytes written to `pipe` that its reader has not read yet."""
    count = fcntl.ioctl(pipe.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(count, sys.byteorder)


def events_of(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    running = spawn_server(data_dir=tmp_path / "server-data")
    yield running
    stop_process(running)


def test_terminal_cancel_of_a_line_just_sent_ends_it(server_process: ServerProcess) -> None:
    """Logged in, `hi erin` then `/cancel erin` at once (a script, or a
    quick person): the message is in flight, not yet refused. It is ended
    and the answer counts it; exit 0, nothing left in the outbox."""
    client = subprocess.Popen(
        client_command("--server", server_process.addr_text, "--user", "alice", "--json",
                       "--connect-to", "erin"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT, env=env_for_tests(),
    )  # fmt: skip
    assert client.stdout is not None
    assert json.loads(client.stdout.readline())["event"] == "logged_in"
    out, err = client.communicate("hi erin\n/cancel erin\n", timeout=60)
    events = events_of(out)
    assert client.returncode == 0, (events, err)
    (sending,) = [e for e in events if e["event"] == "status" and e["state"] == "sending"]
    assert [e for e in events if e["event"] == "cancelled"] == [
        {"event": "cancelled", "to": "erin", "ids": [sending["id"]]}
    ]
    assert {"event": "status", "id": sending["id"], "state": "failed",
            "reason": "cancelled"} in events  # fmt: skip
    assert events[-1] == {"event": "disconnected", "reason": "logged_out"}


# --- 2. quitting with messages waiting for a name ------------------------------------


def test_quitting_with_messages_waiting_says_what_waits_and_how_to_cancel(
    server_process: ServerProcess,
) -> None:
    addr = server_process.addr_text
    status, out, err = terminal(addr, "alice", "/to carol\nhi carol\nstill there?\n",
                                json_mode=False)  # fmt: skip
    assert status == 3, (out, err)
    last = err.strip().splitlines()[-1]
    assert last == ("error: 2 message(s) to carol still wait for that name to register: kept in "
                    "the outbox for the next login (/cancel carol drops them)"), err  # fmt: skip
    # With --json: the same line as a non-fatal `no_such_user` error, just
    # before `disconnected` (this run sends nothing new: the outbox's two wait).
    status, out, err = terminal(addr, "alice", "")
    events = events_of(out)
    assert status == 3, (events, err)
    assert events[-1] == {"event": "disconnected", "reason": "logged_out"}
    assert events[-2]["event"] == "error" and events[-2]["code"] == "no_such_user"
    assert "/cancel carol" in events[-2]["message"]


# --- 3. every node dead at the logout ----------------------------------------------------


def test_a_logout_that_reaches_no_node_is_not_logged_out(tmp_path: Path) -> None:
    """Logged in to `--server A,B`; both nodes stop answering; input ends.
    Nothing was pending, but no server got the LOGOUT: say so,
    `disconnected` with `server_unreachable`, exit 2. (SIGSTOP, not
    SIGKILL: a dead node's port could be taken by another test's server,
    which would answer; the in-memory test below covers the link lost.)"""
    a = spawn_server(data_dir=tmp_path / "a")
    b = spawn_server(data_dir=tmp_path / "b")
    try:
        client = subprocess.Popen(
            client_command("--server", f"{a.addr_text},{b.addr_text}", "--user", "alice",
                           "--json"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT, env=env_for_tests(),
        )  # fmt: skip
        assert client.stdout is not None
        assert json.loads(client.stdout.readline())["event"] == "logged_in"
        for node in (a, b):
            node.proc.send_signal(signal.SIGSTOP)
        out, err = client.communicate("", timeout=60)
    finally:
        for node in (a, b):
            node.proc.send_signal(signal.SIGCONT)
            stop_process(node)
    events = events_of(out)
    assert client.returncode == 2, (events, err)
    assert events[-1] == {"event": "disconnected", "reason": "server_unreachable"}
    assert events[-2]["event"] == "error" and events[-2]["code"] == "server_unreachable"
    assert "the logout reached no server" in events[-2]["message"]


def test_messages_left_in_the_outbox_still_exit_3_when_the_logout_reached_no_server(
    tmp_path: Path,
) -> None:
    """The server stops answering with a message unaccepted: exit 3 (kept
    for the next login) says more than 2; `disconnected` is still honest."""
    node = spawn_server(data_dir=tmp_path / "a")
    try:
        client = subprocess.Popen(
            client_command("--server", node.addr_text, "--user", "alice", "--json",
                           "--connect-to", "alice", "--quit-wait", "0.5"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT, env=env_for_tests(),
        )  # fmt: skip
        assert client.stdout is not None
        assert json.loads(client.stdout.readline())["event"] == "logged_in"
        node.proc.send_signal(signal.SIGSTOP)
        out, err = client.communicate("never accepted\n", timeout=60)
    finally:
        node.proc.send_signal(signal.SIGCONT)
        stop_process(node)
    events = events_of(out)
    assert client.returncode == 3, (events, err)
    assert events[-1] == {"event": "disconnected", "reason": "server_unreachable"}
    codes = [e["code"] for e in events if e["event"] == "error"]
    assert codes[-2:] == ["server_unreachable", "server_unreachable"], events  # unsent; logout


def test_in_memory_a_logout_after_the_link_was_lost_reached_no_server() -> None:
    net = Net()
    (alice,) = net.login("alice")
    net.cut.add(alice.addr)
    net.settle(50.0)  # the link is lost; alice keeps trying to log in again
    alice.core.logout(net.now, timeout=1.0)
    net.run(lambda: alice.core.ended, "ended")
    alice.take_events()
    assert alice.events[-1] == Disconnected("server_unreachable")
    error = alice.events[-2]
    assert isinstance(error, ErrorEvent) and not error.fatal
    assert error.code == "server_unreachable" and "logout reached no server" in error.message


# --- 4. the order of --json events during the login ------------------------------------


def test_json_logged_in_comes_before_the_status_of_a_line_typed_during_the_login(
    server_process: ServerProcess,
) -> None:
    status, out, err = terminal(server_process.addr_text, "alice", "early bird\n",
                                "--connect-to", "alice")  # fmt: skip
    events = events_of(out)
    assert status == 0, (events, err)
    kinds = [(e["event"], e.get("state")) for e in events]
    assert kinds[0] == ("logged_in", None), kinds
    assert kinds.index(("status", "sending")) < kinds.index(("status", "accepted"))


def test_json_stats_and_help_typed_during_the_login_are_answered_after_logged_in(
    server_process: ServerProcess,
) -> None:
    """`/stats` and `/help` are answered by the terminal itself: typed
    before the login completed, they used to come before `logged_in`. Now
    in their turn after it (`/stats` with the figures of then: link up).
    And `/to` or `/cancel` without a name says how to name someone."""
    status, out, err = terminal(server_process.addr_text, "alice", "/stats\n/to\n/help\n")
    events = events_of(out)
    assert status == 0, (events, err)
    assert [e["event"] for e in events] == ["logged_in", "stats", "error", "help", "disconnected"]
    assert events[1]["link"] == "up"
    assert events[2] == {
        "event": "error",
        "code": "invalid_name",
        "message": "name someone: /to NAME",
    }


def test_a_login_that_fails_still_shows_what_was_typed_before_its_error(
    server_process: ServerProcess,
) -> None:
    """Held events are shown before the fatal error: the message typed during
    a refused login is `sending` (kept in the outbox), then the error."""
    addr = server_process.addr_text
    assert terminal(addr, "zoe", "")[0] == 0  # zoe registers with the tests' password
    env_pw = {"CHAT_PASSWORD": "not zoe's password"}
    # The server hears nothing until the client has read the line (its input
    # pipe is empty): on a loaded machine the refusal could come before the
    # client read its input, and then nothing was typed during the login.
    # (Its `status` event is held until the login's outcome: no signal.)
    with LossyProxy((server_process.host, server_process.port), seed=1) as gate:
        gate.set(UP, blackhole=True)
        client = subprocess.Popen(
            client_command("--server", f"127.0.0.1:{gate.address[1]}", "--user", "zoe",
                           "--json", "--connect-to", "yan"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT, env={**env_for_tests(), **env_pw},
        )  # fmt: skip
        assert client.stdin is not None
        client.stdin.write("typed early\n")
        client.stdin.flush()
        deadline = time.monotonic() + 30
        while unread(client.stdin) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set(UP, blackhole=False)
        try:
            out, err = client.communicate(timeout=60)  # closes its input: the end of it
        except subprocess.TimeoutExpired:
            client.kill()
            out, err = client.communicate()
        events = events_of(out)
    assert client.returncode == 2, (events, err[-2000:])
    assert [e["event"] for e in events] == ["status", "error", "disconnected"], events
    assert events[1]["code"] == "bad_password"


def test_a_refused_password_in_the_terminal_says_the_name_may_be_taken() -> None:
    """As the window does: the server does not say whether the name is
    someone else's, so the line says what to do in either case."""
    line = event_to_text(ErrorEvent("bad_password", "wrong password for 'bob'", fatal=True))
    assert line == ("error: wrong password for 'bob'; if the name is not yours, it is taken: "
                    "pick another", True)  # fmt: skip
    # `/passwd` with a wrong old password is not about the name.
    assert event_to_text(ErrorEvent("bad_password", "wrong password")) == (
        "error: wrong password", True)  # fmt: skip


# --- 6. a cluster node says where its messages are -----------------------------------


def test_a_cluster_node_says_its_messages_are_in_redis(
    redis_server: RedisServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    from chat_server import start_line

    caplog.set_level(logging.INFO, logger="chat_server")
    node: RunningServer = start_server(server_config(None, cluster=redis_server.url, node_id="A"))
    try:
        line = start_line(node.server, node.relay.config)
    finally:
        stop_server(node)
    assert "accounts and messages in Redis" in line
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    assert loaded and all("on the disk" not in text for text in loaded), loaded
    assert f"wait in Redis at {redis_server.url}" in loaded[0]
