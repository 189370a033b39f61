"""The window's groups (issue 14): what a group conversation adds to
`client_window.ChatWindow`, kept apart so the window's own module only
holds small hooks that call in here.

- `GroupsUI`: per group its owner, members (in joining order) and the
  members' presence, learnt from `GroupsListed`, `MembersListed` and each
  `GroupChanged`; the contact list's line for a group (`#team`, member
  count, unread); membership changes as muted lines in the transcript; the
  states of our group messages ("✓✓ 2 of 3"; the window's hover over one
  names the members who have it: `hover_text`).
- `MembersPanel`: beside an open group's transcript: the members with a
  presence dot, the owner marked, Add (any member), Remove (the owner),
  Leave (once `LeaveDialog` confirms it).
- `NewGroupDialog`: "New group": a name and the first members.
- `LeaveDialog`: "Leave #team?", naming who becomes owner if it is ours.

Like the rest of the window it runs on the Tk thread only; it reaches the
network through the window's session (`group`, `watch`), whose answers come
back as events through the window's queue. It imports nothing of
`client_window` (which imports it: no cycle): what it uses of the window is
`GroupWindow`, and the window hands it its `Line` class and `tk_safe`. A
group's stored lines come through the window's own history reading (rows
with a sender and a change); the states of our group messages, as far as
they are stored, through `client_store.read_group_receipts`.
"""

from __future__ import annotations

import time
import tkinter as tk
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from tkinter import ttk
from typing import Any, Protocol

from client_core import (
    ClientError,
    ErrorEvent,
    GroupChanged,
    GroupsListed,
    GroupUnchanged,
    MembersListed,
    MessageState,
    PresenceChanged,
    RecipientsChanged,
    StatusChanged,
    WhoList,
    check_group_request,
)
from client_look import name_list
from client_store import read_group_receipts
from protocol import GroupAction, group_address, is_group_address, name_key


class LineView(Protocol):
    """A transcript line (`client_window.Line`), as far as groups read it."""

    msg_id: str | None
    state: str | None


class ConversationView(Protocol):
    """A conversation of the window (`client_window.Conversation`)."""

    name: str
    unread: int
    lines: list[Any]  # of the window's `Line`
    by_id: dict[str, Any]
    received: set[str]
    online: bool | None  # a person's presence as the contact list shows it (None: unknown)


class StoreView(Protocol):
    @property
    def path(self) -> Path: ...

    @property
    def history_mark(self) -> int: ...


class GroupSession(Protocol):
    """What groups use of the window's session (`chat_client.ChatSession`)."""

    @property
    def store(self) -> StoreView | None: ...

    def group(
        self, action: GroupAction, group: str = "", users: tuple[str, ...] | list[str] = ()
    ) -> bool: ...
    def watch(self, name: str) -> None: ...
    def shown(self, message_id: int, *, wait: float = 0.0) -> bool: ...


class ContactsView(Protocol):
    """The window's contact list (`client_contacts.ContactList`)."""

    frame: ttk.Frame

    @property
    def entries(self) -> Mapping[str, Any]: ...  # by name key, each with its `name`

    def set_state(self, key: str, status: str, unread: int) -> None: ...
    def set_label(self, key: str, label: str | None) -> None: ...


class GroupWindow(Protocol):
    """What groups use of the window (`client_window.ChatWindow`)."""

    top: tk.Tk | tk.Toplevel
    transcript: tk.Text
    _banner_anchor: ttk.Frame
    who_button: ttk.Button  # "New group" goes above it

    @property
    def contact_list(self) -> ContactsView: ...

    @property
    def session(self) -> GroupSession | None: ...

    @property
    def username(self) -> str | None: ...

    @property
    def conversations(self) -> Mapping[str, ConversationView]: ...

    @property
    def current(self) -> ConversationView | None: ...

    def conversation(self, name: str, *, last: float = 0.0) -> ConversationView: ...
    def open_conversation(self, name: str, *, focus: bool = True) -> None: ...
    def _add_line(self, conv: Any, line: Any) -> None: ...
    def _system(self, conv: Any, message: str, kind: str = "system") -> None: ...


#: `client_transcript.Line`'s constructor: (kind, who, text, stamp, msg_id, state).
MakeLine = Callable[..., Any]

