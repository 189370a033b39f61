"""The auditor's and fresh's smaller server findings (session 8, issue 14),
on the sans-IO relay with a fake clock:

- audit8 P5: a huge bad name is quoted by its start and its length, not
  echoed whole; a name given many times counts once against the cap of
  users in one request;
- audit8 P8: messages held on the server for the fan-out budget tell their
  sender `rate_limited`, at most once a second, while they wait;
- fresh 1: of members equally far behind, the one longest without a
  receipt is named as holding the group back, not one whose client merely
  holds its receipts a moment;
- fresh 3: the backlog_full text says its size as a person reads it, and
  the client reads it back (an older server's bytes too).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import protocol
from client_core import BacklogFull, ClientError, check_group_request
from protocol import (
    GROUP_REQUEST_USERS_MAX,
    ErrorCode,
    Fail,
    GroupAccept,
    GroupAction,
    LocalProtocolError,
    Notice,
    normalize_name,
)
from server_groups import backlog_full_text
from server_store import MemoryStore
from tests.redis_fixture import redis_server  # noqa: F401 (a fixture)
from tests.test_cluster_groups import Cluster, cluster_of  # noqa: F401 (a fixture)
from tests.test_groups_relay import GroupWorld, texts

LONG = "x" * 100_000


# --- P5: bad names in errors ---------------------------------------------------------


def test_a_huge_name_is_quoted_by_its_start_and_its_length() -> None:
    with pytest.raises(LocalProtocolError) as caught:
        normalize_name(LONG)
    text = str(caught.value)
    assert len(text) < 120, len(text)
    assert text == f"a name has 1 to 32 characters; '{'x' * 40}…' has 100000"
    assert protocol.quote_name("bob") == "'bob'"
    assert protocol.quote_name(LONG) == f"'{'x' * 40}…' (100000 characters)"
    # A long name with a bad character: its start, not all of it.
    with pytest.raises(LocalProtocolError) as caught:
        normalize_name("y" * 20 + "!")
    assert "contains '!'" in str(caught.value)
    # The terminal's and the window's check, before anything is sent.
    with pytest.raises(ClientError) as refused:
        check_group_request(GroupAction.ADD, "big2", (LONG,))
    assert refused.value.code == ErrorCode.INVALID_NAME
    assert len(str(refused.value)) < 200 and "100000" in str(refused.value)
    with pytest.raises(ClientError) as refused:
        check_group_request(GroupAction.CREATE, "a" * 5_000, ())
    assert len(str(refused.value)) < 200 and "5000" in str(refused.value)


def test_the_server_quotes_a_huge_name_short_too() -> None:
    world = GroupWorld(MemoryStore())
    alice = world.login("alice")
    world.login("bob")
    answer = world.result(alice, world.request(alice, GroupAction.CREATE, "team", "bob",
                                               "z" * 5_000))  # fmt: skip
    assert answer.code == ErrorCode.INVALID_NAME
    assert len(answer.message) < 200 and "5000" in answer.message, answer.message
    answer = world.result(alice, world.request(alice, GroupAction.CREATE, "g" * 5_000))
    assert answer.code == ErrorCode.INVALID_NAME
    assert len(answer.message) < 200 and "5000" in answer.message, answer.message


def test_a_name_given_many_times_counts_once_against_the_cap() -> None:
    """`/create #dup bob BOB bob ...` (300 names, one user) makes the group;
    257 different names are still too many for one request."""
    world = GroupWorld(MemoryStore())
    alice = world.login("alice")
    world.login("bob")
    names = ["bob", "BOB", " Bob"] * 100
    answer = world.result(alice, world.request(alice, GroupAction.CREATE, "dup", *names))
    assert answer.code == 0, answer
    group = world.relay.groups.get("dup")
    assert group is not None and sorted(group.members) == ["alice", "bob"]
    many = [f"u{n}" for n in range(GROUP_REQUEST_USERS_MAX + 1)]
    answer = world.result(alice, world.request(alice, GroupAction.CREATE, "many", *many))
    assert answer.code == ErrorCode.TOO_LONG
    assert answer.message.startswith(f"{GROUP_REQUEST_USERS_MAX + 1} users in one request")


# --- P8: held for the fan-out budget ---------------------------------------------------


def test_messages_held_for_the_fan_out_budget_tell_their_sender_once_a_second() -> None:
    """`max_fanout_rate` 2 (burst 4): one datagram of 10 SENDs into a group
    of 3 costs 20 copies. It is taken (acked) and its messages wait on the
    server for the budget, about a second each after the first; before,
    the sender heard nothing in those seconds (the lines stayed "sending")."""
    world = GroupWorld(MemoryStore(), max_fanout_rate=2.0, max_fanout_burst=4.0)
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    answer = world.result(alice, world.request(alice, GroupAction.CREATE, "f", "bob", "carol"))
    assert answer.code == 0
    world.settle_all()
    for i in range(10):  # queued together: one datagram
        world.post(alice, "f", f"line {i}", i + 1)
    told: list[float] = []  # when each notice came
    accepted_when_first_told = -1
    for _ in range(1_500):
        world.step(0.01)
        notices = [n for n in alice.of(Notice) if n.code == ErrorCode.RATE_LIMITED]
        if len(notices) > len(told):
            told += [world.now] * (len(notices) - len(told))
            if accepted_when_first_told < 0:
                accepted_when_first_told = len(alice.of(GroupAccept))
        if len(alice.of(GroupAccept)) == 10:
            break
    assert len(alice.of(GroupAccept)) == 10
    assert world.relay.stats["held_fanout"] > 0
    # Told while its messages waited, again while the wait went on, never
    # twice within a second.
    assert told and accepted_when_first_told < 10, told
    assert len(told) >= 3, told
    assert all(b - a >= 1.0 for a, b in zip(told, told[1:], strict=False)), told
    assert all("fan-out budget" in n.message for n in alice.of(Notice))
    # Nothing lost, in order; nothing failed.
    world.settle_all()
    for member in (bob, carol):
        assert texts(member, "f") == [f"line {i}" for i in range(10)]
    assert alice.of(Fail) == []


# --- fresh 1: whom a full backlog names ----------------------------------------------


def test_of_members_equally_behind_the_one_longest_without_a_receipt_is_named() -> None:
    """bob and carol are both at #team's creation when alice's posts fill
    it; bob's client receipts (in #other, a moment ago) and merely has not
    receipted #team's last ones yet, carol's has receipted nothing for
    seconds: the refusal names carol. Before, the first found (bob)."""
    world = GroupWorld(MemoryStore(), mailbox_messages=3)
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    assert world.result(alice, world.request(alice, GroupAction.CREATE, "team", "bob",
                                             "carol")).code == 0  # fmt: skip
    world.settle_all()  # both receipt the creation
    world.holding.add("carol")  # carol's client shows nothing from now on
    for _ in range(300):
        world.step(0.01)
    assert world.result(alice, world.request(alice, GroupAction.CREATE, "other", "bob",
                                             "carol")).code == 0  # fmt: skip
    world.post(alice, "other", "elsewhere", 1)
    world.run_until(lambda: texts(bob, "other") == ["elsewhere"], 200, "bob reads #other")
    world.settle_all()  # bob's receipts of #other have come
    world.holding.add("bob")  # bob's next receipts are held (by his client, a moment)
    ids = [world.post(alice, "team", f"m{n}", n + 2) for n in range(4)]
    world.run_until(lambda: bool(alice.of(Fail)), 300, "the fourth refused")
    (fail,) = alice.of(Fail)
    assert fail.msg_id == ids[3] and fail.reason == ErrorCode.MAILBOX_FULL
    assert fail.message.startswith("#team: carol's backlog is full"), fail.message
    # An offline member equally behind is named before either.
    world.logout(carol)
    world.post(alice, "team", "m4", 6)
    world.run_until(lambda: len(alice.of(Fail)) == 2, 300, "the fifth refused")
    assert alice.of(Fail)[1].message.startswith("#team: carol's backlog is full")


# --- fresh 3: the size for people -------------------------------------------------------


def test_the_backlog_text_says_its_size_for_people_and_the_client_reads_it() -> None:
    text = backlog_full_text("team", "carol", 268, 10_485_758)
    assert text == (
        "#team: carol's backlog is full (268 entries, 10.0 MiB wait for carol); it empties "
        "as carol reads, or leaves, or is removed by the owner"
    )
    assert BacklogFull.parse(text) == BacklogFull("team", "carol", 268, "10.0 MiB")
    for size, said in ((812, "812 bytes"), (40 * 1024 + 5, "40 KiB")):
        parsed = BacklogFull.parse(backlog_full_text("team", "bob", 3, size))
        assert parsed == BacklogFull("team", "bob", 3, said)
    # An older server's words (bytes) are read too, and said the same way.
    old = ("#team: carol's backlog is full (268 entries, 10485758 bytes wait for carol); it "
           "empties as carol reads, or leaves, or is removed by the owner")  # fmt: skip
    assert BacklogFull.parse(old) == BacklogFull("team", "carol", 268, "10.0 MiB")


def test_a_cluster_node_says_the_backlog_the_same_way(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """Cluster mode: Redis's script names the member and counts what waits;
    the node words it with the same function (`Relay._group_posted`), so
    the size is for people there too, and the client reads it back."""
    cluster = cluster_of(2, mailbox_messages=3)
    alice, bob = cluster.login(0, "alice"), cluster.login(1, "bob")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob").code == 0
    cluster.settle(20)  # bob has the creation, receipted
    cluster.nodes[1].holding.add("bob")  # bob's client shows nothing more
    for n in range(4):
        cluster.post(0, alice, "team", f"{n}" * 2_048, n + 1)
    cluster.run_until(lambda: bool(alice.of(Fail)), 300, "the fourth refused")
    (fail,) = alice.of(Fail)
    assert fail.reason == ErrorCode.MAILBOX_FULL
    assert fail.message == backlog_full_text("team", "bob", 3, 3 * 2_048), fail.message
    assert "(3 entries, 6 KiB wait for bob)" in fail.message
    assert BacklogFull.parse(fail.message) == BacklogFull("team", "bob", 3, "6 KiB")
    cluster.run_until(lambda: len(texts(bob)) == 3, 300, "bob has the three taken")
