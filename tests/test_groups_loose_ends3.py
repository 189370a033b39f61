"""Groups' loose ends, third round (issue 14), on the sans-IO relay with a
fake clock: the fan-out budget holds for group messages that waited or
cost more than their datagram was reckoned at (a group made or grown in
the same datagram, a message behind a request or a lookup on the disk):
a message is numbered only once the budget can pay for its copies, and
what the sender sends to that group after it waits behind it, so one
sender never makes the server emit more copies than `burst + rate * t`;
nothing taken is dropped, every member has every message once, in order.
Cluster mode (messages held behind /create) is in test_cluster_groups3.py;
the client's "delivered by" across a restart, with real processes, below."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from chat_client import _Group, event_to_text
from chat_server import ServerConfig, start_line
from client_core import (
    Cancelled,
    GroupChanged,
    GroupUnchanged,
    MessageReceived,
    RecipientsChanged,
    StatusChanged,
)
from client_groups_ui import GroupsUI
from protocol import ErrorCode, GroupAccept, GroupAction, GroupEvent, GroupInfo, GroupResult
from server_store import MemoryStore, ServerStore
from tests.conftest import spawn_server, stop_process
from tests.redis_fixture import redis_server  # noqa: F401 (a fixture)
from tests.test_bounds import Client
from tests.test_client_core import Net
from tests.test_cluster_groups import cluster_of  # noqa: F401 (a fixture)
from tests.test_groups_client import add, login
from tests.test_groups_gui import contact_text, gui  # noqa: F401 (a fixture)
from tests.test_groups_relay import GroupWorld, entries, texts
from tests.test_groups_terminal import Terminal, terminal
from tests.test_gui import Gui, press, pump, pump_until, type_text
from tests.xvfb import display  # noqa: F401 (a fixture)

STEP = 0.02


def copies_within_budget(world: GroupWorld, members: list[Client], rate: float, burst: float,
                         expected: int, steps: int) -> None:  # fmt: skip
    """Step until every member has `expected` messages, checking after each
    step that the copies handed out so far are within the budget."""
    start = world.now
    for _ in range(steps):
        got = sum(len(texts(m)) for m in members)
        elapsed = world.now - start
        assert got <= burst + rate * elapsed, (elapsed, got)
        if all(len(texts(m)) == expected for m in members):
            return
        world.step(STEP)
    raise AssertionError(f"not every member had {expected} messages")


def test_posts_in_the_datagram_that_makes_the_group_pay_the_fan_out_budget() -> None:
    """/create #team with nine members and 20 posts, sent together: the
    datagram was reckoned before the group existed (no copies), and the old
    relay then numbered every post in it at once, far past the burst (the
    debt only made later messages wait). Now each waits for the budget."""
    rate, burst = 100.0, 30.0
    world = GroupWorld(MemoryStore(), max_fanout_rate=rate, max_fanout_burst=burst)
    alice = world.login("alice")
    names = [f"m{n}" for n in range(9)]
    members = [world.login(n) for n in names]
    world.settle_all()
    world.request(alice, GroupAction.CREATE, "team", *names)
    for i in range(20):
        world.post(alice, "team", f"p{i:02d}", i + 1)
    copies_within_budget(world, members, rate, burst, 20, 400)
    assert world.relay.stats["held_fanout"] > 0
    for member in members:
        assert texts(member) == [f"p{i:02d}" for i in range(20)]
    world.settle_all()
    assert [a.msg_id.client_seq for a in alice.of(GroupAccept)] == list(range(1, 21))
    assert world.relay._group_holds == {} and world.relay._budget_waits == {}


def test_a_request_after_a_post_waiting_for_the_budget_waits_behind_it() -> None:
    """alice posts a burst, then removes erin: the posts past the budget
    wait for it, and the removal waits behind them (erin has every post
    sent before it, then her removal, as the client sent them)."""
    rate, burst = 50.0, 10.0
    world = GroupWorld(MemoryStore(), max_fanout_rate=rate, max_fanout_burst=burst)
    alice, bob, erin = world.login("alice"), world.login("bob"), world.login("erin")
    assert world.result(alice, world.request(alice, GroupAction.CREATE, "team", "bob",
                                             "erin")).code == 0  # fmt: skip
    world.settle_all()
    for i in range(12):
        world.post(alice, "team", f"p{i:02d}", i + 1)
    removed = world.request(alice, GroupAction.REMOVE, "team", "erin")
    copies_within_budget(world, [bob], rate, burst, 12, 400)
    assert world.result(alice, removed).code == 0
    world.settle_all()
    got = entries(erin)
    assert [e[1] for e in got] == ["created"] + ["message"] * 12 + ["removed"], got
    assert [e[0] for e in got] == list(range(1, 15))
    assert world.relay.stats["held_fanout"] > 0


def test_a_session_that_ends_while_its_post_waits_for_the_budget_loses_nothing() -> None:
    """The waiting posts go with the session (never accepted: the client
    sends them again at its next login), and the wait's timer with them."""
    rate, burst = 20.0, 4.0
    world = GroupWorld(MemoryStore(), max_fanout_rate=rate, max_fanout_burst=burst)
    alice, bob = world.login("alice"), world.login("bob")
    erin = world.login("erin")
    assert world.result(alice, world.request(alice, GroupAction.CREATE, "team", "bob",
                                             "erin")).code == 0  # fmt: skip
    world.settle_all()
    for i in range(8):
        world.post(alice, "team", f"p{i}", i + 1)
    world.step(0.001)
    world.step(0.001)
    relay: Any = world.relay
    assert relay._budget_waits and relay._group_holds
    accepted = [a.msg_id.client_seq for a in alice.of(GroupAccept)]
    assert 0 < len(accepted) < 8
    world.logout(alice)
    assert relay._budget_waits == {} and relay._group_holds == {}
    alice = world.login("alice")
    for i in range(len(accepted), 8):  # what was not accepted, sent again
        world.post(alice, "team", f"p{i}", i + 1)
    world.run_until(lambda: len(texts(erin)) == 8, 400, "every post")
    assert texts(bob) == texts(erin) == [f"p{i}" for i in range(8)]


