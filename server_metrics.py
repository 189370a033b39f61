"""The server's metrics for operators: the Prometheus text exposition format
over HTTP (`chat-server --metrics HOST:PORT`, then `GET /metrics`).

What is measured is counted where it happens, by the thread that owns it
(the loop's `Relay.stats` and `DropLog`, the store thread's `Histogram`
of commit times); nothing here is on the hot path. The HTTP server runs on
a thread of its own and only reads: each scrape calls the `gather` function
it was given (`ChatServer.metrics` reads the relay's plain ints and copies
its counters, each read atomic under the GIL), so a scrape takes no lock the
loop waits for, and a slow or stuck scraper holds up only this thread.

The format (https://prometheus.io/docs/instrumenting/exposition_formats/):
per family a `# HELP` and a `# TYPE` line, then one line per sample,
`name{label="value"} number`; counters end in `_total`; a histogram has
cumulative `_bucket{le="..."}` samples ending with `le="+Inf"`, a `_sum`
and a `_count`.
"""

from __future__ import annotations

import bisect
import http.server
import logging
import math
import re
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("chat_server")

#: The content type Prometheus asks for and expects back (format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds a scraper may take to send its request: the server answers one
#: connection at a time, so a client that connects and says nothing holds up
#: other scrapes for this long, never the relay.
REQUEST_TIMEOUT = 5.0
#: Upper bounds, in seconds, of the store's commit-time buckets: a commit
#: with `synchronous=FULL` is one or two fsyncs, about a millisecond on an
#: SSD and 10-30 ms on a spinning disk; seconds mean the disk is in trouble
#: (full, failing: the store retries every second until it commits).
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Histogram:
    """Observations counted into fixed buckets, by one writer thread.

    `observe` is for the thread that owns it (the store thread); readers
    on other threads take `snapshot`, a tuple replaced whole after every
    observation, so they always see counts and sum that agree."""

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(bounds) or not bounds:
            raise ValueError("histogram bounds must be given in increasing order")
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self._sum = 0.0
        #: (count per bucket, not cumulative, the last one above every bound; sum)
        self.snapshot: tuple[tuple[int, ...], float] = (tuple(self._counts), 0.0)

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bound >= value
        self._sum += value
        self.snapshot = (tuple(self._counts), self._sum)


@dataclass
class Family:
    """One metric family: its name, `counter`, `gauge` or `histogram`, a
    help text, and its samples as (labels, value). A histogram's samples
    come from `histogram`."""

    name: str
    kind: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)
    histogram: tuple[tuple[float, ...], tuple[tuple[int, ...], float]] | None = None


def counter(name: str, help_text: str, value: float) -> Family:
    return Family(name, "counter", help_text, [({}, value)])


def gauge(name: str, help_text: str, value: float) -> Family:
    return Family(name, "gauge", help_text, [({}, value)])


def labelled(
    name: str, kind: str, help_text: str, label: str, values: Iterable[tuple[str, float]]
) -> Family:
    return Family(name, kind, help_text, [({label: key}, value) for key, value in values])


def histogram(name: str, help_text: str, source: Histogram) -> Family:
    return Family(name, "histogram", help_text, histogram=(source.bounds, source.snapshot))


def label_value(text: str) -> str:
    """A label value as a `name` (lower case, `_` for anything else): the
    relay's drop reasons are phrases ("user rate limit"), awkward to type in
    a query."""
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    if labels:
        inner = ",".join(f'{key}="{_escape(text)}"' for key, text in labels.items())
        return f"{name}{{{inner}}} {_number(value)}"
    return f"{name} {_number(value)}"


def exposition(families: Iterable[Family]) -> str:
    """The families in the text exposition format, one line each, ending in a newline."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help.replace(chr(92), chr(92) * 2)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            lines.append(_sample(family.name, labels, value))
        if family.histogram is not None:
            bounds, (counts, total) = family.histogram
            cumulative = 0
            for bound, count in zip(bounds, counts, strict=False):
                cumulative += count
                lines.append(_sample(f"{family.name}_bucket", {"le": _number(bound)}, cumulative))
            cumulative += counts[-1]
            lines.append(_sample(f"{family.name}_bucket", {"le": "+Inf"}, cumulative))
            lines.append(_sample(f"{family.name}_sum", {}, total))
            lines.append(_sample(f"{family.name}_count", {}, cumulative))
    return "\n".join(lines) + "\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = REQUEST_TIMEOUT  # per connection (StreamRequestHandler sets it on the socket)
    server_version = "chat-server-metrics"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/metrics":
            missing = b"not found; the metrics are at /metrics\n"
            self._send(404, "text/plain; charset=utf-8", missing, body)
            return
        try:
            text = exposition(self.server.gather())
        except Exception:  # a bug in reading them: the scrape fails, the server goes on
            log.exception("bug while gathering the metrics")
            self._send(500, "text/plain; charset=utf-8", b"internal error\n", body)
            return
        self._send(200, CONTENT_TYPE, text.encode("utf-8"), body)

    def _send(self, status: int, content_type: str, data: bytes, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        # One line per scrape on stderr (the base class's habit) would drown
        # the operator's log: Prometheus scrapes every 15 s.
        log.debug("metrics: %s %s", self.address_string(), format % args)


class _HTTPServer(socketserver.TCPServer):
    # Not http.server.HTTPServer: its bind looks the host's name up in the
    # DNS (getfqdn), which can stall start-up for seconds and tells us nothing.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], gather: Callable[[], list[Family]]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.gather = gather
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # A scraper that hangs up or times out: not worth a traceback.
        log.debug("metrics: a request from %s failed", client_address, exc_info=True)


class MetricsServer:
    """`GET /metrics` on `address` (port 0 picks a free one; `.address` is
    the real one), answered on a thread of its own with `gather()`'s
    families. Binds in the constructor, so a bad address is found at
    start-up (an `OSError`); `start()` starts the thread, `close()` stops it."""

    def __init__(self, address: tuple[str, int], gather: Callable[[], list[Family]]) -> None:
        self._http = _HTTPServer(address, gather)
        self.address: tuple[str, int] = self._http.server_address[:2]  # type: ignore[assignment]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.5},
            name="chat-metrics", daemon=True,
        )  # fmt: skip
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join(REQUEST_TIMEOUT + 1)
            self._thread = None
        self._http.server_close()
