"""A chat-like load (issue 18): many pairs at a moderate rate beside idle
sessions, under the server's default limits, and the same datagrams through
the bare loop; then idle sessions alone (their keepalives).

    python -m bench.chatlike                 # 4 and 64 pairs at 150 msg/s, 1,000 idle;
                                             # then 10,000 idle sessions alone
    python -m bench.chatlike --quick         # tiny sizes, a few seconds
    python -m bench.chatlike --pairs 4 --rate 100 --idle 500 --keepalive-sessions 2000

Also a phase of `python -m bench` (`--no-chatlike` skips it there).

The server runs with its defaults except what only speeds up the logins
before the timers start (`--pbkdf2-iterations 4096`, `--registration-rate`,
`--preauth-rate`, `--preauth-total-rate`): `--user-msg-rate` 200, the
retransmission timers (0.2 s .. 60 s), `--session-timeout` 60 and the rest
are the defaults. Its counters are read from its own `--metrics` endpoint
before and after each phase (datagrams in and out, messages, the store's
commits: the `chat_store_commit_seconds` histogram's count, one per
`ServerStore` commit); its CPU from /proc (`run.Child.cpu`). The pairs are
the benchmark's load clients (`loadgen.run_traffic`, the real protocol code
over `reliability.Connection`, logged in by `client_core.ClientCore`), paced
at `rate` messages/s per sender; the idle sessions are `fanout.run_members`
sessions (a keepalive each every 15 s, as the chat client sends).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shutil
import socket
import struct
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.fanout import KEEPALIVE, MemberSpec, run_members
from bench.loadgen import (
    TEXT_SIZE,
    TrafficSpec,
    _BarePair,
    cpu_seconds,
    drive_bare_pairs,
    run_traffic,
    wait_until,
)
from bench.run import ITERATIONS, START_DELAY, Child, split, start_bare, workers

PAIRS = (4, 64)
RATE = 150.0
IDLE = 1000
KEEPALIVE_SESSIONS = 10_000
DURATION = 10.0  # the CPU clock ticks at 10 ms: 4 pairs make 6,000 messages
#: Two keepalive rounds: the window sees every idle session's keepalive twice.
KEEPALIVE_WINDOW = 2 * KEEPALIVE
#: Login-only limits raised so that thousands of logins from 127.0.0.1 take
#: seconds, not minutes; none of them applies to a logged-in session.
LOGIN_FLAGS = [
    "--pbkdf2-iterations", str(ITERATIONS), "--registration-rate", "1000000",
    "--preauth-rate", "1000000", "--preauth-total-rate", "1000000",
]  # fmt: skip
#: The bare loop's padding datagram: forwarded like any other, dropped by the receiver.
BARE_EXTRA = b"E"


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(tmp: Path, label: str) -> tuple[Child, int]:
    """A server with its default limits and a metrics port; (child, port)."""
    data = Path(tempfile.mkdtemp(prefix=f"data-{label}-", dir=tmp))
    port = free_tcp_port()
    command = [
        sys.executable, "chat_server.py", "--host", "127.0.0.1", "--port", "0",
        "--data-dir", str(data), *LOGIN_FLAGS, "--metrics", f"127.0.0.1:{port}",
        "--log-level", "warning",
    ]  # fmt: skip
    child = Child(command, data / "server.log")
    child.data_dir = data
    return child, port


COUNTERS = {
    "datagrams_in": "chat_datagrams_received_total",
    "datagrams_out": "chat_datagrams_sent_total",
    "messages": "chat_messages_relayed_total",
    "commits": "chat_store_commit_seconds_count",
    "unwritten": "chat_messages_unwritten_total",
    "sessions": "chat_sessions",
    "passes": "chat_loop_passes_total",
    "wakeups": "chat_loop_wakeups_total",
}


def scrape(port: int) -> dict[str, float]:
    """The server's counters, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for key, name in COUNTERS.items():
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"the server's /metrics has no {name}")
        out[key] = float(match.group(1))
    return out


# --- the bare loop, paced --------------------------------------------------------


@dataclass
class PacedBareSpec:
    """The bare loop's load: `rate` messages/s from each pair's sender, with
    as many datagrams per message from the senders (`sender_datagrams`) and
    from the receivers (`receiver_datagrams`) as the server received: below
    1, several messages (receipts) share a datagram, as the protocol packs
    them; above 1, padding datagrams (forwarded, then dropped) make up the
    rest. Fractions are spread over messages by accumulators."""

    relay: tuple[str, int]
    pairs: list[str]
    rate: float
    sender_datagrams: float
    receiver_datagrams: float
    text_size: int = TEXT_SIZE
    drain_timeout: float = 5.0