#: Presence is followed for this many members of each group at most, and
#: this many group members in all: a WATCH counts against the user's
#: message budget (`--user-msg-rate`, 200/s, burst 500), and a login with a
#: few 1,000-member groups must not spend it on dots for strangers.
WATCH_MEMBERS_MAX = 50
WATCH_TOTAL_MAX = 200
ONLINE_DOT = "\u25cf"  # ●
OFFLINE_DOT = "\u25cb"  # ○
#: At login the members of this many groups (the open one, the most
#: recently active) are asked for; any other group's when it is opened.
MEMBERS_AT_LOGIN = 20
#: A member whose presence is not followed (past the caps above): not
#: known, so not drawn offline (audit14 A9: 11 of 60 online members were).
UNKNOWN_DOT = "\u25cc"  # ◌
PANEL_WIDTH = 190
#: The members panel shows beside the transcript from this window width on.
PANEL_ROOM = 640


@dataclass
class GroupInfo:
    """What the window knows of one group."""

    name: str  # no '#'
    owner: str = ""
    members: list[str] = field(default_factory=list)  # in joining order
    member: bool = True  # False once we left or were removed
    # `members` is all of them (a creation or a /members answer, kept up by
    # the changes since); not when we were added to a group whose members we
    # had not been told: then they are the ones added with us, and no count
    # is shown until the group's list comes (audit7 N10: "145 members" of 402).
    complete: bool = False

    def has(self, user: str) -> bool:
        key = name_key(user)
        return any(name_key(m) == key for m in self.members)

    def drop(self, users: tuple[str, ...] | list[str]) -> None:
        gone = {name_key(u) for u in users}
        self.members = [m for m in self.members if name_key(m) not in gone]


@dataclass
class Receipts:
    """Our group message: how many members it went to, who has it."""

    recipients: int | None = None
    by: list[str] = field(default_factory=list)


def group_of(name: str) -> str | None:
    """`#team` -> `team`; a user's name -> None."""
    return name[1:] if is_group_address(name) else None


def delivered_label(receipts: Receipts) -> str:
    """The state text of a delivered group message: "✓✓ 2 of 3"."""
    total = receipts.recipients
    count = len(receipts.by)
    return f"\u2713\u2713 {count} of {total}" if total is not None else f"\u2713\u2713 {count}"


