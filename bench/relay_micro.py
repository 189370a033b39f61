"""The server's logic alone: `chat_server.Relay` driven in-process, no sockets.

    python -m bench.relay_micro [--messages N] [--sessions N] [--pairs N]

What it tells apart from the full benchmark:
- CPU per relayed message spent in the Relay's own code (receive, send,
  timers: MAC checks, decoding, acks, routing, encoding), without system
  calls, the store thread or the GIL handoffs between them;
- memory the Relay keeps per relayed message once everything is delivered
  and committed (tracemalloc, with a real store in a temporary directory as
  the server runs; anything above zero grows for as long as it runs);
- memory per idle logged-in session, by allocation site.

The clients are the benchmark's load clients (`loadgen.Sender`/`Receiver`)
over an in-memory "socket". For the CPU figure the Relay runs without a
store on disk (`data_dir` None: its `MemoryStore` completes every operation
at once, so ACCEPTs go out in the same pass): the SQLite thread is
measured by the full benchmark (`other_threads_cpu_us_per_msg`).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: F401  (puts the project root on sys.path)
from bench.loadgen import (
    RTO_MAX,
    RTO_MIN,
    Handshake,
    Peer,
    Receiver,
    SaltCache,
    Sender,
)
from chat_server import Outgoing, Relay, ServerConfig
from protocol import ProtocolError
from reliability import MAX_ACK_DELAY, PayloadReceived
from server_store import ServerStore, Sync

Addr = tuple[str, int]


class MemorySocket:
    """Stands in for a client's UDP socket: `send` keeps the datagram."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.out.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        raise BlockingIOError


def make_relay(data_dir: Path | None = None) -> Relay:
    """A Relay as the benchmark's server is configured; with `data_dir`, on a
    running store there (stop it with `relay.store.close()`)."""
    store = ServerStore(data_dir) if data_dir is not None else None
    relay = Relay(ServerConfig(
        data_dir=data_dir, iterations=4096, rto_min=RTO_MIN, rto_max=RTO_MAX,
        preauth_rate=1e9, preauth_burst=1e9, user_msg_rate=1e9, user_msg_burst=1e9,
        user_byte_rate=1e12, user_byte_burst=1e12, max_sessions=10**6,
        registration_rate=1e9, registration_burst=1e9, preauth_total_rate=1e9,
        preauth_total_burst=1e9,
    ), store=store)  # fmt: skip
    if store is not None:
        store.start()
    return relay


def settle(relay: Relay, now: float) -> Outgoing:
    """With a store: what the loop does after a pass (hand the writes over),
    then wait for them to commit and run their callbacks as the loop would;
    what that sends."""
    store = relay.store
    if not isinstance(store, ServerStore):
        return []
    synced: list[bool] = []
    store.submit(Sync(), lambda: synced.append(True))
    store.flush()
    deadline = time.monotonic() + 30
    while not synced:
        assert time.monotonic() < deadline, "the store did not commit in 30 s"
        time.sleep(0.0002)
        relay.store_done(now)
    return relay.datagrams_to_send(now)


def log_in(relay: Relay, names: Iterable[str], salted: SaltCache) -> dict[str, Handshake]:
    """Full SCRAM logins (registering the names), one address each: the
    client's core and the Relay, datagram for datagram."""
    done = {}
    for i, name in enumerate(names):
        addr = (f"10.0.{i >> 16}.1", 1024 + (i & 0xFFFF) % 64000)
        h = Handshake(name, MemorySocket(), salted=salted)  # type: ignore[arg-type]
        h.core.connect(time.monotonic())
        for _ in range(2):  # HELLO -> CHALLENGE, LOGIN -> WELCOME
            now = time.monotonic()
            for data in h.core.datagrams_to_send(now):
                relay.receive_datagram(data, addr, now)
            now = time.monotonic()
            for data, _ in relay.datagrams_to_send(now) + settle(relay, now):
                h.core.receive_datagram(data, now)
            h.check()
        if h.conn is None:
            raise RuntimeError(f"{name} did not log in")
        h.sock.addr = addr  # type: ignore[attr-defined]
        done[name] = h
    # Each client acks what its session was sent (its login ticket) once its
    # ack delay is over, as a real client does: unacked, it would stay in
    # flight on the server and be counted as the idle session's.
    time.sleep(MAX_ACK_DELAY)
    now = time.monotonic()
    for h in done.values():
        for data in h.core.datagrams_to_send(now):
            relay.receive_datagram(data, h.sock.addr, now)  # type: ignore[attr-defined]
    relay.datagrams_to_send(now)
    return done


