"""Issue 14, the steady copy's timer wake-ups (eighth session, wheel).

At a steady 10 msg/s into a group, about every other copy left the relay a
timer-heap entry that came due with nothing to do: it was set for a chunk's
retransmission or a delayed ack, and the member's ack, or the next copy
carrying the relay's ack, came first. The loop woke for it (a `select`
return, a pass, a walk of the connection's chunks) only to set the next
entry. Now a session's deadline moves later in place (`Session.deadline`):
the entry is moved there when it reaches the heap's front, before the loop
sleeps, without a wake-up and without a look at the connection; expiry
checks sit in lists by grid step, not in the heap. These tests run the
relay as its loop does, sleeping from event to event on a fake clock
(`bench.timer_wakeups.SteadyLoop`), and check that it wakes for nothing
rarely, that a deadline moved earlier still wakes it on time, that a lost
copy is sent again at its retransmission timeout to the microsecond, that
it never sleeps past any session's deadline, that a silent session still
expires, and that the heap keeps a few entries per session."""

from __future__ import annotations

from typing import Any, ClassVar

from bench.timer_wakeups import Party, SteadyLoop
from protocol import Deliver, MsgId, Send, Welcome, conversation_stream
from reliability import Connection
from server_store import MemoryStore
from tests.conftest import PASSWORD
from tests.test_bounds import World
from tests.test_groups_relay import GroupWorld
from tests.test_login_guard import live, log_in, open_relay, ticket_from

#: bench.fanout's server timers (`TIMERS`): the steady phase's.
RTO_MIN, RTO_MAX = 0.2, 60.0


class Muted(Party):
    """A member whose client can go silent (crashed, or its network gone):
    from `mute` on it takes nothing and sends nothing."""

    muted = False

    def take(self, data: bytes, now: float) -> None:
        if not self.muted:
            super().take(data, now)

    def flush(self, now: float) -> list[bytes]:
        if self.muted:
            self.dirty, self.timer = False, None
            return []
        return super().flush(now)


def steady(members: int, loop_class: type[SteadyLoop] = SteadyLoop, **overrides: Any) -> Any:
    """alice and `members` - 1 others logged in on a relay with bench.fanout's
    timers, the group made and settled, on a `loop_class`."""
    world = GroupWorld(MemoryStore(), rto_min=RTO_MIN, rto_max=RTO_MAX, **overrides)
    names = ["alice", *(f"m{n}" for n in range(members - 1))]
    parties: list[Party] = []
    for name in names:
        client = world.login(name)
        client.conn.rto_min, client.conn.rto_max = RTO_MIN, RTO_MAX
        party = Muted(name, client.conn, client.addr, 9)  # ScriptedLogin's instance
        party.dirty = True
        parties.append(party)
    loop = loop_class(world.relay, parties[0], parties[1:], world.now)
    loop.make_group()
    return loop


def test_a_steady_group_wakes_the_relay_for_nothing_almost_never() -> None:
    """The code before: ~0.5 passes per copy woken for an entry with nothing
    due (python -m bench.timer_wakeups: 0.49 at 100 members); now none."""
    loop = steady(20)
    result = loop.run(3.0)
    assert result["every_copy"], result
    assert result["copies"] == 30 * 19
    assert result["idle_passes_per_copy"] <= 0.005, result
    # The timers that came due did something (the last acks, after the posts).
    assert result["timers_idle_per_copy"] == 0, result
    assert result["timer_passes_per_copy"] <= 0.05, result
    # The entries an earlier move leaves behind are few: a few per session.
    assert result["most_entries"] <= 4 * result["sessions"], result


class Steered(Connection):
    """A Connection whose deadline the test sets (`deadlines`), and which
    records when its timers ran (`ran`): the relay's scheduling alone."""

    __slots__ = ()
    deadlines: ClassVar[dict[bytes, float | None]] = {}
    ran: ClassVar[list[float]] = []

    def get_timer(self) -> float | None:
        return Steered.deadlines.get(self.session_id)

    def handle_timer(self, now: float) -> None:
        Steered.ran.append(now)
        Steered.deadlines[self.session_id] = None  # served


