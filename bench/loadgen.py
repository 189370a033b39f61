"""Load clients for the benchmark, run in worker processes.

They speak the real protocol with the real code: `protocol.py` for the
SCRAM login (HELLO -> CHALLENGE -> LOGIN -> WELCOME) and the messages,
`reliability.Connection` for acks, retransmission and packing many
messages into one datagram, like the chat client but without threads, Tk
or a local store, so one process can drive many clients. The login is the
client's own: `client_core.ClientCore`, driven over shared sockets.

Each worker is a function `run_*(spec, pipe)` started by `run.py` with
multiprocessing. The conversation with the parent is:

    worker -> ("ready", info)        logged in (untimed work done)
    parent -> ("start", t0, stop_at) monotonic times (shared by all processes)
    worker -> ("done", result)       or ("error", traceback) at any point
    parent -> ("exit",)              (login workers only: keep sessions until then)

Time stamps travel inside the message text ("<monotonic_ns> <seq> xxx..."):
processes on one host share the monotonic clock, so the receiver's clock
minus the stamp is the one-way latency. The stamp is taken when the message
is written, before the sending client encodes it, packs it into a datagram
and MACs that (its own ~30-60 us of Python); the bare loop's clients stamp
right before `send`. So the sender also notes when the datagram carrying
each message went to `send` (its "lead" over the stamp), and the receiver's
latency minus that lead is the wire latency: from the sender's `send` to the
receiver's `recv`, the path through the relay alone, comparable with the
bare loop's (`wire_latencies`; exact with one message in flight; with a full
congestion window a message that waits for room is counted from the pass
that queued it, so the figure errs high).
"""

from __future__ import annotations

import array
import collections
import functools
import inspect
import secrets
import selectors
import socket
import struct
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any, Protocol, TypeVar

import protocol
from client_core import ClientCore, CoreStore, ErrorEvent
from protocol import (
    DH_PRIVATE_BITS,
    Accept,
    Accepts,
    Bye,
    Challenge,
    Deliver,
    Delivered,
    Delivereds,
    Fail,
    Login,
    Message,
    MsgId,
    Notice,
    ProtocolError,
    Receipt,
    Receipts,
    Refused,
    ScramKeys,
    Send,
    Welcome,
    batches,
    conversation_stream,
    decode_message,
    decode_packet,
    encode_message,
    salted_password,
)
from reliability import MAX_ACK_DELAY, Connection, PayloadReceived

PASSWORD = "bench password"
TEXT_SIZE = 64  # bytes of text per chat message (stamp, sequence, filler)
#: Loopback timers, as in the tests (the server gets the same flags).
RTO_MIN, RTO_MAX = 0.05, 1.0
#: Whether this checkout's `Connection.send` takes `lazy_ack` (issue 14,
#: seventh session: receipts alone are acked with the server's next datagram
#: or within `reliability.RECEIPT_ACK_DELAY`); the benchmarks run against
#: older checkouts too, whose clients send receipts as any payload.
LAZY_RECEIPTS = "lazy_ack" in inspect.signature(Connection.send).parameters


def send_receipts(conn: Connection, ids: list[int]) -> None:
    """The receipts of `ids`, batched, sent as the chat client sends them
    (`ClientCore._queue_receipts`: for a late ack where the code has it)."""
    for part in batches(ids):
        message = Receipt(part[0]) if len(part) == 1 else Receipts(tuple(part))
        if LAZY_RECEIPTS:
            conn.send(encode_message(message), lazy_ack=True)
        else:
            conn.send(encode_message(message))


SOCKET_BUFFER = 4 << 20
LOGIN_RESEND = 0.25  # first resend; doubles up to LOGIN_RESEND_MAX (as chat_client does)
LOGIN_RESEND_MAX = 2.0
Addr = tuple[str, int]


def make_text(stamp_ns: int, seq: int, size: int = TEXT_SIZE) -> str:
    return f"{stamp_ns} {seq} ".ljust(size, "x")


def text_stamp(text: str) -> int:
    return int(text[: text.index(" ")])


def new_socket(server: Addr) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.connect(server)
    sock.setblocking(False)
    return sock


