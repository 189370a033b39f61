"""The link's health, measured and shown (issue 16 item 2, issue 17 item 3).

`ClientCore.link_stats(now)` in memory against the real `Relay` on a fake
clock (the `Net` pump of test_client_core.py, with a lossy variant): RTT,
loss over the last minute, resends across re-logins, in flight, outbox.
Each message's own timeline (sent, accepted, delivered, resent N times)
in `client_store.ClientStore` on a temporary file, surviving a reopen.
Then the wiring: `ChatSession.link_stats()` / `timeline()` against a
server in a thread, and the terminal's `/stats` in a real process.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from chat_client import NO_STATS, TERMINAL_COMMANDS, ChatSession
from client_core import (
    LINK_TIMEOUT,
    LOSS_WINDOW,
    LinkChanged,
    LinkStats,
    MemoryStore,
    MessageState,
    StatusChanged,
)
from client_store import ClientStore, read_timeline
from protocol import MsgId
from tests.conftest import (
    PASSWORD,
    RunningServer,
    client_command,
    env_for_tests,
    make_session,
    wait_for,
)
from tests.test_client_core import Client, Net, delivered

ROOT = Path(__file__).resolve().parent.parent
Address = tuple[str, int]


class LossyNet(Net):
    """`Net` where a share of what one client sends is lost on the way."""

    def __init__(self, loss: float, seed: int = 7) -> None:
        super().__init__()
        self.loss = loss
        self.lossy: set[Address] = set()
        self.drop_rng = random.Random(seed)

    def pump(self) -> bool:
        if not self.lossy:
            return super().pump()
        moved = False
        for addr, client in list(self.clients.items()):
            for datagram in client.core.datagrams_to_send(self.now):
                moved = True
                if addr in self.lossy and self.drop_rng.random() < self.loss:
                    continue
                self.relay.receive_datagram(datagram, addr, self.now)
        for datagram, addr in self.relay.datagrams_to_send(self.now):
            moved = True
            if addr in self.clients:
                self.clients[addr].core.receive_datagram(datagram, self.now)
        for x in [self.relay] + [c.core for c in self.clients.values()]:
            timer = x.get_timer()
            if timer is not None and timer <= self.now:
                x.handle_timer(self.now)
        for client in self.clients.values():
            moved = client.take_events() or moved
        return moved


def send_all(net: Net, sender: Client, receiver: str, count: int) -> list[str]:
    ids = [sender.core.send(f"message {i}", net.now, to=receiver) for i in range(count)]
    net.run(lambda: all(delivered(sender, i)() for i in ids), f"{count} delivered", limit=900)
    return ids


# --- ClientCore.link_stats, in memory ------------------------------------------------


def test_stats_before_login_then_up_with_an_rtt_and_nothing_lost() -> None:
    net = Net()
    alice = net.add("alice", "alice-pw")
    before = alice.core.link_stats(net.now)
    assert before.link == "connecting" and before.rtt_ms is None and before.rttvar_ms is None
    assert (before.retransmits, before.in_flight, before.outbox, before.loss_pct) == (0, 0, 0, 0)
    net.run(lambda: alice.logged_in, "alice logged in")
    (bob,) = net.login("bob")
    send_all(net, alice, "bob", 5)
    stats = alice.core.link_stats(net.now)
    assert stats.link == "up"
    assert stats.rtt_ms is not None and stats.rttvar_ms is not None  # measured (0 ms here)
    assert stats.sent >= 5 and stats.retransmits == 0 and stats.loss_pct == 0.0
    assert stats.in_flight == 0 and stats.outbox == 0


def test_the_json_form_is_the_issues_and_the_text_form_one_line() -> None:
    stats = LinkStats("up", 12.4, 3.0, 0.0, 2, 40, 1, 3)
    assert stats.to_json() == {
        "event": "stats", "link": "up", "rtt_ms": 12.4, "rttvar_ms": 3.0, "loss_pct": 0.0,
        "retransmits": 2, "in_flight": 1, "outbox": 3,
    }  # fmt: skip
    assert stats.to_text() == (
        "link up \u00b7 RTT 12 ms (\u00b13) \u00b7 loss 0 % \u00b7 2 resent \u00b7 "
        "1 in flight \u00b7 3 queued"
    )
    assert "RTT \u2013" in NO_STATS.to_text() and NO_STATS.link == "connecting"
    assert any(use == "/stats" for use, _ in TERMINAL_COMMANDS), "/help lists /stats"


def test_loss_shows_as_resends_in_flight_and_outbox_then_leaves_the_window() -> None:
    net = LossyNet(loss=0.3)
    alice, bob = net.login("alice", "bob")
    net.lossy.add(alice.addr)
    ids = [alice.core.send(f"lossy {i}", net.now, to="bob") for i in range(30)]
    during = alice.core.link_stats(net.now)
    assert during.outbox == 30, "all queued, none accepted yet"
    net.pump()
    assert alice.core.link_stats(net.now).in_flight > 0
    net.run(lambda: all(delivered(alice, i)() for i in ids), "delivered through loss", limit=900)
    after = alice.core.link_stats(net.now)
    assert after.retransmits > 0 and 0 < after.loss_pct < 100, after
    assert after.outbox == 0 and after.in_flight == 0
    # Each message's resends are counted for it (the health view's hover).
    store = alice.core.store
    assert isinstance(store, MemoryStore)
    assert sum(store.resends.values()) >= after.retransmits - 2  # the rest: control messages
    assert any(store.resends.get(alice_id(i), 0) > 0 for i in ids)

    # A minute of clean traffic later the loss is gone; the resends stay counted.
    net.lossy.clear()
    for _ in range(int(LOSS_WINDOW / 10) + 2):
        send_all(net, alice, "bob", 1)
        alice.core.link_stats(net.now)
        net.settle(10.0)
    clean = alice.core.link_stats(net.now)
    assert clean.loss_pct == 0.0 and clean.retransmits == after.retransmits, clean


def alice_id(label: str) -> MsgId:
    instance, _, seq = label.partition("-")
    return MsgId(int(instance, 16), int(seq))


def test_counts_add_up_across_a_relogin_and_the_outbox_resend_counts() -> None:
    net = LossyNet(loss=0.5)
    alice, bob = net.login("alice", "bob")
    net.lossy.add(alice.addr)
    send_all(net, alice, "bob", 10)
    before = alice.core.link_stats(net.now)
    assert before.retransmits > 0
    net.lossy.clear()
    net.cut.add(alice.addr)  # an outage: the link goes down, the message waits
    msg = alice.core.send("across the outage", net.now, to="bob")
    net.run(lambda: LinkChanged(False) in alice.events, "link down", limit=LINK_TIMEOUT + 30)
    down = alice.core.link_stats(net.now)
    assert down.link == "down" and down.outbox == 1 and down.rtt_ms is None
    assert down.retransmits >= before.retransmits
    net.cut.clear()
    net.run(delivered(alice, msg), "delivered after the outage", limit=200)
    up = alice.core.link_stats(net.now)
    assert up.link == "up" and up.retransmits >= down.retransmits, "nothing forgotten at login"
    store = alice.core.store
    assert isinstance(store, MemoryStore)
    # Resent by the old connection's timer, and once more by the new login.
    assert store.resends.get(alice_id(msg), 0) >= 2, store.resends.get(alice_id(msg))


# --- the timeline in the store ---------------------------------------------------------


def test_the_store_stamps_each_state_and_counts_resends_across_a_reopen(tmp_path: Path) -> None:
    store = ClientStore(tmp_path / "alice", "alice")
    msg = MsgId(store.instance_id, 1)
    other = MsgId(store.instance_id, 2)
    store.add_outgoing(msg, "bob", "hello")
    store.add_outgoing(other, "bob", "receipt first")
    store.commit()
    begun = int(time.time() * 1000)
    store.add_resends(msg, 2)
    store.set_state(msg, MessageState.ACCEPTED)
    store.add_resends(msg, 1)
    store.set_state(msg, MessageState.DELIVERED)
    store.set_state(msg, MessageState.DELIVERED)  # again: the first time stays
    store.set_state(other, MessageState.DELIVERED)  # `accepted` never came on its own
    store.commit()
    store.close()

    reopened = ClientStore(tmp_path / "alice", "alice")
    path = reopened.path
    reopened.close()
    line = read_timeline(path, "alice", msg.label())
    assert line is not None and line.state == "delivered" and line.resends == 3
    assert line.accepted_ms is not None and line.delivered_ms is not None
    assert line.sent_ms <= line.accepted_ms <= line.delivered_ms
    assert line.accepted_ms >= begun - 1000
    both = read_timeline(path, "alice", other.label())
    assert both is not None and both.accepted_ms == both.delivered_ms is not None
    assert read_timeline(path, "alice", "not-an-id") is None
    assert read_timeline(path, "alice", f"{store.instance_id:016x}-99") is None
    assert read_timeline(tmp_path / "missing.db", "alice", msg.label()) is None


def test_a_store_from_before_gets_the_timeline_columns(tmp_path: Path) -> None:
    directory = tmp_path / "old"
    directory.mkdir()
    old = sqlite3.connect(directory / "client.db")
    old.executescript(
        "CREATE TABLE history (id INTEGER PRIMARY KEY AUTOINCREMENT, peer_key TEXT NOT NULL,"
        " peer TEXT NOT NULL, outgoing INTEGER NOT NULL, text TEXT NOT NULL, ts_ms INTEGER NOT"
        " NULL, sender_key TEXT NOT NULL, instance_id INTEGER NOT NULL, client_seq INTEGER NOT"
        " NULL, state TEXT, UNIQUE (outgoing, sender_key, instance_id, client_seq));"
        "INSERT INTO history (peer_key, peer, outgoing, text, ts_ms, sender_key, instance_id,"
        " client_seq, state) VALUES ('bob', 'bob', 1, 'old', 5, 'alice', 7, 1, 'delivered');"
    )
    old.commit()
    old.close()
    store = ClientStore(directory, "alice")
    store.close()
    line = read_timeline(directory / "client.db", "alice", f"{7:016x}-1")
    assert line is not None and line.sent_ms == 5 and line.state == "delivered"
    assert (line.accepted_ms, line.delivered_ms, line.resends) == (None, None, 0)


# --- the wiring: ChatSession and the terminal ----------------------------------------


def test_session_publishes_stats_and_reads_the_timeline(server: RunningServer) -> None:
    bob = make_session()
    bob.login(server.addr_text, "bob", password=PASSWORD)
    alice = make_session()
    assert alice.link_stats() is NO_STATS
    alice.login(server.addr_text, "alice", "bob", password=PASSWORD)
    try:
        wait_for(bob, lambda e: type(e).__name__ == "LoggedIn")
        wait_for(alice, lambda e: type(e).__name__ == "LoggedIn")
        msg = alice.send("how is the link?")
        assert msg is not None
        wait_for(bob, lambda e: getattr(e, "text", None) == "how is the link?")
        wait_for(alice, lambda e: isinstance(e, StatusChanged) and e.state == "delivered")
        deadline = time.monotonic() + 5
        while alice.link_stats().rtt_ms is None and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = alice.link_stats()
        assert stats.link == "up" and stats.rtt_ms is not None and stats.sent >= 1, stats
        line = alice.timeline(msg)
        assert line is not None and line.state == "delivered", line
        assert line.accepted_ms is not None and line.delivered_ms is not None
        assert line.sent_ms <= line.accepted_ms <= line.delivered_ms
        assert alice.timeline("0-0") is None
    finally:
        alice.close(3.0)
        bob.close(3.0)
    assert alice.link_stats().link == "down", "the session ended"
    memory_only = ChatSession(persist=False)
    assert memory_only.timeline(msg) is None, "no store: no timeline"
    memory_only.discard()


def read_event(stdout: IO[str], name: str, seen: list[Any]) -> dict[str, Any]:
    while True:
        line = stdout.readline()
        assert line, f"output ended before {name!r}; saw {seen}"
        event: dict[str, Any] = json.loads(line)
        seen.append(event)
        if event.get("event") == name:
            return event


def test_terminal_stats_json_and_text(server: RunningServer) -> None:
    env = env_for_tests() | {"CHAT_PASSWORD": PASSWORD}
    json_client = subprocess.Popen(
        client_command("--server", server.addr_text, "--user", "alice", "--json"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT, env=env,
    )  # fmt: skip
    assert json_client.stdin is not None and json_client.stdout is not None
    seen: list[Any] = []
    read_event(json_client.stdout, "logged_in", seen)
    json_client.stdin.write("/stats\n")
    json_client.stdin.flush()
    stats = read_event(json_client.stdout, "stats", seen)
    out, err = json_client.communicate("", timeout=30)
    assert json_client.returncode == 0, (out, err)
    assert set(stats) == {"event", "link", "rtt_ms", "rttvar_ms", "loss_pct", "retransmits",
                          "in_flight", "outbox"}, stats  # fmt: skip
    assert stats["link"] == "up" and stats["outbox"] == 0 and stats["loss_pct"] == 0.0, stats

    text_client = subprocess.Popen(
        client_command("--server", server.addr_text, "--user", "bob"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT, env=env,
    )  # fmt: skip
    assert text_client.stdin is not None and text_client.stdout is not None
    assert text_client.stdout.readline().startswith("logged in as bob")
    text_client.stdin.write("/stats\n")
    text_client.stdin.flush()
    line = text_client.stdout.readline()
    out, err = text_client.communicate("", timeout=30)
    assert text_client.returncode == 0, (out, err)
    assert line.startswith("link up \u00b7 RTT ") and line.rstrip().endswith("0 queued"), line
    assert "/stats" not in err, "a command, never sent as text"


def test_a_message_that_waited_for_an_account_counts_its_second_sending() -> None:
    net = Net()
    (alice,) = net.login("alice")
    msg = alice.core.send("welcome, carol", net.now, to="carol")  # no account yet: it waits
    net.run(lambda: any(getattr(e, "code", "") == "no_such_user" for e in alice.events),
            "told carol has no account")  # fmt: skip
    store = alice.core.store
    assert isinstance(store, MemoryStore)
    assert store.resends.get(alice_id(msg), 0) == 0
    assert alice.core.link_stats(net.now).outbox == 1, "waiting in the outbox"
    net.login("carol")
    net.run(delivered(alice, msg), "delivered once carol exists", limit=120)
    assert store.resends.get(alice_id(msg), 0) >= 1, "it went out a second time"
    assert alice.core.link_stats(net.now).outbox == 0
