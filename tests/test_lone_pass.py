"""What a message costs the socket loop when it travels alone (issue 18,
items 2 and 4): passes, wake-ups, system calls, timers.

Counts, never durations. A real server in a thread of this process (its
socket wrapped to count the reads that find nothing) with real clients; the
loop's own pieces (`ChatServer._wake`, `ChatServer._timeout`) on a server
that is not serving; the relay's timers on a fake clock (`test_bounds.World`).
"""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chat_server import COMMIT_WAIT, EXPIRY_GRID, ChatServer
from server_store import LAZY_HOLD, NoticeDone
from tests.clients import RecordingClient, close_all, wait_all
from tests.conftest import RunningServer, stop_server
from tests.conftest import test_config as server_config
from tests.test_bounds import World

Address = tuple[str, int]


class CountingSocket:
    """The server's UDP socket, counting the reads that found nothing (what
    the loop asks of its socket: fileno for select, recvfrom, sendto)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reads = 0
        self.empty_reads = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def recvfrom(self, size: int) -> tuple[bytes, Any]:
        self.reads += 1
        try:
            return self.sock.recvfrom(size)
        except BlockingIOError:
            self.empty_reads += 1
            raise

    def sendto(self, data: bytes, addr: Address) -> int:
        return self.sock.sendto(data, addr)

    def close(self) -> None:
        self.sock.close()

    def setsockopt(self, *args: Any) -> None:
        self.sock.setsockopt(*args)

    def getsockname(self) -> Any:
        return self.sock.getsockname()


@pytest.fixture
def counted(tmp_path: Path) -> Iterator[tuple[RunningServer, CountingSocket]]:
    """A server with a data directory (SQLite, its store thread) serving on
    a thread, its socket counted."""
    server = ChatServer(("127.0.0.1", 0), server_config(tmp_path / "data"))
    wrapped = CountingSocket(server.socket)
    server.socket = wrapped  # type: ignore[assignment]
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="test-server")
    thread.start()
    running = RunningServer(server, thread)
    yield running, wrapped
    stop_server(running)


MESSAGES = 20


def test_a_lone_message_costs_no_empty_read_and_a_few_passes(
    counted: tuple[RunningServer, CountingSocket],
) -> None:
    """Messages sent one at a time, each waited for (delivered) before the
    next: every datagram comes to a sleeping loop. The loop reads it and
    stops there: before, every pass read on until the socket said EAGAIN (a
    system call and a raised BlockingIOError per pass, two or more per
    message). The store's wake byte about once per message (its commit)."""
    running, sock = counted
    clients = [RecordingClient(name) for name in ("alice", "bob")]
    try:
        for client in clients:
            assert client.login(running.address)
        wait_all(clients, lambda: all(c.logged_in for c in clients), 30.0, "logins")
        alice, bob = clients
        first = alice.send("warm-up", to="bob")
        alice.wait(lambda: alice.reached(first, "delivered"), 10.0, "warm-up delivered")
        stats = running.relay.stats
        passes, wakeups = stats["loop_passes"], stats["loop_wakeups"]
        reads, empty = sock.reads, sock.empty_reads
        for i in range(MESSAGES):
            msg = alice.send(f"alone {i}", to="bob")
            alice.wait(functools.partial(alice.reached, msg, "delivered"), 10.0, f"message {i}")
        bob.wait(lambda: len(bob.received) == MESSAGES + 1, 10.0, "all shown")
        passes, wakeups = stats["loop_passes"] - passes, stats["loop_wakeups"] - wakeups
        reads, empty = sock.reads - reads, sock.empty_reads - empty
        # The same counts in /metrics (at least: the loop goes on meanwhile).
        exported = {f.name: f.samples[0][1] for f in running.server.metrics() if f.samples}
        assert exported["chat_loop_passes_total"] >= passes
        assert exported["chat_loop_wakeups_total"] >= wakeups
        assert exported["chat_loop_empty_reads_total"] <= sock.empty_reads
    finally:
        close_all(clients)
    assert reads >= 2 * MESSAGES  # a SEND and a RECEIPT at least, each read
    # Before: 2 or more per message (every pass's reads ended on an empty
    # socket). Now only a select that returned at once reads on: datagrams
    # had queued while the loop was busy or not running (a loaded machine).
    assert empty < MESSAGES, (empty, reads)
    # A pass per datagram, the commit's wake-up, and timers (acks, the
    # commit's wait): how many of those depends on the clients' timing.
    assert 2 * MESSAGES <= passes <= 10 * MESSAGES, (passes, reads, wakeups)
    assert wakeups <= 2 * MESSAGES, wakeups