def cpu_seconds() -> float:
    """CPU (user + system) of this process so far, all threads."""
    return time.process_time()


def wait_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))


# --- login ------------------------------------------------------------------


#: name -> (salt, iterations, salted password): the PBKDF2 work a real client caches.
SaltCache = dict[str, tuple[bytes, int, bytes]]


class _OnePrivateKey:
    """`secrets` as `build_login` sees it below: its DH private key is the
    same for every login of this process, everything else is `secrets`."""

    def __init__(self) -> None:
        self.private = secrets.randbits(DH_PRIVATE_BITS)

    def randbits(self, bits: int) -> int:
        return self.private if bits == DH_PRIVATE_BITS else secrets.randbits(bits)

    def __getattr__(self, name: str) -> Any:
        return getattr(secrets, name)


def _cached_dh_build_login() -> Callable[..., tuple[Login, bytes, ScramKeys]]:
    """`protocol.build_login`, the very same code, run with a DH key pair that
    is made once per process and cached results of the two 2048-bit modular
    exponentiations (~6 ms of client CPU per login). A real client makes a
    fresh pair per login; a load process standing in for thousands of them
    cannot afford to, and the server cannot tell: its work is the same. The
    protocol module itself is not touched."""
    namespace = dict(vars(protocol))
    namespace["secrets"] = _OnePrivateKey()
    namespace["dh_public"] = functools.lru_cache(maxsize=8)(protocol.dh_public)
    namespace["dh_secret"] = functools.lru_cache(maxsize=8)(protocol.dh_secret)
    original = protocol.build_login
    function = types.FunctionType(original.__code__, namespace, original.__name__,
                                  original.__defaults__, original.__closure__)  # fmt: skip
    return function


fast_login = _cached_dh_build_login()


