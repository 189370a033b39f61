"""The group fan-out benchmark (issue 14): one sender into a group of N
members, every member a load-generator session speaking the real protocol.

    python -m bench.fanout                 # groups of 100 and 1,000, flat out and at 10 msg/s
    python -m bench.fanout --quick         # tiny groups, a few seconds
    python -m bench.fanout --json          # the figures as JSON on stdout (`python -m bench`)

A real server process (`chat_server.py`, SQLite, the benchmark's flags from
`bench.run.start_server`, and `--max-fanout-rate` raised so that the budget
does not bound the flat-out phase). The members log in from worker
processes (`loadgen.Handshake` over a few shared sockets) and receipt the
group entries they get as a client that shows them at once does (its ack
of a datagram of group entries alone held as the client holds it), the
receipts held by `client_core.GroupReceipts.ready`, then together; the
owner creates the group (256 names per request) and sends at a steady rate,
or flat out by the chat client's rule (`--window client`, the default: every
message to its Connection at once, which keeps `reliability.MAX_WINDOW`
chunks in flight; only the server's taking them bounds it) or, to compare
with earlier figures, with a window of messages not yet delivered to every
member (`--window 16`, what earlier sessions used; `--window 64`).
bench/README.md ("Which window stands for a flat-out sender") says why.
Figures per phase:

- delivered copies per second (GROUP_DELIVERs that reached a member, once);
- server CPU per delivered copy (user+system of the server process tree
  from /proc, over the sending time), next to a direct message's in a
  4-pair run of the throughput phase: target, a copy at most a third;
- the server's datagrams received and sent and its commits, per copy (from
  its `--metrics` counters over the sending time): counts, which a loaded
  machine does not blur as it does CPU time;
- send -> the last member has it: per message, the latest arrival at any
  member minus the stamp in its text (processes on one host share the
  monotonic clock); p50 / p99 / max. Target at 10 msg/s into 1,000: p99 <= 200 ms.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import selectors
import shutil
import socket
import sys
import tempfile
import time
import traceback
import urllib.request
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/fanout.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import (
    Addr,
    Handshake,
    SaltCache,
    TrafficSpec,
    cpu_seconds,
    drive_logins,
    make_text,
    new_socket,
    run_traffic,
    send_receipts,
    text_stamp,
    wait_until,
)
from bench.metrics_scrape import free_tcp_port
from bench.run import (
    START_DELAY,
    Options,
    percentile,
    split,
    start_server,
    traffic_phase,
    workers,
)
from client_core import GroupReceipts, group_entries_only
from protocol import (
    GROUP_REQUEST_USERS_MAX,
    Bye,
    Fail,
    GroupAccept,
    GroupAction,
    GroupDeliver,
    GroupEvent,
    GroupReached,
    GroupRequest,
    GroupResult,
    Message,
    MsgId,
    Send,
    conversation_stream,
    decode_header,
    decode_message,
    encode_message,
)
from reliability import MAX_WINDOW, Connection, PayloadReceived

try:  # (how late a member acks group entries, as the chat client: a checkout before has one rule)
    from reliability import GROUP_ENTRIES_LATE, LateAck

    GROUP_LATE: tuple[LateAck, ...] = (GROUP_ENTRIES_LATE,)
except ImportError:
    GROUP_LATE = ()

try:
    from protocol import GroupBatch
except ImportError:  # a checkout before GROUP_BATCH (kind 31): this file runs there too
    GroupBatch = None  # type: ignore[assignment,misc]

GROUP = "bench"
STREAM = conversation_stream("#" + GROUP)
TIMER_SCAN = 0.005  # seconds between scans of many sessions' timers
#: A keepalive from every session this often, as the chat client sends one:
#: a member that has nothing to receipt for a minute (a thousand logins take
#: a while on a loaded machine) would be expired by the server.
KEEPALIVE = 15.0
LOGIN_BATCH = 100
#: The fan-out budget is raised for the benchmark (`--fanout-rate`): flat
#: out, it would otherwise bound the copies per second (10,000/s by default,
#: which makes flat out into 1,000 members the 10 msg/s phase).
FANOUT_RATE = "1000000000"
#: The server's own retransmission timers (docs/RELIABILITY.md), not the
#: benchmark's loopback ones (50 ms): a thousand load sessions in two
#: processes, on cores the server shares, ack later than that, and every
#: copy would be sent twice for nothing.
TIMERS = ["--rto-min", "0.2", "--rto-max", "60"]
TARGET_COPY_RATIO = 1 / 3
#: The window (messages not yet delivered to every member) earlier sessions
#: measured flat out with, and the cluster bench's group line still does;
#: `--window 16` compares with their figures. The chat client has no such
#: window: `bench.fanout` sends by its rule unless told (`SenderSpec.window`
#: None; bench/README.md "Which window stands for a flat-out sender").
WINDOW = 16
#: Flat out by the client's rule, the sending may run far ahead of the
#: members (the server takes messages faster than it hands them out): this
#: long at most for every member to have everything after the sending ends.
CLIENT_DRAIN = 180.0
#: The server's counters read before and after the sending (`--metrics`).
COUNTERS = {
    "datagrams_in": "chat_datagrams_received_total",
    "datagrams_out": "chat_datagrams_sent_total",
    "commits": "chat_store_commit_seconds_count",
    # The loop's passes and those its timeout woke, and the sessions' timers
    # that came due with nothing to do (0 from a server before these counters).
    "loop_passes": "chat_loop_passes_total",
    "loop_timeouts": "chat_loop_timeouts_total",
    "timers_idle": 'chat_session_timers_total{outcome="idle"}',
}
TARGET_P99_MS = 200.0
#: The steady phase's reference (`direct_steady_phase`): this many pairs, each
#: a direct message at the steady rate, about as many messages a second as
#: the copies into 100 members.
DIRECT_PAIRS = 100


class Session:
    """One logged-in load client: its Connection, on a socket it may share."""

    __slots__ = ("name", "sock", "conn", "instance_id", "timer", "dirty", "receipts", "held")

    def __init__(self, handshake: Handshake) -> None:
        assert handshake.conn is not None
        self.name = handshake.name
        self.sock = handshake.sock
        self.conn: Connection = handshake.conn
        self.instance_id = handshake.instance_id
        self.timer: float | None = None
        self.dirty = True
        self.receipts: list[int] = []
        self.held = GroupReceipts()  # group entries' receipts, as the client holds them

    def flush(self, now: float) -> None:
        held = self.held
        if held.due is not None and (held.ready(now, self.conn.ack_due) or self.receipts):
            self.receipts.extend(held.take())
        if self.receipts:
            receipts, self.receipts = self.receipts, []
            send_receipts(self.conn, receipts)
        if self.timer is not None and self.timer <= now:
            self.conn.handle_timer(now)
        for datagram in self.conn.datagrams_to_send(now):
            try:
                self.sock.send(datagram)
            except OSError:
                pass  # a full buffer: the protocol resends
        self.timer = self.conn.get_timer()
        if held.due is not None and (self.timer is None or held.due < self.timer):
            self.timer = held.due
        self.dirty = False


class Pump:
    """Many sessions over a few sockets: read, demultiplex by session id,
    hand each message to `on_message`, send what is due."""

    def __init__(self, sessions: list[Session], on_message: Any, pipe: Pipe | None = None):
        self.by_id = {s.conn.session_id: s for s in sessions}
        self.sessions = sessions
        self.on_message = on_message
        self.selector = selectors.DefaultSelector()
        for sock in {s.sock for s in sessions}:
            self.selector.register(sock, selectors.EVENT_READ, sock)
        if pipe is not None:
            self.selector.register(pipe.fileno(), selectors.EVENT_READ, None)
        self.last_scan = 0.0
        self.last_ping = time.monotonic()

    def step(self, timeout: float) -> bool:
        """One pass; True if the pipe (if any) has something to say."""
        told = False
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                told = True
                continue
            sock: socket.socket = key.data
            while True:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                now_ns = time.monotonic_ns()
                try:
                    session = self.by_id.get(decode_header(data).session_id)
                except Exception:
                    continue
                if session is None:
                    continue
                conn = session.conn
                if conn.receive_datagram(data, now_ns / 1e9, group_entries_only, *GROUP_LATE):
                    while (event := conn.next_event()) is not None:
                        if isinstance(event, PayloadReceived):
                            self.on_message(session, decode_message(event.payload), now_ns)
                session.dirty = True
        now = time.monotonic()
        if now - self.last_ping >= KEEPALIVE:
            self.last_ping = now
            for session in self.sessions:
                session.conn.send_ping()
                session.dirty = True
        scan = now - self.last_scan >= TIMER_SCAN
        if scan:
            self.last_scan = now
        for session in self.sessions:
            if session.dirty or (scan and session.timer is not None and session.timer <= now):
                session.flush(now)
        return told

    def close(self) -> None:
        self.selector.close()


def log_in(
    server: Addr, names: list[str], sockets: int
) -> tuple[list[Session], list[socket.socket]]:
    """Log `names` in, a hundred at a time; between the batches every
    session so far sends a keepalive (a thousand logins on a loaded machine
    take longer than the server's 60 s of silence before it expires one)."""
    socks = [new_socket(server) for _ in range(max(1, min(sockets, len(names))))]
    salted: SaltCache = {}
    done: dict[str, Handshake] = {}
    for start in range(0, len(names), LOGIN_BATCH):
        batch = names[start : start + LOGIN_BATCH]
        handshakes = [Handshake(n, socks[(start + i) % len(socks)], salted=salted)
                      for i, n in enumerate(batch)]  # fmt: skip
        for _ in range(3):
            drive_logins(handshakes, timeout=300)
            done.update((h.name, h) for h in handshakes if h.conn is not None)
            # A core may give a new session up (its link timed out on a loaded
            # machine) and start over: those log in again, as clients do.
            handshakes = [Handshake(h.name, h.sock, salted=salted, store=h.core.store)
                          for h in handshakes if h.conn is None]  # fmt: skip
            if not handshakes:
                break
        if handshakes:
            raise RuntimeError(f"{len(handshakes)} of {len(names)} load clients did not log in")
        now = time.monotonic()
        for h in done.values():
            assert h.conn is not None
            h.conn.send_ping()
            for datagram in h.conn.datagrams_to_send(now):
                with contextlib.suppress(OSError):
                    h.sock.send(datagram)
    return [Session(done[n]) for n in names], socks


# --- the members ----------------------------------------------------------------


@dataclass
class MemberSpec:
    server: Addr
    names: list[str]
    sockets: int = 8


def run_members(spec: MemberSpec, pipe: Pipe) -> None:
    """Worker: log the members in, then receipt every group entry at once and
    record, per message, how many of them got it and when the last did,
    until told ("stop",)."""
    socks: list[socket.socket] = []
    try:
        sessions, socks = log_in(spec.server, spec.names, spec.sockets)
        got: dict[tuple[int, int], list[int]] = {}  # msg id -> [members, latest arrival ns]
        seen: set[tuple[str, int]] = set()
        counts = {"received": 0, "duplicates": 0, "events": 0, "byes": 0}

        def on_message(session: Session, message: Message, now_ns: int) -> None:
            if GroupBatch is not None and isinstance(message, GroupBatch):  # each as if alone
                for part in message.entries:
                    on_message(session, part, now_ns)
            elif isinstance(message, GroupDeliver):
                session.held.add(message.server_msg_id, now_ns / 1e9)
                key = (session.name, message.group_seq)
                if key in seen:
                    counts["duplicates"] += 1
                    return
                seen.add(key)
                counts["received"] += 1
                msg_key = (message.msg_id.instance_id, message.msg_id.client_seq)
                entry = got.setdefault(msg_key, [0, 0, text_stamp(message.text)])
                entry[0] += 1
                entry[1] = max(entry[1], now_ns)
            elif isinstance(message, GroupEvent):
                session.held.add(message.server_msg_id, now_ns / 1e9)
                counts["events"] += 1
            elif isinstance(message, Bye):
                counts["byes"] += 1

        pump = Pump(sessions, on_message, pipe)
        pipe.send(("ready", len(sessions)))
        cpu0 = cpu_seconds()
        try:
            while True:
                if pump.step(TIMER_SCAN) and pipe.poll():
                    command = pipe.recv()
                    if command[0] == "stop":
                        break
        finally:
            pump.close()
        stamps = array.array("q")
        latest = array.array("q")
        reached = array.array("q")
        for members, last, stamp in got.values():
            stamps.append(stamp)
            latest.append(last)
            reached.append(members)
        pipe.send(("done", {
            **counts, "cpu_s": cpu_seconds() - cpu0, "ids": json.dumps(list(got)),
            "stamps": stamps.tobytes(), "latest": latest.tobytes(), "reached": reached.tobytes(),
        }))  # fmt: skip
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
    finally:
        for sock in socks:
            sock.close()
        pipe.close()


# --- the sender (the group's owner) -------------------------------------------------


@dataclass
class SenderSpec:
    server: Addr
    members: list[str]
    rate: float | None  # messages/s; None: flat out with `window`
    window: int | None = WINDOW  # None: the chat client's rule (see the module's docstring)
    drain_timeout: float = 30.0


def run_sender(spec: SenderSpec, pipe: Pipe) -> None:
    """Worker: log the owner in, create the group (256 names a request), then
    at ("start", t0, stop_at) send; report when everything sent is delivered
    to every member (or the drain times out)."""
    socks: list[socket.socket] = []
    try:
        (owner,), socks = log_in(spec.server, ["owner"], 1)
        results: dict[int, int] = {}
        accepted: dict[int, int] = {}  # client_seq -> recipients
        delivered: dict[int, int] = {}  # client_seq -> members who have it
        counts = {"accepted": 0, "failed": 0}
        done_at: list[float] = []
        members = len(spec.members)
        open_messages: set[int] = set()  # sent, not yet delivered to every member
        refused: dict[str, int] = {}  # FAILs by reason

        def on_message(session: Session, message: Message, now_ns: int) -> None:
            if isinstance(message, GroupResult):
                results[message.request_id] = message.code
            elif isinstance(message, GroupAccept):
                if message.msg_id.instance_id == session.instance_id:
                    accepted[message.msg_id.client_seq] = message.recipients
                    counts["accepted"] += 1
            elif isinstance(message, GroupReached):
                msg_id = message.msg_id
                if msg_id.instance_id == session.instance_id:
                    count = delivered[msg_id.client_seq] = delivered.get(
                        msg_id.client_seq, 0
                    ) + len(message.by)
                    if count >= members:
                        open_messages.discard(msg_id.client_seq)
                done_at.append(now_ns / 1e9)
            elif isinstance(message, GroupEvent):
                session.receipts.append(message.server_msg_id)
            elif isinstance(message, Fail) and message.msg_id.instance_id == session.instance_id:
                # Refused (the group's backlog past its limits, `mailbox_full`:
                # members far behind): counted, not waited for.
                refused[message.reason.name.lower()] = refused.get(
                    message.reason.name.lower(), 0) + 1  # fmt: skip
                open_messages.discard(message.msg_id.client_seq)

        pump = Pump([owner], on_message)
        chunks = [spec.members[i : i + GROUP_REQUEST_USERS_MAX]
                  for i in range(0, len(spec.members), GROUP_REQUEST_USERS_MAX)]  # fmt: skip
        for request_id, chunk in enumerate(chunks, 1):
            action = GroupAction.CREATE if request_id == 1 else GroupAction.ADD
            owner.conn.send(encode_message(GroupRequest(request_id, action, GROUP, tuple(chunk))),
                            STREAM)  # fmt: skip
            owner.dirty = True
            deadline = time.monotonic() + 60
            while request_id not in results:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"group request {request_id} not answered")
                pump.step(0.01)
            if results[request_id] != 0:
                raise RuntimeError(f"group request {request_id} refused: {results[request_id]}")
        for _ in range(50):  # the members' receipts of the changes settle
            pump.step(0.01)
        pipe.send(("ready", 1))
        command = pipe.recv()
        assert command[0] == "start", command
        t0, stop_at = command[1], command[2]
        wait_until(t0)
        cpu0 = cpu_seconds()
        seq = 0
        drain_deadline: float | None = None
        while True:
            now = time.monotonic()
            if now < stop_at:
                if spec.rate is not None:
                    due = int((now - t0) * spec.rate) + 1 - seq
                elif spec.window is None:
                    # The client's rule (`ClientCore.queue_message`): a message
                    # goes to the Connection at once, which keeps MAX_WINDOW
                    # chunks in flight and queues the rest; a user typing
                    # faster than the server takes them always has some
                    # queued (as many again: the queue is never empty when a
                    # chunk is acked, nor grows without end here).
                    due = 2 * MAX_WINDOW - owner.conn.unacked
                else:
                    due = spec.window - len(open_messages)
                for _ in range(max(0, due)):
                    seq += 1
                    open_messages.add(seq)
                    text = make_text(time.monotonic_ns(), seq)
                    send = Send(MsgId(owner.instance_id, seq), "#" + GROUP, text)
                    owner.conn.send(encode_message(send), STREAM)
                    owner.dirty = True
            else:
                if drain_deadline is None:
                    drain_deadline = now + spec.drain_timeout
                if not open_messages or now > drain_deadline:
                    break
            pump.step(0.001 if spec.rate is not None else 0.002)
        for _ in range(20):
            pump.step(0.005)
        pump.close()
        pipe.send(("done", {
            "sent": seq, "accepted": counts["accepted"], "refused": refused,
            "completed": sum(1 for s in range(1, seq + 1) if delivered.get(s, 0) >= members),
            "delivered_by": sum(delivered.values()),
            "recipients": sorted(set(accepted.values())), "cpu_s": cpu_seconds() - cpu0,
            "last_receipt": max(done_at, default=t0),
        }))  # fmt: skip
        # Stay logged in until the parent has what it needs from the members.
        pipe.recv()
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
    finally:
        for sock in socks:
            sock.close()
        pipe.close()


