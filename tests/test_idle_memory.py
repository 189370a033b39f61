"""What an idle session keeps once its traffic is acked: the per-session
containers that only matter while something is in flight or out of order
are freed (None, or a dict without its table) when they empty, so tens of
thousands of idle sessions cost what they did before issue 12/13 (bench:
"memory per idle session")."""

from __future__ import annotations

import sys

from protocol import Stream, Watch
from reliability import PayloadReceived
from tests.test_bounds import World
from tests.test_presence_and_watch_bounds import come_and_go, last_presence
from tests.test_reliability import Peer, acks, connection, drain

EMPTY_DICT = sys.getsizeof({})


def test_a_drained_flight_keeps_no_dict_tables() -> None:
    """A dict keeps its table when emptied: the flight and the send times
    are fresh dicts again once everything sent is acked."""
    a, b = connection(), connection()
    a.send(b"hello", handle="h")
    for data in a.datagrams_to_send(0.0):
        b.receive_datagram(data, 0.01)
    drain(b)
    for data in b.datagrams_to_send(0.1):  # past the ack delay
        a.receive_datagram(data, 0.1)
    assert a.unacked_bytes == 0
    assert sys.getsizeof(a._inflight) == EMPTY_DICT
    assert sys.getsizeof(a._sent_times) == EMPTY_DICT


def test_the_out_of_order_set_exists_only_while_a_gap_is_open() -> None:
    conn, peer = connection(), Peer()
    assert conn._above is None
    conn.receive_datagram(peer.packet(Stream(1, 1, 1, 0, 1, b"second")), 0.0)
    assert conn._above == {1}
    assert [[tuple(r) for r in a.ranges] for a in acks(conn.datagrams_to_send(0.0))] == [[(1, 2)]]
    conn.receive_datagram(peer.packet(Stream(0, 1, 0, 0, 1, b"first")), 0.001)
    assert conn._above is None  # the gap closed: the set is dropped
    assert drain(conn) == [PayloadReceived(1, b"first"), PayloadReceived(1, b"second")]
    assert conn.seen(0) and conn.seen(1) and not conn.seen(2)


def test_presence_in_flight_is_kept_only_until_acked() -> None:
    """`Session.presence_sent` is None while no PRESENCE is unacked (an
    empty set alone is 216 bytes per session), and the states still arrive."""
    world = World()
    watcher = world.login("watcher")
    session = world.session_of(watcher)
    assert session.presence_sent is None
    watcher.send(Watch("friend"))
    world.step()
    come_and_go(world, "friend")
    world.run_until(lambda: session.presence_sent is None, 200, "the presence acked")
    assert not session.presence_due
    assert last_presence(watcher) == {"friend": False}
