"""The relay core, over real UDP sockets on 127.0.0.1: the user's flow through
the terminal client, many users at once, wrong passwords and take-overs,
the SCRAM login done by hand, refused sends, messages waiting for offline
users, an unreachable server, hostile datagrams, expiry, paged /who,
shutdown, and the command line's data directory lock and password sources."""

from __future__ import annotations

import collections
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
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import client_core
from chat_client import (
    ChatSession,
    Disconnected,
    LoggedIn,
)
from client_core import ClientError
from protocol import (
    FLAG_MAC,
    HEADER,
    HELLO_SIZE,
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
    ProtocolError,
    Receipt,
    Receipts,
    Refused,
    Send,
    Stream,
    UnknownSession,
    VersionFrame,
    Welcome,
    Who,
    conversation_stream,
    decode_packet,
    encode_message,
    encode_packet,
)
from tests.clients import RawClient, RecordingClient, close_all, wait_all, wait_until
from tests.conftest import (
    PASSWORD,
    ROOT,
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


class Client(RecordingClient):
    """A `ChatSession` plus everything it reported, sorted for the checks."""

    wait_poll = 0.2


def logged_in(server: RunningServer, *names: str, **kwargs: Any) -> list[Client]:
    clients = [Client(name, **kwargs) for name in names]
    for client in clients:
        assert client.login(server.address)
    wait_all(clients, lambda: all(c.logged_in for c in clients), 30.0, "logins")
    return clients


def session_names(server: RunningServer) -> set[str]:
    # list() copies the dict in one step under the GIL; the server thread owns it.
    return {s.user.name for s in list(server.relay.sessions.values())}


# --- helpers: terminal clients as processes -----------------------------------------


class JsonClient:
    """`chat-client --no-gui --json` as a real process, driven line by line."""

    def __init__(self, *args: str, env: dict[str, str | None] | None = None) -> None:
        """`env` changes the inherited environment (None removes a variable)."""
        full_env = env_for_tests()
        full_env["PYTHONIOENCODING"] = "utf-8"
        for name, value in (env or {}).items():
            if value is None:
                full_env.pop(name, None)
            else:
                full_env[name] = value
        self.proc = subprocess.Popen(
            client_command(*args, "--json"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            cwd=ROOT,
            env=full_env,
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
    """Start terminal clients with `start(*args, env=...)`; all are cleaned up at the end."""
    started: list[JsonClient] = []

    def start(*args: str, env: dict[str, str | None] | None = None) -> JsonClient:
        client = JsonClient(*args, env=env)
        started.append(client)
        return client

    yield start
    for client in started:
        client.cleanup()


# --- the user's flow -----------------------------------------------------------------


def key_workers_of(pid: int) -> list[int]:
    """The pids of the key-exchange workers (`server_keyx.py`) among the
    children of process `pid`."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue  # gone meanwhile
            if any(part.endswith(b"server_keyx.py") for part in command):
                found.append(int(child))
    return found


def test_terminal_flow_end_to_end(tmp_path: Path, terminals: Any) -> None:
    """The user's flow between two terminal clients and a real server
    process at its default `--key-workers` (the suite's other server
    processes run without workers): the two registrations went through the
    key-exchange workers, child processes of the server."""
    server_process = spawn_server(data_dir=tmp_path / "server-data", key_workers=None)
    try:
        terminal_flow(server_process, terminals)
    finally:
        stop_process(server_process)


def terminal_flow(server_process: ServerProcess, terminals: Any) -> None:
    addr = server_process.addr_text
    alice = terminals("--server", addr, "--user", "alice", "--connect-to", "bob")
    bob = terminals("--server", addr, "--user", "bob")
    alice.expect_event("logged_in", user="alice")
    bob.expect_event("logged_in", user="bob")
    assert key_workers_of(server_process.proc.pid), "no key-exchange worker started"

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


def test_hundred_clients_exchange_in_pairs_and_who_lists_them_across_pages(
    server: RunningServer,
) -> None:
    """100 sessions at once: each pair's messages reach the partner, in
    order, and end delivered; WHO lists all 100, over two pages (50 a page).
    (The WHO check had 63 logins of its own before: the same flow twice.)"""
    names = [f"user{i:03d}" for i in range(100)]
    clients = logged_in(server, *names)
    try:
        assert server.relay.online_count() == 100
        asker = clients[17]
        asker.session.who()
        asker.wait(lambda: bool(asker.who_lists), 10.0, "who")
        users = asker.who_lists[0].users
        assert sorted(users) == sorted(names)
        assert len(users) == len(set(users)) == 100
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


def session_of(server: RunningServer, name: str) -> bytes | None:
    """The id of `name`'s live session on the server, if any."""
    for session in list(server.relay.sessions.values()):
        if session.user.name == name:
            return session.session_id
    return None


def test_wrong_password_is_refused_and_first_session_carries_on(
    server: RunningServer, terminals: Any
) -> None:
    """A login with a name in use and the wrong password gets `bad_password`
    (fatal, exit 2 for a terminal client) and never touches the live session."""
    alice, bob = logged_in(server, "alice", "bob")
    second = Client("ALICE")
    try:
        live = session_of(server, "alice")
        assert live is not None
        # in process, differently cased
        assert second.login(server.address, password="not alice's password")
        second.wait(lambda: second.disconnected is not None, 10.0, "refusal")
        assert [(e.code, e.fatal) for e in second.errors] == [("bad_password", True)]
        assert second.errors[0].message
        assert second.disconnected == "bad_password"
        assert not second.logged_in
        wait_until(lambda: not second.session.running, 5.0, "the refused session to end")

        # terminal clients: fatal, JSON error, exit 2 (3 more failures: under the 5 in 30 s)
        for name in ("alice", "ALICE", "Alice"):
            proc = terminals(
                "--server", f"127.0.0.1:{server.address[1]}", "--user", name,
                env={"CHAT_PASSWORD": "guess " + name},
            )  # fmt: skip
            error = proc.expect_event("error")
            assert error["code"] == "bad_password" and error["message"]
            assert proc.finish() == 2
            assert proc.events[-1] == {"event": "disconnected", "reason": "bad_password"}
            assert not [e for e in proc.events if e["event"] == "logged_in"]

        # the first session is the same one and still works, both ways
        assert session_names(server) == {"alice", "bob"}
        assert session_of(server, "alice") == live
        assert server.relay.stats["login_failures"] == 4
        alice.pump()
        assert not alice.errors and alice.disconnected is None
        msg = alice.session.send("still here", to="bob")
        assert msg is not None
        bob.wait(lambda: [m.text for m in bob.received] == ["still here"], 10.0, "message")
        assert bob.received[0].sender == "alice"
        alice.wait(lambda: alice.states[msg][-1:] == ["delivered"], 10.0, "delivered")
        assert bob.session.send("yes you are") is not None  # to whoever wrote last
        alice.wait(lambda: len(alice.received) == 1, 10.0, "reply")
        assert (alice.received[0].sender, alice.received[0].text) == ("bob", "yes you are")
    finally:
        close_all([alice, bob, second])


def test_right_password_elsewhere_takes_over(server: RunningServer, terminals: Any) -> None:
    """A login with the right password from another client instance takes
    the name over: the old session hears `logged_in_elsewhere` (fatal; a
    terminal client exits 2) and what follows goes to the new one."""
    first, bob = logged_in(server, "alice", "bob")
    successor = Client("alice")
    try:
        # a terminal client (another process, another instance) takes over
        term = terminals("--server", f"127.0.0.1:{server.address[1]}", "--user", "Alice")
        term.expect_event("logged_in", user="alice")
        first.wait(lambda: first.disconnected is not None, 10.0, "the old session to end")
        assert first.disconnected == "logged_in_elsewhere"
        assert [(e.code, e.fatal) for e in first.errors] == [("logged_in_elsewhere", True)]
        wait_until(lambda: not first.session.running, 5.0, "the old session's thread to end")
        assert session_names(server) == {"alice", "bob"}
        assert server.relay.online_count() == 2

        # messages to alice now reach the terminal, and its replies get through
        question = bob.session.send("which alice are you?", to="alice")
        assert question is not None
        got = term.expect_event("message", text="which alice are you?")
        assert got["from"] == "bob"
        bob.wait(lambda: bob.states[question][-1:] == ["delivered"], 10.0, "delivered")
        term.write("the terminal one")
        bob.wait(lambda: [m.text for m in bob.received] == ["the terminal one"], 10.0, "reply")
        assert not first.received

        # and an in-process client takes it back: the terminal exits 2
        assert successor.login(server.address)
        successor.wait(lambda: successor.logged_in, 10.0, "the successor's login")
        error = term.expect_event("error", code="logged_in_elsewhere")
        assert error["message"]
        assert term.finish() == 2
        assert term.events[-1] == {"event": "disconnected", "reason": "logged_in_elsewhere"}
        assert session_names(server) == {"alice", "bob"}
        assert not successor.errors and successor.disconnected is None
        assert bob.session.send("and now?", to="alice") is not None
        successor.wait(lambda: [m.text for m in successor.received] == ["and now?"], 10.0, "msg")
        assert server.relay.stats["login_failures"] == 0
    finally:
        close_all([first, bob, successor])


def test_message_to_unknown_user_waits(server: RunningServer) -> None:
    """Issue 16: no longer `failed`: it waits in the outbox (still
    `sending`) for the account, with one non-fatal `no_such_user`
    (tests/test_waiting_outbox.py has the rest)."""
    (alice,) = logged_in(server, "alice")
    try:
        msg = alice.session.send("anyone?", to="nobody")
        assert msg is not None
        alice.wait(lambda: bool(alice.errors), 10.0, "error event")
        assert alice.errors[0].code == "no_such_user" and not alice.errors[0].fatal
        assert alice.states[msg] == ["sending"]
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


# --- the login exchange by hand ----------------------------------------------------------


def test_server_refuses_invalid_name(server: RunningServer) -> None:
    """A client that skips the local check still gets invalid_name from the
    server, at its HELLO, in a reply no larger than the request."""
    with RawClient(server.address) as raw:
        for name in ("bad name", "ADMIN", "", "x" * 40, "a\u202eb", "semi;colon"):
            nonce = secrets.token_bytes(16)
            frame = raw.hello(name, 7, nonce)
            assert isinstance(frame, Refused), (name, frame)
            assert frame.code == ErrorCode.INVALID_NAME and frame.nonce == nonce
            assert frame.message
        assert all(reply <= request for request, reply in raw.exchanges), raw.exchanges
    assert server.relay.online_count() == 0
    assert not server.relay.users
    assert server.relay.stats["password_checks"] == 0


def test_login_by_hand_with_scram(server: RunningServer) -> None:
    """The whole exchange with protocol.py's SCRAM helpers: the first login
    registers the name, the server proves it knows the account, both ends
    derive the same session key; a wrong password, a replay and a cookie
    used from another address get nowhere, and the live session is untouched."""
    with RawClient(server.address) as raw, RawClient(server.address) as other:
        result = raw.login("Rawuser", PASSWORD, instance_id=11)
        welcome = result.answer
        assert isinstance(welcome, Welcome), welcome
        assert result.challenge is not None
        assert result.challenge.iterations == TEST_ITERATIONS
        assert welcome.username == "Rawuser"
        # The client's core checked the server's signature (it refuses a
        # WELCOME that does not prove the account) and derived the keys.
        assert result.core.login_phase == "online", list(iter(result.core.next_event, None))
        assert session_of(server, "Rawuser") == welcome.session_id

        # a datagram tagged with the derived client->server key is taken, and
        # acked under the server->client key
        conn = result.conn
        assert conn is not None and conn.session_id == welcome.session_id
        assert conn.key != conn.peer_key
        conn.send_ping()
        now = time.monotonic()
        for datagram in conn.datagrams_to_send(now):
            raw.sock.sendto(datagram, server.address)
        reply, _ = raw.sock.recvfrom(65535)
        assert conn.receive_datagram(reply, time.monotonic()), "the ack does not verify"

        # the same name and the wrong password: refused, session untouched
        wrong = other.login("rawuser", "not the password", instance_id=12)
        assert isinstance(wrong.answer, Refused)
        assert wrong.answer.code == ErrorCode.BAD_PASSWORD
        # an unpadded HELLO gets nothing; a replayed LOGIN the same answer, no new session
        other.send_frame(Hello("rawuser", 12, secrets.token_bytes(16)), pad=False)
        assert other.silence(0.5)
        # nor does one padded only to MIN_PREAUTH_REQUEST: its CHALLENGE (with
        # the server's 256-byte DH key) would be larger than the request
        short_hello = Packet(NO_SESSION, 0, (Hello("rawuser", 12, secrets.token_bytes(16)),))
        other.sock.sendto(
            encode_packet(short_hello, None, pad_to=MIN_PREAUTH_REQUEST), server.address
        )
        assert other.silence(0.5)
        assert server.relay.drops.counts["reply would be larger than the request"] == 1
        logins = server.relay.stats["logins"]
        # the LOGIN replayed from another address: its cookie names raw's, so
        # nothing; from raw's own address: the answer it got, nothing new
        other.sock.sendto(result.request, server.address)
        assert other.silence(0.5), "a LOGIN replayed from another address was answered"
        raw.sock.sendto(result.request, server.address)
        while (replayed := raw.sock.recvfrom(65535)[0])[5] & FLAG_MAC:
            pass  # the session's own datagrams (its login ticket, resent)
        assert decode_packet(replayed).frames == (welcome,)
        # a cookie is only good at the address it was sent to
        request = raw.prepare("rawuser", PASSWORD, instance_id=13).request
        other.sock.sendto(request, server.address)
        assert other.silence(1.0), "a LOGIN with another address's cookie was answered"
        assert server.relay.stats["logins"] == logins
        assert session_of(server, "Rawuser") == welcome.session_id
        print(
            f"\nraw login: request/reply sizes {raw.exchanges + other.exchanges}; "
            f"drops {dict(server.relay.drops.counts)}"
        )
        assert server.relay.drops.counts["login with a stale or forged cookie"] == 2
        assert all(reply <= req for req, reply in raw.exchanges + other.exchanges)


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


#: The fuzzing client's instance id (its logins replace each other quietly).
FUZZ_INSTANCE = 0xF0F0


def _valid_datagrams(rnd: random.Random, raw: RawClient) -> list[bytes]:
    """Well-formed datagrams of every kind the server parses, to be mutated:
    HELLOs for good and bad names, LOGINs that answer real CHALLENGEs (sent
    to the fuzzing socket, so their cookies are good there) for accounts
    registered first, and datagrams for sessions that do or do not exist."""
    names = ["alice", "bob", "Zoë", "x" * 32, "bad name", "admin", "", "ALICE", "名字"]
    out: list[bytes] = []
    sessions: list[bytes] = []
    for name in names:
        hello = Hello(name, rnd.getrandbits(64), rnd.randbytes(16))
        packet = Packet(NO_SESSION, 0, (hello,))
        out.append(encode_packet(packet, None, pad_to=HELLO_SIZE))
        out.append(encode_packet(packet, None, pad_to=MIN_PREAUTH_REQUEST))  # too short now
        out.append(encode_packet(packet, None))  # unpadded
        try:
            # registers the name (its WELCOME waits for the disk, so not in the fuzz)
            registered = raw.login(name, PASSWORD, FUZZ_INSTANCE)
        except ClientError:  # a name the client (and the server, at HELLO) refuses
            login = Login(name, FUZZ_INSTANCE, rnd.randbytes(16), rnd.randbytes(16),
                          rnd.randbytes(32), rnd.randbytes(256), rnd.randbytes(64))  # fmt: skip
            out.append(encode_packet(Packet(NO_SESSION, 0, (login,)), None, pad_to=256))
            continue
        assert isinstance(registered.answer, Welcome), (name, registered.answer)
        sessions.append(registered.answer.session_id)
        out.append(registered.request)  # answered from the reply cache
        # never sent: a fresh login (the account exists: synchronous)
        out.append(raw.prepare(name, PASSWORD, FUZZ_INSTANCE).request)
    key = rnd.randbytes(32)
    messages: list[Message] = [
        Send(MsgId(1, 1), "bob", "hello"),
        Receipt(3),
        Receipts((3, 4, 5)),
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
        for sid in (rnd.randbytes(16), rnd.choice(sessions)):  # unknown; real with a wrong key
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
    if choice != 8 and len(buf) > HEADER.size + 4 and rnd.random() < 0.5:
        # a checksum that matches, so the frames behind it get parsed
        buf[-4:] = zlib.crc32(buf[:-4]).to_bytes(4, "big")
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
    allowed = (VersionFrame, UnknownSession, Challenge, Welcome, Refused)
    assert isinstance(frames[0], allowed), frames


def _kind(reply: bytes) -> str:
    try:
        return type(decode_packet(reply).frames[0]).__name__
    except ProtocolError:
        return "undecodable"


@pytest.fixture
def fuzz_server(tmp_path: Path) -> Iterator[RunningServer]:
    """A server whose pre-login rate limits (per address and in all) let
    20,000 datagrams through quickly: the probes must all be answered (the
    limits have tests of their own)."""
    running = start_server(
        server_config(
            tmp_path / "fuzz-data",
            preauth_rate=1e6,
            preauth_burst=1e6,
            preauth_total_rate=1e6,
            preauth_total_burst=1e6,
        )
    )
    yield running
    stop_server(running)


def test_random_datagrams_do_not_hurt(fuzz_server: RunningServer) -> None:
    server = fuzz_server
    rnd = random.Random(20240611)
    relay = server.relay
    total = 10_000
    batch = 20
    requests: list[bytes] = []
    replies: list[list[bytes]] = []  # replies[i]: what came back for requests[i]
    # From 127.0.0.2: the failed logins the fuzz causes count against that
    # address, not against the honest clients on 127.0.0.1 at the end.
    with RawClient(server.address, host="127.0.0.2") as raw:
        sock = raw.sock
        valid = _valid_datagrams(rnd, raw)
        stats_before = dict(relay.stats)
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
                    if reply[5] & FLAG_MAC:
                        continue  # a session's own (its login ticket, resent), not a reply
                    replies[index].append(reply)

    assert server.thread.is_alive(), "the server loop died"
    bytes_in = relay.stats["bytes_in"] - stats_before.get("bytes_in", 0)
    bytes_out = relay.stats["bytes_out"] - stats_before.get("bytes_out", 0)
    fuzz_in = sum(map(len, requests))
    fuzz_out = sum(len(r) for rs in replies for r in rs)
    answered = sum(1 for rs in replies if rs)
    kinds = collections.Counter(_kind(r) for rs in replies for r in rs)
    print(
        f"\nfuzz: {total} datagrams ({fuzz_in} B) got {answered} replies ({fuzz_out} B): "
        f"{dict(kinds)}; with the probes the server took {bytes_in} B and sent {bytes_out} B; "
        f"drops by reason {dict(relay.drops.counts)}; "
        f"{relay.stats['logins'] - stats_before.get('logins', 0)} logins, "
        f"{relay.stats['login_failures']} failed"
    )
    # drops are counted under a few fixed reasons, whatever the datagrams said
    assert len(relay.drops.counts) <= 20, list(relay.drops.counts)
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
    running = start_server(server_config(None, session_timeout=1.0))
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
        deadline = aborted + 30.0  # bounded; how soon is a figure, printed
        while "bob" in session_names(running):
            assert time.monotonic() < deadline, "bob's session never expired"
            alice.session.who()
            alice.pump(0.2)
        gone_after = time.monotonic() - aborted
        print(f"\nbob's session expired {gone_after:.2f} s after he went silent")
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
        assert session.login(server.address, "leaky", password=PASSWORD)
        deadline = time.monotonic() + 10.0
        while not isinstance(session.events.get(timeout=10.0), LoggedIn):
            assert time.monotonic() < deadline
        session.close(5.0)
        assert not session.running

    def refused_by_server(session: ChatSession) -> None:
        assert session.login(server.address, "leaky", password="wrong")
        deadline = time.monotonic() + 10.0
        while not isinstance(session.events.get(timeout=10.0), Disconnected):
            assert time.monotonic() < deadline
        wait_until(lambda: not session.running, 5.0, "the network thread to end")

    def refused_name(session: ChatSession) -> None:
        assert not session.login(server.address, "bad name", password=PASSWORD)

    def no_password(session: ChatSession) -> None:
        assert not session.login(server.address, "leaky", password="")

    found = {
        "logged out": leaks(logged_out),
        "wrong password": leaks(refused_by_server),
        "invalid name": leaks(refused_name),
        "no password": leaks(no_password),
    }
    assert found == {"logged out": [], "wrong password": [], "invalid name": [], "no password": []}


def test_flood_of_malformed_datagrams_is_logged_at_a_rate_limit(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Bad input is counted and logged at a rate limit: a flood of junk
    must not become a flood of log lines, whatever the junk says."""
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


def test_logout_is_acknowledged_before_the_session_ends(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A logout on a perfect link completes at once: the server acks the
    LOGOUT before it forgets the session, so the client neither waits out
    its fallback (LOGOUT_ACK_WAIT, made a minute here: longer than `close`
    waits) nor resends LOGOUT to a session the server no longer has."""
    monkeypatch.setattr(client_core, "LOGOUT_ACK_WAIT", 60.0)
    (alice,) = logged_in(server, "alice")
    time.sleep(0.2)
    unknown_before = server.relay.drops.counts["unknown session"]
    started = time.monotonic()
    alice.session.close(5.0)
    took = time.monotonic() - started
    alice.pump()
    time.sleep(0.3)
    assert not alice.session.running
    assert alice.disconnected == "logged_out"
    assert "alice" not in session_names(server)
    resent = server.relay.drops.counts["unknown session"] - unknown_before
    print(f"\nlogout took {took:.2f} s; {resent} datagrams came after the session ended")
    assert resent == 0, "the client resent its LOGOUT: the server never acked it"


def test_client_logs_in_again_when_the_server_forgot_it(server: RunningServer) -> None:
    """A server that restarted answers a session it does not know with
    UNKNOWN_SESSION; the client must log in again at once and resend what
    the server has not accepted (not wait 30 s for the link to time out).
    The restart keeps the data directory, as a real one does (the client has
    pinned the server's key; a server with other data would be refused)."""
    alice = Client("alice")
    bob = Client("bob")
    second: RunningServer | None = None
    try:
        with LossyProxy(server.address, seed=3) as proxy:
            assert alice.login(proxy.address)
            alice.wait(lambda: alice.logged_in, 10.0, "login")
            data_dir = server.relay.config.data_dir
            stop_server(server)  # the server goes away, forgetting every session ...
            second = start_server(server_config(data_dir))  # ... and comes back on its data
            assert bob.login(second.address)
            bob.wait(lambda: bob.logged_in, 10.0, "bob's login")
            proxy.retarget(second.address)
            started = time.monotonic()
            msg = alice.session.send("did you miss me?", to="bob")
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
            assert alice.states[msg] == ["sending", "accepted", "delivered"]
            bob.pump()
            assert [(m.sender, m.text) for m in bob.received] == [("alice", "did you miss me?")]
            assert alice.disconnected is None
    finally:
        close_all([alice, bob])
        if second is not None:
            stop_server(second)


@pytest.mark.parametrize("persist", [False, True], ids=["in-memory", "with-store"])
def test_message_to_yourself_is_shown_once(server: RunningServer, persist: bool) -> None:
    """The server accepts a message to oneself ("note to self") and the
    client reports it `delivered`, so the client must also show it, once,
    whether or not it keeps a history on disk."""
    (alice,) = logged_in(server, "alice", persist=persist)
    try:
        msg = alice.session.send("note to self", to="alice")
        assert msg is not None
        alice.wait(lambda: alice.states[msg][-1:] == ["delivered"], 10.0, "delivered")
        time.sleep(0.2)
        alice.pump()
        assert alice.states[msg] == ["sending", "accepted", "delivered"]
        assert [(m.sender, m.text) for m in alice.received] == [("alice", "note to self")]
    finally:
        alice.close()


# --- store and forward -----------------------------------------------------------------------


def test_message_to_offline_registered_user_waits_for_their_login(server: RunningServer) -> None:
    """With a data directory, a message to a registered user who is offline
    is accepted (held on the server, not `user_offline`) and delivered, in
    order, at their next login; then the sender sees `delivered`."""
    (bob,) = logged_in(server, "bob")  # registers bob
    bob.close()
    bob.pump()
    assert bob.disconnected == "logged_out"
    (alice,) = logged_in(server, "alice")
    later = Client("bob")
    try:
        ids = [alice.session.send(f"while you were out #{i}", to="bob") for i in range(3)]
        assert all(ids)
        alice.wait(
            lambda: all(alice.states[i][-1:] == ["accepted"] for i in ids if i), 10.0, "accepted"
        )
        time.sleep(0.3)
        alice.pump()
        assert not alice.errors, alice.errors
        assert all(alice.states[i] == ["sending", "accepted"] for i in ids if i)
        assert "bob" not in session_names(server)

        assert later.login(server.address)
        later.wait(lambda: len(later.received) == 3, 10.0, "the waiting messages")
        assert [(m.sender, m.text) for m in later.received] == [
            ("alice", f"while you were out #{i}") for i in range(3)
        ]
        alice.wait(
            lambda: all(alice.states[i][-1:] == ["delivered"] for i in ids if i), 10.0, "receipts"
        )
        assert all(alice.states[i] == ["sending", "accepted", "delivered"] for i in ids if i)
    finally:
        close_all([alice, later])


# --- command line: data directory and passwords ---------------------------------------------


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_no_password_and_no_terminal_exits_2(
    server: RunningServer, terminals: Any, value: str | None
) -> None:
    """Without CHAT_PASSWORD or --password-file and with stdin not a terminal
    (a pipe here) there is no one to ask: password_required, exit 2, and
    nothing is sent to the server."""
    addr = f"127.0.0.1:{server.address[1]}"
    proc = terminals("--server", addr, "--user", "alice", env={"CHAT_PASSWORD": value})
    error = proc.expect_event("error")
    assert error["code"] == "password_required" and error["message"]
    assert proc.finish() == 2
    assert proc.events == [error, {"event": "disconnected", "reason": "password_required"}]
    # the same without --json: a line for a person on stderr, nothing on stdout
    env = env_for_tests()
    if value is None:
        env.pop("CHAT_PASSWORD", None)
    else:
        env["CHAT_PASSWORD"] = value
    plain = subprocess.run(
        client_command("--server", addr, "--user", "alice"),
        input="hello\n", capture_output=True, text=True, timeout=30,
        cwd=ROOT, env=env,
    )  # fmt: skip
    assert plain.returncode == 2
    assert plain.stdout == ""
    assert "password" in plain.stderr and "Traceback" not in plain.stderr
    assert server.relay.stats["datagrams_in"] == 0


def test_password_required_exit_leaves_no_open_socket(server: RunningServer) -> None:
    """The password_required exit must release what the client opened,
    like every other exit does (run with ResourceWarning shown, as `python
    -X dev` would): a leak here is a warning on the user's terminal."""
    env = env_for_tests()
    env.pop("CHAT_PASSWORD", None)
    env["PYTHONWARNINGS"] = "always::ResourceWarning"
    done = subprocess.run(
        client_command("--server", f"127.0.0.1:{server.address[1]}", "--user", "alice", "--json"),
        input="", capture_output=True, text=True, timeout=30, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 2
    assert '"password_required"' in done.stdout
    assert "ResourceWarning" not in done.stderr, done.stderr


def test_password_file(server: RunningServer, terminals: Any, tmp_path: Path) -> None:
    """--password-file FILE gives the password (without its line end); the
    right one logs in, a wrong one gets bad_password, an unreadable file exit 2."""
    secret = "Tr0ub4dor & 3, not the default"
    carol = Client("carol")
    try:
        assert carol.login(server.address, password=secret)  # registers carol
        carol.wait(lambda: carol.logged_in, 10.0, "carol's login")
    finally:
        carol.close()
    addr = f"127.0.0.1:{server.address[1]}"
    no_env: dict[str, str | None] = {"CHAT_PASSWORD": None}

    right = tmp_path / "right.txt"
    right.write_text(secret + "\n", "utf-8")
    proc = terminals("--server", addr, "--user", "carol", "--password-file", str(right),
                     env=no_env)  # fmt: skip
    proc.expect_event("logged_in", user="carol")
    proc.write("/who")
    assert proc.expect_event("who")["users"] == ["carol"]
    assert proc.finish() == 0, proc.stderr
    assert proc.events[-1] == {"event": "disconnected", "reason": "logged_out"}

    wrong = tmp_path / "wrong.txt"
    wrong.write_text(PASSWORD + "\n", "utf-8")  # another user's password
    proc = terminals("--server", addr, "--user", "carol", "--password-file", str(wrong),
                     env=no_env)  # fmt: skip
    assert proc.expect_event("error")["code"] == "bad_password"
    assert proc.finish() == 2
    assert proc.events[-1] == {"event": "disconnected", "reason": "bad_password"}

    missing = tmp_path / "missing.txt"
    proc = terminals("--server", addr, "--user", "carol", "--password-file", str(missing),
                     env=no_env)  # fmt: skip
    assert proc.finish() == 2
    assert not [e for e in proc.events if e["event"] == "logged_in"]
    assert proc.events and proc.events[-1]["event"] == "disconnected"
    assert str(missing) in "".join(proc.stderr)
    assert server.relay.stats["login_failures"] == 1


def test_connect_to_someone_not_registered_yet_tells_when_they_arrive(
    server: RunningServer,
) -> None:
    """The user's flow with alice first: she names bob before bob has an
    account. She must still hear when he registers and logs in, without
    typing anything, and then chat with him."""
    alice = Client("alice")
    bob = Client("bob")
    try:
        assert alice.login(server.address, "bob")
        alice.wait(lambda: alice.logged_in, 10.0, "alice's login")
        time.sleep(0.2)  # her WATCH for bob reaches the server first
        assert bob.login(server.address)
        bob.wait(lambda: bob.logged_in, 10.0, "bob's login")
        alice.wait(
            lambda: any(p.user == "bob" and p.online for p in alice.presence), 5.0, "bob online"
        )
        msg = alice.session.send("there you are")
        assert msg is not None
        alice.wait(lambda: alice.states[msg][-1:] == ["delivered"], 10.0, "delivered")
        bob.wait(lambda: bool(bob.received), 5.0, "the message")
        assert [(m.sender, m.text) for m in bob.received] == [("alice", "there you are")]
    finally:
        close_all([alice, bob])
