"""Cluster mode (issue 15) with real processes: `python chat_server.py
--cluster redis://...` nodes sharing a real redis-server (tests/redis_fixture.py),
and real clients. Three nodes with users spread over them, one SIGKILLed in
the middle of the traffic: nothing lost, nothing twice. Redis SIGKILLed and
started again: nothing accepted lost. A node cut off from Redis (a TCP gate
between them): it withholds acks, says so once, and recovers. And the
start-up errors: a bad URL, an unreachable Redis (exit status 2, one line,
never the password).

Clients reach a node through a `LossyProxy` without faults, used as the
client's address of the cluster: when the node dies the test points the
proxy at another node (`retarget`), which is what a client with a list of
servers does by itself; the client keeps its store and outbox, logs in
again there and resends what was not accepted, under the same ids."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.clients import RecordingClient, close_all, wait_all
from tests.conftest import ROOT, ServerProcess, spawn_server, stop_process
from tests.lossy_proxy import LossyProxy
from tests.redis_fixture import RedisServer, free_port, need_redis, redis_server  # noqa: F401

#: Clients notice a dead node quickly: a keepalive every half second.
FAST = {"keepalive": 0.5, "link_timeout": 3.0}


@pytest.fixture
def spawn_node(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def spawn(url: str, name: str) -> ServerProcess:
        node = spawn_server("--cluster", url, "--node-id", name, data_dir=tmp_path / name)
        started.append(node)
        return node

    yield spawn
    for node in started:
        stop_process(node)


def kill(node: ServerProcess) -> None:
    node.proc.kill()
    node.proc.wait(10)


def stderr_of(node: ServerProcess) -> str:
    """What a node logged: it is stopped first (the fixture closes its pipes later)."""
    if node.proc.poll() is None:
        node.proc.terminate()
        node.proc.wait(10)
    assert node.proc.stderr is not None
    return node.proc.stderr.read()


def test_three_nodes_one_killed_mid_stream_nothing_lost_nothing_twice(
    redis_server: RedisServer,  # noqa: F811
    spawn_node: Callable[..., ServerProcess],
) -> None:
    a, b, c = (spawn_node(redis_server.url, name) for name in "ABC")
    # alice and dave are on A, behind proxies that can move them.
    to_a1 = LossyProxy((a.host, a.port)).start()
    to_a2 = LossyProxy((a.host, a.port)).start()
    alice, dave = RecordingClient("alice", **FAST), RecordingClient("dave", **FAST)
    bob, carol = RecordingClient("bob", **FAST), RecordingClient("carol", **FAST)
    everyone = [alice, bob, carol, dave]
    try:
        for client, where in ((alice, to_a1.address), (dave, to_a2.address),
                              (bob, (b.host, b.port)), (carol, (c.host, c.port))):  # fmt: skip
            client.login(where)
        wait_all(everyone, lambda: all(x.logged_in for x in everyone), 10, "logins")
        count = 60
        streams = {alice: "bob", bob: "carol", carol: "dave", dave: "alice"}
        sent: dict[RecordingClient, list[str]] = {x: [] for x in streams}
        for i in range(count):
            for sender, recipient in streams.items():
                sent[sender].append(sender.send(f"{sender.name} {i}", recipient))
            if i == count // 3:
                kill(a)  # in the middle of the traffic, with messages in flight
                to_a1.retarget((b.host, b.port))
                to_a2.retarget((c.host, c.port))
            for client in everyone:
                client.pump()
            time.sleep(0.02)
        wait_all(
            everyone,
            lambda: all(s.delivered(ids) == count for s, ids in sent.items()),
            45,
            "every message delivered",
        )
        for sender, recipient in streams.items():
            receiver = next(x for x in everyone if x.name == recipient)
            got = [t for t in receiver.texts() if t.startswith(f"{sender.name} ")]
            # Each exactly once, in the order sent.
            assert got == [f"{sender.name} {i}" for i in range(count)], (sender.name, got)
            assert all(sender.states[i].count("delivered") == 1 for i in sent[sender])
            assert not sender.reasons  # none failed
        for moved in (alice, dave):  # their link went down with A and came back elsewhere
            assert [up for _, up in moved.links][-2:] == [False, True], moved.links
    finally:
        close_all(everyone)
        to_a1.stop()
        to_a2.stop()


def test_redis_killed_and_restarted_loses_nothing_accepted(
    redis_server: RedisServer,  # noqa: F811
    spawn_node: Callable[..., ServerProcess],
) -> None:
    a, b = spawn_node(redis_server.url, "A"), spawn_node(redis_server.url, "B")
    alice, bob = RecordingClient("alice", **FAST), RecordingClient("bob", **FAST)
    try:
        alice.login((a.host, a.port), "bob")
        bob.login((b.host, b.port))
        wait_all([alice, bob], lambda: alice.logged_in and bob.logged_in, 10, "logins")
        first = [alice.send(f"before {i}") for i in range(30)]
        alice.wait(lambda: all(alice.reached(i, "accepted") for i in first), what="accepted")
        redis_server.kill()
        during = [alice.send(f"during {i}") for i in range(20)]
        time.sleep(1.0)
        alice.pump()
        assert not any(alice.reached(i, "accepted") for i in during)  # no ack without Redis
        redis_server.start()
        wait_all(
            [alice, bob],
            lambda: alice.delivered(first + during) == 50,
            30,
            "everything delivered after the restart",
        )
        expected = [f"before {i}" for i in range(30)] + [f"during {i}" for i in range(20)]
        assert bob.texts() == expected
    finally:
        close_all([alice, bob])
    log = stderr_of(a)
    assert log.count("lost Redis") == 1 and log.count("is back after") == 1, log


class TcpGate:
    """A TCP forwarder between a node and Redis that can be cut (every
    connection closed, new ones closed at once) and healed."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = True
        self.links: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                conn.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                conn.close()
                continue
            with self.lock:
                self.links += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for end in (src, dst):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open = False
        with self.lock:
            links, self.links = self.links, []
        for link in links:
            with contextlib.suppress(OSError):
                link.shutdown(socket.SHUT_RDWR)
            link.close()

    def heal(self) -> None:
        self.open = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_a_node_cut_off_from_redis_withholds_acks_and_recovers(
    redis_server: RedisServer,  # noqa: F811
    spawn_node: Callable[..., ServerProcess],
) -> None:
    gate = TcpGate(redis_server.port)
    a = spawn_node(f"redis://127.0.0.1:{gate.port}/0", "A")
    b = spawn_node(redis_server.url, "B")
    alice, bob = RecordingClient("alice", **FAST), RecordingClient("bob", **FAST)
    try:
        alice.login((a.host, a.port), "bob")
        bob.login((b.host, b.port))
        wait_all([alice, bob], lambda: alice.logged_in and bob.logged_in, 10, "logins")
        before = alice.send("before the cut")
        alice.wait(lambda: alice.reached(before, "delivered"), what="delivered")
        gate.cut()
        cut = [alice.send(f"cut off {i}") for i in range(5)]
        time.sleep(1.5)
        alice.pump()
        assert all(alice.states[i] == ["sending"] for i in cut)  # withheld, not failed
        gate.heal()
        alice.wait(lambda: alice.delivered(cut) == 5, timeout=20, what="delivered after")
        assert bob.texts() == ["before the cut"] + [f"cut off {i}" for i in range(5)]
    finally:
        close_all([alice, bob])
        gate.close()
    log = stderr_of(a)
    assert log.count("lost Redis") == 1 and log.count("is back after") == 1, log


