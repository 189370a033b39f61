"""The benchmark runs end to end: `python -m bench --quick` starts real server
processes and the bare loop, drives them from load processes, prints the
table and writes the JSON with every figure, and loses nothing. The phases
that run as modules of their own (fan-out, chat-like, the load sweep) are
run one per test, as `python -m bench` runs them, so that pytest-xdist runs
them side by side; the main run skips them.

No timed assertions: the figures are printed, never judged here. One bug
the benchmark found is kept as a failing test below (server memory per
delivered message).
"""

from __future__ import annotations

import gc
import json
import queue
import subprocess
import sys
import time
import tracemalloc
import types
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench import plot, preauth_flood, run, sweep
from bench.loadgen import TrafficSpec, close_clients, log_in_clients, traffic_loop
from bench.relay_micro import FRAMES, server_diff
from chat_client import MessageReceived
from tests.conftest import ROOT, start_server, stop_server
from tests.conftest import test_config as server_config  # not a test: no test_ name here

PAIRS = (1, 16)
TRAFFIC_KEYS = {
    "pairs", "window", "elapsed_s", "msgs_per_s", "sent", "received", "completed", "accepted",
    "delivered", "failed", "duplicates", "lost", "incomplete", "relay_cpu_s", "cpu_us_per_msg",
    "relay_cpu_pct", "loop_thread_cpu_us_per_msg", "other_threads_cpu_us_per_msg", "load_cpu_s",
    "load_cpu_pct", "load_cpu_us_per_msg", "load_workers", "lat_p50_us", "lat_p99_us",
    "lat_max_us", "accept_p50_us", "accept_p99_us", "delivered_p50_us", "delivered_p99_us",
    "datagrams_into_relay_per_msg", "relay_rss_growth_b_per_msg", "rate_limited_notices",
    "relay_socket_drops", "lat_wire_p50_us", "lat_wire_p99_us",
}  # fmt: skip
SCALE_KEYS = {
    "sessions", "logged_in", "login_s", "logins_per_s", "server_cpu_us_per_login",
    "rss_before_kib", "rss_after_kib", "bytes_per_session",
    *(f"{phase}_{key}" for phase in ("register", "existing") for key in (
        "logged_in", "s", "per_s", "server_cpu_us", "load_cpu_s", "resends", "socket_drops")),
}  # fmt: skip
LOGIC_KEYS = {
    "messages", "sessions", "pairs", "logic_us_per_msg", "lost", "retained_b_per_msg",
    "retained_blocks_per_msg", "retained_sites", "session_b_tracemalloc",
    "session_b_with_reply_cache", "session_sites",
}  # fmt: skip
GUI_KEYS = {
    "status", "rate", "received", "arrival_per_s", "lag_p50_ms", "lag_p99_ms", "lag_max_ms",
    "busy_p99_ms", "busy_max_ms",
}  # fmt: skip
META_KEYS = {"date", "python", "cpus", "loadavg", "quick", "runs", "pairs", "window", "command"}
TABLE_LINES = (
    "relayed msg/s, 1 pair(s)", "relayed msg/s, 16 pair(s)",
    "lost / duplicated / incomplete, 16 pair(s)", "relay CPU us/msg, 16 pair(s)",
    "load generator CPU", "one-way latency p50 / p99 us, 1 in flight",
    "one-way latency p50 / p99 us, 16 pair(s) loaded", "memory per idle session",
    "logins (registering), seconds", "logins (existing, after a restart), seconds",
    "server logic alone", "server memory kept per relayed message", "GUI lag",
    "1 in flight: relay CPU us/msg (a lone message)", "1 in flight: from the sender's send",
)  # fmt: skip
FANOUT_KEYS = {
    "members", "rate", "sent", "accepted", "completed", "recipients", "copies",
    "copies_expected", "duplicates", "messages_everyone_has", "copies_per_s", "cpu_us_per_copy",
    "copy_to_direct_cpu", "last_member_p50_ms", "last_member_p99_ms", "last_member_max_ms",
}  # fmt: skip


