"""Logins behind a shared address (the issue-12 review, findings F4 and F5).

F4: five wrong passwords from the owner's own address (a NAT, a campus)
locked the owner out, ticket or not: the per-address failure window held
ticketed LOGINs too, at 5 per 30 s for every name behind the address. Now a
valid ticket skips it, and without a ticket the address's budget spans
names (`server_login.ADDRESS_NAMES` times the per-name one) while each
name keeps its own 5 per 30 s. In memory, on a fake clock.

F5: the benchmarks never called `shown()`, so once the client withheld
receipts until display, the receiver's window filled and delivery stopped;
`python -m bench --quick` (tests/test_bench_smoke.py) now checks the counts
delivered, and the check itself is tested here.
"""

from __future__ import annotations

from bench import preauth_flood
from protocol import Refused, Welcome
from server_login import ADDRESS_NAMES
from tests.conftest import PASSWORD, start_server, stop_server
from tests.test_login_guard import WRONG, log_in, open_relay, ticket_from

NAT = ("192.0.2.77", 40000)  # the address everyone below shares


def code(answer: object) -> str:
    if isinstance(answer, Welcome):
        return "welcome"
    assert isinstance(answer, Refused), answer
    return answer.code.label


def test_the_owner_with_a_ticket_gets_in_at_once_behind_the_guessers_address() -> None:
    """The review's script, in memory: bob holds a ticket; a stranger behind
    bob's own address spends 5 wrong passwords on carol, then 5 on bob
    (every window a 5-per-30-s one can hold). bob's LOGIN with his ticket,
    from that address, is welcomed at once (the old desk answered
    `rate_limited` "try again in 30 s")."""
    relay = open_relay()
    now = 1000.0
    ticket = ticket_from(log_in(relay, "bob", PASSWORD, (NAT[0], 5000), now), now)
    assert ticket is not None
    log_in(relay, "carol", PASSWORD, ("198.51.100.9", 1), now)
    for i in range(5):
        assert code(log_in(relay, "carol", WRONG, (NAT[0], 6000 + i), now).answer) == "bad_password"
    for i in range(5):
        attempt = log_in(relay, "bob", WRONG, (NAT[0], 6100 + i), now, instance_id=90 + i)
        assert code(attempt.answer) == "bad_password"
    owner = log_in(relay, "bob", PASSWORD, (NAT[0], 5001), now + 0.1, ticket=ticket)
    assert code(owner.answer) == "welcome"
    assert relay.stats["logins_with_ticket"] == 1


def test_a_first_time_user_behind_the_address_is_not_held_by_guesses_at_another_name() -> None:
    """dave has never logged in (no account, no ticket) and shares the
    address of someone who just failed 5 times against carol: his
    registration goes through; so does erin's existing-account login
    without a ticket. carol, the name guessed at, is held for 30 s."""
    relay = open_relay()
    now = 1000.0
    log_in(relay, "carol", PASSWORD, ("198.51.100.9", 1), now)
    log_in(relay, "erin", PASSWORD, ("198.51.100.9", 2), now)
    for i in range(5):
        log_in(relay, "carol", WRONG, (NAT[0], 6000 + i), now)
    assert code(log_in(relay, "dave", PASSWORD, (NAT[0], 7000), now).answer) == "welcome"
    erin = log_in(relay, "erin", PASSWORD, (NAT[0], 7001), now, instance_id=31)
    assert code(erin.answer) == "welcome"
    held = log_in(relay, "carol", PASSWORD, (NAT[0], 7002), now, instance_id=32)
    assert code(held.answer) == "rate_limited"
    assert code(log_in(relay, "carol", PASSWORD, (NAT[0], 7003), now + 30.1).answer) == "welcome"


def test_guessing_stays_bounded_per_name_and_per_address() -> None:
    """One address sprays wrong passwords at 40 names, 2 per second for
    90 s: at most 5 password checks per name in any 30 s (counted over
    every address), at most ADDRESS_NAMES x 5 from the address in any 30 s;
    while its budget is spent, even the right password for an untouched
    name is turned away from it (no oracle), but not from elsewhere."""
    relay = open_relay()
    now = 1000.0
    names = [f"user{i}" for i in range(40)]
    for i, name in enumerate(names + ["zoe"]):
        log_in(relay, name, PASSWORD, ("198.51.100.9", i + 1), now)
    guesser = "203.0.113.4"
    checks: list[tuple[float, str]] = []
    for i in range(180):
        now += 0.5
        before = relay.stats["password_checks"]
        attempt = log_in(relay, names[i % 40], WRONG, (guesser, 9000 + i), now, instance_id=500 + i)
        assert code(attempt.answer) in ("bad_password", "rate_limited")
        if relay.stats["password_checks"] > before:
            checks.append((now, names[i % 40]))
    budget = ADDRESS_NAMES * 5
    for t, _ in checks:
        assert sum(1 for u, _ in checks if t <= u < t + 30) <= budget
    for name in names:
        times = [t for t, n in checks if n == name]
        for t in times:
            assert sum(1 for u in times if t <= u < t + 30) <= 5, (name, times)
    assert len(checks) >= budget  # the budget was spent, not idle
    spent_at = next(t for i, (t, _) in enumerate(checks) if i == budget - 1)
    during = log_in(relay, "zoe", PASSWORD, (guesser, 9999), spent_at, instance_id=77)
    assert code(during.answer) == "rate_limited"
    elsewhere = log_in(relay, "zoe", PASSWORD, ("198.51.100.10", 1), spent_at, instance_id=78)
    assert code(elsewhere.answer) == "welcome"


def test_the_preauth_flood_bench_delivers_past_the_receivers_window() -> None:
    """`bench.preauth_flood`'s honest pair, on a real server: 400 messages
    from alice to bob (every 2 ms here; the bench sends every 20 ms) all
    arrive. Before, the bench never called `bob.shown()`, so no receipt
    left bob's client, the server's window of unreceipted messages to bob
    filled after about 200 and the rest never came ("206/400 arrived")."""
    running = start_server()
    alice, bob = preauth_flood.pair(running.address)
    try:
        result = preauth_flood.exchange(alice, bob, 0.8, "t", interval=0.002)
        assert result["sent"] >= 300, result
        assert result["received"] == result["sent"], result
    finally:
        alice.close(2.0)
        bob.close(2.0)
        stop_server(running)