def test_membership_changes_pay_the_fan_out_budget_too() -> None:
    """The owner of a group of ten removes and adds dave 20 times in a
    burst: each change is an entry handed to every member, ten copies, and
    the old relay paid none of them to the budget (only the message rate
    held them: 200 requests a second, 2,000 copies). Now each change waits
    for the budget like a message, in order: every member sees them all,
    in one order, and dave ends a member."""
    rate, burst = 100.0, 30.0
    world = GroupWorld(MemoryStore(), max_fanout_rate=rate, max_fanout_burst=burst)
    alice = world.login("alice")
    names = [f"m{n}" for n in range(8)]
    members = [world.login(n) for n in names]
    dave = world.login("dave")
    world.settle_all()
    world.request(alice, GroupAction.CREATE, "team", *names, "dave")
    world.run_until(lambda: len(entries(dave)) == 1, 200, "dave in #team")
    for _ in range(60):  # the budget is full again
        world.step(STEP)
    start, before = world.now, sum(len(entries(m)) for m in members)
    for _ in range(20):
        world.request(alice, GroupAction.REMOVE, "team", "dave")
        world.request(alice, GroupAction.ADD, "team", "dave")
    for _ in range(800):
        got = sum(len(entries(m)) for m in members) - before
        assert got <= burst + rate * (world.now - start), (world.now - start, got)
        if got == 8 * 40:
            break
        world.step(STEP)
    changes = [[e[1] for e in entries(m)] for m in members]
    assert changes == [["created"] + ["removed", "added"] * 20] * 8
    assert [e[0] for e in entries(members[0])] == list(range(1, 42))
    assert world.relay.stats["held_fanout"] > 0
    group = world.relay.groups.get("team")
    assert group is not None and "dave" in group.members


# --- "delivered by" across a restart of the sender's client (real processes) --------


def delivered(client: Terminal) -> list[tuple[str, str]]:
    return [(e["id"], e["by"]) for e in client.events
            if e["event"] == "status" and e["state"] == "delivered"]  # fmt: skip