#: Virtual time per pass of the exchange below: the clock every party sees
#: moves by this much per pass, however slow the pass (tracemalloc makes it
#: slow), so no retransmission timer fires because of the measuring itself.
STEP = 0.0002


def deliver(peer: Peer, data: bytes, now: float) -> None:
    now_ns = int(now * 1e9)
    if peer.conn.receive_datagram(data, now):
        while (event := peer.conn.next_event()) is not None:
            if isinstance(event, PayloadReceived):
                peer.on_payload(event.payload, now_ns)
    peer.dirty = True


def relay_messages(relay: Relay, senders: list[Sender], receivers: list[Receiver],
                   addrs: dict[int, Addr], count: int, window: int) -> float:  # fmt: skip
    """Relay `count` messages (per sender) to completion, then let the last
    acks go out; the Relay's CPU seconds."""
    peers: list[Peer] = [*senders, *receivers]
    by_addr = {addrs[id(p)]: p for p in peers}
    cpu = 0.0
    now = max(time.monotonic(), max(p.conn.get_timer() or 0.0 for p in peers))
    while any(s.sent < count or s.outstanding for s in senders):
        now += STEP
        for s in senders:
            s.fill(min(window, count - s.sent))
        cpu += _exchange(relay, peers, addrs, by_addr, now)
    for _ in range(5):  # idle passes past the ack delay: nothing left in flight
        now += 0.03
        cpu += _exchange(relay, peers, addrs, by_addr, now)
    return cpu


def _exchange(relay: Relay, peers: list[Peer], addrs: dict[int, Addr],
              by_addr: dict[Addr, Peer], now: float) -> float:  # fmt: skip
    """One pass: clients send, the Relay takes it all and answers, clients read."""
    for p in peers:
        if p.dirty or (p.timer is not None and p.timer <= now):
            p.pump(now)
    start = time.process_time()
    for p in peers:
        out: list[bytes] = p.sock.out  # type: ignore[attr-defined]
        addr = addrs[id(p)]
        for data in out:
            relay.receive_datagram(data, addr, now)
        out.clear()
    relay.handle_timer(now)
    replies = relay.datagrams_to_send(now)
    replies += settle(relay, now)
    cpu = time.process_time() - start
    for data, addr in replies:
        try:
            deliver(by_addr[addr], data, now)
        except ProtocolError:
            pass
    return cpu


def pairs_of(
    relay: Relay, n: int, window: int
) -> tuple[list[Sender], list[Receiver], dict[int, Addr]]:
    salted: SaltCache = {}
    names = [f"s{i}" for i in range(n)] + [f"r{i}" for i in range(n)]
    logged = log_in(relay, names, salted)
    addrs: dict[int, Addr] = {}
    senders, receivers = [], []
    for i in range(n):
        h = logged[f"s{i}"]
        assert h.conn is not None
        s = Sender(h.name, h.sock, h.conn, h.instance_id, f"r{i}", window, 64)
        addrs[id(s)] = h.sock.addr  # type: ignore[attr-defined]
        senders.append(s)
        h = logged[f"r{i}"]
        assert h.conn is not None
        r = Receiver(h.name, h.sock, h.conn, h.instance_id)
        addrs[id(r)] = h.sock.addr  # type: ignore[attr-defined]
        receivers.append(r)
    return senders, receivers, addrs


#: Only what the server allocated: traces with chat_server.py on their stack
#: (the clients here share the process and the protocol modules).
SERVER_SIDE = [tracemalloc.Filter(True, "*chat_server.py", all_frames=True)]
FRAMES = 12
TRACED_MESSAGES = 500  # per pair


