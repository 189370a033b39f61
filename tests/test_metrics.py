"""`chat-server --metrics HOST:PORT` (issue 16): the Prometheus text format
read back line by line by a strict parser, counters that move by what real
clients did, 404 for anything but /metrics, and a scrape that never holds
up the relay. The format's pieces (`Histogram`, `exposition`) in memory."""

from __future__ import annotations

import ast
import functools
import math
import queue
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import chat_server
import common
from bench.metrics_scrape import scrape_cost
from chat_server import ChatServer
from server_metrics import Family, Histogram, exposition, label_value
from tests.clients import RecordingClient, close_all
from tests.conftest import (
    ROOT,
    ServerProcess,
    spawn_server,
    stop_process,
)
from tests.conftest import test_config as server_config

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(
    rf"({METRIC_NAME})(?:\{{((?:{LABEL})(?:,{LABEL})*)?\}})? "
    r"(-?[0-9.]+(?:e[+-]?[0-9]+)?|NaN|[+-]Inf)"
)
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[Series, dict[str, str]]:
    """The samples of a text exposition (name, sorted labels) -> value, and
    each family's type; fails on anything the format (0.0.4) does not allow
    or that Prometheus would refuse (a sample before its TYPE, a family
    declared twice, a counter not ending in _total, a duplicate series,
    histogram buckets that are not cumulative or do not end at +Inf = _count)."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    series: Series = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    current = ""
    for number, line in enumerate(text.split("\n")[:-1], 1):
        where = f"line {number}: {line!r}"
        assert line, f"{where}: empty line"
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(METRIC_NAME, name), where
            assert name not in helps, f"{where}: HELP twice"
            helps.add(name)
            current = name
            continue
        if line.startswith("# TYPE "):
            parts = line.split(" ")
            assert len(parts) == 4 and parts[3] in TYPES, where
            name = parts[2]
            assert name == current and name not in types, f"{where}: TYPE apart from its HELP"
            types[name] = parts[3]
            if parts[3] == "counter":
                assert name.endswith("_total"), f"{where}: a counter's name ends in _total"
            continue
        assert not line.startswith("#"), f"{where}: unknown comment"
        match = SAMPLE.fullmatch(line)
        assert match, f"{where}: not a sample"
        name, labels_text, value_text = match.groups()
        family = name
        if types.get(current) == "histogram":
            family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert family == current and current in types, f"{where}: a sample outside its family"
        labels = tuple(sorted(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"',
                                         labels_text or "")))  # fmt: skip
        key = (name, labels)
        assert key not in series, f"{where}: the same series twice"
        value = float(value_text.replace("Inf", "inf"))
        if types[current] == "counter":
            assert value >= 0 and value == int(value), f"{where}: a counter is a whole number"
        series[key] = value
    for name, kind in types.items():
        if kind == "histogram":
            buckets = sorted(
                (float(dict(labels)["le"].replace("Inf", "inf")), value)
                for (sample, labels), value in series.items()
                if sample == f"{name}_bucket"
            )
            assert buckets and math.isinf(buckets[-1][0]), f"{name}: no +Inf bucket"
            counts = [count for _, count in buckets]
            assert counts == sorted(counts), f"{name}: buckets not cumulative: {buckets}"
            assert counts[-1] == series[(f"{name}_count", ())], f"{name}: +Inf != _count"
            assert (f"{name}_sum", ()) in series
    return series, types


def value(series: Series, name: str, **labels: str) -> float:
    return series[(name, tuple(sorted(labels.items())))]


def get(url: str, method: str = "GET") -> tuple[int, str, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode("utf-8")


def scrape(base: str) -> Series:
    status, content_type, body = get(base + "/metrics")
    assert status == 200, body
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    return parse(body)[0]


def read_lines(stream: Any, into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


def wait_line(lines: queue.Queue[str], pattern: str, timeout: float = 10.0) -> re.Match[str]:
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line matching {pattern!r}; saw {seen}") from None
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match


@pytest.fixture
def metrics_process(tmp_path: Path) -> Iterator[tuple[ServerProcess, str, queue.Queue[str]]]:
    """A server process with --metrics on a free port: the process, the
    metrics' base URL (from its start-up log line), and its stderr lines."""
    # The key exchange on the loop (--key-workers 0): at load average 30-50
    # the test saw 3 logins counted for 2 users, twice. Most likely the
    # pool's worker process, started at the first registration, took over
    # 3 s to come up; the client, its LOGIN unanswered that long, began its
    # login again (LOGIN_STEP), and both logins opened a session.
    # (tests/test_keyx.py tests the pool.)
    running = spawn_server("--metrics", "127.0.0.1:0", "--log-level", "info", "--key-workers",
                           "0", data_dir=tmp_path / "server-data")  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(running.proc.stderr, lines), daemon=True)
    reader.start()
    try:
        match = wait_line(lines, r"started: .* metrics at (http://\S+)/metrics;")
        yield running, match.group(1), lines
    finally:
        # The reader ends at the end of the process's stderr: closing the
        # stream under it (stop_process) while it reads raised ValueError in
        # its thread, which failed the next test on a loaded machine.
        running.proc.terminate()
        try:
            running.proc.wait(10)
        except subprocess.TimeoutExpired:
            running.proc.kill()
            running.proc.wait(10)
        reader.join(10)
        stop_process(running)


