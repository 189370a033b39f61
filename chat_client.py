"""The chat client: a session with no Tk, the terminal front end, and the CLI.

`ChatSession` is the thin driver around `client_core.ClientCore`, which
holds the protocol logic (login, outbox, receipts, reconnection, presence)
without I/O. The session owns a UDP socket and a network thread; that
thread alone owns the socket and the core, feeding it datagrams, commands
and the time, sending what it hands out and passing its events on. The
caller talks to the thread through a command queue and reads what
happened from an event queue (`session.events`), so a Tk window or a
terminal can drive it without locks. The Tk window lives in `client_window.py`
(it is given `ChatSession` to make its sessions); `chat-demo` in `client_demo.py`.

What the session promises: every message you send gets `status` events
(`sending`, `accepted`, `delivered` or a final `failed`), states only move
forward, nothing you sent is given up because the network or the server
went away (it reconnects by itself and resends), and each message you
receive is shown once.

Showing is the front end's part, so it tells the session: a received
message is committed to the history, then handed on as `MessageReceived`;
the front end shows it (terminal: printed and flushed; window: inserted)
and calls `session.shown(event.id)`; only then is the receipt sent, which
tells the sender `delivered`. A message committed but never shown (the
process died in between) is handed on again, once, after the next login.

A cluster's nodes are given as a list (`--server A,B,C`; docs/CLUSTER.md).
The core never picks a server; the network thread does (`_Worker`): the
first HELLO goes to the first server, every later one (a retransmission
with the core's backoff, or a new login after the link was lost) to the
next in turn, and the server whose CHALLENGE the core took gets the rest of
that login and the session. The outbox and the history are the list's, kept
under its first entry (`ChatSession.login`). With more than one server a
node whose process died is noticed at once (ICMP port unreachable, on
Linux through IP_RECVERR) rather than after the link timeout, and an idle
client pings every 2-2.5 s so that it notices too: back on another node
within 5 s (`liveness_timers`; the cost is in docs/CLUSTER.md).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import getpass
import itertools
import json
import logging
import os
import queue
import secrets
import selectors
import shutil
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from client_core import (
    FATAL_LOGIN_ERRORS,
    KEEPALIVE,
    LINK_TIMEOUT,
    LIST_KEEPALIVE,
    LIST_KEEPALIVE_JITTER,
    LIST_LINK_TIMEOUT,
    LIST_PING_RETRY,
    LOGIN_TIMEOUT,
    LOGOUT_ACK_WAIT,
    TRAFFIC_PROBE,
    AccountDeleted,
    Cancelled,
    ClientCore,
    ClientError,
    Disconnected,
    ErrorEvent,
    GroupChanged,
    GroupsListed,
    GroupUnchanged,
    LinkChanged,
    LinkStats,
    LoggedIn,
    MembersListed,
    MemoryStore,
    MessageReceived,
    MessageState,
    PasswordChanged,
    PresenceChanged,
    RecipientsChanged,
    StatusChanged,
    TypingNotice,
    WhoList,
    check_group_request,
    check_outgoing,
    normalize_peer,
)
from client_core import Event as SessionEvent
from client_store import ClientStore, Timeline, mark_shown, profile_dir, read_timeline
from common import (
    DEFAULT_PORT,
    __version__,
    canonical_address,
    format_address,
    format_servers,
    parse_server,
    parse_servers,
    positive,
)
from protocol import (
    ErrorCode,
    GroupAction,
    LocalProtocolError,
    MsgId,
    is_group_address,
    name_key,
    normalize_name,
)
from reliability import RTO_MAX, RTO_MIN

__all__ = [
    "FATAL_LOGIN_ERRORS",
    "AccountDeleted",
    "Cancelled",
    "ChatSession",
    "Disconnected",
    "ErrorEvent",
    "GroupChanged",
    "GroupsListed",
    "GroupUnchanged",
    "LinkChanged",
    "LinkStats",
    "LoggedIn",
    "MembersListed",
    "MessageReceived",
    "MessageState",
    "PasswordChanged",
    "PresenceChanged",
    "RecipientsChanged",
    "SessionEvent",
    "StatusChanged",
    "TypingNotice",
    "WhoList",
    "event_to_json",
    "event_to_text",
    "main",
    "parse_server",
    "run_terminal",
]

log = logging.getLogger("chat_client")

# How long the terminal waits for `shown` to be recorded before printing the
# next message: a crash re-shows at most the one message printed last.
SHOWN_MARK_WAIT = 2.0
# How stale `ChatSession.link_stats` may be while the session runs (the
# window polls it once a second; `/stats` is typed by a person).
STATS_EVERY = 0.1
#: `link_stats` before the network thread has published anything.
NO_STATS = LinkStats("connecting", None, None, 0.0, 0, 0, 0, 0)


# --- the session ------------------------------------------------------------


# The commands the caller's thread queues for the network thread.
@dataclass(frozen=True)
class _Send:
    msg_id: MsgId
    to: str
    text: str


@dataclass(frozen=True)
class _Shown:
    server_msg_id: int
    done: threading.Event | None  # set once the mark is committed


@dataclass(frozen=True)
class _Who:
    pass


@dataclass(frozen=True)
class _Watch:
    name: str


@dataclass(frozen=True)
class _Typing:
    to: str


@dataclass(frozen=True)
class _Logout:
    timeout: float
    wait_shown: bool


@dataclass(frozen=True)
class _Abort:
    pass


@dataclass(frozen=True)
class _Cancel:
    to: str


@dataclass(frozen=True, repr=False)  # no repr: it holds passwords
class _ChangePassword:
    old: str
    new: str


@dataclass(frozen=True, repr=False)
class _DeleteAccount:
    password: str


@dataclass(frozen=True)
class _Group:
    action: GroupAction
    group: str
    users: tuple[str, ...]


_Command = (
    _Send | _Shown | _Who | _Watch | _Typing | _Logout | _Abort | _Cancel | _ChangePassword
    | _DeleteAccount | _Group
)  # fmt: skip

# Linux's numbers (<linux/in.h>, <linux/in6.h>); Python names neither. With
# them an unconnected UDP socket reports ICMP errors, and its error queue
# says for which destination.
_RECVERR: dict[int, tuple[int, int]] = {
    socket.AF_INET: (socket.IPPROTO_IP, 11),
    socket.AF_INET6: (socket.IPPROTO_IPV6, 25),
}
#: The ICMP errors that say a server is not there: its port is closed (the
#: process died) or its host does not answer ARP/NDP.
_SERVER_GONE = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH})


@dataclass(frozen=True)
class _Server:
    """One server of the list: as the user named it, and where it is."""

    name: tuple[str, int]  # (host, port) as typed: in messages and events
    address: tuple[Any, ...]  # from getaddrinfo: what sendto takes
    family: int

    def is_at(self, address: tuple[Any, ...]) -> bool:
        return tuple(address[:2]) == tuple(self.address[:2])


def liveness_timers(
    listed: bool, keepalive: float | None = None, link_timeout: float | None = None
) -> dict[str, Any]:
    """How a `ClientCore` learns its server is gone (`keepalive` and
    `link_timeout`: the caller's, if given). With somewhere else to go (a
    list), a receiver checks its node soon after a burst and an idle client
    pings every 2-2.5 s, again every 0.5 s while unanswered, and leaves
    after 4.5 s of silence: back on another node within 5 s (client_core's
    LIST_ constants say what that costs). With one server, the NAT
    keepalive of 15-18 s and the 45 s link timeout."""
    if not listed:
        return {
            "keepalive": KEEPALIVE if keepalive is None else keepalive,
            "link_timeout": LINK_TIMEOUT if link_timeout is None else link_timeout,
        }
    return {
        "probe_after": TRAFFIC_PROBE,
        "keepalive": LIST_KEEPALIVE if keepalive is None else keepalive,
        "keepalive_jitter": LIST_KEEPALIVE_JITTER,
        "ping_retry": LIST_PING_RETRY,
        "link_timeout": LIST_LINK_TIMEOUT if link_timeout is None else link_timeout,
    }


class ChatSession:
    """One user's connection to a server. Methods are safe from any thread;
    the results come out on `events` (a `queue.Queue`)."""

    def __init__(
        self,
        *,
        events: queue.Queue[Any] | None = None,
        instance_id: int | None = None,
        rto_min: float = RTO_MIN,
        rto_max: float = RTO_MAX,
        login_timeout: float = LOGIN_TIMEOUT,
        keepalive: float | None = None,
        link_timeout: float | None = None,
        persist: bool = True,
        store_root: Path | None = None,
    ) -> None:
        # Any: the terminal front end puts its input lines on the same queue.
        self.events: queue.Queue[Any] = events if events is not None else queue.Queue()
        self.instance_id = instance_id if instance_id is not None else secrets.randbits(64)
        self.persist = persist  # keep outbox and history on disk (client_store.py)
        self.store_root = store_root  # default: the user's data directory
        self.store: ClientStore | None = None
        self.rto_min = rto_min
        self.rto_max = rto_max
        self.login_timeout = login_timeout
        # None: by the server list (`login`): KEEPALIVE and LINK_TIMEOUT for
        # one server, the faster LIST_ ones for a list.
        self.keepalive = keepalive
        self.link_timeout = link_timeout
        self.username: str | None = None
        self.server: tuple[str, int] | None = None  # the first of `servers`
        self.servers: list[tuple[str, int]] = []  # as given; the list's history is the first's
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._peer: str | None = None  # chosen by the user: connect-to or /to
        self._reply_to: str | None = None  # who wrote last
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ended = False  # the network thread has let go of the store (under _lock)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.datagrams_sent = 0
        # Made by this login (no profile of this server and user before): if
        # the first login fails, it is removed again (nothing of a stranger's
        # failed attempt is left behind).
        self.created_store = False
        # Messages still in the outbox when the network thread ended
        # (`sending`: not accepted yet, or waiting for an account), and of
        # those, how many wait for each name's account.
        self.left_in_outbox = 0
        self.left_waiting: dict[str, int] = {}
        # Replaced whole by the network thread (one reference assignment),
        # read by any thread: no lock needed.
        self._stats = NO_STATS
        self._waiting_ids: frozenset[str] = frozenset()

    # --- the caller's API ---------------------------------------------------

    def login(
        self,
        server: str | tuple[str, int] | list[tuple[str, int]],
        username: str,
        connect_to: str | None = None,
        *,
        password: str,
    ) -> bool:
        """Start logging in (the first login with a new name registers it with
        this password). False, with an `ErrorEvent` and `Disconnected` on
        `events`, if the name, password or address is wrong before anything
        is sent.

        `server` is one server or a cluster's list (`"A,B"`, or a list of
        (host, port)): the session moves to the next node by itself when
        the one in use stops answering. The outbox and history of a list
        are kept under its first entry (the same as with that server
        alone), so keep the same node first to keep the same history. A
        name that cannot be resolved is left out, with an error event; if
        none can be, the login fails."""
        try:
            self.username = normalize_name(username)
        except LocalProtocolError as exc:
            self._fatal(ErrorCode.INVALID_NAME, f"invalid username: {exc}")
            self.discard()
            return False
        if not password:
            self._fatal(ErrorCode.PASSWORD_REQUIRED, "a password is required")
            self.discard()
            return False
        try:
            if isinstance(server, str):
                servers = parse_servers(server)
            else:
                servers = [server] if isinstance(server, tuple) else list(server)
        except ValueError as exc:
            self._fatal(ErrorCode.SERVER_UNREACHABLE, f"server {server}: {exc}")
            self.discard()
            return False
        resolved: list[_Server] = []
        unresolved: list[str] = []
        for name in servers:
            try:
                info = socket.getaddrinfo(*name, type=socket.SOCK_DGRAM)[0]
            except (OSError, UnicodeError) as exc:
                unresolved.append(f"server {format_address(*name)}: {exc}")
            else:
                resolved.append(_Server(name, tuple(info[4]), info[0]))
        if not resolved:
            self._fatal(ErrorCode.SERVER_UNREACHABLE, "; ".join(unresolved))
            self.discard()
            return False
        for problem in unresolved:  # the others may do; say which is left out
            self._emit(ErrorEvent(ErrorCode.SERVER_UNREACHABLE.label,
                                  f"{problem}; trying the other servers"))  # fmt: skip
        if connect_to:
            self.set_peer(connect_to)
        host, port = self.server = servers[0]
        self.servers = servers
        # The first entry's address, as resolved (when it could be).
        first = next((s for s in resolved if s.name == servers[0]), None)
        canonical = canonical_address(*first.address[:2]) if first else f"{host}:{port}"
        if self.persist:
            try:
                # One profile per server, however its address is spelled
                # (`localhost:5555`, `127.0.0.1:5555`): named by the address
                # it resolves to; the user's spelling stays for display.
                directory, self.created_store = profile_dir(
                    canonical, f"{host}:{port}", self.username, self.store_root
                )
                self.store = ClientStore(directory, self.username)
            except (OSError, sqlite3.Error) as exc:
                log.warning("no local history or outbox (%s); messages live in memory", exc)
        if self.store is not None:
            self.instance_id = self.store.instance_id
            with self._lock:
                self._seq = itertools.count(self.store.next_seq)
        core = ClientCore(
            self.username, password,
            store=self.store if self.store is not None else MemoryStore(self.instance_id),
            server=resolved[0].name, servers=tuple(s.name for s in resolved),
            rto_min=self.rto_min, rto_max=self.rto_max, login_timeout=self.login_timeout,
            wait_for_shown=True,  # the front end says `shown`
            **liveness_timers(len(resolved) > 1, self.keepalive, self.link_timeout),
        )  # fmt: skip
        worker = _Worker(self, core, resolved)
        self._thread = threading.Thread(
            target=worker.run, name=f"chat-net-{self.username}", daemon=True
        )
        self._thread.start()
        return True

    def set_peer(self, name: str) -> bool:
        """Make `name` the person plain sends go to (the `/to` command), and
        follow their presence."""
        try:
            shown = normalize_peer(name)
        except LocalProtocolError as exc:
            self._emit(ErrorEvent(ErrorCode.INVALID_NAME.label, f"cannot talk to {name!r}: {exc}"))
            return False
        with self._lock:
            self._peer = shown
        if not is_group_address(shown):  # a group (`#team`) has members, not a presence
            self.watch(shown)
        return True

    @property
    def peer(self) -> str | None:
        """Who a plain send goes to: the chosen peer, else whoever wrote last."""
        with self._lock:
            return self._peer or self._reply_to

    def send(self, text: str, to: str | None = None) -> str | None:
        """Send `text` to `to` (default: `peer`). Returns the message id, or
        None when it cannot be sent at all (an `ErrorEvent` says why)."""
        target = to or self.peer
        if not target:
            self._emit(ErrorEvent(ErrorCode.NO_PEER.label,
                                  "nobody to send to yet; name someone with /to NAME"))  # fmt: skip
            return None
        try:
            target = check_outgoing(text, target)
        except ClientError as exc:
            self._emit(ErrorEvent(exc.code.label, exc.message))
            return None
        with self._lock:
            msg_id = MsgId(self.instance_id, next(self._seq))
        # `sending` is reported by the network thread once the message is in
        # the outbox on disk, so a crash after it is seen never loses it.
        self._command(_Send(msg_id, target, text))
        return msg_id.label()

    def shown(self, message_id: int, *, wait: float = 0.0) -> bool:
        """The front end has shown the received message `message_id` (a
        `MessageReceived.id`): record it, then send its receipt, which tells
        the sender `delivered`. Call it after the message is on the screen
        (printed and flushed, or inserted in a window), never before.

        With `wait`, block up to that many seconds until it is recorded in
        the store, so a crash right after re-shows at most this one message.
        True once recorded (or with nothing to wait for)."""
        done = threading.Event() if wait > 0 else None
        with self._lock:  # the thread's `let_go` takes what is queued before `_ended`
            ended = self._ended
            if not ended:
                self._commands.put(_Shown(message_id, done))
        if ended:
            # The network thread is gone (its last events are still being
            # shown): record it here; the receipt follows at the next login.
            if self.store is not None:
                mark_shown(self.store.path, [message_id])
            return True
        self._wake()
        return done.wait(wait) if done is not None else True

    def who(self) -> None:
        self._command(_Who())

    def group(
        self, action: GroupAction, group: str = "", users: tuple[str, ...] | list[str] = ()
    ) -> bool:
        """A group request (`ClientCore.group_request`): create `#group` with
        `users`, add or remove them, leave, list its members, or list our
        groups. The answer comes on `events` (`GroupChanged`, `MembersListed`,
        `GroupsListed` or an `ErrorEvent`). False, with an `ErrorEvent`, for a
        bad group or user name (nothing is sent)."""
        try:
            name, shown = check_group_request(action, group, users)
        except ClientError as exc:
            self._emit(ErrorEvent(exc.code.label, exc.message))
            return False
        self._command(_Group(action, name, shown))
        return True

    def watch(self, name: str) -> None:
        """Ask for `name`'s presence (now and when it changes)."""
        self._command(_Watch(name))

    def typing(self, to: str) -> None:
        self._command(_Typing(to))

    def cancel(self, to: str) -> None:
        """Drop the messages waiting for `to`'s account (`/cancel NAME`): each
        is `failed` with reason `cancelled`, then a `Cancelled` event."""
        self._command(_Cancel(to))

    def change_password(self, old: str, new: str) -> None:
        """Change the password (proving the old one): `PasswordChanged`
        follows, or an `ErrorEvent` (`bad_password`, ...). The user's other
        sessions end; this one goes on."""
        self._command(_ChangePassword(old, new))

    def delete_account(self, password: str) -> None:
        """Delete the account and what the server keeps for it (proving the
        password): `AccountDeleted`, then `Disconnected('account_deleted')`."""
        self._command(_DeleteAccount(password))

    def logout(self, timeout: float = 10.0) -> None:
        """Wait (up to `timeout`) until everything sent is accepted (and,
        briefly, until what was handed on is `shown`), then log out;
        `Disconnected('logged_out')` follows on `events`."""
        self._command(_Logout(timeout, True))

    def close(self, timeout: float = 10.0) -> None:
        """Log out and wait for the network thread to finish. The caller
        shows nothing while it waits, so the logout does not wait for `shown`."""
        if self._thread is None:
            return
        self._command(_Logout(timeout, False))
        self._thread.join(timeout + LOGOUT_ACK_WAIT + 1.0)

    def abort(self) -> None:
        """Stop at once: no logout, nothing waited for (as if the process died)."""
        self._command(_Abort())
        if self._thread is not None:
            self._thread.join(2.0)

    def link_stats(self) -> LinkStats:
        """The link's figures (RTT, loss, resends, in flight, outbox), at
        most STATS_EVERY old while the session runs (a change of the link's
        state at once); safe from any thread, never blocks (the window polls
        it)."""
        return self._stats

    def waiting_ids(self) -> frozenset[str]:
        """The ids of our messages waiting for their recipient's account
        (`no_such_user`: kept, sent when the name registers), as of the
        link's figures (at most STATS_EVERY old); safe from any thread."""
        return self._waiting_ids

    def timeline(self, message_id: str) -> Timeline | None:
        """When our message `message_id` (a `StatusChanged.id`) was sent,
        accepted and delivered, and how often it went out again; None
        without a store (or for an id not in it). Safe from any thread."""
        if self.store is None or self.username is None:
            return None
        return read_timeline(self.store.path, self.username, message_id)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- helpers ------------------------------------------------------------

    def _command(self, command: _Command) -> None:
        self._commands.put(command)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the network thread has ended (or not started): nothing to wake

    def discard(self) -> None:
        """Release the sockets of a session that never started (or has ended)."""
        if self._thread is None or not self._thread.is_alive():
            self._wake_r.close()
            self._wake_w.close()

    def _emit(self, event: SessionEvent) -> None:
        self.events.put(event)

    def _fatal(self, code: ErrorCode, message: str) -> None:
        self._emit(ErrorEvent(code.label, message, fatal=True))
        self._emit(Disconnected(code.label))

    def _heard_from(self, sender: str) -> None:
        with self._lock:
            self._reply_to = sender