def server_diff(snapshot: tracemalloc.Snapshot, base: tracemalloc.Snapshot,
                per: int, limit: int) -> tuple[float, float, list[dict[str, Any]]]:  # fmt: skip
    """Bytes and blocks kept per unit by the server since `base`, and the top
    sites. Bytes without blocks are containers that grew (a dict's table at
    its high-water mark), not objects kept."""
    stats = snapshot.filter_traces(SERVER_SIDE).compare_to(base.filter_traces(SERVER_SIDE),
                                                           "lineno")  # fmt: skip
    total = sum(s.size_diff for s in stats) / max(1, per)
    blocks = sum(s.count_diff for s in stats) / max(1, per)
    sites = []
    for stat in sorted(stats, key=lambda s: -s.size_diff)[:limit]:
        frame = stat.traceback[0]
        sites.append({"site": f"{Path(frame.filename).name}:{frame.lineno}",
                      "bytes_each": stat.size_diff / per,
                      "blocks_each": stat.count_diff / per})  # fmt: skip
    return total, blocks, sites


def measure(messages: int, sessions: int, pairs: int, window: int = 64) -> dict[str, Any]:
    """CPU per message, retained bytes per message, bytes per idle session."""
    out: dict[str, Any] = {"messages": messages * pairs, "sessions": sessions, "pairs": pairs}
    relay = make_relay()
    senders, receivers, addrs = pairs_of(relay, pairs, window)
    relay_messages(relay, senders, receivers, addrs, 200, window)  # warm up
    cpu = relay_messages(relay, senders, receivers, addrs, 200 + messages, window)
    done = sum(s.completed for s in senders) - 200 * pairs
    out["logic_us_per_msg"] = cpu / max(1, done) * 1e6
    out["lost"] = sum(s.sent for s in senders) - sum(r.received for r in receivers)

    # What stays behind per message once it is delivered, receipted and
    # committed: on a real store, as the server runs.
    with tempfile.TemporaryDirectory() as data_dir:
        relay = make_relay(Path(data_dir))
        senders, receivers, addrs = pairs_of(relay, pairs, window)
        relay_messages(relay, senders, receivers, addrs, 200, window)  # warm up
        gc.collect()
        tracemalloc.start(FRAMES)
        base = tracemalloc.take_snapshot()
        traced = min(messages, TRACED_MESSAGES)  # tracemalloc makes each one ~20x slower
        relay_messages(relay, senders, receivers, addrs, 200 + traced, window)
        gc.collect()
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        relay.store.close()
    out["retained_b_per_msg"], out["retained_blocks_per_msg"], out["retained_sites"] = server_diff(
        snap, base, traced * pairs, 5
    )

    # An idle logged-in session, by allocation site.
    relay = make_relay()
    log_in(relay, ["warm"], {})
    gc.collect()
    tracemalloc.start(FRAMES)
    base = tracemalloc.take_snapshot()
    log_in(relay, (f"u{i}" for i in range(sessions)), {})
    gc.collect()
    snap = tracemalloc.take_snapshot()
    with_cache, _, _ = server_diff(snap, base, sessions, 0)
    relay.desk.replies._replies.clear()  # the login reply cache, kept 240 s
    gc.collect()
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    out["session_b_with_reply_cache"] = with_cache
    out["session_b_tracemalloc"], _, out["session_sites"] = server_diff(snap, base, sessions, 10)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_micro")
    parser.add_argument("--messages", type=int, default=5000, help="per pair")
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    result = measure(args.messages, args.sessions, args.pairs)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"Relay logic, no sockets, {result['pairs']} pairs, {result['messages']:,} messages: "
          f"{result['logic_us_per_msg']:.1f} us CPU/msg, lost {result['lost']}")  # fmt: skip
    print(f"kept per relayed message after delivery: {result['retained_b_per_msg']:.0f} B in "
          f"{result['retained_blocks_per_msg']:.3f} blocks")  # fmt: skip
    for site in result["retained_sites"]:
        print(f"  {site['bytes_each']:8.1f} B  {site['blocks_each']:5.2f} blocks  {site['site']}")
    print(f"idle session ({result['sessions']:,} sessions): {result['session_b_tracemalloc']:.0f} B"
          f" of Python objects ({result['session_b_with_reply_cache']:.0f} B while the login "
          "reply cache still holds its WELCOME)")  # fmt: skip
    for site in result["session_sites"]:
        print(f"  {site['bytes_each']:8.1f} B  {site['blocks_each']:5.2f} blocks  {site['site']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
