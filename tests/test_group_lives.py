"""A group's name made again: each life of the group its own run of rows
(issue 14: every member sees the group's messages and changes in one order).

A group ends when its last member leaves; anyone may then create one of the
same name. The client keeps a group's rows by name, so a member whose client
missed the old life's end (her removal while she was offline reaches her
first, as the server sends it; a copied profile, or another device that
took it, never gets it) holds rows of two lives under one name. The server
numbers the new group on from the old one's last seq (one server: the
store's `group_names`; a cluster: `chat:gmark:`), so seq alone orders both,
for the client and for a `--json` script, across a kill -9 between the end
and the new group. The client also keeps each life a run of its own
(`grp_life`: a CREATED, her own ending, her being added while in, or a seq
the life has already starts a new one), which is what orders a history
from a server that numbered a group made again from 1 (the store-level
tests): the old rows stay above in the order they had, the new life's
start below them, and nothing is moved, lost or shown twice.

In memory: the real `Relay` and `ClientCore` with a real `ClientStore` on a
SQLite file (tests/test_client_core's `Net`); then a server process killed
with SIGKILL and terminal clients with `--json`."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from client_core import GroupChanged, MessageReceived, StatusChanged
from client_store import ClientStore, read_history
from protocol import GroupAction, MsgId, name_key
from tests.clients import RecordingClient, close_all, wait_all
from tests.conftest import RunningServer, ServerProcess
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401 (a fixture)
from tests.test_client_core import Net
from tests.test_cluster_groups_process import seen
from tests.test_cluster_process import spawn_node  # noqa: F401 (a fixture)
from tests.test_durability import ServerRunner
from tests.test_groups_client import Member, add, login
from tests.test_groups_terminal import Terminal
from tests.test_gui import Gui, open_gui, press, pump, pump_until, type_text
from tests.xvfb import display  # noqa: F401

T0 = 1_700_000_000_000


OPENED: list[ClientStore] = []


@pytest.fixture(autouse=True)
def close_stores() -> Iterator[None]:
    """Every store a test opened is closed at its end, passed or failed."""
    yield
    while OPENED:
        OPENED.pop().close()


def open_store(directory: Path) -> ClientStore:
    store = ClientStore(directory, "alice")
    OPENED.append(store)
    return store


def rows(store: ClientStore) -> list[tuple[str, int, int]]:
    """The group's rows in the store's order: (text, life, seq)."""
    found = store.db.execute(
        "SELECT text, grp_life, grp_seq FROM history WHERE peer_key='#team' ORDER BY id"
    ).fetchall()
    return [(str(text), int(life or 0), int(seq or 0)) for text, life, seq in found]


def assert_runs(store: ClientStore) -> None:
    """Lives in order, each in its seq order; the window's reading alike."""
    places = [(life, seq) for _, life, seq in rows(store)]
    assert places == sorted(places), rows(store)
    lines = read_history(store.path, "#team")
    assert [(line.life, line.seq) for line in lines] == sorted((x.life, x.seq) for x in lines)


def accepted_at(member: Member, msg_id: str) -> int:
    return next((e.seq for e in member.of(StatusChanged)
                 if e.id == msg_id and e.state == "accepted"), 0)  # fmt: skip


def offline(net: Net, member: Member, store: ClientStore) -> None:
    member.core.logout(net.now)
    net.run(lambda: member.core.ended, f"{member.core.username} offline")
    del net.clients[member.addr]
    store.close()


def old_life(net: Net, tmp_path: Path) -> tuple[Member, Member, Member, ClientStore]:
    """bob makes #team with alice and carol; alice posts three messages
    (seqs 2-4: her own rows end the group's history), then goes offline."""
    bob, carol = login(net, "bob", "carol")
    store = open_store(tmp_path / "alice")
    alice = add(net, "alice", store=store)
    net.run(lambda: alice.logged_in, "alice logged in")
    bob.core.group_request(GroupAction.CREATE, "team", ("alice", "carol"))
    net.run(lambda: bool(alice.of(GroupChanged)), "alice told of #team")
    sent = [alice.core.send(f"A{n} old", net.now, to="#team") for n in (1, 2, 3)]
    net.run(lambda: all(accepted_at(alice, m) for m in sent), "accepted")
    assert [accepted_at(alice, m) for m in sent] == [2, 3, 4]
    net.run(lambda: len(carol.of(MessageReceived)) == 3, "carol has them")
    net.settle(0.5)
    offline(net, alice, store)
    return alice, bob, carol, store