def test_a_real_server_counts_what_real_clients_did(
    metrics_process: tuple[ServerProcess, str, queue.Queue[str]],
) -> None:
    running, base, _ = metrics_process
    address = (running.host, running.port)
    before = scrape(base)
    assert value(before, "chat_sessions") == 0
    assert value(before, "chat_build_info", version=common.__version__) == 1
    # Every drop reason is there from the start (at 0), so alerts can be written on it.
    for reason in chat_server.DROP_REASONS:
        assert value(before, "chat_datagrams_dropped_total", reason=label_value(reason)) == 0
    bob, alice = RecordingClient("bob"), RecordingClient("alice")
    clients = [bob, alice]
    try:
        assert bob.login(address) and alice.login(address, "bob")
        for client in clients:
            client.wait(functools.partial(getattr, client, "logged_in"), what="login")
        logged_in = scrape(base)
        assert value(logged_in, "chat_sessions") == 2
        assert value(logged_in, "chat_logins_total") == 2
        assert value(logged_in, "chat_registrations_total") == 2
        assert value(logged_in, "chat_accounts") == 2

        texts = ["hello bob", "ünïcödé: 3 bytes → here", "x" * 3000]  # the last in fragments
        ids = [alice.send(text) for text in texts]
        reply = bob.send("hi alice", "alice")
        alice.wait(lambda: alice.delivered(ids) == 3, what="delivered")
        bob.wait(lambda: bob.delivered([reply]) == 1, what="reply delivered")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(b"not a chat datagram", address)  # garbage: one malformed drop
        after = scrape(base)
        while value(after, "chat_datagrams_dropped_total", reason="malformed") == 0:
            after = scrape(base)  # the loop takes the datagram in its own time
    finally:
        close_all(clients)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(logged_in, name, **labels)

    assert moved("chat_messages_relayed_total") == 4
    assert moved("chat_message_bytes_relayed_total") == sum(
        len(text.encode("utf-8")) for text in [*texts, "hi alice"]
    )
    assert moved("chat_logins_total") == 0
    assert moved("chat_datagrams_dropped_total", reason="malformed") == 1
    # 3,000 bytes only fit in three datagrams at least; every message was acked and receipted.
    assert moved("chat_datagrams_received_total") >= 6
    assert moved("chat_datagrams_sent_total") >= 6
    assert moved("chat_received_bytes_total") > 3000
    assert moved("chat_sent_bytes_total") > 3000
    # Each message was committed (4 rows, and their receipts): at least one commit, timed.
    assert moved("chat_store_commit_seconds_count") >= 1
    assert moved("chat_store_commit_seconds_sum") > 0
    assert value(after, "chat_store_queue_depth") >= 0
    assert value(after, "process_resident_memory_bytes") > 1 << 20
    assert value(after, "chat_uptime_seconds") > value(before, "chat_uptime_seconds")
    assert value(after, "chat_reassembly_bytes") == 0  # the long message was reassembled
    assert value(after, "chat_key_exchange_backlog") == 0


