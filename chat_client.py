"""The chat client: a session with no Tk, the terminal front end, and the CLI.

`ChatSession` owns a UDP socket and a network thread. That thread alone owns
the socket, the protocol state (`reliability.Connection`) and the outbox;
the caller talks to it through a command queue and reads what happened from
an event queue (`session.events`), so a Tk window or a terminal can drive
it without locks. The Tk window lives in `chat_window.py`.

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
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import itertools
import json
import logging
import os
import queue
import random
import secrets
import selectors
import signal
import socket
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from chat_args import positive
from client_store import ClientStore, mark_shown, store_dir
from protocol import (
    CONTROL_STREAM,
    FLAG_MAC,
    HELLO_SIZE,
    MIN_PREAUTH_REQUEST,
    NO_SESSION,
    PBKDF2_MIN_ITERATIONS,
    Accept,
    Accepts,
    Bye,
    Challenge,
    Deliver,
    Delivered,
    Delivereds,
    ErrorCode,
    Fail,
    Frame,
    Hello,
    LocalProtocolError,
    Logout,
    Message,
    MsgId,
    Notice,
    Packet,
    Presence,
    ProtocolError,
    Receipt,
    Receipts,
    Refused,
    ScramKeys,
    Send,
    Ticket,
    TicketFrame,
    Typing,
    UnknownSession,
    Watch,
    Welcome,
    Who,
    WhoReply,
    batches,
    build_login,
    check_text,
    conversation_stream,
    decode_header,
    decode_message,
    decode_packet,
    encode_message,
    encode_packet,
    name_key,
    normalize_name,
    salted_password,
    server_signature,
    session_keys,
)
from reliability import (
    RTO_MAX,
    RTO_MIN,
    Connection,
    PayloadAcked,
    PayloadReceived,
    PeerReachable,
    PeerUnreachable,
)

log = logging.getLogger("chat_client")

DEFAULT_PORT = 5555
KEEPALIVE = 15.0  # RFC 8085 3.5: not more often than every 15 s
KEEPALIVE_JITTER = 3.0  # upward only
LINK_TIMEOUT = 45.0  # nothing heard for this long while pinging: reconnect
LOGIN_TIMEOUT = 5.0  # the first login gives up after this
LOGOUT_ACK_WAIT = 2.0
RECONNECT_MAX = 30.0  # backoff cap between re-login attempts
RATE_LIMITED_WAIT = 10.0  # before logging in again after `rate_limited`
LOGIN_STEP = 1.0  # a LOGIN unanswered for 3x this restarts from HELLO
PBKDF2_MAX_ITERATIONS = 10_000_000  # refuse a server that asks for absurd work
# At logout, how long the network thread waits for the front end to show
# what it was handed last, so those receipts leave before the LOGOUT. A live
# front end takes milliseconds; one that is closing never will (its messages
# stay unshown and are shown at the next start), and must not hold it long.
SHOWN_WAIT = 1.0
# How long the terminal waits for `shown` to be recorded before printing the
# next message: a crash re-shows at most the one message printed last.
SHOWN_MARK_WAIT = 2.0


# --- events ---------------------------------------------------------------


@dataclass(frozen=True)
class LoggedIn:
    user: str


@dataclass(frozen=True)
class MessageReceived:
    sender: str
    text: str
    id: int  # the server's number for it in our mailbox
    sent_ms: int  # when the server accepted it (wall clock, ms)
    msg_id: str = ""  # the sender's message id, `instance-seq`


@dataclass(frozen=True)
class StatusChanged:
    """A state of a message we sent: sending, accepted, delivered or failed."""

    id: str  # the message id, `instance-seq`
    state: str
    to: str
    text: str
    reason: str | None = None


@dataclass(frozen=True)
class PresenceChanged:
    user: str
    online: bool


@dataclass(frozen=True)
class WhoList:
    users: tuple[str, ...]


@dataclass(frozen=True)
class ErrorEvent:
    code: str  # an ErrorCode label
    message: str
    fatal: bool = False


@dataclass(frozen=True)
class LinkChanged:
    """The server stopped answering (`up=False`, we keep trying) or answers again."""

    up: bool


@dataclass(frozen=True)
class TypingNotice:
    user: str


@dataclass(frozen=True)
class Disconnected:
    reason: str  # an ErrorCode label; `logged_out` after a clean logout


SessionEvent = (
    LoggedIn
    | MessageReceived
    | StatusChanged
    | PresenceChanged
    | WhoList
    | ErrorEvent
    | LinkChanged
    | TypingNotice
    | Disconnected
)

FATAL_LOGIN_ERRORS = frozenset(
    {
        ErrorCode.NAME_TAKEN,
        ErrorCode.INVALID_NAME,
        ErrorCode.BAD_PASSWORD,
        ErrorCode.PASSWORD_REQUIRED,
        ErrorCode.SERVER_UNREACHABLE,
        ErrorCode.LOGGED_IN_ELSEWHERE,
    }
)


def parse_server(text: str) -> tuple[str, int]:
    """'host', 'host:port' or '[v6]:port' -> (host, port); ValueError with a reason."""
    text = text.strip()
    if not text:
        raise ValueError("the server address is empty")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{port_text!r} is not a port number") from None
    if not 0 < port < 65536 or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, port


# --- the session ------------------------------------------------------------


class _Outgoing:
    __slots__ = ("msg_id", "to", "text", "state")

    def __init__(self, msg_id: MsgId, to: str, text: str) -> None:
        self.msg_id = msg_id
        self.to = to
        self.text = text
        self.state = "sending"


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
        keepalive: float = KEEPALIVE,
        link_timeout: float = LINK_TIMEOUT,
        persist: bool = True,
        store_root: Path | None = None,
    ) -> None:
        self.events: queue.Queue[Any] = events if events is not None else queue.Queue()
        self.instance_id = instance_id if instance_id is not None else secrets.randbits(64)
        self.persist = persist  # keep outbox and history on disk (client_store.py)
        self.store_root = store_root  # default: the user's data directory
        self.store: ClientStore | None = None
        self.rto_min = rto_min
        self.rto_max = rto_max
        self.login_timeout = login_timeout
        self.keepalive = keepalive
        self.link_timeout = link_timeout
        self.username: str | None = None
        self.server: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._peer: str | None = None  # chosen by the user: connect-to or /to
        self._reply_to: str | None = None  # who wrote last
        self._commands: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ended = False  # the network thread has let go of the store (under _lock)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.datagrams_sent = 0

    # --- the caller's API ---------------------------------------------------

    def login(
        self,
        server: str | tuple[str, int],
        username: str,
        connect_to: str | None = None,
        *,
        password: str,
    ) -> bool:
        """Start logging in (the first login with a new name registers it with
        this password). False, with an `ErrorEvent` and `Disconnected` on
        `events`, if the name, password or address is wrong before anything
        is sent."""
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
            host, port = parse_server(server) if isinstance(server, str) else server
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        except (ValueError, OSError) as exc:
            self._fatal(ErrorCode.SERVER_UNREACHABLE, f"server {server}: {exc}")
            self.discard()
            return False
        if connect_to:
            self.set_peer(connect_to)
        self.server = (host, port)
        if self.persist:
            try:
                directory = store_dir(f"{host}:{port}", self.username, self.store_root)
                self.store = ClientStore(directory, self.username)
            except (OSError, sqlite3.Error) as exc:
                log.warning("no local history or outbox (%s); messages live in memory", exc)
        if self.store is not None:
            self.instance_id = self.store.instance_id
            with self._lock:
                self._seq = itertools.count(self.store.next_seq)
        sock = socket.socket(info[0], socket.SOCK_DGRAM)
        sock.setblocking(False)
        worker = _Worker(self, sock, (str(info[4][0]), int(info[4][1])), password)
        self._thread = threading.Thread(
            target=worker.run, name=f"chat-net-{self.username}", daemon=True
        )
        self._thread.start()
        return True

    def set_peer(self, name: str) -> bool:
        """Make `name` the person plain sends go to (the `/to` command), and
        follow their presence."""
        try:
            shown = normalize_name(name)
        except LocalProtocolError as exc:
            self._emit(ErrorEvent(ErrorCode.INVALID_NAME.label, f"cannot talk to {name!r}: {exc}"))
            return False
        with self._lock:
            self._peer = shown
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
            target = normalize_name(target)
            check_text(text)
        except LocalProtocolError as exc:
            code = ErrorCode.INVALID_NAME if "name" in str(exc) else ErrorCode.TOO_LONG
            self._emit(ErrorEvent(code.label, str(exc)))
            return None
        with self._lock:
            msg_id = MsgId(self.instance_id, next(self._seq))
        # `sending` is reported by the network thread once the message is in
        # the outbox on disk, so a crash after it is seen never loses it.
        self._command("send", msg_id, target, text)
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
                self._commands.put(("shown", message_id, done))
        if ended:
            # The network thread is gone (its last events are still being
            # shown): record it here; the receipt follows at the next login.
            if self.store is not None:
                mark_shown(self.store.path, [message_id])
            return True
        self._wake()
        return done.wait(wait) if done is not None else True

    def who(self) -> None:
        self._command("who")

    def watch(self, name: str) -> None:
        """Ask for `name`'s presence (now and when it changes)."""
        self._command("watch", name)

    def typing(self, to: str) -> None:
        self._command("typing", to)

    def logout(self, timeout: float = 10.0) -> None:
        """Wait (up to `timeout`) until everything sent is accepted (and,
        briefly, until what was handed on is `shown`), then log out;
        `Disconnected('logged_out')` follows on `events`."""
        self._command("logout", timeout, True)

    def close(self, timeout: float = 10.0) -> None:
        """Log out and wait for the network thread to finish. The caller
        shows nothing while it waits, so the logout does not wait for `shown`."""
        if self._thread is None:
            return
        self._command("logout", timeout, False)
        self._thread.join(timeout + LOGOUT_ACK_WAIT + 1.0)

    def abort(self) -> None:
        """Stop at once: no logout, nothing waited for (as if the process died)."""
        self._command("abort")
        if self._thread is not None:
            self._thread.join(2.0)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- helpers ------------------------------------------------------------

    def _command(self, *command: Any) -> None:
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
    """The network thread's state: only `run()` (on that thread) touches it."""

    def __init__(
        self, session: ChatSession, sock: socket.socket, server: tuple[str, int], password: str
    ) -> None:
        self.s = session
        self.sock = sock
        self.server = server
        self.store = session.store
        # Kept for the re-logins of this run; the salted form is cached so
        # a reconnect does not pay PBKDF2 again.
        self.password = password
        self.salted: dict[tuple[bytes, int], bytes] = {}
        self.conn: Connection | None = None
        self.outbox: dict[MsgId, _Outgoing] = {}
        # Without a store: each received message and whether it was shown.
        self.seen: dict[tuple[str, MsgId], bool] = {}
        self.arrived: list[MessageReceived] = []  # stored this pass; handed on after the commit
        # Handed on, not yet `shown`, by server_msg_id (the memory mode's key for each).
        self.awaiting: dict[int, tuple[str, MsgId]] = {}
        self.shown_waiters: list[threading.Event] = []  # released after the next commit
        self.receipts: list[int] = []  # server_msg_ids shown, receipted at the flush
        self.who_pages: list[str] = []
        self.done = False
        self.first_login = True
        self.link_up = False
        # login state
        self.nonce = b""
        self.login_datagram = b""  # the HELLO, then the LOGIN, resent until answered
        self.login_phase = "hello"
        self.login_started = 0.0
        self.login_at = 0.0
        self.login_interval = 0.25
        self.login_deadline: float | None = None
        # (auth message, keys, server DH key) of this attempt
        self.auth: tuple[bytes, ScramKeys, bytes] | None = None
        # The server's DH key seen at the first login with this store (pinned).
        self.pinned = self.store.server_key() if self.store is not None else None
        # The server's login ticket for this instance: sent with each LOGIN,
        # it gets the owner past failures strangers cause under this name.
        self.ticket = self.store.ticket() if self.store is not None else None
        self.presence: dict[str, bool] = {}  # last reported, by name key
        self.watched: set[str] = set()  # presence wanted; asked again after each login
        self.unreported: list[_Outgoing] = []  # in the outbox; `sending` due after the commit
        if self.store is not None:
            # What an earlier run of this client sent and the server never
            # accepted goes out again, with its original ids, after login.
            for msg_id, to, text in self.store.pending():
                self.outbox[msg_id] = _Outgoing(msg_id, to, text)
        # online state
        self.last_heard = 0.0
        self.last_sent = 0.0
        self.next_ping = 0.0
        # logout state
        self.closing_deadline: float | None = None
        self.closing_shown_wait = True  # wait (briefly) for `shown` before the LOGOUT
        self.shown_deadline: float | None = None
        self.logout_sent_at: float | None = None

    # --- the loop -----------------------------------------------------------

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ)
        selector.register(self.s._wake_r, selectors.EVENT_READ)
        now = time.monotonic()
        self.start_login(now, deadline=now + self.s.login_timeout)
        try:
            while not self.done:
                now = time.monotonic()
                selector.select(max(0.0, min(self.next_deadline(now), now + 1.0) - now))
                try:
                    while self.s._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
                now = time.monotonic()
                self.run_commands(now)
                self.read_datagrams(now)
                self.run_timers(now)
                self.flush(now)
        except Exception:
            log.exception("the network thread failed")
            self.s._fatal(ErrorCode.SERVER_ERROR, "internal error in the client; see the log")
        finally:
            selector.close()
            self.sock.close()
            self.let_go()
            if self.store is not None:
                self.store.close()
            self.s._wake_r.close()
            self.s._wake_w.close()

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
            if command[0] == "shown":
                self.on_shown(command[1], command[2])
        if self.store is not None:
            with contextlib.suppress(sqlite3.Error):
                self.store.commit()
        for done in self.shown_waiters:
            done.set()
        self.shown_waiters.clear()

    def next_deadline(self, now: float) -> float:
        deadlines = [now + 1.0]
        if self.conn is None:
            deadlines.append(self.login_at)
        else:
            timer = self.conn.get_timer()
            if timer is not None:
                deadlines.append(timer)
            deadlines.append(self.next_ping)
        if self.closing_deadline is not None:
            deadlines.append(self.closing_deadline)
        if self.shown_deadline is not None:
            deadlines.append(self.shown_deadline)
        return min(deadlines)

    def send_datagram(self, data: bytes, now: float) -> None:
        try:
            self.sock.sendto(data, self.server)
            self.s.datagrams_sent += 1
            self.last_sent = now
        except OSError as exc:  # the network is down or the port refused: resend later
            log.debug("sendto: %s", exc)

    def read_datagrams(self, now: float) -> None:
        for _ in range(256):
            try:
                data, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP port unreachable: the server is not there
                log.debug("recvfrom: %s", exc)
                continue
            try:
                self.on_datagram(data, now)
            except ProtocolError as exc:
                log.debug("dropped a datagram: %s", exc)

    def on_datagram(self, data: bytes, now: float) -> None:
        header = decode_header(data)
        if self.conn is not None and header.session_id == self.conn.session_id:
            if header.flags & FLAG_MAC:
                if self.conn.receive_datagram(data, now):
                    self.last_heard = now
                    self.collect(now)
                return
            # No MAC: only an UNKNOWN_SESSION hint (below) can name our session.
        packet = decode_packet(data, None)
        for frame in packet.frames:
            if (
                isinstance(frame, (Challenge, Welcome, Refused))
                and self.conn is None
                and frame.nonce == self.nonce
            ):
                self.on_login_reply(frame, now)
            elif isinstance(frame, UnknownSession) and self.conn is not None:
                if header.session_id != self.conn.session_id:
                    continue
                if self.closing_deadline is not None:
                    self.finish(ErrorCode.LOGGED_OUT)  # the server already let us go
                    return
                log.info("the server does not know our session (it restarted?); logging in again")
                self.link_lost(now, notify=True)

    # --- login --------------------------------------------------------------

    def start_login(self, now: float, deadline: float | None) -> None:
        """Begin a login: HELLO -> CHALLENGE -> LOGIN -> WELCOME (SCRAM)."""
        assert self.s.username is not None
        self.nonce = secrets.token_bytes(16)
        hello = Hello(self.s.username, self.s.instance_id, self.nonce)
        self.login_datagram = encode_packet(
            Packet(NO_SESSION, 0, (hello,)), None, pad_to=HELLO_SIZE
        )
        self.login_phase = "hello"
        self.login_started = now
        self.login_at = now
        self.login_interval = 0.25
        self.login_deadline = deadline
        self.auth = None

    def run_login_timer(self, now: float) -> None:
        if self.login_deadline is not None and now >= self.login_deadline:
            host, port = self.server
            self.s._fatal(ErrorCode.SERVER_UNREACHABLE,
                          f"server {host}:{port} does not answer; is it running?")  # fmt: skip
            self.done = True
            return
        if self.login_phase == "login" and now - self.login_started > 3 * LOGIN_STEP:
            # The cookie may have gone stale, or the server restarted: start over.
            self.start_login(now, self.login_deadline)
        if now >= self.login_at and self.login_phase == "wait":
            self.start_login(now, None)  # a fresh attempt after being told to wait
        if now >= self.login_at:
            self.send_datagram(self.login_datagram, now)
            cap = 2.0 if self.first_login else RECONNECT_MAX
            self.login_at = now + self.login_interval * random.uniform(1.0, 1.5)
            self.login_interval = min(cap, self.login_interval * 2)

    def on_login_reply(self, frame: Challenge | Welcome | Refused, now: float) -> None:
        if isinstance(frame, Refused):
            if frame.code == ErrorCode.RATE_LIMITED:
                # Too many failed logins (or new accounts): a clear error, then
                # try again later. A server that answers is not unreachable.
                self.s._emit(ErrorEvent(frame.code.label, frame.message))
                self.login_phase = "wait"
                self.login_at = now + RATE_LIMITED_WAIT
                self.login_deadline = None
                return
            if frame.code in FATAL_LOGIN_ERRORS or self.first_login:
                self.s._fatal(frame.code, frame.message)
                self.done = True
            else:  # e.g. a busy server: keep trying
                self.s._emit(ErrorEvent(frame.code.label, frame.message))
            return
        if isinstance(frame, Challenge):
            if self.login_phase != "hello":
                return  # a duplicate
            self.send_proof(frame, now)
            return
        if self.auth is None or self.login_phase != "login":
            return
        message, keys, server_dh = self.auth
        if not hmac.compare_digest(frame.signature, server_signature(keys.server_key, message)):
            # Someone answered who does not know our account: not our server.
            text = "the server could not prove it knows this account; not logging in"
            self.s._fatal(ErrorCode.SERVER_UNREACHABLE, text)
            self.done = True
            return
        to_server, to_client = session_keys(keys.client_key, message)
        self.conn = Connection(
            frame.session_id, to_server, now, peer_key=to_client,
            rto_min=self.s.rto_min, rto_max=self.s.rto_max,
        )  # fmt: skip
        if self.pinned is None:  # trust on first use, like SSH's known_hosts
            self.pinned = server_dh
            if self.store is not None:
                self.store.pin_server_key(server_dh)
        self.last_heard = now
        self.schedule_ping(now)
        if self.first_login:
            self.first_login = False
            self.s.username = frame.username
            self.s._emit(LoggedIn(frame.username))
            self.hand_on_unshown()
        else:
            self.s._emit(LinkChanged(up=True))
        self.link_up = True
        for name in sorted(self.watched):
            self.send_message(Watch(name))
        # Resend, in order and with their ids, what the server has not accepted.
        for out in self.outbox.values():
            if out.state == "sending":
                self.conn.send(encode_message(Send(out.msg_id, out.to, out.text)),
                               conversation_stream(out.to))  # fmt: skip

    def hand_on_unshown(self) -> None:
        """What an earlier run committed but never showed (it died between
        the two): handed on once, before anything new arrives. The server
        delivers these again (they were never receipted); `add_incoming`
        then finds them here, not shown, and leaves them to this."""
        if self.store is None:
            return
        for stored in self.store.unshown():
            self.awaiting[stored.server_msg_id] = (name_key(stored.sender), stored.msg_id)
            self.s._heard_from(stored.sender)
            self.s._emit(MessageReceived(stored.sender, stored.text, stored.server_msg_id,
                                         stored.sent_ms, stored.msg_id.label()))  # fmt: skip

    def send_proof(self, challenge: Challenge, now: float) -> None:
        """SCRAM client-final: stretch the password (cached per salt), prove it."""
        assert self.s.username is not None
        if not PBKDF2_MIN_ITERATIONS <= challenge.iterations <= PBKDF2_MAX_ITERATIONS:
            log.warning("ignoring a challenge with %d iterations", challenge.iterations)
            return
        if self.pinned is not None and challenge.dh_public != self.pinned:
            # Not the server this account was used with here: an attacker in
            # the middle, or a server whose data was reset. Never hand it keys.
            host, port = self.server
            text = (f"the server at {host}:{port} is not the one you logged in to before "
                    "(its key changed); not logging in. If it was reset on purpose, remove "
                    f"{self.store.directory if self.store else 'this client data'}")  # fmt: skip
            self.s._fatal(ErrorCode.SERVER_UNREACHABLE, text)
            self.done = True
            return
        cache_key = (challenge.salt, challenge.iterations)
        salted = self.salted.get(cache_key)
        if salted is None:
            salted = salted_password(self.password, challenge.salt, challenge.iterations)
            self.salted = {cache_key: salted}
        try:
            login, message, keys = build_login(
                self.s.username, self.s.instance_id, self.nonce, challenge, salted
            )
        except ProtocolError as exc:
            log.warning("ignoring a challenge: %s", exc)
            return
        self.auth = (message, keys, challenge.dh_public)
        frames: tuple[Frame, ...] = (login,)
        if self.ticket is not None:
            frames += (TicketFrame(self.ticket),)
        self.login_datagram = encode_packet(
            Packet(NO_SESSION, 0, frames), None, pad_to=MIN_PREAUTH_REQUEST
        )
        self.login_phase = "login"
        now = time.monotonic()  # PBKDF2 took a while
        self.login_started = now
        self.login_interval = 0.25
        self.login_at = now

    def link_lost(self, now: float, *, notify: bool) -> None:
        """The server is gone or forgot us: log in again, keeping the outbox."""
        self.conn = None
        if self.link_up and notify:
            self.s._emit(ErrorEvent(ErrorCode.SERVER_UNREACHABLE.label,
                                    "the server stopped answering; reconnecting"))  # fmt: skip
            self.s._emit(LinkChanged(up=False))
        self.link_up = False
        self.start_login(now, deadline=None)

    # --- online ---------------------------------------------------------------

    def schedule_ping(self, now: float) -> None:
        self.next_ping = now + self.s.keepalive + random.uniform(0, KEEPALIVE_JITTER)

    def run_timers(self, now: float) -> None:
        if self.conn is None:
            if not self.done:
                self.run_login_timer(now)
        else:
            timer = self.conn.get_timer()
            if timer is not None and timer <= now:
                self.conn.handle_timer(now)
                self.collect(now)
            if self.conn is not None and now >= self.next_ping:
                self.conn.send_ping()
                self.schedule_ping(now)
            if self.conn is not None and now - self.last_heard >= self.s.link_timeout:
                self.link_lost(now, notify=True)
        self.run_closing(now)

    def flush(self, now: float) -> None:
        # Everything stored this pass hits the disk before anything it
        # promises (a receipt) leaves, and before a received message is
        # handed on to be shown: one fsync per pass.
        if self.store is not None:
            self.store.commit()
        for done in self.shown_waiters:
            done.set()
        self.shown_waiters.clear()
        for out in self.unreported:
            self.s._emit(StatusChanged(out.msg_id.label(), "sending", out.to, out.text))
        self.unreported.clear()
        for event in self.arrived:
            self.s._heard_from(event.sender)
            self.s._emit(event)
        self.arrived.clear()
        if self.conn is None or self.done:
            return
        self.queue_receipts()
        for datagram in self.conn.datagrams_to_send(now):
            self.send_datagram(datagram, now)

    def queue_receipts(self) -> None:
        """The receipts for what was shown, batched, once the store has
        committed it (a receipt promises the message is kept and was shown)."""
        if not self.receipts or self.conn is None:
            return
        if self.store is not None:
            self.store.commit()
        receipts, self.receipts = self.receipts, []
        for part in batches(receipts):
            self.send_message(Receipt(part[0]) if len(part) == 1 else Receipts(tuple(part)))

    def send_message(
        self, message: Message, stream: int = CONTROL_STREAM, handle: object = None
    ) -> None:
        if self.conn is not None:
            self.conn.send(encode_message(message), stream, handle)

    def collect(self, now: float) -> None:
        conn = self.conn
        while conn is not None and (event := conn.next_event()) is not None:
            if isinstance(event, PayloadReceived):
                try:
                    message = decode_message(event.payload)
                except ProtocolError as exc:
                    log.warning("dropped a message from the server: %s", exc)
                    continue
                self.on_message(message, now)
                if self.conn is not conn:  # the message ended the session
                    return
            elif isinstance(event, PayloadAcked) and event.handle == "logout":
                self.finish(ErrorCode.LOGGED_OUT)
            elif isinstance(event, PeerUnreachable):
                self.link_lost(now, notify=True)
                return
            elif isinstance(event, PeerReachable):
                pass

    def accepted(self, msg_id: MsgId) -> None:
        out = self.outbox.get(msg_id)
        if out is not None and out.state == "sending":
            out.state = "accepted"
            self.record_state(msg_id, "accepted")
            self.s._emit(StatusChanged(out.msg_id.label(), "accepted", out.to, out.text))

    def delivered(self, msg_id: MsgId, to: str) -> None:
        s = self.s
        out = self.outbox.pop(msg_id, None)
        if out is None:
            # Accepted before a restart of this client (only the store knew
            # it), or a receipt sent again: report `delivered` once.
            if self.store is not None and self.store.state_of(msg_id) not in (None, "delivered"):
                self.record_state(msg_id, "delivered")
                s._emit(StatusChanged(msg_id.label(), "delivered", to, ""))
        else:
            self.record_state(msg_id, "delivered")
            if out.state == "sending":
                s._emit(StatusChanged(out.msg_id.label(), "accepted", out.to, out.text))
            s._emit(StatusChanged(out.msg_id.label(), "delivered", out.to, out.text))

    def on_message(self, message: Message, now: float) -> None:
        s = self.s
        if isinstance(message, Deliver):
            # Committed, then handed on (at the flush), then shown by the
            # front end, which says so (`shown`), then receipted; each
            # message is shown once, however often it arrives.
            key = (name_key(message.sender), message.msg_id)
            if self.store is not None:
                arrival = self.store.add_incoming(
                    message.sender, message.msg_id, message.text, message.sent_ms,
                    message.server_msg_id,
                )  # fmt: skip
            else:
                was_shown = self.seen.get(key)
                arrival = "new" if was_shown is None else "shown" if was_shown else "unshown"
                self.seen.setdefault(key, False)
            if arrival == "new":
                self.awaiting[message.server_msg_id] = key
                self.arrived.append(MessageReceived(message.sender, message.text,
                                                    message.server_msg_id, message.sent_ms,
                                                    message.msg_id.label()))  # fmt: skip
            elif arrival == "shown":
                self.receipts.append(message.server_msg_id)  # its receipt was lost: again
            # "unshown": on its way to the screen; the receipt follows `shown`.
        elif isinstance(message, Accept):
            self.accepted(message.msg_id)
        elif isinstance(message, Accepts):
            for msg_id, _ in message.items:
                self.accepted(msg_id)
        elif isinstance(message, Delivered):
            self.delivered(message.msg_id, message.to)
        elif isinstance(message, Delivereds):
            for msg_id in message.msg_ids:
                self.delivered(msg_id, message.to)
        elif isinstance(message, Fail):
            out = self.outbox.pop(message.msg_id, None)
            self.record_state(message.msg_id, "failed")
            if out is not None:
                s._emit(StatusChanged(out.msg_id.label(), "failed", out.to, out.text,
                                      message.reason.label))  # fmt: skip
                s._emit(ErrorEvent(message.reason.label, message.message))
        elif isinstance(message, Presence):
            user_key = name_key(message.user)
            if self.presence.get(user_key) != message.online:  # report changes only
                self.presence[user_key] = message.online
                s._emit(PresenceChanged(message.user, message.online))
        elif isinstance(message, WhoReply):
            self.who_pages.extend(message.users)
            if message.next_after:
                self.send_message(Who(message.next_after))
            else:
                s._emit(WhoList(tuple(self.who_pages)))
                self.who_pages = []
        elif isinstance(message, Notice):
            s._emit(ErrorEvent(message.code.label, message.message))
        elif isinstance(message, Typing):
            s._emit(TypingNotice(message.user))
        elif isinstance(message, Ticket):
            self.ticket = message.ticket
            if self.store is not None and not self.store.locked:  # locked: a one-off instance
                self.store.keep_ticket(message.ticket)
        elif isinstance(message, Bye):
            if message.code == ErrorCode.SERVER_SHUTDOWN:
                s._emit(ErrorEvent(message.code.label, message.message))
                if self.link_up:
                    s._emit(LinkChanged(up=False))
                self.link_lost(now, notify=False)
                self.login_at = now + 0.5  # give the next server a moment to start
            else:
                s._fatal(message.code, message.message)
                self.done = True
                self.conn = None

    def on_shown(self, server_msg_id: int, done: threading.Event | None) -> None:
        """The front end showed a message: record it, then receipt it."""
        key = self.awaiting.pop(server_msg_id, None)
        if self.store is not None:
            known = self.store.mark_shown(server_msg_id)
        else:
            known = key is not None
            if key is not None:
                self.seen[key] = True
        if known:
            self.receipts.append(server_msg_id)  # after the commit, at the flush
        if done is not None:
            self.shown_waiters.append(done)

    def record_state(self, msg_id: MsgId, state: str) -> None:
        if self.store is not None:
            self.store.set_state(msg_id, state)

    def run_commands(self, now: float) -> None:
        while True:
            try:
                command = self.s._commands.get_nowait()
            except queue.Empty:
                return
            name = command[0]
            if name == "send":
                _, msg_id, to, text = command
                try:
                    payload = encode_message(Send(msg_id, to, text))
                except LocalProtocolError as exc:  # checked in send(); never kill the thread
                    self.s._emit(StatusChanged(msg_id.label(), "failed", to, text, "too_long"))
                    self.s._emit(ErrorEvent(ErrorCode.TOO_LONG.label, str(exc)))
                    continue
                out = self.outbox[msg_id] = _Outgoing(msg_id, to, text)
                self.unreported.append(out)
                if self.store is not None:
                    self.store.add_outgoing(msg_id, to, text)
                if self.conn is not None:
                    self.conn.send(payload, conversation_stream(to))
            elif name == "who":
                self.who_pages = []
                self.send_message(Who())
            elif name == "typing":
                self.send_message(Typing(command[1]))
            elif name == "watch":
                self.watched.add(command[1])
                self.send_message(Watch(command[1]))
            elif name == "shown":
                self.on_shown(command[1], command[2])
            elif name == "logout":
                if self.closing_deadline is None:
                    self.closing_deadline = now + command[1]
                    self.closing_shown_wait = command[2]
            elif name == "abort":
                self.done = True

    def run_closing(self, now: float) -> None:
        if self.closing_deadline is None or self.done:
            return
        waiting = any(out.state == "sending" for out in self.outbox.values())
        if self.conn is None:
            if now >= self.closing_deadline:
                self.warn_unsent()
                self.finish(ErrorCode.LOGGED_OUT)
            return
        if self.logout_sent_at is None and (not waiting or now >= self.closing_deadline):
            if self.awaiting and self.closing_shown_wait:
                # The receipts of what the front end is showing now should
                # leave before the LOGOUT; not for long (see SHOWN_WAIT).
                if self.shown_deadline is None:
                    self.shown_deadline = min(now + SHOWN_WAIT, self.closing_deadline)
                if now < self.shown_deadline:
                    return
            self.warn_unsent()
            self.queue_receipts()  # before the LOGOUT, which ends the session
            self.send_message(Logout(), handle="logout")
            self.logout_sent_at = now
            self.closing_deadline = now + LOGOUT_ACK_WAIT
        elif self.logout_sent_at is not None and now >= self.closing_deadline:
            self.finish(ErrorCode.LOGGED_OUT)

    def warn_unsent(self) -> None:
        """Logging out with messages the server has not accepted: say so."""
        unsent = sum(out.state == "sending" for out in self.outbox.values())
        if unsent:
            kept = "kept in the outbox for the next login" if self.store else "not sent"
            text = f"{unsent} message(s) not accepted by the server yet: {kept}"
            self.s._emit(ErrorEvent(ErrorCode.SERVER_UNREACHABLE.label, text))

    def finish(self, reason: ErrorCode) -> None:
        if self.conn is not None:
            self.flush(time.monotonic())  # the ack for anything the server sent last
        self.s._emit(Disconnected(reason.label))
        self.done = True


