"""The GUI's event-loop lag while messages pour in (run by `run.py` in its
own process, on a display: $DISPLAY or a private Xvfb).

It opens a real `ChatWindow`, logs in through its login form, prints
"ready", and then follows commands on stdin: "go" clears the window's
`lag_samples`/`busy_samples`, "stop" prints them as one JSON line and
closes the window. The messages themselves come from a load client in
another process, so this process only does what a person's client does.

    python -m bench.gui_lag --server HOST:PORT --user NAME --store DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import tkinter as tk
from pathlib import Path

import bench  # noqa: F401  (puts the project root on sys.path)
from bench.loadgen import PASSWORD, RTO_MAX, RTO_MIN
from chat_client import ChatSession
from client_window import ChatWindow

LOGIN_TIMEOUT = 20.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.gui_lag")
    parser.add_argument("--server", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--store", type=Path, required=True)
    args = parser.parse_args(argv)

    root = tk.Tk(className="chat-bench")
    window = ChatWindow(
        root,
        session_factory=ChatSession,
        session_options={"store_root": args.store, "rto_min": RTO_MIN, "rto_max": RTO_MAX},
    )
    window.server_var.set(args.server)
    window.username_var.set(args.user)
    window.password_var.set(PASSWORD)
    window.submit_login()

    commands: list[str] = []
    lock = threading.Lock()

    def read_stdin() -> None:
        for line in sys.stdin:
            with lock:
                commands.append(line.strip())
        with lock:
            commands.append("stop")

    threading.Thread(target=read_stdin, daemon=True).start()
    state = {"ready": False, "waited": 0.0, "code": 0}

    def received() -> int:
        return sum(
            1 for conv in window.conversations.values() for line in conv.lines
            if line.kind == "peer"
        )  # fmt: skip

    def tick() -> None:
        if not state["ready"]:
            if window.username is not None:
                state["ready"] = True
                print("ready", flush=True)
            else:
                state["waited"] += 0.05
                if state["waited"] > LOGIN_TIMEOUT:
                    print(json.dumps({"error": "the window did not log in"}), flush=True)
                    state["code"] = 1
                    window.close()
                    return
        with lock:
            todo, commands[:] = list(commands), []
        for command in todo:
            if command == "go":
                window.lag_samples.clear()
                window.busy_samples.clear()
                state["base"] = received()
            elif command == "stop":
                report = {
                    "lag": list(window.lag_samples), "busy": list(window.busy_samples),
                    "received": received() - int(state.get("base", 0)),
                }  # fmt: skip
                print(json.dumps(report), flush=True)
                window.close()
                return
        root.after(50, tick)

    root.after(50, tick)
    root.mainloop()
    return int(state["code"])


if __name__ == "__main__":
    sys.exit(main())