class Handshake:
    """One client's login, run by `client_core.ClientCore` (the very login
    the chat client runs: HELLO -> CHALLENGE -> LOGIN -> WELCOME, SCRAM),
    over a socket that may carry many logins. The core gets this process's
    cached PBKDF2 (`salted`) and DH (`fast_login`) work; after the WELCOME
    its `conn` is handed to a `Peer`. `store`: the client's (its instance
    id and login ticket), to log in again as the same client."""

    __slots__ = ("name", "sock", "core")

    def __init__(
        self, name: str, sock: socket.socket, password: str = PASSWORD, *,
        salted: SaltCache | None = None, timeout: float = 120.0, store: CoreStore | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.sock = sock
        cache = salted if salted is not None else {}

        def salted_password_cached(password: str, salt: bytes, iterations: int) -> bytes:
            hit = cache.get(name)
            if hit is None or hit[:2] != (salt, iterations):
                hit = cache[name] = (salt, iterations, salted_password(password, salt, iterations))
            return hit[2]

        self.core = ClientCore(
            name, password, login_timeout=timeout, rto_min=RTO_MIN, rto_max=RTO_MAX,
            salted_password=salted_password_cached, build_login=fast_login, store=store,
        )  # fmt: skip

    @property
    def conn(self) -> Connection | None:
        return self.core.conn

    @property
    def instance_id(self) -> int:
        return self.core.instance_id

    @property
    def resends(self) -> int:
        """HELLOs and LOGINs sent beyond the first of each."""
        return max(0, self.core.login_sends - 2)

    def flush(self, now: float) -> None:
        for datagram in self.core.datagrams_to_send(now):
            try:
                self.sock.send(datagram)
            except OSError:
                pass  # a full buffer: the core resends

    def check(self) -> None:
        """Raise if the login was refused (or gave up)."""
        if self.core.ended:
            errors = [e for e in iter(self.core.next_event, None) if isinstance(e, ErrorEvent)]
            reason = f"{errors[0].code}: {errors[0].message}" if errors else "ended"
            raise RuntimeError(f"login of {self.name} refused: {reason}")


def drive_logins(
    handshakes: list[Handshake], *, challenge_only: bool = False, window: int = 256,
    timeout: float = 120.0,
) -> float:  # fmt: skip
    """Run many handshakes at once over their sockets, at most `window` in
    flight. With `challenge_only`, stop at the CHALLENGE (its PBKDF2 is
    then in the handshakes' salt cache). Returns when the last one ended.

    What the server sends a new session meanwhile (its login ticket) is
    taken and acked, as a real client does: a datagram dropped here would
    stay in flight on the server, resent, and counted in its memory and CPU."""
    sockets = {h.sock for h in handshakes}
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    pending = collections.deque(handshakes)
    active: dict[bytes, Handshake] = {}  # by the nonce of the attempt in progress
    deadline = time.monotonic() + timeout
    sessions: dict[bytes, Handshake] = {}  # logged in, by session id
    owed: collections.deque[tuple[float, Handshake]] = collections.deque()  # acks, by when due
    now = last = time.monotonic()  # last: when the last login ended

    def step(h: Handshake, nonce: bytes, now: float) -> None:
        nonlocal last
        h.check()
        if h.core.conn is not None or (challenge_only and h.core.login_phase != "hello"):
            del active[nonce]
            last = now
            if h.core.conn is not None:
                sessions[h.core.conn.session_id] = h
            return
        h.flush(now)
        if h.core.login_nonce != nonce:  # it started over from HELLO
            del active[nonce]
            active[h.core.login_nonce] = h

    last_scan = 0.0
    try:
        # Linger a moment after the last login for what its session is sent.
        while pending or active or owed or (sessions and now < last + 4 * MAX_ACK_DELAY):
            now = time.monotonic()
            while owed and owed[0][0] <= now:
                owed.popleft()[1].flush(now)
            if now > deadline:
                raise RuntimeError(f"{len(pending) + len(active)} logins not answered in time")
            while pending and len(active) < window:
                h = pending.popleft()
                h.core.connect(now)
                active[h.core.login_nonce] = h
                h.flush(now)
            if now - last_scan >= 0.05:
                last_scan = now
                for nonce, h in list(active.items()):
                    timer = h.core.get_timer()
                    if timer is not None and timer <= now:
                        h.core.handle_timer(now)
                        step(h, nonce, now)
            for key, _ in selector.select(0.1 if not owed else MAX_ACK_DELAY / 2):
                ready: socket.socket = key.fileobj  # type: ignore[assignment]
                while True:
                    try:
                        data = ready.recv(65535)
                    except BlockingIOError:
                        break
                    except OSError:
                        continue
                    try:
                        h3 = sessions.get(protocol.decode_header(data).session_id)
                        if h3 is not None:  # a new session's: ack it (after the ack delay)
                            now = time.monotonic()
                            h3.core.receive_datagram(data, now)
                            owed.append((now + MAX_ACK_DELAY, h3))
                            continue
                        packet = decode_packet(data, None)
                    except ProtocolError:
                        continue  # a session's datagram from an earlier round
                    for frame in packet.frames:
                        if isinstance(frame, (Challenge, Welcome, Refused)):
                            h2 = active.get(frame.nonce)
                            if h2 is not None:
                                now = time.monotonic()
                                h2.core.receive_datagram(data, now)
                                step(h2, frame.nonce, now)
                            break
    finally:
        selector.close()
    return last


def precompute_salts(handshakes: list[Handshake]) -> None:
    """Learn each name's salt (HELLO -> CHALLENGE) and run its PBKDF2 into
    the handshakes' salt cache: the client's work, done before any timer starts."""
    drive_logins(handshakes, challenge_only=True)


# --- chat traffic -------------------------------------------------------------


class Peer:
    """A logged-in client: its socket, its Connection, and what it does with
    the messages that arrive (in subclasses)."""

    def __init__(self, name: str, sock: socket.socket, conn: Connection, instance_id: int):
        self.name = name
        self.sock = sock
        self.conn = conn
        self.instance_id = instance_id
        self.dirty = True
        self.timer: float | None = None
        self.datagrams_in = 0
        self.sent_before = 0  # datagrams sent before t0: the login's last ack
        self.send_errors = 0
        self.notices: collections.Counter[str] = collections.Counter()

    def read(self) -> None:
        conn, recv = self.conn, self.sock.recv
        while True:
            try:
                data = recv(65535)
            except BlockingIOError:
                break
            except OSError:
                continue
            now_ns = time.monotonic_ns()
            self.datagrams_in += 1
            now = now_ns / 1e9
            if conn.receive_datagram(data, now):
                while (event := conn.next_event()) is not None:
                    if isinstance(event, PayloadReceived):
                        self.on_payload(event.payload, now_ns)
            self.dirty = True

    def pump(self, now: float) -> None:
        """Run a due timer and send what is due."""
        self.before_send()
        conn = self.conn
        if self.timer is not None and self.timer <= now:
            conn.handle_timer(now)
        send = self.sock.send
        datagrams = conn.datagrams_to_send(now)
        if datagrams:
            self.on_wire(time.monotonic_ns())
        for datagram in datagrams:
            try:
                send(datagram)
            except OSError:
                self.send_errors += 1  # a full buffer: the protocol resends
        self.timer = conn.get_timer()
        self.dirty = False

    def before_send(self) -> None:
        """Queue what this pass owes (the receiver's receipts)."""

    def on_wire(self, now_ns: int) -> None:
        """This pass's datagrams, encoded and MACed, go to `send` now."""

    def on_payload(self, payload: bytes, now_ns: int) -> None:
        self.on_message(decode_message(payload), now_ns)

    def on_message(self, message: Message, now_ns: int) -> None:
        if isinstance(message, Notice):
            self.notices[message.code.label] += 1
        elif isinstance(message, Bye):
            raise RuntimeError(f"{self.name} was told to go: {message.code.label}")

    def result(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "datagrams_in": self.datagrams_in,
            "datagrams_out": self.conn.sent_count - self.sent_before,
            "send_errors": self.send_errors, "notices": dict(self.notices),
        }  # fmt: skip


class Sender(Peer):
    """Sends to one peer with at most `window` messages not yet both
    accepted (durable on the server) and delivered (receipted)."""

    def __init__(self, name: str, sock: socket.socket, conn: Connection, instance_id: int,
                 to: str, window: int, text_size: int) -> None:  # fmt: skip
        super().__init__(name, sock, conn, instance_id)
        self.to = to
        self.stream = conversation_stream(to)
        self.window = window
        self.text_size = text_size
        self.next_seq = 1
        # client_seq -> [1 accepted | 2 delivered, send stamp in ns]
        self.outstanding: dict[int, list[int]] = {}
        self.accept_latencies = array.array("q")  # send -> ACCEPT (durable), ns
        self.delivered_latencies = array.array("q")  # send -> DELIVERED (receipted), ns
        # leads[seq - 1]: from message seq's stamp to its datagram's `send`, ns
        self.leads = array.array("q")
        self.sent = self.completed = self.failed = 0
        self.accepted = self.delivered = 0
        self.last_complete = 0.0

    def fill(self, limit: int) -> None:
        """Queue new messages while the window allows, at most `limit`."""
        room = min(self.window - len(self.outstanding), limit)
        if room <= 0:
            return
        conn, stream, instance_id, to = self.conn, self.stream, self.instance_id, self.to
        outstanding, size = self.outstanding, self.text_size
        for _ in range(room):
            seq = self.next_seq
            self.next_seq += 1
            stamp = time.monotonic_ns()
            text = make_text(stamp, seq, size)
            conn.send(encode_message(Send(MsgId(instance_id, seq), to, text)), stream)
            outstanding[seq] = [0, stamp]
        self.sent += room
        self.dirty = True

    def on_wire(self, now_ns: int) -> None:
        outstanding, leads = self.outstanding, self.leads
        for seq in range(len(leads) + 1, self.next_seq):  # written since the last pass
            entry = outstanding.get(seq)
            leads.append(now_ns - entry[1] if entry is not None else 0)

    def settle(self, seq: int, bit: int, now_ns: int) -> None:
        """An ACCEPT (bit 1) or DELIVERED (bit 2) for message `seq`."""
        entry = self.outstanding.get(seq)
        if entry is not None:
            if entry[0] & bit:
                return
            if bit == 1:
                self.accepted += 1
                self.accept_latencies.append(now_ns - entry[1])
            else:
                self.delivered += 1
                self.delivered_latencies.append(now_ns - entry[1])
            entry[0] |= bit
            if entry[0] == 3:
                del self.outstanding[seq]
                self.completed += 1
                self.last_complete = now_ns / 1e9

    def on_message(self, message: Message, now_ns: int) -> None:
        kind = type(message)
        if kind is Accept or kind is Delivered:
            msg_id = message.msg_id  # type: ignore[union-attr]
            if msg_id.instance_id == self.instance_id:
                self.settle(msg_id.client_seq, 1 if kind is Accept else 2, now_ns)
        elif isinstance(message, Accepts):
            for msg_id, _ in message.items:
                if msg_id.instance_id == self.instance_id:
                    self.settle(msg_id.client_seq, 1, now_ns)
        elif isinstance(message, Delivereds):
            for msg_id in message.msg_ids:
                if msg_id.instance_id == self.instance_id:
                    self.settle(msg_id.client_seq, 2, now_ns)
        elif isinstance(message, Fail):
            self.failed += 1
            self.outstanding.pop(message.msg_id.client_seq, None)
        else:
            super().on_message(message, now_ns)

    def result(self) -> dict[str, Any]:
        out = super().result()
        out.update(sent=self.sent, completed=self.completed, accepted=self.accepted,
                   delivered=self.delivered, failed=self.failed,
                   outstanding=len(self.outstanding), last_complete=self.last_complete,
                   accept_latencies=self.accept_latencies.tobytes(),
                   delivered_latencies=self.delivered_latencies.tobytes())  # fmt: skip
        return out


class Receiver(Peer):
    """Receipts every message at once and records its one-way latency."""

    def __init__(self, name: str, sock: socket.socket, conn: Connection, instance_id: int):
        super().__init__(name, sock, conn, instance_id)
        self.seen: set[MsgId] = set()
        self.receipts: list[int] = []
        self.received = self.duplicates = self.damaged = 0
        self.latencies = array.array("q")  # ns
        # (sender, client_seq, index in latencies): for `wire_latencies`
        self.arrivals: list[tuple[str, int, int]] = []

    def on_message(self, message: Message, now_ns: int) -> None:
        if not isinstance(message, Deliver):
            super().on_message(message, now_ns)
            return
        msg_id, text = message.msg_id, message.text
        if msg_id in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(msg_id)
            self.received += 1
            try:
                self.latencies.append(now_ns - text_stamp(text))
                self.arrivals.append((message.sender, msg_id.client_seq, len(self.latencies) - 1))
            except ValueError:
                self.damaged += 1
        # Receipted in this pass's RECEIPTS: this client keeps nothing on disk.
        self.receipts.append(message.server_msg_id)
        self.dirty = True

    def wire_latencies(self, leads: dict[str, array.array[int]]) -> array.array[int]:
        """Each message's latency from its datagram's `send` (its latency
        minus its sender's lead), for the senders in `leads`."""
        wire = array.array("q")
        latencies = self.latencies
        for sender, seq, at in self.arrivals:
            lead = leads.get(sender)
            if lead is not None and 0 < seq <= len(lead):
                wire.append(latencies[at] - lead[seq - 1])
        return wire

    def before_send(self) -> None:
        receipts, self.receipts = self.receipts, []
        send_receipts(self.conn, receipts)

    def result(self) -> dict[str, Any]:
        out = super().result()
        out.update(received=self.received, duplicates=self.duplicates, damaged=self.damaged,
                   latencies=self.latencies.tobytes())  # fmt: skip
        return out


@dataclass
class TrafficSpec:
    """What one worker process drives: `senders` are (name, to) pairs; a
    `rate` (messages/s per sender) paces them instead of sending flat out."""

    server: Addr
    senders: list[tuple[str, str]]
    receivers: list[str]
    window: int = 64
    rate: float | None = None
    text_size: int = TEXT_SIZE
    drain_timeout: float = 20.0
    limit: int | None = None  # messages per sender at most
    #: Messages per sender at least: sending goes on past `stop_at` until each
    #: has sent this many (a busy machine slows a timed phase down, so a count
    #: is what a check of the phase can rely on). At most `window`, so that
    #: it never waits for completions that a stalled receiver never gives.
    at_least: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: A client's own server by name (a cluster's node: bench/cluster.py);
    #: the others log in to `server`.
    homes: dict[str, Addr] = field(default_factory=dict)