ITEM = struct.Struct("!QQ")  # seq, stamp_ns; then the text
SEQ = struct.Struct("!Q")


@dataclass
class _Pace:
    owed_tx: float = 0.0
    owed_rx: float = 0.0
    messages: list[bytes] = field(default_factory=list)  # not yet sent
    receipts: list[int] = field(default_factory=list)  # not yet sent


def run_bare_paced(spec: PacedBareSpec, pipe: Pipe) -> None:
    """Worker: each pair's sender at `rate` messages/s through the bare
    loop, messages and receipts packed (or padded) to the server's counts."""
    drive_bare_pairs(spec, pipe, _paced_loop)


def _paced_loop(spec: PacedBareSpec, pairs: list[_BarePair], t0: float,
                stop_at: float) -> dict[str, Any]:  # fmt: skip
    selector = selectors.DefaultSelector()
    paces = [_Pace() for _ in pairs]
    for pair, pace in zip(pairs, paces, strict=True):
        selector.register(pair.tx, selectors.EVENT_READ, (pair, pace, True))
        selector.register(pair.rx, selectors.EVENT_READ, (pair, pace, False))
    filler = b"x" * spec.text_size
    datagrams = 0

    def send_messages(pair: _BarePair, pace: _Pace, force: bool) -> None:
        nonlocal datagrams
        if pace.messages and (force or pace.owed_tx >= 1):
            pair.tx.send(b"M" + b"".join(pace.messages))
            pace.messages.clear()
            pace.owed_tx -= 1
            datagrams += 1
        while pace.owed_tx >= 1:
            pair.tx.send(BARE_EXTRA)
            pace.owed_tx -= 1
            datagrams += 1

    def send_receipts(pair: _BarePair, pace: _Pace, force: bool) -> None:
        nonlocal datagrams
        if pace.receipts and (force or pace.owed_rx >= 1):
            pair.rx.send(b"R" + b"".join(SEQ.pack(seq) for seq in pace.receipts))
            pace.receipts.clear()
            pace.owed_rx -= 1
            datagrams += 1
        while pace.owed_rx >= 1:
            pair.rx.send(BARE_EXTRA)
            pace.owed_rx -= 1
            datagrams += 1

    wait_until(t0)
    cpu0 = cpu_seconds()
    sending = True
    drain_deadline = 0.0
    try:
        while True:
            now = time.monotonic()
            if sending and now >= stop_at:
                sending = False
                drain_deadline = now + spec.drain_timeout
            if sending:
                due = int((now - t0) * spec.rate) + 1
                for pair, pace in zip(pairs, paces, strict=True):
                    while pair.sent < due:
                        seq = pair.next_seq
                        pair.next_seq += 1
                        pair.outstanding[seq] = now
                        pace.messages.append(ITEM.pack(seq, time.monotonic_ns()) + filler)
                        pair.sent += 1
                        pace.owed_tx += spec.sender_datagrams
                    send_messages(pair, pace, False)
            else:
                for pair, pace in zip(pairs, paces, strict=True):
                    send_messages(pair, pace, True)
                    send_receipts(pair, pace, True)
                if all(not p.outstanding for p in pairs) or now >= drain_deadline:
                    break
            for key, _ in selector.select(0.002 if sending else 0.05):
                pair, pace, is_tx = key.data
                sock = pair.tx if is_tx else pair.rx
                while True:
                    try:
                        data = sock.recv(65535)
                    except BlockingIOError:
                        break
                    except OSError:
                        continue
                    if data[:1] == BARE_EXTRA:
                        continue
                    if is_tx:
                        for (seq,) in SEQ.iter_unpack(memoryview(data)[1:]):
                            if pair.outstanding.pop(seq, None) is not None:
                                pair.completed += 1
                                pair.last_complete = time.monotonic()
                        continue
                    step = ITEM.size + spec.text_size
                    for offset in range(1, len(data), step):
                        seq, _stamp = ITEM.unpack_from(data, offset)
                        if seq not in pair.seen:
                            pair.seen.add(seq)
                            pair.received += 1
                        pace.receipts.append(seq)
                        pace.owed_rx += spec.receiver_datagrams
                    send_receipts(pair, pace, False)
    finally:
        selector.close()
    return {
        "cpu_s": cpu_seconds() - cpu0, "datagrams": datagrams, "end": time.monotonic(),
        "sent": sum(p.sent for p in pairs), "received": sum(p.received for p in pairs),
        "completed": sum(p.completed for p in pairs),
        "last_complete": max((p.last_complete for p in pairs), default=0.0),
    }  # fmt: skip


