"""The window's look (issue 17 item 4) on a real X display (Xvfb if need
be): one ttk style, the login card with placeholders, round initials and
unread badges in the contact list, day separators and sender groups with
the full time on hover, the menu bar with About, and a minimum size at
which no control vanishes.

Against a real server where the flow matters (the demo's two windows, a
message that failed and was retried); pure functions and the Canvas list
on their own. The screenshots the README shows are taken here: each goes
to tests/artifacts/look/, and with CHAT_UPDATE_SCREENSHOTS=1 also to
docs/screenshots/ (to be committed after a person has looked at them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import tkinter as tk
from collections.abc import Iterator
from pathlib import Path

import pytest

from chat_client import MessageReceived
from client_look import (
    AVATAR_COLOURS,
    GROUP_GAP_S,
    PALETTE,
    ContactCanvas,
    apply_style,
    avatar_colour,
    continues,
    day_label,
    full_time,
    initials,
    new_day,
)
from client_transcript import Line, Transcript
from client_window import MIN_SIZE
from common import __version__
from tests.conftest import (
    RunningServer,
    start_server,
    stop_server,
    wait_for,
)
from tests.conftest import test_config as server_config
from tests.test_gui import (
    LEFT,
    RIGHT,
    Gui,
    click_tag,
    gui,  # noqa: F401 (a fixture)
    open_gui,
    own_ids,
    press,
    pump,
    pump_until,
    type_text,
)
from tests.xvfb import display, window_geometry  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts" / "look"
DOCS = ROOT / "docs" / "screenshots"


# --- screenshots -------------------------------------------------------------------


def frame_box(top: tk.Misc) -> tuple[int, int, int, int]:
    """(x, y, width, height) of a toplevel on the screen with its menu bar
    (which Tk puts above the toplevel, inside the window `wm geometry` places)."""
    window = top.winfo_toplevel()
    window.update_idletasks()
    x, y, width, height = window_geometry(int(window.wm_frame(), 16))
    placed = re.fullmatch(r"\d+x\d+\+(-?\d+)\+(-?\d+)", window.wm_geometry())
    menu_bar = y - int(placed.group(2)) if placed and str(window.cget("menu")) else 0
    return x, y - menu_bar, width, height + menu_bar


def shot(name: str, *tops: tk.Misc, margin: int = 0) -> Path | None:
    """A PNG of the screen area the toplevels cover, in tests/artifacts/look/
    (and docs/screenshots/ with CHAT_UPDATE_SCREENSHOTS=1). None, with a
    note, when ImageMagick's `import` is missing (the test goes on)."""
    if shutil.which("import") is None:
        print(f"screenshot {name} skipped: install imagemagick")
        return None
    boxes = [frame_box(top) for top in tops]
    left = max(0, min(x for x, _, _, _ in boxes) - margin)
    top_y = max(0, min(y for _, y, _, _ in boxes) - margin)
    right = max(x + w for x, _, w, _ in boxes) + margin
    bottom = max(y + h for _, y, _, h in boxes) + margin
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    target = ARTIFACTS / name
    crop = f"{right - left}x{bottom - top_y}+{left}+{top_y}"
    subprocess.run(
        ["import", "-display", os.environ.get("DISPLAY", ""), "-window", "root", "-crop", crop,
         "+repage", str(target)],
        check=True, timeout=30, capture_output=True,
    )  # fmt: skip
    if os.environ.get("CHAT_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, DOCS / name)
    return target


def inside(widget: tk.Misc, top: tk.Misc) -> bool:
    """`widget` is mapped, not squeezed to nothing, and wholly inside `top`."""
    widget.update_idletasks()
    if not widget.winfo_ismapped() or widget.winfo_width() < 8 or widget.winfo_height() < 8:
        return False
    x, y = widget.winfo_rootx(), widget.winfo_rooty()
    tx, ty = top.winfo_rootx(), top.winfo_rooty()
    return (
        x >= tx and y >= ty
        and x + widget.winfo_width() <= tx + top.winfo_width()
        and y + widget.winfo_height() <= ty + top.winfo_height()
    )  # fmt: skip


def canvas_texts(canvas: tk.Canvas) -> set[str]:
    """The words drawn on a Canvas (typeshed's `type`/`itemcget` are loose)."""
    return {
        str(canvas.tk.call(str(canvas), "itemcget", item, "-text"))
        for item in canvas.find_all()
        if canvas_kind(canvas, item) == "text"
    }


def canvas_kind(canvas: tk.Canvas, item: int) -> str:
    return str(canvas.tk.call(str(canvas), "type", item))


# --- pure parts ------------------------------------------------------------------------


def test_initials_and_colours_are_stable_per_person() -> None:
    assert initials("alice") == "A"
    assert initials("mary-jane") == "MJ"
    assert initials("j.r.r") == "JR"
    assert initials("#team") == "#T", "a group"
    assert initials("\u00e9lodie") == "\u00c9"
    assert initials("\U0001f389party") == "?", "Tk 8.6 cannot draw it: a plain mark"
    assert avatar_colour("Alice") == avatar_colour("alice"), "one person, one colour"
    colours = {avatar_colour(name) for name in ("alice", "bob", "carol", "dave", "erin", "frank")}
    assert len(colours) >= 4 and colours <= set(AVATAR_COLOURS)


def test_day_separators_and_groups_follow_the_clock() -> None:
    now = time.mktime((2026, 12, 5, 15, 0, 0, 0, 0, -1))
    day = 86_400.0
    assert day_label(now - 60, now) == "Today"
    assert day_label(now - day, now) == "Yesterday"
    assert day_label(now - 3 * day, now) == time.strftime("%A", time.localtime(now - 3 * day))
    assert day_label(now - 30 * day, now).endswith("Nov")
    assert day_label(now - 400 * day, now).endswith("2025")
    first = Line("peer", "bob", "one", now)
    assert new_day(None, first) and not continues(None, first)
    assert continues(first, Line("peer", "bob", "two", now + 60))
    assert not continues(first, Line("peer", "bob", "late", now + GROUP_GAP_S + 1))
    assert not continues(first, Line("own", "alice", "mine", now + 1))
    assert not continues(first, Line("system", "", "note", now + 1))
    assert new_day(first, Line("peer", "bob", "tomorrow", now + day))
    assert full_time(now) == "Sat 5 Dec 2026, 15:00:00"


# --- the contact list ------------------------------------------------------------------


def test_contact_canvas_draws_only_what_is_in_view(display: str) -> None:  # noqa: F811
    root = tk.Tk()
    try:
        apply_style(root)
        chosen: list[tuple[str, ...]] = []
        canvas = ContactCanvas(root, height=6, width=220)
        canvas.pack(fill="both", expand=True)
        canvas.bind("<<TreeviewSelect>>", lambda _e: chosen.append(canvas.selection()))
        for i in range(1000):
            status = "\u25cf online" if i % 2 else "offline"
            canvas.insert(
                "", "end", iid=f"u{i}", text=f"user{i}", values=(status, str(i % 5 or ""))
            )
        root.update()
        drawn = len(canvas.find_all())
        assert 0 < drawn < 120, f"{drawn} canvas items for 1,000 contacts: only the view is drawn"
        texts = canvas_texts(canvas)
        assert {"user1", "U", "online", "offline", "1"} <= texts, texts  # name, initial, badge

        canvas.move("u999", "", 0)
        assert canvas.get_children()[:2] == ("u999", "u0") and canvas.index("u0") == 1
        canvas.item("u999", values=("", "12"))
        assert canvas.item("u999", "values") == ("", "12")
        # A real click on the second row selects it and says so like a Treeview.
        canvas.event_generate("<Button-1>", x=40, y=ContactCanvas.ROW + 10)
        root.update()
        assert canvas.selection() == ("u0",) and chosen == [("u0",)]
        canvas.selection_set("u500")
        canvas.see("u500")
        root.update()
        assert chosen[-1] == ("u500",)
        first, last = canvas.yview()
        assert 0.4 < first < 0.6, "scrolled to the selected row"
        assert "user500" in canvas_texts(canvas)
        canvas.delete(*[f"u{i}" for i in range(1000) if i != 3])
        root.update()
        assert canvas.get_children() == ("u3",) and canvas.selection() == ()
        with pytest.raises(tk.TclError):
            canvas.insert("", "end", iid="u3", text="again")
    finally:
        root.destroy()


# --- the window ---------------------------------------------------------------------------


def test_login_card_has_placeholders_and_one_primary_button(gui: Gui) -> None:  # noqa: F811
    window = gui.window(LEFT)
    placeholders = {str(child.cget("text")): child for entry in (
        window.server_entry, window.username_entry, window.password_entry, window.connect_entry)
        for child in entry.winfo_children()}  # fmt: skip
    # Examples inside the fields; each field's name is a label beside it
    # (tests/test_window_login.py).
    assert set(placeholders) == {"e.g. 127.0.0.1:5555", "e.g. alice", "new name: choose one",
                                 "optional, e.g. bob"}  # fmt: skip
    pump(gui.root, 0.1)
    assert not placeholders["e.g. 127.0.0.1:5555"].winfo_ismapped(), "it has a value"
    assert placeholders["new name: choose one"].winfo_ismapped(), "empty: an example shows"
    assert window.login_button.cget("style") == "Accent.TButton"
    assert str(window.top.cget("menu")), "a menu bar"
    shot("login.png", window.top)

    # A click on the placeholder is a click in the field; typing hides it and
    # the field holds only what was typed.
    label = placeholders["new name: choose one"]
    window.username_entry.focus_force()  # the window has the keyboard (no window manager here)
    pump_until(gui.root, lambda: gui.root.focus_get() is window.username_entry)
    label.event_generate("<Button-1>", x=3, y=3)
    assert pump_until(gui.root, lambda: gui.root.focus_get() is window.password_entry)
    type_text(window.password_entry, "pw")
    pump(gui.root, 0.05)
    assert window.password_var.get() == "pw" and not label.winfo_ismapped()
    window.password_var.set("")
    window.username_entry.focus_force()
    assert pump_until(gui.root, lambda: label.winfo_ismapped()), "empty again: shown again"


def test_menu_bar_about_and_entries_that_wait_for_a_login(gui: Gui) -> None:  # noqa: F811
    window = gui.window(LEFT)
    bar = window.menu_bar
    labels = [bar.entrycget(i, "label") for i in range(int(bar.index("end") or 0) + 1)]
    assert labels == ["File", "Conversation", "Account", "Help"]  # Account: client_account_ui
    menu = window.menu_conversation
    assert menu.entrycget("Find\u2026", "state") == "disabled", "nothing to find before login"
    account = window.account_menu
    assert account.entrycget("Change password\u2026", "state") == "disabled", "no account yet"
    assert account.entrycget("Delete account\u2026", "state") == "disabled"
    window.show_about()
    assert window.about is not None
    assert pump_until(gui.root, lambda: window.about is not None and window.about.winfo_ismapped())
    assert window.about_version.cget("text") == f"udp-chat {__version__}"
    about = window.about
    about.focus_force()
    about.update()
    about.event_generate("<KeyPress>", keysym="Escape")  # a real key (it closes on the press)
    pump(gui.root, 0.05)
    assert window.about is None, "Escape closes it"
    gui.login(window, "alice", "bob")
    assert menu.entrycget("Find\u2026", "state") == "normal"
    assert window.menu_file.entrycget("Log out", "state") == "normal"
    assert account.entrycget("Change password\u2026", "state") == "normal"
    window.menu_conversation.invoke("Find\u2026")
    assert pump_until(gui.root, lambda: window.find_entry.winfo_ismapped())
    window.menu_file.invoke("Log out")
    assert pump_until(gui.root, lambda: window.login_frame.winfo_ismapped(), 10)
    assert menu.entrycget("Find\u2026", "state") == "disabled"
    assert account.entrycget("Delete account\u2026", "state") == "disabled"


def test_no_control_vanishes_at_the_minimum_size(gui: Gui) -> None:  # noqa: F811
    window = gui.window(f"{MIN_SIZE[0]}x{MIN_SIZE[1]}+10+40")
    assert window.top.minsize() == MIN_SIZE
    window.top.geometry("300x200")  # smaller than allowed: held at the minimum
    pump(gui.root, 0.2)
    assert (window.top.winfo_width(), window.top.winfo_height()) == MIN_SIZE
    login_controls = [window.server_entry, window.username_entry, window.password_entry,
                      window.connect_entry, window.login_button]  # fmt: skip
    hidden = [str(w) for w in login_controls if not inside(w, window.top)]
    assert not hidden, f"at {MIN_SIZE}: {hidden} cut off or hidden"
    gui.login(window, "alice", "bob")
    pump(gui.root, 0.3)
    chat_controls = {
        "send": window.send_button, "composer": window.composer,
        "new chat": window.new_chat_entry, "+": window.new_chat_button,
        "who is online": window.who_button, "contacts": window.contacts,
        "new group": window.groups.new_button,
        "transcript": window.transcript, "status bar": window.health.label,
        "avatar": window.peer_avatar,
    }  # fmt: skip
    hidden = [name for name, w in chat_controls.items() if not inside(w, window.top)]
    shot("minimum_size.png", window.top)
    assert not hidden, f"at {MIN_SIZE}: {hidden} cut off or hidden"
    # And it still works there: typed, sent with Enter.
    type_text(window.composer, "small but fine")
    press(window.composer, "Return")
    assert pump_until(gui.root, lambda: "alice: small but fine" in window.transcript_text())


def test_demo_windows_with_initials_badges_groups_and_hover(gui: Gui) -> None:  # noqa: F811
    alice = gui.window(LEFT)
    bob = gui.window(RIGHT)
    carol = gui.session("carol")
    gui.login(alice, "alice", "bob")
    gui.login(bob, "bob", "alice")
    for text in ("hi bob, are you there?", "I have news"):
        type_text(alice.composer, text)
        press(alice.composer, "Return")
    assert pump_until(gui.root, lambda: "alice: I have news" in bob.transcript_text())
    type_text(bob.composer, "here! tell me")
    press(bob.composer, "Return")
    carol.send("lunch at noon?", to="alice")
    carol.send("the usual place", to="alice")
    assert pump_until(gui.root, lambda: "bob: here! tell me" in alice.transcript_text())
    assert pump_until(gui.root, lambda: getattr(alice.conversations.get("carol"), "unread", 0) == 2)
    assert pump_until(gui.root, lambda: all(alice.state_of(i) == "delivered"
                                            for i in own_ids(alice, "bob")))  # fmt: skip

    # The second of alice's two messages joins the first one's group: its
    # name and time are hidden (still in the text: copied, found).
    shown = bob.transcript
    grouped = shown.search("I have news", "1.0")
    assert "hidden" in shown.tag_names(f"{grouped} -3c"), "name and time shown once per group"
    assert "hidden" not in shown.tag_names(shown.search("hi bob", "1.0"))
    assert "Today" in bob.transcript_text().splitlines()[0], "a line per day"
    # carol's unread count is a badge beside her initials in alice's list.
    texts = canvas_texts(alice.contacts)
    assert {"carol", "C", "2", "B", "bob"} <= texts, texts
    assert alice.peer_avatar.name == "bob"

    # Hovering a grouped message shows its own full time.
    bbox = shown.bbox(grouped)
    assert bbox is not None
    shown.event_generate("<Motion>", x=bbox[0] + 4, y=bbox[1] + 4)
    assert pump_until(gui.root, lambda: bool(bob.tooltip.shown), 10)
    assert bob.tooltip.shown.startswith("alice \u00b7 "), bob.tooltip.shown
    assert re.search(r"\d{4}, \d\d:\d\d:\d\d$", bob.tooltip.shown), "date and time to the second"
    bob.transcript.event_generate("<Leave>")
    pump(gui.root, 0.1)
    assert not bob.tooltip.shown
    alice.composer.focus_force()
    for window in (alice, bob):
        window.health.poll()  # the status bars' figures as of now
    pump(gui.root, 0.2)
    shot("demo.png", alice.top, bob.top)


@pytest.fixture
def small_mailbox_gui(
    display: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Gui, RunningServer]]:
    """Windows on a server whose mailboxes hold one message."""
    running = start_server(server_config(tmp_path / "server-data", mailbox_messages=1))
    try:
        for app in open_gui(running, monkeypatch):
            yield app, running
    finally:
        stop_server(running)