def log_in_clients(spec: TrafficSpec) -> tuple[list[Sender], list[Receiver]]:
    """Log in every client of `spec`, each on a socket of its own (closed
    with `close_clients`)."""
    names = [name for name, _ in spec.senders] + list(spec.receivers)
    handshakes = [Handshake(name, new_socket(spec.homes.get(name, spec.server))) for name in names]
    try:
        drive_logins(handshakes)  # receivers must exist before anyone writes to them
    except BaseException:
        for h in handshakes:
            h.sock.close()
        raise
    by_name = {h.name: h for h in handshakes}
    senders = []
    for name, to in spec.senders:
        h = by_name[name]
        assert h.conn is not None
        senders.append(Sender(name, h.sock, h.conn, h.instance_id, to, spec.window,
                              spec.text_size))  # fmt: skip
    receivers = []
    for name in spec.receivers:
        h = by_name[name]
        assert h.conn is not None
        receivers.append(Receiver(name, h.sock, h.conn, h.instance_id))
    return senders, receivers


def close_clients(peers: list[Sender] | list[Receiver]) -> None:
    for p in peers:
        p.sock.close()


def run_traffic(spec: TrafficSpec, pipe: Pipe) -> None:
    """Worker: log in every client, then send flat out (or at `rate`) from
    t0 until stop_at, then wait until every message is accepted and delivered."""
    senders: list[Sender] = []
    receivers: list[Receiver] = []
    try:
        senders, receivers = log_in_clients(spec)
        pipe.send(("ready", len(senders) + len(receivers)))
        command = pipe.recv()
        assert command[0] == "start", command
        pipe.send(("done", traffic_loop(spec, senders, receivers, command[1], command[2])))
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
    finally:
        close_clients(senders)
        close_clients(receivers)
        pipe.close()


