"""Memory of a server whose mailboxes fill up, and a restart over big ones.

Prints figures (no assertions; issue 12's targets beside them):

(a) RSS growth of a real `chat_server.py` process (VmRSS from /proc) while
    SENDERS accounts fill the mailboxes of as many offline accounts, every
    message accepted (so committed) before the figure is read; target: at
    most 150 MiB for 2,000 accounts filling mailboxes to their limits.
(b) A restart over a database holding GIB of mailboxes, built directly with
    sqlite3 in the server's schema: time from spawning the process to its
    "listening" line, and its RSS then; targets: under 2 s, under 100 MiB.

    python -m bench.memory_mailbox [--senders 2000] [--messages 32]
        [--text-size 4096] [--gib 1.0]

Linux only (/proc). The load client is `bench.loadgen` (the real protocol).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import secrets
import selectors
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import loadgen
from protocol import CONTROL_STREAM, PBKDF2_MIN_ITERATIONS, Logout, encode_message
from server_store import ServerStore, content_digest

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
SERVER = str(ROOT / "chat_server.py")  # --server: another version's, for a comparison


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1))


def spawn(
    server: str, data_dir: Path, *extra: str
) -> tuple[subprocess.Popen[str], tuple[str, int], float]:
    """Start a server; return it, its address and the seconds to its ready line."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, server, "--port", "0", "--data-dir",
         str(data_dir), "--pbkdf2-iterations", str(PBKDF2_MIN_ITERATIONS), "--log-level",
         "warning", *extra],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    ready = time.monotonic() - started
    match = re.search(r"listening on (\S+):(\d+)", line)
    if match is None:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, (match.group(1), int(match.group(2))), ready


class Filler(loadgen.Sender):
    """A sender whose window counts messages not yet accepted: nobody will
    receipt them (their recipients are offline)."""

    def settle(self, seq: int, bit: int, now_ns: int) -> None:
        if bit == 1 and self.outstanding.pop(seq, None) is not None:
            self.accepted += 1


def log_in(server: tuple[str, int], names: list[str]) -> list[loadgen.Handshake]:
    handshakes = [loadgen.Handshake(name, loadgen.new_socket(server)) for name in names]
    loadgen.drive_logins(handshakes, timeout=600)
    return handshakes


