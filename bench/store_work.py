"""The store's work per message (issue 18): prints figures, judges nothing.

    python -m bench.store_work [--pairs 16] [--duration 3] [--runs 1] [--json]

Runs the benchmark's own phases (`bench.run.traffic_phase`: real server
processes on fresh data directories, the load clients of `loadgen`) with
`--metrics` on, and reads from the server's /metrics, sampled every 0.1 s by
a thread here, how many commits (one fsync each) and messages there were:

- flat out: `--pairs` senders with a window of 64 each (the throughput phase);
- one in flight: 1 pair, window 1 (the latency phase): a lone message's cost.

Per phase: msg/s, server CPU per message (all threads) and the loop thread's
and the other threads' (the store thread's, mostly) parts, commits per
message and per second, messages the server never wrote (its recipient's
client receipted it first: `chat_messages_unwritten_total`, 0 for code
without it), one-way latency p50, `accepted` and `delivered` p50.
Run it from a checkout (it measures that checkout's `chat_server.py`).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench import run

NAMES = {
    "messages": "chat_messages_relayed_total",
    "commits": "chat_store_commit_seconds_count",
    "unwritten": "chat_messages_unwritten_total",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Sampler(threading.Thread):
    """Reads the server's counters every 0.1 s until stopped; keeps them all."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[dict[str, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                url = f"http://127.0.0.1:{self.port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as response:
                    text = response.read().decode()
            except (OSError, urllib.error.URLError):
                continue  # not up yet, or gone
            sample = {}
            for key, name in NAMES.items():
                found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
                sample[key] = float(found.group(1)) if found else 0.0
            self.samples.append(sample)

    def counts(self) -> dict[str, float]:
        """Growth from the last sample before the first message to the last."""
        before = [s for s in self.samples if s["messages"] == 0]
        if not before or not self.samples:
            return {key: 0.0 for key in NAMES}
        first, last = before[-1], self.samples[-1]
        return {key: last[key] - first[key] for key in NAMES}


def phase(pairs: int, window: int, duration: float, opts: run.Options, tmp: Path) -> dict[str, Any]:
    port = free_port()
    sampler = Sampler(port)
    sampler.start()
    try:
        result = run.traffic_phase(
            "server", pairs, duration, window, opts, tmp,
            server_flags=("--metrics", f"127.0.0.1:{port}"),
        )  # fmt: skip
    finally:
        sampler.stop.set()
        sampler.join(10)
    counts = sampler.counts()
    messages = max(1.0, counts["messages"])
    return {
        "msgs_per_s": result["msgs_per_s"],
        "cpu_us_per_msg": result["cpu_us_per_msg"],
        "loop_us_per_msg": result["loop_thread_cpu_us_per_msg"],
        "other_us_per_msg": result["other_threads_cpu_us_per_msg"],
        "commits_per_msg": counts["commits"] / messages,
        "commits_per_s": counts["commits"] / max(1e-9, result["elapsed_s"]),
        "unwritten_share": counts["unwritten"] / messages,
        "lat_p50_us": result["lat_p50_us"],
        "accept_p50_us": result.get("accept_p50_us"),
        "delivered_p50_us": result.get("delivered_p50_us"),
        "lost": result["lost"], "duplicates": result["duplicates"],
        "incomplete": result["incomplete"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    opts = run.Options(
        quick=False, runs=1, duration=args.duration, latency_duration=args.duration,
        sessions=0, gui_duration=0, workers=args.workers, gui=False, pairs=(args.pairs,),
        json_out=None, profile=False, keep=False,
    )  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {"flat out": [], "one in flight": []}
    with tempfile.TemporaryDirectory(prefix="store-work-") as tmp:
        for _ in range(args.runs):
            results["flat out"].append(phase(args.pairs, run.WINDOW, args.duration, opts,
                                             Path(tmp)))  # fmt: skip
            results["one in flight"].append(phase(1, 1, args.duration, opts, Path(tmp)))
    medians = {
        name: {
            k: statistics.median(r[k] for r in runs) if runs[0][k] is not None else None
            for k in runs[0]
        }  # fmt: skip
        for name, runs in results.items()
    }
    if args.json:
        print(json.dumps(medians, indent=2))
        return 0
    print(f"{'phase':<24}{'msg/s':>9}{'CPU us/msg':>12}{'loop':>8}{'other':>8}"
          f"{'commits/msg':>13}{'commits/s':>11}{'unwritten':>11}{'p50 us':>8}"
          f"{'acc/dlv p50 us':>16}")  # fmt: skip
    for name, m in medians.items():
        label = f"{name} ({args.pairs} pairs)" if name == "flat out" else name
        acc, dlv = m["accept_p50_us"], m["delivered_p50_us"]
        print(f"{label:<24}{m['msgs_per_s']:>9,.0f}{m['cpu_us_per_msg']:>12.1f}"
              f"{m['loop_us_per_msg']:>8.1f}{m['other_us_per_msg']:>8.1f}"
              f"{m['commits_per_msg']:>13.3f}{m['commits_per_s']:>11.1f}"
              f"{100 * (m['unwritten_share'] or 0):>10.0f}%{m['lat_p50_us'] or 0:>8.0f}"
              f"{(acc or 0):>8.0f}/{(dlv or 0):<7.0f}")  # fmt: skip
        if m["lost"] or m["duplicates"] or m["incomplete"]:
            print(f"  lost {m['lost']}, duplicates {m['duplicates']}, "
                  f"incomplete {m['incomplete']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