def traffic_loop(
    spec: TrafficSpec, senders: list[Sender], receivers: list[Receiver], t0: float,
    stop_at: float,
) -> dict[str, Any]:  # fmt: skip
    """Send from t0 until stop_at (or `spec.limit` messages each), then until
    every message is accepted and delivered; the figures of this process."""
    peers: list[Peer] = [*senders, *receivers]
    selector = selectors.DefaultSelector()
    for p in peers:
        selector.register(p.sock, selectors.EVENT_READ, p)
    wait_until(t0)
    cpu0 = cpu_seconds()
    for p in peers:  # what each sends from now on, per message: not the login's
        p.sent_before = p.conn.sent_count
    sending = True
    drain_deadline = 0.0
    linger_until: float | None = None
    try:
        while True:
            now = time.monotonic()
            limit = spec.limit
            if sending and (
                (now >= stop_at and all(s.sent >= spec.at_least for s in senders))
                or (limit is not None and all(s.sent >= limit for s in senders))
            ):
                sending = False
                drain_deadline = now + spec.drain_timeout
            if sending:
                for s in senders:
                    allowed = spec.window if limit is None else min(spec.window, limit - s.sent)
                    if spec.rate is not None:
                        allowed = min(allowed, int((now - t0) * spec.rate) + 1 - s.sent)
                    if now >= stop_at:  # only what `at_least` still asks for
                        allowed = min(allowed, spec.at_least - s.sent)
                    s.fill(allowed)
            elif linger_until is None:
                if all(not s.outstanding for s in senders) or now >= drain_deadline:
                    linger_until = now + 0.05  # let the last acks go out
            elif now >= linger_until:
                break
            for p in peers:
                if p.dirty or (p.timer is not None and p.timer <= now):
                    p.pump(now)
            timers = [p.timer for p in peers if p.timer is not None]
            timeout = min(0.05, max(0.0, min(timers, default=now + 0.05) - now))
            if sending and spec.rate is not None:
                timeout = min(timeout, 0.002)
            for key, _ in selector.select(timeout):
                key.data.read()
    finally:
        selector.close()
    cpu = cpu_seconds() - cpu0
    leads = {s.name: s.leads for s in senders}
    receivers_out = []
    for r in receivers:
        out = r.result()
        out["wire_latencies"] = r.wire_latencies(leads).tobytes()
        receivers_out.append(out)
    return {
        "cpu_s": cpu, "end": time.monotonic(),
        "senders": [s.result() for s in senders],
        "receivers": receivers_out,
    }  # fmt: skip