@pytest.mark.parametrize("end", ["quit", "kill -9"])
def test_no_delivered_event_twice_for_a_member_across_a_restart_of_the_client(
    tmp_path: Path, end: str
) -> None:
    """alice's message to #team reaches bob, not erin (away). alice's client
    ends (/quit, or SIGKILL right after it printed "delivered by bob") and
    starts again: the server tells her again that bob has it (the mark it
    keeps is one number per sender and group, at the group's low-water
    mark, which erin holds: no row per copy), and the client says nothing
    of it, since it keeps who has each message with the message, committed
    before the event is printed. Then erin has it: one "delivered by erin",
    and no `delivered` event for a member twice across the two runs."""
    running = spawn_server(data_dir=tmp_path / "server-data")
    clients: list[Terminal] = []
    try:
        erin = Terminal(running.addr_text, "erin")
        clients.append(erin)
        erin.wait(lambda e: e["event"] == "logged_in")
        assert erin.quit() == 0
        alice, bob = Terminal(running.addr_text, "alice"), Terminal(running.addr_text, "bob")
        clients += [alice, bob]
        for client in (alice, bob):
            client.wait(lambda e: e["event"] == "logged_in")
        alice.type("/create #team bob erin")
        bob.wait(lambda e: e.get("change") == "created")
        alice.type("/to #team", "hello both")
        alice.wait(lambda e: e.get("state") == "delivered" and e.get("by") == "bob")
        first = delivered(alice)
        if end == "quit":
            assert alice.quit() == 0
        else:
            alice.kill()
        again = Terminal(running.addr_text, "alice")
        clients.append(again)
        again.wait(lambda e: e["event"] == "logged_in")
        erin = Terminal(running.addr_text, "erin")
        clients.append(erin)
        erin.wait(lambda e: e.get("text") == "hello both")
        again.wait(lambda e: e.get("state") == "delivered" and e.get("by") == "erin")
        time.sleep(0.5)  # anything later would be a duplicate: none comes
        assert again.quit() == 0
    finally:
        for client in clients:
            client.kill()
        stop_process(running)
    (msg,) = {i for i, _ in first}
    assert first == [(msg, "bob")]
    assert delivered(again) == [(msg, "erin")], again.events


# --- the terminal: /remove naming yourself beside others (audit14 A1) ---------------


def test_remove_naming_yourself_beside_others_removes_only_them() -> None:
    """`/remove #team alice carol` typed by the owner alice: one request per
    name made "remove alice" alone a leave (the server's rule), so alice
    left, bob owned the group and carol stayed. Now alice's own name is
    left out when others are named, as the server does for one request;
    named alone it is still leaving."""
    session, events, _ = terminal("/remove #team Alice carol\n/remove #team alice\n")
    groups = [c for c in session.commands if isinstance(c, _Group)]
    assert groups == [
        _Group(GroupAction.REMOVE, "team", ("carol",)),
        _Group(GroupAction.REMOVE, "team", ("alice",)),
    ]
    assert not [e for e in events if e["event"] == "error"]


# --- an add that changes nothing is answered (audit14 A2) ---------------------------


@pytest.mark.parametrize("how", ["terminal", "window"])
def test_an_add_of_a_member_already_there_is_answered(how: str) -> None:
    """bob adds carol, a member already: the server answers code 0
    "already members", and the client dropped every code-0 answer
    ("its event follows"; none does here): a script waiting for an answer
    to each request waited for ever, the window showed nothing. Now it is
    an `unchanged` event (a line in the group's transcript in the window);
    a done add still answers with its `group` event alone."""
    net = Net(ServerConfig(iterations=4096, key_workers=0))
    alice, bob, _ = login(net, "alice", "bob", "carol")
    login(net, "dave")
    alice.core.group_request(GroupAction.CREATE, "team", ("bob", "carol"))
    net.run(lambda: bool(bob.of(GroupChanged)), "bob in #team")
    bob.core.group_request(GroupAction.ADD, "team", ("carol",))
    bob.core.group_request(GroupAction.ADD, "team", ("dave",))
    net.run(lambda: len(bob.of(GroupChanged)) == 2, "dave added")
    net.settle(0.5)
    (unchanged,) = bob.of(GroupUnchanged)
    assert unchanged.to_json() == {"event": "unchanged", "group": "team", "users": ["carol"],
                                   "message": "already members"}  # fmt: skip
    assert event_to_text(unchanged) == ("* #team: carol: already members", False)
    assert [e.change for e in bob.of(GroupChanged)] == ["created", "added"]
    if how == "window":
        lines: list[tuple[str, str]] = []
        window = SimpleNamespace(
            conversation=lambda name: name,
            _add_line=lambda conv, line: lines.append((conv, line)),
        )
        ui = GroupsUI.__new__(GroupsUI)
        ui.w = window
        ui.make_line = lambda kind, who, text, stamp: text
        ui.handle(unchanged)
        assert lines == [("#team", "carol is a member of #team already")]


def test_the_start_line_names_the_group_limits() -> None:
    """An operator reads the limits in force from the first log line; the
    groups' were missing (audit14 A6: a server run with --max-fanout-rate 4
    said nothing of it)."""
    config = ServerConfig(max_fanout_rate=4.0, max_group_members=50)
    server = SimpleNamespace(address=("127.0.0.1", 5555), metrics_address=None,
                             cluster_store=None)  # fmt: skip
    line = start_line(server, config)  # type: ignore[arg-type]
    assert "--max-fanout-rate 4 group copies/s per user, --max-group-members 50, " in line