def end_group(net: Net, *members: Member) -> None:
    for member in members:
        member.core.group_request(GroupAction.LEAVE, "team")
        net.run(lambda m=member: any(e.change == "left" and e.by == m.core.username  # type: ignore[misc]
                                     for e in m.of(GroupChanged)), "left")  # fmt: skip


OLD = [
    ("bob created the group with bob, alice, carol", 0, 1),
    ("A1 old", 0, 2),
    ("A2 old", 0, 3),
    ("A3 old", 0, 4),
]


def copied_profile(tmp_path: Path) -> Path:
    """alice's profile as it was when she went offline, copied elsewhere."""
    shutil.copytree(tmp_path / "alice", tmp_path / "alice-copy")
    (tmp_path / "alice-copy" / "client.lock").unlink(missing_ok=True)
    return tmp_path / "alice-copy"


def test_a_copied_profile_that_missed_the_end_gets_the_group_made_again(tmp_path: Path) -> None:
    """alice's profile is copied; from the original she leaves #team, bob
    and carol leave (it ends) and bob makes #team again with alice. The
    copy logs in: it gets the new group's CREATED (seq 1) and messages,
    below the old life's rows, which keep their order (before, her own
    old rows moved below the new group's first entry)."""
    net = Net()
    _, bob, carol, _ = old_life(net, tmp_path)
    copy = copied_profile(tmp_path)
    original = open_store(tmp_path / "alice")
    alice = add(net, "alice", store=original)
    net.run(lambda: alice.logged_in, "the original back")
    end_group(net, alice, carol, bob)
    offline(net, alice, original)
    bob.core.group_request(GroupAction.CREATE, "team", ("alice", "carol"))
    net.run(lambda: bool([e for e in carol.of(GroupChanged) if e.change == "created"][1:]), "new")
    bob.core.send("B2 new", net.now, to="#team")
    net.run(lambda: carol.of(MessageReceived)[-1].text == "B2 new", "B2")
    store = open_store(copy)
    again = add(net, "alice", store=store)
    net.run(lambda: any(e.text == "B2 new" for e in again.of(MessageReceived)), "the copy has it")
    net.settle(0.5)
    # The old group's seqs ended at 7 (the three LEFTs); the new one's go on.
    assert rows(store) == OLD + [
        ("bob created the group with bob, alice, carol", 1, 8),
        ("B2 new", 1, 9),
    ]
    assert_runs(store)
    lives = {(e.life, e.seq) for e in again.events if isinstance(e, MessageReceived | GroupChanged)}
    assert lives == {(1, 8), (1, 9)}, "the events say which life"
    mine = again.core.send("A4 new", net.now, to="#team")
    net.run(lambda: accepted_at(again, mine) == 10, "accepted in the new life")
    net.settle(0.5)
    assert rows(store)[-1] == ("A4 new", 1, 10)
    assert_runs(store)
    offline(net, again, store)


def test_a_copy_that_missed_the_new_lifes_start_gets_its_middle(tmp_path: Path) -> None:
    """As above, but the original had the new group's first entries: the
    copy gets two entries of the new group and nothing that says it is
    another group. Their seqs go on after the old group's (before, they
    were 2 and 3, and A2 and A3 moved below them), so they go below: the
    client needs not know they are of another group (store-level tests
    below: what it does with a server that numbers from 1 again)."""
    net = Net()
    _, bob, carol, _ = old_life(net, tmp_path)
    copy = copied_profile(tmp_path)
    original = open_store(tmp_path / "alice")
    alice = add(net, "alice", store=original)
    net.run(lambda: alice.logged_in, "the original back")
    end_group(net, alice, carol, bob)
    bob.core.group_request(GroupAction.CREATE, "team", ("alice", "carol"))
    net.run(lambda: any(e.change == "created" for e in alice.of(GroupChanged)), "new")
    net.settle(0.5)
    offline(net, alice, original)
    bob.core.send("B2 new", net.now, to="#team")
    carol.core.send("C3 new", net.now, to="#team")
    net.run(lambda: len([e for e in bob.of(MessageReceived) if e.text == "C3 new"]) == 1, "C3")
    store = open_store(copy)
    again = add(net, "alice", store=store)
    net.run(lambda: any(e.text == "C3 new" for e in again.of(MessageReceived)), "the copy has it")
    net.settle(0.5)
    assert rows(store) == OLD + [("B2 new", 0, 9), ("C3 new", 0, 10)]
    assert_runs(store)
    offline(net, again, store)


