"""The operator's side of the server (issue 16, items 5 and 6): the log
lines worth an operator's eyes (read from a real server's stderr, and from
the relay in memory for the rate limits on them), `--help` examples that
are real command lines, and docs/deploy: the systemd unit, the
Containerfile and the health check, each checked against the server's own
argument parser and the files in the repository."""

from __future__ import annotations

import configparser
import glob
import json
import logging
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import chat_client
import chat_server
import common
from chat_server import Relay, gather_metrics
from client_core import AccountDeleted, ErrorEvent, PasswordChanged
from protocol import ErrorCode, Refused, Welcome
from server_records import User
from server_router import LocalRouter, Route
from tests.clients import RecordingClient, close_all
from tests.conftest import PASSWORD, ROOT, spawn_server, stop_process
from tests.test_client_core import Net
from tests.test_login_guard import junk_logins, log_in, open_relay

DEPLOY = ROOT / "docs" / "deploy"
UNIT = DEPLOY / "chat-server.service"
CONTAINERFILE = DEPLOY / "Containerfile"
HEALTHCHECK = DEPLOY / "healthcheck.py"


def read_lines(stream: object, into: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)


def lines_until(lines: queue.Queue[str], pattern: str, timeout: float = 10.0) -> list[str]:
    """The lines read up to and with the first that matches `pattern`."""
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line matching {pattern!r}; saw {seen}") from None
        seen.append(line)
        if re.search(pattern, line):
            return seen


# --- log lines ------------------------------------------------------------------


def test_a_real_server_logs_start_limits_failures_and_stop(tmp_path: Path) -> None:
    data = tmp_path / "server-data"
    running = spawn_server("--log-level", "info", "--preauth-total-rate", "5",
                           "--max-memory", "300", data_dir=data)  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(running.proc.stderr, lines), daemon=True)
    reader.start()
    try:
        start = lines_until(lines, r"started: ")[-1]
        assert f"INFO chat_server: chat-server {common.__version__} started: " in start
        assert f"UDP {running.addr_text}, data in {data}, no metrics; " in start
        assert "limits: 20000 sessions, --max-memory 300 MiB, 200 messages/s per user, " in start
        assert "(5/s from all)" in start

        owner = RecordingClient("carol")
        assert owner.login((running.host, running.port))
        owner.wait(lambda: owner.logged_in, what="login")
        close_all([owner])
        guesser = RecordingClient("carol")
        guesser.login((running.host, running.port), password="not " + PASSWORD)
        guesser.wait(lambda: guesser.disconnected is not None, what="refusal")
        guesser.close()
        failed = lines_until(lines, r"failed login")[-1]
        assert re.search(
            r"WARNING chat_server: failed login for carol from 127\.0\.0\.1:\d+ "
            r"\(1 failed or refused logins since the last such line\)",
            failed,
        )

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
            for _ in range(40):  # far over 5/s (burst 10) of traffic without a session
                flood.sendto(b"x" * 300, (running.host, running.port))
        hit = lines_until(lines, r"limit hit")[-1]
        assert re.search(
            r"WARNING chat_server: limit hit: pre-login budget, from "
            r"127\.0\.0\.1:\d+ \(1 times since last report\)",
            hit,
        )
    finally:
        running.proc.send_signal(signal.SIGTERM)
        running.proc.wait(10)
        reader.join(10)  # to the end of its stderr
        stop_process(running)
    assert running.proc.returncode == 0
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    text = "".join(rest)
    # carol logged out before; at load average 38 her logout's ack wait ran
    # out before the server had it, and she was still there to be told.
    assert re.search(
        r"INFO chat_server: stopping on SIGTERM: told (0 sessions|1 session) the server is "
        r"shutting down\n", text
    ), text  # fmt: skip
    assert re.search(r"INFO chat_server: stopped after \d+\.\d s\n", text), text
    # One line per limit per interval: the 30 or so pre-login datagrams
    # dropped were all in the one line above.
    assert "limit hit" not in text