# --- the window (audit14 A3, A4, A7), on a real X display against a real server ------


def test_a_left_group_stays_left_after_the_window_restarts_and_takes_no_messages(
    gui: Gui,  # noqa: F811
) -> None:
    """alice leaves #team and her window restarts: the group of her history
    that the server no longer lists is shown `left`, its Add and Leave are
    disabled and opening it asks nothing (before: taken for a group she is
    in, Add and Leave enabled, and each opening put "you are not a member of
    #team" into the transcript). A line typed there is not sent (before it
    failed with a Retry that could only fail again); it stays in the
    composer."""
    bob = gui.session("bob")
    window = gui.window()
    gui.login(window, "alice")
    assert window.session is not None
    window.session.group(GroupAction.CREATE, "team", ("bob",))
    window.open_conversation("#team")
    assert pump_until(gui.root, lambda: contact_text(window, "#team")[1][:1] == [
        "group \u00b7 2 members"]), contact_text(window, "#team")  # fmt: skip
    # The count on the line under the name: an unread badge cannot cut it.
    assert contact_text(window, "#team")[0] == "#team"
    window.groups.panel.leave_button.invoke()
    confirm = window.groups.panel.confirm
    assert confirm is not None  # "Leave #team?" (audit7 N6)
    confirm.leave_button.invoke()
    assert pump_until(gui.root, lambda: "alice left" in window.transcript_text())
    window.close()
    gui.windows.remove(window)
    window = gui.window()
    gui.login(window, "alice")
    assert pump_until(gui.root, lambda: window.groups.listed)
    assert pump_until(gui.root, lambda: contact_text(window, "#team")[1][:1] == ["left"]), (
        contact_text(window, "#team")
    )
    window.open_conversation("#team")
    panel = window.groups.panel
    pump(gui.root, 0.5)
    assert str(panel.add_button.cget("state")) == "disabled"
    assert str(panel.leave_button.cget("state")) == "disabled"
    assert "not a member" not in window.transcript_text()
    type_text(window.composer, "anyone there?")
    press(window.composer, "Return")
    assert pump_until(gui.root, lambda: "nothing is sent to it" in window.transcript_text())
    assert "anyone there?" in window.composed()
    pump(gui.root, 0.5)
    got = []
    while not bob.events.empty():
        got.append(bob.events.get_nowait())
    assert not [e for e in got if isinstance(e, MessageReceived)], got


# --- an ended group's rest before a new group of its name (audit14 G1) ----------------


def test_what_an_ended_group_owes_comes_before_a_new_group_of_its_name() -> None:
    """carol, away, is removed from #team; then #team ends (its last members
    leave) while she is owed its rest, and dave makes a new #team with her
    and posts. At her login she got the new group's creation and message
    first, then the old group's message and "alice removed carol", all on
    one name: told she was removed from the group she is in. Now the old
    group's rest comes first, then the new group's."""
    world = GroupWorld(MemoryStore())
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    dave = world.login("dave")
    assert world.result(alice, world.request(alice, GroupAction.CREATE, "team", "bob",
                                             "carol")).code == 0  # fmt: skip
    world.settle_all()
    world.logout(carol)
    world.post(alice, "team", "old 1", 1)
    world.settle_all()
    assert world.result(alice, world.request(alice, GroupAction.REMOVE, "team", "carol")).code == 0
    assert world.result(alice, world.request(alice, GroupAction.LEAVE, "team")).code == 0
    assert world.result(bob, world.request(bob, GroupAction.LEAVE, "team")).code == 0
    world.settle_all()
    assert world.result(dave, world.request(dave, GroupAction.CREATE, "team", "carol")).code == 0
    world.post(dave, "team", "new 1", 1)
    world.settle_all()
    carol = world.login("carol")
    world.run_until(lambda: len(entries(carol)) == 4, 300, "carol's four entries")
    world.settle_all()
    got = [(e[1], e[2]) for e in entries(carol)]
    assert got == [("message", "alice"), ("removed", "alice"), ("created", "dave"),
                   ("message", "dave")], got  # fmt: skip


def test_a_members_answer_comes_after_the_change_before_it(tmp_path: Path) -> None:
    """/create #quick bob then /members #quick, sent together: the members
    were answered from memory at once, before the `created` event (which
    waits for the commit): a script saw the members of a group it had not
    heard of (audit14 T1). Now the answer follows the commit too."""
    store = ServerStore(tmp_path / "data")
    store.start()
    try:
        world = GroupWorld(store)
        alice, _ = world.login("alice"), world.login("bob")
        world.request(alice, GroupAction.CREATE, "quick", "bob")
        asked = world.request(alice, GroupAction.MEMBERS, "quick")
        world.run_until(lambda: bool(alice.of(GroupInfo)), 300, "the members")
        world.settle_all()
    finally:
        store.close()
    kinds = [type(m).__name__ for m in alice.messages if isinstance(m, GroupEvent | GroupInfo)]
    assert kinds == ["GroupEvent", "GroupInfo"], kinds
    assert alice.of(GroupInfo)[0].request_id == asked