# --- the bare loop's load -----------------------------------------------------

BARE_MSG = struct.Struct("!cQQ")  # b"M", seq, stamp_ns; then the text
BARE_RECEIPT = struct.Struct("!cQ")  # b"R", seq
BARE_RESEND = 0.2


@dataclass
class BareSpec:
    relay: Addr
    pairs: list[str]  # pair names
    window: int = 64
    text_size: int = TEXT_SIZE
    drain_timeout: float = 10.0


class _BareLoad(Protocol):
    """What every bare-loop load names: the relay and its pairs."""

    relay: Addr
    pairs: list[str]


_S = TypeVar("_S", bound=_BareLoad)


class _BarePair:
    def __init__(self, name: str, relay: Addr) -> None:
        self.name = name
        self.tx = new_socket(relay)
        self.rx = new_socket(relay)
        self.next_seq = 1
        self.outstanding: dict[int, float] = {}  # seq -> sent at
        self.sent = self.completed = self.resent = 0
        self.received = self.duplicates = 0
        self.seen: set[int] = set()
        self.latencies = array.array("q")
        self.last_complete = 0.0

    def join(self) -> None:
        for sock in (self.tx, self.rx):
            sock.send(b"J" + self.name.encode())
        for sock in (self.tx, self.rx):
            sock.setblocking(True)
            sock.settimeout(5.0)
            if sock.recv(16) != b"L":
                raise RuntimeError("the bare relay did not link the pair")
            sock.setblocking(False)

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


