"""The group fan-out alone: `chat_server.Relay` in-process, one sender flat
out into a group of N members, no sockets, a virtual clock.

    python -m bench.fanout_micro [--members N] [--messages N] [--window N|client]
                                 [--receipt-delay S] [--member-lag S] [--count-encodings]

What it tells apart from `python -m bench.fanout` (real processes, whose
figures a loaded machine blurs):
- the Relay's own CPU per delivered copy (process time around its calls:
  decoding, MACs, acks, the fan-out, the receipts; no system calls, no store
  thread: `MemoryStore` completes every operation at once);
- the datagrams per copy each way, which decide most of a copy's cost in
  the real server (each one a `recvfrom` or `sendto` besides).

The members hold their receipts of group entries as the chat client does
(`client_core.GROUP_RECEIPT_DELAY` after the datagram that brought the first;
`--receipt-delay 0`: at once, as clients did before), and ack as the
client's `reliability.Connection` does. The clock moves by `STEP` per pass
however long a pass takes, so timers (delayed acks, receipt holds, the
relay's fan-out hold) run as on an idle machine, not as on this one; it
also moves by the Relay's CPU time of each pass (a busy server sends later). It runs
against any checkout of the server: the receipt rule is written out here.

By the client's rule (`--window client`) the relay's datagrams reach the
members `--member-lag` late (default 1 ms per member: the busy load
processes of `bench.fanout`), so their windows fill and they read the
group's log in pages, as there; it prints the reads of the log the relay
made (and with `--count-encodings` the group entries it encoded per copy).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: F401  (puts the project root on sys.path)
import chat_server
from bench.loadgen import SaltCache, make_text
from bench.relay_micro import MemorySocket, log_in, make_relay
from chat_server import Relay
from protocol import (
    GROUP_REQUEST_USERS_MAX,
    GroupAction,
    GroupDeliver,
    GroupEvent,
    GroupReached,
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
)
from reliability import MAX_WINDOW, Connection, PayloadReceived
from server_store import Read, ReadGroupLog

try:
    from client_core import GROUP_RECEIPT_DELAY
except ImportError:  # a checkout before lazy group receipts
    GROUP_RECEIPT_DELAY = 0.0
try:
    from protocol import GroupBatch
except ImportError:  # a checkout before GROUP_BATCH (kind 31)
    GroupBatch = None  # type: ignore[assignment,misc]

GROUP = "micro"
STREAM = conversation_stream("#" + GROUP)
#: Virtual time per pass: every party's clock moves this much per pass.
STEP = 0.0005
#: `--member-lag`'s default with `--window client`, per member: the members'
#: load processes in `bench.fanout` are busy (a few processes work through
#: every member's datagrams, on a machine the server shares), so receipts
#: come late, windows fill and members read the group's log in pages, as
#: there; without a lag the members here answer at once and never do.
CLIENT_LAG_PER_MEMBER = 0.001
Addr = tuple[str, int]


class Member:
    """A logged-in client of the group: its Connection, the receipts it
    holds (`delay` after the first), what it got."""

    def __init__(self, name: str, conn: Connection, addr: Addr, delay: float) -> None:
        self.name = name
        self.conn = conn
        self.addr = addr
        self.delay = delay
        self.sock = MemorySocket()
        self.held: list[int] = []
        self.due: float | None = None
        self.timer: float | None = None
        self.dirty = False
        self.got: list[int] = []  # group_seq of each message, as it came
        self.results: dict[int, int] = {}
        self.reached: dict[int, int] = {}  # client seq -> members who have it
        self.instance_id = 0

    def take(self, data: bytes, now: float) -> None:
        if not self.conn.receive_datagram(data, now):
            return
        self.dirty = True
        for event in self.conn.take_events():
            if isinstance(event, PayloadReceived):
                self.on_message(decode_message(event.payload), now)

    def on_message(self, message: Message, now: float) -> None:
        if GroupBatch is not None and isinstance(message, GroupBatch):
            for entry in message.entries:  # each as if it came alone
                self.on_message(entry, now)
        elif isinstance(message, GroupDeliver | GroupEvent):
            if isinstance(message, GroupDeliver):
                self.got.append(message.group_seq)
            self.held.append(message.server_msg_id)
            if self.due is None:
                self.due = now + self.delay
        elif isinstance(message, GroupResult):
            self.results[message.request_id] = message.code
        elif isinstance(message, GroupReached):
            seq = message.msg_id.client_seq
            self.reached[seq] = self.reached.get(seq, 0) + len(message.by)

    def flush(self, now: float) -> None:
        if self.due is not None and now >= self.due:
            held, self.held, self.due = self.held, [], None
            for part in batches(held):
                message = Receipt(part[0]) if len(part) == 1 else Receipts(tuple(part))
                self.conn.send(encode_message(message))
        if self.timer is not None and self.timer <= now:
            self.conn.handle_timer(now)
        self.sock.out.extend(self.conn.datagrams_to_send(now))
        self.timer = self.conn.get_timer()
        if self.due is not None and (self.timer is None or self.due < self.timer):
            self.timer = self.due
        self.dirty = False


class World:
    def __init__(self, relay: Relay, members: list[Member], lag: float = 0.0) -> None:
        self.relay = relay
        self.members = members
        self.by_addr = {m.addr: m for m in members}
        self.now = 0.0
        self.cpu = 0.0
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.lag = lag
        # The relay's datagrams on their way to the members: (due, addr, data).
        self.wire: collections.deque[tuple[float, Addr, bytes]] = collections.deque()
        self.prompt: Addr | None = None  # the sender's: no lag (its own process)

    def step(self) -> None:
        self.now += STEP
        now = self.now
        relay = self.relay
        wire = self.wire
        while wire and wire[0][0] <= now:
            _, addr, data = wire.popleft()
            self.by_addr[addr].take(data, now)
        for m in self.members:
            if m.dirty or (m.timer is not None and m.timer <= now):
                m.flush(now)
        start = time.process_time()
        for m in self.members:
            for data in m.sock.out:
                relay.receive_datagram(data, m.addr, now)
                self.datagrams_in += 1
            m.sock.out.clear()
        timer = relay.get_timer()
        if timer is not None and timer <= now:
            relay.handle_timer(now)
        out = relay.datagrams_to_send(now)
        relay.flush_store(now)
        busy = time.process_time() - start
        self.cpu += busy
        # The server's clock moves while it works: what it sends leaves
        # that much later, and what the members send meanwhile waits.
        self.now += busy
        self.datagrams_out += len(out)
        if self.lag:
            due = now + self.lag
            prompt = self.prompt
            for data, addr in out:
                if addr == prompt:
                    self.by_addr[addr].take(data, now)
                else:
                    wire.append((due, addr, data))
            return
        for data, addr in out:
            self.by_addr[addr].take(data, now)


def measure(members: int, messages: int, window: int | None, delay: float,
            lag: float = 0.0, count_encodings: bool = False) -> dict[str, Any]:  # fmt: skip
    relay = make_relay()
    # The fan-out budget would bound the copies per second (as in bench.fanout).
    relay.config.max_fanout_rate = relay.config.max_fanout_burst = 1e12
    names = ["owner"] + [f"m{i}" for i in range(members - 1)]
    logged = log_in(relay, names, SaltCache())
    people = []
    for name in names:
        h = logged[name]
        assert h.conn is not None
        member = Member(name, h.conn, h.sock.addr, delay)  # type: ignore[attr-defined]
        member.instance_id = h.instance_id
        people.append(member)
    world = World(relay, people)
    world.now = max(time.monotonic(), *(m.conn.get_timer() or 0.0 for m in people)) + 1.0
    owner, rest = people[0], people[1:]
    chunks = [names[1:][i : i + GROUP_REQUEST_USERS_MAX]
              for i in range(0, len(rest), GROUP_REQUEST_USERS_MAX)]  # fmt: skip
    for request_id, chunk in enumerate(chunks, 1):
        action = GroupAction.CREATE if request_id == 1 else GroupAction.ADD
        owner.conn.send(encode_message(GroupRequest(request_id, action, GROUP, tuple(chunk))),
                        STREAM)  # fmt: skip
        owner.dirty = True
        for _ in range(20_000):
            if request_id in owner.results:
                break
            world.step()
        assert owner.results.get(request_id) == 0, f"group request {request_id}"
    for _ in range(400):  # the changes' receipts and acks settle
        world.step()
    world.cpu = 0.0
    world.datagrams_in = world.datagrams_out = 0
    world.lag = lag
    world.prompt = owner.addr
    start = world.now
    # The reads of the group's log (members paging), counted on their way
    # to the store (a few per member: too few to weigh on the figures).
    log_reads = 0
    submit = relay.store.submit

    def counted(op: Any, then: Any = None) -> Any:
        nonlocal log_reads
        if isinstance(op, Read) and isinstance(op.query, ReadGroupLog):
            log_reads += 1
        return submit(op, then) if then is not None else submit(op)

    relay.store.submit = counted  # type: ignore[method-assign]
    encoded = [0]
    if count_encodings:
        setattr(chat_server, "encode_message", counting_encoder(encoded))  # noqa: B010
    copies0 = sum(len(m.got) for m in rest)
    sent = 0
    open_messages: set[int] = set()
    passes = 0
    while sent < messages or open_messages:
        for seq in list(open_messages):
            if owner.reached.get(seq, 0) >= len(rest):
                open_messages.discard(seq)
        while sent < messages and (
            len(open_messages) < window
            if window
            else owner.conn.unacked < 2 * MAX_WINDOW  # the client's rule (bench.fanout)
        ):
            sent += 1
            open_messages.add(sent)
            text = make_text(time.monotonic_ns(), sent)
            send = Send(MsgId(owner.instance_id, sent), "#" + GROUP, text)
            owner.conn.send(encode_message(send), STREAM)
            owner.dirty = True
        world.step()
        passes += 1
        assert passes < 2_000_000, "the messages did not all arrive"
    for _ in range(200 + int(lag / STEP)):  # the last receipts and acks
        world.step()
    relay.store.submit = submit  # type: ignore[method-assign]
    setattr(chat_server, "encode_message", encode_message)  # noqa: B010
    copies = sum(len(m.got) for m in rest) - copies0
    in_order = all(m.got == sorted(set(m.got)) for m in rest)
    return {
        "members": members, "messages": messages, "window": window, "receipt_delay": delay,
        "member_lag": lag,
        "copies": copies, "copies_expected": messages * len(rest), "in_order": in_order,
        "relay_us_per_copy": world.cpu / max(1, copies) * 1e6,
        "datagrams_in_per_copy": world.datagrams_in / max(1, copies),
        "datagrams_out_per_copy": world.datagrams_out / max(1, copies),
        "virtual_s": world.now - start,
        "log_reads": log_reads, "log_reads_per_member": log_reads / max(1, len(rest)),
        "entries_encoded_per_copy": encoded[0] / max(1, copies) if count_encodings else None,
    }  # fmt: skip


def counting_encoder(count: list[int]) -> Any:
    """`encode_message` for the relay, counting the group entries it
    encodes (`--count-encodings`: a call more per encoding, so the CPU
    figure is then a little higher)."""

    def encode(message: Message) -> bytes:
        if isinstance(message, GroupDeliver | GroupEvent):
            count[0] += 1
        return encode_message(message)

    return encode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_micro",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--members", type=int, default=1000, help="the group's size, owner too")
    parser.add_argument("--messages", type=int, default=320)
    parser.add_argument("--window", type=lambda v: None if v == "client" else int(v), default=16,
                        metavar="N|client",
                        help="messages not yet delivered to every member, at most, or 'client': "
                             "the chat client's rule, as bench.fanout's default")  # fmt: skip
    parser.add_argument(
        "--receipt-delay",
        type=float,
        default=GROUP_RECEIPT_DELAY,
        help=f"seconds a member holds a receipt (default {GROUP_RECEIPT_DELAY:g})",
    )
    parser.add_argument(
        "--hold", type=float, help="the relay's FANOUT_HOLD in seconds (default: the server's own)"
    )
    parser.add_argument(
        "--member-lag",
        type=float,
        help="seconds the relay's datagrams take to reach a member (its busy load process; "
        f"default {CLIENT_LAG_PER_MEMBER * 1000:g} ms per member with --window client, so that "
        "members fall behind and page, as in bench.fanout; else 0)",
    )
    parser.add_argument(
        "--count-encodings",
        action="store_true",
        help="count the group entries the relay encodes (a call more each)",
    )
    parser.add_argument("--json", action="store_true", help="the figures as JSON on stdout")
    args = parser.parse_args(argv)
    lag = args.member_lag
    if lag is None:
        lag = CLIENT_LAG_PER_MEMBER * args.members if args.window is None else 0.0
    if args.hold is not None:
        chat_server.FANOUT_HOLD = args.hold
    result = measure(args.members, args.messages, args.window, args.receipt_delay, lag,
                     args.count_encodings)  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['members']:,} members, {result['messages']} messages, window "
          f"{result['window']}, receipts held {result['receipt_delay'] * 1000:g} ms, "
          f"member lag {result['member_lag'] * 1000:g} ms: "
          f"{result['relay_us_per_copy']:.2f} us of Relay CPU per copy; per copy "
          f"{result['datagrams_in_per_copy']:.3f} datagrams in, "
          f"{result['datagrams_out_per_copy']:.3f} out; {result['copies']:,} of "
          f"{result['copies_expected']:,} copies, in order: {result['in_order']}; "
          f"{result['virtual_s']:.2f} s virtual; {result['log_reads']:,} reads of the "
          f"group's log ({result['log_reads_per_member']:.1f} per member)"
          + (f", {result['entries_encoded_per_copy']:.3f} entries encoded per copy"
             if result["entries_encoded_per_copy"] is not None else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
