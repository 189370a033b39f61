"""An idle client with a list of servers is back on another node within 5 s
(issue 15): it pings every 2-2.5 s, again every 0.5 s while a ping is
unanswered, and leaves a silent node after 4.5 s; a node whose process died
refuses the first ping (ICMP) and is left at once. A single server keeps
the 15-18 s keepalive. The timers are tested on the in-memory `Net` (a fake
clock); the promise itself with real processes: a redis-server, two nodes,
an idle `chat_client.py --json --server A,B` and its node SIGKILLed.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chat_client import liveness_timers
from client_core import (
    KEEPALIVE,
    LINK_TIMEOUT,
    LIST_KEEPALIVE,
    LIST_KEEPALIVE_JITTER,
    LIST_LINK_TIMEOUT,
    LIST_PING_RETRY,
    TRAFFIC_PROBE,
    LinkChanged,
)
from tests.conftest import ServerProcess, spawn_server, stop_process
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401
from tests.test_client_core import Address, Client, Net
from tests.test_cluster_e2e import Terminal

#: The promise of issue 15: a killed node's users are logged in elsewhere within this.
MOVE_WITHIN = 5.0
STEP = 0.05  # the fake clock's step when nothing moves (`Net.run`)
SLACK = STEP + 1e-9  # a timer fires at the first step at or after it


class Recording(Net):
    """`Net`, noting when each client sent a datagram (an idle client's
    datagrams are its pings: the server sends nothing to ack)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: dict[Address, list[float]] = {}

    def pump(self) -> bool:
        moved = False
        for addr, client in self.clients.items():
            datagrams = client.core.datagrams_to_send(self.now)
            if datagrams:
                moved = True
                self.sent.setdefault(addr, []).append(self.now)
                if addr not in self.cut:
                    for datagram in datagrams:
                        self.relay.receive_datagram(datagram, addr, self.now)
        return super().pump() or moved


def listed(net: Recording) -> Client:
    """alice, logged in with a list's liveness (as `ChatSession.login` sets it), idle."""
    (alice,) = net.login("alice", **liveness_timers(listed=True))
    net.settle(10.0)  # the login's traffic is over: only pings from here on
    return alice


def test_session_chooses_the_list_timers_only_for_a_list() -> None:
    assert liveness_timers(listed=False) == {
        "keepalive": KEEPALIVE, "link_timeout": LINK_TIMEOUT,
    }  # fmt: skip
    assert liveness_timers(listed=True) == {
        "probe_after": TRAFFIC_PROBE, "keepalive": LIST_KEEPALIVE,
        "keepalive_jitter": LIST_KEEPALIVE_JITTER, "ping_retry": LIST_PING_RETRY,
        "link_timeout": LIST_LINK_TIMEOUT,
    }  # fmt: skip
    given = liveness_timers(True, keepalive=0.5, link_timeout=3.0)
    assert (given["keepalive"], given["link_timeout"]) == (0.5, 3.0)


def test_an_idle_listed_client_pings_every_2_to_2_5_s() -> None:
    net = Recording()
    alice = listed(net)
    start = net.now
    net.settle(60.0)
    pings = [t for t in net.sent[alice.addr] if t >= start]
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert len(pings) >= 60 / 2.5 - 1, pings
    assert all(2.0 <= gap <= 2.5 + SLACK for gap in gaps), gaps
    assert not alice.of(LinkChanged)


def test_a_silent_node_is_left_after_4_5_s_pinging_every_0_5_s_meanwhile() -> None:
    """No answer and no ICMP (the node's host is gone): the client pings
    again every 0.5 s and logs in elsewhere 4.5 s after it last heard
    from its node, within the 5 s."""
    net = Recording()
    alice = listed(net)
    heard = net.sent[alice.addr][-1]  # its last ping, answered
    net.cut.add(alice.addr)
    net.run(lambda: LinkChanged(False) in alice.events, "link down", limit=10.0)
    # Its answer (the ack, after the ack delay) and the clock's steps: a step or three later.
    assert net.now - heard <= LIST_LINK_TIMEOUT + 3 * SLACK
    silent = [t for t in net.sent[alice.addr] if heard < t < net.now]
    first = silent[0]  # the keepalive nobody answered
    assert 2.0 <= first - heard <= 2.5 + SLACK
    retries = [b - a for a, b in zip(silent, silent[1:], strict=False)]
    assert retries and all(abs(gap - LIST_PING_RETRY) <= SLACK for gap in retries), silent


