"""The benchmark: throughput, CPU per message, latency, scale, memory, GUI lag.

    python -m bench                  # the full run (a few minutes on 2 cores)
    python -m bench --quick          # tiny sizes, a few seconds
    python -m bench --runs 3         # repeat and quote medians
    python -m bench --profile        # the 16-pair load against a cProfiled server
    python -m bench --cluster 2      # cluster mode: 1 and 2 nodes on Redis (bench/cluster.py)

Every figure comes from real processes on 127.0.0.1: the server is
`python chat_server.py --port 0 --data-dir TMP ...` (SQLite, WAL,
synchronous=FULL: an ACCEPT waits for the commit), the baseline is
`bench/bare_relay.py`, and the load comes from worker processes speaking
the real protocol (`loadgen.py`). CPU is user+system from /proc/PID/stat
(the server's and its key-exchange workers'),
memory is VmRSS from /proc/PID/status. The table goes to stdout and the
same figures, per run and as medians, to bench/results/*.json.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import pstats
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ROOT
from bench.loadgen import (
    RTO_MAX,
    RTO_MIN,
    TEXT_SIZE,
    BareSpec,
    LoginSpec,
    TrafficSpec,
    run_bare,
    run_logins,
    run_traffic,
)

RESULTS = ROOT / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAIR_COUNTS = (1, 4, 16)
WINDOW = 64
ITERATIONS = 4096
GUI_RATE = 1000.0
GUI_HISTORY = (100_000, 1000)  # stored messages, contacts: the window's long-history figures
GUI_HISTORY_QUICK = (3000, 50)
START_DELAY = 0.3  # between "start" and t0, so every worker begins together

TARGETS = {
    "cpu_ratio": "<= 2x",
    "msgs_per_s_16": ">= 50,000",
    "loss": "0",
    "latency_p50_us": "<= 150",
    "bytes_per_session": "<= 4096",
    "login_s_10000": "<= 10 s",
    "gui_lag_p99_ms": "<= 50",
    "gui_history_ms": "<= 200 ms",
    "copy_ratio": "<= 1/3",
    "fanout_p99_ms": "<= 200",
    "chatlike_ratio": "<= 3x",
    "lone_us": "<= 100",
}


@dataclass
class Options:
    quick: bool
    runs: int
    duration: float
    latency_duration: float
    sessions: int
    gui_duration: float
    workers: int
    gui: bool
    pairs: tuple[int, ...]
    json_out: Path | None
    profile: bool
    keep: bool
    cluster: int = 0  # nodes at most: the cluster benchmark instead (bench/cluster.py)
    fanout: bool = True
    chatlike: bool = True
    sweep: bool = True


# --- processes ------------------------------------------------------------------


def proc_cpu(pid: int, tid: int | None = None) -> float:
    """user + system CPU seconds of a process (all its threads), or of one thread."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu(pid: int) -> float:
    """user + system CPU seconds of a process and of every live process under
    it (the server's key-exchange workers are its grandchildren)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry.name}/stat") as f:
                    parents[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
    total, family = 0.0, {pid}
    grew = True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in family and child not in family:
                family.add(child)
                grew = True
    for member in family:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += proc_cpu(member)
    return total


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process, by thread id (the main
    thread's id is the pid)."""
    out = {}
    for entry in os.scandir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError):
            out[int(entry.name)] = proc_cpu(pid, int(entry.name))
    return out


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped at the UDP socket bound to `port` (its
    receive buffer was full): /proc/net/udp, last column."""
    total = 0
    for table_path in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError), open(table_path) as f:
            next(f)
            for line in f:
                parts = line.split()
                if int(parts[1].rsplit(":", 1)[1], 16) == port:
                    total += int(parts[-1])
    return total


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class Child:
    """A subprocess that prints "... listening on HOST:PORT" when ready."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        self.data_dir: Path | None = None
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
            cwd=ROOT, env=env,
        )  # fmt: skip
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30.0)
        line = self.proc.stdout.readline().decode() if ready else ""
        match = re.search(r"listening on (\S+):(\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"{command[1]} did not start: {line!r} {self.log_text()[-500:]}")
        self.address = (match.group(1), int(match.group(2)))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return tree_cpu(self.pid)

    def threads_cpu(self) -> tuple[float, float]:
        """(main thread, other threads) CPU seconds: the socket loop and the
        store thread for the server."""
        per = thread_cpu(self.pid)
        main = per.pop(self.pid, 0.0)
        return main, sum(per.values())

    def rss_kib(self) -> int:
        return proc_rss_kib(self.pid)

    def drops(self) -> int:
        return udp_drops(self.address[1])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def start_server(
    tmp: Path, label: str, profile_out: Path | None = None, data: Path | None = None,
    extra: Sequence[str] = (),
) -> Child:  # fmt: skip
    """A fresh server process; with a fresh data directory unless `data` is
    given; `extra`: more flags (bench/metrics_scrape.py: --metrics)."""
    data = data or Path(tempfile.mkdtemp(prefix=f"data-{label}-", dir=tmp))
    script = ["bench/profile_server.py", "--profile-out", str(profile_out)] if profile_out else [
        "chat_server.py"
    ]  # fmt: skip
    command = [
        sys.executable, *script, "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data),
        "--pbkdf2-iterations", str(ITERATIONS), "--preauth-rate", "1000000",
        "--preauth-total-rate", "1000000",
        "--user-msg-rate", "1000000", "--max-sessions", "1000000", "--registration-rate", "1000000",
        "--rto-min", str(RTO_MIN), "--rto-max", str(RTO_MAX), "--log-level", "warning", *extra,
    ]  # fmt: skip
    child = Child(command, data / "server.log")
    child.data_dir = data
    return child


def start_bare(tmp: Path, label: str) -> Child:
    log = Path(tempfile.mkdtemp(prefix=f"bare-{label}-", dir=tmp)) / "bare.log"
    return Child([sys.executable, "bench/bare_relay.py", "0"], log)


class Workers:
    """Load worker processes and the pipes to them."""

    def __init__(self, target: Callable[[Any, Pipe], None], specs: list[Any]) -> None:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        ctx: Any = multiprocessing.get_context(method)
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.pipes: list[Pipe] = []
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(spec, child), daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.pipes.append(parent)

    def gather(self, kind: str, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        out = []
        for pipe in self.pipes:
            left = deadline - time.monotonic()
            if left <= 0 or not pipe.poll(left):
                raise RuntimeError(f"a load worker did not report {kind!r} in {timeout:.0f} s")
            message = pipe.recv()
            if message[0] == "error":
                raise RuntimeError(f"a load worker failed:\n{message[1]}")
            if message[0] != kind:
                raise RuntimeError(f"a load worker said {message[0]!r}, expected {kind!r}")
            out.append(message[1])
        return out

    def tell(self, *message: Any) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(message)

    def close(self) -> None:
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()


@contextlib.contextmanager
def workers(target: Callable[[Any, Pipe], None], specs: list[Any]) -> Iterator[Workers]:
    group = Workers(target, specs)
    try:
        yield group
    finally:
        group.close()


def split(items: list[Any], parts: int) -> list[list[Any]]:
    parts = max(1, min(parts, len(items)))
    return [items[i::parts] for i in range(parts)]


# --- figures --------------------------------------------------------------------


def percentile(sorted_values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


def latencies_us(peers: list[dict[str, Any]], key: str = "latencies") -> list[float]:
    """The sorted latencies (us) recorded under `key` by the load clients."""
    values = array.array("q")
    for r in peers:
        values.frombytes(r.get(key, b""))
    return sorted(v / 1000 for v in values)


# --- phases ---------------------------------------------------------------------


def traffic_phase(
    kind: str, pairs: int, duration: float, window: int, opts: Options, tmp: Path,
    profile_out: Path | None = None, server_flags: tuple[str, ...] = (),
) -> dict[str, Any]:  # fmt: skip
    """`pairs` senders each writing flat out to their own receiver, through
    the server ("server", with `server_flags` added) or the bare loop
    ("bare"), for `duration` seconds."""
    label = f"{kind}-{pairs}-{window}"
    if kind == "server":
        relay = start_server(tmp, label, profile_out, extra=server_flags)
    else:
        relay = start_bare(tmp, label)
    try:
        names = [f"p{i}" for i in range(pairs)]
        groups = split(names, opts.workers)
        if kind == "server":
            specs: list[Any] = [
                TrafficSpec(
                    relay.address,
                    [(f"s{n}", f"r{n}") for n in g],
                    [f"r{n}" for n in g],
                    window=window,
                )  # fmt: skip
                for g in groups
            ]
            target: Callable[[Any, Pipe], None] = run_traffic
        else:
            specs = [BareSpec(relay.address, g, window=window) for g in groups]
            target = run_bare
        with workers(target, specs) as group:
            group.gather("ready", 120)
            cpu0, rss0, split0 = relay.cpu(), relay.rss_kib(), relay.threads_cpu()
            drops0 = relay.drops()
            t0 = time.monotonic() + START_DELAY
            group.tell("start", t0, t0 + duration)
            results = group.gather("done", duration + 60)
            cpu1, rss1, split1 = relay.cpu(), relay.rss_kib(), relay.threads_cpu()
            drops = relay.drops() - drops0
    finally:
        relay.stop()
    senders = [s for r in results for s in r["senders"]]
    receivers = [x for r in results for x in r["receivers"]]
    sent = sum(s["sent"] for s in senders)
    completed = sum(s["completed"] for s in senders)
    received = sum(r["received"] for r in receivers)
    end = max((s["last_complete"] for s in senders), default=0.0)
    elapsed = max(1e-9, (end if end > t0 else max(r["end"] for r in results)) - t0)
    relay_cpu = cpu1 - cpu0
    load_cpu = sum(r["cpu_s"] for r in results)
    lat = latencies_us(receivers)
    # From the sender's `send` (loadgen's wire latencies); the bare loop's
    # clients stamp right before it, so theirs are that already.
    wire = latencies_us(receivers, "wire_latencies") if kind == "server" else lat
    acc = latencies_us(senders, "accept_latencies")
    dlv = latencies_us(senders, "delivered_latencies")
    into_relay = sum(s["datagrams_out"] for s in senders) + sum(
        r["datagrams_out"] for r in receivers
    )
    notices: dict[str, int] = {}
    for s in [*senders, *receivers]:
        for code, count in s.get("notices", {}).items():
            notices[code] = notices.get(code, 0) + count
    return {
        "pairs": pairs, "window": window, "elapsed_s": elapsed,
        "msgs_per_s": completed / elapsed,
        "sent": sent, "received": received, "completed": completed,
        "accepted": sum(s["accepted"] for s in senders),
        "delivered": sum(s["delivered"] for s in senders),
        "failed": sum(s["failed"] for s in senders),
        "duplicates": sum(r["duplicates"] for r in receivers),
        "lost": sent - received, "incomplete": sent - completed,
        "relay_cpu_s": relay_cpu,
        "cpu_us_per_msg": relay_cpu / max(1, completed) * 1e6,
        "relay_cpu_pct": 100 * relay_cpu / elapsed,
        "loop_thread_cpu_us_per_msg": (split1[0] - split0[0]) / max(1, completed) * 1e6,
        "other_threads_cpu_us_per_msg": (split1[1] - split0[1]) / max(1, completed) * 1e6,
        "load_cpu_s": load_cpu, "load_cpu_pct": 100 * load_cpu / elapsed,
        "load_cpu_us_per_msg": load_cpu / max(1, completed) * 1e6,
        "load_workers": len(results),
        "lat_p50_us": percentile(lat, 50), "lat_p99_us": percentile(lat, 99),
        "lat_max_us": lat[-1] if lat else 0.0,
        "lat_wire_p50_us": percentile(wire, 50), "lat_wire_p99_us": percentile(wire, 99),
        "accept_p50_us": percentile(acc, 50), "accept_p99_us": percentile(acc, 99),
        "delivered_p50_us": percentile(dlv, 50), "delivered_p99_us": percentile(dlv, 99),
        "datagrams_into_relay_per_msg": into_relay / max(1, completed),
        "relay_rss_growth_b_per_msg": (rss1 - rss0) * 1024 / max(1, completed),
        "rate_limited_notices": notices.get("rate_limited", 0),
        "relay_socket_drops": drops,
    }  # fmt: skip


def scale_phase(opts: Options, tmp: Path) -> dict[str, Any]:
    """N logins (full SCRAM handshakes; the first login of a name registers
    it, durably) from a few processes sharing a few sockets; N idle sessions
    (memory); then the server restarts on its data and all N log in again
    (existing accounts: the storm after a restart)."""
    n = opts.sessions
    server = start_server(tmp, "scale")
    out: dict[str, Any] = {"sessions": n}
    try:
        names = [f"u{i}" for i in range(n)]
        specs = [LoginSpec(server.address, g) for g in split(names, opts.workers)]
        with workers(run_logins, specs) as group:
            group.gather("ready", 600)
            time.sleep(0.3)  # let the server settle after the salt round
            rss0 = server.rss_kib()
            out.update(_login_round(server, group, "start", "register"))
            time.sleep(0.5)  # the last commits
            rss1 = server.rss_kib()
            server.stop()
            server = start_server(tmp, "scale", data=server.data_dir)  # same accounts
            out.update(_login_round(server, group, "again", "existing"))
            group.tell("exit")
    finally:
        server.stop()
    out.update(
        logged_in=out["register_logged_in"], login_s=out["register_s"],
        logins_per_s=out["register_per_s"],
        server_cpu_us_per_login=out["register_server_cpu_us"],
        rss_before_kib=rss0, rss_after_kib=rss1,
        bytes_per_session=(rss1 - rss0) * 1024 / max(1, out["register_logged_in"]),
    )  # fmt: skip
    return out


def _login_round(server: Child, group: Workers, command: str, label: str) -> dict[str, Any]:
    cpu0, drops0 = server.cpu(), server.drops()
    t0 = time.monotonic() + START_DELAY
    group.tell(command, t0, server.address)
    results = group.gather("done", 600)
    end = max(r["end"] for r in results)
    cpu1, drops = server.cpu(), server.drops() - drops0
    logged_in = sum(r["logged_in"] for r in results)
    return {
        f"{label}_logged_in": logged_in, f"{label}_s": end - t0,
        f"{label}_per_s": logged_in / max(1e-9, end - t0),
        f"{label}_server_cpu_us": (cpu1 - cpu0) / max(1, logged_in) * 1e6,
        f"{label}_load_cpu_s": sum(r["cpu_s"] for r in results),
        f"{label}_resends": sum(r["resends"] for r in results),
        f"{label}_socket_drops": drops,
    }  # fmt: skip


def logic_phase(opts: Options) -> dict[str, Any]:
    """`bench/relay_micro.py` in a fresh interpreter: the Relay's own CPU per
    message and the memory it keeps per message and per idle session."""
    messages, sessions = (60, 5) if opts.quick else (5000, 300)
    result = subprocess.run(
        [sys.executable, "-m", "bench.relay_micro", "--json", "--messages", str(messages),
         "--sessions", str(sessions), "--pairs", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"bench.relay_micro failed:\n{result.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(result.stdout)
    return figures


def fanout_phase(opts: Options) -> dict[str, Any]:
    """`bench/fanout.py` (issue 14): one sender into groups of 100 and 1,000
    members (load-generator sessions), flat out and at 10 msg/s: copies per
    second, server CPU per copy next to a direct message's, send -> the last
    member has it."""
    command = [sys.executable, "-m", "bench.fanout", "--json", "--workers", str(opts.workers)]
    if opts.quick:
        command.append("--quick")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                            check=False)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"bench.fanout failed:\n{result.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(result.stdout)
    return figures


def chatlike_phase(opts: Options) -> dict[str, Any]:
    """`bench/chatlike.py` (issue 18): pairs at 150 msg/s each beside idle
    sessions under the server's default limits, against the bare loop with
    the same datagrams; then idle sessions alone (keepalive CPU)."""
    command = [sys.executable, "-m", "bench.chatlike", "--json", "--workers", str(opts.workers)]
    if opts.quick:
        command.append("--quick")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                            check=False)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"bench.chatlike failed:\n{result.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(result.stdout)
    return figures


def sweep_phase(opts: Options, tmp: Path) -> dict[str, Any]:
    """`bench/sweep.py` (issue 18): 16 pairs at offered loads from 150 msg/s
    to flat out, the server and the bare loop at each: delivered msg/s and
    CPU per message. Its JSON is the file `python -m bench.plot` draws."""
    out = tmp / "sweep.json"
    command = [sys.executable, "-m", "bench.sweep", "--workers", str(opts.workers),
               "--json-out", str(out)]  # fmt: skip
    if opts.quick:
        command.append("--quick")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                            check=False)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"bench.sweep failed:\n{result.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(out.read_text("utf-8"))
    return figures


def display_works(display: str) -> bool:
    env = dict(os.environ, DISPLAY=display)
    try:
        result = subprocess.run(
            [sys.executable, "-c", "import tkinter; tkinter.Tk().destroy()"], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=15, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@contextlib.contextmanager
def a_display(tmp: Path) -> Iterator[str | None]:
    """$DISPLAY if a Tk window opens there, else a private Xvfb, else None."""
    current = os.environ.get("DISPLAY")
    if current and display_works(current):
        yield current
        return
    binary = shutil.which("Xvfb")
    if binary is None:
        yield None
        return
    for number in range(110, 150):
        if Path(f"/tmp/.X{number}-lock").exists() or Path(f"/tmp/.X11-unix/X{number}").exists():
            continue
        log = open(tmp / f"xvfb-{number}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [binary, f":{number}", "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        up = False
        while time.monotonic() < deadline and proc.poll() is None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                try:
                    sock.connect(f"/tmp/.X11-unix/X{number}")
                    up = True
                    break
                except OSError:
                    time.sleep(0.05)
        try:
            if up:
                yield f":{number}"
                return
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            log.close()
    yield None


def gui_phase(opts: Options, tmp: Path) -> dict[str, Any]:
    """A real ChatWindow receiving GUI_RATE messages/s: its after() lag."""
    skipped = {"status": "skipped: no display", "rate": GUI_RATE, "received": 0,
               "lag_p50_ms": None, "lag_p99_ms": None, "lag_max_ms": None,
               "busy_p99_ms": None, "busy_max_ms": None, "arrival_per_s": None}  # fmt: skip
    if not opts.gui:
        return {**skipped, "status": "skipped: --no-gui"}
    with a_display(tmp) as display:
        if display is None:
            return skipped
        server = start_server(tmp, "gui")
        home = Path(tempfile.mkdtemp(prefix="gui-home-", dir=tmp))
        gui_log = open(home / "gui.log", "wb")  # noqa: SIM115 - closed below
        env = dict(os.environ, DISPLAY=display, HOME=str(home),
                   XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"),
                   PYTHONUNBUFFERED="1")  # fmt: skip
        gui = subprocess.Popen(
            [sys.executable, "-m", "bench.gui_lag", "--server",
             "{}:{}".format(*server.address), "--user", "viewer", "--store", str(home / "store")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=gui_log, cwd=ROOT,
            env=env, text=True,
        )  # fmt: skip
        assert gui.stdin is not None and gui.stdout is not None
        try:
            # Tk's start and a registering login: at load average 40-50 on
            # two cores 30 s was not always enough (a crash, not a figure).
            line = _read_line(gui, 90)
            if line != "ready":
                gui_log.flush()
                tail = (home / "gui.log").read_text("utf-8", "replace")[-2000:]
                raise RuntimeError(f"the GUI did not log in: {line!r}\n{tail}")
            spec = TrafficSpec(server.address, [("writer", "viewer")], [], window=256,
                               rate=GUI_RATE)  # fmt: skip
            with workers(run_traffic, [spec]) as group:
                group.gather("ready", 60)
                t0 = time.monotonic() + START_DELAY
                group.tell("start", t0, t0 + opts.gui_duration)
                time.sleep(START_DELAY)
                gui.stdin.write("go\n")
                gui.stdin.flush()
                results = group.gather("done", opts.gui_duration + 60)
            gui.stdin.write("stop\n")
            gui.stdin.flush()
            report = json.loads(_read_line(gui, 30))
        finally:
            with contextlib.suppress(OSError):
                gui.stdin.close()
            try:
                gui.wait(15)
            except subprocess.TimeoutExpired:
                gui.kill()
                gui.wait(5)
            gui.stdout.close()
            gui_log.close()
            server.stop()
        history = gui_history_phase(opts, display)
    sender = results[0]["senders"][0]
    lag = sorted(x * 1000 for x in report["lag"])
    busy = sorted(x * 1000 for x in report["busy"])
    elapsed = max(1e-9, (sender["last_complete"] or results[0]["end"]) - t0)
    return {
        "status": "ok", "rate": GUI_RATE, "received": report["received"],
        "sent": sender["sent"], "completed": sender["completed"],
        "arrival_per_s": sender["completed"] / elapsed,
        "lag_p50_ms": percentile(lag, 50), "lag_p99_ms": percentile(lag, 99),
        "lag_max_ms": lag[-1] if lag else 0.0,
        "busy_p99_ms": percentile(busy, 99), "busy_max_ms": busy[-1] if busy else 0.0,
        "history": history,
    }  # fmt: skip


def gui_history_phase(opts: Options, display: str) -> dict[str, Any]:
    """First paint, switching and Find in a window over a long stored
    history (`bench/gui_history.py`, in its own process)."""
    messages, contacts = GUI_HISTORY_QUICK if opts.quick else GUI_HISTORY
    result = subprocess.run(
        [sys.executable, "-m", "bench.gui_history", "--json", "--messages", str(messages),
         "--contacts", str(contacts)],
        cwd=ROOT, env=dict(os.environ, DISPLAY=display), capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(
            f"bench.gui_history failed ({result.returncode}): {result.stderr[-2000:]}"
        )
    return dict(json.loads(lines[-1]))


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def run_once(opts: Options, tmp: Path, say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"throughput": {}, "latency": {}}
    for kind in ("bare", "server"):
        out["throughput"][kind] = {}
        for pairs in opts.pairs:
            say(f"{kind}: {pairs} pair(s), window {WINDOW}, {opts.duration:g} s")
            out["throughput"][kind][f"pairs{pairs}"] = traffic_phase(
                kind, pairs, opts.duration, WINDOW, opts, tmp
            )
        say(f"{kind}: 1 message in flight, {opts.latency_duration:g} s")
        out["latency"][kind] = traffic_phase(kind, 1, opts.latency_duration, 1, opts, tmp)
    top = f"pairs{max(opts.pairs)}"
    out["cpu_ratio"] = {
        f"pairs{p}": out["throughput"]["server"][f"pairs{p}"]["cpu_us_per_msg"]
        / max(1e-9, out["throughput"]["bare"][f"pairs{p}"]["cpu_us_per_msg"])
        for p in opts.pairs
    }
    out["cpu_ratio"]["top"] = out["cpu_ratio"][top]
    say("logic: the Relay in-process, no sockets (CPU and memory kept per message, per session)")
    out["logic"] = logic_phase(opts)
    say(f"scale: {opts.sessions} logins, then idle sessions")
    out["scale"] = scale_phase(opts, tmp)
    say(f"gui: {GUI_RATE:g} messages/s into a ChatWindow for {opts.gui_duration:g} s")
    out["gui"] = gui_phase(opts, tmp)
    if opts.fanout:
        say("fanout: groups (bench/fanout.py), flat out and at 10 msg/s")
        out["fanout"] = fanout_phase(opts)
    if opts.chatlike:
        say("chatlike: pairs at 150 msg/s beside idle sessions; keepalives alone")
        out["chatlike"] = chatlike_phase(opts)
    if opts.sweep:
        say("sweep: offered loads from light to flat out, server and bare loop (bench/sweep.py)")
        out["sweep"] = sweep_phase(opts, tmp)
    return out


# --- medians, table, JSON -----------------------------------------------------------


def median_tree(runs: list[Any]) -> Any:
    first = runs[0]
    if isinstance(first, dict):
        return {k: median_tree([r[k] for r in runs]) for k in first}
    if isinstance(first, bool) or not isinstance(first, (int, float)):
        return first
    values = [r for r in runs if isinstance(r, (int, float))]
    return statistics.median(values) if values else first


def _n(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pair(a: float | None, b: float | None, digits: int = 0) -> str:
    return f"{_n(a, digits)} / {_n(b, digits)}"


class Table:
    """Rows of: figure, bare loop, server, ratio, target, verdict."""

    HEAD = ("figure", "bare loop", "server", "ratio", "target", "")

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str, str]] = []

    def add(self, label: str, bare: str = "", server: str = "", ratio: str = "",
            target: str = "", ok: bool | None = None) -> None:  # fmt: skip
        verdict = "" if ok is None else ("ok" if ok else "MISS")
        self.rows.append((label, bare, server, ratio, target, verdict))

    def render(self) -> str:
        rows = [self.HEAD, *self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = []
        for r in rows:
            cells = [r[0].ljust(widths[0]), *(r[i].rjust(widths[i]) for i in range(1, 5)), r[5]]
            lines.append("  ".join(cells).rstrip())
        lines.insert(1, "-" * max(len(line) for line in lines))
        return "\n".join(lines)


def table(m: dict[str, Any], opts: Options) -> str:
    tp, lat, t = m["throughput"], m["latency"], Table()
    top = max(opts.pairs)

    def both(p: int) -> tuple[dict[str, Any], dict[str, Any]]:
        return tp["bare"][f"pairs{p}"], tp["server"][f"pairs{p}"]

    for p in opts.pairs:
        b, s = both(p)
        t.add(f"relayed msg/s, {p} pair(s), window {WINDOW}", _n(b["msgs_per_s"]),
              _n(s["msgs_per_s"]), target=TARGETS["msgs_per_s_16"] if p == 16 else "",
              ok=s["msgs_per_s"] >= 50_000 if p == 16 else None)  # fmt: skip
    for p in opts.pairs:
        b, s = both(p)
        t.add(f"  lost / duplicated / incomplete, {p} pair(s)",
              f"{b['lost']}/{b['duplicates']}/{b['incomplete']}",
              f"{s['lost']}/{s['duplicates']}/{s['incomplete']}", target=TARGETS["loss"],
              ok=s["lost"] == s["duplicates"] == s["incomplete"] == 0)  # fmt: skip
    for p in opts.pairs:
        b, s = both(p)
        ratio = m["cpu_ratio"][f"pairs{p}"]
        t.add(f"relay CPU us/msg, {p} pair(s)", _n(b["cpu_us_per_msg"], 1),
              _n(s["cpu_us_per_msg"], 1), f"{ratio:.1f}x", TARGETS["cpu_ratio"] if p == top else "",
              ratio <= 2 if p == top else None)  # fmt: skip
    b, s = both(top)
    t.add(
        f"  server loop thread / store thread us/msg, {top} pairs",
        "",
        _pair(s["loop_thread_cpu_us_per_msg"], s["other_threads_cpu_us_per_msg"], 1),
    )
    t.add(f"  relay CPU, % of a core, {top} pairs", _n(b["relay_cpu_pct"]),
          _n(s["relay_cpu_pct"]))  # fmt: skip
    t.add(f"  load generator CPU, % of a core, {top} pairs ({s['load_workers']} procs)",
          _n(b["load_cpu_pct"]), _n(s["load_cpu_pct"]))  # fmt: skip
    t.add(f"  load generator CPU us/msg, {top} pairs", _n(b["load_cpu_us_per_msg"], 1),
          _n(s["load_cpu_us_per_msg"], 1))  # fmt: skip
    t.add(
        f"  datagrams into the relay per msg, {top} pairs",
        _n(b["datagrams_into_relay_per_msg"], 2),
        _n(s["datagrams_into_relay_per_msg"], 2),
    )
    t.add(f"  datagrams dropped at the relay's socket (buffer full), {top} pairs",
          _n(b["relay_socket_drops"]), _n(s["relay_socket_drops"]))  # fmt: skip
    t.add(f"  relay RSS growth, bytes/msg, {top} pairs", _n(b["relay_rss_growth_b_per_msg"]),
          _n(s["relay_rss_growth_b_per_msg"]))  # fmt: skip
    bl, sl = lat["bare"], lat["server"]
    t.add("one-way latency p50 / p99 us, 1 in flight", _pair(bl["lat_p50_us"], bl["lat_p99_us"]),
          _pair(sl["lat_p50_us"], sl["lat_p99_us"]), target=f"p50 {TARGETS['latency_p50_us']}",
          ok=sl["lat_p50_us"] <= 150)  # fmt: skip
    t.add("  1 in flight: from the sender's send, its encoding left out, p50 / p99 us",
          _pair(bl["lat_wire_p50_us"], bl["lat_wire_p99_us"]),
          _pair(sl["lat_wire_p50_us"], sl["lat_wire_p99_us"]))  # fmt: skip
    t.add(
        "  1 in flight: accepted (durable) / delivered p50 us",
        "",
        _pair(sl["accept_p50_us"], sl["delivered_p50_us"]),
    )
    t.add("  1 in flight: relay CPU us/msg (a lone message)", _n(bl["cpu_us_per_msg"], 1),
          _n(sl["cpu_us_per_msg"], 1), target=TARGETS["lone_us"],
          ok=sl["cpu_us_per_msg"] <= 100)  # fmt: skip
    t.add(
        "  1 in flight: server loop thread / store thread us/msg",
        "",
        _pair(sl["loop_thread_cpu_us_per_msg"], sl["other_threads_cpu_us_per_msg"], 1),
    )
    t.add("  1 in flight: msg/s", _n(bl["msgs_per_s"]), _n(sl["msgs_per_s"]))
    for p in opts.pairs:
        b, s = both(p)
        t.add(
            f"one-way latency p50 / p99 us, {p} pair(s) loaded",
            _pair(b["lat_p50_us"], b["lat_p99_us"]),
            _pair(s["lat_p50_us"], s["lat_p99_us"]),
        )
    b, s = both(top)
    t.add(
        f"  accepted (durable) p50 / p99 us, {top} pairs",
        "",
        _pair(s["accept_p50_us"], s["accept_p99_us"]),
    )
    lg = m["logic"]
    t.add("  server logic alone (Relay in-process, no sockets/store) us/msg", "",
          _n(lg["logic_us_per_msg"], 1))  # fmt: skip
    t.add(
        "  server memory kept per relayed message after delivery: bytes, objects",
        "",
        f"{_n(lg['retained_b_per_msg'])}, {lg['retained_blocks_per_msg']:.3f}",
        target="< 64 B",  # what remains is dict/set tables at their high-water mark
        ok=lg["retained_b_per_msg"] < 64,
    )
    sc = m["scale"]
    n = sc["sessions"]
    t.add(f"memory per idle session, bytes ({n:,} sessions)", "", _n(sc["bytes_per_session"]),
          target=TARGETS["bytes_per_session"], ok=sc["bytes_per_session"] <= 4096)  # fmt: skip
    for label, text in (("register", "registering"), ("existing", "existing, after a restart")):
        t.add(f"{n:,} logins ({text}), seconds", "", _n(sc[f"{label}_s"], 2),
              target="<= 10 s for 10,000" if n == 10_000 else "",
              ok=sc[f"{label}_s"] <= 10 if n == 10_000 else None)  # fmt: skip
        t.add("  logins/s; server CPU us/login; drops at its socket", "",
              f"{_n(sc[f'{label}_per_s'])}; {_n(sc[f'{label}_server_cpu_us'])}; "
              f"{sc[f'{label}_socket_drops']}")  # fmt: skip
    t.add(f"  idle session, bytes of Python objects (tracemalloc, {lg['sessions']:,})", "",
          _n(lg["session_b_tracemalloc"]))  # fmt: skip
    g = m["gui"]
    if g["status"] == "ok":
        t.add(f"GUI lag p50 / p99 / max ms at {g['rate']:,.0f} msg/s", "",
              f"{_pair(g['lag_p50_ms'], g['lag_p99_ms'], 1)} / {_n(g['lag_max_ms'], 1)}",
              target=f"p99 {TARGETS['gui_lag_p99_ms']}", ok=g["lag_p99_ms"] <= 50)  # fmt: skip
        t.add(
            "  GUI busy p99 / max ms; arrivals/s",
            "",
            f"{_pair(g['busy_p99_ms'], g['busy_max_ms'], 1)}; {_n(g['arrival_per_s'])}",
        )
        h = g["history"]
        worst = max(h["paint_ms"] or 0.0, h["switch_max_ms"], h["search_max_ms"])
        t.add(f"GUI with {h['messages']:,} messages, {h['contacts']:,} contacts: first paint / "
              "switch max / Find max, ms", "",
              f"{_n(h['paint_ms'], 1)} / {_n(h['switch_max_ms'], 1)} / {_n(h['search_max_ms'], 1)}",
              target=f"each {TARGETS['gui_history_ms']}", ok=worst <= 200)  # fmt: skip
    else:
        t.add("GUI lag", "", g["status"], target=f"p99 {TARGETS['gui_lag_p99_ms']}")
    if "fanout" in m:
        fanout_rows(t, m["fanout"])
    if "chatlike" in m:
        chatlike_rows(t, m["chatlike"])
    if "sweep" in m:
        sweep_rows(t, m["sweep"])
    return t.render()


def sweep_rows(t: Table, document: dict[str, Any]) -> None:
    from bench.sweep import rows

    for label, bare, server, ratio in rows(document):
        t.add(label, bare, server, ratio)


def chatlike_rows(t: Table, c: dict[str, Any]) -> None:
    from bench.chatlike import rows

    for label, bare, server, ratio in rows(c):
        judged = label.startswith("chat-like")
        value = float(ratio.rstrip("x")) if judged and ratio != "-" else None
        t.add(label, bare, server, ratio, TARGETS["chatlike_ratio"] if judged else "",
              None if value is None else value <= 3)  # fmt: skip


def fanout_rows(t: Table, f: dict[str, Any]) -> None:
    largest = max(p["members"] for p in f["phases"])
    for p in f["phases"]:
        mode = "flat out" if p["rate"] is None else f"{p['rate']:g} msg/s"
        judged = p["members"] == largest
        t.add(f"group of {p['members']:,}, {mode}: delivered copies/s", "",
              _n(p["copies_per_s"]))  # fmt: skip
        ratio = p["copy_to_direct_cpu"]
        flat = p["rate"] is None
        t.add("  server CPU us per copy (x a direct message's)", "",
              f"{_n(p['cpu_us_per_copy'], 1)} ({ratio:.2f}x)",
              target=TARGETS["copy_ratio"] if judged and flat else "",
              ok=ratio <= 1 / 3 if judged and flat else None)  # fmt: skip
        steady = p["rate"] is not None
        t.add("  send -> last member has it p50 / p99 ms", "",
              _pair(p["last_member_p50_ms"], p["last_member_p99_ms"]),
              target=f"p99 {TARGETS['fanout_p99_ms']}" if judged and steady else "",
              ok=p["last_member_p99_ms"] <= 200 if judged and steady else None)  # fmt: skip
        t.add("  sent / delivered to every member / duplicated", "",
              f"{p['sent']} / {p['messages_everyone_has']} / {p['duplicates']}",
              target="all / 0", ok=p["messages_everyone_has"] == p["sent"] and
              not p["duplicates"])  # fmt: skip


def meta(opts: Options) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "loadavg": list(os.getloadavg()),
        "quick": opts.quick, "runs": opts.runs, "duration_s": opts.duration,
        "latency_duration_s": opts.latency_duration, "sessions": opts.sessions,
        "gui_duration_s": opts.gui_duration, "workers": opts.workers,
        "pairs": list(opts.pairs), "window": WINDOW, "text_bytes": TEXT_SIZE,
        "pbkdf2_iterations": ITERATIONS, "command": " ".join([sys.executable, *sys.argv]),
    }  # fmt: skip


# --- profile --------------------------------------------------------------------------


def profile(opts: Options, tmp: Path, say: Callable[[str], None]) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"profile-{stamp}.prof"
    pairs = max(opts.pairs)
    say(f"profile: server under cProfile, {pairs} pairs, {opts.duration:g} s")
    figures = traffic_phase("server", pairs, opts.duration, WINDOW, opts, tmp, profile_out=out)
    print(f"(under cProfile) {figures['msgs_per_s']:,.0f} msg/s, "
          f"{figures['cpu_us_per_msg']:.1f} us CPU/msg, loss {figures['lost']}")  # fmt: skip
    for path, title in ((out, "socket loop (main thread)"), (Path(f"{out}.store"), "store thread")):
        if not path.exists():
            continue
        print(f"\n=== {title}: {path} ===")
        stats = pstats.Stats(str(path))
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(25)
    return 0


# --- main -----------------------------------------------------------------------------


def parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--runs", type=int, default=1, help="repeat N times, quote medians")
    parser.add_argument("--duration", type=float, help="seconds of load per throughput phase")
    parser.add_argument("--sessions", type=int, help="logins / idle sessions (default 10,000)")
    parser.add_argument("--gui-duration", type=float, help="seconds of messages into the GUI")
    parser.add_argument("--pairs", default="1,4,16", help="pair counts (default %(default)s)")
    parser.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 2),
                        help="load processes at most (default %(default)s)")  # fmt: skip
    parser.add_argument("--no-gui", action="store_true", help="skip the GUI lag phase")
    parser.add_argument("--no-fanout", action="store_true",
                        help="skip the group fan-out phase (bench/fanout.py)")  # fmt: skip
    parser.add_argument("--no-chatlike", action="store_true",
                        help="skip the chat-like and keepalive phases "
                        "(bench/chatlike.py)")  # fmt: skip
    parser.add_argument("--no-sweep", action="store_true",
                        help="skip the load sweep (bench/sweep.py)")  # fmt: skip
    parser.add_argument("--json-out", type=Path, help="write the JSON here instead")
    parser.add_argument("--profile", action="store_true",
                        help="profile the server under the largest load instead")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--cluster", type=int, default=0, metavar="N",
        help="instead: cluster mode with 1 to N nodes and a redis-server on this machine, "
        "beside the single server (needs redis-server and the redis package)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.cluster < 0:
        parser.error(f"argument --cluster: {args.cluster} nodes; give 1 or more")
    quick = bool(args.quick)
    return Options(
        quick=quick, runs=max(1, args.runs),
        duration=args.duration or (0.4 if quick else 3.0),
        latency_duration=(args.duration or 0.4) if quick else 3.0,
        sessions=args.sessions or (200 if quick else 10_000),
        gui_duration=args.gui_duration or (1.0 if quick else 5.0),
        workers=max(1, args.workers), gui=not args.no_gui,
        pairs=tuple(sorted({int(p) for p in args.pairs.split(",") if p.strip()})),
        json_out=args.json_out, profile=args.profile, keep=args.keep, cluster=args.cluster,
        fanout=not args.no_fanout, chatlike=not args.no_chatlike, sweep=not args.no_sweep,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    if opts.cluster:
        from bench.cluster import run as run_cluster

        return run_cluster(opts.cluster, opts, say)
    info = meta(opts)
    tmp = Path(tempfile.mkdtemp(prefix="udp-chat-bench-"))
    try:
        if opts.profile:
            return profile(opts, tmp, say)
        runs = []
        for i in range(opts.runs):
            if opts.runs > 1:
                say(f"run {i + 1} of {opts.runs}")
            runs.append(run_once(opts, tmp, say))
        median = median_tree(runs)
        if opts.sweep and len(runs) > 1:  # median_tree takes a list from the first run
            from bench.sweep import combine

            median["sweep"] = combine([r["sweep"] for r in runs])
        title = (f"udp-chat benchmark: {info['cpus']} CPUs, Python {info['python']}, "
                 f"{opts.runs} run(s){' (medians)' if opts.runs > 1 else ''}"
                 f"{', --quick' if opts.quick else ''}; load average before: "
                 f"{info['loadavg'][0]:.2f}")  # fmt: skip
        print(title)
        print(table(median, opts))
        document = {"meta": info, "median": median, "runs": runs}
        path = opts.json_out
        if path is None:
            RESULTS.mkdir(parents=True, exist_ok=True)
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            path = RESULTS / f"bench-{stamp}{'-quick' if opts.quick else ''}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=1) + "\n", "utf-8")
        print(f"JSON: {path}")
        say("done")
        return 0
    finally:
        if opts.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