def test_a_completion_wakes_a_sleeping_loop_only(tmp_path: Path) -> None:
    """The store thread's (or the key exchanges') `_wake` writes the byte
    that ends select only while the loop sleeps there; a loop that is
    awake is told by a flag it reads before it sleeps again, and then does
    not sleep. Before, every completion wrote a byte: a system call, a
    wake-up of the loop and a read, for work the pass would have seen."""
    server = ChatServer(("127.0.0.1", 0), server_config(tmp_path / "data"))
    try:
        server._sleeping = False  # the loop is in the middle of a pass
        server._wake()
        with pytest.raises(BlockingIOError):
            server._wake_r.recv(16)  # no byte written
        assert server._woken  # the loop will not sleep on it (serve_forever)
        server._sleeping = True
        server._woken = False
        server._wake()
        assert server._wake_r.recv(16) == b"x"  # asleep: woken
        server.shutdown()  # from a signal handler or another thread: always written
        assert server._wake_r.recv(16) == b"x"
    finally:
        server.close()


def test_the_loop_does_not_spin_while_a_commit_waits_with_lazy_writes_due(
    tmp_path: Path,
) -> None:
    """Lazy writes (`LAZY_HOLD`) fall due while the relay holds the store's
    flush for receipts (`COMMIT_WAIT`): the flush keeps them until that wait
    ends, at the relay's own timer. Before, the loop counted them due and
    selected with no timeout, pass after pass, until the wait was over."""
    server = ChatServer(("127.0.0.1", 0), server_config(tmp_path / "data"))
    try:
        store, relay = server.store, server.relay
        assert store is not None
        clock = [1000.0]  # the store's clock is the loop's (monotonic): here a fake one
        store._clock = lambda: clock[0]
        now = clock[0]
        store.submit(NoticeDone("alice", 1, 1))  # lazy: nothing waits for it
        assert server._timeout(now) == pytest.approx(LAZY_HOLD)
        later = clock[0] = now + LAZY_HOLD + 0.01
        # A message just handed to an online recipient: its receipt may
        # join the commit (what `Relay._take` does).
        relay._expecting.add(1)
        relay._hold_until = later + COMMIT_WAIT
        relay.flush_store(later)
        assert store.flush_due is not None and store.flush_due <= later  # kept, due
        assert server._timeout(later) == pytest.approx(COMMIT_WAIT)
        clock[0] = later + COMMIT_WAIT
        relay.handle_timer(clock[0])  # the wait is over: flushed
        relay.flush_store(clock[0])
        assert store.flush_due is None
    finally:
        server.close()


def test_idle_sessions_expiry_checks_share_passes() -> None:
    """Sessions that log in at scattered moments and then stay silent: their
    expiry checks fall on the whole EXPIRY_GRID, so the loop wakes once per
    grid step for all of them instead of once per session; each still ends
    within session_timeout + EXPIRY_GRID."""
    timeout = 30.0
    world = World(session_timeout=timeout)
    sessions = 40
    for i in range(sessions):
        world.login(f"idle{i}")
        world.now += 0.173  # scattered over ~7 s
    relay = world.relay
    for _ in range(10):  # the logins' last acks and retransmission timers
        world.step()
    last_login = world.now
    wakeups = 0
    while relay.sessions:
        timer = relay.get_timer()
        assert timer is not None
        assert timer <= last_login + timeout + EXPIRY_GRID + 1.0, "a session outlived its timeout"
        world.now = timer
        relay.handle_timer(timer)
        relay.datagrams_to_send(timer)
        wakeups += 1
    # Before: one wake-up per session (40) at least.
    assert wakeups <= sessions // 3, wakeups
