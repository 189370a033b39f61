"""What waits in a group's log for its member furthest behind is bounded like
a mailbox (issue 14, audit finding L2): a message that would take it past
the mailbox limits (`mailbox_messages`, `mailbox_bytes`) fails
`mailbox_full` naming that member, and nothing accepted before it is lost;
membership changes still go in, and removing the member lets the group go
on (the entries still owed to them stay, the ones after their removal are
cut out of the log). On the sans-IO relay with a fake clock (each store, and
a restart on a real SQLite file), in a cluster through a real redis-server,
and through the terminal client's `--json` events."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chat_server import GROUP_TRIM_EVERY
from protocol import ErrorCode, Fail, GroupAccept, GroupAction, name_key
from server_store import MessageStore, ServerStore
from tests.conftest import start_server, stop_server
from tests.conftest import test_config as server_config
from tests.redis_fixture import redis_server  # noqa: F401 (a fixture)
from tests.test_bounds import Client
from tests.test_cluster_groups import Cluster, cluster_of  # noqa: F401 (a fixture)
from tests.test_groups_relay import GroupWorld, created, entries, texts, told_by
from tests.test_groups_terminal import Terminal
from tests.test_groups_trim import log_seqs, receipt_all
from tests.test_gui import LEFT, Gui, open_gui, own_ids, press, pump_until, type_text
from tests.xvfb import display  # noqa: F401 (a fixture)

CAP = 5  # mailbox_messages in these tests


def fails(client: Client) -> list[Fail]:
    found: list[Fail] = client.of(Fail)
    return found


def accepted(client: Client) -> int:
    return len(client.of(GroupAccept))


def post(world: GroupWorld, client: Client, texts_: list[str], start: int) -> None:
    for n, text in enumerate(texts_, start):
        world.post(client, "team", text, n)
        world.settle_all(10)
    world.settle_all()


def offline_carol(store: MessageStore, **config: int) -> tuple[GroupWorld, Client, Client]:
    """alice, bob and carol in #team; carol logged out (she had its CREATED)."""
    world = GroupWorld(store, **config)
    alice, bob, carol = world.login("alice"), world.login("bob"), world.login("carol")
    created(world, alice, "bob", "carol")
    world.settle_all()
    world.logout(carol)
    return world, alice, bob


def test_a_post_over_the_cap_fails_naming_the_member_and_nothing_before_it_is_lost(
    store: MessageStore,
) -> None:
    world, alice, bob = offline_carol(store, mailbox_messages=CAP)
    post(world, alice, [f"m{n}" for n in range(1, CAP + 1)], 1)
    assert accepted(alice) == CAP and not fails(alice)
    post(world, alice, ["one too many"], CAP + 1)
    (fail,) = fails(alice)
    assert fail.reason == ErrorCode.MAILBOX_FULL and fail.msg_id.client_seq == CAP + 1
    assert "carol" in fail.message and "#team" in fail.message, fail.message
    assert accepted(alice) == CAP
    # bob is not held back by carol: he had every accepted message.
    assert texts(bob) == [f"m{n}" for n in range(1, CAP + 1)]
    carol = world.login("carol")
    world.run_until(lambda: len(texts(carol)) == CAP, 500, "carol's catch-up")
    world.settle_all()
    # Each once, in the group's order, and nothing of the failed one.
    assert [e[0] for e in entries(carol)] == list(range(2, CAP + 2))
    assert texts(carol) == [f"m{n}" for n in range(1, CAP + 1)]
    post(world, alice, ["she has read"], CAP + 2)
    assert accepted(alice) == CAP + 1 and len(fails(alice)) == 1
    world.run_until(lambda: texts(carol)[-1:] == ["she has read"], 200, "the next one")


def test_membership_changes_go_in_over_the_cap_and_removing_the_member_frees_it(
    store: MessageStore,
) -> None:
    world, alice, bob = offline_carol(store, mailbox_messages=CAP)
    dave = world.login("dave")
    post(world, alice, [f"m{n}" for n in range(1, CAP + 1)], 1)
    post(world, alice, ["refused"], CAP + 1)
    assert [f.reason for f in fails(alice)] == [ErrorCode.MAILBOX_FULL]
    # Over the cap, the owner can still add and remove members.
    assert world.result(alice, world.request(alice, GroupAction.ADD, "team", "dave")).code == 0
    post(world, bob, ["still full"], 1)
    assert [f.reason for f in fails(bob)] == [ErrorCode.MAILBOX_FULL]
    assert world.result(alice, world.request(alice, GroupAction.REMOVE, "team", "carol")).code == 0
    post(world, bob, ["carol is out"], 2)
    assert accepted(bob) == 1 and len(fails(bob)) == 1
    world.run_until(lambda: texts(dave) == ["carol is out"], 200, "dave's copy")
    # carol still gets everything up to her removal, once, in order.
    carol = world.login("carol")
    world.run_until(lambda: any(e[1] == "removed" for e in entries(carol)), 500, "her removal")
    world.settle_all()
    assert [e[1] for e in entries(carol)] == ["message"] * CAP + ["added", "removed"]
    assert texts(carol) == [f"m{n}" for n in range(1, CAP + 1)]


