"""A group's entry that reaches us after our own message the server
numbered after it (issue 14: every member sees the group in one order).

The server tells the sender its message's place (GROUP_ACCEPT, on the
control stream) as it commits it, while the group's entries go to each
member on the group's stream later: at the end of the pass, after the
fan-out hold, or once the member's window has room. So another's entry
numbered just before ours can come after our GROUP_ACCEPT: it goes above
our messages numbered after it, in the store (pages, search and a restart
read the group's order) as in the window. In memory: the real `Relay`
and `ClientCore` with a real `ClientStore` (tests/test_client_core's
`Net`); the window's side last, under Xvfb against a real server process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import chat_server
from client_core import GroupChanged, MessageReceived, StatusChanged
from client_store import ClientStore, goes_above, read_history, search_history
from client_transcript import Line, move_down
from protocol import GroupAction, MsgId, name_key
from tests.conftest import RunningServer, wait_for
from tests.test_client_core import Net
from tests.test_groups_client import Member, add, login
from tests.test_groups_gui import window_screenshot
from tests.test_gui import Gui, open_gui, press, pump, pump_until, type_text
from tests.xvfb import display  # noqa: F401

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

T0 = 1_700_000_000_000


def history(store: ClientStore) -> list[tuple[str, int]]:
    """The group's rows in the store's order, shown or not yet."""
    rows = store.db.execute(
        "SELECT text, grp_seq FROM history WHERE peer_key='#team' ORDER BY id"
    ).fetchall()
    return [(str(text), int(seq or 0)) for text, seq in rows]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ClientStore]:
    opened = ClientStore(tmp_path / "alice", "alice")
    yield opened
    opened.close()


def accepted_at(member: Member, msg_id: str) -> int:
    return next((e.seq for e in member.of(StatusChanged)
                 if e.id == msg_id and e.state == "accepted"), 0)  # fmt: skip


def assert_in_order(store: ClientStore) -> None:
    seqs = [seq for _, seq in history(store)]
    assert seqs == sorted(seqs), history(store)
    lines = read_history(store.path, "#team")
    assert [line.seq for line in lines] == sorted(line.seq for line in lines)


def test_how_many_of_our_lines_go_below_an_entry_just_come() -> None:
    assert goes_above(4, []) == 0
    assert goes_above(4, [(False, 3)]) == 0, "another's line before it: it stays last"
    assert goes_above(4, [(True, 3)]) == 0, "ours numbered before it"
    assert goes_above(4, [(True, 5)]) == 1
    assert goes_above(4, [(True, 0), (True, 6), (True, 5), (True, 3), (True, 7)]) == 3, (
        "ours sending (typed after 5 and 6) goes with them; ours at 3 ends the run"
    )  # fmt: skip
    assert goes_above(4, [(True, 5), (False, 9)]) == 1, "another's line ends the run"
    assert goes_above(4, [(True, 0)]) == 0, "ours not numbered yet: typed after it came"
    lines = [Line("own", "me", str(n), 0.0) for n in range(4)]
    last = lines[-1]
    assert move_down(lines, last, -2) and [x.text for x in lines] == ["0", "3", "1", "2"]
    assert move_down(lines, last, -5) and lines[0] is last, "never past the first line"


def test_an_entry_committed_in_the_same_pass_before_ours_goes_above_it(
    tmp_path: Path, store: ClientStore
) -> None:
    """Bob's message and alice's reach the relay in one pass, his first:
    alice's GROUP_ACCEPT (seq 3) leaves at its commit, bob's message
    (seq 2) with the pass's fan-out after it. Alice's history reads bob's
    first, as bob's does, live and after a restart."""
    net = Net()
    bob, carol = login(net, "bob", "carol")  # bob's datagrams reach the relay first
    alice = add(net, "alice", store=store)
    net.run(lambda: alice.logged_in, "alice logged in")
    bob.core.group_request(GroupAction.CREATE, "team", ("alice", "carol"))
    net.run(lambda: len(history(store)) == 1, "alice told of #team")
    bob.core.send("B1 from bob", net.now, to="#team")
    a1 = alice.core.send("A1 from alice", net.now, to="#team")
    net.run(lambda: bool(alice.of(MessageReceived)) and accepted_at(alice, a1) > 0, "both")
    kinds = [type(e).__name__ for e in alice.events if isinstance(e, MessageReceived)
             or (isinstance(e, StatusChanged) and e.state == "accepted")]  # fmt: skip
    assert kinds == ["StatusChanged", "MessageReceived"], "the accept came first"
    received = alice.of(MessageReceived)[0]
    assert received.seq < accepted_at(alice, a1), "bob's was numbered first"
    net.run(lambda: len(carol.of(MessageReceived)) == 2, "carol has both")
    group_order = [e.text for e in sorted(carol.of(MessageReceived), key=lambda e: e.seq)]
    assert group_order == ["B1 from bob", "A1 from alice"]
    net.settle(0.5)  # committed
    assert [text for text, _ in history(store)[1:]] == group_order
    assert_in_order(store)
    by_row = {line.row_id: line.text for line in read_history(store.path, "#team")}
    newest = search_history(store.path, "#team", "from")
    assert newest is not None
    before = search_history(store.path, "#team", "from", before=newest)
    assert before is not None
    assert [by_row[before], by_row[newest]] == group_order, "search walks the group's order"
    alice.core.abort()
    del net.clients[alice.addr]
    store.close()
    again = ClientStore(tmp_path / "alice", "alice")
    try:
        assert [text for text, _ in history(again)[1:]] == group_order, "after a restart"
        assert_in_order(again)
    finally:
        again.close()


