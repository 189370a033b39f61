"""The window's findings of audit7 (N8-N12) on a real X display: the hover
over a big group's message that killed the window (N9), "New chat with…"
a group we are not in (N8), the member count of a group we were added to
(N10), the newest line in view when a conversation opens (N11), the New
group dialog's primary button (N12).

N9 runs its tooltips in a child process: on the old code X refused the
label's pixmap (BadAlloc), which ends the process, and a test must fail
rather than take the test run down with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chat_client import GroupChanged
from client_look import NAMES_SHOWN, name_list
from client_transcript import Line
from client_window import ChatWindow
from protocol import GroupAction, name_key
from tests.conftest import RunningServer, wait_for
from tests.test_groups_gui import members_shown
from tests.test_gui import Gui, open_gui, press, pump, pump_until
from tests.xvfb import display  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent

#: 1,000 members with long names: one line of them is ~200,000 px.
LONG_NAMES = [f"member-with-a-long-name-{n:04d}" for n in range(1000)]

TOOLTIPS = textwrap.dedent(
    """
    import json, sys, tkinter as tk
    from client_look import Tooltip
    from client_groups_ui import Receipts
    from client_transcript import Line
    from client_window import ChatWindow, Settings
    from chat_client import ChatSession

    names = json.loads(sys.argv[1])
    root = tk.Tk()
    root.withdraw()
    out = {"screen": [root.winfo_screenwidth(), root.winfo_screenheight()]}

    def measure(tip, text, x, y):
        tip.show(text, x, y)
        root.update()
        x, y = tip.window.wm_geometry().split("+")[1:]
        return {"req": [tip.label.winfo_reqwidth(), tip.label.winfo_reqheight()],
                "at": [int(x), int(y)], "shown": tip.label.cget("text")}

    # The window's hover over our message to a group of 1,000.
    settings = Settings(server="127.0.0.1:9", username="", geometry="800x600+0+0", path=None)
    window = ChatWindow(tk.Toplevel(root), settings, session_factory=ChatSession)
    window.groups.receipts["m1"] = Receipts(len(names), list(names))
    line = Line("own", "alice", "hello big group", 0.0, msg_id="m1", state="delivered")
    out["hover"] = window.describe_line(line)
    out["window"] = measure(window.tooltip, out["hover"], 700, 500)
    # The Tooltip itself, whatever it gets: every name on one line, one word
    # of 100,000 characters, 5,000 short lines; near the screen's corner.
    tip = Tooltip(root)
    sw, sh = out["screen"]
    out["one line"] = measure(tip, ", ".join(names), sw - 5, sh - 5)
    out["one word"] = measure(tip, "x" * 100_000, 10, 10)
    out["many lines"] = measure(tip, "\\n".join(names * 5), sw // 2, sh // 2)
    window.close()
    root.destroy()
    print(json.dumps(out))
    """
)


def run_tooltips(display: str, names: list[str]) -> dict[str, Any]:  # noqa: F811
    env = dict(os.environ, DISPLAY=display, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", TOOLTIPS, json.dumps(names)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"the process died ({proc.returncode}):\n{proc.stderr[-2000:]}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_the_hover_over_a_message_to_1000_members_fits_on_the_screen(
    display: str,  # noqa: F811
) -> None:
    """audit7 N9: "✓✓ 1000 of 1000" named every member in one unwrapped
    line; X refused a pixmap that wide and the window died at the hover."""
    out = run_tooltips(display, LONG_NAMES)
    screen_w, screen_h = out["screen"]
    hover = out["hover"]
    assert isinstance(hover, str)
    assert f"1000 of 1000 have it: {name_list(LONG_NAMES)}" in hover
    assert f"and {1000 - NAMES_SHOWN} more" in hover and LONG_NAMES[NAMES_SHOWN] not in hover
    for case in ("window", "one line", "one word", "many lines"):
        shown = out[case]
        assert isinstance(shown, dict)
        width, height = shown["req"]
        assert 0 < width <= screen_w and 0 < height <= screen_h, (case, shown["req"])
        x, y = shown["at"]
        assert 0 <= x and x + width <= screen_w, (case, shown["at"], shown["req"])
        assert 0 <= y and y + height <= screen_h, (case, shown["at"], shown["req"])
    assert out["window"]["shown"] == hover
    assert str(out["one word"]["shown"]).endswith("\u2026")


def test_a_list_of_names_names_the_first_few_and_counts_the_rest() -> None:
    assert name_list([]) == ""
    assert name_list(["bob", "carol"]) == "bob, carol"
    names = [f"u{n}" for n in range(NAMES_SHOWN + 381)]
    assert name_list(names) == ", ".join(names[:NAMES_SHOWN]) + " and 381 more"
    assert name_list(names[:NAMES_SHOWN]) == ", ".join(names[:NAMES_SHOWN])


@pytest.fixture
def app(display: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gui]:  # noqa: F811
    yield from open_gui(None, monkeypatch)


def test_an_add_that_changed_nothing_names_the_first_few_members(app: Gui) -> None:
    """The line for an Add of 1,000 members already there is bounded too."""
    from client_core import GroupUnchanged

    window = app.window(server="127.0.0.1:9")
    window.groups.handle(GroupUnchanged("big", tuple(LONG_NAMES), ""))
    pump(app.root, 0.1)
    conv = window.conversations["#big"]
    text = conv.lines[-1].text
    assert text.startswith(name_list(LONG_NAMES)) and text.endswith("are members of #big already")
    assert isinstance(conv.lines[-1], Line)


# --- N8, N10, N11, N12: a window logged in to a real server ---------------------------


@pytest.fixture
def gui(display: str, server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gui]:  # noqa: F811
    yield from open_gui(server, monkeypatch)


def logged_in(gui: Gui, name: str) -> ChatWindow:
    window = gui.window()
    gui.login(window, name)
    assert pump_until(gui.root, lambda: window.groups.listed, 10), "the session's group list"
    return window


def test_new_chat_with_a_group_we_are_not_in_says_so_and_leaves_no_contact(gui: Gui) -> None:
    """audit7 N8: `#zzz` opened an empty group conversation whose contact
    stayed, and a line typed to it was refused as "not a member of #zzz any
    more" (alice never was; there is no such group)."""
    bob = gui.session("bob")
    gui.session("carol")
    bob.group(GroupAction.CREATE, "theirs", ("carol",))  # exists; alice is not in it
    wait_for(bob, lambda e: isinstance(e, GroupChanged) and e.group == "theirs")
    alice = logged_in(gui, "alice")
    alice.open_conversation("bob")
    for typed in ("#zzz", "#theirs"):
        alice.new_chat_var.set(typed)  # (type_text has no keysym for '#')
        press(alice.new_chat_entry, "Return")
        pump(gui.root, 0.2)
        group = typed[1:]
        assert f"There is no group #{group} you are in." in alice.transcript_text()
        assert name_key(typed) not in alice.conversations
        assert name_key(typed) not in alice.contact_list.entries
        assert alice.current is not None and alice.current.name == "bob"
        assert alice.new_chat_var.get() == typed, "what was typed stays, to correct it"
        alice.new_chat_var.set("")
    # A group alice is in opens as before.
    bob.group(GroupAction.CREATE, "ours", ("alice",))
    assert pump_until(gui.root, lambda: name_key("#ours") in alice.conversations)
    alice.new_chat_var.set("#ours")
    press(alice.new_chat_entry, "Return")
    assert pump_until(gui.root, lambda: alice.current is not None
                      and alice.current.name == "#ours")  # fmt: skip
    assert "There is no group #ours" not in alice.transcript_text()


def test_added_to_a_group_the_contact_line_shows_the_groups_count_not_the_changes(
    gui: Gui,
) -> None:
    """audit7 N10: added by an ADD of 145 to a group of 402, the contact
    line said "145 members" until the group was opened."""
    bob = gui.session("bob")
    others = [f"m{n}" for n in range(5)]
    for name in [*others, "x1", "x2"]:
        gui.session(name)
    bob.group(GroupAction.CREATE, "big", tuple(others))  # bob and 5: 6 members
    wait_for(bob, lambda e: isinstance(e, GroupChanged) and e.group == "big")
    alice = logged_in(gui, "alice")
    bob.group(GroupAction.ADD, "big", ("alice", "x1", "x2"))  # 9 members; the change names 3
    assert pump_until(gui.root, lambda: name_key("#big") in alice.contact_list.entries)
    pump(gui.root, 0.3)
    assert members_shown(alice, "#big") is None, "no count until the group's is known"
    alice.open_conversation("#big")  # asks for its members, as opening does
    assert pump_until(gui.root, lambda: members_shown(alice, "#big") == 9), members_shown(
        alice, "#big"
    )
    assert alice.groups.panel.title.cget("text") == "Members (9)"


def test_opening_a_group_shows_its_newest_line_below_a_long_membership_line(gui: Gui) -> None:
    """audit7 N11: the members panel, shown after the lines were scrolled
    to the end, narrows the transcript; its wrapped lines pushed the newest
    line out of view."""
    alice = logged_in(gui, "alice")
    now = time.time()
    for name in ("bob", "#big"):
        conv = alice.conversation(name)
        conv.lines.extend(Line("peer", "bob", f"message {i}", now - 1000 + i) for i in range(40))
        names = ", ".join(f"member{n:03d}" for n in range(145))
        conv.lines.append(Line("system", "", f"owner added {names}", now - 500))
        conv.lines.append(Line("own", "alice", "hello big group", now - 100))
    text = alice.view.text
    for name in ("bob", "#big", "bob", "#big"):
        alice.open_conversation(name)
        pump(gui.root, 0.4)
        assert text.yview()[1] >= 0.999, (name, text.yview())
        assert text.bbox("end-2c") is not None, f"{name}: the newest line is in view"
    # Scrolled up by the person, a resize leaves the view where they put it.
    alice.view._yview("moveto", 0.0)  # as the scrollbar does
    pump(gui.root, 0.1)
    alice.groups.panel.hide()  # the transcript widens
    pump(gui.root, 0.4)
    assert text.yview()[0] <= 0.01, text.yview()


def test_the_new_group_dialogs_create_is_the_accent_button(gui: Gui) -> None:
    """audit7 N12: the look guide's one accent button per view."""
    alice = logged_in(gui, "alice")
    alice.groups.new_button.invoke()
    assert pump_until(gui.root, lambda: alice.groups.dialog is not None)
    dialog = alice.groups.dialog
    assert dialog is not None
    assert str(dialog.create_button.cget("style")) == "Accent.TButton"
    dialog.close()