class _Worker:
    """The network thread: the sockets (one per address family in the server
    list), the wake-up pipe and the command queue around a `ClientCore`, and
    the choice of server (see the module doc). Only `run()` (on that thread)
    touches it."""

    def __init__(self, session: ChatSession, core: ClientCore, servers: list[_Server]) -> None:
        self.s = session
        self.core = core
        self.servers = servers
        self.index = 0  # the server in use: logins go there, then the session
        self.hello_sent = False  # the next HELLO goes to the next server
        # Where the ICMP for a dead node can be read: only worth it with
        # somewhere else to go (with one server the connection keeps
        # retransmitting to it, as always).
        self.icmp = len(servers) > 1
        self.sockets: dict[int, socket.socket] = {}
        for server in servers:
            if server.family not in self.sockets:
                sock = socket.socket(server.family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                if self.icmp and sys.platform == "linux" and server.family in _RECVERR:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(*_RECVERR[server.family], 1)
                self.sockets[server.family] = sock
        self.shown_waiters: list[threading.Event] = []  # released after the next commit
        self.stats_at = float("-inf")  # when `link_stats` was last published
        self.stats_up = False
        self.stats_due = False  # figures changed since (the loop wakes to publish them)

    @property
    def server(self) -> _Server:
        return self.servers[self.index]

    def use(self, index: int) -> None:
        if index != self.index:
            self.index = index
            self.core.server = self.server.name
            log.info("trying server %s", format_address(*self.server.name))

    def run(self) -> None:
        core = self.core
        selector = selectors.DefaultSelector()
        for sock in self.sockets.values():
            selector.register(sock, selectors.EVENT_READ)
        selector.register(self.s._wake_r, selectors.EVENT_READ)
        core.connect(time.monotonic())
        try:
            while not core.ended:
                now = time.monotonic()
                timer = core.get_timer()
                deadline = now + 1.0 if timer is None else min(timer, now + 1.0)
                if self.stats_due:  # a pass's figures were not published yet
                    deadline = min(deadline, self.stats_at + STATS_EVERY)
                selector.select(max(0.0, deadline - now))
                try:
                    while self.s._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
                now = time.monotonic()
                self.run_commands(now)
                self.read_datagrams(now)
                core.handle_timer(now)
                self.flush(time.monotonic())  # PBKDF2 in a login step takes a while
                # Nothing changes the figures but a pass. At most every
                # STATS_EVERY (counting the outbox is linear in it: a burst
                # of thousands runs many passes), and at once when the link
                # comes up or goes down.
                self.stats_due = True
                if now - self.stats_at >= STATS_EVERY or core.link_up != self.stats_up:
                    self.stats_at, self.stats_up, self.stats_due = now, core.link_up, False
                    self.s._stats = core.link_stats(now)
                    self.s._waiting_ids = frozenset(
                        out.msg_id.label() for out in core.outbox.values() if out.waiting
                    )
        except Exception:
            log.exception("the network thread failed")
            with contextlib.suppress(Exception):
                self.pass_events()
            self.s._fatal(ErrorCode.SERVER_ERROR, "internal error in the client; see the log")
        finally:
            with contextlib.suppress(Exception):  # the last figures (the link is down)
                self.s._stats = core.link_stats(time.monotonic())
            selector.close()
            for sock in self.sockets.values():
                sock.close()
            self.let_go()
            if self.s.store is not None:
                self.s.store.close()
                if self.s.created_store and core.first_login and not core.outbox:
                    self.remove_profile(self.s.store.directory)
            self.s._wake_r.close()
            self.s._wake_w.close()

    @staticmethod
    def remove_profile(directory: Path) -> None:
        """A profile made for a first login that failed, with nothing in its
        outbox: removed, and its server's folder with it if nothing else is
        there, so a wrong password or a mistyped server leaves no folder
        behind. (Messages typed before the login ended keep theirs: the
        outbox holds them for the next try.)"""
        shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(OSError):
            directory.parent.rmdir()  # only if empty

    def let_go(self) -> None:
        """From here on `shown` records straight into the store (see
        `ChatSession.shown`); what was asked before is recorded now."""
        with self.s._lock:
            self.s._ended = True
        while True:
            try:
                command = self.s._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Shown):
                self.on_shown(command)
        with contextlib.suppress(sqlite3.Error):
            self.core.commit()
        self.release_waiters()

    def read_datagrams(self, now: float) -> None:
        for sock in self.sockets.values():
            for _ in range(256):
                try:
                    data, addr = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # an ICMP error for something sent earlier
                    self.icmp_error(sock, now, exc)
                    continue
                before = self.core.login_phase
                self.core.receive_datagram(data, now)
                if before == "hello" and self.core.login_phase == "login":
                    # The core took this server's CHALLENGE: the LOGIN (and
                    # the session) go where it came from.
                    for index, server in enumerate(self.servers):
                        if server.is_at(addr):
                            self.use(index)
                            break

    def icmp_error(self, sock: socket.socket, now: float, exc: OSError) -> None:
        """A socket call reported an ICMP error for a datagram sent earlier.
        If it says the server in use is not there (port unreachable: its
        process died; host unreachable), the core logs in again, to the
        next server."""
        log.debug("socket error: %s", exc)
        if not self.icmp:
            return  # one server: it keeps being retried, as always
        if sys.platform != "linux":
            # No error queue: the error is about where we send, the server in use.
            if isinstance(exc, (ConnectionRefusedError, ConnectionResetError)):
                self.server_gone(now)
            return
        # IP_RECVERR queues each error with the datagram's destination and
        # its errno (struct sock_extended_err). Read them all: they hold the
        # socket's receive memory. One about a server left before is not
        # about the one in use.
        gone = False
        for _ in range(256):
            try:
                _data, ancillary, _flags, address = sock.recvmsg(1, 512, socket.MSG_ERRQUEUE)
            except OSError:
                break
            for _level, _type, data in ancillary:
                if len(data) >= 4 and struct.unpack_from("=I", data)[0] in _SERVER_GONE:
                    gone = gone or self.server.is_at(address)
        if gone:
            self.server_gone(now)

    def server_gone(self, now: float) -> None:
        log.info("server %s is not there; trying the next", format_address(*self.server.name))
        self.core.server_gone(now)

    def flush(self, now: float) -> None:
        # The core commits the store before it hands out anything that
        # promises what was stored (a receipt, a received message): one
        # fsync per pass.
        datagrams = self.core.datagrams_to_send(now)
        if datagrams and self.core.login_phase == "hello":
            # A HELLO (the only datagram then): the first of the session
            # goes to the first server, every later one to the next.
            if self.hello_sent:
                self.use((self.index + 1) % len(self.servers))
            self.hello_sent = True
        server = self.server
        sock = self.sockets[server.family]
        for datagram in datagrams:
            try:
                sock.sendto(datagram, server.address)
                self.s.datagrams_sent += 1
            except OSError as exc:  # the network is down, or an earlier ICMP: resend later
                self.icmp_error(sock, now, exc)
        self.release_waiters()
        self.pass_events()

    def release_waiters(self) -> None:
        for done in self.shown_waiters:
            done.set()
        self.shown_waiters.clear()

    def pass_events(self) -> None:
        while (event := self.core.next_event()) is not None:
            if isinstance(event, MessageReceived):
                self.s._heard_from(event.conversation)  # a group message: its group
            elif isinstance(event, Disconnected):  # counted before anyone hears of the end
                left = [o for o in self.core.outbox.values() if o.state == MessageState.SENDING]
                self.s.left_in_outbox = len(left)
                waiting: dict[str, int] = {}
                for out in left:
                    if out.waiting:
                        waiting[out.to] = waiting.get(out.to, 0) + 1
                self.s.left_waiting = waiting
            self.s._emit(event)

    def on_shown(self, command: _Shown) -> None:
        self.core.shown(command.server_msg_id)
        if command.done is not None:
            self.shown_waiters.append(command.done)

    def run_commands(self, now: float) -> None:
        core = self.core
        while True:
            try:
                command = self.s._commands.get_nowait()
            except queue.Empty:
                return
            match command:
                case _Send(msg_id, to, text):
                    core.queue_message(msg_id, to, text)
                case _Shown():
                    self.on_shown(command)
                case _Who():
                    core.who()
                case _Watch(name):
                    core.watch(name)
                case _Typing(to):
                    core.typing(to)
                case _Logout(timeout, wait_shown):
                    core.logout(now, timeout, wait_shown=wait_shown)
                case _Abort():
                    core.abort()
                case _Group(action, group, users):
                    core.group_request(action, group, users)
                case _Cancel() | _ChangePassword() | _DeleteAccount():
                    self.account_command(command)

    def account_command(self, command: _Cancel | _ChangePassword | _DeleteAccount) -> None:
        """A cancel or a change of the account; what cannot be done now is an
        error event, never an exception out of the network thread."""
        try:
            match command:
                case _Cancel(to):
                    self.core.cancel(to)
                case _ChangePassword(old, new):
                    self.core.change_password(old, new)
                case _DeleteAccount(password):
                    self.core.delete_account(password)
        except ClientError as exc:
            self.s._emit(ErrorEvent(exc.code.label, exc.message))


