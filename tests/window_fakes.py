"""A session for window tests that need no server: `FakeSession` keeps a
real `client_store.ClientStore` (so the window's history pages, contact
list and search read a real SQLite file) and puts the events a
`chat_client.ChatSession` would put on the window's queue. The test plays
the network: `deliver` a message, `set_state` of one sent, `link` up or
down. `fill_history` writes a long history straight into a store.

Also used by the subprocess of the Find crash test (`python -m
tests.window_fakes`), so a SIGSEGV fails that test instead of killing
pytest.
"""

from __future__ import annotations

import queue
import sys
import tempfile
import time
import tkinter as tk
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client_core import (
    Disconnected,
    ErrorEvent,
    GroupsListed,
    LinkChanged,
    LinkStats,
    LoggedIn,
    MessageReceived,
    MessageState,
    StatusChanged,
    WhoList,
)
from client_store import ClientStore, Timeline, read_timeline
from client_window import ChatWindow, Settings
from common import i64
from protocol import GroupAction, MsgId, name_key

PEER_INSTANCE = 0x1234_5678_9ABC_DEF0  # the instance id of every peer here
WRONG_PASSWORD = "wrong password"


class FakeSession:
    """What `ChatWindow` uses of a session, over a real store in `store_root`."""

    def __init__(self, events: queue.Queue[Any], store_root: Path, **_: Any) -> None:
        self.events = events
        self.store_root = store_root
        self.store: ClientStore | None = None
        self.username = ""
        self.peer: str | None = None
        self.online: list[str] = []
        self.shown_ids: list[int] = []
        self.next_server_id = 1_000_000
        self.group_requests: list[tuple[GroupAction, str, tuple[str, ...]]] = []
        self.waiting: set[str] = set()  # ids waiting for an account (`waiting_ids`)

    def login(
        self, server: str, username: str, connect_to: str | None = None, *, password: str
    ) -> bool:
        if password == WRONG_PASSWORD:
            self.events.put(ErrorEvent("bad_password", "wrong password", fatal=True))
            self.events.put(Disconnected("bad_password"))
            return True
        self.username = username
        self.store = ClientStore(self.store_root / name_key(username), username)
        self.events.put(LoggedIn(username))
        return True

    def set_peer(self, name: str) -> bool:
        self.peer = name
        return True

    def send(self, text: str, to: str | None = None) -> str | None:
        assert self.store is not None and to is not None
        msg_id = MsgId(self.store.instance_id, self.store.next_seq)
        self.store.next_seq += 1
        self.store.add_outgoing(msg_id, to, text)
        self.store.commit()
        self.events.put(StatusChanged(msg_id.label(), MessageState.SENDING, to, text))
        return msg_id.label()

    def set_state(
        self, msg_id: str, to: str, state: MessageState, reason: str | None = None
    ) -> None:
        self.events.put(StatusChanged(msg_id, state, to, "", reason))

    def deliver(self, sender: str, *texts: str, sent_ms: int | None = None) -> None:
        """Messages from `sender` arrive: stored (not shown yet) in one
        commit, then handed on."""
        assert self.store is not None
        stamp = int(time.time() * 1000) if sent_ms is None else sent_ms
        events = []
        for text in texts:
            self.next_server_id += 1
            seq = self.next_server_id
            self.store.add_incoming(sender, MsgId(PEER_INSTANCE, seq), text, stamp, seq)
            events.append(
                MessageReceived(sender, text, seq, stamp, MsgId(PEER_INSTANCE, seq).label())
            )
        self.store.commit()
        for event in events:
            self.events.put(event)

    def link(self, up: bool) -> None:
        if not up:
            self.events.put(ErrorEvent("server_unreachable", "the server stopped answering; "
                                       "reconnecting"))  # fmt: skip
        self.events.put(LinkChanged(up=up))

    def shown(self, message_id: int, *, wait: float = 0.0) -> bool:
        self.shown_ids.append(message_id)
        if self.store is not None:
            self.store.mark_shown(message_id)
        return True

    def who(self) -> None:
        self.events.put(WhoList(tuple([self.username, *self.online])))

    def typing(self, to: str) -> None:
        pass

    def watch(self, name: str) -> None:
        pass

    def group(
        self, action: GroupAction, group: str = "", users: tuple[str, ...] | list[str] = ()
    ) -> bool:
        """No groups here: /groups is answered with none; the rest is recorded."""
        self.group_requests.append((action, group, tuple(users)))
        if action == GroupAction.LIST:
            self.events.put(GroupsListed(()))
        return True

    def logout(self, timeout: float = 10.0) -> None:
        self.close(timeout)

    def close(self, timeout: float = 10.0) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def discard(self) -> None:
        self.close()

    def link_stats(self) -> LinkStats:
        """The link as the status bar shows it: up, with no figures yet."""
        return LinkStats("up", None, None, 0.0, 0, 0, 0, 0)

    def waiting_ids(self) -> frozenset[str]:
        return frozenset(self.waiting)

    def timeline(self, message_id: str) -> Timeline | None:
        if self.store is None:
            return None
        return read_timeline(self.store.path, self.username, message_id)


