"""The fixes of audit7's findings N1-N7 (issue 14): the client keeps
arrival order for answers behind a staged group event (N1), the cap on a
user's groups holds in cluster mode for changes in flight together (N2),
a group request on the control stream is checked as the send it is (N4),
the terminal's group commands want the `#` (N5), the window asks before
leaving a group (N6); N3 and N7 are README wording (tests/test_docs.py
style checks below)."""

from __future__ import annotations

from pathlib import Path

from chat_client import _Group
from chat_server import ServerConfig, chunk_cost
from client_core import (
    Event,
    GroupChanged,
    MembersListed,
    MessageState,
    StatusChanged,
)
from protocol import (
    CONTROL_STREAM,
    GroupAction,
    GroupEvent,
    GroupList,
    GroupRequest,
    GroupResult,
    Stream,
    conversation_stream,
    encode_message,
    name_key,
)
from tests.test_bounds import World
from tests.test_client_core import Net
from tests.test_groups_client import login
from tests.test_groups_terminal import terminal

ROOT = Path(__file__).resolve().parent.parent

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


# --- N5: the terminal's group commands want the `#` ------------------------------


def test_group_commands_without_the_hash_are_refused() -> None:
    """`/create team2 bob` made a group the user then reached only as
    #team2 (`/to team2` talks to a person), and /members, /leave, /add,
    /remove took a bare name the same way (audit7 N5). Now each is an
    `invalid_name` error saying how a group is written; nothing is sent."""
    session, events, _ = terminal(
        "/create team2 bob\n/add team2 dave\n/remove team2 dave\n/leave team2\n"
        "/members team2\n/members #team2\n"
    )
    groups = [c for c in session.commands if isinstance(c, _Group)]
    assert groups == [_Group(GroupAction.MEMBERS, "team2", ())]  # only the one with '#'
    errors = [e for e in events if e["event"] == "error"]
    assert [e["code"] for e in errors] == ["invalid_name"] * 5, errors
    for error in errors:
        assert "a group is written like #team" in error["message"], error
    assert errors[0]["message"].endswith("(/create #team2 NAME...)"), errors[0]


# --- N4: a membership change on the control stream is a send -----------------------


def test_a_change_on_the_control_stream_waits_while_short_of_memory() -> None:
    """A CREATE on its group's stream waits while the server is short of
    memory; the same request on the control stream was taken (a counted
    request, which the memory check never sees), so a modified client
    made groups past `--max-memory` (audit7 N4). Now it waits the same,
    and is taken once memory falls; a LIST there is answered all along."""
    world = World(max_memory=100 * 1024 * 1024)
    alice = world.login("alice")
    world.relay.set_memory(150 * 1024 * 1024, world.now)
    alice.send(GroupRequest(1, GroupAction.LIST, "", ()), CONTROL_STREAM)
    world.run_until(lambda: bool(alice.of(GroupList)), 100, "the list")
    alice.send(GroupRequest(2, GroupAction.CREATE, "viastream", ()),
               conversation_stream("#viastream"))  # fmt: skip
    alice.send(GroupRequest(3, GroupAction.CREATE, "viacontrol", ()), CONTROL_STREAM)
    for _ in range(200):
        world.step()
    assert alice.of(GroupResult) == [] and alice.of(GroupEvent) == []
    assert world.relay.groups.get(name_key("viacontrol")) is None
    assert world.relay.stats["withheld_memory"] > 1
    world.relay.set_memory(90 * 1024 * 1024, world.now)
    world.run_until(lambda: len(alice.of(GroupEvent)) == 2, 500, "both groups made")
    assert sorted(e.group for e in alice.of(GroupEvent)) == ["viacontrol", "viastream"]


def test_chunk_cost_counts_a_change_on_the_control_stream_as_a_send() -> None:
    """What each group request on the control stream costs: the changes
    (create, add, remove, leave) a message and a send; members and list a
    counted request, as before."""

    def cost(action: GroupAction) -> tuple[int, int, bool]:
        data = encode_message(GroupRequest(1, int(action), "" if action == GroupAction.LIST
                                           else "team", ("bob",)))  # fmt: skip
        messages, requests, _, sends = chunk_cost([Stream(1, CONTROL_STREAM, 0, 0, 1, data)])
        return messages, requests, sends

    for action in (GroupAction.CREATE, GroupAction.ADD, GroupAction.REMOVE, GroupAction.LEAVE):
        assert cost(action) == (1, 0, True), action
    for action in (GroupAction.MEMBERS, GroupAction.LIST):
        assert cost(action) == (0, 1, False), action


# --- N3, N7: what the README promises -----------------------------------------------


def readme() -> str:
    return " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())


def test_readme_says_a_crashed_terminal_may_print_its_last_message_again() -> None:
    """The terminal prints a message, then records it shown; killed between
    the two, it prints it again at its next start (same `id`), which the
    README's "never shown twice" denied (audit7 N3). Every such promise
    now names the exception."""
    text = readme()
    assert "**After a crash of the client.**" in text
    assert (
        "prints the last message(s) it printed again at its next start, with the same `id`" in text
    )
    for promise in ("never shown twice", "nothing is shown twice"):
        at = [i for i in range(len(text)) if text.startswith(promise, i)]
        assert at, promise
        for i in at:
            after = text[i : i + 200]
            assert "crash" in after or "killed" in after, after


def test_readme_agrees_with_itself_on_a_second_device() -> None:
    """The terminal section said your own group message from another device
    always arrives as a `message` from you; the server section that a device
    logging in later does not read it (audit7 N7). Both now say: only a
    device that was behind gets it; one session per user at a time."""
    text = readme()
    assert "arrives as a `message` from you." not in text
    assert "only if this one had not read everything before it" in text
    assert "a user has one session at a time" in text
    assert "(one that was behind, or was online, has it)" not in text
