"""The relay's timer wake-ups at a steady rate into a group (issue 14):
`chat_server.Relay` in-process, no sockets, a virtual clock that jumps from
event to event as a sleeping loop would.

    python -m bench.timer_wakeups [--members N] [--rate R] [--seconds S] [--json]

The loop here sleeps until the next datagram arrives or `Relay.get_timer`
is due, as `ChatServer.serve_forever` does, so it counts what the real loop
would do: the passes woken by the relay's timers, and of those the passes
woken for a session's timer-heap entry that did nothing (no datagram out,
no session ended: the entry was set for a chunk's retransmission or a
delayed ack that the traffic since made unnecessary). Each such pass costs
the real server a `select` return, a pass and a look at the session's
connection. The members hold their acks and receipts as the chat client
does (`client_core.group_entries_only`, `GroupReceipts`), as bench/fanout.py's
do; the relay has the retransmission timers bench/fanout.py gives its
server (`TIMERS`: --rto-min 0.2). Datagrams take `LATENCY` each way.

It runs against any checkout of the server (the relay's counters it does
not have print as 0): `PYTHONPATH=CHECKOUT python bench/timer_wakeups.py`.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/timer_wakeups.py`
    try:
        import chat_server  # noqa: F401  (a checkout on PYTHONPATH: measure that one)
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_server import Relay
from client_core import GroupReceipts, group_entries_only
from protocol import (
    GROUP_REQUEST_USERS_MAX,
    GroupAction,
    GroupDeliver,
    GroupEvent,
    GroupRequest,
    GroupResult,
    Message,
    MsgId,
    Receipt,
    Receipts,
    Send,
    batches,
    conversation_stream,
    decode_message,
    encode_message,
    unbatch,
)
from reliability import Connection, PayloadReceived

GROUP = "wake"
STREAM = conversation_stream("#" + GROUP)
LATENCY = 0.0005  # seconds a datagram takes each way (loopback and a load process's pass) ...
#: ... and up to this much more, spread over the members: bench.fanout's load
#: processes answer their members one after another, so the members' datagrams
#: (and the relay's timers set by them) do not all fall on one instant.
SPREAD = 0.005
RATE = 10.0  # messages a second (bench.fanout's steady phase)
Addr = tuple[str, int]


class Party:
    """A logged-in client of the group (a member, or the owner who posts):
    its Connection, the group receipts it holds (`GroupReceipts`, as the chat
    client), what it got."""

    def __init__(self, name: str, conn: Connection, addr: Addr, instance_id: int) -> None:
        self.name = name
        self.conn = conn
        self.addr = addr
        self.instance_id = instance_id
        self.held = GroupReceipts()
        self.receipts: list[int] = []  # to send now (membership changes, for the owner)
        self.timer: float | None = None
        self.dirty = False
        self.latency = LATENCY  # each way
        self.got: list[int] = []  # group seqs of the messages, as they came
        self.arrived: dict[str, float] = {}  # text -> when it came
        self.results: dict[int, int] = {}

    def take(self, data: bytes, now: float) -> None:
        if not self.conn.receive_datagram(data, now, group_entries_only):
            return
        self.dirty = True
        for event in self.conn.take_events():
            if isinstance(event, PayloadReceived):
                for message in unbatch(decode_message(event.payload)):
                    self.on_message(message, now)

    def on_message(self, message: Message, now: float) -> None:
        if isinstance(message, GroupDeliver | GroupEvent):
            if isinstance(message, GroupDeliver):
                self.got.append(message.group_seq)
                self.arrived.setdefault(message.text, now)
            self.held.add(message.server_msg_id, now)
        elif isinstance(message, GroupResult):
            self.results[message.request_id] = message.code

    def flush(self, now: float) -> list[bytes]:
        """What the client sends now (bench/fanout.py's `Session.flush`)."""
        held = self.held
        if held.due is not None and (held.ready(now, self.conn.ack_due) or self.receipts):
            self.receipts.extend(held.take())
        if self.receipts:
            receipts, self.receipts = self.receipts, []
            for part in batches(receipts):
                message = Receipt(part[0]) if len(part) == 1 else Receipts(tuple(part))
                self.conn.send(encode_message(message), lazy_ack=True)
        if self.timer is not None and self.timer <= now:
            self.conn.handle_timer(now)
        out = self.conn.datagrams_to_send(now)
        self.timer = self.conn.get_timer()
        if held.due is not None and (self.timer is None or held.due < self.timer):
            self.timer = held.due
        self.dirty = False
        return out


class SteadyLoop:
    """The relay and its clients on one virtual clock. `run` moves the clock
    to the next event (a datagram arriving, a client's timer, a post, or
    `Relay.get_timer`) and counts the relay's passes by what woke them."""

    def __init__(self, relay: Relay, owner: Party, members: list[Party], now: float,
                 spread: float = SPREAD) -> None:  # fmt: skip
        self.relay = relay
        self.owner = owner
        self.members = members
        self.parties = [owner, *members]
        self.by_addr = {p.addr: p for p in self.parties}
        self.now = now
        for n, member in enumerate(members):
            member.latency = LATENCY + spread * n / len(members)
        # Datagrams on their way: (arrival, order, addressee or None for the relay, data, from).
        self.wire: list[tuple[float, int, Party | None, bytes, Addr]] = []
        self._order = itertools.count()
        self.passes = 0  # the relay's passes
        self.timer_passes = 0  # woken by its timer, no datagram in
        self.session_timer_passes = 0  # of those, for a session's heap entry
        self.idle_passes = 0  # of those, nothing sent and no session ended
        self.most_entries = 0  # the relay's timer heap at its largest
        self.posted: dict[str, float] = {}  # text -> when the owner posted it
        self.relay_cpu = 0.0

    def _relay_pass(self, batch: list[tuple[bytes, Addr]], now: float) -> None:
        relay = self.relay
        self.passes += 1
        woken_by_timer = not batch
        steps: list[int] = getattr(relay, "_expiry_steps", [])  # (a checkout before: `_timers`)
        session_entry = (bool(relay._timers) and relay._timers[0][0] <= now) or (
            bool(steps) and steps[0] * relay._expiry_grid <= now
        )
        sessions = len(relay.sessions)
        start = time.process_time()
        if batch:
            relay.receive_datagrams(batch, now)
        relay.handle_timer(now)
        out = relay.datagrams_to_send(now)
        relay.flush_store(now)
        self.relay_cpu += time.process_time() - start
        if woken_by_timer:
            self.timer_passes += 1
            if session_entry:
                self.session_timer_passes += 1
                if not out and len(relay.sessions) == sessions:
                    self.idle_passes += 1
        for data, addr in out:
            party = self.by_addr.get(addr)
            if party is not None:
                self.deliver(party, data, now)
        if len(relay._timers) > self.most_entries:
            self.most_entries = len(relay._timers)

    def deliver(self, party: Party, data: bytes, now: float) -> None:
        """Put a datagram of the relay's on its way to `party`."""
        heapq.heappush(self.wire, (now + party.latency, next(self._order), party, data,
                                   party.addr))  # fmt: skip

    def _send(self, party: Party, datagrams: Iterable[bytes], now: float) -> None:
        at = now + party.latency
        for data in datagrams:
            heapq.heappush(self.wire, (at, next(self._order), None, data, party.addr))

    def step(self, posts: list[float] | None = None, until: float | None = None) -> None:
        """Move to the next event (at the latest `until`) and handle
        everything due then; `posts`: when the owner posts (popped as done)."""
        wire = self.wire
        candidates = []
        if wire:
            candidates.append(wire[0][0])
        timer = self.relay.get_timer()
        if timer is not None:
            candidates.append(timer)
        candidates.extend(p.timer for p in self.parties if p.timer is not None)
        if any(p.dirty for p in self.parties):
            candidates.append(self.now)  # a client has something to send now
        if posts:
            candidates.append(posts[0])
        if until is not None:
            candidates.append(until)
        now = max(self.now, min(candidates)) if candidates else self.now + 1.0
        self.now = now
        batch: list[tuple[bytes, Addr]] = []
        while wire and wire[0][0] <= now:
            _, _, party, data, addr = heapq.heappop(wire)
            if party is None:
                batch.append((data, addr))
            else:
                party.take(data, now)
        while posts and posts[0] <= now:
            posts.pop(0)
            self.post(now)
        for party in self.parties:
            if party.dirty or (party.timer is not None and party.timer <= now):
                self._send(party, party.flush(now), now)
        relay_timer = self.relay.get_timer()
        if batch or (relay_timer is not None and relay_timer <= now):
            self._relay_pass(batch, now)

    def post(self, now: float) -> None:
        owner = self.owner
        self._seq = getattr(self, "_seq", 0) + 1
        text = f"steady {self._seq}"
        self.posted[text] = now
        send = Send(MsgId(owner.instance_id, self._seq), "#" + GROUP, text)
        owner.conn.send(encode_message(send), STREAM)
        owner.dirty = True

    def make_group(self) -> None:
        """The owner makes the group of every member (256 names a request)."""
        names = [m.name for m in self.members]
        chunks = [names[i : i + GROUP_REQUEST_USERS_MAX]
                  for i in range(0, len(names), GROUP_REQUEST_USERS_MAX)]  # fmt: skip
        for request_id, chunk in enumerate(chunks, 1):
            action = GroupAction.CREATE if request_id == 1 else GroupAction.ADD
            request = GroupRequest(request_id, action, GROUP, tuple(chunk))
            self.owner.conn.send(encode_message(request), STREAM)
            self.owner.dirty = True
            for _ in range(100_000):
                if request_id in self.owner.results:
                    break
                self.step()
            if self.owner.results.get(request_id) != 0:
                raise RuntimeError(f"group request {request_id}: {self.owner.results}")
        self.settle(2.0)

    def settle(self, seconds: float) -> None:
        """Run with nothing posted for `seconds` (receipts and acks settle)."""
        end = self.now + seconds
        while self.now < end:
            self.step(until=end)

    def reset(self) -> None:
        self.passes = self.timer_passes = self.session_timer_passes = self.idle_passes = 0
        self.relay_cpu = 0.0
        self.most_entries = len(self.relay._timers)
        self.relay.stats.clear()

    def run(self, seconds: float, rate: float = RATE) -> dict[str, Any]:
        """Post at `rate` for `seconds`, then let it settle; the counts."""
        self.reset()
        copies0 = sum(len(m.got) for m in self.members)
        start = self.now
        count = int(seconds * rate)
        posts = [start + (n + 1) / rate for n in range(count)]
        while posts:
            self.step(posts)
        self.settle(1.0)
        copies = sum(len(m.got) for m in self.members) - copies0
        # Post -> the last member has it, per message (virtual ms).
        last = sorted(
            (max(m.arrived.get(text, float("inf")) for m in self.members) - at) * 1000
            for text, at in self.posted.items()
        )
        stats = self.relay.stats
        per = 1 / max(1, copies)
        return {
            "members": len(self.members), "rate": rate, "messages": count, "copies": copies,
            "every_copy": copies == count * len(self.members),
            "passes_per_copy": self.passes * per,
            "timer_passes_per_copy": self.timer_passes * per,
            "session_timer_passes_per_copy": self.session_timer_passes * per,
            "idle_passes_per_copy": self.idle_passes * per,
            "timers_run_per_copy": stats["timers_run"] * per,
            "timers_idle_per_copy": stats["timers_idle"] * per,
            "timers_moved_per_copy": stats["timers_moved"] * per,
            "heap_entries": len(self.relay._timers), "most_entries": self.most_entries,
            "sessions": len(self.relay.sessions),
            "relay_us_per_copy": self.relay_cpu * per * 1e6,
            "last_member_p50_ms": last[len(last) // 2] if last else 0.0,
            "last_member_max_ms": last[-1] if last else 0.0,
        }  # fmt: skip


def measure(members: int, seconds: float, rate: float) -> dict[str, Any]:
    from bench.loadgen import SaltCache
    from bench.relay_micro import log_in, make_relay

    relay = make_relay()
    relay.config.rto_min, relay.config.rto_max = 0.2, 60.0  # bench.fanout's TIMERS
    names = ["owner"] + [f"m{i}" for i in range(members - 1)]
    logged = log_in(relay, names, SaltCache())
    parties = []
    for name in names:
        h = logged[name]
        assert h.conn is not None
        h.conn.rto_min, h.conn.rto_max = 0.2, 60.0
        parties.append(Party(name, h.conn, h.sock.addr, h.instance_id))  # type: ignore[attr-defined]
    for session in relay.sessions.values():
        session.conn.rto_min, session.conn.rto_max = 0.2, 60.0
    now = max(time.monotonic(), *(p.conn.get_timer() or 0.0 for p in parties)) + 1.0
    loop = SteadyLoop(relay, parties[0], parties[1:], now)
    loop.make_group()
    return loop.run(seconds, rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.timer_wakeups",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--members", type=int, default=100, help="the group's size, owner too")
    parser.add_argument("--rate", type=float, default=RATE, help="messages a second")
    parser.add_argument("--seconds", type=float, default=10.0, help="of posting (virtual)")
    parser.add_argument("--json", action="store_true", help="the figures as JSON on stdout")
    args = parser.parse_args(argv)
    r = measure(args.members, args.seconds, args.rate)
    if args.json:
        print(json.dumps(r))
        return 0
    print(
        f"{r['members']:,} members, {r['rate']:g} msg/s, {r['messages']} messages, "
        f"{r['copies']:,} copies (every one: {r['every_copy']}); per copy: "
        f"{r['passes_per_copy']:.3f} relay passes, {r['timer_passes_per_copy']:.3f} woken by "
        f"a timer, {r['session_timer_passes_per_copy']:.3f} by a session's, "
        f"{r['idle_passes_per_copy']:.3f} of those for nothing; session timers "
        f"ran {r['timers_run_per_copy']:.3f}, idle {r['timers_idle_per_copy']:.3f}, moved "
        f"{r['timers_moved_per_copy']:.3f}; {r['relay_us_per_copy']:.1f} us of Relay CPU "
        f"per copy; timer heap {r['heap_entries']} entries for {r['sessions']} sessions at the "
        f"end, {r['most_entries']} at most; post -> last member p50 / max "
        f"{r['last_member_p50_ms']:.1f} / {r['last_member_max_ms']:.1f} ms (virtual)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
