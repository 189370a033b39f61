"""The relay server: sessions, routing, presence, and the socket loop.

`Relay` holds all of the server's state and logic with no socket: the loop
hands it each datagram with `receive(data, addr, now)`, asks `flush(now)` for
what to send, and sleeps until `next_deadline()`. `ChatServer` is the thin
shell that owns the UDP socket and runs that loop on one thread, so the
registry has exactly one owner. Message text is never looked at, only moved.

Who is who: a user is a name (compared by `protocol.name_key`); a session is
one login of a user from one client instance, named on the wire by its
`session_id` and proved on every datagram by an HMAC with its key. The
sender of a message is always the session's user, never a field a client
could fill in.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import heapq
import itertools
import logging
import secrets
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType as _StackFrame

from protocol import (
    CONTROL_STREAM,
    MAX_TEXT_BYTES,
    MIN_PREAUTH_REQUEST,
    NO_SESSION,
    NONCE_SIZE,
    WHO_PAGE_MAX,
    Accept,
    Bye,
    Deliver,
    Delivered,
    ErrorCode,
    Fail,
    LocalProtocolError,
    Login,
    Logout,
    Message,
    MsgId,
    Packet,
    Presence,
    Receipt,
    Refused,
    RemoteProtocolError,
    Send,
    Typing,
    UnsupportedVersion,
    Welcome,
    Who,
    WhoReply,
    conversation_stream,
    decode_header,
    decode_message,
    decode_packet,
    encode_message,
    encode_packet,
    name_key,
    normalize_name,
    resume_proof,
    unknown_session_reply,
    version_reply,
)
from reliability import RTO_MAX, RTO_MIN, Connection, PayloadAcked, PayloadReceived

log = logging.getLogger("chat_server")

Address = tuple[str, int]
Outgoing = list[tuple[bytes, Address]]


@dataclass
class ServerConfig:
    """Every limit and timer of the server, with the defaults of RELIABILITY.md."""

    session_timeout: float = 60.0  # silence after which a session expires
    rto_min: float = RTO_MIN
    rto_max: float = RTO_MAX
    max_sessions: int = 20_000
    mailbox_messages: int = 10_000  # per recipient
    mailbox_bytes: int = 10 * 1024 * 1024
    log_interval: float = 10.0  # at most one log line per reason this often


class _Entry:
    """A message accepted for a recipient and not yet receipted by their client."""

    __slots__ = ("server_msg_id", "msg_id", "sender_key", "sender", "text", "sent_ms", "queued_on")

    def __init__(
        self,
        server_msg_id: int,
        msg_id: MsgId,
        sender_key: str,
        sender: str,
        text: str,
        sent_ms: int,
    ) -> None:
        self.server_msg_id = server_msg_id
        self.msg_id = msg_id
        self.sender_key = sender_key
        self.sender = sender
        self.text = text
        self.sent_ms = sent_ms
        self.queued_on: bytes | None = None  # the session it was handed to


class _User:
    __slots__ = ("name", "key", "session", "mailbox", "mailbox_bytes", "notices", "contacts")

    def __init__(self, name: str, key: str) -> None:
        self.name = name
        self.key = key
        self.session: _Session | None = None
        self.mailbox: dict[int, _Entry] = {}
        self.mailbox_bytes = 0
        # Receipts for messages this user sent, until their client acks them.
        self.notices: dict[MsgId, Delivered] = {}
        self.contacts: set[str] = set()


class _Session:
    __slots__ = (
        "session_id", "user", "addr", "conn", "instance_id", "nonce", "last_heard",
        "scheduled", "closing",
    )  # fmt: skip

    def __init__(
        self, session_id: bytes, user: _User, addr: Address, conn: Connection,
        instance_id: int, nonce: bytes, now: float,
    ) -> None:  # fmt: skip
        self.session_id = session_id
        self.user = user
        self.addr = addr
        self.conn = conn
        self.instance_id = instance_id
        self.nonce = nonce
        self.last_heard = now
        self.scheduled: float | None = None  # deadline of its live timer-heap entry
        self.closing = False


class _DropLog:
    """Counts dropped datagrams by reason and logs each reason at most once
    per interval, so a flood cannot fill the disk."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.counts: collections.Counter[str] = collections.Counter()
        self._logged: dict[str, tuple[float, int]] = {}

    def __call__(self, reason: str, addr: Address, now: float) -> None:
        self.counts[reason] += 1
        last, count_then = self._logged.get(reason, (-1e18, 0))
        if now - last >= self.interval:
            since = self.counts[reason] - count_then
            log.info("dropped datagram from %s:%d: %s (%d since last report)", *addr, reason, since)
            self._logged[reason] = (now, self.counts[reason])


