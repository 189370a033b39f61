"""The server's guards against floods and guessing: token buckets, login
failure windows, stateless cookies, login tickets and the record of
verified LOGINs.

Split from `chat_server.py` (which uses it) so the rules can be read, and
tested with a fake clock, on their own. Nothing here reads a clock: `now`
is passed in, and it is the monotonic clock of the loop: everything that
expires here (cookies, the LOGIN record, failure windows) runs on it, so a
step of the wall clock opens nothing again. Every table is bounded; the
limiters evict old entries when full, but the LOGIN record never does (see
`ReplyCache`).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
from dataclasses import dataclass

COOKIE_PERIOD = 120.0  # docs/RELIABILITY.md: the cookie secret rotates every 120 s
COOKIE_SIZE = 16
TICKET_SIZE = 16
#: Verified LOGINs remembered at most (each about 350 bytes): past it the
#: cookie key changes instead of anything being forgotten (`LoginDesk`).
MAX_RECORDED_LOGINS = 100_000
MAX_TRACKED = 65_536  # addresses or names tracked by one limiter


class TokenBucket:
    """`rate` tokens a second up to `burst`; `take(n, now)` spends them if there.

    An amount larger than the burst is taken from a full bucket, which then
    owes the rest (its tokens go below zero and refill before anything else
    is taken): without that such an amount could never be taken, and what
    asks for it would wait for ever. Over any time `t` at most
    `burst + rate * t` plus one amount is taken, so the rate still holds."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, amount: float, now: float) -> bool:
        if self.ready(amount, now):
            self.tokens -= amount
            return True
        return False

    def ready(self, amount: float, now: float) -> bool:
        """Whether `take(amount, now)` would succeed; spends nothing."""
        # (min() written out: a session's every datagram with data asks two buckets)
        if now > self.stamp:
            tokens = self.tokens + (now - self.stamp) * self.rate
            self.tokens = tokens if tokens < self.burst else self.burst
            self.stamp = now
        return self.tokens >= (amount if amount < self.burst else self.burst)

    def spend(self, amount: float) -> None:
        """Spend `amount` after `ready` said yes, or part of it: the owner
        checks first and pays afterwards for what it actually took."""
        self.tokens -= amount


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
    one address: only a client that receives at `addr` can echo it. `period`
    counts COOKIE_PERIODs of the monotonic clock: `secret` must then be one
    of this process (a monotonic clock means nothing to another)."""
    message = f"{period}|{addr[0]}|{addr[1]}|{name}|".encode() + nonce
    return hmac.new(secret, message, hashlib.sha256).digest()[:COOKIE_SIZE]


def cookie_valid(
    secret: bytes, now: float, addr: tuple[str, int], nonce: bytes, name: str, value: bytes
) -> bool:
    """True if `value` is the cookie of this or the previous period of the
    monotonic clock `now`: a cookie verifies for at most 2 * COOKIE_PERIOD."""
    period = int(now // COOKIE_PERIOD)
    return any(
        hmac.compare_digest(cookie(secret, p, addr, nonce, name), value)
        for p in (period, period - 1)
    )


def login_ticket(secret: bytes, key: str, instance_id: int, stored_key: bytes) -> bytes:
    """The login ticket of one client instance of one account: an HMAC under
    the server's persistent secret, so the server stores none and it holds
    across restarts. The account's StoredKey is in it, so a ticket is only
    ever good for the keys it was given with."""
    message = b"|".join((b"login ticket", key.encode(), instance_id.to_bytes(8, "big"), stored_key))
    return hmac.new(secret, message, hashlib.sha256).digest()[:TICKET_SIZE]


@dataclass
class CachedReply:
    datagram: bytes | None  # None until the verdict is known (or if it was not sent)
    expires: float


class ReplyCache:
    """The record of verified LOGINs: every LOGIN whose cookie verified, by
    nonce and cookie, with the answer it got, kept for as long as its cookie
    could verify (2 * COOKIE_PERIOD). A retransmission gets the same answer
    and is not judged again; a replay, from anywhere, can never be judged
    again either: while it is here it gets the recorded answer, after that
    its cookie no longer verifies.

    Only a sender that receives at its address gets a cookie, so nothing
    without one can add here; and nothing is ever evicted early: when the
    record is full, `reserve` says so and the desk changes its cookie key,
    which makes every recorded cookie (and every cookie given out) worthless
    before the record is cleared."""

    def __init__(self, keep: float = 2 * COOKIE_PERIOD, limit: int = MAX_RECORDED_LOGINS) -> None:
        self.keep = keep
        self.limit = limit
        self._replies: collections.OrderedDict[bytes, CachedReply] = collections.OrderedDict()

    def get(self, key: bytes, now: float) -> CachedReply | None:
        self._expire(now)
        return self._replies.get(key)

    def reserve(self, key: bytes, now: float) -> bool:
        """Record a verified LOGIN before it is judged; False when full."""
        self._expire(now)
        if len(self._replies) >= self.limit:
            return False
        self._replies[key] = CachedReply(None, now + self.keep)
        return True

    def answer(self, key: bytes, datagram: bytes) -> None:
        """The answer a recorded LOGIN got (nothing if it is not recorded)."""
        cached = self._replies.get(key)
        if cached is not None:
            cached.datagram = datagram

    def clear(self) -> None:
        self._replies.clear()

    def __len__(self) -> int:
        return len(self._replies)

    def _expire(self, now: float) -> None:
        # Entries go in as `now` grows and all keep as long: the oldest first.
        while self._replies:
            key, cached = next(iter(self._replies.items()))
            if cached.expires > now:
                break
            del self._replies[key]
