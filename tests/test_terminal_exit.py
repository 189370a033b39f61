"""The terminal client's exit status, per the contract (issue 16): 0 when all
sent was accepted and it logged out, 2 on a fatal error (a server that never
answers included, even when input ends first), 3 when messages stay in the
outbox for the next login. Real processes, short waits."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import client_command, env_for_tests, spawn_server, stop_process

ROOT = Path(__file__).resolve().parent.parent


def start_client(addr: str, *flags: str, user: str = "alice") -> subprocess.Popen[str]:
    return subprocess.Popen(
        client_command("--server", addr, "--user", user, "--connect-to", "bob",
                       "--json", *flags),
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
        assert events_of(bob_out)[0] == {"event": "logged_in", "user": "bob"}
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
