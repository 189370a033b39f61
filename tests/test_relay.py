"""The relay core, over real UDP sockets on 127.0.0.1: the user's flow through
the terminal client, many users at once, refused logins and sends, an
unreachable server, hostile datagrams, expiry, paged /who and shutdown."""

from __future__ import annotations

import gc
import json
import logging
import queue
import random
import secrets
import signal
import socket
import subprocess
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest

from chat_client import (
    ChatSession,
    Disconnected,
    ErrorEvent,
    LoggedIn,
    MessageReceived,
    PresenceChanged,
    StatusChanged,
    WhoList,
)
from protocol import (
    HEADER,
    MAGIC,
    MIN_PREAUTH_REQUEST,
    NO_SESSION,
    VERSION,
    Ack,
    Challenge,
    ErrorCode,
    Hello,
    Login,
    Message,
    MsgId,
    Packet,
    Ping,
    Receipt,
    Refused,
    Send,
    Stream,
    UnknownSession,
    VersionFrame,
    Welcome,
    Who,
    auth_message,
    client_proof,
    conversation_stream,
    decode_packet,
    encode_message,
    encode_packet,
    salted_password,
    scram_keys,
    server_signature,
    session_key,
)
from reliability import Connection
from tests.conftest import (
    PASSWORD,
    ROOT,
    RTO_MAX,
    RTO_MIN,
    TEST_ITERATIONS,
    RunningServer,
    ServerProcess,
    client_command,
    env_for_tests,
    make_session,
    spawn_server,
    start_server,
    stop_process,
    stop_server,
)
from tests.conftest import test_config as server_config  # not a test: no test_ name here
from tests.lossy_proxy import LossyProxy

# --- helpers: in-process sessions -------------------------------------------------