# --- terminal front end -----------------------------------------------------


def event_to_json(event: SessionEvent) -> dict[str, Any]:
    """The `--json` form of an event (DESIGN.md, "Interfaces")."""
    if isinstance(event, LoggedIn):
        return {"event": "logged_in", "user": event.user}
    if isinstance(event, MessageReceived):
        return {"event": "message", "from": event.sender, "text": event.text, "id": event.id,
                "sent_ms": event.sent_ms}  # fmt: skip
    if isinstance(event, StatusChanged):
        out: dict[str, Any] = {"event": "status", "id": event.id, "state": event.state}
        if event.state == "sending":
            out["to"] = event.to
            out["text"] = event.text
        if event.reason is not None:
            out["reason"] = event.reason
        return out
    if isinstance(event, PresenceChanged):
        return {"event": "presence", "user": event.user, "online": event.online}
    if isinstance(event, WhoList):
        return {"event": "who", "users": list(event.users)}
    if isinstance(event, ErrorEvent):
        return {"event": "error", "code": event.code, "message": event.message}
    if isinstance(event, LinkChanged):
        return {"event": "link", "state": "up" if event.up else "down"}
    if isinstance(event, TypingNotice):
        return {"event": "typing", "user": event.user}
    return {"event": "disconnected", "reason": event.reason}