# --- phases -----------------------------------------------------------------------


def chat_phase(server: Child, port: int, pairs: int, rate: float, duration: float,
               load_workers: int, label: str) -> dict[str, Any]:  # fmt: skip
    """`pairs` senders at `rate` msg/s each on `server` (idle sessions beside)."""
    names = [f"{label}{i}" for i in range(pairs)]
    specs = [
        TrafficSpec(
            server.address,
            [(f"s{n}", f"r{n}") for n in g],
            [f"r{n}" for n in g],
            window=64,
            rate=rate,
        )  # fmt: skip
        for g in split(names, load_workers)
    ]
    with workers(run_traffic, specs) as group:
        group.gather("ready", 300)
        time.sleep(min(0.5, duration / 4))  # the logins' last acks and commits
        before, cpu0, drops0 = scrape(port), server.cpu(), server.drops()
        t0 = time.monotonic() + START_DELAY
        group.tell("start", t0, t0 + duration)
        results = group.gather("done", duration + 60)
        cpu1, after, drops = server.cpu(), scrape(port), server.drops() - drops0
    senders = [s for r in results for s in r["senders"]]
    receivers = [x for r in results for x in r["receivers"]]
    sent = sum(s["sent"] for s in senders)
    delivered = sum(r["received"] for r in receivers)
    elapsed = max(1e-9, max(r["end"] for r in results) - t0)
    n = max(1, delivered)
    counted = ("datagrams_in", "datagrams_out", "messages", "commits", "unwritten")
    d = {k: after[k] - before[k] for k in counted}
    return {
        "pairs": pairs, "rate": rate, "duration_s": duration, "elapsed_s": elapsed,
        "sent": sent, "delivered": delivered,
        "completed": sum(s["completed"] for s in senders),
        "duplicates": sum(r["duplicates"] for r in receivers),
        "lost": sent - delivered, "msgs_per_s": delivered / elapsed,
        "server_cpu_s": cpu1 - cpu0, "cpu_us_per_msg": (cpu1 - cpu0) / n * 1e6,
        "server_cpu_pct": (cpu1 - cpu0) / elapsed * 100,
        "datagrams_in_per_msg": d["datagrams_in"] / n,
        "datagrams_out_per_msg": d["datagrams_out"] / n,
        # sent by the pairs' clients themselves (the server's count also has
        # the idle sessions' keepalives): how the bare loop's share is split
        "sender_datagrams_per_msg": sum(s["datagrams_out"] for s in senders) / n,
        "receiver_datagrams_per_msg": sum(r["datagrams_out"] for r in receivers) / n,
        "messages_counted": d["messages"], "commits": d["commits"],
        "commits_per_s": d["commits"] / elapsed, "fsyncs_per_msg": d["commits"] / n,
        # receipted by their recipients' clients before any commit: never written
        "unwritten": d["unwritten"], "unwritten_share": d["unwritten"] / n,
        # the idle ones, these pairs' and any earlier phase's not yet expired
        "sessions_online": after["sessions"],
        "rate_limited_notices": sum(s.get("notices", {}).get("rate_limited", 0)
                                    for s in [*senders, *receivers]),
        "socket_drops": drops,
        "load_cpu_s": sum(r["cpu_s"] for r in results),
        # the loop's passes (a select each) and those the store thread woke
        "passes_per_msg": (after["passes"] - before["passes"]) / n,
        "wakeups_per_msg": (after["wakeups"] - before["wakeups"]) / n,
    }  # fmt: skip


def bare_phase(pairs: int, rate: float, duration: float, sender_datagrams: float,
               receiver_datagrams: float, load_workers: int,
               tmp: Path) -> dict[str, Any]:  # fmt: skip
    relay = start_bare(tmp, f"chatlike-{pairs}")
    try:
        names = [f"b{i}" for i in range(pairs)]
        specs = [PacedBareSpec(relay.address, g, rate, sender_datagrams, receiver_datagrams)
                 for g in split(names, load_workers)]  # fmt: skip
        with workers(run_bare_paced, specs) as group:
            group.gather("ready", 60)
            cpu0 = relay.cpu()
            t0 = time.monotonic() + START_DELAY
            group.tell("start", t0, t0 + duration)
            results = group.gather("done", duration + 60)
            cpu1 = relay.cpu()
    finally:
        relay.stop()
    delivered = sum(r["received"] for r in results)
    sent = sum(r["sent"] for r in results)
    n = max(1, delivered)
    elapsed = max(1e-9, max(r["end"] for r in results) - t0)
    return {
        "pairs": pairs, "sent": sent, "delivered": delivered, "lost": sent - delivered,
        "msgs_per_s": delivered / elapsed,
        "cpu_s": cpu1 - cpu0, "cpu_us_per_msg": (cpu1 - cpu0) / n * 1e6,
        "datagrams_in_per_msg": sum(r["datagrams"] for r in results) / n,
    }  # fmt: skip