def test_failed_and_retried_message_with_its_timeline(
    small_mailbox_gui: tuple[Gui, RunningServer],
) -> None:
    app, _ = small_mailbox_gui
    bob_session = app.session("bob")  # bob has an account; he goes away
    bob_session.close(3.0)
    app.sessions.remove(bob_session)
    alice = app.window(LEFT)
    app.login(alice, "alice", "bob")
    type_text(alice.composer, "are you around?")
    press(alice.composer, "Return")
    assert pump_until(app.root, lambda: len(own_ids(alice, "bob")) == 1)
    [first] = own_ids(alice, "bob")
    assert pump_until(app.root, lambda: alice.state_of(first) == "accepted"), "in the mailbox"
    type_text(alice.composer, "call me when you are back")
    press(alice.composer, "Return")
    assert pump_until(app.root, lambda: len(own_ids(alice, "bob")) == 2)
    second = own_ids(alice, "bob")[1]
    assert pump_until(app.root, lambda: alice.state_of(second) == "failed"), "mailbox full"
    pump(app.root, 0.1)
    shot("failed.png", alice.top)

    bob = app.session("bob")  # back: reads what waited, which frees the mailbox
    wait_for(bob, lambda e: isinstance(e, MessageReceived) and e.text == "are you around?")
    assert pump_until(app.root, lambda: alice.state_of(first) == "delivered")
    click_tag(alice.transcript, f"retry-{second}")
    assert pump_until(app.root, lambda: len(own_ids(alice, "bob")) == 3)
    retried = own_ids(alice, "bob")[2]
    # bob's front end shows it (and so receipts it) as it arrives.
    got = wait_for(bob, lambda e: isinstance(e, MessageReceived))
    assert got.text == "call me when you are back"
    assert pump_until(app.root, lambda: alice.state_of(retried) == "delivered")

    # Its timeline on hover: sent, on server, delivered, never resent.
    conv = alice.conversations["bob"]
    line = conv.by_id[retried]
    described = alice.describe_line(line)
    assert "On server  +" in described and "Delivered  +" in described, described
    # Loopback tests run with a tiny minimum RTO: a busy machine may resend.
    assert re.search(r"^Resent     (never|\d+ times?)$", described, re.M), described
    failed = alice.describe_line(conv.by_id[second])
    assert "Failed     mailbox full" in failed and "Delivered" not in failed, failed
    shown = alice.transcript
    index = shown.search("call me when you are back", "end", backwards=True)
    shown.see(index)
    pump(app.root, 0.1)
    bbox = shown.bbox(index)
    assert bbox is not None
    shown.event_generate("<Motion>", x=bbox[0] + 6, y=bbox[1] + 4)
    assert pump_until(app.root, lambda: "Delivered" in alice.tooltip.shown, 10)
    assert alice.tooltip.window is not None
    alice.health.poll()
    pump(app.root, 0.2)
    shot("failed_retried.png", alice.top, alice.tooltip.window)