class GroupsUI:
    """The window's groups; `window` calls in through its hooks."""

    def __init__(
        self, window: GroupWindow, make_line: MakeLine, tk_safe: Callable[[str], str]
    ) -> None:
        self.w = window
        self.make_line = make_line
        self.tk_safe = tk_safe
        self.groups: dict[str, GroupInfo] = {}  # by name key of the bare name
        self.presence: dict[str, bool] = {}  # by user name key
        self.receipts: dict[str, Receipts] = {}  # by our message id
        self._not_ours: set[str] = set()  # ids the store had no group receipts for
        self.watched: set[str] = set()
        self.dialog: NewGroupDialog | None = None
        left = window.contact_list.frame.master
        self.new_button = ttk.Button(left, text="New group\u2026", command=self.open_dialog)
        # Above "Who is online" and packed before the list, which gives way
        # first: the button stays at the window's minimum size.
        self.new_button.pack(side="bottom", fill="x", pady=(6, 0), after=window.who_button)
        self.panel = MembersPanel(window._banner_anchor, self)
        self.shown_group: str | None = None
        # Whether this session's GROUP_LIST has come: until it has, a group
        # conversation from the history may be one we left; and the groups
        # this session saw a change of, or made (the list may be older).
        self.listed = False
        self.changed_here: set[str] = set()
        # Groups whose members this session asked for (once each, when first
        # opened: asking every group at login spent the user's own message
        # budget, audit14 A11); change events keep them current after.
        self.asked: set[str] = set()
        # "New group…" requests sent, not answered yet: name key -> (the name
        # and members typed). The conversation opens once it is created; a
        # refusal opens the dialog again with them and the reason (audit14
        # A5, A8: before, a phantom group showed the error as a change).
        self.creating: dict[str, tuple[str, list[str]]] = {}

    # --- state ----------------------------------------------------------------

    def info(self, group: str) -> GroupInfo:
        key = name_key(group)
        known = self.groups.get(key)
        if known is None:
            known = self.groups[key] = GroupInfo(group)
        return known

    def knows_member(self, user: str) -> bool:
        return any(g.has(user) for g in self.groups.values())

    # --- hooks: events ----------------------------------------------------------

    def logged_in(self) -> None:
        """Ask which groups we are in (each then asks for its members). A
        new session (perhaps another user's) starts from nothing."""
        self.groups.clear()
        self.presence.clear()
        self.watched.clear()
        self.receipts.clear()
        self._not_ours.clear()
        self.listed = False
        self.changed_here.clear()
        self.asked.clear()
        self.creating.clear()
        if self.w.session is not None:
            self.w.session.group(GroupAction.LIST)

    def handle(self, event: GroupChanged | MembersListed | GroupsListed | GroupUnchanged) -> None:
        if isinstance(event, GroupUnchanged):
            # The answer to an Add that changed nothing: said in the group's
            # transcript (before, nothing was: the field just emptied).
            names = name_list(event.users)
            are = "is a member" if len(event.users) == 1 else "are members"
            conv = self.w.conversation(group_address(event.group))
            text = f"{names} {are} of #{event.group} already"
            self.w._add_line(conv, self.make_line("system", "", text, time.time()))
        elif isinstance(event, GroupsListed):
            self.listed = True
            listed = {name_key(g) for g in event.groups}
            for group in event.groups:
                self.info(group).member = True
                self.w.conversation(group_address(group))
            # Members (the count on the contact line, the panel) of the open
            # group and the most recently active few; the rest when opened.
            # Asking every group at login spent the user's own message budget:
            # in 10,000 groups her message waited a minute (audit14 A11).
            entries = self.w.contact_list.entries
            recent = sorted(event.groups, key=lambda g: -getattr(
                entries.get(name_key(group_address(g))), "last", 0.0))  # fmt: skip
            if self.shown_group is not None and name_key(self.shown_group) in listed:
                recent.insert(0, self.shown_group)
            for group in recent[:MEMBERS_AT_LOGIN]:
                self._ask_members(group)
            # A group conversation of the history that the server does not
            # list is one we left or were removed from (before, it was taken
            # for one we are in after a restart: Add and Leave enabled, and
            # each opening asked for its members and showed the refusal).
            shown = [e.name for e in self.w.contact_list.entries.values()]
            for name in {*shown, *(c.name for c in self.w.conversations.values())}:
                former = group_of(name)
                if (
                    former is None
                    or name_key(former) in listed
                    or name_key(former) in self.changed_here
                ):
                    continue
                info = self.info(former)
                info.member = False
                self._changed(info)
                if name_key(name) not in self.w.conversations:  # (a line of the list only)
                    self.w.contact_list.set_state(name_key(name), "left", 0)
        elif isinstance(event, MembersListed):
            info = self.info(event.group)
            info.owner = event.owner
            info.members = list(event.members)
            info.complete = True
            info.member = self.w.username is not None and info.has(self.w.username)
            self._watch(info)
            self._changed(info)
        else:
            self._on_change(event)

    def _on_change(self, event: GroupChanged) -> None:
        info = self.info(event.group)
        self.changed_here.add(name_key(event.group))
        me = self.w.username or ""
        if event.change == "created":
            info.owner = event.by
            info.members = list(event.users)
            info.member = True
            info.complete = True
        elif event.change == "added":
            info.members.extend(u for u in event.users if not info.has(u))
            if any(name_key(u) == name_key(me) for u in event.users):
                # What happened while we were out (or before we were in) was
                # not ours to see: the list is whole again at its answer.
                info.complete = info.complete and info.member
                info.member = True
                self.asked.discard(name_key(event.group))  # learn who is there when opened
                if self.shown_group is not None and name_key(self.shown_group) == name_key(
                    event.group
                ):
                    self._ask_members(event.group)
        elif event.change in ("removed", "left"):
            gone = list(event.users) if event.change == "removed" else [event.user]
            info.drop(gone)
            if any(name_key(u) == name_key(me) for u in gone):
                info.member = False
        elif event.change == "owner":
            info.owner = event.user
        conv = self.w.conversation(event.conversation)
        line = self.make_line("system", "", event.describe(), event.sent_ms / 1000)
        line.seq, line.life = event.seq, event.life
        self.w._add_line(conv, line)
        if event.change == "created" and name_key(event.by) == name_key(me):
            if self.creating.pop(name_key(event.group), None) is not None:
                self.w.open_conversation(event.conversation)  # the group we asked for
        # In the transcript (or its conversation's lines): now it may be receipted.
        if self.w.session is not None:
            self.w.session.shown(event.id)
        self._watch(info)
        self._changed(info)

    def on_presence(self, event: PresenceChanged) -> bool:
        """Record a member's presence; True if the user is only a group
        member (no conversation of their own to show it in)."""
        self.presence[name_key(event.user)] = event.online
        self._refresh_panel()
        return name_key(event.user) not in self.w.conversations and self.knows_member(event.user)

    def on_who(self, event: WhoList) -> None:
        online = {name_key(u) for u in event.users}
        for key in self.watched:
            self.presence[key] = key in online
        self._refresh_panel()

    def on_status(self, event: StatusChanged) -> None:
        """Count our group message's recipients and who has it."""
        if event.group is None:
            return
        receipts = self.receipts.setdefault(event.id, Receipts())
        if event.recipients is not None:
            receipts.recipients = event.recipients
        if event.by is not None and all(name_key(b) != name_key(event.by) for b in receipts.by):
            receipts.by.append(event.by)

    def on_recipients(self, event: RecipientsChanged) -> None:
        """A member of ours never will have our message: "of N" goes down."""
        receipts = self.receipts.get(event.id)
        if receipts is not None:
            receipts.recipients = event.recipients

    # --- hooks: the window's pieces --------------------------------------------

    def refresh_contact(self, conv: ConversationView) -> bool:
        """The contact line of a group: `#team`, its member count, unread."""
        group = group_of(conv.name)
        if group is None:
            return False
        info = self.groups.get(name_key(group))
        status = ""
        if info is not None and not info.member:
            status = "left"
        elif info is not None and info.members and info.complete:
            # The member count on the line under the name, which an unread
            # badge does not shorten as it does the name (before, "#team
            # (3)" lost its count to the badge: the name was cut first).
            count = len(info.members)
            status = f"group \u00b7 {count} member{'s' if count != 1 else ''}"
        key = name_key(conv.name)
        self.w.contact_list.set_label(key, None)  # (the name: `#team`)
        self.w.contact_list.set_state(key, status, conv.unread)
        return True

    def not_ours(self, name: str) -> str | None:
        """Why "New chat with…" does not open `name`: a group this session's
        list does not have, that no change or conversation of ours knows
        (before, `#zzz` left a contact that said "You are not a member of
        #zzz any more": audit7 N8); None for anything else. The session's
        list says which groups we are in; which of the others exist is not
        ours to know, so the line says neither."""
        group = group_of(name)
        if group is None or not self.listed:
            return None  # a person, or too early to tell: it opens
        key = name_key(group)
        info = self.groups.get(key)
        if (info is not None and info.member) or key in self.creating:
            return None
        if name_key(name) in self.w.conversations or name_key(name) in self.w.contact_list.entries:
            return None  # one we were in: its history opens
        return f"There is no group #{group} you are in."

    def refusal(self, conv: ConversationView | None) -> str | None:
        """Why nothing can be sent to `conv` (a group we left or were
        removed from), or None: the composer keeps the text, and a failed
        message is not retried (it could only fail again)."""
        group = group_of(conv.name) if conv is not None else None
        info = self.groups.get(name_key(group)) if group is not None else None
        if info is None or info.member:
            return None
        return f"You are not a member of #{info.name} any more: nothing is sent to it."

    def state_label(self, line: LineView) -> str | None:
        """The state text of our group message ("✓✓ 2 of 3"), None otherwise."""
        if line.msg_id is None:
            return None
        if line.msg_id not in self.receipts:
            self._read_receipts(line.msg_id)
        if line.msg_id not in self.receipts:
            return None
        receipts = self.receipts[line.msg_id]
        if line.state == MessageState.DELIVERED:
            return delivered_label(receipts)
        if line.state == MessageState.ACCEPTED and receipts.recipients is not None:
            return f"\u2713 on server \u00b7 0 of {receipts.recipients}"
        return None

    def hover_text(self, line: LineView) -> str | None:
        """What the hover over our group message adds: who has it ("✓✓ 2
        of 3" names them), or None for any other line."""
        if line.msg_id is None:
            return None
        if line.msg_id not in self.receipts:
            self._read_receipts(line.msg_id)
        receipts = self.receipts.get(line.msg_id)
        if receipts is None:
            return None
        of = f" of {receipts.recipients}" if receipts.recipients is not None else ""
        if not receipts.by:
            if line.state in (MessageState.FAILED, "retried"):
                return None  # refused: no member will have it (not "none has it yet")
            return f"Members    none has it yet (0{of})"
        # The first few names: a line naming 1,000 members killed the window
        # (audit7 N9); the tooltip wraps and clips whatever it gets too.
        return f"Members    {len(receipts.by)}{of} have it: {name_list(receipts.by)}"

    def _read_receipts(self, msg_id: str) -> None:
        """What the store has of our message `msg_id` and the others in the
        open group (lines read from the history: the first page, earlier
        pages, a search's), in one read."""
        conv = self.w.current
        session = self.w.session
        store = session.store if session is not None else None
        if conv is None or group_of(conv.name) is None or store is None or not self.w.username:
            return
        unknown = [m for m in {msg_id, *conv.by_id}
                   if m not in self.receipts and m not in self._not_ours]  # fmt: skip
        if not unknown:
            return
        found = read_group_receipts(store.path, self.w.username, unknown)
        for msg_id in unknown:
            if msg_id not in found:
                self._not_ours.add(msg_id)  # not stored yet, or not accepted: asked once
                continue
            recipients, stored = found[msg_id]
            self.receipts[msg_id] = Receipts(recipients, list(stored))

    def opened(self, conv: ConversationView) -> None:
        """A conversation opened: a group's shows its members panel."""
        group = group_of(conv.name)
        if group is None:
            self.shown_group = None
            self.panel.hide()
            return
        self.shown_group = group
        known = name_key(group) in self.groups
        info = self.info(group)
        if self.listed and not known:
            # Not in the session's list, nothing of it came since ("New chat
            # with #typo"): not ours, no live panel (audit14 A8).
            info.member = False
        self.panel.show()
        self._refresh_panel()
        # A group we left has no members to tell us about; before the
        # session's list came, we may have left it.
        if info.member and self.listed:
            self._ask_members(group)

    # --- actions ------------------------------------------------------------------

    def open_dialog(self) -> None:
        if self.w.session is None:
            return
        if self.dialog is not None and self.dialog.top.winfo_exists():
            self.dialog.top.lift()
            return
        self.dialog = NewGroupDialog(self)

    def create(self, name: str, members: list[str]) -> str | None:
        """Ask for `#name` with `members`; None, or what is wrong (nothing
        sent). Its conversation opens once the server created it."""
        try:
            group, users = check_group_request(GroupAction.CREATE, name, members)
        except ClientError as exc:
            return exc.message
        if self.w.session is None:
            return "not logged in"
        self.w.session.group(GroupAction.CREATE, group, users)
        self.creating[name_key(group)] = (name, members)
        return None

    def on_error(self, event: ErrorEvent) -> bool:
        """A refused group request, said where it belongs: a "New group…"
        in its dialog again (with what was typed), any other in its group's
        conversation as an error line; False for any other error."""
        if event.group is None:
            return False
        key = name_key(event.group)
        typed = self.creating.pop(key, None) if event.action == GroupAction.CREATE else None
        if typed is not None:
            self.open_dialog()
            if self.dialog is not None:
                self.dialog.refused(*typed, event.message)
            return True
        conv = self.w.conversations.get(name_key(group_address(event.group)))
        if conv is None:
            return False
        self.w._system(conv, event.message, "error")
        return True

    def add(self, users: list[str]) -> str | None:
        return self._request(GroupAction.ADD, users)

    def remove(self, users: list[str]) -> str | None:
        return self._request(GroupAction.REMOVE, users)

    def leave(self) -> str | None:
        return self._request(GroupAction.LEAVE, [])

    def _request(self, action: GroupAction, users: list[str]) -> str | None:
        group = self.shown_group
        if group is None or self.w.session is None:
            return "open a group first"
        try:
            check_group_request(action, group, users)
        except ClientError as exc:
            return exc.message
        if users:
            for user in users:  # one change (and one answer) per user, as the terminal does
                self.w.session.group(action, group, (user,))
        else:
            self.w.session.group(action, group)
        return None

    def is_owner(self) -> bool:
        info = self.groups.get(name_key(self.shown_group or ""))
        me = self.w.username
        return info is not None and me is not None and name_key(info.owner) == name_key(me)

    # --- helpers ------------------------------------------------------------------

    def _ask_members(self, group: str) -> None:
        """Ask the server who is in `group`, once a session (see `asked`)."""
        key = name_key(group)
        if self.w.session is not None and key not in self.asked:
            self.asked.add(key)
            self.w.session.group(GroupAction.MEMBERS, group)

    def _watch(self, info: GroupInfo) -> None:
        """Follow the presence of the group's first members (the panel's dots)."""
        session = self.w.session
        me = name_key(self.w.username or "")
        if session is None:
            return
        for member in info.members[:WATCH_MEMBERS_MAX]:
            key = name_key(member)
            if len(self.watched) >= WATCH_TOTAL_MAX:
                return
            if key != me and key not in self.watched:
                self.watched.add(key)
                session.watch(member)

    def _changed(self, info: GroupInfo) -> None:
        conv = self.w.conversations.get(name_key(group_address(info.name)))
        if conv is not None:
            self.refresh_contact(conv)
        self._refresh_panel()

    def _refresh_panel(self) -> None:
        if self.shown_group is None:
            return
        info = self.info(self.shown_group)
        me = name_key(self.w.username or "")
        rows: list[tuple[str, str, str]] = []  # (user, text, tag)
        for member in info.members:
            key = name_key(member)
            online = key == me or self.presence.get(key, False)
            known = online or key in self.presence or key in self.watched
            contact = self.w.conversations.get(key)
            if not known and contact is not None and contact.online is not None:
                online, known = contact.online, True  # as the contact list shows them
            marks = [m for m, yes in (("you", key == me), ("owner", key == name_key(info.owner)))
                     if yes]  # fmt: skip
            dot = ONLINE_DOT if online else OFFLINE_DOT if known else UNKNOWN_DOT
            text = f"{dot} {member}" + (f" ({', '.join(marks)})" if marks else "")
            tag = "online" if online else "offline" if known else "unknown"
            rows.append((member, text, tag))
        self.panel.fill(info, rows, owner=self.is_owner())


