"""The login's guards under attack (issue 12, items 4, 5, 7 and 8): a
captured LOGIN replayed after a flood meant to flush the server's memory of
it, strangers' wrong passwords against the owner's login, wall-clock steps,
and pre-login floods from many addresses beside a logged-in session.

Almost everything calls the sans-IO `Relay` with a fake monotonic `now`
(and, where it matters, a wall clock of the test's own); one test runs the
real client against a real server to prove the login ticket's wiring.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chat_client import ErrorEvent, LoggedIn
from chat_server import Relay, build_parser
from protocol import (
    CRC,
    HELLO_SIZE,
    MIN_PREAUTH_REQUEST,
    NO_SESSION,
    Accept,
    Accepts,
    Challenge,
    ErrorCode,
    Frame,
    Hello,
    Login,
    MsgId,
    Packet,
    Refused,
    RemoteProtocolError,
    Send,
    Ticket,
    TicketFrame,
    Welcome,
    conversation_stream,
    decode_message,
    decode_packet,
    encode_message,
    encode_packet,
)
from reliability import Connection, PayloadReceived
from server_guard import COOKIE_PERIOD
from tests.clients import RawClient, ScriptedLogin
from tests.conftest import (
    PASSWORD,
    make_session,
    start_server,
    stop_server,
    wait_for,
)
from tests.conftest import test_config as server_config

Address = tuple[str, int]
WRONG = "not the password"


def preauth_frames(out: list[tuple[bytes, Address]], to: Address | None = None) -> list[Frame]:
    """The login-exchange frames (no MAC) among the relay's output."""
    frames: list[Frame] = []
    for data, addr in out:
        if to is not None and addr != to:
            continue
        try:
            packet = decode_packet(data, None)
        except RemoteProtocolError:
            continue  # a session's datagram (it has a MAC)
        frames.extend(f for f in packet.frames if isinstance(f, (Challenge, Welcome, Refused)))
    return frames


def login_datagram(login: Login, ticket: bytes | None = None) -> bytes:
    """A LOGIN built by hand (the junk below), with a ticket if given."""
    frames: tuple[Frame, ...] = (login,) if ticket is None else (login, TicketFrame(ticket))
    return encode_packet(Packet(NO_SESSION, 0, frames), None, pad_to=MIN_PREAUTH_REQUEST)


@dataclass
class Attempt:
    """One login by hand: the LOGIN datagram sent and the answer to it."""

    datagram: bytes
    answer: Frame | None
    conn: Connection | None = None  # the client's side of the session, if welcomed
    out: list[tuple[bytes, Address]] = field(default_factory=list)


def log_in(
    relay: Relay, name: str, password: str, addr: Address, now: float, *, instance_id: int = 7,
    ticket: bytes | None = None,
) -> Attempt:  # fmt: skip
    """HELLO -> CHALLENGE -> LOGIN against the relay, at `now`: the client's
    own login (`ScriptedLogin`), with `ticket` as if kept from before."""
    login = ScriptedLogin(name, password, instance_id, now, ticket=ticket)
    login.take([d for d, _ in relay.handle_datagram(login.hello, addr, now)], now)
    assert isinstance(login.challenge, Challenge), login.answer
    out = relay.handle_datagram(login.request, addr, now)
    answers = preauth_frames(out, addr)
    login.take([d for d, to in out if to == addr], now)
    return Attempt(login.request, answers[0] if answers else None, login.conn, out)


def ticket_from(attempt: Attempt, now: float) -> bytes | None:
    """The TICKET message the relay sent inside the new session, if any."""
    assert attempt.conn is not None
    for data, _ in attempt.out:
        attempt.conn.receive_datagram(data, now)
    while (event := attempt.conn.next_event()) is not None:
        if isinstance(event, PayloadReceived):
            message = decode_message(event.payload)
            if isinstance(message, Ticket):
                return message.ticket
    return None


def live(relay: Relay, name: str) -> bytes | None:
    user = relay.users.get(name)
    return user.session.session_id if user is not None and user.session is not None else None


def open_relay(wall: list[float] | None = None, **overrides: object) -> Relay:
    """An in-memory relay; the pre-login limits opened up unless overridden
    (the floods here come from few fake addresses, far faster than real)."""
    options: dict[str, object] = {
        "preauth_rate": 1e9, "preauth_burst": 1e9,
        "preauth_total_rate": 1e9, "preauth_total_burst": 1e9,
    }  # fmt: skip
    options.update(overrides)
    config = server_config(None, **options)
    if wall is None:
        return Relay(config)
    return Relay(config, wall_clock=lambda: wall[0])


