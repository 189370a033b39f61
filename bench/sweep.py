"""A load sweep (issue 18): the server and the bare loop side by side at
several offered loads, from a light chat load to flat out, in one run:
delivered msg/s and CPU per message at each. `bench/plot.py` draws it
(docs/bench/load.svg).

    python -m bench.sweep                      # 16 pairs at 150, 600, 2,400 and 9,600 msg/s
                                               # in all, then flat out
    python -m bench.sweep --json-out F.json    # and the figures for python -m bench.plot F.json
    python -m bench.sweep --quick              # 2 pairs at 40 msg/s, then flat out: a smoke run
    python -m bench.sweep --loads 300,3000 --pairs 8 --duration 5 --label mine
    python -m bench.sweep --runs 3             # medians of 3 sweeps (the plot shows each spread)

Also a phase of `python -m bench` (`--no-sweep` skips it there).

Each point runs a fresh relay process: the server as the throughput phase
starts it (`run.start_server`: limits raised so that no rate limit bounds
the load, the loopback timers), then the bare loop (`bare_relay.py`). The
load is the benchmark's own drivers: for the server `loadgen.run_traffic`
(the real client code), each sender paced at its share of the offered load
(at most 64 messages not yet accepted and delivered) or flat out; for the
bare loop at a paced load `chatlike.run_bare_paced`, carrying as many
datagrams per message from the senders and from the receivers as the
server's clients sent at that load (the same datagram pattern), and flat out
`loadgen.run_bare` as in the throughput phase (a datagram per message and
one per receipt, 64 in flight).

CPU is the relay process's run time from `/proc/PID/task/*/schedstat`
(nanoseconds, every thread: the socket loop and the store thread), not the
10 ms ticks of `/proc/PID/stat`, which at 150 msg/s would round the bare
loop's few milliseconds to zero; the ticks are kept beside it as a check
(`cpu_s_ticks`, the process tree). The window runs from the start signal
until every message is accepted and delivered (received, for the bare
loop), so the drain's acks are counted too. The server's key-exchange
workers are idle then (the logins come before it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/sweep.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ROOT
from bench.chatlike import PacedBareSpec, run_bare_paced
from bench.loadgen import BareSpec, TrafficSpec, run_bare, run_traffic
from bench.run import (
    START_DELAY,
    WINDOW,
    Child,
    latencies_us,
    median_tree,
    percentile,
    split,
    start_bare,
    start_server,
    workers,
)

PAIRS = 16
#: msg/s in all, a factor of 4 apart: from a light chat load (the 150 msg/s
#: of issue 18's chat-like phase) to below the server's flat-out rate
#: (15,000-25,000 msg/s at 16 pairs on a quiet 2-core machine).
LOADS = (150.0, 600.0, 2400.0, 9600.0)
DURATION = 3.0  # seconds of load per point, as the throughput phase
#: --quick: two tiny points, the smoke run of tests/test_bench_smoke.py.
QUICK_PAIRS, QUICK_LOADS, QUICK_DURATION = 2, (40.0,), 0.3
#: What the JSON says it is: bench/plot.py refuses anything else.
FORMAT = "udp-chat load sweep"
VERSION = 1


def run_ns(pid: int) -> int:
    """CPU nanoseconds of every thread of `pid` so far: the first field of
    each thread's /proc schedstat (time on a CPU, user and system)."""
    total = 0
    for entry in os.scandir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"{entry.path}/schedstat") as f:
                total += int(f.read().split()[0])
    return total


def _window(relay: Child, target: Callable[[Any, Pipe], None], specs: list[Any],
            duration: float) -> tuple[list[dict[str, Any]], float, float, float]:  # fmt: skip
    """Start `specs` against `relay`, run them for `duration` s and until they
    drain: (their results, t0, relay CPU s, the same from /proc ticks)."""
    with workers(target, specs) as group:
        group.gather("ready", 120)
        ns0, ticks0 = run_ns(relay.pid), relay.cpu()
        t0 = time.monotonic() + START_DELAY
        group.tell("start", t0, t0 + duration)
        results = group.gather("done", duration + 60)
        ns1, ticks1 = run_ns(relay.pid), relay.cpu()
    return results, t0, (ns1 - ns0) / 1e9, ticks1 - ticks0