# --- phases ---------------------------------------------------------------------------


def counters(port: int) -> dict[str, float]:
    """The server's COUNTERS now (its /metrics page)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = float(value) if value and not line.startswith("#") else 0.0
    return {key: values.get(name, 0.0) for key, name in COUNTERS.items()}


# message id -> [when it was sent (ns), when its last member had it (ns), members that have it]
Arrivals = dict[tuple[int, int], list[int]]


def merge_arrivals(arrivals: Arrivals, result: dict[str, Any]) -> None:
    """Fold one member process's report (its packed arrays) into `arrivals`."""
    stamps, latest, reached = (array.array("q") for _ in range(3))
    stamps.frombytes(result["stamps"])
    latest.frombytes(result["latest"])
    reached.frombytes(result["reached"])
    for key, stamp, last, count in zip(json.loads(result["ids"]), stamps, latest, reached,
                                       strict=True):  # fmt: skip
        entry = arrivals.setdefault(tuple(key), [stamp, 0, 0])
        entry[1] = max(entry[1], last)
        entry[2] += count


def fanout_phase(size: int, rate: float | None, duration: float, load_workers: int,
                 tmp: Path, profile: Path | None = None,
                 window: int | None = None,
                 fanout_rate: str = FANOUT_RATE) -> dict[str, Any]:  # fmt: skip
    """A group of `size` (the owner and size - 1 members) on a fresh server
    (under cProfile into `profile` and `profile`.store if given)."""
    port = free_tcp_port()
    server = start_server(
        tmp,
        f"fanout-{size}",
        profile_out=profile,
        extra=[
            "--max-fanout-rate",
            fanout_rate,
            "--max-group-members",
            str(size),
            *TIMERS,
            "--metrics",
            f"127.0.0.1:{port}",
        ],
    )
    try:
        names = [f"m{i}" for i in range(size - 1)]
        parts = max(1, min(load_workers, len(names) // 50 or 1))
        groups = [names[i::parts] for i in range(parts)]
        specs = [MemberSpec(server.address, g) for g in groups]
        with workers(run_members, specs) as members:
            members.gather("ready", 600)
            drain = CLIENT_DRAIN if rate is None and window is None else 30.0
            sender_spec = SenderSpec(server.address, names, rate, window, drain)
            with workers(run_sender, [sender_spec]) as sender:
                sender.gather("ready", 600)
                before = counters(port)
                cpu0, split0 = server.cpu(), server.threads_cpu()
                t0 = time.monotonic() + START_DELAY
                sender.tell("start", t0, t0 + duration)
                (sent,) = sender.gather("done", duration + drain + 90)
                time.sleep(0.2)  # the last receipts' acks
                cpu1, split1 = server.cpu(), server.threads_cpu()
                after = counters(port)
                members.tell("stop")
                results = members.gather("done", 120)
                sender.tell("exit")
    finally:
        server.stop()
    arrivals: Arrivals = {}
    received = duplicates = 0
    load_cpu = sent["cpu_s"]
    for r in results:
        received += r["received"]
        duplicates += r["duplicates"]
        load_cpu += r["cpu_s"]
        merge_arrivals(arrivals, r)
    complete = [(last - stamp) / 1e6 for stamp, last, count in arrivals.values()
                if count == size - 1]  # fmt: skip
    members_reached = [count for _, _, count in arrivals.values()]
    complete.sort()
    last_arrival = max((last for _, last, _ in arrivals.values()), default=0) / 1e9
    elapsed = max(1e-9, max(last_arrival, sent["last_receipt"]) - t0)
    return {
        "members": size, "rate": rate, "window": window, "duration_s": duration,
        "sent": sent["sent"],
        "accepted": sent["accepted"], "completed": sent["completed"],
        "refused": sent.get("refused", {}),
        "recipients": sent["recipients"], "delivered_by_receipts": sent["delivered_by"],
        "copies": received, "copies_expected": sent["sent"] * (size - 1),
        "duplicates": duplicates, "messages_everyone_has": len(complete),
        "members_reached_min": min(members_reached, default=0),
        "members_reached_max": max(members_reached, default=0),
        "events_received": sum(r["events"] for r in results),
        "received_per_process": [r["received"] for r in results],
        "byes": sum(r["byes"] for r in results),
        "elapsed_s": elapsed, "copies_per_s": received / elapsed,
        "server_cpu_s": cpu1 - cpu0, "cpu_us_per_copy": (cpu1 - cpu0) / max(1, received) * 1e6,
        # The socket loop's share and the other threads' (the store's commits).
        "loop_cpu_us_per_copy": (split1[0] - split0[0]) / max(1, received) * 1e6,
        "other_threads_cpu_us_per_copy": (split1[1] - split0[1]) / max(1, received) * 1e6,
        **{f"{key}_per_copy": (after[key] - before[key]) / max(1, received) for key in COUNTERS},
        "commits_per_message": (after["commits"] - before["commits"]) / max(1, sent["sent"]),
        "load_cpu_s": load_cpu, "load_processes": len(results) + 1,
        "last_member_p50_ms": percentile(complete, 50),
        "last_member_p99_ms": percentile(complete, 99),
        "last_member_max_ms": complete[-1] if complete else 0.0,
    }  # fmt: skip


def direct_phase(duration: float, load_workers: int, tmp: Path) -> dict[str, Any]:
    """A direct message's server CPU, for comparison: 4 pairs flat out."""
    opts = Options(quick=False, runs=1, duration=duration, latency_duration=duration,
                   sessions=0, gui_duration=0, workers=load_workers, gui=False, pairs=(4,),
                   json_out=None, profile=False, keep=False)  # fmt: skip
    return traffic_phase("server", 4, duration, 64, opts, tmp)


def direct_steady_phase(pairs: int, rate: float, duration: float, load_workers: int,
                        tmp: Path, profile: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """The fair reference for a copy at a steady rate: a direct message at
    the same rate per recipient. `pairs` senders each write `rate` msg/s to
    a receiver of their own (loadgen's, which receipt at once, as the chat
    client does a direct message), on a server with the group phases' flags
    (TIMERS, --metrics); server CPU and datagrams in and out per message
    over the sending time, as for a copy (under cProfile into `profile` and
    `profile`.store if given, as `fanout_phase`)."""
    port = free_tcp_port()
    server = start_server(tmp, f"direct-{pairs}-{rate:g}", profile,
                          extra=[*TIMERS, "--metrics", f"127.0.0.1:{port}"])  # fmt: skip
    try:
        names = [f"d{i}" for i in range(pairs)]
        specs = [TrafficSpec(server.address, [(f"s{n}", f"r{n}") for n in group],
                             [f"r{n}" for n in group], rate=rate, drain_timeout=30.0)
                 for group in split(names, load_workers)]  # fmt: skip
        with workers(run_traffic, specs) as load:
            load.gather("ready", 600)
            before = counters(port)
            cpu0, split0 = server.cpu(), server.threads_cpu()
            t0 = time.monotonic() + START_DELAY
            load.tell("start", t0, t0 + duration)
            results = load.gather("done", duration + 120)
            time.sleep(0.2)  # the last receipts' acks (as the group phases)
            cpu1, split1 = server.cpu(), server.threads_cpu()
            after = counters(port)
    finally:
        server.stop()
    senders = [x for r in results for x in r["senders"]]
    receivers = [x for r in results for x in r["receivers"]]
    completed = sum(x["completed"] for x in senders)
    return {
        "pairs": pairs, "rate": rate, "duration_s": duration,
        "sent": sum(x["sent"] for x in senders), "completed": completed,
        "received": sum(x["received"] for x in receivers),
        "duplicates": sum(x["duplicates"] for x in receivers),
        "server_cpu_s": cpu1 - cpu0,
        "cpu_us_per_msg": (cpu1 - cpu0) / max(1, completed) * 1e6,
        "loop_cpu_us_per_msg": (split1[0] - split0[0]) / max(1, completed) * 1e6,
        "other_threads_cpu_us_per_msg": (split1[1] - split0[1]) / max(1, completed) * 1e6,
        **{f"{key}_per_msg": (after[key] - before[key]) / max(1, completed) for key in COUNTERS},
    }  # fmt: skip


def run(quick: bool, sizes: list[int], duration: float, steady_rate: float,
        load_workers: int, say: Any, profile: Path | None = None,
        window: int | None = None, fanout_rate: str = FANOUT_RATE,
        direct_pairs: int = DIRECT_PAIRS, modes: str = "both") -> dict[str, Any]:  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="udp-chat-fanout-"))
    out: dict[str, Any] = {"phases": []}
    rates = {"both": (None, steady_rate), "flat": (None,), "steady": (steady_rate,)}[modes]
    try:
        say(f"fanout: direct messages for comparison, 4 pairs, {duration:g} s")
        direct = direct_phase(duration, load_workers, tmp)
        out["direct_cpu_us_per_msg"] = direct["cpu_us_per_msg"]
        out["direct_msgs_per_s"] = direct["msgs_per_s"]
        if steady_rate in rates:
            say(f"fanout: direct messages at the steady rate for comparison, {direct_pairs} "
                f"pairs at {steady_rate:g} msg/s each, {duration:g} s")  # fmt: skip
            direct_file = None
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
                direct_file = profile / f"direct-{direct_pairs}-{steady_rate:g}.prof"
            out["direct_steady"] = direct_steady_phase(direct_pairs, steady_rate, duration,
                                                       load_workers, tmp, direct_file)  # fmt: skip
        for size in sizes:
            for rate in rates:
                mode = "flat out" if rate is None else f"{rate:g} msg/s"
                say(f"fanout: a group of {size}, {mode}, {duration:g} s")
                out_file = None
                if profile is not None:
                    profile.mkdir(parents=True, exist_ok=True)
                    out_file = profile / f"fanout-{size}-{'flat' if rate is None else rate}.prof"
                phase = fanout_phase(
                    size, rate, duration, load_workers, tmp, out_file, window, fanout_rate
                )
                phase["copy_to_direct_cpu"] = phase["cpu_us_per_copy"] / max(
                    1e-9, out["direct_cpu_us_per_msg"]
                )
                if rate is not None:  # and next to a direct message at the same rate
                    phase["copy_to_direct_steady_cpu"] = phase["cpu_us_per_copy"] / max(
                        1e-9, out["direct_steady"]["cpu_us_per_msg"]
                    )
                out["phases"].append(phase)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def mode_label(phase: dict[str, Any]) -> str:
    if phase["rate"] is not None:
        return f"{phase['rate']:g} msg/s"
    window = phase.get("window")
    return "flat out (client's rule)" if window is None else f"flat out (window {window})"


def table(figures: dict[str, Any]) -> str:
    rows = [("group, mode", "copies/s", "CPU us/copy (x direct)", "last member p50/p99/max ms",
             "sent / everyone has / dup")]  # fmt: skip
    for p in figures["phases"]:
        mode = mode_label(p)
        rows.append((
            f"{p['members']:,} members, {mode}", f"{p['copies_per_s']:,.0f}",
            f"{p['cpu_us_per_copy']:.1f} ({p['copy_to_direct_cpu']:.2f}x)",
            f"{p['last_member_p50_ms']:.0f} / {p['last_member_p99_ms']:.0f} / "
            f"{p['last_member_max_ms']:.0f}",
            f"{p['sent']} / {p['messages_everyone_has']} / {p['duplicates']}",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    for p in figures["phases"]:
        mode = mode_label(p)
        lines.append(f"{p['members']:,} members, {mode}: per copy {p['datagrams_in_per_copy']:.3f} "
                     f"datagrams in, {p['datagrams_out_per_copy']:.3f} out; "
                     f"{p['commits_per_message']:.2f} commits per message")  # fmt: skip
    for p in figures["phases"]:
        if p.get("loop_passes_per_copy"):
            lines.append(f"{p['members']:,} members, {mode_label(p)}: per copy "
                         f"{p['loop_passes_per_copy']:.3f} loop passes, "
                         f"{p.get('loop_timeouts_per_copy', 0):.3f} woken by a timer, "
                         f"{p.get('timers_idle_per_copy', 0):.3f} session timers with nothing "
                         f"due")  # fmt: skip
    for p in figures["phases"]:
        if p.get("refused"):
            why = ", ".join(f"{n} {k}" for k, n in sorted(p["refused"].items()))
            lines.append(f"{p['members']:,} members, {mode_label(p)}: refused (FAIL) {why}")
    lines.append(f"direct message: {figures['direct_cpu_us_per_msg']:.1f} us CPU/msg "
                 f"({figures['direct_msgs_per_s']:,.0f} msg/s, 4 pairs); targets: a copy <= "
                 f"1/3 of it, p99 <= {TARGET_P99_MS:.0f} ms at 10 msg/s into 1,000")  # fmt: skip
    steady = figures.get("direct_steady")
    if steady is not None:
        lines.append(
            f"direct message at {steady['rate']:g} msg/s per recipient ({steady['pairs']} "
            f"pairs): {steady['cpu_us_per_msg']:.1f} us CPU/msg, "
            f"{steady['datagrams_in_per_msg']:.3f} datagrams in, "
            f"{steady['datagrams_out_per_msg']:.3f} out per message, "
            f"{steady['commits_per_msg']:.3f} commits; loop / other threads "
            f"{steady['loop_cpu_us_per_msg']:.1f} / "
            f"{steady['other_threads_cpu_us_per_msg']:.1f} us "
            f"({steady['completed']} of {steady['sent']} completed)"
        )
        if steady.get("loop_passes_per_msg"):
            lines.append(f"direct message at {steady['rate']:g} msg/s: per message "
                         f"{steady['loop_passes_per_msg']:.3f} loop passes, "
                         f"{steady.get('loop_timeouts_per_msg', 0):.3f} woken by a timer, "
                         f"{steady.get('timers_idle_per_msg', 0):.3f} session timers with "
                         f"nothing due")  # fmt: skip
        for p in figures["phases"]:
            if p["rate"] is not None:
                lines.append(f"{p['members']:,} members, {mode_label(p)}: a copy is "
                             f"{p['copy_to_direct_steady_cpu']:.2f}x a direct message at the "
                             f"same rate, {p['copy_to_direct_cpu']:.2f}x one flat out "
                             f"(target <= {TARGET_COPY_RATIO:.2f}x); loop / other threads "
                             f"{p.get('loop_cpu_us_per_copy', 0):.1f} / "
                             f"{p.get('other_threads_cpu_us_per_copy', 0):.1f} us")  # fmt: skip
    return "\n".join(lines)


def window_arg(value: str) -> int | None:
    """`--window`: a number of messages, or "client" (None: the client's rule)."""
    return None if value == "client" else int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fanout", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny groups, a few seconds")
    parser.add_argument("--sizes", help="group sizes (default 100,1000; --quick 10)")
    parser.add_argument("--duration", type=float,
                        help="seconds of sending per phase (default 5; --quick 0.2)")  # fmt: skip
    parser.add_argument("--rate", type=float, default=10.0, help="the steady phase's msg/s")
    parser.add_argument("--workers", type=int, default=2, help="member load processes at most")
    parser.add_argument("--window", type=window_arg, default=None, metavar="N|client",
                        help=f"flat out: 'client' (the default), the chat client's rule "
                             f"(its connection's {MAX_WINDOW} chunks in flight, the rest "
                             f"queued); or N, at most N messages not yet delivered to every "
                             f"member ({WINDOW}: earlier sessions' figures)")  # fmt: skip
    parser.add_argument("--fanout-rate", default=FANOUT_RATE, metavar="COPIES",
                        help=f"the server's --max-fanout-rate (default {FANOUT_RATE}: out of "
                             f"the way; the server's own default is 10000)")  # fmt: skip
    parser.add_argument("--direct-pairs", type=int, metavar="N",
                        help=f"the steady phase's reference: N pairs, each a direct message "
                             f"at --rate (default {DIRECT_PAIRS}; --quick 2)")  # fmt: skip
    parser.add_argument(
        "--modes",
        choices=("both", "flat", "steady"),
        default="both",
        help="the group phases to run: flat out, at --rate, or both (default)",
    )
    parser.add_argument("--json", action="store_true", help="the figures as JSON on stdout")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run each phase's server under cProfile, stats into DIR "
                             "(fanout-SIZE-MODE.prof and .prof.store, the steady reference's "
                             "direct-PAIRS-RATE.prof; CPU figures then "
                             "include the profiler's cost)")  # fmt: skip
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("10" if args.quick else "100,1000")).split(",")]
    duration = args.duration or (0.2 if args.quick else 5.0)
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    direct_pairs = args.direct_pairs or (2 if args.quick else DIRECT_PAIRS)
    figures = run(args.quick, sizes, duration, args.rate, max(1, args.workers), say, args.profile,
                  args.window, args.fanout_rate, direct_pairs, args.modes)  # fmt: skip
    if args.json:
        print(json.dumps(figures))
    else:
        print(table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