def test_a_copy_added_to_the_group_made_again(tmp_path: Path) -> None:
    """The new #team is made without alice; bob adds her later: an `added`
    of herself while her copy thinks she is in is a new life."""
    net = Net()
    _, bob, carol, _ = old_life(net, tmp_path)
    copy = copied_profile(tmp_path)
    original = open_store(tmp_path / "alice")
    alice = add(net, "alice", store=original)
    net.run(lambda: alice.logged_in, "the original back")
    end_group(net, alice, carol, bob)
    offline(net, alice, original)
    bob.core.group_request(GroupAction.CREATE, "team", ("carol",))
    bob.core.send("B2 new", net.now, to="#team")
    bob.core.group_request(GroupAction.ADD, "team", ("alice",))
    net.run(lambda: any(e.change == "added" for e in carol.of(GroupChanged)), "added")
    store = open_store(copy)
    again = add(net, "alice", store=store)
    net.run(lambda: any(e.change == "added" for e in again.of(GroupChanged)), "the copy added")
    net.settle(0.5)
    assert rows(store) == OLD + [("bob added alice", 1, 10)]
    assert_runs(store)
    offline(net, again, store)


def test_removed_while_offline_then_added_to_the_group_made_again(tmp_path: Path) -> None:
    """alice, offline, is removed; the group ends and bob makes it again
    and adds her. At login she gets the old life's removal first, then the
    new life from her adding on. A message she typed while offline (her
    client did not know) is accepted in the new group: it goes at its place
    there, below the removal. Then a restart, and more of the new life."""
    net = Net()
    _, bob, carol, store = old_life(net, tmp_path)
    bob.core.group_request(GroupAction.REMOVE, "team", ("alice",))
    net.run(lambda: any(e.change == "removed" for e in carol.of(GroupChanged)), "removed")
    end_group(net, carol, bob)
    bob.core.group_request(GroupAction.CREATE, "team", ("carol",))
    bob.core.send("B2 new", net.now, to="#team")
    bob.core.group_request(GroupAction.ADD, "team", ("alice",))
    net.run(lambda: any(e.change == "added" for e in carol.of(GroupChanged)), "added")
    store = open_store(tmp_path / "alice")
    alice = add(net, "alice", store=store)
    typed = alice.core.send("A typed offline", net.now, to="#team")  # before the login
    net.run(lambda: accepted_at(alice, typed) > 0, "accepted")
    net.run(lambda: any(e.change == "added" for e in alice.of(GroupChanged)), "added")
    net.settle(0.5)
    assert accepted_at(alice, typed) == 11, "in the new group, after bob's adding her"
    got = rows(store)
    assert got[:4] == OLD, got
    assert got[4] == ("bob removed alice", 0, 5)
    assert got[5:] == [("bob added alice", 1, 10), ("A typed offline", 1, 11)], got
    assert_runs(store)
    offline(net, alice, store)
    store = open_store(tmp_path / "alice")  # a restart in between
    alice = add(net, "alice", store=store)
    net.run(lambda: alice.logged_in, "back")
    bob.core.send("B5 new", net.now, to="#team")
    net.run(lambda: any(e.text == "B5 new" for e in alice.of(MessageReceived)), "B5")
    net.settle(0.5)
    assert rows(store)[-1] == ("B5 new", 1, 12)
    assert_runs(store)
    offline(net, alice, store)


def test_a_stream_entry_numbered_before_ours_stays_in_our_life(tmp_path: Path) -> None:
    """What is not another life: an entry of the same life held back past
    our accepted message (test_group_order_own2) still goes above it, and
    seqs that only grow stay one life."""
    store = open_store(tmp_path / "alice")
    try:
        store.add_group_event("team", "created", "bob", ("bob", "alice"), T0, 900, 1)
        mine = MsgId(store.instance_id, 1)
        store.add_outgoing(mine, "#team", "mine at 3")
        store.set_recipients(mine, 1, 3)
        store.add_group_message("team", "bob", MsgId(77, 2), "bob's at 2", T0 + 2, 902, 2)
        store.add_group_message("team", "bob", MsgId(77, 4), "bob's at 4", T0 + 4, 904, 4)
        store.commit()
        assert rows(store) == [
            ("bob created the group with bob, alice", 0, 1), ("bob's at 2", 0, 2),
            ("mine at 3", 0, 3), ("bob's at 4", 0, 4),
        ]  # fmt: skip
    finally:
        store.close()