def _figures(offered: float | None, sent: int, delivered: int, duplicates: int, end: float,
             t0: float, cpu: float, ticks: float, datagrams: int) -> dict[str, Any]:  # fmt: skip
    """What every point reports, server or bare loop."""
    elapsed = max(1e-9, end - t0)
    n = max(1, delivered)
    return {
        "offered_msgs_per_s": offered, "sent": sent, "delivered": delivered,
        "duplicates": duplicates, "lost": sent - delivered, "elapsed_s": elapsed,
        "msgs_per_s": delivered / elapsed, "cpu_s": cpu, "cpu_s_ticks": ticks,
        "cpu_us_per_msg": cpu / n * 1e6, "cpu_pct": 100 * cpu / elapsed,
        "datagrams_in_per_msg": datagrams / n,
    }  # fmt: skip


def server_point(pairs: int, offered: float | None, duration: float, load_workers: int,
                 tmp: Path) -> dict[str, Any]:  # fmt: skip
    """`pairs` senders, each at `offered / pairs` msg/s (flat out if None),
    through a fresh server."""
    relay = start_server(tmp, f"sweep-{pairs}-{offered or 'flat'}")
    try:
        rate = None if offered is None else offered / pairs
        specs = [
            TrafficSpec(
                relay.address,
                [(f"s{n}", f"r{n}") for n in g],
                [f"r{n}" for n in g],
                window=WINDOW,
                rate=rate,
            )
            for g in split([f"p{i}" for i in range(pairs)], load_workers)
        ]
        results, t0, cpu, ticks = _window(relay, run_traffic, specs, duration)
    finally:
        relay.stop()
    senders = [s for r in results for s in r["senders"]]
    receivers = [x for r in results for x in r["receivers"]]
    last = max((s["last_complete"] for s in senders), default=0.0)
    sender_datagrams = sum(s["datagrams_out"] for s in senders)
    receiver_datagrams = sum(r["datagrams_out"] for r in receivers)
    delivered = sum(r["received"] for r in receivers)
    lat = latencies_us(receivers)
    out = _figures(offered, sum(s["sent"] for s in senders), delivered,
                   sum(r["duplicates"] for r in receivers),
                   last if last > t0 else max(r["end"] for r in results), t0, cpu, ticks,
                   sender_datagrams + receiver_datagrams)  # fmt: skip
    n = max(1, delivered)
    out.update(
        completed=sum(s["completed"] for s in senders),
        failed=sum(s["failed"] for s in senders),
        sender_datagrams_per_msg=sender_datagrams / n,
        receiver_datagrams_per_msg=receiver_datagrams / n,
        lat_p50_us=percentile(lat, 50), lat_p99_us=percentile(lat, 99),
    )  # fmt: skip
    return out


