"""The server's login desk: who is this client? SCRAM-SHA-256 checks behind
a stateless cookie, a record of verified LOGINs and failure windows, with
no knowledge of sessions.

Split from `chat_server.py`, which asks the desk for a CHALLENGE to each
HELLO and a verdict on each LOGIN, then opens sessions itself. The desk
only computes HMACs (the client did the PBKDF2 work), never sees a
password, and compares secrets in constant time.

The rules, in the order a LOGIN meets them:
- no valid cookie (this process's key, the last 2 periods of the monotonic
  clock, this address): dropped, and nothing is kept;
- already in the record of verified LOGINs: the recorded answer, judged
  once only, so no replay ever opens a session or ends one;
- failures per name, or per name and instance for a LOGIN that carries
  the login ticket of an earlier session of that client instance, and
  (without a ticket) per source address across names, with a budget
  ADDRESS_NAMES times larger: strangers' wrong passwords, from anywhere,
  cannot lock out an owner with a ticket, nor from a shared address lock
  out the other names behind it; guessing a password stays at 5 per 30 s,
  and one address guesses at most 20 per 30 s across names.
"""

from __future__ import annotations

import collections
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from common import format_address
from protocol import (
    DH_PRIVATE_BITS,
    PBKDF2_MIN_ITERATIONS,
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
from server_guard import (
    COOKIE_PERIOD,
    BucketTable,
    FailureWindow,
    ReplyCache,
    cookie,
    cookie_valid,
    login_ticket,
)
from server_records import Address, ServerConfig
from server_store import Account

log = logging.getLogger("chat_server")

# The per-address failure budget, in per-name budgets (4 x 5 per 30 s). A
# window of 5 per address would let one guesser behind a NAT or a campus
# address keep everyone behind it out with 5 guesses per 30 s (DESIGN: a
# hundred users behind one address must work). Online guessing stays as
# slow as RELIABILITY asks where it matters: one password gets 5 guesses
# per 30 s whatever the number of addresses (the per-name window counts
# every address, so it is the (address, name) window too), and spraying
# many names from one address is held to 20 per 30 s; a ticket's owner is
# never held by the address at all. What the guesser behind a shared
# address still blocks: first-time users (no ticket) behind it, once it
# spends 20 failures in 30 s, which is then 20 guesses, not 5.
ADDRESS_NAMES = 4


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
    ticketed: bool = False  # it carried this instance's valid login ticket


@dataclass(frozen=True)
class Answered:
    """A LOGIN judged before (a retransmission or a replay): its recorded
    answer, None while the verdict waits (a registration) or if none was sent."""

    datagram: bytes | None


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


def record_key(login: Login) -> bytes:
    """A verified LOGIN's key in the record: its nonce and its cookie (which
    names the address and the name too)."""
    return login.nonce + login.cookie


def fit(text: str, limit: int = 120) -> str:
    """Shorten an error text so a pre-login reply stays smaller than its request."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


class LoginDesk:
    def __init__(
        self,
        config: ServerConfig,
        secret: bytes,
        account_of: Callable[[str], Account | None],
        stats: collections.Counter[str],
        quarantined: Callable[[str], int | None] = lambda key: None,
    ) -> None:
        self.config = config
        # Until when (wall clock, ms) a deleted account's name may not be
        # registered again, or None.
        self._quarantined = quarantined
        self._secret = secret
        # Cookies are keyed per process, on the monotonic clock: a restart
        # (whose record of verified LOGINs is empty) voids every cookie given
        # before, so a LOGIN captured before it cannot be judged after it.
        self._cookie_key = secrets.token_bytes(32)
        self._account_of = account_of
        self.stats = stats
        self.replies = ReplyCache()  # every verified LOGIN, with its answer
        window = (config.login_failures, config.login_failure_period)
        # per source address, across names: every failure counts, it holds LOGINs without a ticket
        self._by_ip = FailureWindow(config.login_failures * ADDRESS_NAMES, window[1])
        self._by_user = FailureWindow(*window)  # per name, for LOGINs without a ticket
        self._by_ticket = FailureWindow(*window)  # per name and instance, with a ticket
        self._registrations = BucketTable(config.registration_rate, config.registration_burst)
        self._failure_logged = (-1e18, 0)  # when the last failure was logged, failures then
        # The static half of the registration key exchange, derived from the
        # server's persistent secret (so it survives restarts).
        digest = hmac.new(secret, b"dh private", "sha512").digest()
        self._dh_private = int.from_bytes(digest, "big") >> (512 - DH_PRIVATE_BITS)
        self.dh_public = dh_public(self._dh_private)

    def _log_failure(self, text: str, name: str, addr: Address, now: float) -> None:
        """A failed or refused login, as a warning: the first of a burst,
        then at most one line per `log_interval` with the count since the
        last line, so guessing at a thousand passwords a second writes one
        line every 10 s, not a thousand."""
        stats = self.stats
        failures = (stats["login_failures"] + stats["login_throttled"]
                    + stats["registrations_throttled"])  # fmt: skip
        last, then = self._failure_logged
        if now - last < self.config.log_interval:
            return
        self._failure_logged = (now, failures)
        log.warning(text + " (%d failed or refused logins since the last such line)", name,
                    format_address(*addr), failures - then)  # fmt: skip

    def _salt_for_unknown(self, key: str) -> bytes:
        # Unknown names get a salt that looks like any other and never
        # changes, so probing cannot tell who has an account.
        return hmac.new(self._secret, b"salt|" + key.encode(), "sha256").digest()[:SALT_SIZE]

    def ticket(self, key: str, instance_id: int, account: Account) -> bytes:
        """The login ticket for this account and client instance."""
        return login_ticket(self._secret, key, instance_id, account.stored_key)

    def answered(self, login: Login, datagram: bytes) -> None:
        """Record the answer sent to a verified LOGIN (for its retransmissions)."""
        self.replies.answer(record_key(login), datagram)

    def challenge(self, hello: Hello, addr: Address, now: float) -> Challenge | Refused:
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
        period = int(now // COOKIE_PERIOD)
        value = cookie(self._cookie_key, period, addr, hello.nonce, key)
        return Challenge(hello.nonce, value, salt, iterations, self.dh_public)

    def check(
        self, login: Login, addr: Address, now: float, *, ticket: bytes | None = None,
        defer_dh: bool = False,
    ) -> Verified | Refused | Unwrap | Answered | None:  # fmt: skip
        """The verdict on a LOGIN: verified, refused (with the reply), the
        recorded answer of one judged before, or None for a stale or forged
        cookie (dropped without a word). `ticket`: from a TICKET frame beside
        the LOGIN. With `defer_dh`, a registration comes back as `Unwrap`
        instead of making the loop wait for its Diffie-Hellman secret."""
        try:
            name = normalize_name(login.username)
        except LocalProtocolError as exc:
            # No cookie is ever given for such a name: answered, not recorded.
            self.stats["login_invalid_name"] += 1
            return Refused(login.nonce, ErrorCode.INVALID_NAME, fit(str(exc)))
        key = name_key(name)
        if not cookie_valid(self._cookie_key, now, addr, login.nonce, key, login.cookie):
            return None
        recorded = self.replies.get(record_key(login), now)
        if recorded is not None:
            return Answered(recorded.datagram)
        if not self.replies.reserve(record_key(login), now):
            # Full (MAX_RECORDED_LOGINS verified in 2 cookie periods). Nothing
            # may be forgotten while its cookie verifies, so the cookies go
            # instead: a new key voids them all, and with them the record.
            # Handshakes under way start again from HELLO; this one, already
            # verified, is judged (and recorded afresh).
            log.warning("the record of verified logins is full (%d): new cookie key",
                        len(self.replies))  # fmt: skip
            self.stats["cookie_key_changes"] += 1
            self._cookie_key = secrets.token_bytes(32)
            self.replies.clear()
            self.replies.reserve(record_key(login), now)
        ip = addr[0]
        account = self._account_of(key)
        ticketed = (
            ticket is not None
            and account is not None
            and hmac.compare_digest(ticket, self.ticket(key, login.instance_id, account))
        )
        # The owner's ticket skips the per-name window (which anyone can
        # fill) and the per-address one (which anyone behind the owner's NAT
        # can fill) for one of its own, per name and instance: a ticket
        # stolen with its instance id guesses no faster. Without a ticket:
        # per name and per address (see ADDRESS_NAMES).
        if ticketed:
            windows = [(self._by_ticket, f"{key}|{login.instance_id}")]
        else:
            windows = [(self._by_user, key), (self._by_ip, ip)]
        if any(window.blocked(wid, now) for window, wid in windows):
            wait = max(window.retry_after(wid, now) for window, wid in windows)
            self.stats["login_throttled"] += 1
            self._log_failure("login refused for %s from %s: too many failed logins",
                              name, addr, now)  # fmt: skip
            text = f"too many failed logins; try again in {wait:.0f} s"
            return Refused(login.nonce, ErrorCode.RATE_LIMITED, text)
        if ticketed:
            self.stats["logins_with_ticket"] += 1
        if account is None and (until := self._quarantined(key)) is not None:
            self.stats["registrations_quarantined"] += 1
            day = time.strftime("%Y-%m-%d %H:%M", time.gmtime(until / 1000))
            text = f"{name!r} belonged to a deleted account; free again after {day} UTC"
            return Refused(login.nonce, ErrorCode.NAME_QUARANTINED, fit(text))
        if account is None and not self._registrations.take(ip, 1, now):
            self.stats["registrations_throttled"] += 1
            self._log_failure("registration refused for %s from %s: too many new accounts from "
                              "that address", name, addr, now)  # fmt: skip
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
        return self._verify(login, name, key, account, False, addr, now, ticketed=ticketed)

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
        now: float, *, ticketed: bool = False,
    ) -> Verified | Refused:  # fmt: skip
        message = auth_message(name, login.instance_id, login.nonce, login.cookie, account.salt,
                               account.iterations, login.dh_public, self.dh_public)  # fmt: skip
        self.stats["password_checks"] += 1
        client_key = verify_proof(account.stored_key, message, login.proof)
        if client_key is None:
            if ticketed:
                self._by_ticket.record(f"{key}|{login.instance_id}", now)
            else:
                self._by_user.record(key, now)
            self._by_ip.record(addr[0], now)
            self.stats["login_failures"] += 1
            self._log_failure("failed login for %s from %s", name, addr, now)
            return Refused(login.nonce, ErrorCode.BAD_PASSWORD, fit(f"wrong password for {name!r}"))
        return Verified(account.name if not new else name, key, account, client_key, message, new,
                        ticketed)  # fmt: skip

    def prove(
        self, key: str, instance_id: int, account: Account, message: bytes, proof: bytes,
        now: float,
    ) -> bytes | tuple[ErrorCode, str]:  # fmt: skip
        """The password asked again inside a session (a change of password, a
        deletion): the ClientKey behind a valid SCRAM `proof` of `message`
        against the stored verifier, or the code and text of the refusal.
        Wrong guesses count against the same window as a ticketed LOGIN of
        that client instance (5 per 30 s): a session left open does not
        let anyone guess the password faster than a login would."""
        window = f"{key}|{instance_id}"
        if self._by_ticket.blocked(window, now):
            wait = self._by_ticket.retry_after(window, now)
            return ErrorCode.RATE_LIMITED, f"too many wrong passwords; try again in {wait:.0f} s"
        self.stats["password_checks"] += 1
        client_key = verify_proof(account.stored_key, message, proof)
        if client_key is None:
            self._by_ticket.record(window, now)
            self.stats["account_proof_failures"] += 1
            return ErrorCode.BAD_PASSWORD, "wrong password; nothing was changed"
        return client_key


def valid_iterations(iterations: int) -> bool:
    """Whether a new password's PBKDF2 iteration count is one to store: at
    least RFC 7677's minimum, and not so many that a login never ends."""
    return PBKDF2_MIN_ITERATIONS <= iterations <= MAX_ITERATIONS


#: The most PBKDF2 iterations a changed password may ask clients for
#: (the client refuses a CHALLENGE with more: client_core.PBKDF2_MAX_ITERATIONS).
MAX_ITERATIONS = 10_000_000
