"""The terminal client's groups (issue 14): the commands (`/create`, `/add`,
`/remove`, `/leave`, `/members`, `/groups`, `/to #team`), what they send,
the mistakes they report without sending anything, and the human text of
the group events. `run_terminal` is driven in process with a session that
records the commands it would hand its network thread (nothing else of
the session changes); the real-process test with a server and three
clients is in the lower half."""

from __future__ import annotations

import io
import itertools
import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chat_client import (
    TERMINAL_COMMANDS,
    ChatSession,
    Disconnected,
    ErrorEvent,
    GroupChanged,
    GroupsListed,
    LoggedIn,
    MembersListed,
    MessageReceived,
    MessageState,
    StatusChanged,
    _Group,
    _Logout,
    _Send,
    _Watch,
    event_to_text,
    run_terminal,
)
from protocol import GroupAction
from tests.conftest import client_command, env_for_tests, spawn_server, stop_process

ROOT = Path(__file__).resolve().parent.parent


class RecordingSession(ChatSession):
    """A `ChatSession` whose commands are recorded instead of run by a
    network thread: logged in at once, logged out when asked."""

    def __init__(self) -> None:
        super().__init__(persist=False)
        self.commands: list[Any] = []

    def login(self, server: Any, username: str, connect_to: str | None = None, *,
              password: str) -> bool:  # fmt: skip
        self.username = username
        if connect_to:
            self.set_peer(connect_to)
        self.events.put(LoggedIn(username))
        return True

    def _command(self, command: Any) -> None:
        self.commands.append(command)
        if isinstance(command, _Logout):
            self.events.put(Disconnected("logged_out"))


def terminal(lines: str, *, as_json: bool = True) -> tuple[RecordingSession, list[Any], str]:
    """Run the terminal over `lines`; the session, the JSON events (or the
    text) on stdout, and stderr."""
    session = RecordingSession()
    stdout, stderr = io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = run_terminal(session, "127.0.0.1:1", "alice", None, password="pw",
                              as_json=as_json, stdin=io.StringIO(lines), stdout=stdout,
                              stderr=stderr)  # fmt: skip
    finally:
        session.discard()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert status == 0, (stdout.getvalue(), stderr.getvalue())
    out = stdout.getvalue()
    events = [json.loads(line) for line in out.splitlines()] if as_json else [out]
    return session, events, stderr.getvalue()


def test_group_commands_become_group_requests() -> None:
    session, events, _ = terminal(
        "/create #team bob, carol\n/add #team dave erin\n/remove #team dave\n/members #team\n"
        "/groups\n/leave #team\n"
    )
    groups = [c for c in session.commands if isinstance(c, _Group)]
    assert groups == [
        _Group(GroupAction.CREATE, "team", ("bob", "carol")),
        _Group(GroupAction.ADD, "team", ("dave",)),  # one request (and answer) per user
        _Group(GroupAction.ADD, "team", ("erin",)),
        _Group(GroupAction.REMOVE, "team", ("dave",)),
        _Group(GroupAction.MEMBERS, "team", ()),
        _Group(GroupAction.LIST, "", ()),
        _Group(GroupAction.LEAVE, "team", ()),
    ]
    assert not [e for e in events if e["event"] == "error"]
    assert not [c for c in session.commands if isinstance(c, _Send)]  # none went as chat


def test_to_a_group_makes_it_the_peer_and_watches_no_presence() -> None:
    session, events, _ = terminal("/to #team\nhello team\n/to bob\nhi bob\n")
    sends = [(c.to, c.text) for c in session.commands if isinstance(c, _Send)]
    assert sends == [("#team", "hello team"), ("bob", "hi bob")]
    assert [c.name for c in session.commands if isinstance(c, _Watch)] == ["bob"]


