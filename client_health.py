"""The window's network-health view (issue 17 item 3): a status bar with a
coloured dot and "RTT 12 ms · loss 0 % · 0 queued", a small panel that
draws the last minutes of RTT and loss on a Canvas, and the text of each
message's timeline (sent, on server, delivered, resent N times) for the
transcript's hover.

The figures come from `ChatSession.link_stats()` (a snapshot the network
thread publishes; reading it never blocks), polled once a second on the
Tk thread into a bounded ring: five minutes of samples, whatever runs.
The timeline comes from `ChatSession.timeline(id)` (the store, so it
survives restarts).
"""

from __future__ import annotations

import time
import tkinter as tk
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from tkinter import ttk
from typing import Literal

from client_core import LOSS_WINDOW, BacklogFull, LinkStats
from client_look import FONTS, PAD, PALETTE, full_time
from client_store import Timeline

POLL_MS = 1000  # one sample a second ...
HISTORY = 300  # ... five minutes of them in the ring
# Thresholds of the dot's colour: RFC 8085 asks senders to treat sustained
# loss as congestion; a few percent is where people notice (voice codecs
# hide 1-2 %); 400 ms is ITU-T G.114's limit for interactive use.
LOSS_FAIR_PCT = 2.0
RTT_FAIR_MS = 400.0

#: What the status bar says while the server withholds acks (a sending
#: limit: the user's rate, the groups' fan-out budget): data is sent again,
#: and none of it is lost. Said for LOSS_WINDOW after the server's last
#: notice: the resent share counts over that window.
HELD_TEXT = "server delays your messages (sending limit)"
HELD_S = LOSS_WINDOW

Level = Literal["good", "fair", "bad", "idle"]
LEVEL_COLOURS: dict[Level, str] = {
    "good": PALETTE.ok, "fair": PALETTE.warn, "bad": PALETTE.error, "idle": PALETTE.idle,
}  # fmt: skip


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic seconds
    rtt_ms: float | None
    loss_pct: float
    up: bool


def level(stats: LinkStats, held: bool = False) -> Level:
    """The dot's colour: green, amber (slow or lossy), red (down), grey
    (connecting). While the server `held` our data back (its sending limits
    withhold acks: what we send again meanwhile is not lost), what was sent
    again does not make it amber."""
    if stats.link == "connecting":
        return "idle"
    if stats.link == "down":
        return "bad"
    lossy = stats.loss_pct >= LOSS_FAIR_PCT and not held
    if lossy or (stats.rtt_ms or 0.0) >= RTT_FAIR_MS:
        return "fair"
    return "good"


def summary(stats: LinkStats, held: bool = False) -> str:
    """The status bar's words: "RTT 12 ms · loss 0 % · 0 queued"; while the
    server holds our messages back (`held`), that instead of a loss (audit14
    H2: its withheld acks read "loss 54 %" on a loopback link)."""
    queued = f"{stats.outbox} queued"
    if stats.link == "connecting":
        return f"Connecting\u2026 \u00b7 {queued}"
    if stats.link == "down":
        return f"Not connected \u2014 reconnecting\u2026 \u00b7 {queued}"
    if held and stats.loss_pct > 0:
        return f"RTT {_ms(stats.rtt_ms)} \u00b7 {HELD_TEXT} \u00b7 {queued}"
    return f"RTT {_ms(stats.rtt_ms)} \u00b7 loss {stats.loss_pct:.0f} % \u00b7 {queued}"


def _ms(value: float | None) -> str:
    """An RTT for people: `12 ms`, `0.4 ms` (loopback), `–` before a sample."""
    if value is None:
        return "\u2013"
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def _delta(ms: int) -> str:
    if ms < 1000:
        return f"+{ms} ms"
    if ms < 60_000:
        return f"+{ms / 1000:.1f} s"
    return f"+{ms // 60_000} min {ms % 60_000 // 1000} s"


