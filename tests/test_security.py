"""Accounts and security: passwords, stored keys, replays, spoofing, floods,
amplification, login throttling, NAT rebinding, take-over and fake servers.

Everything goes over real UDP sockets on 127.0.0.1 to a real server (a
thread of this process, so the tests can look into `server.relay`), except
where a check needs a reply tied to each request or thousands of fuzzed
inputs: those call `Relay.handle_datagram` directly, as the socket loop does.

Attackers are played by plain sockets and by `Recorder`, an in-file UDP relay
between one client and the server that records what passes both ways, can
hold the client's datagrams back (an on-path attacker who sees them first)
and can move to a new upstream port (a NAT rebinding).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import hmac
import math
import os
import queue
import random
import secrets
import select
import selectors
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chat_server
from chat_client import (
    ChatSession,
    Disconnected,
    ErrorEvent,
    LoggedIn,
    MessageReceived,
    StatusChanged,
)
from chat_server import Relay
from protocol import (
    CRC,
    DH_PRIVATE_BITS,
    FLAG_MAC,
    HEADER,
    HELLO_SIZE,
    MAGIC,
    MIN_PREAUTH_REQUEST,
    NO_SESSION,
    TAG_SIZE,
    VERSION,
    Challenge,
    ErrorCode,
    Frame,
    Hello,
    Login,
    MsgId,
    Packet,
    PathChallenge,
    Refused,
    RemoteProtocolError,
    Send,
    Welcome,
    auth_message,
    conversation_stream,
    decode_packet,
    dh_public,
    dh_secret,
    encode_message,
    encode_packet,
    mac_tag,
    scram_keys,
    server_signature,
    wrap_keys,
)
from reliability import Connection, PayloadReceived
from server_keyx import Busy as KeyExchangeBusy
from server_login import ADDRESS_NAMES
from server_store import Loaded, Op, Write
from tests.clients import RawClient, ScriptedLogin, drain, preauth_frame, pump_until
from tests.clients import cached_salted_password as salted
from tests.clients import wait_until as wait_until_every
from tests.conftest import (
    PASSWORD,
    ROOT,
    TEST_ITERATIONS,
    RunningServer,
    make_session,
    start_server,
    stop_server,
)
from tests.conftest import test_config as server_config

Address = tuple[str, int]
WRONG = "not the password"

# --- helpers: datagrams ------------------------------------------------------------------


def has_mac(data: bytes) -> bool:
    return len(data) >= HEADER.size and data[:4] == MAGIC and bool(data[5] & FLAG_MAC)


def session_id_of(data: bytes) -> bytes:
    return data[6:22]


def udp_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


class Recorder:
    """A UDP relay between one client and the server that records every
    datagram both ways (`c2s`, `s2c`). With `hold` set, the client's
    datagrams are recorded in `held` and not forwarded: an on-path attacker
    who captures them before the server sees them. `rebind()` moves the
    upstream side to a new port, as a NAT that forgot its mapping does.
    With `tamper` set, each datagram is recorded as it arrived and forwarded
    as `tamper(direction, data)` returns it: an active on-path attacker."""

    def __init__(self, server: Address) -> None:
        self.server = server
        self.front = udp_socket()
        self.address: Address = self.front.getsockname()
        self._upstream = udp_socket()
        self.client: Address | None = None
        self.c2s: list[bytes] = []
        self.s2c: list[bytes] = []
        self.held: list[bytes] = []
        self.hold = False
        self.tamper: Callable[[str, bytes], bytes] | None = None
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._rebind: threading.Event | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    @property
    def upstream(self) -> Address:
        """The address the server sees for this client."""
        return self._upstream.getsockname()  # type: ignore[no-any-return]

    def recorded(self, direction: str) -> list[bytes]:
        with self._lock:
            return list(self.c2s if direction == "c2s" else self.s2c)

    def take_held(self) -> list[bytes]:
        with self._lock:
            held, self.held = self.held, []
            return held

    def send_upstream(self, data: bytes) -> None:
        """Send from the client's upstream port (the server sees the client's address)."""
        self._upstream.sendto(data, self.server)

    def rebind(self) -> Address:
        done = threading.Event()
        self._rebind = done
        self._wake_w.send(b"x")
        assert done.wait(5.0), "the recorder did not rebind"
        return self.upstream

    def close(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(5.0)
        for sock in (self.front, self._upstream, self._wake_r, self._wake_w):
            sock.close()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.front, selectors.EVENT_READ)
        selector.register(self._upstream, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop:
                for key, _ in selector.select(0.5):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._wake_r:
                        sock.recv(4096)
                        if self._rebind is not None:
                            new = udp_socket()
                            selector.unregister(self._upstream)
                            self._upstream.close()
                            self._upstream = new
                            selector.register(new, selectors.EVENT_READ)
                            self._rebind.set()
                            self._rebind = None
                        continue
                    try:
                        data, addr = sock.recvfrom(65535)
                    except OSError:
                        continue
                    if sock is self.front:
                        self.client = addr
                        with self._lock:
                            self.c2s.append(data)
                            if self.hold:
                                self.held.append(data)
                                continue
                        if self.tamper is not None:
                            data = self.tamper("c2s", data)
                        self._upstream.sendto(data, self.server)
                    elif sock is self._upstream and self.client is not None:
                        with self._lock:
                            self.s2c.append(data)
                        if self.tamper is not None:
                            data = self.tamper("s2c", data)
                        self.front.sendto(data, self.client)
        finally:
            selector.close()


# --- helpers: chat sessions ---------------------------------------------------------------


class Peer:
    """A `ChatSession` (no local store) plus everything it reported, with
    the time (monotonic) each event was taken off its queue."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        kwargs.setdefault("persist", False)
        self.name = name
        self.session: ChatSession = make_session(**kwargs)
        self.events: list[tuple[float, Any]] = []
        #: If set, read as each message is taken: `meter_at[text]`.
        self.meter: Callable[[], int] | None = None
        self.meter_at: dict[str, int] = {}

    def login(
        self, server: Address, connect_to: str | None = None, password: str = PASSWORD
    ) -> bool:
        return self.session.login(server, self.name, connect_to, password=password)

    def pump(self, timeout: float = 0.0) -> None:
        for event in drain(self.session.events, timeout):
            self.events.append((time.monotonic(), event))
            if isinstance(event, MessageReceived):
                if self.meter is not None:
                    self.meter_at.setdefault(event.text, self.meter())
                self.session.shown(event.id)  # taken: shown, so receipted

    def of(self, kind: type) -> list[Any]:
        return [e for _, e in self.events if isinstance(e, kind)]

    @property
    def logged_in(self) -> bool:
        return bool(self.of(LoggedIn))

    @property
    def texts(self) -> list[str]:
        return [m.text for m in self.of(MessageReceived)]

    @property
    def disconnected(self) -> str | None:
        ends = self.of(Disconnected)
        return ends[-1].reason if ends else None

    def states(self, msg: str) -> list[str]:
        return [s.state for s in self.of(StatusChanged) if s.id == msg]

    def wait(self, condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        pump_until(
            self.pump,
            condition,
            timeout,
            0.1,
            lambda: (
                f"{self.name}: timed out waiting for {what}; last events "
                f"{[e for _, e in self.events[-8:]]}"
            ),
        )

    def send(self, text: str, to: str) -> str:
        msg = self.session.send(text, to=to)
        assert msg is not None
        return msg

    def close(self) -> None:
        if self.session.running:
            self.session.close(3.0)
        if self.session.running:
            self.session.abort()
        self.session.discard()


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(name: str, **kwargs: Any) -> Peer:
        peer = Peer(name, **kwargs)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


@pytest.fixture
def recorders() -> Iterator[Callable[[Address], Recorder]]:
    made: list[Recorder] = []

    def make(server: Address) -> Recorder:
        recorder = Recorder(server)
        made.append(recorder)
        return recorder

    yield make
    for recorder in made:
        recorder.close()


def login_ok(peer: Peer, server: Address, connect_to: str | None = None) -> None:
    assert peer.login(server, connect_to)
    peer.wait(lambda: peer.logged_in, 10.0, "login")


def live_session(server: RunningServer, name: str) -> Any:
    """The server's session object of `name` (None if offline). The relay
    belongs to the server thread; copying the dict is one step under the GIL."""
    for session in list(server.relay.sessions.values()):
        if session.user.name == name:
            return session
    return None


def exchange(sender: Peer, receiver: Peer, text: str, timeout: float = 10.0) -> None:
    sender.send(text, to=receiver.name)
    receiver.wait(lambda: text in receiver.texts, timeout, f"{text!r}")


#: Conditions here are polled every 10 ms.
wait_until = functools.partial(wait_until_every, interval=0.01)


def vm_rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def path_challenges(data: bytes, session: Any) -> list[PathChallenge]:
    """The PATH_CHALLENGE frames of a server datagram of `session`, read
    with the session's key (the test may look; an attacker cannot), or []
    when the key does not open it."""
    key = getattr(session.conn, "key", None)
    if not has_mac(data) or not isinstance(key, bytes):
        return []
    try:
        packet = decode_packet(data, key)
    except RemoteProtocolError:
        return []
    return [f for f in packet.frames if isinstance(f, PathChallenge)]


def drops(server: RunningServer) -> dict[str, int]:
    return dict(server.relay.drops.counts)


# --- passwords ------------------------------------------------------------------------------


def test_wrong_password_refused_right_one_accepted(
    server: RunningServer, peers: Callable[..., Peer]
) -> None:
    """The first login registers alice; a wrong password then gets the fatal
    `bad_password` (and `Disconnected`); the right one logs in."""
    first = peers("alice")
    login_ok(first, server.address)
    first.close()

    wrong = peers("alice")
    assert wrong.login(server.address, password=WRONG)
    wrong.wait(lambda: wrong.disconnected is not None, 10.0, "refusal")
    errors = wrong.of(ErrorEvent)
    assert [(e.code, e.fatal) for e in errors] == [("bad_password", True)]
    assert wrong.disconnected == "bad_password"
    assert not wrong.logged_in
    assert live_session(server, "alice") is None

    right = peers("alice")
    login_ok(right, server.address)
    assert live_session(server, "alice") is not None
    assert server.relay.stats["login_failures"] == 1


def test_accounts_table_holds_no_password_nor_a_plain_hash(
    server: RunningServer, peers: Callable[..., Peer], tmp_path: Path
) -> None:
    """chat.db's accounts table holds only the salt, the iteration count,
    StoredKey and ServerKey: not the password, not a hash of it, not the
    salted password (which would log in as the user); the database files
    hold none of these anywhere."""
    alice = peers("alice")
    login_ok(alice, server.address)
    db_path = tmp_path / "server-data" / "chat.db"
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(accounts)")]
        rows = db.execute("SELECT * FROM accounts").fetchall()
    db.close()
    assert columns == [
        "name_key", "name", "salt", "iterations", "stored_key", "server_key", "created_ms",
    ]  # fmt: skip
    assert len(rows) == 1
    name_key_, name, salt, iterations, stored_key, server_key, _created = rows[0]
    assert (name_key_, name) == ("alice", "alice")
    assert iterations == TEST_ITERATIONS and len(salt) == 16
    keys = scram_keys(salted(PASSWORD, salt, iterations))
    assert stored_key == keys.stored_key and server_key == keys.server_key
    secret = PASSWORD.encode()
    forbidden = {
        "password": secret,
        "sha256(password)": hashlib.sha256(secret).digest(),
        "sha256(password) hex": hashlib.sha256(secret).hexdigest().encode(),
        "sha1(password)": hashlib.sha1(secret).digest(),
        "md5(password)": hashlib.md5(secret).digest(),
        "sha256(salt+password)": hashlib.sha256(salt + secret).digest(),
        "salted password": salted(PASSWORD, salt, iterations),
        "client key": keys.client_key,
    }
    values = [v for v in rows[0] if isinstance(v, (bytes, str))]
    for label, value in forbidden.items():
        for stored in values:
            blob = stored.encode() if isinstance(stored, str) else stored
            assert value not in blob, f"the accounts row holds the {label}"
    for path in db_path.parent.iterdir():
        if path.is_file():
            content = path.read_bytes()
            for label, value in forbidden.items():
                assert value not in content, f"{path.name} holds the {label}"


def test_name_stays_bound_to_its_password_across_a_restart(
    tmp_path: Path, peers: Callable[..., Peer]
) -> None:
    """Register alice, stop the server, start a new ChatServer on the same
    data directory: a wrong password is refused, the right one accepted."""
    config = server_config(tmp_path / "data")
    running = start_server(config)
    try:
        alice = peers("alice")
        login_ok(alice, running.address)
        alice.close()
    finally:
        stop_server(running)
    running = start_server(server_config(tmp_path / "data"))
    try:
        assert "alice" in running.relay.users
        wrong = peers("alice")
        assert wrong.login(running.address, password=WRONG)
        wrong.wait(lambda: wrong.disconnected is not None, 10.0, "refusal")
        assert wrong.disconnected == "bad_password" and not wrong.logged_in
        right = peers("alice")
        login_ok(right, running.address)
        assert running.relay.stats["logins"] == 1
        right.close()
    finally:
        stop_server(running)


# --- captured logins ------------------------------------------------------------------------


def test_captured_login_exchange_replayed_does_not_log_in(
    server: RunningServer, recorders: Callable[[Address], Recorder], peers: Callable[..., Peer]
) -> None:
    """An on-path observer records alice's HELLO and LOGIN and sends them
    again, from alice's own port and from another one, while she is logged
    in and after she logged out: no WELCOME with a new session, no new
    session on the server."""
    bob = peers("bob")
    login_ok(bob, server.address)
    recorder = recorders(server.address)
    alice = peers("alice")
    login_ok(alice, recorder.address)
    captured = [d for d in recorder.recorded("c2s") if not has_mac(d)]
    kinds = [type(preauth_frame(d)).__name__ for d in captured]
    assert "Hello" in kinds and "Login" in kinds, kinds
    welcomes = [f for d in recorder.recorded("s2c") if isinstance(f := preauth_frame(d), Welcome)]
    original = welcomes[0].session_id
    assert live_session(server, "alice").session_id == original

    def replay_all(phase: str) -> None:
        before = set(server.relay.sessions)
        logins = server.relay.stats["logins"]
        s2c_before = len(recorder.recorded("s2c"))
        with RawClient(server.address) as other:
            for data in captured:
                recorder.send_upstream(data)  # from alice's own address
                other.send(data)  # from another port
            time.sleep(0.5)
            replies = other.drain(0.2) + recorder.recorded("s2c")[s2c_before:]
        sessions = {f.session_id for d in replies if isinstance(f := preauth_frame(d), Welcome)}
        assert sessions <= {original}, f"{phase}: a replay got a WELCOME for a new session"
        assert set(server.relay.sessions) == before, f"{phase}: a replay changed the sessions"
        assert server.relay.stats["logins"] == logins, f"{phase}: a replay logged in"

    replay_all("while alice is logged in")
    assert live_session(server, "alice").session_id == original
    exchange(alice, bob, "still me")  # the real session is untouched

    alice.close()
    wait_until(lambda: live_session(server, "alice") is None, 5.0, "logout")
    replay_all("after alice logged out")
    assert live_session(server, "alice") is None


def test_replayed_login_after_the_cookie_expired_is_dropped(tmp_path: Path) -> None:
    """Relay level, with the clocks in hand: once the login reply cache and
    the cookie have both expired (cookies rotate every 120 s), a replayed
    LOGIN is dropped unanswered, from the same address or any other."""
    clock = [10_000.0]
    relay = Relay(server_config(tmp_path / "unused"), wall_clock=lambda: clock[0])
    addr = ("192.0.2.10", 40_000)
    login = ScriptedLogin("alice", PASSWORD, 5, clock[0])
    out = relay.handle_datagram(login.hello, addr, clock[0])
    assert isinstance(login.take([d for d, _ in out], clock[0]), Challenge)
    out = relay.handle_datagram(login.request, addr, clock[0])
    assert isinstance(login.take([d for d, _ in out], clock[0]), Welcome)
    assert len(relay.sessions) == 1
    (session_id,) = relay.sessions

    clock[0] += 300.0  # past the reply cache (240 s) and both cookie periods
    for source in (addr, ("192.0.2.66", 40_000), ("192.0.2.10", 40_001)):
        assert relay.handle_datagram(login.request, source, clock[0]) == []
    assert list(relay.sessions) == [session_id]
    assert relay.stats["logins"] == 1
    assert relay.drops.counts["login with a stale or forged cookie"] == 3


def client_key_from(login: Login, message: bytes, stored_key: bytes) -> bytes | None:
    """The ClientKey behind `login`'s proof if `stored_key` is its StoredKey,
    else None: checkable offline, since sha256(ClientKey) == StoredKey."""
    signature = hmac.new(stored_key, message, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(login.proof, signature, strict=True))
    return client_key if hashlib.sha256(client_key).digest() == stored_key else None


def forge_login(
    server: Address, host: str, name: str, client_key: bytes, stored_key: bytes
) -> Frame | None:
    """Log in as `name` from `host` without the password, with a ClientKey
    and StoredKey (SCRAM's proof is ClientKey XOR HMAC(StoredKey, auth
    message)): what anyone who learned the two can do. The answer."""
    with RawClient(server, host=host) as attacker:
        nonce = secrets.token_bytes(16)
        instance_id = secrets.randbits(64)
        attacker.send_frame(Hello(name, instance_id, nonce))
        ch = attacker.wait_frame(nonce)
        assert isinstance(ch, Challenge), ch
        ephemeral = dh_public(secrets.randbits(DH_PRIVATE_BITS))
        message = auth_message(name, instance_id, nonce, ch.cookie, ch.salt, ch.iterations,
                               ephemeral, ch.dh_public)  # fmt: skip
        signature = hmac.new(stored_key, message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        login = Login(name, instance_id, nonce, ch.cookie, proof, ephemeral,
                      secrets.token_bytes(64))  # fmt: skip
        attacker.send(
            encode_packet(Packet(NO_SESSION, 0, (login,)), None, pad_to=MIN_PREAUTH_REQUEST)
        )
        return attacker.wait_frame(nonce)


def observed_logins(c2s: list[bytes], s2c: list[bytes]) -> list[tuple[Login, Challenge, bytes]]:
    """Each distinct LOGIN seen, with the CHALLENGE it answers and its auth message."""
    challenges = {f.nonce: f for d in s2c if isinstance(f := preauth_frame(d), Challenge)}
    logins = {f.nonce: f for d in c2s if isinstance(f := preauth_frame(d), Login)}
    out = []
    for nonce, login in logins.items():
        ch = challenges[nonce]
        message = auth_message(login.username, login.instance_id, login.nonce, login.cookie,
                               ch.salt, ch.iterations, login.dh_public, ch.dh_public)  # fmt: skip
        out.append((login, ch, message))
    return out


def test_sniffed_logins_do_not_let_an_eavesdropper_log_in(
    server: RunningServer, recorders: Callable[[Address], Recorder], peers: Callable[..., Peer]
) -> None:
    """SCRAM's promise: a passive observer of logins learns nothing that logs
    in. The observer records both ways of alice's registration and of a
    later ordinary login. StoredKey (which with a sniffed proof gives
    ClientKey, and so every later proof) must travel nowhere: no 32 bytes
    of any datagram pass the offline check sha256(proof XOR HMAC(S, auth
    message)) == S, and the observer's best guess (the wrapped bytes where
    StoredKey travels) is refused. The control: the same forgery with the
    real StoredKey (the test knows the password) logs in, so the attack is
    real and only the key's secrecy stops it."""
    recorder = recorders(server.address)
    first = peers("alice")
    login_ok(first, recorder.address)  # the registration, observed
    first.close()
    alice = peers("alice")
    login_ok(alice, recorder.address)  # an ordinary login, observed
    c2s, s2c = recorder.recorded("c2s"), recorder.recorded("s2c")
    seen = observed_logins(c2s, s2c)
    assert len(seen) == 2, seen
    salt, iterations = seen[0][1].salt, seen[0][1].iterations
    keys = scram_keys(salted(PASSWORD, salt, iterations))
    secrets_ = {
        "StoredKey": keys.stored_key, "ServerKey": keys.server_key,
        "ClientKey": keys.client_key, "salted password": salted(PASSWORD, salt, iterations),
    }  # fmt: skip
    for data in c2s + s2c:
        for label, value in secrets_.items():
            assert value not in data, f"a datagram carries alice's {label} in the clear"
    windows = 0
    for login, _, message in seen:
        assert client_key_from(login, message, keys.stored_key) == keys.client_key
        for data in c2s + s2c:
            for i in range(len(data) - 31):
                windows += 1
                assert client_key_from(login, message, data[i : i + 32]) is None, (
                    f"32 bytes at {i} of a recorded datagram are alice's StoredKey"
                )
    client_keys = {login.dh_public for login, _, _ in seen}
    server_keys = {ch.dh_public for _, ch, _ in seen}
    assert len(client_keys) == 2, "the client reused its ephemeral DH key"
    assert len(server_keys) == 1  # the server's static key

    login, _, message = seen[-1]
    guess = login.wrapped_keys[:32]
    signature = hmac.new(guess, message, hashlib.sha256).digest()
    guessed_client_key = bytes(a ^ b for a, b in zip(login.proof, signature, strict=True))
    answer = forge_login(server.address, "127.0.0.9", "alice", guessed_client_key, guess)
    assert isinstance(answer, Refused) and answer.code.label == "bad_password", answer
    control = forge_login(server.address, "127.0.0.10", "alice", keys.client_key,
                          keys.stored_key)  # fmt: skip
    print(f"\nsniffed: {len(c2s) + len(s2c)} datagrams, {windows} 32-byte windows tried as "
          f"StoredKey, none fits; the wrapped bytes as StoredKey: {answer.code.label}; "
          f"the real StoredKey: {type(control).__name__}")  # fmt: skip
    assert isinstance(control, Welcome), control


def test_an_active_attacker_at_a_later_login_cannot_log_in_as_alice(
    server: RunningServer, recorders: Callable[[Address], Recorder], peers: Callable[..., Peer]
) -> None:
    """Registration is trust on first use (README), so alice registers over
    an honest path. At a later login from the same client to the same server
    address, the box on the path turns active: it puts a DH key of its own
    in the server's CHALLENGE and passes everything else on. It must not
    come away able to log in as alice: her client may notice the server's
    key changed, or send nothing the box can use. Then the box unwraps what
    it can of her LOGIN and logs in as alice from its own address."""
    recorder = recorders(server.address)
    first = peers("alice", persist=True)
    login_ok(first, recorder.address)  # the registration: nobody interferes
    first.close()
    private = secrets.randbits(DH_PRIVATE_BITS)
    swapped = dh_public(private)

    def swap_server_key(direction: str, data: bytes) -> bytes:
        frame = preauth_frame(data)
        if direction == "s2c" and isinstance(frame, Challenge):
            forged = dataclasses.replace(frame, dh_public=swapped)
            return encode_packet(Packet(NO_SESSION, 0, (forged,)), None)
        return data

    c2s_mark, s2c_mark = len(recorder.recorded("c2s")), len(recorder.recorded("s2c"))
    recorder.tamper = swap_server_key
    alice = peers("alice", persist=True)
    assert alice.login(recorder.address)
    alice.wait(lambda: alice.logged_in or alice.disconnected is not None, 10.0, "an end")
    seen = observed_logins(recorder.recorded("c2s")[c2s_mark:],
                           recorder.recorded("s2c")[s2c_mark:])  # fmt: skip
    learned: tuple[bytes, bytes] | None = None
    for login, _, message in seen:
        secret = dh_secret(private, login.dh_public)
        if secret is not None:
            stored_key = wrap_keys(secret, message, login.wrapped_keys)[:32]
            client_key = client_key_from(login, message, stored_key)
            if client_key is not None:
                learned = client_key, stored_key
    answer = forge_login(server.address, "127.0.0.11", "alice", *learned) if learned else None
    print(f"\nactive attacker: alice's client {'logged in' if alice.logged_in else 'refused'} "
          f"with the swapped server key; {len(seen)} LOGIN(s) seen; StoredKey "
          f"{'learned' if learned else 'not learned'}; the attacker's own login: "
          f"{type(answer).__name__}")  # fmt: skip
    assert not isinstance(answer, Welcome), (
        "an active attacker at one login of alice's logged in as alice: her client wraps "
        "StoredKey for whatever DH key a CHALLENGE names, and the server's signature does not "
        "cover that key, so StoredKey + her proof gave ClientKey"
    )


# --- spoofed datagrams for a live session ---------------------------------------------------


def test_ten_thousand_spoofed_datagrams_for_alices_session(
    server: RunningServer, recorders: Callable[[Address], Recorder], peers: Callable[..., Peer]
) -> None:
    """10,000 datagrams from other addresses claim alice's session: random
    tags, her session id without a valid tag, and replays of her real
    datagrams (captured by the recorder). None is accepted or forwarded to
    bob, and alice's route does not move."""
    recorder = recorders(server.address)
    alice = peers("alice", keepalive=600.0)
    bob = peers("bob", keepalive=600.0)
    login_ok(alice, recorder.address)
    login_ok(bob, server.address)
    # Eight rounds: alice's receipts leave when her front end (this test)
    # has taken the message, so they often share a datagram with an ack or
    # her next message; five rounds gave 8 to 12 datagrams to replay.
    for i in range(8):
        exchange(alice, bob, f"real {i}")
        exchange(bob, alice, f"reply {i}")
    session = live_session(server, "alice")
    sid, route = session.session_id, session.addr
    assert route == recorder.upstream
    time.sleep(0.3)  # let the last acks reach the server before capturing them
    captured = [d for d in recorder.recorded("c2s") if has_mac(d) and session_id_of(d) == sid]
    assert len(captured) >= 10
    messages = server.relay.stats["messages"]
    bob_texts = list(bob.texts)
    drops_before = drops(server)
    in_before = server.relay.stats["datagrams_in"]
    to_alice_before = len(recorder.recorded("s2c"))
    rnd = random.Random(1)

    def forged_tag() -> bytes:
        header = HEADER.pack(MAGIC, VERSION, FLAG_MAC, sid, rnd.randrange(1, 1 << 40))
        return header + rnd.randbytes(rnd.randrange(0, 300)) + rnd.randbytes(TAG_SIZE)

    def no_valid_tag() -> bytes:
        choice = rnd.randrange(4)
        real = rnd.choice(captured)
        if choice == 0:  # our session id, no MAC flag, a CRC like a pre-login datagram
            body = HEADER.pack(MAGIC, VERSION, 0, sid, rnd.randrange(1 << 32)) + bytes(10)
            return body + CRC.pack(zlib.crc32(body))
        if choice == 1:  # a real datagram with its tag cut short
            return real[: rnd.randrange(HEADER.size, len(real))]
        if choice == 2:  # a real datagram with a later packet number, old tag
            return real[:22] + struct.pack("!Q", rnd.randrange(1 << 20, 1 << 40)) + real[30:]
        flipped = bytearray(real)  # a real datagram with one bit flipped after the session id
        flipped[rnd.randrange(22, len(flipped))] ^= 1 << rnd.randrange(8)
        return bytes(flipped)

    def replay() -> bytes:
        return rnd.choice(captured)

    kinds: list[Callable[[], bytes]] = [forged_tag, no_valid_tag, replay]
    sent = bytes_sent = 0
    with (
        RawClient(server.address) as other_port,
        RawClient(server.address, host="127.0.0.7") as other_ip,
    ):
        for batch in range(50):
            for i in range(200):
                data = kinds[(batch * 200 + i) % 3]()
                (other_port if i % 2 else other_ip).send(data)
                sent += 1
                bytes_sent += len(data)
            target = in_before + sent
            wait_until(lambda: server.relay.stats["datagrams_in"] >= target, 10.0,  # noqa: B023
                       "the server to read the batch")  # fmt: skip
        time.sleep(0.2)
        back = other_port.drain(0.1) + other_ip.drain(0.0)
    assert sent == 10_000
    after = drops(server)
    dropped = {k: after.get(k, 0) - drops_before.get(k, 0) for k in after}
    dropped = {k: v for k, v in dropped.items() if v}
    print(f"\nspoofed: {sent} datagrams, {bytes_sent} bytes; dropped {dropped}; "
          f"{len(back)} replies to the spoofers")  # fmt: skip
    assert sum(dropped.values()) == sent, dropped
    assert set(dropped) <= {"bad tag or frame", "replayed or refused"}, dropped
    assert back == [], "the server answered a spoofer"
    assert server.relay.stats["messages"] == messages
    alice_now = live_session(server, "alice")
    assert alice_now is session and alice_now.addr == route
    assert alice_now.probe is None, "a spoofed datagram started a path validation"
    bob.pump(0.3)
    assert bob.texts == bob_texts, "something was forwarded to bob"
    # the re-acks of replays go to alice's real address only
    to_alice = recorder.recorded("s2c")[to_alice_before:]
    print(f"re-acks to alice's real address during the spoofing: {len(to_alice)} datagrams, "
          f"{sum(map(len, to_alice))} bytes")  # fmt: skip
    exchange(alice, bob, "after the spoofing")
    exchange(bob, alice, "still here")
    assert live_session(server, "alice").addr == route


def test_reflected_server_datagrams_do_not_move_the_route(
    server: RunningServer, recorders: Callable[[Address], Recorder], peers: Callable[..., Peer]
) -> None:
    """An on-path attacker who cannot forge sends the server its own
    datagrams to alice (captured by the recorder) from a new address, then
    whatever the server sends back. A datagram the server wrote must never
    verify as one from alice, so no path validation starts and the route
    stays with alice."""
    recorder = recorders(server.address)
    alice = peers("alice", keepalive=600.0)
    bob = peers("bob", keepalive=600.0)
    login_ok(alice, recorder.address)
    login_ok(bob, server.address)
    for i in range(3):
        exchange(bob, alice, f"to alice {i}")
        exchange(alice, bob, f"to bob {i}")
    session = live_session(server, "alice")
    route = session.addr
    sid = session.session_id
    bad_tags = drops(server).get("bad tag or frame", 0)
    with RawClient(server.address, host="127.0.0.8") as attacker:
        seen: set[bytes] = set()
        for _ in range(6):
            # everything the server sent alice, and everything it sent the attacker
            fresh = [
                d for d in recorder.recorded("s2c") + attacker.received
                if has_mac(d) and session_id_of(d) == sid and d not in seen
            ]  # fmt: skip
            for data in fresh:
                seen.add(data)
                attacker.send(data)
            attacker.drain(0.3)
        moved_to = live_session(server, "alice").addr
        probe = live_session(server, "alice").probe
    deadline = time.monotonic() + 5.0  # let the server read them all (no failure here)
    while drops(server).get("bad tag or frame", 0) - bad_tags < len(seen):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    rejected = drops(server).get("bad tag or frame", 0) - bad_tags
    print(f"\nreflected: {len(seen)} server datagrams sent back from another address; "
          f"{rejected} dropped for their tag; {len(attacker.received)} replies")  # fmt: skip
    assert moved_to == route, (
        f"alice's route moved to the attacker {moved_to} (was {route}): a server datagram "
        "verifies as one from the client (one MAC key for both directions), so the server's "
        "own PATH_RESPONSE to alice, reflected, answered its PATH_CHALLENGE to the attacker"
    )
    assert probe is None, (
        f"a reflected server datagram was taken as alice's: path validation to {probe.addr}"
    )
    # each direction has its own key: not one of them verified as alice's
    assert seen and rejected == len(seen), (rejected, len(seen))


# --- amplification --------------------------------------------------------------------------


def hostile_datagram(rnd: random.Random) -> bytes:
    """One unauthenticated datagram of 0..1,500 bytes from a mix of kinds."""
    kind = rnd.randrange(8)
    if kind == 0:  # random bytes
        return rnd.randbytes(rnd.randrange(0, 1501))
    if kind == 1:  # our magic, then random
        return MAGIC + rnd.randbytes(rnd.randrange(0, 1497))
    if kind == 2:  # a valid header (no session), then garbage, sometimes a valid CRC
        head = HEADER.pack(MAGIC, VERSION, rnd.choice((0, 1)), NO_SESSION, rnd.randrange(1 << 64))
        body = head + rnd.randbytes(rnd.randrange(0, 1200 - HEADER.size))
        return body + CRC.pack(zlib.crc32(body)) if rnd.random() < 0.5 else body
    if kind == 3:  # HELLO-like, padded or not, some names invalid
        name = rnd.choice(["alice", "bob", "x" * 40, "a b", "admin", "Zoë", rnd.randbytes(4).hex()])
        hello = Hello(name, rnd.randrange(1 << 64), rnd.randbytes(16))
        pad = rnd.choice((0, 100, 255, 256, HELLO_SIZE, 600, 1200))
        data = encode_packet(Packet(NO_SESSION, 0, (hello,)), None, pad_to=pad)
        if rnd.random() < 0.2:
            data = data[:-1] + bytes([data[-1] ^ 1])  # a broken CRC
        return data
    if kind == 4:  # LOGIN-like with made-up cookie and proof
        login = Login(rnd.choice(["alice", "bob", "carol"]), rnd.randrange(1 << 64),
                      rnd.randbytes(16), rnd.randbytes(16), rnd.randbytes(32), rnd.randbytes(256),
                      rnd.randbytes(64))  # fmt: skip
        return encode_packet(Packet(NO_SESSION, 0, (login,)), None,
                             pad_to=rnd.choice((0, 256, 1200)))  # fmt: skip
    if kind == 5:  # an unknown session id, any size
        size = rnd.randrange(0, 1501)
        head = HEADER.pack(MAGIC, VERSION, rnd.choice((0, 1)), rnd.randbytes(16), 1)
        return (head + rnd.randbytes(max(0, size - HEADER.size)))[:size]
    if kind == 6:  # other versions
        version = rnd.choice([v for v in range(256) if v != VERSION])
        return (MAGIC + bytes([version]) + rnd.randbytes(1495))[: rnd.randrange(4, 1501)]
    # valid datagrams larger than the limit
    return MAGIC + bytes([VERSION]) + rnd.randbytes(rnd.randrange(1196, 1496))


def test_no_reply_is_larger_than_its_request_100k(tmp_path: Path) -> None:
    """100,000 unauthenticated or random datagrams of 0..1,500 bytes into
    `Relay.handle_datagram` (the loop's path, reply tied to request): every
    reply goes to the sender, and what one request causes is never larger
    than the request. Sources: 3,000 addresses, so some are rate limited
    and some are not."""
    relay = Relay(server_config(tmp_path / "relay"))
    rnd = random.Random(20)
    addresses = [(f"10.{i // 250}.{i % 250}.1", 1000 + i) for i in range(3000)]
    bytes_in = bytes_out = replies = 0
    now = 1000.0
    started = time.monotonic()
    for _ in range(100_000):
        data = hostile_datagram(rnd)
        addr = rnd.choice(addresses)
        now += 0.0001
        out = relay.handle_datagram(data, addr, now)
        size = 0
        for reply, to in out:
            assert to == addr, "a reply went to someone else"
            assert len(reply) <= len(data), (len(reply), len(data), data[:40])
            size += len(reply)
        assert size <= len(data)
        bytes_in += len(data)
        bytes_out += size
        replies += len(out)
    elapsed = time.monotonic() - started
    print(f"\nrelay level: 100,000 datagrams, {bytes_in} bytes in, {replies} replies, "
          f"{bytes_out} bytes out ({bytes_out / bytes_in:.3f}), {elapsed:.1f} s; "
          f"drops {dict(relay.drops.counts)}")  # fmt: skip
    assert bytes_out <= bytes_in
    assert replies > 1000, "the mix should draw some replies (else it tests nothing)"
    assert relay.drops.counts["internal error"] == 0
    assert not relay.sessions


def test_no_amplification_over_a_real_socket(server: RunningServer) -> None:
    """The same mix over real sockets from four addresses: the sum of bytes
    the server sent back is at most the sum it received."""
    rnd = random.Random(21)
    clients = [RawClient(server.address, host=f"127.0.0.{20 + i}") for i in range(4)]
    try:
        for i in range(6000):
            client = clients[i % 4]
            client.send(hostile_datagram(rnd))
            if i % 50 == 49:
                for c in clients:
                    c.drain(0.0)
                time.sleep(0.003)
        time.sleep(0.3)
        for c in clients:
            c.drain(0.05)
        sent = sum(c.bytes_sent for c in clients)
        got = sum(c.bytes_received for c in clients)
        count = sum(len(c.received) for c in clients)
    finally:
        for c in clients:
            c.close()
    print(f"\nreal sockets: 6,000 datagrams, {sent} bytes sent, {count} replies, "
          f"{got} bytes back ({got / sent:.3f})")  # fmt: skip
    assert got <= sent
    assert count > 0
    assert server.relay.drops.counts["internal error"] == 0


# --- login throttling -----------------------------------------------------------------------


class SteppedClock:
    """The in-process server loop's monotonic clock (`chat_server.time`,
    patched), which the test steps forward: a window of failed logins
    passes at once instead of being slept through, and nothing the test
    checks depends on how fast a loaded machine runs it. Everything else of
    the `time` module is the real one."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def step(self, seconds: float) -> None:
        self.offset += seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_failed_logins_are_throttled_per_user_and_per_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wrong passwords against the default window (30 s): 50 against alice
    from 20 addresses (the per-user limit), then 30 from one address
    against 20 users (the per-address limit). The rule: at most 5 password
    checks per window per user, and ADDRESS_NAMES x 5 per window per
    address across names (a guesser behind a shared address must not hold
    every other name behind it at 5); during the window even the right
    password is turned away, after it the right password works.

    A real server and real logins over UDP, on a server clock the test
    steps (`SteppedClock`): the attempts of one window take a fraction of
    it however loaded the machine is, and the window passes when the test
    says so. The failure times the windows keep are the server's own, so
    the sliding-window rule is checked exactly. (It ran on the wall clock
    with a 3 s window before, and failed at load average 12-30 when the
    attempts outlasted it.)"""
    clock = SteppedClock()
    monkeypatch.setattr(chat_server, "time", clock)
    running = start_server(server_config(tmp_path / "data"))
    try:
        period = running.relay.config.login_failure_period
        stats = running.relay.stats
        desk = running.relay.desk
        users = ["alice"] + [f"user{i}" for i in range(20)]
        with RawClient(running.address, host="127.0.1.1") as registrar:
            for name in users:
                answer = registrar.login(name, PASSWORD).answer
                assert isinstance(answer, Welcome), (name, answer)
        # Every failure the windows record, with the server's `now`.
        failed: dict[str, list[float]] = {}
        for window in (desk._by_user, desk._by_ip):
            record = window.record

            def recording(key: str, now: float, record: Any = record) -> None:
                failed.setdefault(key, []).append(now)
                record(key, now)

            monkeypatch.setattr(window, "record", recording)

        def attack(sources: list[RawClient], names: list[str], count: int) -> tuple[int, int]:
            """`count` wrong passwords: (password checks, throttled)."""
            checks0, throttled0 = stats["password_checks"], stats["login_throttled"]
            refused = limited = 0
            for i in range(count):
                answer = sources[i % len(sources)].login(names[i % len(names)], WRONG).answer
                assert isinstance(answer, Refused), answer
                if answer.code.label == "bad_password":
                    refused += 1
                else:
                    assert answer.code.label == "rate_limited", answer
                    limited += 1
            checks = stats["password_checks"] - checks0
            throttled = stats["login_throttled"] - throttled0
            assert (checks, throttled) == (refused, limited)
            return checks, throttled

        def within_limit(times: list[float], limit: int) -> None:
            for i, t in enumerate(times):
                assert sum(1 for u in times[i:] if u - t < period) <= limit, times

        sources = [RawClient(running.address, host=f"127.0.2.{i + 1}") for i in range(20)]
        try:
            # 25 in one window: 5 checked; the window passes; 25 more: 5 checked.
            assert attack(sources, ["alice"], 25) == (5, 20)
            clock.step(period)
            assert attack(sources, ["alice"], 25) == (5, 20)
        finally:
            for s in sources:
                s.close()
        within_limit(failed["alice"], 5)
        assert len(failed["alice"]) == 10
        with RawClient(running.address, host="127.0.3.1") as one:
            # 30 from one address: its 20 checked, the next 10 held till
            # the window's end (the first failure + 30 s) ...
            assert attack([one], users[1:], 30) == (5 * ADDRESS_NAMES, 10)
            within_limit(failed["127.0.3.1"], 5 * ADDRESS_NAMES)
            # ... where even the right password is turned away ...
            answer = one.login("user5", PASSWORD).answer
            assert isinstance(answer, Refused) and answer.code.label == "rate_limited"
        print(f"stats: {dict(stats)}")
        clock.step(period)
        # ... and after it, the right password works, from the same places
        with RawClient(running.address, host="127.0.2.1") as back:
            answer = back.login("alice", PASSWORD).answer
            assert isinstance(answer, Welcome), answer
        with RawClient(running.address, host="127.0.3.1") as back:
            answer = back.login("user5", PASSWORD).answer
            assert isinstance(answer, Welcome), answer
    finally:
        stop_server(running)


# --- a flood ---------------------------------------------------------------------------------

FLOOD_SCRIPT = r"""
import signal, socket, sys, time
stopped = []
signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))  # stop, and say what was sent
host, port, rate, duration, source, pool_path = sys.argv[1:7]
port, rate, duration = int(port), float(rate), float(duration)
with open(pool_path, "rb") as f:
    raw = f.read()
pool, pos = [], 0
while pos < len(raw):
    size = int.from_bytes(raw[pos:pos + 2], "big")
    pool.append(raw[pos + 2:pos + 2 + size])
    pos += 2 + size
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((source, 0))
target = (host, port)
sent = 0
start = time.monotonic()
while True:
    elapsed = time.monotonic() - start
    if elapsed >= duration or stopped:
        break
    due = min(int(elapsed * rate), sent + 2000)
    while sent < due:
        try:
            sock.sendto(pool[sent % len(pool)], target)
        except OSError:
            pass
        sent += 1
    time.sleep(0.0005)
print(sent, time.monotonic() - start, flush=True)
"""

FLOOD_RATE = 20_000.0
#: alice's messages during the flood, one every 20 ms (5 s of them)
FLOOD_MESSAGES = 250
#: The flood stops by itself after this, if the test never stops it.
FLOOD_CAP_SECONDS = 120.0
#: The most datagrams the server may read while one of alice's messages
#: waits (its p99): what the flood sends in 10 s. A server that keeps up reads
#: about a thousand (p99 1,160 at load 30); a saturated one 37,000 at load 12
#: (alice's datagrams wait behind a full socket buffer and some are sent
#: again). Counted in the server's own reads, a slower machine reads fewer a
#: second and so counts fewer a second of delay, which is why a busy machine
#: cannot break it; a server that held the conversation back for tens of
#: seconds while it read the flood (20,000 a second) goes over.
FLOOD_WAIT_READS = int(FLOOD_RATE * 10)


def test_flood_from_one_address_does_not_stop_a_conversation(
    server: RunningServer, peers: Callable[..., Peer], tmp_path: Path
) -> None:
    """Another process floods the server from one address (127.0.0.2) with
    the hostile mix at 20,000 datagrams/s (the achieved rate is printed; on
    this 2-core machine one sender process keeps it up, and the server,
    alice and bob share this process's interpreter). Meanwhile alice sends
    bob 250 messages, one every 20 ms, and carol logs in: every message
    arrives and carol gets in while the flood is still on (it stops only
    then); the server's tables stay small and the process's memory (VmRSS)
    is printed before and after.

    The promise is judged against the flood, not the clock: this asserted a
    p99 latency under 2 s before, and a busy machine stretched it to 2.0-4.2
    s (load average 12-30: the server then reads fewer datagrams a second
    than the flood sends, so alice's wait behind a full socket buffer and
    some are dropped there and sent again). A deadline of a minute only
    bounds a hang. A server that held the conversation back until the
    flood stopped never gets through here; one that held it back for tens
    of seconds fails on the datagrams the server read while a message
    waited (p99 at most FLOOD_WAIT_READS, what the flood sends in 10 s: a
    count of the server's own work, which a busy machine slows down but does
    not inflate). The wall-clock latencies are printed;
    bench/preauth_flood.py measures them."""
    alice = peers("alice")
    bob = peers("bob")
    login_ok(alice, server.address)
    login_ok(bob, server.address)
    exchange(alice, bob, "warm-up")
    stats = server.relay.stats

    def reads() -> int:
        return stats["datagrams_in"]

    bob.meter = reads
    rnd = random.Random(30)
    pool = b"".join(
        len(d).to_bytes(2, "big") + d for d in (hostile_datagram(rnd) for _ in range(2000))
    )
    pool_path = tmp_path / "flood.bin"
    pool_path.write_bytes(pool)
    rss_before = vm_rss_kib()
    in_before = reads()
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOOD_SCRIPT, server.address[0], str(server.address[1]),
         str(FLOOD_RATE), str(FLOOD_CAP_SECONDS), "127.0.0.2", str(pool_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    sent_at: dict[str, tuple[float, int]] = {}
    carol = peers("carol")
    try:
        # The flood is on once the server has read some of it.
        wait_until(lambda: reads() - in_before > 1000, 10.0, "the flood")
        start = time.monotonic()
        for index in range(FLOOD_MESSAGES):
            text = f"flood {index}"
            sent_at[text] = (time.monotonic(), reads())
            alice.send(text, to="bob")
            if index == 50:
                assert carol.login(server.address)
            next_send = start + (index + 1) * 0.02
            while (wait := next_send - time.monotonic()) > 0:
                bob.pump(wait)
        bob.wait(lambda: all(t in bob.texts for t in sent_at), 60.0, "every message")
        carol.wait(lambda: carol.logged_in, 60.0, "carol's login")
        assert flood.poll() is None, "the flood ended before the conversation got through"
        flood.terminate()
        out, err = flood.communicate(timeout=30)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.communicate()
    flood_sent, flood_time = out.split()
    rate = int(flood_sent) / float(flood_time)
    latencies: list[float] = []
    waited: list[int] = []  # datagrams the server read while each message waited
    for when, event in bob.events:
        if isinstance(event, MessageReceived) and event.text in sent_at:
            latencies.append(when - sent_at[event.text][0])
            waited.append(bob.meter_at[event.text] - sent_at[event.text][1])
    latencies.sort()
    waited.sort()

    def p99(values: list[Any]) -> Any:
        return values[min(len(values) - 1, math.ceil(len(values) * 0.99) - 1)]

    rss_after = vm_rss_kib()
    relay = server.relay
    received = reads() - in_before
    print(f"\nflood: {flood_sent} datagrams in {float(flood_time):.1f} s = {rate:,.0f}/s "
          f"(asked {FLOOD_RATE:,.0f}/s); server read {received}; "
          f"alice->bob {len(latencies)} messages, "
          f"p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"p99 {p99(latencies) * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms; "
          f"datagrams read while one waited: p50 {waited[len(waited) // 2]}, "
          f"p99 {p99(waited)}, max {waited[-1]}; "
          f"VmRSS {rss_before} kB -> {rss_after} kB; preauth table {len(relay._preauth)}, "
          f"reply cache {len(relay.desk.replies._replies)}, sessions {len(relay.sessions)}; "
          f"drops {dict(relay.drops.counts)}; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    assert err == "" or "Traceback" not in err, err
    assert len(latencies) == len(sent_at) == FLOOD_MESSAGES
    assert p99(waited) <= FLOOD_WAIT_READS, (
        f"alice's messages waited while the server read p99 {p99(waited)} datagrams "
        f"(at most {FLOOD_WAIT_READS}, what the flood sends in 10 s): the flood held "
        "the conversation back"
    )
    assert len(relay._preauth) <= 10
    assert len(relay.desk.replies._replies) <= 10
    assert len(relay.sessions) == 3
    assert rss_after - rss_before < 50_000, "memory grew by more than 50 MB"
    assert relay.drops.counts["internal error"] == 0


# --- NAT rebinding and spoofed address changes ----------------------------------------------


def test_nat_rebinding_keeps_the_conversation(
    server: RunningServer, recorders: Callable[[Address], Recorder], peers: Callable[..., Peer]
) -> None:
    """Alice's NAT moves her to a new port mid-conversation: the server
    challenges the new address, her client answers, the route moves and
    messages keep flowing both ways."""
    recorder = recorders(server.address)
    alice = peers("alice")
    bob = peers("bob")
    login_ok(alice, recorder.address)
    login_ok(bob, server.address)
    exchange(alice, bob, "before 1")
    exchange(bob, alice, "before 2")
    old = recorder.upstream
    assert live_session(server, "alice").addr == old
    new = recorder.rebind()
    assert new != old
    started = time.monotonic()
    exchange(alice, bob, "after the rebinding 1")
    wait_until(lambda: live_session(server, "alice").addr == new, 5.0, "the route to move")
    moved = time.monotonic() - started
    exchange(bob, alice, "after the rebinding 2")
    exchange(alice, bob, "after the rebinding 3")
    session = live_session(server, "alice")
    challenges = sum(1 for d in recorder.recorded("s2c") if path_challenges(d, session))
    print(f"\nrebinding: route moved {old} -> {new} in {moved * 1000:.0f} ms; "
          f"{challenges} PATH_CHALLENGE datagram(s)")  # fmt: skip
    assert session.probe is None
    assert alice.disconnected is None and bob.disconnected is None


def test_spoofed_address_change_moves_nothing(
    server: RunningServer, recorders: Callable[[Address], Recorder], peers: Callable[..., Peer]
) -> None:
    """From a new address: alice's old datagrams replayed and forged ones
    move nothing and start no validation; a fresh datagram of hers that an
    on-path attacker caught and sent first is taken (it is hers) but only
    draws a PATH_CHALLENGE to the new address, which the attacker cannot
    answer: the route stays, and alice carries on."""
    recorder = recorders(server.address)
    alice = peers("alice", keepalive=600.0)
    bob = peers("bob", keepalive=600.0)
    login_ok(alice, recorder.address)
    login_ok(bob, server.address)
    exchange(alice, bob, "hello bob")
    exchange(bob, alice, "hello alice")
    session = live_session(server, "alice")
    route, sid = session.addr, session.session_id
    time.sleep(0.3)  # let the last acks reach the server before capturing them
    captured = [d for d in recorder.recorded("c2s") if has_mac(d) and session_id_of(d) == sid]
    rnd = random.Random(40)
    with RawClient(server.address, host="127.0.0.5") as attacker:
        for data in captured:  # replays
            attacker.send(data)
        for _ in range(50):  # forgeries
            head = HEADER.pack(MAGIC, VERSION, FLAG_MAC, sid, rnd.randrange(1000, 1 << 32))
            attacker.send(head + rnd.randbytes(rnd.randrange(3, 200)) + rnd.randbytes(TAG_SIZE))
        time.sleep(0.3)
        assert attacker.drain(0.0) == []
        assert session.addr == route and session.probe is None

        # a fresh datagram of alice's, caught on the way and sent from elsewhere first
        recorder.hold = True
        alice.send("caught on the way", to="bob")
        wait_until(lambda: bool(recorder.held), 5.0, "alice's datagram")
        held = recorder.take_held()
        for data in held:
            attacker.send(data)
        recorder.hold = False  # what alice sent meanwhile is held for good
        held += recorder.take_held()
        got = attacker.drain(0.5)
        assert got, "the server did not challenge the new address"
        assert all(has_mac(d) and session_id_of(d) == sid for d in got)
        challenges = sum(1 for d in got if path_challenges(d, session))
        assert session.probe is not None and session.probe.addr == attacker.address
        time.sleep(1.0)  # several RTOs: nothing moves without a PATH_RESPONSE
        assert live_session(server, "alice") is session and session.addr == route
        print(f"\nprobe: {attacker.bytes_sent} bytes from the attacker, {len(got)} datagrams "
              f"({challenges} PATH_CHALLENGE), {attacker.bytes_received} bytes back")  # fmt: skip
        assert attacker.bytes_received <= 3 * attacker.bytes_sent
    for data in held:  # the originals arrive late from alice's address: replays now
        recorder.send_upstream(data)
    bob.wait(lambda: "caught on the way" in bob.texts, 10.0, "the caught message")
    exchange(alice, bob, "and on we go")
    exchange(bob, alice, "indeed")
    assert session.addr == route
    assert bob.texts.count("caught on the way") == 1


# --- fuzzing the relay ------------------------------------------------------------------------


class FuzzWorld:
    """A relay with alice and bob logged in by hand (their own Connections),
    who have chatted, and every datagram that passed: the seeds to mutate."""

    def __init__(self) -> None:
        self.relay = Relay(server_config(None))
        self.now = 1000.0
        self.alice_addr: Address = ("198.51.100.1", 5000)
        self.bob_addr: Address = ("198.51.100.2", 6000)
        self.corpus: list[bytes] = []
        self.keys: dict[bytes, bytes] = {}  # session id -> client-to-server MAC key
        self.conns: dict[str, Connection] = {}
        self.logins = 0
        self.next_pkt = 1 << 20
        self.login("alice", self.alice_addr)
        self.login("bob", self.bob_addr)
        for i in range(4):
            self.chat("alice", "bob", f"hi {i} " * (i * 100 + 1))
            self.chat("bob", "alice", f"yo {i}")

    def feed(self, data: bytes, addr: Address) -> list[tuple[bytes, Address]]:
        self.now += 0.001
        self.corpus.append(data)
        out = self.relay.handle_datagram(data, addr, self.now)
        self.corpus.extend(d for d, _ in out)
        return out

    def login(self, name: str, addr: Address) -> None:
        login = ScriptedLogin(name, PASSWORD, 9, self.now)
        login.take([d for d, _ in self.feed(login.hello, addr)], self.now)
        login.take([d for d, _ in self.feed(login.request, addr)], self.now)
        conn = login.conn
        assert conn is not None, login.answer
        self.keys[conn.session_id] = conn.key
        self.conns[name] = conn

    def pump(self) -> None:
        """Move datagrams between the relay and both clients until quiet."""
        addrs = {"alice": self.alice_addr, "bob": self.bob_addr}
        for _ in range(50):
            moved = False
            for name, conn in self.conns.items():
                for data in conn.datagrams_to_send(self.now):
                    moved = True
                    for reply, to in self.feed(data, addrs[name]):
                        target = "alice" if to == self.alice_addr else "bob"
                        self.conns[target].receive_datagram(reply, self.now)
            self.relay.handle_timer(self.now + 0.03)
            for reply, to in self.relay.datagrams_to_send(self.now + 0.03):
                target = "alice" if to == self.alice_addr else "bob"
                self.conns[target].receive_datagram(reply, self.now)
                moved = True
            for conn in self.conns.values():
                while (event := conn.next_event()) is not None:
                    if isinstance(event, PayloadReceived):
                        self.corpus.append(event.payload)
            self.now += 0.03
            if not moved:
                return

    def chat(self, sender: str, to: str, text: str) -> None:
        msg = MsgId(7, len(self.corpus))
        self.conns[sender].send(encode_message(Send(msg, to, text)), conversation_stream(to))
        self.pump()

    def retag(self, data: bytes) -> bytes:
        """Make a mutated datagram verify again: a fresh CRC, or a MAC with
        the client-to-server key of the session it names (the key the relay
        verifies with, so the fuzz reaches the frames)."""
        if len(data) < HEADER.size or data[:4] != MAGIC:
            return data
        if data[5] & FLAG_MAC:
            key = self.keys.get(session_id_of(data))
            if key is None or len(data) < HEADER.size + TAG_SIZE:
                return data
            # a packet number not seen yet, so the frames get past the replay window
            self.next_pkt += 1
            data = data[:22] + struct.pack("!Q", self.next_pkt) + data[30:]
            return data[:-TAG_SIZE] + mac_tag(key, data[:-TAG_SIZE])
        body = data[: -CRC.size] if len(data) >= HEADER.size + CRC.size else data
        return body + CRC.pack(zlib.crc32(body))

    def check(self, data: bytes, addr: Address) -> None:
        relay = self.relay
        before = sum(relay.drops.counts.values())
        self.now += 0.0005
        relay.handle_datagram(data, addr, self.now)  # must not raise
        relay.handle_timer(self.now)
        assert relay.drops.counts["internal error"] == 0, "an exception inside the loop"
        if len(data) < HEADER.size or data[:4] != MAGIC:
            assert sum(relay.drops.counts.values()) == before + 1, "not counted"
        for name in ("alice", "bob"):  # keep both logged in for the next example
            if not any(s.user.name == name for s in relay.sessions.values()):
                # from an address of its own: the pre-login limit is per address
                self.logins += 1
                self.login(name, (f"192.0.{self.logins // 250}.{self.logins % 250 + 1}", 9000))


@functools.cache
def fuzz_world() -> FuzzWorld:
    return FuzzWorld()


ADDRESSES = st.sampled_from([("198.51.100.1", 5000), ("198.51.100.2", 6000), ("203.0.113.9", 7000)])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=1500),
        st.binary(max_size=1500).map(lambda b: MAGIC + bytes([VERSION]) + b),
        st.tuples(st.integers(0, 1), st.binary(max_size=1400)).map(
            lambda t: HEADER.pack(MAGIC, VERSION, t[0], NO_SESSION, 0) + t[1]
        ),
    ),
    addr=ADDRESSES,
)
def test_arbitrary_bytes_only_ever_count_drops(data: bytes, addr: Address) -> None:
    """Arbitrary bytes (some behind our magic and header) into the relay:
    never an exception out of `handle_datagram`, no internal error."""
    fuzz_world().check(data, addr)


MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("splice"), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 16)),
)