def keepalive_phase(sessions: int, window: float, load_workers: int,
                    tmp: Path) -> dict[str, Any]:  # fmt: skip
    """`sessions` idle sessions alone; the server's CPU over `window` s."""
    server, port = start_server(tmp, "keepalive")
    try:
        names = [f"k{i}" for i in range(sessions)]
        specs = [MemberSpec(server.address, g) for g in split(names, load_workers)]
        with workers(run_members, specs) as group:
            group.gather("ready", 900)
            time.sleep(min(1.0, window))  # the last logins' commits and acks
            before, cpu0, t0 = scrape(port), server.cpu(), time.monotonic()
            time.sleep(window)
            cpu1, after, t1 = server.cpu(), scrape(port), time.monotonic()
            group.tell("stop")
            group.gather("done", 120)
    finally:
        server.stop()
    minutes = (t1 - t0) / 60
    per = max(1.0, after["sessions"])
    return {
        "sessions": sessions, "online": after["sessions"], "window_s": t1 - t0,
        "server_cpu_s": cpu1 - cpu0,
        "cpu_us_per_session_per_min": (cpu1 - cpu0) / per / minutes * 1e6,
        "server_cpu_pct": (cpu1 - cpu0) / (t1 - t0) * 100,
        "datagrams_in_per_session_per_min":
            (after["datagrams_in"] - before["datagrams_in"]) / per / minutes,
        "datagrams_out_per_session_per_min":
            (after["datagrams_out"] - before["datagrams_out"]) / per / minutes,
        "commits_per_s": (after["commits"] - before["commits"]) / (t1 - t0),
        "passes_per_s": (after["passes"] - before["passes"]) / (t1 - t0),
    }  # fmt: skip