# --- terminal front end -----------------------------------------------------


def event_to_json(event: SessionEvent) -> dict[str, Any]:
    """The `--json` form of an event (README, "JSON events"): `event.to_json()`."""
    return event.to_json()


def _brief(text: str, width: int = 30) -> str:
    """The start of a message's text, on one line, to name it in a status line."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "\u2026"


def event_to_text(event: SessionEvent) -> tuple[str, bool] | None:
    """A line for a person (and whether it belongs on stderr), or None."""
    if isinstance(event, LoggedIn):
        where = f" on {event.server}" if event.server else ""
        return (f"logged in as {event.user}{where}; type a message, /to NAME, /who, /help "
                "or /quit", False)  # fmt: skip
    if isinstance(event, MessageReceived):
        if event.group is not None:
            return f"[#{event.group}] {event.sender}: {event.text}", False
        return f"{event.sender}: {event.text}", False
    if isinstance(event, StatusChanged):
        # One line per state change; the later ones name the message briefly
        # (several may be under way at once).
        about = f"to {event.to}: {_brief(event.text)}" if event.text else f"to {event.to}"
        if event.state == MessageState.SENDING:
            return f"-> {event.to}: {event.text}  [sending]", False
        if event.state == MessageState.ACCEPTED:
            if event.recipients is not None:  # a group message
                return f"  \u2713 on server for {event.recipients} member(s) ({about})", False
            return f"  \u2713 on server ({about})", False
        if event.state == MessageState.DELIVERED:
            if event.by is not None:  # a group message: one line per member who has it
                return f"  \u2713\u2713 delivered to {event.by} ({about})", False
            return f"  \u2713\u2713 delivered ({about})", False
        if (backlog := event.backlog) is not None:
            # A group held back by one member: whom, and what frees it (the
            # `error` after it, not repeated here, says the same in the
            # server's words).
            return f"  \u2717 failed ({event.reason}) ({about}): {backlog.explained}", True
        return f"  \u2717 failed ({event.reason}) ({about})", True
    if isinstance(event, RecipientsChanged):
        # Named as the other status lines name a message (the id when its
        # text is not at hand: accepted before a restart of this client).
        about = f"({event.to}: {_brief(event.text)})" if event.text else f"message {event.id}"
        return (f"  {event.gone}'s account is gone: {about} now goes to "
                f"{event.recipients} member(s)", False)  # fmt: skip
    if isinstance(event, GroupChanged):
        return f"* #{event.group}: {event.describe()}", False
    if isinstance(event, MembersListed):
        return f"#{event.group}: {', '.join(event.members)} (owner {event.owner})", False
    if isinstance(event, GroupsListed):
        return "groups: " + (", ".join(f"#{g}" for g in event.groups) or "none"), False
    if isinstance(event, GroupUnchanged):
        return f"* #{event.group}: {', '.join(event.users)}: {event.message}", False
    if isinstance(event, PresenceChanged):
        return f"* {event.user} is {'online' if event.online else 'offline'}", False
    if isinstance(event, WhoList):
        return "online: " + (", ".join(event.users) or "nobody"), False
    if isinstance(event, ErrorEvent):
        if event.code == ErrorCode.BAD_PASSWORD.label and event.fatal:
            # At login the same answer means "not your account" too (the
            # server does not say which names exist): say what to do.
            return (f"error: {event.message}; if the name is not yours, it is taken: pick "
                    "another", True)  # fmt: skip
        return f"error: {event.message}", True
    if isinstance(event, LinkChanged):
        if event.up:
            return "* reconnected" + (f" to {event.server}" if event.server else ""), True
        return "* connection lost; reconnecting...", True
    if isinstance(event, TypingNotice):
        return None
    if isinstance(event, Cancelled):
        late = len(event.accepted)
        too_late = (f"{late} message(s) to {event.to} had been accepted by the server before "
                    "the cancel reached it: they will be delivered")  # fmt: skip
        if not event.ids:
            if late:
                return f"too late to cancel: {too_late}", False
            return f"nothing to cancel: no message to {event.to} is waiting or unsent", False
        done = f"cancelled {len(event.ids)} message(s) to {event.to}"
        return (f"{done}; {too_late}" if late else done), False
    if isinstance(event, PasswordChanged):
        return f"password of {event.user} changed; its other sessions were logged out", False
    if isinstance(event, AccountDeleted):
        return f"account {event.user} deleted; the server keeps nothing of it", False
    if isinstance(event, Disconnected) and event.reason not in ("logged_out", "account_deleted"):
        return f"disconnected ({event.reason})", True
    return None


#: Errors about the login itself: shown at once, even before `logged_in`
#: (what typed lines cause waits for it: see `run_terminal`).
LOGIN_NOTICES = frozenset({
    ErrorCode.SERVER_UNREACHABLE.label, ErrorCode.RATE_LIMITED.label,
    ErrorCode.SERVER_ERROR.label, ErrorCode.SERVER_SHUTDOWN.label,
})  # fmt: skip

#: The terminal's commands, as `/help` lists them: (usage, what it does).
TERMINAL_COMMANDS = (
    ("/to NAME", "send your next messages to NAME (a user, or a group: /to #team)"),
    ("/who", "list who is online"),
    ("/create #GROUP NAME...", "create a group with these members (you are its owner)"),
    ("/add #GROUP NAME...", "add members to a group you are in"),
    ("/remove #GROUP NAME...", "remove members (the group's owner only)"),
    ("/leave #GROUP", "leave a group"),
    ("/members #GROUP", "list a group's owner and members"),
    ("/groups", "list the groups you are in"),
    ("/cancel NAME", "end your messages to NAME (or #group) the server has not accepted yet"),
    ("/passwd", "change your password (asks the old and the new one)"),
    ("/delete-account", "delete your account on the server (asks the password and to confirm)"),
    ("/stats", "show the link to the server: RTT, loss, resends, in flight, queued"),
    ("/help", "list these commands"),
    ("/quit", "wait up to 10 s until what you sent is accepted, log out and exit"),
    ("//TEXT", "send /TEXT: a message that starts with a slash"),
)


#: The group commands: their action, and whether they take one request per user.
GROUP_COMMANDS = {
    "/create": (GroupAction.CREATE, False),
    "/add": (GroupAction.ADD, True),
    "/remove": (GroupAction.REMOVE, True),
    "/leave": (GroupAction.LEAVE, False),
    "/members": (GroupAction.MEMBERS, False),
    "/groups": (GroupAction.LIST, False),
}


def _group_command(session: ChatSession, command: str, args: list[str]) -> None:
    """Send what a group command asks for. A mistake is an `ErrorEvent` on
    the session's events (like those `session.group` reports), so errors
    come out in the order the lines were typed."""
    action, per_user = GROUP_COMMANDS[command]
    if action == GroupAction.LIST:
        session.group(action)
        return
    if not args:
        usage = next(use for use, _ in TERMINAL_COMMANDS if use.startswith(command + " "))
        session._emit(ErrorEvent(ErrorCode.INVALID_NAME.label, f"name the group: {usage}"))
        return
    group, users = args[0], args[1:]
    if not is_group_address(group):
        # `/create team2 bob` made a group the user then reaches only as
        # #team2 (`/to team2` is a person): the `#` says which is meant.
        usage = next(use for use, _ in TERMINAL_COMMANDS if use.startswith(command + " "))
        session._emit(ErrorEvent(ErrorCode.INVALID_NAME.label,
                                 f"{group!r} is no group: a group is written like #team "
                                 f"({usage.replace('#GROUP', '#' + group)})"))  # fmt: skip
        return
    if per_user and users:
        if action == GroupAction.REMOVE and len(users) > 1 and session.username:
            # Naming yourself beside others removes only them (the server's
            # rule for one request; sent one by one, "remove alice" alone
            # would be alice leaving, and the group would pass on).
            me = name_key(session.username)
            users = [u for u in users if _name_key_or_self(u) != me] or users[:1]
        # One request, one change and one answer per user: `/add #team dave
        # erin` adds dave even if erin has no account.
        for user in users:
            session.group(action, group, (user,))
    else:
        session.group(action, group, users)


def _name_key_or_self(text: str) -> str:
    """The name key of a name as typed (the text itself if it is no valid
    name: the server refuses it)."""
    try:
        return name_key(normalize_name(text))
    except LocalProtocolError:
        return text


def _show_help(as_json: bool, stdout: IO[str]) -> None:
    if as_json:
        line = json.dumps({"event": "help", "commands": [use for use, _ in TERMINAL_COMMANDS]})
    else:
        width = max(len(use) for use, _ in TERMINAL_COMMANDS)
        line = "\n".join(f"{use:<{width}}  {does}" for use, does in TERMINAL_COMMANDS)
        line = "any other line is a message to the current peer\n" + line
    stdout.write(line + "\n")
    stdout.flush()


@dataclass(frozen=True)
class _Line:
    text: str | None  # None: end of input


@dataclass(frozen=True, repr=False)  # no repr: it holds passwords
class _Secrets:
    """What `/passwd` or `/delete-account` read from the input: the old and
    new password, or the password and the confirmation; `problem` when they
    cannot be used (nothing is sent then)."""

    command: str
    values: tuple[str, ...]
    problem: str | None = None


#: The commands whose next input is secret (read by `_read_lines`).
SECRET_COMMANDS = ("/passwd", "/delete-account")


def _read_lines(
    stream: IO[str], inbox: queue.Queue[Any], *, tty: bool = False,
    ask: Callable[[str], str] = getpass.getpass,
) -> None:  # fmt: skip
    """The input, a line at a time, onto `inbox`. This thread is the only
    reader of the input, so it also reads what `/passwd` and
    `/delete-account` ask for: from the terminal without echo (`ask`) when
    the input is one (`tty`), else the next lines (scripts, `--json`)."""
    lines = iter(stream)
    for line in lines:
        text = line.rstrip("\n")
        if text.strip() in SECRET_COMMANDS:
            inbox.put(_read_secrets(text.strip(), lines, tty, ask))
        else:
            inbox.put(_Line(text))
    inbox.put(_Line(None))


def _read_secrets(command: str, lines: Any, tty: bool, ask: Callable[[str], str]) -> _Secrets:
    def line(prompt: str, *, secret: bool = True) -> str | None:
        if tty and secret:
            try:
                return ask(prompt)
            except (EOFError, KeyboardInterrupt):
                return None
        if tty:
            sys.stderr.write(prompt)
            sys.stderr.flush()
        text = next(lines, None)
        return None if text is None else text.rstrip("\n")

    if command == "/passwd":
        old = line("current password: ")
        new = line("new password: ")
        again = line("new password again: ") if tty else new
        if not old or not new:
            return _Secrets(command, (), "a password is missing; nothing was changed")
        if new != again:
            return _Secrets(command, (), "the new passwords differ; nothing was changed")
        return _Secrets(command, (old, new))
    password = line("password: ")
    confirm = line("delete this account and everything the server keeps for it? "
                   "Type yes to confirm: ", secret=False)  # fmt: skip
    if not password:
        return _Secrets(command, (), "a password is missing; the account stays")
    if (confirm or "").strip().lower() != "yes":
        return _Secrets(command, (), "not confirmed (type yes); the account stays")
    return _Secrets(command, (password,))


def run_terminal(
    session: ChatSession,
    server: str,
    user: str,
    connect_to: str | None,
    *,
    password: str,
    as_json: bool,
    quit_wait: float = 10.0,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """The line-based client; returns the exit status: 0 when everything sent
    was accepted and it logged out, 2 after a fatal error (or without ever
    logging in), 3 when messages stay in the outbox for the next login."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    inbox = session.events

    closed_pipe = False
    # A failure comes as a `failed` status and then an `error` with the same
    # code; in text mode the status line says it, so the error is not repeated.
    failed_reason: str | None = None

    def show(event: SessionEvent) -> None:
        nonlocal closed_pipe, failed_reason
        if closed_pipe:
            return
        repeated = isinstance(event, ErrorEvent) and not event.fatal and event.code == failed_reason
        failed_reason = None
        if isinstance(event, StatusChanged) and event.state == MessageState.FAILED:
            failed_reason = event.reason
        if repeated and not as_json:
            return
        try:
            if as_json:
                stdout.write(json.dumps(event.to_json(), ensure_ascii=False) + "\n")
                stdout.flush()
            else:
                line = event_to_text(event)
                if line is not None:
                    (stderr if line[1] else stdout).write(line[0] + "\n")
                    (stderr if line[1] else stdout).flush()
        except BrokenPipeError:
            # Whoever read our output went away (`| head`): log out quietly.
            # What was not printed stays unshown, for the next start.
            closed_pipe = True
            inbox.put(_Line(None))
            return
        if isinstance(event, MessageReceived | GroupChanged):
            # Printed and flushed: now (and only now) it may be receipted.
            # Waiting for the record keeps a crash to one message shown again.
            session.shown(event.id, wait=SHOWN_MARK_WAIT)

    # Until the login ends, what the typed lines cause (a message's
    # `sending`, an answer, a mistake) is held, so `logged_in` comes first
    # and a script can rely on that order; what is about the login itself
    # (its errors, `disconnected`) is shown at once. A login that fails
    # shows what was held before its fatal error. `/stats` and `/help`
    # typed meanwhile are answered then, in their turn (`/stats` with the
    # figures of that moment).
    held: list[SessionEvent | Callable[[], None]] | None = []

    def release(items: list[SessionEvent | Callable[[], None]]) -> None:
        for item in items:
            if callable(item):
                answer(item)  # (`held` is None now: at once)
            else:
                show(item)

    def emit(event: SessionEvent) -> None:
        nonlocal held
        if held is None:
            show(event)
        elif isinstance(event, LoggedIn):
            earlier, held = held, None
            release([event, *earlier])
        elif isinstance(event, Disconnected) or isinstance(event, ErrorEvent) and event.fatal:
            earlier, held = held, None
            release([*earlier, event])
        elif isinstance(event, ErrorEvent) and event.code in LOGIN_NOTICES:
            show(event)
        else:
            held.append(event)

    def answer(reply: Callable[[], None]) -> None:
        """Run `reply` (it writes the answer to `/stats` or `/help`) now, or
        once the login has ended (see `held`)."""
        nonlocal closed_pipe
        if held is not None:
            held.append(reply)
            return
        if closed_pipe:
            return
        try:
            reply()
        except BrokenPipeError:
            closed_pipe = True
            inbox.put(_Line(None))

    def reply_stats() -> None:
        stats = session.link_stats()
        stdout.write((json.dumps(stats.to_json()) if as_json else stats.to_text()) + "\n")
        stdout.flush()

    def stop(signum: int, frame: object) -> None:
        inbox.put(_Line(None))  # Ctrl+C or SIGTERM: log out like /quit

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)

    session.login(server, user, connect_to, password=password)
    try:
        tty = stdin.isatty()
    except (AttributeError, ValueError):
        tty = False
    threading.Thread(target=_read_lines, args=(stdin, inbox), kwargs={"tty": tty}, daemon=True,
                     name="stdin").start()  # fmt: skip
    fatal = False
    deleted = False  # the user deleted the account: a clean end
    secrets_later: list[_Secrets] = []  # typed before the login completed
    quitting = False
    logged_in = False
    quit_after_login = False  # end of input before the login completed
    unaccepted: set[str] = set()  # ids `sending`, not yet accepted or failed
    while True:
        item = inbox.get()
        if isinstance(item, _Secrets):
            if quitting:
                continue
            if not logged_in and item.problem is None:
                secrets_later.append(item)  # they need the session: sent once it exists
                continue
            if item.problem is not None:
                code = ErrorCode.CANCELLED if item.command == "/delete-account" else (
                    ErrorCode.PASSWORD_REQUIRED)  # fmt: skip
                emit(ErrorEvent(code.label, item.problem))
            elif item.command == "/passwd":
                session.change_password(*item.values)
            else:
                session.delete_account(*item.values)
            continue
        if isinstance(item, _Line):
            if quitting:
                continue
            text = item.text
            command, _, rest = (text or "").strip().partition(" ")
            if text is None or command == "/quit":
                quitting = True
                if logged_in:
                    session.logout(quit_wait)
                else:
                    # Ending now would end silently before the login says
                    # whether it worked: wait for it (or its fatal error).
                    quit_after_login = True
            elif text.startswith("//"):  # an escaped slash: the text from the second one
                session.send(text[1:])
            elif command in ("/to", "/cancel") and not rest.strip():
                emit(ErrorEvent(ErrorCode.INVALID_NAME.label, f"name someone: {command} NAME"))
            elif command == "/to":
                session.set_peer(rest.strip())
            elif command == "/who":
                session.who()
            elif command == "/cancel":
                session.cancel(rest.strip())
            elif command in GROUP_COMMANDS:
                _group_command(session, command, rest.replace(",", " ").split())
            elif command == "/stats":
                answer(reply_stats)
            elif command == "/help":
                answer(lambda: _show_help(as_json, stdout))
            elif text.startswith("/"):
                # Never sent as chat text: a mistyped command would reach the peer.
                emit(ErrorEvent(ErrorCode.UNKNOWN_COMMAND.label,
                                f"unknown command {command}; /help lists them"))  # fmt: skip
            elif text.strip():
                session.send(text)
            continue
        if isinstance(item, Disconnected) and logged_in and session.left_waiting:
            # Reported when the wait began; the end says it again, with the way out.
            emit(ErrorEvent(ErrorCode.NO_SUCH_USER.label, _still_waiting(session.left_waiting)))
        emit(item)
        if isinstance(item, LoggedIn) and not logged_in:
            logged_in = True
            for waiting in secrets_later:
                if waiting.command == "/passwd":
                    session.change_password(*waiting.values)
                else:
                    session.delete_account(*waiting.values)
            secrets_later.clear()
            if quit_after_login:
                session.logout(quit_wait)
        if isinstance(item, StatusChanged):
            if item.state == MessageState.SENDING:
                unaccepted.add(item.id)
            else:
                unaccepted.discard(item.id)
        if isinstance(item, ErrorEvent) and item.fatal:
            fatal = True
        if isinstance(item, AccountDeleted):
            deleted = True
        if isinstance(item, Disconnected):
            if deleted and item.reason == ErrorCode.ACCOUNT_DELETED.label:
                return 0  # what the user asked for; its outbox has nobody to go to
            if fatal or not logged_in:
                return 2
            # Left in the outbox: sent in this run and never accepted, or
            # (from an earlier run) still waiting for a name's account.
            left = bool(unaccepted or session.left_in_outbox)
            if item.reason == "logged_out":
                return 3 if left else 0
            if item.reason == ErrorCode.SERVER_UNREACHABLE.label and quitting:
                # The logout reached no server: not a clean end (2), unless
                # messages wait in the outbox, which matters more (3).
                return 3 if left else 2
            return 2


