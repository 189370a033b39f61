"""The fixes of audit7's findings N1-N7 (issue 14): the client keeps
arrival order for answers behind a staged group event (N1), the cap on a
user's groups holds in cluster mode for changes in flight together (N2),
a group request on the control stream is checked as the send it is (N4),
the terminal's group commands want the `#` (N5), the window asks before
leaving a group (N6); N3 and N7 are README wording (tests/test_docs.py
style checks below)."""

from __future__ import annotations

from typing import Any

from chat_server import ServerConfig
from client_core import (
    Event,
    GroupChanged,
    MembersListed,
    MessageState,
    StatusChanged,
)
from protocol import GroupAction
from tests.test_client_core import Net
from tests.test_groups_client import login

# --- N1: the client's events in arrival order -------------------------------------


def kinds(events: list[Event]) -> list[str]:
    """Each event's kind, a status by its state."""
    out: list[str] = []
    for event in events:
        if isinstance(event, StatusChanged):
            out.append(event.state)
        elif isinstance(event, GroupChanged):
            out.append(f"group {event.change}")
        else:
            out.append(type(event).__name__)
    return out


def test_answers_behind_a_staged_group_event_keep_their_order() -> None:
    """/create #quick bob, /members #quick, /to #quick, hi: sent together.
    The server answers in order (created, members, accepted), but the
    client staged `created` for the commit and handed `members` and
    `accepted` out at once, before it (audit7 N1). Now every event leaves
    in the order it came, the commit still before them all."""
    net = Net(ServerConfig(iterations=4096, key_workers=0))
    alice, bob = login(net, "alice", "bob")
    alice.events.clear()
    alice.core.group_request(GroupAction.CREATE, "quick", ("bob",))
    alice.core.group_request(GroupAction.MEMBERS, "quick")
    sent = alice.core.send("hi", net.now, to="#quick")
    net.run(lambda: MessageState.ACCEPTED in alice.states(sent) and bool(alice.of(MembersListed)),
            "the answers")  # fmt: skip
    got = [k for k in kinds(alice.events) if k != MessageState.DELIVERED]
    assert got == ["sending", "group created", "MembersListed", "accepted"], got
