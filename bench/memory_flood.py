"""Memory under floods (issue 12): figures, not a test.

    python bench/memory_flood.py                     # both floods, 15 s each
    python bench/memory_flood.py --seconds 5 --sessions 200
    python bench/memory_flood.py --server-script OTHER/chat_server.py   # another tree

1. One logged-in session sends WHO, WATCH and TYPING requests for
   `--seconds` and never acknowledges anything the server sends (its
   Connection takes the server's acks, so it retransmits what was not
   taken, but every ACK frame it would send is cut out). Target: the
   server's resident memory grows by at most 16 MiB (before the caps:
   26 MiB -> 2.3 GiB in 15 s).
2. `--sessions` sessions each send four 60 KB messages but their last
   fragments, so the server holds the rest for reassembly until the
   session ends. The total is capped (`max_reassembly`, 32 MiB), not only
   each session's 256 KiB (before: 4.8 GiB at the 20,000-session cap).

The server is `chat_server.py` as a process on 127.0.0.1 with its own data
directory and the rate limits raised (as `python -m bench` does), so that
what bounds memory here is the caps, not the per-user rate limits; its
memory is VmRSS from /proc/PID/status. The clients are the load generator's
(`loadgen.Handshake` for the login, `reliability.Connection` for the rest).
"""

from __future__ import annotations

import argparse
import secrets
import selectors
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/memory_flood.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ROOT
from bench.loadgen import RTO_MAX, RTO_MIN, Handshake, drive_logins, new_socket
from bench.run import ITERATIONS, Child
from protocol import (
    CONTROL_STREAM,
    Ack,
    Message,
    MsgId,
    Packet,
    ProtocolError,
    Send,
    Stream,
    Typing,
    Watch,
    Who,
    conversation_stream,
    decode_message,
    decode_packet,
    encode_message,
    encode_packet,
)
from reliability import CHUNK_SIZE, Connection, PayloadReceived

MIB = 1024 * 1024
QUEUED = 512  # requests the flooding client keeps queued on its Connection
FRAGMENT_WINDOW = 16  # fragments a session sends beyond what was acked
FRAGMENT_RESEND = 0.5  # seconds without an ack before it sends them again


def start_server(script: Path, tmp: Path) -> Child:
    data = Path(tempfile.mkdtemp(prefix="data-", dir=tmp))
    command = [
        sys.executable, str(script), "--host", "127.0.0.1", "--port", "0", "--data-dir",
        str(data), "--pbkdf2-iterations", str(ITERATIONS), "--preauth-rate", "1000000",
        "--user-msg-rate", "1000000", "--registration-rate", "1000000",
        "--rto-min", str(RTO_MIN), "--rto-max", str(RTO_MAX), "--log-level", "warning",
    ]  # fmt: skip
    return Child(command, data / "server.log")


class Client:
    """A logged-in session driven from here: which chunks and frames of its
    datagrams leave is up to `keep_acks` and `keep_chunk`."""

    def __init__(self, h: Handshake, *, keep_acks: bool,
                 keep_chunk: Callable[[Stream], bool] = lambda f: True) -> None:  # fmt: skip
        assert h.conn is not None
        self.name = h.name
        self.sock = h.sock
        self.conn: Connection = h.conn
        self.keep_acks = keep_acks
        self.keep_chunk = keep_chunk
        self.queued = 0  # messages handed to the Connection ...
        self.chunks = 0  # ... in this many chunks (fragments)
        self.replies = 0  # messages the server sent us

    def send(self, message: Message, stream: int = CONTROL_STREAM) -> None:
        before = self.conn.unacked
        self.conn.send(encode_message(message), stream)
        self.queued += 1
        self.chunks += self.conn.unacked - before

    @property
    def taken(self) -> int:
        """Chunks the server has acked (so taken)."""
        return self.chunks - self.conn.unacked

    def read(self, now: float) -> None:
        while True:
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError:
                continue
            if self.conn.receive_datagram(data, now):
                for event in self.conn.take_events():
                    if isinstance(event, PayloadReceived):
                        try:
                            decode_message(event.payload)
                        except ProtocolError:
                            continue
                        self.replies += 1

    def pump(self, now: float) -> None:
        conn = self.conn
        timer = conn.get_timer()
        if timer is not None and timer <= now:
            conn.handle_timer(now)
        for data in conn.datagrams_to_send(now):
            if not self.keep_acks or self.keep_chunk is not _ALL:
                packet = decode_packet(data, conn.key)
                frames = tuple(
                    f for f in packet.frames
                    if not (isinstance(f, Ack) and not self.keep_acks)
                    and not (isinstance(f, Stream) and not self.keep_chunk(f))
                )  # fmt: skip
                if not frames:
                    continue
                data = encode_packet(Packet(packet.session_id, packet.pkt_num, frames), conn.key)
            try:
                self.sock.send(data)
            except OSError:
                pass  # a full buffer: the Connection resends


