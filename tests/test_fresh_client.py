"""What a new user's first hour found on the client side (session 8,
"fresh"), without a display: a group message refused `mailbox_full` names
the member who holds the group back (the event, the terminal's line, the
window's words for its line and hover), a refused group message is not
"none has it yet", and two addresses typed into one Server field are
refused as such instead of being tried as an IPv6 host.

In memory: `ClientCore` against the real `Relay` on a fake clock (the
`Net` of tests/test_client_core.py), and the pure functions the front
ends use."""

from __future__ import annotations

from pathlib import Path

import pytest

from chat_client import event_to_text
from chat_server import ServerConfig
from client_core import (
    BacklogFull,
    ClientError,
    ErrorEvent,
    GroupChanged,
    MessageReceived,
    MessageState,
    StatusChanged,
)
from client_health import describe
from client_store import ClientStore, Timeline, read_history
from client_transcript import failure_reason
from common import parse_server, parse_servers, size_text
from protocol import GroupAction
from server_groups import backlog_full_text
from tests.test_client_core import Net
from tests.test_groups_client import add, login

CAROL_HOLDS = backlog_full_text("team", "carol", 268, 10_485_758)


def test_who_holds_a_group_back_is_read_from_the_servers_words() -> None:
    backlog = BacklogFull.parse(CAROL_HOLDS)
    assert backlog == BacklogFull("team", "carol", 268, "10.0 MiB")
    assert backlog.short == "carol's backlog is full"
    assert backlog.explained == (
        "268 messages (10.0 MiB) wait for carol, the member furthest behind; it empties as "
        "carol reads, leaves or is removed by the owner"
    )
    # Any name the rules allow: letters of any script, digits, `_`, `-`, `.`.
    odd = BacklogFull.parse(backlog_full_text("Équipe_2", "zoë.k-1", 3, 12))
    assert odd == BacklogFull("Équipe_2", "zoë.k-1", 3, "12 bytes")
    # Anything else is not read as a group held back: a person's mailbox,
    # a server that named nobody, other reasons' words.
    for text in ("bob's mailbox is full", backlog_full_text("team", "", 3, 12),
                 "you are not a member of #team", ""):  # fmt: skip
        assert BacklogFull.parse(text) is None, text


def test_sizes_read_for_people() -> None:
    assert [size_text(n) for n in (0, 1023, 1024, 40 * 1024 + 5, 10_485_758)] == [
        "0 bytes", "1023 bytes", "1 KiB", "40 KiB", "10.0 MiB"]  # fmt: skip


def test_a_group_message_refused_mailbox_full_carries_who_holds_the_group_back(
    tmp_path: Path,
) -> None:
    """On the relay: carol never shows (so never receipts) what she gets;
    past the cap alice's post fails `mailbox_full`, and its `failed` event
    says why in the server's words: whom (before, only the `error` after
    it did, and the window drops that error). alice's store keeps why, for
    the line after a restart (it said "✗ failed" alone then)."""
    net = Net(ServerConfig(iterations=4096, key_workers=0, mailbox_messages=3))
    store = ClientStore(tmp_path / "alice", "alice")
    alice = add(net, "alice", store=store)
    bob, carol = login(net, "bob", "carol")
    net.run(lambda: alice.logged_in, "alice logged in")
    carol.shows = False
    alice.core.group_request(GroupAction.CREATE, "team", ("bob", "carol"))
    net.run(lambda: bool(carol.of(GroupChanged)), "carol has the group's creation")
    ids = [alice.core.send(f"m{n}", net.now, to="#team") for n in range(2)]
    net.settle(1.0)  # bob's receipts (held up to 120 ms) have come: carol alone is behind
    ids.append(alice.core.send("m2", net.now, to="#team"))
    net.run(lambda: MessageState.FAILED in alice.states(ids[-1]), "the third failed")
    (failed,) = [e for e in alice.of(StatusChanged) if e.state == MessageState.FAILED]
    assert failed.reason == "mailbox_full" and failed.group == "team"
    assert failed.detail.startswith("#team: carol's backlog is full"), failed.detail
    assert failed.backlog is not None and failed.backlog.holder == "carol"
    # The JSON is as before: the `error` event after it carries the words.
    assert "detail" not in failed.to_json()
    assert [e.message for e in alice.of(ErrorEvent)] == [failed.detail]
    assert all(MessageState.ACCEPTED in alice.states(i) for i in ids[:2])
    # A message the client refuses itself has no server words.
    with pytest.raises(ClientError):
        alice.core.send("x" * 70_000, net.now, to="#team")
    assert [e.text for e in bob.of(MessageReceived)] == ["m0", "m1"]
    store.commit()
    store.close()
    kept = ClientStore(tmp_path / "alice", "alice")  # the next run's
    try:
        (line,) = [h for h in read_history(kept.path, "#team") if h.msg_id == ids[-1]]
    finally:
        kept.close()
    assert (line.state, line.reason, line.detail) == ("failed", "mailbox_full", failed.detail)
    assert [h.reason for h in read_history(kept.path, "#team") if h.msg_id in ids[:2]] == [
        None, None]  # fmt: skip