def mutate(world: FuzzWorld, seed: int, ops: list[tuple[str, int, int]]) -> bytes:
    corpus = world.corpus
    data = bytearray(corpus[seed % len(corpus)])
    for op, a, b in ops:
        if op == "flip" and data:
            data[a % len(data)] ^= 1 << b
        elif op == "truncate":
            del data[a % (len(data) + 1) :]
        elif op == "splice":
            other = corpus[b % len(corpus)]
            cut = a % (len(data) + 1)
            data = data[:cut] + other[(a * 7 + b) % (len(other) + 1) :]
        elif op == "insert":
            data.insert(a % (len(data) + 1), b)
        elif op == "delete" and data:
            start = a % len(data)
            del data[start : start + b]
    return bytes(data[:1500])


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 1 << 16),
    ops=st.lists(MUTATION, min_size=1, max_size=4),
    retag=st.booleans(),
    addr=ADDRESSES,
)
def test_mutated_datagrams_only_ever_count_drops(
    seed: int, ops: list[tuple[str, int, int]], retag: bool, addr: Address
) -> None:
    """Real captured datagrams (HELLO, LOGIN, CHALLENGE, WELCOME, chat both
    ways, acks), bit-flipped, truncated, spliced with each other, and half
    of them re-tagged with the right CRC or session MAC so the mutation
    reaches the frame and message decoders: never an exception, no internal
    error; what is not re-tagged is dropped and counted."""
    world = fuzz_world()
    data = mutate(world, seed, ops)
    if retag:
        data = world.retag(data)
        world.check(data, addr)
        return
    relay = world.relay
    before = sum(relay.drops.counts.values())
    known = data in set(world.corpus)
    world.check(data, addr)
    if not known:
        assert sum(relay.drops.counts.values()) == before + 1, "a mutated datagram was not dropped"