def _still_waiting(waiting: dict[str, int]) -> str:
    """The line for messages left waiting for names' accounts at the end."""
    kept = "kept in the outbox for the next login"
    if len(waiting) == 1:
        [(name, count)] = waiting.items()
        return (f"{count} message(s) to {name} still wait for that name to register: {kept} "
                f"(/cancel {name} drops them)")  # fmt: skip
    names = ", ".join(f"{name}: {count}" for name, count in waiting.items())
    return (f"{sum(waiting.values())} message(s) still wait for names with no account yet "
            f"({names}): {kept} (/cancel NAME drops them)")  # fmt: skip


# --- command line -------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are also a JSON `error` event on stdout
    when `json_errors` is set (`--json` on the command line): a script reads
    one format whatever went wrong."""

    json_errors = False

    def error(self, message: str) -> Any:  # argparse declares NoReturn
        if self.json_errors:
            event = ErrorEvent(ErrorCode.USAGE.label, f"{self.prog}: error: {message}", True)
            print(json.dumps(event.to_json(), ensure_ascii=False), flush=True)
        super().error(message)  # the human text on stderr, exit status 2


def _wants_json(argv: list[str]) -> bool:
    """Whether `--json` (or an abbreviation argparse accepts) is among the options."""
    for arg in argv:
        if arg == "--":
            return False
        if arg.startswith("--j") and "--json".startswith(arg):
            return True
    return False


CLIENT_EXAMPLES = """\
examples:
  chat-client                                   the window, for a server on this machine
  chat-client --server chat.example.org:5555 --user alice --connect-to bob
                                                the window with its fields filled in
  chat-client --server [2001:db8::1]:5555       a server's IPv6 address, in brackets
  chat-client --server n1.example.org:5555,n2.example.org:5555,n3.example.org:5555
                                                a cluster's nodes: if one stops answering,
                                                the client moves to the next (docs/CLUSTER.md)
  chat-client --no-gui --user alice --connect-to bob
                                                the terminal: each line is a message
  chat-client --no-gui --user bot --password-file pw.txt --json
                                                for a script: one JSON event per line