def with_crc(body: bytes) -> bytes:
    return body + CRC.pack(zlib.crc32(body))


# --- item 4: replays no flood can re-open -------------------------------------------------


def junk_logins(count: int, name: str) -> list[tuple[bytes, Address]]:
    """`count` LOGINs no cookie verifies: invalid names, and one in ten for
    `name` with a forged cookie, each with its own nonce, from many addresses. Built from
    two templates by rewriting the nonce (and the checksum): fast."""
    out: list[tuple[bytes, Address]] = []
    templates = []
    for username in (name, ""):
        marker = b"nonce goes here!"
        login = Login(username, 1, marker, bytes(16), bytes(32), bytes(256), bytes(64))
        data = login_datagram(login)[: -CRC.size]
        templates.append((data, data.index(marker)))
    for i in range(count):
        data, at = templates[min(1, i % 10)]  # one in 10 for `name`
        nonce = i.to_bytes(16, "big")
        out.append((with_crc(data[:at] + nonce + data[at + 16 :]), (f"10.{i % 200}.0.1", 9000)))
    return out


def test_replay_after_a_flood_of_junk_logins_leaves_the_session_untouched() -> None:
    """A captured LOGIN of alice's, replayed from her address after 112,000
    LOGINs without a valid cookie (invalid names, forged cookies: more than
    the old reply cache held, which they flushed): the replay gets the
    recorded WELCOME at most, no new session, and alice's session is the
    same one. The junk left no state behind."""
    wall = [1_000_000.0]
    relay = open_relay(wall)
    now = 5000.0
    alice_addr = ("192.0.2.7", 4444)
    captured = log_in(relay, "alice", PASSWORD, alice_addr, now)
    assert isinstance(captured.answer, Welcome)
    session = live(relay, "alice")
    recorded = len(relay.desk.replies._replies)
    junk = junk_logins(112_000, "alice")
    for i in range(0, len(junk), 1000):
        now += 0.1
        for data, addr in junk[i : i + 1000]:
            relay.receive_datagram(data, addr, now)
        relay.datagrams_to_send(now)
    out = relay.handle_datagram(captured.datagram, alice_addr, now)
    answers = preauth_frames(out)
    assert all(isinstance(a, Welcome) and a.session_id == session for a in answers), answers
    assert live(relay, "alice") == session and len(relay.sessions) == 1
    assert relay.stats["logins"] == 1
    assert relay.drops.counts["login with a stale or forged cookie"] == 11_200
    assert len(relay.desk.replies._replies) == recorded, "LOGINs without a cookie left state"


def test_invalid_name_logins_get_an_answer_and_no_state() -> None:
    relay = open_relay()
    invalid = [j for i, j in enumerate(junk_logins(2000, "alice")) if i % 10]
    for data, addr in invalid:
        (answer,) = preauth_frames(relay.handle_datagram(data, addr, 100.0))
        assert isinstance(answer, Refused) and answer.code == ErrorCode.INVALID_NAME
    assert len(relay.desk.replies._replies) == 0


def test_a_throttled_login_replayed_after_the_window_opens_nothing() -> None:
    """Alice's LOGIN turned away while strangers' failures fill the window
    for her name is recorded with its answer: replayed once the window has
    passed (her cookie still verifies), it gets that answer again and never
    replaces the session she opened meanwhile."""
    relay = open_relay()
    now = 1000.0
    home = ("192.0.2.7", 4444)
    log_in(relay, "alice", PASSWORD, home, now)
    for i in range(5):
        wrong = log_in(relay, "alice", WRONG, (f"203.0.113.{i}", 1), now, instance_id=99)
        assert isinstance(wrong.answer, Refused) and wrong.answer.code == ErrorCode.BAD_PASSWORD
    throttled = log_in(relay, "alice", PASSWORD, home, now, instance_id=8)
    assert isinstance(throttled.answer, Refused)
    assert throttled.answer.code == ErrorCode.RATE_LIMITED
    now += 31.0  # the window has passed; the cookie (120-240 s) has not
    fresh = log_in(relay, "alice", PASSWORD, home, now, instance_id=8)
    assert isinstance(fresh.answer, Welcome)
    session = live(relay, "alice")
    answers = preauth_frames(relay.handle_datagram(throttled.datagram, home, now + 1))
    assert [a.code for a in answers if isinstance(a, Refused)] == [ErrorCode.RATE_LIMITED]
    assert live(relay, "alice") == session and relay.stats["logins"] == 2