def bare_point(pairs: int, offered: float | None, duration: float, load_workers: int,
               tmp: Path, server: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The same load through a fresh bare loop: paced with the datagrams per
    message the `server` point's clients sent, or flat out."""
    relay = start_bare(tmp, f"sweep-{pairs}-{offered or 'flat'}")
    try:
        groups = split([f"b{i}" for i in range(pairs)], load_workers)
        if offered is None:
            specs: list[Any] = [BareSpec(relay.address, g, window=WINDOW) for g in groups]
            target: Callable[[Any, Pipe], None] = run_bare
        else:
            specs = [
                PacedBareSpec(
                    relay.address,
                    g,
                    offered / pairs,
                    server["sender_datagrams_per_msg"],
                    server["receiver_datagrams_per_msg"],
                )
                for g in groups
            ]
            target = run_bare_paced
        results, t0, cpu, ticks = _window(relay, target, specs, duration)
    finally:
        relay.stop()
    if offered is None:  # run_bare's figures come per pair
        senders = [s for r in results for s in r["senders"]]
        receivers = [x for r in results for x in r["receivers"]]
        sent = sum(s["sent"] for s in senders)
        delivered = sum(r["received"] for r in receivers)
        duplicates = sum(r["duplicates"] for r in receivers)
        last = max((s["last_complete"] for s in senders), default=0.0)
        datagrams = sum(s["datagrams_out"] for s in senders) + sum(
            r["datagrams_out"] for r in receivers
        )
    else:
        sent = sum(r["sent"] for r in results)
        delivered = sum(r["received"] for r in results)
        duplicates = 0  # the paced loop counts a message once however often it came
        last = max(r["last_complete"] for r in results)
        datagrams = sum(r["datagrams"] for r in results)
    end = last if last > t0 else max(r["end"] for r in results)
    return _figures(offered, sent, delivered, duplicates, end, t0, cpu, ticks, datagrams)


def sweep(pairs: int, loads: Sequence[float], duration: float, load_workers: int,
          say: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    """Every load, then flat out: the server, then the bare loop with its
    datagram pattern, one after the other so that both meet the same machine."""
    tmp = Path(tempfile.mkdtemp(prefix="udp-chat-sweep-"))
    points = []
    try:
        for offered in [*loads, None]:
            what = "flat out" if offered is None else f"{offered:,.0f} msg/s in all"
            say(f"sweep: {pairs} pairs, {what}, {duration:g} s: the server")
            server = server_point(pairs, offered, duration, load_workers, tmp)
            say(f"sweep: {pairs} pairs, {what}: the bare loop")
            bare = bare_point(pairs, offered, duration, load_workers, tmp, server)
            points.append({"offered": offered, "server": server, "bare": bare})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return points


#: What is not the code under test: a commit that touches only these (the
#: benchmark itself, tests, documents) leaves the figures as they were.
NOT_CODE = (":(exclude)bench", ":(exclude)tests", ":(exclude)docs", ":(exclude)*.md")


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                          check=True)  # fmt: skip
    return done.stdout.strip()


def code_commit() -> str:
    """The last commit that changed the code under test (the server, the
    client code the load speaks with), "+" if the tree changes it since:
    rebasing the benchmark's own commits does not change what was measured."""
    try:
        last = _git("log", "-1", "--format=%h", "--", ".", *NOT_CODE)
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *NOT_CODE)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (last or "unknown") + ("+" if dirty else "")


#: Figures where one bad run must show, not be outvoted by the median.
WORST_OF_RUNS = ("lost", "duplicates")


