"""The window's group findings of audit14, on a real X display against a
real server process: our own group messages take their place in the
group's order once the server numbers them (G2), live and after a restart
of the window. Driven with key events like tests/test_gui.py; the other
member is a `ChatSession`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import client_groups_ui
from chat_client import ChatSession, GroupChanged, LoggedIn, MessageReceived, StatusChanged
from client_core import LinkStats
from client_groups_ui import MEMBERS_AT_LOGIN
from client_health import HELD_TEXT, level, summary
from client_look import PALETTE
from protocol import GroupAction, name_key
from tests.conftest import (
    PASSWORD,
    RunningServer,
    ServerProcess,
    make_session,
    spawn_server,
    stop_process,
    wait_for,
)
from tests.test_groups_gui import members_shown, window_screenshot
from tests.test_gui import Gui, open_gui, press, pump, pump_until, type_text
from tests.xvfb import display  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture
def slow_fanout(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server whose fan-out budget is 1 group copy a second (burst 2):
    a member's third message in a row waits a second, as over a slow link."""
    running = spawn_server("--max-fanout-rate", "1", data_dir=tmp_path / "server-data")
    yield running
    stop_process(running)


@pytest.fixture
def app(display: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gui]:  # noqa: F811
    yield from open_gui(None, monkeypatch)


def helper(app: Gui, server: ServerProcess, name: str) -> ChatSession:
    session = make_session()
    app.sessions.append(session)
    session.login(server.addr_text, name, password=PASSWORD)
    wait_for(session, lambda e: isinstance(e, LoggedIn))
    return session


def order_in(text: str, items: list[str]) -> list[str]:
    """`items` in the order they appear in `text`."""
    return sorted(items, key=text.index)


def test_own_group_messages_take_their_place_in_the_groups_order(
    app: Gui, slow_fanout: ServerProcess, tmp_path: Path
) -> None:
    bob = helper(app, slow_fanout, "bob")
    alice = app.window(server=slow_fanout.addr_text)
    app.login(alice, "alice")
    bob.group(GroupAction.CREATE, "ord", ("alice",))
    assert pump_until(app.root, lambda: name_key("#ord") in alice.conversations)
    alice.open_conversation("#ord")
    assert pump_until(app.root, lambda: "bob created the group" in alice.transcript_text())
    pump(app.root, 2.2)  # bob's budget is full again: his message goes at once

    typed = ["A1 first", "A2 second", "A3 third", "A4 fourth"]
    for text in typed:
        type_text(alice.composer, text)
        press(alice.composer, "Return")
    bob.send("B from bob", to="#ord")
    # The group's order, as bob has it: alice's messages by their seq, his by his.
    seqs: dict[str, int] = {}

    def record(event: object) -> bool:
        if isinstance(event, MessageReceived) and event.group == "ord":
            seqs[event.text] = event.seq
        if isinstance(event, StatusChanged) and event.state == "accepted" and event.seq:
            seqs["B from bob"] = event.seq
        return len(seqs) == 5

    wait_for(bob, record, timeout=20)
    group_order = sorted(seqs, key=seqs.__getitem__)
    assert group_order[-1] == "A4 fourth" and seqs["B from bob"] < seqs["A4 fourth"], (
        "alice's last message waited for the budget: bob's came between", seqs
    )  # fmt: skip
    conv = alice.current
    assert conv is not None and conv.name == "#ord"
    own = [line for line in conv.lines if line.kind == "own"]
    assert pump_until(app.root, lambda: all(line.state in ("accepted", "delivered")
                                            for line in own), 20)  # fmt: skip
    pump(app.root, 0.2)
    shown = alice.transcript_text()
    assert order_in(shown, group_order) == group_order, shown
    assert [line.text for line in conv.lines if line.text in seqs] == group_order
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    window_screenshot(alice, ARTIFACTS / "group-order-own.png")

    # After a restart of the window: the stored history reads back the same.
    assert alice.session is not None
    alice.session.logout(3.0)
    alice.close()
    again = app.window(server=slow_fanout.addr_text)
    app.login(again, "alice")
    again.open_conversation("#ord")
    assert pump_until(app.root, lambda: "B from bob" in again.transcript_text())
    shown = again.transcript_text()
    assert order_in(shown, group_order) == group_order, shown
    window_screenshot(again, ARTIFACTS / "group-order-own-restart.png")


