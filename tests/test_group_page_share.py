"""Members behind share a page (issue 14, seventh session): members who read
a group's log in pages (their window was full, they logged in after being
away) share the work when they are at the same place. One store read serves
every pager at its place, and the relay's cache of the groups' recent
entries (`server_records.GroupPages`, filled by the live fan-out and by
those reads) gives each entry one encoding and each run of entries one
joined GROUP_BATCH for every member who pages through it. And the pagers'
guarantees hold: one order, exactly once, nothing before a member joined
or after she was removed, a session's window, the cache's caps."""

from __future__ import annotations

from typing import Any

import pytest

import chat_server
from chat_server import MAILBOX_WINDOW, MAILBOX_WINDOW_BYTES
from protocol import (
    GroupAction,
    GroupBatch,
    GroupChange,
    GroupDeliver,
    GroupEvent,
    Message,
    MsgId,
    Receipt,
    Stream,
    decode_message,
    encode_message,
    group_batch,
    unbatch,
)
from reliability import PayloadReceived
from server_records import GroupEntry, GroupPages
from server_store import MessageStore, Read, ReadGroupLog
from tests.test_bounds import Client
from tests.test_groups_relay import GroupWorld, created, entries, texts


class PageWorld(GroupWorld):
    """A `GroupWorld` that keeps every payload the relay sent each client
    (a batch as a batch), and checks at every step that no session's group
    window is over its bounds and the cache is within its caps."""

    def __init__(self, store: MessageStore, **overrides: Any) -> None:
        super().__init__(store, **overrides)
        self.payloads: dict[str, list[Message]] = {}

    def _to_clients(self, out: list[tuple[bytes, Any]]) -> None:
        for data, addr in out:
            client = self._by_addr.get(addr)
            if client is None or not client.conn.receive_datagram(data, self.now):
                continue
            for event in client.conn.take_events():
                if not isinstance(event, PayloadReceived):
                    continue
                payload = decode_message(event.payload)
                self.payloads.setdefault(client.name, []).append(payload)
                for message in unbatch(payload):
                    client.messages.append(message)
                    if (
                        isinstance(message, GroupDeliver | GroupEvent)
                        and client.name not in self.holding
                    ):
                        client.send(Receipt(message.server_msg_id))

    def step(self, dt: float = 0.01) -> None:
        super().step(dt)
        for session in self.relay.sessions.values():
            mail = session.group_mail
            if mail is not None:
                assert mail.count <= MAILBOX_WINDOW, session.user.name
                # (The first entry of a page goes whatever its size, as from the store.)
                assert mail.bytes <= MAILBOX_WINDOW_BYTES + 1024, session.user.name
        cache = self.relay._group_pages
        assert len(cache.entries) <= cache.max_entries
        assert len(cache.runs) <= cache.max_entries
        assert cache.bytes <= cache.max_bytes

    def release(self, *clients: Client) -> None:
        """Their clients show what they hold now: one receipt each for the
        latest entry (it covers everything of the group before it)."""
        for client in clients:
            self.holding.discard(client.name)
            got = [m for m in client.messages if isinstance(m, GroupDeliver | GroupEvent)]
            if got:
                client.send(Receipt(got[-1].server_msg_id))


def log_reads(store: MessageStore) -> list[ReadGroupLog]:
    """Every read of a group's log the relay submits from now on."""
    seen: list[ReadGroupLog] = []
    submit = store.submit

    def counting(op: Any, then: Any = None) -> None:
        if isinstance(op, Read) and isinstance(op.query, ReadGroupLog):
            seen.append(op.query)
        submit(op, then)

    store.submit = counting  # type: ignore[method-assign]
    return seen