def test_group_command_mistakes_are_reported_and_nothing_is_sent() -> None:
    session, events, _ = terminal(
        "/create\n/add #team\n/create #te@m bob\n/add #team no/body\n/remove\n/members\n"
    )
    assert [c for c in session.commands if isinstance(c, _Group)] == []
    errors = [e for e in events if e["event"] == "error"]
    assert [e["code"] for e in errors] == ["invalid_name"] * 6, errors
    assert errors[0]["message"] == "name the group: /create #GROUP NAME..."
    assert "/add #team NAME" in errors[1]["message"]
    assert "a group is named like #team" in errors[2]["message"]


def test_help_lists_the_group_commands() -> None:
    _, events, _ = terminal("/help\n")
    (help_event,) = [e for e in events if e["event"] == "help"]
    assert help_event["commands"] == [use for use, _ in TERMINAL_COMMANDS]
    for use in ("/create #GROUP NAME...", "/add #GROUP NAME...", "/remove #GROUP NAME...",
                "/leave #GROUP", "/members #GROUP", "/groups"):  # fmt: skip
        assert use in help_event["commands"]
    _, text, _ = terminal("/help\n", as_json=False)
    assert any(line.startswith("/members #GROUP ") and line.endswith("owner and members")
               for line in text[0].splitlines())  # fmt: skip


def test_group_events_in_human_text() -> None:
    lines = [
        event_to_text(GroupChanged("team", "created", "alice", ("alice", "bob"), 1, 0)),
        event_to_text(GroupChanged("team", "added", "bob", ("dave",), 2, 0)),
        event_to_text(GroupChanged("team", "removed", "alice", ("dave",), 3, 0)),
        event_to_text(GroupChanged("team", "left", "carol", (), 4, 0)),
        event_to_text(GroupChanged("team", "owner", "alice", ("bob",), 5, 0)),
        event_to_text(MessageReceived("alice", "hi all", 6, 0, "x-1", "team", 6)),
        event_to_text(MembersListed("team", "alice", ("alice", "bob"))),
        event_to_text(GroupsListed(("team", "ops"))),
        event_to_text(GroupsListed(())),
        event_to_text(StatusChanged("x-2", MessageState.ACCEPTED, "#team", "hi", recipients=2)),
        event_to_text(StatusChanged("x-2", MessageState.DELIVERED, "#team", "hi", by="bob")),
    ]
    assert lines == [
        ("* #team: alice created the group with alice, bob", False),
        ("* #team: bob added dave", False),
        ("* #team: alice removed dave", False),
        ("* #team: carol left", False),
        ("* #team: bob is the owner now", False),
        ("[#team] alice: hi all", False),
        ("#team: alice, bob (owner alice)", False),
        ("groups: #team, #ops", False),
        ("groups: none", False),
        ("  \u2713 on server for 2 member(s) (to #team: hi)", False),
        ("  \u2713\u2713 delivered to bob (to #team: hi)", False),
    ]
    not_member = ErrorEvent("not_a_member", "you are not a member of #ops")
    assert event_to_text(not_member) == ("error: you are not a member of #ops", True)


# --- real processes: a server and four terminal clients with --json ------------------


class Terminal:
    """`chat-client --no-gui --json` as a process; its stdout read into
    `events` by a thread, so a test waits for what it expects."""

    def __init__(self, addr: str, user: str) -> None:
        self.user = user
        self.proc = subprocess.Popen(
            client_command("--server", addr, "--user", user, "--json"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT, env=env_for_tests(),
        )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name=f"read-{user}").start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)

    def type(self, *lines: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(line + "\n" for line in lines))
        self.proc.stdin.flush()

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> None:
        """Until an event matching `predicate` has come (now or before)."""
        if any(predicate(e) for e in self.events):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self._lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if event is None:
                break
            self.events.append(event)
            if predicate(event):
                return
        raise AssertionError(f"{self.user}: not seen; events {self.events}")

    def quit(self) -> int:
        self.type("/quit")
        code = self.proc.wait(30)
        while (event := self._lines.get(timeout=10)) is not None:
            self.events.append(event)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def group_view(events: list[dict[str, Any]]) -> list[str]:
    """What a member was shown of #team, in order: changes and others' messages."""
    view: list[str] = []
    for event in events:
        if event["event"] == "group" and event["group"] == "team":
            view.append(json.dumps(event, sort_keys=True))
        elif event["event"] == "message" and event.get("group") == "team":
            view.append(f"{event['from']}: {event['text']}")
    return view