class MembersPanel:
    """The members of the open group, beside its transcript."""

    def __init__(self, panes: ttk.Frame, groups: GroupsUI) -> None:
        self.groups = groups
        frame = self.frame = ttk.Frame(panes, padding=(0, 8, 8, 8), width=PANEL_WIDTH)
        self.title = ttk.Label(frame, text="Members", font=("TkDefaultFont", 11, "bold"))
        self.title.pack(anchor="w")
        # A group we are not in any more says so (before, an empty list and
        # greyed buttons, with nothing said until a message was refused).
        self.note = ttk.Label(frame, text="", style="Muted.TLabel", wraplength=PANEL_WIDTH - 10)
        self.tree = ttk.Treeview(frame, show="tree", selectmode="extended", height=10)
        self.tree.column("#0", width=PANEL_WIDTH - 10)
        self.tree.tag_configure("online", foreground="#1b7f2a")
        self.tree.tag_configure("offline", foreground="#888888")
        self.tree.tag_configure("unknown", foreground="#888888")
        self.tree.bind("<<TreeviewSelect>>", lambda e: self._update_buttons())
        add_row = ttk.Frame(frame)
        self.add_var = tk.StringVar()
        self.add_entry = ttk.Entry(add_row, textvariable=self.add_var, width=10)
        self.add_entry.pack(side="left", fill="x", expand=True)
        self.add_entry.bind("<Return>", lambda e: self.add())
        self.add_button = ttk.Button(add_row, text="Add", width=5, command=self.add)
        self.add_button.pack(side="left", padx=(4, 0))
        self.remove_button = ttk.Button(frame, text="Remove", command=self.remove)
        self.leave_button = ttk.Button(frame, text="Leave group", command=self.leave)
        self.error = ttk.Label(frame, text="", style="Error.TLabel", wraplength=PANEL_WIDTH)
        # The buttons from the bottom up, before the list: in a short window
        # the list gets shorter (Remove and Leave group were cut off first).
        self.error.pack(side="bottom", fill="x", pady=(4, 0))
        self.leave_button.pack(side="bottom", fill="x", pady=(4, 0))
        self.remove_button.pack(side="bottom", fill="x", pady=(4, 0))
        add_row.pack(side="bottom", fill="x", pady=(6, 0))
        self.tree.pack(fill="both", expand=True, pady=(4, 0))
        self.owner = False
        self.member = True
        self.confirm: LeaveDialog | None = None
        self.wanted = False  # a group is open
        self.room = True  # the window is wide enough for it beside the transcript

    def show(self) -> None:
        self.error.configure(text="")
        self.wanted = True
        self._place()

    def hide(self) -> None:
        self.wanted = False
        self._place()

    def set_room(self, room: bool) -> None:
        """The window is (or is no longer) wide enough for the panel: below
        PANEL_ROOM px it goes, so that the transcript, the composer and Send
        keep their room (at 420 px they were a sliver and "Se")."""
        if room != self.room:
            self.room = room
            self._place()

    def _place(self) -> None:
        if self.wanted and self.room:
            self.frame.grid(row=0, column=2, sticky="nse")
        else:
            self.frame.grid_remove()

    def visible(self) -> bool:
        return bool(self.frame.winfo_ismapped())

    def fill(self, info: GroupInfo, rows: list[tuple[str, str, str]], *, owner: bool) -> None:
        count = len(info.members) if info.complete else 0
        self.title.configure(text=f"Members ({count})" if count else "Members")
        selected = set(self.tree.selection())
        self.tree.delete(*self.tree.get_children())
        for user, text, tag in rows:
            iid = name_key(user)
            self.tree.insert("", "end", iid=iid, text=self.groups.tk_safe(text), tags=(tag,))
            if iid in selected:
                self.tree.selection_add(iid)
        self.owner = owner
        self.member = info.member
        if info.member:
            self.note.pack_forget()
        else:
            self.note.configure(text=f"You are not a member of #{info.name} any more.")
            self.note.pack(anchor="w", fill="x", pady=(4, 0), before=self.tree)
        self._update_buttons()

    def rows(self) -> list[str]:
        """The members as shown (for tests and scripts)."""
        return [self.tree.item(iid, "text") for iid in self.tree.get_children()]

    def _update_buttons(self) -> None:
        me = name_key(self.groups.w.username or "")
        others = [iid for iid in self.tree.selection() if iid != me]
        can_remove = self.member and self.owner and bool(others)
        self.remove_button.configure(state="normal" if can_remove else "disabled")
        self.add_button.configure(state="normal" if self.member else "disabled")
        self.leave_button.configure(state="normal" if self.member else "disabled")

    def add(self) -> None:
        names = self.add_var.get().replace(",", " ").split()
        if not names:
            return
        problem = self.groups.add(names)
        self.error.configure(text=problem or "")
        if problem is None:
            self.add_var.set("")

    def remove(self) -> None:
        me = name_key(self.groups.w.username or "")
        keys = {iid for iid in self.tree.selection() if iid != me}
        if not keys or not self.owner:
            return
        # A row's iid is the member's name key; the display name is in the group's list.
        info = self.groups.info(self.groups.shown_group or "")
        users = [m for m in info.members if name_key(m) in keys]
        problem = self.groups.remove(users)
        self.error.configure(text=problem or "")

    def leave(self) -> None:
        """Ask first: "Leave group" sits under Remove, and a slip is not
        undone (only a member adds you back, never as owner; audit7 N6)."""
        if self.confirm is not None and self.confirm.top.winfo_exists():
            self.confirm.top.lift()
            return
        group = self.groups.shown_group
        if group is None:
            self.error.configure(text="open a group first")
            return
        self.confirm = LeaveDialog(self, group, self.groups.info(group))

    def confirmed(self) -> None:
        """The leaving was confirmed (`LeaveDialog`): ask the server."""
        self.confirm = None
        problem = self.groups.leave()
        self.error.configure(text=problem or "")