class Relay:
    """The server's state and logic, without a socket (see the module doc)."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or ServerConfig()
        self._wall_clock = wall_clock
        self.users: dict[str, _User] = {}
        self.sessions: dict[bytes, _Session] = {}
        self._online: list[str] = []  # sorted name keys, for paged WHO
        self._accepted: dict[tuple[str, int, int], int] = {}  # dedup: message id -> server id
        self._next_msg_id = 1
        self._dirty: dict[bytes, _Session] = {}
        self._timers: list[tuple[float, int, bytes]] = []
        self._tiebreak = itertools.count()
        self._out: Outgoing = []
        self.drops = _DropLog(self.config.log_interval)
        self.stats: collections.Counter[str] = collections.Counter()

    # --- the loop's API ---------------------------------------------------

    def handle_datagram(self, data: bytes, addr: Address, now: float) -> Outgoing:
        """Take one datagram and return everything to send because of it."""
        self.receive(data, addr, now)
        return self.flush(now)

    def receive(self, data: bytes, addr: Address, now: float) -> None:
        """Take one datagram; replies wait for `flush` (so they can be batched)."""
        self.stats["datagrams_in"] += 1
        self.stats["bytes_in"] += len(data)
        try:
            self._receive(data, addr, now)
        except RemoteProtocolError as exc:
            self.drops(f"malformed: {exc}", addr, now)
        except Exception:  # the loop must never die on input
            log.exception("bug while handling a datagram from %s:%d", *addr)
            self.drops("internal error", addr, now)

    def flush(self, now: float) -> Outgoing:
        """Everything due to be sent now, as (datagram, address) pairs."""
        out, self._out = self._out, []
        dirty, self._dirty = self._dirty, {}
        for session in dirty.values():
            if self.sessions.get(session.session_id) is not session:
                continue
            for datagram in session.conn.datagrams_to_send(now):
                out.append((datagram, session.addr))
            if session.closing:
                self._end_session(session, now)
            else:
                self._schedule(session, now)
        self.stats["datagrams_out"] += len(out)
        self.stats["bytes_out"] += sum(len(d) for d, _ in out)
        return out

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def handle_timer(self, now: float) -> Outgoing:
        """Run every timer that is due (retransmissions, acks, expiry)."""
        while self._timers and self._timers[0][0] <= now:
            deadline, _, session_id = heapq.heappop(self._timers)
            session = self.sessions.get(session_id)
            if session is None or session.scheduled != deadline:
                continue  # stale entry; the live one is elsewhere in the heap
            session.scheduled = None
            if now - session.last_heard >= self.config.session_timeout:
                log.info("session of %s expired after %.0f s of silence", session.user.name,
                         now - session.last_heard)  # fmt: skip
                self._end_session(session, now)
                continue
            session.conn.handle_timer(now)
            self._collect(session, now)
            self._dirty[session_id] = session
        return self.flush(now)

    def shutdown_notice(self, now: float) -> Outgoing:
        """A BYE to every session: the server is going away."""
        for session in list(self.sessions.values()):
            self._send(session, Bye(ErrorCode.SERVER_SHUTDOWN, "the server is shutting down"))
        return self.flush(now)

    def online_count(self) -> int:
        return len(self._online)

    # --- datagrams --------------------------------------------------------

    def _receive(self, data: bytes, addr: Address, now: float) -> None:
        try:
            header = decode_header(data)
        except UnsupportedVersion as exc:
            reply = version_reply(len(data))
            if reply is not None:
                self._out.append((reply, addr))
            self.drops(str(exc), addr, now)
            return
        if header.session_id == NO_SESSION:
            self._receive_preauth(data, addr, now)
            return
        session = self.sessions.get(header.session_id)
        if session is None:
            # Most likely a client of a previous run of this server: tell it
            # to log in again (a reply smaller than the datagram, no MAC).
            reply = unknown_session_reply(header.session_id, len(data))
            if reply is not None:
                self._out.append((reply, addr))
            self.drops("unknown session", addr, now)
            return
        try:
            packet = decode_packet(data, session.conn.key)
        except RemoteProtocolError as exc:
            self.drops(f"session of {session.user.name}: {exc}", addr, now)
            return
        if not session.conn.receive_packet(packet, now):
            self.drops("replayed or refused", addr, now)
            self._dirty[session.session_id] = session  # it may owe a re-ack
            return
        session.last_heard = now
        if addr != session.addr:
            # The datagram verified and was fresh: the client's NAT moved it.
            log.info("session of %s moved from %s:%d to %s:%d", session.user.name,
                     *session.addr, *addr)  # fmt: skip
            session.addr = addr
        self._dirty[session.session_id] = session
        self._collect(session, now)

    def _collect(self, session: _Session, now: float) -> None:
        """Act on what the session's connection has delivered or had acked."""
        conn = session.conn
        while (event := conn.next_event()) is not None:
            if isinstance(event, PayloadReceived):
                try:
                    message = decode_message(event.payload)
                except RemoteProtocolError as exc:
                    self.drops(f"bad message from {session.user.name}: {exc}", session.addr, now)
                    continue
                self._dispatch(session, message, now)
            elif isinstance(event, PayloadAcked) and isinstance(event.handle, MsgId):
                # The sender's client holds the receipt: forget it.
                session.user.notices.pop(event.handle, None)

    # --- login --------------------------------------------------------------

    def _receive_preauth(self, data: bytes, addr: Address, now: float) -> None:
        if len(data) < MIN_PREAUTH_REQUEST:
            self.drops("unpadded pre-login datagram", addr, now)
            return
        packet = decode_packet(data, None)
        logins = [f for f in packet.frames if isinstance(f, Login)]
        if len(logins) != 1:
            self.drops("pre-login datagram without one LOGIN", addr, now)
            return
        reply = self._login(logins[0], addr, now)
        datagram = encode_packet(Packet(NO_SESSION, 0, (reply,)), None)
        if len(datagram) > len(data):  # never amplify
            self.drops("reply would be larger than the request", addr, now)
            return
        self._out.append((datagram, addr))

    def _login(self, login: Login, addr: Address, now: float) -> Welcome | Refused:
        if len(login.nonce) != NONCE_SIZE:
            return Refused(bytes(NONCE_SIZE), ErrorCode.INVALID_NAME, "bad login")
        try:
            name = normalize_name(login.username)
        except LocalProtocolError as exc:
            return Refused(login.nonce, ErrorCode.INVALID_NAME, _fit(str(exc)))
        key = name_key(name)
        user = self.users.get(key)
        old = user.session if user is not None else None
        if old is not None:
            if old.nonce == login.nonce and old.instance_id == login.instance_id:
                # Our WELCOME was lost and the client asked again.
                return Welcome(login.nonce, old.session_id, old.conn.key, old.user.name)
            resuming = login.resume_session == old.session_id and secrets.compare_digest(
                login.resume_proof, resume_proof(old.conn.key, login.nonce)
            )
            if not resuming:
                return Refused(
                    login.nonce,
                    ErrorCode.NAME_TAKEN,
                    _fit(f"the name {name!r} is in use; pick another"),
                )
            log.info("%s logged in again from the same client; old session replaced", name)
            self._end_session(old, now, quiet=True)
        if len(self.sessions) >= self.config.max_sessions:
            return Refused(login.nonce, ErrorCode.SERVER_ERROR, "the server is full; try later")
        if user is None:
            user = self.users[key] = _User(name, key)
        session_id = secrets.token_bytes(16)
        conn = Connection(
            session_id, secrets.token_bytes(32), now,
            rto_min=self.config.rto_min, rto_max=self.config.rto_max,
        )  # fmt: skip
        welcome = Welcome(login.nonce, session_id, conn.key, user.name)
        session = _Session(session_id, user, addr, conn, login.instance_id, login.nonce, now)
        self.sessions[session_id] = session
        user.session = session
        bisect.insort(self._online, key)
        self.stats["logins"] += 1
        log.info("%s logged in from %s:%d", user.name, *addr)
        # What waited for this user: messages first, in order, then receipts.
        for entry in user.mailbox.values():
            self._hand_over(user, entry)
        for msg_id, notice in user.notices.items():
            self._send(session, notice, handle=msg_id)
        self._announce(user, online=True)
        self._dirty[session_id] = session
        return welcome

    def _end_session(self, session: _Session, now: float, *, quiet: bool = False) -> None:
        if self.sessions.pop(session.session_id, None) is None:
            return
        self._dirty.pop(session.session_id, None)
        user = session.user
        if user.session is session:
            user.session = None
            index = bisect.bisect_left(self._online, user.key)
            if index < len(self._online) and self._online[index] == user.key:
                del self._online[index]
            if not quiet:
                self._announce(user, online=False)
        for entry in user.mailbox.values():
            if entry.queued_on == session.session_id:
                entry.queued_on = None  # handed over again at the next login

    # --- chat ---------------------------------------------------------------

    def _dispatch(self, session: _Session, message: Message, now: float) -> None:
        if isinstance(message, Send):
            self._on_send(session, message)
        elif isinstance(message, Receipt):
            self._on_receipt(session, message)
        elif isinstance(message, Who):
            self._on_who(session, message)
        elif isinstance(message, Typing):
            self._on_typing(session, message)
        elif isinstance(message, Logout):
            log.info("%s logged out", session.user.name)
            session.closing = True  # ended after this flush, which acks the LOGOUT
        else:
            self.drops(f"{type(message).__name__} is not for the server", session.addr, now)

    def _on_send(self, session: _Session, send: Send) -> None:
        user = session.user
        dedup = (user.key, send.msg_id.instance_id, send.msg_id.client_seq)
        known = self._accepted.get(dedup)
        if known is not None:
            # A retry of a message we already hold: same answer, no second copy.
            self._send(session, Accept(send.msg_id, known))
            return
        try:
            to_name = normalize_name(send.to)
        except LocalProtocolError as exc:
            self._fail(session, send.msg_id, ErrorCode.INVALID_NAME, str(exc))
            return
        size = len(send.text.encode("utf-8"))
        if size > MAX_TEXT_BYTES:
            self._fail(session, send.msg_id, ErrorCode.TOO_LONG, f"{size} bytes is over the limit")
            return
        recipient = self.users.get(name_key(to_name))
        if recipient is None:
            self._fail(
                session, send.msg_id, ErrorCode.NO_SUCH_USER, f"there is no user {to_name!r}"
            )
            return
        if recipient.session is None:
            self._fail(session, send.msg_id, ErrorCode.USER_OFFLINE, f"{recipient.name} is offline")
            return
        if (
            len(recipient.mailbox) >= self.config.mailbox_messages
            or recipient.mailbox_bytes + size > self.config.mailbox_bytes
        ):
            self._fail(
                session, send.msg_id, ErrorCode.MAILBOX_FULL, f"{recipient.name}'s mailbox is full"
            )
            return
        server_msg_id = self._next_msg_id
        self._next_msg_id += 1
        self._accepted[dedup] = server_msg_id
        entry = _Entry(
            server_msg_id, send.msg_id, user.key, user.name, send.text,
            int(self._wall_clock() * 1000),
        )  # fmt: skip
        recipient.mailbox[server_msg_id] = entry
        recipient.mailbox_bytes += size
        self._send(session, Accept(send.msg_id, server_msg_id))
        self.stats["messages"] += 1
        self._hand_over(recipient, entry)
        if recipient.key not in user.contacts:
            user.contacts.add(recipient.key)
            recipient.contacts.add(user.key)
            self._send(session, Presence(recipient.name, recipient.session is not None))
            if recipient.session is not None:
                self._send(recipient.session, Presence(user.name, True))

    def _hand_over(self, recipient: _User, entry: _Entry) -> None:
        session = recipient.session
        if session is None or entry.queued_on == session.session_id:
            return
        entry.queued_on = session.session_id
        deliver = Deliver(
            entry.server_msg_id, entry.msg_id, entry.sender, entry.text, entry.sent_ms
        )
        self._send(session, deliver, stream=conversation_stream(entry.sender))

    def _on_receipt(self, session: _Session, receipt: Receipt) -> None:
        user = session.user
        entry = user.mailbox.pop(receipt.server_msg_id, None)
        if entry is None:
            return  # a repeated receipt
        user.mailbox_bytes -= len(entry.text.encode("utf-8"))
        sender = self.users.get(entry.sender_key)
        if sender is None:
            return
        notice = Delivered(entry.msg_id, user.name)
        sender.notices[entry.msg_id] = notice
        if sender.session is not None:
            self._send(sender.session, notice, handle=entry.msg_id)

    def _on_who(self, session: _Session, who: Who) -> None:
        limit = max(1, min(who.limit, WHO_PAGE_MAX))
        start = bisect.bisect_right(self._online, who.after) if who.after else 0
        keys = self._online[start : start + limit]
        more = start + limit < len(self._online)
        names = tuple(self.users[k].name for k in keys)
        self._send(session, WhoReply(names, keys[-1] if more and keys else ""))

    def _on_typing(self, session: _Session, typing: Typing) -> None:
        peer = self.users.get(name_key(typing.user))
        if peer is not None and peer.session is not None and session.user.key in peer.contacts:
            self._send(peer.session, Typing(session.user.name))

    def _fail(self, session: _Session, msg_id: MsgId, code: ErrorCode, text: str) -> None:
        self._send(session, Fail(msg_id, code, text))

    def _announce(self, user: _User, *, online: bool) -> None:
        for key in user.contacts:
            contact = self.users.get(key)
            if contact is not None and contact.session is not None:
                self._send(contact.session, Presence(user.name, online))

    def _send(
        self, session: _Session, message: Message, *, stream: int = CONTROL_STREAM,
        handle: object = None,
    ) -> None:  # fmt: skip
        session.conn.send(encode_message(message), stream, handle)
        self._dirty[session.session_id] = session

    def _schedule(self, session: _Session, now: float) -> None:
        timer = session.conn.get_timer()
        deadline = session.last_heard + self.config.session_timeout
        if timer is not None:
            deadline = min(deadline, max(timer, now))
        if session.scheduled is None or deadline < session.scheduled:
            session.scheduled = deadline
            heapq.heappush(self._timers, (deadline, next(self._tiebreak), session.session_id))