def test_the_bytes_are_capped_as_well_as_the_count(store: MessageStore) -> None:
    world, alice, _ = offline_carol(store, mailbox_bytes=100)
    post(world, alice, ["x" * 40, "é" * 20], 1)  # 40 + 40 bytes of UTF-8
    assert accepted(alice) == 2 and not fails(alice)
    post(world, alice, ["y" * 21], 3)  # 80 + 21 > 100
    (fail,) = fails(alice)
    assert fail.reason == ErrorCode.MAILBOX_FULL and "carol" in fail.message
    post(world, alice, ["z" * 20], 4)  # 80 + 20 fits
    assert accepted(alice) == 3 and len(fails(alice)) == 1


def test_a_removed_member_keeps_only_what_is_theirs_in_the_log(store: MessageStore) -> None:
    """carol, offline, is removed: the entries up to her removal stay for
    her; those after it, which every member has, are cut out of the log
    (it was kept whole from her cursor on, for ever, before)."""
    world, alice, bob = offline_carol(store)
    post(world, alice, ["a1", "a2", "a3"], 1)
    assert world.result(alice, world.request(alice, GroupAction.REMOVE, "team", "carol")).code == 0
    removal = 5  # CREATED, three messages, REMOVED
    count = 2 * GROUP_TRIM_EVERY
    for n in range(4, 4 + count):
        world.post(alice, "team", f"t{n}", n)
        if n % 8 == 0:
            world.step()
    world.run_until(lambda: len(texts(bob)) == 3 + count, 1000, "bob's copies")
    world.settle_all()
    kept = log_seqs(store)
    assert kept[: removal - 1] == list(range(2, removal + 1))  # what carol is owed
    assert len(kept) - (removal - 1) < GROUP_TRIM_EVERY, kept  # not the rest
    group = world.relay.groups.get("team")
    assert group is not None and group.backlog()[0] < GROUP_TRIM_EVERY
    assert len(group.ends) <= GROUP_TRIM_EVERY + 1  # the totals in memory too
    carol = world.login("carol")
    world.run_until(lambda: any(e[1] == "removed" for e in entries(carol)), 500, "her removal")
    world.settle_all()
    assert [e[0] for e in entries(carol)] == list(range(2, removal + 1))
    world.settle_all()
    assert len(log_seqs(store)) < GROUP_TRIM_EVERY


def log_totals(path: Path, after: int) -> tuple[int, int]:
    with sqlite3.connect(path) as db:
        count, size = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(length(CAST(text AS BLOB))), 0) FROM group_log "
            "WHERE group_key='team' AND group_seq>?",
            (after,),
        ).fetchone()
    return int(count), int(size)


def test_the_running_totals_after_a_restart_are_the_logs(tmp_path: Path) -> None:
    """Rebuilt from the SQLite file at start (kept nowhere else, so a kill
    -9 cannot make them drift): the same numbers as the log's rows, and the
    cap holds across the restart."""
    disk = ServerStore(tmp_path / "data")
    disk.start()
    try:
        world, alice, _ = offline_carol(disk, mailbox_messages=CAP)
        post(world, alice, ["ü" * n for n in range(1, CAP + 1)], 1)
        group = world.relay.groups.get("team")
        assert group is not None
        before = group.backlog()
        assert before == (CAP, sum(2 * n for n in range(1, CAP + 1)))
    finally:
        disk.close()
    disk = ServerStore(tmp_path / "data")
    disk.start()
    try:
        world = GroupWorld(disk, mailbox_messages=CAP)
        group = world.relay.groups.get("team")
        assert group is not None
        assert group.backlog() == before == log_totals(disk.path, group.low)
        assert group.ends[-1] - group.ends[0] == log_totals(disk.path, group.trimmed)[1]
        alice = world.login("alice")
        post(world, alice, ["after the restart"], CAP + 1)
        assert [f.reason for f in fails(alice)] == [ErrorCode.MAILBOX_FULL]
    finally:
        disk.close()