def test_failed_logins_are_counted_by_reason(
    metrics_process: tuple[ServerProcess, str, queue.Queue[str]],
) -> None:
    running, base, _ = metrics_process
    address = (running.host, running.port)
    owner = RecordingClient("carol")
    try:
        assert owner.login(address)
        owner.wait(lambda: owner.logged_in, what="login")
    finally:
        close_all([owner])
    guesser = RecordingClient("carol")
    try:
        guesser.login(address, password="not carol's password")
        guesser.wait(lambda: guesser.disconnected is not None, what="refusal")
        assert guesser.disconnected == "bad_password"
    finally:
        guesser.close()
    series = scrape(base)
    assert value(series, "chat_login_failures_total", reason="bad_password") == 1
    assert value(series, "chat_login_failures_total", reason="too_many_failures") == 0
    assert value(series, "chat_logins_total") == 1


def test_anything_but_metrics_is_not_found(
    metrics_process: tuple[ServerProcess, str, queue.Queue[str]],
) -> None:
    """Each path of one server process (a test per path before: a server
    process each for the same facet)."""
    _, base, _ = metrics_process
    for path in ["/", "/metric", "/metrics/", "/metrics/x", "/favicon.ico"]:
        status, _, body = get(base + path)
        assert status == 404, path
        assert "/metrics" in body, path


def test_head_answers_without_a_body_and_post_is_refused(
    metrics_process: tuple[ServerProcess, str, queue.Queue[str]],
) -> None:
    _, base, _ = metrics_process
    assert get(base + "/metrics", "HEAD")[:2] == (200, "text/plain; version=0.0.4; charset=utf-8")
    assert get(base + "/metrics", "HEAD")[2] == ""
    assert get(base + "/metrics", "POST")[0] == 501
    assert scrape(base)  # still serving


def test_a_stuck_scrape_never_holds_up_the_relay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metrics thread stuck twice over, in gathering (a slow read) and
    behind a connection that never sends its request: two clients still log
    in, and a message is accepted and delivered. Then the scrape completes."""
    gathering, release = threading.Event(), threading.Event()
    original = ChatServer.metrics

    def slow_metrics(self: ChatServer) -> list[Family]:
        gathering.set()
        release.wait(30)
        return original(self)

    monkeypatch.setattr(ChatServer, "metrics", slow_metrics)
    server = ChatServer(("127.0.0.1", 0), server_config(tmp_path / "server-data"),
                        metrics=("127.0.0.1", 0))  # fmt: skip
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    clients: list[RecordingClient] = []
    try:
        assert server.metrics_address is not None
        port = server.metrics_address[1]
        answers: queue.Queue[tuple[int, str, str]] = queue.Queue()
        scraper = threading.Thread(
            target=lambda: answers.put(get(f"http://127.0.0.1:{port}/metrics")), daemon=True
        )
        scraper.start()
        assert gathering.wait(10)
        with socket.create_connection(("127.0.0.1", port)):  # says nothing
            bob, alice = RecordingClient("bob"), RecordingClient("alice")
            clients = [bob, alice]
            assert bob.login(server.address) and alice.login(server.address, "bob")
            for client in clients:
                client.wait(functools.partial(getattr, client, "logged_in"), what="login")
            sent = alice.send("while the metrics thread is stuck")
            alice.wait(lambda: alice.delivered([sent]) == 1, what="delivered")
            assert answers.empty()  # the scrape was stuck all along
            release.set()
        status, _, body = answers.get(timeout=10)
        assert status == 200
        series, _ = parse(body)
        assert value(series, "chat_messages_relayed_total") == 1
    finally:
        release.set()
        close_all(clients)
        server.shutdown()
        thread.join(5)
        server.close()


def test_closing_the_server_stops_the_metrics() -> None:
    server = ChatServer(("127.0.0.1", 0), server_config(None), metrics=("127.0.0.1", 0))
    assert server.metrics_address is not None
    port = server.metrics_address[1]
    assert scrape(f"http://127.0.0.1:{port}")
    server.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


# --- the command line ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "says"),
    [("9555", "'9555' is not HOST:PORT"), ("localhost:", "'localhost:' is not HOST:PORT"),
     ("::1:9555", "put an IPv6 address in brackets"), ("host:abc", "'abc' is not a port number"),
     ("host:70000", "70000 is not a port")],
)  # fmt: skip
def test_bad_metrics_address_says_what_is_wrong(
    value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server's own command line parser, in this process: a real
    `chat_server.py` turns its errors into exit status 2 and the last line
    of stderr (test_cli_usage's `test_bad_port_says_what_is_wrong`)."""
    with pytest.raises(SystemExit) as exited:
        chat_server.parse_arguments(["--metrics", value])
    assert exited.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("chat-server: error: argument --metrics: "), last
    assert says in last


