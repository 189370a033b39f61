"""Issue 14, the last of a steady copy's CPU (seventh session, shave): the
loop is never woken for a timer entry that is stale.

A session's timer entry goes stale when its deadline moves earlier (a new
entry is pushed, the old one stays in the heap) or the session ends; at a
steady rate into a group that is about one entry per copy. `handle_timer`
skipped such an entry, but `Relay.get_timer` still named its deadline, so
the loop woke (a `poll` wake-up and a pass) to do nothing. `get_timer` now
drops the stale entries at the front of the heap first."""

from __future__ import annotations

from server_store import MemoryStore
from tests.test_groups_cost import group_of
from tests.test_groups_relay import GroupWorld


def stale_fronts(world: GroupWorld) -> int:
    """1 if the deadline `get_timer` names is a stale entry's (a wake-up
    that `handle_timer` would spend on nothing), else 0."""
    relay = world.relay
    timer = relay.get_timer()
    if not relay._timers or relay._timers[0][0] != timer:
        return 0
    deadline, _, session_id = relay._timers[0]
    session = relay.sessions.get(session_id)
    return 0 if session is not None and session.scheduled == deadline else 1


def test_a_steady_group_never_wakes_the_loop_for_a_stale_timer() -> None:
    world = GroupWorld(MemoryStore())
    alice, members = group_of(world, 10)
    stale = 0
    for n in range(1, 21):  # 10 msg/s: a post every tenth of a second
        world.post(alice, "team", f"post {n}", n)
        for _ in range(10):
            world.step()
            stale += stale_fronts(world)
    world.settle_all(50)
    stale += stale_fronts(world)
    assert stale == 0
    # Nothing was lost by it: everyone has every post.
    for member in members:
        texts = [getattr(m, "text", None) for m in member.messages]
        assert all(f"post {n}" in texts for n in range(1, 21)), member.name


def test_an_ended_sessions_entry_does_not_name_the_next_wake_up() -> None:
    world = GroupWorld(MemoryStore())
    alice, _ = group_of(world, 3)
    world.logout(alice)
    assert stale_fronts(world) == 0
