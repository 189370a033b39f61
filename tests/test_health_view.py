"""The window's network-health view (issue 17 item 3) on a real X display:
the status bar's dot and words from a real session's `link_stats()`, the
link going down when the server stops (and messages counted as queued),
the panel opened with a click and closed with Esc, the bounded ring of
samples; the pure parts (thresholds, words, a message's timeline text).

The README's health-panel screenshot is taken here from a scripted trace
(a fake session: a spike in RTT, a burst of loss, a short outage), so it
shows every part of the chart; the real-server test checks the same bar
and panel against measured figures.
"""

from __future__ import annotations

import gc
import queue
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chat_client import ChatSession, LoggedIn
from client_core import LinkStats
from client_health import (
    HISTORY,
    LEVEL_COLOURS,
    HealthBar,
    Sample,
    _nice_ceiling,
    describe,
    level,
    summary,
)
from client_store import ClientStore, Timeline
from client_window import ChatWindow, Settings
from protocol import GroupAction
from tests.conftest import RunningServer, start_server, stop_server
from tests.conftest import test_config as server_config
from tests.test_gui import LEFT, Gui, open_gui, own_ids, press, pump, pump_until, type_text
from tests.test_window_look import canvas_kind, canvas_texts, shot
from tests.xvfb import display  # noqa: F401 (a fixture)

UP = LinkStats("up", 23.0, 4.0, 0.0, 0, 40, 0, 0)


# --- pure parts ---------------------------------------------------------------------


def test_the_dot_and_the_words_follow_the_figures() -> None:
    assert level(UP) == "good" and summary(UP) == "RTT 23 ms \u00b7 loss 0 % \u00b7 0 queued"
    lossy = LinkStats("up", 23.0, 4.0, 7.5, 9, 120, 2, 1)
    assert level(lossy) == "fair" and summary(lossy).endswith("loss 8 % \u00b7 1 queued")
    assert level(LinkStats("up", 650.0, 90.0, 0.0, 0, 10, 0, 0)) == "fair", "slow"
    down = LinkStats("down", None, None, 0.0, 3, 50, 0, 2)
    assert level(down) == "bad" and summary(down).startswith("Not connected")
    assert "2 queued" in summary(down)
    connecting = LinkStats("connecting", None, None, 0.0, 0, 0, 0, 0)
    assert level(connecting) == "idle" and summary(connecting).startswith("Connecting")
    assert summary(LinkStats("up", 0.42, 0.1, 0.0, 0, 1, 0, 0)).startswith("RTT 0.4 ms")
    assert len(set(LEVEL_COLOURS.values())) == 4, "four states, four colours"
    assert [_nice_ceiling(v, minimum=10) for v in (3, 12, 40, 130, 999)] == [10, 20, 50, 200, 1000]


def test_a_messages_timeline_in_words() -> None:
    stamp = 1_764_946_800.0  # 2025-12-05 15:00 UTC
    sent = int(stamp * 1000)
    delivered = describe(Timeline("delivered", sent, sent + 12, sent + 4_012, 2),
                         state="delivered", stamp=stamp)  # fmt: skip
    assert delivered.splitlines()[1:] == [
        "On server  +12 ms", "Delivered  +4.0 s", "Resent     2 times",
    ]  # fmt: skip
    waiting = describe(Timeline("sending", sent, None, None, 0), state="sending", stamp=stamp)
    assert "not yet (waiting in the outbox)" in waiting and "Resent     never" in waiting
    held = describe(Timeline("accepted", sent, sent + 5, None, 1), state="accepted", stamp=stamp)
    assert "Delivered  not yet (the server holds it)" in held and "Resent     1 time" in held
    failed = describe(Timeline("failed", sent, None, None, 0), state="failed", stamp=stamp,
                      reason="mailbox_full")  # fmt: skip
    assert "Failed     mailbox full" in failed
    unknown = describe(None, state="sending", stamp=stamp)  # no store: what the window knows
    assert unknown.startswith("Sent ") and unknown.endswith("State      sending")


def test_the_ring_keeps_the_last_minutes_only(display: str) -> None:  # noqa: F811
    import tkinter as tk

    root = tk.Tk()
    clock = [0.0]
    figures = iter(range(10_000))

    def source() -> LinkStats:
        n = next(figures)
        return LinkStats("up", 20.0 + n % 7, 2.0, float(n % 3), n, 10 * n, 0, 0)

    try:
        bar = HealthBar(root, source, clock=lambda: clock[0])
        bar.pack()
        for _ in range(HISTORY + 100):
            clock[0] += 1.0
            bar.poll()
        assert len(bar.samples) == HISTORY, "five minutes, whatever runs"
        assert bar.samples[0].at == 101.0 and bar.samples[-1].at == HISTORY + 100.0
        panel = bar.open_panel()
        root.update()
        lines = [i for i in panel.canvas.find_all() if canvas_kind(panel.canvas, i) == "line"]
        assert len(lines) > HISTORY // 2, "the RTT is drawn as a line through the samples"
        labels = canvas_texts(panel.canvas)
        assert {"now", "\u22125 min", "Round-trip time", "Loss (data sent again)"} <= labels
        bar.stop()
        assert bar.panel is None
    finally:
        root.destroy()
    # The bar and the panel keep their widgets as attributes (and each widget
    # its master): cycles that hold the root. Freed here, on Tk's thread, not
    # by whichever thread collects next (the fixture would fail the test).
    del bar, panel, root
    gc.collect()