def test_a_full_record_voids_every_cookie_instead_of_forgetting() -> None:
    """The record of verified LOGINs never forgets one whose cookie still
    verifies: when it is full the desk takes a new cookie key, so every LOGIN
    recorded before is dead for good (replays are dropped unanswered); a
    handshake under way starts over, and logins go on."""
    relay = open_relay()
    relay.desk.replies.limit = 3
    now = 1000.0
    attempts = []
    for i in range(3):
        addr = (f"192.0.2.{i}", 5000)
        attempts.append((log_in(relay, f"user{i}", PASSWORD, addr, now), addr))
    assert len(relay.desk.replies._replies) == 3
    fourth = log_in(relay, "user3", PASSWORD, ("192.0.2.3", 5000), now)
    assert isinstance(fourth.answer, Welcome)  # verified before the key changed
    assert relay.stats["cookie_key_changes"] == 1 and len(relay.desk.replies._replies) == 1
    sessions = set(relay.sessions)
    for attempt, addr in attempts:
        assert relay.handle_datagram(attempt.datagram, addr, now + 1) == []
    assert set(relay.sessions) == sessions
    again = log_in(relay, "user0", PASSWORD, attempts[0][1], now + 2)
    assert isinstance(again.answer, Welcome)


# --- item 5: strangers cannot lock the owner out --------------------------------------------


def test_owner_with_a_ticket_logs_in_while_50_addresses_guess_at_5_per_second() -> None:
    """Bob logged in once and got a login ticket inside his session. Then
    wrong passwords for bob arrive at 5/s from 50 addresses (each one every
    10 s, under the per-address window). After 20 s of it, bob's client
    logs in at once with its ticket; a client of his without one is turned
    away (the per-name window), and the guessing got at most 5 password
    checks per 30 s."""
    relay = open_relay()
    now = 1000.0
    home = ("198.51.100.5", 7000)
    first = log_in(relay, "bob", PASSWORD, home, now)
    ticket = ticket_from(first, now)
    assert ticket is not None and len(ticket) == 16
    checks: list[float] = []
    for i in range(100):  # 20 s at 5/s
        now += 0.2
        before = relay.stats["password_checks"]
        log_in(relay, "bob", WRONG, (f"203.0.{i % 50}.1", 1000 + i), now, instance_id=1000 + i)
        if relay.stats["password_checks"] > before:
            checks.append(now)
    assert len(checks) <= 5, checks
    assert all(t - checks[0] < 30 for t in checks)
    session = live(relay, "bob")
    owner = log_in(relay, "bob", PASSWORD, home, now + 0.1, ticket=ticket)
    assert isinstance(owner.answer, Welcome), owner.answer
    assert live(relay, "bob") != session and relay.stats["logins_with_ticket"] == 1
    assert ticket_from(owner, now) is None  # it has one: none sent again
    other = log_in(relay, "bob", PASSWORD, ("198.51.100.6", 7000), now + 0.2, instance_id=8)
    assert isinstance(other.answer, Refused) and other.answer.code == ErrorCode.RATE_LIMITED