class Client:
    """A `ChatSession` plus everything it reported, sorted for the checks."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        self.name = name
        self.session = make_session(**kwargs)
        self.events: list[Any] = []
        self.received: list[MessageReceived] = []
        self.states: dict[str, list[str]] = defaultdict(list)
        self.reasons: dict[str, str | None] = {}
        self.errors: list[ErrorEvent] = []
        self.presence: list[PresenceChanged] = []
        self.who_lists: list[WhoList] = []
        self.logged_in = False
        self.disconnected: str | None = None

    def login(
        self, server: tuple[str, int], connect_to: str | None = None, password: str = PASSWORD
    ) -> bool:
        return self.session.login(server, self.name, connect_to, password=password)

    def pump(self, timeout: float = 0.0) -> bool:
        """Take the events waiting (or the first one within `timeout`)."""
        got = False
        while True:
            try:
                if timeout and not got:
                    event = self.session.events.get(timeout=timeout)
                else:
                    event = self.session.events.get_nowait()
            except queue.Empty:
                return got
            got = True
            self._record(event)

    def _record(self, event: Any) -> None:
        self.events.append(event)
        if isinstance(event, MessageReceived):
            self.received.append(event)
        elif isinstance(event, StatusChanged):
            self.states[event.id].append(event.state)
            if event.reason is not None:
                self.reasons[event.id] = event.reason
        elif isinstance(event, ErrorEvent):
            self.errors.append(event)
        elif isinstance(event, PresenceChanged):
            self.presence.append(event)
        elif isinstance(event, WhoList):
            self.who_lists.append(event)
        elif isinstance(event, LoggedIn):
            self.logged_in = True
        elif isinstance(event, Disconnected):
            self.disconnected = event.reason

    def wait(self, condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.name}: timed out waiting for {what or condition}; "
                    f"last events {self.events[-10:]}"
                )
            self.pump(min(remaining, 0.2))

    def close(self) -> None:
        if self.session.running:
            self.session.close(5.0)
        if self.session.running:
            self.session.abort()


def wait_all(
    clients: list[Client], condition: Callable[[], bool], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if not any([c.pump() for c in clients]):
            time.sleep(0.01)


def logged_in(server: RunningServer, *names: str, **kwargs: Any) -> list[Client]:
    clients = [Client(name, **kwargs) for name in names]
    for client in clients:
        assert client.login(server.address)
    wait_all(clients, lambda: all(c.logged_in for c in clients), 30.0, "logins")
    return clients


def close_all(clients: list[Client]) -> None:
    for client in clients:
        if client.session.running:
            client.session.logout(5.0)
    for client in clients:
        client.close()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def session_names(server: RunningServer) -> set[str]:
    # list() copies the dict in one step under the GIL; the server thread owns it.
    return {s.user.name for s in list(server.relay.sessions.values())}


# --- helpers: terminal clients as processes -----------------------------------------


class JsonClient:
    """`chat-client --no-gui --json` as a real process, driven line by line."""

    def __init__(self, *args: str) -> None:
        env = env_for_tests()
        env["PYTHONIOENCODING"] = "utf-8"
        self.proc = subprocess.Popen(
            client_command(*args, "--json"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            cwd=ROOT,
            env=env,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self.eof = False
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put({"event": "NOT JSON", "line": line})
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def expect(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15.0) -> Any:
        """The next stdout event matching `predicate` (earlier ones are kept in `events`)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0 or self.eof:
                    raise queue.Empty
                item = self.lines.get(timeout=remaining)
            except queue.Empty:
                raise AssertionError(
                    f"no matching event (eof={self.eof}); saw {self.events[-10:]}; "
                    f"stderr {''.join(self.stderr)[-2000:]}"
                ) from None
            if item is None:
                self.eof = True
                continue
            self.events.append(item)
            assert item.get("event") != "NOT JSON", item
            if predicate(item):
                return item

    def expect_event(self, name: str, timeout: float = 15.0, **fields: Any) -> Any:
        return self.expect(
            lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items()),
            timeout,
        )

    def write(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def finish(self, timeout: float = 20.0) -> int:
        """Wait for the exit; read everything it printed; its exit status."""
        self.close_stdin()
        rc = self.proc.wait(timeout)
        for thread in self._threads:
            thread.join(5.0)
        while True:
            try:
                item = self.lines.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.eof = True
            else:
                self.events.append(item)
        return rc

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.close_stdin()
        except BrokenPipeError:
            pass
        self.proc.wait(5.0)
        for thread in self._threads:
            thread.join(5.0)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def terminals() -> Any:
    """Start terminal clients with `start(*args)`; all are cleaned up at the end."""
    started: list[JsonClient] = []

    def start(*args: str) -> JsonClient:
        client = JsonClient(*args)
        started.append(client)
        return client

    yield start
    for client in started:
        client.cleanup()


# --- the user's flow -----------------------------------------------------------------


def test_terminal_flow_end_to_end(server_process: ServerProcess, terminals: Any) -> None:
    addr = server_process.addr_text
    alice = terminals("--server", addr, "--user", "alice", "--connect-to", "bob")
    bob = terminals("--server", addr, "--user", "bob")
    alice.expect_event("logged_in", user="alice")
    bob.expect_event("logged_in", user="bob")

    # alice -> bob (bob has never written to anyone: connect-to names the peer)
    alice.write("hello bob, ça va? 👋")
    sending = alice.expect_event("status", state="sending")
    assert sending["to"] == "bob" and sending["text"] == "hello bob, ça va? 👋"
    first_id = sending["id"]
    got = bob.expect_event("message")
    assert (got["from"], got["text"]) == ("alice", "hello bob, ça va? 👋")
    alice.expect_event("status", id=first_id, state="delivered")

    # bob's reply goes to whoever wrote last: alice
    bob.write("hi alice")
    reply = bob.expect_event("status", state="sending")
    assert (reply["to"], reply["text"]) == ("alice", "hi alice")
    got = alice.expect_event("message")
    assert (got["from"], got["text"]) == ("bob", "hi alice")
    bob.expect_event("status", id=reply["id"], state="delivered")

    # a few more both ways, interleaved
    for i in range(3):
        alice.write(f"a{i}")
        assert bob.expect_event("message", text=f"a{i}")["from"] == "alice"
        bob.write(f"b{i}")
        assert alice.expect_event("message", text=f"b{i}")["from"] == "bob"

    # end of input: wait for accepts, log out, exit 0 with the last line disconnected
    assert alice.finish() == 0, alice.stderr
    assert alice.events[-1] == {"event": "disconnected", "reason": "logged_out"}
    assert bob.finish() == 0, bob.stderr
    assert bob.events[-1] == {"event": "disconnected", "reason": "logged_out"}

    # every message alice sent went sending -> accepted -> delivered, once each
    states: dict[str, list[str]] = defaultdict(list)
    for event in alice.events:
        if event["event"] == "status":
            states[event["id"]].append(event["state"])
    assert len(states) == 4
    for message_id, seen in states.items():
        assert seen == ["sending", "accepted", "delivered"], (message_id, seen)
    assert not [e for e in alice.events + bob.events if e["event"] == "error"]


# --- many users -----------------------------------------------------------------------


def test_hundred_clients_exchange_in_pairs(server: RunningServer) -> None:
    names = [f"user{i:03d}" for i in range(100)]
    clients = logged_in(server, *names)
    try:
        assert server.relay.online_count() == 100
        per_pair = 5
        for i in range(0, 100, 2):
            a, b = clients[i], clients[i + 1]
            for n in range(per_pair):
                assert a.session.send(f"{a.name}->{b.name} #{n}", to=b.name)
                assert b.session.send(f"{b.name}->{a.name} #{n}", to=a.name)
        wait_all(
            clients,
            lambda: all(len(c.received) >= per_pair for c in clients),
            60.0,
            "every message to arrive",
        )
        for i, client in enumerate(clients):
            partner = clients[i ^ 1]
            got = [(m.sender, m.text) for m in client.received]
            want = [(partner.name, f"{partner.name}->{client.name} #{n}") for n in range(per_pair)]
            assert got == want, client.name
        wait_all(
            clients,
            lambda: all(
                len(c.states) == per_pair and all(s[-1] == "delivered" for s in c.states.values())
                for c in clients
            ),
            60.0,
            "every message delivered",
        )
        assert not [e for c in clients for e in c.errors]
    finally:
        close_all(clients)


# --- refused logins and sends ----------------------------------------------------------


def test_name_in_use_is_refused_and_first_session_carries_on(
    server: RunningServer, terminals: Any
) -> None:
    alice, bob = logged_in(server, "alice", "bob")
    try:
        # in process, differently cased
        second = Client("ALICE")
        assert second.login(server.address)
        second.wait(lambda: second.disconnected is not None, 10.0, "refusal")
        assert second.errors and second.errors[0].code == "name_taken"
        assert second.errors[0].fatal
        assert second.disconnected == "name_taken"
        assert not second.logged_in
        dispose(second.session)

        # terminal clients: fatal, JSON error, exit 2
        for name in ("alice", "ALICE", "Alice"):
            proc = terminals("--server", f"127.0.0.1:{server.address[1]}", "--user", name)
            error = proc.expect_event("error")
            assert error["code"] == "name_taken" and error["message"]
            assert proc.finish() == 2
            assert proc.events[-1] == {"event": "disconnected", "reason": "name_taken"}

        # the first session still works, both ways
        assert session_names(server) == {"alice", "bob"}
        msg = alice.session.send("still here", to="bob")
        assert msg is not None
        bob.wait(lambda: [m.text for m in bob.received] == ["still here"], 10.0, "message")
        assert bob.received[0].sender == "alice"
        alice.wait(lambda: alice.states[msg][-1:] == ["delivered"], 10.0, "delivered")
        assert bob.session.send("yes you are") is not None  # to whoever wrote last
        alice.wait(lambda: len(alice.received) == 1, 10.0, "reply")
        assert (alice.received[0].sender, alice.received[0].text) == ("bob", "yes you are")
    finally:
        close_all([alice, bob])


def test_message_to_unknown_user_fails(server: RunningServer) -> None:
    (alice,) = logged_in(server, "alice")
    try:
        msg = alice.session.send("anyone?", to="nobody")
        assert msg is not None
        alice.wait(lambda: alice.states[msg][-1:] == ["failed"], 10.0, "failed")
        assert alice.states[msg] == ["sending", "failed"]
        assert alice.reasons[msg] == "no_such_user"
        alice.wait(lambda: bool(alice.errors), 5.0, "error event")
        assert alice.errors[0].code == "no_such_user" and not alice.errors[0].fatal
        # the session is fine afterwards
        alice.session.who()
        alice.wait(lambda: bool(alice.who_lists), 10.0, "who")
        assert alice.who_lists[0].users == ("alice",)
        assert alice.disconnected is None
    finally:
        alice.close()


@pytest.mark.parametrize("name", ["bad name", "x" * 33, "admin", "semi;colon", "tab\there"])
def test_invalid_name_terminal_exits_2(server: RunningServer, terminals: Any, name: str) -> None:
    proc = terminals("--server", f"127.0.0.1:{server.address[1]}", "--user", name)
    error = proc.expect_event("error")
    assert error["code"] == "invalid_name" and error["message"]
    assert proc.finish() == 2
    assert proc.events[-1] == {"event": "disconnected", "reason": "invalid_name"}
    assert server.relay.online_count() == 0


def test_server_refuses_invalid_name(server: RunningServer) -> None:
    """A client that skips the local check still gets invalid_name from the server."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5.0)
        for name in ("bad name", "ADMIN", "", "x" * 40, "a\u202eb"):
            nonce = secrets.token_bytes(16)
            login = Login(name, 7, nonce)
            request = encode_packet(
                Packet(NO_SESSION, 0, (login,)), None, pad_to=MIN_PREAUTH_REQUEST
            )
            sock.sendto(request, server.address)
            reply, _ = sock.recvfrom(65535)
            assert len(reply) <= len(request)
            (frame,) = decode_packet(reply).frames
            assert isinstance(frame, Refused), name
            assert frame.code == ErrorCode.INVALID_NAME and frame.nonce == nonce
    assert server.relay.online_count() == 0


def test_server_unreachable(terminals: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # nothing listens on `port` any more
    proc = terminals("--server", f"127.0.0.1:{port}", "--user", "alice", "--login-timeout", "1")
    error = proc.expect_event("error", timeout=20.0)
    assert error["code"] == "server_unreachable" and error["message"]
    assert proc.finish() == 2
    assert proc.events[-1] == {"event": "disconnected", "reason": "server_unreachable"}


# --- hostile datagrams -----------------------------------------------------------------


def _valid_datagrams(rnd: random.Random) -> list[bytes]:
    """Well-formed datagrams of every kind the server parses, to be mutated."""
    names = ["alice", "bob", "Zoë", "x" * 32, "bad name", "admin", "", "ALICE", "名字"]
    out: list[bytes] = []
    for name in names:
        login = Login(name, rnd.getrandbits(64), rnd.randbytes(16))
        packet = Packet(NO_SESSION, 0, (login,))
        out.append(encode_packet(packet, None, pad_to=MIN_PREAUTH_REQUEST))
        out.append(encode_packet(packet, None))  # unpadded
    key = rnd.randbytes(32)
    sid = rnd.randbytes(16)
    messages: list[Message] = [
        Send(MsgId(1, 1), "bob", "hello"),
        Receipt(3),
        Who(),
        Who("m", 500),
    ]
    frames: list[Any] = [
        Ping(),
        Ack(5, 100, 3, ((4, 6), (8, 9))),
    ]
    frames += [
        Stream(i, conversation_stream("bob"), i, 0, 1, encode_message(m))
        for i, m in enumerate(messages)
    ]
    frames.append(Stream(9, 1, 0, 0, 3, b"fragment"))
    for frame in frames:
        out.append(encode_packet(Packet(sid, rnd.randrange(1, 1000), (frame,)), key))
        out.append(encode_packet(Packet(sid, 1, (frame, Ping())), None))  # no MAC
    return out


def _mutate(data: bytes, rnd: random.Random) -> bytes:
    buf = bytearray(data)
    choice = rnd.randrange(9)
    if choice == 0:  # flip bits
        for _ in range(rnd.randint(1, 8)):
            if buf:
                bit = rnd.randrange(len(buf) * 8)
                buf[bit // 8] ^= 1 << (bit % 8)
    elif choice == 1:  # truncate
        del buf[rnd.randrange(len(buf) + 1) :]
    elif choice == 2:  # extend
        buf += rnd.randbytes(rnd.randint(1, 1500))
    elif choice == 3:  # another version
        if len(buf) > 4:
            buf[4] = rnd.choice([0, 2, 3, 255])
    elif choice == 4:  # random bytes over the frames
        start = min(len(buf), 30)
        for _ in range(rnd.randint(1, 20)):
            if len(buf) > start:
                buf[rnd.randrange(start, len(buf))] = rnd.randrange(256)
    elif choice == 5:  # a frame length that lies
        if len(buf) >= 33:
            buf[31:33] = rnd.randrange(65536).to_bytes(2, "big")
    elif choice == 6:  # unknown flags or frame type
        if len(buf) > 30:
            buf[rnd.choice([5, 30])] = rnd.randrange(256)
    elif choice == 7:  # a random session id
        if len(buf) >= 22:
            buf[6:22] = rnd.randbytes(16)
    # choice 8: unchanged
    return bytes(buf)


def _random_datagram(rnd: random.Random, valid: list[bytes]) -> bytes:
    kind = rnd.random()
    if kind < 0.55:
        return _mutate(rnd.choice(valid), rnd)
    if kind < 0.75:  # our magic, then noise
        return (
            MAGIC
            + bytes([rnd.choice([VERSION, VERSION, 0, 9])])
            + rnd.randbytes(rnd.randint(0, 1300))
        )
    if kind < 0.98:
        return rnd.randbytes(rnd.choice([0, 1, 4, 5, 29, 30, 31, rnd.randint(0, 1400)]))
    return rnd.randbytes(rnd.randint(1201, 9000))  # oversized


def _probe(index: int) -> bytes:
    """A datagram naming a session that does not exist: the server answers it
    with an UNKNOWN_SESSION hint that echoes the id. Sent after each fuzz
    datagram, its answer marks where the replies to that datagram end (one
    server thread, one socket, loopback: replies come back in order)."""
    return encode_packet(Packet(b"PROBE" + index.to_bytes(11, "big"), 0, (Ping(),)), None)


def _check_reply(reply: bytes) -> None:
    """A reply to an address without a session is one short pre-login frame."""
    frames = decode_packet(reply).frames
    assert len(frames) == 1, frames
    assert isinstance(frames[0], (VersionFrame, UnknownSession, Welcome, Refused)), frames


def test_random_datagrams_do_not_hurt(server: RunningServer) -> None:
    rnd = random.Random(20240611)
    valid = _valid_datagrams(rnd)
    relay = server.relay
    stats_before = dict(relay.stats)
    total = 10_000
    batch = 20
    requests: list[bytes] = []
    replies: list[list[bytes]] = []  # replies[i]: what came back for requests[i]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5.0)
        for first in range(0, total, batch):
            indexes = range(first, min(total, first + batch))
            for index in indexes:
                data = _random_datagram(rnd, valid)
                requests.append(data)
                replies.append([])
                try:
                    sock.sendto(data, server.address)
                except OSError:  # more than a UDP datagram can hold, say
                    requests[-1] = b""
                sock.sendto(_probe(index), server.address)
            # read this batch's replies: each fuzz datagram's end at its probe's answer
            for index in indexes:
                while True:
                    try:
                        reply, _ = sock.recvfrom(65535)
                    except TimeoutError:
                        raise AssertionError(f"no answer to probe {index}") from None
                    if reply[6:22] == _probe(index)[6:22] and len(reply) <= 40:
                        break
                    replies[index].append(reply)

    assert server.thread.is_alive(), "the server loop died"
    bytes_in = relay.stats["bytes_in"] - stats_before.get("bytes_in", 0)
    bytes_out = relay.stats["bytes_out"] - stats_before.get("bytes_out", 0)
    fuzz_in = sum(map(len, requests))
    fuzz_out = sum(len(r) for rs in replies for r in rs)
    answered = sum(1 for rs in replies if rs)
    print(
        f"\nfuzz: {total} datagrams ({fuzz_in} B) got {answered} replies ({fuzz_out} B); "
        f"with the probes the server took {bytes_in} B and sent {bytes_out} B; "
        f"{len(relay.drops.counts)} distinct drop reasons, {relay.stats['logins']} logins"
    )
    # never more back than in, in total and for each datagram
    assert bytes_out <= bytes_in
    assert fuzz_out <= fuzz_in
    for request, answers in zip(requests, replies, strict=True):
        assert len(answers) <= 1, (request, answers)
        for reply in answers:
            _check_reply(reply)
            assert len(reply) <= len(request), (reply, request)

    # and it still serves an honest client
    honest, peer = logged_in(server, "honest", "peer")
    try:
        msg = honest.session.send("after the storm", to="peer")
        assert msg is not None
        peer.wait(lambda: len(peer.received) == 1, 10.0, "message")
        assert (peer.received[0].sender, peer.received[0].text) == ("honest", "after the storm")
        honest.wait(lambda: honest.states[msg][-1:] == ["delivered"], 10.0, "delivered")
    finally:
        close_all([honest, peer])


# --- expiry ------------------------------------------------------------------------------


def test_silent_session_expires() -> None:
    config = ServerConfig(session_timeout=1.0, rto_min=RTO_MIN, rto_max=RTO_MAX)
    running = start_server(config)
    clients: list[Client] = []
    try:
        alice, bob = clients = logged_in(running, "alice", "bob")
        msg = alice.session.send("are you there?", to="bob")
        assert msg is not None
        bob.wait(lambda: len(bob.received) == 1, 10.0, "message")
        alice.wait(lambda: alice.states[msg][-1:] == ["delivered"], 10.0, "delivered")
        bob.session.abort()  # as if the process died: no logout
        aborted = time.monotonic()
        assert "bob" in session_names(running)
        # alice keeps talking (her keepalive is 15 s and more); bob says nothing
        deadline = aborted + 10.0
        while "bob" in session_names(running):
            assert time.monotonic() < deadline, "bob's session never expired"
            alice.session.who()
            alice.pump(0.2)
        gone_after = time.monotonic() - aborted
        print(f"\nbob's session expired {gone_after:.2f} s after he went silent")
        assert gone_after < 5.0
        alice.wait(
            lambda: any(p.user == "bob" and not p.online for p in alice.presence),
            5.0,
            "bob offline",
        )
        assert "alice" in session_names(running)
        assert running.relay.online_count() == 1
    finally:
        close_all(clients)
        stop_server(running)


# --- who ---------------------------------------------------------------------------------


def test_who_lists_everyone_across_pages(server: RunningServer) -> None:
    names = [f"w{i:02d}" for i in range(63)]  # more than a page (50)
    clients = logged_in(server, *names)
    try:
        asker = clients[17]
        asker.session.who()
        asker.wait(lambda: bool(asker.who_lists), 10.0, "who")
        users = asker.who_lists[0].users
        assert sorted(users) == sorted(names)
        assert len(users) == len(set(users)) == 63
    finally:
        close_all(clients)


# --- shutdown ----------------------------------------------------------------------------


def test_sigterm_tells_clients(server_process: ServerProcess, terminals: Any) -> None:
    addr = server_process.addr_text
    alice = terminals("--server", addr, "--user", "alice", "--connect-to", "bob")
    bob = terminals("--server", addr, "--user", "bob")
    alice.expect_event("logged_in")
    bob.expect_event("logged_in")
    alice.write("before the end")
    bob.expect_event("message", text="before the end")
    server_process.proc.send_signal(signal.SIGTERM)
    for client in (alice, bob):
        error = client.expect_event("error", code="server_shutdown")
        assert error["message"]
    assert server_process.proc.wait(10.0) == 0
    # the clients are not dead: they wait for a server to come back
    assert alice.proc.poll() is None and bob.proc.poll() is None


# --- the session's own resources -----------------------------------------------------------


def test_closed_session_leaves_no_open_socket(server: RunningServer) -> None:
    """A session that has logged out (or never got going) must not leave
    sockets for the garbage collector: in a long-running GUI every login
    would leak descriptors, and under `-W error` the leak is an error."""

    def leaks(run: Callable[[ChatSession], None]) -> list[str]:
        session = make_session()
        run(session)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            del session
            gc.collect()
        return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]

    def logged_out(session: ChatSession) -> None:
        assert session.login(server.address, "leaky")
        deadline = time.monotonic() + 10.0
        while not isinstance(session.events.get(timeout=10.0), LoggedIn):
            assert time.monotonic() < deadline
        session.close(5.0)
        assert not session.running

    def refused_name(session: ChatSession) -> None:
        assert not session.login(server.address, "bad name")

    found = {"logged out": leaks(logged_out), "invalid name": leaks(refused_name)}
    assert found == {"logged out": [], "invalid name": []}


def test_flood_of_malformed_datagrams_is_logged_at_a_rate_limit(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """DESIGN.md: bad input "is counted and logged at a rate limit". A flood
    of junk must not become a flood of log lines, whatever the junk says."""
    caplog.set_level(logging.INFO, logger="chat_server")
    relay = server.relay
    before = relay.stats["datagrams_in"]
    rnd = random.Random(5)
    junk = [rnd.randbytes(size) for size in range(1201, 1401)]  # oversized, all different
    junk += [MAGIC + bytes([v]) + bytes(40) for v in range(2, 102)]  # 100 unknown versions
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for index, data in enumerate(junk):
            sock.sendto(data, server.address)
            if index % 20 == 19:  # pace, so that the kernel drops none
                want = before + index + 1
                wait_until(lambda: relay.stats["datagrams_in"] >= want, 5.0, "the junk")  # noqa: B023
    wait_until(lambda: relay.stats["datagrams_in"] >= before + len(junk), 5.0, "the junk")
    lines = [r for r in caplog.records if r.name == "chat_server" and "dropped" in r.getMessage()]
    print(f"\n{len(junk)} junk datagrams in about a second gave {len(lines)} log lines")
    assert sum(relay.drops.counts.values()) >= len(junk)  # all counted
    assert len(lines) <= 20, [r.getMessage() for r in lines[:5]]


def test_logout_is_acknowledged_before_the_session_ends(server: RunningServer) -> None:
    """A logout on a perfect link completes at once: the server acks the
    LOGOUT before it forgets the session, so the client neither waits out
    its fallback (LOGOUT_ACK_WAIT, 2 s) nor resends LOGOUT to a session the
    server no longer has."""
    (alice,) = logged_in(server, "alice")
    time.sleep(0.2)
    unknown_before = server.relay.drops.counts["unknown session"]
    started = time.monotonic()
    alice.session.close(5.0)
    took = time.monotonic() - started
    alice.pump()
    time.sleep(0.3)
    dispose(alice.session)
    assert alice.disconnected == "logged_out"
    assert "alice" not in session_names(server)
    resent = server.relay.drops.counts["unknown session"] - unknown_before
    print(f"\nlogout took {took:.2f} s; {resent} datagrams came after the session ended")
    assert resent == 0, "the client resent its LOGOUT: the server never acked it"
    assert took < 1.5


def test_client_logs_in_again_when_the_server_forgot_it(server: RunningServer) -> None:
    """A server that restarted answers a session it does not know with
    UNKNOWN_SESSION; the client must log in again at once and resend what
    the server has not accepted (not wait 30 s for the link to time out)."""
    second = start_server()
    alice = Client("alice")
    try:
        with LossyProxy(server.address, seed=3) as proxy:
            assert alice.login(proxy.address)
            alice.wait(lambda: alice.logged_in, 10.0, "login")
            proxy.retarget(second.address)  # the "restarted" server
            started = time.monotonic()
            msg = alice.session.send("note to self", to="alice")
            assert msg is not None
            deadline = started + 10.0
            while "alice" not in session_names(second):
                assert time.monotonic() < deadline, (
                    f"no new login 10 s after UNKNOWN_SESSION; the new server dropped "
                    f"{dict(second.relay.drops.counts)}"
                )
                alice.pump(0.1)
            print(f"\nlogged in again {time.monotonic() - started:.2f} s after the restart")
            alice.wait(lambda: alice.states[msg][-1:] == ["delivered"], 10.0, "delivered")
            assert [(m.sender, m.text) for m in alice.received] == [("alice", "note to self")]
            alice.close()
    finally:
        dispose(alice.session)
        stop_server(second)
