"""Our own group messages at their place in the group's one order
(audit14 G2): a message of ours is stored (and shown) where it was typed
while `sending`; once the server numbers it (GROUP_ACCEPT's seq) the lines
the server numbered before it - others' messages and changes that came
while ours was on its way - go above it, in the store as in the window,
so the history read back (also after a restart) is every member's order.
In memory: `ClientCore` with a real `ClientStore` against the relay of
tests/test_client_core (`Net`); the window's side is
tests/test_gui_groups3.py."""

from __future__ import annotations

from pathlib import Path

from client_core import StatusChanged
from client_store import ClientStore, goes_before, read_history
from protocol import GroupAccept, GroupDeliver, GroupEvent, MsgId
from tests.test_client_core import Net
from tests.test_groups_client import Sent, add, net, push, sent  # noqa: F401

T0 = 1_700_000_000_000
CREATED = GroupEvent(900, 1, "team", 1, "bob", ("bob", "alice", "carol"), T0)


def deliver(seq: int, text: str, sender: str = "bob") -> GroupDeliver:
    return GroupDeliver(900 + seq, seq, MsgId(77, seq), "team", sender, text, T0 + seq)


def texts(store: ClientStore) -> list[str]:
    return [line.text for line in read_history(store.path, "#team")]


def test_how_many_later_lines_go_before_ours() -> None:
    assert goes_before(4, []) == 0
    assert goes_before(4, [5, 6]) == 0, "numbered after ours: ours stays above them"
    assert goes_before(4, [3]) == 1
    assert goes_before(4, [0, 3]) == 2, "ours still sending (0) typed later: it stays above"
    assert goes_before(6, [0, 3, 0, 7, 5]) == 5
    assert goes_before(5, [3, 0, 7]) == 1, "numbered after ours stays below it"


def test_our_message_accepted_after_others_reads_back_at_its_seq(
    tmp_path: Path,
    net: Net,  # noqa: F811
    sent: Sent,  # noqa: F811 (the relay takes no group messages: the test answers)
) -> None:
    store = ClientStore(tmp_path / "alice", "alice")
    alice = add(net, "alice", store=store)
    net.run(lambda: alice.logged_in, "in")
    push(net, "alice", CREATED)
    push(net, "alice", deliver(2, "B1 from bob"))
    net.run(lambda: len(read_history(store.path, "#team")) == 2, "received")
    # alice types three lines; bob's second message is numbered between hers.
    a1 = alice.core.send("A1", net.now, to="#team")
    alice.core.send("A2", net.now, to="#team")
    a3 = alice.core.send("A3", net.now, to="#team")
    push(net, "alice", GroupAccept(MsgId(alice.core.instance_id, 1), 910, 3, 2))
    net.run(lambda: "accepted" in alice.states(a1), "A1 accepted")
    push(net, "alice", deliver(4, "B2 from bob"))
    net.run(lambda: "B2 from bob" in texts(store), "B2 stored")
    assert texts(store)[-4:] == ["A1", "A2", "A3", "B2 from bob"], "where typed: sending"
    push(net, "alice", GroupAccept(MsgId(alice.core.instance_id, 2), 911, 5, 2))
    push(net, "alice", GroupAccept(MsgId(alice.core.instance_id, 3), 912, 6, 2))
    net.run(lambda: "accepted" in alice.states(a3), "A2, A3 accepted")
    net.settle(0.5)  # committed
    accepted = [e for e in alice.of(StatusChanged) if e.state == "accepted"]
    assert [e.seq for e in accepted] == [3, 5, 6], "the window is told each one's place"
    order = ["B1 from bob", "A1", "B2 from bob", "A2", "A3"]
    assert texts(store)[1:] == order, "every member's order: bob's B2 was numbered before A2"
    lines = read_history(store.path, "#team")
    assert [line.seq for line in lines] == [1, 2, 3, 4, 5, 6]
    assert [line.state for line in lines if line.outgoing] == ["accepted"] * 3
    ids = [line.row_id for line in lines]
    assert ids == sorted(ids), "the rows' order is the group's: pages and search follow it"
    alice.core.abort()
    del net.clients[alice.addr]
    store.close()
    # After a restart the history reads back in the same order.
    again = ClientStore(tmp_path / "alice", "alice")
    assert texts(again)[1:] == order
    assert [line.seq for line in read_history(again.path, "#team")] == [1, 2, 3, 4, 5, 6]
    again.close()


def test_a_message_numbered_before_later_ones_stays_where_it_is(tmp_path: Path) -> None:
    """Nothing moves when the lines after ours were numbered after it, or
    are ours still sending: the row keeps its id."""
    store = ClientStore(tmp_path / "alice", "alice")
    store.add_group_event("team", "created", "bob", ("bob", "alice"), T0, 900, 1)
    first = MsgId(store.instance_id, 1)
    second = MsgId(store.instance_id, 2)
    store.add_outgoing(first, "#team", "mine")
    store.add_outgoing(second, "#team", "mine too")
    store.add_group_message("team", "bob", MsgId(77, 3), "later", T0 + 3, 903, 4)
    store.mark_shown(900)
    store.mark_shown(903)
    store.commit()
    before = [line.row_id for line in read_history(store.path, "#team")]
    store.set_recipients(first, 1, 2)
    store.set_recipients(second, 1, 3)
    store.commit()
    lines = read_history(store.path, "#team")
    assert [line.row_id for line in lines] == before
    assert [line.text for line in lines][1:] == ["mine", "mine too", "later"]
    store.close()