# --- take-over and fake servers -------------------------------------------------------------


def test_second_login_takes_over_and_a_failed_one_touches_nothing(
    server: RunningServer, peers: Callable[..., Peer]
) -> None:
    """A second successful login from another client instance takes over:
    the old session gets `logged_in_elsewhere` (fatal) and `Disconnected`.
    A failed login (wrong password, another instance) leaves the live
    session exactly as it was."""
    bob = peers("bob")
    login_ok(bob, server.address)
    first = peers("alice")
    login_ok(first, server.address)
    exchange(first, bob, "from the first")
    second = peers("alice")
    login_ok(second, server.address)
    first.wait(lambda: first.disconnected is not None, 10.0, "the take-over")
    errors = first.of(ErrorEvent)
    assert [(e.code, e.fatal) for e in errors] == [("logged_in_elsewhere", True)]
    assert first.disconnected == "logged_in_elsewhere"
    live = live_session(server, "alice")
    assert live is not None and live.instance_id == second.session.instance_id
    exchange(second, bob, "from the second")
    exchange(bob, second, "to the second")
    assert "to the second" not in first.texts

    before = (live.session_id, live.addr, live.instance_id, len(server.relay.sessions))
    third = peers("alice")
    assert third.login(server.address, password=WRONG)
    third.wait(lambda: third.disconnected is not None, 10.0, "refusal")
    assert third.disconnected == "bad_password" and not third.logged_in
    after = live_session(server, "alice")
    assert after is live
    assert (after.session_id, after.addr, after.instance_id, len(server.relay.sessions)) == before
    second.pump(0.3)
    assert not second.of(ErrorEvent) and second.disconnected is None
    exchange(second, bob, "still logged in")
    exchange(bob, second, "good")