def describe(timeline: Timeline | None, *, state: str | None, stamp: float,
             reason: str | None = None, detail: str = "") -> str:  # fmt: skip
    """The hover text of one of our messages: when it was sent, accepted,
    delivered, and how often it was resent. Without a stored timeline
    (no store), what the window knows: when it was sent and its state.
    A failure says why; a group held back by one member (`detail`, the
    server's words), whom, how much waits, and what frees the group."""
    if timeline is None:
        lines = [f"Sent       {full_time(stamp)}"]
        if state:
            lines.append(f"State      {state}")
        return "\n".join(lines)
    sent = timeline.sent_ms
    lines = [f"Sent       {full_time(sent / 1000)}"]
    if timeline.accepted_ms is not None:
        lines.append(f"On server  {_delta(timeline.accepted_ms - sent)}")
    elif timeline.state == "sending":
        lines.append("On server  not yet (waiting in the outbox)")
    if timeline.delivered_ms is not None:
        lines.append(f"Delivered  {_delta(timeline.delivered_ms - sent)}")
    elif timeline.state == "accepted":
        lines.append("Delivered  not yet (the server holds it)")
    if timeline.state == "failed" or state in ("failed", "retried"):
        backlog = BacklogFull.parse(detail) if reason == "mailbox_full" else None
        if backlog is not None:
            # Three short rows, not one that wraps under the labels.
            who = backlog.holder
            lines += [f"Failed     mailbox full: {backlog.short}",
                      f"Waiting    {backlog.entries:,} messages ({backlog.size}) "
                      f"for {who}, furthest behind",
                      f"Empties    as {who} reads, leaves or is removed by the owner"]  # fmt: skip
        else:
            lines.append(f"Failed     {(reason or 'refused').replace('_', ' ')}")
    times = timeline.resends
    lines.append("Resent     never" if not times else
                 f"Resent     {times} time{'s' if times != 1 else ''}")  # fmt: skip
    return "\n".join(lines)