def test_login_failures_in_a_burst_are_a_few_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """100 wrong passwords for bob from 50 addresses over 20 s (most of them
    held back by the failure windows): at most one warning per 10 s, each
    counting what happened since the line before, instead of a line each."""
    relay = open_relay()
    now = 1000.0
    log_in(relay, "bob", PASSWORD, ("198.51.100.5", 7000), now)
    caplog.set_level(logging.INFO, logger="chat_server")
    caplog.clear()
    for i in range(100):
        now += 0.2
        log_in(relay, "bob", "wrong", (f"203.0.{i % 50}.1", 1000 + i), now, instance_id=1000 + i)
    failures = relay.stats["login_failures"] + relay.stats["login_throttled"]
    assert failures == 100
    lines = [r for r in caplog.records if "login" in r.getMessage() and "bob" in r.getMessage()]
    assert 2 <= len(lines) <= 3, [r.getMessage() for r in lines]
    assert all(r.levelno == logging.WARNING for r in lines)
    counted = [int(re.findall(r"\((\d+) failed or refused", r.getMessage())[0]) for r in lines]
    assert counted[0] == 1 and sum(counted) <= failures


def test_new_accounts_over_the_address_limit_are_a_warning_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = open_relay(registration_rate=0.01, registration_burst=1.0)
    caplog.set_level(logging.INFO, logger="chat_server")
    assert isinstance(log_in(relay, "alice", PASSWORD, ("192.0.2.9", 1), 10.0).answer, Welcome)
    for i in range(5):
        refused = log_in(relay, f"sock{i}", PASSWORD, ("192.0.2.9", 2 + i), 11.0)
        assert isinstance(refused.answer, Refused)
        assert refused.answer.code == ErrorCode.RATE_LIMITED
    lines = [r for r in caplog.records if "registration refused" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in lines] == [(
        logging.WARNING, "registration refused for sock0 from 192.0.2.9:2: too many new "
        "accounts from that address (1 failed or refused logins since the last such line)",
    )]  # fmt: skip
    families = {family.name: family for family in gather_metrics(relay, None, 0.0, 0.0)}
    reasons = {labels["reason"]: value
               for labels, value in families["chat_login_failures_total"].samples}  # fmt: skip
    assert reasons["registrations_throttled"] == 5


def test_a_pre_login_flood_is_one_limit_warning_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = open_relay(preauth_total_rate=1.0, preauth_total_burst=1.0)
    caplog.set_level(logging.INFO, logger="chat_server")
    for step in range(50):
        relay.receive_datagram(b"x" * 300, ("192.0.2.1", 4000), 100.0 + step * 0.1)  # 5 s
    relay.receive_datagram(b"x" * 300, ("192.0.2.1", 4000), 111.0)  # the next interval
    relay.receive_datagram(b"x" * 300, ("192.0.2.1", 4000), 111.0)
    hits = [r for r in caplog.records if "limit hit" in r.getMessage()]
    assert [r.levelno for r in hits] == [logging.WARNING, logging.WARNING]
    assert hits[0].getMessage() == (
        "limit hit: pre-login budget, from 192.0.2.1:4000 (1 times since last report)"
    )
    dropped = relay.drops.counts["pre-login budget"]
    assert hits[1].getMessage().endswith(f"({dropped - 1} times since last report)")
    # The internet's noise stays at INFO: the garbage that came within the budget.
    noise = [r.levelno for r in caplog.records if "malformed" in r.getMessage()]
    assert noise and set(noise) == {logging.INFO}


def test_a_full_server_says_so_once_per_interval_and_counts_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = open_relay(max_sessions=1)
    caplog.set_level(logging.INFO, logger="chat_server")
    assert isinstance(log_in(relay, "alice", PASSWORD, ("192.0.2.1", 1), 10.0).answer, Welcome)
    for i in range(3):
        turned = log_in(relay, f"user{i}", PASSWORD, ("192.0.2.2", 2 + i), 11.0 + i)
        assert isinstance(turned.answer, Refused)
        assert turned.answer.code == ErrorCode.SERVER_ERROR
    assert relay.stats["login_server_full"] == 3
    full = [r for r in caplog.records if "the server is full" in r.getMessage()]
    assert [r.getMessage() for r in full] == [
        "limit hit: the server is full (--max-sessions 1): logins wait"
    ]
    assert full[0].levelno == logging.WARNING


def test_registrations_and_invalid_names_are_counted_in_the_metrics() -> None:
    relay = open_relay()
    log_in(relay, "alice", PASSWORD, ("192.0.2.1", 1), 10.0)
    log_in(relay, "bob", PASSWORD, ("192.0.2.1", 2), 10.0)
    for data, addr in junk_logins(10, "alice"):  # nine invalid names, one forged cookie
        relay.receive_datagram(data, addr, 11.0)
    families = {family.name: family for family in gather_metrics(relay, None, 0.0, 0.0)}
    reasons = {labels["reason"]: value
               for labels, value in families["chat_login_failures_total"].samples}  # fmt: skip
    assert reasons == {"bad_password": 0, "invalid_name": 9, "too_many_failures": 0,
                       "registrations_throttled": 0, "registrations_busy": 0,
                       "server_full": 0, "name_quarantined": 0}  # fmt: skip
    assert families["chat_registrations_total"].samples == [({}, 2)]
    assert families["chat_logins_total"].samples == [({}, 2)]
    drops = families["chat_datagrams_dropped_total"].samples
    dropped = {labels["reason"]: value for labels, value in drops}
    assert dropped["login_with_a_stale_or_forged_cookie"] == 1


