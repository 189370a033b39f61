"""What a new user's first hour found in the window (session 8, "fresh"),
on a real X display: a group message refused because one member holds the
group back names that member in its line and its hover (it said "(mailbox
full)" alone, and the hover "Members none has it yet (0)"); a click on
Retry hides the hover that covered the line it sent again; a group we left
says so in its members panel (an empty list and greyed buttons said
nothing); with nothing open, the hint points at "New chat with…" where it
is (it said "under the list"); the contact list has room for a group's
member count at the default size; Connect to takes a group (`#team`) as
`--connect-to` does; Ctrl+A selects a field's text (Tk moved to
its start, so typing over a pre-filled Server field gave
`127.0.0.1:5588127.0.0.1:5555`) and the composer's.

The group flow runs against a real server whose mailboxes (and so groups'
backlogs) hold three, as tests/test_group_backlog.py's window test does;
its screenshot goes to tests/artifacts/fresh_mailbox_full.png."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from chat_client import GroupChanged
from client_transcript import Line
from client_window import MIN_SIZE, ChatWindow
from protocol import GroupAction, name_key
from server_groups import backlog_full_text
from tests.conftest import RunningServer, start_server, stop_server, wait_for
from tests.conftest import test_config as server_config
from tests.test_groups_gui import hover, window_screenshot
from tests.test_gui import (
    LEFT,
    Gui,
    click_tag,
    open_gui,
    own_ids,
    press,
    pump,
    pump_until,
    type_text,
)
from tests.test_window_look import canvas_texts, inside
from tests.xvfb import display  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "tests" / "artifacts" / "fresh_mailbox_full.png"


@pytest.fixture
def small_backlog_gui(
    display: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Gui]:
    """Windows on a server whose mailboxes (and so groups' backlogs) hold three."""
    running = start_server(server_config(tmp_path / "server-data", mailbox_messages=3))
    try:
        yield from open_gui(running, monkeypatch)
    finally:
        stop_server(running)


@pytest.fixture
def gui_alone(display: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gui]:  # noqa: F811
    yield from open_gui(None, monkeypatch)


def send(window: ChatWindow, text: str) -> None:
    type_text(window.composer, text)
    press(window.composer, "Return")


def test_a_group_held_back_by_one_member_names_her_and_a_group_we_left_says_so(
    small_backlog_gui: Gui,
) -> None:
    app = small_backlog_gui
    carol = app.session("carol")  # an account; she goes away
    carol.close(3.0)
    app.sessions.remove(carol)
    alice = app.window(LEFT)
    app.login(alice, "alice")

    # Nothing open: the hint says where to type a name.
    send(alice, "hello?")
    hint = str(alice.peer_label.cget("text"))
    assert "New chat with\u2026" in hint and "under the list" not in hint, hint
    assert alice.composed() == "hello?", "the text stays in the composer"
    press(alice.composer, "a", control=True)
    assert alice.composer.tag_ranges("sel"), "Ctrl+A selects the composer's text"
    assert alice.composer.get("sel.first", "sel.last") == "hello?"
    press(alice.composer, "Escape")

    bob = app.session("bob")
    bob.group(GroupAction.CREATE, "team", ("alice", "carol"))
    assert pump_until(app.root, lambda: name_key("#team") in alice.conversations)
    alice.open_conversation("#team")
    for text in ("one", "two", "three"):  # carol has not had the CREATED: 1 + 2
        send(alice, text)
    assert pump_until(app.root, lambda: len(own_ids(alice, "#team")) == 3)
    third = own_ids(alice, "#team")[2]
    assert pump_until(app.root, lambda: alice.state_of(third) == "failed"), "backlog full"

    # The line names carol; its hover says how much waits and what frees it.
    shown = alice.transcript_text()
    assert "\u2717 failed (carol's backlog is full)" in shown, shown
    line = alice.conversations[name_key("#team")].by_id[third]
    described = alice.describe_line(line)
    assert "Failed     mailbox full: carol's backlog is full\n" in described, described
    assert "Waiting    3 messages (6 bytes) for carol, furthest behind\n" in described
    assert "removed by the owner" in described and "none has it yet" not in described, described
    # At the default size the contact line has room for its member count
    # (it read "group · 3 mem…", and the field above it "New chat with..").
    alice.top.update()
    drawn = canvas_texts(alice.contacts)
    assert "group \u00b7 3 members" in drawn, drawn
    hover(alice.transcript, f"sttext-{third}")
    assert pump_until(app.root, lambda: "for carol" in alice.tooltip.shown), "no hover"
    window_screenshot(alice, SCREENSHOT)

    # Retry under the pointer: the hover goes (it covered the line sent again).
    click_tag(alice.transcript, f"retry-{third}")
    assert alice.tooltip.shown == ""
    assert pump_until(app.root, lambda: len(own_ids(alice, "#team")) == 4), "sent again"

    # alice leaves: the panel says she is not a member, not just nothing.
    panel = alice.groups.panel
    assert not panel.note.winfo_ismapped()
    panel.confirmed()  # (Leave group, confirmed)
    assert pump_until(app.root, lambda: panel.note.winfo_ismapped()), "no word in the panel"
    assert panel.note.cget("text") == "You are not a member of #team any more."
    assert str(panel.leave_button.cget("state")) == "disabled"

    # The next run (a new window, its lines read from the store): the failed
    # lines still say why (they said "✗ failed" alone).
    alice.log_out()
    assert pump_until(app.root, lambda: alice.login_frame.winfo_ismapped(), 10)
    again = app.window(LEFT)
    app.login(again, "alice")
    again.open_conversation("#team")
    shown = again.transcript_text()
    assert shown.count("\u2717 failed (carol's backlog is full)") == 2, shown


def test_ctrl_a_selects_what_a_login_field_holds_so_typing_replaces_it(gui_alone: Gui) -> None:
    window = gui_alone.window(LEFT, server="127.0.0.1:5555")
    entry = window.server_entry
    press(entry, "End")
    press(entry, "a", control=True)
    assert entry.selection_present() and entry.index("sel.first") == 0
    assert entry.index("sel.last") == len("127.0.0.1:5555")
    type_text(entry, "127.0.0.1:5588")
    assert window.server_var.get() == "127.0.0.1:5588"
    # Two addresses run together are refused as such, not tried as an IPv6 host.
    entry.insert("end", "127.0.0.1:5555")
    type_text(window.username_entry, "alice")
    type_text(window.password_entry, "secret")
    window.login_button.invoke()
    error = str(window.login_error.cget("text"))
    assert "is not HOST:PORT" in error and "does not answer" not in error, error
    assert window.session is None


@pytest.fixture
def gui(display: str, server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gui]:  # noqa: F811
    yield from open_gui(server, monkeypatch)


def test_connect_to_takes_a_group_as_the_terminals_connect_to_does(gui: Gui) -> None:
    """The login's Connect to refused `#team` ("Connect to: ... not a valid
    name") while `chat-client --no-gui --connect-to '#team'` opened it."""
    alice = gui.session("alice")
    account = gui.session("bob")  # an account; away while the group is made
    account.close(3.0)
    gui.sessions.remove(account)
    alice.group(GroupAction.CREATE, "team", ("bob",))
    assert wait_for(alice, lambda e: isinstance(e, GroupChanged))
    bob = gui.window(LEFT)
    bob.connect_var.set("#team")  # (type_text has no keysym for '#')
    gui.login(bob, "bob")
    assert bob.current is not None and bob.current.name == "#team"
    assert pump_until(gui.root, lambda: "created the group" in bob.transcript_text())
    assert bob.groups.panel.visible()


def test_a_failure_that_wraps_the_last_line_keeps_its_retry_in_view(gui_alone: Gui) -> None:
    """The view at the end (scrolled there by the person), our last message
    fails: its reason and Retry wrap onto a line below the view, and
    nothing said so (seen with "(dave's backlog is full)")."""
    window = gui_alone.window("780x400+10+40", server="127.0.0.1:5555")
    view = window.view
    window.chat_frame.pack(fill="both", expand=True)  # (no login: the view alone)
    window.login_frame.pack_forget()
    lines = [Line("peer", "carol", f"line {n}", 1_700_000_000.0 + n) for n in range(30)]
    text = "the last one, long enough to reach the right edge of the view so that what follows"
    mine = Line("own", "alice", text, 1_700_000_100.0, "m-1", "sending")
    view.show([*lines, mine], has_earlier=False)
    window.top.update()
    view._yview("moveto", 1.0)  # the person's own scroll to the end (not "following")
    window.top.update()
    assert view.text.yview()[1] >= 0.999
    mine.state, mine.reason = "failed", "mailbox_full"
    mine.detail = backlog_full_text("team", "dave", 268, 10_485_758)
    view.render_state(mine)
    window.top.update()
    retry = view.text.tag_ranges("retry-m-1")
    assert view.text.bbox(retry[0]) is not None, "Retry is below the view"
    # A state that wraps goes on under the message's text, not under its
    # time: its tags carry the message's indent (they had none).
    indent = str(view.text.tag_cget("own", "lmargin2"))
    assert indent not in ("", "0")
    for tag in ("failed", "state", "retry"):
        assert str(view.text.tag_cget(tag, "lmargin2")) == indent, tag


def test_a_group_open_in_a_small_window_keeps_the_composer_and_the_panels_buttons(
    gui: Gui,
) -> None:
    """At 420x320 with a group open the members panel took the room: the
    transcript was a sliver, the composer gone, Send cut to "Se"; at
    780x360 the panel's Remove and Leave group were cut off below."""
    alice = gui.session("alice")
    account = gui.session("bob")
    account.close(3.0)
    gui.sessions.remove(account)
    alice.group(GroupAction.CREATE, "team", ("bob",))
    assert wait_for(alice, lambda e: isinstance(e, GroupChanged))
    bob = gui.window(f"{MIN_SIZE[0]}x{MIN_SIZE[1]}+10+40")
    bob.connect_var.set("#team")
    gui.login(bob, "bob")
    assert bob.current is not None and bob.current.name == "#team"
    pump(gui.root, 0.3)
    controls = {"send": bob.send_button, "composer": bob.composer, "transcript": bob.transcript}
    hidden = [name for name, widget in controls.items() if not inside(widget, bob.top)]
    assert not hidden, f"at {MIN_SIZE} with a group open: {hidden} cut off or hidden"
    assert bob.view.text.winfo_width() > 150, "the transcript is a sliver"
    assert not bob.groups.panel.visible(), "no room for the members panel"
    bob.top.geometry("780x360")
    assert pump_until(gui.root, lambda: bob.groups.panel.visible()), "room again: shown"
    pump(gui.root, 0.3)
    panel = bob.groups.panel
    buttons = {"add": panel.add_button, "remove": panel.remove_button,
               "leave": panel.leave_button, "send": bob.send_button}  # fmt: skip
    hidden = [name for name, widget in buttons.items() if not inside(widget, bob.top)]
    assert not hidden, f"at 780x360: {hidden} cut off"