def _all(frame: Stream) -> bool:
    return True


_ALL = _all


def log_in(server: Child, names: list[str]) -> list[Handshake]:
    handshakes = [Handshake(name, new_socket(server.address)) for name in names]
    drive_logins(handshakes)
    for h in handshakes:
        assert h.conn is not None
        # The load generator's timers (the server runs with the same).
        h.conn.rto_min, h.conn.rto_max = RTO_MIN, RTO_MAX
    return handshakes


def run(server: Child, clients: list[Any], seconds: float, feed: Callable[[], None],
        report: Callable[[float, int], str], rss_stop: int) -> tuple[int, int, int]:  # fmt: skip
    """Drive `clients` for `seconds`, calling `feed()` before every pass;
    print a line a second. (RSS at start, at the end, at most.)"""
    selector = selectors.DefaultSelector()
    for client in clients:
        selector.register(client.sock, selectors.EVENT_READ, client)
    start_rss = server.rss_kib() * 1024
    peak = start_rss
    t0 = time.monotonic()
    next_line = t0 + 1.0
    try:
        while (now := time.monotonic()) < t0 + seconds:
            feed()
            for client in clients:
                client.pump(now)
            for key, _ in selector.select(0.005):
                key.data.read(time.monotonic())
            if now >= next_line:
                next_line += 1.0
                rss = server.rss_kib() * 1024
                peak = max(peak, rss)
                growth = (rss - start_rss) / MIB
                print(f"{now - t0:5.1f} s  RSS {rss / MIB:7.1f} MiB  ({growth:+7.1f})  "
                      f"{report(now, rss)}", flush=True)  # fmt: skip
                if rss > rss_stop:
                    print(f"stopped: RSS over {rss_stop // MIB} MiB", flush=True)
                    break
    finally:
        selector.close()
    end_rss = server.rss_kib() * 1024
    return start_rss, end_rss, max(peak, end_rss)


def request_flood(script: Path, tmp: Path, seconds: float, rss_stop: int) -> None:
    print(f"\n1. WHO/WATCH/TYPING flood from one session that never acks, {seconds:.0f} s")
    server = start_server(script, tmp)
    try:
        attacker_h, peer_h = log_in(server, [f"flood{secrets.token_hex(3)}", "floodpeer"])
        attacker = Client(attacker_h, keep_acks=False)
        peer = Client(peer_h, keep_acks=False)  # the one typed to; it never acks either
        attacker.send(Watch(peer.name))  # makes the attacker a contact: typing reaches the peer

        def feed() -> None:
            while attacker.conn.unacked < QUEUED:
                attacker.send(Who())
                attacker.send(Watch(peer.name))
                attacker.send(Typing(peer.name))

        def report(now: float, rss: int) -> str:
            return (f"requests queued {attacker.queued:>9,}  taken {attacker.taken:>7,}  "
                    f"replies seen {attacker.replies:>6,}  typing seen by the peer "
                    f"{peer.replies:>4,}")  # fmt: skip

        start, end, peak = run(server, [attacker, peer], seconds, feed, report, rss_stop)
        print(f"result: RSS {start / MIB:.1f} -> {end / MIB:.1f} MiB, growth "
              f"{(end - start) / MIB:+.1f} MiB (peak {(peak - start) / MIB:+.1f}; target <= "
              f"16 MiB); {attacker.taken:,} of {attacker.queued:,} requests taken")  # fmt: skip
    finally:
        server.stop()


