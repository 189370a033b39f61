"""What the Relay executes per relayed message, counted: bytecodes and calls.

    python -m bench.relay_count [--messages N] [--pairs N] [--window N] [--top N]

The Relay of `bench.relay_micro` (the benchmark's load clients, an
in-memory "socket", the store in memory) relays `--messages` per pair, and
`sys.settrace` counts, while the Relay's own methods run (receive, timers,
sends, the store's callbacks), every bytecode and every Python call, by
function. Counts, not times: the same on a loaded machine as on a quiet one
(issue 18: the shared machine's noise is larger than the changes measured).
Calls of builtins (`len`, `dict.get`) are not seen by `settrace`; the
per-function table says where the bytecodes go.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: F401  (puts the project root on sys.path)
from bench.loadgen import Peer, Receiver, Sender
from bench.relay_micro import STEP, Addr, deliver, make_relay, pairs_of, relay_messages
from chat_server import Relay
from protocol import ProtocolError

#: The Relay's entry points that the loop calls: counted while they run.
ENTRY_POINTS = (
    "receive_datagram", "datagrams_to_send", "handle_timer", "store_done", "flush_store",
)  # fmt: skip


class Counter:
    """Bytecodes and calls by code object while `active`."""

    def __init__(self) -> None:
        self.ops: collections.Counter[CodeType] = collections.Counter()
        self.calls: collections.Counter[CodeType] = collections.Counter()
        self.unwritten = 0  # messages told DELIVERED + ACCEPT before any write
        self.cpu = 0.0  # seconds of the loop thread's CPU in the Relay (`--time`)

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call":
            self.calls[frame.f_code] += 1
            frame.f_trace_opcodes = True
            return self.local
        return None

    def local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            self.ops[frame.f_code] += 1
        return self.local


def loop_messages(relay: Relay, senders: list[Sender], receivers: list[Receiver],
                  addrs: dict[int, Addr], count: int, window: int) -> None:  # fmt: skip
    """`relay_micro.relay_messages` with the server loop's passes on a store
    on the disk: take, answer, then hand the store its batch (`flush_store`,
    which holds it COMMIT_WAIT for receipts); commits complete on the store
    thread, in their own time, and their callbacks run in a later pass."""
    peers: list[Peer] = [*senders, *receivers]
    by_addr = {addrs[id(p)]: p for p in peers}
    now = max(time.monotonic(), max(p.conn.get_timer() or 0.0 for p in peers))
    deadline = time.monotonic() + 600
    while any(s.sent < count or s.outstanding for s in senders):
        if time.monotonic() > deadline:
            raise RuntimeError("messages not completed in 600 s")
        now += STEP
        for s in senders:
            s.fill(min(window, count - s.sent))
        for p in peers:
            if p.dirty or (p.timer is not None and p.timer <= now):
                p.pump(now)
        for p in peers:
            out: list[bytes] = p.sock.out  # type: ignore[attr-defined]
            addr = addrs[id(p)]
            for data in out:
                relay.receive_datagram(data, addr, now)
            out.clear()
        relay.handle_timer(now)
        for data, addr in relay.datagrams_to_send(now):
            try:
                deliver(by_addr[addr], data, now)
            except ProtocolError:
                pass
        relay.flush_store(now)


def count(messages: int, pairs: int, window: int, disk: Path | None,
          timing: bool = False) -> tuple[Counter, int]:  # fmt: skip
    """Relay `messages` per pair after a warm-up; what the Relay ran for
    them (`timing`: only its CPU time on this thread, nothing traced)."""
    relay = make_relay(disk)
    senders, receivers, addrs = pairs_of(relay, pairs, window)
    run = relay_messages if disk is None else loop_messages
    run(relay, senders, receivers, addrs, 200, window)  # warm up
    counter = Counter()
    depth = 0  # `datagrams_to_send` calls `store_done`: tracing stops at the outer one's end
    for name in ENTRY_POINTS:
        method = getattr(relay, name)

        def counted(*args: Any, _method: Any = method) -> Any:
            nonlocal depth
            if not depth:
                sys.settrace(counter.trace)
            depth += 1
            try:
                return _method(*args)
            finally:
                depth -= 1
                if not depth:
                    sys.settrace(None)

        def timed(*args: Any, _method: Any = method) -> Any:
            nonlocal depth
            if not depth:
                start = time.thread_time()
            depth += 1
            try:
                return _method(*args)
            finally:
                depth -= 1
                if not depth:
                    counter.cpu += time.thread_time() - start

        setattr(relay, name, timed if timing else counted)
    before = sum(s.completed for s in senders)
    unwritten = relay.stats["messages_unwritten"]
    run(relay, senders, receivers, addrs, 200 + messages, window)
    if disk is not None:
        relay.store.close()
    done = sum(s.completed for s in senders) - before
    lost = sum(s.sent for s in senders) - sum(r.received for r in receivers)
    if lost:
        raise RuntimeError(f"{lost} messages not received")
    counter.unwritten = relay.stats["messages_unwritten"] - unwritten
    return counter, done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_count")
    parser.add_argument("--messages", type=int, default=500, help="per pair")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--top", type=int, default=40, help="functions listed")
    parser.add_argument("--disk", action="store_true",
                        help="a store on the disk (a temporary directory) and the server "
                             "loop's passes, instead of the store in memory")  # fmt: skip
    parser.add_argument("--time", action="store_true",
                        help="instead of counting: the Relay's CPU time per message on the "
                             "loop's thread (the store thread's is not in it)")  # fmt: skip
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as data_dir:
        counter, done = count(args.messages, args.pairs, args.window,
                              Path(data_dir) if args.disk else None, args.time)  # fmt: skip
    if args.time:
        print(f"{done:,} messages, {args.pairs} pairs, window {args.window}"
              f"{', store on the disk' if args.disk else ''}: {counter.cpu / done * 1e6:.2f} us "
              f"of the loop thread's CPU per message; {counter.unwritten / done:.0%} never "
              "written")  # fmt: skip
        return 0
    ops = sum(counter.ops.values())
    calls = sum(counter.calls.values())
    print(f"{done:,} messages, {args.pairs} pairs, window {args.window}: "
          f"{ops / done:,.0f} bytecodes and {calls / done:.1f} Python calls per message; "
          f"{counter.unwritten / done:.0%} never written")  # fmt: skip
    print(f"{'bytecodes':>9} {'calls':>6}  function (per message)")
    for code, n in counter.ops.most_common(args.top):
        where = f"{Path(code.co_filename).name}:{code.co_firstlineno}"
        print(f"{n / done:9.1f} {counter.calls[code] / done:6.2f}  {code.co_qualname} ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
