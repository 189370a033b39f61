"""The window with histories of any length and the findings of issue 17
that need no real keyboard (those are in test_window_focus.py): a real Tk
window under Xvfb over a real client store, its session a
`tests.window_fakes.FakeSession` (the test plays the network), plus the
pure functions behind what the transcript shows (times, right-to-left
runs, Find's case folding in Tk's indexes)."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
import time
import tkinter as tk
from collections.abc import Iterator
from pathlib import Path

import pytest

import client_window
from client_core import MessageState
from client_store import PAGE
from client_transcript import LONG_TEXT_CHARS, display_order, find_in_text, format_stamp, tk_len
from client_window import MAX_LINES, RECONNECTED_TEXT, ChatWindow
from protocol import name_key
from tests.window_fakes import WRONG_PASSWORD, fill_history, login, open_window
from tests.xvfb import display  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
HEBREW = "\u05e9\u05dc\u05d5\u05dd"  # shalom
ARABIC = "\u0645\u0631\u062d\u0628\u0627"  # marhaba


# --- pure functions ------------------------------------------------------------


def test_times_say_the_day_when_not_today() -> None:
    now = time.mktime((2026, 12, 5, 15, 30, 0, 0, 0, -1))  # a Saturday

    def at(*t: int) -> float:
        return time.mktime((*t, 0, 0, 0, -1))  # type: ignore[arg-type]

    assert format_stamp(at(2026, 12, 5, 9, 7), now) == "09:07"
    assert format_stamp(at(2026, 12, 1, 14, 5), now) == time.strftime(
        "%a 14:05", time.localtime(at(2026, 12, 1, 14, 5))
    )
    assert format_stamp(at(2026, 3, 9, 8, 0), now) == time.strftime(
        "9 %b 08:00", time.localtime(at(2026, 3, 9, 8, 0))
    )
    assert format_stamp(at(2025, 12, 5, 15, 30), now) == time.strftime(
        "5 %b 2025 15:30", time.localtime(at(2025, 12, 5, 15, 30))
    ), "last year is not today"


def test_right_to_left_runs_are_reversed_numbers_kept() -> None:
    assert display_order("hello world") == "hello world"
    assert display_order(HEBREW) == HEBREW[::-1]
    assert display_order(f"say {HEBREW} now") == f"say {HEBREW[::-1]} now"
    # Two words: each reversed and their order too; the space between stays.
    two = f"{HEBREW} {ARABIC}"
    assert display_order(f"a {two} b") == f"a {ARABIC[::-1]} {HEBREW[::-1]} b"
    # A number inside a right-to-left run keeps its digit order.
    assert display_order(f"{HEBREW} 2026 {HEBREW}") == f"{HEBREW[::-1]} 2026 {HEBREW[::-1]}"
    assert display_order(f"{HEBREW} 1,000.5 {HEBREW}") == f"{HEBREW[::-1]} 1,000.5 {HEBREW[::-1]}"
    # Brackets are mirrored; a combining mark stays after its letter.
    assert display_order(f"{HEBREW} (2) {HEBREW}") == f"{HEBREW[::-1]} (2) {HEBREW[::-1]}"
    assert display_order(f"{HEBREW} (") == f"{HEBREW[::-1]} (", "trailing neutrals stay"
    pointed = "\u05e9\u05c1\u05dc"  # shin with its dot, lamed
    assert display_order(pointed) == "\u05dc\u05e9\u05c1"
    assert display_order(f"{HEBREW}\nline two") == f"{HEBREW[::-1]}\nline two"


def test_find_folds_case_in_python_and_counts_like_tk() -> None:
    assert tk_len("a\U0001f389b") == (3 if tk.TkVersion >= 8.7 else 4)
    hits = find_in_text("12:00 bob: party \U0001f389 TIME\nnext Time", "time")
    col = 19 if tk.TkVersion >= 8.7 else 20  # the emoji is two positions on Tcl 8.6
    assert hits == [(f"1.{col}", f"1.{col + 4}"), ("2.5", "2.9")]
    assert find_in_text(f"x {HEBREW[::-1]} y", HEBREW) == [("1.2", "1.6")], "as displayed"


# --- the window ------------------------------------------------------------------


class App:
    def __init__(self, store_root: Path) -> None:
        self.store_root = store_root
        self.root = tk.Tk(className="chat-test")
        self.root.withdraw()
        self.windows: list[ChatWindow] = []
        self.errors: list[str] = []
        self.root.report_callback_exception = lambda *exc: self.errors.append(repr(exc[1]))

    def window(self, geometry: str = "780x560+10+40", username: str = "") -> ChatWindow:
        window, _ = open_window(self.root, self.store_root, geometry, username)
        self.windows.append(window)
        self.pump_until(lambda: window.top.winfo_ismapped())
        return window

    def pump_until(self, predicate: object, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.root.update()
            if predicate():  # type: ignore[operator]
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)

    def pump(self, seconds: float) -> None:
        self.pump_until(lambda: False, seconds)

    def close(self) -> None:
        for window in self.windows:
            window.close()
        self.root.update()
        self.root.destroy()
        self.windows.clear()
        del self.root
        gc.collect()


@pytest.fixture
def app(display: str, tmp_path: Path) -> Iterator[App]:  # noqa: F811
    application = App(tmp_path)
    try:
        yield application
    finally:
        application.close()
    assert not application.errors, application.errors


def message_lines(window: ChatWindow) -> list[str]:
    return [line for line in window.transcript_text().splitlines() if "message number" in line]


def numbers(lines: list[str]) -> list[int]:
    return [int(re.search(r"message number (\d+)", line).group(1)) for line in lines]  # type: ignore[union-attr]


def test_history_beyond_a_page_comes_back_page_by_page(app: App) -> None:
    fill_history(app.store_root, "alice", ["bob"], 3 * PAGE + 10)
    window = app.window()
    login(window, app.root, "alice", "bob")
    app.pump(0.1)
    shown = message_lines(window)
    assert len(shown) == PAGE and numbers(shown)[-1] == 3 * PAGE + 9
    assert "load earlier messages" in window.transcript_text()

    def top_line() -> str:
        return window.transcript.get("@0,0 linestart", "@0,0 lineend")

    window.transcript.yview_moveto(0.5)
    app.pump(0.05)
    reading = top_line()
    window.load_earlier()  # what clicking "load earlier messages" does
    app.pump(0.05)
    assert len(message_lines(window)) == 2 * PAGE
    assert top_line() == reading, "the view stays on what the person was reading"

    # Scrolling up to the top loads the page before, like a person with the wheel.
    for _ in range(50):
        window.transcript.event_generate("<Button-4>")
        window.transcript.yview_moveto(0)
        app.pump(0.02)
        if len(message_lines(window)) == 3 * PAGE + 10:
            break
    lines = message_lines(window)
    assert len(lines) == 3 * PAGE + 10, len(lines)
    assert numbers(lines) == list(range(3 * PAGE + 10))
    assert "load earlier messages" not in window.transcript_text(), "nothing earlier is left"


def test_find_searches_the_whole_history_and_jumps_to_the_hit(app: App) -> None:
    texts = {7: "the old Needle from long ago", 5000: "a needle more recent"}
    fill_history(app.store_root, "alice", ["bob"], 6000, text=lambda i: texts.get(i, f"hay {i}"))
    window = app.window()
    session = login(window, app.root, "alice", "bob")
    session.deliver("bob", "fresh news")
    assert app.pump_until(lambda: "fresh news" in window.transcript_text())
    assert "Needle" not in window.transcript_text(), "old lines are not loaded at first"

    window.show_find()
    window.find_var.set("NEEDLE")
    assert window.find_next()
    found = window.transcript.get(*window.transcript.tag_ranges("found"))
    assert found == "needle" and "a needle more recent" in window.transcript_text()
    assert window.find_next(), "Enter again: the next older one"
    assert window.transcript.get(*window.transcript.tag_ranges("found")) == "Needle"
    assert "the old Needle from long ago" in window.transcript_text()
    assert "load earlier messages" not in window.transcript_text(), "its page starts the history"
    assert not window.view.at_latest
    assert app.pump_until(lambda: window.new_marker.winfo_ismapped(), 20), (
        "a way back to the latest"
    )
    # While an old page is shown, a new message is counted, not lost (even
    # with the window focused, the one other reason to count it).
    window.find_entry.focus_force()
    assert app.pump_until(lambda: window.focused and app.root.focus_get() is window.find_entry)
    before = window.unread_total()
    session.deliver("bob", "while reading old lines")
    assert app.pump_until(lambda: window.unread_total() == before + 1)
    assert window.find_next(), "past the oldest: from the latest again"
    assert window.find_status.cget("text") == "from the latest again"
    window.find_var.set("nowhere at all")
    assert not window.find_next()
    assert window.find_status.cget("text") == "not found"
    window.find_entry.event_generate("<Escape>")
    app.pump(0.05)
    assert window.view.at_latest and "while reading old lines" in window.transcript_text()


def test_contacts_come_back_from_the_store_by_last_activity(app: App) -> None:
    peers = [f"peer{i:04d}" for i in range(1000)]
    fill_history(app.store_root, "alice", peers, 2000)
    window = app.window()
    session = login(window, app.root, "alice")
    app.pump(0.1)
    order = window.contact_list.order()
    assert order == [name_key(p) for p in peers[::-1]], "every peer, the latest first"
    assert window.contact_list.scrollbar.winfo_ismapped(), "1,000 contacts scroll"
    session.deliver("peer0003", "hello again")
    assert app.pump_until(lambda: window.contact_list.order()[0] == "peer0003")
    window.contact_list.search_var.set("PEER09")
    app.pump(0.05)
    assert window.contact_list.order() == [name_key(p) for p in peers[::-1] if "peer09" in p]
    window.contact_list.search_var.set("")
    app.pump(0.05)
    assert len(window.contact_list.order()) == 1000
    window.contact_list.select("peer0500")
    app.pump(0.05)
    assert window.current is not None and window.current.name == "peer0500"
    assert "message number" in window.transcript_text(), "its history is shown"


def test_a_64_kib_line_at_login_is_cut_with_show_more(app: App) -> None:
    long_text = "x" * 65_000
    fill_history(app.store_root, "alice", ["bob"], 3, text=lambda i: long_text if i == 1 else "s")
    window = app.window()
    login(window, app.root, "alice", "bob")
    app.pump(0.1)
    shown = window.transcript_text()
    assert shown.count("x") == LONG_TEXT_CHARS, "only the start is laid out"
    assert "show more (60 KiB)" in shown
    more = [t for t in window.transcript.tag_names() if t.startswith("more-")][0]
    first = window.transcript.tag_ranges(more)[0]
    window.transcript.see(first)
    assert app.pump_until(lambda: window.transcript.bbox(first) is not None), "laid out on screen"
    x, y, _, height = window.transcript.bbox(first) or (0, 0, 0, 0)
    window.transcript.event_generate("<Motion>", x=x + 2, y=y + height // 2)
    window.transcript.event_generate("<Button-1>", x=x + 2, y=y + height // 2)
    app.pump(0.05)
    assert window.transcript_text().count("x") == 65_000, "a click shows the rest"


def test_switching_back_to_a_long_conversation_renders_a_page(app: App) -> None:
    window = app.window()
    session = login(window, app.root, "alice", "bob")
    # More than the window keeps of the conversation on screen (MAX_LINES)
    # and more than two pages: 2,400 (5,000 before, twice the CPU for the
    # same proof).
    total = MAX_LINES + 2 * PAGE
    session.deliver("bob", *(f"line {i}" for i in range(total)))
    session.deliver("carol", "hi")
    assert app.pump_until(lambda: window.unread_total() >= 1 and f"line {total - 1}" in
                          window.transcript_text(), 60)  # fmt: skip
    window.open_conversation("carol")
    bob = window.conversations["bob"]
    assert len(bob.lines) <= PAGE, "a conversation not shown keeps a page in memory"
    window.open_conversation("bob")
    app.pump(0.05)
    shown = [line for line in window.transcript_text().splitlines() if "line " in line]
    assert len(shown) == PAGE and shown[-1].endswith(f"line {total - 1}")
    # At the end: the last line is on screen (yview's fraction is an estimate
    # until Tk has measured every wrapped line, which it does when idle).
    assert app.pump_until(lambda: window.transcript.bbox("end-1c") is not None), "at the end"
    window.load_earlier()
    shown = [line for line in window.transcript_text().splitlines() if "line " in line]
    assert len(shown) == 2 * PAGE and shown[0].endswith(f"line {total - 2 * PAGE}")


def test_a_conversation_not_shown_keeps_a_bounded_list(app: App) -> None:
    window = app.window()
    session = login(window, app.root, "alice", "carol")
    session.deliver("bob", *(f"line {i}" for i in range(MAX_LINES + 10)))
    assert app.pump_until(lambda: window.unread_total() == MAX_LINES + 10, 60)
    assert len(window.conversations["bob"].lines) <= MAX_LINES


def test_new_messages_button_only_with_something_below(app: App) -> None:
    window = app.window()
    session = login(window, app.root, "alice", "bob")
    window.transcript.yview_moveto(0)
    session.deliver("bob", "a short one")  # everything fits: nothing is below
    assert app.pump_until(lambda: "a short one" in window.transcript_text())
    app.pump(0.1)
    assert not window.new_marker.winfo_ismapped()
    session.deliver("bob", *(f"filler {i} " + "words " * 10 for i in range(60)))
    assert app.pump_until(lambda: "filler 59" in window.transcript_text())
    window.transcript.yview_moveto(0)
    app.pump(0.05)
    session.deliver("bob", "below the view")
    assert app.pump_until(lambda: window.new_marker.winfo_ismapped(), 20)
    window.transcript.yview_moveto(1.0)  # the person scrolls down by hand
    assert app.pump_until(lambda: not window.new_marker.winfo_ismapped(), 20), "nothing below now"


def test_who_is_online_says_when_nobody_else_is(app: App) -> None:
    window = app.window()
    session = login(window, app.root, "alice")
    window._ask_who()
    assert app.pump_until(lambda: "Nobody else is online" in window.peer_label.cget("text"))
    window.open_conversation("bob")
    session.online = ["bob", "carol"]
    window._ask_who()
    assert app.pump_until(lambda: "Online: bob, carol." in window.transcript_text())


def test_reconnected_follows_the_stale_lines(app: App) -> None:
    window = app.window()
    session = login(window, app.root, "alice", "bob")
    session.link(up=False)
    assert app.pump_until(lambda: "stopped answering" in window.transcript_text())
    session.link(up=True)
    assert app.pump_until(lambda: RECONNECTED_TEXT in window.transcript_text())
    lines = window.transcript_text().splitlines()
    assert RECONNECTED_TEXT in lines[-1], "the last line says the server is back"
    assert not window.banner.winfo_ismapped()


def test_sending_too_long_gets_a_note_within_seconds(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_window, "SLOW_SEND_S", 3600.0)  # first: not yet
    window = app.window()
    session = login(window, app.root, "alice", "bob")
    first = session.send("stuck", to="bob")
    assert first is not None
    assert app.pump_until(lambda: "sending" in window.transcript_text())
    app.pump(0.6)  # the check runs every 0.5 s
    assert "no answer from the server yet" not in window.transcript_text()
    monkeypatch.setattr(client_window, "SLOW_SEND_S", 0.3)  # then: it has been long enough
    assert app.pump_until(lambda: "no answer from the server yet" in window.transcript_text(), 20)
    session.set_state(first, "bob", MessageState.ACCEPTED)
    assert app.pump_until(lambda: "no answer" not in window.transcript_text())
    assert "on server" in window.transcript_text()


def test_a_rejected_password_is_cleared(app: App) -> None:
    window = app.window()
    window.username_var.set("alice")
    window.password_var.set(WRONG_PASSWORD)
    window.submit_login()
    assert app.pump_until(lambda: "Wrong password" in window.login_error.cget("text"))
    assert window.password_var.get() == ""
    assert window.username_var.get() == "alice"


def test_old_times_and_right_to_left_text_in_the_transcript(app: App) -> None:
    last_year = time.mktime((time.localtime().tm_year - 1, 6, 1, 12, 0, 0, 0, 0, -1))
    fill_history(app.store_root, "alice", ["bob"], 2, start_ms=int(last_year * 1000),
                 text=lambda i: f"{HEBREW} 42 {ARABIC}")  # fmt: skip
    window = app.window()
    login(window, app.root, "alice", "bob")
    app.pump(0.05)
    text = window.transcript_text()
    assert (
        f"1 {time.strftime('%b', time.localtime(last_year))} {time.localtime().tm_year - 1}" in text
    )
    assert f"{ARABIC[::-1]} 42 {HEBREW[::-1]}" in text, text


def test_find_with_an_emoji_shown_does_not_crash_tk(display: str) -> None:  # noqa: F811
    """Tk 8.6's `-nocase` search killed the client with SIGSEGV here; in a
    subprocess, so a crash fails this test instead of ending pytest."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.window_fakes"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert "found 'TIME' then 'time'" in result.stdout, result.stdout
