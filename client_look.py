"""The window's look, on the standard library alone: one ttk style on the
`clam` theme (palette, spacing, fonts, an accent colour for the one primary
action of each view), round coloured initials drawn on a Canvas, unread
badges, placeholders inside entry fields, a tooltip, and the contact list
as a Canvas whose rows carry those initials and badges.

Split from `client_window.py` so the window keeps to behaviour: it calls
`apply_style` once per Tk application and builds with the names here
(`Accent.TButton`, `Card.TFrame`, `PALETTE`...). What people compare us with
and what was taken from it is in /docs/screenshots (README, "The window").

`ContactCanvas` answers the part of `ttk.Treeview`'s interface a flat list
uses (insert, move, item, selection, see, yview, `<<TreeviewSelect>>`), so
a list written for a Treeview takes it unchanged. It draws only the rows in
view: 1,000 contacts cost what 12 do.
"""

from __future__ import annotations

import datetime
import re
import time
import tkinter as tk
import tkinter.font as tkfont
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from tkinter import ttk
from typing import Any, Literal, Protocol

from protocol import name_key


@dataclass(frozen=True)
class Palette:
    """Colours of the light theme (GNOME's palette: readable on any screen,
    the accent 4.5:1 against white, WCAG AA)."""

    window: str = "#f6f5f4"  # the background of every view
    surface: str = "#ffffff"  # cards, lists, the transcript
    sidebar: str = "#ebeae8"  # the contact pane, the status bar
    border: str = "#d3cfcb"
    text: str = "#1f2328"
    muted: str = "#6b6f76"
    accent: str = "#1c71d8"  # the one primary action per view
    accent_active: str = "#1a5fb4"
    accent_disabled: str = "#9dbde9"
    on_accent: str = "#ffffff"
    selection: str = "#d6e6fb"  # the selected contact, selected text
    error: str = "#c01c28"
    ok: str = "#26a269"
    warn: str = "#c88800"
    idle: str = "#9a9996"  # connecting, offline
    own: str = "#1a5fb4"  # our name in the transcript
    peer: str = "#26a269"
    banner: str = "#fff3cd"
    banner_text: str = "#664d03"
    found: str = "#ffe082"


PALETTE = Palette()

#: Initials backgrounds: saturated enough for white letters (each >= 4.5:1).
AVATAR_COLOURS = (
    "#1c71d8", "#c01c28", "#26a269", "#9141ac", "#c64600", "#1a7f8e",
    "#865e3c", "#e01b24", "#613583", "#3d6b00",
)  # fmt: skip

PAD = 8  # the grid's unit: paddings are PAD or PAD // 2
FONT_SIZE = 10  # points; the transcript is one larger


@dataclass(frozen=True)
class Fonts:
    """Named Tk fonts (one set per Tk application), from the default family."""

    body: str = "ChatBody"  # transcript, composer
    bold: str = "ChatBold"  # names
    small: str = "ChatSmall"  # times, states, hints
    heading: str = "ChatHeading"  # the conversation's name
    title: str = "ChatTitle"  # the login card's title


FONTS = Fonts()


def _named_fonts(root: tk.Misc) -> None:
    family = tkfont.nametofont("TkDefaultFont", root).actual("family")
    specs: dict[str, tuple[int, Literal["normal", "bold"]]] = {
        FONTS.body: (FONT_SIZE + 1, "normal"),
        FONTS.bold: (FONT_SIZE + 1, "bold"),
        FONTS.small: (FONT_SIZE - 1, "normal"),
        FONTS.heading: (FONT_SIZE + 3, "bold"),
        FONTS.title: (FONT_SIZE + 8, "bold"),
    }
    existing = set(tkfont.names(root))
    for name, (size, weight) in specs.items():
        if name not in existing:  # not tkfont.Font: it deletes the font when collected
            root.tk.call("font", "create", name, "-family", family, "-size", size,
                         "-weight", weight)  # fmt: skip
    tkfont.nametofont("TkDefaultFont", root).configure(size=FONT_SIZE)
    tkfont.nametofont("TkTextFont", root).configure(size=FONT_SIZE)


