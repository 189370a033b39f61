"""The window's account dialogs: change the password, delete the account.

Kept apart from `client_window.py` (which others rework) as a small hook:
`add_account_menu` puts an "Account" menu with "Change password..." and
"Delete account..." on the window's menu bar (made if the window has none),
each opening a small modal dialog that hands what was typed to the
window's session (`ChatSession.change_password`, `.delete_account`);
`on_account_event` shows the answers (`PasswordChanged`, `AccountDeleted`)
in the window. The same menu cancels the messages to the current contact
the server has not accepted yet, e.g. those waiting for its account
(`ChatSession.cancel`, the terminal's `/cancel NAME`).
The server checks the password (a SCRAM proof made by the session's core;
the password never crosses the network), so a wrong one comes back as an
ordinary `bad_password` error, shown as a system line.

It imports nothing of the window (no cycle): the window is anything with
the few attributes `AccountWindow` lists. Tk on the main thread only, as
the window.
"""

from __future__ import annotations

import tkinter as tk
from collections.abc import Callable
from tkinter import ttk
from typing import Any, Protocol

from client_core import AccountDeleted, Cancelled, PasswordChanged


class AccountWindow(Protocol):
    """What the dialogs use of `client_window.ChatWindow`."""

    top: tk.Tk | tk.Toplevel
    session: Any  # a `client_window.Session` with change_password / delete_account
    username: str | None
    current: Any

    def _system(self, conv: Any, message: str) -> None: ...

    def _back_to_login(self, message: str) -> None: ...


def add_account_menu(window: AccountWindow) -> tk.Menu:
    """The "Account" menu on the window's menu bar (made when it has none)."""
    top = window.top
    bar_name = str(top.cget("menu"))
    bar: tk.Menu = top.nametowidget(bar_name) if bar_name else tk.Menu(top)
    if not bar_name:
        top.configure(menu=bar)
    menu = tk.Menu(bar, tearoff=False)
    menu.add_command(label="Change password\u2026", command=lambda: change_password_dialog(window))
    menu.add_command(label="Delete account\u2026", command=lambda: delete_account_dialog(window))
    menu.add_separator()
    menu.add_command(label="Cancel unsent messages to this contact",
                     command=lambda: cancel_waiting(window))  # fmt: skip
    # Before "Help", which stays last as people expect.
    end = bar.index("end")
    labels = [bar.entrycget(i, "label") for i in range(int(end) + 1)] if end is not None else []
    if "Help" in labels:
        bar.insert_cascade(labels.index("Help"), label="Account", menu=menu, underline=0)
    else:
        bar.add_cascade(label="Account", menu=menu, underline=0)
    return menu


def cancel_waiting(window: AccountWindow) -> bool:
    """End the messages to the current contact the server has not accepted
    (the terminal's `/cancel NAME`): waiting for its account, not sent yet,
    or in flight; each shows `failed (cancelled)`. False when no
    conversation is open."""
    if not _logged_in(window):
        return False
    if window.current is None:
        window._system(None, "Open a conversation first.")
        return False
    window.session.cancel(window.current.name)
    return True


def on_account_event(
    window: AccountWindow, event: PasswordChanged | AccountDeleted | Cancelled
) -> None:
    """Show the server's answer to a dialog, or what a cancel dropped."""
    if isinstance(event, Cancelled):
        count, late = len(event.ids), len(event.accepted)
        parts: list[str] = []
        if count:
            parts.append(f"Cancelled {count} message{'s' if count != 1 else ''} to {event.to}.")
        if late:  # in flight when cancelled, and accepted by the server meanwhile
            them = "them" if late > 1 else "it"
            parts.append(f"Too late for {late}: the server had accepted {them} before the "
                         f"cancel reached it; {event.to} will get {them}.")  # fmt: skip
        nothing = f"Nothing to cancel: no message to {event.to} is waiting or unsent."
        window._system(window.current, " ".join(parts) or nothing)
    elif isinstance(event, PasswordChanged):
        window._system(window.current, "Password changed. Your other sessions were logged out.")
    else:
        window._back_to_login(f"Account {event.user} deleted; the server keeps nothing of it.")