def test_a_lost_ping_and_its_first_retry_do_not_move_the_client() -> None:
    """Pings are never retransmitted: a loss must not look like a dead
    node. Losing a keepalive and its first retry costs one more ping, not
    the session."""
    net = Recording()
    alice = listed(net)
    last = net.sent[alice.addr][-1]
    net.run(lambda: net.now >= last + 1.95, "just before the next keepalive")
    net.cut.add(alice.addr)
    net.run(lambda: net.sent[alice.addr][-1] > last, "the keepalive (lost)")
    lost = net.sent[alice.addr][-1]
    net.run(lambda: net.now >= lost + LIST_PING_RETRY + 0.2, "its first retry (lost)")
    (retry,) = [t for t in net.sent[alice.addr] if t > lost]
    assert abs(retry - lost - LIST_PING_RETRY) <= SLACK
    net.cut.clear()
    back = net.now
    net.settle(20.0)
    assert not alice.of(LinkChanged), alice.events
    after = [t for t in net.sent[alice.addr] if t > back]
    assert abs(after[0] - retry - LIST_PING_RETRY) <= SLACK  # the second retry, answered
    assert 2.0 <= after[1] - after[0] <= 2.5 + SLACK  # then the keepalives again


# --- the promise, with real processes ------------------------------------------------


@pytest.fixture
def two_nodes(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        for i in range(2):
            started.append(spawn_server("--cluster", redis_server.url, "--node-id", f"n{i}",
                                        data_dir=tmp_path / f"n{i}"))  # fmt: skip
        yield started[0], started[1]
    finally:
        for node in started:
            stop_process(node)


def test_an_idle_user_is_on_the_other_node_within_5_s_of_a_sigkill(
    two_nodes: tuple[ServerProcess, ServerProcess],
) -> None:
    """alice (on A) does nothing; bob (on B) writes to her once A is
    SIGKILLed. Her next ping meets the closed port: she is logged in on B
    within 5 s of the kill (default timers), and bob's message arrives
    exactly once."""
    first, second = two_nodes
    clients: list[Terminal] = []
    try:
        alice = Terminal("alice", [first, second])
        clients.append(alice)
        alice.wait(lambda e: e["event"] == "logged_in", 30)
        # A is the node that answered her first: the first of her list, or
        # at load average 40+ the second, which her retransmitted HELLO went
        # to (they go round the list). bob is on the other one, B (his list
        # is B alone: he does not move).
        a, b = (first, second) if alice.seen()[0]["server"] == first.addr_text else (second, first)
        assert alice.seen()[0]["server"] == a.addr_text, alice.seen()
        bob = Terminal("bob", [b], "--connect-to", "alice")
        clients.append(bob)
        bob.wait(lambda e: e["event"] == "logged_in", 30)
        assert bob.seen()[0]["server"] == b.addr_text, bob.seen()
        # alice is idle: her login's traffic is over, and so is the one
        # ping `TRAFFIC_PROBE` after the last message the node handed her
        # (which alone would find the dead node within 2 s).
        time.sleep(TRAFFIC_PROBE + 1.0)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(5)
        killed_at = time.monotonic()
        bob.line("while you moved")

        def up_on_b(event: dict[str, Any]) -> bool:
            return bool(
                event["event"] == "link" and event["state"] == "up"
                and event.get("server") == b.addr_text
            )  # fmt: skip

        moved = alice.wait(up_on_b, MOVE_WITHIN + 10) - killed_at
        print(f"idle alice logged in on B {moved:.2f} s after A was killed")
        assert moved < MOVE_WITHIN, moved
        alice.wait(lambda e: e["event"] == "message", 15)
        time.sleep(0.5)  # room for a late duplicate to show
        assert alice.texts() == ["while you moved"], alice.seen()
    finally:
        for client in clients:
            client.close()
