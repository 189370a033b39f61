"""The group messages of the wire format (issue 14, kinds 19-26 and 30, codes 19-23).

`tests/test_protocol.py` round-trips, fuzzes and holds every kind to its
SPEC by itself (its strategies are built from each declaration); this file
pins the group kinds' bytes (which that file's pinned list takes in), and
checks what is particular to groups: the `#` addressing, the numbers agreed
with the client side, and that the largest group messages the server may
build still fit one message.
"""

from __future__ import annotations

from typing import Any

import pytest

import protocol
from protocol import (
    GROUP_PAGE_MAX,
    GROUP_REQUEST_USERS_MAX,
    NAME_MAX,
    ErrorCode,
    GroupAccept,
    GroupAction,
    GroupBatch,
    GroupChange,
    GroupDeliver,
    GroupEvent,
    GroupInfo,
    GroupList,
    GroupReached,
    GroupRequest,
    GroupResult,
    Kind,
    LocalProtocolError,
    MsgId,
    RemoteProtocolError,
    decode_message,
    encode_message,
)
from reliability import Connection

MSG = MsgId(0x0123456789ABCDEF, 42)
#: The longest name there is in UTF-8: 32 letters of 4 bytes each.
WIDEST_NAME = "\U00020000" * NAME_MAX

PINNED_GROUP_MESSAGES: list[tuple[Any, str]] = [
    (
        GroupDeliver(77, 5, MSG, "team", "alice", "hi", 1_700_000_000_000),
        (
            "13000000000000004d00000000000000050123456789abcdef000000000000002a00047465616d0005616c"
            "6963650000000268690000018bcfe56800"
        ),
    ),
    (
        GroupEvent(
            78, 1, "team", GroupChange.CREATED, "alice", ("alice", "bob"), 1_700_000_000_000
        ),
        (
            "14000000000000004e000000000000000100047465616d010005616c69636500020005616c6963650003626f"
            "620000018bcfe56800"
        ),
    ),
    (
        GroupRequest(9, GroupAction.ADD, "team", ("dave",)),
        "1500000000000000090200047465616d0001000464617665",
    ),
    (
        GroupRequest(10, GroupAction.LIST, ""),
        "15000000000000000a0600000000",
    ),
    (
        GroupResult(9, ErrorCode.NOT_OWNER, "only alice removes members"),
        "16000000000000000917001a6f6e6c7920616c6963652072656d6f766573206d656d62657273",
    ),
    (
        GroupResult(10, 0),
        "16000000000000000a000000",
    ),
    (
        GroupInfo(11, "team", "alice", ("alice", "bob")),
        "17000000000000000b00047465616d0005616c69636500020005616c6963650003626f6200",
    ),
    (
        GroupList(12, ("team", "ops"), more=True),
        "18000000000000000c000200047465616d00036f707301",
    ),
    (
        GroupAccept(MsgId(1, 2), 77, 5, 2),
        "1a00000000000000010000000000000002000000000000004d000000000000000500000002",
    ),
    (
        GroupReached("team", MsgId(1, 2), ("bob", "carol")),
        "1e00047465616d0000000000000001000000000000000200020003626f6200056361726f6c0000",
    ),
    (
        GroupReached("team", MsgId(1, 2), (), ("dave",)),
        "1e00047465616d0000000000000001000000000000000200000001000464617665",
    ),
    (
        GroupBatch(
            (
                GroupDeliver(77, 5, MSG, "team", "alice", "hi", 1_700_000_000_000),
                GroupEvent(78, 6, "team", GroupChange.ADDED, "alice", ("dave",), 1_700_000_000_000),
            )
        ),  # fmt: skip
        (
            "1f00020000003c13000000000000004d00000000000000050123456789abcdef000000000000002a0004"
            "7465616d0005616c6963650000000268690000018bcfe568000000002f14000000000000004e00000000"
            "0000000600047465616d020005616c69636500010004646176650000018bcfe56800"
        ),
    ),
]


