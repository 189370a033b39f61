"""Groups on the sans-IO relay (issue 14), with a fake clock and clients
logged in by hand, on each store (memory and SQLite): one order for every
member (messages and membership changes alike), the join and removal
boundaries, who may post and read, ownership passing on, the group's end,
the error codes, the member cap, the fan-out budget, catching up after a
time offline (paged, bounded), duplicates, "delivered by" receipts for the
sender, requests sent again, and a restart of the relay on the same data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chat_server import MAILBOX_WINDOW, Relay
from protocol import (
    Deliver,
    ErrorCode,
    Fail,
    GroupAccept,
    GroupAction,
    GroupChange,
    GroupDeliver,
    GroupEvent,
    GroupInfo,
    GroupList,
    GroupReached,
    GroupRequest,
    GroupResult,
    Logout,
    MsgId,
    Receipt,
    conversation_stream,
    decode_message,
    unbatch,
)
from reliability import PayloadReceived
from server_records import User
from server_store import MessageStore, ServerStore
from tests.conftest import test_config as server_config
from tests.test_bounds import Client
from tests.test_seams import WALL, SeamWorld


class GroupWorld(SeamWorld):
    """`SeamWorld` whose clients receipt group entries as they receipt
    DELIVERs (unless told not to: `holding`), and send group requests."""

    def __init__(self, store: MessageStore, **overrides: Any) -> None:
        super().__init__(store, **overrides)
        self.holding: set[str] = set()  # names whose clients show nothing (no receipts)
        self._request_ids = 0

    def _to_clients(self, out: list[tuple[bytes, Any]]) -> None:
        for data, addr in out:
            client = self._by_addr.get(addr)
            if client is None or not client.conn.receive_datagram(data, self.now):
                continue
            for event in client.conn.take_events():
                if isinstance(event, PayloadReceived):
                    for message in unbatch(decode_message(event.payload)):
                        client.messages.append(message)
                        if (
                            isinstance(message, Deliver | GroupDeliver | GroupEvent)
                            and client.name not in self.holding
                        ):
                            client.send(Receipt(message.server_msg_id))

    def request(self, client: Client, action: GroupAction, group: str,
                *users: str) -> int:  # fmt: skip
        self._request_ids += 1
        stream = 0 if action == GroupAction.LIST else conversation_stream("#" + group)
        client.send(GroupRequest(self._request_ids, action, group, users), stream)
        return self._request_ids

    def result(self, client: Client, request_id: int, steps: int = 300) -> GroupResult:
        self.run_until(lambda: any(r.request_id == request_id for r in client.of(GroupResult)),
                       steps, f"{client.name}'s answer to request {request_id}")  # fmt: skip
        answers: list[GroupResult] = client.of(GroupResult)
        return [r for r in answers if r.request_id == request_id][-1]

    def post(self, client: Client, group: str, text: str, seq: int) -> MsgId:
        # The ids of the session's own client instance (ScriptedLogin's 9).
        return self.send(client, "#" + group, text, seq, instance=9)

    def logout(self, client: Client) -> None:
        client.send(Logout())
        self.run_until(lambda: client.conn.session_id not in self.relay.sessions, 200,
                       f"{client.name} logged out")  # fmt: skip
        self.clients.pop(client.name, None)

    def settle_all(self, steps: int = 30) -> None:
        for _ in range(steps):
            self.step()


def told_by(client: Client) -> list[tuple[str, MsgId]]:
    """The "delivered by" a sender was told: (member, message id), each time."""
    return [(by, m.msg_id) for m in client.of(GroupReached) for by in m.by]


def entries(client: Client, group: str = "team") -> list[tuple[Any, ...]]:
    """The group's entries as the client got them: (seq, what), in order."""
    told: list[tuple[Any, ...]] = []
    for m in client.messages:
        if isinstance(m, GroupDeliver) and m.group == group:
            told.append((m.group_seq, "message", m.sender, m.text))
        elif isinstance(m, GroupEvent) and m.group == group:
            told.append((m.group_seq, GroupChange(m.change).label, m.by, m.users))
    return told


