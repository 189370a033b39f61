"""The window with a long history (issue 17): first paint, switching
conversations and Find with 100,000 stored messages over 1,000 contacts
(run by `run.py`'s GUI phase in its own process, on a display: $DISPLAY or
the run's private Xvfb; or alone).

It starts a `chat_server.ChatServer` in a thread of this process, writes
the history straight into the client store the window will open (half of
it in one conversation, with bob, the rest spread over the other
contacts), logs a real `ChatWindow` in through its form with a real
`chat_client.ChatSession`, and times, each up to the end of
`update_idletasks()` (the layout and the redraw Tk owes):

- first paint: handling `LoggedIn` (contacts from the store, bob's last
  page) and drawing it;
- switching: opening another conversation, alternately bob's and a small one;
- search: Find for a word only in bob's oldest message (the FTS5 index,
  then the page around the hit), for a word held nowhere, and for one in
  every message (found in what is shown).

    python -m bench.gui_history [--messages 100000] [--contacts 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import tkinter as tk
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench  # noqa: F401  (puts the project root on sys.path)
from bench.loadgen import RTO_MAX, RTO_MIN
from chat_client import ChatSession
from chat_server import ChatServer
from client_core import LoggedIn
from client_store import ClientStore, store_dir
from client_window import ChatWindow, Settings
from common import i64
from protocol import name_key
from server_records import ServerConfig

TARGET_MS = 200.0
PEER_INSTANCE = 0x0123_4567_89AB_CDEF
OLDEST_WORD = "zebracorn"  # only in bob's first message
SWITCHES = 20


def fill(path: Path, user: str, messages: int, contacts: int) -> None:
    """`messages` shown lines in the store at `path`: half with bob, the
    rest round-robin over `contacts - 1` others; every third one ours."""
    store = ClientStore(path, user)
    others = [f"contact{i:04d}" for i in range(contacts - 1)]
    start = int(time.time() * 1000) - messages * 1000
    rows = []
    for i in range(messages):
        peer = "bob" if i % 2 == 0 or not others else others[(i // 2) % len(others)]
        outgoing = i % 3 == 0
        text = f"message {i} about the weather and the plans for the weekend"
        if i == 0:
            text = f"the first {OLDEST_WORD} of all"
        sender = user if outgoing else peer
        instance = store.instance_id if outgoing else PEER_INSTANCE
        rows.append((name_key(peer), peer, int(outgoing), text, start + i * 1000,
                     name_key(sender), i64(instance), i + 1,
                     "delivered" if outgoing else None, None if outgoing else i + 1))  # fmt: skip
    store.begin()
    store.db.executemany(
        "INSERT INTO history (peer_key, peer, outgoing, text, ts_ms, sender_key, instance_id,"
        " client_seq, state, server_msg_id, shown) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
        rows,
    )
    store.commit()
    store.close()


def timed(root: tk.Misc, action: Callable[[], object]) -> float:
    """Milliseconds for `action` and the layout and redraw it leaves to Tk."""
    started = time.perf_counter()
    action()
    root.update_idletasks()
    return (time.perf_counter() - started) * 1000


def measure(messages: int, contacts: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-gui-history-") as tmp:
        config = ServerConfig(data_dir=Path(tmp) / "server", key_workers=0)
        server = ChatServer(("127.0.0.1", 0), config)
        serving = threading.Thread(target=server.serve_forever, daemon=True)
        serving.start()
        address = "{}:{}".format(*server.address)
        started = time.perf_counter()
        fill(store_dir(address, "alice", Path(tmp) / "client"), "alice", messages, contacts)
        fill_s = time.perf_counter() - started
        root = tk.Tk(className="chat-bench")
        root.withdraw()
        window = ChatWindow(
            tk.Toplevel(root), Settings(server=address, geometry="900x640+10+10"),
            session_factory=ChatSession,
            session_options={"store_root": Path(tmp) / "client", "rto_min": RTO_MIN,
                             "rto_max": RTO_MAX},
        )  # fmt: skip
        paint: list[float] = []
        original = window.handle_event

        def handle(event: Any) -> None:
            if isinstance(event, LoggedIn):
                paint.append(timed(root, lambda: original(event)))
            else:
                original(event)

        window.handle_event = handle  # type: ignore[method-assign]
        try:
            window.username_var.set("alice")
            window.password_var.set("bench password")
            window.connect_var.set("bob")
            window.submit_login()
            deadline = time.monotonic() + 60
            while window.username is None and time.monotonic() < deadline:
                root.update()
                time.sleep(0.005)
            if window.username is None:
                raise RuntimeError(f"no login: {window.login_error.cget('text')}")
            for _ in range(20):
                root.update()
                time.sleep(0.01)
            others = [f"contact{i:04d}" for i in range(0, max(1, contacts - 1), 37)][:SWITCHES]
            switch = []
            for other in others:
                switch.append(timed(root, lambda o=other: window.open_conversation(o)))  # type: ignore[misc]
                switch.append(timed(root, lambda: window.open_conversation("bob")))
            root.update()
            window.show_find()
            search = {}
            found_oldest = False
            for label, needle in (("oldest", OLDEST_WORD), ("absent", "xylophone"),
                                  ("everywhere", "weather")):  # fmt: skip
                window._hide_find()
                window.show_find()
                window.find_var.set(needle)
                search[label] = timed(root, window.find_next)
                if label == "oldest":
                    found_oldest = OLDEST_WORD in window.transcript_text()
            contacts_shown = len(window.contact_list.order())
        finally:
            window.close()
            root.destroy()
            server.shutdown()
            serving.join(5)
            server.close()
    return {
        "messages": messages, "contacts": contacts, "contacts_shown": contacts_shown,
        "fill_s": fill_s, "paint_ms": paint[0] if paint else None,
        "switch_p50_ms": statistics.median(switch), "switch_max_ms": max(switch),
        "search_oldest_ms": search["oldest"], "search_absent_ms": search["absent"],
        "search_everywhere_ms": search["everywhere"],
        "search_max_ms": max(search.values()), "found_oldest": found_oldest,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.gui_history", description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--contacts", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="one JSON line, nothing else")
    args = parser.parse_args(argv)
    result = measure(args.messages, args.contacts)
    if args.json:
        print(json.dumps(result), flush=True)
        return 0
    print(f"window with {args.messages:,} messages over {args.contacts:,} contacts (store "
          f"filled in {result['fill_s']:.1f} s); target each <= {TARGET_MS:.0f} ms")  # fmt: skip
    rows = [
        ("first paint (contacts + last page)", result["paint_ms"]),
        ("switching conversations, median", result["switch_p50_ms"]),
        ("switching conversations, max", result["switch_max_ms"]),
        ("Find: only in the oldest message", result["search_oldest_ms"]),
        ("Find: held nowhere", result["search_absent_ms"]),
        ("Find: in every message", result["search_everywhere_ms"]),
    ]
    for label, value in rows:
        mark = "met" if value is not None and value <= TARGET_MS else "MISSED"
        print(f"  {label:<40} {value:8.1f} ms  {mark}")
    print(f"  contacts listed: {result['contacts_shown']:,}; oldest hit shown: "
          f"{result['found_oldest']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