def run_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "chat_server.py"), "--port", "0", *args],
        capture_output=True, text=True, timeout=30, cwd=ROOT, env=env,
    )  # fmt: skip


def test_start_up_errors_are_one_line_and_never_show_the_password() -> None:
    need_redis(server=False)
    bad = run_server("--cluster", "http://user:hunter2@localhost:6379")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("chat-server: --cluster") and "not a redis:// URL" in bad.stderr
    assert "hunter2" not in bad.stderr and bad.stderr.count("\n") == 1
    # Unreachable, named in the environment (the password stays off the command line).
    env = dict(os.environ, CHAT_CLUSTER_URL=f"redis://u:hunter2@127.0.0.1:{free_port()}/0")
    gone = run_server(env=env)
    assert gone.returncode == 2 and "cannot reach Redis at redis://u:***@127.0.0.1:" in gone.stderr
    assert "is redis-server running there?" in gone.stderr and "hunter2" not in gone.stderr
    assert gone.stderr.count("\n") == 1


def test_a_node_says_where_it_is_in_its_ready_line(
    redis_server: RedisServer,  # noqa: F811
    spawn_node: Callable[..., ServerProcess],
) -> None:
    node = spawn_node(redis_server.url, "north")
    assert f"(node north of the cluster at {redis_server.url})" in node.ready_line


def test_a_redis_with_a_password_is_joined_with_it_and_refuses_a_wrong_one(
    tmp_path: Path, spawn_node: Callable[..., ServerProcess]
) -> None:
    need_redis()
    guarded = RedisServer(tmp_path / "guarded", password="s3cret-pass")
    guarded.start()
    try:
        node = spawn_node(guarded.url, "A")
        assert "redis://:***@127.0.0.1:" in node.ready_line and "s3cret" not in node.ready_line
        wrong = run_server("--cluster", f"redis://:nope-nope@127.0.0.1:{guarded.port}/0")
        assert wrong.returncode == 2 and "refused the login" in wrong.stderr
        assert "check the user and password" in wrong.stderr and "nope-nope" not in wrong.stderr
    finally:
        guarded.stop()
