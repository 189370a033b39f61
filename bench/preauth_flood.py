"""Pre-login floods and strangers' wrong passwords against a real server
(issue 12, items 5 and 8).

    python -m bench.preauth_flood                 # about a minute
    python -m bench.preauth_flood --seconds 5 --rate 60000 --flooders 2

1. An honest pair (two real `ChatSession`s, alice sends bob a message every
   20 ms) on a server with the default limits: one-way latency p50/p99/max
   with no flood, then while worker processes send HELLOs from 200 sockets
   bound to 127.0.1.1 .. 127.0.1.200 as fast as asked (the rate achieved is
   printed: on a 2-core machine the flooders, the server and the pair share
   two cores). Then the same flood against a server started with
   `--preauth-total-rate 1e9`, i.e. without the global pre-login budget: what
   the server did before it (the per-address limit, 500/s, lets 200
   addresses through).
2. Lockout: bob logs in once (his client keeps the login ticket), then
   wrong passwords for bob arrive at 5/s from 50 addresses (127.0.2.1 ..
   127.0.2.50, full HELLO/CHALLENGE/LOGIN exchanges). Meanwhile bob's client
   logs in again (with its ticket), and a client of bob's without a ticket
   (another device) tries too: seconds until each got its answer.

Every figure is printed; nothing is asserted (tests/test_login_guard.py
holds the rules with a fake clock).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import queue
import secrets
import select
import socket
import sys
import tempfile
import time
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/preauth_flood.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import ITERATIONS, Child, percentile, udp_drops
from chat_client import ChatSession, ErrorEvent, LoggedIn, MessageReceived
from client_core import ClientCore
from protocol import (
    HELLO_SIZE,
    NO_SESSION,
    Challenge,
    Hello,
    Packet,
    Refused,
    RemoteProtocolError,
    decode_packet,
    encode_packet,
    salted_password,
)

Address = tuple[str, int]
PASSWORD = "correct horse battery staple"
WRONG = "not the password"
FLOOD_HOSTS = [f"127.0.1.{i}" for i in range(1, 201)]
GUESS_HOSTS = [f"127.0.2.{i}" for i in range(1, 51)]


def start_server(tmp: Path, label: str, *extra: str) -> Child:
    data = Path(tempfile.mkdtemp(prefix=f"data-{label}-", dir=tmp))
    command = [
        sys.executable, "chat_server.py", "--host", "127.0.0.1", "--port", "0",
        "--data-dir", str(data), "--pbkdf2-iterations", str(ITERATIONS),
        "--log-level", "warning", *extra,
    ]  # fmt: skip
    child = Child(command, data / "server.log")
    child.data_dir = data
    return child


# --- the flood (worker processes) -----------------------------------------------------------


def flood(server: Address, hosts: list[str], rate: float, go: EventType, stop: EventType,
          out: Any) -> None:  # fmt: skip
    """HELLOs (padded to 400 bytes, each socket its own name) round-robin
    from sockets bound to `hosts`, paced to `rate`, between `go` and `stop`."""
    socks = []
    datagrams = []
    for i, host in enumerate(hosts):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sock.setblocking(False)
        socks.append(sock)
        hello = Hello(f"flood{host.replace('.', '_')}", i, secrets.token_bytes(16))
        datagrams.append(encode_packet(Packet(NO_SESSION, 0, (hello,)), None, pad_to=HELLO_SIZE))
    go.wait()
    sent = failed = 0
    start = time.monotonic()
    n = len(socks)
    while not stop.is_set():
        due = min(int((time.monotonic() - start) * rate), sent + 2000)
        while sent < due:
            k = sent % n
            try:
                socks[k].sendto(datagrams[k], server)
            except OSError:
                failed += 1  # a full send buffer: not sent
            sent += 1
        time.sleep(0.0005)
        # Answers (CHALLENGEs) are read and thrown away so no buffer fills.
        for sock in socks[:: max(1, n // 20)]:
            try:
                while sock.recv(2048):
                    pass
            except OSError:
                pass
    out.put((sent - failed, time.monotonic() - start))
    for sock in socks:
        sock.close()


class Flood:
    """`processes` flood workers sharing `rate` and the 200 addresses."""

    def __init__(self, server: Address, rate: float, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.go, self.stop_event = ctx.Event(), ctx.Event()
        self.out: Any = ctx.Queue()
        shares = [FLOOD_HOSTS[i::processes] for i in range(processes)]
        self.procs = [
            ctx.Process(target=flood, args=(server, hosts, rate / processes, self.go,
                                            self.stop_event, self.out), daemon=True)
            for hosts in shares
        ]  # fmt: skip
        for p in self.procs:
            p.start()
        time.sleep(1.0)  # imports and sockets ready

    def start(self) -> None:
        self.go.set()

    def stop(self) -> tuple[int, float]:
        self.stop_event.set()
        results = [self.out.get(timeout=30) for _ in self.procs]
        for p in self.procs:
            p.join(10)
        return sum(r[0] for r in results), max(r[1] for r in results)


# --- the honest pair ------------------------------------------------------------------------


def session(events: queue.Queue[Any] | None = None) -> ChatSession:
    return ChatSession(events=events, persist=False)


def pair(server: Address) -> tuple[ChatSession, ChatSession]:
    alice, bob = session(), session()
    for who, name in ((alice, "alice"), (bob, "bob")):
        assert who.login(server, name, password=PASSWORD)
        wait(who, LoggedIn, 30.0)
    return alice, bob


def wait(who: ChatSession, kind: type | tuple[type, ...], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        event = who.events.get(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(event, MessageReceived):
            who.shown(event.id)  # as a front end does, or the mailbox stops (see exchange)
        if isinstance(event, kind):
            return event


def exchange(
    alice: ChatSession, bob: ChatSession, seconds: float, tag: str, interval: float = 0.02
) -> dict[str, Any]:
    """alice -> bob every `interval` s for `seconds`: one-way latencies (ms).
    Every message due is sent, however late this loop comes round (a busy
    machine): the count is `seconds / interval`, the schedule alice's."""
    sent: dict[str, float] = {}
    got: dict[str, float] = {}
    other: dict[str, int] = {}  # bob's other events (a disconnection, a re-login)
    start = time.monotonic()
    index = 0
    while True:
        while index * interval < seconds and time.monotonic() >= start + index * interval:
            text = f"{tag} {index}"
            sent[text] = time.monotonic()
            alice.send(text, to="bob")
            index += 1
        elapsed = time.monotonic() - start
        if elapsed >= seconds and (len(got) == len(sent) or elapsed >= seconds + 20):
            break
        try:
            event = bob.events.get(timeout=0.005)
        except queue.Empty:
            continue
        if isinstance(event, MessageReceived):
            # A front end reports each message shown; without it bob's client
            # sends no receipts, the server's window of unreceipted messages
            # to bob fills (about 200) and nothing more is delivered.
            bob.shown(event.id)
            if event.text in sent:
                got.setdefault(event.text, time.monotonic())
        else:
            label = type(event).__name__
            other[label] = other.get(label, 0) + 1
    latencies = sorted((got[t] - sent[t]) * 1000 for t in got)
    return {
        "sent": len(sent), "received": len(got), "other": other,
        "p50": percentile(latencies, 50) if latencies else None,
        "p99": percentile(latencies, 99) if latencies else None,
        "max": latencies[-1] if latencies else None,
    }  # fmt: skip