CHATLIKE_KEYS = {
    "pairs", "rate", "sent", "delivered", "duplicates", "lost", "msgs_per_s", "cpu_us_per_msg",
    "datagrams_in_per_msg", "datagrams_out_per_msg", "commits", "commits_per_s",
    "fsyncs_per_msg", "bare", "cpu_ratio", "passes_per_msg", "wakeups_per_msg",
}  # fmt: skip
KEEPALIVE_KEYS = {
    "sessions", "online", "window_s", "server_cpu_s", "cpu_us_per_session_per_min",
    "datagrams_in_per_session_per_min", "datagrams_out_per_session_per_min",
}  # fmt: skip


#: The main run's sizes: the tiniest that still fill every figure (two pair
#: counts, one of them 16 so that the judged rows are drawn; the GUI phase
#: sends its first window however short its time; the phases that run as
#: their own modules are smoke-tested one by one below, in parallel).
MAIN_ARGS = (
    "--quick", "--pairs", "1,16", "--duration", "0.2", "--sessions", "20", "--gui-duration",
    "0.3", "--no-fanout", "--no-chatlike", "--no-sweep",
)  # fmt: skip


def test_quick_benchmark_prints_the_table_and_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", *MAIN_ARGS, "--json-out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    print(result.stdout)
    print(result.stderr[-3000:], file=sys.stderr)
    assert result.returncode == 0, result.stderr[-3000:]

    assert "udp-chat benchmark" in result.stdout
    for line in TABLE_LINES:
        assert line in result.stdout, f"the table has no row {line!r}"
    assert str(out) in result.stdout

    document = json.loads(out.read_text("utf-8"))
    assert META_KEYS <= document["meta"].keys()
    assert len(document["runs"]) == 1
    for tree in (document["median"], document["runs"][0]):
        for kind in ("bare", "server"):
            for pairs in PAIRS:
                figures = tree["throughput"][kind][f"pairs{pairs}"]
                missing = TRAFFIC_KEYS - figures.keys()
                assert not missing, f"{kind} {pairs} pairs lacks {missing}"
                assert figures["pairs"] == pairs
                assert figures["sent"] > 0
                # Every message sent was received once and completed.
                assert figures["lost"] == 0, (kind, pairs, figures)
                assert figures["incomplete"] == 0, (kind, pairs, figures)
                assert figures["received"] == figures["sent"] == figures["completed"]
                if kind == "server":  # the bare loop may resend; the server never duplicates
                    assert figures["duplicates"] == 0, figures
                    assert figures["failed"] == 0, figures
                    assert figures["accepted"] == figures["delivered"] == figures["sent"]
            latency = tree["latency"][kind]
            assert not TRAFFIC_KEYS - latency.keys()
            assert latency["window"] == 1
            assert latency["lost"] == latency["incomplete"] == 0
        assert {f"pairs{p}" for p in PAIRS} <= tree["cpu_ratio"].keys()
        scale = tree["scale"]
        assert not SCALE_KEYS - scale.keys()
        assert scale["logged_in"] == scale["sessions"] == 20
        assert scale["existing_logged_in"] == scale["sessions"]
        logic = tree["logic"]
        assert not LOGIC_KEYS - logic.keys()
        assert logic["lost"] == 0
        # Skipped on request, so not in the tree.
        assert not {"fanout", "chatlike", "sweep"} & tree.keys()
        gui = tree["gui"]
        assert not GUI_KEYS - gui.keys()
        assert gui["status"] == "ok" or gui["status"].startswith("skipped"), gui
        if gui["status"] == "ok":
            assert gui["lag_p99_ms"] is not None and gui["received"] > 0
            # Every message the writer sent was shown and receipted by the
            # window (a front end that never calls `shown` stalls at ~200,
            # its receipts never come: completed < sent). How many it sent
            # in the phase's second is the machine's speed (at load average
            # 20 only its first window went, which failed a "more than 256"
            # here); the phase sends at least that window however long it
            # takes (`at_least`), so a count below it is a phase cut short.
            assert gui["sent"] >= run.GUI_WINDOW, gui
            assert gui["completed"] == gui["sent"], gui


