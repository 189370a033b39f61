"""The two pre-login limits apply in the right order: a datagram not for a
live session is first held to its address's allowance, then to the budget
for all such traffic. The other way round, one address flooding faster than
the whole budget spent it alone and starved every other login (seen as the
flood test's carol failing to log in, now and then, on a quiet machine)."""

from __future__ import annotations

from protocol import HELLO_SIZE, NO_SESSION, Challenge, Hello, Packet, encode_packet
from tests.test_login_guard import open_relay, preauth_frames


def hello(name: str) -> bytes:
    return encode_packet(Packet(NO_SESSION, 0, (Hello(name, 1, bytes(16)),)), None,
                         pad_to=HELLO_SIZE)  # fmt: skip


def test_one_flooding_address_does_not_spend_the_budget_of_all() -> None:
    relay = open_relay(preauth_rate=500.0, preauth_burst=1000.0, preauth_total_rate=5000.0,
                       preauth_total_burst=10000.0)  # fmt: skip
    flooder, carol = ("198.51.100.7", 9000), ("192.0.2.3", 4000)
    now = 1000.0
    # 20,000 HELLOs from one address in a second (the flood test's rate),
    # carol's own HELLO in the middle of them.
    for step in range(20):
        batch = [(hello("mallory"), flooder)] * 1000
        if step == 10:
            batch.insert(500, (hello("carol"), carol))
        relay.receive_datagrams(batch, now + step * 0.05)
    out = relay.datagrams_to_send(now + 1.0)
    assert [f for f in preauth_frames(out, to=carol) if isinstance(f, Challenge)], (
        "carol's HELLO was answered"
    )
    # The flooder got its own allowance and no more; the shared budget was
    # hardly touched.
    assert len([f for f in preauth_frames(out, to=flooder) if isinstance(f, Challenge)]) <= 1500
    assert relay.drops.counts["pre-login rate limit"] >= 18000
    assert relay.drops.counts.get("pre-login budget", 0) == 0