class FakeServer:
    """Answers HELLO with a CHALLENGE (naming a DH key of its own) and LOGIN
    with a WELCOME, without knowing any account. `signature(fake, login,
    message)` makes the WELCOME's server signature; `unwrapped` gives the
    StoredKey + ServerKey a LOGIN wrapped for the fake's DH key."""

    def __init__(
        self,
        signature: Callable[[FakeServer, Login, bytes], bytes],
        address: Address = ("127.0.0.1", 0),
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.address: Address = self.sock.getsockname()
        self.signature = signature
        self._dh_private = secrets.randbits(DH_PRIVATE_BITS)
        self.dh_public = dh_public(self._dh_private)
        self.challenges: dict[bytes, Challenge] = {}
        self.logins = 0
        self.welcomes = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="fake-server", daemon=True)
        self._thread.start()

    def unwrapped(self, login: Login, message: bytes) -> bytes:
        secret = dh_secret(self._dh_private, login.dh_public)
        return wrap_keys(secret, message, login.wrapped_keys) if secret else bytes(64)

    def _run(self) -> None:
        while not self._stop:
            if not select.select([self.sock], [], [], 0.1)[0]:
                continue
            data, addr = self.sock.recvfrom(65535)
            frame = preauth_frame(data)
            if isinstance(frame, Hello):
                challenge = Challenge(frame.nonce, secrets.token_bytes(16),
                                      secrets.token_bytes(16), TEST_ITERATIONS,
                                      self.dh_public)  # fmt: skip
                self.challenges[frame.nonce] = challenge
                reply: Frame = challenge
            elif isinstance(frame, Login) and frame.nonce in self.challenges:
                self.logins += 1
                ch = self.challenges[frame.nonce]
                message = auth_message(frame.username, frame.instance_id, frame.nonce, ch.cookie,
                                       ch.salt, ch.iterations, frame.dh_public,
                                       ch.dh_public)  # fmt: skip
                reply = Welcome(frame.nonce, secrets.token_bytes(16),
                                self.signature(self, frame, message), frame.username)  # fmt: skip
                self.welcomes += 1
            else:
                continue
            self.sock.sendto(encode_packet(Packet(NO_SESSION, 0, (reply,)), None), addr)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5.0)
        self.sock.close()


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(lambda fake, login, message: secrets.token_bytes(32), id="random-signature"),
        pytest.param(
            lambda fake, login, message: server_signature(secrets.token_bytes(32), message),
            id="signature-under-another-key",
        ),
        pytest.param(
            lambda fake, login, message: server_signature(
                fake.unwrapped(login, message)[32:], message
            ),
            id="signature-from-the-server-key-the-client-sent",
        ),
    ],
)
def test_client_refuses_a_welcome_from_a_server_that_does_not_know_the_account(
    tmp_path: Path, peers: Callable[..., Peer], how: Callable[[FakeServer, Login, bytes], bytes]
) -> None:
    """alice registered with the real server; later a fake one answers at the
    same address (the real one gone, or an attacker in its place) with
    CHALLENGE and WELCOME, without knowing her account: the client must end
    with a fatal error, not logged in. The last case names its own DH key in
    the CHALLENGE and signs with the ServerKey the client wrapped for it: a
    client that sends its keys to whoever asks cannot tell a fake server.
    (Before the name is registered anywhere no client could tell; so the
    registration happens first, honestly, and the client keeps its store.)"""
    running = start_server(server_config(tmp_path / "data"))
    try:
        first = peers("alice", persist=True)
        login_ok(first, running.address)
        first.close()
    finally:
        stop_server(running)
    fake = FakeServer(how, running.address)
    try:
        alice = peers("alice", persist=True)
        assert alice.login(fake.address)
        alice.wait(lambda: alice.disconnected is not None or alice.logged_in, 10.0, "an end")
        alice.pump(0.2)
        print(f"\nfake server: {fake.logins} LOGIN(s), {fake.welcomes} WELCOME(s); the client "
              f"{'logged in' if alice.logged_in else 'did not log in'}; "
              f"events {[type(e).__name__ for _, e in alice.events]}")  # fmt: skip
        assert not alice.logged_in, "the client logged in to a server that does not know alice"
        fatal = [e for e in alice.of(ErrorEvent) if e.fatal]
        assert fatal, alice.events
        assert alice.disconnected == fatal[0].code
    finally:
        fake.close()