def rendered(rows: Callable[[run.Table, dict[str, Any]], None], figures: dict[str, Any]) -> str:
    """The rows `python -m bench` prints for a phase's figures."""
    table = run.Table()
    rows(table, figures)
    return table.render()


def test_fanout_phase_reaches_every_member() -> None:
    """The group fan-out phase (issue 14), as `python -m bench --quick` runs
    it: every message reached every member once, and the sender heard from
    each of them."""
    fanout = run.fanout_phase(run.parse(["--quick"]))
    assert fanout["direct_cpu_us_per_msg"] > 0
    assert [(p["members"], p["rate"]) for p in fanout["phases"]] == [(10, None), (10, 10.0)]
    for phase in fanout["phases"]:
        assert not FANOUT_KEYS - phase.keys()
        assert phase["sent"] > 0 and phase["recipients"] == [9], phase
        assert phase["copies"] == phase["copies_expected"] == phase["sent"] * 9, phase
        assert phase["messages_everyone_has"] == phase["completed"] == phase["sent"]
        assert phase["duplicates"] == 0
    text = rendered(run.fanout_rows, fanout)
    for line in ("group of 10, flat out: delivered copies/s",
                 "group of 10, 10 msg/s: delivered copies/s"):  # fmt: skip
        assert line in text, text


def test_chatlike_phase_delivers_every_message_beside_idle_sessions() -> None:
    """The chat-like phase (issue 18), as `python -m bench --quick` runs it:
    paced pairs beside idle sessions under the server's default limits,
    every message delivered once; the server's counters were read (each
    message is a datagram in at least once, and was committed or, receipted
    before its commit, never written: issue 18); then the idle sessions
    alone."""
    chatlike = run.chatlike_phase(run.parse(["--quick"]))
    assert chatlike["idle"] == 20
    (phase,) = chatlike["phases"]
    assert not CHATLIKE_KEYS - phase.keys(), phase
    assert phase["pairs"] == 2 and phase["sent"] > 0
    assert phase["delivered"] == phase["sent"] and phase["duplicates"] == 0, phase
    assert phase["datagrams_in_per_msg"] > 0, phase
    assert phase["commits"] > 0 or phase["unwritten"] > 0, phase
    assert phase["bare"]["delivered"] == phase["bare"]["sent"] > 0, phase
    keepalive = chatlike["keepalive"]
    assert not KEEPALIVE_KEYS - keepalive.keys(), keepalive
    assert keepalive["online"] == keepalive["sessions"] == 20, keepalive
    text = rendered(run.chatlike_rows, chatlike)
    for line in ("chat-like: 2 pairs x 150 msg/s + 20 idle: server CPU us/msg",
                 "keepalive only, 20 idle sessions"):  # fmt: skip
        assert line in text, text


SWEEP_KEYS = {
    "offered_msgs_per_s", "sent", "delivered", "duplicates", "lost", "elapsed_s", "msgs_per_s",
    "cpu_s", "cpu_s_ticks", "cpu_us_per_msg", "cpu_pct", "datagrams_in_per_msg",
}  # fmt: skip