def test_three_terminals_see_the_group_in_one_order(tmp_path: Path) -> None:
    """alice, bob and carol (and later dave) in #team, as scripts use the
    terminal client: created, messages from all three sent at once, dave
    added, carol removed. Every member's changes and messages are shown
    once each and in one order: any two members saw what they both saw in
    the same order."""
    running = spawn_server(data_dir=tmp_path / "server-data")
    clients: list[Terminal] = []
    try:
        clients = [Terminal(running.addr_text, u) for u in ("alice", "bob", "carol", "dave")]
        alice, bob, carol, dave = clients
        for client in clients:
            client.wait(lambda e: e["event"] == "logged_in")
        alice.type("/create #team bob carol")
        created = {"event": "group", "group": "team", "change": "created", "by": "alice",
                   "members": ["alice", "bob", "carol"], "seq": 1}  # fmt: skip
        for member in (alice, bob, carol):
            member.wait(lambda e: e == created)
        for member in (alice, bob, carol):
            member.type("/to #team", *(f"{member.user} says {n}" for n in range(4)))
        carol.wait(lambda e: e.get("text") == "alice says 3")
        bob.type("/add #team dave")
        dave.wait(lambda e: e.get("change") == "added")
        alice.type("/remove #team carol", "after carol left")
        bob.wait(lambda e: e.get("text") == "after carol left")
        dave.wait(lambda e: e.get("text") == "after carol left")
        carol.wait(lambda e: e.get("change") == "removed")
        bob.type("/members #team", "/groups")
        bob.wait(lambda e: e["event"] == "groups")
        alice.wait(lambda _: len(delivered_to(alice)) == 10)  # the last receipts came back
        codes = [client.quit() for client in clients]
    finally:
        for client in clients:
            client.kill()
        stop_process(running)
    assert codes == [0, 0, 0, 0], [c.events[-3:] for c in clients]
    views = {c.user: group_view(c.events) for c in clients}
    for user, view in views.items():
        assert len(view) == len(set(view)), f"{user} was shown something twice: {view}"
    for (one, a), (other, b) in itertools.combinations(views.items(), 2):
        common = set(a) & set(b)
        assert [x for x in a if x in common] == [x for x in b if x in common], (one, other)
    # What each saw: all of it from joining until removal, but its own messages.
    assert len([x for x in views["bob"] if x.startswith(("alice", "carol"))]) == 8 + 1
    assert not any("after carol" in x for x in views["carol"])
    assert views["carol"][-1].startswith('{"by": "alice", "change": "removed"')
    assert views["dave"][0].startswith('{"by": "bob", "change": "added"')
    removed = json.loads(views["dave"][1])
    assert removed.pop("seq") > 1  # (where in the order depends on carol's pace)
    assert removed == {"event": "group", "group": "team", "change": "removed", "by": "alice",
                       "user": "carol"}  # fmt: skip
    assert views["dave"][2:] == ["alice: after carol left"]
    members = [e for e in bob.events if e["event"] == "members"]
    assert members == [{"event": "members", "group": "team", "owner": "alice",
                        "members": ["alice", "bob", "dave"]}]  # fmt: skip
    assert [e for e in bob.events if e["event"] == "groups"] == [
        {"event": "groups", "groups": ["team"]}
    ]
    # The senders' states: accepted for the members of the moment, one
    # delivered per member, each naming who.
    accepted = [e for e in alice.events if e["event"] == "status" and e["state"] == "accepted"]
    assert [e["recipients"] for e in accepted] == [2, 2, 2, 2, 2]  # bob, carol; then bob, dave
    assert sorted(delivered_to(alice)) == ["bob"] * 5 + ["carol"] * 4 + ["dave"]


def delivered_to(client: Terminal) -> list[str]:
    """Whom the client's group messages were delivered to, one per receipt."""
    return [e["by"] for e in client.events if e["event"] == "status" and e["state"] == "delivered"]