def test_registrations_are_limited_per_address(tmp_path: Path) -> None:
    """Each new account costs the server a 2048-bit modexp on its one loop
    thread, so new names from one address are rate limited (a burst, then a
    slow refill): past it a registration is refused `rate_limited` before any
    of that work, while logins of existing accounts go on untouched."""
    running = start_server(
        server_config(tmp_path / "data", registration_rate=0.001, registration_burst=3)
    )
    sessions: list[ChatSession] = []
    try:
        for name in ("reg1", "reg2", "reg3"):
            session = make_session()
            sessions.append(session)
            assert session.login(running.address, name, password=PASSWORD)
            wait_for_event(session, LoggedIn)
        extra = make_session()
        sessions.append(extra)
        assert extra.login(running.address, "reg4", password=PASSWORD)
        refused = wait_for_event(extra, ErrorEvent)
        assert refused.code == "rate_limited" and not refused.fatal, refused
        assert "new accounts" in refused.message
        assert running.relay.stats["registrations_throttled"] >= 1
        assert "reg4" not in running.relay.users
        # An existing account logs in again from the same address.
        sessions[0].close(2.0)
        again = make_session()
        sessions.append(again)
        assert again.login(running.address, "reg1", password=PASSWORD)
        wait_for_event(again, LoggedIn)
    finally:
        for session in sessions:
            session.abort()
        stop_server(running)


