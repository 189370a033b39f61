"""The window's transcript: one conversation's lines in a read-only Text,
and the pure functions behind what it shows (split from `client_window.py`).

What it costs stays flat with the length of a history: it holds a window of
lines (the window trims the rest, which stay in the store) and inserts them
in one pass with one state toggle; the view's position is asked once per
batch of arrivals, not per line; a very long message is shown cut at
`LONG_TEXT_CHARS` with a "show more" link; and the view scrolls to the end
only once the widget has its real width (scrolled while it is still 1 px
wide, a 64 KiB line is laid out one character per row: seconds of freeze).

Find never uses Tk's `-nocase` search: on Tcl 8.6 it crashes the process
(SIGSEGV) on a character outside the BMP (an emoji). `find_in_text` folds
case in Python and converts to Tk's indexes (`tk_len`: Tcl 8.6 counts such
a character as two).

Tk 8.6 has no bidirectional layout and no shaping: `display_order` reorders
right-to-left runs (Hebrew, Arabic) for display within a left-to-right
line, numbers kept left to right; Arabic letters still show unjoined.
"""

from __future__ import annotations

import datetime
import re
import time
import tkinter as tk
import tkinter.font as tkfont
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from tkinter import ttk
from typing import Any

from client_core import BacklogFull, MessageState
from client_look import FONTS, PAD, PALETTE, continues, day_label, new_day, style_text
from client_store import find_folded, fold, group_place

#: A message longer than this shows its start and a "show more" link: a
#: 64 KiB single line laid out in a Text took 2-7 s (measured, issue 17).
LONG_TEXT_CHARS = 4000

# What each state of our message shows; "retried" is the window's own (a
# failed message the user sent again).
STATE_LABELS = {
    MessageState.SENDING: "sending\u2026",
    MessageState.ACCEPTED: "\u2713 on server",
    MessageState.DELIVERED: "\u2713\u2713 delivered",
    MessageState.FAILED: "\u2717 failed",
    "retried": "\u2717 failed, sent again below",
}


@dataclass
class Line:
    kind: str  # "own", "peer", "system" or "error" (a refusal: a system line in red)
    who: str
    text: str
    stamp: float
    msg_id: str | None = None  # ours: our id; theirs: the sender's (both `instance-seq`)
    state: str | None = None
    reason: str | None = None
    detail: str = ""  # ours, failed: the server's words for why (`StatusChanged.detail`)
    row_id: int = 0  # its row in the store, when known (0: not read from the store)
    slow: bool = False  # ours, still `sending` after SLOW_SEND_S: say so
    awaits_account: bool = False  # ours, `sending`: its recipient has no account yet
    seq: int = 0  # a group's line: its place in the group's order (0: ours, not accepted yet)
    life: int = 0  # a group's line: which group of the name (`client_store.group_place`)

    @property
    def place(self) -> int:
        """Its place across the lives of its group's name (0: not numbered)."""
        return group_place(self.life, self.seq)


# --- pure functions -------------------------------------------------------------


def failure_reason(reason: str, detail: str = "") -> str:
    """What our failed message's line says after "✗ failed": its reason
    for people (`mailbox full`), and for a group that one member holds
    back, whom (`carol's backlog is full`: the person can ask carol to
    read, or remove her; "mailbox full" alone said neither)."""
    backlog = BacklogFull.parse(detail) if reason == "mailbox_full" else None
    return backlog.short if backlog is not None else reason.replace("_", " ")


def move_down(lines: list[Line], line: Line, ahead: int) -> bool:
    """Move `line` (found by identity) below the `ahead` lines after it
    (a negative `ahead`: above the -ahead lines before it); False if it is
    not in `lines`."""
    index = next((i for i, other in enumerate(lines) if other is line), None)
    if index is None:
        return False
    del lines[index]
    lines.insert(max(0, index + ahead), line)
    return True


def tk_safe(text: str) -> str:
    """Text Tk can show: characters outside the BMP (emoji on Tcl 8.6) become
    U+FFFD so an old Tcl never raises on them."""
    if tk.TkVersion >= 8.7:
        return text
    return "".join(ch if ord(ch) <= 0xFFFF else "\ufffd" for ch in text)