def old_rows(store: ClientStore) -> None:
    """The store's first life of #team: created (1), bob's at 2, ours at 3."""
    store.add_group_event("team", "created", "bob", ("bob", "alice"), T0, 900, 1)
    store.add_group_message("team", "bob", MsgId(77, 1), "bob's at 2", T0 + 2, 902, 2)
    mine = MsgId(store.instance_id, 1)
    store.add_outgoing(mine, "#team", "ours at 3")
    store.set_recipients(mine, 1, 3)


def test_ours_accepted_in_the_new_group_before_the_old_ones_rest(tmp_path: Path) -> None:
    """alice typed while away (her client thinks she is in); meanwhile she
    was removed (seq 5), the group ended and was made again with her. The
    new group accepts her message at seq 2 before her client has any of
    its entries, or the old group's removal: 2 is taken in the old life,
    so it is a life of its own; the old removal then goes to the old life
    (above it) and the new group's CREATED joins the new one (above ours)."""
    store = open_store(tmp_path / "alice")
    old_rows(store)
    typed = MsgId(store.instance_id, 2)
    store.add_outgoing(typed, "#team", "typed while away")
    store.set_recipients(typed, 1, 2)
    assert store.last_life == 1
    store.add_group_message("team", "bob", MsgId(77, 2), "bob's at 4", T0 + 4, 904, 4)
    assert store.last_life == 0, "the old group's rest"
    store.add_group_event("team", "removed", "bob", ("alice",), T0 + 5, 905, 5)
    assert store.last_life == 0
    store.add_group_event("team", "created", "bob", ("bob", "alice"), T0 + 6, 906, 1)
    assert store.last_life == 1, "the new group, with ours"
    store.add_group_message("team", "bob", MsgId(77, 3), "bob's new 3", T0 + 7, 907, 3)
    store.commit()
    assert rows(store) == [
        ("bob created the group with bob, alice", 0, 1), ("bob's at 2", 0, 2),
        ("ours at 3", 0, 3), ("bob's at 4", 0, 4), ("bob removed alice", 0, 5),
        ("bob created the group with bob, alice", 1, 1), ("typed while away", 1, 2),
        ("bob's new 3", 1, 3),
    ]  # fmt: skip
    assert_runs(store)


def test_ours_accepted_after_the_old_removal_came(tmp_path: Path) -> None:
    """The same with the removal first: she is out of the old life, so her
    message (seq 2) is of a later one, below the removal; the new group's
    CREATED then goes above it."""
    store = open_store(tmp_path / "alice")
    old_rows(store)
    typed = MsgId(store.instance_id, 2)
    store.add_outgoing(typed, "#team", "typed while away")
    store.add_group_event("team", "removed", "bob", ("alice",), T0 + 5, 905, 4)
    store.set_recipients(typed, 1, 2)
    store.add_group_event("team", "created", "bob", ("bob", "alice"), T0 + 6, 906, 1)
    store.commit()
    assert rows(store) == [
        ("bob created the group with bob, alice", 0, 1), ("bob's at 2", 0, 2),
        ("ours at 3", 0, 3), ("bob removed alice", 0, 4),
        ("bob created the group with bob, alice", 1, 1), ("typed while away", 1, 2),
    ]  # fmt: skip
    assert_runs(store)


def test_a_store_from_before_lives_knows_who_left(tmp_path: Path) -> None:
    """A store made before `group_lives` (its rows all of one life) learns
    on open what its rows say: alice left #team, so the next entry of the
    name is of a new life; rows and their ids stay as they were."""
    store = open_store(tmp_path / "alice")
    old_rows(store)
    store.add_group_event("team", "left", "alice", (), T0 + 5, 905, 4)
    store.commit()
    store.db.execute("DROP TABLE group_lives")
    store.close()
    OPENED.remove(store)
    before = rows(again := open_store(tmp_path / "alice"))
    again.add_group_message("team", "bob", MsgId(77, 9), "bob's new 2", T0 + 9, 909, 2)
    again.commit()
    assert rows(again) == before + [("bob's new 2", 1, 2)]
    assert_runs(again)