class Dialog:
    """A small modal dialog: labelled fields, a problem line, OK and Cancel.
    `accept(values)` returns a problem to show, or None to close it."""

    def __init__(
        self, window: AccountWindow, title: str, fields: list[tuple[str, bool]], ok: str,
        accept: Callable[[list[str]], str | None], note: str = "",
    ) -> None:  # fmt: skip
        self.top = tk.Toplevel(window.top)
        self.top.title(title)
        self.top.transient(window.top)
        self.top.resizable(False, False)
        self._accept = accept
        body = ttk.Frame(self.top, padding=16)
        body.pack(fill="both", expand=True)
        row = 0
        if note:
            ttk.Label(body, text=note, wraplength=320).grid(row=0, column=0, columnspan=2,
                                                            sticky="w", pady=(0, 8))  # fmt: skip
            row = 1
        self.vars: list[tk.StringVar] = []
        self.entries: list[ttk.Entry] = []
        for label, secret in fields:
            var = tk.StringVar(self.top)
            ttk.Label(body, text=label).grid(row=row, column=0, sticky="w", padx=(0, 12), pady=4)
            entry = ttk.Entry(body, textvariable=var, width=28, show="\u2022" if secret else "")
            entry.grid(row=row, column=1, sticky="ew", pady=4)
            entry.bind("<Return>", lambda e: self.submit())
            self.vars.append(var)
            self.entries.append(entry)
            row += 1
        self.problem = ttk.Label(body, text="", style="Error.TLabel", wraplength=320)
        self.problem.grid(row=row, column=0, columnspan=2, sticky="w")
        buttons = ttk.Frame(body)
        buttons.grid(row=row + 1, column=0, columnspan=2, sticky="e", pady=(8, 0))
        ttk.Button(buttons, text="Cancel", command=self.close).pack(side="right")
        self.ok_button = ttk.Button(buttons, text=ok, command=self.submit)
        self.ok_button.pack(side="right", padx=(0, 6))
        self.top.bind("<Escape>", lambda e: self.close())
        self.top.protocol("WM_DELETE_WINDOW", self.close)
        if self.entries:
            self.entries[0].focus_set()

    def submit(self) -> None:
        problem = self._accept([var.get() for var in self.vars])
        if problem is None:
            self.close()
        else:
            self.problem.configure(text=problem)

    def close(self) -> None:
        self.top.destroy()


def _logged_in(window: AccountWindow) -> bool:
    if window.session is None or window.username is None:
        window._system(window.current, "Log in first.")
        return False
    return True


def change_password_dialog(window: AccountWindow) -> Dialog | None:
    """Ask the current password and the new one (twice)."""
    if not _logged_in(window):
        return None

    def accept(values: list[str]) -> str | None:
        old, new, again = values
        if not old or not new:
            return "Type your current password and a new one."
        if new != again:
            return "The new passwords differ."
        window.session.change_password(old, new)
        window._system(window.current, "Changing the password\u2026")
        return None

    fields = [("Current password", True), ("New password", True), ("New password again", True)]
    return Dialog(window, "Change password", fields, "Change", accept)


def delete_account_dialog(window: AccountWindow) -> Dialog | None:
    """Ask the password and the account's name, typed again, to confirm."""
    if not _logged_in(window):
        return None
    name = window.username or ""

    def accept(values: list[str]) -> str | None:
        password, typed = values
        if not password:
            return "Type your password."
        if typed.strip().casefold() != name.casefold():
            return f"Type {name} to confirm."
        window.session.delete_account(password)
        return None

    note = (f"Delete the account {name} and everything the server keeps for it? Nobody can "
            "register the name for a while after. This cannot be undone.")  # fmt: skip
    fields = [("Password", True), (f"Type {name} to confirm", False)]
    return Dialog(window, "Delete account", fields, "Delete", accept, note)