The password: $CHAT_PASSWORD, --password-file FILE, or a prompt (never an
argument). In the terminal /help lists the commands; exit status 0 when
everything sent was accepted and the logout reached the server, 2 after a
fatal error (or a logout no server answered), 3 with messages left in the
outbox.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="chat-client", description="Chat over the UDP relay.", epilog=CLIENT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--no-gui", action="store_true", help="use the terminal instead of a window"
    )
    parser.add_argument(
        "--server",
        type=_server_argument,
        default=f"127.0.0.1:{DEFAULT_PORT}",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="the server, or a cluster's nodes separated by commas: when the one in use "
        "stops answering the client moves to the next (default %(default)s)",
    )
    parser.add_argument("--user", help="your username (terminal mode)")
    parser.add_argument("--connect-to", default=None, metavar="NAME",
                        help="who to talk to first: a user, or a group you are in (#team); "
                        "optional")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object per event on stdout")
    parser.add_argument(
        "--password-file", type=Path, default=None, metavar="FILE",
        help="read the password from FILE (else $CHAT_PASSWORD, else a prompt)",
    )  # fmt: skip
    parser.add_argument(
        "--quit-wait", type=positive, default=10.0, metavar="SECONDS",
        help="on /quit or end of input, wait up to SECONDS until what you sent is "
        "accepted (default %(default)s); exit 3 if some stays in the outbox",
    )  # fmt: skip
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"],
        help="how much to log on stderr (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--rto-min", type=positive, default=RTO_MIN, help=argparse.SUPPRESS)
    parser.add_argument("--rto-max", type=positive, default=RTO_MAX, help=argparse.SUPPRESS)
    parser.add_argument(
        "--login-timeout", type=positive, default=LOGIN_TIMEOUT, help=argparse.SUPPRESS
    )
    return parser


