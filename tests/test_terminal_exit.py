"""The terminal client as scripts and people use it (issue 16). Its exit
status, per the contract: 0 when all sent was accepted and it logged out, 2 on
a fatal error (a server that never answers included, even when input ends
first), 3 when messages stay in the outbox for the next login; usage errors
as JSON with `--json`; in text mode, each state of a message on its own
line, and a failure printed once. Real processes, short waits."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import client_command, env_for_tests, spawn_server, stop_process

ROOT = Path(__file__).resolve().parent.parent


def start_client(
    addr: str, *flags: str, user: str = "alice", json_mode: bool = True
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        client_command("--server", addr, "--user", user, "--connect-to", "bob",
                       *(["--json"] if json_mode else []), *flags),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT, env=env_for_tests(),
    )  # fmt: skip


def events_of(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_all_accepted_exits_0(tmp_path: Path) -> None:
    running = spawn_server(data_dir=tmp_path / "server-data")
    try:
        # bob's account appears: input ends at once, yet the client logs in first.
        bob = start_client(running.addr_text, user="bob")
        bob_out, bob_err = bob.communicate("", timeout=60)
        assert bob.returncode == 0, (bob_out, bob_err)
        first = {"event": "logged_in", "user": "bob", "server": running.addr_text}
        assert events_of(bob_out)[0] == first
        client = start_client(running.addr_text)
        out, err = client.communicate("hello\n", timeout=60)  # end of input at once
    finally:
        stop_process(running)
    events = events_of(out)
    assert client.returncode == 0, (events, err)
    assert any(e["event"] == "status" and e["state"] == "accepted" for e in events), events
    assert events[-1] == {"event": "disconnected", "reason": "logged_out"}


def test_server_that_never_answers_exits_2_even_when_input_ends_first() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # takes datagrams, answers none
        client = start_client(f"127.0.0.1:{silent.getsockname()[1]}", "--login-timeout", "1")
        out, err = client.communicate("", timeout=60)  # nothing to send, input ends at once
    events = events_of(out)
    assert client.returncode == 2, (events, err)
    assert any(e["event"] == "error" and e["code"] == "server_unreachable" for e in events)
    assert events[-1]["event"] == "disconnected"


def test_messages_left_in_the_outbox_exit_3(tmp_path: Path) -> None:
    running = spawn_server(data_dir=tmp_path / "server-data")
    try:
        client = start_client(running.addr_text, "--quit-wait", "0.5")
        assert client.stdout is not None and client.stdin is not None
        assert json.loads(client.stdout.readline())["event"] == "logged_in"
    finally:
        stop_process(running)  # gone before anything is sent
    out, err = client.communicate("never accepted\n", timeout=60)
    events = events_of(out)
    assert client.returncode == 3, (events, err)
    assert any(e["event"] == "status" and e["state"] == "sending" for e in events)
    assert not any(e["event"] == "status" and e["state"] == "accepted" for e in events)
    assert events[-1] == {"event": "disconnected", "reason": "logged_out"}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--json", "--rto-min", "abc"), "argument --rto-min"),
        (("--no-gui", "--jso", "--bogus"), "unrecognized arguments: --bogus"),
        (("--json",), "--user NAME is required with --no-gui"),
    ],
)
def test_json_usage_errors_are_json_on_stdout_and_text_on_stderr(
    args: tuple[str, ...], says: str
) -> None:
    done = subprocess.run(
        client_command(*args), capture_output=True, text=True, cwd=ROOT,
        env=env_for_tests(), timeout=30,
    )  # fmt: skip
    assert done.returncode == 2, done
    [event] = events_of(done.stdout)
    assert event["event"] == "error" and event["code"] == "usage", event
    assert says in str(event["message"]), event
    assert says in done.stderr and "usage: chat-client" in done.stderr


def test_without_json_a_usage_error_prints_nothing_on_stdout() -> None:
    done = subprocess.run(
        client_command("--rto-min", "abc"), capture_output=True, text=True, cwd=ROOT,
        env=env_for_tests(), timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert "argument --rto-min" in done.stderr


def next_line(stream: IO[str]) -> str:
    """The next line that is not a presence notice (`* bob is offline`)."""
    while (line := stream.readline()).startswith("* "):
        pass
    return line


def test_text_mode_shows_each_state_and_a_failure_once(tmp_path: Path) -> None:
    running = spawn_server(data_dir=tmp_path / "server-data")
    try:
        bob = start_client(running.addr_text, user="bob")
        assert bob.communicate("", timeout=60)[0]  # bob's account exists now
        client = start_client(running.addr_text, json_mode=False)
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().startswith("logged in as alice")
        # One at a time, so the lines come in a known order.
        client.stdin.write("hi bob\n")
        client.stdin.flush()
        assert next_line(client.stdout) == "-> bob: hi bob  [sending]\n"
        assert next_line(client.stdout) == "  \u2713 on server (to bob: hi bob)\n"
        out, err = client.communicate("/to carol\nhi carol\n", timeout=60)
    finally:
        stop_process(running)
    # carol has no account (issue 16): the message waits in the outbox (exit
    # status 3), and that is said on stderr when the wait begins and once
    # more at the end, with the way out (test_polish); nothing failed.
    assert client.returncode == 3, (out, err)
    lines = [line for line in out.splitlines() if not line.startswith("* ")]
    assert lines == ["-> carol: hi carol  [sending]"], out
    about = [line for line in err.splitlines() if "carol" in line or "no_such_user" in line]
    assert len(about) == 2 and about[0].startswith("error: there is no user 'carol' yet"), err
    assert about[1].endswith("(/cancel carol drops them)"), err


def test_event_to_text_names_every_state_briefly() -> None:
    from chat_client import event_to_text
    from client_core import MessageState, StatusChanged

    long = "a rather long message that goes on and on"
    assert event_to_text(StatusChanged("i-1", MessageState.DELIVERED, "bob", "")) == (
        "  \u2713\u2713 delivered (to bob)", False,
    )  # fmt: skip
    line, to_stderr = event_to_text(StatusChanged("i-2", MessageState.ACCEPTED, "bob", long)) or (
        "",
        True,
    )
    assert line == "  \u2713 on server (to bob: a rather long message that go\u2026)"
    assert not to_stderr