def tk_len(text: str) -> int:
    """How many characters Tk counts in `text`: Tcl 8.6 stores a character
    outside the BMP as a surrogate pair, two index positions."""
    if tk.TkVersion >= 8.7:
        return len(text)
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def find_in_text(content: str, needle: str) -> list[tuple[str, str]]:
    """Every occurrence of `needle` in `content` (a Text's whole text),
    ignoring case, as Tk (start, end) indexes; the needle is also looked
    for as `display_order` shows it, so right-to-left words are found."""
    needles = {needle, display_order(needle)}
    hits: list[tuple[str, str]] = []
    folded = {fold(n) for n in needles}
    for number, text_line in enumerate(content.split("\n"), start=1):
        if not any(f in fold(text_line) for f in folded):
            continue  # the usual case, in C; the character map only for a line that holds it
        spans = sorted({span for n in needles for span in find_folded(text_line, n)})
        for start, end in spans:
            col = tk_len(text_line[:start])
            hits.append((f"{number}.{col}", f"{number}.{col + tk_len(text_line[start:end])}"))
    return hits


def format_stamp(stamp: float, now: float | None = None) -> str:
    """A message's time as a person reads it: `14:05` today, `Tue 14:05`
    within the last week, `5 Dec 14:05` earlier this year, `5 Dec 2025 14:05`
    before (local time)."""
    when = time.localtime(stamp)
    today = time.localtime(time.time() if now is None else now)
    clock = f"{when.tm_hour:02d}:{when.tm_min:02d}"
    days = (
        _day_number(today.tm_year, today.tm_mon, today.tm_mday)
        - _day_number(when.tm_year, when.tm_mon, when.tm_mday)
    )  # fmt: skip
    if days == 0:
        return clock
    if 0 < days < 7:
        return f"{time.strftime('%a', when)} {clock}"
    date = f"{when.tm_mday} {time.strftime('%b', when)}"
    if when.tm_year == today.tm_year:
        return f"{date} {clock}"
    return f"{date} {when.tm_year} {clock}"


def _day_number(year: int, month: int, day: int) -> int:
    return datetime.date(year, month, day).toordinal()


# Where right-to-left letters live (Hebrew to Arabic Extended, the
# presentation forms, and their supplementary-plane blocks): a text without
# any is returned as it is without looking at each character.
_MAYBE_RTL = re.compile(
    "[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc\U00010800-\U00010fff\U0001e800-\U0001efff]"
)
_RTL = frozenset({"R", "AL"})
_NUMBER = frozenset({"EN", "AN"})
_IN_NUMBER = frozenset({"CS", "ES", "ET"})  # 1,000  3.5  (between digits only)
_MIRRORED = dict(zip("()[]{}<>\u00ab\u00bb", ")(][}{><\u00bb\u00ab", strict=True))


def display_order(text: str) -> str:
    """`text` with its right-to-left runs reversed for display in a
    left-to-right line (Tk 8.6 draws characters in the order given). A run
    starts at a Hebrew or Arabic letter and takes the spaces, punctuation
    and numbers up to the last right-to-left letter before a left-to-right
    one; inside it a number keeps its digit order, a combining mark stays
    after its letter and brackets are mirrored. Not the full Unicode bidi
    algorithm (no explicit embeddings, no right-to-left paragraphs)."""
    return "\n".join(_order_line(part) for part in text.split("\n"))


def _order_line(text: str) -> str:
    if not _MAYBE_RTL.search(text):
        return text
    classes = [unicodedata.bidirectional(ch) for ch in text]
    if not any(c in _RTL for c in classes):
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        if classes[i] not in _RTL:
            out.append(text[i])
            i += 1
            continue
        last = j = i
        while j < len(text) and classes[j] != "L":
            if classes[j] in _RTL:
                last = j
            j += 1
        out.append(_reverse_run(text[i : last + 1], classes[i : last + 1]))
        i = last + 1
    return "".join(out)


