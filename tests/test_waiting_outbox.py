"""A message to a name with no account yet waits (issue 16, item 1): it
stays `sending` in the outbox, the sender hears one non-fatal
`no_such_user`, and it goes by itself, in order and with its id, once the
account exists (the server's PRESENCE for the name says so). Kept across
restarts of the client, cancellable with `cancel(name)` (`/cancel NAME`),
and the server keeps only its bounded awaited-names table for it.

In memory (`ClientCore` against `Relay` on a fake clock, the `Net` pump of
test_client_core) and with real processes (the terminal client)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from chat_server import MAX_AWAITED_PER_WATCHER
from client_core import (
    Cancelled,
    ClientError,
    Disconnected,
    ErrorEvent,
    MemoryStore,
    MessageReceived,
    MessageState,
    StatusChanged,
)
from protocol import ErrorCode
from tests.conftest import (
    PASSWORD,
    ROOT,
    client_command,
    env_for_tests,
    make_session,
    spawn_server,
    stop_process,
    wait_for,
)
from tests.test_client_core import Client, Net, delivered


def errors(client: Client, code: str) -> list[ErrorEvent]:
    return [e for e in client.of(ErrorEvent) if e.code == code]


def received(client: Client) -> list[str]:
    return [m.text for m in client.of(MessageReceived)]


def test_a_message_to_a_name_with_no_account_waits_and_goes_when_it_registers() -> None:
    net = Net()
    (alice,) = net.login("alice")
    first = alice.core.send("are you there?", net.now, to="bob")
    net.run(lambda: bool(errors(alice, "no_such_user")), "no_such_user reported")
    second = alice.core.send("still waiting", net.now, to="Bob")
    net.settle(5.0)
    # Still `sending`, one non-fatal error for the name, nothing failed.
    assert alice.states(first) == ["sending"] and alice.states(second) == ["sending"]
    (error,) = errors(alice, "no_such_user")
    assert not error.fatal and "bob" in error.message
    assert not [e for e in alice.of(StatusChanged) if e.state == MessageState.FAILED]
    bob = net.add("bob", "bob-pw")
    net.run(lambda: delivered(alice, second)(), "both delivered")
    assert received(bob) == ["are you there?", "still waiting"]  # in order, once each
    assert alice.states(first) == ["sending", "accepted", "delivered"]
    assert len(errors(alice, "no_such_user")) == 1


def test_the_name_is_awaited_across_the_senders_reconnects() -> None:
    """The server forgets what a session awaited when it ends; the client
    asks again (WATCH) at its next login and learns of the account then."""
    net = Net()
    (alice,) = net.login("alice")
    msg = alice.core.send("hello?", net.now, to="bob")
    net.run(lambda: bool(errors(alice, "no_such_user")), "waiting")
    net.cut.add(alice.addr)  # alice is away while bob registers
    net.settle(50.0)
    bob = net.add("bob", "bob-pw")
    net.run(lambda: bob.logged_in, "bob registered")
    net.cut.clear()
    net.run(delivered(alice, msg), "delivered after alice's reconnect")
    assert received(bob) == ["hello?"]


def test_waiting_messages_are_kept_across_a_restart_of_the_client() -> None:
    net = Net()
    store = MemoryStore()  # the client's store outlives its process
    alice = net.add("alice", "alice-pw", store=store)
    net.run(lambda: alice.logged_in, "alice logged in")
    msg = alice.core.send("wait for me", net.now, to="carol")
    net.run(lambda: bool(errors(alice, "no_such_user")), "waiting")
    alice.core.abort()  # the process ends
    del net.clients[alice.addr]
    again = net.add("alice", "alice-pw", store=store)
    # What waits is known before any answer of the server: /cancel works at once.
    assert [o.waiting for o in again.core.outbox.values()] == [True]
    assert again.core.cancel("nobody") == []
    net.run(lambda: again.logged_in, "alice logged in again")
    net.settle(5.0)
    # The store knew it waits: tried again at the login, not reported again.
    (out,) = again.core.outbox.values()
    assert out.waiting and not again.of(ErrorEvent)
    carol = net.add("carol", "carol-pw")
    net.run(lambda: received(carol) == ["wait for me"], "delivered to carol")
    net.run(delivered(again, msg), "delivered")
    assert store.waiting() == set()


def test_cancel_drops_what_waits_for_a_name() -> None:
    net = Net()
    (alice,) = net.login("alice")
    first = alice.core.send("one", net.now, to="carol")
    net.run(lambda: bool(errors(alice, "no_such_user")), "waiting")
    second = alice.core.send("two", net.now, to="carol")
    ids = alice.core.cancel("Carol")
    net.settle(1.0)
    assert ids == [first, second]
    assert alice.states(first) == ["sending", "failed"]
    failed = [e for e in alice.of(StatusChanged) if e.state == MessageState.FAILED]
    assert {e.reason for e in failed} == {"cancelled"}
    (done,) = alice.of(Cancelled)
    assert done.to_json() == {"event": "cancelled", "to": "carol", "ids": [first, second]}
    assert alice.core.store.pending() == []
    carol = net.add("carol", "carol-pw")
    net.run(lambda: carol.logged_in, "carol registered")
    net.settle(5.0)
    assert received(carol) == []
    # Nothing waits for her now: an empty cancel, and a bad name is refused.
    assert alice.core.cancel("carol") == []
    try:
        alice.core.cancel("no way")
    except ClientError as exc:
        assert exc.code == ErrorCode.INVALID_NAME
    else:
        raise AssertionError("a bad name was taken")


def test_logout_does_not_wait_for_what_waits_for_an_account() -> None:
    """`/quit` waits for messages to be accepted; one waiting for an account
    will not be soon: the logout goes at once and it stays in the outbox."""
    net = Net()
    store = MemoryStore()
    alice = net.add("alice", "alice-pw", store=store)
    net.run(lambda: alice.logged_in, "alice logged in")
    alice.core.send("later", net.now, to="dora")
    net.run(lambda: bool(errors(alice, "no_such_user")), "waiting")
    start = net.now
    alice.core.logout(net.now, timeout=10.0)
    net.run(lambda: bool(alice.of(Disconnected)), "logged out")
    assert net.now - start < 5.0  # fake seconds: it did not wait for the 10 s
    assert alice.of(Disconnected)[0].reason == "logged_out"
    assert [to for _, to, _ in store.pending()] == ["dora"]


def test_the_server_keeps_a_bounded_table_of_awaited_names() -> None:
    net = Net()
    (alice,) = net.login("alice")
    for n in range(MAX_AWAITED_PER_WATCHER + 20):
        alice.core.send("x", net.now, to=f"nobody{n}")
    outbox = alice.core.outbox
    net.run(lambda: all(o.waiting for o in outbox.values()), "all waiting", limit=120)
    assert len(outbox) == MAX_AWAITED_PER_WATCHER + 20
    awaited = net.relay._awaiting["alice"]
    assert len(awaited) <= MAX_AWAITED_PER_WATCHER
    # The newest names are the ones awaited: the oldest were forgotten.
    assert f"nobody{MAX_AWAITED_PER_WATCHER + 19}" in awaited


# --- with real processes ---------------------------------------------------------------


def terminal(addr: str, user: str, lines: str, *extra: str) -> tuple[int, list[dict[str, Any]]]:
    done = subprocess.run(
        client_command("--server", addr, "--user", user, "--json", "--quit-wait", "3", *extra),
        input=lines, capture_output=True, text=True, cwd=ROOT, env=env_for_tests(), timeout=60,
    )  # fmt: skip
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def test_the_readme_flow_alice_writes_before_bob_ever_logged_in(tmp_path: Path) -> None:
    """The README's flow taken literally: alice writes to bob before bob has
    an account. Her terminal reports `no_such_user` once, keeps the message
    `sending` and exits 3 (left in the outbox); it goes at her next run,
    after bob registered, and bob gets it."""
    running = spawn_server(data_dir=tmp_path / "server-data")
    try:
        status, events = terminal(running.addr_text, "alice", "hi bob\n", "--connect-to", "bob")
        assert status == 3, events
        (sending,) = [e for e in events if e["event"] == "status"]
        assert sending["state"] == "sending" and sending["to"] == "bob"
        # Said when the wait begins, and again at the end (with `/cancel bob`).
        errors = [e for e in events if e["event"] == "error"]
        assert [e["code"] for e in errors] == ["no_such_user", "no_such_user"]
        assert "/cancel bob" in errors[1]["message"]
        status, _ = terminal(running.addr_text, "bob", "")  # bob registers
        assert status == 0
        status, events = terminal(running.addr_text, "alice", "")
        assert status == 0, events
        states = [e["state"] for e in events if e["event"] == "status"]
        assert "accepted" in states and "failed" not in states
        bob = make_session()
        bob.login(running.addr_text, "bob", password=PASSWORD)
        got = wait_for(bob, lambda e: isinstance(e, MessageReceived), 20.0)
        assert (got.sender, got.text) == ("alice", "hi bob")
        bob.close()
    finally:
        stop_process(running)


def test_terminal_cancel_drops_what_an_earlier_run_left_waiting(tmp_path: Path) -> None:
    """The outbox remembers what waits for an account, so `/cancel NAME`
    works at once in the next run, before the server is asked again."""
    running = spawn_server(data_dir=tmp_path / "server-data")
    try:
        status, events = terminal(running.addr_text, "alice", "/to erin\nhello erin\n")
        assert status == 3
        (sending,) = [e for e in events if e["event"] == "status"]
        status, events = terminal(running.addr_text, "alice", "/cancel erin\n/cancel erin\n")
        assert status == 0, events
        cancelled = [e for e in events if e["event"] == "cancelled"]
        assert cancelled == [
            {"event": "cancelled", "to": "erin", "ids": [sending["id"]]},
            {"event": "cancelled", "to": "erin", "ids": []},
        ]
        assert {"event": "status", "id": sending["id"], "state": "failed",
                "reason": "cancelled"} in events  # fmt: skip
        status, events = terminal(running.addr_text, "alice", "")
        assert status == 0 and not [e for e in events if e["event"] == "status"]
    finally:
        stop_process(running)