class NewGroupDialog:
    """ "New group": the group's name and its first members."""

    def __init__(self, groups: GroupsUI) -> None:
        self.groups = groups
        top = self.top = tk.Toplevel(groups.w.top)
        top.title("New group")
        top.transient(groups.w.top)
        parent = groups.w.top
        top.geometry(f"+{parent.winfo_rootx() + 80}+{parent.winfo_rooty() + 80}")
        top.resizable(False, False)
        box = ttk.Frame(top, padding=16)
        box.pack(fill="both", expand=True)
        self.name_var = tk.StringVar()
        self.members_var = tk.StringVar()
        ttk.Label(box, text="Group name").grid(row=0, column=0, sticky="w", padx=(0, 12), pady=4)
        self.name_entry = ttk.Entry(box, textvariable=self.name_var, width=28)
        self.name_entry.grid(row=0, column=1, sticky="ew", pady=4)
        ttk.Label(box, text="Members").grid(row=1, column=0, sticky="w", padx=(0, 12), pady=4)
        self.members_entry = ttk.Entry(box, textvariable=self.members_var, width=28)
        self.members_entry.grid(row=1, column=1, sticky="ew", pady=4)
        ttk.Label(box, text="Names separated by spaces or commas; you are the owner.",
                  style="Muted.TLabel").grid(row=2, column=1, sticky="w")  # fmt: skip
        buttons = ttk.Frame(box)
        buttons.grid(row=3, column=1, sticky="e", pady=(12, 0))
        ttk.Button(buttons, text="Cancel", command=self.close).pack(side="right", padx=(6, 0))
        # The dialog's one primary action: the accent (audit7 N12).
        self.create_button = ttk.Button(buttons, text="Create", style="Accent.TButton",
                                        command=self.submit)  # fmt: skip
        self.create_button.pack(side="right")
        self.error = ttk.Label(box, text="", style="Error.TLabel", wraplength=320)
        self.error.grid(row=4, column=0, columnspan=2, sticky="w", pady=(6, 0))
        for entry in (self.name_entry, self.members_entry):
            entry.bind("<Return>", lambda e: self.submit())
        top.bind("<Escape>", lambda e: self.close())
        top.protocol("WM_DELETE_WINDOW", self.close)
        self.name_entry.focus_set()

    def submit(self) -> None:
        name = self.name_var.get().strip()
        if not name:
            self.error.configure(text="Give the group a name, e.g. team (shown as #team).")
            self.name_entry.focus_set()
            return
        members = self.members_var.get().replace(",", " ").split()
        problem = self.groups.create(name, members)
        if problem is not None:
            self.error.configure(text=problem)
            return
        self.close()

    def refused(self, name: str, members: list[str], reason: str) -> None:
        """The server refused the group typed here: shown again, with why."""
        self.name_var.set(name)
        self.members_var.set(", ".join(members))
        self.error.configure(text=reason)
        self.name_entry.focus_set()
        self.name_entry.select_range(0, "end")

    def close(self) -> None:
        self.top.destroy()
        self.groups.dialog = None