def event_to_text(event: SessionEvent) -> tuple[str, bool] | None:
    """A line for a person (and whether it belongs on stderr), or None."""
    if isinstance(event, LoggedIn):
        return f"logged in as {event.user}; type a message, /to NAME, /who or /quit", False
    if isinstance(event, MessageReceived):
        return f"{event.sender}: {event.text}", False
    if isinstance(event, StatusChanged) and event.state == "failed":
        return f"! not delivered to {event.to}: {event.text!r} ({event.reason})", True
    if isinstance(event, PresenceChanged):
        return f"* {event.user} is {'online' if event.online else 'offline'}", False
    if isinstance(event, WhoList):
        return "online: " + (", ".join(event.users) or "nobody"), False
    if isinstance(event, ErrorEvent):
        return f"error: {event.message}", True
    if isinstance(event, LinkChanged):
        return ("* reconnected" if event.up else "* connection lost; reconnecting..."), True
    if isinstance(event, TypingNotice):
        return None
    if isinstance(event, Disconnected) and event.reason != "logged_out":
        return f"disconnected ({event.reason})", True
    return None


@dataclass(frozen=True)
class _Line:
    text: str | None  # None: end of input


def _read_lines(stream: IO[str], inbox: queue.Queue[Any]) -> None:
    for line in stream:
        inbox.put(_Line(line.rstrip("\n")))
    inbox.put(_Line(None))


