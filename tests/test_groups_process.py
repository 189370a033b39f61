"""Groups with a real server process (issue 14): raw protocol clients
(`tests.clients.RawClient`, the client's own login, group messages built by
hand) over real UDP. Through the lossy proxy every member gets every entry
exactly once and in one order, the same for all, and every sender hears
once from each member; after `kill -9` of the server, a member who was
offline catches up on everything that was accepted."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol import (
    CONTROL_STREAM,
    GroupAccept,
    GroupAction,
    GroupChange,
    GroupDeliver,
    GroupEvent,
    GroupReached,
    GroupRequest,
    GroupResult,
    Message,
    MsgId,
    Receipts,
    Send,
    batches,
    conversation_stream,
    decode_header,
    decode_message,
    unbatch,
)
from reliability import PayloadReceived
from tests.clients import RawClient
from tests.lossy_proxy import LossyProxy
from tests.test_durability import ServerRunner

TEAM = conversation_stream("#team")


class Member:
    """A raw client in a group: it receipts every group entry as it
    arrives (its front end shows them at once) and keeps what it got."""

    def __init__(self, name: str, server: tuple[str, int]) -> None:
        self.name = name
        self.raw = RawClient(server)
        self.login = self.raw.login_retrying(name, timeout=30.0)
        self.messages: list[Message] = []
        self.next_seq = 0
        self.next_request = 0

    @property
    def instance_id(self) -> int:
        return self.login.instance_id

    def send(self, message: Message, stream: int = CONTROL_STREAM) -> None:
        self.raw.send_message(message, stream)

    def post(self, text: str) -> MsgId:
        self.next_seq += 1
        msg_id = MsgId(self.instance_id, self.next_seq)
        self.send(Send(msg_id, "#team", text), TEAM)
        return msg_id

    def request(self, action: GroupAction, *users: str) -> int:
        self.next_request += 1
        self.send(GroupRequest(self.next_request, action, "team", users), TEAM)
        return self.next_request

    def pump(self) -> bool:
        """Timers, what is due out, and what has arrived; True if anything did."""
        conn = self.raw.conn
        assert conn is not None
        now = time.monotonic()
        timer = conn.get_timer()
        if timer is not None and timer <= now:
            conn.handle_timer(now)
        got = False
        while (data := self.raw.recv_one(0)) is not None:
            got = True
            if decode_header(data).session_id != conn.session_id:
                continue
            if conn.receive_datagram(data, now):
                receipts = []
                while (event := conn.next_event()) is not None:
                    if isinstance(event, PayloadReceived):
                        for message in unbatch(decode_message(event.payload)):
                            self.messages.append(message)
                            if isinstance(message, GroupDeliver | GroupEvent):
                                receipts.append(message.server_msg_id)
                for batch in batches(receipts):  # at most BATCH_MAX ids a message
                    self.send(Receipts(tuple(batch)))
        for datagram in conn.datagrams_to_send(time.monotonic()):
            self.raw.send(datagram)
        return got

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.messages if isinstance(m, kind)]

    def entries(self) -> list[tuple[Any, ...]]:
        told: list[tuple[Any, ...]] = []
        for m in self.messages:
            if isinstance(m, GroupDeliver):
                told.append((m.group_seq, m.server_msg_id, "message", m.sender, m.text))
            elif isinstance(m, GroupEvent):
                told.append((m.group_seq, m.server_msg_id, GroupChange(m.change).label, m.by,
                             m.users))  # fmt: skip
        return told

    def close(self) -> None:
        self.raw.close()


def pump_until(members: list[Member], condition: Callable[[], bool], timeout: float,
               what: str) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        if not any([m.pump() for m in members]):
            time.sleep(0.002)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[ServerRunner]:
    server = ServerRunner(tmp_path / "server-data")
    server.start()
    yield server
    server.close()


def create_team(members: list[Member]) -> None:
    owner = members[0]
    request_id = owner.request(GroupAction.CREATE, *(m.name for m in members[1:]))
    pump_until(members, lambda: any(r.request_id == request_id for r in owner.of(GroupResult)),
               20, "the group's creation")  # fmt: skip
    assert owner.of(GroupResult)[-1].code == 0
    pump_until(members, lambda: all(m.entries() for m in members), 20, "the CREATED event")


def test_exactly_once_and_one_order_for_every_member_through_loss(runner: ServerRunner) -> None:
    """Three members post at once through 10 % loss, duplication and
    reordering both ways; a fourth is added half-way. Each member gets each
    entry once, the entries of all members agree seq for seq, nobody misses
    one meant for them, and each sender hears once from each other member."""
    with LossyProxy(runner.address, seed=14, loss=0.1, duplicate=0.05, reorder=0.1) as proxy:
        members = [Member(n, proxy.address) for n in ("alice", "bob", "carol", "dave")]
        try:
            create_team(members[:3])
            sent: dict[str, list[MsgId]] = {m.name: [] for m in members}
            for round_ in range(20):
                for member in members[:3]:
                    sent[member.name].append(member.post(f"{member.name} {round_}"))
                if round_ == 10:
                    members[1].request(GroupAction.ADD, "dave")
                for member in members:
                    member.pump()
            total = sum(len(ids) for ids in sent.values())
            pump_until(members, lambda: sum(len(m.of(GroupAccept)) for m in members) >= total,
                       60, "every GROUP_ACCEPT")  # fmt: skip
            last = max(a.group_seq for m in members for a in m.of(GroupAccept))

            def complete(m: Member) -> bool:
                own = {a.group_seq for a in m.of(GroupAccept)}
                seqs = {e[0] for e in m.entries()}
                return bool(seqs) and all(
                    s in seqs for s in range(min(seqs), last + 1) if s not in own
                )

            def everyone_has_all() -> bool:
                return all(complete(m) for m in members)

            pump_until(members, everyone_has_all, 60, "every entry at every member")

            def all_told() -> bool:
                return all(sum(len(d.by) for d in m.of(GroupReached)) >= expected(m)
                           for m in members)  # fmt: skip

            def expected(m: Member) -> int:
                return sum(a.recipients for a in m.of(GroupAccept))

            pump_until(members, all_told, 60, "every delivered-by receipt")
            for _ in range(50):
                for member in members:
                    member.pump()
                time.sleep(0.005)
        finally:
            for member in members:
                member.close()
    assert proxy.stats("up")["dropped"] > 0 and proxy.stats("down")["dropped"] > 0
    by_seq: dict[int, tuple[Any, ...]] = {}
    for member in members:
        got = member.entries()
        seqs = [e[0] for e in got]
        assert len(seqs) == len(set(seqs)), f"{member.name} got an entry twice"
        assert seqs == sorted(seqs), f"{member.name} got entries out of order"
        for entry in got:
            assert by_seq.setdefault(entry[0], entry) == entry  # one entry per seq, for all
    assert sorted(by_seq) == list(range(1, last + 1))
    for member in members:
        seqs = [e[0] for e in member.entries()]
        own = {s for s, e in by_seq.items() if e[2] == "message" and e[3] == member.name}
        assert seqs == [s for s in range(seqs[0], last + 1) if s not in own], member.name
    added = next(e for e in by_seq.values() if e[2] == "added")
    assert members[3].entries()[0] == added  # dave: nothing from before he was added
    for member in members[:3]:
        told = [(by, d.msg_id) for d in member.of(GroupReached) for by in d.by]
        assert len(told) == len(set(told)), f"{member.name} heard a receipt twice"
        accepted = {a.msg_id: a.recipients for a in member.of(GroupAccept)}
        assert set(accepted) == set(sent[member.name])
        for msg_id, recipients in accepted.items():
            assert sum(1 for _, i in told if i == msg_id) == recipients


def test_an_offline_member_catches_up_after_the_server_is_killed(runner: ServerRunner) -> None:
    """Bob is offline while alice posts; the server is killed with SIGKILL
    once every message is accepted and started again on its data: at his
    login bob gets every message, once, in order, a window at a time."""
    members = [Member(n, runner.address) for n in ("alice", "bob", "carol")]
    alice, bob, carol = members
    try:
        create_team(members)
        bob.close()
        online = [alice, carol]
        posted = [alice.post(f"m{n}") for n in range(300)]
        pump_until(online, lambda: len(alice.of(GroupAccept)) == len(posted), 60, "accepts")
        runner.restart()
        bob = Member("bob", runner.address)
        members = [alice, bob, carol]
        pump_until([bob], lambda: len(bob.of(GroupDeliver)) >= len(posted), 60,
                   "bob's catching up")  # fmt: skip
        for _ in range(30):
            bob.pump()
            time.sleep(0.01)
        assert [d.text for d in bob.of(GroupDeliver)] == [f"m{n}" for n in range(300)]
        assert [d.group_seq for d in bob.of(GroupDeliver)] == list(range(2, 302))
    finally:
        for member in members:
            member.close()
