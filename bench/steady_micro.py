"""A group copy at a steady rate, in-process: `chat_server.Relay` with one
sender writing `--rate` messages a second into a group of N members, no
sockets, a virtual clock that jumps to the next thing due.

    python -m bench.steady_micro [--members N] [--messages N] [--rate R]
                                 [--spread S] [--loss P] [--profile FILE]

What it tells apart from `python -m bench.fanout --modes steady` (real
processes, on a machine whose load moves the CPU figures by a third from
run to run):
- the Relay's own CPU per copy (thread time around the loop's calls to it:
  receiving, timers, sending, the pass's end), without system calls, the
  store thread or a cold cache after each sleep: `MemoryStore` completes
  every operation at once;
- the datagrams per copy each way and the loop passes per copy, as counts;
- on the virtual clock: send -> a member has the copy, and send -> the
  sender is told that member has it ("delivered by"), p50 / p99 over every
  (message, member); with `--loss P` each datagram is lost with chance P
  each way (seeded), and the relay's resent chunks per copy are counted;
- with `--profile FILE`, cProfile around those calls alone (the members'
  side is not in it), for `pstats`.

The members are clients of today's rule, as `bench.fanout`'s are: each acks
a datagram of group entries alone late (`client_core.group_entries_only`)
and holds its receipts by `client_core.GroupReceipts`; the sender is an
ordinary client. A pass of the "loop" is what the socket loop does once it
wakes: the datagrams that came, the timers due, the sends, the store's
batch. Datagrams reach member i `--spread` x (i mod 10) after they leave
(the few busy load processes of `bench.fanout` answer over some
milliseconds, so receipts come in several passes, not one).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: F401  (puts the project root on sys.path)
from bench.loadgen import SaltCache, make_text, send_receipts
from bench.relay_micro import log_in, make_relay
from chat_server import Relay
from client_core import GroupReceipts, group_entries_only
from protocol import (
    GROUP_REQUEST_USERS_MAX,
    GroupAction,
    GroupBatch,
    GroupDeliver,
    GroupEvent,
    GroupReached,
    GroupRequest,
    GroupResult,
    Message,
    MsgId,
    Send,
    conversation_stream,
    decode_message,
    encode_message,
)
from reliability import Connection, PayloadReceived

try:  # (how late a member acks group entries: a checkout before has one rule)
    from reliability import GROUP_ENTRIES_LATE, LateAck

    GROUP_LATE: tuple[LateAck, ...] = (GROUP_ENTRIES_LATE,)
except ImportError:
    GROUP_LATE = ()

GROUP = "steady"
STREAM = conversation_stream("#" + GROUP)
#: `--spread`'s default: member i gets the relay's datagrams 0.5 ms x (i mod 10) late.
SPREAD = 0.0005
Addr = tuple[str, int]


class Client:
    """A logged-in client: its Connection, its held receipts, what it got."""

    def __init__(self, conn: Connection, addr: Addr, lag: float, member: bool) -> None:
        self.conn = conn
        self.addr = addr
        self.lag = lag
        self.member = member  # (a member acks group entries late; the sender as ever)
        self.held = GroupReceipts()
        self.out: list[bytes] = []
        self.timer: float | None = None
        self.dirty = False
        self.got: list[int] = []  # group_seq of each message, as it came
        self.got_at: dict[int, float] = {}  # client seq -> when it came
        self.results: dict[int, int] = {}
        self.reached: dict[int, int] = {}  # client seq -> members who have it
        self.reached_at: list[tuple[int, float]] = []  # (client seq, when told), per name

    def take(self, data: bytes, now: float) -> None:
        if self.member:  # as the chat client takes them
            taken = self.conn.receive_datagram(data, now, group_entries_only, *GROUP_LATE)
        else:
            taken = self.conn.receive_datagram(data, now)
        if not taken:
            return
        self.dirty = True
        while (event := self.conn.next_event()) is not None:
            if isinstance(event, PayloadReceived):
                self.on_message(decode_message(event.payload), now)

    def on_message(self, message: Message, now: float) -> None:
        if isinstance(message, GroupBatch):
            for entry in message.entries:
                self.on_message(entry, now)
        elif isinstance(message, GroupDeliver | GroupEvent):
            if isinstance(message, GroupDeliver):
                if message.msg_id.client_seq not in self.got_at:  # (shown once)
                    self.got.append(message.group_seq)
                    self.got_at[message.msg_id.client_seq] = now
            self.held.add(message.server_msg_id, now)
        elif isinstance(message, GroupResult):
            self.results[message.request_id] = message.code
        elif isinstance(message, GroupReached):
            seq = message.msg_id.client_seq
            self.reached[seq] = self.reached.get(seq, 0) + len(message.by)
            self.reached_at.extend((seq, now) for _ in message.by)

    def flush(self, now: float) -> None:
        held = self.held
        if held.due is not None and held.ready(now, self.conn.ack_due):
            send_receipts(self.conn, held.take())
        if self.timer is not None and self.timer <= now:
            self.conn.handle_timer(now)
        self.out.extend(self.conn.datagrams_to_send(now))
        self.timer = self.conn.get_timer()
        if held.due is not None and (self.timer is None or held.due < self.timer):
            self.timer = held.due
        self.dirty = False


class World:
    """The relay and its clients on a virtual clock; `wire`: the relay's
    datagrams on their way, (due, addr, data), in the order sent."""

    def __init__(self, relay: Relay, clients: list[Client], loss: float = 0.0) -> None:
        self.relay = relay
        self.loss = loss
        self.lose = random.Random(14).random
        self.clients = clients
        self.by_addr = {c.addr: c for c in clients}
        self.now = 0.0
        self.wire: list[tuple[float, Addr, bytes]] = []
        self.cpu = 0.0
        self.datagrams_in = self.datagrams_out = self.passes = 0
        self.profile: cProfile.Profile | None = None

    def next_due(self, also: float | None) -> float:
        """When something next happens: a client's timer, a datagram
        arriving, the relay's timer or `also` (the sender's next message);
        now if a client has something to send."""
        if any(c.dirty for c in self.clients):
            return self.now
        candidates = [c.timer for c in self.clients if c.timer is not None]
        if self.wire:
            candidates.append(min(due for due, _, _ in self.wire))
        timer = self.relay.get_timer()
        if timer is not None:
            candidates.append(timer)
        if also is not None:
            candidates.append(also)
        return min(candidates) if candidates else self.now + 1.0

    def step(self, until: float | None = None) -> None:
        """Move the clock to the next thing due (not past `until`) and run
        it: deliveries, the clients' sends, then one pass of the relay."""
        self.now = max(self.now, min(self.next_due(until), until or float("inf")))
        now = self.now
        if self.wire:
            arrived = [w for w in self.wire if w[0] <= now]
            self.wire = [w for w in self.wire if w[0] > now]
            for _, addr, data in arrived:
                if not self.loss or self.lose() >= self.loss:
                    self.by_addr[addr].take(data, now)
        batch: list[tuple[bytes, Addr]] = []
        for c in self.clients:
            if c.dirty or (c.timer is not None and c.timer <= now) or c.held.due is not None:
                c.flush(now)
            if c.out:
                batch.extend((data, c.addr) for data in c.out
                             if not self.loss or self.lose() >= self.loss)  # fmt: skip
                c.out.clear()
        relay = self.relay
        timer = relay.get_timer()
        if not batch and (timer is None or timer > now):
            return
        profile = self.profile
        start = time.thread_time()
        if profile is not None:
            profile.enable()
        if batch:
            relay.receive_datagrams(batch, now)
        relay.handle_timer(now)
        out = relay.datagrams_to_send(now)
        relay.flush_store(now)
        relay.get_timer()  # (the loop asks before it sleeps)
        if profile is not None:
            profile.disable()
        self.cpu += time.thread_time() - start
        self.passes += 1
        self.datagrams_in += len(batch)
        self.datagrams_out += len(out)
        for data, addr in out:
            self.wire.append((now + self.by_addr[addr].lag, addr, data))


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))] if values else 0.0