def _server_argument(text: str) -> str:
    """--server in a normal form (`A,B`), once `parse_servers` has found
    each entry well formed."""
    try:
        return format_servers(parse_servers(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def read_password(args: argparse.Namespace) -> str | None:
    """The password from CHAT_PASSWORD, --password-file, or a prompt on a
    terminal (never from the command line, where `ps` would show it)."""
    if args.password_file is not None:
        try:
            text: str = args.password_file.read_text("utf-8")
            return text.rstrip("\r\n")
        except OSError as exc:
            print(f"chat-client: cannot read {args.password_file}: {exc.strerror}", file=sys.stderr)
            return None
    if os.environ.get("CHAT_PASSWORD"):
        return os.environ["CHAT_PASSWORD"]
    if sys.stdin.isatty():
        import getpass

        try:
            return getpass.getpass(f"password for {args.user}: ")
        except (EOFError, KeyboardInterrupt):
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if isinstance(parser, _Parser):
        parser.json_errors = _wants_json(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.rto_max < args.rto_min:
        parser.error(f"argument --rto-max: {args.rto_max} is below --rto-min ({args.rto_min})")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not args.no_gui:
        try:
            from client_window import run_window
        except ImportError as exc:  # Debian splits tkinter into python3-tk
            print(f"chat-client: no window without tkinter ({exc}); install python3-tk, "
                  "or use --no-gui", file=sys.stderr)  # fmt: skip
            return 2
        return run_window(args, session_factory=ChatSession)
    if not args.user:
        parser.error("--user NAME is required with --no-gui")
    password = read_password(args)
    if not password:
        message = "a password is required: set CHAT_PASSWORD or use --password-file FILE"
        if args.password_file is not None:
            message = f"no password could be read from {args.password_file}"
        if args.json:
            print(json.dumps(ErrorEvent("password_required", message, True).to_json()))
            print(json.dumps(Disconnected("password_required").to_json()), flush=True)
        else:
            print(f"chat-client: {message}", file=sys.stderr)
        return 2
    session = ChatSession(
        rto_min=args.rto_min, rto_max=args.rto_max, login_timeout=args.login_timeout
    )
    try:
        return run_terminal(
            session, args.server, args.user, args.connect_to, password=password, as_json=args.json,
            quit_wait=args.quit_wait,
        )  # fmt: skip
    except KeyboardInterrupt:
        session.close(2.0)
        return 0


if __name__ == "__main__":
    sys.exit(main())
