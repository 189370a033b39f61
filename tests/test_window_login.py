"""The window as a new user first meets it (the polish brief). The login
card (item 5): every field has a visible label beside it, which stays when
the field has the keyboard or a value (a placeholder inside the field
vanishes then: the focused Username field used to have no name at all).
And a message to a name with no account yet says it waits for that name,
not "no answer from the server" (found running the README's flow). On a
real X display (Xvfb if need be), with a screenshot of the card as it
opens, the Username field focused, in tests/artifacts/look/."""

from __future__ import annotations

import tkinter as tk
from tkinter import ttk

import pytest

import client_window
from client_core import Disconnected, ErrorEvent, MessageState
from client_window import MIN_SIZE, ChatWindow
from tests.test_gui import (
    LEFT,
    Gui,
    gui_without_server,  # noqa: F401 (a fixture)
    pump,
    pump_until,
    type_text,
)
from tests.test_window_history import App, app  # noqa: F401 (a fixture)
from tests.test_window_look import inside, shot
from tests.window_fakes import FakeSession, login
from tests.xvfb import display  # noqa: F401 (a fixture)

FIELDS = ("Server", "Username", "Password", "Connect to")


def visible_labels(window: ChatWindow) -> dict[str, tk.Misc]:
    """The texts shown on the login card outside the fields (what remains
    of a field's name when its placeholder is hidden), by text."""
    entries = {str(e) for e in (window.server_entry, window.username_entry,
                                window.password_entry, window.connect_entry)}  # fmt: skip
    found: dict[str, tk.Misc] = {}
    todo: list[tk.Misc] = [window.login_frame]
    while todo:
        widget = todo.pop()
        todo.extend(widget.winfo_children())
        if isinstance(widget, ttk.Label) and widget.winfo_ismapped():
            if not any(str(widget).startswith(entry + ".") for entry in entries):
                found[str(widget.cget("text"))] = widget
    return found


def same_row(label: tk.Misc, entry: tk.Misc) -> bool:
    top, bottom = entry.winfo_rooty(), entry.winfo_rooty() + entry.winfo_height()
    middle = label.winfo_rooty() + label.winfo_height() // 2
    return top <= middle <= bottom and label.winfo_rootx() < entry.winfo_rootx()


def test_each_login_field_has_a_label_that_stays_when_it_has_the_focus(
    gui_without_server: Gui,  # noqa: F811
) -> None:
    gui = gui_without_server
    window = gui.window(LEFT, server="127.0.0.1:5555")
    window.username_entry.focus_force()
    assert pump_until(gui.root, lambda: gui.root.focus_get() is window.username_entry)
    pump(gui.root, 0.1)
    shot("login_focused.png", window.top)
    labels = visible_labels(window)
    missing = [name for name in FIELDS if name not in labels]
    assert not missing, f"no visible label for {missing}: {sorted(labels)}"
    fields = (window.server_entry, window.username_entry, window.password_entry,
              window.connect_entry)  # fmt: skip
    for name, entry in zip(FIELDS, fields, strict=True):
        assert same_row(labels[name], entry), f"{name!r} is not beside its field"

    # Typed into, the field keeps its label; a click on a label is a click in its field.
    type_text(window.username_entry, "alice")
    pump(gui.root, 0.05)
    assert "Username" in visible_labels(window)
    labels["Password"].event_generate("<Button-1>", x=2, y=2)
    assert pump_until(gui.root, lambda: gui.root.focus_get() is window.password_entry)


def test_the_labelled_card_fits_the_minimum_size(gui_without_server: Gui) -> None:  # noqa: F811
    gui = gui_without_server
    window = gui.window(f"{MIN_SIZE[0]}x{MIN_SIZE[1]}+10+40", server="127.0.0.1:5555")
    pump(gui.root, 0.2)
    labels = visible_labels(window)
    hidden = [name for name in FIELDS if name not in labels or not inside(labels[name],
                                                                          window.top)]  # fmt: skip
    assert not hidden, f"at {MIN_SIZE}: the labels {hidden} are cut off"


def test_a_message_waiting_for_an_account_says_so_not_no_answer(
    app: App,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server answered (no account of that name): "no answer from the
    server yet" would be wrong. The note names the wait and the way out."""
    monkeypatch.setattr(client_window, "SLOW_SEND_S", 0.3)
    window = app.window()
    session = login(window, app.root, "alice", "dave")
    assert isinstance(session, FakeSession)
    waits = session.send("are you there, dave?", to="dave")
    stuck = session.send("and this one?", to="dave")
    assert waits is not None and stuck is not None
    session.waiting.add(waits)  # the server refused it for want of an account
    assert app.pump_until(lambda: "no account of that name yet" in window.transcript_text(), 20)
    assert app.pump_until(lambda: "no answer from the server yet" in window.transcript_text(), 20)
    lines = window.transcript_text().splitlines()
    [first] = [line for line in lines if "are you there, dave?" in line]
    [second] = [line for line in lines if "and this one?" in line]
    assert "no account of that name yet" in first and "no answer" not in first
    assert "no answer from the server yet" in second
    session.waiting.clear()  # the name registered: it goes
    session.set_state(waits, "dave", MessageState.ACCEPTED)
    assert app.pump_until(lambda: "no account" not in window.transcript_text())


def test_logging_out_when_no_server_answers_says_so(
    app: App,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """File > Log out while the server (every node) is down: the session
    ends with `server_unreachable` (test_polish); the window is back at the
    login and says the logout reached no server, not "Disconnected"."""
    window = app.window()
    session = login(window, app.root, "alice", "bob")

    def logout(timeout: float = 10.0) -> None:
        session.events.put(ErrorEvent("server_unreachable", "the logout reached no server"))
        session.events.put(Disconnected("server_unreachable"))

    monkeypatch.setattr(session, "logout", logout)
    window.log_out()
    assert app.pump_until(lambda: window.login_frame.winfo_ismapped())
    text = str(window.login_error.cget("text"))
    assert text.startswith("You logged out here, but no server answered"), text
