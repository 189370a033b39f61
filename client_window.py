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
the right: transcript, typing line, composer).
"""

from __future__ import annotations

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

from client_core import (
    Disconnected,
    ErrorEvent,
    LinkChanged,
    LoggedIn,
    MessageReceived,
    MessageState,
    PresenceChanged,
    StatusChanged,
    TypingNotice,
    WhoList,
)
from client_core import Event as SessionEvent
from client_store import ClientStore, read_history
from common import DEFAULT_PORT, config_dir, format_servers, parse_servers
from protocol import MAX_TEXT_BYTES, LocalProtocolError, name_key, normalize_name

POLL_MS = 25  # how often the window drains the session's events
POLL_BATCH = 300  # events handled per tick at most ...
POLL_BUDGET_S = 0.015  # ... and for at most this long, so a burst never freezes the window
TYPING_SHOWN_S = 4.0  # how long "bob is typing..." stays after the last notice
TYPING_SEND_EVERY_S = 3.0
LIMIT_WARN_AT = 0.8  # show the size counter from this share of the limit on
RECONNECTING_TEXT = (
    "Server not answering \u2014 reconnecting\u2026 "
    "(keep typing: messages are sent when it is back)"
)

# What each state of our message shows; "retried" is the window's own (a
# failed message the user sent again).
STATE_LABELS = {
    MessageState.SENDING: "sending\u2026",
    MessageState.ACCEPTED: "\u2713 on server",
    MessageState.DELIVERED: "\u2713\u2713 delivered",
    MessageState.FAILED: "\u2717 failed",
    "retried": "\u2717 failed, sent again below",
}


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
    def typing(self, to: str) -> None: ...
    def logout(self, timeout: float = 10.0) -> None: ...
    def close(self, timeout: float = 10.0) -> None: ...
    def discard(self) -> None: ...


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
class Line:
    kind: str  # "own", "peer" or "system"
    who: str
    text: str
    stamp: float
    msg_id: str | None = None
    state: str | None = None
    reason: str | None = None


@dataclass
class Conversation:
    name: str
    lines: list[Line] = field(default_factory=list)
    unread: int = 0
    online: bool | None = None
    by_id: dict[str, Line] = field(default_factory=dict)  # our messages
    received: set[str] = field(default_factory=set)  # their message ids


def tk_safe(text: str) -> str:
    """Text Tk can show: characters outside the BMP (emoji on Tcl 8.6) become
    U+FFFD so an old Tcl never raises on them."""
    if tk.TkVersion >= 8.7:
        return text
    return "".join(ch if ord(ch) <= 0xFFFF else "\ufffd" for ch in text)


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
        self._expected_tick = 0.0

        master.title("Chat")
        master.geometry(self.settings.geometry)
        master.minsize(560, 380)
        master.protocol("WM_DELETE_WINDOW", self.close)
        style = ttk.Style(master)
        if sys.platform.startswith("linux") and "clam" in style.theme_names():
            style.theme_use("clam")  # the X11 "default" theme looks dated
        style.configure("Error.TLabel", foreground="#b00020")
        style.configure("Banner.TLabel", background="#fff3cd", foreground="#664d03", padding=6)
        style.configure("Muted.TLabel", foreground="#666666")

        self.login_frame = self._build_login()
        self.chat_frame = self._build_chat()
        self.login_frame.pack(fill="both", expand=True)
        master.bind("<FocusIn>", self._on_focus_in, add="+")
        master.bind("<FocusOut>", self._on_focus_out, add="+")
        master.bind("<Control-q>", lambda e: self.close())
        self._expected_tick = time.monotonic() + POLL_MS / 1000
        self._poll_id = master.after(POLL_MS, self._poll)
        self.username_entry.focus_set()

    # --- building -------------------------------------------------------------

    def _build_login(self) -> ttk.Frame:
        outer = ttk.Frame(self.top, padding=24)
        box = ttk.Frame(outer)
        box.place(relx=0.5, rely=0.45, anchor="center")
        ttk.Label(box, text="Chat", font=("TkDefaultFont", 18, "bold")).grid(
            row=0, column=0, columnspan=2, pady=(0, 16)
        )
        self.server_var = tk.StringVar(value=self.settings.server)
        self.username_var = tk.StringVar(value=self.settings.username)
        self.password_var = tk.StringVar()
        self.connect_var = tk.StringVar()
        rows = [
            ("Server", self.server_var),
            ("Username", self.username_var),
            ("Password", self.password_var),
            ("Connect to", self.connect_var),
        ]
        entries = []
        for i, (label, var) in enumerate(rows, start=1):
            ttk.Label(box, text=label).grid(row=i, column=0, sticky="w", padx=(0, 12), pady=4)
            entry = ttk.Entry(box, textvariable=var, width=30, show="\u2022" if var is
                              self.password_var else "")  # fmt: skip
            entry.grid(row=i, column=1, sticky="ew", pady=4)
            entry.bind("<Return>", lambda e: self.submit_login())
            entries.append(entry)
        self.server_entry, self.username_entry, self.password_entry, self.connect_entry = entries
        ttk.Label(
            box, text="A new name is registered with this password.", style="Muted.TLabel"
        ).grid(row=5, column=1, sticky="w")
        ttk.Label(box, text="Connect to is optional: who to talk to first.",
                  style="Muted.TLabel").grid(row=6, column=1, sticky="w")  # fmt: skip
        self.login_button = ttk.Button(box, text="Login", command=self.submit_login)
        self.login_button.grid(row=7, column=1, sticky="e", pady=(12, 4))
        self.login_error = ttk.Label(box, text="", style="Error.TLabel", wraplength=360)
        self.login_error.grid(row=8, column=0, columnspan=2, sticky="w")
        return outer

    def _build_chat(self) -> ttk.Frame:
        frame = ttk.Frame(self.top)
        self.banner = ttk.Label(frame, text="", style="Banner.TLabel", anchor="w")
        panes = ttk.Frame(frame)
        panes.pack(fill="both", expand=True, side="bottom")
        panes.columnconfigure(1, weight=1)
        panes.rowconfigure(0, weight=1)
        self._banner_anchor = panes

        left = ttk.Frame(panes, padding=(8, 8, 0, 8))
        ttk.Label(left, text="Contacts", font=("TkDefaultFont", 11, "bold")).pack(anchor="w")
        self.contacts = ttk.Treeview(left, columns=("status", "unread"), show="tree",
                                     selectmode="browse", height=12)  # fmt: skip
        self.contacts.column("#0", width=110, stretch=True)
        self.contacts.column("status", width=70, anchor="w", stretch=False)
        self.contacts.column("unread", width=32, anchor="e", stretch=False)
        self.contacts.pack(fill="both", expand=True, pady=(4, 0))
        self.contacts.bind("<<TreeviewSelect>>", self._on_contact_selected)
        ttk.Label(left, text="New chat with:", style="Muted.TLabel").pack(anchor="w", pady=(6, 0))
        new = ttk.Frame(left)
        new.pack(fill="x")
        self.new_chat_var = tk.StringVar()
        self.new_chat_entry = ttk.Entry(new, textvariable=self.new_chat_var, width=12)
        self.new_chat_entry.pack(side="left", fill="x", expand=True)
        self.new_chat_entry.bind("<Return>", lambda e: self._open_typed())
        ttk.Button(new, text="Chat", width=5, command=self._open_typed).pack(
            side="left", padx=(4, 0)
        )
        ttk.Button(left, text="Who is online", command=self._ask_who).pack(fill="x", pady=(6, 0))
        options = ttk.Frame(left)
        options.pack(fill="x", pady=(6, 0))
        self.mute_var = tk.BooleanVar(value=self.settings.mute)
        self.typing_var = tk.BooleanVar(value=self.settings.typing_indicator)
        ttk.Checkbutton(options, text="Mute", variable=self.mute_var,
                        command=self._save_options).pack(anchor="w")  # fmt: skip
        ttk.Checkbutton(options, text="Typing indicator", variable=self.typing_var,
                        command=self._save_options).pack(anchor="w")  # fmt: skip
        left.grid(row=0, column=0, sticky="nsw")

        right = ttk.Frame(panes, padding=8)
        header = ttk.Frame(right)
        header.pack(fill="x")
        self.peer_label = ttk.Label(header, text="", font=("TkDefaultFont", 12, "bold"))
        self.peer_label.pack(side="left")
        self.find_var = tk.StringVar()
        self.find_status = ttk.Label(header, text="", style="Muted.TLabel")
        self.find_entry = ttk.Entry(header, textvariable=self.find_var, width=18)
        self.find_label = ttk.Label(header, text="Find:")
        self.find_entry.bind("<Return>", lambda e: self.find_next())
        self.find_entry.bind("<Escape>", lambda e: self._hide_find())

        body = ttk.Frame(right)
        body.pack(fill="both", expand=True, pady=(4, 0))
        self.transcript = tk.Text(body, wrap="word", state="disabled", height=10, width=30,
                                  padx=8, pady=6,
                                  relief="flat", borderwidth=1, highlightthickness=1,
                                  font=("TkDefaultFont", 11))  # fmt: skip
        scroll = ttk.Scrollbar(body, orient="vertical", command=self.transcript.yview)
        self.transcript.configure(yscrollcommand=scroll.set)
        scroll.pack(side="right", fill="y")
        self.transcript.pack(side="left", fill="both", expand=True)
        # Continuation lines of a message are indented under its text.
        self.transcript.tag_configure("own", foreground="#0b4f9c", lmargin2=48)
        self.transcript.tag_configure("peer", foreground="#1b5e20", lmargin2=48)
        self.transcript.tag_configure("system", foreground="#777777",
                                      font=("TkDefaultFont", 10, "italic"))  # fmt: skip
        self.transcript.tag_configure("stamp", foreground="#999999", font=("TkDefaultFont", 9))
        self.transcript.tag_configure("who", font=("TkDefaultFont", 11, "bold"))
        self.transcript.tag_configure("state", foreground="#888888", font=("TkDefaultFont", 9))
        self.transcript.tag_configure("failed", foreground="#b00020", font=("TkDefaultFont", 9))
        self.transcript.tag_configure("retry", foreground="#0b57d0", underline=True,
                                      font=("TkDefaultFont", 9))  # fmt: skip
        self.transcript.tag_configure("found", background="#ffe082")
        self.transcript.tag_bind("retry", "<Enter>",
                                 lambda e: self.transcript.configure(cursor="hand2"))  # fmt: skip
        self.transcript.tag_bind("retry", "<Leave>", lambda e: self.transcript.configure(cursor=""))
        # Read-only but selectable and copyable: block edits, not selection.
        self.transcript.bind("<Control-c>", lambda e: None)
        self.new_marker = ttk.Button(body, text="\u2193 new messages", command=self._scroll_to_end)

        self.typing_label = ttk.Label(right, text="", style="Muted.TLabel")
        self.typing_label.pack(fill="x", pady=(2, 0))
        composer_row = ttk.Frame(right)
        composer_row.pack(fill="x", pady=(2, 0))
        self.send_button = ttk.Button(composer_row, text="Send", command=self.send_composed)
        self.send_button.pack(side="right", padx=(6, 0), fill="y")
        self.composer = tk.Text(composer_row, height=3, width=20, wrap="word", undo=True,
                                padx=6, pady=4, font=("TkDefaultFont", 11))  # fmt: skip
        self.composer.pack(side="left", fill="x", expand=True)
        self.size_label = ttk.Label(right, text="", style="Muted.TLabel", anchor="e")
        self.size_label.pack(fill="x")
        self.composer.bind("<Return>", self._on_return)
        self.composer.bind("<Shift-Return>", self._on_shift_return)
        self.composer.bind("<Escape>", lambda e: self._clear_composer())
        self.composer.bind("<Up>", self._on_up)
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
                connect = normalize_name(connect)
            except LocalProtocolError as exc:
                self.show_login_error(f"Connect to: {exc}")
                self.connect_entry.focus_set()
                return
        self.connect_to = connect or None
        self.settings.server = server
        self.settings.username = username
        self.settings.save()
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

    # --- events -------------------------------------------------------------

    def _poll(self) -> None:
        now = time.monotonic()
        self.lag_samples.append(max(0.0, now - self._expected_tick))
        if len(self.lag_samples) > 10_000:
            del self.lag_samples[:5000]
        more = False
        self._batch_scroll = False
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
        if self._batch_scroll:
            self._scroll_to_end()  # once per batch: `see` is the costly part
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
        elif isinstance(event, PresenceChanged):
            conv = self.conversation(event.user)
            conv.online = event.online
            self._refresh_contact(conv)
        elif isinstance(event, WhoList):
            online = {name_key(user): user for user in event.users}
            if self._who_asked:  # the person asked: list everyone online
                self._who_asked = False
                for key, user in online.items():
                    if self.username is None or key != name_key(self.username):
                        self.conversation(user)
            for key, conv in self.conversations.items():
                conv.online = key in online
                self._refresh_contact(conv)
        elif isinstance(event, ErrorEvent):
            self._on_error(event)
        elif isinstance(event, LinkChanged):
            self._set_banner(None if event.up else RECONNECTING_TEXT)
        elif isinstance(event, TypingNotice):
            self._on_typing(event.user)
        elif isinstance(event, Disconnected):
            self._on_disconnected(event.reason)

    def _on_logged_in(self, user: str) -> None:
        self.username = user
        self.login_frame.pack_forget()
        self.chat_frame.pack(fill="both", expand=True)
        self.login_button.configure(state="normal", text="Login")
        self._update_title()
        if self.connect_to:
            self.open_conversation(self.connect_to)
        else:
            self.peer_label.configure(text="Waiting for someone to write \u2014 or pick a contact",
                                      style="Muted.TLabel")  # fmt: skip
        if self.session is not None:
            self.session.who()  # who of our contacts is online now
        self._take_focus(self.composer)

    def _on_error(self, event: ErrorEvent) -> None:
        if self.username is None:
            self.login_button.configure(state="normal", text="Login")
            host = self.settings.server
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
            return
        if event.code in ("too_long", "no_peer", "invalid_name", "rate_limited"):
            self._system(self.current, event.message)
        elif event.code not in ("no_such_user", "user_offline", "mailbox_full"):
            self._system(self.current, event.message)

    def _on_disconnected(self, reason: str) -> None:
        if self.username is None:
            if self.session is not None:
                self.session.discard()
            self.session = None
            return
        if reason == "logged_in_elsewhere":
            self._back_to_login("You logged in from another place; this window was signed out.")
        elif reason != "logged_out":
            self._back_to_login(f"Disconnected ({reason}).")

    def _on_message(self, event: MessageReceived) -> None:
        conv = self.conversation(event.sender)
        if event.msg_id and event.msg_id in conv.received:
            self._shown(event)  # already shown from the stored history
            return
        conv.received.add(event.msg_id)
        line = Line("peer", event.sender, event.text, event.sent_ms / 1000)
        conv.lines.append(line)
        if self.current is None:
            self.open_conversation(event.sender, focus=False)
        elif conv is self.current:
            self._render_line(line)
        # Inserted (in the open transcript, or in its conversation with an
        # unread count): now its receipt may tell the sender `delivered`.
        self._shown(event)
        if conv is not self.current or not self.focused:
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
        conv = self.conversation(event.to)
        line = conv.by_id.get(event.id)
        if line is None:
            line = Line("own", self.username or "me", event.text, time.time(), event.id)
            conv.by_id[event.id] = line
            conv.lines.append(line)
            line.state = event.state
            if conv is self.current:
                self._render_line(line)
            return
        line.state = event.state
        line.reason = event.reason
        if conv is self.current:
            self._render_state(line)

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

    def conversation(self, name: str) -> Conversation:
        key = name_key(name)
        conv = self.conversations.get(key)
        if conv is None:
            conv = self.conversations[key] = Conversation(name)
            self.contacts.insert("", "end", iid=key, text=tk_safe(name), values=("", ""))
            self._load_history(conv)
        return conv

    def _load_history(self, conv: Conversation) -> None:
        """What earlier runs stored of this conversation, oldest first."""
        store = self.session.store if self.session is not None else None
        if store is None:
            return
        for item in read_history(store.path, conv.name, upto=store.history_mark):
            if item.outgoing:
                line = Line("own", self.username or "me", item.text, item.ts_ms / 1000,
                            item.msg_id, item.state or MessageState.SENDING)  # fmt: skip
                conv.by_id[item.msg_id] = line
            else:
                line = Line("peer", item.peer, item.text, item.ts_ms / 1000)
                conv.received.add(item.msg_id)
            conv.lines.append(line)

    def open_conversation(self, name: str, *, focus: bool = True) -> None:
        conv = self.conversation(name)
        self.current = conv
        if self.session is not None:
            self.session.set_peer(conv.name)
        conv.unread = 0
        self._refresh_contact(conv)
        self._update_title()
        self.peer_label.configure(text=tk_safe(conv.name), style="TLabel")
        self.typing_label.configure(text="")
        key = name_key(conv.name)
        if self.contacts.selection() != (key,):
            self.contacts.selection_set(key)
        self._render_all()
        if focus:
            self._take_focus(self.composer)

    def _open_typed(self) -> None:
        name = self.new_chat_var.get().strip()
        if not name:
            return
        try:
            name = normalize_name(name)
        except LocalProtocolError as exc:
            self._system(self.current, f"Cannot open a chat with {name!r}: {exc}")
            return
        self.new_chat_var.set("")
        self.open_conversation(name)

    def _on_contact_selected(self, _event: object) -> None:
        selection = self.contacts.selection()
        if selection and (self.current is None or name_key(self.current.name) != selection[0]):
            conv = self.conversations.get(selection[0])
            if conv is not None:
                self.open_conversation(conv.name)

    def _refresh_contact(self, conv: Conversation) -> None:
        status = {None: "", True: "\u25cf online", False: "offline"}[conv.online]
        unread = str(conv.unread) if conv.unread else ""
        self.contacts.item(name_key(conv.name), values=(status, unread))

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

    def _at_bottom(self) -> bool:
        return self.transcript.yview()[1] >= 0.999

    def _render_all(self) -> None:
        text = self.transcript
        text.configure(state="normal")
        text.delete("1.0", "end")
        text.configure(state="disabled")
        if self.current is not None:
            for line in self.current.lines:
                self._render_line(line, follow=False)
        self._scroll_to_end()

    def _render_line(self, line: Line, *, follow: bool = True) -> None:
        text = self.transcript
        was_at_bottom = self._at_bottom()
        stamp = time.strftime("%H:%M", time.localtime(line.stamp))
        text.configure(state="normal")
        if text.index("end-1c") != "1.0":
            text.insert("end", "\n")
        self._insert(f"{stamp} ", ("stamp",))
        if line.kind == "system":
            self._insert(line.text, ("system",))
        else:
            self._insert(f"{line.who}: ", (line.kind, "who"))
            self._insert(line.text, (line.kind,))
            if line.kind == "own" and line.msg_id is not None:
                text.mark_set(f"st-{line.msg_id}", "end-1c")
                text.mark_gravity(f"st-{line.msg_id}", "left")
                self._insert_state(line)
        text.configure(state="disabled")
        if follow:
            if was_at_bottom or line.kind == "own":
                self._batch_scroll = True
                self.new_marker.place_forget()
            else:
                self.new_marker.place(relx=0.5, rely=1.0, anchor="s", y=-6)

    def _insert(self, content: str, tags: tuple[str, ...], index: str = "end") -> None:
        try:
            self.transcript.insert(index, content, tags)
        except tk.TclError:
            self.transcript.insert(
                index, tk_safe(content).encode("ascii", "replace").decode(), tags
            )

    def _insert_state(self, line: Line) -> None:
        tag = f"sttext-{line.msg_id}"
        mark = f"st-{line.msg_id}"
        label = STATE_LABELS.get(line.state or "", line.state or "")
        if line.state == MessageState.FAILED:
            reason = f" ({line.reason.replace('_', ' ')})" if line.reason else ""
            self.transcript.insert(mark, f"  {label}{reason} ", ("failed", tag))
            retry_tag = f"retry-{line.msg_id}"
            self.transcript.insert(f"{tag}.last", "Retry", ("retry", tag, retry_tag))
            self.transcript.tag_bind(retry_tag, "<Button-1>", self._retry_handler(line))
        else:
            self.transcript.insert(mark, f"  {label}", ("state", tag))

    def _render_state(self, line: Line) -> None:
        tag = f"sttext-{line.msg_id}"
        text = self.transcript
        text.configure(state="normal")
        ranges = text.tag_ranges(tag)
        if ranges:
            text.delete(ranges[0], ranges[-1])
        if f"st-{line.msg_id}" in text.mark_names():
            self._insert_state(line)
        text.configure(state="disabled")

    def _system(self, conv: Conversation | None, message: str) -> None:
        line = Line("system", "", message, time.time())
        if conv is None:
            self.peer_label.configure(text=tk_safe(message))
            return
        conv.lines.append(line)
        if conv is self.current:
            self._render_line(line)
            if self._batch_scroll:
                self._scroll_to_end()

    def _scroll_to_end(self) -> None:
        self.transcript.see("end")
        self.new_marker.place_forget()

    def state_of(self, msg_id: str) -> str | None:
        """The state shown for one of our messages (for tests and scripts)."""
        for conv in self.conversations.values():
            line = conv.by_id.get(msg_id)
            if line is not None:
                return line.state
        return None

    def transcript_text(self) -> str:
        return self.transcript.get("1.0", "end-1c")

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
            self._system(None, "Pick a contact or type a name under the list to start a chat.")
            return
        if len(text.encode("utf-8", "replace")) > MAX_TEXT_BYTES:
            self._update_size()
            return
        if self.session.send(text, to=self.current.name) is None:
            return
        self.history.append(text)
        self.composer.delete("1.0", "end")
        self._update_size()

    def _retry_handler(self, line: Line) -> Any:
        return lambda _event: self.retry(line)

    def retry(self, line: Line) -> None:
        """Send a failed message again, as a new message (once per failure)."""
        if self.session is None or self.current is None or line.state != MessageState.FAILED:
            return
        line.state = "retried"
        self._render_state(line)
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
        self.composer.focus_set()

    def find_next(self) -> bool:
        needle = self.find_var.get()
        text = self.transcript
        text.tag_remove("found", "1.0", "end")
        if not needle:
            return False
        start = text.index("insert +1c") if text.compare("insert", "<", "end-1c") else "1.0"
        pos = text.search(needle, start, nocase=True, stopindex="end") or text.search(
            needle, "1.0", nocase=True, stopindex="end"
        )
        if not pos:
            self.find_status.configure(text="not found", style="Error.TLabel")
            return False
        self.find_status.configure(text="", style="Muted.TLabel")
        end = f"{pos}+{len(needle)}c"
        text.tag_add("found", pos, end)
        text.mark_set("insert", pos)
        text.see(pos)
        return True

    # --- the rest ---------------------------------------------------------------

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

    def _on_focus_in(self, _event: object) -> None:
        self.focused = True
        if self.current is not None and self.current.unread:
            self.current.unread = 0
            self._refresh_contact(self.current)
            self._update_title()

    def _on_focus_out(self, event: Any) -> None:
        # FocusOut also fires when focus moves between our own widgets, and
        # with two windows in one app focus_get() names the other one's.
        self.focused = self._has_focus()

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
