"""Typing that always lands (issue 17): real X events from `xdotool` (XTEST
key presses, pointer clicks, `windowfocus`) into windows under Xvfb, and the
text read back from the composer. Tk only sees what the X server sends, as
with a person at the keyboard: a key goes to the widget Tk gave the focus.

Xvfb runs no window manager, so `xdotool windowactivate` (which asks one)
cannot work here; `windowfocus` is what a window manager does on
activation. The in-process windows use `tests.window_fakes.FakeSession`;
the last test drives a real `chat-demo` process."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client_core import MessageState
from client_window import ChatWindow
from tests.test_gui import demo_process, wait_for_demo_windows
from tests.test_window_history import App
from tests.window_fakes import login
from tests.xvfb import display, window_ids  # noqa: F401

LEFT = "700x500+10+40"
RIGHT = "700x500+750+40"


def xdo(*args: str) -> str:
    assert shutil.which("xdotool"), "the focus tests need xdotool (apt-get install xdotool)"
    result = subprocess.run(["xdotool", *args], capture_output=True, text=True, timeout=30,
                            check=False)  # fmt: skip
    assert result.returncode == 0, f"xdotool {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


def click(widget: object, dx: int = 40, dy: int = 20) -> None:
    """A real pointer click at (dx, dy) inside `widget`."""
    x = widget.winfo_rootx() + dx  # type: ignore[attr-defined]
    y = widget.winfo_rooty() + dy  # type: ignore[attr-defined]
    xdo("mousemove", str(x), str(y), "click", "1")


def x_id(title: str) -> str:
    ids = window_ids(title)
    assert len(ids) == 1, f"windows titled {title!r}: {ids}"
    return str(ids[0])


@pytest.fixture
def app(display: str, tmp_path: Path) -> Iterator[App]:  # noqa: F811
    application = App(tmp_path)
    try:
        yield application
    finally:
        application.close()
    assert not application.errors, application.errors


def logged_in_pair(app: App) -> tuple[ChatWindow, ChatWindow]:
    """alice (talking to bob) and bob side by side, as chat-demo opens them."""
    alice = app.window(LEFT)
    bob = app.window(RIGHT)
    login(alice, app.root, "alice", "bob")
    login(bob, app.root, "bob")
    app.pump(0.2)
    return alice, bob


def test_typing_after_a_click_on_the_transcript_reaches_the_composer(app: App) -> None:
    alice, _ = logged_in_pair(app)
    xdo("windowfocus", x_id("alice - Chat"))
    assert app.pump_until(lambda: alice._has_focus())
    click(alice.transcript)
    app.pump(0.2)
    xdo("type", "--delay", "20", "hello")
    assert app.pump_until(lambda: alice.composed() == "hello", 20), repr(alice.composed())
    assert app.root.focus_get() is alice.composer


def test_typing_after_clicking_retry_reaches_the_composer(app: App) -> None:
    alice, _ = logged_in_pair(app)
    session = alice.session
    assert session is not None
    msg_id = session.send("lost one", to="bob")
    assert msg_id is not None
    session.set_state(msg_id, "bob", MessageState.FAILED, "mailbox_full")  # type: ignore[attr-defined]
    assert app.pump_until(lambda: "Retry" in alice.transcript_text())
    xdo("windowfocus", x_id("alice - Chat"))
    app.pump(0.1)
    first = alice.transcript.tag_ranges(f"retry-{msg_id}")[0]
    alice.transcript.see(first)
    assert app.pump_until(lambda: alice.transcript.bbox(first) is not None), "laid out on screen"
    x, y, _, height = alice.transcript.bbox(first) or (0, 0, 0, 0)
    click(alice.transcript, x + 3, y + height // 2)
    assert app.pump_until(lambda: alice.state_of(msg_id) == "retried"), "the click was a Retry"
    xdo("type", "--delay", "20", "again")
    assert app.pump_until(lambda: alice.composed() == "again", 20), repr(alice.composed())


def test_a_window_activated_later_gives_the_composer_the_keys(app: App) -> None:
    """Two windows in one application, as in chat-demo: the one that did
    not have the focus at login gets it from the window manager later."""
    alice, bob = logged_in_pair(app)
    for window, title in ((bob, "bob - Chat"), (alice, "alice - Chat"), (bob, "bob - Chat")):
        xdo("windowfocus", x_id(title))
        assert app.pump_until(lambda w=window: w._has_focus()), title
        window.composer.delete("1.0", "end")
        xdo("type", "--delay", "20", "typed here")
        assert app.pump_until(lambda w=window: w.composed() == "typed here", 20), (
            title, window.composed(), app.root.focus_get()
        )  # fmt: skip
    assert alice.composed() == "typed here" and bob.composed() == "typed here"


def test_a_pre_filled_name_is_replaced_when_typed_over(app: App) -> None:
    window = app.window(LEFT, username="alice")
    xdo("windowfocus", x_id("Chat"))
    assert app.pump_until(lambda: app.root.focus_get() is window.username_entry)
    xdo("type", "--delay", "20", "bob")
    assert app.pump_until(lambda: window.username_var.get() == "bob", 20), window.username_var.get()


def test_chat_demo_second_window_takes_typing_when_focused(
    display: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The real chat-demo: each window, focused with `xdotool windowfocus`,
    takes what is typed into its composer and sends it with Enter (seen in
    the other window's title: an unread message arrived there)."""
    with demo_process(tmp_path) as proc:
        alice_id, bob_id = wait_for_demo_windows(proc)
        # alice writes first (bob's window has no conversation before), then
        # bob's window, which did not have the focus at login, answers.
        for window_id, other in ((alice_id, "bob"), (bob_id, "alice")):
            focus_window(window_id)
            xdo("type", "--delay", "20", f"hi {other}")
            xdo("key", "Return")
            deadline = time.monotonic() + 30
            while not window_ids(f"(1) {other} - Chat") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert window_ids(f"(1) {other} - Chat"), f"what was typed to {other} was not sent"


def focus_window(window_id: int) -> None:
    """`xdotool windowfocus` until the X server reports the focus there: a
    window that is still starting up may reset it once."""
    deadline = time.monotonic() + 10
    while True:
        xdo("windowfocus", str(window_id))
        time.sleep(0.2)
        if xdo("getwindowfocus") == str(window_id) or time.monotonic() > deadline:
            return
