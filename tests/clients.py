"""Client wrappers and event helpers for tests: `RecordingClient` (a
`ChatSession` plus everything it reported, pumped from the test's thread),
helpers to drain event queues and to wait for conditions, and the one raw
client: `ScriptedLogin` (the client's own login, `client_core.ClientCore`,
one datagram at a time, for tests that hold back, replay or move those
datagrams) and `RawClient` (a plain UDP socket that sends whatever it is
given, as another program or an attacker would, and logs in with a
`ScriptedLogin`)."""

from __future__ import annotations

import functools
import queue
import select
import socket
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

from chat_client import (
    ChatSession,
    Disconnected,
    ErrorEvent,
    GroupChanged,
    LinkChanged,
    LoggedIn,
    MessageReceived,
    PresenceChanged,
    StatusChanged,
    WhoList,
)
from client_core import ClientCore, MemoryStore
from protocol import (
    HELLO_SIZE,
    MIN_PREAUTH_REQUEST,
    NO_SESSION,
    Accept,
    Accepts,
    Challenge,
    Frame,
    Hello,
    Login,
    Message,
    Packet,
    Refused,
    RemoteProtocolError,
    Welcome,
    decode_header,
    decode_message,
    decode_packet,
    encode_message,
    encode_packet,
    salted_password,
    unbatch,
)
from reliability import Connection, PayloadReceived
from tests.conftest import PASSWORD, RTO_MAX, RTO_MIN, make_session


def drain(events: queue.Queue[Any], timeout: float = 0.0) -> Iterator[Any]:
    """The events waiting on `events` (blocking up to `timeout` for the first)."""
    first = True
    while True:
        try:
            if timeout and first:
                event = events.get(timeout=timeout)
            else:
                event = events.get_nowait()
        except queue.Empty:
            return
        first = False
        yield event


def pump_until(
    pump: Callable[[float], object],
    condition: Callable[[], bool],
    timeout: float,
    poll: float,
    failure: Callable[[], str],
) -> None:
    """Call `pump(step)` (step at most `poll`) until `condition()` holds;
    after `timeout` seconds raise AssertionError(`failure()`)."""
    deadline = time.monotonic() + timeout
    while not condition():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(failure())
        pump(min(remaining, poll))