def test_a_change_the_window_held_back_goes_above_our_accepted_messages(
    store: ClientStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice's window on the server is full (she has not shown what came):
    bob's adding dave waits in the log while two messages of hers are
    accepted after it; it reaches her once she shows the rest, and goes
    above both (the membership change, like every member has it)."""
    monkeypatch.setattr(chat_server, "MAILBOX_WINDOW", 2)
    net = Net()
    bob, _ = login(net, "bob", "dave")
    alice = add(net, "alice", store=store)
    net.run(lambda: alice.logged_in, "alice logged in")
    alice.shows = False
    bob.core.group_request(GroupAction.CREATE, "team", ("alice",))
    net.run(lambda: len(history(store)) == 1, "alice told of #team")
    bob.core.send("B1 from bob", net.now, to="#team")
    net.run(lambda: len(history(store)) == 2, "B1: alice's window is full")
    bob.core.group_request(GroupAction.ADD, "team", ("dave",))
    net.run(lambda: any(e.change == "added" for e in bob.of(GroupChanged)), "dave added")
    a1 = alice.core.send("A1", net.now, to="#team")
    a2 = alice.core.send("A2", net.now, to="#team")
    net.run(lambda: accepted_at(alice, a2) > 0, "A1, A2 accepted")
    net.settle(0.5)
    assert not any(e.change == "added" for e in alice.of(GroupChanged)), "held on the server"
    assert [text for text, _ in history(store)][1:] == ["B1 from bob", "A1", "A2"]
    added = next(e.seq for e in bob.of(GroupChanged) if e.change == "added")
    assert added < accepted_at(alice, a1) < accepted_at(alice, a2)
    alice.shows = True
    for event in alice.events:
        if isinstance(event, MessageReceived | GroupChanged):
            alice.core.shown(event.id)
    net.run(lambda: any(e.change == "added" for e in alice.of(GroupChanged)), "the change")
    net.settle(0.5)
    texts = [text for text, _ in history(store)]
    assert texts[1:] == ["B1 from bob", "bob added dave", "A1", "A2"], texts
    assert_in_order(store)
    states = [line.state for line in read_history(store.path, "#team") if line.outgoing]
    assert len(states) == 2 and set(states) <= {"accepted", "delivered"}, "moved, states kept"


def test_an_entry_after_ours_or_after_anothers_stays_last(store: ClientStore) -> None:
    """Nothing moves when ours was numbered before the entry, or when
    another's line (of the group's stream, in order) is last: the rows
    keep their ids. Ours still sending stays below an entry that came."""
    store.add_group_event("team", "created", "bob", ("bob", "alice"), T0, 900, 1)
    store.mark_shown(900)
    mine = MsgId(store.instance_id, 1)
    store.add_outgoing(mine, "#team", "mine")
    store.set_recipients(mine, 1, 2)
    store.add_group_message("team", "bob", MsgId(77, 3), "bob's at 3", T0 + 3, 903, 3)
    store.add_outgoing(MsgId(store.instance_id, 2), "#team", "typed, sending")
    store.add_group_message("team", "bob", MsgId(77, 4), "bob's at 4", T0 + 4, 904, 4)
    store.mark_shown(903)
    store.mark_shown(904)
    store.commit()
    lines = read_history(store.path, "#team")
    assert [line.text for line in lines] == [
        "bob created the group with bob, alice", "mine", "bob's at 3", "typed, sending",
        "bob's at 4",
    ]  # fmt: skip
    ids = [line.row_id for line in lines]
    assert ids == sorted(ids)


# --- the window (Xvfb, a real server process) ---------------------------------------


@pytest.fixture
def gui(display: str, server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gui]:  # noqa: F811
    yield from open_gui(server, monkeypatch)


def test_the_window_puts_a_late_entry_above_our_accepted_message(
    gui: Gui, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob's message, numbered before alice's, reaches her window after
    alice's `accepted` (held back at the window's input, as the group's
    stream holds it when the fan-out hold or the window delays it): it is
    drawn above her message, in the conversation's lines as on the screen,
    as every member has the group."""
    bob = gui.session("bob")
    alice = gui.window()
    gui.login(alice, "alice")
    bob.group(GroupAction.CREATE, "ord", ("alice",))
    assert pump_until(gui.root, lambda: name_key("#ord") in alice.conversations)
    alice.open_conversation("#ord")
    assert pump_until(gui.root, lambda: "bob created the group" in alice.transcript_text())
    held: list[MessageReceived] = []
    on_message = alice._on_message

    def late(event: MessageReceived) -> None:
        if event.text == "B late":
            held.append(event)  # reaches the window after alice's accept
        else:
            on_message(event)

    monkeypatch.setattr(alice, "_on_message", late)
    bob.send("B late", to="#ord")
    wait_for(bob, lambda e: isinstance(e, StatusChanged) and e.state == "accepted")
    assert pump_until(gui.root, lambda: bool(held)), "bob's message reached alice's core"
    type_text(alice.composer, "A mine")
    press(alice.composer, "Return")
    conv = alice.current
    assert conv is not None and conv.name == "#ord"
    assert pump_until(gui.root, lambda: any(line.kind == "own" for line in conv.lines))
    own = next(line for line in conv.lines if line.kind == "own")
    assert pump_until(gui.root, lambda: own.seq > 0), "alice's message accepted"
    assert held[0].seq < own.seq, "bob's was numbered first"
    assert alice.transcript_text().index("A mine") > 0
    on_message(held[0])
    pump(gui.root, 0.2)
    assert [line.text for line in conv.lines][-2:] == ["B late", "A mine"]
    shown = alice.transcript_text()
    assert shown.index("B late") < shown.index("A mine"), shown
    window_screenshot(alice, ARTIFACTS / "group-order-late-entry.png")
