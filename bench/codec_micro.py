"""The wire codec alone: encode and decode time per message and frame kind.

    python -m bench.codec_micro [--number N] [--repeat R] [--json]

One sample value of every kind (the same values tests/test_protocol.py pins
byte for byte), each timed with `timeit` in both directions through the
public functions: `encode_message` / `decode_message` for chat messages,
`encode_frame` for frames and `decode_packet` for a tagged datagram that
carries up to eight frames of one kind (as many as fit; the figure is per
frame and includes its share of the MAC check). The best of `--repeat` runs is quoted, in ns.
The server's hot path decodes SEND, RECEIPT(S) and ACK and encodes
DELIVER, ACCEPT(S), DELIVERED and ACK for every message it relays.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: F401  (puts the project root on sys.path)
import protocol
from protocol import (
    FRAME_CLASSES,
    MESSAGE_CLASSES,
    Packet,
    decode_message,
    decode_packet,
    encode_frame,
    encode_message,
    encode_packet,
)

KEY = bytes(range(32))
SESSION = bytes(range(100, 116))
MSG_ID = protocol.MsgId(0x0123456789ABCDEF, 42)
TEXT = "1700000000000000000 42 ".ljust(100, "x")  # the load generator's text


def sample_messages() -> dict[str, Any]:
    """One typical value of each chat message kind."""
    code = protocol.ErrorCode.RATE_LIMITED
    samples = [
        protocol.Send(MSG_ID, "bob", TEXT),
        protocol.Accept(MSG_ID, 77),
        protocol.Fail(MSG_ID, protocol.ErrorCode.USER_OFFLINE, "bob is offline"),
        protocol.Deliver(77, MSG_ID, "alice", TEXT, 1_700_000_000_000),
        protocol.Receipt(77),
        protocol.Delivered(MSG_ID, "bob"),
        protocol.Accepts(tuple((protocol.MsgId(1, n), 100 + n) for n in range(8))),
        protocol.Receipts(tuple(range(100, 108))),
        protocol.Delivereds("bob", tuple(protocol.MsgId(1, n) for n in range(8))),
        protocol.Who("carol", 50),
        protocol.WhoReply(("alice", "bob", "carol"), "carol"),
        protocol.Presence("bob", True),
        protocol.Notice(code, "slow down"),
        protocol.Logout(),
        protocol.Bye(protocol.ErrorCode.LOGGED_IN_ELSEWHERE, "taken over"),
        protocol.Typing("bob"),
        protocol.Watch("bob"),
        protocol.Ticket(bytes(range(16))),
        protocol.ChangePassword(bytes(16), bytes(32), bytes(16), 600_000, bytes(64)),
        protocol.DeleteAccount(bytes(16), bytes(32)),
        protocol.AccountResult(bytes(16), protocol.ErrorCode.PASSWORD_CHANGED, "password changed"),
        protocol.GroupDeliver(77, 5, MSG_ID, "team", "alice", TEXT, 1_700_000_000_000),
        protocol.GroupEvent(78, 6, "team", protocol.GroupChange.ADDED, "alice", ("dave",), 1),
        protocol.GroupRequest(9, protocol.GroupAction.ADD, "team", ("dave",)),
        protocol.GroupResult(9, 0),
        protocol.GroupInfo(10, "team", "alice", ("alice", "bob", "carol")),
        protocol.GroupList(11, ("team", "ops")),
        protocol.GroupReached("team", protocol.MsgId(1, 8), tuple(f"m{n}" for n in range(8))),
        protocol.GroupAccept(MSG_ID, 77, 5, 2),
        protocol.GroupBatch(
            tuple(
                protocol.GroupDeliver(
                    77 + n, 5 + n, MSG_ID, "team", "alice", TEXT, 1_700_000_000_000
                )
                for n in range(4)
            )
        ),  # fmt: skip
    ]
    return {type(m).__name__: m for m in samples}


def sample_frames() -> dict[str, Any]:
    """One typical value of each frame kind."""
    samples = [
        protocol.Padding(bytes(40)),
        protocol.Ack(1000, 1500, 990, ((992, 995), (997, 999))),
        protocol.Ping(),
        protocol.Stream(1000, 7, 500, 0, 1, encode_message(sample_messages()["Deliver"])),
        protocol.Hello("alice", 0x0123456789ABCDEF, bytes(range(16))),
        protocol.Challenge(bytes(16), bytes(range(16)), bytes(16), 4096, bytes(range(256))),
        protocol.Login("alice", 7, bytes(16), bytes(16), bytes(32), bytes(256), bytes(64)),
        protocol.Welcome(bytes(16), bytes(range(16)), bytes(32), "alice"),
        protocol.Refused(bytes(16), protocol.ErrorCode.BAD_PASSWORD, "wrong password"),
        protocol.VersionFrame(),
        protocol.UnknownSession(),
        protocol.PathChallenge(bytes(range(8))),
        protocol.PathResponse(bytes(range(8))),
        protocol.TicketFrame(bytes(range(16))),
    ]
    return {type(f).__name__: f for f in samples}


def _check_samples(samples: dict[str, Any], classes: dict[int, type]) -> None:
    missing = {cls.__name__ for cls in classes.values()} - set(samples)
    if missing:
        raise SystemExit(f"bench/codec_micro.py has no sample of {sorted(missing)}; add one")


def best_ns(stmt: Any, number: int, repeat: int) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e9


def measure(number: int, repeat: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    messages = sample_messages()
    _check_samples(messages, MESSAGE_CLASSES)
    for name, message in messages.items():
        wire = encode_message(message)
        out[f"message {name}"] = {
            "encode_ns": best_ns(lambda m=message: encode_message(m), number, repeat),
            "decode_ns": best_ns(lambda w=wire: decode_message(w), number, repeat),
        }
    frames = sample_frames()
    _check_samples(frames, FRAME_CLASSES)
    for name, frame in frames.items():
        for per in range(8, 0, -1):  # as many as fit one datagram, up to eight
            try:
                datagram = encode_packet(Packet(SESSION, 5, (frame,) * per), KEY)
                break
            except protocol.LocalProtocolError:
                continue
        out[f"frame {name}"] = {
            "encode_ns": best_ns(lambda f=frame: encode_frame(f), number, repeat),
            "decode_ns": best_ns(lambda d=datagram: decode_packet(d, KEY), number // per, repeat)
            / per,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.codec_micro")
    parser.add_argument("--number", type=int, default=20_000, help="calls per timing run")
    parser.add_argument("--repeat", type=int, default=5, help="timing runs; the best is quoted")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    figures = measure(args.number, args.repeat)
    if args.json:
        print(json.dumps(figures, indent=1))
        return 0
    print(f"{'kind':<22} {'encode ns':>10} {'decode ns':>10}")
    for name, row in figures.items():
        print(f"{name:<22} {row['encode_ns']:>10.0f} {row['decode_ns']:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
