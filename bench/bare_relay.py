"""The baseline: a bare UDP forwarding loop, the least any Python relay pays.

One recvfrom and one sendto per datagram, forwarded to a fixed peer found
by one dict lookup. A client joins with b"J" + pair name; when the second
client of a pair joins, both get b"L" and from then on everything from one
goes to the other. No parsing, no auth, no acks, no disk.

    python bench/bare_relay.py [PORT]    (prints "listening on HOST:PORT")
"""

from __future__ import annotations

import socket
import sys

Addr = tuple[str, int]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # no drops: no resends
    sock.bind(("127.0.0.1", int(args[0]) if args else 0))
    print("bare-relay listening on {}:{}".format(*sock.getsockname()), flush=True)
    waiting: dict[bytes, Addr] = {}
    peer: dict[Addr, Addr] = {}
    recvfrom, sendto, lookup = sock.recvfrom, sock.sendto, peer.get
    while True:
        data, addr = recvfrom(65535)
        to = lookup(addr)
        if to is not None:
            sendto(data, to)
        elif data[:1] == b"J":
            other = waiting.pop(data[1:], None)
            if other is None:
                waiting[data[1:]] = addr
            elif other != addr:
                peer[addr], peer[other] = other, addr
                sendto(b"L", addr)
                sendto(b"L", other)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(0)