def texts(client: Client, group: str = "team") -> list[str]:
    return [e[3] for e in entries(client, group) if e[1] == "message"]


def created(world: GroupWorld, owner: Client, *others: str, group: str = "team") -> None:
    answer = world.result(owner, world.request(owner, GroupAction.CREATE, group, *others))
    assert answer.code == 0, answer


# --- the basics ----------------------------------------------------------------


def test_a_group_is_created_and_its_members_talk(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice, bob, carol = (world.login(n) for n in ("alice", "bob", "carol"))
    created(world, alice, "bob", "carol")
    world.run_until(lambda: all(entries(c) for c in (alice, bob, carol)), 100, "CREATED")
    for client in (alice, bob, carol):
        assert entries(client)[0] == (1, "created", "alice", ("alice", "bob", "carol"))
    # The creator hears of the change in the group's order before its answer.
    kinds = [type(m) for m in alice.messages if isinstance(m, GroupEvent | GroupResult)]
    assert kinds == [GroupEvent, GroupResult]
    msg_id = world.post(bob, "team", "hi all", 1)
    world.run_until(lambda: texts(alice) == ["hi all"] and texts(carol) == ["hi all"], 200,
                    "the message at every other member")  # fmt: skip
    assert texts(bob) == []  # the sender is not sent their own message
    accept = bob.of(GroupAccept)
    assert [(a.msg_id, a.group_seq, a.recipients) for a in accept] == [(msg_id, 2, 2)]
    deliver = alice.of(GroupDeliver)[0]
    assert (deliver.msg_id, deliver.sender, deliver.sent_ms) == (msg_id, "bob", int(WALL * 1000))
    # One "delivered by" per other member, each naming who.
    world.run_until(lambda: len(told_by(bob)) == 2, 200, "receipts")
    world.settle_all()
    assert sorted(told_by(bob)) == [("alice", msg_id), ("carol", msg_id)]


def test_every_member_sees_one_order_of_messages_and_membership_changes(
    store: MessageStore,
) -> None:
    """Members post at once, members are added and removed in between: the
    entries each member got are one sequence (numbers rising by one across
    what they may see, their own messages left out), the same for all."""
    world = GroupWorld(store)
    names = ("alice", "bob", "carol", "dave", "erin")
    clients = {n: world.login(n) for n in names}
    created(world, clients["alice"], "bob", "carol")
    seq = 1
    for round_ in range(6):
        for name in ("alice", "bob", "carol"):
            seq += 1
            world.post(clients[name], "team", f"{name} {round_}", seq)
        if round_ == 1:
            world.request(clients["bob"], GroupAction.ADD, "team", "dave", "erin")
        if round_ == 3:
            world.request(clients["alice"], GroupAction.REMOVE, "team", "erin")
        world.step()
    world.settle_all(100)
    group = world.relay.groups.get("team")
    assert group is not None
    full: dict[int, tuple[Any, ...]] = {}
    for name, client in clients.items():
        got = entries(client)
        seqs = [e[0] for e in got]
        assert seqs == sorted(set(seqs)), (name, seqs)  # rising, each once
        for entry in got:
            assert full.setdefault(entry[0], entry) == entry  # the same entry at a seq for all
    assert sorted(full) == list(range(1, group.seq + 1))  # every entry reached someone
    for name, client in clients.items():
        seen: list[int] = [e[0] for e in entries(client)]
        own = {s for s, e in full.items() if e[1] == "message" and e[2] == name}
        span = [s for s in range(seen[0], seen[-1] + 1) if s not in own]
        assert seen == span, (name, seen)  # no gap within what they may see
    # dave joined later: nothing from before his ADDED entry.
    added = next(s for s, e in full.items() if e[1] == "added")
    assert entries(clients["dave"])[0] == (added, "added", "bob", ("dave", "erin"))
    # erin was removed: the REMOVED entry is the last thing she got.
    removed = next(s for s, e in full.items() if e[1] == "removed")
    assert entries(clients["erin"])[-1] == (removed, "removed", "alice", ("erin",))
    assert max(e[0] for e in entries(clients["alice"])) > removed + 2  # the group went on


def test_a_non_member_can_neither_post_nor_read(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice, _, mallory = world.login("alice"), world.login("bob"), world.login("mallory")
    created(world, alice, "bob")
    msg_id = world.post(mallory, "team", "let me in", 1)
    world.run_until(lambda: bool(mallory.of(Fail)), 100, "the FAIL")
    assert [(f.msg_id, f.reason) for f in mallory.of(Fail)] == [(msg_id, ErrorCode.NOT_A_MEMBER)]
    answer = world.result(mallory, world.request(mallory, GroupAction.MEMBERS, "team"))
    assert answer.code == ErrorCode.NOT_A_MEMBER
    assert not mallory.of(GroupInfo)
    answer = world.result(mallory, world.request(mallory, GroupAction.ADD, "team", "mallory"))
    assert answer.code == ErrorCode.NOT_A_MEMBER
    world.post(mallory, "nosuch", "anyone?", 2)
    world.run_until(lambda: len(mallory.of(Fail)) == 2, 100, "the second FAIL")
    assert mallory.of(Fail)[1].reason == ErrorCode.NO_SUCH_GROUP
    world.settle_all()
    assert not entries(mallory) and world.relay.groups.get("team") is not None
    assert len(world.relay.groups.get("team").members) == 2  # type: ignore[union-attr]


def test_the_error_codes_of_group_requests(store: MessageStore) -> None:
    world = GroupWorld(store, max_group_members=3)
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    world.login("dave")
    created(world, alice, "bob")

    def code(client: Client, action: GroupAction, group: str, *users: str) -> int:
        return world.result(client, world.request(client, action, group, *users)).code

    assert code(carol, GroupAction.CREATE, "TEAM") == ErrorCode.GROUP_EXISTS  # names' rules
    assert code(carol, GroupAction.CREATE, "bad name!") == ErrorCode.INVALID_NAME
    assert code(carol, GroupAction.CREATE, "crew", "nobody") == ErrorCode.NO_SUCH_USER
    assert code(carol, GroupAction.CREATE, "crew", "alice", "bob", "dave") == ErrorCode.GROUP_FULL
    assert code(alice, GroupAction.ADD, "team", "carol", "dave") == ErrorCode.GROUP_FULL
    assert code(bob, GroupAction.REMOVE, "team", "alice") == ErrorCode.NOT_OWNER
    assert code(alice, GroupAction.REMOVE, "team", "carol") == ErrorCode.NOT_A_MEMBER
    assert code(carol, GroupAction.LEAVE, "team") == ErrorCode.NOT_A_MEMBER
    assert code(carol, GroupAction.MEMBERS, "ghosts") == ErrorCode.NO_SUCH_GROUP
    too_many = tuple(f"u{i}" for i in range(257))
    assert code(alice, GroupAction.ADD, "team", *too_many) == ErrorCode.TOO_LONG
    assert code(alice, GroupAction.ADD, "team", "carol") == 0  # the third member: the cap
    assert code(alice, GroupAction.ADD, "team", "carol") == 0  # already in: nothing to do
    world.settle_all()
    added = [e for e in entries(alice) if e[1] == "added"]
    assert added == [(2, "added", "alice", ("carol",))]  # one change, not two


def test_members_and_the_users_groups_in_pages(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice, bob = world.login("alice"), world.login("bob")
    created(world, alice, "bob")
    created(world, bob, group="solo")
    request_id = world.request(bob, GroupAction.MEMBERS, "team")
    world.run_until(lambda: bool(bob.of(GroupInfo)), 100, "GROUP_INFO")
    assert bob.of(GroupInfo) == [GroupInfo(request_id, "team", "alice", ("alice", "bob"), False)]
    request_id = world.request(bob, GroupAction.LIST, "")
    world.run_until(lambda: bool(bob.of(GroupList)), 100, "GROUP_LIST")
    assert bob.of(GroupList) == [GroupList(request_id, ("team", "solo"), False)]


def test_a_large_group_is_listed_in_pages(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice = world.login("alice")
    relay = world.relay
    account = relay.users["alice"].account
    for n in range(299):  # accounts without sessions: the members are names here
        relay.users[f"u{n}"] = User(f"u{n}", f"u{n}", account)
    created(world, alice, *(f"u{n}" for n in range(200)))
    assert (
        world.result(
            alice,
            world.request(alice, GroupAction.ADD, "team", *(f"u{n}" for n in range(200, 299))),
        ).code
        == 0
    )
    request_id = world.request(alice, GroupAction.MEMBERS, "team")
    world.run_until(lambda: any(not i.more for i in alice.of(GroupInfo)), 200, "the last page")
    pages = [i for i in alice.of(GroupInfo) if i.request_id == request_id]
    assert [len(p.members) for p in pages] == [256, 44] and pages[0].more
    assert [m for p in pages for m in p.members] == ["alice", *(f"u{n}" for n in range(299))]


# --- joining, leaving, owning, ending ------------------------------------------


def test_ownership_passes_to_the_longest_standing_member(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice, bob, carol, dave = (world.login(n) for n in ("alice", "bob", "carol", "dave"))
    created(world, alice, "bob")
    assert world.result(bob, world.request(bob, GroupAction.ADD, "team", "carol", "dave")).code == 0
    assert world.result(alice, world.request(alice, GroupAction.LEAVE, "team")).code == 0
    world.settle_all()
    for client in (bob, carol, dave):
        assert entries(client)[-2:] == [(3, "left", "alice", ()), (4, "owner", "alice", ("bob",))]
    assert entries(alice)[-1] == (3, "left", "alice", ())  # and nothing after
    assert world.relay.groups.get("team").owner == "bob"  # type: ignore[union-attr]
    # The new owner removes; the others may not.
    assert world.result(carol, world.request(carol, GroupAction.REMOVE, "team", "dave")).code == (
        ErrorCode.NOT_OWNER
    )
    assert world.result(bob, world.request(bob, GroupAction.REMOVE, "team", "dave")).code == 0
    request_id = world.request(carol, GroupAction.MEMBERS, "team")
    world.run_until(lambda: bool(carol.of(GroupInfo)), 100, "GROUP_INFO")
    assert carol.of(GroupInfo) == [GroupInfo(request_id, "team", "bob", ("bob", "carol"), False)]


def test_a_group_ends_with_its_last_member_and_its_name_is_free(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice, bob = world.login("alice"), world.login("bob")
    created(world, alice, "bob")
    world.post(bob, "team", "bye", 1)
    assert world.result(bob, world.request(bob, GroupAction.LEAVE, "team")).code == 0
    answer = world.result(alice, world.request(alice, GroupAction.LEAVE, "team"))
    assert answer.code == 0 and "ended" in answer.message
    assert world.relay.groups.get("team") is None
    assert entries(alice)[-1][1:] == ("left", "alice", ())
    # A new group of the same name starts afresh: nothing of the old one;
    # its seqs go on after the old one's last (alice's LEFT, 4).
    created(world, bob, "alice")
    world.settle_all()
    assert entries(bob)[-1] == (5, "created", "bob", ("bob", "alice"))
    assert texts(alice).count("bye") == 1


def test_a_removed_member_gets_nothing_after_the_removal_even_offline(
    store: MessageStore,
) -> None:
    """Erin is offline when she is removed: at her next login she gets
    what came before (and the removal), nothing after."""
    world = GroupWorld(store)
    alice, _, erin = world.login("alice"), world.login("bob"), world.login("erin")
    created(world, alice, "bob", "erin")
    world.settle_all()
    world.logout(erin)
    world.post(alice, "team", "before", 1)
    assert world.result(alice, world.request(alice, GroupAction.REMOVE, "team", "erin")).code == 0
    world.post(alice, "team", "after", 2)
    world.settle_all()
    erin = world.login("erin")
    world.settle_all(60)
    assert entries(erin) == [(2, "message", "alice", "before"), (3, "removed", "alice", ("erin",))]
    world.post(alice, "team", "later still", 3)
    world.settle_all()
    assert len(entries(erin)) == 2
    group = world.relay.groups.get("team")
    assert group is not None and "erin" not in group.former  # caught up: forgotten


# --- offline members, duplicates, receipts -----------------------------------------


def test_an_offline_member_catches_up_in_order_a_window_at_a_time(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice, bob = world.login("alice"), world.login("bob")
    created(world, alice, "bob")
    world.settle_all()
    world.logout(bob)
    count = MAILBOX_WINDOW * 2 + 40
    for n in range(count):
        world.post(alice, "team", f"m{n}", n + 1)
        if n % 50 == 0:
            world.step()
    world.run_until(lambda: len(alice.of(GroupAccept)) == count, 2000, "every GROUP_ACCEPT")
    world.holding.add("bob")  # bob's client shows nothing for now: no receipts
    bob = world.login("bob")
    world.settle_all(100)
    session = world.session_of(bob)
    assert session.group_mail.count <= MAILBOX_WINDOW  # bounded: the rest waits on the disk
    assert texts(bob) == [f"m{n}" for n in range(len(texts(bob)))]
    assert len(texts(bob)) < count
    world.holding.discard("bob")
    for message in bob.of(GroupDeliver):  # it shows them now
        bob.send(Receipt(message.server_msg_id))
    world.run_until(lambda: len(texts(bob)) == count, 3000, "all of them")
    assert texts(bob) == [f"m{n}" for n in range(count)]
    world.settle_all()
    member = world.relay.groups.get("team").members["bob"]  # type: ignore[union-attr]
    assert member.cursor == count + 1  # one number for all he has


def test_a_message_sent_again_is_taken_once(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice, bob = world.login("alice"), world.login("bob")
    created(world, alice, "bob")
    world.post(alice, "team", "once", 1)
    world.post(alice, "team", "once", 1)  # a retry before the commit
    world.run_until(lambda: len(alice.of(GroupAccept)) == 2, 200, "two answers")
    world.settle_all()
    world.post(alice, "team", "once", 1)  # and after it: the store's dedup keys
    world.post(alice, "team", "not once", 1)  # the id again, other content
    world.run_until(lambda: len(alice.of(GroupAccept)) == 3 and bool(alice.of(Fail)), 200,
                    "answers")  # fmt: skip
    world.settle_all()
    assert {(a.server_msg_id, a.group_seq, a.recipients) for a in alice.of(GroupAccept)} == {
        (alice.of(GroupAccept)[0].server_msg_id, 2, 1)
    }
    assert [f.reason for f in alice.of(Fail)] == [ErrorCode.DUPLICATE_ID]
    assert texts(bob) == ["once"]


def test_delivered_by_receipts_wait_for_an_offline_sender(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    created(world, alice, "bob", "carol")
    world.settle_all()
    world.holding.update({"bob", "carol"})
    ids = [world.post(alice, "team", f"t{n}", n + 1) for n in range(3)]
    world.run_until(lambda: len(alice.of(GroupAccept)) == 3, 200, "accepts")
    world.logout(alice)
    world.holding.clear()
    for client in (bob, carol):
        for message in client.of(GroupDeliver):
            client.send(Receipt(message.server_msg_id))
    world.settle_all()
    alice = world.login("alice")
    world.run_until(lambda: len(told_by(alice)) == 6, 300, "the receipts worked out")
    world.settle_all()
    told = sorted(told_by(alice))
    assert told == sorted((by, i) for by in ("bob", "carol") for i in ids)  # each once
    alice_again = world.login("alice")  # acked: not told again
    world.settle_all()
    assert not alice_again.of(GroupReached)


def test_a_request_sent_again_is_answered_again_and_done_once(store: MessageStore) -> None:
    world = GroupWorld(store)
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    created(world, alice, "bob")
    request = GroupRequest(99, GroupAction.ADD, "team", ("carol",))
    alice.send(request, conversation_stream("#team"))
    world.result(alice, 99)
    alice = world.login("alice")  # a new session of the same client instance
    alice.send(request, conversation_stream("#team"))
    assert world.result(alice, 99).code == 0
    world.settle_all()
    assert [e for e in entries(carol) if e[1] == "added"] == [(2, "added", "alice", ("carol",))]
    assert [e[0] for e in entries(bob)] == [1, 2]


def test_the_fan_out_budget_withholds_and_loses_nothing(store: MessageStore) -> None:
    """A sender over the copies-per-second budget has their messages wait
    (acks withheld); every message arrives, no faster than the budget."""
    world = GroupWorld(store, max_fanout_rate=20.0, max_fanout_burst=20.0)
    names = [f"m{n}" for n in range(10)]
    alice = world.login("alice")
    members = [world.login(n) for n in names]
    created(world, alice, *names)
    world.settle_all()
    start = world.now
    text = "x" * 700  # one message per datagram: the budget is checked per datagram
    for n in range(20):  # 10 copies each: 200 copies, ten seconds of budget
        world.post(alice, "team", f"{n} {text}", n + 1)
        world.step()
    world.run_until(lambda: all(len(texts(m)) == 20 for m in members), 5000, "every copy")
    assert world.relay.stats["withheld_fanout"] > 0
    # The last message is taken once the debt of the others (beyond the
    # burst) is paid: no sooner than the rate allows (give or take a
    # message: the budget is checked per datagram). Unlimited, it takes 0.2 s.
    assert world.now - start >= (190 - 20 - 20) / 20.0
    assert all(texts(m) == [f"{n} {text}" for n in range(20)] for m in members)


def test_groups_and_cursors_survive_a_restart(tmp_path: Path) -> None:
    """The relay is rebuilt on the same data: groups, members, owner and
    each member's cursor come back; an offline member catches up, and a
    request answered before the restart is answered again, not redone."""
    disk = ServerStore(tmp_path / "data")
    disk.start()
    world = GroupWorld(disk)
    alice, bob, _ = world.login("alice"), world.login("bob"), world.login("carol")
    created(world, alice, "bob", "carol")
    world.settle_all()
    world.logout(bob)
    world.post(alice, "team", "while bob was away", 1)
    request = GroupRequest(7, GroupAction.REMOVE, "team", ("carol",))
    alice.send(request, conversation_stream("#team"))
    world.result(alice, 7)
    world.settle_all()
    disk.close()

    disk = ServerStore(tmp_path / "data")
    disk.start()
    try:
        world = GroupWorld(disk)
        group = world.relay.groups.get("team")
        assert group is not None and list(group.members) == ["alice", "bob"]
        assert group.owner == "alice" and group.seq == 3
        bob = world.login("bob")
        world.settle_all(60)
        assert entries(bob) == [(2, "message", "alice", "while bob was away"),
                                (3, "removed", "alice", ("carol",))]  # fmt: skip
        alice = world.login("alice")
        alice.send(request, conversation_stream("#team"))
        assert world.result(alice, 7).code == 0
        world.settle_all()
        assert world.relay.groups.get("team").seq == 3  # type: ignore[union-attr]
    finally:
        disk.close()


def test_a_relay_without_groups_loads_as_before() -> None:
    relay = Relay(server_config(None))
    assert len(relay.groups) == 0
