"""What a lone message costs the server's loop thread, counted: prints figures, judges nothing.

    python -m bench.lone_calls [--messages 300] [--top 30] [--ops | --cpu]

A real `ChatServer` (SQLite store in a temporary directory, the loop on a
thread of this process) and the benchmark's load clients (`loadgen`: one
sender, one receiver, window 1: the latency phase's load) in this thread.
Only the loop's thread is counted (`sys.setprofile` / `sys.settrace` set on
it), over `--messages` lone messages after 20 to warm up:

- default: Python calls (functions and builtins) per lone message, and the
  `--top` functions by calls;
- `--ops`: bytecodes per message instead (`f_trace_opcodes`), by function;
- `--cpu`: no counting, the loop thread's CPU per message (its CPU clock),
  which is what the counts stand for; beside a client in the same process,
  so it is not the latency phase's figure (`bench.store_work` takes that).

Passes and datagrams per message come from the relay's own counters. A
tracer slows the loop down, so under `--ops` more timers fall due between
the clients' datagrams than at full speed (more passes per message): read
`--ops` beside the passes it prints. Issue 18, sixth session
(bench/README.md "What a pass costs when a message travels alone").
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import bench  # noqa: F401  (puts the project root on sys.path)
from bench.loadgen import TrafficSpec, close_clients, log_in_clients, traffic_loop
from chat_server import ChatServer, ServerConfig

WARM_UP = 20


def measure(messages: int, mode: str) -> tuple[dict[str, float], collections.Counter[str]]:
    """(figures per message, counts by function over all `messages`)."""
    counts: collections.Counter[str] = collections.Counter()
    counting = False

    def name(frame: FrameType) -> str:
        code = frame.f_code
        return f"{code.co_name} ({Path(code.co_filename).name}:{code.co_firstlineno})"

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if not counting:
            return
        if event == "call":
            counts[name(frame)] += 1
        elif event == "c_call":
            counts[f"<{getattr(arg, '__qualname__', arg)}>"] += 1

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if counting and event == "opcode":
            counts[name(frame)] += 1
        return trace

    with tempfile.TemporaryDirectory(prefix="lone-calls-") as tmp:
        config = ServerConfig(
            data_dir=Path(tmp) / "data", iterations=4096, rto_min=0.05, rto_max=1.0,
            user_msg_rate=1e9, user_msg_burst=1e9, user_byte_rate=1e12, user_byte_burst=1e12,
            preauth_rate=1e9, preauth_burst=1e9, registration_rate=1e9, registration_burst=1e9,
            key_workers=0,
        )  # fmt: skip
        server = ChatServer(("127.0.0.1", 0), config)

        def serve() -> None:
            if mode == "ops":
                sys.settrace(trace)
            elif mode == "calls":
                sys.setprofile(profile)
            server.serve_forever()

        thread = threading.Thread(target=serve, daemon=True, name="lone-calls-server")
        thread.start()
        spec = TrafficSpec(server=server.address, senders=[("s0", "r0")], receivers=["r0"],
                           window=1, limit=WARM_UP)  # fmt: skip
        senders, receivers = log_in_clients(spec)
        try:
            start = time.monotonic()
            traffic_loop(spec, senders, receivers, start, start + 600)
            stats = server.relay.stats
            keys = ("loop_passes", "datagrams_in", "datagrams_out", "messages", "loop_empty_reads")
            before = {key: stats[key] for key in keys}
            clock = time.pthread_getcpuclockid(thread.ident or 0)
            spec.limit = WARM_UP + messages
            counting = True
            cpu = time.clock_gettime(clock)
            start = time.monotonic()
            traffic_loop(spec, senders, receivers, start, start + 600)
            cpu = time.clock_gettime(clock) - cpu
            counting = False
            done = {key: stats[key] - before[key] for key in keys}
        finally:
            close_clients(senders)
            close_clients(receivers)
            server.shutdown()
            thread.join(10)
            server.close()
    n = max(1, done["messages"])
    figures = {
        "messages": n,
        "per_msg": sum(counts.values()) / n,
        "loop_cpu_us_per_msg": cpu / n * 1e6,
        "passes_per_msg": done["loop_passes"] / n,
        "datagrams_in_per_msg": done["datagrams_in"] / n,
        "datagrams_out_per_msg": done["datagrams_out"] / n,
        "empty_reads_per_msg": done["loop_empty_reads"] / n,
    }
    return figures, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lone_calls")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--top", type=int, default=30, help="functions listed")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--ops", action="store_true", help="bytecodes, not calls")
    kind.add_argument("--cpu", action="store_true", help="no counting: the loop's CPU")
    args = parser.parse_args(argv)
    mode = "ops" if args.ops else "cpu" if args.cpu else "calls"
    figures, counts = measure(args.messages, mode)
    n = figures["messages"]
    cpu = f"loop thread CPU {figures['loop_cpu_us_per_msg']:.1f} us per message"
    print(f"{n:.0f} lone messages: {figures['passes_per_msg']:.2f} loop passes, "
          f"{figures['datagrams_in_per_msg']:.2f} datagrams in and "
          f"{figures['datagrams_out_per_msg']:.2f} out, {figures['empty_reads_per_msg']:.2f} "
          f"empty reads per message; {cpu}"
          + (" (counting slows it)" if mode != "cpu" else ""))  # fmt: skip
    if mode != "cpu":
        what = "bytecodes" if mode == "ops" else "Python calls"
        print(f"{what} per lone message on the loop's thread: {figures['per_msg']:.1f}")
        for key, count in counts.most_common(args.top):
            print(f"{count / n:9.2f}  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
