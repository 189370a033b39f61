"""An in-process UDP proxy that makes the loopback network as bad as asked.

`LossyProxy(target)` listens on 127.0.0.1 (an ephemeral port, `.address`)
and forwards every datagram from a client to `target`, and every reply back
to that client, through a separate upstream socket per client address, so
the server still sees distinct clients. On the way, per direction
(`UP`: client -> server, `DOWN`: server -> client), it drops, duplicates,
delays, reorders, corrupts (bit flips) and blackholes datagrams at the rates
in force, drawn from one seeded `random.Random`.

Rates can change while it runs: `proxy.set(loss=0.1)` for both directions,
`proxy.set(UP, blackhole=True)` for one. Counters per direction are in
`proxy.stats(UP)` / `proxy.stats(DOWN)`; a `tap` callback sees every
datagram as it arrives (to classify traffic). One thread runs the whole proxy:
delayed datagrams wait on a heap and go out from the same timed loop.

    with LossyProxy(server.address, seed=1, loss=0.3) as proxy:
        session.login(proxy.address, "alice", password="...")
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

Address = tuple[str, int]
#: Called on the proxy's thread for every datagram that arrives, before any
#: fault: (direction, client address, datagram).
Tap = Callable[[str, Address, bytes], None]

UP = "up"  # client -> server
DOWN = "down"  # server -> client
DIRECTIONS = (UP, DOWN)


@dataclasses.dataclass
class Faults:
    """What happens to the datagrams of one direction. Rates are per datagram."""

    loss: float = 0.0  # dropped
    duplicate: float = 0.0  # sent twice (the copy a little later)
    reorder: float = 0.0  # held back by up to `reorder_delay`, so later ones overtake it
    corrupt: float = 0.0  # 1 to 3 random bits flipped
    delay: float = 0.0  # every datagram waits this long (seconds) ...
    jitter: float = 0.0  # ... plus up to this much more
    reorder_delay: float = 0.02
    blackhole: bool = False  # everything is dropped


@dataclasses.dataclass
class _Flow:
    """One client: its address and the upstream socket that speaks for it."""

    client: Address
    upstream: socket.socket


class LossyProxy:
    """A UDP proxy with faults (see the module doc). Use as a context manager."""

    #: Most datagrams read from one socket per loop pass.
    READ_BATCH = 64

    def __init__(
        self,
        target: Address,
        *,
        seed: int = 0,
        host: str = "127.0.0.1",
        tap: Tap | None = None,
        **rates: Any,
    ) -> None:
        self.target: Address = (target[0], target[1])
        self.tap = tap
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._faults = {d: Faults(**rates) for d in DIRECTIONS}
        self._counts: dict[str, collections.Counter[str]] = {
            d: collections.Counter() for d in DIRECTIONS
        }
        self._heap: list[tuple[float, int, socket.socket, bytes, Address, str]] = []
        self._tiebreak = itertools.count()
        self._flows: dict[Address, _Flow] = {}
        self._by_upstream: dict[socket.socket, _Flow] = {}
        self._selector = selectors.DefaultSelector()
        self._stopping = False
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.listener.bind((host, 0))
            self.listener.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
        except OSError:
            self.listener.close()
            self._selector.close()
            raise
        self._wake_r.setblocking(False)
        self.address: Address = self.listener.getsockname()[:2]
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="lossy-proxy", daemon=True)

    # --- control ------------------------------------------------------------

    def start(self) -> LossyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and close every socket (idempotent)."""
        if self._thread.is_alive():
            self._stopping = True
            self._wake()
            self._thread.join(5.0)
        if self.listener.fileno() != -1:
            self._selector.close()
            for flow in self._flows.values():
                flow.upstream.close()
            self.listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def __enter__(self) -> LossyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set(self, direction: str | None = None, **changes: Any) -> None:
        """Change fault settings (`Faults` fields) for one direction or both."""
        with self._lock:
            for d in DIRECTIONS if direction is None else (direction,):
                faults = self._faults[d]
                for name, value in changes.items():
                    if not hasattr(faults, name):
                        raise TypeError(f"no fault setting {name!r}")
                    setattr(faults, name, value)
        self._wake()

    def retarget(self, target: Address) -> None:
        """Send what clients send to another server from now on (the same
        upstream sockets, so each client keeps its address): to the clients,
        the server restarted and forgot them."""
        self.target = (target[0], target[1])

    def heal(self) -> None:
        """Back to a perfect network, both ways."""
        with self._lock:
            self._faults = {d: Faults() for d in DIRECTIONS}
        self._wake()

    def faults(self, direction: str) -> Faults:
        with self._lock:
            return dataclasses.replace(self._faults[direction])

    def stats(self, direction: str) -> dict[str, int]:
        """Counters of one direction: `received`, `sent`, `bytes_received`,
        `bytes_sent`, `dropped`, `blackholed`, `duplicated`, `reordered`,
        `corrupted`, `send_errors`."""
        with self._lock:
            return dict(self._counts[direction])

    def reset_stats(self) -> None:
        with self._lock:
            for counter in self._counts.values():
                counter.clear()

    @property
    def clients(self) -> list[Address]:
        with self._lock:
            return list(self._flows)

    # --- the loop -------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            with self._lock:
                timeout = max(0.0, self._heap[0][0] - now) if self._heap else 0.5
            for key, _ in self._selector.select(min(timeout, 0.5)):
                sock = key.fileobj
                if sock is self._wake_r:
                    self._drain_wake()
                elif sock is self.listener:
                    self._read(self.listener, UP)
                else:
                    assert isinstance(sock, socket.socket)
                    self._read(sock, DOWN)
            self._send_due(time.monotonic())

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _read(self, sock: socket.socket, direction: str) -> None:
        for _ in range(self.READ_BATCH):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP port unreachable from an earlier send
                continue
            if direction == UP:
                flow = self._flow_for(addr[:2])
                out_sock, dest = flow.upstream, self.target
            else:
                flow = self._by_upstream[sock]
                out_sock, dest = self.listener, flow.client
            if self.tap is not None:
                self.tap(direction, flow.client, data)
            self._schedule(data, out_sock, dest, direction, time.monotonic())

    def _flow_for(self, client: Address) -> _Flow:
        flow = self._flows.get(client)
        if flow is None:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            upstream.bind((self.listener.getsockname()[0], 0))
            upstream.setblocking(False)
            flow = _Flow(client, upstream)
            with self._lock:
                self._flows[client] = flow
            self._by_upstream[upstream] = flow
            self._selector.register(upstream, selectors.EVENT_READ)
        return flow

    def _schedule(
        self, data: bytes, sock: socket.socket, dest: Address, direction: str, now: float
    ) -> None:
        """Decide the fate of one datagram and put its copies on the heap."""
        with self._lock:
            faults = self._faults[direction]
            count = self._counts[direction]
            rnd = self._random
            count["received"] += 1
            count["bytes_received"] += len(data)
            if faults.blackhole:
                count["blackholed"] += 1
                return
            if rnd.random() < faults.loss:
                count["dropped"] += 1
                return
            if rnd.random() < faults.corrupt and data:
                count["corrupted"] += 1
                data = _flip_bits(data, rnd)
            copies = 1
            if rnd.random() < faults.duplicate:
                count["duplicated"] += 1
                copies = 2
            for copy in range(copies):
                at = now + faults.delay + rnd.uniform(0.0, faults.jitter)
                if copy:
                    at += rnd.uniform(0.0, faults.reorder_delay)
                if rnd.random() < faults.reorder:
                    count["reordered"] += 1
                    at += rnd.uniform(faults.reorder_delay / 4, faults.reorder_delay)
                heapq.heappush(self._heap, (at, next(self._tiebreak), sock, data, dest, direction))

    def _send_due(self, now: float) -> None:
        while True:
            with self._lock:
                if not self._heap or self._heap[0][0] > now:
                    return
                _, _, sock, data, dest, direction = heapq.heappop(self._heap)
            try:
                sock.sendto(data, dest)
            except OSError:
                with self._lock:
                    self._counts[direction]["send_errors"] += 1
                continue
            with self._lock:
                self._counts[direction]["sent"] += 1
                self._counts[direction]["bytes_sent"] += len(data)


def _flip_bits(data: bytes, rnd: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 3)):
        bit = rnd.randrange(len(buf) * 8)
        buf[bit // 8] ^= 1 << (bit % 8)
    return bytes(buf)