def wait_for_event(session: ChatSession, kind: type, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {kind.__name__} within {timeout} s"
        try:
            event = session.events.get(timeout=remaining)
        except queue.Empty:
            continue
        if isinstance(event, kind):
            return event


# --- registrations' key exchange off the loop -------------------------------------------------


class HeldExecutor(concurrent.futures.Executor):
    """Runs nothing until `release()`: registrations stay waiting for their
    Diffie-Hellman secret as long as the test likes. `broken` makes every
    submit fail like a dead process pool."""

    def __init__(self, broken: bool = False, capacity: int = 1000) -> None:
        self.broken = broken
        self.capacity = capacity  # held at once; beyond: Busy, like a full worker pool
        self.held: list[
            tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]
        ] = []

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        if self.broken:
            raise concurrent.futures.BrokenExecutor("a worker died")
        if len(self.held) >= self.capacity:
            raise KeyExchangeBusy("all workers busy")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.held.append((future, fn, args))
        return future

    def release(self) -> None:
        held, self.held = self.held, []
        for future, fn, args in held:
            future.set_result(fn(*args))


def register(relay: Relay, name: str, password: str, addr: Address, now: float) -> bytes:
    """HELLO, CHALLENGE, then the LOGIN datagram that registers `name`."""
    login = ScriptedLogin(name, password, 5, now)
    assert isinstance(login.take([d for d, _ in relay.handle_datagram(login.hello, addr, now)],
                                 now), Challenge)  # fmt: skip
    return login.request