def run_bare(spec: BareSpec, pipe: Pipe) -> None:
    """Worker: the same load through the bare loop: each message its own
    datagram, each one receipted by its own datagram, a window of 64."""
    drive_bare_pairs(spec, pipe, _bare_loop)


def drive_bare_pairs(
    spec: _S, pipe: Pipe,
    loop: Callable[[_S, list[_BarePair], float, float], dict[str, Any]],
) -> None:  # fmt: skip
    """A bare-loop worker's life: join `spec.pairs` to `spec.relay`, say
    ready, run `loop(spec, pairs, t0, stop_at)` when told to start, send its
    figures (or the traceback), close everything."""
    pairs: list[_BarePair] = []
    try:
        for name in spec.pairs:
            pairs.append(_BarePair(name, spec.relay))
            pairs[-1].join()
        pipe.send(("ready", 2 * len(pairs)))
        command = pipe.recv()
        assert command[0] == "start", command
        pipe.send(("done", loop(spec, pairs, command[1], command[2])))
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
    finally:
        for pair in pairs:
            pair.close()
        pipe.close()


def _bare_loop(spec: BareSpec, pairs: list[_BarePair], t0: float, stop_at: float) -> dict[str, Any]:
    selector = selectors.DefaultSelector()
    for pair in pairs:
        selector.register(pair.tx, selectors.EVENT_READ, (pair, True))
        selector.register(pair.rx, selectors.EVENT_READ, (pair, False))
    filler = b"x" * spec.text_size
    pack_msg, pack_receipt = BARE_MSG.pack, BARE_RECEIPT.pack
    unpack_msg, unpack_receipt = BARE_MSG.unpack_from, BARE_RECEIPT.unpack_from
    wait_until(t0)
    cpu0 = cpu_seconds()
    sending = True
    drain_deadline = 0.0
    last_scan = 0.0
    datagrams = 0
    try:
        while True:
            now = time.monotonic()
            if sending and now >= stop_at:
                sending = False
                drain_deadline = now + spec.drain_timeout
            if sending:
                for pair in pairs:
                    send = pair.tx.send
                    while len(pair.outstanding) < spec.window:
                        seq = pair.next_seq
                        pair.next_seq += 1
                        pair.outstanding[seq] = now
                        send(pack_msg(b"M", seq, time.monotonic_ns()) + filler)
                        pair.sent += 1
                        datagrams += 1
            elif all(not p.outstanding for p in pairs) or now >= drain_deadline:
                break
            if now - last_scan >= 0.05:
                last_scan = now
                for pair in pairs:
                    for seq, at in pair.outstanding.items():
                        if now - at >= BARE_RESEND:
                            pair.outstanding[seq] = now
                            pair.tx.send(pack_msg(b"M", seq, time.monotonic_ns()) + filler)
                            pair.resent += 1
            for key, _ in selector.select(0.05):
                pair, is_tx = key.data
                sock = pair.tx if is_tx else pair.rx
                while True:
                    try:
                        data = sock.recv(65535)
                    except BlockingIOError:
                        break
                    except OSError:
                        continue
                    now_ns = time.monotonic_ns()
                    if is_tx:
                        (_, seq) = unpack_receipt(data)
                        if pair.outstanding.pop(seq, None) is not None:
                            pair.completed += 1
                            pair.last_complete = now_ns / 1e9
                    else:
                        _, seq, stamp = unpack_msg(data)
                        if seq in pair.seen:
                            pair.duplicates += 1
                        else:
                            pair.seen.add(seq)
                            pair.received += 1
                            pair.latencies.append(now_ns - stamp)
                        sock.send(pack_receipt(b"R", seq))
                        datagrams += 1
    finally:
        selector.close()
    cpu = cpu_seconds() - cpu0
    return {
        "cpu_s": cpu, "end": time.monotonic(),
        "senders": [
            {"sent": p.sent, "completed": p.completed, "accepted": p.completed,
             "delivered": p.completed, "failed": 0, "outstanding": len(p.outstanding),
             "last_complete": p.last_complete, "datagrams_out": p.sent + p.resent,
             "resent": p.resent, "notices": {}}
            for p in pairs
        ],
        "receivers": [
            {"received": p.received, "duplicates": p.duplicates, "damaged": 0,
             "latencies": p.latencies.tobytes(), "datagrams_out": p.received + p.duplicates}
            for p in pairs
        ],
    }  # fmt: skip