def test_sweep_phase_measures_both_relays_at_each_load_and_plots(tmp_path: Path) -> None:
    """The load sweep (issue 18), as `python -m bench --quick` runs it (2
    pairs at 40 msg/s in all, then flat out): at each load the server and
    the bare loop delivered every message once, their CPU was read, the
    bare loop carried the server's datagrams per message at the paced load;
    the JSON draws (bench/plot.py)."""
    document = run.sweep_phase(run.parse(["--quick"]), tmp_path)
    assert document["format"] == sweep.FORMAT and document["version"] == sweep.VERSION
    meta = document["meta"]
    assert meta["pairs"] == 2 and meta["loads"] == [40.0] and meta["label"] == meta["commit"]
    # The commit of the code under test: the last one outside bench/, tests/,
    # docs/ ("unknown" outside a git checkout).
    assert meta["commit"] == sweep.code_commit()
    assert [p["offered"] for p in document["points"]] == [40.0, None]
    for point in document["points"]:
        server, bare = point["server"], point["bare"]
        for figures in (server, bare):
            assert not SWEEP_KEYS - figures.keys(), figures
            assert figures["offered_msgs_per_s"] == point["offered"]
            assert figures["delivered"] == figures["sent"] > 0, figures
            assert figures["lost"] == 0 and figures["duplicates"] == 0, figures
            assert figures["msgs_per_s"] > 0 and figures["datagrams_in_per_msg"] > 0, figures
        # The server's threads ran (schedstat's nanoseconds, not ticks).
        assert server["cpu_s"] > 0 and server["cpu_us_per_msg"] > 0, server
        assert server["completed"] == server["sent"] and server["failed"] == 0, server
        assert server["datagrams_in_per_msg"] == pytest.approx(
            server["sender_datagrams_per_msg"] + server["receiver_datagrams_per_msg"]
        )
        if point["offered"] is not None:
            # The same datagrams per message, up to what the pacing's
            # accumulators leave over per pair: less than a datagram of the
            # sender's, two of the receiver's (its receipts are forced out
            # once or twice while it drains).
            slack = 3 * meta["pairs"] / bare["delivered"]
            assert abs(bare["datagrams_in_per_msg"] - server["datagrams_in_per_msg"]) <= slack, (
                bare, server,
            )  # fmt: skip
    text = rendered(run.sweep_rows, document)
    for line in ("sweep, 2 pairs, 40 msg/s offered: delivered msg/s",
                 "sweep, 2 pairs, flat out: delivered msg/s", "CPU us/msg"):  # fmt: skip
        assert line in text, text
    assert sweep.table(document).count("\n") == 5  # a head, a rule and two rows per load
    source = tmp_path / "sweep.json"
    assert json.loads(source.read_text("utf-8")) == document
    figure = tmp_path / "load.svg"
    assert plot.main([str(source), "-o", str(figure)]) == 0
    svg = ET.parse(figure).getroot()
    markers = [e for e in svg.iter() if e.get("class") == "point"]
    assert len(markers) == 2 * 2 * 2  # two panels, two relays, two loads


def test_traffic_counts_the_datagrams_sent_from_t0_not_the_logins(tmp_path: Path) -> None:
    """Datagrams per message are what the clients send from t0 on: the ack
    of the login ticket each sent before (one datagram a client) is not the
    traffic's, and at a few messages a phase it would be a large share."""
    running = start_server(server_config(tmp_path / "data"))
    spec = TrafficSpec(running.address, [("s0", "r0")], ["r0"], limit=0)
    senders, receivers = log_in_clients(spec)
    try:
        before = [p.conn.sent_count for p in [*senders, *receivers]]
        assert all(count >= 1 for count in before), before  # the logins' acks
        now = time.monotonic()
        figures = traffic_loop(spec, senders, receivers, now, now + 5)
        peers = [*figures["senders"], *figures["receivers"]]
        assert [p["datagrams_out"] for p in peers] == [0, 0], peers
        spec.limit = 3
        now = time.monotonic()
        figures = traffic_loop(spec, senders, receivers, now, now + 30)
        after = [p.conn.sent_count for p in [*senders, *receivers]]
        peers = [*figures["senders"], *figures["receivers"]]
        assert [p["datagrams_out"] for p in peers] == [
            a - b for a, b in zip(after, before, strict=True)
        ]
        assert peers[0]["datagrams_out"] >= 1 and figures["receivers"][0]["received"] == 3
    finally:
        close_clients(senders)
        close_clients(receivers)
        stop_server(running)


