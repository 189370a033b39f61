"""The programs' command lines as a person uses them (issue 16): `--version`,
usage errors, IPv6 addresses in pasteable form, the start-up line, and the
terminal client's own `/commands`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import common
from chat_client import TERMINAL_COMMANDS
from client_core import LOGIN_TIMEOUT, ClientCore
from tests.conftest import client_command, env_for_tests, spawn_server, stop_process

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip


def test_version_constant_is_pyprojects() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    assert common.__version__ == project["version"]


@pytest.mark.parametrize(
    ("script", "prog"),
    [("chat_server.py", "chat-server"), ("chat_client.py", "chat-client"),
     ("client_demo.py", "chat-demo")],
)  # fmt: skip
def test_version_flag_prints_program_and_version(script: str, prog: str) -> None:
    done = run(script, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{prog} {common.__version__}\n"


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_format_address_brackets_ipv6_only() -> None:
    assert common.format_address("::1", 5556) == "[::1]:5556"
    assert common.format_address("127.0.0.1", 5555) == "127.0.0.1:5555"
    assert common.parse_server(common.format_address("fe80::1", 7)) == ("fe80::1", 7)


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_server_prints_a_pasteable_address_and_a_client_logs_in(tmp_path: Path) -> None:
    running = spawn_server("--host", "::1", data_dir=tmp_path / "server-data")
    try:
        assert running.ready_line.startswith(f"chat-server listening on [::1]:{running.port}")
        assert running.host == "::1"
        assert running.addr_text == f"[::1]:{running.port}"
        client = subprocess.Popen(
            client_command("--server", running.addr_text, "--user", "alice", "--json"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT, env=env_for_tests(),
        )  # fmt: skip
        assert client.stdout is not None and client.stdin is not None
        first = json.loads(client.stdout.readline() or "{}")
        client.stdin.write("/quit\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=60)
        # The server it is on, as the user can paste it back (cluster failover).
        expected = {"event": "logged_in", "user": "alice", "server": running.addr_text}
        assert first == expected, (first, out, err)
        assert client.returncode == 0, err
    finally:
        stop_process(running)


def test_client_names_an_ipv6_server_in_pasteable_form() -> None:
    core = ClientCore("alice", "pw", server=("::1", 5556))
    core.connect(0.0)
    core.handle_timer(LOGIN_TIMEOUT + 1.0)
    messages = []
    while (event := core.next_event()) is not None:
        messages.append(getattr(event, "message", ""))
    assert any("server [::1]:5556 does not answer" in text for text in messages), messages


def test_ready_line_says_where_the_data_lives(tmp_path: Path) -> None:
    data = tmp_path / "server-data"
    running = spawn_server(data_dir=data)
    try:
        assert running.ready_line == (
            f"chat-server listening on {running.addr_text} (data in {data})\n"
        )
    finally:
        stop_process(running)


@pytest.mark.parametrize(
    ("value", "says"),
    [("abc", "argument --port: 'abc' is not a port number"),
     ("70000", "argument --port: 70000 is not a port: a port is 0..65535")],
)  # fmt: skip
def test_bad_port_says_what_is_wrong(value: str, says: str) -> None:
    done = run("chat_server.py", "--port", value)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == f"chat-server: error: {says}"
    assert "_address" not in done.stderr


def terminal_session(tmp_path: Path, lines: str, *flags: str) -> tuple[str, str]:
    """A terminal client of a fresh server, logged in as alice (to bob);
    `lines` typed once it is logged in, then /quit. Its stdout and stderr."""
    running = spawn_server(data_dir=tmp_path / "server-data")
    try:
        client = subprocess.Popen(
            client_command("--server", running.addr_text, "--user", "alice",
                           "--connect-to", "bob", *flags),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT, env=env_for_tests(),
        )  # fmt: skip
        assert client.stdout is not None and client.stdin is not None
        first = client.stdout.readline()
        assert "logged" in first, first
        client.stdin.write(lines + "/quit\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=60)
        return first + out, err
    finally:
        stop_process(running)


def test_help_unknown_command_and_escaped_slash_in_json(tmp_path: Path) -> None:
    out, err = terminal_session(tmp_path, "/help\n/bogus x\n//slash text\n", "--json")
    events = [json.loads(line) for line in out.splitlines()]
    helps = [event for event in events if event["event"] == "help"]
    assert helps == [{"event": "help", "commands": [use for use, _ in TERMINAL_COMMANDS]}]
    assert {"event": "error", "code": "unknown_command",
            "message": "unknown command /bogus; /help lists them"} in events  # fmt: skip
    sent = [event["text"] for event in events
            if event["event"] == "status" and event["state"] == "sending"]  # fmt: skip
    assert sent == ["/slash text"], (events, err)  # neither /help nor /bogus went as chat
    assert not any(event["event"] == "disconnected" and event["reason"] == "unknown_command"
                   for event in events)  # fmt: skip


def test_help_in_text_mode_lists_the_commands_on_stdout(tmp_path: Path) -> None:
    out, err = terminal_session(tmp_path, "/help\n/nope\n")
    for use, does in TERMINAL_COMMANDS:
        assert any(line.startswith(use) and line.endswith(does) for line in out.splitlines())
    assert "error: unknown command /nope; /help lists them" in err
