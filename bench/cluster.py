"""`python -m bench --cluster N`: what cluster mode costs, beside the single
server (issue 15; docs/CLUSTER.md turns these figures into limits).

On this machine: one `redis-server` (AOF, `appendfsync always`, no RDB: the
settings cluster mode asks for) in a temporary directory, and 1 to N nodes,
`python chat_server.py --cluster redis://... --node-id nodeI`. The same load
as the main benchmark's throughput phase (`loadgen.run_traffic`: pairs of
real-protocol clients, each sender flat out to its own receiver with a
window of messages in flight, every message accepted and receipted) runs
against the single SQLite server and then against each cluster size. The
clients are spread over the nodes as a cluster's users would be: pair k's
sender on node k mod n, its receiver on node (k div n) mod n, so with two
nodes half the pairs talk across nodes; the table gives the share of
messages that did (`cross`).

CPU per message is user+system of every node and of redis-server over the
timed window, divided by the messages completed (accepted and delivered);
`redis cmds/msg` is the growth of INFO commandstats' calls (commands inside
scripts and MULTI included) per message, the figure the Redis Cluster
sizing in docs/CLUSTER.md starts from. The figures go to stdout and, with
every detail, to bench/results/cluster-*.json.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.loadgen import RTO_MAX, RTO_MIN, TrafficSpec, run_traffic

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 10.0


class RedisChild:
    """A redis-server on 127.0.0.1 with its files in `directory`."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.directory = directory
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(directory), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--daemonize", "no", "--protected-mode", "no",
             "--logfile", str(directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.client.ping()
                break
            except redis.exceptions.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    message = f"redis-server did not start (see {directory}/redis.log)"
                    raise RuntimeError(message) from None
                time.sleep(0.02)
        self.version = str(self.client.info("server").get("redis_version", "?"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def calls(self) -> int:
        """Commands Redis has run so far (INFO commandstats, all commands)."""
        stats = self.client.info("commandstats")
        return sum(int(entry.get("calls", 0)) for entry in stats.values())

    def key_sizes(self, sample: int = 200) -> dict[str, dict[str, float]]:
        """Bytes per key in Redis (MEMORY USAGE, up to `sample` keys of each
        kind: the name up to its `{user}` tag), and per entry of the hashes
        (`chat:accounts`: per account): what the sizing in docs/CLUSTER.md
        multiplies by the number of users and of messages."""
        seen: dict[str, list[int]] = {}
        for raw in self.client.scan_iter(count=1000):
            key = raw.decode("utf-8", "replace")
            kind = key.split("{", 1)[0].rstrip(":") if "{" in key else key
            sizes = seen.setdefault(kind, [])
            if len(sizes) < sample:
                size = int(self.client.memory_usage(raw, samples=0) or 0)
                if self.client.type(raw) == b"hash":  # per field: a hash holds many users
                    size //= max(1, int(self.client.hlen(raw)))
                sizes.append(size)
        return {
            kind: {"bytes": sum(sizes) / len(sizes), "sampled": len(sizes)}
            for kind, sizes in sorted(seen.items())
        }

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_node(tmp: Path, label: str, redis_url: str, extra: tuple[str, ...] = ()) -> Any:
    """A cluster node: the benchmark's server command with `--cluster`."""
    from bench.run import ITERATIONS, Child

    data = Path(tempfile.mkdtemp(prefix=f"node-{label}-", dir=tmp))
    command = [
        sys.executable, "chat_server.py", "--host", "127.0.0.1", "--port", "0",
        "--data-dir", str(data), "--cluster", redis_url, "--node-id", label,
        "--pbkdf2-iterations", str(ITERATIONS), "--preauth-rate", "1000000",
        "--preauth-total-rate", "1000000",
        "--user-msg-rate", "1000000", "--max-sessions", "1000000", "--registration-rate", "1000000",
        "--rto-min", str(RTO_MIN), "--rto-max", str(RTO_MAX), "--log-level", "warning", *extra,
    ]  # fmt: skip
    child = Child(command, data / "server.log")
    child.data_dir = data
    return child


@contextmanager
def cluster(
    tmp: Path, nodes: int, extra: tuple[str, ...] = ()
) -> Iterator[tuple[RedisChild, list[Any]]]:
    redis_server = RedisChild(Path(tempfile.mkdtemp(prefix="redis-", dir=tmp)))
    started: list[Any] = []
    try:
        for i in range(nodes):
            started.append(start_node(tmp, f"node{i}", redis_server.url, extra))
        yield redis_server, started
    finally:
        for node in started:
            node.stop()
        redis_server.stop()


def homes(pairs: int, nodes: int) -> dict[str, int]:
    """Which node each client logs in to: pair k's sender on k mod n, its
    receiver on (k div n) mod n (every combination equally often)."""
    out: dict[str, int] = {}
    for k in range(pairs):
        out[f"sp{k}"] = k % nodes
        out[f"rp{k}"] = (k // nodes) % nodes
    return out


def cluster_phase(
    nodes: int, pairs: int, duration: float, opts: Any, tmp: Path, *, window: int = 64,
    where: dict[str, int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`pairs` senders (with `window` messages in flight each) to their
    receivers through `nodes` nodes, the clients placed by `where` (default
    `homes`)."""
    from bench.run import START_DELAY, latencies_us, percentile, split, workers

    where = where or homes(pairs, nodes)
    with cluster(tmp, nodes) as (redis_server, children):
        addresses = [child.address for child in children]
        groups = split([f"p{k}" for k in range(pairs)], opts.workers)
        specs = [
            TrafficSpec(
                addresses[0],
                [(f"s{n}", f"r{n}") for n in g],
                [f"r{n}" for n in g],
                window=window,
                homes={name: addresses[where[name]] for n in g for name in (f"s{n}", f"r{n}")},
            )  # fmt: skip
            for g in groups
        ]
        with workers(run_traffic, specs) as group:
            group.gather("ready", 120)
            cpu0 = [child.cpu() for child in children]
            threads0 = [child.threads_cpu() for child in children]
            redis_cpu0, calls0 = _proc_cpu(redis_server.proc.pid), redis_server.calls()
            t0 = time.monotonic() + START_DELAY
            group.tell("start", t0, t0 + duration)
            results = group.gather("done", duration + 60)
            cpu1 = [child.cpu() for child in children]
            threads1 = [child.threads_cpu() for child in children]
            redis_cpu1, calls1 = _proc_cpu(redis_server.proc.pid), redis_server.calls()
        version = redis_server.version
        key_sizes = redis_server.key_sizes()
        used_memory = int(redis_server.client.info("memory")["used_memory"])
    senders = [s for r in results for s in r["senders"]]
    receivers = [x for r in results for x in r["receivers"]]
    sent = sum(s["sent"] for s in senders)
    completed = sum(s["completed"] for s in senders)
    received = sum(r["received"] for r in receivers)
    cross = sum(s["completed"] for s in senders if where[s["name"]] != where["r" + s["name"][1:]])
    end = max((s["last_complete"] for s in senders), default=0.0)
    elapsed = max(1e-9, (end if end > t0 else max(r["end"] for r in results)) - t0)
    nodes_cpu = sum(b - a for a, b in zip(cpu0, cpu1, strict=True))
    loop_cpu = sum(b[0] - a[0] for a, b in zip(threads0, threads1, strict=True))
    other_cpu = sum(b[1] - a[1] for a, b in zip(threads0, threads1, strict=True))
    redis_cpu = redis_cpu1 - redis_cpu0
    lat = latencies_us(receivers)
    acc = latencies_us(senders, "accept_latencies")
    per = max(1, completed)
    return {
        "nodes": nodes, "pairs": pairs, "elapsed_s": elapsed, "redis_version": version,
        "msgs_per_s": completed / elapsed, "sent": sent, "completed": completed,
        "received": received, "lost": sent - received, "incomplete": sent - completed,
        "duplicates": sum(r["duplicates"] for r in receivers),
        "failed": sum(s["failed"] for s in senders),
        "cross_node_share": cross / per,
        "nodes_cpu_us_per_msg": nodes_cpu / per * 1e6,
        "loop_thread_cpu_us_per_msg": loop_cpu / per * 1e6,
        "other_threads_cpu_us_per_msg": other_cpu / per * 1e6,
        "redis_cpu_us_per_msg": redis_cpu / per * 1e6,
        "cpu_us_per_msg": (nodes_cpu + redis_cpu) / per * 1e6,
        "nodes_cpu_pct": 100 * nodes_cpu / elapsed, "redis_cpu_pct": 100 * redis_cpu / elapsed,
        "redis_cmds_per_msg": (calls1 - calls0) / per,
        "lat_p50_us": percentile(lat, 50), "lat_p99_us": percentile(lat, 99),
        "accept_p50_us": percentile(acc, 50), "accept_p99_us": percentile(acc, 99),
        "delivered_p50_us": percentile(latencies_us(senders, "delivered_latencies"), 50),
        "redis_used_memory_b": used_memory, "redis_key_bytes": key_sizes,
    }  # fmt: skip


def group_phase(nodes: int, size: int, duration: float, tmp: Path) -> dict[str, Any]:
    """A group of `size` across `nodes` nodes: its owner on node 0 sending
    flat out (bench.fanout's sender, 16 in flight), the other members spread
    over the nodes evenly (bench.fanout's members, receipting at once). CPU
    per copy is every node's and Redis's."""
    from bench.fanout import (
        FANOUT_RATE,
        Arrivals,
        MemberSpec,
        SenderSpec,
        merge_arrivals,
        run_members,
        run_sender,
    )
    from bench.run import START_DELAY, percentile, workers

    extra = ("--max-fanout-rate", FANOUT_RATE, "--max-group-members", str(size))
    with cluster(tmp, nodes, extra) as (redis_server, children):
        addresses = [child.address for child in children]
        names = [f"m{i}" for i in range(size - 1)]
        specs = [MemberSpec(addresses[i], names[i::nodes]) for i in range(nodes)]
        with workers(run_members, specs) as members:
            members.gather("ready", 600)
            with workers(run_sender, [SenderSpec(addresses[0], names, None)]) as sender:
                sender.gather("ready", 600)
                cpu0 = [child.cpu() for child in children]
                redis_cpu0 = _proc_cpu(redis_server.proc.pid)
                t0 = time.monotonic() + START_DELAY
                sender.tell("start", t0, t0 + duration)
                (sent,) = sender.gather("done", duration + 120)
                time.sleep(0.2)  # the last receipts' acks
                cpu1 = [child.cpu() for child in children]
                redis_cpu1 = _proc_cpu(redis_server.proc.pid)
                members.tell("stop")
                results = members.gather("done", 120)
                sender.tell("exit")
    arrivals: Arrivals = {}
    for r in results:
        merge_arrivals(arrivals, r)
    complete = sorted((last - stamp) / 1e6 for stamp, last, count in arrivals.values()
                      if count == size - 1)  # fmt: skip
    copies = sum(r["received"] for r in results)
    last_arrival = max((last for _, last, _ in arrivals.values()), default=0) / 1e9
    elapsed = max(1e-9, max(last_arrival, sent["last_receipt"]) - t0)
    cpu = sum(b - a for a, b in zip(cpu0, cpu1, strict=True)) + redis_cpu1 - redis_cpu0
    return {
        "nodes": nodes, "members": size, "duration_s": duration, "sent": sent["sent"],
        "accepted": sent["accepted"], "completed": sent["completed"], "copies": copies,
        "copies_expected": sent["sent"] * (size - 1),
        "duplicates": sum(r["duplicates"] for r in results),
        "messages_everyone_has": len(complete), "elapsed_s": elapsed,
        "copies_per_s": copies / elapsed, "cpu_us_per_copy": cpu / max(1, copies) * 1e6,
        "last_member_p50_ms": percentile(complete, 50),
        "last_member_p99_ms": percentile(complete, 99),
    }  # fmt: skip


def _proc_cpu(pid: int) -> float:
    from bench.run import proc_cpu

    return proc_cpu(pid)


def table(single: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    head = ("setup", "msgs/s", "CPU us/msg", "loop/other/Redis", "redis cmds/msg", "cross-node",
            "lost", "dup", "p50/p99 us")  # fmt: skip
    lines = [
        (
            "single server (SQLite)", f"{single['msgs_per_s']:,.0f}",
            f"{single['cpu_us_per_msg']:.0f}",
            f"{single['loop_thread_cpu_us_per_msg']:.0f}/"
            f"{single['other_threads_cpu_us_per_msg']:.0f}/-", "-", "-", str(single["lost"]),
            str(single["duplicates"]), f"{single['lat_p50_us']:,.0f}/{single['lat_p99_us']:,.0f}",
        )
    ]  # fmt: skip
    for r in rows:
        lines.append((
            f"{r['nodes']} node{'s' if r['nodes'] > 1 else ''} + Redis",
            f"{r['msgs_per_s']:,.0f}", f"{r['cpu_us_per_msg']:.0f}",
            f"{r['loop_thread_cpu_us_per_msg']:.0f}/{r['other_threads_cpu_us_per_msg']:.0f}/"
            f"{r['redis_cpu_us_per_msg']:.0f}", f"{r['redis_cmds_per_msg']:.1f}",
            f"{100 * r['cross_node_share']:.0f}%", str(r["lost"]), str(r["duplicates"]),
            f"{r['lat_p50_us']:,.0f}/{r['lat_p99_us']:,.0f}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    out = []
    for row in [head, *lines]:
        cells = zip(row, widths, strict=True)
        out.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))
        )
    return "\n".join(out)


def run(nodes: int, opts: Any, say: Callable[[str], None]) -> int:
    """The whole `--cluster N` run: the single server, then 1..N nodes."""
    from bench.run import RESULTS, meta, traffic_phase

    if not os.path.exists(REDIS_SERVER):
        print("python -m bench --cluster: redis-server is not installed "
              "(Debian: apt-get install redis-server)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        import redis  # noqa: F401
    except ModuleNotFoundError:
        print("python -m bench --cluster: the redis package is missing; "
              "pip install -e '.[cluster]'", file=sys.stderr)  # fmt: skip
        return 2
    pairs = max(opts.pairs)
    info = meta(opts)
    tmp = Path(tempfile.mkdtemp(prefix="udp-chat-bench-cluster-"))
    try:
        say(f"single server, {pairs} pairs")
        single = traffic_phase("server", pairs, opts.duration, 64, opts, tmp)
        rows = []
        for n in range(1, nodes + 1):
            say(f"{n} node(s) + Redis, {pairs} pairs")
            rows.append(cluster_phase(n, pairs, opts.duration, opts, tmp))
        # One message in flight: what a hop through Redis, and one across
        # nodes, adds to a message's way.
        say("latency, 1 message in flight: single server, same node, across nodes")
        latency = {
            "single": traffic_phase("server", 1, opts.latency_duration, 1, opts, tmp),
            "same_node": cluster_phase(1, 1, opts.latency_duration, opts, tmp, window=1),
        }
        if nodes > 1:
            latency["across_nodes"] = cluster_phase(
                2, 1, opts.latency_duration, opts, tmp, window=1, where={"sp0": 0, "rp0": 1}
            )
        size = 10 if opts.quick else 100
        say(f"a group of {size} over {nodes} node(s), its owner sending flat out")
        group = group_phase(nodes, size, opts.duration, tmp)
    finally:
        if opts.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"udp-chat cluster benchmark: {info['cpus']} CPUs, Python {info['python']}, "
          f"Redis {rows[0]['redis_version']} (AOF, appendfsync always), {pairs} pairs, "
          f"{opts.duration:g} s each; load average before: {info['loadavg'][0]:.2f}")  # fmt: skip
    print(table(single, rows))
    print("1 message in flight, p50 us: one-way / accepted / delivered: " + "; ".join(
        f"{label.replace('_', ' ')} {r['lat_p50_us']:,.0f} / {r['accept_p50_us']:,.0f} / "
        f"{r['delivered_p50_us']:,.0f}" for label, r in latency.items()
    ))  # fmt: skip
    print(f"a group of {group['members']} over {group['nodes']} node(s), flat out: "
          f"{group['copies_per_s']:,.0f} copies/s, {group['cpu_us_per_copy']:.0f} us CPU per "
          f"copy (nodes and Redis), last member p50/p99 {group['last_member_p50_ms']:.0f} / "
          f"{group['last_member_p99_ms']:.0f} ms; sent {group['sent']}, every member has "
          f"{group['messages_everyone_has']}, {group['duplicates']} duplicates")  # fmt: skip
    sizes = rows[-1]["redis_key_bytes"]
    print("Redis bytes per key (MEMORY USAGE; per account for chat:accounts): "
          + ", ".join(f"{kind} {entry['bytes']:.0f}" for kind, entry in sizes.items()))  # fmt: skip
    document = {"meta": info, "single": single, "cluster": rows, "latency": latency,
                "group": group}  # fmt: skip
    path = opts.json_out
    if path is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = RESULTS / f"cluster-{stamp}{'-quick' if opts.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n", "utf-8")
    print(f"JSON: {path}")
    return 0
