"""Groups' loose ends (issue 14), on the sans-IO relay with a fake clock:
a sender's own group messages reach their other client instance (a second
device logging in later sees them in the group's order, as its own), and
the window shows such a message as its own; a member whose account is
deleted before they have a message is counted out of its "of N" (the
sender is told, now or at its next login, after a restart too), with the
clients' real cores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chat_server import ServerConfig
from client_core import AccountDeleted, GroupChanged, RecipientsChanged, StatusChanged
from client_store import ClientStore, read_group_receipts
from protocol import GroupAction, GroupDeliver, MsgId, Welcome
from server_store import MessageStore, ServerStore
from tests.clients import ScriptedLogin, preauth_frame
from tests.conftest import PASSWORD
from tests.test_accounts import DiskNet
from tests.test_bounds import Client, World
from tests.test_client_core import Net
from tests.test_groups_client import Member, add, login
from tests.test_groups_relay import GroupWorld, created, entries


class DevicesWorld(GroupWorld):
    """`GroupWorld` whose users may log in from another client instance."""

    def login_instance(self, name: str, instance: int) -> Client:
        addr = (f"198.51.100.{len(self._by_addr) + 1}", 5000)
        login = ScriptedLogin(name, PASSWORD, instance, self.now)
        hello = self.relay.handle_datagram(login.hello, addr, self.now)
        login.take([d for d, _ in hello], self.now)
        self.relay.receive_datagram(login.request, addr, self.now)
        self.sync()
        out = self.relay.datagrams_to_send(self.now)
        assert isinstance(login.take([d for d, _ in out], self.now), Welcome), login.answer
        assert login.conn is not None
        client = self.clients[name] = self._by_addr[addr] = Client(name, addr, login.conn)
        self._to_clients([(d, a) for d, a in out if preauth_frame(d) is None])
        self.step()
        return client


def own(client: Client) -> list[tuple[int, str]]:
    return [(m.group_seq, m.text) for m in client.of(GroupDeliver) if m.sender == client.name]


def test_a_second_device_gets_its_users_own_messages_in_order(store: MessageStore) -> None:
    """alice's phone (instance 9) posts before it has bob's message before
    it, and goes away; her laptop (instance 10) logs in later and reads the
    group from her cursor: bob's message, then hers, in the group's order
    (it got only bob's: her own were passed over for every instance)."""
    world = DevicesWorld(store)
    alice, bob = world.login("alice"), world.login("bob")
    created(world, alice, "bob")
    world.settle_all()
    world.holding.add("alice")  # the phone shows nothing more: no receipts
    world.post(bob, "team", "from bob", 1)
    world.run_until(lambda: len(alice.of(GroupDeliver)) == 1, 200, "bob's message")
    world.post(alice, "team", "from alice's phone", 1)
    world.step()
    world.post(bob, "team", "bob again", 2)
    world.settle_all()
    assert own(alice) == []  # the instance that sent it is not sent it
    world.logout(alice)
    world.holding.clear()
    laptop = world.login_instance("alice", 10)
    world.run_until(lambda: len(entries(laptop)) == 3, 300, "the laptop's catch-up")
    assert [(e[0], e[2], e[3]) for e in entries(laptop)] == [
        (2, "bob", "from bob"), (3, "alice", "from alice's phone"), (4, "bob", "bob again"),
    ]  # fmt: skip
    # Receipted there like any entry: the phone, back, reads nothing again.
    world.settle_all()
    world.logout(laptop)
    phone = world.login("alice")
    world.settle_all()
    assert entries(phone) == []


def test_a_second_device_online_gets_its_users_message_at_once(tmp_path: Path) -> None:
    """alice's phone sends; before the message is committed her laptop
    logs in (taking the session over): the laptop is handed it like a copy
    (it was passed over for every instance)."""
    disk = ServerStore(tmp_path / "data")
    disk.start()
    try:
        world = DevicesWorld(disk)
        alice, _ = world.login("alice"), world.login("bob")
        created(world, alice, "bob")
        world.settle_all()
        world.post(alice, "team", "sent from the phone", 1)
        World.step(world)  # the SEND reaches the relay; its commit is not waited for
        laptop = world.login_instance("alice", 10)
        world.settle_all()
        assert own(laptop) == [(2, "sent from the phone")]
        assert own(alice) == []
    finally:
        disk.close()


def test_the_window_shows_its_users_message_from_elsewhere_as_its_own() -> None:
    from client_core import MessageReceived
    from client_window import ChatWindow

    window: Any = ChatWindow.__new__(ChatWindow)
    window.username = "Alice"
    line = ChatWindow._own_from_elsewhere(window, "hi", 1_000_000, "9-1")
    assert (line.kind, line.who, line.state) == ("own", "Alice", "accepted")
    assert window._mine("alice") and not window._mine("bob")
    assert MessageReceived("alice", "hi", 5, 0, "9-1", "team").group == "team"


# --- a member whose account is deleted before they have a message ---------------------


def deletion_world(net: Net) -> tuple[Member, Member, Member, str]:
    """alice, bob, carol in #team; carol's client shows nothing (no receipts)
    when alice posts; bob has the message."""
    alice, bob, carol = login(net, "alice", "bob", "carol")
    alice.core.group_request(GroupAction.CREATE, "team", ("bob", "carol"))
    net.run(lambda: len(carol.of(GroupChanged)) == 1, "carol told of #team")
    carol.shows = False
    msg = alice.core.send("before carol goes", net.now, to="#team")
    net.run(lambda: ("delivered", "bob") in states(alice, msg), "bob has it")
    return alice, bob, carol, msg


def states(member: Member, msg: str) -> list[tuple[str, str | None]]:
    return [(e.state, e.by) for e in member.of(StatusChanged) if e.id == msg]


def test_a_member_deleted_before_having_a_message_is_counted_out() -> None:
    """Carol deletes her account without having alice's message: alice is
    told she never will ("1 of 2" becomes "1 of 1", delivered to all), once,
    and the message stops waiting in alice's outbox (it waited for ever)."""
    net = Net(ServerConfig(iterations=4096, key_workers=0, name_quarantine=0.0))
    alice, _, carol, msg = deletion_world(net)
    assert [e.recipients for e in alice.of(StatusChanged) if e.id == msg and e.recipients] == [2]
    carol.core.delete_account("carol-pw")
    net.run(lambda: bool(alice.of(RecipientsChanged)), "carol counted out")
    net.settle(2.0)
    (counted,) = alice.of(RecipientsChanged)
    assert counted.to_json() == {"event": "recipients", "id": msg, "group": "team",
                                 "recipients": 1, "gone": "carol"}  # fmt: skip
    assert MsgId(alice.core.instance_id, 1) not in alice.core.outbox
    assert states(alice, msg) == [("sending", None), ("accepted", None), ("delivered", "bob")]
    group = net.relay.groups.get("team")
    assert group is not None and group.owed == {} and group.former == {}  # told: forgotten


def test_a_sender_away_is_told_after_a_restart(tmp_path: Path) -> None:
    """The same with alice away while carol's account goes and the server
    restarts: her next login hears it, and her store's N is 1."""
    net = DiskNet(tmp_path / "data", ServerConfig(iterations=4096, key_workers=0,
                                                  name_quarantine=0.0))  # fmt: skip
    store = ClientStore(tmp_path / "alice", "alice")
    try:
        _, carol = login(net, "bob", "carol")
        alice = add(net, "alice", store=store)
        net.run(lambda: alice.logged_in, "alice in")
        alice.core.group_request(GroupAction.CREATE, "team", ("bob", "carol"))
        net.run(lambda: len(carol.of(GroupChanged)) == 1, "carol told of #team")
        carol.shows = False
        msg = alice.core.send("before carol goes", net.now, to="#team")
        net.run(lambda: ("delivered", "bob") in states(alice, msg), "bob has it")
        alice.core.abort()
        del net.clients[alice.addr]
        carol.core.delete_account("carol-pw")
        net.run(lambda: bool(carol.of(AccountDeleted)), "carol's account deleted")
        net.restart()
        group = net.relay.groups.get("team")
        assert group is not None and [m.gone for m in group.former.values()] == [True]
        alice = add(net, "alice", store=store)
        net.run(lambda: bool(alice.of(RecipientsChanged)), "alice told at her login")
        net.settle(2.0)
        assert [e.recipients for e in alice.of(RecipientsChanged)] == [1]
        found = read_group_receipts(store.path, "alice", [msg])
        assert found == {msg: (1, ("bob",))}  # the gone one is no "delivered by"
    finally:
        store.close()
        net.store.close()


def test_the_terminal_says_a_member_was_counted_out() -> None:
    from chat_client import event_to_json, event_to_text

    event = RecipientsChanged("9-1", "#team", 1, "carol")
    assert event_to_text(event) == (
        "  carol's account is gone: message 9-1 now goes to 1 member(s)",
        False,
    )
    assert event_to_json(event) == {"event": "recipients", "id": "9-1", "group": "team",
                                    "recipients": 1, "gone": "carol"}  # fmt: skip