def test_a_sender_offline_keeps_its_messages_through_a_hole(store: MessageStore) -> None:
    """alice posts, removes carol (offline, she has none of it), leaves and
    logs out before bob has her messages: the hole cut past what carol and
    alice are owed as former members spares alice's messages (her mark is
    held by carol): her next login is told who had each of them."""
    world, alice, bob = offline_carol(store)
    world.holding.add("bob")
    post(world, alice, ["a1", "a2", "a3"], 1)
    assert world.result(alice, world.request(alice, GroupAction.REMOVE, "team", "carol")).code == 0
    world.holding.add("alice")  # (she logs out before her LEFT reaches her client)
    assert world.result(alice, world.request(alice, GroupAction.LEAVE, "team")).code == 0
    world.logout(alice)
    world.holding.discard("alice")
    world.holding.clear()
    receipt_all(bob)
    world.settle_all()
    world.login("dave")  # (a member who receipts: a receipt is what looks at the trim)
    assert world.result(bob, world.request(bob, GroupAction.ADD, "team", "dave")).code == 0
    count = 2 * GROUP_TRIM_EVERY
    for n in range(1, count + 1):
        world.post(bob, "team", f"b{n}", n)
        if n % 8 == 0:
            world.step()
    world.settle_all()
    world.run_until(lambda: accepted(bob) == count, 1000, "bob's posts")
    world.settle_all()
    kept = log_seqs(store)
    # alice's messages, carol's removal and alice's leaving.
    assert kept[:5] == [2, 3, 4, 5, 6]
    assert len(kept) < 5 + GROUP_TRIM_EVERY, kept  # the rest was cut out
    alice = world.login("alice")
    world.run_until(lambda: len(told_by(alice)) >= 3, 1000, "alice told")
    world.settle_all()
    assert [by for by, _ in told_by(alice)] == ["bob"] * 3


# --- a cluster: the shared store's post script judges it -----------------------


def test_in_a_cluster_a_post_over_the_cap_fails_on_any_node(
    cluster_of: Callable[..., Cluster],  # noqa: F811
) -> None:
    """carol (on B) has stopped reading: alice's posts from A and bob's from
    B past the cap fail `mailbox_full` naming her, atomically in Redis (a
    node's copy has nothing to do with it); what was accepted reaches bob;
    once the owner removes carol, posts go in again."""
    cluster = cluster_of(2, mailbox_messages=CAP, mailbox_bytes=1000)
    alice, bob = cluster.login(0, "alice"), cluster.login(1, "bob")
    cluster.login(1, "carol")
    assert cluster.request(0, alice, GroupAction.CREATE, "team", "bob", "carol").code == 0
    cluster.settle()
    cluster.nodes[1].holding.add("carol")
    for n in range(1, CAP + 1):
        cluster.post(0, alice, "team", f"m{n}", n)
        cluster.settle(3)
    cluster.run_until(lambda: accepted(alice) == CAP, 300, "alice's accepts")
    cluster.post(0, alice, "team", "from A", CAP + 1)
    cluster.post(1, bob, "team", "from B", 1)
    cluster.run_until(lambda: bool(fails(alice)) and bool(fails(bob)), 300, "the refusals")
    for client in (alice, bob):
        (fail,) = fails(client)
        assert fail.reason == ErrorCode.MAILBOX_FULL and "carol" in fail.message, fail
    assert texts(bob) == [f"m{n}" for n in range(1, CAP + 1)]
    client = cluster.nodes[0].node.store.client
    assert client.hget("chat:group:{#team}", "seq") == str(CAP + 1)  # nothing numbered
    assert cluster.request(0, alice, GroupAction.REMOVE, "team", "carol").code == 0
    # The bytes too: with carol gone, 991 bytes fit the 1,000; 10 more, sent
    # with it (before anyone can have it), do not.
    cluster.post(1, bob, "team", "x" * 991, 2)
    cluster.post(1, bob, "team", "y" * 10, 3)
    cluster.run_until(lambda: len(fails(bob)) == 2, 300, "the second refusal")
    assert fails(bob)[1].reason == ErrorCode.MAILBOX_FULL and fails(bob)[1].msg_id.client_seq == 3
    cluster.run_until(lambda: texts(alice) == ["x" * 991], 300, "alice has the long one")
    cluster.settle()
    cluster.post(1, bob, "team", "carol is out", 4)
    cluster.run_until(lambda: texts(alice)[-1:] == ["carol is out"], 300, "the post after")
    assert len(fails(bob)) == 2 and accepted(bob) == 2


# --- the terminal client, a real process ------------------------------------------