class FragmentSender:
    """A session that sends fragments of four long messages, each but its
    last, as an attacker would craft them: chunk numbers without a gap (so
    the server takes and acks them), one stream per message. At most
    FRAGMENT_WINDOW beyond what the server acked (`taken`); when that stops
    moving for a while, from there again (go-back-N)."""

    def __init__(self, h: Handshake, text: str) -> None:
        assert h.conn is not None
        self.sock = h.sock
        self.conn: Connection = h.conn
        self.frames: list[Stream] = []
        seq = 0
        for k in range(4):  # MAX_PARTIAL_MESSAGES: one per stream
            to = f"nobody{k}"
            payload = encode_message(Send(MsgId(h.instance_id, k + 1), to, text))
            pieces = [payload[i : i + CHUNK_SIZE] for i in range(0, len(payload), CHUNK_SIZE)]
            for index, piece in enumerate(pieces[:-1]):
                self.frames.append(Stream(seq, conversation_stream(to), index, index,
                                          len(pieces), piece))  # fmt: skip
                seq += 1
        self.next = 0
        self.taken = 0
        self.moved = 0.0  # when `taken` last moved

    def pump(self, now: float) -> None:
        if self.next - self.taken >= FRAGMENT_WINDOW and now - self.moved > FRAGMENT_RESEND:
            self.next, self.moved = self.taken, now
        end = min(self.next + 4, self.taken + FRAGMENT_WINDOW)
        for frame in self.frames[self.next : end]:
            try:
                self.sock.send(self.conn.make_probe((frame,)))
            except OSError:
                break
            self.next += 1

    def read(self, now: float) -> None:
        while True:
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError:
                continue
            try:
                packet = decode_packet(data, self.conn.peer_key)
            except ProtocolError:
                continue
            for frame in packet.frames:
                if isinstance(frame, Ack) and frame.una > self.taken:
                    self.taken, self.moved = frame.una, now


def fragment_flood(script: Path, tmp: Path, seconds: float, sessions: int, rss_stop: int) -> None:
    print(f"\n2. {sessions} sessions, each sending four 60 KB messages but their last "
          f"fragments, {seconds:.0f} s")  # fmt: skip
    server = start_server(script, tmp)
    try:
        handshakes = log_in(server, [f"frag{i:05d}" for i in range(sessions)])
        senders = [FragmentSender(h, "f" * 60_000) for h in handshakes]
        attempted = sum(len(f.data) for s in senders for f in s.frames)

        def report(now: float, rss: int) -> str:
            taken = sum(s.taken for s in senders)
            sent = sum(s.next for s in senders)
            return f"sent up to {sent:>7,}  taken (acked) {taken:>7,}"

        start, end, peak = run(server, senders, seconds, lambda: None, report, rss_stop)
        taken = sum(len(f.data) for s in senders for f in s.frames[: s.taken])
        print(f"result: RSS {start / MIB:.1f} -> {end / MIB:.1f} MiB, growth "
              f"{(end - start) / MIB:+.1f} MiB (peak {(peak - start) / MIB:+.1f}); held "
              f"{taken / MIB:.1f} MiB of the {attempted / MIB:.1f} MiB sent (cap: 32 MiB in "
              "all, 256 KiB a session)")  # fmt: skip
        for sender in senders:
            sender.sock.close()
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per flood (default 15)")
    parser.add_argument("--sessions", type=int, default=400,
                        help="sessions of the fragment flood (default 400)")  # fmt: skip
    parser.add_argument("--server-script", type=Path, default=ROOT / "chat_server.py",
                        help="the server to run (default this tree's)")  # fmt: skip
    parser.add_argument("--rss-stop", type=int, default=3072, metavar="MIB",
                        help="stop a flood once the server's RSS is over this "
                        "(default 3072)")  # fmt: skip
    parser.add_argument("--only", choices=["requests", "fragments"], default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="memory-flood-") as tmp_name:
        tmp = Path(tmp_name)
        if args.only in (None, "requests"):
            request_flood(args.server_script, tmp, args.seconds, args.rss_stop * MIB)
        if args.only in (None, "fragments"):
            fragment_flood(args.server_script, tmp, args.seconds, args.sessions,
                           args.rss_stop * MIB)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
