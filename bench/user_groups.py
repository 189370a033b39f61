"""What a message costs the server when its sender is in many groups (figures only).

    python -m bench.user_groups [--messages 1000] [--groups 5000]

The server's logic alone (`chat_server.Relay` in-process, no sockets, as
`bench.relay_micro`): one sender and one receiver (the benchmark's load
clients), lone direct messages (window 1: each in its own datagram, as a
person types them), the Relay's CPU per message:

- with the sender in no group;
- with the sender in `--groups` groups (solo groups put straight into the
  server's group table, as `/create #m0` ... `/create #m4999` leaves them);
- the same, with the fan-out cost worked out the way it was before audit7
  N13 (`walk_all_groups`, kept here to compare within one run): every
  datagram with a message walked all its sender's groups.

Audit7 N13 measured the old way on a real server at load ~20: 1,000 ->
5,033 us per direct message after 5,000 `/create`s (its scenario a16).
bench/README.md, "A user in many groups".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: F401  (puts the project root on sys.path)
from bench.relay_micro import make_relay, pairs_of, relay_messages
from chat_server import _SEND_KIND, Relay
from protocol import Stream, name_key
from server_groups import group_name
from server_records import User

WARM_UP = 100


def walk_all_groups(relay: Relay, user: User, new: list[Stream]) -> int:
    """`Relay._fanout_cost` as it was before audit7 N13: every group of the
    sender looked up, for every datagram with a message."""
    groups = relay.groups.of_user.get(user.key)
    if not groups:
        return 0
    by_stream: dict[int, int] = {}
    for group_key in groups:
        group = relay.groups.get(group_key)
        if group is None:
            continue
        stream = relay._group_stream(group)
        by_stream[stream] = max(by_stream.get(stream, 0), len(group.members) - 1)
    return sum(by_stream.get(f.stream, 0) for f in new
               if f.index == 0 and f.data[:1] == _SEND_KIND)  # fmt: skip


def measure(messages: int, groups: int) -> dict[str, Any]:
    relay = make_relay()
    senders, receivers, addrs = pairs_of(relay, 1, 1)
    sender = senders[0]
    sent = WARM_UP

    def per_message() -> float:
        nonlocal sent
        before = sender.completed
        sent += messages
        cpu = relay_messages(relay, senders, receivers, addrs, sent, 1)
        return cpu / max(1, sender.completed - before) * 1e6

    relay_messages(relay, senders, receivers, addrs, sent, 1)  # warm up
    out: dict[str, Any] = {"messages": messages, "groups": groups}
    out["us_per_msg_in_no_group"] = per_message()
    owner = (name_key(sender.name), sender.name)
    for n in range(groups):
        name, key = group_name(f"m{n}")
        relay.groups.create(name, key, owner, [])
    out["us_per_msg_in_groups"] = per_message()
    relay._fanout_cost = lambda user, new: walk_all_groups(relay, user, new)  # type: ignore[method-assign]
    out["us_per_msg_in_groups_old_walk"] = per_message()
    out["lost"] = sender.sent - receivers[0].received
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.user_groups")
    parser.add_argument("--messages", type=int, default=1000, help="per measurement")
    parser.add_argument("--groups", type=int, default=5000, help="the sender's groups")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    result = measure(args.messages, args.groups)
    if args.json:
        print(json.dumps(result))
        return 0
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"Relay CPU per lone direct message ({args.messages} each, load average {load}):")
    rows = [
        ("sender in no group", result["us_per_msg_in_no_group"]),
        (f"sender in {args.groups:,} groups", result["us_per_msg_in_groups"]),
        (f"in {args.groups:,} groups, the old walk (N13)", result["us_per_msg_in_groups_old_walk"]),
    ]
    for label, figure in rows:
        print(f"  {label + ':':<40} {figure:8.1f} us")
    print(f"  messages lost: {result['lost']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