# --- the other window findings (audit14 A5, A8, A9, A10, A11, H2) ---------------------


@pytest.fixture
def gui(display: str, server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gui]:  # noqa: F811
    yield from open_gui(server, monkeypatch)


def test_members_are_asked_for_a_few_groups_at_login_and_the_rest_when_opened(
    gui: Gui, monkeypatch: pytest.MonkeyPatch
) -> None:
    """audit14 A11: one /members per group at login spent the user's own
    message budget (10,000 groups: her message waited a minute)."""
    bob = gui.session("bob")
    gui.session("alice")  # the account
    count = MEMBERS_AT_LOGIN + 10
    for n in range(count):
        bob.group(GroupAction.CREATE, f"g{n}", ("alice",))
    wait_for(bob, lambda e: isinstance(e, GroupChanged) and e.group == f"g{count - 1}")
    alice = gui.window()
    asked: list[tuple[int, str]] = []
    original = ChatSession.group

    def recording(
        session: ChatSession, action: GroupAction, group: str = "", users: Any = ()
    ) -> bool:
        if session.username == "alice":
            asked.append((int(action), group))
        return original(session, action, group, users)

    monkeypatch.setattr(ChatSession, "group", recording)
    gui.login(alice, "alice")
    assert pump_until(gui.root, lambda: len(alice.groups.groups) == count)
    pump(gui.root, 0.3)
    members = [g for action, g in asked if action == GroupAction.MEMBERS]
    assert len(members) == MEMBERS_AT_LOGIN, members
    unasked = next(f"g{n}" for n in range(count) if f"g{n}" not in members)
    alice.open_conversation(f"#{unasked}")
    assert pump_until(gui.root, lambda: members_shown(alice, f"#{unasked}") == 2)
    assert alice.groups.panel.rows()[0].endswith("bob (owner)")
    alice.open_conversation(f"#{members[0]}")
    alice.open_conversation(f"#{unasked}")
    pump(gui.root, 0.1)
    again = [g for action, g in asked if action == GroupAction.MEMBERS]
    assert again == [*members, unasked], "asked once a session: changes keep it current"


def test_a_refused_new_group_reopens_its_dialog_and_leaves_no_conversation(gui: Gui) -> None:
    """audit14 A5, A8: the refusal landed in a phantom #taken conversation
    (switched to), styled like a membership change."""
    bob = gui.session("bob")
    carol = gui.session("carol")
    bob.group(GroupAction.CREATE, "taken", ("carol",))
    wait_for(carol, lambda e: isinstance(e, GroupChanged))
    alice = gui.window()
    gui.login(alice, "alice")
    alice.open_conversation("bob")
    before = alice.transcript_text()
    alice.groups.new_button.invoke()
    assert pump_until(gui.root, lambda: alice.groups.dialog is not None)
    dialog = alice.groups.dialog
    assert dialog is not None
    type_text(dialog.name_entry, "taken")
    type_text(dialog.members_entry, "bob")
    dialog.members_entry.event_generate("<KeyPress>", keysym="Return")
    assert alice.groups.dialog is None, "closed while the server is asked"
    assert pump_until(gui.root, lambda: alice.groups.dialog is not None), "back with the reason"
    dialog = alice.groups.dialog
    assert dialog is not None
    assert "#taken exists" in str(dialog.error.cget("text")), dialog.error.cget("text")
    assert (dialog.name_var.get(), dialog.members_var.get()) == ("taken", "bob")
    assert alice.current is not None and alice.current.name == "bob", "no switch"
    assert alice.transcript_text() == before, "nothing added to the open conversation"
    assert name_key("#taken") not in alice.conversations, "no phantom group"
    window_screenshot(alice, ARTIFACTS / "group-refused.png")
    # A name that is free: created, and only then opened.
    dialog.name_var.set("mine")
    dialog.members_entry.focus_force()
    dialog.members_entry.update()
    dialog.members_entry.event_generate("<KeyPress>", keysym="Return")  # closes it: no release
    assert pump_until(gui.root, lambda: alice.current is not None
                      and alice.current.name == "#mine")  # fmt: skip
    assert "alice created the group" in alice.transcript_text()
    # "New chat with #typo": not a group of ours, nothing to send to it.
    alice.open_conversation("#typo")
    assert not alice.groups.info("typo").member
    assert str(alice.groups.panel.add_button.cget("state")) == "disabled"
    # Another group refusal goes to its group, in the error colour.
    alice.open_conversation("bob")
    alice.open_conversation("#mine")
    type_text(alice.groups.panel.add_entry, "zed")
    press(alice.groups.panel.add_entry, "Return")
    assert pump_until(gui.root, lambda: "no user" in alice.transcript_text()), (
        alice.transcript_text()
    )
    found = alice.transcript.search("no user", "1.0")
    assert "error-line" in alice.transcript.tag_names(found), "not like a membership change"