def run(pairs: list[int], rate: float, idle: int, duration: float, keepalive_sessions: int,
        keepalive_window: float, load_workers: int, say: Any) -> dict[str, Any]:  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="udp-chat-chatlike-"))
    out: dict[str, Any] = {"rate": rate, "idle": idle, "phases": [],
                           "loadavg_before": list(os.getloadavg())}  # fmt: skip
    try:
        for p in pairs:  # each on a fresh server, with its own idle sessions
            server, port = start_server(tmp, f"chatlike-{p}")
            try:
                say(f"chatlike: {idle} idle sessions log in")
                names = [f"i{i}" for i in range(idle)]
                specs = [MemberSpec(server.address, g) for g in split(names, load_workers)]
                with workers(run_members, specs) as idlers:
                    if idle:
                        idlers.gather("ready", 900)
                    say(f"chatlike: {p} pairs at {rate:g} msg/s each beside {idle} idle, "
                        f"{duration:g} s")  # fmt: skip
                    out["phases"].append(chat_phase(server, port, p, rate, duration,
                                                    load_workers, "c"))  # fmt: skip
                    if idle:
                        idlers.tell("stop")
                        idlers.gather("done", 120)
            finally:
                server.stop()
        for phase in out["phases"]:
            p = phase["pairs"]
            say(f"chatlike: the bare loop, {p} pairs at {rate:g} msg/s, "
                f"{phase['datagrams_in_per_msg']:.2f} datagrams in per msg")  # fmt: skip
            # The server's datagrams in per message, split between the bare
            # senders and receivers as the pairs' own clients split theirs.
            total = phase["datagrams_in_per_msg"]
            own = phase["sender_datagrams_per_msg"] + phase["receiver_datagrams_per_msg"]
            share = phase["sender_datagrams_per_msg"] / own if own else 0.5
            bare = bare_phase(p, rate, duration, total * share, total * (1 - share),
                              load_workers, tmp)  # fmt: skip
            phase["bare"] = bare
            # None when the bare loop's CPU is below the clock's tick (--quick)
            phase["cpu_ratio"] = (phase["cpu_us_per_msg"] / bare["cpu_us_per_msg"]
                                  if bare["cpu_us_per_msg"] > 0 else None)  # fmt: skip
        say(f"keepalive: {keepalive_sessions} idle sessions alone, {keepalive_window:g} s")
        out["keepalive"] = keepalive_phase(keepalive_sessions, keepalive_window, load_workers,
                                           tmp)  # fmt: skip
        out["loadavg_after"] = list(os.getloadavg())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def rows(figures: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, bare loop, server, ratio) rows, for this table and run.py's."""
    out = []
    idle = figures["idle"]
    for p in figures["phases"]:
        b = p["bare"]
        head = f"chat-like: {p['pairs']} pairs x {p['rate']:g} msg/s + {idle:,} idle"
        out.append((f"{head}: server CPU us/msg", f"{b['cpu_us_per_msg']:.1f}",
                    f"{p['cpu_us_per_msg']:.1f}", ratio(p["cpu_ratio"])))  # fmt: skip
        out.append(("  msg/s delivered; sent / delivered / duplicated",
                    f"{b['msgs_per_s']:,.0f}",
                    f"{p['msgs_per_s']:,.0f}; {p['sent']} / {p['delivered']} / "
                    f"{p['duplicates']}", ""))  # fmt: skip
        out.append(
            (
                "  datagrams per msg into / out of the server",
                f"{b['datagrams_in_per_msg']:.2f}",
                f"{p['datagrams_in_per_msg']:.2f} / {p['datagrams_out_per_msg']:.2f}",
                "",
            )
        )
        out.append(("  loop passes per msg; of them woken by the store thread", "",
                    f"{p['passes_per_msg']:.2f}; {p['wakeups_per_msg']:.2f}", ""))  # fmt: skip
        out.append(("  store commits/s; fsyncs per msg", "",
                    f"{p['commits_per_s']:,.0f}; {p['fsyncs_per_msg']:.3f}", ""))  # fmt: skip
        out.append(("  messages never written (receipted before the commit)", "",
                    f"{100 * p['unwritten_share']:.0f} %", ""))  # fmt: skip
    k = figures["keepalive"]
    out.append(
        (
            f"keepalive only, {k['online']:,.0f} idle sessions: server CPU us per "
            "session per minute",
            "",
            f"{k['cpu_us_per_session_per_min']:.1f}",
            "",
        )
    )
    out.append(("  server CPU, % of a core; datagrams in / out per session per minute", "",
                f"{k['server_cpu_pct']:.2f}; {k['datagrams_in_per_session_per_min']:.2f} / "
                f"{k['datagrams_out_per_session_per_min']:.2f}", ""))  # fmt: skip
    out.append(("  loop passes per second", "", f"{k['passes_per_s']:,.0f}", ""))
    return out


def table(figures: dict[str, Any]) -> str:
    lines = [("figure", "bare loop", "server", "ratio"), *rows(figures)]
    widths = [max(len(r[i]) for r in lines) for i in range(4)]
    text = ["  ".join([r[0].ljust(widths[0]), *(r[i].rjust(widths[i]) for i in (1, 2, 3))])
            .rstrip() for r in lines]  # fmt: skip
    text.insert(1, "-" * max(len(t) for t in text))
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chatlike",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--pairs", help="pair counts (default 4,64; --quick 2)")
    parser.add_argument("--rate", type=float, default=RATE,
                        help="msg/s per sender (default %(default)s)")  # fmt: skip
    parser.add_argument(
        "--idle", type=int, help=f"idle sessions beside the pairs (default {IDLE:,}; --quick 20)"
    )
    parser.add_argument(
        "--duration", type=float, help=f"seconds per phase (default {DURATION:g}; --quick 0.5)"
    )
    parser.add_argument("--keepalive-sessions", type=int,
                        help=f"idle sessions of the keepalive phase (default "
                        f"{KEEPALIVE_SESSIONS:,}; --quick 20)")  # fmt: skip
    parser.add_argument("--keepalive-window", type=float,
                        help=f"seconds it is measured (default {KEEPALIVE_WINDOW:g}: two "
                        "keepalive rounds; --quick 0.3)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="load processes at most")
    parser.add_argument("--json", action="store_true", help="the figures as JSON on stdout")
    args = parser.parse_args(argv)
    q = args.quick
    pairs = [int(p) for p in (args.pairs or ("2" if q else "4,64")).split(",") if p.strip()]
    idle = args.idle if args.idle is not None else (20 if q else IDLE)
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    figures = run(
        pairs, args.rate, idle, args.duration or (0.5 if q else DURATION),
        args.keepalive_sessions or (20 if q else KEEPALIVE_SESSIONS),
        args.keepalive_window or (0.3 if q else KEEPALIVE_WINDOW), max(1, args.workers), say,
    )  # fmt: skip
    if args.json:
        print(json.dumps(figures))
    else:
        print(table(figures))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
