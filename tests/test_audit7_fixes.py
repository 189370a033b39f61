"""The fixes of audit7's findings N1-N7 (issue 14): the client keeps
arrival order for answers behind a staged group event (N1), the cap on a
user's groups holds in cluster mode for changes in flight together (N2),
a group request on the control stream is checked as the send it is (N4),
the terminal's group commands want the `#` (N5), the window asks before
leaving a group (N6); N3 and N7 are README wording (tests/test_docs.py
style checks below)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from chat_client import ChatSession, _Group
from chat_server import ServerConfig, chunk_cost
from client_core import (
    Event,
    GroupChanged,
    MembersListed,
    MessageState,
    StatusChanged,
)
from client_groups_ui import GroupInfo, leave_question
from protocol import (
    CONTROL_STREAM,
    ErrorCode,
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
from server_cluster import USER_GROUPS_COUNTED_KEY, USER_GROUPS_KEY
from server_store import ChangeGroup
from tests.conftest import wait_for
from tests.redis_fixture import redis_server  # noqa: F401 (a fixture)
from tests.test_bounds import Client, World
from tests.test_client_core import Net
from tests.test_cluster_groups import Cluster, cluster_of  # noqa: F401 (a fixture)
from tests.test_groups_client import login
from tests.test_groups_gui import window_screenshot
from tests.test_groups_terminal import terminal
from tests.test_gui import Gui, gui, press, pump, pump_until  # noqa: F401 (a fixture)
from tests.xvfb import display  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"


def drain(session: ChatSession) -> list[Any]:
    """The events waiting on `session`'s queue."""
    got = []
    while not session.events.empty():
        got.append(session.events.get_nowait())
    return got


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


# --- N2: --max-user-groups holds for cluster changes in flight together --------------


def answers(cluster: Cluster, asked: list[tuple[int, Client, int]]) -> list[tuple[int, str]]:
    """The answers (code, text) to requests `asked` as (node, client, id)."""

    def of(client: Client, request_id: int) -> list[GroupResult]:
        return [r for r in client.of(GroupResult) if r.request_id == request_id]

    cluster.run_until(lambda: all(of(c, r) for _, c, r in asked), 400, "the answers")
    return [(of(c, r)[-1].code, of(c, r)[-1].message) for _, c, r in asked]


def groups_of(cluster: Cluster, user: str) -> list[list[str]]:
    """The groups `user` is a member of, as each node's copy has them."""
    return [sorted(world.relay.groups.of_user.get(user, ())) for world in cluster.nodes]