class LeaveDialog:
    """ "Leave #team?": what leaving does, then Leave or Cancel (Escape).
    The owner is told who becomes owner (the longest-standing member, as
    the server picks), the last member that the group ends."""

    def __init__(self, panel: MembersPanel, group: str, info: GroupInfo) -> None:
        self.panel = panel
        parent = panel.groups.w.top
        top = self.top = tk.Toplevel(parent)
        top.title("Leave group")
        top.transient(parent)
        top.geometry(f"+{parent.winfo_rootx() + 80}+{parent.winfo_rooty() + 80}")
        top.resizable(False, False)
        box = ttk.Frame(top, padding=16)
        box.pack(fill="both", expand=True)
        self.text = leave_question(group, info, panel.groups.w.username or "")
        ttk.Label(box, text=panel.groups.tk_safe(self.text), wraplength=320).grid(
            row=0, column=0, sticky="w"
        )
        buttons = ttk.Frame(box)
        buttons.grid(row=1, column=0, sticky="e", pady=(12, 0))
        self.cancel_button = ttk.Button(buttons, text="Cancel", command=self.close)
        self.cancel_button.pack(side="right", padx=(6, 0))
        self.leave_button = ttk.Button(buttons, text="Leave", command=self.submit)
        self.leave_button.pack(side="right")
        top.bind("<Escape>", lambda e: self.close())
        top.protocol("WM_DELETE_WINDOW", self.close)
        self.cancel_button.focus_set()  # Return on a slip keeps you in

    def submit(self) -> None:
        self.top.destroy()
        self.panel.confirmed()

    def close(self) -> None:
        self.top.destroy()
        self.panel.confirm = None


def leave_question(group: str, info: GroupInfo, me: str) -> str:
    """What "Leave group" asks: for the owner, who becomes owner (the
    longest-standing other member: the first in joining order), or that the
    group ends with its last member."""
    key = name_key(me)
    others = [m for m in info.members if name_key(m) != key]
    question = f"Leave #{group}?"
    if not others and info.members:
        return f"{question} You are its last member: the group ends."
    if info.owner and name_key(info.owner) == key and others:
        return (f"{question} You are its owner: ownership passes to {others[0]}. Only a member "
                "can add you back, and not as its owner.")  # fmt: skip
    return f"{question} Only a member can add you back."