# --- real processes: the name's seqs across a kill -9, as a script sees them ---------


def group_events(client: Terminal) -> list[dict[str, Any]]:
    return [e for e in client.events
            if e.get("group") == "team" and e["event"] in ("group", "message")]  # fmt: skip


def test_a_script_sees_one_rising_seq_across_a_kill_between_the_end_and_the_new_group(
    tmp_path: Path,
) -> None:
    """alice and bob as `--json` scripts: #team, a message, both leave (it
    ends); the server is killed with SIGKILL and started again on its data;
    bob makes #team again and posts. Every group event carries `seq`, and
    each client's run of them only rises: the new group's `created` goes on
    after the old one's last entry (the name's mark was durable before the
    LEFT that ended it was told)."""
    runner = ServerRunner(tmp_path / "server-data")
    runner.start()
    clients: list[Terminal] = []
    try:
        addr = f"127.0.0.1:{runner.port}"
        clients = [Terminal(addr, "alice"), Terminal(addr, "bob")]
        alice, bob = clients
        for client in clients:
            client.wait(lambda e: e["event"] == "logged_in")
        alice.type("/create #team bob", "/to #team", "old group")
        bob.wait(lambda e: e.get("text") == "old group")
        bob.type("/leave #team")
        alice.wait(lambda e: e.get("change") == "left" and e["by"] == "bob")
        alice.type("/leave #team")
        alice.wait(lambda e: e.get("change") == "left" and e["by"] == "alice")
        runner.restart()
        bob.type("/create #team alice", "/to #team", "new group")
        alice.wait(lambda e: e.get("text") == "new group")
        alice.type("/to #team", "alice again")
        bob.wait(lambda e: e.get("text") == "alice again")
        alice.wait(lambda e: e.get("state") == "accepted" and e.get("seq") == 7)
    finally:
        for client in clients:
            client.kill()
        runner.close()
    seen = [(e["seq"], e.get("change") or e.get("text")) for e in group_events(alice)]
    assert seen == [(1, "created"), (3, "left"), (4, "left"), (5, "created"), (6, "new group")]
    assert [(e["seq"], e.get("change") or e.get("text")) for e in group_events(bob)] == [
        (1, "created"), (2, "old group"), (3, "left"), (5, "created"), (7, "alice again"),
    ]  # fmt: skip
    accepted = [e["seq"] for e in alice.events if e.get("state") == "accepted"]
    assert accepted == [2, 7], "her own messages' places: the rest of the one order"
    assert all("life" not in e for e in group_events(alice)), json.dumps(alice.events)


def test_in_a_cluster_the_names_seqs_go_on_across_a_redis_kill(
    redis_server: RedisServer,  # noqa: F811
    spawn_node: Callable[..., ServerProcess],  # noqa: F811
) -> None:
    """Two nodes on a real redis-server: alice (node A) makes #team with bob
    (node B); both leave, it ends; redis-server is SIGKILLed and started
    again on its AOF; bob makes #team again from B. The new group's
    CREATED goes on after the old one's last seq (the mark the script set
    when it ended, `chat:gmark:`), at both members."""
    a, b = spawn_node(redis_server.url, "A"), spawn_node(redis_server.url, "B")
    alice, bob = RecordingClient("alice"), RecordingClient("bob")
    members = [alice, bob]
    try:
        alice.login((a.host, a.port))
        bob.login((b.host, b.port))
        wait_all(members, lambda: all(x.logged_in for x in members), 20, "logins")
        alice.session.group(GroupAction.CREATE, "team", ["bob"])
        wait_all(members, lambda: all(seen(x) for x in members), 30, "#team at both")
        bob.session.group(GroupAction.LEAVE, "team")
        wait_all(members, lambda: len(seen(alice)) == 2, 30, "bob's leaving at alice")
        alice.session.group(GroupAction.LEAVE, "team")
        wait_all(members, lambda: len(seen(alice)) == 3, 30, "alice's: the end")
        redis_server.kill()
        redis_server.start()  # the same port and directory: its AOF is read back
        bob.session.group(GroupAction.CREATE, "team", ["alice"])
        wait_all(members, lambda: len(seen(alice)) == 4 and len(seen(bob)) == 3, 45,
                 "the new #team at both")  # fmt: skip
    finally:
        close_all(members)
    assert [e[:2] for e in seen(alice)] == [(1, "created"), (2, "left"), (3, "left"),
                                            (4, "created")]  # fmt: skip
    assert [e[:2] for e in seen(bob)] == [(1, "created"), (2, "left"), (4, "created")]


