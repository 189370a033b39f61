"""The server's finding of audit7 (N13): a datagram's fan-out cost is
looked up by the streams of its chunks, not by walking every group of its
sender. A user in 5,000 groups (the default cap) made each of their
messages, direct ones too, cost ~4 ms more, so one account at the user rate
filled the server's loop. Counted (group look-ups), not timed; the CPU
figures are bench/user_groups.py's."""

from __future__ import annotations

import random

import pytest

from chat_server import _SEND_KIND
from protocol import GroupChange, Kind, Stream, conversation_stream, name_key
from server_groups import Group, GroupTable, Member, group_name
from server_store import MemoryStore
from tests.test_groups_relay import GroupWorld, created

SOLO = 2000


def solo_groups(table: GroupTable, user: str, count: int) -> list[Group]:
    """`count` groups of `user` alone, straight into the table."""
    made = []
    for n in range(count):
        name, key = group_name(f"solo{n}")
        made.append(table.create(name, key, (name_key(user), user), [])[0])
    return made


def count_lookups(table: GroupTable, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every `table.get` from now on, by key."""
    seen: list[str] = []
    get = table.get

    def counting(key: str) -> Group | None:
        seen.append(key)
        return get(key)

    monkeypatch.setattr(table, "get", counting)
    return seen


def send_chunk(peer: str, index: int = 0) -> Stream:
    return Stream(1, conversation_stream(peer), 1, index, 2, _SEND_KIND + b"rest of a SEND")


def derived(table: GroupTable) -> dict[str, dict[int, list[str]]]:
    """`streams_of` as `of_user` says it should be."""
    out: dict[str, dict[int, list[str]]] = {}
    for user, keys in table.of_user.items():
        for key in keys:
            stream = conversation_stream("#" + table.groups[key].name)
            out.setdefault(user, {}).setdefault(stream, []).append(key)
    return out


def normal(index: dict[str, dict[int, list[str]]]) -> dict[str, dict[int, list[str]]]:
    return {u: {s: sorted(k) for s, k in streams.items()} for u, streams in index.items()}


def test_a_datagrams_fanout_cost_looks_up_only_the_groups_on_its_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = GroupWorld(MemoryStore())
    alice = world.login("alice")
    world.login("bob")
    world.login("carol")
    created(world, alice, "bob", "carol")
    relay = world.relay
    solo = solo_groups(relay.groups, "alice", SOLO)
    user = world.session_of(alice).user
    seen = count_lookups(relay.groups, monkeypatch)

    def on(peer: str) -> list[Group]:
        """alice's groups on `peer`'s stream (a few solo groups may share it)."""
        stream = conversation_stream(peer)
        team = relay.groups.groups["team"]
        return [g for g in [team, *solo] if conversation_stream("#" + g.name) == stream]

    assert relay._fanout_cost(user, [send_chunk("#team")]) == 2  # bob's and carol's copies
    assert len(seen) == len(on("#team")) < 10, "looked up: only the groups on #team's stream"
    seen.clear()
    # A direct message: its stream's groups, if any, count (it may wait, never overspend).
    direct = relay._fanout_cost(user, [send_chunk("bob")])
    assert direct == max((len(g.members) - 1 for g in on("bob")), default=0)
    assert len(seen) == len(on("bob")) < 10
    seen.clear()
    # Not a first chunk, not a SEND: nothing looked up, nothing costs.
    later = send_chunk("#team", index=1)
    other = Stream(1, conversation_stream("#team"), 1, 0, 1, bytes((Kind.RECEIPT,)))
    assert relay._fanout_cost(user, [later, other]) == 0 and not seen
    # Two messages to the group in one datagram: two copies each.
    assert relay._fanout_cost(user, [send_chunk("#team"), send_chunk("#team")]) == 4


def test_a_post_from_a_user_in_2000_groups_does_not_walk_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wiring: the whole handling of alice's datagram (`_may_take` and
    the post) looks up a few groups, not her 2,001 (it was every one)."""
    world = GroupWorld(MemoryStore())
    alice = world.login("alice")
    bob = world.login("bob")
    created(world, alice, "bob")
    world.settle_all()
    solo_groups(world.relay.groups, "alice", SOLO)
    seen = count_lookups(world.relay.groups, monkeypatch)
    world.post(alice, "team", "hello", 1)
    world.run_until(lambda: any(getattr(m, "text", "") == "hello" for m in bob.messages),
                    200, "bob has it")  # fmt: skip
    assert len(seen) < 50, f"{len(seen)} group look-ups for one post"


@pytest.mark.parametrize("seed", range(4))
def test_the_stream_index_follows_every_membership_change(seed: int) -> None:
    """`streams_of` equals what `of_user` says after creates, adds,
    removes, leaves, ends and cluster entries, in any order."""
    rng = random.Random(seed)
    table = GroupTable(max_members=50, max_user_groups=50)
    users = [f"u{n}" for n in range(8)]
    live: list[Group] = []
    most = 0
    for step in range(300):
        action = rng.choice(["create", "add", "remove", "leave", "end", "apply"])
        if action == "create" or not live:
            name, key = group_name(f"g{seed}x{step}")
            owner, *others = rng.sample(users, rng.randint(1, 4))
            live.append(table.create(name, key, (owner, owner), [(o, o) for o in others])[0])
        elif action == "add":
            group = rng.choice(live)
            new = [u for u in users if u not in group.members][: rng.randint(1, 3)]
            if new:
                table.add(group, [(u, u) for u in new])
        elif action in ("remove", "leave"):
            group = rng.choice(live)
            member = rng.choice(list(group.members))
            if len(group.members) == 1:
                table.end(group)
                live.remove(group)
            elif action == "remove":
                table.remove(group, [member])
            else:
                table.leave(group, member)
        elif action == "end":
            group = live.pop(rng.randrange(len(live)))
            table.end(group)
        else:  # a cluster entry made elsewhere: an ADDED of one more
            group = rng.choice(live)
            new = [u for u in users if u not in group.members][:1]
            table.apply(group, group.key, group.name, group.seq + 1, 0,
                        GroupChange.ADDED, "u0", tuple(new))  # fmt: skip
        assert normal(table.streams_of) == normal(derived(table)), (seed, step, action)
        most = max(most, sum(len(k) for s in table.streams_of.values() for k in s.values()))
    assert most >= 10, "the index held memberships along the way"


def test_a_users_groups_read_back_at_start_are_indexed() -> None:
    table = GroupTable()
    name, key = group_name("team")
    group = Group(key, name, "alice")
    for rank, user in enumerate(["alice", "bob"]):
        group.members[user] = Member(user, user, 1, rank)
    table.restore(group)
    stream = conversation_stream("#team")
    assert table.on_stream("alice", stream) == ["team"] == table.on_stream("bob", stream)
    assert table.on_stream("carol", stream) == [] and table.on_stream("alice", stream + 1) == []


def test_the_bench_of_a_user_in_many_groups_runs_and_loses_nothing() -> None:
    """bench/user_groups.py, tiny: its three figures, no message lost."""
    from bench.user_groups import measure

    out = measure(messages=20, groups=300)
    assert out["lost"] == 0
    for key in ("us_per_msg_in_no_group", "us_per_msg_in_groups", "us_per_msg_in_groups_old_walk"):
        assert out[key] > 0
