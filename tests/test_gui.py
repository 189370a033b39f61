"""The Tk window on a real X display (Xvfb if need be) against a real server:
driven with key and mouse events, read back from its widgets.

Two windows share one Tk application here, like `chat-demo`: a hidden root
and one Toplevel per window. Keyboard events go to the widget with the X
input focus, so typing first gives that widget the focus (`focus_force`).
Screenshots for a person to look at go to tests/artifacts/.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import statistics
import subprocess
import sys
import time
import tkinter as tk
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from chat_client import ChatSession, LoggedIn
from chat_window import ChatWindow, Settings
from protocol import name_key
from tests.conftest import RTO_MAX, RTO_MIN, RunningServer, make_session, wait_for
from tests.xvfb import display, screenshot  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
SESSION_OPTIONS: dict[str, Any] = {"rto_min": RTO_MIN, "rto_max": RTO_MAX}
LEFT = "780x560+10+40"
RIGHT = "780x560+810+40"
#: Characters whose keysym is not the character itself.
KEYSYMS = {" ": "space", "!": "exclam", ".": "period", ",": "comma", "?": "question",
           "'": "apostrophe", "-": "minus", "_": "underscore", ":": "colon"}  # fmt: skip


# --- helpers ------------------------------------------------------------------


def pump_until(
    root: tk.Misc, predicate: Callable[[], object], timeout: float = 10.0, step: float = 0.005
) -> bool:
    """Run the Tk loop (update + short sleeps) until `predicate()` is true."""
    deadline = time.monotonic() + timeout
    while True:
        root.update()
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


def pump(root: tk.Misc, seconds: float) -> None:
    pump_until(root, lambda: False, seconds)


def type_text(widget: tk.Misc, text: str) -> None:
    """Type `text` with real key events into `widget` (given the focus first)."""
    widget.focus_force()
    widget.update()
    for ch in text:
        keysym = KEYSYMS.get(ch, ch)
        widget.event_generate("<KeyPress>", keysym=keysym)
        widget.event_generate("<KeyRelease>", keysym=keysym)
    widget.update()


def press(widget: tk.Misc, keysym: str, *, shift: bool = False, control: bool = False) -> None:
    """Press and release one key on `widget` (which gets the focus first)."""
    widget.focus_force()
    widget.update()
    state = (1 if shift else 0) | (4 if control else 0)  # ShiftMask, ControlMask
    widget.event_generate("<KeyPress>", keysym=keysym, state=state)
    widget.event_generate("<KeyRelease>", keysym=keysym, state=state)
    widget.update()


def click_tag(text: tk.Text, tag: str) -> None:
    """Click with the mouse on the first character carrying `tag`."""
    first = text.tag_ranges(tag)[0]
    text.see(first)
    text.update()
    bbox = text.bbox(first)
    assert bbox is not None, f"{tag} is not visible"
    x, y = bbox[0] + 2, bbox[1] + bbox[3] // 2
    text.event_generate("<Motion>", x=x, y=y)
    text.event_generate("<ButtonPress-1>", x=x, y=y)
    text.event_generate("<ButtonRelease-1>", x=x, y=y)
    text.update()


@contextlib.contextmanager
def other_application_focused() -> Iterator[None]:
    """Another application (a Tk process of its own) takes the keyboard focus."""
    code = (
        "import tkinter as tk; r = tk.Tk(); r.geometry('300x120+1250+700'); e = tk.Entry(r);"
        " e.pack(); r.after(100, e.focus_force); r.after(60000, r.destroy); r.mainloop()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(5)


def own_ids(window: ChatWindow, peer: str) -> list[str]:
    conv = window.conversations[name_key(peer)]
    return [line.msg_id for line in conv.lines if line.kind == "own" and line.msg_id]


def states(window: ChatWindow, peer: str) -> list[str | None]:
    return [window.state_of(msg_id) for msg_id in own_ids(window, peer)]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class Gui:
    """One Tk application for a test: a hidden root, windows opened on
    Toplevels, helper sessions; everything closed at the end."""

    def __init__(self, server: RunningServer | None) -> None:
        self.server = server
        self.root = tk.Tk(className="chat-test")
        self.root.withdraw()
        self.windows: list[ChatWindow] = []
        self.sessions: list[ChatSession] = []
        self.created: list[ChatSession] = []  # every ChatSession made, the windows' too
        self.callback_errors: list[str] = []
        self.root.report_callback_exception = self._report

    def _report(
        self, exc: type[BaseException], value: BaseException, tb: TracebackType | None
    ) -> None:
        self.callback_errors.append("".join(traceback.format_exception(exc, value, tb)))

    def window(
        self,
        geometry: str = LEFT,
        *,
        server: str | None = None,
        username: str = "",
        **options: Any,
    ) -> ChatWindow:
        if server is None:
            assert self.server is not None
            server = self.server.addr_text
        settings = Settings(server=server, username=username, geometry=geometry, path=None)
        window = ChatWindow(
            tk.Toplevel(self.root), settings, session_options={**SESSION_OPTIONS, **options}
        )
        self.windows.append(window)
        assert pump_until(self.root, lambda: window.top.winfo_ismapped(), 5)
        return window

    def login(self, window: ChatWindow, username: str, connect_to: str = "") -> None:
        """Type the name (and connect-to) like a person, then click Login."""
        type_text(window.username_entry, username)
        if connect_to:
            type_text(window.connect_entry, connect_to)
        window.login_button.invoke()
        assert pump_until(self.root, lambda: window.username is not None, 10), (
            window.login_error.cget("text")
        )

    def session(self, username: str) -> ChatSession:
        assert self.server is not None
        session = make_session()
        self.sessions.append(session)
        session.login(self.server.addr_text, username)
        wait_for(session, lambda e: isinstance(e, LoggedIn))
        return session

    def close(self) -> None:
        # Log everyone out at once, so the waits for logout acks overlap.
        live = [w.session for w in self.windows if w.session is not None] + self.sessions
        for session in live:
            session.logout(3.0)
        for window in self.windows:
            window.close()
        for session in self.sessions:
            session.close(timeout=3.0)
        # Workaround for a bug reported with test_closed_sessions_leave_no_open_socket:
        # ChatSession never closes its wake-up socketpair, and the ResourceWarning of
        # its garbage collection would fail whichever test happens to be running.
        for session in self.created:
            if session._thread is not None:
                session._thread.join(5)
            session._wake_r.close()
            session._wake_w.close()
        self.root.update()
        self.root.destroy()
        gc.collect()  # Tk objects in cycles go away here, on the main thread


def open_gui(server: RunningServer | None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gui]:
    app = Gui(server)
    original = ChatSession.__init__

    def tracked_init(session: ChatSession, *args: Any, **kwargs: Any) -> None:
        original(session, *args, **kwargs)
        app.created.append(session)

    monkeypatch.setattr(ChatSession, "__init__", tracked_init)
    try:
        yield app
    finally:
        app.close()
    assert not app.callback_errors, "exception in a Tk callback:\n" + "\n".join(app.callback_errors)


@pytest.fixture
def gui(
    display: str,  # noqa: F811
    server: RunningServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Gui]:
    """Windows on `display` for the `server` in a thread."""
    yield from open_gui(server, monkeypatch)


@pytest.fixture
def gui_without_server(display: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gui]:  # noqa: F811
    yield from open_gui(None, monkeypatch)


# --- the user's flow ----------------------------------------------------------


def test_two_windows_chat_both_ways(gui: Gui) -> None:
    alice = gui.window(LEFT)
    bob = gui.window(RIGHT)
    assert alice.top.title() == "Chat" and bob.top.title() == "Chat"
    assert alice.login_frame.winfo_ismapped() and not alice.chat_frame.winfo_ismapped()

    type_text(alice.username_entry, "alice")
    type_text(alice.connect_entry, "bob")
    type_text(bob.username_entry, "bob")
    assert alice.username_var.get() == "alice" and alice.connect_var.get() == "bob"
    assert bob.username_var.get() == "bob" and bob.connect_var.get() == ""
    alice.username_entry.focus_force()
    pump(gui.root, 0.2)
    screenshot("login.png")

    alice.login_button.invoke()
    assert pump_until(gui.root, lambda: alice.username is not None), alice.login_error.cget("text")
    assert alice.top.title() == "alice - Chat"
    assert alice.chat_frame.winfo_ismapped() and not alice.login_frame.winfo_ismapped()
    assert alice.current is not None and alice.current.name == "bob"
    assert gui.root.focus_get() is alice.composer, "composer must have the focus after login"

    bob.username_entry.focus_force()  # the person clicks into bob's window
    pump(gui.root, 0.05)
    bob.login_button.invoke()
    assert pump_until(gui.root, lambda: bob.username is not None), bob.login_error.cget("text")
    assert bob.top.title() == "bob - Chat"
    assert gui.root.focus_get() is bob.composer, "composer must have the focus after login"

    # alice writes first: typed, sent with Enter.
    type_text(alice.composer, "hello bob")
    press(alice.composer, "Return")
    assert alice.composed() == ""
    assert pump_until(gui.root, lambda: "alice: hello bob" in bob.transcript_text())
    assert "alice: hello bob" in alice.transcript_text()
    [first] = own_ids(alice, "bob")
    assert pump_until(gui.root, lambda: alice.state_of(first) == "delivered"), alice.state_of(first)
    assert "delivered" in alice.transcript_text()
    assert bob.current is not None and bob.current.name == "alice"

    # bob replies to whoever wrote last, without picking anyone.
    type_text(bob.composer, "hi alice")
    press(bob.composer, "Return")
    assert pump_until(gui.root, lambda: "bob: hi alice" in alice.transcript_text())
    [reply] = own_ids(bob, "alice")
    assert pump_until(gui.root, lambda: bob.state_of(reply) == "delivered")

    type_text(alice.composer, "see you")
    press(alice.composer, "Return")
    assert pump_until(gui.root, lambda: "alice: see you" in bob.transcript_text())
    bob_lines = [line for line in bob.transcript_text().splitlines() if ": " in line]
    assert [line.split(" ", 1)[1].split("  ")[0] for line in bob_lines] == [
        "alice: hello bob",
        "bob: hi alice",
        "alice: see you",
    ]
    pump_until(gui.root, lambda: "sending" not in alice.transcript_text(), 3)
    pump(gui.root, 0.2)
    screenshot("chat_alice_bob.png")


def test_enter_sends_shift_enter_breaks_line_blank_not_sent(gui: Gui) -> None:
    bob_session = gui.session("bob")
    alice = gui.window()
    gui.login(alice, "alice", "bob")

    type_text(alice.composer, "line one")
    press(alice.composer, "Return", shift=True)
    type_text(alice.composer, "line two")
    assert alice.composed() == "line one\nline two"
    pump(gui.root, 0.2)
    assert own_ids(alice, "bob") == [], "Shift+Enter must not send"

    press(alice.composer, "Return")
    assert alice.composed() == ""
    got = wait_for(bob_session, lambda e: getattr(e, "text", None) == "line one\nline two")
    assert got.sender == "alice"
    assert pump_until(gui.root, lambda: "line two" in alice.transcript_text())

    for blank in ("", "   ", "\n\n", " \t "):
        alice.composer.delete("1.0", "end")
        alice.composer.insert("1.0", blank)
        press(alice.composer, "Return")
        alice.send_composed()
    pump(gui.root, 0.2)
    assert len(own_ids(alice, "bob")) == 1, "blank messages must not be sent"


def test_unread_count_in_title_while_unfocused(gui: Gui) -> None:
    bob = gui.window()
    gui.login(bob, "bob")
    alice_session = gui.session("alice")
    assert gui.root.focus_get() is bob.composer

    with other_application_focused():
        assert pump_until(gui.root, lambda: not bob.focused, 5), "another app took the focus"
        for i in range(3):
            alice_session.send(f"unread {i}", to="bob")
        assert pump_until(gui.root, lambda: "unread 2" in bob.transcript_text())
        assert bob.unread_total() == 3
        assert bob.top.title() == "(3) bob - Chat"
        pump(gui.root, 0.1)
        assert bob.top.title() == "(3) bob - Chat"

        bob.composer.focus_force()  # the person clicks back into bob's window
        assert pump_until(gui.root, lambda: bob.top.title() == "bob - Chat", 5), bob.top.title()
        assert bob.focused and bob.unread_total() == 0


def test_scrolled_up_view_stays_and_new_marker_shows(gui: Gui) -> None:
    bob = gui.window()
    gui.login(bob, "bob")
    carol = gui.session("carol")
    for i in range(80):
        carol.send(f"filler {i:02d} " + "words " * 8, to="bob")
    assert pump_until(gui.root, lambda: "filler 79" in bob.transcript_text(), 20)
    pump(gui.root, 0.1)
    assert bob.transcript.yview()[1] >= 0.999, "new messages follow while at the bottom"
    assert not bob.new_marker.winfo_ismapped()

    bob.transcript.yview_moveto(0)
    pump(gui.root, 0.05)
    assert bob.transcript.yview()[0] == 0.0
    carol.send("one more", to="bob")
    assert pump_until(gui.root, lambda: "one more" in bob.transcript_text())
    pump(gui.root, 0.1)
    assert bob.transcript.yview()[0] == 0.0, "the view must stay where the user scrolled"
    assert bob.new_marker.place_info(), "the new-messages marker must be placed"
    assert bob.new_marker.winfo_ismapped()
    screenshot("new_messages_marker.png")

    bob.new_marker.invoke()
    pump(gui.root, 0.1)
    assert bob.transcript.yview()[1] >= 0.999
    assert not bob.new_marker.winfo_ismapped()


def test_login_errors_keep_the_login_view(gui: Gui) -> None:
    gui.session("alice")
    window = gui.window()
    type_text(window.username_entry, "alice")
    window.login_button.invoke()
    assert pump_until(gui.root, lambda: window.login_error.cget("text") != "", 10)
    error = str(window.login_error.cget("text"))
    assert "alice" in error and "in use" in error, error
    assert window.login_frame.winfo_ismapped() and not window.chat_frame.winfo_ismapped()
    assert window.username_var.get() == "alice"
    assert window.top.title() == "Chat"
    assert str(window.login_button.cget("state")) == "normal"
    screenshot("login_error_name_taken.png")

    # A second attempt with a free name works from the same form.
    assert pump_until(gui.root, lambda: window.session is None, 5)
    window.username_entry.delete(0, "end")
    type_text(window.username_entry, "alice2")
    window.login_button.invoke()
    assert pump_until(gui.root, lambda: window.username is not None, 10)
    assert window.top.title() == "alice2 - Chat"


def test_login_error_when_server_does_not_answer(gui_without_server: Gui) -> None:
    app = gui_without_server
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    window = app.window(server=f"127.0.0.1:{port}", login_timeout=1.5)
    type_text(window.username_entry, "alice")
    started = time.monotonic()
    window.login_button.invoke()
    assert str(window.login_button.cget("text")) != "Login", "shows it is connecting"
    assert pump_until(app.root, lambda: window.login_error.cget("text") != "", 6)
    waited = time.monotonic() - started
    error = str(window.login_error.cget("text"))
    assert "does not answer" in error and str(port) in error, error
    assert 1.0 < waited < 4.0, waited
    assert window.login_frame.winfo_ismapped() and not window.chat_frame.winfo_ismapped()
    assert window.username_var.get() == "alice"
    assert str(window.login_button.cget("state")) == "normal"
    assert window.top.title() == "Chat"


# --- load ---------------------------------------------------------------------


def test_burst_of_1000_messages_keeps_the_loop_responsive(gui: Gui) -> None:
    """Three measures of how long the Tk loop is kept from running:
    the window's own poll-timer lateness (`lag_samples`), the lateness of an
    independent after(10) ticker, and the longest single `update()` call."""
    bob = gui.window()
    gui.login(bob, "bob")
    loader = gui.session("loader")
    ticks: list[float] = []
    expected = [time.monotonic() + 0.01]
    tick_id = [""]

    def tick() -> None:
        now = time.monotonic()
        ticks.append(max(0.0, now - expected[0]))
        expected[0] = now + 0.01
        tick_id[0] = gui.root.after(10, tick)

    def received() -> int:
        conv = bob.conversations.get("loader")
        return 0 if conv is None else len(conv.lines)

    tick_id[0] = gui.root.after(10, tick)
    first_sample = len(bob.lag_samples)
    blocked: list[float] = []
    started = time.monotonic()
    for i in range(1000):
        loader.send(f"burst {i:04d}", to="bob")
    deadline = started + 40
    while received() < 1000 and time.monotonic() < deadline:
        before = time.monotonic()
        gui.root.update()
        blocked.append(time.monotonic() - before)
        time.sleep(0.002)
    elapsed = time.monotonic() - started
    gui.root.after_cancel(tick_id[0])
    assert received() == 1000, f"only {received()} of 1000 arrived in 40 s"

    poll_lag = bob.lag_samples[first_sample:]
    print(f"\n1,000 messages shown in {elapsed:.2f} s")
    for name, values in (
        ("window poll lateness (lag_samples)", poll_lag),
        ("after(10) ticker lateness", ticks),
        ("single update() call", blocked),
    ):
        print(
            f"  {name}: n={len(values)} p50 {statistics.median(values) * 1000:.1f} ms,"
            f" p99 {percentile(values, 0.99) * 1000:.1f} ms, max {max(values) * 1000:.1f} ms"
        )
    assert max(poll_lag) < 1.0 and max(ticks) < 1.0 and max(blocked) < 1.0

    text = bob.transcript_text()
    numbers = [int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if "loader: burst" in line]
    assert numbers == list(range(1000)), "all 1,000, once each, in order"


# --- message states, text, keys -----------------------------------------------


def test_failed_message_shows_failed_and_retry(gui: Gui) -> None:
    alice = gui.window()
    gui.login(alice, "alice", "nobody")
    type_text(alice.composer, "anyone there")
    press(alice.composer, "Return")
    assert pump_until(gui.root, lambda: own_ids(alice, "nobody"))
    [msg_id] = own_ids(alice, "nobody")
    assert pump_until(gui.root, lambda: alice.state_of(msg_id) == "failed"), alice.state_of(msg_id)
    text = alice.transcript_text()
    assert "failed" in text and "Retry" in text, text

    click_tag(alice.transcript, f"retry-{msg_id}")
    assert pump_until(gui.root, lambda: len(own_ids(alice, "nobody")) == 2), "Retry sends again"
    retried = own_ids(alice, "nobody")[1]
    assert retried != msg_id, "a retry is a new message with a new id"
    assert pump_until(gui.root, lambda: alice.state_of(retried) == "failed")
    assert alice.transcript_text().count("Retry") == 2
    pump(gui.root, 0.1)
    screenshot("failed_retry.png")


def test_emoji_outside_the_bmp(gui: Gui) -> None:
    bob_session = gui.session("bob")
    alice = gui.window()
    gui.login(alice, "alice", "bob")
    bob_session.send("party \U0001f389 time \U0001f600", to="alice")
    assert pump_until(gui.root, lambda: "party" in alice.transcript_text())
    shown = alice.transcript_text()
    assert "time" in shown
    assert "\U0001f389" in shown or "\ufffd" in shown, repr(shown)

    alice.composer.insert("1.0", "back at you \U0001f44d")
    press(alice.composer, "Return")
    got = wait_for(bob_session, lambda e: getattr(e, "sender", None) == "alice")
    assert got.text == "back at you \U0001f44d", "sent exactly as typed"
    assert pump_until(gui.root, lambda: "back at you" in alice.transcript_text())
    pump(gui.root, 0.1)
    screenshot("emoji.png")


def test_ctrl_f_finds_text_in_the_transcript(gui: Gui) -> None:
    bob_session = gui.session("bob")
    alice = gui.window()
    gui.login(alice, "alice", "bob")
    for text in ("first line", "the Needle is here", "last line"):
        bob_session.send(text, to="alice")
    assert pump_until(gui.root, lambda: "last line" in alice.transcript_text())

    press(alice.composer, "f", control=True)
    assert alice.find_entry.winfo_ismapped(), "Ctrl+F shows the find field"
    type_text(alice.find_entry, "needle")
    assert alice.find_next() is True
    ranges = alice.transcript.tag_ranges("found")
    assert ranges, "the match is highlighted"
    assert alice.transcript.get(ranges[0], ranges[1]).lower() == "needle"
    pump(gui.root, 0.05)
    screenshot("find.png")

    alice.find_entry.delete(0, "end")
    type_text(alice.find_entry, "absent")
    assert alice.find_next() is False
    assert not alice.transcript.tag_ranges("found")
    press(alice.find_entry, "Escape")
    assert not alice.find_entry.winfo_ismapped()


def test_escape_clears_and_up_recalls_last_sent(gui: Gui) -> None:
    gui.session("bob")
    alice = gui.window()
    gui.login(alice, "alice", "bob")
    type_text(alice.composer, "first message")
    press(alice.composer, "Return")
    assert pump_until(gui.root, lambda: "alice: first message" in alice.transcript_text())

    type_text(alice.composer, "draft to throw away")
    press(alice.composer, "Escape")
    assert alice.composed() == ""

    press(alice.composer, "Up")
    assert alice.composed() == "first message"
    press(alice.composer, "Return")
    assert pump_until(gui.root, lambda: len(own_ids(alice, "bob")) == 2)


# --- no display ---------------------------------------------------------------


def test_chat_demo_without_a_display_exits_2_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run(
        [sys.executable, "-c", "import chat_client,sys; sys.exit(chat_client.demo_main([]))"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "display" in lines[0].lower()
    assert result.stdout == ""


# --- known bugs: the tests below fail until chat_window / the server are fixed ---
# Two windows in one Tk application (as `chat-demo` runs them): Tk's focus is
# per application, so one window's `focus_set()` takes the keyboard from the
# other, and `focus_get()` is not None while the *other* window has the focus.


def test_demo_windows_do_not_steal_focus_from_each_other(gui: Gui) -> None:
    alice = gui.window(LEFT)
    bob = gui.window(RIGHT)
    gui.login(alice, "alice", "bob")
    gui.login(bob, "bob")
    type_text(alice.composer, "hello")
    press(alice.composer, "Return")
    assert pump_until(gui.root, lambda: "alice: hello" in bob.transcript_text())
    pump(gui.root, 0.1)
    assert gui.root.focus_get() is alice.composer, (
        f"the person was typing in alice's window; the focus moved to {gui.root.focus_get()}"
    )


def test_demo_window_counts_unread_while_the_other_window_has_focus(gui: Gui) -> None:
    alice = gui.window(LEFT)
    bob = gui.window(RIGHT)
    gui.login(alice, "alice", "bob")
    gui.login(bob, "bob")
    type_text(alice.composer, "one")
    press(alice.composer, "Return")
    assert pump_until(gui.root, lambda: "alice: one" in bob.transcript_text())
    bob.composer.focus_force()
    pump(gui.root, 0.1)
    alice.composer.focus_force()  # the person clicks into alice's window
    pump(gui.root, 0.1)
    for text in ("two", "three", "four"):
        type_text(alice.composer, text)
        press(alice.composer, "Return")
    assert pump_until(gui.root, lambda: "alice: four" in bob.transcript_text())
    assert bob.top.title() == "(3) bob - Chat", (
        f"bob's window is not focused but shows {bob.top.title()!r} (focused={bob.focused})"
    )


def test_closing_a_window_logs_out_promptly(gui: Gui) -> None:
    """The server ends a session in the same flush that should ack its LOGOUT,
    while that ack is still delayed (MAX_ACK_DELAY): the client then waits
    LOGOUT_ACK_WAIT (2 s) on every close."""
    bob_session = gui.session("bob")
    alice = gui.window()
    gui.login(alice, "alice", "bob")
    type_text(alice.composer, "bye")
    press(alice.composer, "Return")
    assert pump_until(gui.root, lambda: "delivered" in states(alice, "bob"))
    started = time.monotonic()
    alice.close()
    took = time.monotonic() - started
    wait_for(bob_session, lambda e: getattr(e, "user", None) == "alice" and not e.online, 5)
    assert took < 1.0, f"closing the window took {took:.2f} s (its logout was never acked?)"


def test_closed_window_leaves_no_socket_open(gui: Gui) -> None:
    """ChatSession's wake-up socketpair is never closed, not even by close()."""

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    alice = gui.window()
    pump(gui.root, 0.1)
    before = open_fds()
    gui.login(alice, "alice")
    alice.close()
    after = open_fds()
    assert after == before, f"{after - before} file descriptors left open after close()"
