"""A loop pass leaves nothing waiting for a wake-up (issue 14, eighth
session). `Relay.datagrams_to_send` walks the sessions the pass touched; what
that walk itself sends to another session (a session that ends tells its
watchers it went offline) used to wait for whatever woke the loop next. Since
the timers no longer wake it for nothing (tests/test_timer_wakeups.py), that
could be a keepalive's time away: the walk now goes on until no session is
left with something to send."""

from __future__ import annotations

from protocol import Logout, Presence, Watch, decode_message, unbatch
from reliability import PayloadReceived
from tests.test_bounds import World


def test_a_logout_tells_the_watchers_in_the_same_pass() -> None:
    world = World()
    bob = world.login("bob")
    alice = world.login("alice")
    alice.send(Watch("bob"))
    world.run_until(lambda: any(p.online for p in alice.of(Presence)), 200, "bob online")
    session = world.session_of(alice)
    world.run_until(lambda: not session.presence_sent, 200, "alice acked it")
    bob.send(Logout())
    now = world.now
    for data in bob.conn.datagrams_to_send(now):
        world.relay.receive_datagram(data, bob.addr, now)
    out = world.relay.datagrams_to_send(now)  # one pass: bob's session ends in it
    assert world.relay.datagrams_to_send(now) == []  # nothing left for a second pass
    heard: list[Presence] = []
    for data, addr in out:
        if addr != alice.addr or not alice.conn.receive_datagram(data, now):
            continue
        for event in alice.conn.take_events():
            if isinstance(event, PayloadReceived):
                messages = unbatch(decode_message(event.payload))
                heard += [m for m in messages if isinstance(m, Presence)]
    assert [p.online for p in heard] == [False], "bob's going offline waited for a wake-up"