# --- /cancel #team (audit14 T4) -------------------------------------------------------


def test_cancel_takes_a_group_and_ends_what_has_not_left() -> None:
    """`/cancel #team` was refused ("'#team' contains '#'"), so messages
    queued for a group could not be withdrawn. Now what has not left ends
    at once; one in flight the server accepts is answered "too late"."""
    net = Net(ServerConfig(iterations=4096, key_workers=0))
    alice, bob = login(net, "alice", "bob")
    alice.core.group_request(GroupAction.CREATE, "team", ("bob",))
    net.run(lambda: bool(bob.of(GroupChanged)), "bob in #team")
    late = alice.core.send("in flight", net.now, to="#team")
    assert alice.core.cancel("#Team") == []  # it has left: the server answers
    net.run(lambda: bool(alice.of(Cancelled)), "the cancel's answer")
    assert alice.of(Cancelled) == [Cancelled("#team", (), (late,))]
    alice.core.abort()
    alice = add(net, "alice")  # a new client instance, not logged in yet
    queued = alice.core.send("never goes", net.now, to="#team")
    assert alice.core.cancel("#team") == [queued]
    net.run(lambda: alice.logged_in, "alice back")
    net.settle(2.0)
    assert [e.state for e in alice.of(StatusChanged) if e.id == queued] == ["sending", "failed"]
    assert [m.text for m in bob.of(MessageReceived)] == ["in flight"]


def test_the_account_gone_line_names_the_message_by_its_text() -> None:
    """Without --json the line named the message by its opaque id (audit14
    H1); the other status lines name it by its text, and so does this one
    when the client has it (the id when it does not: after a restart)."""
    event = RecipientsChanged("9-1", "#team", 1, "carol", "hello all of you, this is a long one")
    assert event_to_text(event) == (
        "  carol's account is gone: (#team: hello all of you, this is a l\u2026) now goes to "
        "1 member(s)", False)  # fmt: skip
    assert event.to_json() == {"event": "recipients", "id": "9-1", "group": "team",
                               "recipients": 1, "gone": "carol"}  # fmt: skip


# --- the groups one user may be in (audit14 L3) -----------------------------------------


@pytest.mark.parametrize("store", ["memory", "cluster"])
def test_the_groups_one_user_may_be_in_are_bounded(
    store: str, request: pytest.FixtureRequest
) -> None:
    """A user made groups without end at the message rate (9,922 in the
    audit, past --max-memory: every group lives in memory). Now a create
    or add that would put anyone in more than --max-user-groups groups is
    refused (`group_full`, naming them); leaving one makes room."""
    if store == "cluster":
        cluster = request.getfixturevalue("cluster_of")(1, max_user_groups=2)
        world = cluster.nodes[0]
        settle = cluster.settle
    else:
        world = GroupWorld(MemoryStore(), max_user_groups=2)
        settle = world.settle_all
    alice, _, carol = world.login("alice"), world.login("bob"), world.login("carol")
    settle()

    def answer(client: Client, action: GroupAction, group: str, *users: str) -> tuple[int, str]:
        request_id = world.request(client, action, group, *users)
        for _ in range(400):
            found = [r for r in client.of(GroupResult) if r.request_id == request_id]
            if found:
                return found[-1].code, found[-1].message
            settle(1)
        raise AssertionError(f"no answer to {action} {group}")

    assert answer(alice, GroupAction.CREATE, "g1", "bob")[0] == 0
    assert answer(alice, GroupAction.CREATE, "g2")[0] == 0
    assert answer(alice, GroupAction.CREATE, "g3") == (
        int(ErrorCode.GROUP_FULL),
        "alice is in 2 groups, the most one user may be in",
    )
    assert answer(carol, GroupAction.CREATE, "c1", "bob")[0] == 0
    refused = answer(carol, GroupAction.CREATE, "c2", "bob")
    assert refused == (int(ErrorCode.GROUP_FULL),
                       "bob is in 2 groups, the most one user may be in")  # fmt: skip
    assert answer(alice, GroupAction.LEAVE, "g2")[0] == 0
    assert answer(alice, GroupAction.CREATE, "g3")[0] == 0
