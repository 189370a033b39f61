"""The window's contact list: every peer with history or news, the most
recently active first, with a search field and a scrollbar (split from
`client_window.py`).

At login the window fills it from the store (`client_store.read_contacts`),
so it is the same after a restart; a message in or out moves its peer to
the top. The filter hides what does not match (a case-insensitive piece of
the name) without forgetting it. Its rows are keyed by `protocol.name_key`.
The rows are drawn by `client_look.ContactCanvas` (round initials, presence,
unread badges; only the rows in view), which answers like a Treeview.
"""

from __future__ import annotations

import tkinter as tk
from collections.abc import Callable
from dataclasses import dataclass
from tkinter import ttk

from client_look import PAD, ContactCanvas, add_placeholder
from client_store import fold
from client_transcript import tk_safe


@dataclass
class Entry:
    name: str
    last: float  # last activity (wall clock, s): the order of the list
    status: str = ""
    unread: int = 0
    label: str | None = None  # shown instead of the name (a group: `#team (3)`)


class ContactList:
    """A search field over a scrolled list of contacts."""

    def __init__(self, parent: tk.Misc, on_select: Callable[[str], None]) -> None:
        self.on_select = on_select
        self.frame = ttk.Frame(parent, style="Sidebar.TFrame")
        self.search_var = tk.StringVar()
        self.search_entry = ttk.Entry(self.frame, textvariable=self.search_var, width=8)
        self.search_entry.pack(fill="x", pady=(PAD // 2, 0))
        add_placeholder(self.search_entry, self.search_var, "Search contacts")
        self.search_var.trace_add("write", lambda *_: self._refilter())
        body = ttk.Frame(self.frame, style="Sidebar.TFrame")
        body.pack(fill="both", expand=True, pady=(PAD // 2, 0))
        self.tree = ContactCanvas(body, height=4, width=170)
        self.scrollbar = ttk.Scrollbar(body, orient="vertical", command=self.tree.yview)
        self.tree.configure(yscrollcommand=self._on_scrolled)
        self.tree.pack(side="left", fill="both", expand=True)
        self.tree.bind("<<TreeviewSelect>>", self._on_selected)
        self.entries: dict[str, Entry] = {}

    def _on_scrolled(self, first: float | str, last: float | str) -> None:
        """The scrollbar shows only when there is more than fits (rows have
        a fixed height, so showing it never changes what fits)."""
        self.scrollbar.set(first, last)
        needed = float(first) > 0.0 or float(last) < 1.0
        if needed and not self.scrollbar.winfo_manager():
            self.scrollbar.pack(side="right", fill="y", before=self.tree)
        elif not needed and self.scrollbar.winfo_manager():
            self.scrollbar.pack_forget()

    # --- contents ---------------------------------------------------------------

    def fill(self, contacts: list[tuple[str, str, float]]) -> None:
        """Replace the list with (key, name, last activity) rows, any order."""
        self.tree.delete(*self.tree.get_children())
        self.entries = {key: Entry(name, last) for key, name, last in contacts}
        self._refilter()

    def add(self, key: str, name: str, last: float = 0.0) -> None:
        """A new contact, in its place by last activity (0: at the end)."""
        if key in self.entries:
            return
        self.entries[key] = entry = Entry(name, last)
        if self._matches(entry):
            self.tree.insert("", self._position(entry), iid=key, text=tk_safe(name),
                             values=("", ""))  # fmt: skip

    def touch(self, key: str, last: float) -> None:
        """Activity with `key` at `last`: it moves up to its place."""
        entry = self.entries.get(key)
        if entry is None or last <= entry.last:
            return
        entry.last = last
        if self.tree.exists(key) and self.tree.prev(key) != "":  # the top one stays there
            self.tree.move(key, "", self._position(entry, moving=key))

    def set_label(self, key: str, label: str | None) -> None:
        """Show `label` for `key` instead of its name (None: the name again)."""
        entry = self.entries.get(key)
        if entry is None or entry.label == label:
            return
        entry.label = label
        if self.tree.exists(key):
            self.tree.item(key, text=tk_safe(label or entry.name))

    def set_state(self, key: str, status: str, unread: int) -> None:
        entry = self.entries.get(key)
        if entry is None:
            return
        entry.status, entry.unread = status, unread
        if self.tree.exists(key):
            self.tree.item(key, values=(status, str(unread) if unread else ""))

    def order(self) -> list[str]:
        """The keys shown, top to bottom (for tests)."""
        return list(self.tree.get_children())

    # --- selection ----------------------------------------------------------------

    def select(self, key: str) -> None:
        if self.tree.exists(key) and self.tree.selection() != (key,):
            self.tree.selection_set(key)
            self.tree.see(key)

    def selected(self) -> str | None:
        selection = self.tree.selection()
        return str(selection[0]) if selection else None

    def _on_selected(self, _event: object) -> None:
        key = self.selected()
        if key is not None:
            self.on_select(key)

    # --- order and filter ---------------------------------------------------------

    def _matches(self, entry: Entry) -> bool:
        needle = fold(self.search_var.get().strip())
        return not needle or needle in fold(entry.name)

    def _position(self, entry: Entry, moving: str | None = None) -> int:
        """Where `entry` goes among the shown rows (newest activity first).
        The rows are kept sorted, so the first older one is found by
        bisection: a move costs O(log n) look-ups, not a re-sort."""
        rows = [k for k in self.tree.get_children() if k != moving]
        low, high = 0, len(rows)
        while low < high:
            mid = (low + high) // 2
            if self.entries[rows[mid]].last >= entry.last:
                low = mid + 1
            else:
                high = mid
        return low

    def _refilter(self) -> None:
        shown = sorted(
            (key for key, entry in self.entries.items() if self._matches(entry)),
            key=lambda k: self.entries[k].last,
            reverse=True,
        )
        selected = self.selected()
        self.tree.delete(*self.tree.get_children())
        for key in shown:
            entry = self.entries[key]
            unread = str(entry.unread) if entry.unread else ""
            self.tree.insert("", "end", iid=key, text=tk_safe(entry.label or entry.name),
                             values=(entry.status, unread))  # fmt: skip
        if selected is not None and self.tree.exists(selected):
            self.tree.selection_set(selected)