def test_a_ticket_is_bound_to_its_instance_and_guessing_with_it_stays_slow() -> None:
    """A ticket is good only for the name and instance it was given to;
    wrong passwords with a stolen one are limited to 5 per 30 s too (per
    name and instance), and the per-address window holds everyone without
    a ticket but never the ticket's holder."""
    relay = open_relay()
    now = 1000.0
    ticket = ticket_from(log_in(relay, "bob", PASSWORD, ("198.51.100.5", 7000), now), now)
    assert ticket is not None
    for i in range(5):  # fill the per-name window
        log_in(relay, "bob", WRONG, (f"203.0.{i}.1", 1), now, instance_id=50 + i)
    wrong_instance = log_in(relay, "bob", PASSWORD, ("198.51.100.5", 7001), now, instance_id=8,
                            ticket=ticket)  # fmt: skip
    assert isinstance(wrong_instance.answer, Refused)
    assert wrong_instance.answer.code == ErrorCode.RATE_LIMITED
    codes = []
    for i in range(12):  # a thief with the ticket, from 12 addresses
        now += 1.0
        attempt = log_in(relay, "bob", WRONG, (f"192.0.2.{i}", 1), now, ticket=ticket)
        assert isinstance(attempt.answer, Refused)
        codes.append(attempt.answer.code)
    assert codes.count(ErrorCode.BAD_PASSWORD) == 5
    assert codes.count(ErrorCode.RATE_LIMITED) == 7
    log_in(relay, "carol", PASSWORD, ("192.0.2.201", 1), now)
    for _ in range(5):  # one address, another name, wrong passwords
        log_in(relay, "carol", WRONG, ("192.0.2.200", 1), now)
    # The owner's ticket is not held by the address window (a NAT's
    # strangers could fill it): a LOGIN without one is.
    now += 30.0  # the thief's window over
    for name in ("erin", "frank", "gina"):
        log_in(relay, name, PASSWORD, ("192.0.2.201", 1), now)
    for i in range(20):  # the address's budget across names (4 x 5) spent
        name = ("carol", "erin", "frank", "gina")[i % 4]
        log_in(relay, name, WRONG, ("192.0.2.200", 1), now + i * 0.01)
    blocked = log_in(relay, "dave", PASSWORD, ("192.0.2.200", 2), now + 0.2)
    assert isinstance(blocked.answer, Refused) and blocked.answer.code == ErrorCode.RATE_LIMITED
    owner = log_in(relay, "bob", PASSWORD, ("192.0.2.200", 2), now + 0.2, ticket=ticket)
    assert isinstance(owner.answer, Welcome), owner.answer


def test_the_client_keeps_its_ticket_and_gets_past_strangers_failures(tmp_path: Path) -> None:
    """Real sockets and the real client: bob logs in once (his store keeps
    the ticket), strangers then spend the per-name window for bob from other
    addresses, and bob's next run logs in at once."""
    running = start_server(server_config(tmp_path / "data", key_workers=0))
    try:
        first = make_session()
        assert first.login(running.address, "bob", password=PASSWORD)
        wait_for(first, lambda e: isinstance(e, LoggedIn))
        deadline = time.monotonic() + 5
        while running.relay.stats["logins"] < 1 or _unacked(running.relay, "bob"):
            assert time.monotonic() < deadline, "the ticket was never acknowledged"
            time.sleep(0.02)
        first.close()
        answers = [raw_log_in(running.address, f"127.0.2.{i + 1}", "bob", WRONG) for i in range(6)]
        assert [a.code for a in answers if isinstance(a, Refused)] == [
            *[ErrorCode.BAD_PASSWORD] * 5, ErrorCode.RATE_LIMITED,
        ]  # fmt: skip
        again = make_session()
        assert again.login(running.address, "bob", password=PASSWORD)
        event = wait_for(again, lambda e: isinstance(e, (LoggedIn, ErrorEvent)))
        assert isinstance(event, LoggedIn), event
        assert running.relay.stats["logins_with_ticket"] == 1
        again.close()
    finally:
        stop_server(running)


def raw_log_in(server: Address, host: str, name: str, password: str) -> Frame | None:
    """One login (a fresh instance) over a socket bound to `host`: the answer."""
    with RawClient(server, host=host) as raw:
        return raw.login(name, password).answer


def _unacked(relay: Relay, name: str) -> bool:
    user = relay.users.get(name)
    return user is None or user.session is None or user.session.conn.unacked > 0


# --- item 7: one clock per purpose -----------------------------------------------------------


