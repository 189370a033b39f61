"""The terminal client's groups (issue 14): the commands (`/create`, `/add`,
`/remove`, `/leave`, `/members`, `/groups`, `/to #team`), what they send,
the mistakes they report without sending anything, and the human text of
the group events. `run_terminal` is driven in process with a session that
records the commands it would hand its network thread (nothing else of
the session changes); the real-process test with a server and three
clients is in the lower half."""

from __future__ import annotations

import io
import json
import signal
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
        "/create #team bob, carol\n/add #team dave erin\n/remove #team dave\n/members team\n"
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