class RecordingClient:
    """A `ChatSession` plus everything it reported, sorted for the checks."""

    #: How long `close()` (and `close_all`'s logout) waits by default.
    close_timeout = 5.0
    #: The longest a `wait()` blocks on the queue before looking at its condition again.
    wait_poll = 0.1
    #: Every client alive: while a test waits on one, the others' events are
    #: taken too, as each one's own front end would (a received message is
    #: receipted only once it is taken, so a sender waiting for `delivered`
    #: needs the recipient's events read).
    live: ClassVar[weakref.WeakSet[RecordingClient]] = weakref.WeakSet()

    def __init__(self, name: str, **kwargs: Any) -> None:
        RecordingClient.live.add(self)
        self.name = name
        #: Take each received message as shown (False: a front end that dies
        #: before it shows anything).
        self.shows = True
        self.session: ChatSession = make_session(**kwargs)
        self.started = False
        self.events: list[Any] = []
        self.received: list[MessageReceived] = []
        self.states: dict[str, list[str]] = defaultdict(list)
        self.reasons: dict[str, str | None] = {}
        self.order: dict[str, list[str]] = defaultdict(list)  # state -> ids in event order
        self.errors: list[ErrorEvent] = []
        self.presence: list[PresenceChanged] = []
        self.who_lists: list[WhoList] = []
        self.links: list[tuple[float, bool]] = []
        self.logins = 0
        self.disconnected: str | None = None

    @property
    def logged_in(self) -> bool:
        return self.logins > 0

    def login(
        self,
        server: tuple[str, int] | str,
        connect_to: str | None = None,
        password: str = PASSWORD,
    ) -> bool:
        self.started = True
        return self.session.login(server, self.name, connect_to, password=password)

    def pump(self, timeout: float = 0.0) -> bool:
        """Take the events waiting (or the first one within `timeout`)."""
        got = False
        for event in drain(self.session.events, timeout):
            got = True
            self.record(event)
        return got

    def record(self, event: Any) -> None:
        """Take one event; a received message counts as shown once taken
        (the test is the front end), which lets its receipt go."""
        self.events.append(event)
        if isinstance(event, MessageReceived):
            self.received.append(event)
            if self.shows:
                self.session.shown(event.id)
        elif isinstance(event, GroupChanged):
            if self.shows:  # (as the terminal and the window do: a change is receipted too)
                self.session.shown(event.id)
        elif isinstance(event, StatusChanged):
            self.states[event.id].append(event.state)
            self.order[event.state].append(event.id)
            if event.reason is not None:
                self.reasons[event.id] = event.reason
        elif isinstance(event, ErrorEvent):
            self.errors.append(event)
        elif isinstance(event, PresenceChanged):
            self.presence.append(event)
        elif isinstance(event, WhoList):
            self.who_lists.append(event)
        elif isinstance(event, LinkChanged):
            self.links.append((time.monotonic(), event.up))
        elif isinstance(event, LoggedIn):
            self.logins += 1
        elif isinstance(event, Disconnected):
            self.disconnected = event.reason

    def pump_others(self) -> None:
        for other in list(RecordingClient.live):
            if other is not self:
                other.pump()

    def wait(self, condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        def pump(step: float) -> None:
            self.pump(step)
            self.pump_others()

        pump_until(
            pump,
            condition,
            timeout,
            self.wait_poll,
            lambda: (
                f"{self.name}: timed out after {timeout} s waiting for {what or condition}; "
                f"last events {self.events[-10:]}"
            ),
        )

    def reached(self, msg_id: str, state: str) -> bool:
        return state in self.states.get(msg_id, [])

    def delivered(self, ids: list[str]) -> int:
        return sum(1 for i in ids if self.states[i][-1:] == ["delivered"])

    def texts(self) -> list[str]:
        return [m.text for m in self.received]

    def send(self, text: str, to: str | None = None) -> str:
        msg_id = self.session.send(text, to)
        assert msg_id is not None, f"{self.name} could not send {text!r}"
        return msg_id

    def close(self, timeout: float | None = None) -> None:
        """Log out (waiting for acceptances up to `timeout`, by default
        `close_timeout`) and end the thread."""
        if self.session.running:
            self.session.close(self.close_timeout if timeout is None else timeout)
        self.dispose()

    def dispose(self) -> None:
        if self.session.running:
            self.session.abort()
        if not self.started:
            self.session.discard()  # a test that failed before its login


def pump_all(clients: Sequence[RecordingClient], idle: float = 0.02) -> None:
    """Take every client's waiting events; sleep `idle` seconds if there were none."""
    if not any([c.pump() for c in clients]):
        time.sleep(idle)


def wait_all(
    clients: Sequence[RecordingClient],
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    idle: float = 0.01,
    stay_connected: bool = False,
) -> None:
    """Pump all `clients` until `condition()` holds; with `stay_connected`,
    fail as soon as one of them is disconnected."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pump_all(clients, idle)
        if stay_connected:
            for client in clients:
                assert client.disconnected is None, (
                    client.name,
                    client.disconnected,
                    client.errors,
                )


def close_all(clients: Sequence[RecordingClient]) -> None:
    """Log everyone out at once (each may wait for its logout to be acked)."""
    for client in clients:
        if client.session.running:
            client.session.logout(client.close_timeout)
    for client in clients:
        client.close()


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Poll `condition()` every `interval` seconds for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


# --- the raw client ----------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def cached_salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """`protocol.salted_password`, once per (password, salt, iterations) per test process."""
    return salted_password(password, salt, iterations)


def preauth_frame(data: bytes) -> Frame | None:
    """The login-exchange frame of a datagram without a MAC, if it is one."""
    try:
        packet = decode_packet(data, None)
    except RemoteProtocolError:
        return None
    for frame in packet.frames:
        if isinstance(frame, (Hello, Challenge, Login, Welcome, Refused)):
            return frame
    return None


def preauth_datagram(frame: Frame, *, pad: bool = True) -> bytes:
    """A pre-login datagram built by hand, padded as a client pads it: a
    HELLO to HELLO_SIZE (its CHALLENGE carries a 256-byte DH key), the rest
    to MIN_PREAUTH_REQUEST; `pad=False` leaves it bare."""
    size = HELLO_SIZE if isinstance(frame, Hello) else MIN_PREAUTH_REQUEST
    return encode_packet(Packet(NO_SESSION, 0, (frame,)), None, pad_to=size if pad else 0)


class ScriptedLogin:
    """One login by the client's own code (`ClientCore`), a datagram at a
    time: `hello` is the HELLO it sent; after `take` has given it the
    CHALLENGE, `request` is its LOGIN (not sent: the caller sends, holds
    back or replays it); `answer` is the last reply for this login (a
    REFUSED, the CHALLENGE, then the WELCOME); after a WELCOME `conn` is
    the session (`conn.key` tags what the client sends). `take` hands the
    core only this login's replies: what the new session sends beside its
    WELCOME (its login ticket) is the caller's to give to `conn`."""

    def __init__(
        self, name: str, password: str = PASSWORD, instance_id: int | None = None,
        now: float | None = None, *, login_timeout: float = 10.0, ticket: bytes | None = None,
    ) -> None:  # fmt: skip
        store = MemoryStore(instance_id)
        if ticket is not None:  # a login ticket from an earlier session, sent with the LOGIN
            store.keep_ticket(ticket)
        self.core = ClientCore(
            name, password, store=store, rto_min=RTO_MIN, rto_max=RTO_MAX,
            login_timeout=login_timeout, salted_password=cached_salted_password,
        )  # fmt: skip
        now = time.monotonic() if now is None else now
        self.core.connect(now)
        (self.hello,) = self.core.datagrams_to_send(now)
        self.nonce = self.core.login_nonce
        self.challenge: Challenge | None = None
        self.request = b""
        self.answer: Frame | None = None

    @property
    def instance_id(self) -> int:
        return self.core.instance_id

    @property
    def conn(self) -> Connection | None:
        return self.core.conn

    def take(self, replies: Iterable[bytes], now: float | None = None) -> Frame | None:
        """Hand the server's datagrams to the core; the last reply for this
        login among them (or the one before)."""
        for data in replies:
            frame = preauth_frame(data)
            if not isinstance(frame, (Challenge, Welcome, Refused)) or frame.nonce != self.nonce:
                continue
            now = time.monotonic() if now is None else now
            self.core.receive_datagram(data, now)
            self.answer = frame
            if isinstance(frame, Challenge) and self.challenge is None:
                self.challenge = frame
                out = self.core.datagrams_to_send(now)
                self.request = out[0] if out else b""
        return self.answer


class RawClient:
    """A plain UDP socket that sends whatever it is given (`send`,
    `send_frame`), as another program (or an attacker) would; everything it
    receives is kept. Its logins are the client's own (`ScriptedLogin`);
    after one, `conn` carries messages built by hand (`send_message`,
    `run_until`)."""

    def __init__(self, server: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(5.0)  # a test reading the socket itself never hangs
        self.address: tuple[str, int] = self.sock.getsockname()
        self.received: list[bytes] = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self.exchanges: list[tuple[int, int]] = []  # (request, reply) sizes of the logins
        self.conn: Connection | None = None  # the session of the last login
        self.messages: list[Message] = []  # what arrived on it

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)
        self.bytes_sent += len(data)

    def send_frame(self, frame: Frame, *, pad: bool = True) -> bytes:
        """A pre-login frame built by hand (`preauth_datagram`), sent."""
        data = preauth_datagram(frame, pad=pad)
        self.send(data)
        return data

    def recv_one(self, timeout: float) -> bytes | None:
        if not select.select([self.sock], [], [], max(0.0, timeout))[0]:
            return None
        data, _ = self.sock.recvfrom(65535)
        self.bytes_received += len(data)
        self.received.append(data)
        return data

    def drain(self, timeout: float = 0.0) -> list[bytes]:
        """What arrives until nothing has come for `timeout` seconds."""
        got: list[bytes] = []
        while (data := self.recv_one(timeout)) is not None:
            got.append(data)
        return got

    def silence(self, wait: float = 1.0) -> bool:
        """True if nothing arrives within `wait` seconds."""
        return self.recv_one(wait) is None

    def wait_frame(self, nonce: bytes, timeout: float = 3.0) -> Frame | None:
        """The first CHALLENGE/WELCOME/REFUSED for `nonce` within `timeout`."""
        deadline = time.monotonic() + timeout
        while (data := self.recv_one(deadline - time.monotonic())) is not None:
            frame = preauth_frame(data)
            if frame is not None and getattr(frame, "nonce", None) == nonce:
                return frame
        return None

    def hello(self, name: str, instance_id: int, nonce: bytes, timeout: float = 5.0) -> Frame:
        """A HELLO built by hand (any name, even one the client refuses); the answer."""
        request = self.send_frame(Hello(name, instance_id, nonce))
        frame = preauth_frame(self._answer(request, nonce, timeout))
        assert frame is not None
        return frame

    def _answer(self, request: bytes, nonce: bytes, timeout: float) -> bytes:
        """The first reply for `nonce` (its size is recorded with the request's)."""
        deadline = time.monotonic() + timeout
        while (data := self.recv_one(deadline - time.monotonic())) is not None:
            frame = preauth_frame(data)
            if frame is not None and getattr(frame, "nonce", None) == nonce:
                self.exchanges.append((len(request), len(data)))
                return data
        raise AssertionError(f"no answer in {timeout} s")

    def prepare(
        self, name: str, password: str = PASSWORD, instance_id: int | None = None,
        timeout: float = 5.0,
    ) -> ScriptedLogin:  # fmt: skip
        """HELLO -> CHALLENGE; the login's LOGIN (`request`) is not sent."""
        login = ScriptedLogin(name, password, instance_id)
        self.send(login.hello)
        login.take([self._answer(login.hello, login.nonce, timeout)])
        return login

    def login(
        self, name: str, password: str = PASSWORD, instance_id: int | None = None,
        timeout: float = 5.0,
    ) -> ScriptedLogin:  # fmt: skip
        """HELLO -> CHALLENGE -> LOGIN -> WELCOME (or REFUSED), each sent
        once (on loopback nothing is lost; a retransmission would be one
        more try for the server's counters); `answer` is the last reply."""
        login = self.prepare(name, password, instance_id, timeout)
        if login.request:
            self.send(login.request)
            login.take([self._answer(login.request, login.nonce, timeout)])
        self.conn = login.conn
        return login

    def login_retrying(
        self, name: str, password: str = PASSWORD, instance_id: int | None = None,
        timeout: float = 10.0,
    ) -> ScriptedLogin:  # fmt: skip
        """A login the way the client runs it, with its retransmissions and
        restarts (a server that is starting up answers late); must succeed."""
        login = ScriptedLogin(name, password, instance_id, login_timeout=timeout)
        core = login.core
        self.send(login.hello)
        while core.conn is None and not core.ended:
            timer = core.get_timer()
            data = self.recv_one(0.05 if timer is None else min(0.05, timer - time.monotonic()))
            now = time.monotonic()
            if data is not None:
                core.receive_datagram(data, now)
            core.handle_timer(now)
            for datagram in core.datagrams_to_send(now):
                self.send(datagram)
        assert core.conn is not None, f"{name}: {list(iter(core.next_event, None))}"
        self.conn = core.conn
        return login

    def send_message(self, message: Message, stream: int) -> None:
        assert self.conn is not None
        self.conn.send(encode_message(message), stream)

    def run_until(self, condition: Callable[[], bool], timeout: float) -> None:
        """Move the session's datagrams (keeping what arrives in `messages`)
        until `condition()`; then send the last acks."""
        conn = self.conn
        assert conn is not None
        deadline = time.monotonic() + timeout
        while not condition():
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(f"timed out; last messages {self.messages[-5:]}")
            timer = conn.get_timer()
            if timer is not None and timer <= now:
                conn.handle_timer(now)
            for datagram in conn.datagrams_to_send(now):
                self.send(datagram)
            data = self.recv_one(0.05)
            if data is None:
                continue
            header = decode_header(data)
            if header.session_id == conn.session_id and conn.receive_datagram(data, now):
                while (event := conn.next_event()) is not None:
                    if isinstance(event, PayloadReceived):
                        self.messages.extend(unbatch(decode_message(event.payload)))
        now = time.monotonic()
        for datagram in conn.datagrams_to_send(now):  # the last acks
            self.send(datagram)

    def accepts(self) -> list[Accept]:
        """Every ACCEPT, those batched in an ACCEPTS too."""
        out: list[Accept] = []
        for m in self.messages:
            if isinstance(m, Accept):
                out.append(m)
            elif isinstance(m, Accepts):
                out.extend(Accept(msg_id, server_msg_id) for msg_id, server_msg_id in m.items)
        return out