def test_the_terminal_client_shows_the_failed_group_message(tmp_path: Path) -> None:
    """`chat_client.py --json`: the message past the cap is `failed` with
    reason `mailbox_full`, and the error event names who holds it back;
    the ones before it are accepted."""
    running = start_server(server_config(tmp_path / "server-data", mailbox_messages=3))
    clients: list[Terminal] = []
    try:
        carol = Terminal(running.addr_text, "carol")  # an account, then away
        clients.append(carol)
        carol.wait(lambda e: e["event"] == "logged_in")
        assert carol.quit() == 0
        alice, bob = Terminal(running.addr_text, "alice"), Terminal(running.addr_text, "bob")
        clients += [alice, bob]
        for client in (alice, bob):
            client.wait(lambda e: e["event"] == "logged_in")
        alice.type("/create #team bob carol")
        bob.wait(lambda e: e.get("change") == "created")
        # carol has not had the CREATED either: 1 + 2 entries wait for her.
        alice.type("/to #team", "one", "two", "three")
        alice.wait(lambda e: e["event"] == "status" and e["state"] == "failed")
        sent = {e["text"]: e["id"] for e in alice.events if e.get("state") == "sending"}
        bob.wait(lambda e: e.get("text") == "two")
        alice.wait(lambda e: e["event"] == "status" and e["state"] == "accepted"
                   and e["id"] == sent["two"])  # fmt: skip
        assert alice.quit() == 0 and bob.quit() == 0
    finally:
        for client in clients:
            client.kill()
        stop_server(running)
    states = {e["id"]: e["state"] for e in alice.events
              if e["event"] == "status" and e["state"] in ("accepted", "failed")}  # fmt: skip
    assert [states[sent[text]] for text in ("one", "two", "three")] == [
        "accepted", "accepted", "failed"]  # fmt: skip
    (failed,) = [e for e in alice.events if e["event"] == "status" and e["state"] == "failed"]
    assert failed["reason"] == "mailbox_full" and failed.get("group") == "team", failed
    (error,) = [e for e in alice.events if e["event"] == "error"]
    assert error["code"] == "mailbox_full" and error["message"].startswith("#team: carol's")
    assert [e["text"] for e in bob.events if e["event"] == "message"] == ["one", "two"]


# --- the window ---------------------------------------------------------------------


@pytest.fixture
def small_backlog_gui(
    display: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Gui]:
    """Windows on a server whose mailboxes (and so groups' backlogs) hold three."""
    running = start_server(server_config(tmp_path / "server-data", mailbox_messages=3))
    try:
        yield from open_gui(running, monkeypatch)
    finally:
        stop_server(running)


def test_the_window_shows_a_failed_group_message_like_a_failed_direct_one(
    small_backlog_gui: Gui,
) -> None:
    app = small_backlog_gui
    carol = app.session("carol")  # an account; she goes away
    carol.close(3.0)
    app.sessions.remove(carol)
    alice = app.window(LEFT)
    app.login(alice, "alice")
    bob = app.session("bob")
    bob.group(GroupAction.CREATE, "team", ("alice", "carol"))
    assert pump_until(app.root, lambda: name_key("#team") in alice.conversations)
    alice.open_conversation("#team")
    for text in ("one", "two", "three"):  # carol has not had the CREATED: 1 + 2
        type_text(alice.composer, text)
        press(alice.composer, "Return")
    assert pump_until(app.root, lambda: len(own_ids(alice, "#team")) == 3)
    first, second, third = own_ids(alice, "#team")
    assert pump_until(app.root, lambda: alice.state_of(third) == "failed"), "backlog full"
    assert pump_until(app.root, lambda: alice.state_of(second) in ("accepted", "delivered"))
    assert alice.state_of(first) in ("accepted", "delivered")
    line = alice.conversations[name_key("#team")].by_id[third]
    described = alice.describe_line(line)
    assert "Failed     mailbox full" in described and "Delivered" not in described, described
    assert "(carol's backlog is full)" in alice.transcript_text()  # who (session 8, fresh)


def test_a_group_made_again_under_its_name_is_counted_from_its_own_first_entry(
    store: MessageStore,
) -> None:
    """A name's seqs go on across its lives (a group made again numbers on
    from the old one's last): the new group's totals start at its CREATED,
    not at seq 0 (the old life's entries are no backlog of the new one)."""
    world = GroupWorld(store, mailbox_messages=CAP, mailbox_bytes=100)
    alice, bob = world.login("alice"), world.login("bob")
    created(world, alice, "bob")
    post(world, alice, [f"old {n}" for n in range(1, 2 * CAP)], 1)
    for client in (bob, alice):
        assert world.result(client, world.request(client, GroupAction.LEAVE, "team")).code == 0
    world.settle_all()
    world.logout(world.login("carol"))  # an account, away
    created(world, alice, "bob", "carol")
    world.settle_all()
    group = world.relay.groups.get("team")
    assert group is not None and group.seq > 2 * CAP  # it numbers on
    post(world, alice, ["é" * 10] * (CAP - 1), 100)  # the CREATED and these wait for carol
    assert group.backlog() == (CAP, 20 * (CAP - 1)) and not fails(alice)
    post(world, alice, ["one more"], 200)
    (fail,) = fails(alice)
    assert fail.reason == ErrorCode.MAILBOX_FULL and "carol" in fail.message
