"""The Tk window of the chat client (split from `chat_client.py` by size).

It imports nothing of `chat_client`: the window is given the class that
makes its sessions (`session_factory`, `chat_client.ChatSession` in the
app), and its events come from `client_core`, so the client's head can
import the window without a cycle.

Tk is touched only on the main thread: the session's network thread puts
events on a `queue.Queue`, and `ChatWindow._poll` drains a bounded batch of
them every `POLL_MS` with `after()`. Closing the window cancels that timer
and logs out.

Two views share one toplevel: the login view (server, username, connect
to) and the chat view (contacts on the left, one conversation at a time on
the right: transcript, typing line, composer). The contact list
(`client_contacts.ContactList`) and the transcript
(`client_transcript.Transcript`) are widgets of their own modules.

The look (one ttk style, the login card, round initials, badges, groups,
the menu bar) is `client_look.py`'s; the status bar with the link's health
and its panel are `client_health.HealthBar`'s.

Typing anywhere in a logged-in window reaches the composer: a printable key
pressed on any widget that is not a text field (the transcript after a
click or a Retry, the contact list, a button) is put into the composer and
the composer takes the focus; when the window is activated and Tk would
give the focus to nothing (or to a field of the hidden login view), the
composer gets it.

Histories of any length: a conversation shows its last `client_store.PAGE`
lines; scrolling to the top (or the "load earlier messages" line) reads the
page before from the store; Find searches the whole stored history (FTS5)
and shows the page around a hit; a conversation not on screen keeps at most
`MAX_LINES` lines in memory (the rest stay in the store).
"""

from __future__ import annotations

import functools
import json
import os
import queue
import sys
import time
import tkinter as tk
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from tkinter import ttk
from typing import Any, Protocol

import client_groups_ui
from client_account_ui import add_account_menu, on_account_event
from client_contacts import ContactList
from client_core import (
    AccountDeleted,
    Cancelled,
    Disconnected,
    ErrorEvent,
    GroupChanged,
    GroupsListed,
    GroupUnchanged,
    LinkChanged,
    LinkStats,
    LoggedIn,
    MembersListed,
    MessageReceived,
    MessageState,
    PasswordChanged,
    PresenceChanged,
    RecipientsChanged,
    StatusChanged,
    TypingNotice,
    WhoList,
    normalize_peer,
)
from client_core import Event as SessionEvent
from client_health import HealthBar, describe
from client_look import (
    FONTS,
    PAD,
    PALETTE,
    Avatar,
    Tooltip,
    add_placeholder,
    apply_style,
    clip_text,
    full_time,
    name_list,
    style_text,
)
from client_store import (
    PAGE,
    ClientStore,
    HistoryLine,
    Timeline,
    goes_above,
    goes_before,
    read_around,
    read_contacts,
    read_history,
    row_of,
    search_history,
)
from client_transcript import Line, Transcript, find_in_text, move_down, tk_safe
from common import DEFAULT_PORT, __version__, config_dir, format_servers, parse_servers
from protocol import MAX_TEXT_BYTES, GroupAction, LocalProtocolError, name_key, normalize_name

CONTROL_MASK = 0x4  # X event state bits: a key with Control or Alt is a shortcut
ALT_MASK = 0x8
POLL_MS = 25  # how often the window drains the session's events
POLL_BATCH = 300  # events handled per tick at most ...
POLL_BUDGET_S = 0.015  # ... and for at most this long, so a burst never freezes the window
TYPING_SHOWN_S = 4.0  # how long "bob is typing..." stays after the last notice
TYPING_SEND_EVERY_S = 3.0
RATE_NOTE_EVERY_S = 60.0  # "sending too fast" is said at most this often
LIMIT_WARN_AT = 0.8  # show the size counter from this share of the limit on
HEADER_CHARS = 160  # a message shown in the header (no conversation open) at most
#: A conversation holding more lines than this in memory keeps its last
#: PAGE (the rest stay in the store and come back on scrolling up).
MAX_LINES = 2000
#: Our message still `sending` this long gets a note beside its state: the
#: first try and two retransmissions went unanswered (docs/RELIABILITY.md: the
#: initial RTO is 1 s, doubled after each timeout: tries at 0, 1 and 3 s).
#: The client only calls the link down after 30 s (its dead-peer rule).
SLOW_SEND_S = 3.0
# The smallest window in which every control stays visible and usable
# (tests/test_window_look.py checks each one at exactly this size).
MIN_SIZE = (420, 320)
RECONNECTED_TEXT = "Reconnected: the server answers again."
RECONNECTING_TEXT = (
    "Server not answering \u2014 reconnecting\u2026 "
    "(keep typing: messages are sent when it is back)"
)


# --- the session it drives ---------------------------------------------------


class Session(Protocol):
    """What the window uses of a session (`chat_client.ChatSession`), and
    `logout`, which whoever holds `window.session` may call. The window is
    given the class that makes them (`session_factory`), so it imports
    nothing of `chat_client` and the client's head can import it."""

    store: ClientStore | None

    def login(
        self, server: str, username: str, connect_to: str | None = None, *, password: str
    ) -> bool: ...
    def set_peer(self, name: str) -> bool: ...
    def send(self, text: str, to: str | None = None) -> str | None: ...
    def shown(self, message_id: int, *, wait: float = 0.0) -> bool: ...
    def who(self) -> None: ...
    def watch(self, name: str) -> None: ...
    def group(
        self, action: GroupAction, group: str = "", users: tuple[str, ...] | list[str] = ()
    ) -> bool: ...
    def typing(self, to: str) -> None: ...
    def logout(self, timeout: float = 10.0) -> None: ...
    def close(self, timeout: float = 10.0) -> None: ...
    def discard(self) -> None: ...
    def link_stats(self) -> LinkStats: ...
    def waiting_ids(self) -> frozenset[str]: ...
    def timeline(self, message_id: str) -> Timeline | None: ...


#: Makes a session that puts its events on `events=`, with the window's
#: `session_options` as further keyword arguments: `chat_client.ChatSession`.
SessionFactory = Callable[..., Session]


# --- settings -------------------------------------------------------------


@dataclass
class Settings:
    server: str = f"127.0.0.1:{DEFAULT_PORT}"
    username: str = ""
    geometry: str = "820x560"
    mute: bool = False
    typing_indicator: bool = True
    path: Path | None = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, path: Path | None = None) -> Settings:
        path = path or config_dir() / "settings.json"
        settings = cls(path=path)
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            return settings  # missing or damaged: start from the defaults
        if isinstance(data, dict):
            for key, default in asdict(cls()).items():
                if key != "path" and isinstance(data.get(key), type(default)):
                    setattr(settings, key, data[key])
        return settings

    def save(self) -> None:
        if self.path is None:
            return
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2), "utf-8")
            tmp.replace(self.path)
        except OSError:
            pass  # settings are a convenience; never fail the app for them


# --- conversations --------------------------------------------------------


@dataclass
class Conversation:
    name: str
    lines: list[Line] = field(default_factory=list)  # the newest, at most MAX_LINES
    unread: int = 0
    online: bool | None = None
    by_id: dict[str, Line] = field(default_factory=dict)  # our messages in `lines`
    received: set[str] = field(default_factory=set)  # their message ids
    has_earlier: bool = False  # the store holds lines before `lines`
    stale_notice: bool = False  # shows "stopped answering" / "shutting down" last
    # What was typed in the composer and not sent when another conversation
    # was opened: back in the composer when this one is opened again.
    draft: str = ""


