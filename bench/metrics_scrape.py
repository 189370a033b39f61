"""What `--metrics` costs the relay (issue 16): prints figures, judges nothing.

    python -m bench.metrics_scrape [--duration S] [--pairs N] [--runs R]

1. In process: the time of one scrape's work (`gather_metrics` and
   `exposition`, on a relay with its counters filled and a store's commit
   histogram), which the metrics thread holds the GIL for at most.
2. Real processes, the benchmark's load (`bench.run.traffic_phase`: N pairs
   writing flat out through a server, window 64, every message durable and
   acknowledged): a server without `--metrics`, one with it and nobody
   scraping, and one with it while this process scrapes `/metrics` flat out
   in a loop (thousands of times more often than Prometheus's every 15 s).
   Alternating, `--runs` times; medians of msg/s and server CPU per message.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import run
from chat_server import DROP_REASONS, Relay, ServerConfig, gather_metrics
from server_metrics import COMMIT_BUCKETS, Histogram, exposition


class _FakeStore:
    """What `gather_metrics` reads of a `ServerStore`."""

    def __init__(self) -> None:
        self.commit_seconds = Histogram(COMMIT_BUCKETS)
        for i in range(10_000):
            self.commit_seconds.observe(0.0005 + (i % 100) * 0.0001)
        self.queue_depth = 12


def scrape_cost(repeat: int = 2000) -> tuple[float, int]:
    """(microseconds per scrape's gathering and rendering, bytes of output)."""
    relay = Relay(ServerConfig(data_dir=None, key_workers=0))
    for key in ("logins", "messages", "datagrams_in", "datagrams_out", "bytes_in", "bytes_out",
                "login_failures", "registrations"):  # fmt: skip
        relay.stats[key] = 123_456_789
    for reason in DROP_REASONS:
        relay.drops.counts[reason] = 98_765
    store: Any = _FakeStore()
    text = ""
    started = time.perf_counter()
    for _ in range(repeat):
        text = exposition(gather_metrics(relay, store, 0.0, 0.0))
    return (time.perf_counter() - started) / repeat * 1e6, len(text.encode())


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def load(opts: run.Options, tmp: Path, pairs: int, metrics: bool, scrape: bool) -> dict[str, Any]:
    """One traffic phase against a server with `--metrics` (or without);
    with `scrape`, a thread of this process scraping /metrics in a loop meanwhile."""
    port = free_tcp_port()
    flags = ("--metrics", f"127.0.0.1:{port}") if metrics else ()
    stop = threading.Event()
    scrapes = [0]

    def scraper() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    r.read()
                scrapes[0] += 1
            except OSError:
                time.sleep(0.01)  # not up yet

    thread = threading.Thread(target=scraper, daemon=True)
    if scrape:
        thread.start()
    try:
        result = run.traffic_phase("server", pairs, opts.duration, run.WINDOW, opts, tmp,
                                   server_flags=flags)  # fmt: skip
    finally:
        stop.set()
        if scrape:
            thread.join(10)
    result["scrapes_per_s"] = scrapes[0] / max(1e-9, result["elapsed_s"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_scrape",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of load per phase")
    parser.add_argument("--pairs", type=int, default=4, help="sender/receiver pairs (default 4)")
    parser.add_argument("--runs", type=int, default=3, help="alternating rounds (default 3)")
    args = parser.parse_args(argv)
    cost, size = scrape_cost()
    print(f"one scrape's work in process: {cost:.0f} us ({size:,} bytes of output)")
    opts = run.parse(["--duration", str(args.duration), "--no-gui"])
    kinds = {"no --metrics": (False, False), "--metrics, not scraped": (True, False),
             "--metrics, scraped flat out": (True, True)}  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="udp-chat-metrics-bench-") as tmp:
        for i in range(max(1, args.runs)):
            for kind, (metrics, scrape) in kinds.items():
                print(f"[run {i + 1}] {kind} ...", file=sys.stderr, flush=True)
                results[kind].append(load(opts, Path(tmp), args.pairs, metrics, scrape))
    print(f"{args.pairs} pairs, window {run.WINDOW}, {args.duration:g} s per phase, medians of "
          f"{args.runs} alternating runs:")  # fmt: skip
    print(f"{'server':30} {'msg/s':>9} {'CPU us/msg':>11} {'lost':>5} {'scrapes/s':>10}")
    for kind, rounds in results.items():

        def median(key: str, rounds: list[dict[str, Any]] = rounds) -> float:
            return float(statistics.median(r[key] for r in rounds))

        print(f"{kind:30} {median('msgs_per_s'):9,.0f} {median('cpu_us_per_msg'):11.1f} "
              f"{sum(r['lost'] for r in rounds):5d} {median('scrapes_per_s'):10,.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