def test_registrations_wait_for_their_key_exchange_off_the_loop() -> None:
    """With a pool for the Diffie-Hellman work, a registering LOGIN gets its
    verdict only once the secret comes back (the loop is woken for it), its
    retransmissions cost nothing meanwhile, and when two clients register the
    same new name at once the first verdict binds the name: the second is an
    ordinary login to it, refused for the wrong password."""
    pool = HeldExecutor()
    wakes: list[bool] = []
    relay = Relay(server_config(None), unwrapper=pool, wake=lambda: wakes.append(True))
    now = 1000.0
    first, second = ("192.0.2.1", 4000), ("192.0.2.2", 4000)
    login_1 = register(relay, "carol", PASSWORD, first, now)
    login_2 = register(relay, "carol", "another password entirely", second, now)
    assert relay.handle_datagram(login_1, first, now) == []
    assert relay.handle_datagram(login_1, first, now) == []  # a retransmission: no new work
    assert relay.handle_datagram(login_2, second, now) == []
    assert len(pool.held) == 2 and not relay.sessions and not wakes
    assert relay.stats["password_checks"] == 0  # no verdict before the secret

    pool.release()
    assert len(wakes) == 2
    relay.key_exchange_done(now)
    out = relay.datagrams_to_send(now)
    verdicts = {to: f for d, to in out if (f := preauth_frame(d)) is not None}
    assert isinstance(verdicts[first], Welcome)
    refused = verdicts[second]
    assert isinstance(refused, Refused) and refused.code == ErrorCode.BAD_PASSWORD
    assert [s.user.name for s in relay.sessions.values()] == ["carol"]
    # The WELCOME is cached for retransmissions like any other.
    ((again, to),) = relay.handle_datagram(login_1, first, now)
    assert to == first and again == next(d for d, to in out if to == first)