def run_terminal(
    session: ChatSession,
    server: str,
    user: str,
    connect_to: str | None,
    *,
    password: str,
    as_json: bool,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """The line-based client; returns the exit status (0, or 2 after a fatal error)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    inbox = session.events

    closed_pipe = False

    def show(event: SessionEvent) -> None:
        nonlocal closed_pipe
        if closed_pipe:
            return
        try:
            if as_json:
                stdout.write(json.dumps(event_to_json(event), ensure_ascii=False) + "\n")
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
        if isinstance(event, MessageReceived):
            # Printed and flushed: now (and only now) it may be receipted.
            # Waiting for the record keeps a crash to one message shown again.
            session.shown(event.id, wait=SHOWN_MARK_WAIT)

    def stop(signum: int, frame: object) -> None:
        inbox.put(_Line(None))  # Ctrl+C or SIGTERM: log out like /quit

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)

    session.login(server, user, connect_to, password=password)
    threading.Thread(target=_read_lines, args=(stdin, inbox), daemon=True, name="stdin").start()
    fatal = False
    quitting = False
    while True:
        item = inbox.get()
        if isinstance(item, _Line):
            if quitting:
                continue
            text = item.text
            if text is None or text.strip() == "/quit":
                quitting = True
                session.logout(10.0)
            elif text.startswith("/to "):
                session.set_peer(text[4:].strip())
            elif text.strip() == "/who":
                session.who()
            elif text.strip():
                session.send(text)
            continue
        show(item)
        if isinstance(item, ErrorEvent) and item.fatal:
            fatal = True
        if isinstance(item, Disconnected):
            return 2 if fatal or item.reason != "logged_out" else 0


# --- command line -------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-client", description="Chat over the UDP relay.")
    parser.add_argument(
        "--no-gui", action="store_true", help="use the terminal instead of a window"
    )
    parser.add_argument(
        "--server",
        type=_server_argument,
        default=f"127.0.0.1:{DEFAULT_PORT}",
        help="HOST:PORT of the server (default %(default)s)",
    )
    parser.add_argument("--user", help="your username (terminal mode)")
    parser.add_argument("--connect-to", default=None, help="who to talk to first (optional)")
    parser.add_argument("--json", action="store_true", help="one JSON object per event on stdout")
    parser.add_argument(
        "--password-file", type=Path, default=None, metavar="FILE",
        help="read the password from FILE (else $CHAT_PASSWORD, else a prompt)",
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
    """--server as typed, once `parse_server` has found it well formed."""
    try:
        parse_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


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
    args = parser.parse_args(argv)
    if args.rto_max < args.rto_min:
        parser.error(f"argument --rto-max: {args.rto_max} is below --rto-min ({args.rto_min})")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not args.no_gui:
        from chat_window import run_window

        return run_window(args)
    if not args.user:
        print("chat-client: --user NAME is required with --no-gui", file=sys.stderr)
        return 2
    password = read_password(args)
    if not password:
        message = "a password is required: set CHAT_PASSWORD or use --password-file FILE"
        if args.password_file is not None:
            message = f"no password could be read from {args.password_file}"
        if args.json:
            print(json.dumps(event_to_json(ErrorEvent("password_required", message, True))))
            print(json.dumps(event_to_json(Disconnected("password_required"))), flush=True)
        else:
            print(f"chat-client: {message}", file=sys.stderr)
        return 2
    session = ChatSession(
        rto_min=args.rto_min, rto_max=args.rto_max, login_timeout=args.login_timeout
    )
    try:
        return run_terminal(
            session, args.server, args.user, args.connect_to, password=password, as_json=args.json
        )
    except KeyboardInterrupt:
        session.close(2.0)
        return 0


def demo_main(argv: list[str] | None = None) -> int:
    """`chat-demo`: a private server on a free port and two windows, alice
    (talking to bob) and bob, side by side and logged in."""
    parser = argparse.ArgumentParser(
        prog="chat-demo",
        description="Start a private chat server on a free port and two windows, alice "
        "(talking to bob) and bob, side by side and logged in.",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"],
        help="how much to log on stderr (default %(default)s)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    import tempfile
    import tkinter as tk

    from chat_window import ChatWindow, Settings, open_root

    root = open_root("chat-demo")
    if root is None:
        return 2
    from chat_registry import ServerConfig
    from chat_server import ChatServer

    root.withdraw()
    # Its own server, data and demo accounts: never the user's.
    workdir = tempfile.TemporaryDirectory(prefix="chat-demo-")
    # One process: the two registrations' key exchanges run on the server's loop.
    server = ChatServer(
        ("127.0.0.1", 0), ServerConfig(data_dir=Path(workdir.name) / "server", key_workers=0)
    )
    serving = threading.Thread(target=server.serve_forever, daemon=True, name="demo-server")
    serving.start()
    host, port = server.address
    width = max(560, min(760, root.winfo_screenwidth() // 2 - 20))
    height = max(420, min(620, root.winfo_screenheight() - 120))
    windows: list[Any] = []

    def closed(window: Any) -> None:
        windows.remove(window)
        if not windows:
            root.quit()

    for i, (user, peer) in enumerate((("alice", "bob"), ("bob", ""))):
        settings = Settings(server=f"{host}:{port}", username=user,
                            geometry=f"{width}x{height}+{10 + i * (width + 20)}+40")  # fmt: skip
        options = {"store_root": Path(workdir.name) / "client"}
        window = ChatWindow(tk.Toplevel(root), settings, session_options=options, on_closed=closed)
        window.connect_var.set(peer)
        window.password_var.set(f"{user}-demo-password")
        window.submit_login()
        windows.append(window)
    print(f"chat-demo: server on {host}:{port}; close both windows to stop", file=sys.stderr)

    def stop(signum: int, frame: object) -> None:
        # From a signal handler only schedule: Tk is touched on its own loop.
        root.after(0, root.quit)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        root.mainloop()
    except KeyboardInterrupt:
        pass
    finally:
        for window in list(windows):
            window.close()  # logs out
        server.shutdown()
        serving.join(5)
        server.close()
        workdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