@pytest.mark.parametrize(("message", "wire"), PINNED_GROUP_MESSAGES, ids=repr)
def test_group_message_bytes_are_pinned(message: Any, wire: str) -> None:
    assert encode_message(message).hex() == wire
    assert decode_message(bytes.fromhex(wire)) == message


def test_the_numbers_agreed_with_the_client_side() -> None:
    # Kinds 19-26 and codes 19-23 belong to the groups (agreed with the client
    # side); 25 (GROUP_DELIVEREDS, a frame per member) was retired for 30; 31
    # (GROUP_BATCH, several entries for one member in one payload) was set aside.
    assert [int(k) for k in Kind if k.name.startswith("GROUP_")] == [
        19, 20, 21, 22, 23, 24, 26, 30, 31,
    ]  # fmt: skip
    assert {c.label: int(c) for c in ErrorCode if 19 <= c <= 23} == {
        "no_such_group": 19,
        "not_a_member": 20,
        "group_exists": 21,
        "group_full": 22,
        "not_owner": 23,
    }
    assert [c.label for c in GroupChange] == ["created", "added", "removed", "left", "owner"]
    assert [int(a) for a in GroupAction] == [1, 2, 3, 4, 5, 6]


def test_a_group_is_addressed_with_a_hash() -> None:
    assert protocol.group_address("team") == "#team"
    assert protocol.is_group_address("#team")
    assert not protocol.is_group_address("team")
    # Its own namespace: #bob and bob are different peers, on different streams.
    assert protocol.conversation_stream("#bob") != protocol.conversation_stream("bob")


def test_the_largest_group_messages_fit_one_message() -> None:
    """A GROUP_EVENT naming GROUP_REQUEST_USERS_MAX of the widest names, and
    a GROUP_INFO page or a GROUP_REACHED of GROUP_PAGE_MAX of them, are within
    what one reliable message may carry (the server never builds one it
    cannot send)."""
    users = (WIDEST_NAME,) * GROUP_REQUEST_USERS_MAX
    event = GroupEvent(2**64 - 1, 2**64 - 1, WIDEST_NAME, GroupChange.ADDED, WIDEST_NAME,
                       users, 2**64 - 1)  # fmt: skip
    page = GroupInfo(2**64 - 1, WIDEST_NAME, WIDEST_NAME, (WIDEST_NAME,) * GROUP_PAGE_MAX, True)
    widest = (WIDEST_NAME,) * GROUP_PAGE_MAX
    reached = GroupReached(WIDEST_NAME, MsgId(2**64 - 1, 2**64 - 1), widest)
    for message in (event, page, GroupList(1, (WIDEST_NAME,) * GROUP_PAGE_MAX, True), reached):
        data = encode_message(message)
        assert len(data) <= protocol.MAX_TEXT_BYTES
        Connection(bytes(16), bytes(32), 0.0).send(data, 1)  # refuses what cannot go
        assert decode_message(data) == message


@pytest.mark.parametrize(
    "data",
    [
        "1500000000000000090200047465616d00010004646176",  # a user name cut short
        "1500000000000000090200047465616d0002000464617665",  # one user of two
        "17000000000000000b00047465616d0005616c69636500020005616c6963650003626f6202",  # more = 2
        "16000000000000000a0000",  # no room for the message's length
        "1a00000000000000010000000000000002000000000000004d0000000000000005000000",  # short
        "1900047465616d0003626f6200",  # an empty batch
        "14000000000000004e000000000000000100047465616d0100029fff00000000018bcfe56800",  # bad UTF-8
    ],
)
def test_bad_group_messages_are_refused_with_a_remote_error(data: str) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(bytes.fromhex(data))


def test_a_request_id_and_action_out_of_range_are_refused_locally() -> None:
    with pytest.raises(LocalProtocolError, match="GroupRequest.request_id"):
        encode_message(GroupRequest(-1, GroupAction.CREATE, "team"))
    with pytest.raises(LocalProtocolError, match="GroupRequest.action"):
        encode_message(GroupRequest(1, 256, "team"))
    with pytest.raises(LocalProtocolError, match="GroupAccept.recipients"):
        encode_message(GroupAccept(MSG, 1, 1, 2**32))