def fill_history(
    directory: Path,
    username: str,
    peers: list[str],
    count: int,
    *,
    text: Callable[[int], str] = lambda i: f"message number {i}",
    start_ms: int | None = None,
    step_ms: int = 1000,
) -> None:
    """Write `count` shown lines into the store of `username` in
    `directory` (a FakeSession's `store_root`), round-robin over `peers`,
    every third one ours; in one transaction, through the store's own
    schema and triggers (the search index follows)."""
    store = ClientStore(directory / name_key(username), username)
    start = int(time.time() * 1000) - count * step_ms if start_ms is None else start_ms
    rows = []
    for i in range(count):
        peer = peers[i % len(peers)]
        outgoing = i % 3 == 0
        sender = username if outgoing else peer
        instance = store.instance_id if outgoing else PEER_INSTANCE
        rows.append((name_key(peer), peer, int(outgoing), text(i), start + i * step_ms,
                     name_key(sender), i64(instance), i + 1,
                     "delivered" if outgoing else None, None if outgoing else i + 1))  # fmt: skip
    store.begin()
    store.db.executemany(
        "INSERT INTO history (peer_key, peer, outgoing, text, ts_ms, sender_key, instance_id,"
        " client_seq, state, server_msg_id, shown) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
        rows,
    )
    store.commit()
    store.close()


def open_window(
    master: tk.Misc, store_root: Path, geometry: str = "780x560+10+40", username: str = ""
) -> tuple[ChatWindow, list[FakeSession]]:
    """A ChatWindow on a new Toplevel of `master` whose sessions are FakeSessions."""
    made: list[FakeSession] = []

    def factory(**options: Any) -> FakeSession:
        session = FakeSession(**options)
        made.append(session)
        return session

    settings = Settings(server="127.0.0.1:5555", username=username, geometry=geometry, path=None)
    window = ChatWindow(
        tk.Toplevel(master), settings, session_factory=factory,
        session_options={"store_root": store_root},
    )  # fmt: skip
    return window, made


def login(window: ChatWindow, root: tk.Misc, username: str, connect_to: str = "") -> FakeSession:
    window.username_var.set(username)
    window.password_var.set("secret")
    window.connect_var.set(connect_to)
    window.submit_login()
    deadline = time.monotonic() + 30
    while window.username is None and time.monotonic() < deadline:
        root.update()
        time.sleep(0.005)
    assert window.username is not None, window.login_error.cget("text")
    session = window.session
    assert isinstance(session, FakeSession)
    return session


def find_with_an_emoji_shown() -> int:
    """The crash case of issue 17, driven through the window's key bindings:
    a conversation holding an emoji outside the BMP, Ctrl+F, a needle,
    Enter. Tk's `-nocase` search killed the process here (SIGSEGV). Prints
    what was found; exit status 0."""
    root = tk.Tk(className="chat-test")
    root.withdraw()
    with tempfile.TemporaryDirectory() as tmp:
        window, _ = open_window(root, Path(tmp))
        session = login(window, root, "alice", "bob")
        session.deliver("bob", "party \U0001f389 time \U0001f600 and TIME again")
        for _ in range(20):
            root.update()
            time.sleep(0.01)
        window.composer.focus_force()
        root.update()
        window.composer.event_generate("<KeyPress>", keysym="f", state=4)  # Ctrl+F
        root.update()
        window.find_var.set("time")
        window.find_entry.event_generate("<KeyPress>", keysym="Return")
        root.update()
        ranges = window.transcript.tag_ranges("found")
        found = window.transcript.get(ranges[0], ranges[1]) if ranges else ""
        window.find_entry.event_generate("<KeyPress>", keysym="Return")
        root.update()
        ranges = window.transcript.tag_ranges("found")
        again = window.transcript.get(ranges[0], ranges[1]) if ranges else ""
        print(f"found {found!r} then {again!r}", flush=True)
        window.close()
    root.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(find_with_an_emoji_shown())