# --- many idle sessions -----------------------------------------------------------


@dataclass
class LoginSpec:
    server: Addr
    names: list[str]
    sockets: int = 4  # sessions share a few sockets (a NAT in front of many users)
    window: int = 64  # logins in progress at once per worker


def run_logins(spec: LoginSpec, pipe: Pipe) -> None:
    """Worker: learn the salts and run PBKDF2 (untimed), then at t0 log every
    name in (the full handshake) and report. On ("again", t0, address) do it
    once more (the parent restarted the server: existing accounts), as the
    same clients (their stores: instance ids and the login tickets the
    first round gave them, as a real client keeps them); on ("exit",) stop.
    Sessions stay open until then."""
    sockets = [new_socket(spec.server) for _ in range(spec.sockets)]
    try:
        salted: SaltCache = {}
        handshakes: list[Handshake] = []
        probes = [Handshake(n, sockets[i % len(sockets)], salted=salted)
                  for i, n in enumerate(spec.names)]  # fmt: skip
        precompute_salts(probes)
        pipe.send(("ready", len(spec.names)))
        while (command := pipe.recv())[0] in ("start", "again"):
            if command[0] == "again":
                for sock in sockets:
                    sock.connect(command[2])
            stores: list[CoreStore | None] = [None] * len(spec.names)
            if command[0] == "again":
                stores = [h.core.store for h in handshakes]
            handshakes = [Handshake(n, sockets[i % len(sockets)], salted=salted, store=stores[i])
                          for i, n in enumerate(spec.names)]  # fmt: skip
            wait_until(command[1])
            cpu0 = cpu_seconds()
            end = drive_logins(handshakes, window=spec.window)
            done = sum(h.conn is not None for h in handshakes)
            pipe.send(("done", {"end": end, "cpu_s": cpu_seconds() - cpu0, "logged_in": done,
                                "resends": sum(h.resends for h in handshakes)}))  # fmt: skip
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
    finally:
        for sock in sockets:
            sock.close()
        pipe.close()