def measure(members: int, messages: int, rate: float, spread: float, loss: float = 0.0,
            profile: Path | None = None) -> dict[str, Any]:  # fmt: skip
    relay = make_relay()
    # The fan-out budget would bound the copies per second (as in bench.fanout).
    relay.config.max_fanout_rate = relay.config.max_fanout_burst = 1e12
    names = ["owner"] + [f"m{i}" for i in range(members - 1)]
    logged = log_in(relay, names, SaltCache())
    clients = []
    for i, name in enumerate(names):
        h = logged[name]
        assert h.conn is not None
        lag = spread * (i % 10) if i else 0.0
        clients.append(Client(h.conn, h.sock.addr, lag, member=i > 0))  # type: ignore[attr-defined]
    owner, rest = clients[0], clients[1:]
    instance_id = logged["owner"].instance_id
    world = World(relay, clients)
    world.now = max(time.monotonic(), *(c.conn.get_timer() or 0.0 for c in clients)) + 1.0
    chunks = [names[1:][i : i + GROUP_REQUEST_USERS_MAX]
              for i in range(0, len(rest), GROUP_REQUEST_USERS_MAX)]  # fmt: skip
    for request_id, chunk in enumerate(chunks, 1):
        action = GroupAction.CREATE if request_id == 1 else GroupAction.ADD
        request = GroupRequest(request_id, action, GROUP, tuple(chunk))
        owner.conn.send(encode_message(request), STREAM)
        owner.dirty = True
        for _ in range(20_000):
            if request_id in owner.results:
                break
            world.step()
        assert owner.results.get(request_id) == 0, f"group request {request_id}"
    settle = world.now + 2.0
    while world.now < settle:  # the changes' receipts and acks settle
        world.step(settle)
    world.cpu = 0.0
    world.datagrams_in = world.datagrams_out = world.passes = 0
    world.loss = loss
    resent0 = sum(s.conn.chunks_resent for s in relay.sessions.values())
    sent_at: dict[int, float] = {}
    profiler = cProfile.Profile() if profile is not None else None
    world.profile = profiler
    copies0 = sum(len(c.got) for c in rest)
    start = world.now
    next_send = start
    for seq in range(1, messages + 1):
        while world.now < next_send:
            world.step(next_send)
        text = make_text(time.monotonic_ns(), seq)
        owner.conn.send(encode_message(Send(MsgId(instance_id, seq), "#" + GROUP, text)), STREAM)
        owner.dirty = True
        sent_at[seq] = world.now
        next_send += 1.0 / rate
    end = next_send + (10.0 if loss else 1.0)  # the last receipts, "delivered by", acks
    while world.now < end:
        world.step(end)
    resent = sum(s.conn.chunks_resent for s in relay.sessions.values()) - resent0
    copy_ms = [(c.got_at[seq] - at) * 1e3 for c in rest for seq, at in sent_at.items()
               if seq in c.got_at]  # fmt: skip
    told_ms = [(when - sent_at[seq]) * 1e3 for seq, when in owner.reached_at if seq in sent_at]
    if profiler is not None and profile is not None:
        profiler.dump_stats(str(profile))
    copies = sum(len(c.got) for c in rest) - copies0
    return {
        "members": members, "messages": messages, "rate": rate, "spread": spread,
        "copies": copies, "copies_expected": messages * len(rest),
        "in_order": all(c.got == sorted(set(c.got)) for c in rest),
        "delivered_by": sum(owner.reached.values()),
        "relay_us_per_copy": world.cpu / max(1, copies) * 1e6,
        "datagrams_in_per_copy": world.datagrams_in / max(1, copies),
        "datagrams_out_per_copy": world.datagrams_out / max(1, copies),
        "passes_per_copy": world.passes / max(1, copies),
        "loss": loss, "relay_resent_per_copy": resent / max(1, copies),
        "copy_p50_ms": percentile(copy_ms, 50), "copy_p99_ms": percentile(copy_ms, 99),
        "told_p50_ms": percentile(told_ms, 50), "told_p99_ms": percentile(told_ms, 99),
        "virtual_s": world.now - start,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.steady_micro",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--members", type=int, default=100, help="the group's size, owner too")
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10.0, help="the sender's messages a second")
    parser.add_argument("--spread", type=float, default=SPREAD,
                        help=f"member i gets datagrams this x (i mod 10) late, in seconds "
                             f"(default {SPREAD:g})")  # fmt: skip
    parser.add_argument(
        "--loss",
        type=float,
        default=0.0,
        help="each datagram is lost with this chance, each way (default 0)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs; the figures of each")
    parser.add_argument(
        "--profile", type=Path, metavar="FILE", help="cProfile of the relay's calls in the last run"
    )
    parser.add_argument("--json", action="store_true", help="the figures as JSON on stdout")
    args = parser.parse_args(argv)
    results = []
    for run in range(args.runs):
        last = run == args.runs - 1
        result = measure(args.members, args.messages, args.rate, args.spread, args.loss,
                         args.profile if last else None)  # fmt: skip
        results.append(result)
        if not args.json:
            print(f"{result['members']} members, {result['rate']:g} msg/s: "
                  f"{result['relay_us_per_copy']:.2f} us of Relay CPU per copy; per copy "
                  f"{result['datagrams_in_per_copy']:.3f} datagrams in, "
                  f"{result['datagrams_out_per_copy']:.3f} out, "
                  f"{result['passes_per_copy']:.3f} passes; {result['copies']} of "
                  f"{result['copies_expected']} copies, in order: {result['in_order']}, "
                  f"delivered-by names {result['delivered_by']}; send -> copy p50/p99 "
                  f"{result['copy_p50_ms']:.0f} / {result['copy_p99_ms']:.0f} ms, -> sender "
                  f"told {result['told_p50_ms']:.0f} / {result['told_p99_ms']:.0f} ms; "
                  f"loss {result['loss']:g}: {result['relay_resent_per_copy']:.3f} "
                  f"resent per copy", flush=True)  # fmt: skip
    if args.json:
        print(json.dumps(results, indent=2))
    return 0 if all(r["copies"] == r["copies_expected"] and r["in_order"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
