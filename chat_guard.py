"""The server's guards against floods and guessing: token buckets, login
failure windows, stateless cookies and the login replay cache.

Split from `chat_server.py` (which uses it) so the rules can be read, and
tested with a fake clock, on their own. Nothing here reads a clock: `now`
is passed in. Every table is bounded, so a flood from many addresses can
only evict old entries, never grow memory without limit.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
from dataclasses import dataclass

COOKIE_PERIOD = 120.0  # RELIABILITY.md: the cookie secret rotates every 120 s
COOKIE_SIZE = 16
MAX_TRACKED = 65_536  # addresses or names tracked by one limiter


class TokenBucket:
    """`rate` tokens a second up to `burst`; `take(n, now)` spends them if there."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, amount: float, now: float) -> bool:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False


class BucketTable:
    """One token bucket per key (an IP address), least recently used evicted."""

    def __init__(self, rate: float, burst: float, limit: int = MAX_TRACKED) -> None:
        self.rate = rate
        self.burst = burst
        self.limit = limit
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def take(self, key: str, amount: float, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.limit:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(amount, now)

    def __len__(self) -> int:
        return len(self._buckets)


class FailureWindow:
    """At most `limit` failures per `period` seconds per key (user or IP):
    a sliding window of failure times."""

    def __init__(self, limit: int, period: float, tracked: int = MAX_TRACKED) -> None:
        self.limit = limit
        self.period = period
        self.tracked = tracked
        self._times: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def _recent(self, key: str, now: float) -> collections.deque[float] | None:
        times = self._times.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.period:
            times.popleft()
        if not times:
            del self._times[key]
            return None
        return times

    def blocked(self, key: str, now: float) -> bool:
        times = self._recent(key, now)
        return times is not None and len(times) >= self.limit

    def record(self, key: str, now: float) -> None:
        times = self._recent(key, now)
        if times is None:
            times = self._times[key] = collections.deque(maxlen=self.limit)
            if len(self._times) > self.tracked:
                self._times.popitem(last=False)
        times.append(now)

    def retry_after(self, key: str, now: float) -> float:
        times = self._recent(key, now)
        return 0.0 if times is None else max(0.0, times[0] + self.period - now)


def cookie(secret: bytes, period: int, addr: tuple[str, int], nonce: bytes, name: str) -> bytes:
    """The stateless cookie (SCRAM server nonce) for one login attempt from
    one address: only a client that receives at `addr` can echo it."""
    message = f"{period}|{addr[0]}|{addr[1]}|{name}|".encode() + nonce
    return hmac.new(secret, message, hashlib.sha256).digest()[:COOKIE_SIZE]


def cookie_valid(
    secret: bytes, wall: float, addr: tuple[str, int], nonce: bytes, name: str, value: bytes
) -> bool:
    """True if `value` is the cookie of this or the previous period."""
    period = int(wall // COOKIE_PERIOD)
    return any(
        hmac.compare_digest(cookie(secret, p, addr, nonce, name), value)
        for p in (period, period - 1)
    )


@dataclass
class CachedReply:
    datagram: bytes
    expires: float


class ReplyCache:
    """The answer given to each login nonce for a while: a retransmitted
    LOGIN gets the same answer and is not counted again, and a replayed one
    cannot create a second session."""

    def __init__(self, keep: float = 2 * COOKIE_PERIOD, limit: int = 100_000) -> None:
        self.keep = keep
        self.limit = limit
        self._replies: collections.OrderedDict[bytes, CachedReply] = collections.OrderedDict()

    def get(self, nonce: bytes, now: float) -> bytes | None:
        self._expire(now)
        cached = self._replies.get(nonce)
        return cached.datagram if cached is not None else None

    def put(self, nonce: bytes, datagram: bytes, now: float) -> None:
        self._replies[nonce] = CachedReply(datagram, now + self.keep)
        self._replies.move_to_end(nonce)
        if len(self._replies) > self.limit:
            self._replies.popitem(last=False)

    def _expire(self, now: float) -> None:
        while self._replies:
            nonce, cached = next(iter(self._replies.items()))
            if cached.expires > now:
                break
            del self._replies[nonce]