def median_points(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The points of several sweeps over the same loads, figure by figure:
    the median of each number, the worst of the losses and duplicates."""
    points = []
    for i, first in enumerate(runs[0]):
        same = [r[i] for r in runs]
        assert all(p["offered"] == first["offered"] for p in same), "runs over other loads"
        point: dict[str, Any] = median_tree(same)
        for kind in ("server", "bare"):
            for key in WORST_OF_RUNS:
                point[kind][key] = max(p[kind][key] for p in same)
        points.append(point)
    return points


def combine(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """Several sweeps' documents as one of several runs (`python -m bench
    --runs N` runs the sweep once per run): the first one's meta, the
    medians as its points, each run's points kept."""
    meta = dict(documents[0]["meta"], runs=len(documents))
    meta["loadavg_after"] = documents[-1]["meta"]["loadavg_after"]
    each = [d["points"] for d in documents]
    return {"format": FORMAT, "version": VERSION, "meta": meta,
            "points": median_points(each), "runs": each}  # fmt: skip


def run(pairs: int, loads: Sequence[float], duration: float, load_workers: int, label: str | None,
        say: Callable[[str], None], runs: int = 1) -> dict[str, Any]:  # fmt: skip
    """The sweep's JSON document: what ran, where, and the points (with
    `runs` over 1: each run's, and their medians)."""
    commit = code_commit()
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "loadavg_before": list(os.getloadavg()), "commit": commit, "label": label or commit,
        "pairs": pairs, "loads": list(loads), "duration_s": duration, "workers": load_workers,
        "window": WINDOW, "runs": runs, "command": " ".join([sys.executable, *sys.argv]),
    }  # fmt: skip
    each = []
    for i in range(runs):
        if runs > 1:
            say(f"sweep: run {i + 1} of {runs}")
        each.append(sweep(pairs, loads, duration, load_workers, say))
    meta["loadavg_after"] = list(os.getloadavg())
    document = {"format": FORMAT, "version": VERSION, "meta": meta}
    if runs == 1:
        document["points"] = each[0]
    else:
        document["points"] = median_points(each)
        document["runs"] = each
    return document


def ratio(server: float, bare: float) -> str:
    return f"{server / bare:.1f}x" if bare > 0 else "-"


def rows(document: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, bare loop, server, ratio) rows, for this table and run.py's."""
    pairs = document["meta"]["pairs"]
    out = []
    for point in document["points"]:
        s, b, offered = point["server"], point["bare"], point["offered"]
        load = "flat out" if offered is None else f"{offered:,.0f} msg/s offered"
        out.append((f"sweep, {pairs} pairs, {load}: delivered msg/s",
                    f"{b['msgs_per_s']:,.0f}", f"{s['msgs_per_s']:,.0f}", ""))  # fmt: skip
        out.append(("  CPU us/msg (lost server/bare)", f"{b['cpu_us_per_msg']:.1f}",
                    f"{s['cpu_us_per_msg']:.1f} ({s['lost']}/{b['lost']})",
                    ratio(s["cpu_us_per_msg"], b["cpu_us_per_msg"])))  # fmt: skip
    return out


def table(document: dict[str, Any]) -> str:
    lines = [("figure", "bare loop", "server", "ratio"), *rows(document)]
    widths = [max(len(r[i]) for r in lines) for i in range(4)]
    text = ["  ".join([r[0].ljust(widths[0]), *(r[i].rjust(widths[i]) for i in (1, 2, 3))])
            .rstrip() for r in lines]  # fmt: skip
    text.insert(1, "-" * max(len(t) for t in text))
    return "\n".join(text)


def parse_loads(text: str) -> list[float]:
    """Offered loads from the command line: "150,600" -> [150.0, 600.0]."""
    try:
        loads = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give msg/s in all as numbers separated by commas, e.g. 150,600"
        ) from None
    if not loads or not all(0 < load < math.inf for load in loads):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more loads above 0 msg/s")
    return sorted(loads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, a few seconds: 2 pairs at 40 msg/s, then flat out",
    )
    parser.add_argument("--pairs", type=int, help=f"sender/receiver pairs (default {PAIRS})")
    parser.add_argument("--loads", type=parse_loads,
                        help="offered msg/s in all, before the flat-out point (default "
                        f"{','.join(f'{x:g}' for x in LOADS)})")  # fmt: skip
    parser.add_argument(
        "--duration", type=float, help=f"seconds of load per point (default {DURATION:g})"
    )
    parser.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 2),
                        help="load processes at most (default %(default)s)")  # fmt: skip
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the sweep N times; the points are the medians, and the "
                        "plot draws each run's spread (default %(default)s)")  # fmt: skip
    parser.add_argument("--label", help="the legend's name for this run (default: the commit)")
    parser.add_argument(
        "--json-out",
        type=Path,
        metavar="FILE",
        help="also write the figures here (python -m bench.plot reads it)",
    )
    parser.add_argument(
        "--json", action="store_true", help="the figures as JSON on stdout instead of the table"
    )
    args = parser.parse_args(argv)
    pairs = args.pairs if args.pairs is not None else (QUICK_PAIRS if args.quick else PAIRS)
    if pairs < 1:
        parser.error(f"argument --pairs: {pairs}; give 1 or more")
    loads = args.loads or list(QUICK_LOADS if args.quick else LOADS)
    duration = args.duration
    if duration is None:
        duration = QUICK_DURATION if args.quick else DURATION
    if not duration > 0:
        parser.error(f"argument --duration: {duration:g} s; give more than 0 seconds")
    if args.runs < 1:
        parser.error(f"argument --runs: {args.runs}; give 1 or more")
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    document = run(pairs, loads, duration, max(1, args.workers), args.label, say, args.runs)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(document, indent=1) + "\n", "utf-8")
    if args.json:
        print(json.dumps(document))
    else:
        print(table(document))
        if args.json_out is not None:
            print(f"JSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
