"""Bounds on presence, contacts, watches and dedup marks (the issue-12 review's
findings F2, F3 and F6): what a session is told of others' presence stays
under its output cap, the relay's per-instance marks and contact lists do
not grow with what a sender chooses, and awaited names cannot be filled by a
few users. In memory, on the relay of test_bounds's `World` (fake clock,
clients logged in by hand)."""

from __future__ import annotations

from typing import Any

import pytest

import chat_server
from chat_server import Relay
from protocol import (
    Accept,
    Accepts,
    Deliver,
    Logout,
    MsgId,
    Presence,
    Send,
    Watch,
    conversation_stream,
    encode_message,
)
from server_store import MemoryStore, Op, Read
from tests.test_bounds import Client, World

INSTANCE = 9  # the instance id `World.login` logs in with


def last_presence(client: Client) -> dict[str, bool]:
    """The online/offline view `client` ends with: the last PRESENCE of each user."""
    view: dict[str, bool] = {}
    for presence in client.of(Presence):
        view[presence.user] = presence.online
    return view


def accepted(client: Client) -> list[tuple[MsgId, int]]:
    """Every (message id, server id) the relay accepted for `client`, in order."""
    items: list[tuple[MsgId, int]] = []
    for message in client.messages:
        if isinstance(message, Accept):
            items.append((message.msg_id, message.server_msg_id))
        elif isinstance(message, Accepts):
            items.extend(message.items)
    return items


def come_and_go(world: World, name: str) -> None:
    """`name` logs in and out again (a LOGOUT: its contacts hear it leave)."""
    client = world.login(name)
    client.send(Logout())
    world.step()


# --- F2: presence to a session that never acks --------------------------------


def test_presence_to_a_session_that_never_acks_stays_under_the_cap_and_ends_right() -> None:
    """The review's attack: the victim never acks and WATCHes accounts the
    attacker logs in and out over and over. The old relay queued a PRESENCE
    per change with no cap (468 KiB against 256 KiB after 60,000 logins);
    now at most one per user is unacked, later changes replace the one due,
    and once the victim acks it hears the last state of each."""
    cap = 256
    world = World(max_unacked_output=cap)
    names = [f"pp{i}" for i in range(8)]
    for name in names:
        come_and_go(world, name)
    victim = world.login("victim")
    victim.acks = False
    world.watch_output(victim)
    for name in names:
        victim.send(Watch(name))
    world.step()
    rounds = 15
    for _ in range(rounds):
        for name in names:
            come_and_go(world, name)
    world.login("pp0")  # one ends online
    world.step()
    session = world.session_of(victim)
    presence = len(encode_message(Presence("pp0", True)))
    # The old relay's output: two notices per login, all queued.
    assert 2 * rounds * len(names) * presence > 4 * cap
    assert max(world.session_output) <= cap + presence
    assert session.conn.unacked_bytes <= cap + presence
    assert len(session.presence_due) <= len(names)  # one per user, at most

    victim.acks = True
    world.run_until(lambda: not session.presence_due, 2000, "the due presence sent")
    world.run_until(lambda: not session.presence_sent, 2000, "every presence acked")
    expected = {name: False for name in names} | {"pp0": True}
    assert last_presence(victim) == expected


def test_presence_changes_reach_an_acking_client_in_order() -> None:
    """An honest client that acks hears every change it has time to hear,
    and always the last: coalescing only folds changes while one is unacked."""
    world = World()
    world.login("bob")
    alice = world.login("alice")
    alice.send(Watch("bob"))
    world.step()
    assert last_presence(alice) == {"bob": True}
    world.clients["bob"].send(Logout())
    world.run_until(lambda: last_presence(alice) == {"bob": False}, 200, "bob offline")
    world.login("bob")
    world.run_until(lambda: last_presence(alice) == {"bob": True}, 200, "bob online again")
    assert [p.online for p in alice.of(Presence)] == [True, False, True]


# --- F3: instance ids and contacts ------------------------------------------------


def test_send_ids_of_instances_not_logged_in_make_no_marks_in_memory() -> None:
    """The old relay kept a high-water mark for every instance id a SEND
    named (44,505 in 20 s from 10 accounts, all loaded at each start). Now
    only the logged-in instance (and instances it already has marks for)
    get one; a SEND of another instance (a copied profile resending its
    outbox) is still taken, and its retry is answered from the disk, not
    delivered twice."""
    world = World()
    bob = world.login("bob")
    mallory = world.login("mallory")
    mallory.send(Send(MsgId(INSTANCE, 1), "bob", "mine"), conversation_stream("bob"))
    for instance in range(1000, 1100):
        send = Send(MsgId(instance, 1), "bob", f"from instance {instance}")
        mallory.send(send, conversation_stream("bob"))
    world.run_until(lambda: len(accepted(mallory)) == 101, 500, "every SEND accepted")
    marks = [key for key in world.relay._hwm if key[0] == "mallory"]
    assert marks == [("mallory", INSTANCE)]
    assert len(bob.of(Deliver)) == 101

    # A retry of a foreign instance's message: the same ACCEPT, no second copy.
    retry = Send(MsgId(1000, 1), "bob", "from instance 1000")
    first = next(a for a in accepted(mallory) if a[0] == retry.msg_id)
    mallory.send(retry, conversation_stream("bob"))
    world.run_until(lambda: len(accepted(mallory)) == 102, 500, "the retry answered")
    assert accepted(mallory)[-1] == first
    world.step()
    assert len(bob.of(Deliver)) == 101