def test_palette_reaches_the_text_widgets(gui: Gui) -> None:  # noqa: F811
    window = gui.window(LEFT)
    gui.login(window, "alice", "bob")
    assert window.transcript.cget("background") == PALETTE.surface
    assert window.composer.cget("highlightcolor") == PALETTE.accent
    assert window.send_button.cget("style") == "Accent.TButton"


def test_day_lines_and_groups_survive_pages_loaded_above_and_trimmed(
    display: str,  # noqa: F811
) -> None:
    root = tk.Tk()
    try:
        apply_style(root)
        view = Transcript(root, on_retry=lambda _l: None, on_load_earlier=lambda: None,
                          on_back_to_latest=lambda: None)  # fmt: skip
        today = time.mktime(time.localtime()[:3] + (10, 0, 0, 0, 0, -1))
        b1, b2 = Line("peer", "bob", "b1", today), Line("peer", "bob", "b2", today + 60)
        view.show([b1, b2], has_earlier=True)
        root.update()
        assert view.content().splitlines()[1:] == ["Today", "10:00 bob: b1", "10:01 bob: b2"]
        assert view.line_at(view.text.search("b2", "1.0")) is b2
        assert view.line_at(view.text.search("Today", "1.0")) is None, "a day line is no message"

        # The page before: yesterday's line, then one that b1 now continues.
        a1 = Line("peer", "bob", "a1", today - 86_400)
        a2 = Line("own", "alice", "a2", today - 600)
        a3 = Line("peer", "bob", "a3", today - 30)
        view.prepend([a1, a2, a3], has_earlier=False)
        root.update()
        text = view.content()
        assert text.count("Today") == 1 and text.count("Yesterday") == 1, text
        hidden = view.text.tag_names(f"{view.text.search('b1', '1.0')} -3c")
        assert "hidden" in hidden, "b1 joins a3's group: its name is shown once"
        assert view.line_at(view.text.search("a2", "1.0")) is a2

        view.trim_front(3)  # a1, a2, a3 leave: b1 opens the day and the group again
        root.update()
        assert view.content().splitlines()[1:3] == ["Today", "10:00 bob: b1"]
        assert "hidden" not in view.text.tag_names(f"{view.text.search('b1', '1.0')} -3c")
        assert view.line_at(view.text.search("b1", "1.0")) is b1
    finally:
        root.destroy()
