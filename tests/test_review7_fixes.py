"""The review's findings on session 7's changes (findings-review7), each
pinned: a group made again under its name counts its backlog's bytes (F1);
a hole never cuts what a sender online is still owed notices for (F3);
the running totals stay bounded while a former member holds the trim (F2);
the page cache counts what it holds (F4)."""

from __future__ import annotations

import tracemalloc
from typing import Any

from chat_server import GROUP_BATCH_BYTES, GROUP_TRIM_EVERY
from protocol import (
    GROUP_BATCH_ENTRY_OVERHEAD,
    ErrorCode,
    GroupAccept,
    GroupAction,
    GroupDeliver,
    MsgId,
    encode_message,
    group_batch,
)
from server_groups import Group, GroupTable
from server_records import GroupEntry, GroupPages
from server_store import MemoryStore
from tests.test_bounds import Client
from tests.test_group_backlog import accepted, fails, offline_carol, post
from tests.test_groups_relay import GroupWorld, created, texts, told_by
from tests.test_groups_trim import log_seqs


def test_a_group_made_again_counts_its_backlogs_bytes() -> None:
    """F1: the second life starts at seq 12 (its name's seqs go on); its
    running totals count from there, so the byte cap holds for it too.
    (The backlog helper's a209f7f fixed it on main as well.)"""
    world = GroupWorld(MemoryStore(), mailbox_bytes=100)
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    created(world, alice, "bob", "carol")
    world.settle_all()
    post(world, alice, [f"old{n}" for n in range(1, 11)], 1)
    for client in (alice, bob, carol):
        assert world.result(client, world.request(client, GroupAction.LEAVE, "team")).code == 0
    world.settle_all()
    created(world, alice, "bob", "carol")
    world.settle_all()
    group = world.relay.groups.get("team")
    assert group is not None and group.seq > 1
    world.logout(carol)
    post(world, alice, ["x" * 40, "y" * 40, "z" * 40, "w" * 40], 100)
    assert group.backlog() == (2, 80)
    assert [f.reason for f in fails(alice)] == [ErrorCode.MAILBOX_FULL] * 2, accepted(alice)


def deaf_alice_posts(store: MemoryStore) -> tuple[GroupWorld, Client, int]:
    """carol removed while offline (she holds the trim); alice's client
    stops hearing the server (her session lives on) while her posts reach
    bob, who reads them all: holes are cut past carol's removal."""
    world, alice, bob = offline_carol(store)
    assert world.result(alice, world.request(alice, GroupAction.REMOVE, "team", "carol")).code == 0
    world.settle_all()
    original = world._to_clients

    def to_clients(out: list[tuple[bytes, Any]]) -> None:
        original([(d, a) for d, a in out if a != alice.addr])

    world._to_clients = to_clients  # type: ignore[method-assign]
    for n in range(1, 3 * GROUP_TRIM_EVERY + 1):
        world.post(alice, "team", f"a{n}", n)
        if n % 8 == 0:
            world.step()
    world.settle_all(500)
    had = len(texts(bob))  # as many as her window lets out unacked
    assert had >= GROUP_TRIM_EVERY
    world.clients.pop("alice", None)  # her client is gone, never told
    return world, world.login("alice"), had


def test_a_sender_online_but_unreachable_is_told_everything_at_her_next_login() -> None:
    """F3: the hole held to her last message (her notices were unacked), so
    her next login tells her bob had every one."""
    store = MemoryStore()
    world, alice, had = deaf_alice_posts(store)
    world.settle_all(300)
    told = {m for by, m in told_by(alice) if by == "bob"}
    assert len(told) == had


def test_her_resent_send_is_answered_with_its_seq() -> None:
    """F3: her client never had the GROUP_ACCEPT of a1 and sends it again:
    the answer names its seq (3), not "its group has ended"."""
    store = MemoryStore()
    world, alice, _ = deaf_alice_posts(store)
    assert 3 in log_seqs(store)  # a1 (seq 3) was not cut out
    world.post(alice, "team", "a1", 1)
    world.settle_all(100)
    accepts = [a for a in alice.of(GroupAccept) if a.msg_id.client_seq == 1]
    assert accepts and accepts[0].group_seq == 3, accepts


def test_the_running_totals_stay_bounded_while_a_former_member_holds_the_trim() -> None:
    """F2: carol, removed while offline after one message, holds the trim;
    the holes keep the log bounded, and the totals (`Group.ends`) are cut
    at each hole too, so they do not grow by an entry per post."""
    store = MemoryStore()
    world, alice, bob = offline_carol(store)
    world.post(alice, "team", "a1", 1)
    world.settle_all()
    assert world.result(alice, world.request(alice, GroupAction.REMOVE, "team", "carol")).code == 0
    count = 20 * GROUP_TRIM_EVERY
    for n in range(2, 2 + count):
        world.post(alice, "team", f"t{n}", n)
        if n % 8 == 0:
            world.step()
    world.run_until(lambda: len(texts(bob)) == 1 + count, 5000, "bob's copies")
    world.settle_all()
    group = world.relay.groups.get("team")
    assert group is not None
    assert group.trimmed <= 2  # carol holds it
    assert len(log_seqs(store)) < 2 * GROUP_TRIM_EVERY  # the log is bounded (holes)
    assert len(group.ends) < 2 * GROUP_TRIM_EVERY, len(group.ends)
    assert group.counted + len(group.ends) - 1 == group.seq
    group.lowest_member()
    assert group.backlog() == (0, 0)  # bob has everything


def test_the_totals_read_back_start_after_the_last_hole() -> None:
    """F2: at start-up the totals are counted from the log past its last
    hole: what lies below is owed to former members and senders only."""
    group = Group("team", "team", "alice", 60)
    GroupTable.count_from(group, [(2, 5), (3, 7), (40, 1), (41, 0), (58, 2), (59, 3)])
    assert group.trimmed == 1 and group.counted == 57
    assert list(group.ends) == [0, 2, 5, 5]  # 58, 59 and 60 (not in the log)
    group.low = 57
    assert group.backlog() == (3, 5)
    group.low = 10  # (below the hole: counted from its end)
    assert group.backlog() == (3, 5)


def test_the_page_cache_holds_no_more_than_its_cap() -> None:
    """F4: tiny messages, a run made at every place (members behind at
    different seqs): a run keeps its entries alive after the cache let
    them go, so it counts each of them; what the cache holds (traced) stays
    under its cap (it was ~1.8x when a run counted as one record)."""
    cap = 256 << 10
    cache = GroupPages(65_536, cap)
    group = object()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for seq in range(1, 4001):
            deliver = GroupDeliver(10**9 + seq, seq, MsgId(9, seq), "team", "alice", "k", 0)
            entry = GroupEntry(seq, 10**9 + seq, "alice", MsgId(9, seq), 1, ("team", seq))
            cache.add(group, "team", entry, encode_message(deliver))
            if seq > 50:
                cache.run(group, "team", seq - 50, GROUP_BATCH_BYTES, GROUP_BATCH_ENTRY_OVERHEAD,
                          group_batch)  # fmt: skip
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert cache.runs and cache.bytes <= cap
    assert held <= cap, (held, cap)
    counted = sum(len(p) + GroupPages.RECORD_BYTES for _, _, p in cache.entries.values())
    counted += sum(GroupPages.run_cost(run) for run in cache.runs.values())
    assert cache.bytes == counted
    assert all(GroupPages.run_cost(r) > GroupPages.RECORD_BYTES * 2 for r in cache.runs.values())