# --- the window (Xvfb, a server in a thread) ----------------------------------------


@pytest.fixture
def gui(display: str, server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gui]:  # noqa: F811
    yield from open_gui(server, monkeypatch)


def test_the_window_puts_a_new_life_below_our_old_messages(gui: Gui) -> None:
    """alice's window has #ord with her accepted message (seq 2); then the
    entries of a group of the name made again reach it as an older server
    numbered them, from 1 (handed to the window as the core hands them,
    with their life): the new group's line and message go below hers, on
    the screen as in the conversation's lines (before, the new CREATED went
    above her message: seq 1 < 2)."""
    bob = gui.session("bob")
    alice = gui.window()
    gui.login(alice, "alice")
    bob.group(GroupAction.CREATE, "ord", ("alice",))
    assert pump_until(gui.root, lambda: name_key("#ord") in alice.conversations)
    alice.open_conversation("#ord")
    assert pump_until(gui.root, lambda: "bob created the group" in alice.transcript_text())
    type_text(alice.composer, "A old")
    press(alice.composer, "Return")
    conv = alice.current
    assert conv is not None and conv.name == "#ord"
    assert pump_until(gui.root, lambda: any(line.kind == "own" for line in conv.lines))
    own = next(line for line in conv.lines if line.kind == "own")
    assert pump_until(gui.root, lambda: own.seq > 0), "alice's message accepted"
    assert (own.life, own.seq) == (0, 2)
    now_ms = int(time.time() * 1000)
    alice.handle_event(GroupChanged("ord", "created", "bob", ("bob", "alice", "carol"),
                                    1 << 40, now_ms, 1, 1))  # fmt: skip
    alice.handle_event(MessageReceived("bob", "B new", (1 << 40) + 1, now_ms, "ab-1", "ord", 2, 1))
    pump(gui.root, 0.2)
    texts = [line.text for line in conv.lines]
    assert texts[-3:] == ["A old", "bob created the group with bob, alice, carol", "B new"], texts
    shown = alice.transcript_text()
    assert shown.index("A old") < shown.index("with bob, alice, carol") < shown.index("B new")
    assert own.msg_id is not None
    assert alice.groups.state_label(own) in (
        "\u2713 on server \u00b7 0 of 1",
        "\u2713\u2713 1 of 1",
    ), "its N: its own group's"


def test_a_script_orders_by_seq_what_the_terminal_prints_out_of_order(tmp_path: Path) -> None:
    """What a `--json` script sees when our `accepted` comes before another
    member's entry numbered before ours (test_group_order_own2): both
    events carry `seq`, the message's lower; ordered by it, the script's
    transcript is every other member's order."""
    net = Net()
    bob, carol = login(net, "bob", "carol")
    store = open_store(tmp_path / "alice")
    alice = add(net, "alice", store=store)
    net.run(lambda: alice.logged_in, "alice logged in")
    bob.core.group_request(GroupAction.CREATE, "team", ("alice", "carol"))
    net.run(lambda: bool(alice.of(GroupChanged)), "alice told of #team")
    bob.core.send("B1 from bob", net.now, to="#team")
    a1 = alice.core.send("A1 from alice", net.now, to="#team")
    net.run(lambda: bool(alice.of(MessageReceived)) and accepted_at(alice, a1) > 0, "both")
    net.run(lambda: len(carol.of(MessageReceived)) == 2, "carol has both")
    events = alice.json()
    sent = {e["id"]: e["text"] for e in events if e.get("state") == "sending"}
    printed = [
        e for e in events if e.get("group") == "team"
        and (e["event"] in ("group", "message") or e.get("state") == "accepted")
    ]  # fmt: skip
    assert [(e["event"], e["seq"]) for e in printed] == [("group", 1), ("status", 3),
                                                        ("message", 2)], printed  # fmt: skip

    def what(event: dict[str, Any]) -> str:
        return str(event.get("change") or event.get("text") or sent[event["id"]])

    transcript = [what(e) for e in sorted(printed, key=lambda e: e["seq"])]
    carols = ["created"] + [e.text for e in sorted(carol.of(MessageReceived), key=lambda e: e.seq)]
    assert transcript == carols == ["created", "B1 from bob", "A1 from alice"]
