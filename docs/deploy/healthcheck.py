"""Is a chat-server's loop alive? `python healthcheck.py [HOST:PORT]`
(default 127.0.0.1:5555): exit 0 if it answers, 1 if not, with one line
saying which.

It sends one datagram with the chat magic and a protocol version no server
speaks (0), padded as a pre-login request must be; a live server answers
with a short VERSION reply from its loop (the same thread that relays
messages), so an answer means the relay is running, not merely the process.
The server counts the probe as a dropped datagram ("unsupported version")
and logs that at most once per 10 s. Standard library only, and none of the
project's modules: it runs wherever Python does (a container's
HEALTHCHECK, a monitoring agent).
"""

from __future__ import annotations

import socket
import sys

MAGIC = b"UCHT"  # protocol.MAGIC
PROBE = MAGIC + bytes([0]) + bytes(251)  # 256 bytes: the least a pre-login request may be
TIMEOUT = 3.0  # seconds; a loaded server answers within milliseconds


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else "127.0.0.1:5555"
    if target.startswith("["):
        host, _, port_text = target[1:].partition("]:")
    else:
        host, _, port_text = target.rpartition(":")
    try:
        address = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_DGRAM)[0]
    except (ValueError, OSError) as exc:
        print(f"healthcheck: cannot use {target!r} ({exc}); give HOST:PORT", file=sys.stderr)
        return 1
    family, kind, proto, _, sockaddr = address
    with socket.socket(family, kind, proto) as probe:
        probe.settimeout(TIMEOUT)
        try:
            probe.sendto(PROBE, sockaddr)
            reply = probe.recv(2048)
        except OSError as exc:  # a timeout, or ICMP port unreachable
            print(f"healthcheck: chat-server at {target} does not answer ({exc})", file=sys.stderr)
            return 1
    if not reply.startswith(MAGIC):
        print(f"healthcheck: {target} answered, but not as a chat-server", file=sys.stderr)
        return 1
    print(f"healthcheck: chat-server at {target} answers")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