def _reverse_run(run: str, classes: list[str]) -> str:
    units: list[str] = []
    k = 0
    while k < len(run):
        m = k + 1
        if classes[k] in _NUMBER:
            while m < len(run) and (
                classes[m] in _NUMBER
                or (classes[m] in _IN_NUMBER and m + 1 < len(run) and classes[m + 1] in _NUMBER)
            ):
                m += 1
            units.append(run[k:m])
        else:
            while m < len(run) and classes[m] == "NSM":
                m += 1
            units.append(_MIRRORED.get(run[k], run[k]) + run[k + 1 : m])
        k = m
    return "".join(reversed(units))


# --- the widget -------------------------------------------------------------------


class Transcript:
    """The read-only Text that shows one conversation, with its scrollbar,
    its "↓" button and a "load earlier messages" line at the top."""

    def __init__(
        self,
        parent: tk.Misc,
        *,
        on_retry: Callable[[Line], None],
        on_load_earlier: Callable[[], None],
        on_back_to_latest: Callable[[], None],
    ) -> None:
        self.on_retry = on_retry
        self.on_load_earlier = on_load_earlier
        self.on_back_to_latest = on_back_to_latest
        self.text = text = tk.Text(parent, wrap="word", state="disabled", height=4, width=24,
                                   padx=PAD + 2, pady=PAD)  # fmt: skip
        style_text(text)  # client_look's palette and fonts
        self.scrollbar = ttk.Scrollbar(parent, orient="vertical", command=self._yview)
        text.configure(yscrollcommand=self._on_scrolled)
        self.scrollbar.pack(side="right", fill="y")
        text.pack(side="left", fill="both", expand=True)
        # Continuation lines of a message are indented under its name; a
        # message that continues its sender's group (client_look.continues)
        # keeps its time and name in the text, hidden, and is indented alike.
        p = PALETTE
        indent = tkfont.nametofont(FONTS.small, text).measure("00:00 ")
        text.tag_configure("own", foreground=p.text, lmargin2=indent)
        text.tag_configure("peer", foreground=p.text, lmargin2=indent)
        text.tag_configure("cont", lmargin1=indent, lmargin2=indent)
        text.tag_configure("first", spacing1=PAD)
        text.tag_configure("hidden", elide=True)
        text.tag_configure("system", foreground=p.muted, font=FONTS.small, spacing1=4,
                           spacing3=4)  # fmt: skip
        text.tag_configure("error-line", foreground=p.error)
        text.tag_configure("day", foreground=p.muted, font=FONTS.small, justify="center",
                           spacing1=PAD, spacing3=4)  # fmt: skip
        text.tag_configure("stamp", foreground=p.idle, font=FONTS.small)
        text.tag_configure("who", font=FONTS.bold)
        text.tag_configure("who-own", foreground=p.own)
        text.tag_configure("who-peer", foreground=p.peer)
        # A state that wraps ("✗ failed (carol's backlog is full) Retry")
        # goes on under the message's text, not under its time.
        text.tag_configure("state", foreground=p.muted, font=FONTS.small, lmargin2=indent)
        text.tag_configure("failed", foreground=p.error, font=FONTS.small, lmargin2=indent)
        for link in ("retry", "more", "earlier"):
            text.tag_configure(link, foreground=p.accent, underline=True, font=FONTS.small,
                               lmargin2=indent)  # fmt: skip
            text.tag_bind(link, "<Enter>", lambda e: text.configure(cursor="hand2"))
            text.tag_bind(link, "<Leave>", lambda e: text.configure(cursor=""))
        text.tag_configure("earlier", justify="center", spacing3=6)
        text.tag_bind("earlier", "<Button-1>", lambda e: self.on_load_earlier())
        text.tag_configure("found", background=p.found)
        # Read-only but selectable and copyable: block edits, not selection.
        text.bind("<Control-c>", lambda e: None)
        self.new_marker = ttk.Button(parent, text="\u2193 new messages",
                                        command=self._marker_clicked)  # fmt: skip
        # What a group makes of our message's state ("✓✓ 2 of 3":
        # client_groups_ui.py); None leaves the usual label.
        self.state_label: Callable[[Line], str | None] = lambda line: None
        self.lines: list[Line] = []  # what is shown, oldest first
        self.has_earlier = False  # the store holds lines before the first shown
        self.at_latest = True  # ends with the conversation's newest line (else: a search hit)
        self._marks: dict[int, str] = {}  # id(line) -> mark at the line's start
        self._mark_lines: dict[str, Line] = {}  # the reverse (what is under the pointer)
        self._day_marks: dict[int, str] = {}  # id(line) -> mark before its day separator
        self._serial = 0
        self._bottom_cache: bool | None = None  # at the bottom when this batch began
        self._end_pending = False  # scroll to the end once the widget has its width
        # Scrolled to the end and not scrolled away by the person since: a
        # resize keeps the end in view. Opening a group shows its members
        # panel after its lines are shown and scrolled to the end: the
        # narrower text wraps to more lines, and the newest fell out of view
        # (audit7 N11). (Not the scroll callback's fractions: while Tk
        # measures wrapped lines they are estimates, short of the end.)
        self._following = False
        self._open_line = False  # the text ends with a line of ours: a new one needs "\n"
        self._user_scrolled = False
        text.bind("<Configure>", self._on_configure, add="+")
        for sequence in ("<MouseWheel>", "<Button-4>"):
            text.bind(sequence, self._on_wheel_up, add="+")

    # --- the view's position -----------------------------------------------------

    def at_bottom(self) -> bool:
        """At the end of the text; asked once per batch of arrivals (a yview
        query lays out the text: per line it was the cost of a burst)."""
        if self._bottom_cache is None:
            self._bottom_cache = self.text.yview()[1] >= 0.999
        return self._bottom_cache

    def new_batch(self) -> None:
        self._bottom_cache = None

    def scroll_to_end(self) -> None:
        if not self.at_latest:
            self.on_back_to_latest()
            return
        self._following = True
        if self.text.winfo_width() <= 1:
            self._end_pending = True  # see _on_configure
        else:
            self.text.see("end")
        self.new_marker.place_forget()
        self._bottom_cache = None

    def _on_configure(self, _event: object) -> None:
        if (self._end_pending or self._following) and self.text.winfo_width() > 1:
            self._end_pending = False
            self.text.see("end")

    def _yview(self, *args: Any) -> None:
        self._user_scrolled = True
        self._following = False
        self.text.yview(*args)

    def _on_wheel_up(self, event: Any) -> None:
        if getattr(event, "num", 0) == 4 or getattr(event, "delta", 0) > 0:
            self._user_scrolled = True
            self._following = False

    def see(self, index: str) -> None:
        """Scroll to `index` (a find's hit): a resize no longer goes to the end."""
        self._following = False
        self.text.see(index)

    def _on_scrolled(self, first: float | str, last: float | str) -> None:
        self.scrollbar.set(first, last)
        self._bottom_cache = None
        if float(last) >= 0.999 and self.at_latest:
            self.new_marker.place_forget()  # nothing below any more
        if float(first) <= 0.0 and self.has_earlier and self._user_scrolled:
            self._user_scrolled = False
            self.text.after_idle(self.on_load_earlier)  # not from inside a redraw

    def _marker_clicked(self) -> None:
        self.scroll_to_end()

    def show_marker(self) -> None:
        """The "↓" button, only when there is something below the view."""
        if not self.at_latest:
            self.new_marker.configure(text="\u2193 back to the latest")
        else:
            self.new_marker.configure(text="\u2193 new messages")
            if self.text.yview()[1] >= 0.999:
                return
        self.new_marker.place(relx=0.5, rely=1.0, anchor="s", y=-6)

    # --- filling it -------------------------------------------------------------------

    def show(self, lines: Iterable[Line], *, has_earlier: bool, at_latest: bool = True) -> None:
        """Show `lines` (and nothing else), in one pass, at the end."""
        text = self.text
        self.lines = list(lines)
        self.has_earlier = has_earlier
        self.at_latest = at_latest
        self._marks.clear()
        self._mark_lines.clear()
        self._day_marks.clear()
        text.configure(state="normal")
        text.delete("1.0", "end")
        self._open_line = False
        for mark in text.mark_names():
            if mark not in ("insert", "current"):
                text.mark_unset(mark)
        # Per-message tags (links, states) go with their text: their number
        # must not grow with every conversation shown.
        stale = [t for t in text.tag_names() if t.startswith(("more-", "retry-", "sttext-"))]
        if stale:
            text.tag_delete(*stale)
        self._insert_earlier_link()
        before: Line | None = None
        for line in self.lines:
            self._insert_line(line, "end", before)
            before = line
        text.configure(state="disabled")
        self.new_marker.place_forget()
        self._user_scrolled = False
        self._following = False
        if at_latest:
            self.scroll_to_end()
        else:
            self.show_marker()

    def append(self, line: Line) -> bool:
        """One new line at the end. True if the view should follow it (it
        was at the bottom, or the line is ours); else the "↓ new messages"
        button shows once the text is laid out."""
        was_at_bottom = self.at_bottom()
        before = self.lines[-1] if self.lines else None
        self.lines.append(line)
        self.text.configure(state="normal")
        self._insert_line(line, "end", before)
        self.text.configure(state="disabled")
        follow = was_at_bottom or line.kind == "own"
        if not follow:
            self.text.after_idle(self.show_marker)
        return follow

    def move_down(self, line: Line, ahead: int) -> None:
        """Our group message goes below the `ahead` lines shown after it
        (the server numbered them first), or a group's entry above the
        -`ahead` of ours before it (numbered after it): drawn again, the
        view kept where it was (at the end if it was there)."""
        was_at_bottom = self.at_bottom()
        top = self.text.yview()[0]
        if not move_down(self.lines, line, ahead):
            return
        self.show(self.lines, has_earlier=self.has_earlier, at_latest=self.at_latest)
        if not was_at_bottom:
            self._following = False
            self.text.yview_moveto(top)

    def prepend(self, lines: list[Line], *, has_earlier: bool) -> None:
        """Earlier lines above the shown ones; the view stays on what the
        person was reading."""
        text = self.text
        anchor = self._marks.get(id(self.lines[0])) if self.lines else None
        self.has_earlier = has_earlier
        text.mark_set("view-top", "@0,0")  # below the insertions: it stays on its line
        self._following = False
        text.configure(state="normal")
        if anchor is not None:
            # Text inserted at the anchor must go before it: right gravity for now.
            text.mark_gravity(anchor, "right")
            self._drop_day_separator(self.lines[0])  # put back below if still a new day
        text.delete("1.0", anchor or "end")  # the "load earlier" line
        self._insert_earlier_link()
        before: Line | None = None
        for line in lines:
            self._insert_line(line, anchor or "end", before)
            before = line
        if anchor is not None:
            self._rejoin(before, self.lines[0], anchor)
            text.mark_gravity(anchor, "left")
        text.configure(state="disabled")
        self.lines[:0] = lines
        if anchor is not None:
            text.yview("view-top")

    def trim_front(self, count: int) -> None:
        """Drop the `count` oldest shown lines (they stay in the store)."""
        if count <= 0 or count >= len(self.lines):
            return
        first_kept = self._marks[id(self.lines[count])]
        for line in self.lines[:count]:
            mark = self._marks.pop(id(line), None)
            if mark is not None:
                self.text.mark_unset(mark)
                self._mark_lines.pop(mark, None)
            day = self._day_marks.pop(id(line), None)
            if day is not None:
                self.text.mark_unset(day)
        del self.lines[:count]
        self.has_earlier = True
        self.text.configure(state="normal")
        self.text.mark_gravity(first_kept, "right")
        self._drop_day_separator(self.lines[0])
        self.text.delete("1.0", first_kept)
        self._insert_earlier_link()
        # The first line shown opens its day and its group: a separator, and
        # its time and name show again.
        self._rejoin(None, self.lines[0], first_kept)
        self.text.mark_gravity(first_kept, "left")
        self.text.configure(state="disabled")

    def _insert_earlier_link(self) -> None:
        if self.has_earlier:
            self.text.insert("1.0", "\u2191 load earlier messages\n", ("earlier",))

    def _insert_line(self, line: Line, index: str, before: Line | None = None) -> None:
        """Insert one line at `index` ("end", or the mark of the line it goes
        before), after `before` (the line shown above it, if any): a day
        separator above it on a new day, its time and name hidden when it
        continues `before`'s group."""
        text = self.text
        self._serial += 1
        mark = f"ln{self._serial}"
        self._marks[id(line)] = mark
        self._mark_lines[mark] = line
        at_end = index == "end"
        if at_end and self._open_line:
            text.insert("end", "\n")
        if new_day(before, line):
            day = f"ds{self._serial}"
            self._day_marks[id(line)] = day
            text.mark_set(day, "end-1c" if at_end else index)
            text.mark_gravity(day, "left")
            self._insert(index if not at_end else "end", day_label(line.stamp) + "\n", ("day",))
        text.mark_set(mark, "end-1c" if at_end else index)
        text.mark_gravity(mark, "left")
        grouped = continues(before, line)
        head = ("hidden",) if grouped else ("first",)
        parts: list[tuple[str, tuple[str, ...]]] = [
            (f"{format_stamp(line.stamp)} ", ("stamp", *head))
        ]
        shown, rest = line.text, ""
        if len(shown) > LONG_TEXT_CHARS:
            shown, rest = shown[:LONG_TEXT_CHARS], shown[LONG_TEXT_CHARS:]
        if line.kind == "system":
            parts.append((shown, ("system",)))
        elif line.kind == "error":
            parts.append((shown, ("system", "error-line")))
        else:
            who = (line.kind, "who", f"who-{line.kind}")
            parts.append((f"{line.who}: ", (*who, "hidden") if grouped else who))
            parts.append((display_order(shown), (line.kind, "cont") if grouped else (line.kind,)))
        more = f"more-{self._serial}"
        if rest:
            label = f"show more ({len(rest.encode('utf-8', 'replace')) // 1024 + 1} KiB)"
            parts += [(" \u2026 ", (line.kind,)), (label, ("more", more))]
        self._insert_parts(index, parts)  # one Tcl call for the line's pieces
        if rest:
            text.tag_bind(more, "<Button-1>", self._more_handler(more, line.kind, rest))
        if line.kind == "own" and line.msg_id is not None:
            state_mark = f"st-{line.msg_id}"
            text.mark_set(state_mark, "end-1c" if at_end else index)
            text.mark_gravity(state_mark, "left")
            self._insert_state(line)
        if at_end:
            self._open_line = True
        else:
            text.insert(index, "\n")

    def _insert_parts(self, index: str, parts: list[tuple[str, tuple[str, ...]]]) -> None:
        flat: list[Any] = []
        for content, tags in parts:
            flat += [content, tags]
        try:
            self.text.insert(index, *flat)
        except tk.TclError:  # a character this Tcl cannot take: piece by piece, made safe
            for content, tags in parts:
                self._insert(index, content, tags)

    def _drop_day_separator(self, line: Line) -> None:
        day = self._day_marks.pop(id(line), None)
        if day is not None:
            self.text.delete(day, self._marks[id(line)])
            self.text.mark_unset(day)

    def _rejoin(self, before: Line | None, first: Line, anchor: str) -> None:
        """`first`, at `anchor` (with right gravity), now follows `before`
        (lines loaded above it, or None: it is the first shown): its day
        separator if the day changed, and its time and name shown unless
        it continues `before`'s group."""
        text = self.text
        if new_day(before, first) and id(first) not in self._day_marks:
            self._serial += 1
            day = self._day_marks[id(first)] = f"ds{self._serial}"
            text.mark_set(day, anchor)
            text.mark_gravity(day, "left")
            self._insert(anchor, day_label(first.stamp) + "\n", ("day",))
        end = f"{anchor} lineend"
        who = text.tag_nextrange("who", anchor, end)
        if continues(before, first):
            for tag in ("stamp", "who"):
                found = text.tag_nextrange(tag, anchor, end)
                if found:
                    text.tag_add("hidden", *found)
            if who:
                text.tag_add("cont", who[1], end)
        else:
            text.tag_remove("hidden", anchor, end)
            text.tag_remove("cont", anchor, end)
            stamp = text.tag_nextrange("stamp", anchor, end)
            if stamp:
                text.tag_add("first", *stamp)

    def line_at(self, index: str) -> Line | None:
        """The line shown at `index` (e.g. `@x,y` under the pointer), if any."""
        text = self.text
        try:
            mark: str | None = text.index(index)
        except tk.TclError:
            return None
        while mark is not None:
            mark = text.mark_previous(mark)
            if mark is not None and mark.startswith("ds"):
                return None  # a day separator
            if mark is not None and mark in self._mark_lines:
                return self._mark_lines[mark]
        return None

    def _more_handler(self, tag: str, kind: str, rest: str) -> Callable[[Any], None]:
        def expand(_event: Any) -> None:
            ranges = self.text.tag_ranges(tag)
            if not ranges:
                return
            self.text.configure(state="normal")
            start = self.text.index(f"{ranges[0]} -3c")  # the " … " before the link
            self.text.delete(start, ranges[-1])
            self._insert(
                start, display_order(rest) if kind not in ("system", "error") else rest, (kind,)
            )
            self.text.configure(state="disabled")

        return expand

    def _insert(self, index: str, content: str, tags: tuple[str, ...]) -> None:
        try:
            self.text.insert(index, content, tags)
        except tk.TclError:
            self.text.insert(index, tk_safe(content).encode("ascii", "replace").decode(), tags)

    def _insert_state(self, line: Line) -> None:
        tag = f"sttext-{line.msg_id}"
        mark = f"st-{line.msg_id}"
        label = self.state_label(line) or STATE_LABELS.get(line.state or "", line.state or "")
        if line.state == MessageState.FAILED:
            reason = f" ({failure_reason(line.reason, line.detail)})" if line.reason else ""
            self.text.insert(mark, f"  {label}{reason} ", ("failed", tag))
            retry_tag = f"retry-{line.msg_id}"
            self.text.insert(f"{tag}.last", "Retry", ("retry", tag, retry_tag))
            self.text.tag_bind(retry_tag, "<Button-1>", lambda e: self.on_retry(line))
        else:
            if line.state == MessageState.SENDING and line.awaits_account:
                label += (" (no account of that name yet: kept, and sent when it registers; "
                          "Account > Cancel unsent messages drops it)")  # fmt: skip
            elif line.state == MessageState.SENDING and line.slow:
                label += " (no answer from the server yet; kept and sent again)"
            self.text.insert(mark, f"  {label}", ("state", tag))

    def render_state(self, line: Line) -> None:
        tag = f"sttext-{line.msg_id}"
        text = self.text
        # The reason and Retry of a failure may wrap the last line below the
        # view: kept in view if the view was at the end (asked of a failure
        # only: a yview lays the text out, too dear for every receipt).
        follow = line.state == MessageState.FAILED and self.at_latest and self.at_bottom()
        text.configure(state="normal")
        ranges = text.tag_ranges(tag)
        if ranges:
            text.delete(ranges[0], ranges[-1])
        if f"st-{line.msg_id}" in text.mark_names():
            self._insert_state(line)
        text.configure(state="disabled")
        if follow:
            text.see("end")
            self._bottom_cache = None

    def see_line(self, line: Line) -> str | None:
        """Scroll to `line`; its start index, or None if it is not shown."""
        mark = self._marks.get(id(line))
        if mark is None:
            return None
        self.see(mark)
        return self.text.index(mark)

    def content(self) -> str:
        return self.text.get("1.0", "end-1c")