def test_registration_still_works_when_the_pool_is_broken() -> None:
    """A dead pool must not lock new users out: the loop does the key
    exchange itself (slower, but the name is registered)."""
    relay = Relay(server_config(None), unwrapper=HeldExecutor(broken=True))
    addr = ("192.0.2.3", 4000)
    out = relay.handle_datagram(register(relay, "dave", PASSWORD, addr, 1000.0), addr, 1000.0)
    assert any(isinstance(preauth_frame(d), Welcome) for d, _ in out)
    assert [s.user.name for s in relay.sessions.values()] == ["dave"]


def test_server_registers_through_its_process_pool(
    tmp_path: Path, peers: Callable[..., Peer]
) -> None:
    """End to end: a real server hands registrations to its key-exchange
    worker processes; three new users register, log in and chat; the
    workers end with the server."""
    running = start_server(server_config(tmp_path / "data", key_workers=2))
    try:
        a, b, c = peers("erin"), peers("frank"), peers("grace")
        for peer in (a, b, c):
            login_ok(peer, running.address)
        exchange(a, b, "hello from erin")
        exchange(c, a, "hello from grace")
        assert running.relay.stats["key_exchanges_pooled"] == 3
        pool = running.server._unwrapper
        assert pool is not None
        procs = [w.proc for w in pool._workers]
        assert procs and all(p.poll() is None for p in procs)
    finally:
        stop_server(running)
    assert all(p.poll() is not None for p in procs), "a worker outlived the server"


def test_a_stopping_server_sends_the_accepts_of_its_last_commit_before_its_bye(
    tmp_path: Path, peers: Callable[..., Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message forwarded just before the server stops (its commit still
    on the way to the disk) is ACCEPTed before the BYE: otherwise its
    sender keeps it as unsent and waits for a login to resend it (closing
    the three peers of the process-pool test waited 3 s each for that)."""
    running = start_server(server_config(tmp_path / "data"))
    try:
        a, b = peers("erin"), peers("frank")
        for peer in (a, b):
            login_ok(peer, running.address)
        store = running.server.store
        assert store is not None
        apply = store._apply

        def slow_apply(ops: list[Write]) -> None:
            time.sleep(0.3)  # a slow disk: the commit lands after the stop
            apply(ops)

        monkeypatch.setattr(store, "_apply", slow_apply)
        msg = a.send("just before the stop", to="frank")
        b.wait(lambda: "just before the stop" in b.texts, 10, "the message forwarded")
    finally:
        stop_server(running)
    a.wait(lambda: bool(a.of(ErrorEvent)), 10, "the BYE")
    assert a.of(ErrorEvent)[0].code == "server_shutdown"
    assert "accepted" in a.states(msg), a.events


class HeldStore:
    """A `MessageStore` that keeps every write until `commit()`, then hands
    back their callbacks in order, as the store thread would."""

    def __init__(self) -> None:
        self.ops: list[tuple[Op, Callable[[], None] | None]] = []
        self.done: list[Callable[[], None]] = []

    def load(self) -> Loaded:
        return Loaded(secrets.token_bytes(32), 1)

    def submit(self, op: Op, then: Callable[[], None] | None = None) -> None:
        self.ops.append((op, then))

    def reserve_ids(self, next_msg_id: int) -> int:
        return 1 << 63

    def completed(self) -> list[Callable[[], None]]:
        done, self.done = self.done, []
        return done

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def commit(self) -> None:
        ops, self.ops = self.ops, []
        self.done += [then for _, then in ops if then is not None]


def test_no_welcome_for_an_account_before_it_is_on_disk() -> None:
    """Two clients register the same new name at once: the second LOGIN
    finds the account in memory, but its WELCOME must wait for the disk like
    the first one's, or a crash could leave a session for a name never
    stored (which anyone could then register with another password)."""
    store = HeldStore()
    relay = Relay(server_config(None), store=store)
    now = 1000.0
    first, second = ("192.0.2.5", 4000), ("192.0.2.6", 4000)
    login_1 = register(relay, "heidi", PASSWORD, first, now)
    login_2 = register(relay, "heidi", PASSWORD, second, now)
    before = relay.handle_datagram(login_1, first, now) + relay.handle_datagram(
        login_2, second, now
    )
    assert not any(isinstance(preauth_frame(d), Welcome) for d, _ in before)
    assert not relay.sessions
    later = now + 120  # the disk was slow: longer than a session timeout
    store.commit()  # the account is on the disk now
    relay.store_done(later)
    after = relay.datagrams_to_send(later)
    welcomed = {to for d, to in after if isinstance(preauth_frame(d), Welcome)}
    assert welcomed == {first, second}
    # Sessions start at the commit, not at the LOGIN: not expired at once.
    relay.handle_timer(later + 1)
    assert [s.user.name for s in relay.sessions.values()] == ["heidi"]


def test_registrations_beyond_what_the_pool_takes_wait_in_a_backlog() -> None:
    """The pool takes only so many requests at once (its pipes must never
    block the loop): the rest wait in the server's backlog and go to the pool
    as answers come back; nobody is refused for it."""
    pool = HeldExecutor(capacity=1)
    relay = Relay(server_config(None), unwrapper=pool)
    now = 1000.0
    addrs = [("192.0.2.7", 4000), ("192.0.2.8", 4000), ("192.0.2.9", 4000)]
    logins = [register(relay, name, PASSWORD, a, now) for name, a in zip("ijk", addrs, strict=True)]
    for login, addr in zip(logins, addrs, strict=True):
        assert relay.handle_datagram(login, addr, now) == []  # no refusal, no welcome yet
    welcomed: set[Address] = set()
    for _ in range(3):
        assert len(pool.held) == 1
        pool.release()
        relay.key_exchange_done(now)  # the verdict, and the next one goes to the pool
        out = relay.datagrams_to_send(now)
        welcomed |= {to for d, to in out if isinstance(preauth_frame(d), Welcome)}
    assert welcomed == set(addrs) and not pool.held