def apply_style(root: tk.Misc) -> None:
    """The one style of the application (idempotent: each window calls it)."""
    p = PALETTE
    style = ttk.Style(root)
    if "clam" in style.theme_names():
        style.theme_use("clam")  # the only built-in theme that takes colours everywhere
    _named_fonts(root)
    style.configure(".", background=p.window, foreground=p.text, bordercolor=p.border,
                    lightcolor=p.window, darkcolor=p.border, troughcolor=p.sidebar,
                    selectbackground=p.selection, selectforeground=p.text,
                    focuscolor=p.accent, font="TkDefaultFont")  # fmt: skip
    style.configure("TFrame", background=p.window)
    style.configure("Card.TFrame", background=p.surface, relief="solid", borderwidth=1)
    style.configure("Sidebar.TFrame", background=p.sidebar)
    style.configure("Status.TFrame", background=p.sidebar)
    style.configure("TLabel", background=p.window, foreground=p.text)
    style.configure("Muted.TLabel", foreground=p.muted)
    style.configure("Error.TLabel", foreground=p.error)
    style.configure("Heading.TLabel", font=FONTS.heading)
    style.configure("Banner.TLabel", background=p.banner, foreground=p.banner_text,
                    padding=(PAD, PAD // 2 + 2))  # fmt: skip
    style.configure("Card.TLabel", background=p.surface)
    style.configure("CardTitle.TLabel", background=p.surface, font=FONTS.title)
    style.configure("CardMuted.TLabel", background=p.surface, foreground=p.muted)
    style.configure("CardError.TLabel", background=p.surface, foreground=p.error)
    style.configure("Sidebar.TLabel", background=p.sidebar, foreground=p.muted, font=FONTS.small)
    style.configure("Status.TLabel", background=p.sidebar, foreground=p.muted, font=FONTS.small)
    style.configure("StatusLink.TLabel", background=p.sidebar, foreground=p.text,
                    font=FONTS.small)  # fmt: skip
    style.configure("Placeholder.TLabel", background=p.surface, foreground=p.idle)
    style.configure("TButton", padding=(PAD + 2, PAD // 2), background=p.surface,
                    lightcolor=p.surface, darkcolor=p.border, bordercolor=p.border)  # fmt: skip
    style.map("TButton", background=[("pressed", p.sidebar), ("active", p.window)],
              lightcolor=[("active", p.window)])  # fmt: skip
    style.configure("Accent.TButton", background=p.accent, foreground=p.on_accent,
                    lightcolor=p.accent, darkcolor=p.accent_active,
                    bordercolor=p.accent_active, font=FONTS.bold)  # fmt: skip
    style.map("Accent.TButton",
              background=[("disabled", p.accent_disabled), ("pressed", p.accent_active),
                          ("active", p.accent_active)],
              lightcolor=[("disabled", p.accent_disabled), ("active", p.accent_active)],
              darkcolor=[("disabled", p.accent_disabled)],
              bordercolor=[("disabled", p.accent_disabled)],
              foreground=[("disabled", p.on_accent)])  # fmt: skip
    style.configure("Sidebar.TButton", background=p.sidebar, lightcolor=p.sidebar)
    style.configure("TEntry", padding=(PAD // 2 + 2, PAD // 2), fieldbackground=p.surface,
                    bordercolor=p.border, lightcolor=p.surface, darkcolor=p.surface)  # fmt: skip
    style.map("TEntry", bordercolor=[("focus", p.accent)], lightcolor=[("focus", p.accent)])
    style.configure("TCheckbutton", background=p.sidebar, foreground=p.text, font=FONTS.small,
                    indicatorbackground=p.surface)  # fmt: skip
    style.map("TCheckbutton", background=[("active", p.sidebar)])
    style.configure("Vertical.TScrollbar", background=p.window, troughcolor=p.surface,
                    bordercolor=p.surface, arrowcolor=p.muted,
                    lightcolor=p.window, darkcolor=p.border)  # fmt: skip


def style_text(widget: tk.Text, *, composer: bool = False) -> None:
    """A `tk.Text` (not ttk) in the palette: the transcript, the composer."""
    p = PALETTE
    widget.configure(background=p.surface, foreground=p.text, insertbackground=p.text,
                     selectbackground=p.selection, selectforeground=p.text,
                     inactiveselectbackground=p.selection, relief="flat", borderwidth=0,
                     highlightthickness=1, highlightbackground=p.border,
                     highlightcolor=p.accent if composer else p.border,
                     font=FONTS.body)  # fmt: skip


#: Messages from one sender less than this far apart form one group: the
#: name and time are shown once, at its start (the time of each on hover).
GROUP_GAP_S = 5 * 60


class Stamped(Protocol):
    """What grouping needs of a transcript line."""

    @property
    def kind(self) -> str: ...  # "own", "peer" or "system"
    @property
    def who(self) -> str: ...
    @property
    def stamp(self) -> float: ...


def day_number(stamp: float) -> int:
    """The local calendar day of `stamp` (days since year 1)."""
    return datetime.date.fromtimestamp(stamp).toordinal()


def day_label(stamp: float, now: float | None = None) -> str:
    """A day separator's words: Today, Yesterday, a weekday within the
    week, `Mon 30 Nov` this year, `30 Nov 2025` before."""
    days = day_number(time.time() if now is None else now) - day_number(stamp)
    when = time.localtime(stamp)
    if days == 0:
        return "Today"
    if days == 1:
        return "Yesterday"
    if 1 < days < 7:
        return time.strftime("%A", when)
    this_year = time.localtime(time.time() if now is None else now).tm_year
    if when.tm_year == this_year:
        return f"{time.strftime('%a', when)} {when.tm_mday} {time.strftime('%b', when)}"
    return f"{when.tm_mday} {time.strftime('%b', when)} {when.tm_year}"


def new_day(before: Stamped | None, line: Stamped) -> bool:
    """Whether a day separator goes above `line` (shown after `before`)."""
    return before is None or day_number(before.stamp) != day_number(line.stamp)


def continues(before: Stamped | None, line: Stamped) -> bool:
    """Whether `line` joins the group of `before`: same sender, same day,
    less than GROUP_GAP_S later (system and error lines never group)."""
    return (
        before is not None
        and line.kind not in ("system", "error")
        and before.kind == line.kind
        and before.who == line.who
        and 0 <= line.stamp - before.stamp < GROUP_GAP_S
        and not new_day(before, line)
    )


def full_time(stamp: float) -> str:
    """A moment in full, for hovers: `Sat 5 Dec 2026, 15:20:01`."""
    t = time.localtime(stamp)
    return f"{time.strftime('%a', t)} {t.tm_mday} {time.strftime('%b %Y, %H:%M:%S', t)}"


# --- initials and badges --------------------------------------------------------------


def initials(name: str) -> str:
    """One or two letters for a round avatar: `alice` A, `mary-jane` MJ,
    `j.r.r` JR; a group `#team` (shown `#team (3)`) #T. A character Tk 8.6
    cannot draw (outside the BMP) is `?`."""
    if name.startswith("#"):
        letters = "#" + (name[1:2] or "?")
        return "".join(ch if ord(ch) <= 0xFFFF else "?" for ch in letters.upper())
    parts = [part for part in re.split(r"[-_.\s]+", name) if part]
    letters = (parts[0][0] + parts[1][0]) if len(parts) >= 2 else (name[:1] or "?")
    return "".join(ch if ord(ch) <= 0xFFFF else "?" for ch in letters.upper())


def avatar_colour(name: str) -> str:
    """The same colour for the same person everywhere (by name key, so `Alice`
    and `alice` match), different for most pairs of people."""
    return AVATAR_COLOURS[zlib.crc32(name_key(name).encode("utf-8")) % len(AVATAR_COLOURS)]


def draw_avatar(
    canvas: tk.Canvas, x: float, y: float, size: int, name: str, *, tags: Any = (),
    key: str | None = None,
) -> None:  # fmt: skip
    """Round coloured initials with their top left at (x, y); the colour is
    `key`'s when given (a row labelled `#team (3)` is still `#team`)."""
    fill = avatar_colour(key if key is not None else name)
    canvas.create_oval(x, y, x + size, y + size, fill=fill, outline="", tags=tags)
    font = (tkfont.nametofont(FONTS.bold, canvas).actual("family"), -int(size * 0.42), "bold")
    canvas.create_text(x + size / 2, y + size / 2 + 0.5, text=initials(name), fill="#ffffff",
                       font=font, tags=tags)  # fmt: skip


def draw_presence(
    canvas: tk.Canvas, x: float, y: float, online: bool | None, *, ring: str, tags: Any = ()
) -> None:
    """A presence dot centred at (x, y) with a ring in the background colour."""
    if online is None:
        return
    fill = PALETTE.ok if online else PALETTE.idle
    canvas.create_oval(x - 6, y - 6, x + 6, y + 6, fill=ring, outline="", tags=tags)
    canvas.create_oval(x - 4, y - 4, x + 4, y + 4, fill=fill, outline="", tags=tags)


def draw_badge(canvas: tk.Canvas, right: float, cy: float, count: int, *, tags: Any = ()) -> None:
    """An unread count as a pill whose right edge is at `right`."""
    text = "99+" if count > 99 else str(count)
    font = tkfont.nametofont(FONTS.small, canvas)
    height = 18
    width = max(height, font.measure(text) + 12)
    left, top, bottom = right - width, cy - height / 2, cy + height / 2
    fill = PALETTE.accent
    canvas.create_oval(left, top, left + height, bottom, fill=fill, outline="", tags=tags)
    canvas.create_oval(right - height, top, right, bottom, fill=fill, outline="", tags=tags)
    canvas.create_rectangle(left + height / 2, top, right - height / 2, bottom, fill=fill,
                            outline="", tags=tags)  # fmt: skip
    canvas.create_text((left + right) / 2, cy, text=text, fill=PALETTE.on_accent,
                       font=(font.actual("family"), FONT_SIZE - 1, "bold"), tags=tags)  # fmt: skip


class Avatar(tk.Canvas):
    """Round initials as a widget (the conversation's header)."""

    def __init__(self, master: tk.Misc, size: int = 32, background: str = PALETTE.window) -> None:
        super().__init__(master, width=size + 2, height=size + 2, highlightthickness=0,
                         borderwidth=0, background=background)  # fmt: skip
        self.diameter = size
        self.name = ""

    def show(self, name: str, online: bool | None = None) -> None:
        self.name = name
        self.delete("all")
        if name:
            draw_avatar(self, 1, 1, self.diameter, name)
            if name.startswith("#"):
                return  # a group has no presence (audit14 A10: the last contact's dot stayed)
            draw_presence(self, self.diameter - 3, self.diameter - 3, online,
                          ring=str(self.cget("background")))  # fmt: skip


# --- entries with placeholders, tooltips ------------------------------------------------


def add_placeholder(entry: ttk.Entry, variable: tk.StringVar, text: str) -> ttk.Label:
    """Grey `text` inside `entry` while it is empty and not focused (the
    field's own text is never touched: `variable` holds only what was typed).
    A click on the placeholder focuses the entry."""
    label = ttk.Label(entry, text=text, style="Placeholder.TLabel", cursor="xterm")

    def update(*_: object) -> None:
        try:
            focused = entry.focus_get() is entry
        except (KeyError, tk.TclError):  # focus in a menu or another application
            focused = False
        if variable.get() or focused:
            label.place_forget()
        else:
            label.place(x=PAD - 1, rely=0.5, anchor="w")

    label.bind("<Button-1>", lambda _e: entry.focus_set())
    variable.trace_add("write", update)
    entry.bind("<FocusIn>", update, add="+")
    entry.bind("<FocusOut>", update, add="+")
    entry.after_idle(update)
    return label


def clip_text(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters and "…" if it is longer."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "\u2026"


#: Past this many names a list shown in one label or line names the first
#: ones and says how many more ("a, b and 381 more"): a group has up to
#: 1,000 members, and one label naming them all was ~45,000 px wide, past
#: what X makes a pixmap of: the window died at the hover (audit7 N9).
NAMES_SHOWN = 20


def name_list(names: Sequence[str], limit: int = NAMES_SHOWN) -> str:
    """`names` joined with commas; past `limit` of them, the first `limit`
    and "and N more"."""
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


class Tooltip:
    """A small borderless window near the pointer, shown after a short
    hover; `show(text, x_root, y_root)` / `hide()` are the whole interface.

    Whatever the text, the tooltip fits on the screen: it wraps at `WRAP`
    pixels (or the screen's width, if narrower), keeps at most `MAX_CHARS`
    of the text and, if it is still taller than the screen, less; and it is
    placed so that none of it is off the screen. A label one line of a
    thousand names wide made X refuse its pixmap, which ends the process
    (audit7 N9)."""

    DELAY_MS = 350
    WRAP = 420  # pixels: about 60 characters of the tooltip's font
    MAX_CHARS = 2000
    OFFSET = (14, 18)  # from the pointer, so the pointer does not cover it

    def __init__(self, master: tk.Misc) -> None:
        self.master = master
        self.window: tk.Toplevel | None = None
        self.label: tk.Label | None = None
        self._after: str | None = None
        self.text = ""

    def schedule(self, text: str, x_root: int, y_root: int) -> None:
        """Show `text` after DELAY_MS unless something else comes first."""
        if text == self.text and self.window is not None:
            return
        self.cancel()
        self._after = self.master.after(self.DELAY_MS, lambda: self.show(text, x_root, y_root))

    def show(self, text: str, x_root: int, y_root: int) -> None:
        self._after = None
        if self.window is None:
            self.window = tk.Toplevel(self.master)
            self.window.wm_overrideredirect(True)
            self.label = tk.Label(self.window, justify="left", background=PALETTE.text,
                                  foreground="#ffffff", font=FONTS.small, padx=PAD,
                                  pady=PAD // 2)  # fmt: skip
            self.label.pack()
        assert self.label is not None
        self.text = text
        screen_w = self.window.winfo_screenwidth()
        screen_h = self.window.winfo_screenheight()
        # The label's padding and border are outside the wrap length.
        wrap = max(40, min(self.WRAP, screen_w - 4 * PAD))
        shown = clip_text(text, self.MAX_CHARS)
        # A label asks for its size as it is configured: no idle pass needed
        # (one here would map the new window where it stands, before it moves).
        self.label.configure(text=shown, wraplength=wrap)
        while self.label.winfo_reqheight() > screen_h and len(shown) > 1:
            shown = clip_text(shown, len(shown) // 2)  # still too tall: less of it
            self.label.configure(text=shown)
        width, height = self.label.winfo_reqwidth(), self.label.winfo_reqheight()
        x = min(x_root + self.OFFSET[0], screen_w - width)
        y = y_root + self.OFFSET[1]
        if y + height > screen_h:  # no room below the pointer: above it
            y = y_root - height - self.OFFSET[1] // 2
        self.window.wm_geometry(f"+{max(0, x)}+{max(0, min(y, screen_h - height))}")
        self.window.deiconify()
        self.window.lift()

    def cancel(self) -> None:
        if self._after is not None:
            self.master.after_cancel(self._after)
            self._after = None

    def hide(self) -> None:
        self.cancel()
        self.text = ""
        if self.window is not None:
            self.window.withdraw()

    @property
    def shown(self) -> str:
        """The text on the screen now ("" when hidden)."""
        if self.window is None or not self.window.winfo_ismapped():
            return ""
        return self.text

    def destroy(self) -> None:
        self.cancel()
        if self.window is not None:
            self.window.destroy()
            self.window = None


# --- the contact list -----------------------------------------------------------------


class ContactCanvas(tk.Canvas):
    """A flat list of contacts drawn on a Canvas: round initials with a
    presence dot, the name, its status, an unread badge. Shaped like the
    part of `ttk.Treeview` a flat list uses: rows have an `iid`, `text` (the
    name) and `values` (status text, unread count as text); `selection_set`
    fires `<<TreeviewSelect>>`. Only the rows in view are drawn."""

    ROW = 44
    AVATAR = 30

    def __init__(
        self, master: tk.Misc, *, height: int = 12, width: int = 200, **options: Any
    ) -> None:
        super().__init__(master, height=height * self.ROW, width=width, highlightthickness=0,
                         borderwidth=0, background=PALETTE.sidebar, takefocus=True,
                         yscrollincrement=self.ROW, **options)  # fmt: skip
        self._order: list[str] = []
        self._rows: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._selected: str | None = None
        self._draw_id: str | None = None
        self.bind("<Configure>", lambda _e: self._schedule())
        self.bind("<Button-1>", self._on_click)
        self.bind("<Button-4>", lambda _e: self._scroll(-3))
        self.bind("<Button-5>", lambda _e: self._scroll(3))
        self.bind("<MouseWheel>", lambda e: self._scroll(-1 if e.delta > 0 else 1))
        self.bind("<Up>", lambda _e: self._step(-1))
        self.bind("<Down>", lambda _e: self._step(1))

    # --- the Treeview part ----------------------------------------------------------

    def insert(  # type: ignore[override]
        self, parent: str, index: int | str, iid: str | None = None, **kw: Any
    ) -> str:
        assert parent == "" and iid is not None, "a flat list of named rows"
        if iid in self._rows:
            raise tk.TclError(f"Item {iid} already exists")
        self._rows[iid] = (str(kw.get("text", "")), tuple(str(v) for v in kw.get("values", ())))
        position = len(self._order) if index == "end" else int(index)
        self._order.insert(position, iid)
        self._schedule()
        return iid

    def delete(self, *items: Any) -> None:
        """Remove rows (the Canvas's own items are the drawing's business)."""
        gone = {str(i) for i in items}
        if not gone:
            return
        self._order = [iid for iid in self._order if iid not in gone]
        for iid in gone:
            self._rows.pop(iid, None)
        if self._selected in gone:
            self._selected = None
        self._schedule()

    def get_children(self, item: str = "") -> tuple[str, ...]:
        return tuple(self._order)

    def exists(self, iid: str) -> bool:
        return iid in self._rows

    def index(self, iid: str) -> int:
        return self._order.index(iid)

    def prev(self, iid: str) -> str:
        """The row above `iid` ("" for the first)."""
        index = self._order.index(iid)
        return self._order[index - 1] if index > 0 else ""

    def next(self, iid: str) -> str:
        """The row below `iid` ("" for the last)."""
        index = self._order.index(iid)
        return self._order[index + 1] if index + 1 < len(self._order) else ""

    def move(self, iid: str, parent: str, index: int | str) -> None:
        self._order.remove(iid)
        self._order.insert(len(self._order) if index == "end" else int(index), iid)
        self._schedule()

    def item(self, iid: str, option: str | None = None, **kw: Any) -> Any:
        text, values = self._rows[iid]
        if "text" in kw:
            text = str(kw["text"])
        if "values" in kw:
            values = tuple(str(v) for v in kw["values"])
        if kw:
            self._rows[iid] = (text, values)
            self._schedule()
            return None
        if option == "text":
            return text
        if option == "values":
            return values
        return {"text": text, "values": values}

    def selection(self) -> tuple[str, ...]:
        return (self._selected,) if self._selected is not None else ()

    def selection_set(self, *items: Any) -> None:
        iid = str(items[0]) if items else None
        if iid is not None and iid not in self._rows:
            raise tk.TclError(f"Item {iid} not found")
        if iid == self._selected:
            return
        self._selected = iid
        self._schedule()
        self.event_generate("<<TreeviewSelect>>", when="tail")

    def see(self, iid: str) -> None:
        if iid not in self._rows:
            return
        top = self._order.index(iid) * self.ROW
        total = max(1, len(self._order) * self.ROW)
        first, last = (float(v) for v in self.yview())
        view = (last - first) * total
        if top < first * total:
            self.yview_moveto(top / total)
        elif top + self.ROW > first * total + view:
            self.yview_moveto(max(0.0, (top + self.ROW - view) / total))

    def yview(self, *args: Any) -> Any:
        result = super().yview(*args)
        if args:
            self._draw()
        return result

    def yview_moveto(self, fraction: float) -> None:
        super().yview_moveto(fraction)
        self._draw()

    # --- drawing ------------------------------------------------------------------

    def row_at(self, y: int) -> str | None:
        """The row under the window's y coordinate `y`, if any."""
        index = int(self.canvasy(y) // self.ROW)
        return self._order[index] if 0 <= index < len(self._order) else None

    def _schedule(self) -> None:
        if self._draw_id is None:
            self._draw_id = self.after_idle(self._draw)

    def _draw(self) -> None:
        if self._draw_id is not None:
            self.after_cancel(self._draw_id)
            self._draw_id = None
        width = max(self.winfo_width(), 120)
        total = len(self._order) * self.ROW
        super().configure(scrollregion=(0, 0, width, max(total, self.winfo_height())))
        super().delete("all")
        top = int(self.canvasy(0))
        first = max(0, top // self.ROW)
        last = min(len(self._order), (top + self.winfo_height()) // self.ROW + 1)
        for position in range(first, last):
            self._draw_row(position, width)

    def _draw_row(self, position: int, width: int) -> None:
        p = PALETTE
        iid = self._order[position]
        text, values = self._rows[iid]
        status = values[0] if values else ""
        unread = int(values[1]) if len(values) > 1 and values[1].isdigit() else 0
        y = position * self.ROW
        mid = y + self.ROW / 2
        selected = iid == self._selected
        ring = p.selection if selected else p.sidebar
        if selected:
            super().create_rectangle(4, y + 2, width - 4, y + self.ROW - 2, fill=p.selection,
                                     outline="")  # fmt: skip
        x = PAD + 2
        draw_avatar(self, x, mid - self.AVATAR / 2, self.AVATAR, text, key=iid)
        online = True if "online" in status and "offline" not in status else None
        if "offline" in status:
            online = False
        draw_presence(self, x + self.AVATAR - 3, mid + self.AVATAR / 2 - 3, online, ring=ring)
        name_x = x + self.AVATAR + PAD + 2
        right = width - PAD - 2
        if unread:
            draw_badge(self, right, mid, unread)
            right -= 30
        font = FONTS.bold if unread else "TkDefaultFont"
        shown = self._fit(text, font, right - name_x)
        detail = status.replace("\u25cf", "").strip()
        super().create_text(name_x, mid - (7 if detail else 0), text=shown, anchor="w",
                            fill=p.text, font=font)  # fmt: skip
        if detail:
            super().create_text(name_x, mid + 9, text=self._fit(detail, FONTS.small, right -
                                name_x), anchor="w", fill=p.muted, font=FONTS.small)  # fmt: skip

    def _fit(self, text: str, font: str, room: float) -> str:
        """`text`, cut with an ellipsis to fit `room` pixels."""
        measure = tkfont.nametofont(font, self).measure
        safe = "".join(ch if ord(ch) <= 0xFFFF else "\ufffd" for ch in text)
        if measure(safe) <= room:
            return safe
        while safe and measure(safe + "\u2026") > room:
            safe = safe[:-1]
        return safe + "\u2026"

    # --- input --------------------------------------------------------------------

    def _on_click(self, event: Any) -> None:
        self.focus_set()
        iid = self.row_at(event.y)
        if iid is not None:
            self.selection_set(iid)

    def _scroll(self, units: int) -> None:
        if len(self._order) * self.ROW > self.winfo_height():
            self.yview_scroll(units, "units")
            self._draw()

    def _step(self, delta: int) -> str:
        if not self._order:
            return "break"
        index = self._order.index(self._selected) if self._selected in self._rows else -1
        target = self._order[max(0, min(len(self._order) - 1, index + delta))]
        self.selection_set(target)
        self.see(target)
        return "break"