def test_a_taken_metrics_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, str(ROOT / "chat_server.py"), "--port", "0",
             "--data-dir", str(tmp_path / "data"), "--metrics", f"127.0.0.1:{port}"],
            capture_output=True, text=True, cwd=ROOT, timeout=30,
        )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        f"chat-server: --metrics: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "is another program using that port? Pick another --metrics port.\n"
    )
    assert not (tmp_path / "data").exists()  # found before the store was opened


def test_metrics_address_takes_ipv6_in_brackets_and_port_0() -> None:
    parse = chat_server.build_parser().parse_args
    assert parse(["--metrics", "[::1]:9555"]).metrics == ("::1", 9555)
    assert parse(["--metrics", "0.0.0.0:0"]).metrics == ("0.0.0.0", 0)
    assert parse(["--metrics", "localhost:9555"]).metrics == ("localhost", 9555)
    try:
        server = ChatServer(("127.0.0.1", 0), server_config(None), metrics=("::1", 0))
    except chat_server.MetricsListenError as exc:  # no IPv6 loopback here: said in one line
        assert chat_server.metrics_problem("::1", 0, exc).startswith("--metrics: ")
        return
    try:
        assert server.metrics_address is not None
        assert scrape(f"http://[::1]:{server.metrics_address[1]}")
    finally:
        server.close()


def test_metrics_host_that_is_not_here_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "chat_server.py"), "--port", "0",
         "--data-dir", str(tmp_path / "data"), "--metrics", "192.0.2.1:9555"],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        "chat-server: --metrics: 192.0.2.1 is not an address of this machine; give one of its "
        "addresses, e.g. 127.0.0.1:9555\n"
    )


def test_metrics_are_off_by_default() -> None:
    assert chat_server.build_parser().parse_args([]).metrics is None
    server = ChatServer(("127.0.0.1", 0), server_config(None))
    try:
        assert server.metrics_address is None
    finally:
        server.close()


# --- in memory ------------------------------------------------------------------


def test_drop_reasons_are_the_phrases_the_relay_uses() -> None:
    tree = ast.parse((ROOT / "chat_server.py").read_text("utf-8"))
    used: set[str] = {
        str(node.args[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "drops"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    assert used == set(chat_server.DROP_REASONS)
    assert len({label_value(reason) for reason in used}) == len(used)  # distinct labels


def test_histogram_counts_into_buckets_and_renders_cumulatively() -> None:
    histogram = Histogram((0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.001, 0.002, 0.05, 0.5, 3.0):
        histogram.observe(seconds)
    counts, total = histogram.snapshot
    assert counts == (2, 1, 1, 2)
    assert total == pytest.approx(3.5535)
    family = Family("t_seconds", "histogram", "a test", histogram=(
        histogram.bounds, histogram.snapshot))  # fmt: skip
    series, types = parse(exposition([family]))
    assert types == {"t_seconds": "histogram"}
    assert [value(series, "t_seconds_bucket", le=le) for le in ("0.001", "0.01", "0.1", "+Inf")] \
        == [2, 3, 4, 6]  # fmt: skip
    assert value(series, "t_seconds_count") == 6
    with pytest.raises(ValueError):
        Histogram((0.1, 0.01))


def test_label_values_are_escaped_and_reasons_become_names() -> None:
    family = Family("t_total", "counter", 'help with \\ backslash', [
        ({"what": 'a "quoted"\\ value\nnext'}, 3)])  # fmt: skip
    text = exposition([family])
    assert 't_total{what="a \\"quoted\\"\\\\ value\\nnext"} 3\n' in text
    assert "# HELP t_total help with \\\\ backslash\n" in text
    parse(text)
    assert label_value("output cap: input waits for acks") == "output_cap_input_waits_for_acks"
    assert label_value("pre-login datagram without one HELLO or LOGIN") == (
        "pre_login_datagram_without_one_hello_or_login"
    )


def test_the_scrape_benchmark_runs() -> None:
    """bench/metrics_scrape.py's in-process part, tiny, so it never rots
    (no timing is judged)."""
    micros, size = scrape_cost(repeat=3)
    assert micros > 0 and size > 4000