def count_work(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The group entries the relay encodes and the GROUP_BATCHes it joins."""
    counts = {"encoded": 0, "joined": 0}
    encode, join = encode_message, group_batch

    def encoding(message: Any) -> bytes:
        if isinstance(message, GroupDeliver | GroupEvent):
            counts["encoded"] += 1
        return encode(message)

    def joining(payloads: Any) -> bytes:
        counts["joined"] += 1
        return join(payloads)

    monkeypatch.setattr(chat_server, "encode_message", encoding)
    monkeypatch.setattr(chat_server, "group_batch", joining)
    return counts


def group_behind(world: PageWorld, size: int, count: int) -> tuple[Client, list[Client]]:
    """alice and `size` - 1 members holding their receipts; alice posts
    `count` messages (n1, n2, ...): each member's window fills, the rest
    waits in the log."""
    alice = world.login("alice")
    members = [world.login(f"m{n}") for n in range(size - 1)]
    created(world, alice, *(m.name for m in members))
    world.settle_all()
    world.holding.update(m.name for m in members)
    for seq in range(1, count + 1):
        world.post(alice, "team", f"n{seq}", seq)
        if seq % 64 == 0:
            world.step(0.001)
    world.settle_all(60)
    for member in members:
        assert len(texts(member)) == MAILBOX_WINDOW, "the window is full"
    return alice, members


def all_in_order(clients: list[Client], count: int) -> bool:
    return all(texts(c) == [f"n{seq}" for seq in range(1, count + 1)] for c in clients)


# --- the sharing -------------------------------------------------------------------------


def test_members_behind_at_one_place_page_from_the_cache_without_a_read_or_encoding(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The live fan-out cached what the members were refused: when their
    receipts make room they page from there, no store read, no entry
    encoded again, each run joined once for all of them."""
    world = PageWorld(store)
    count = MAILBOX_WINDOW + 150
    alice, members = group_behind(world, 12, count)
    reads = log_reads(store)
    work = count_work(monkeypatch)
    world.release(*members)
    world.run_until(lambda: all_in_order(members, count), 400, "the rest of the log")
    assert reads == []
    assert work["encoded"] == 0
    # One set of runs for everyone: a member got as many payloads of the
    # rest as the relay joined batches (not one set per member).
    rest = [p for p in world.payloads["m0"] if isinstance(p, GroupBatch)][-work["joined"] :]
    assert sum(len(p.entries) for p in rest) == count - MAILBOX_WINDOW
    for member in members[1:]:
        theirs = [p for p in world.payloads[member.name] if isinstance(p, GroupBatch)]
        assert theirs[-len(rest) :] == rest
    assert world.relay._group_pages.stats["served"] >= len(members) * 150


def test_members_at_one_place_share_one_store_read_and_one_encoding_of_each_entry(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache lost the backlog (here: emptied): the first pager's read of
    the log serves every member at that place (in flight on the disk, or
    from the cache it filled), each entry encoded once."""
    world = PageWorld(store)
    count = MAILBOX_WINDOW + 150
    _, members = group_behind(world, 12, count)
    world.relay._group_pages = GroupPages(chat_server.GROUP_PAGE_CACHE_ENTRIES,
                                          chat_server.GROUP_PAGE_CACHE_BYTES)  # fmt: skip
    reads = log_reads(store)
    work = count_work(monkeypatch)
    world.release(*members)
    world.run_until(lambda: all_in_order(members, count), 400, "the rest of the log")
    assert len(reads) == 1, reads
    assert work["encoded"] == 150


def test_members_at_different_places_each_get_their_pages_once_in_order(
    store: MessageStore,
) -> None:
    """Members released at different times page from different places;
    receipts come out of order and some are lost (the client sends them
    again): every member has every message exactly once, in order."""
    world = PageWorld(store)
    count = 2 * MAILBOX_WINDOW + 40
    alice, members = group_behind(world, 6, count)
    # m0's receipts: every third chunk lost.
    sent = [0]

    def lossy(frame: Stream) -> bool:
        sent[0] += 1
        return sent[0] % 3 != 0

    members[0].keep = lossy
    world.release(members[0])
    world.run_until(lambda: len(texts(members[0])) > MAILBOX_WINDOW + 60, 200, "m0 pages")
    world.release(members[1], members[2])
    for _ in range(5):
        world.step()
    # m3's client receipts what it holds newest first.
    m3 = members[3]
    world.holding.discard(m3.name)
    for message in reversed([m for m in m3.messages if isinstance(m, GroupDeliver)]):
        m3.send(Receipt(message.server_msg_id))
    world.release(members[4])
    world.run_until(lambda: all_in_order(members, count), 1500, "every member, everything")
    for member in members:
        seqs = [e[0] for e in entries(member)]
        assert seqs == list(range(1, count + 2)), member.name  # CREATED, then each message


def test_removed_added_and_returning_members_get_exactly_their_part_of_a_backlog(
    store: MessageStore,
) -> None:
    """Mid-backlog dave is removed (nothing after it), erin added (nothing
    before it) and frank logs in after being away (everything, from the
    log): with members paging from the cache at the same places."""
    world = PageWorld(store)
    alice = world.login("alice")
    others = {n: world.login(n) for n in ("bob", "carol", "dave", "erin", "frank")}
    created(world, alice, "bob", "carol", "dave", "frank")
    world.settle_all()
    world.holding.update(("bob", "carol", "dave", "erin"))
    world.logout(others["frank"])
    total = MAILBOX_WINDOW + 200
    seq = 0
    for seq in range(1, total + 1):
        world.post(alice, "team", f"n{seq}", seq)
        if seq == 150:
            world.step(0.001)
            assert world.result(alice, world.request(alice, GroupAction.REMOVE, "team",
                                                     "dave")).code == 0  # fmt: skip
        if seq == 250:
            world.step(0.001)
            assert world.result(alice, world.request(alice, GroupAction.ADD, "team",
                                                     "erin")).code == 0  # fmt: skip
        if seq % 64 == 0:
            world.step(0.001)
    world.settle_all(30)
    frank = world.login("frank")
    world.release(*(others[n] for n in ("bob", "carol", "dave", "erin")))
    everyone = [others["bob"], others["carol"], frank]
    world.run_until(lambda: all_in_order(everyone, total), 1500, "the members, everything")
    world.run_until(lambda: len(texts(others["erin"])) == total - 250, 500, "erin's part")
    world.settle_all(30)
    assert texts(others["dave"]) == [f"n{s}" for s in range(1, 151)]
    assert entries(others["dave"])[-1][1] == GroupChange.REMOVED.label
    assert texts(others["erin"]) == [f"n{s}" for s in range(251, total + 1)]
    assert entries(others["erin"])[0][1] == GroupChange.ADDED.label
    group = world.relay.groups.get("team")
    assert group is not None
    for client in (*everyone, others["erin"]):
        seqs = [e[0] for e in entries(client)]
        assert seqs == list(range(seqs[0], group.seq + 1)), client.name
    # The removed member's pager has nothing more to hand her.
    session = world.session_of(others["dave"])
    pager = session.group_mail.pagers.get("team") if session.group_mail else None
    assert pager is None or (not pager.behind and not pager.items), (pager.behind, pager.items)


def test_the_cache_keeps_to_its_caps_and_members_page_from_the_store_past_them(
    store: MessageStore,
) -> None:
    """A cache far smaller than the backlog: the oldest go first, it never
    holds more than its caps (checked at every step), and the members get
    the rest from the store, in order, once."""
    world = PageWorld(store)
    world.relay._group_pages = GroupPages(40, 40 * 300)
    count = MAILBOX_WINDOW + 300
    _, members = group_behind(world, 5, count)
    reads = log_reads(store)
    world.release(*members)
    world.run_until(lambda: all_in_order(members, count), 1500, "the rest of the log")
    assert reads, "past the cache, the store"


# --- the cache alone --------------------------------------------------------------------


class Owner:
    """Stands for a `server_groups.Group` (the cache only compares identity)."""


def entry(seq: int, sender: str = "alice", text: str = "x" * 20) -> tuple[GroupEntry, bytes]:
    deliver = GroupDeliver(1000 + seq, seq, MsgId(1, seq), "team", sender, text, 7)
    made = GroupEntry(seq, 1000 + seq, sender, MsgId(1, seq), len(text), ("team", seq))
    return made, encode_message(deliver)


def test_the_cache_evicts_the_oldest_past_either_cap_and_tells_groups_apart() -> None:
    team = Owner()
    cache = GroupPages(max_entries=10, max_bytes=10**9)
    for seq in range(1, 26):
        cache.add(team, "team", *entry(seq))
    assert sorted(seq for _, seq in cache.entries) == list(range(16, 26))
    assert cache.get(team, "team", 15) is None and cache.get(team, "team", 16) is not None
    # A new group of the same name is another group: not served the old entries.
    assert cache.get(Owner(), "team", 20) is None
    assert cache.run(Owner(), "team", 20, 1061, 4, group_batch) is None
    # Runs: joined once, the same object after; as `Relay._group_payloads` would.
    run = cache.run(team, "team", 16, 1061, 4, group_batch)
    assert run is not None and cache.run(team, "team", 16, 1061, 4, group_batch) is run
    payloads = [cache.get(team, "team", s)[1] for s in range(16, 26)]  # type: ignore[index]
    assert [run.payload] == chat_server.Relay._group_payloads(payloads)
    assert run.next == 26 and run.senders == frozenset({"alice"})
    # Bytes: the oldest go until under the cap, runs counted too.
    small = GroupPages(max_entries=1000, max_bytes=5 * (len(entry(1)[1]) + GroupPages.RECORD_BYTES))
    for seq in range(1, 30):
        small.add(team, "team", *entry(seq))
        assert small.bytes <= small.max_bytes
    assert small.run(team, "team", 29, 1061, 4, group_batch) is not None
    assert small.bytes <= small.max_bytes and len(small.entries) < 5