# --- the window -------------------------------------------------------------


class ChatWindow:
    """A chat window on `master` (a Tk root or a Toplevel)."""

    def __init__(
        self,
        master: tk.Tk | tk.Toplevel,
        settings: Settings | None = None,
        *,
        session_factory: SessionFactory,
        session_options: dict[str, Any] | None = None,
        on_closed: Any = None,
    ) -> None:
        self.top = master
        self.settings = settings or Settings()
        self.session_factory = session_factory
        self.session_options = session_options or {}
        self.on_closed = on_closed
        self.session: Session | None = None
        self.events: queue.Queue[Any] = queue.Queue()
        self.username: str | None = None
        self.conversations: dict[str, Conversation] = {}
        self.current: Conversation | None = None
        self.focused = True
        self.history: list[str] = []
        self.connect_to: str | None = None
        self._poll_id: str | None = None
        self._typing_clear_id: str | None = None
        self._last_typing_sent = 0.0
        self._closed = False
        self.lag_samples: list[float] = []  # after() lateness, seconds (for tests/bench)
        self.busy_samples: list[float] = []  # time spent in each _poll, seconds
        self._batch_scroll = False
        self._who_asked = False
        self._logging_out = False  # File > Log out: back to the login view at the end
        self._expected_tick = 0.0
        # Our messages shown as `sending`: id -> (line, its conversation, since when).
        self._sending: dict[str, tuple[Line, Conversation, float]] = {}
        self._rate_noted = float("-inf")  # when "sending too fast" was last said
        self._next_slow_check = 0.0
        self._found: tuple[str, str] | None = None  # (needle, start index) of the shown hit
        self._logging_in: tuple[str, str] | None = None  # (server, username) typed

        master.title("Chat")
        master.geometry(self.settings.geometry)
        master.minsize(*MIN_SIZE)
        master.protocol("WM_DELETE_WINDOW", self.close)
        apply_style(master)  # client_look: palette, fonts, the accent button
        master.configure(background=PALETTE.window)
        self.tooltip = Tooltip(master)
        self.about: tk.Toplevel | None = None

        self._build_menu()
        self.login_frame = self._build_login()
        self.chat_frame = self._build_chat()
        self.account_menu = add_account_menu(self)  # client_account_ui: the account dialogs
        self._menu_logged_in(False)
        self.groups = client_groups_ui.GroupsUI(self, Line, tk_safe)  # client_groups_ui.py
        self.view.state_label = self.groups.state_label  # "✓✓ 2 of 3"
        self.login_frame.pack(fill="both", expand=True)
        master.bind("<FocusIn>", self._on_focus_in, add="+")
        master.bind("<FocusOut>", self._on_focus_out, add="+")
        master.bind("<KeyPress>", self._on_key_anywhere, add="+")
        master.bind("<Control-q>", lambda e: self.close())
        master.bind_class("TEntry", "<Control-a>", self._select_all_entry)
        self._expected_tick = time.monotonic() + POLL_MS / 1000
        self._poll_id = master.after(POLL_MS, self._poll)
        self.username_entry.focus_set()

    # --- building -------------------------------------------------------------

    def _build_menu(self) -> None:
        """File / Conversation / Help; the conversation's entries wait for a login."""
        bar = tk.Menu(self.top, tearoff=False)
        self.menu_file = tk.Menu(bar, tearoff=False)
        self.menu_file.add_command(label="Log out", command=self.log_out)
        self.menu_file.add_separator()
        self.menu_file.add_command(label="Quit", accelerator="Ctrl+Q", command=self.close)
        self.menu_conversation = tk.Menu(bar, tearoff=False)
        self.menu_conversation.add_command(label="New chat\u2026", command=self._focus_new_chat)
        self.menu_conversation.add_command(label="Find\u2026", accelerator="Ctrl+F",
                                           command=self.show_find)  # fmt: skip
        self.menu_conversation.add_command(label="Who is online", command=self._ask_who)
        self.menu_conversation.add_command(label="Connection health",
                                           command=lambda: self.health.toggle_panel())  # fmt: skip
        self.menu_conversation.add_separator()
        self.mute_var = tk.BooleanVar(value=self.settings.mute)
        self.typing_var = tk.BooleanVar(value=self.settings.typing_indicator)
        self.menu_conversation.add_checkbutton(label="Mute", variable=self.mute_var,
                                               command=self._save_options)  # fmt: skip
        self.menu_conversation.add_checkbutton(label="Typing indicator", variable=self.typing_var,
                                               command=self._save_options)  # fmt: skip
        self.menu_help = tk.Menu(bar, tearoff=False)
        self.menu_help.add_command(label="Keyboard shortcuts", command=self.show_shortcuts)
        self.menu_help.add_command(label="About", command=self.show_about)
        bar.add_cascade(label="File", menu=self.menu_file, underline=0)
        bar.add_cascade(label="Conversation", menu=self.menu_conversation, underline=0)
        bar.add_cascade(label="Help", menu=self.menu_help, underline=0)
        self.menu_bar = bar
        self.top.configure(menu=bar)
        self._menu_logged_in(False)

    def _menu_logged_in(self, logged_in: bool) -> None:
        """Entries that need a session are greyed out without one."""
        state = "normal" if logged_in else "disabled"
        self.menu_file.entryconfigure("Log out", state=state)
        for label in ("New chat\u2026", "Find\u2026", "Who is online", "Connection health"):
            self.menu_conversation.entryconfigure(label, state=state)
        menu = getattr(self, "account_menu", None)  # made after the menu bar
        if menu is not None:
            for index in range(int(menu.index("end") or 0) + 1):
                if menu.type(index) == "command":
                    menu.entryconfigure(index, state=state)

    def _build_login(self) -> ttk.Frame:
        """A centred card: a title, a one-line hint, a labelled field per
        line (the label beside it stays when the field has the focus or a
        value; the placeholder inside only gives an example), one primary
        button. Labels beside the fields, not above: the card keeps its
        height, so it fits the window's minimum size."""
        outer = ttk.Frame(self.top)
        card = ttk.Frame(outer, style="Card.TFrame", padding=(PAD * 3, PAD * 2))
        card.place(relx=0.5, rely=0.5, anchor="center")
        card.columnconfigure(1, weight=1)
        ttk.Label(card, text="Welcome", style="CardTitle.TLabel").grid(row=0, column=0,
                                                                       columnspan=2)  # fmt: skip
        self.login_hint = ttk.Label(card, text="Log in, or pick a new name to sign up",
                                    style="CardMuted.TLabel")  # fmt: skip
        self.login_hint.grid(row=1, column=0, columnspan=2, pady=(0, PAD))
        self.server_var = tk.StringVar(value=self.settings.server)
        self.username_var = tk.StringVar(value=self.settings.username)
        self.password_var = tk.StringVar()
        self.connect_var = tk.StringVar()
        rows = [
            ("Server", "e.g. 127.0.0.1:5555", self.server_var),
            ("Username", "e.g. alice", self.username_var),
            ("Password", "new name: choose one", self.password_var),
            ("Connect to", "optional, e.g. bob", self.connect_var),
        ]
        entries = []
        self.login_labels: list[ttk.Label] = []
        for i, (label, placeholder, var) in enumerate(rows, start=2):
            entry = ttk.Entry(card, textvariable=var, width=24, show="\u2022" if var is
                              self.password_var else "")  # fmt: skip
            name = ttk.Label(card, text=label, style="Card.TLabel", anchor="w")
            name.grid(row=i, column=0, sticky="w", padx=(0, PAD), pady=(0, PAD // 2 + 1))
            # A click on the label is a click in its field.
            name.bind("<Button-1>", functools.partial(self._focus_field, entry))
            entry.grid(row=i, column=1, sticky="ew", pady=(0, PAD // 2 + 1))
            entry.bind("<Return>", lambda e: self.submit_login())
            add_placeholder(entry, var, placeholder)
            entries.append(entry)
            self.login_labels.append(name)
        self.server_entry, self.username_entry, self.password_entry, self.connect_entry = entries
        # A pre-filled name is replaced when typed over, not typed into.
        self.username_entry.bind("<FocusIn>", self._select_all, add="+")
        self.login_button = ttk.Button(card, text="Login", style="Accent.TButton",
                                       command=self.submit_login)  # fmt: skip
        self.login_button.grid(row=6, column=0, columnspan=2, sticky="ew", pady=(PAD // 2, 2))
        self.login_note = ttk.Label(card, text="A new name is registered with this password.",
                                    style="CardMuted.TLabel", font=FONTS.small)  # fmt: skip
        self.login_note.grid(row=7, column=0, columnspan=2)
        self.login_error = ttk.Label(card, text="", style="CardError.TLabel", wraplength=280,
                                     justify="center")  # fmt: skip
        self.login_error.grid(row=8, column=0, columnspan=2)
        return outer

    @staticmethod
    def _focus_field(entry: ttk.Entry, _event: object = None) -> None:
        entry.focus_set()

    def _build_chat(self) -> ttk.Frame:
        # Packing order matters at the minimum size: what is packed first
        # keeps its room, so the buttons and the composer go in before the
        # lists and the transcript, which give way.
        frame = ttk.Frame(self.top)
        self.banner = ttk.Label(frame, text="", style="Banner.TLabel", anchor="w")
        self.health = HealthBar(frame, self._link_stats)
        self.health.pack(side="bottom", fill="x")
        panes = ttk.Frame(frame)
        panes.pack(fill="both", expand=True, side="bottom")
        panes.columnconfigure(1, weight=1)
        panes.rowconfigure(0, weight=1)
        self._banner_anchor = panes

        left = ttk.Frame(panes, style="Sidebar.TFrame", padding=(PAD, PAD, PAD, PAD))
        new = ttk.Frame(left, style="Sidebar.TFrame")
        new.pack(fill="x", side="top")
        self.new_chat_var = tk.StringVar()
        self.new_chat_entry = ttk.Entry(new, textvariable=self.new_chat_var, width=8)
        self.new_chat_entry.pack(side="left", fill="x", expand=True)
        self.new_chat_entry.bind("<Return>", lambda e: self._open_typed())
        add_placeholder(self.new_chat_entry, self.new_chat_var, "New chat with\u2026")
        self.new_chat_button = ttk.Button(new, text="+", width=2, style="Accent.TButton",
                                          command=self._open_typed)  # fmt: skip
        self.new_chat_button.pack(side="left", padx=(PAD // 2, 0))
        self.who_button = ttk.Button(left, text="Who is online", style="Sidebar.TButton",
                                     command=self._ask_who)  # fmt: skip
        self.who_button.pack(side="bottom", fill="x", pady=(PAD // 2, 0))
        self.contact_list = ContactList(left, self._on_contact_selected)
        self.contact_list.frame.pack(fill="both", expand=True, pady=(PAD // 2, 0))
        self.contacts = self.contact_list.tree
        left.grid(row=0, column=0, sticky="nsw")
        frame.bind("<Configure>", self._on_chat_resize)

        right = ttk.Frame(panes, padding=(PAD, PAD, PAD, PAD // 2))
        header = ttk.Frame(right)
        header.pack(fill="x", side="top")
        self.peer_avatar = Avatar(header, size=30)
        self.peer_avatar.pack(side="left", padx=(0, PAD))
        self.peer_label = ttk.Label(header, text="", style="Heading.TLabel")
        self.peer_label.pack(side="left")
        self.find_var = tk.StringVar()
        self.find_status = ttk.Label(header, text="", style="Muted.TLabel")
        self.find_entry = ttk.Entry(header, textvariable=self.find_var, width=14)
        self.find_label = ttk.Label(header, text="Find:")
        self.find_entry.bind("<Return>", lambda e: self.find_next())
        self.find_entry.bind("<Escape>", lambda e: self._hide_find())

        self.size_label = ttk.Label(right, text="", style="Muted.TLabel", anchor="e")
        self.size_label.pack(fill="x", side="bottom")
        composer_row = ttk.Frame(right)
        composer_row.pack(fill="x", side="bottom", pady=(PAD // 2, 0))
        self.send_button = ttk.Button(composer_row, text="Send", style="Accent.TButton",
                                      width=6, command=self.send_composed)  # fmt: skip
        self.send_button.pack(side="right", padx=(PAD // 2 + 2, 0), anchor="s")
        self.composer = tk.Text(composer_row, height=3, width=16, wrap="word", undo=True,
                                padx=PAD, pady=PAD // 2)  # fmt: skip
        style_text(self.composer, composer=True)
        self.composer.pack(side="left", fill="x", expand=True)
        self.typing_label = ttk.Label(right, text="", style="Muted.TLabel", font=FONTS.small)
        self.typing_label.pack(fill="x", side="bottom", pady=(2, 0))

        body = ttk.Frame(right)
        body.pack(fill="both", expand=True, pady=(PAD // 2, 0))
        self.view = Transcript(body, on_retry=self.retry, on_load_earlier=self.load_earlier,
                               on_back_to_latest=self._show_latest)  # fmt: skip
        self.transcript = self.view.text
        self.new_marker = self.view.new_marker
        self.transcript.bind("<Motion>", self._on_transcript_motion, add="+")
        self.transcript.bind("<Leave>", lambda _e: self.tooltip.hide(), add="+")
        # A click (on Retry, show more, a link) changes what is under the
        # pointer: a hover left standing covered the line it sent again.
        self.transcript.bind("<ButtonPress>", lambda _e: self.tooltip.hide(), add="+")
        self.composer.bind("<Return>", self._on_return)
        self.composer.bind("<Shift-Return>", self._on_shift_return)
        self.composer.bind("<Escape>", lambda e: self._clear_composer())
        self.composer.bind("<Up>", self._on_up)
        # Ctrl+A selects everything, as in other desktop programs (Tk's own
        # binding moves to the line's start; its select-all is Ctrl+/).
        self.composer.bind("<Control-a>", self._select_all_text)
        self.composer.bind("<KeyRelease>", self._on_composer_key)
        self.top.bind("<Control-f>", lambda e: self.show_find())
        right.grid(row=0, column=1, sticky="nsew")
        return frame

    # --- login ----------------------------------------------------------------

    def submit_login(self) -> None:
        """Check the login form and start the session; errors show inline."""
        if self.session is not None:
            return
        server = self.server_var.get().strip() or f"127.0.0.1:{DEFAULT_PORT}"
        try:
            # One server, or a cluster's nodes separated by commas: the
            # session moves to the next when the one in use stops answering.
            server = format_servers(parse_servers(server))
        except ValueError as exc:
            self.show_login_error(f"Server: {exc}")
            self.server_entry.focus_set()
            return
        try:
            username = normalize_name(self.username_var.get())
        except LocalProtocolError as exc:
            self.show_login_error(f"Username: {exc}")
            self.username_entry.focus_set()
            return
        password = self.password_var.get()
        if not password:
            self.show_login_error(
                "Password: type your password (a new name is registered with it)."
            )
            self.password_entry.focus_set()
            return
        connect = self.connect_var.get().strip()
        if connect:
            try:
                # A person, or a group (`#team`), as `--connect-to` takes in
                # the terminal (the window refused `#team` as a name).
                connect = normalize_peer(connect)
            except LocalProtocolError as exc:
                self.show_login_error(f"Connect to: {exc}")
                self.connect_entry.focus_set()
                return
        self.connect_to = connect or None
        # Saved as the last server and name only once the login works.
        self._logging_in = (server, username)
        self.show_login_error("")
        self.login_button.configure(state="disabled", text="Connecting\u2026")
        self.events = queue.Queue()
        self.session = self.session_factory(events=self.events, **self.session_options)
        self.session.login(server, username, self.connect_to, password=password)

    def show_login_error(self, text: str) -> None:
        self.login_error.configure(text=text)

    def _back_to_login(self, message: str) -> None:
        if self.session is not None:
            self.session.discard()
        self.session = None
        self.chat_frame.pack_forget()
        self.login_frame.pack(fill="both", expand=True)
        self.login_button.configure(state="normal", text="Login")
        self.show_login_error(message)
        self.username = None
        self._update_title()
        self.health.stop()
        self.tooltip.hide()
        self._menu_logged_in(False)

    # --- events -------------------------------------------------------------

    def _poll(self) -> None:
        now = time.monotonic()
        self.lag_samples.append(max(0.0, now - self._expected_tick))
        if len(self.lag_samples) > 10_000:
            del self.lag_samples[:5000]
        more = False
        self._batch_scroll = False
        self.view.new_batch()
        for _ in range(POLL_BATCH):
            if time.monotonic() - now > POLL_BUDGET_S:
                more = True
                break
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            try:
                self.handle_event(event)
            except tk.TclError:
                pass  # a widget went away while closing
        else:
            more = True
        try:
            if self._batch_scroll:
                self._trim_current()
                self._scroll_to_end()  # once per batch: `see` is the costly part
            if now >= self._next_slow_check:
                self._next_slow_check = now + 0.5
                self._mark_slow(now)
        except tk.TclError:
            pass  # closing
        self.busy_samples.append(time.monotonic() - now)
        if len(self.busy_samples) > 10_000:
            del self.busy_samples[:5000]
        if not self._closed:
            delay = 1 if more else POLL_MS
            self._expected_tick = time.monotonic() + delay / 1000
            self._poll_id = self.top.after(delay, self._poll)

    def handle_event(self, event: SessionEvent) -> None:
        if isinstance(event, LoggedIn):
            self._on_logged_in(event.user)
        elif isinstance(event, MessageReceived):
            self._on_message(event)
        elif isinstance(event, StatusChanged):
            self._on_status(event)
        elif isinstance(event, RecipientsChanged):
            self.groups.on_recipients(event)
            conv = self.conversation(event.to)
            line = conv.by_id.get(event.id)
            if line is not None and conv is self.current:
                self.view.render_state(line)
        elif isinstance(event, GroupChanged | MembersListed | GroupsListed | GroupUnchanged):
            self.groups.handle(event)
        elif isinstance(event, PresenceChanged):
            if self.groups.on_presence(event):
                return  # a group member's dot, not a contact of ours
            conv = self.conversation(event.user)
            conv.online = event.online
            self._refresh_contact(conv)
        elif isinstance(event, WhoList):
            self.groups.on_who(event)
            self._on_who(event.users)
        elif isinstance(event, ErrorEvent):
            self._on_error(event)
        elif isinstance(event, LinkChanged):
            self._on_link(event.up)
        elif isinstance(event, TypingNotice):
            self._on_typing(event.user)
        elif isinstance(event, Disconnected):
            self._on_disconnected(event.reason)
        elif isinstance(event, (PasswordChanged, AccountDeleted, Cancelled)):
            on_account_event(self, event)

    def _on_logged_in(self, user: str) -> None:
        self.username = user
        if self._logging_in is not None:
            self.settings.server, self.settings.username = self._logging_in
            self._logging_in = None
            self.settings.save()
        self.login_frame.pack_forget()
        self.chat_frame.pack(fill="both", expand=True)
        self.login_button.configure(state="normal", text="Login")
        # A window logged in without the focus (chat-demo's second) counts
        # unread messages until it gets it.
        self.focused = self._has_focus()
        self._update_title()
        self._menu_logged_in(True)
        self.health.start()
        self._fill_contacts()
        if self.connect_to:
            self.open_conversation(self.connect_to)
        else:
            self.peer_label.configure(text="Waiting for someone to write \u2014 or pick a contact",
                                      style="Muted.TLabel")  # fmt: skip
        if self.session is not None:
            self.session.who()  # who of our contacts is online now
        self.groups.logged_in()
        self._take_focus(self.composer)

    def _fill_contacts(self) -> None:
        """Everyone with stored history, the most recently active first."""
        store = self.store
        if store is None:
            return
        self.contact_list.fill(
            [(name_key(c.name), c.name, c.last_ms / 1000)
             for c in read_contacts(store.path)]
        )  # fmt: skip

    def _on_error(self, event: ErrorEvent) -> None:
        if self.username is None:
            if event.code == "server_unreachable" and not event.fatal:
                # A name in the server list that does not resolve: said, and
                # the login goes on with the others.
                self.show_login_error(event.message)
                return
            self.login_button.configure(state="normal", text="Login")
            # The server typed for this login (saved only once one works).
            host = self._logging_in[0] if self._logging_in else self.settings.server
            name = self.username_var.get().strip()
            unreachable = f"Server {host} does not answer. Is it running?"
            if "," in host:
                names = host.replace(",", ", ")
                unreachable = f"None of the servers {names} answers. Are they running?"
            messages = {
                "server_unreachable": unreachable,
                "bad_password": f"Wrong password for {name}. If this is not your account, "
                "the name is taken: pick another.",
                "rate_limited": f"{event.message[:1].upper()}{event.message[1:]}.",
            }
            self.show_login_error(messages.get(event.code, event.message))
            if event.code == "bad_password":
                # A rejected password is not left to be sent again by Enter.
                self.password_var.set("")
                self._take_focus(self.password_entry)
            return
        # (no_such_user is shown: the message waits, the status line alone
        # would only say "sending")
        if event.code in ("user_offline", "mailbox_full"):
            return
        if self.groups.on_error(event):
            return  # a group request's refusal: said where it belongs
        if event.code == "rate_limited":
            self.health.held_back()  # what is sent again now is not network loss (H2)
            # Said once a minute, not a line a second in whatever is open
            # (audit14 A11: ~60 of them scrolled the person's message away).
            now = time.monotonic()
            if now - self._rate_noted < RATE_NOTE_EVERY_S:
                return
            self._rate_noted = now
        self._system(self.current, event.message)
        if event.code in ("server_unreachable", "server_shutdown") and self.current is not None:
            self.current.stale_notice = True

    def _on_link(self, up: bool) -> None:
        self._set_banner(None if up else RECONNECTING_TEXT)
        if up:
            # What said the server was gone is followed by the news it is back.
            for conv in self.conversations.values():
                if conv.stale_notice:
                    conv.stale_notice = False
                    self._system(conv, RECONNECTED_TEXT)

    def _on_who(self, users: tuple[str, ...]) -> None:
        online = {name_key(user): user for user in users}
        me = name_key(self.username) if self.username else None
        if self._who_asked:  # the person asked: list everyone online
            self._who_asked = False
            others = [user for key, user in online.items() if key != me]
            for user in others:
                self.conversation(user)
            if not others:
                self._system(self.current, "Nobody else is online.")
            else:
                self._system(self.current, f"Online: {name_list(others)}.")
        for key, conv in self.conversations.items():
            if conv.name.startswith("#"):
                continue  # a group has no presence (its members have: the panel)
            conv.online = key in online
            self._refresh_contact(conv)

    def _on_disconnected(self, reason: str) -> None:
        if self.username is None:
            if self.session is not None:
                self.session.discard()
            self.session = None
            return
        if reason == "logged_out" and self._logging_out:
            self._logging_out = False
            self._back_to_login("You logged out.")
        elif reason == "server_unreachable" and self._logging_out:
            # The logout reached no server (it is down, or every node of the list).
            self._logging_out = False
            self._back_to_login("You logged out here, but no server answered; it ends the "
                                "session itself when it times out.")  # fmt: skip
        elif reason == "logged_in_elsewhere":
            self._back_to_login("You logged in from another place; this window was signed out.")
        elif reason != "logged_out":
            self._back_to_login(f"Disconnected ({reason}).")

    def _on_message(self, event: MessageReceived) -> None:
        conv = self.conversation(event.conversation)  # a group message: its group's
        if event.msg_id and event.msg_id in conv.received:
            self._shown(event)  # already shown from the stored history
            return
        conv.received.add(event.msg_id)
        line = Line("peer", event.sender, event.text, event.sent_ms / 1000, event.msg_id or None)
        if event.group is not None and self._mine(event.sender):
            line = self._own_from_elsewhere(event.text, event.sent_ms, event.msg_id)
        line.seq, line.life = event.seq, event.life
        self._add_line(conv, line)
        if self.current is None:
            self.open_conversation(conv.name, focus=False)
        # Inserted (in the open transcript, or in its conversation with an
        # unread count): now its receipt may tell the sender `delivered`.
        self._shown(event)
        if conv is not self.current or not self.focused or not self.view.at_latest:
            conv.unread += 1
            self._refresh_contact(conv)
            self._update_title()
            if not self.focused and not self.mute_var.get():
                self.top.bell()
        if conv is self.current:
            self.typing_label.configure(text="")

    def _shown(self, event: MessageReceived) -> None:
        if self.session is not None:
            self.session.shown(event.id)

    def _on_status(self, event: StatusChanged) -> None:
        self.groups.on_status(event)
        conv = self.conversation(event.to)
        line = conv.by_id.get(event.id)
        if event.state != MessageState.SENDING:
            self._sending.pop(event.id, None)
        if line is None:
            if event.state != MessageState.SENDING:
                return  # a line trimmed from memory: the store has its state
            line = Line("own", self.username or "me", event.text, time.time(), event.id)
            line.state = event.state
            conv.by_id[event.id] = line
            self._sending[event.id] = (line, conv, time.monotonic())
            self._add_line(conv, line)
            return
        line.state = event.state
        line.reason = event.reason
        line.detail = event.detail
        if event.state != MessageState.SENDING:
            line.slow = line.awaits_account = False
        if conv is self.current:
            self.view.render_state(line)
        if event.seq > 0 and event.group is not None and not line.seq:
            line.seq, line.life = event.seq, event.life
            self._place_in_group(conv, line)

    def _place_in_group(self, conv: Conversation, line: Line) -> None:
        """Our group message, shown where it was typed while `sending`, now
        numbered by the server: below the lines after it that the server
        numbered first, and those of an older group of the name (the store
        moves its row alike: every member reads the group in one order)."""
        index = next((i for i, other in enumerate(conv.lines) if other is line), None)
        if index is None:
            return
        later = conv.lines[index + 1 :]
        ahead = goes_before(line.place, [other.place for other in later])
        if ahead == 0:
            return
        for moved in [line, *later[ahead:]]:
            moved.row_id = 0  # stored again under a new row: looked up when needed
        move_down(conv.lines, line, ahead)
        if conv is self.current:
            self.view.move_down(line, ahead)

    def _mark_slow(self, now: float) -> None:
        """Our messages `sending` for SLOW_SEND_S get a note (not 30 s of
        silence): the server has not answered, or (the server did answer)
        the name has no account yet and the message waits for it."""
        waiting = self.session.waiting_ids() if self.session is not None else frozenset()
        for line, conv, since in list(self._sending.values()):
            if line.state != MessageState.SENDING:
                continue
            awaits = line.msg_id in waiting
            slow = not awaits and (line.slow or now - since >= SLOW_SEND_S)
            if (awaits, slow) != (line.awaits_account, line.slow):
                line.awaits_account, line.slow = awaits, slow
                if conv is self.current:
                    self.view.render_state(line)

    def _on_typing(self, user: str) -> None:
        if not self.typing_var.get() or self.current is None:
            return
        if name_key(user) != name_key(self.current.name):
            return
        self.typing_label.configure(text=f"{user} is typing\u2026")
        if self._typing_clear_id is not None:
            self.top.after_cancel(self._typing_clear_id)
        self._typing_clear_id = self.top.after(
            int(TYPING_SHOWN_S * 1000), lambda: self.typing_label.configure(text="")
        )

    # --- conversations ----------------------------------------------------------

    @property
    def store(self) -> ClientStore | None:
        return self.session.store if self.session is not None else None

    def conversation(self, name: str, *, last: float = 0.0) -> Conversation:
        key = name_key(name)
        conv = self.conversations.get(key)
        if conv is None:
            conv = self.conversations[key] = Conversation(name)
            self.contact_list.add(key, name, last)
            self._load_history(conv)
        return conv

    def _line_from(self, item: HistoryLine) -> Line:
        line = self._line_of(item)
        line.seq, line.life = item.seq, item.life
        return line

    def _line_of(self, item: HistoryLine) -> Line:
        if item.change is not None:  # a group's membership change
            return Line("system", "", item.text, item.ts_ms / 1000, row_id=item.row_id)
        if item.outgoing:
            return Line("own", self.username or "me", item.text, item.ts_ms / 1000, item.msg_id,
                        item.state or MessageState.SENDING, item.reason, item.detail,
                        row_id=item.row_id)  # fmt: skip
        if item.sender and item.peer.startswith("#") and self._mine(item.sender):
            line = self._own_from_elsewhere(item.text, item.ts_ms, item.msg_id)
            line.row_id = item.row_id
            return line
        return Line("peer", item.sender or item.peer, item.text, item.ts_ms / 1000, item.msg_id,
                    row_id=item.row_id)  # fmt: skip

    def _mine(self, sender: str) -> bool:
        return self.username is not None and name_key(sender) == name_key(self.username)

    def _own_from_elsewhere(self, text: str, sent_ms: float, msg_id: str) -> Line:
        """Our own group message sent from another client instance (another
        device): shown as ours, accepted (the server handed it on)."""
        return Line("own", self.username or "me", text, sent_ms / 1000, msg_id or None,
                    MessageState.ACCEPTED)  # fmt: skip

    def _load_history(self, conv: Conversation) -> None:
        """The last page earlier runs stored of this conversation, oldest first."""
        store = self.store
        if store is None:
            return
        items = read_history(store.path, conv.name, PAGE, upto=store.history_mark)
        conv.has_earlier = len(items) == PAGE
        for item in items:
            line = self._line_from(item)
            if item.outgoing:
                conv.by_id[item.msg_id] = line
                if line.state == MessageState.SENDING:
                    self._sending[item.msg_id] = (line, conv, time.monotonic())
            else:
                conv.received.add(item.msg_id)
            conv.lines.append(line)

    def _add_line(self, conv: Conversation, line: Line) -> None:
        """A new line at the end of `conv` (shown if it is open at its
        latest); a group's entry above our messages numbered after it
        (`_place_arrival`)."""
        conv.lines.append(line)
        behind = self._place_arrival(conv, line) if line.seq else 0
        self.contact_list.touch(name_key(conv.name), line.stamp)
        if conv is self.current:
            if self.view.at_latest:
                if self.view.append(line):
                    self._batch_scroll = True
                if behind:
                    self.view.move_down(line, -behind)
            else:
                self.view.show_marker()
        elif len(conv.lines) > MAX_LINES:
            self._trim(conv)

    def _place_arrival(self, conv: Conversation, line: Line) -> int:
        """A group's entry (`line`, just added last) that the server
        numbered before messages of ours it has accepted already (their
        GROUP_ACCEPT came first: the fan-out hold, the window) goes above
        them, as the store puts its row (`goes_above`). How many lines it
        went above."""
        earlier = conv.lines[-2::-1]
        behind = goes_above(line.place, ((other.kind == "own", other.place) for other in earlier))
        if behind:
            for moved in earlier[:behind]:
                moved.row_id = 0  # stored again under a new row: looked up when needed
            move_down(conv.lines, line, -behind)
        return behind

    def _trim(self, conv: Conversation) -> None:
        """Keep the last PAGE lines of `conv` in memory; the rest are in the store."""
        if len(conv.lines) <= PAGE:
            return
        for line in conv.lines[:-PAGE]:
            if line.msg_id is not None and conv.by_id.get(line.msg_id) is line:
                del conv.by_id[line.msg_id]
        del conv.lines[:-PAGE]
        conv.has_earlier = True

    def _trim_current(self) -> None:
        """The open conversation, followed at its end, keeps a bounded text."""
        if self.current is not None and len(self.view.lines) > MAX_LINES:
            self.view.trim_front(len(self.view.lines) - PAGE)
            if len(self.current.lines) > PAGE:
                self._trim(self.current)

    def open_conversation(self, name: str, *, focus: bool = True) -> None:
        previous = self.current
        conv = self.conversation(name, last=time.time())
        self.current = conv
        if previous is not None and previous is not conv:
            self._trim(previous)
            self._swap_draft(previous, conv)
        if self.session is not None:
            self.session.set_peer(conv.name)
        conv.unread = 0
        self._refresh_contact(conv)
        self._update_title()
        self.peer_label.configure(text=tk_safe(conv.name), style="Heading.TLabel")
        self.peer_avatar.show(conv.name, conv.online)
        self.typing_label.configure(text="")
        self.contact_list.select(name_key(conv.name))
        self._found = None
        self._show_latest()
        self.groups.opened(conv)
        if focus:
            self._take_focus(self.composer)

    def _swap_draft(self, previous: Conversation, conv: Conversation) -> None:
        """A draft per conversation (as Gajim and Signal keep): what is in
        the composer stays with the conversation it was typed in, and
        `conv`'s comes back, so a line never follows the window to another
        conversation (audit8 P4: a line refused in a group just left went
        to the group New group opened next). Text typed with nothing open
        goes to the first conversation opened (`open_conversation`)."""
        previous.draft = self.composed()
        self.composer.delete("1.0", "end")
        if conv.draft:
            self.composer.insert("1.0", conv.draft)
            conv.draft = ""
        self.composer.edit_reset()  # Undo never brings back another's text
        self._update_size()

    def _show_latest(self) -> None:
        """The open conversation's last page, at its end."""
        conv = self.current
        if conv is None:
            self.view.show([], has_earlier=False)
            return
        self.view.show(conv.lines[-PAGE:], has_earlier=conv.has_earlier or len(conv.lines) > PAGE)

    def _row_of(self, line: Line) -> int | None:
        """The store's row of `line` (looked up once for a line from an event)."""
        store = self.store
        if line.row_id or store is None or line.msg_id is None or line.kind == "system":
            return line.row_id or None
        sender = self.username if line.kind == "own" else line.who
        line.row_id = row_of(store.path, line.kind == "own", sender or "", line.msg_id) or 0
        return line.row_id or None

    def _first_row_shown(self) -> int:
        """The store's row of the first line shown: what is before it is earlier."""
        for line in self.view.lines:
            row = self._row_of(line)
            if row is not None:
                return row
        store = self.store
        return (store.history_mark if store is not None else 0) + 1

    def load_earlier(self) -> None:
        """The page before the first line shown, from the store, above it."""
        store = self.store
        if self.current is None or store is None or not self.view.has_earlier:
            return
        items = read_history(store.path, self.current.name, PAGE, before=self._first_row_shown())
        self.view.prepend([self._line_from(item) for item in items],
                          has_earlier=len(items) == PAGE)  # fmt: skip

    def _open_typed(self) -> None:
        name = self.new_chat_var.get().strip()
        if not name:
            return
        try:
            name = normalize_peer(name)  # a person, or a group: #team
        except LocalProtocolError as exc:
            self._system(self.current, f"Cannot open a chat with {name!r}: {exc}")
            return
        refused = self.groups.not_ours(name)
        if refused is not None:  # no conversation, no contact: the name stays to correct
            self._system(self.current, refused, "error")
            return
        self.new_chat_var.set("")
        self.open_conversation(name)

    def _on_contact_selected(self, key: str) -> None:
        if self.current is None or name_key(self.current.name) != key:
            conv = self.conversations.get(key)
            entry = self.contact_list.entries.get(key)
            if conv is not None:
                self.open_conversation(conv.name)
            elif entry is not None:
                self.open_conversation(entry.name)

    def _refresh_contact(self, conv: Conversation) -> None:
        if self.groups.refresh_contact(conv):
            return  # a group: its member count
        status = {None: "", True: "\u25cf online", False: "offline"}[conv.online]
        self.contact_list.set_state(name_key(conv.name), status, conv.unread)
        if conv is self.current:
            self.peer_avatar.show(conv.name, conv.online)

    def unread_total(self) -> int:
        return sum(c.unread for c in self.conversations.values())

    def _update_title(self) -> None:
        if self.username is None:
            self.top.title("Chat")
            return
        unread = self.unread_total()
        prefix = f"({unread}) " if unread else ""
        self.top.title(tk_safe(f"{prefix}{self.username} - Chat"))

    # --- transcript -------------------------------------------------------------

    def _system(self, conv: Conversation | None, message: str, kind: str = "system") -> None:
        """A line of the window's own in `conv` (`kind` "error": a refusal,
        drawn in the error colour, unlike a membership change); with no
        conversation open, in the header."""
        line = Line(kind, "", message, time.time())
        if conv is None:  # one line of the header: a long message is clipped
            self.peer_label.configure(text=tk_safe(clip_text(message, HEADER_CHARS)))
            return
        conv.lines.append(line)
        if conv is self.current and self.view.at_latest:
            if self.view.append(line):
                self._scroll_to_end()

    def _scroll_to_end(self) -> None:
        self.view.scroll_to_end()

    def state_of(self, msg_id: str) -> str | None:
        """The state shown for one of our messages (for tests and scripts)."""
        for conv in self.conversations.values():
            line = conv.by_id.get(msg_id)
            if line is not None:
                return line.state
        return None

    def transcript_text(self) -> str:
        return self.view.content()

    # --- composing ------------------------------------------------------------

    def composed(self) -> str:
        return self.composer.get("1.0", "end-1c")

    def _on_return(self, _event: object) -> str:
        self.send_composed()
        return "break"

    def _on_shift_return(self, _event: object) -> str:
        self.composer.insert("insert", "\n")
        return "break"

    def _on_up(self, _event: object) -> str | None:
        if self.composed() or not self.history:
            return None
        self.composer.insert("1.0", self.history[-1])
        return "break"

    def _clear_composer(self) -> str:
        self.composer.delete("1.0", "end")
        self._update_size()
        return "break"

    def _on_composer_key(self, _event: object) -> None:
        self._update_size()
        if (
            self.session is not None
            and self.current is not None
            and self.composed().strip()
            and time.monotonic() - self._last_typing_sent > TYPING_SEND_EVERY_S
        ):
            self._last_typing_sent = time.monotonic()
            self.session.typing(self.current.name)

    def _update_size(self) -> None:
        size = len(self.composed().encode("utf-8", "replace"))
        if size >= MAX_TEXT_BYTES * LIMIT_WARN_AT:
            over = size > MAX_TEXT_BYTES
            self.size_label.configure(
                text=f"{size:,} / {MAX_TEXT_BYTES:,} bytes"
                + (" \u2014 too long to send" if over else ""),
                style="Error.TLabel" if over else "Muted.TLabel",
            )
        else:
            self.size_label.configure(text="")

    def send_composed(self) -> None:
        """Send what is in the composer to the open conversation. The text
        stays in the composer if it cannot be sent."""
        text = self.composed()
        if not text.strip() or self.session is None:
            return
        if self.current is None:
            # (The field is above the list: "under the list" sent people looking.)
            self._system(None, "Pick a contact, or type a name in \u201cNew chat with\u2026\u201d "
                               "first.")  # fmt: skip
            return
        if len(text.encode("utf-8", "replace")) > MAX_TEXT_BYTES:
            self._update_size()
            return
        if (refused := self.groups.refusal(self.current)) is not None:
            self._system(self.current, refused)
            return
        if self.session.send(text, to=self.current.name) is None:
            return
        self.history.append(text)
        self.composer.delete("1.0", "end")
        self._update_size()

    def retry(self, line: Line) -> None:
        """Send a failed message again, as a new message (once per failure)."""
        if self.session is None or self.current is None or line.state != MessageState.FAILED:
            return
        if (refused := self.groups.refusal(self.current)) is not None:
            self._system(self.current, refused)
            return
        line.state = "retried"
        self.view.render_state(line)
        self.session.send(line.text, to=self.current.name)

    # --- find -------------------------------------------------------------------

    def show_find(self) -> None:
        if self.username is None:
            return
        self.find_status.pack(side="right", padx=(6, 0))
        self.find_entry.pack(side="right")
        self.find_label.pack(side="right", padx=(0, 4))
        self.find_entry.focus_set()
        self.find_entry.select_range(0, "end")

    def _hide_find(self) -> None:
        self.find_entry.pack_forget()
        self.find_label.pack_forget()
        self.find_status.pack_forget()
        self.transcript.tag_remove("found", "1.0", "end")
        self._found = None
        if not self.view.at_latest:
            self._show_latest()
        self.composer.focus_set()

    def find_next(self) -> bool:
        """Find the needle again, towards older lines: first in what is
        shown, then in the whole stored history (the page around the hit is
        shown), then from the latest line again. Case is folded in Python:
        Tk's `-nocase` search crashes Tcl 8.6 on an emoji (issue 17)."""
        needle = self.find_var.get()
        self.transcript.tag_remove("found", "1.0", "end")
        if not needle or self.current is None:
            return False
        before = self._found[1] if self._found and self._found[0] == needle else None
        self._found = None
        if self._find_older(needle, before, ""):
            return True
        if before is not None or not self.view.at_latest:  # wrap round to the latest
            if not self.view.at_latest:
                self._show_latest()
            if self._find_older(needle, None, "from the latest again"):
                return True
        self.find_status.configure(text="not found", style="Error.TLabel")
        return False

    def _find_older(self, needle: str, before: str | None, note: str) -> bool:
        """The last hit shown above index `before` (None: anywhere), else the
        newest one stored before the first line shown, on its page."""
        text = self.transcript
        hits = find_in_text(self.view.content(), needle)
        older = [h for h in hits if before is None or text.compare(h[0], "<", before)]
        if older:
            return self._show_hit(needle, older[-1], note)
        store = self.store
        if store is None or self.current is None:
            return False
        name = self.current.name
        row = search_history(store.path, name, needle, before=self._first_row_shown())
        if row is None:
            return False
        lines = [self._line_from(item) for item in read_around(store.path, name, row)]
        # read_around gives up to PAGE // 2 lines before the hit: fewer, and there are no more.
        earlier = sum(1 for line in lines if line.row_id < row) >= PAGE // 2
        self.view.show(lines, has_earlier=earlier, at_latest=False)
        target = next((line for line in lines if line.row_id == row), None)
        start = self.view.see_line(target) if target is not None else None
        hits = find_in_text(self.view.content(), needle)
        after = [h for h in hits if start is None or text.compare(h[0], ">=", start)]
        if not (after or hits):
            return False
        return self._show_hit(needle, (after or hits)[0], note)

    def _show_hit(self, needle: str, hit: tuple[str, str], note: str) -> bool:
        text = self.transcript
        text.tag_add("found", *hit)
        self.view.see(hit[0])
        self._found = (needle, hit[0])
        self.find_status.configure(text=note, style="Muted.TLabel")
        return True

    # --- the rest ---------------------------------------------------------------

    def _on_chat_resize(self, event: Any) -> None:
        """A narrow window gives the contact list less room, the conversation more.
        From 760 px on it is wide enough for "group · 12 members" and the whole
        "New chat with…" placeholder (at 170 both were cut at the default size)."""
        if event.widget is not self.chat_frame:
            return
        width = 120 if event.width < 600 else 170 if event.width < 760 else 200
        if int(self.contacts.cget("width")) != width:
            self.contacts.configure(width=width)
        self.groups.panel.set_room(event.width >= client_groups_ui.PANEL_ROOM)

    def _link_stats(self) -> LinkStats | None:
        return self.session.link_stats() if self.session is not None else None

    def _focus_new_chat(self) -> None:
        self.new_chat_entry.focus_set()

    def log_out(self) -> None:
        """File > Log out: back to the login view once the session has ended."""
        if self.session is not None and self.username is not None:
            self._logging_out = True
            self.session.logout(3.0)

    def _on_transcript_motion(self, event: Any) -> None:
        """Hovering a message shows its full time; ours also when the server
        accepted it, when it was delivered, and how often it was resent."""
        line = self.view.line_at(f"@{event.x},{event.y}")
        if line is None or line.kind == "system":
            self.tooltip.hide()
            return
        self.tooltip.schedule(self.describe_line(line), event.x_root, event.y_root)

    def describe_line(self, line: Line) -> str:
        """The hover text of a transcript line."""
        if line.kind != "own" or line.msg_id is None:
            return f"{line.who} \u00b7 {full_time(line.stamp)}"
        timeline = self.session.timeline(line.msg_id) if self.session is not None else None
        text = describe(timeline, state=line.state, stamp=line.stamp, reason=line.reason,
                        detail=line.detail)  # fmt: skip
        members = self.groups.hover_text(line)  # a group message: who has it
        return text if members is None else f"{text}\n{members}"

    def show_about(self) -> None:
        """Help > About: the program, its version, where it comes from."""
        if self.about is not None:
            self.about.lift()
            return
        about = self.about = tk.Toplevel(self.top, background=PALETTE.window)
        about.title("About Chat")
        about.resizable(False, False)
        about.transient(self.top)
        card = ttk.Frame(about, padding=PAD * 3)
        card.pack(fill="both", expand=True)
        ttk.Label(card, text="Chat", style="Heading.TLabel").pack()
        self.about_version = ttk.Label(card, text=f"udp-chat {__version__}")
        self.about_version.pack(pady=(2, PAD))
        ttk.Label(card, text="A chat over a UDP relay that never loses a message.\n"
                  "Python standard library only.", style="Muted.TLabel",
                  justify="center").pack()  # fmt: skip

        def close() -> None:
            about.destroy()
            self.about = None

        button = ttk.Button(card, text="Close", style="Accent.TButton", command=close)
        button.pack(pady=(PAD, 0))
        about.protocol("WM_DELETE_WINDOW", close)
        about.bind("<Escape>", lambda _e: close())
        about.bind("<Return>", lambda _e: close())
        button.focus_set()

    def show_shortcuts(self) -> None:
        """Help > Keyboard shortcuts, as a system line in the open conversation."""
        text = ("Enter sends \u00b7 Shift+Enter new line \u00b7 Esc clears \u00b7 Up recalls "
                "the last message \u00b7 Ctrl+F finds \u00b7 Ctrl+Q quits")  # fmt: skip
        self._system(self.current, text)

    def _ask_who(self) -> None:
        if self.session is not None:
            self._who_asked = True
            self.session.who()

    def _save_options(self) -> None:
        self.settings.mute = self.mute_var.get()
        self.settings.typing_indicator = self.typing_var.get()
        self.settings.save()

    def _set_banner(self, message: str | None) -> None:
        if message is None:
            self.banner.pack_forget()
        else:
            self.banner.configure(text=message)
            self.banner.pack(fill="x", side="top", before=self._banner_anchor)

    def _on_focus_in(self, event: Any) -> None:
        self.focused = True
        if self.username is not None:
            # Activated (window manager, alt-tab, `xdotool windowfocus`): Tk
            # gives the focus to the widget that last had it in this window,
            # to the window itself if none did, or to a field of the hidden
            # login view (the window that was not focused at login, as in
            # chat-demo). Then it goes to the composer, so typing lands.
            widget = self._focus_widget()
            if widget is None or widget is self.top or not widget.winfo_viewable():
                self.top.after_idle(self._composer_focus_if_ours)
        if self.current is not None and self.current.unread:
            self.current.unread = 0
            self._refresh_contact(self.current)
            self._update_title()

    def _on_focus_out(self, event: Any) -> None:
        # FocusOut also fires when focus moves between our own widgets, and
        # with two windows in one app focus_get() names the other one's.
        self.focused = self._has_focus()

    def _focus_widget(self) -> tk.Misc | None:
        try:
            return self.top.focus_get()
        except (tk.TclError, KeyError):
            return None

    def _composer_focus_if_ours(self) -> None:
        widget = self._focus_widget()
        if (
            widget is not None
            and widget.winfo_toplevel() is self.top
            and (widget is self.top or not widget.winfo_viewable())
        ):
            self.composer.focus_set()

    def _on_key_anywhere(self, event: Any) -> str | None:
        """A printable key pressed in a logged-in window outside a text field
        (the transcript, the contact list, a button) goes to the composer."""
        widget = event.widget
        char = getattr(event, "char", "")
        if (
            self.username is None
            or not char
            or not char.isprintable()
            or int(event.state) & (CONTROL_MASK | ALT_MASK)
            or widget is self.composer
            or isinstance(widget, (tk.Entry, ttk.Entry, ttk.Combobox, tk.Spinbox))
            or (char == " " and isinstance(widget, (ttk.Button, ttk.Checkbutton, tk.Button)))
        ):
            return None
        self.composer.focus_set()
        self.composer.insert("insert", char)
        self.composer.see("insert")
        self._on_composer_key(event)
        return "break"

    def _select_all(self, event: Any) -> None:
        widget = event.widget
        widget.select_range(0, "end")
        widget.icursor("end")

    def _select_all_entry(self, event: Any) -> str:
        """Ctrl+A in a field: all of it selected, so typing replaces it (Tk
        moved to the start, and what was typed went before the old text:
        `127.0.0.1:5588127.0.0.1:5555`)."""
        self._select_all(event)
        return "break"

    def _select_all_text(self, _event: Any) -> str:
        self.composer.tag_add("sel", "1.0", "end-1c")
        self.composer.mark_set("insert", "end-1c")
        return "break"

    def _has_focus(self) -> bool:
        try:
            widget = self.top.focus_get()
        except (tk.TclError, KeyError):
            return False
        return widget is not None and widget.winfo_toplevel() is self.top

    def _take_focus(self, widget: tk.Misc) -> None:
        """Focus `widget` only if this window has the focus already: a message
        arriving must never pull the keyboard out of another window."""
        if self._has_focus() or self.top.focus_get() is None:
            widget.focus_set()

    def close(self) -> None:
        """Log out (waiting briefly for accepts) and destroy the window."""
        if self._closed:
            return
        self._closed = True
        if self._poll_id is not None:
            self.top.after_cancel(self._poll_id)
        if self._typing_clear_id is not None:
            self.top.after_cancel(self._typing_clear_id)
        self.health.stop()
        self.tooltip.destroy()
        if self.about is not None:
            self.about.destroy()
        try:
            self.settings.geometry = self.top.geometry()
            self.settings.save()
        except tk.TclError:
            pass
        if self.session is not None:
            self.session.close(timeout=3.0)
        self.top.destroy()
        if self.on_closed is not None:
            self.on_closed(self)


def enable_high_dpi() -> None:
    """Crisp text on Windows high-DPI screens (no effect elsewhere)."""
    if sys.platform == "win32":
        try:
            import ctypes

            ctypes.windll.shcore.SetProcessDpiAwareness(1)  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            pass


def no_display_reason() -> str | None:
    """Why no window can open here, or None if one can."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return "no display (DISPLAY is not set); run it on a desktop or under Xvfb"
    return None


def open_root(prog: str, hint: str = "") -> tk.Tk | None:
    """The Tk root for `prog`, or None after one line on stderr saying why
    no window can open here (`hint` says what to do instead)."""
    reason = no_display_reason()
    if reason is None:
        enable_high_dpi()
        try:
            return tk.Tk(className="chat")
        except tk.TclError as exc:
            reason = f"cannot open a window: {exc}"
    print(f"{prog}: {reason}{hint}", file=sys.stderr)
    return None


def run_window(args: Any, session_factory: SessionFactory) -> int:
    """`chat-client` without --no-gui: one window, its sessions made by
    `session_factory` (`chat_client.ChatSession`)."""
    root = open_root("chat-client", "; or use --no-gui")
    if root is None:
        return 2
    settings = Settings.load()
    if getattr(args, "server", None) and args.server != f"127.0.0.1:{DEFAULT_PORT}":
        settings.server = args.server
    window = ChatWindow(root, settings, session_factory=session_factory)
    if getattr(args, "user", None):
        window.username_var.set(args.user)
    if getattr(args, "connect_to", None):
        window.connect_var.set(args.connect_to)
    root.mainloop()
    return 0
