"""The group holds of one server, fixed after a review (review3's findings
1-3): what a session's holds keep is bounded whatever stream its requests
come on, a SEND repeating the id of one held for the fan-out budget gets
the answers it would once that is numbered (never a second copy), and a
SEND on the control stream is refused (the budgets reckon a SEND by its
conversation's stream). In memory, with a fake clock."""

from __future__ import annotations

from chat_server import MAX_GROUP_HELD
from protocol import (
    CONTROL_STREAM,
    Deliver,
    ErrorCode,
    Fail,
    GroupAccept,
    GroupAction,
    GroupRequest,
    GroupResult,
    MsgId,
    Send,
    conversation_stream,
)
from server_store import MemoryStore
from tests.test_bounds import Client
from tests.test_groups_relay import GroupWorld, texts


def test_membership_requests_on_the_control_stream_are_held_to_the_bound() -> None:
    """A client sending its membership changes on the control stream (not
    the group's) while they wait for the fan-out budget: the session's
    holds stay within MAX_GROUP_HELD (give or take one datagram), the rest
    is withheld (not acked), and every request is answered in the end."""
    world = GroupWorld(MemoryStore(), max_fanout_rate=300.0, max_fanout_burst=40.0,
                       user_msg_rate=1000.0, user_msg_burst=2500.0)  # fmt: skip
    alice = world.login("alice")
    names = [f"m{n}" for n in range(30)]
    for name in names:
        world.login(name)
    world.login("dave")
    created = world.request(alice, GroupAction.CREATE, "team", *names)
    assert world.result(alice, created).code == 0
    world.settle_all()
    ids = []
    for i in range(100):  # add and remove dave in turn: each a change of ~31 copies
        world._request_ids += 1
        ids.append(world._request_ids)
        action = GroupAction.ADD if i % 2 == 0 else GroupAction.REMOVE
        alice.send(GroupRequest(world._request_ids, action, "team", ("dave",)), CONTROL_STREAM)
    held = []
    sid = alice.conn.session_id

    def all_answered() -> bool:
        holds = world.relay._group_holds.get(sid)
        held.append(holds.count if holds is not None else 0)
        return {r.request_id for r in alice.of(GroupResult)} >= set(ids)

    world.run_until(all_answered, 3000, "every request answered")
    assert max(held) > MAX_GROUP_HELD // 2  # they did wait
    assert max(held) <= MAX_GROUP_HELD + 32  # one datagram's worth past the bound, at most
    assert world.relay.stats["withheld_group_hold"] > 0
    answers = {r.request_id: r.code for r in alice.of(GroupResult)}
    assert all(answers[i] == 0 for i in ids)


def test_a_held_membership_request_counts_its_bytes() -> None:
    """A request held behind the fan-out budget counts toward
    MAX_GROUP_HELD_BYTES like a SEND's text (it counted nothing)."""
    world = GroupWorld(MemoryStore(), max_fanout_rate=1.0, max_fanout_burst=10.0)
    alice = world.login("alice")
    names = [f"m{n}" for n in range(9)]
    for name in names:
        world.login(name)
    world.login("dave")
    world.request(alice, GroupAction.CREATE, "team", *names)
    world.request(alice, GroupAction.ADD, "team", "dave")  # same datagram: waits
    world.settle_all()
    holds = world.relay._group_holds[alice.conn.session_id]
    assert holds.count == 1
    assert holds.size == len("team") + len("dave")


def _held_posts(text: str) -> tuple[GroupWorld, Client, list[Client]]:
    """alice makes #team of 9 and posts p0..p5 in the same datagram (they
    wait for the fan-out budget), then the id of p5 again with `text`."""
    world = GroupWorld(MemoryStore(), max_fanout_rate=100.0, max_fanout_burst=30.0)
    alice = world.login("alice")
    names = [f"m{n}" for n in range(9)]
    members = [world.login(name) for name in names]
    world.settle_all()
    world.request(alice, GroupAction.CREATE, "team", *names)
    for i in range(6):
        world.post(alice, "team", f"p{i}", i + 1)
    world.post(alice, "team", text, 6)
    for _ in range(100):
        world.step(0.02)
    return world, alice, members


def test_a_send_repeating_a_held_one_is_accepted_once() -> None:
    """The same id and text again while the first waits for the budget:
    one copy to each member, the same GROUP_ACCEPT twice (as without holds)."""
    world, alice, members = _held_posts("p5")
    assert world.relay.stats["held_fanout"] > 0  # the posts did wait
    for member in members:
        assert texts(member) == ["p0", "p1", "p2", "p3", "p4", "p5"]
    accepts = [a.server_msg_id for a in alice.of(GroupAccept) if a.msg_id == MsgId(9, 6)]
    assert len(accepts) == 2 and accepts[0] == accepts[1]


def test_a_send_reusing_a_held_id_with_other_text_is_a_duplicate() -> None:
    world, alice, members = _held_posts("not p5")
    for member in members:
        assert texts(member) == ["p0", "p1", "p2", "p3", "p4", "p5"]
    fails = [f.reason for f in alice.of(Fail) if f.msg_id == MsgId(9, 6)]
    assert fails == [ErrorCode.DUPLICATE_ID]
    accepts = [a for a in alice.of(GroupAccept) if a.msg_id == MsgId(9, 6)]
    assert len(accepts) == 1


def test_a_send_on_the_control_stream_is_refused_and_the_session_goes_on() -> None:
    """A SEND must come on its conversation's stream (the budgets reckon it
    by its stream): one on the control stream is dropped and counted, to a
    user or a group alike, and the session's next message is delivered."""
    world = GroupWorld(MemoryStore(), user_msg_rate=20.0, user_msg_burst=50.0)
    alice = world.login("alice")
    bob = world.login("bob")
    names = [f"m{n}" for n in range(3)]
    members = [world.login(name) for name in names]
    assert world.result(alice, world.request(alice, GroupAction.CREATE, "team", *names)).code == 0
    world.settle_all()
    before = world.relay.drops.counts.get("bad message", 0)
    for i in range(100):
        alice.send(Send(MsgId(9, i + 1), "bob", f"d{i}"), CONTROL_STREAM)
        alice.send(Send(MsgId(9, 1000 + i), "#team", f"g{i}"), CONTROL_STREAM)
    world.settle_all()
    assert bob.of(Deliver) == []
    assert all(texts(m) == [] for m in members)
    assert world.relay.drops.counts.get("bad message", 0) - before == 200
    alice.send(Send(MsgId(9, 5000), "bob", "on its stream"), conversation_stream("bob"))
    world.post(alice, "team", "on the group's", 5001)
    world.settle_all()
    assert [d.text for d in bob.of(Deliver)] == ["on its stream"]
    assert all(texts(m) == ["on the group's"] for m in members)