class HeldReads(MemoryStore):
    """A store in memory whose reads wait until `answer` (the disk's are
    answered later, in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Op, Any]] = []

    def submit(self, op: Op, then: Any = None) -> None:
        if isinstance(op, Read):
            self.held.append((op, then))
        else:
            super().submit(op, then)

    def answer(self, count: int) -> None:
        for op, then in self.held[:count]:
            super().submit(op, then)
        del self.held[:count]


def test_a_new_message_never_overtakes_one_being_looked_up() -> None:
    """Without a mark (a session's first messages), SENDs are looked up on
    the disk; once the first is found new it makes the mark, and a later
    SEND must still wait behind the lookups in flight, not overtake them."""
    world = World()
    store = HeldReads()
    world.relay = Relay(world.relay.config, store=store)
    bob = world.login("bob")
    mallory = world.login("mallory")
    for seq in (1, 2):
        mallory.send(Send(MsgId(INSTANCE, seq), "bob", f"m{seq}"), conversation_stream("bob"))
    world.step()
    assert len(store.held) == 2
    store.answer(1)  # m1 is new: taken, and the mark is made
    mallory.send(Send(MsgId(INSTANCE, 3), "bob", "m3"), conversation_stream("bob"))
    world.step()
    store.answer(len(store.held))
    world.run_until(lambda: len(bob.of(Deliver)) == 3, 200, "all three delivered")
    assert [d.text for d in bob.of(Deliver)] == ["m1", "m2", "m3"]


def test_a_users_contacts_are_capped_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each new recipient added a contact, never removed: now at most
    MAX_CONTACTS, the oldest forgotten; the ones kept still hear presence."""
    monkeypatch.setattr(chat_server, "MAX_CONTACTS", 4, raising=False)
    world = World()
    names = [f"r{i}" for i in range(7)]
    for name in names:
        world.login(name)
    mallory = world.login("mallory")
    for seq, name in enumerate(names, 1):
        mallory.send(Send(MsgId(INSTANCE, seq), name, "hi"), conversation_stream(name))
        world.step()
    world.run_until(lambda: len(accepted(mallory)) == len(names), 500, "all accepted")
    user = world.relay.users["mallory"]
    assert list(user.contacts) == names[-4:]
    mallory.send(Logout())
    world.step()
    world.step()
    for name in names[-4:]:
        assert last_presence(world.clients[name])["mallory"] is False
    for name in names[:-4]:  # forgotten: told she came, not that she left
        assert last_presence(world.clients[name])["mallory"] is True


# --- F6: names awaited before they register ---------------------------------------


def test_invalid_names_are_never_awaited() -> None:
    world = World()
    mallory = world.login("mallory")
    for name in ["", "a b", "x" * 200, "\x00bad"]:
        mallory.send(Watch(name))
    world.step()
    assert world.relay._awaited == {}
    assert world.relay.stats["watch_invalid_name"] == 4


def test_a_full_awaited_table_still_takes_new_watches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's attack: a few users WATCH names nobody registers until
    the table is full; the old relay then refused every new name, so alice
    never heard that carol came online. Now a watcher holds at most its
    share, the least recently watched go first, and alice is told."""
    monkeypatch.setattr(chat_server, "MAX_AWAITED", 50)
    monkeypatch.setattr(chat_server, "MAX_AWAITED_PER_WATCHER", 30, raising=False)
    world = World()
    attackers = [world.login(f"mallory{i}") for i in range(3)]
    for i, mallory in enumerate(attackers):
        for j in range(100):
            mallory.send(Watch(f"never{i}x{j}"))
        world.step()
    relay = world.relay
    assert len(relay._awaited) <= 50
    assert all(len(mine) <= 30 for mine in relay._awaiting.values())
    alice = world.login("alice")
    alice.send(Watch("carol"))
    world.step()
    for mallory in attackers:  # the flood goes on after alice's watch
        for j in range(100, 140):
            mallory.send(Watch(f"never{j}"))
        world.step()
    assert "carol" in relay._awaited  # the attackers evict their own names first
    world.login("carol")
    world.run_until(lambda: last_presence(alice).get("carol") is True, 200, "alice told")


def test_a_watchers_awaited_names_go_with_its_session() -> None:
    world = World()
    mallory = world.login("mallory")
    for j in range(10):
        mallory.send(Watch(f"nobody{j}"))
    world.step()
    assert len(world.relay._awaited) == 10
    mallory.send(Logout())
    world.step()
    world.step()
    assert world.relay._awaited == {}
    assert "mallory" not in world.relay._awaiting