def show(label: str, r: dict[str, Any], extra: str = "") -> None:
    if r["other"]:
        extra += f"; bob's other events: {r['other']}"
    if r["p50"] is None:
        print(f"  {label:<44} nothing arrived ({r['sent']} sent){extra}")
        return
    print(f"  {label:<44} p50 {r['p50']:8.1f} ms  p99 {r['p99']:8.1f} ms  max {r['max']:8.1f} ms"
          f"  ({r['received']}/{r['sent']} arrived){extra}")  # fmt: skip


def flood_phase(tmp: Path, label: str, seconds: float, rate: float, processes: int,
                *extra: str) -> None:  # fmt: skip
    server = start_server(tmp, label, *extra)
    try:
        alice, bob = pair(server.address)
        exchange(alice, bob, 1.0, "warm-up")
        if not extra:
            show("no flood", exchange(alice, bob, seconds, "quiet"))
        flooders = Flood(server.address, rate, processes)
        drops0, cpu0 = udp_drops(server.address[1]), server.cpu()
        flooders.start()
        time.sleep(0.5)
        result = exchange(alice, bob, seconds, "flood")
        sent, elapsed = flooders.stop()
        cpu = (server.cpu() - cpu0) / (seconds + 0.5)
        drops = udp_drops(server.address[1]) - drops0
        show(f"flood, {label}", result)
        print(f"    flood: {sent:,} HELLOs from 200 addresses in {elapsed:.1f} s = "
              f"{sent / elapsed:,.0f}/s achieved (asked {rate:,.0f}/s); server CPU "
              f"{cpu * 100:.0f} % of a core; {drops:,} dropped by the kernel at the server's "
              "socket (buffer full)")  # fmt: skip
        alice.close(2.0)
        bob.close(2.0)
    finally:
        server.stop()


