"""The server's login desk: who is this client? SCRAM-SHA-256 checks behind
a stateless cookie and failure windows, with no knowledge of sessions.

Split from `chat_server.py`, which asks the desk for a CHALLENGE to each
HELLO and a verdict on each LOGIN, then opens sessions itself. The desk
only computes HMACs (the client did the PBKDF2 work), never sees a
password, and compares secrets in constant time.
"""

from __future__ import annotations

import collections
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass

from chat_guard import (
    COOKIE_PERIOD,
    BucketTable,
    FailureWindow,
    ReplyCache,
    cookie,
    cookie_valid,
)
from chat_registry import Address, ServerConfig
from chat_store import Account
from protocol import (
    DH_PRIVATE_BITS,
    SALT_SIZE,
    Challenge,
    ErrorCode,
    Hello,
    LocalProtocolError,
    Login,
    Refused,
    auth_message,
    dh_public,
    dh_secret,
    name_key,
    normalize_name,
    verify_proof,
    wrap_keys,
)

log = logging.getLogger("chat_server")


@dataclass(frozen=True)
class Verified:
    """A LOGIN whose proof holds: `client_key` and `message` derive the
    session key; `new` means the name is being registered by it."""

    name: str
    key: str
    account: Account
    client_key: bytes
    message: bytes
    new: bool


@dataclass(frozen=True)
class Unwrap:
    """A registering LOGIN that passed every cheap check and waits for its
    Diffie-Hellman secret, `dh_secret(*job)`, computed away from the loop
    (one 2048-bit modular exponentiation: 3.7 ms); then `LoginDesk.finish`."""

    login: Login
    name: str
    key: str
    salt: bytes
    message: bytes
    job: tuple[int, bytes]


def fit(text: str, limit: int = 120) -> str:
    """Shorten an error text so a pre-login reply stays smaller than its request."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


class LoginDesk:
    def __init__(
        self,
        config: ServerConfig,
        secret: bytes,
        wall_clock: Callable[[], float],
        account_of: Callable[[str], Account | None],
        stats: collections.Counter[str],
    ) -> None:
        self.config = config
        self._secret = secret
        self._wall_clock = wall_clock
        self._account_of = account_of
        self.stats = stats
        self.replies = ReplyCache()  # the answer to each recent LOGIN nonce
        self._by_user = FailureWindow(config.login_failures, config.login_failure_period)
        self._by_ip = FailureWindow(config.login_failures, config.login_failure_period)
        self._registrations = BucketTable(config.registration_rate, config.registration_burst)
        # The static half of the registration key exchange, derived from the
        # server's persistent secret (so it survives restarts).
        digest = hmac.new(secret, b"dh private", "sha512").digest()
        self._dh_private = int.from_bytes(digest, "big") >> (512 - DH_PRIVATE_BITS)
        self.dh_public = dh_public(self._dh_private)

    def _salt_for_unknown(self, key: str) -> bytes:
        # Unknown names get a salt that looks like any other and never
        # changes, so probing cannot tell who has an account.
        return hmac.new(self._secret, b"salt|" + key.encode(), "sha256").digest()[:SALT_SIZE]

    def challenge(self, hello: Hello, addr: Address) -> Challenge | Refused:
        """SCRAM server-first, with the cookie that proves the address later."""
        try:
            key = name_key(normalize_name(hello.username))
        except LocalProtocolError as exc:
            return Refused(hello.nonce, ErrorCode.INVALID_NAME, fit(str(exc)))
        account = self._account_of(key)
        if account is not None:
            salt, iterations = account.salt, account.iterations
        else:
            salt, iterations = self._salt_for_unknown(key), self.config.iterations
        period = int(self._wall_clock() // COOKIE_PERIOD)
        value = cookie(self._secret, period, addr, hello.nonce, key)
        return Challenge(hello.nonce, value, salt, iterations, self.dh_public)

    def check(
        self, login: Login, addr: Address, now: float, *, defer_dh: bool = False
    ) -> Verified | Refused | Unwrap | None:
        """The verdict on a LOGIN: verified, refused (with the reply), or None
        for a stale or forged cookie (dropped without a word). With
        `defer_dh`, a registration comes back as `Unwrap` instead of making
        the loop wait for its Diffie-Hellman secret."""
        try:
            name = normalize_name(login.username)
        except LocalProtocolError as exc:
            return Refused(login.nonce, ErrorCode.INVALID_NAME, fit(str(exc)))
        key = name_key(name)
        if not cookie_valid(self._secret, self._wall_clock(), addr, login.nonce, key,
                            login.cookie):  # fmt: skip
            return None
        ip = addr[0]
        if self._by_user.blocked(key, now) or self._by_ip.blocked(ip, now):
            wait = max(self._by_user.retry_after(key, now), self._by_ip.retry_after(ip, now))
            self.stats["login_throttled"] += 1
            text = f"too many failed logins; try again in {wait:.0f} s"
            return Refused(login.nonce, ErrorCode.RATE_LIMITED, text)
        account = self._account_of(key)
        if account is None and not self._registrations.take(ip, 1, now):
            self.stats["registrations_throttled"] += 1
            text = "too many new accounts from your address; try again in a few seconds"
            return Refused(login.nonce, ErrorCode.RATE_LIMITED, text)
        if account is None:
            # Registration: unwrap the keys (the only DH work the server does).
            salt = self._salt_for_unknown(key)
            message = auth_message(name, login.instance_id, login.nonce, login.cookie, salt,
                                   self.config.iterations, login.dh_public,
                                   self.dh_public)  # fmt: skip
            pending = Unwrap(login, name, key, salt, message, (self._dh_private, login.dh_public))
            if defer_dh:
                return pending
            return self.finish(pending, dh_secret(*pending.job), addr, now)
        return self._verify(login, name, key, account, False, addr, now)

    def finish(
        self, pending: Unwrap, secret: bytes | None, addr: Address, now: float
    ) -> Verified | Refused:
        """The verdict on a registration once its DH secret is known."""
        login = pending.login
        account = self._account_of(pending.key)
        if account is not None:
            # Registered by another LOGIN while this one waited: an ordinary
            # login to that account now (the wrong password if not the same).
            return self._verify(login, pending.name, pending.key, account, False, addr, now)
        keys = wrap_keys(secret, pending.message, login.wrapped_keys) if secret else bytes(64)
        account = Account(pending.name, pending.salt, self.config.iterations, keys[:32], keys[32:])
        return self._verify(login, pending.name, pending.key, account, True, addr, now)

    def _verify(
        self, login: Login, name: str, key: str, account: Account, new: bool, addr: Address,
        now: float,
    ) -> Verified | Refused:  # fmt: skip
        message = auth_message(name, login.instance_id, login.nonce, login.cookie, account.salt,
                               account.iterations, login.dh_public, self.dh_public)  # fmt: skip
        self.stats["password_checks"] += 1
        client_key = verify_proof(account.stored_key, message, login.proof)
        if client_key is None:
            self._by_user.record(key, now)
            self._by_ip.record(addr[0], now)
            self.stats["login_failures"] += 1
            log.info("failed login for %s from %s:%d", name, *addr)
            return Refused(login.nonce, ErrorCode.BAD_PASSWORD, fit(f"wrong password for {name!r}"))
        return Verified(account.name if not new else name, key, account, client_key, message, new)