def test_group_presence_dots_and_the_header_avatar(
    gui: Gui, monkeypatch: pytest.MonkeyPatch
) -> None:
    """audit14 A9: members whose presence is not followed were drawn
    offline; A10: a group's header avatar kept the last contact's dot."""
    monkeypatch.setattr(client_groups_ui, "WATCH_MEMBERS_MAX", 2)  # alice and bob
    bob = gui.session("bob")
    carol = gui.session("carol")
    gui.session("dave")
    alice = gui.window()
    gui.login(alice, "alice")
    alice.who_button.invoke()  # everyone online: conversations with presence
    assert pump_until(gui.root, lambda: name_key("dave") in alice.conversations)
    gui.session("erin")  # online, but neither a contact nor followed
    bob.group(GroupAction.CREATE, "team", ("alice", "carol", "dave", "erin"))
    wait_for(carol, lambda e: isinstance(e, GroupChanged))
    assert pump_until(gui.root, lambda: members_shown(alice, "#team") == 5)
    alice.open_conversation("dave")
    assert pump_until(gui.root, lambda: bool(dots(alice.peer_avatar))), "a contact's dot"
    alice.open_conversation("#team")
    assert dots(alice.peer_avatar) == [], "a group has no presence"
    assert pump_until(gui.root, lambda: alice.groups.panel.rows() == [
        "\u25cf bob (owner)", "\u25cf alice (you)", "\u25cf carol", "\u25cf dave",
        "\u25cc erin",
    ]), alice.groups.panel.rows()  # fmt: skip
    window_screenshot(alice, ARTIFACTS / "group-presence.png")


def dots(avatar: Any) -> list[int]:
    """The presence dot's items on an avatar canvas (8 px ovals)."""
    colours = {PALETTE.ok, PALETTE.idle}
    return [i for i in avatar.find_all() if avatar.itemcget(i, "fill") in colours
            and round(avatar.coords(i)[2] - avatar.coords(i)[0]) == 8]  # fmt: skip


def test_the_status_bar_says_the_server_holds_messages_back_not_loss() -> None:
    """audit14 H2: the fan-out budget's withheld acks read "loss 54 %"."""
    held = LinkStats("up", 13.0, 2.0, 54.0, 30, 56, 4, 3)
    assert summary(held) == "RTT 13 ms \u00b7 loss 54 % \u00b7 3 queued"
    assert level(held) == "fair"
    assert summary(held, True) == f"RTT 13 ms \u00b7 {HELD_TEXT} \u00b7 3 queued"
    assert level(held, True) == "good", "nothing is lost: no amber dot"
    slow = LinkStats("up", 650.0, 2.0, 54.0, 30, 56, 4, 3)
    assert level(slow, True) == "fair", "slow stays slow"
    clean = LinkStats("up", 13.0, 2.0, 0.0, 0, 56, 0, 0)
    assert summary(clean, True) == "RTT 13 ms \u00b7 loss 0 % \u00b7 0 queued"