def test_a_deadline_moved_later_then_earlier_wakes_the_loop_once_on_time() -> None:
    """The entry set at X, the deadline moved to Y > X, then to Z with
    X < Z < Y (no new entry: Z is after the live one): the loop sleeps
    through X and wakes at Z, once (the code before woke at X for nothing,
    then at Z). A deadline moved before the live entry (W) gets its own and
    wakes the loop at W."""
    world = World(rto_min=RTO_MIN)
    bob = world.login("bob")
    relay = world.relay
    session = world.session_of(bob)
    sid = session.session_id
    session.conn.__class__ = Steered
    Steered.deadlines.clear()
    Steered.ran.clear()
    now = world.now

    def steer(deadline: float | None) -> None:
        Steered.deadlines[sid] = deadline
        relay._dirty[sid] = session  # as every change to a connection does
        relay.datagrams_to_send(now)

    def sleep_until_it_runs() -> list[float]:
        """The loop's wake-ups (when `get_timer` said) until bob's timers ran."""
        nonlocal now
        wakes = []
        for _ in range(10):
            timer = relay.get_timer()
            assert timer is not None
            now = timer
            wakes.append(now)
            relay.handle_timer(now)
            relay.datagrams_to_send(now)
            if Steered.ran:
                return wakes
        raise AssertionError(f"bob's timers never ran: woken at {wakes}")

    start = now
    steer(start + 0.1)  # X
    steer(start + 0.5)  # Y
    steer(start + 0.3)  # Z
    assert sleep_until_it_runs() == [start + 0.3]
    assert Steered.ran == [start + 0.3]
    Steered.ran.clear()
    steer(now + 0.4)
    steer(now + 0.05)  # W, before the live entry
    at = now + 0.05
    assert sleep_until_it_runs() == [at]
    assert Steered.ran == [at]
    Steered.ran.clear()
    steer(now + 0.2)
    steer(None)  # nothing left to time: no wake-up until the expiry check
    timer = relay.get_timer()
    assert timer is not None and timer - now > relay.config.session_timeout - 1.5