# --- with a real server -------------------------------------------------------------------


@pytest.fixture
def own_server_gui(
    display: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Gui, list[RunningServer]]]:
    """Windows on a server the test may stop (the list is emptied then)."""
    running = [start_server(server_config(tmp_path / "server-data"))]
    try:
        for app in open_gui(running[0], monkeypatch):
            yield app, running
    finally:
        for server in running:
            stop_server(server)


def test_status_bar_and_panel_with_a_real_link_that_goes_down(
    own_server_gui: tuple[Gui, list[RunningServer]],
) -> None:
    app, running = own_server_gui
    # Fast keepalives so the lost server is noticed in a second or two.
    app.session("bob")
    window = app.window(LEFT, keepalive=0.3, link_timeout=1.5)
    app.login(window, "alice", "bob")
    bar = window.health
    type_text(window.composer, "measure me")
    press(window.composer, "Return")
    assert pump_until(app.root, lambda: len(own_ids(window, "bob")) == 1)
    [msg] = own_ids(window, "bob")
    assert pump_until(app.root, lambda: window.state_of(msg) in ("accepted", "delivered"))
    assert pump_until(app.root, lambda: bar.stats is not None and bar.stats.rtt_ms is not None, 10)
    words = bar.label.cget("text")
    assert re.fullmatch(r"RTT [\d.]+ ms \u00b7 loss 0 % \u00b7 0 queued", words), words
    assert bar.level == "good"
    dot = bar.dot.find_all()[0]
    assert str(bar.dot.tk.call(str(bar.dot), "itemcget", dot, "-fill")) == LEVEL_COLOURS["good"]

    # A real click on the status bar opens the panel; Esc closes it.
    bar.label.event_generate("<Button-1>", x=5, y=5)
    assert pump_until(app.root, lambda: bar.panel is not None and bar.panel.winfo_ismapped())
    assert bar.panel is not None
    assert "Round trip: " in bar.panel.details.cget("text")
    bar.panel.focus_force()
    bar.panel.update()
    bar.panel.event_generate("<KeyPress>", keysym="Escape")
    assert pump_until(app.root, lambda: bar.panel is None)

    stop_server(running.pop())
    assert pump_until(app.root, lambda: bar.level == "bad", 10), bar.label.cget("text")
    assert bar.label.cget("text").startswith("Not connected")
    type_text(window.composer, "kept for later")
    press(window.composer, "Return")
    assert pump_until(app.root, lambda: bar.label.cget("text").endswith("1 queued"), 10)
    assert any(not sample.up for sample in bar.samples), "the outage is in the ring"
    assert isinstance(window.session, ChatSession)
    window.session.abort()  # no server to log out from: do not wait for one at the end


# --- the README's screenshot ----------------------------------------------------------------


class ScriptedSession:
    """A session that logs in at once and reports scripted link figures."""

    store: ClientStore | None = None

    def __init__(self, *, events: queue.Queue[Any], **_: Any) -> None:
        self.events = events
        self.stats = LinkStats("up", 24.0, 3.0, 0.0, 14, 920, 0, 0)

    def login(self, server: str, username: str, connect_to: str | None = None, *,
              password: str) -> bool:  # fmt: skip
        self.events.put(LoggedIn(username))
        return True

    def set_peer(self, name: str) -> bool:
        return True

    def send(self, text: str, to: str | None = None) -> str | None:
        return None

    def shown(self, message_id: int, *, wait: float = 0.0) -> bool:
        return True

    def who(self) -> None:
        pass

    def watch(self, name: str) -> None:
        pass

    def group(
        self, action: GroupAction, group: str = "", users: tuple[str, ...] | list[str] = ()
    ) -> bool:
        return True

    def typing(self, to: str) -> None:
        pass

    def logout(self, timeout: float = 10.0) -> None:
        pass

    def close(self, timeout: float = 10.0) -> None:
        pass

    def discard(self) -> None:
        pass

    def link_stats(self) -> LinkStats:
        return self.stats

    def waiting_ids(self) -> frozenset[str]:
        return frozenset()

    def timeline(self, message_id: str) -> Timeline | None:
        return None


def test_health_panel_screenshot_from_a_scripted_trace(display: str) -> None:  # noqa: F811
    import tkinter as tk

    root = tk.Tk()
    root.withdraw()
    try:
        window = ChatWindow(tk.Toplevel(root), Settings(geometry=LEFT, path=None),
                            session_factory=ScriptedSession)  # fmt: skip
        window.username_var.set("alice")
        window.password_var.set("pw")
        window.connect_var.set("bob")
        window.submit_login()
        assert pump_until(root, lambda: window.username == "alice")
        rng = random.Random(17)
        bar = window.health
        bar.samples.clear()
        now = bar.clock()
        for i in range(240):  # four minutes: a slow spell, a lossy one, a short outage
            up = not 170 <= i < 181
            rtt = 21 + rng.random() * 9 + (140 if 60 <= i < 75 else 0)
            loss = 8 + rng.random() * 10 if 110 <= i < 125 else 0.0
            bar.samples.append(Sample(now - 240 + i, rtt if up else None, loss, up))
        bar.poll()
        panel = bar.open_panel()
        panel.draw(bar.samples, bar.stats or UP)
        pump(root, 0.3)
        assert bar.level == "good"
        shot("health.png", window.top, panel)
        window.close()
    finally:
        root.destroy()