class SlowPair:
    """alice and bob for `preauth_flood.exchange`: what alice sends reaches
    bob's events at once, and while alice sends (`slow` s) each look at
    bob's events takes 30 ms (a loaded machine, where the loop comes round
    late); then at once."""

    def __init__(self, slow: float) -> None:
        self.events: queue.Queue[MessageReceived] = queue.Queue()
        self.shown_ids: list[int] = []
        self.slow_until = time.monotonic() + slow

    def send(self, text: str, to: str) -> None:
        assert to == "bob"
        self.events.put(MessageReceived("alice", text, self.events.qsize() + 1, 0))

    def shown(self, message_id: int) -> None:
        self.shown_ids.append(message_id)

    def get(self, timeout: float) -> MessageReceived:
        if time.monotonic() < self.slow_until:
            time.sleep(0.03)
        return self.events.get_nowait()  # queue.Empty when nothing came


def test_the_flood_bench_pair_sends_every_message_due_on_a_slow_loop() -> None:
    """`bench.preauth_flood.exchange` sends alice's messages on her schedule
    however late its loop comes round: 0.3 s every 2 ms is 150 messages. It
    sent one per round before, 10 here (and 255 of 400 in
    tests/test_shared_address_logins.py on a machine at load average 13)."""
    pair = SlowPair(0.3)
    bob = types.SimpleNamespace(events=types.SimpleNamespace(get=pair.get), shown=pair.shown)
    result = preauth_flood.exchange(pair, bob, 0.3, "t", interval=0.002)  # type: ignore[arg-type]
    assert result["sent"] == result["received"] == 150, result
    assert len(pair.shown_ids) == 150


def test_server_memory_does_not_grow_with_each_delivered_message(tmp_path: Path) -> None:
    """The server keeps nothing per message once it is delivered and on
    disk: its dedup key leaves memory then (a retry is looked up in the
    store's dedup table, below the client instance's high-water mark). Before
    that fix every message left ~220-277 bytes behind for good. What remains
    is the step-wise growth of dict and set tables, amortized over the run
    (about 22 B/msg over 1,200 messages, less the longer it runs).

    Real server (thread, real UDP sockets, SQLite), load clients from the
    benchmark; tracemalloc counts only what was allocated under chat_server."""
    running = start_server(server_config(tmp_path / "data", user_msg_rate=1e6, user_msg_burst=1e6))
    spec = TrafficSpec(running.address, [("s0", "r0"), ("s1", "r1")], ["r0", "r1"])
    senders, receivers = log_in_clients(spec)
    try:

        def relay(count: int) -> None:
            """`count` more messages per sender, accepted, delivered, settled."""
            spec.limit = senders[0].sent + count
            now = time.monotonic()
            traffic_loop(spec, senders, receivers, now, now + 120)
            time.sleep(0.3)  # the last acks, receipts and commits
            # Receipts' writes wait for a commit of their own up to LAZY_HOLD
            # (issue 18) and are held in memory until it is done: settled
            # means the store has nothing left to commit.
            store = running.server.store
            assert store is not None
            deadline = time.monotonic() + 30
            while store.queue_depth and time.monotonic() < deadline:
                time.sleep(0.01)

        relay(100)  # warm up: first-use allocations, SQLite, caches
        gc.collect()
        tracemalloc.start(FRAMES)
        try:
            base = tracemalloc.take_snapshot()
            count = 600
            relay(count)
            gc.collect()
            snapshot = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        sent = sum(s.sent for s in senders)
        assert sum(r.received for r in receivers) == sent
        assert sum(s.completed for s in senders) == sent
        per_message, _, sites = server_diff(snapshot, base, count * len(senders), 5)
        print(f"server memory kept per delivered message: {per_message:.0f} B; {sites}")
        assert per_message < 64, f"{per_message:.0f} B kept per message, by site: {sites}"
    finally:
        close_clients(senders)
        close_clients(receivers)
        stop_server(running)