def fill_mailboxes(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-mailbox-") as tmp:
        proc, server, _ = spawn(
            args.server, Path(tmp), "--registration-rate", "100000", "--user-msg-rate", "100000",
            "--max-sessions", str(4 * args.senders + 100),
        )  # fmt: skip
        try:
            time.sleep(0.5)
            base = rss_kib(proc.pid)
            # Recipients register and leave: their mailboxes fill while offline.
            recipients = log_in(server, [f"r{i}" for i in range(args.senders)])
            for h in recipients:
                assert h.conn is not None
                h.conn.send(encode_message(Logout()), CONTROL_STREAM)
                for datagram in h.conn.datagrams_to_send(time.monotonic()):
                    h.sock.send(datagram)
            time.sleep(1.0)
            for h in recipients:
                h.sock.close()
            registered = rss_kib(proc.pid)
            handshakes = log_in(server, [f"s{i}" for i in range(args.senders)])
            senders = []
            for i, h in enumerate(handshakes):
                assert h.conn is not None
                senders.append(Filler(h.name, h.sock, h.conn, h.instance_id, f"r{i}",
                                      args.window, args.text_size))  # fmt: skip
            logged_in = rss_kib(proc.pid)
            started = time.monotonic()
            total = args.senders * args.messages
            selector = selectors.DefaultSelector()
            for s in senders:
                selector.register(s.sock, selectors.EVENT_READ, s)
            peak = logged_in
            last_sample = 0.0
            while sum(s.accepted for s in senders) < total:
                now = time.monotonic()
                if now - started > args.timeout:
                    raise RuntimeError(f"only {sum(s.accepted for s in senders)} of {total} "
                                       f"accepted in {args.timeout} s")  # fmt: skip
                for s in senders:
                    s.fill(min(args.window, args.messages - s.sent))
                    if s.dirty or (s.timer is not None and s.timer <= now):
                        s.pump(now)
                for key, _ in selector.select(0.01):
                    key.data.read()
                if now - last_sample > 0.5:
                    last_sample = now
                    peak = max(peak, rss_kib(proc.pid))
            elapsed = time.monotonic() - started
            filled = rss_kib(proc.pid)
            peak = max(peak, filled)
            selector.close()
            db = sqlite3.connect(Path(tmp) / "chat.db")
            rows, size = db.execute(
                "SELECT COUNT(*), SUM(LENGTH(CAST(text AS BLOB))) FROM mailbox"
            ).fetchone()
            db.close()
            for s in senders:
                s.sock.close()
        finally:
            proc.terminate()
            proc.wait(30)
        print(f"(a) {args.senders:,} senders filled {args.senders:,} offline mailboxes with "
              f"{args.messages} x {args.text_size:,} B = {size / MIB:,.0f} MiB in "
              f"{elapsed:.0f} s ({total / elapsed:,.0f} msg/s)")  # fmt: skip
        print(f"    on disk: {rows:,} messages ({'all' if rows == total else 'NOT all'} "
              f"{total:,} accepted)")  # fmt: skip
        print(f"    RSS: {base / 1024:.0f} MiB at start, {registered / 1024:.0f} MiB with "
              f"{args.senders:,} accounts, {logged_in / 1024:.0f} MiB with the senders "
              f"logged in, {filled / 1024:.0f} MiB filled (peak {peak / 1024:.0f})")  # fmt: skip
        print(f"    growth while filling: {(filled - logged_in) / 1024:.1f} MiB "
              f"(peak {(peak - logged_in) / 1024:.1f}); from start: "
              f"{(filled - base) / 1024:.1f} MiB (target <= 150 MiB)")  # fmt: skip


def build_database(data_dir: Path, gib: float, recipients: int, text_size: int) -> int:
    """A database in the server's schema with `gib` GiB of mailbox text."""
    store = ServerStore(data_dir)
    store.load()
    store.close()
    db = sqlite3.connect(data_dir / "chat.db", isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    salt = secrets.token_bytes(16)
    db.executemany(
        "INSERT INTO accounts VALUES (?,?,?,?,?,?,?)",
        [(f"u{i}", f"u{i}", salt, PBKDF2_MIN_ITERATIONS, hashlib.sha256(b"%d" % i).digest(),
          hashlib.sha256(b"s%d" % i).digest(), 0) for i in range(2 * recipients)],
    )  # fmt: skip
    total = int(gib * 1024 * MIB) // text_size
    per = total // recipients
    text = "x" * text_size
    msg_id = 1
    for r in range(recipients):
        rows = []
        dedup = []
        for _ in range(per):
            sender = f"u{recipients + r}"
            rows.append((msg_id, f"u{r}", sender, sender, 7, msg_id, text, 0))
            dedup.append((sender, 7, msg_id, msg_id, 0, content_digest(f"u{r}", text), 0, None))
            msg_id += 1
        db.executemany("INSERT INTO mailbox VALUES (?,?,?,?,?,?,?,?)", rows)
        db.executemany("INSERT INTO dedup VALUES (?,?,?,?,?,?,?,?)", dedup)
        db.execute("INSERT INTO summary VALUES (?,?,?,0)", (f"u{r}", per, per * text_size))
    db.execute("INSERT OR REPLACE INTO meta VALUES ('next_block', ?)", (msg_id + 1,))
    db.execute("COMMIT")
    db.close()
    return msg_id - 1


def restart_over(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        data_dir = Path(tmp)
        started = time.monotonic()
        count = build_database(data_dir, args.gib, args.senders, args.text_size)
        built = time.monotonic() - started
        size = os.path.getsize(data_dir / "chat.db")
        # Out of the page cache, as after a reboot, where this machine lets us.
        subprocess.run(["sync"], check=False)
        proc, _, ready = spawn(args.server, data_dir)
        try:
            rss = rss_kib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
        print(f"(b) restart over {size / MIB / 1024:.2f} GiB ({count:,} waiting messages for "
              f"{args.senders:,} users; built in {built:.0f} s): ready line after {ready:.2f} s "
              f"(target < 2 s), RSS then {rss / 1024:.0f} MiB (target < 100 MiB)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=2000, help="senders = offline recipients")
    parser.add_argument("--messages", type=int, default=32, help="messages per sender")
    parser.add_argument("--text-size", type=int, default=4096, help="bytes of text per message")
    parser.add_argument("--window", type=int, default=16, help="messages not yet accepted")
    parser.add_argument("--gib", type=float, default=1.0, help="mailboxes for (b), GiB")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--skip-fill", action="store_true", help="only (b)")
    parser.add_argument("--skip-restart", action="store_true", help="only (a)")
    parser.add_argument("--server", default=SERVER, help="chat_server.py to run")
    args = parser.parse_args()
    if not args.skip_fill:
        fill_mailboxes(args)
    if not args.skip_restart:
        restart_over(args)


if __name__ == "__main__":
    main()