def _fit(text: str, limit: int = 120) -> str:
    """Shorten an error text so a pre-login reply stays smaller than its request."""
    data = text.encode("utf-8")[:limit]
    return data.decode("utf-8", "ignore")


# --- the socket loop ----------------------------------------------------------


class ChatServer:
    """A relay bound to a UDP address (port 0 picks a free one; `.address` is
    the real one). `serve_forever()` runs the loop on the calling thread until
    `shutdown()`; use it as a context manager to close the socket."""

    #: Datagrams read per pass before flushing, so replies batch into fewer datagrams.
    READ_BATCH = 256

    def __init__(self, address: Address = ("127.0.0.1", 5555), config: ServerConfig | None = None):
        self.relay = Relay(config)
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.socket.bind(address)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.address: Address = self.socket.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping = False
        self._stopped = False

    def __enter__(self) -> ChatServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.close()

    def close(self) -> None:
        self.socket.close()
        self._wake_r.close()
        self._wake_w.close()

    def shutdown(self) -> None:
        """Ask `serve_forever` to send its shutdown notices and return. Safe
        from another thread or a signal handler."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def serve_forever(self) -> None:
        relay = self.relay
        selector = selectors.DefaultSelector()
        selector.register(self.socket, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                now = time.monotonic()
                deadline = relay.next_deadline()
                timeout = 1.0 if deadline is None else min(1.0, max(0.0, deadline - now))
                selector.select(timeout)
                now = time.monotonic()
                for _ in range(self.READ_BATCH):
                    try:
                        data, addr = self.socket.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:  # e.g. ICMP port unreachable on some systems
                        log.debug("recvfrom: %s", exc)
                        continue
                    relay.receive(data, addr[:2], now)
                self._send_all(relay.handle_timer(now))
            self._send_all(relay.shutdown_notice(time.monotonic()))
        finally:
            selector.close()
            self._stopped = True

    def _send_all(self, out: Iterable[tuple[bytes, Address]]) -> None:
        for datagram, addr in out:
            try:
                self.socket.sendto(datagram, addr)
            except OSError as exc:  # a full buffer or an unreachable peer: the
                log.debug("sendto %s: %s", addr, exc)  # protocol resends


# --- command line ---------------------------------------------------------------


def _address(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("a port is 0..65535")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat-server", description="Run the UDP chat relay server."
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=_address,
        default=5555,
        help="UDP port; 0 picks a free one (default %(default)s)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="how much to log on stderr (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--session-timeout", type=float, default=60.0, metavar="SECONDS",
        help="silence after which a session expires (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--rto-min", type=float, default=RTO_MIN, metavar="SECONDS",
        help="smallest retransmission timeout (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--rto-max", type=float, default=RTO_MAX, metavar="SECONDS",
        help="largest retransmission timeout (default %(default)s)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = ServerConfig(
        session_timeout=args.session_timeout, rto_min=args.rto_min, rto_max=args.rto_max
    )
    try:
        server = ChatServer((args.host, args.port), config)
    except OSError as exc:
        print(f"chat-server: cannot listen on {args.host}:{args.port}: {exc.strerror}; "
              "is another server running there? Try --port 0.", file=sys.stderr)  # fmt: skip
        return 2

    def stop(signum: int, frame: _StackFrame | None) -> None:
        server.shutdown()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    host, port = server.address
    print(f"chat-server listening on {host}:{port}", flush=True)
    with server:
        server.serve_forever()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