def test_the_terminals_line_names_the_member_and_what_frees_the_group() -> None:
    failed = StatusChanged("i-3", MessageState.FAILED, "#team", "hi all", "mailbox_full",
                           detail=CAROL_HOLDS)  # fmt: skip
    assert event_to_text(failed) == (
        "  \u2717 failed (mailbox_full) (to #team: hi all): 268 messages (10.0 MiB) wait for "
        "carol, the member furthest behind; it empties as carol reads, leaves or is removed "
        "by the owner", True)  # fmt: skip
    # A person's full mailbox, and a failure without the server's words, as before.
    direct = StatusChanged("i-4", MessageState.FAILED, "bob", "hi", "mailbox_full",
                           detail="bob's mailbox is full")  # fmt: skip
    assert event_to_text(direct) == ("  \u2717 failed (mailbox_full) (to bob: hi)", True)
    plain = StatusChanged("i-5", MessageState.FAILED, "#team", "hi", "mailbox_full")
    assert event_to_text(plain) == ("  \u2717 failed (mailbox_full) (to #team: hi)", True)


def test_the_windows_words_for_the_failed_line_and_its_hover() -> None:
    assert failure_reason("mailbox_full", CAROL_HOLDS) == "carol's backlog is full"
    assert failure_reason("mailbox_full", "bob's mailbox is full") == "mailbox full"
    assert failure_reason("not_a_member") == "not a member"
    timeline = Timeline("failed", 1_700_000_000_000, None, None, 0)
    hover = describe(timeline, state="failed", stamp=1_700_000_000.0, reason="mailbox_full",
                     detail=CAROL_HOLDS)  # fmt: skip
    assert ("Failed     mailbox full: carol's backlog is full\n"
            "Waiting    268 messages (10.0 MiB) for carol, furthest behind\n"
            "Empties    as carol reads, leaves or is removed by the owner\n") in hover  # fmt: skip
    plain = describe(timeline, state="failed", stamp=1_700_000_000.0, reason="mailbox_full")
    assert "Failed     mailbox full\n" in plain


@pytest.mark.parametrize(
    "text", ["127.0.0.1:5588127.0.0.1:5555", "127.0.0.1:5555:5555", "host:name:5"]
)
def test_two_addresses_typed_into_one_server_field_are_not_an_ipv6_host(text: str) -> None:
    """Typing into a pre-filled Server field gave `127.0.0.1:5588127.0.0.1:5555`,
    which was tried as an IPv6 host: "Server [127.0.0.1:5588127.0.0.1:5555]:5555
    does not answer. Is it running?" sent the person looking for the server."""
    with pytest.raises(ValueError, match=r"is not HOST:PORT \(an IPv6 address goes in brackets"):
        parse_server(text)
    with pytest.raises(ValueError, match="server 2 of 2: .* is not HOST:PORT"):
        parse_servers(f"a:1,{text}")


def test_ipv6_addresses_are_still_read_with_and_without_brackets() -> None:
    assert parse_server("::1") == ("::1", 5555)
    assert parse_server("[::1]:7") == ("::1", 7)
    assert parse_server("fe80::1%eth0") == ("fe80::1%eth0", 5555)
    assert parse_server("[fe80::1%eth0]:9") == ("fe80::1%eth0", 9)
    assert parse_server("chat.example.org:5556") == ("chat.example.org", 5556)