# --- lockout ----------------------------------------------------------------------------


def guess(server: Address, seconds: float, go: EventType, out: Any) -> None:
    """Wrong passwords for bob at 5/s in all, from 50 addresses in turn."""
    socks = []
    for host in GUESS_HOSTS:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        socks.append(sock)
    salted = functools.lru_cache(maxsize=8)(salted_password)  # one salt: bob's
    answers: dict[str, int] = {}
    go.wait()
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        sock = socks[i % len(socks)]
        # The client's own login (a fresh instance each time), each step sent once.
        core = ClientCore("bob", WRONG, salted_password=salted)
        core.connect(time.monotonic())
        for step in ("challenge", "answer"):
            for datagram in core.datagrams_to_send(time.monotonic()):
                sock.sendto(datagram, server)
            reply = _answer(sock, 2.0)
            if reply is None:
                break
            frame, data = reply
            core.receive_datagram(data, time.monotonic())
            if step == "answer":
                label = frame.code.label if isinstance(frame, Refused) else type(frame).__name__
                answers[label] = answers.get(label, 0) + 1
            elif not isinstance(frame, Challenge):
                break
        i += 1
        time.sleep(max(0.0, start + i * 0.2 - time.monotonic()))
    out.put((i, answers))
    for sock in socks:
        sock.close()


def _answer(sock: socket.socket, timeout: float) -> tuple[Any, bytes] | None:
    """The first pre-login reply within `timeout`: its frame and its datagram."""
    deadline = time.monotonic() + timeout
    while select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
        data = sock.recv(2048)
        try:
            packet = decode_packet(data, None)
        except RemoteProtocolError:
            continue
        return packet.frames[0], data
    return None


def time_to_login(server: Address, store_root: Path) -> tuple[float, str]:
    who = ChatSession(store_root=store_root)
    start = time.monotonic()
    assert who.login(server, "bob", password=PASSWORD)
    event = wait(who, (LoggedIn, ErrorEvent), 60.0)
    took = time.monotonic() - start
    if isinstance(event, LoggedIn):
        who.close(2.0)
    else:
        who.abort()
    return took, "logged in" if isinstance(event, LoggedIn) else f"{event.code}: {event.message}"


def lockout_phase(tmp: Path, attack_seconds: float) -> None:
    server = start_server(tmp, "lockout")
    try:
        home = tmp / "bob-client"
        took, what = time_to_login(server.address, home)  # registers; the ticket is kept
        print(f"  bob's first login (registers, gets a ticket): {took:.2f} s, {what}")
        ctx = multiprocessing.get_context("spawn")
        go = ctx.Event()
        out: Any = ctx.Queue()
        attacker = ctx.Process(target=guess, args=(server.address, attack_seconds, go, out),
                               daemon=True)  # fmt: skip
        attacker.start()
        time.sleep(1.0)
        go.set()
        time.sleep(min(6.0, attack_seconds / 2))  # the name's window is full by now
        took, what = time_to_login(server.address, home)
        print(f"  bob's client, with its ticket, during the attack: {took:.2f} s, {what}")
        took, what = time_to_login(server.address, tmp / "bob-other-device")
        print(f"  a client of bob's without a ticket, during it:     {took:.2f} s, {what}")
        attempts, answers = out.get(timeout=attack_seconds + 30)
        attacker.join(10)
        print(f"  the attack: {attempts} wrong passwords in {attack_seconds:.0f} s from 50 "
              f"addresses (5/s); answers {answers}")  # fmt: skip
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.preauth_flood",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement (default 8)")
    parser.add_argument(
        "--rate", type=float, default=60_000.0, help="flood datagrams/s asked for (default 60,000)"
    )
    parser.add_argument("--flooders", type=int, default=2, help="flood processes (default 2)")
    parser.add_argument("--no-old", action="store_true", help="skip the run without the budget")
    args = parser.parse_args(argv)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="preauth-flood-") as name:
        tmp = Path(name)
        print(f"pre-login flood: honest pair alice -> bob every 20 ms, {args.seconds:.0f} s each")
        flood_phase(tmp, "default pre-login budget", args.seconds, args.rate, args.flooders)
        if not args.no_old:
            flood_phase(tmp, "no global budget (as before)", args.seconds, args.rate,
                        args.flooders, "--preauth-total-rate", "1e9")  # fmt: skip
        print("lockout: wrong passwords for bob at 5/s from 50 addresses")
        lockout_phase(tmp, 20.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
