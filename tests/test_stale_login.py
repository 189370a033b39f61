"""A client's stale login attempt never replaces its newer session.

A client whose LOGIN goes unanswered for 3 s starts over from HELLO with a
new nonce (`client_core.LOGIN_STEP`) and takes only the WELCOME of its
newest attempt. Under load a registration can take longer than that, and
the key-exchange pool hands its secrets back in the order they are done,
not the order the LOGINs came: the older attempt could then open its
session last and silently replace (same client instance) the session the
client holds. The client's datagrams then went to a session the server had
forgotten, and what it was sent went to one nobody read: the benchmark saw
messages accepted and never delivered, and logins that came back with no
connection (`bench/loadgen.log_in_clients`).
"""

from __future__ import annotations

from chat_server import Relay
from protocol import Welcome
from tests.clients import ScriptedLogin, preauth_frame
from tests.conftest import PASSWORD
from tests.conftest import test_config as server_config
from tests.test_security import HeldExecutor


def test_an_older_attempt_done_last_does_not_replace_the_newer_session() -> None:
    pool = HeldExecutor()
    relay = Relay(server_config(None), unwrapper=pool)
    addr, now = ("192.0.2.50", 4000), 1000.0
    attempts = []
    for at in (now, now + 3.5):  # the second starts over from HELLO after 3 s unanswered
        login = ScriptedLogin("erin", PASSWORD, 7, at)
        login.take([d for d, _ in relay.handle_datagram(login.hello, addr, at)], at)
        assert relay.handle_datagram(login.request, addr, at) == []
        attempts.append(login)
    older, newer = attempts
    assert len(pool.held) == 2
    pool.held.reverse()  # the pool finishes the newer attempt's secret first
    pool.release()
    relay.key_exchange_done(now + 4)
    out = [d for d, to in relay.datagrams_to_send(now + 4) if to == addr]
    assert isinstance(newer.take(out, now + 4), Welcome) and newer.conn is not None
    # The session the client holds is the one the server keeps.
    assert [s.session_id for s in relay.sessions.values()] == [newer.conn.session_id]
    assert relay.stats["login_stale"] == 1
    # The older attempt got no WELCOME of its own (its client has moved on).
    welcomes = [f for d in out if isinstance(f := preauth_frame(d), Welcome)]
    assert [f.nonce for f in welcomes] == [newer.nonce]
    assert older.nonce != newer.nonce


def test_a_newer_attempt_done_last_still_replaces_the_older_session() -> None:
    """In order (the usual case), the newer login replaces the older one's
    session, as any new login of the same client does."""
    pool = HeldExecutor()
    relay = Relay(server_config(None), unwrapper=pool)
    addr, now = ("192.0.2.51", 4000), 1000.0
    attempts = []
    for at in (now, now + 3.5):
        login = ScriptedLogin("fred", PASSWORD, 8, at)
        login.take([d for d, _ in relay.handle_datagram(login.hello, addr, at)], at)
        assert relay.handle_datagram(login.request, addr, at) == []
        attempts.append(login)
    pool.release()
    relay.key_exchange_done(now + 4)
    out = [d for d, to in relay.datagrams_to_send(now + 4) if to == addr]
    newer = attempts[1]
    assert isinstance(newer.take(out, now + 4), Welcome) and newer.conn is not None
    assert [s.session_id for s in relay.sessions.values()] == [newer.conn.session_id]
    assert relay.stats["login_stale"] == 0