# --- --help -------------------------------------------------------------------------


def example_commands(epilog: str, program: str) -> list[list[str]]:
    """The command lines of an epilog's examples (what precedes the
    two-space gap before the comment), as argument lists without the program."""
    commands = []
    for line in epilog.splitlines():
        text = line.strip()
        if text.startswith(program) and line.startswith("  "):
            command = re.split(r"\s{2,}", text)[0]
            commands.append(shlex.split(command)[1:])
    return commands


def test_server_help_shows_examples_that_are_real_command_lines() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "chat_server.py"), "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)  # fmt: skip
    assert done.returncode == 0
    assert "\nexamples:\n  chat-server  " in done.stdout  # kept as written (RawDescription)
    commands = example_commands(chat_server.SERVER_EXAMPLES, "chat-server")
    assert len(commands) >= 5
    flags: set[str] = set()
    for argv in commands:
        chat_server.parse_arguments(argv)  # exits 2 on a flag that does not exist
        flags.update(arg for arg in argv if arg.startswith("--"))
    assert {"--host", "--port", "--data-dir", "--metrics"} <= flags


def test_client_help_shows_examples_that_are_real_command_lines() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "chat_client.py"), "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)  # fmt: skip
    assert done.returncode == 0
    assert "\nexamples:\n  chat-client  " in done.stdout
    commands = example_commands(chat_client.CLIENT_EXAMPLES, "chat-client")
    assert len(commands) >= 4
    for argv in commands:
        chat_client.build_parser().parse_args(argv)
    assert ["--server", "[2001:db8::1]:5555"] in commands
    assert any("--json" in argv and "--no-gui" in argv for argv in commands)


# --- docs/deploy ------------------------------------------------------------------------


def unit_file() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read(UNIT, encoding="utf-8")
    return parser


def test_systemd_unit_has_the_user_state_restart_and_hardening_it_needs() -> None:
    unit = unit_file()
    service = unit["Service"]
    expected = {
        "DynamicUser": "yes", "StateDirectory": "udp-chat", "Restart": "on-failure",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes",
    }  # fmt: skip
    assert {key: service.get(key) for key in expected} == expected
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    program, *argv = shlex.split(service["ExecStart"])
    assert program.endswith("/bin/chat-server")
    args = chat_server.parse_arguments(
        [arg.replace("${STATE_DIRECTORY}", "/var/lib/udp-chat") for arg in argv]
    )
    assert argv[argv.index("--data-dir") + 1] == "${STATE_DIRECTORY}"
    assert args.host == "0.0.0.0"
    # The kernel's limit above the server's own, so the server's acts first.
    memory_max = int(service["MemoryMax"].removesuffix("M"))
    assert args.max_memory < memory_max <= 1.5 * args.max_memory


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """systemd's own check of the unit, where systemd-analyze exists; it
    wants ExecStart's program to exist, so a copy points at a real one."""
    analyze = shutil.which("systemd-analyze")
    text = UNIT.read_text("utf-8")
    program = shlex.split(unit_file()["Service"]["ExecStart"])[0]
    copy = tmp_path / "chat-server.service"
    copy.write_text(text.replace(program, sys.executable), "utf-8")
    if analyze is None:
        # No systemd here: at least every line is a section, a comment or key=value.
        for line in text.splitlines():
            assert not line or line[0] in "#[" or re.match(r"[A-Z]\w*=", line), line
        return
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "chat-server.service" not in done.stderr, done.stderr  # no warning about it


def containerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text("utf-8"))
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_containerfile_copies_files_that_exist_and_runs_real_flags() -> None:
    instructions = containerfile()
    by_keyword: dict[str, list[str]] = {}
    for keyword, rest in instructions:
        by_keyword.setdefault(keyword, []).append(rest)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    copied = []
    for rest in by_keyword["COPY"]:
        *sources, _ = rest.split()
        for source in sources:
            found = glob.glob(source, root_dir=ROOT)
            assert found, f"COPY {source}: no such file in the repository"
            copied += found
    # Everything pip needs to install the project: pyproject's modules and its readme.
    modules = re.search(r"py-modules = \[(.*?)\]", (ROOT / "pyproject.toml").read_text("utf-8"),
                        re.S)  # fmt: skip
    assert modules is not None
    for module in re.findall(r'"(\w+)"', modules.group(1)):
        assert f"{module}.py" in copied, f"{module}.py is not copied"
    assert "README.md" in copied and "pyproject.toml" in copied
    # Not root, the data in the volume, the port exposed for UDP.
    assert by_keyword["USER"] == ["chat"]
    entrypoint = json.loads(by_keyword["ENTRYPOINT"][0])
    cmd = json.loads(by_keyword["CMD"][0])
    assert entrypoint[0] == "chat-server"
    args = chat_server.parse_arguments(entrypoint[1:] + cmd)
    assert json.loads(by_keyword["VOLUME"][0]) == [str(args.data_dir)]
    assert by_keyword["EXPOSE"] == [f"{args.port}/udp"]
    assert args.host == "0.0.0.0"
    # The health check runs a script that is copied, against the server's port.
    healthcheck = by_keyword["HEALTHCHECK"][0]
    probe = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert probe[1] == "/app/healthcheck.py" and "docs/deploy/healthcheck.py" in copied
    assert by_keyword["WORKDIR"] == ["/app"]
    assert probe[2] == f"127.0.0.1:{args.port}"


def test_healthcheck_tells_a_live_server_from_none(tmp_path: Path) -> None:
    running = spawn_server(data_dir=tmp_path / "server-data")
    try:
        done = subprocess.run([sys.executable, str(HEALTHCHECK), running.addr_text],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"healthcheck: chat-server at {running.addr_text} answers\n"
    finally:
        stop_process(running)
    # The same port, nobody there now.
    done = subprocess.run([sys.executable, str(HEALTHCHECK), running.addr_text],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"healthcheck: chat-server at {running.addr_text} does not "
                                  "answer")  # fmt: skip


def test_deploy_readme_names_the_files_and_the_commands() -> None:
    text = (DEPLOY / "README.md").read_text("utf-8")
    for name in ("chat-server.service", "Containerfile", "healthcheck.py"):
        assert f"`{name}`" in text
    for command in (
        "systemctl enable --now chat-server",
        "journalctl -u chat-server",
        "build -f docs/deploy/Containerfile",
        "-v udp-chat-data:/data",
    ):
        assert command in text  # fmt: skip
    assert "the image was never built" in text  # no pretending: no container runtime here


def test_password_changes_deletions_and_wrong_passwords_for_them_are_counted() -> None:
    net = Net()
    alice, bob = net.login("alice", "bob")
    bob.core.change_password("not bob's password", "whatever")
    net.run(lambda: any(e.code == "bad_password" for e in bob.of(ErrorEvent)), "refused")
    alice.core.change_password("alice-pw", "a new secret")
    net.run(lambda: bool(alice.of(PasswordChanged)), "password changed")
    bob.core.delete_account("bob-pw")
    net.run(lambda: bool(bob.of(AccountDeleted)), "account deleted")
    families = {family.name: family for family in gather_metrics(net.relay, None, 0.0, 0.0)}
    assert families["chat_passwords_changed_total"].samples == [({}, 1)]
    assert families["chat_accounts_deleted_total"].samples == [({}, 1)]
    assert families["chat_account_proof_failures_total"].samples == [({}, 1)]
    assert families["chat_accounts"].samples == [({}, 1)]


class ElsewhereRouter(LocalRouter):
    """Bob's session is on another node of a cluster (a route that is a node id)."""

    def locate(self, user: User) -> Route:
        return "node-2" if user.key == "bob" else super().locate(user)


def test_messages_to_another_node_are_counted() -> None:
    net = Net()
    net.relay = Relay(net.config, router=ElsewhereRouter(),
                      wall_clock=lambda: 1_700_000_000.0 + net.now)  # fmt: skip
    (alice,) = net.login("alice")
    bob = net.add("bob", "bob-pw")  # an account, then gone
    net.run(lambda: bob.logged_in, "bob registered")
    msg = alice.core.send("to the other node", net.now, to="bob")
    net.run(lambda: "accepted" in alice.states(msg), "accepted")
    families = {family.name: family for family in gather_metrics(net.relay, None, 0.0, 0.0)}
    assert families["chat_messages_routed_elsewhere_total"].samples == [({}, 1)]
    assert families["chat_messages_relayed_total"].samples == [({}, 1)]