class HealthBar(ttk.Frame):
    """The status bar along the chat view's bottom; a click opens the panel.
    `source` is the session's `link_stats` (None: no session)."""

    def __init__(
        self,
        master: tk.Misc,
        source: Callable[[], LinkStats | None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(master, style="Status.TFrame", padding=(PAD, 3))
        self.source = source
        self.clock = clock
        self.samples: deque[Sample] = deque(maxlen=HISTORY)
        self.stats: LinkStats | None = None
        self.panel: HealthPanel | None = None
        self._held_at = float("-inf")  # when the server last said it holds data back
        self._after: str | None = None
        self.dot = tk.Canvas(self, width=12, height=12, highlightthickness=0, borderwidth=0,
                             background=PALETTE.sidebar, cursor="hand2")  # fmt: skip
        self.dot.pack(side="left", padx=(0, PAD // 2))
        self.label = ttk.Label(self, text="", style="StatusLink.TLabel", cursor="hand2")
        self.label.pack(side="left")
        self.hint = ttk.Label(self, text="details", style="Status.TLabel", cursor="hand2")
        self.hint.pack(side="right")
        for widget in (self, self.dot, self.label, self.hint):
            widget.bind("<Button-1>", lambda _e: self.toggle_panel())

    @property
    def level(self) -> Level:
        return "idle" if self.stats is None else level(self.stats, self.held)

    @property
    def held(self) -> bool:
        """The server said it holds our data back, within the loss window."""
        return self.clock() - self._held_at < HELD_S

    def held_back(self) -> None:
        """The server said it withholds acks (`rate_limited`): what is sent
        again now is not loss (see `summary`)."""
        self._held_at = self.clock()
        if self.stats is not None:
            self.label.configure(text=summary(self.stats, True))

    def start(self) -> None:
        if self._after is None:
            self.poll()

    def stop(self) -> None:
        if self._after is not None:
            self.after_cancel(self._after)
            self._after = None
        self.close_panel()

    def poll(self) -> None:
        """Take a sample now (and again in POLL_MS)."""
        if self._after is not None:
            self.after_cancel(self._after)
        self._after = self.after(POLL_MS, self.poll)
        stats = self.source()
        if stats is None:
            return
        self.stats = stats
        self.samples.append(Sample(self.clock(), stats.rtt_ms, stats.loss_pct, stats.link == "up"))
        held = self.held
        self.label.configure(text=summary(stats, held))
        self.dot.delete("all")
        self.dot.create_oval(1, 1, 11, 11, fill=LEVEL_COLOURS[level(stats, held)], outline="")
        if self.panel is not None:
            self.panel.draw(self.samples, stats, held)

    def toggle_panel(self) -> None:
        if self.panel is None:
            self.open_panel()
        else:
            self.close_panel()

    def open_panel(self) -> HealthPanel:
        if self.panel is None:
            self.panel = HealthPanel(self.winfo_toplevel(), on_close=self.close_panel)
            if self.stats is not None:
                self.panel.draw(self.samples, self.stats, self.held)
        return self.panel

    def close_panel(self) -> None:
        if self.panel is not None:
            panel, self.panel = self.panel, None
            panel.destroy()


class HealthPanel(tk.Toplevel):
    """A small window: RTT (a line) and loss (bars) over the last minutes,
    and the figures behind them. Esc or Close closes it."""

    WIDTH = 460
    CHART = 100  # height of each chart
    TITLE = 18  # room for a chart's title above it
    GAP = 14  # between the charts
    LEFT = 52  # room for the y-axis labels
    HEIGHT = PAD + 2 * (TITLE + CHART) + GAP + 22  # and the time axis below

    def __init__(self, master: tk.Misc, *, on_close: Callable[[], None]) -> None:
        # A border of its own: without a window manager (or with a plain one)
        # it must not melt into the window under it.
        edge = PALETTE.border
        super().__init__(master, background=PALETTE.window, highlightthickness=1,
                         highlightbackground=edge, highlightcolor=edge)  # fmt: skip
        self.title("Connection health")
        self.resizable(False, False)
        self.transient(master.winfo_toplevel())
        self.protocol("WM_DELETE_WINDOW", on_close)
        self.bind("<Escape>", lambda _e: on_close())
        frame = ttk.Frame(self, padding=PAD * 2)
        frame.pack(fill="both", expand=True)
        ttk.Label(frame, text="Connection health", style="Heading.TLabel").pack(anchor="w")
        self.heading = ttk.Label(frame, text="")
        self.heading.pack(anchor="w")
        self.canvas = tk.Canvas(frame, width=self.WIDTH, height=self.HEIGHT,
                                background=PALETTE.surface, highlightthickness=1,
                                highlightbackground=PALETTE.border)  # fmt: skip
        self.canvas.pack(pady=(PAD, PAD))
        self.details = ttk.Label(frame, text="", style="Muted.TLabel", justify="left")
        self.details.pack(anchor="w")
        buttons = ttk.Frame(frame)
        buttons.pack(fill="x", pady=(PAD, 0))
        ttk.Button(buttons, text="Close", command=on_close).pack(side="right")
        self.update_idletasks()
        x = master.winfo_rootx() + max(0, master.winfo_width() - self.winfo_reqwidth()) // 2
        y = master.winfo_rooty() + 40
        self.geometry(f"+{x}+{y}")

    def draw(self, samples: deque[Sample], stats: LinkStats, held: bool = False) -> None:
        self.heading.configure(text=summary(stats, held))
        why = (" \u2014 the server held messages back (a sending limit):"
               " sent again, not lost") if held else ""  # fmt: skip
        rttvar = "" if stats.rttvar_ms is None else f" (\u00b1{stats.rttvar_ms:.0f} ms)"
        rtt = "not measured yet" if stats.rtt_ms is None else f"{stats.rtt_ms:.1f} ms{rttvar}"
        self.details.configure(text=(
            f"Round trip: {rtt}\n"
            f"Loss over the last minute: {stats.loss_pct:.1f} % of data sent again{why}\n"
            f"Resent since login: {stats.retransmits} of {stats.sent} pieces \u00b7 "
            f"in flight: {stats.in_flight} \u00b7 waiting to be accepted: {stats.outbox}\n"
            "Shaded red: not connected (messages wait in the outbox)"
        ))  # fmt: skip
        c = self.canvas
        c.delete("all")
        now = samples[-1].at if samples else 0.0
        # The last minute at least; more as the ring fills, up to HISTORY s.
        seen = now - samples[0].at if samples else 0.0
        span = float(min(HISTORY, max(60, 60 * -(-int(seen) // 60))))
        rtts = [s.rtt_ms for s in samples if s.rtt_ms is not None]
        top_rtt = _nice_ceiling(max(rtts, default=0.0) * 1.15, minimum=10.0)
        top_loss = _nice_ceiling(max((s.loss_pct for s in samples), default=0.0) * 1.15,
                                 minimum=5.0)  # fmt: skip
        width = self.WIDTH - self.LEFT - PAD
        small = FONTS.small

        def x_of(at: float) -> float:
            return self.LEFT + width * (1 - (now - at) / span)

        for chart, (title, top, unit) in enumerate(
            (("Round-trip time", top_rtt, "ms"), ("Loss (data sent again)", top_loss, "%"))
        ):
            y0 = PAD + chart * (self.TITLE + self.CHART + self.GAP) + self.TITLE
            c.create_text(self.LEFT, y0 - self.TITLE / 2 - 2, text=title, anchor="w",
                          font=FONTS.bold, fill=PALETTE.text)  # fmt: skip
            for fraction in (0.0, 0.5, 1.0):
                y = y0 + self.CHART * (1 - fraction)
                c.create_line(self.LEFT, y, self.LEFT + width, y, fill=PALETTE.sidebar)
                c.create_text(self.LEFT - 4, y, text=f"{top * fraction:g} {unit}", anchor="e",
                              font=small, fill=PALETTE.muted)  # fmt: skip
            for index, sample in enumerate(samples):
                if not sample.up:  # the link was down: a red band
                    x = x_of(sample.at)
                    c.create_rectangle(x - width / span, y0, x, y0 + self.CHART,
                                       fill="#f6d5d7", outline="")  # fmt: skip
                if chart == 1 and sample.loss_pct > 0:
                    x = x_of(sample.at)
                    y = y0 + self.CHART * (1 - min(1.0, sample.loss_pct / top))
                    c.create_rectangle(x - max(1.0, width / span), y, x, y0 + self.CHART,
                                       fill=PALETTE.warn, outline="")  # fmt: skip
                if chart == 0 and index and sample.rtt_ms is not None:
                    before = samples[index - 1]
                    if before.rtt_ms is not None:
                        c.create_line(
                            x_of(before.at), y0 + self.CHART * (1 - before.rtt_ms / top),
                            x_of(sample.at), y0 + self.CHART * (1 - sample.rtt_ms / top),
                            fill=PALETTE.accent, width=2,
                        )  # fmt: skip
        axis = PAD + 2 * (self.TITLE + self.CHART) + self.GAP + 4
        step = 60 if span > 60 else 15
        for seconds in range(0, int(span) + 1, step):
            x = self.LEFT + width * (1 - seconds / span)
            if seconds == 0:
                label = "now"
            elif step == 60:
                label = f"\u2212{seconds // 60} min"
            else:
                label = f"\u2212{seconds} s"
            # "now" sits inside the right edge
            c.create_text(x, axis, text=label, anchor="ne" if seconds == 0 else "n",
                          font=small, fill=PALETTE.muted)  # fmt: skip


def _nice_ceiling(value: float, *, minimum: float) -> float:
    """The axis top: 1, 2 or 5 times a power of ten, at least `minimum`."""
    value = max(value, minimum)
    step = 1.0
    while step * 10 <= value:
        step *= 10
    for factor in (1, 2, 5, 10):
        if value <= factor * step:
            return factor * step
    return 10 * step