def test_wall_clock_steps_reopen_no_replay_and_stretch_no_cookie() -> None:
    """Cookies, the LOGIN record and failure windows run on the monotonic
    `now`: a wall clock stepped back 300 s does not let a LOGIN recorded 300 s
    ago (its record gone) be judged again, nor keep a cookie valid longer
    than 2 cookie periods; one stepped forward a day does not void a fresh
    cookie."""
    wall = [10 * COOKIE_PERIOD * 1000]
    relay = open_relay(wall)
    now = 50_000.0
    home = ("192.0.2.7", 4444)
    captured = log_in(relay, "alice", PASSWORD, home, now)
    assert isinstance(captured.answer, Welcome)
    session = live(relay, "alice")
    now += 300.0  # the record and the cookie are over; the wall clock steps back
    assert relay.handle_datagram(captured.datagram, home, now) == []
    assert live(relay, "alice") == session and relay.stats["logins"] == 1

    # A cookie asked for now, a wall clock stepped back 200 s, the LOGIN 250 s later.
    login = ScriptedLogin("alice", PASSWORD, 9, now)
    login.take([d for d, _ in relay.handle_datagram(login.hello, home, now)], now)
    assert isinstance(login.challenge, Challenge)
    wall[0] += 250.0 - 200.0
    assert relay.handle_datagram(login.request, home, now + 250.0) == []
    assert live(relay, "alice") == session

    # The wall clock a day ahead between CHALLENGE and LOGIN: still welcome.
    wall[0] += 86_400.0
    fresh = log_in(relay, "alice", PASSWORD, home, now + 251.0)
    assert isinstance(fresh.answer, Welcome)


# --- item 8: pre-login floods from many addresses ---------------------------------------------


def test_prelogin_budget_drops_floods_while_sessions_are_all_served() -> None:
    """5,000 HELLOs from 200 addresses in one pass, with 40 messages of a
    logged-in session among them: beyond the global pre-login budget the
    HELLOs are dropped unread (no CHALLENGE), every datagram of the session
    is handled and every message accepted."""
    relay = open_relay(preauth_rate=500.0, preauth_burst=1000.0, preauth_total_rate=1000.0,
                       preauth_total_burst=1000.0)  # fmt: skip
    now = 1000.0
    alice = log_in(relay, "alice", PASSWORD, ("192.0.2.1", 4000), now)
    bob = log_in(relay, "bob", PASSWORD, ("192.0.2.2", 4000), now)
    assert alice.conn is not None and bob.conn is not None
    for attempt in (alice, bob):
        for data, _ in attempt.out:
            attempt.conn.receive_datagram(data, now)  # type: ignore[union-attr]
    now += 1.0  # the budget refills to its burst
    for seq in range(40):
        alice.conn.send(encode_message(Send(MsgId(7, seq + 1), "bob", f"m{seq}")),
                        conversation_stream("bob"))  # fmt: skip
    session_datagrams = [(d, ("192.0.2.1", 4000)) for d in alice.conn.datagrams_to_send(now)]
    assert len(session_datagrams) >= 2
    hello = encode_packet(Packet(NO_SESSION, 0, (Hello("mallory", 1, bytes(16)),)), None,
                          pad_to=HELLO_SIZE)  # fmt: skip
    flood = [(hello, (f"10.0.{i % 200}.1", 9000)) for i in range(5000)]
    batch = flood[:2500] + session_datagrams + flood[2500:]
    handled_before = relay.stats["datagrams_in"]
    relay.receive_datagrams(batch, now)
    out = relay.datagrams_to_send(now)
    challenges = [f for f in preauth_frames(out) if isinstance(f, Challenge)]
    assert len(challenges) <= 1000
    assert relay.drops.counts["pre-login budget"] >= 4000
    assert relay.stats["datagrams_in"] - handled_before == len(batch)
    accepted = set()
    for data, _ in out:
        if data[6:22] == alice.conn.session_id:
            alice.conn.receive_datagram(data, now)
    while (event := alice.conn.next_event()) is not None:
        if isinstance(event, PayloadReceived):
            message = decode_message(event.payload)
            if isinstance(message, Accepts):
                accepted |= {m.client_seq for m, _ in message.items}
            elif isinstance(message, Accept):
                accepted.add(message.msg_id.client_seq)
    assert accepted == set(range(1, 41))


def test_prelogin_total_rate_is_a_flag() -> None:
    args = build_parser().parse_args(["--preauth-total-rate", "250"])
    assert args.preauth_total_rate == 250.0
    assert "--preauth-total-rate" in build_parser().format_help()


@pytest.mark.parametrize("size", [0, 5, 21, 22, 300])
def test_prelogin_budget_counts_every_datagram_without_a_live_session(size: int) -> None:
    relay = open_relay(preauth_total_rate=1.0, preauth_total_burst=1.0)
    relay.receive_datagram(bytes(size), ("192.0.2.1", 1), 10.0)
    relay.receive_datagram(bytes(size), ("192.0.2.1", 1), 10.0)
    assert relay.drops.counts["pre-login budget"] == 1