def test_one_user_s_burst_of_creates_stops_at_the_cap(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """alice, cap 2, sends three creates back to back: each was planned on
    the node's copy before the store applied the first, so all passed the
    check (audit7 N2: ten of ten made). Now the node counts what it has
    planned, and the store what it applied: two made, the third refused."""
    cluster = cluster_of(2, max_user_groups=2)
    alice = cluster.login(0, "alice")
    world = cluster.nodes[0]
    planned: list[str] = []  # the changes the node handed the store to apply
    submit = world.relay.store.submit

    def recording(op: Any, *args: Any) -> None:
        if isinstance(op, ChangeGroup) and op.entries:
            planned.append(op.name)
        submit(op, *args)

    world.relay.store.submit = recording  # type: ignore[method-assign,assignment]
    asked = [(0, alice, world.request(alice, GroupAction.CREATE, f"s{i}")) for i in range(3)]
    got = answers(cluster, asked)
    assert [code for code, _ in got] == [0, 0, int(ErrorCode.GROUP_FULL)], got
    assert got[2][1] == "alice is in 2 groups, the most one user may be in"
    assert planned == ["s0", "s1"]  # the node counted the two in flight: s2 never left it
    cluster.settle()
    assert groups_of(cluster, "alice") == [["s0", "s1"]] * 2


def test_creates_on_two_nodes_at_once_put_a_user_in_no_more_than_the_cap(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """Three users on two nodes each create a group with carol (cap 2, in
    no group yet), all sent before any store answer: the nodes' copies
    cannot see each other's plans, so carol ended in every group (audit7
    N2: five with a cap of 2). Now the store's script counts her groups
    where it applies a change: two made, the rest `group_full` naming her;
    her leaving one makes room for the next."""
    cluster = cluster_of(2, max_user_groups=2)
    carol = cluster.login(1, "carol")
    makers = [cluster.login(0, "alice"), cluster.login(1, "bob"), cluster.login(0, "dave")]
    nodes = [0, 1, 0]
    asked = [(n, c, cluster.nodes[n].request(c, GroupAction.CREATE, f"g{i}", "carol"))
             for i, (n, c) in enumerate(zip(nodes, makers, strict=True))]  # fmt: skip
    got = answers(cluster, asked)
    made = [f"g{i}" for i, (code, _) in enumerate(got) if code == 0]
    assert len(made) == 2, got
    for code, text in got:
        assert code == 0 or (code, text) == (
            int(ErrorCode.GROUP_FULL),
            "carol is in 2 groups, the most one user may be in",
        ), got
    cluster.settle()
    assert groups_of(cluster, "carol") == [made] * 2
    redis = cluster.nodes[0].node.store.client
    assert redis.hget(USER_GROUPS_KEY, "carol") == "2"
    # Leaving one makes room, on either node; an add past the cap is refused too.
    assert cluster.request(1, carol, GroupAction.LEAVE, made[0]).code == 0
    assert redis.hget(USER_GROUPS_KEY, "carol") == "1"
    refused = [i for i, (code, _) in enumerate(got) if code != 0][0]
    maker = makers[refused]
    assert cluster.request(nodes[refused], maker, GroupAction.CREATE, "again").code == 0
    assert cluster.request(nodes[refused], maker, GroupAction.ADD, "again", "carol").code == 0
    assert cluster.request(0, makers[0] if refused else makers[1], GroupAction.CREATE, "more",
                           "carol").code == int(ErrorCode.GROUP_FULL)  # fmt: skip


def test_the_store_counts_groups_made_before_it_kept_counts(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """A cluster whose groups were made before the store counted each
    user's groups: the first node to start counts them from the members
    (once), so the cap holds for them and leaving never counts below zero;
    a group that ends with its last member counts out too."""
    first = cluster_of(1)
    alice, _ = first.login(0, "alice"), first.login(0, "bob")
    assert first.request(0, alice, GroupAction.CREATE, "g1", "bob").code == 0
    assert first.request(0, alice, GroupAction.CREATE, "g2").code == 0
    redis = first.nodes[0].node.store.client
    assert redis.hgetall(USER_GROUPS_KEY) == {"alice": "2", "bob": "1"}
    redis.delete(USER_GROUPS_KEY, USER_GROUPS_COUNTED_KEY)  # as before this change
    later = cluster_of(1, max_user_groups=2)  # a node starting now counts them
    assert redis.hgetall(USER_GROUPS_KEY) == {"alice": "2", "bob": "1"}
    alice_there = later.login(0, "alice")
    later.nodes[0]._request_ids = 100  # (the same client instance id: new request ids)
    refused = later.request(0, alice_there, GroupAction.CREATE, "g3")
    assert (refused.code, refused.message) == (
        int(ErrorCode.GROUP_FULL), "alice is in 2 groups, the most one user may be in"
    )  # fmt: skip
    assert later.request(0, alice_there, GroupAction.LEAVE, "g2").code == 0  # g2 ends
    assert redis.hgetall(USER_GROUPS_KEY) == {"alice": "1", "bob": "1"}
    redis.delete(USER_GROUPS_KEY)
    cluster_of(1)  # counted once: a later start leaves the counts alone
    assert redis.hgetall(USER_GROUPS_KEY) == {}


# --- N6: the window asks before leaving a group ---------------------------------------


def test_leave_group_in_the_window_asks_first_and_names_the_next_owner(
    gui: Gui,  # noqa: F811
) -> None:
    """ "Leave group", under Remove, acted at once: a slip took the owner out
    for good, ownership passed on (audit7 N6). Now it asks "Leave #newg?",
    naming who becomes owner; Escape or Cancel keeps you in (nothing sent),
    Leave leaves. A member who does not own it is told only how to get back;
    the last member that the group ends."""
    bob = gui.session("bob")
    gui.session("carol")
    window = gui.window()
    gui.login(window, "alice")
    assert window.session is not None
    window.session.group(GroupAction.CREATE, "newg", ("bob", "carol"))
    window.open_conversation("#newg")
    panel = window.groups.panel
    assert pump_until(gui.root, lambda: len(panel.rows()) == 3), panel.rows()

    panel.leave_button.invoke()
    dialog = panel.confirm
    assert dialog is not None and dialog.top.winfo_exists()
    assert dialog.text == ("Leave #newg? You are its owner: ownership passes to bob. Only a "
                           "member can add you back, and not as its owner.")  # fmt: skip
    panel.leave_button.invoke()  # a second click: the same question, not another
    assert panel.confirm is dialog
    window_screenshot(window, ARTIFACTS / "leave-group-confirm.png")
    dialog.cancel_button.focus_force()
    dialog.cancel_button.update()
    dialog.cancel_button.event_generate("<KeyPress>", keysym="Escape")  # (it closes at once)
    gui.root.update()
    assert panel.confirm is None and not dialog.top.winfo_exists()
    panel.leave_button.invoke()
    again = panel.confirm
    assert again is not None
    again.cancel_button.invoke()
    pump(gui.root, 1.0)
    assert "alice left" not in window.transcript_text()
    assert str(panel.leave_button.cget("state")) == "normal"
    assert not [e for e in drain(bob) if isinstance(e, GroupChanged) and e.change == "left"]

    panel.leave_button.invoke()
    confirm = panel.confirm
    assert confirm is not None
    confirm.leave_button.invoke()
    assert panel.confirm is None
    assert pump_until(gui.root, lambda: "alice left" in window.transcript_text())
    wait_for(bob, lambda e: isinstance(e, GroupChanged) and e.change == "owner"
             and e.users == ("bob",))  # fmt: skip
    assert str(panel.leave_button.cget("state")) == "disabled"


def test_the_leave_question_for_a_member_and_for_the_last_one() -> None:
    member = GroupInfo("team", "bob", ["bob", "alice", "carol"])
    assert leave_question("team", member, "alice") == (
        "Leave #team? Only a member can add you back."
    )
    last = GroupInfo("solo", "alice", ["alice"])
    assert (
        leave_question("solo", last, "Alice")
        == "Leave #solo? You are its last member: the group ends."
    )