class Lossy(SteadyLoop):
    """Drops the relay's datagrams to `deaf` members before `until`, and
    every `nth` of the others (0: none); checks after every pass that the
    relay's next wake-up is no later than any session's deadline."""

    deaf: ClassVar[set[str]] = set()
    until = 0.0
    nth = 0
    late: ClassVar[list[tuple[str, float, float]]] = []

    def deliver(self, party: Party, data: bytes, now: float) -> None:
        self.count = getattr(self, "count", 0) + 1
        if party.name in self.deaf and now < self.until:
            return
        if self.nth and self.count % self.nth == 0:
            return
        super().deliver(party, data, now)

    def _relay_pass(self, batch: list[tuple[bytes, Any]], now: float) -> None:
        super()._relay_pass(batch, now)
        relay = self.relay
        wake = relay.get_timer()
        grid, timeout = relay._expiry_grid, relay.config.session_timeout
        for session in relay.sessions.values():
            due = ((session.last_heard + timeout) // grid + 1) * grid
            timer = session.conn.get_timer()
            if timer is not None and timer < due:
                due = max(timer, now)
            if wake is None or wake > due:
                self.late.append((session.user.name, now, due))


def test_a_lost_copy_is_sent_again_at_its_retransmission_timeout() -> None:
    """m0 hears nothing for a while: the relay resends the oldest copy it
    sent at its retransmission timeout (late: a copy's, which counts the
    member's 150 ms ack delay), not a microsecond later; then m0 has them all."""
    Lossy.late.clear()
    loop = steady(6, Lossy)
    relay = loop.relay
    m0 = next(s for s in relay.sessions.values() if s.user.name == "m0")
    Lossy.deaf = {"m0"}
    Lossy.until = loop.now + 1.0
    sent: list[tuple[float, int, int]] = []  # (when, chunks resent so far, next packet)
    deliver = Lossy.deliver

    def watching(self: Lossy, party: Party, data: bytes, now: float) -> None:
        if party.name == "m0":
            sent.append((now, m0.conn.chunks_resent, m0.conn.next_pkt))
        deliver(self, party, data, now)

    Lossy.deliver = watching  # type: ignore[method-assign]
    try:
        first_rto = None
        posts = [loop.now + 0.1 * (n + 1) for n in range(20)]
        while posts:
            loop.step(posts)
            if first_rto is None and sent:
                first_rto = sent[0][0] + m0.conn._backed_off_rto(late=True)
        # Its copies then come as the retransmission timers, backed off
        # meanwhile, and the congestion window allow.
        loop.settle(15.0)
    finally:
        Lossy.deliver = deliver  # type: ignore[method-assign]
    assert first_rto is not None
    resent_at = next(when for when, resent, _ in sent if resent > 0)
    assert 0 <= resent_at - first_rto < 1e-6, (resent_at, first_rto)
    members = {p.name: p for p in loop.members}
    assert len(set(members["m0"].got)) == 20
    assert Lossy.late == []


def test_with_loss_the_relay_never_sleeps_past_a_sessions_deadline() -> None:
    """Every 7th datagram to a client lost: retransmissions, acks out of
    order, deadlines moving both ways. After every pass the relay's next
    wake-up is no later than any session's deadline (its connection's, or
    its expiry check's), so nothing is ever late; every copy arrives."""
    Lossy.late.clear()
    Lossy.deaf = set()
    Lossy.nth = 7
    try:
        loop = steady(8, Lossy)
        result = loop.run(3.0)
    finally:
        Lossy.nth = 0
    assert Lossy.late == []
    for member in loop.members:
        assert len(set(member.got)) == 30, member.name
    assert result["timers_idle_per_copy"] == 0


def test_a_session_gone_silent_still_expires_on_its_grid_step() -> None:
    """m0's client goes silent mid-stream (copies in flight to it, its
    deadlines moved by every copy): its session ends when session_timeout
    has passed since it was last heard, at most a grid step later; the rest
    of the group goes on."""
    timeout = 4.0
    loop = steady(5, session_timeout=timeout)
    relay = loop.relay
    m0 = next(p for p in loop.members if p.name == "m0")
    session = next(s for s in relay.sessions.values() if s.user.name == "m0")
    posts = [loop.now + 0.1 * (n + 1) for n in range(70)]
    ended = None
    for _ in range(100_000):
        if not posts and ended is not None:
            break
        if len(posts) == 50:
            m0.muted = True
        loop.step(posts, until=None if posts else loop.now + 1.0)
        if ended is None and session.session_id not in relay.sessions:
            ended = loop.now
    assert ended is not None
    loop.settle(1.0)
    heard = session.last_heard
    grid = relay._expiry_grid
    assert heard + timeout <= ended <= heard + timeout + grid, (heard, ended)
    assert {s.user.name for s in relay.sessions.values()} == {"alice", "m1", "m2", "m3"}
    for member in loop.members[1:]:
        assert len(set(member.got)) == 70


def test_a_session_whose_client_vanishes_after_a_ticketed_welcome_still_expires() -> None:
    """A login with a ticket sends the new session nothing but its WELCOME
    (outside the session). Its expiry is set when it opens (`_place_expiry`),
    not by a pass that touched it: a client that vanished right after the
    WELCOME (crashed, its network gone) still has its session ended."""
    relay = open_relay(session_timeout=4.0)
    now = 1000.0
    home = ("198.51.100.5", 7000)
    ticket = ticket_from(log_in(relay, "bob", PASSWORD, home, now), now)
    assert ticket is not None
    now += 0.5
    again = log_in(relay, "bob", PASSWORD, home, now, ticket=ticket)
    assert isinstance(again.answer, Welcome), again.answer
    session = live(relay, "bob")
    assert session is not None
    for _ in range(100):  # the loop sleeps until get_timer, handles what is due
        timer = relay.get_timer()
        if timer is None or session not in relay.sessions:
            break
        now = max(now, timer)
        relay.handle_timer(now)
        relay.datagrams_to_send(now)
    assert session not in relay.sessions
    assert 1000.5 + 4.0 <= now <= 1000.5 + 4.0 + relay._expiry_grid


def test_sessions_idle_between_messages_leave_no_entries_a_minute_away() -> None:
    """alice writes to bob every half second: between two messages both
    sessions have nothing in flight and no ack owed. The code before then
    set an entry for the expiry check, a minute away, and the next message's
    retransmission timer left it behind in the heap: an entry per message
    per session, for a minute (a session_timeout). Now the expiry checks
    are not in the heap and an entry with nothing left to time is dropped:
    the heap holds a few entries per session."""
    world = World(rto_min=RTO_MIN)
    alice, bob = world.login("alice"), world.login("bob")
    instance = world.session_of(alice).instance_id
    most = 0
    for n in range(1, 41):  # 20 s
        alice.send(Send(MsgId(instance, n), "bob", f"message {n}"), conversation_stream("bob"))
        for _ in range(50):
            world.step()
            most = max(most, len(world.relay._timers))
    assert len([m for m in bob.messages if isinstance(m, Deliver)]) == 40
    assert most <= 3 * len(world.relay.sessions), most
